//! The real OpenID provider of the end-to-end tests (`tests/oidc-provider`: panva's certified `oidc-provider` on the
//! test FHIR server's Node 22), and what its clients do: SMART Backend Services (client credentials with a
//! `private_key_jwt` assertion signed by a key only the test holds), a patient signing in to an app (authorization
//! code with PKCE, driven through the provider's login and consent pages as a browser would), revocation, and the
//! provider's admin endpoints for key rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use fhirgw_proto::config::v1 as pb;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::issuer::now;
use crate::{Process, World, workspace};

/// The client the gateway introspects opaque tokens as.
pub const INTROSPECTION_CLIENT: &str = "fhirgw-gateway";
pub const INTROSPECTION_SECRET: &str = "oidc-introspection-secret-0123456789";
pub const REDIRECT_URI: &str = "https://app.example/callback";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client's own signing key (ES384, as SMART Backend Services asks): the private half stays in the test, the public
/// half is registered at the provider.
pub struct ClientKey {
    pub kid: String,
    encoding: EncodingKey,
    pub public_jwk: Value,
}

impl ClientKey {
    pub fn generate(kid: &str) -> ClientKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        // Uncompressed point: 0x04 || x || y, 48 bytes each.
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 97, "a P-384 public key");
        let public_jwk = json!({
            "kty": "EC", "crv": "P-384", "kid": kid, "use": "sig", "alg": "ES384",
            "x": B64.encode(&point[1..49]), "y": B64.encode(&point[49..]),
        });
        ClientKey { kid: kid.to_owned(), encoding, public_jwk }
    }

    /// A JWT signed with this key.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

pub enum ClientKind {
    /// SMART Backend Services: `client_credentials`, authenticated with `private_key_jwt`.
    Backend(ClientKey),
    /// An interactive public app (authorization code with PKCE) that patients sign in to.
    App,
}

pub struct Client {
    pub id: String,
    pub tenant: String,
    /// The scopes the provider will grant this client for the gateway.
    pub scope: String,
    /// Opaque access tokens (introspected) rather than JWTs.
    pub opaque: bool,
    pub kind: ClientKind,
}

pub struct Account {
    pub id: String,
    pub password: String,
    /// Becomes the `patient` claim of tokens with `patient/` scopes.
    pub patient: Option<String>,
}

pub struct Setup {
    /// The gateway's public FHIR base: the resource indicator and the tokens' `aud`.
    pub resource: String,
    pub tenant_claim: String,
    pub token_ttl: u64,
    pub clients: Vec<Client>,
    pub accounts: Vec<Account>,
}

pub struct OidcProvider {
    pub process: Process,
    pub issuer: String,
    /// The provider's `.well-known/openid-configuration`.
    pub discovery: Value,
    pub setup: Setup,
    /// Follows no redirects: the flows read them.
    http: reqwest::Client,
}

/// What `/__admin/keys` reports: the signing key and every published one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub signing: String,
    pub published: Vec<String>,
}

/// The header and the claims of a JWT, read without verifying it (for assertions about what the provider issued).
pub fn jwt_parts(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut decode = || serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    (decode(), decode())
}

impl Setup {
    fn config(&self) -> Value {
        let mut clients = vec![json!({
            "client_id": INTROSPECTION_CLIENT, "kind": "introspection", "client_secret": INTROSPECTION_SECRET,
        })];
        for c in &self.clients {
            let mut entry = json!({
                "client_id": c.id, "tenant": c.tenant, "scope": c.scope,
                "token_format": if c.opaque { "opaque" } else { "jwt" },
            });
            match &c.kind {
                ClientKind::Backend(key) => {
                    entry["kind"] = json!("backend");
                    entry["jwks"] = json!({"keys": [key.public_jwk]});
                }
                ClientKind::App => {
                    entry["kind"] = json!("app");
                    entry["redirect_uris"] = json!([REDIRECT_URI]);
                }
            }
            clients.push(entry);
        }
        let accounts: Vec<Value> =
            self.accounts.iter().map(|a| json!({"id": a.id, "password": a.password, "patient": a.patient})).collect();
        json!({
            "resource": self.resource, "tenant_claim": self.tenant_claim, "token_ttl": self.token_ttl,
            "cookie_key": hex::encode(rand::random::<[u8; 32]>()), "clients": clients, "accounts": accounts,
        })
    }
}

