//! A local OAuth2 / OpenID issuer for tests and the dev stack: publishes a JWKS and mints tokens signed with the
//! test-only keys in `tests/keys`. It checks no client secret: never run it outside tests and local development.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fhirgw_proto::config::v1 as pb;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const RSA_PRIVATE: &str = include_str!("../keys/rsa-private.pem");
pub const RSA_ROTATED_PRIVATE: &str = include_str!("../keys/rsa-other-private.pem");
pub const EC_PRIVATE: &str = include_str!("../keys/ec-private.pem");
pub const RSA_PUBLIC: &str = include_str!("../keys/rsa-public.pem");
/// The client credentials the gateway presents to the introspection endpoint.
pub const INTROSPECTION_CLIENT: &str = "fhirgw-gateway";
pub const INTROSPECTION_SECRET: &str = "introspection-secret-0123456789";
const JWKS: &str = include_str!("../keys/jwks.json");
const JWKS_ROTATED: &str = include_str!("../keys/jwks-rotated.json");

/// Which test key signs a token.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    Rsa,
    Ec,
    Rotated,
}

struct Shared {
    jwks: Mutex<Value>,
    fetches: AtomicU64,
    /// Opaque tokens this issuer minted, with the claims introspection returns (`active` false once revoked).
    opaque: Mutex<std::collections::HashMap<String, Value>>,
    introspections: AtomicU64,
    issuer: String,
    audience: String,
}

pub struct Issuer {
    pub url: String,
    pub audience: String,
    shared: Arc<Shared>,
    _server: tokio::task::JoinHandle<()>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

impl Issuer {
    /// Serves on `addr` (port 0 for any); tokens carry `aud = audience`.
    pub async fn start(addr: SocketAddr, audience: &str) -> Issuer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            jwks: Mutex::new(serde_json::from_str(JWKS).unwrap()),
            fetches: AtomicU64::new(0),
            opaque: Mutex::default(),
            introspections: AtomicU64::new(0),
            issuer: url.clone(),
            audience: audience.to_owned(),
        });
        let serving = shared.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Issuer { url, audience: audience.to_owned(), shared, _server: server }
    }

    /// The identity provider resource for this issuer.
    pub fn identity_provider(&self) -> pb::IdentityProvider {
        pb::IdentityProvider {
            name: "local".into(),
            issuer: self.url.clone(),
            jwks_uri: format!("{}/jwks", self.url),
            audiences: vec![self.audience.clone()],
            tenant_claim: "tenant".into(),
            algorithms: vec!["RS256".into(), "ES256".into()],
            token_endpoint: format!("{}/token", self.url),
            ..Default::default()
        }
    }

    /// Standard claims for a tenant with scopes, valid for five minutes.
    pub fn claims(&self, tenant: &str, scope: &str) -> Value {
        standard_claims(&self.url, &self.audience, tenant, scope)
    }

    pub fn token(&self, tenant: &str, scope: &str) -> String {
        self.sign(Key::Rsa, &self.claims(tenant, scope))
    }

    pub fn sign(&self, key: Key, claims: &Value) -> String {
        sign(key, claims)
    }

    /// Also publish the rotated key (as an issuer does when it rotates).
    pub fn publish_rotated_key(&self) {
        let mut jwks = self.shared.jwks.lock().unwrap();
        let rotated: Value = serde_json::from_str(JWKS_ROTATED).unwrap();
        jwks["keys"].as_array_mut().unwrap().extend(rotated["keys"].as_array().unwrap().iter().cloned());
    }

    /// The identity provider resource for this issuer when it hands out opaque tokens: no JWKS, RFC 7662
    /// introspection with client id `INTROSPECTION_CLIENT` and the secret in `secret_file`.
    pub fn introspecting_provider(&self, secret_file: &str) -> pb::IdentityProvider {
        pb::IdentityProvider {
            jwks_uri: String::new(),
            introspection_endpoint: format!("{}/introspect", self.url),
            introspection_client_id: INTROSPECTION_CLIENT.into(),
            introspection_client_secret_file: secret_file.into(),
            ..self.identity_provider()
        }
    }

    /// A new opaque (random, non-JWT) access token for a tenant, answered by introspection.
    pub fn opaque_token(&self, tenant: &str, scope: &str) -> String {
        let token = format!("opaque-{}", hex::encode(rand::random::<[u8; 16]>()));
        let mut claims = self.claims(tenant, scope);
        claims["active"] = json!(true);
        self.shared.opaque.lock().unwrap().insert(token.clone(), claims);
        token
    }

    /// Revokes an opaque token: introspection answers `active: false` from now on.
    pub fn revoke(&self, token: &str) {
        self.shared.opaque.lock().unwrap().insert(token.to_owned(), json!({"active": false}));
    }

    /// How many introspection requests were answered.
    pub fn introspections(&self) -> u64 {
        self.shared.introspections.load(Ordering::SeqCst)
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::SeqCst)
    }
}

pub fn standard_claims(issuer: &str, audience: &str, tenant: &str, scope: &str) -> Value {
    let now = now();
    json!({
        "iss": issuer, "aud": audience, "sub": format!("client-{tenant}"), "tenant": tenant, "scope": scope,
        "iat": now, "nbf": now, "exp": now + 300,
    })
}

pub fn sign(key: Key, claims: &Value) -> String {
    let (alg, kid, pem) = match key {
        Key::Rsa => (Algorithm::RS256, "test-rsa", RSA_PRIVATE),
        Key::Ec => (Algorithm::ES256, "test-ec", EC_PRIVATE),
        Key::Rotated => (Algorithm::RS256, "test-rsa-rotated", RSA_ROTATED_PRIVATE),
    };
    let encoding = match key {
        Key::Ec => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

fn respond(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match (req.method().as_str(), path.as_str()) {
        ("GET", "/jwks") => {
            shared.fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = shared.jwks.lock().unwrap().clone();
            respond(StatusCode::OK, jwks)
        }
        ("GET", "/.well-known/openid-configuration") => respond(
            StatusCode::OK,
            json!({
                "issuer": shared.issuer,
                "jwks_uri": format!("{}/jwks", shared.issuer),
                "token_endpoint": format!("{}/token", shared.issuer),
                "grant_types_supported": ["client_credentials"],
            }),
        ),
        ("POST", "/token") => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
            let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match get("client_id") {
                Some(tenant) => {
                    let scope = get("scope").unwrap_or_else(|| "system/*.read".into());
                    let claims = standard_claims(&shared.issuer, &shared.audience, &tenant, &scope);
                    respond(
                        StatusCode::OK,
                        json!({"access_token": sign(Key::Rsa, &claims), "token_type": "Bearer", "expires_in": 300, "scope": scope}),
                    )
                }
                None => respond(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_request", "error_description": "client_id (the tenant) is required"}),
                ),
            }
        }
        ("POST", "/introspect") => {
            let expected = format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!("{INTROSPECTION_CLIENT}:{INTROSPECTION_SECRET}")
                )
            );
            let authorized = req.headers().get(http::header::AUTHORIZATION).is_some_and(|v| v == expected.as_str());
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if !authorized {
                return Ok(respond(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"})));
            }
            shared.introspections.fetch_add(1, Ordering::SeqCst);
            let token = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
            let answer = token.and_then(|t| shared.opaque.lock().unwrap().get(&t).cloned());
            respond(StatusCode::OK, answer.unwrap_or_else(|| json!({"active": false})))
        }
        _ => respond(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
    })
}
