//! The only way to reach an upstream. [`UpstreamClient::send`] injects the upstream's credential into every request
//! it sends; the hyper client inside is private, so no code path can reach an upstream without it.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fhirgw_config::upstream::{Upstream, UpstreamAuth};
use fhirgw_config::{Kind, Rejection, Snapshot};
use fhirgw_telemetry::semconv::{self, Side};
use http::header::{AUTHORIZATION, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moka::future::Cache;

use crate::credentials::{self, TokenSource};
use crate::http_client::{self, Connector};
use crate::metrics::{CacheCounter, Metrics};

use crate::body::Body;

/// How long a credential read from a file is reused before the file is read again (rotation).
const FILE_CREDENTIAL_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no credential for upstream `{upstream}`: {reason}")]
    Credential { upstream: String, reason: String },
    #[error("upstream `{upstream}` unreachable: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream `{upstream}` sent no response within {timeout:?}")]
    Timeout { upstream: String, timeout: Duration },
    #[error("bad upstream request: {0}")]
    Request(String),
}

struct Pool {
    config: Arc<Upstream>,
    client: Client<Connector, Body>,
}

pub struct UpstreamClient {
    pools: DashMap<String, Pool>,
    /// `Authorization` values made from credential files, per file.
    credentials: Cache<String, HeaderValue>,
    credential_lookups: CacheCounter,
    /// Credentials fetched from a token endpoint or a metadata server, per (upstream, source).
    tokens: TokenSource,
    metrics: Arc<Metrics>,
}

impl UpstreamClient {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            pools: DashMap::new(),
            credentials: Cache::builder().max_capacity(1024).time_to_live(FILE_CREDENTIAL_TTL).build(),
            credential_lookups: metrics.cache("credential_file"),
            tokens: TokenSource::default().with_lookups(metrics.cache("upstream_token")),
            metrics,
        })
    }

    fn client_for(&self, upstream: &Arc<Upstream>) -> Client<Connector, Body> {
        if let Some(pool) = self.pools.get(&upstream.name).filter(|pool| pool.config == *upstream) {
            return pool.client.clone();
        }
        let connector = http_client::connector(upstream.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        self.pools.insert(upstream.name.clone(), Pool { config: upstream.clone(), client: client.clone() });
        client
    }

    async fn credential(&self, upstream: &Upstream) -> Result<Option<HeaderValue>, UpstreamError> {
        let fail = |reason: String| UpstreamError::Credential { upstream: upstream.name.clone(), reason };
        let token = match &upstream.auth {
            UpstreamAuth::None => return Ok(None),
            UpstreamAuth::StaticToken { token_file } => {
                // The header value itself is cached: a hit costs one lookup, no formatting.
                if let Some(value) = self.credentials.get(token_file.as_str()).await {
                    self.credential_lookups.hit();
                    return Ok(Some(value));
                }
                self.credential_lookups.miss();
                let path = token_file.clone();
                // Boxed: the rare miss would otherwise make every request's future (moved several times per
                // request) kilobytes larger.
                let value = Box::pin(self.credentials.try_get_with(token_file.clone(), async {
                    let token = read_token_file(&path).await?;
                    bearer_value(&token).ok_or_else(|| format!("{path}: the token is not a valid header value"))
                }))
                .await
                .map_err(|e| fail(e.to_string()))?;
                return Ok(Some(value));
            }
            UpstreamAuth::ClientCredentials { .. } | UpstreamAuth::MetadataIdentityToken { .. } => {
                self.tokens.token(&upstream.name, &upstream.auth).await.map_err(|e| fail(e.to_string()))?
            }
        };
        bearer_value(&token).map(Some).ok_or_else(|| fail("token is not a valid header value".into()))
    }

    /// Sends a request to `upstream`, with its credential. The request's URI must be on the upstream's origin.
    /// The upstream's answer is due within its first-byte timeout.
    pub async fn send(
        &self,
        upstream: &Arc<Upstream>,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_when(upstream, request, None).await
    }

    /// [`send`](Self::send) for a request whose body streams in from a client (an upload): the first-byte timeout
    /// runs from `body_done`, the end of that body, however long the upload takes.
    pub async fn send_upload(
        &self,
        upstream: &Arc<Upstream>,
        request: Request<Body>,
        body_done: Arc<tokio::sync::Notify>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_when(upstream, request, Some(body_done)).await
    }

    async fn send_when(
        &self,
        upstream: &Arc<Upstream>,
        mut request: Request<Body>,
        body_done: Option<Arc<tokio::sync::Notify>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let on_origin = request.uri().scheme_str().zip(request.uri().authority()).is_some_and(|(scheme, authority)| {
            upstream.origin.strip_prefix(scheme).and_then(|rest| rest.strip_prefix("://")) == Some(authority.as_str())
        });
        if !on_origin {
            return Err(UpstreamError::Request(format!("{} is not on {}", request.uri(), upstream.origin)));
        }
        // Whatever the caller put there never reaches the upstream: only the upstream's own credential does.
        request.headers_mut().remove(AUTHORIZATION);
        if let Some(credential) = self.credential(upstream).await? {
            request.headers_mut().insert(AUTHORIZATION, credential);
        }
        let client = self.client_for(upstream);
        // A CLIENT span with the HTTP conventions' names; the path (which may name a patient) is not recorded.
        let uri = request.uri();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let span = tracing::info_span!(
            target: fhirgw_telemetry::TRACE_ONLY,
            "upstream",
            otel.kind = "client",
            upstream = %upstream.name,
            server.address = uri.host().unwrap_or_default(),
            server.port = i64::from(port),
        );
        semconv::method(&span, request.method());
        fhirgw_telemetry::inject_into_headers(&span, request.headers_mut());
        let started = std::time::Instant::now();
        let first_byte = upstream.first_byte_timeout;
        let response = client.request(request);
        let timed = async move {
            let Some(done) = body_done else { return tokio::time::timeout(first_byte, response).await };
            tokio::pin!(response);
            tokio::select! {
                answered = &mut response => Ok(answered),
                () = done.notified() => tokio::time::timeout(first_byte, response).await,
            }
        };
        let sent = tracing::Instrument::instrument(timed, span.clone()).await;
        let status = sent.as_ref().ok().and_then(|r| r.as_ref().ok()).map(Response::status);
        self.metrics.upstream(&upstream.name, status, started.elapsed());
        match sent {
            Ok(Ok(response)) => {
                semconv::status(&span, Side::Client, response.status().as_u16());
                Ok(response)
            }
            Ok(Err(source)) => {
                semconv::error(&span, if source.is_connect() { "connect_error" } else { "request_error" });
                Err(UpstreamError::Connect { upstream: upstream.name.clone(), source })
            }
            Err(_) => {
                semconv::error(&span, "timeout");
                Err(UpstreamError::Timeout { upstream: upstream.name.clone(), timeout: upstream.first_byte_timeout })
            }
        }
    }
}

