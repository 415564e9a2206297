//! The authentication caches against a real (in-process) provider: how long a removed key and a revoked token keep
//! working. The monotonic clock is moved forward through `authenticate_at`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgw_config::Snapshot;
use fhirgw_config::identity::IdentityProvider;
use fhirgw_config::tenant::Tenant;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::{AuthError, Authenticator, LEEWAY_SECS, Verified, caller_from_claims, unix_now};

const RSA_PRIVATE: &str = include_str!("../../../tests/keys/rsa-private.pem");
const RSA_ROTATED_PRIVATE: &str = include_str!("../../../tests/keys/rsa-other-private.pem");
const JWKS: &str = include_str!("../../../tests/keys/jwks.json");
const JWKS_ROTATED: &str = include_str!("../../../tests/keys/jwks-rotated.json");
const AUDIENCE: &str = "https://gw.example/fhir";

/// A provider publishing a JWKS that the test changes (`null`: the endpoint answers 503), and answering
/// introspection with `active` as the test says.
#[derive(Clone)]
struct State {
    jwks: Arc<Mutex<Value>>,
    active: Arc<Mutex<bool>>,
    jwks_fetches: Arc<AtomicU64>,
    introspections: Arc<AtomicU64>,
}

struct Provider {
    url: String,
    state: State,
}

fn answer(state: &State, path: &str) -> Response<Full<Bytes>> {
    let body = if path == "/jwks" {
        state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        let jwks = state.jwks.lock().map(|j| j.clone()).unwrap_or_default();
        if jwks.is_null() {
            let mut unavailable = Response::new(Full::new(Bytes::new()));
            *unavailable.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return unavailable;
        }
        jwks
    } else {
        state.introspections.fetch_add(1, Ordering::SeqCst);
        let active = state.active.lock().map(|a| *a).unwrap_or(false);
        json!({"active": active, "tenant": "t1", "scope": "system/*.rs", "exp": unix_now() + 3600})
    };
    Response::new(Full::new(Bytes::from(body.to_string())))
}

impl Provider {
    async fn start() -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let url = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
        let state = State {
            jwks: Arc::new(Mutex::new(serde_json::from_str(JWKS).unwrap_or_else(|e| panic!("{e}")))),
            active: Arc::new(Mutex::new(true)),
            jwks_fetches: Arc::default(),
            introspections: Arc::default(),
        };
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let response = answer(&state, req.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Provider { url, state }
    }

    fn fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    fn introspections(&self) -> u64 {
        self.state.introspections.load(Ordering::SeqCst)
    }

    fn set_active(&self, active: bool) {
        if let Ok(mut a) = self.state.active.lock() {
            *a = active;
        }
    }

    fn idp(&self, jwks_max_age: Duration, introspection_max_age: Duration) -> IdentityProvider {
        IdentityProvider {
            name: "idp".into(),
            issuer: self.url.clone(),
            jwks_uri: format!("{}/jwks", self.url),
            audiences: vec![AUDIENCE.into()],
            tenant_claim: "tenant".into(),
            algorithms: vec!["RS256".into()],
            introspection_endpoint: Some(format!("{}/introspect", self.url)),
            introspection_client_id: String::new(),
            introspection_client_secret_file: None,
            authorization_endpoint: None,
            token_endpoint: None,
            jwks_max_age,
            introspection_max_age,
        }
    }

    fn token(&self, rotated: bool) -> String {
        let (kid, pem) = if rotated { ("test-rsa-rotated", RSA_ROTATED_PRIVATE) } else { ("test-rsa", RSA_PRIVATE) };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        let now = unix_now();
        let claims = json!({"iss": self.url, "aud": AUDIENCE, "tenant": "t1", "scope": "system/*.rs",
            "iat": now, "exp": now + 3600});
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        jsonwebtoken::encode(&header, &claims, &key).unwrap_or_else(|e| panic!("{e}"))
    }

