//! The one executor: it runs any plan (`policy::planner`). It reads the facts a plan needs (each once per request,
//! a few at a time), sends the one upstream call the plan becomes through one request builder, maps the upstream's
//! status in one place, and verifies the answer as the plan's `Expect` says (`answers.rs`, `export.rs`, the
//! streamed Bundle and NDJSON filters).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fhirgw_config::path::join_encoded;
use fhirgw_config::upstream::Upstream;
use futures_util::{StreamExt, stream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::Instrument;

use super::upload::Upload;
use super::{Proxy, ProxyError, headers};
use crate::body::{self, Body};
use crate::policy::input::{Access, Env, Input};
use crate::policy::plan::{Call, Expect, Fact, Facts, Payload, Query, Step};
use crate::policy::planner;
use crate::policy::refusal::Refusal;
use crate::upstream::UpstreamError;

/// More rounds of facts than any plan needs (a conditional update: the condition, then the stored resource and
/// the references it writes).
const MAX_ROUNDS: usize = 6;
/// Facts read at once.
const CONCURRENCY: usize = 8;
/// Largest single resource (or search page read as a fact) the gateway reads.
pub(super) const RESOURCE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// One request's execution: the plan's inputs and where to send.
pub(super) struct Exec<'a> {
    pub proxy: &'a Proxy,
    pub env: Env<'a>,
    pub upstream: Arc<Upstream>,
    pub access: &'a Access,
    /// The client's allow-listed headers, the start of every upstream request (`headers::for_upstream`).
    pub forwarded: &'a HeaderMap,
    /// The request's audit record: told the final step and what the answers showed.
    pub trail: &'a crate::audit::Trail,
    /// A raw Binary upload's body, not read yet: taken by the one call that streams it.
    pub upload: Mutex<Option<Upload>>,
}

