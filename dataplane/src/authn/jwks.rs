//! Identity providers' signing keys, fetched from their `jwks_uri` and cached per URI.
//!
//! A key set is used for the provider's `jwks_max_age` from the moment it was fetched, then fetched again: that is
//! the bound on how long a key the provider has removed keeps verifying tokens (the verified-token cache is held to
//! the same instant, see `KeySet::good_until`). A `kid` missing from a set fetched earlier also triggers a refetch,
//! at most once per `REFRESH_MIN_INTERVAL` per URI, so a rotation is picked up at once without letting random `kid`s
//! hammer the provider. A set that cannot be fetched when due is an error (503): keys are never used past their age.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use fhirgw_config::identity::IdentityProvider;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use jsonwebtoken::jwk::Jwk;
use moka::future::Cache;
use serde_json::Value;

use super::AuthError;
use crate::http_client::Connector;
use crate::metrics::CacheCounter;

/// Ceiling on any entry's life; each provider's own `jwks_max_age` (at most this) decides when it is stale.
const CEILING: Duration = Duration::from_secs(3600);
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
const MAX_BYTES: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// One fetch of a JWKS.
#[derive(Debug)]
pub(super) struct KeySet {
    keys: Vec<Jwk>,
    fetched_at: Instant,
}

impl KeySet {
    /// Whether this set may still be used for `idp` at `now`.
    fn fresh(&self, idp: &IdentityProvider, now: Instant) -> bool {
        now.saturating_duration_since(self.fetched_at) < idp.jwks_max_age
    }

    /// Until when a token verified with a key of this set may be trusted without looking at the keys again.
    pub(super) fn good_until(&self, idp: &IdentityProvider) -> Instant {
        self.fetched_at + idp.jwks_max_age
    }

    fn find(&self, kid: Option<&str>) -> Option<&Jwk> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid)),
            // Without a kid, only an unambiguous set will do.
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }
}

pub(super) struct Jwks {
    cache: Cache<String, Arc<KeySet>>,
    /// When an unknown kid last forced a refetch, per URI.
    last_forced: DashMap<String, Instant>,
    http: Client<Connector, Full<Bytes>>,
    lookups: CacheCounter,
}

impl Jwks {
    pub(super) fn new(http: Client<Connector, Full<Bytes>>, lookups: CacheCounter) -> Self {
        Jwks {
            cache: Cache::builder().max_capacity(256).time_to_live(CEILING).build(),
            last_forced: DashMap::new(),
            http,
            lookups,
        }
    }

    /// The key `kid` names in `idp`'s current JWKS, and the set it came from.
    pub(super) async fn key(
        &self,
        idp: &IdentityProvider,
        kid: Option<&str>,
        now: Instant,
    ) -> Result<(Jwk, Arc<KeySet>), AuthError> {
        let (set, fetched) = self.keys(idp, now).await?;
        if let Some(jwk) = set.find(kid) {
            return Ok((jwk.clone(), set));
        }
        // Unknown kid in a set fetched before this request: the provider may have rotated since. Refetch, at most
        // once per interval.
        let due = self
            .last_forced
            .get(&idp.jwks_uri)
            .is_none_or(|at| now.saturating_duration_since(*at) >= REFRESH_MIN_INTERVAL);
        if kid.is_some() && !fetched && due {
            self.last_forced.insert(idp.jwks_uri.clone(), now);
            self.cache.invalidate(&idp.jwks_uri).await;
            let (set, _) = self.keys(idp, now).await?;
            if let Some(jwk) = set.find(kid) {
                return Ok((jwk.clone(), set));
            }
        }
        Err(AuthError::invalid(
            super::Reason::Signature,
            format!("no key `{}` in the JWKS of `{}`", kid.unwrap_or("(none)"), idp.name),
        ))
    }

    /// `idp`'s key set, fetched again when it is older than the provider's `jwks_max_age` at `now`; and whether this
    /// call fetched it.
    async fn keys(&self, idp: &IdentityProvider, now: Instant) -> Result<(Arc<KeySet>, bool), AuthError> {
        let uri = &idp.jwks_uri;
        if let Some(set) = self.cache.get(uri).await {
            if set.fresh(idp, now) {
                self.lookups.record(true);
                return Ok((set, false));
            }
            self.cache.invalidate(uri).await;
        }
        let http = self.http.clone();
        let mut fetched = false;
        // Boxed: the fetch is rare, and inline it would make every request's future kilobytes larger.
        let set = Box::pin(self.cache.try_get_with(uri.clone(), async {
            fetched = true;
            let keys = fetch(&http, uri).await?;
            // Dated from the request that asked, a little before the fetch: never younger than it is.
            Ok::<_, String>(Arc::new(KeySet { keys, fetched_at: now }))
        }))
        .await;
        self.lookups.record(!fetched);
        let set = set.map_err(|e: Arc<String>| AuthError::IssuerUnavailable {
            issuer: idp.issuer.clone(),
            reason: e.to_string(),
        })?;
        Ok((set, fetched))
    }
}

async fn fetch(http: &Client<Connector, Full<Bytes>>, uri: &str) -> Result<Vec<Jwk>, String> {
    let request = Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(TIMEOUT, http.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(TIMEOUT, Limited::new(response.into_body(), MAX_BYTES).collect())
        .await
        .map_err(|_| "timed out reading".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    // Parse key by key: one key of an unsupported type must not take the others down with it.
    let value: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
    let keys: Vec<Jwk> = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no `keys` array")?
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .collect();
    Ok(keys)
}