    fn publish(&self, jwks: &str) {
        if let Ok(mut j) = self.state.jwks.lock() {
            *j = serde_json::from_str(jwks).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn snapshot(idp: IdentityProvider) -> Snapshot {
    let mut snapshot = Snapshot::empty();
    snapshot.identity_providers = vec![idp];
    snapshot.tenants.insert(
        "t1".into(),
        Tenant { name: "t1".into(), display_name: "T1".into(), grants: Vec::new(), audit: Default::default() },
    );
    snapshot
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or_else(|e| panic!("{e}"));
    headers.insert(http::header::AUTHORIZATION, value);
    headers
}

async fn auth(a: &Authenticator, s: &Snapshot, token: &str, at: Instant) -> Result<(), String> {
    a.authenticate_at(s, &bearer(token), at).await.map(|_| ()).map_err(|e| e.to_string())
}

/// A key the provider removes stops verifying tokens (a token verified and cached with it included) once the key set
/// is `jwks_max_age` old, and not before: the set in date is not refetched for each token.
#[tokio::test]
async fn a_removed_key_stops_working_within_the_jwks_max_age() {
    let p = Provider::start().await;
    let max_age = Duration::from_secs(60);
    let s = snapshot(p.idp(max_age, Duration::from_secs(60)));
    let a = Authenticator::default();
    let (old, t0) = (p.token(false), Instant::now());
    assert_eq!(auth(&a, &s, &old, t0).await, Ok(()));
    assert_eq!(p.fetches(), 1);

    // Rotation: the new key is published next to the old one and picked up on its unknown kid.
    let mut both: Value = serde_json::from_str(JWKS).unwrap_or_else(|e| panic!("{e}"));
    let rotated: Value = serde_json::from_str(JWKS_ROTATED).unwrap_or_else(|e| panic!("{e}"));
    if let (Some(keys), Some(more)) = (both["keys"].as_array_mut(), rotated["keys"].as_array()) {
        keys.extend(more.iter().cloned());
    }
    p.publish(&both.to_string());
    let new = p.token(true);
    assert_eq!(auth(&a, &s, &new, t0 + Duration::from_secs(1)).await, Ok(()));
    assert_eq!(p.fetches(), 2, "an unknown kid refetches at once");

    // The old key is retired: it works while the set fetched at t0 + 1 s is in date, never after.
    p.publish(JWKS_ROTATED);
    let fresh_old = p.token(false);
    assert_eq!(auth(&a, &s, &old, t0 + Duration::from_secs(50)).await, Ok(()), "cached verification");
    assert_eq!(auth(&a, &s, &fresh_old, t0 + Duration::from_secs(50)).await, Ok(()), "key set in date");
    assert_eq!(p.fetches(), 2);
    let later = t0 + Duration::from_secs(1) + max_age;
    for token in [&old, &fresh_old] {
        let refused = auth(&a, &s, token, later).await;
        assert!(refused.as_ref().is_err_and(|e| e.contains("no key `test-rsa`")), "{refused:?}");
    }
    assert_eq!(auth(&a, &s, &new, later).await, Ok(()), "the new key keeps working");
    // The set was due (3), and the second token's unknown kid forced one more (at most one per 10 s).
    assert_eq!(p.fetches(), 4);
    assert!(auth(&a, &s, &fresh_old, later + Duration::from_secs(9)).await.is_err());
    assert_eq!(p.fetches(), 4, "unknown kids do not refetch more than once per 10 s");
}

/// A JWKS that cannot be fetched when due is the provider's outage (503): its keys are never used past their age.
#[tokio::test]
async fn keys_are_not_used_past_their_age_when_the_provider_is_down() {
    let p = Provider::start().await;
    let s = snapshot(p.idp(Duration::from_secs(5), Duration::from_secs(60)));
    let a = Authenticator::default();
    let t0 = Instant::now();
    assert_eq!(auth(&a, &s, &p.token(false), t0).await, Ok(()));
    p.publish("null");
    let token = p.token(false);
    assert_eq!(auth(&a, &s, &token, t0 + Duration::from_secs(4)).await, Ok(()), "in date: no fetch");
    match a.authenticate_at(&s, &bearer(&token), t0 + Duration::from_secs(5)).await {
        Err(AuthError::IssuerUnavailable { .. }) => {}
        other => panic!("want IssuerUnavailable, got {other:?}"),
    }
}

/// An active introspection answer is reused for `introspection_max_age`, so a revoked token stops within it; with
/// zero, every request asks.
#[tokio::test]
async fn a_revoked_token_stops_working_within_the_introspection_max_age() {
    let p = Provider::start().await;
    let s = snapshot(p.idp(Duration::from_secs(60), Duration::from_secs(10)));
    let a = Authenticator::default();
    let t0 = Instant::now();
    assert_eq!(auth(&a, &s, "opaque-1", t0).await, Ok(()));
    p.set_active(false);
    assert_eq!(auth(&a, &s, "opaque-1", t0 + Duration::from_secs(9)).await, Ok(()), "reused within the bound");
    assert_eq!(p.introspections(), 1);
    let refused = auth(&a, &s, "opaque-1", t0 + Duration::from_secs(10)).await;
    assert!(refused.as_ref().is_err_and(|e| e.contains("not active")), "{refused:?}");

    let s = snapshot(p.idp(Duration::from_secs(60), Duration::ZERO));
    p.set_active(true);
    let before = p.introspections();
    for _ in 0..3 {
        assert_eq!(auth(&a, &s, "opaque-2", t0).await, Ok(()));
    }
    assert_eq!(p.introspections(), before + 3, "max age 0: introspect every request");
}

#[test]
fn reusable_for_is_the_earliest_bound() {
    let idp = IdentityProvider {
        name: "idp".into(),
        issuer: "https://idp.example".into(),
        jwks_uri: String::new(),
        audiences: vec![AUDIENCE.into()],
        tenant_claim: "tenant".into(),
        algorithms: vec![],
        introspection_endpoint: None,
        introspection_client_id: String::new(),
        introspection_client_secret_file: None,
        authorization_endpoint: None,
        token_endpoint: None,
        jwks_max_age: Duration::from_secs(60),
        introspection_max_age: Duration::from_secs(60),
    };
    let caller = caller_from_claims(&idp, &json!({"tenant": "t1"})).unwrap_or_else(|e| panic!("{e}"));
    let (now, unix) = (Instant::now(), 1_000_000);
    let secs = Duration::from_secs;
    #[rustfmt::skip]
    let cases: &[(Duration, u64, Duration)] = &[
        // (until - now, exp, want)
        (secs(60), unix + 3600, secs(60)),                  // the basis runs out first
        (secs(3600), unix + 3600, secs(300)),               // never past five minutes
        (secs(60), unix + 10, secs(10 + LEEWAY_SECS)),      // exp (with leeway) first
        (secs(60), unix - LEEWAY_SECS, Duration::ZERO),     // expired
        (Duration::ZERO, unix + 3600, Duration::ZERO),      // introspection_max_age 0
    ];
    for (until, exp, want) in cases {
        let v = Verified { idp: idp.clone(), caller: Arc::new(caller.clone()), exp: *exp, until: now + *until };
        assert_eq!(v.reusable_for(now, unix), *want, "{until:?} {exp}");
    }
}