impl Exec<'_> {
    /// Plans `input` and runs the plan: facts until the planner decides, then its answer. An upload the plan did
    /// not send (a refusal) is drained for a while, so the client reads its answer rather than a reset.
    pub async fn run(&self, input: &Input) -> Result<Response<Body>, ProxyError> {
        let result = self.run_plan(input).await;
        if let Some(upload) = self.upload.lock().ok().and_then(|mut slot| slot.take()) {
            crate::body_budget::discard(upload.body, upload.length);
        }
        result
    }

    async fn run_plan(&self, input: &Input) -> Result<Response<Body>, ProxyError> {
        let mut facts = Facts::default();
        for _ in 0..MAX_ROUNDS {
            let step = planner::plan(input, &self.env, self.access, &facts);
            if !matches!(step, Step::Need(_)) {
                self.trail.step(&step, &facts, &self.upstream.base_path, &self.access.grants);
            }
            match step {
                Step::Need(queries) => {
                    self.gather(queries, &mut facts)
                        .instrument(tracing::info_span!(target: fhirgw_telemetry::TRACE_ONLY, "facts"))
                        .await?;
                }
                Step::Send(call) => return self.send(call).await,
                Step::Answer(answer) => return Ok(super::answers::local(answer)),
                Step::Refuse(refusal) => return Err(refusal.into()),
            }
        }
        Err(ProxyError::Unverifiable("the plan did not settle".into()))
    }

    /// Reads `queries` from the upstream into `facts`.
    async fn gather(&self, queries: Vec<Query>, facts: &mut Facts) -> Result<(), ProxyError> {
        let missing: Vec<Query> = queries.into_iter().filter(|q| !facts.contains(q)).collect();
        let mut reads = stream::iter(missing)
            .map(|query| async move {
                let fact = self.read(&query).await?;
                Ok::<_, ProxyError>((query, fact))
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(read) = reads.next().await {
            let (query, fact) = read?;
            facts.insert(query, fact);
        }
        Ok(())
    }

    async fn read(&self, query: &Query) -> Result<Fact, ProxyError> {
        let target = match query {
            Query::Resource { ty, id, vid } => {
                let mut segments = vec![ty.clone(), id.clone()];
                if let Some(vid) = vid {
                    segments.extend(["_history".to_owned(), vid.clone()]);
                }
                join_encoded(&self.upstream.base_path, &segments)
            }
            Query::BinaryMeta { id, vid } => {
                let mut segments = vec!["Binary".to_owned(), id.clone()];
                if let Some(vid) = vid {
                    segments.extend(["_history".to_owned(), vid.clone()]);
                }
                format!("{}?_elements=contentType,securityContext", join_encoded(&self.upstream.base_path, &segments))
            }
            Query::Search { ty, params } => format!(
                "{}?{}",
                join_encoded(&self.upstream.base_path, std::slice::from_ref(ty)),
                crate::policy::query::encode(params)
            ),
        };
        let response = self.request(Method::GET, &target, None, &[]).await?;
        let status = response.status();
        match (query, status) {
            (Query::Resource { .. } | Query::BinaryMeta { .. }, StatusCode::NOT_FOUND | StatusCode::GONE) => {
                return Ok(Fact::Resource(None));
            }
            (_, StatusCode::OK) => {}
            (_, other) => return Err(ProxyError::UpstreamStatus(other)),
        }
        let body = buffer(response, RESOURCE_MAX_BYTES).await?;
        Ok(match query {
            // A resource that is not JSON cannot be seen: the same as a missing one.
            Query::Resource { .. } | Query::BinaryMeta { .. } => Fact::Resource(serde_json::from_slice(&body).ok()),
            Query::Search { .. } => Fact::Bundle(
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ProxyError::Unverifiable(format!("the search result is not JSON: {e}")))?,
            ),
        })
    }

    /// Sends the plan's call and verifies the answer as it expects.
    async fn send(&self, call: Call) -> Result<Response<Body>, ProxyError> {
        let Call { method, target, body, headers, expect } = call;
        let response = self.request(method, &target, body, &headers).await?;
        match expect {
            Expect::Resource { ty, id, reach, head } => self.resource(response, &ty, &id, &reach, head).await,
            Expect::Bundle(expect) => self.bundle(response, expect),
            Expect::Written { ty } => self.written(response, &ty).await,
            Expect::MetaParameters { operation } => self.meta_parameters(response, &operation).await,
            Expect::Batch(expect) => self.batch(response, expect).await,
            Expect::Capabilities => {
                let bytes = self.capabilities(response).await?;
                Ok(super::bytes_response(StatusCode::OK, bytes))
            }
            Expect::ExportKickOff => self.export_kickoff(response),
            Expect::ExportStatus => self.export_status(response).await,
            Expect::ExportCancel => self.export_cancel(response),
            Expect::ExportFile { declared } => self.export_file(response, declared),
            Expect::BinaryContent { head } => self.binary_content(response, head),
            Expect::Uploaded => self.uploaded(response),
        }
    }

    /// The one way a request reaches the upstream: the client's allow-listed headers, then the gateway's own
    /// (`Accept`, `Accept-Encoding: identity` since every body is read, the plan's preconditions, the payload's
    /// type); the credential is added by `UpstreamClient::send`. A compressed answer is refused (502).
    pub async fn request(
        &self,
        method: Method,
        target: &str,
        payload: Option<Payload>,
        extra: &[(header::HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, ProxyError> {
        let uri = Uri::try_from(format!("{}{target}", self.upstream.origin))
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        let mut headers = self.forwarded.clone();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/fhir+json"));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        let (body, upload) = match payload {
            Some(Payload::Json { content_type, value }) => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                (body::full(Bytes::from(value.to_string())), None)
            }
            Some(Payload::BinaryUpload(binary)) => {
                let client = self.upload.lock().ok().and_then(|mut slot| slot.take()).ok_or_else(|| {
                    ProxyError::Upstream(UpstreamError::Request("the upload's body was already sent".into()))
                })?;
                let outbound = super::upload::encode(&binary, client).await?;
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json"));
                if let Some(length) = outbound.length {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                }
                (outbound.body, Some((outbound.done, outbound.failure)))
            }
            None => (body::empty(), None),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        *request.headers_mut() = headers;
        let response = match upload {
            None => self.proxy.upstreams.send(&self.upstream, request).await?,
            // An upload cut short by its client fails with the client's reason, not as the upstream's failure.
            Some((done, failure)) => match self.proxy.upstreams.send_upload(&self.upstream, request, done).await {
                Ok(response) => match failure.take() {
                    Some(reason) => return Err(reason.into()),
                    None => response,
                },
                Err(e) => return Err(failure.take().map_or_else(|| e.into(), ProxyError::from)),
            },
        };
        headers::require_identity(response.headers())?;
        Ok(response)
    }
}

/// The one mapping of an upstream status the plan did not expect: missing or gone is the one 404; a conflict or
/// failed precondition on a write is a 412 (the resource changed since it was checked); anything else is the
/// upstream's failure.
pub(super) fn expect_status(status: StatusCode, ok: &[StatusCode], write: bool) -> Result<(), ProxyError> {
    if ok.contains(&status) {
        return Ok(());
    }
    Err(match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => Refusal::NotFound.into(),
        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT if write => Refusal::PreconditionFailed.into(),
        other => ProxyError::UpstreamStatus(other),
    })
}

/// The upstream's body, up to `max` bytes.
pub(super) async fn buffer(response: Response<Incoming>, max: usize) -> Result<Bytes, ProxyError> {
    Ok(Limited::new(response.into_body(), max)
        .collect()
        .await
        .map_err(|e| ProxyError::Unverifiable(format!("reading the body: {e}")))?
        .to_bytes())
}