/// `Bearer <token>`, marked sensitive (kept out of debug output and HPACK tables).
fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

async fn read_token_file(path: &str) -> Result<String, String> {
    let raw = tokio::fs::read_to_string(path).await.map_err(|e| format!("cannot read {path}: {e}"))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(format!("{path} is empty"));
    }
    Ok(token.to_owned())
}

/// What this data plane cannot honour in a configuration that is otherwise valid: credential files it cannot read.
/// Such a push is NACKed rather than served without its credential. Token endpoints and metadata servers are not
/// contacted here: they may be down for a moment, which costs requests a 503, not the whole configuration.
pub fn environment_rejections(snapshot: &Snapshot) -> Vec<Rejection> {
    let mut out = Vec::new();
    for (name, upstream) in &snapshot.upstreams {
        let problem = match &upstream.auth {
            UpstreamAuth::None => None,
            UpstreamAuth::StaticToken { token_file } => match std::fs::read_to_string(token_file) {
                Ok(s) if !s.trim().is_empty() => None,
                Ok(_) => Some(format!("token_file {token_file} is empty on this data plane")),
                Err(e) => Some(format!("token_file {token_file} is not readable on this data plane: {e}")),
            },
            UpstreamAuth::ClientCredentials { client_secret_file, .. } => {
                credentials::check_secret_file(client_secret_file).err()
            }
            UpstreamAuth::MetadataIdentityToken { .. } => None,
        };
        if let Some(reason) = problem {
            let version =
                snapshot.resources.get(&(Kind::Upstream, name.clone())).map(|r| r.version.clone()).unwrap_or_default();
            out.push(Rejection { kind: Kind::Upstream, name: name.clone(), version, reason });
        }
    }
    out
}