/// The cookies a browser would hold for the provider (one origin; paths ignored, which only sends more).
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn take(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let expired = value.is_empty();
            if expired {
                self.0.remove(name);
            } else {
                self.0.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn header(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }
}

fn location(response: &reqwest::Response) -> String {
    let status = response.status();
    assert!(status.is_redirection(), "expected a redirect, got {status}");
    response.headers()[reqwest::header::LOCATION].to_str().unwrap().to_owned()
}

impl OidcProvider {
    /// Starts the provider on port 0 with `setup` (and the gateway's introspection client).
    pub async fn start(world: &World, setup: Setup) -> OidcProvider {
        let root = workspace().join("tests/oidc-provider");
        let config = world.path("oidc-provider.json");
        std::fs::write(&config, setup.config().to_string()).unwrap();
        std::fs::write(world.path("oidc-introspection.secret"), INTROSPECTION_SECRET).unwrap();
        let mut command = Command::new(root.join("run.sh"));
        command.arg("--listen").arg("127.0.0.1:0").arg("--config").arg(&config);
        let process = Process::spawn("oidc-provider", command, world.dir.path()).await;
        let issuer = process.addr("issuer");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap();
        let discovery: Value =
            http.get(format!("{issuer}/.well-known/openid-configuration")).send().await.unwrap().json().await.unwrap();
        assert_eq!(discovery["issuer"], issuer.as_str());
        OidcProvider { process, issuer, discovery, setup, http }
    }

    fn endpoint(&self, name: &str) -> String {
        self.discovery[name].as_str().unwrap_or_else(|| panic!("no {name} in {}", self.discovery)).to_owned()
    }

    /// The identity provider an operator would register for it, read off its discovery document: JWTs by its JWKS,
    /// opaque tokens by its introspection endpoint as `INTROSPECTION_CLIENT` (secret in `secret_file`).
    pub fn identity_provider(&self, name: &str, secret_file: &Path) -> pb::IdentityProvider {
        pb::IdentityProvider {
            name: name.into(),
            issuer: self.issuer.clone(),
            jwks_uri: self.endpoint("jwks_uri"),
            audiences: vec![self.setup.resource.clone()],
            tenant_claim: self.setup.tenant_claim.clone(),
            algorithms: vec!["RS256".into()],
            introspection_endpoint: self.endpoint("introspection_endpoint"),
            introspection_client_id: INTROSPECTION_CLIENT.into(),
            introspection_client_secret_file: secret_file.display().to_string(),
            authorization_endpoint: self.endpoint("authorization_endpoint"),
            token_endpoint: self.endpoint("token_endpoint"),
            ..Default::default()
        }
    }

    fn backend_key(&self, client_id: &str) -> &ClientKey {
        let client = self.setup.clients.iter().find(|c| c.id == client_id).unwrap();
        match &client.kind {
            ClientKind::Backend(key) => key,
            ClientKind::App => panic!("{client_id} is not a backend client"),
        }
    }

    /// A `private_key_jwt` client assertion for `client_id`, signed with `key` (SMART Backend Services: `aud` is the
    /// token endpoint, a fresh `jti`, five minutes at most).
    pub fn client_assertion(&self, client_id: &str, key: &ClientKey) -> String {
        let now = now();
        key.sign(&json!({
            "iss": client_id, "sub": client_id, "aud": self.endpoint("token_endpoint"),
            "jti": hex::encode(rand::random::<[u8; 16]>()), "iat": now, "exp": now + 60,
        }))
    }

    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let response = self.http.post(url).form(form).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// The token endpoint's answer to a Backend Services client asking for `scope`, authenticated with `key`.
    pub async fn client_credentials_with(&self, client_id: &str, key: &ClientKey, scope: &str) -> (u16, Value) {
        let assertion = self.client_assertion(client_id, key);
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", assertion.as_str()),
        ];
        self.post_form(&self.endpoint("token_endpoint"), &form).await
    }

    /// An access token for a Backend Services client; panics unless the provider issues one.
    pub async fn client_credentials(&self, client_id: &str, scope: &str) -> String {
        let (status, body) = self.client_credentials_with(client_id, self.backend_key(client_id), scope).await;
        assert_eq!(status, 200, "token endpoint: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Revokes a token at the provider's revocation endpoint as the client it was issued to (RFC 7009).
    pub async fn revoke(&self, client_id: &str, token: &str) {
        let assertion = self.client_assertion(client_id, self.backend_key(client_id));
        let form = [
            ("token", token),
            ("token_type_hint", "access_token"),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", assertion.as_str()),
        ];
        let (status, body) = self.post_form(&self.endpoint("revocation_endpoint"), &form).await;
        assert_eq!(status, 200, "revocation endpoint: {body}");
    }

    /// The provider's own introspection answer for `token`, asked as the gateway.
    pub async fn introspect(&self, token: &str) -> Value {
        let response = self
            .http
            .post(self.endpoint("introspection_endpoint"))
            .basic_auth(INTROSPECTION_CLIENT, Some(INTROSPECTION_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// A patient signs in to the app `client_id` and consents to `scope`: the authorization code flow with PKCE, as a
    /// browser runs it (redirects, the provider's cookies, its login and consent pages), then the code is exchanged.
    /// Returns the token response.
    pub async fn sign_in(&self, client_id: &str, account: &str, password: &str, scope: &str) -> Value {
        let (code, verifier) = match self.authorize(client_id, account, password, scope).await {
            Ok(done) => done,
            Err(status) => panic!("signing in as {account} was refused with {status}"),
        };
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", verifier.as_str()),
            ("client_id", client_id),
        ];
        let (status, body) = self.post_form(&self.endpoint("token_endpoint"), &form).await;
        assert_eq!(status, 200, "token endpoint: {body}");
        body
    }

    /// The status the login page answers when signing in must fail; panics if it succeeds.
    pub async fn sign_in_refused(&self, client_id: &str, account: &str, password: &str, scope: &str) -> u16 {
        match self.authorize(client_id, account, password, scope).await {
            Ok(_) => panic!("{account} signed in with password {password:?}"),
            Err(status) => status,
        }
    }

    /// The browser's part of the flow: the authorization code and the PKCE verifier, or the status of the page that
    /// refused to go on.
    async fn authorize(
        &self,
        client_id: &str,
        account: &str,
        password: &str,
        scope: &str,
    ) -> Result<(String, String), u16> {
        let verifier = B64.encode(rand::random::<[u8; 32]>());
        let challenge = B64.encode(Sha256::digest(verifier.as_bytes()));
        let state = hex::encode(rand::random::<[u8; 8]>());
        let mut jar = Jar::default();
        let authorize = reqwest::Url::parse_with_params(
            &self.endpoint("authorization_endpoint"),
            &[
                ("client_id", client_id),
                ("response_type", "code"),
                ("redirect_uri", REDIRECT_URI),
                ("scope", scope),
                ("state", &state),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        )
        .unwrap();
        let mut url = authorize.to_string();
        // Follow redirects until the provider sends the browser back to the app; answer each page on the way.
        let redirect = loop {
            let response = self.http.get(&url).header("cookie", jar.header()).send().await.unwrap();
            jar.take(&response);
            if response.status().is_redirection() {
                let next = location(&response);
                if next.starts_with(REDIRECT_URI) {
                    break next;
                }
                url = reqwest::Url::parse(&url).unwrap().join(&next).unwrap().to_string();
                continue;
            }
            assert_eq!(response.status(), 200, "{url}");
            let page: Value = response.json().await.unwrap();
            let (action, form): (&str, Vec<(&str, &str)>) = match page["prompt"].as_str().unwrap() {
                "login" => ("login", vec![("login", account), ("password", password)]),
                "consent" => ("confirm", Vec::new()),
                other => panic!("unexpected prompt {other}: {page}"),
            };
            let response = self
                .http
                .post(format!("{url}/{action}"))
                .header("cookie", jar.header())
                .form(&form)
                .send()
                .await
                .unwrap();
            jar.take(&response);
            if !response.status().is_redirection() {
                return Err(response.status().as_u16());
            }
            let next = location(&response);
            url = reqwest::Url::parse(&url).unwrap().join(&next).unwrap().to_string();
        };
        let redirect = reqwest::Url::parse(&redirect).unwrap();
        let query: BTreeMap<String, String> = redirect.query_pairs().into_owned().collect();
        assert_eq!(query.get("state"), Some(&state), "{redirect}");
        let code = query.get("code").unwrap_or_else(|| panic!("no code: {redirect}"));
        Ok((code.clone(), verifier))
    }

    async fn admin(&self, method: reqwest::Method, path: &str) -> Value {
        let response = self.http.request(method, format!("{}/__admin/{path}", self.issuer)).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap()
    }

    async fn keys_from(&self, method: reqwest::Method, path: &str) -> Keys {
        let v = self.admin(method, path).await;
        Keys {
            signing: v["signing"].as_str().unwrap().to_owned(),
            published: v["published"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect(),
        }
    }

    pub async fn keys(&self) -> Keys {
        self.keys_from(reqwest::Method::GET, "keys").await
    }

    /// A new signing key; the old ones stay published.
    pub async fn rotate(&self) -> Keys {
        self.keys_from(reqwest::Method::POST, "rotate").await
    }

    /// Every key but the signing one leaves the JWKS.
    pub async fn retire(&self) -> Keys {
        self.keys_from(reqwest::Method::POST, "retire").await
    }

    /// How often the provider's `jwks`, `token`, `introspection` and `revocation` endpoints were called.
    pub async fn calls(&self, endpoint: &str) -> u64 {
        self.admin(reqwest::Method::GET, "stats").await[endpoint].as_u64().unwrap()
    }

    /// The kids in the JWKS the provider serves.
    pub async fn published_kids(&self) -> Vec<String> {
        let jwks: Value = self.http.get(self.endpoint("jwks_uri")).send().await.unwrap().json().await.unwrap();
        jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
    }
}
