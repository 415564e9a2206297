//! Callers with tokens from a real OpenID provider (`tests/oidc-provider`: panva's certified `oidc-provider`), through
//! a real data plane in front of the real test FHIR server. The provider issues, signs, rotates, introspects and
//! revokes on its own; the test holds only its clients' private keys and a patient's password. The simple dev issuer
//! stays registered beside it, as in `./dev up`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;

use common::{Stack, assert_only_tenant, stack};
use fhirgw_e2e::eventually;
use fhirgw_e2e::fixtures::{self, AUDIENCE, READ_SCOPES};
use fhirgw_e2e::http;
use fhirgw_e2e::oidc::{Account, Client, ClientKey, ClientKind, OidcProvider, Setup, jwt_parts};
use fhirgw_proto::admin::v1 as api;
use serde_json::json;

/// The tenant claim, namespaced as providers that reserve short names ask for.
const TENANT_CLAIM: &str = "https://fhirgw.test/tenant";
/// How long the data plane uses a fetched JWKS in the rotation test: the bound on a retired key.
const JWKS_MAX_AGE: Duration = Duration::from_secs(2);
/// How long the data plane reuses an active introspection answer in the revocation test: the bound on a revoked
/// token.
const INTROSPECTION_MAX_AGE: Duration = Duration::from_secs(2);

fn backend(id: &str, tenant: &str, scope: &str, opaque: bool) -> Client {
    Client {
        id: id.into(),
        tenant: tenant.into(),
        scope: scope.into(),
        opaque,
        kind: ClientKind::Backend(ClientKey::generate(&format!("{id}-key"))),
    }
}

fn setup() -> Setup {
    Setup {
        resource: AUDIENCE.into(),
        tenant_claim: TENANT_CLAIM.into(),
        token_ttl: 300,
        clients: vec![
            backend("backend-a", "tenant-a", "system/*.rs system/*.read", false),
            backend("backend-b", "tenant-b", "system/Patient.read", false),
            backend("backend-a-opaque", "tenant-a", "system/*.rs", true),
            Client {
                id: "patient-app".into(),
                tenant: "tenant-a".into(),
                scope: "patient/*.rs".into(),
                opaque: false,
                kind: ClientKind::App,
            },
        ],
        accounts: vec![Account {
            id: "maria".into(),
            password: "maria-pw-0123".into(),
            patient: Some("a-pat-1".into()),
        }],
    }
}

/// The standard stack (dev issuer registered as `local`) plus the real provider registered as `oidc`, with the
/// data plane's cache lifetimes for it.
async fn with_provider(
    jwks_max_age: Option<Duration>,
    introspection_max_age: Option<Duration>,
) -> (Stack, OidcProvider) {
    let mut s = stack().await;
    let op = s.world.oidc_provider(setup()).await;
    let mut idp = op.identity_provider("oidc", &s.world.path("oidc-introspection.secret"));
    idp.jwks_max_age = jwks_max_age.map(|d| d.try_into().unwrap());
    idp.introspection_max_age = introspection_max_age.map(|d| d.try_into().unwrap());
    let put = api::PutIdentityProviderRequest { identity_provider: Some(idp), expected_version: String::new() };
    let revision: u64 =
        s.admin.put_identity_provider(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&s.admin, 1, revision).await;
    (s, op)
}

/// SMART Backend Services: each client authenticates with a JWT signed by its own key, gets a JWT access token for
/// the gateway carrying its tenant, and reads and searches only that tenant's data, within its scopes.
#[tokio::test]
async fn backend_services_read_and_search_their_tenant_only() {
    let (s, op) = with_provider(None, None).await;
    let a = op.client_credentials("backend-a", "system/*.rs").await;
    let (header, claims) = jwt_parts(&a);
    assert_eq!(header["typ"], "at+jwt", "an RFC 9068 access token: {header}");
    assert_eq!(header["kid"], op.keys().await.signing.as_str());
    assert_eq!(claims["iss"], op.issuer.as_str());
    assert_eq!(claims["aud"], AUDIENCE, "the resource indicator defaults to the gateway");
    assert_eq!(claims[TENANT_CLAIM], "tenant-a");
    assert_eq!(claims["scope"], "system/*.rs");

    assert_eq!(s.get("/fhir/Patient/a-pat-1", &a).await.status, 200);
    let other = s.get("/fhir/Patient/b-pat-1", &a).await;
    assert_eq!(other.status, 404, "{}", other.text());
    assert_only_tenant(&s.get("/fhir/Patient", &a).await, "a-");
    let r = s.get("/fhir/Observation?subject=Patient/a-pat-1", &a).await;
    assert_only_tenant(&r, "a-");
    let mut ids = r.ids();
    ids.sort();
    assert_eq!(ids, ["Observation/a-obs-1", "Observation/a-obs-2"], "b-obs-cross is tenant-b's");
    let r = s.send(http().post(s.url("/fhir/Patient/_search")).bearer_auth(&a).form(&[("name", "Garcia")])).await;
    assert_eq!(r.ids(), ["Patient/a-pat-1"]);
    // Reads only: no write scope was granted.
    let r = s.send(http().post(s.url("/fhir/Patient")).bearer_auth(&a).json(&json!({"resourceType": "Patient"}))).await;
    assert_eq!(r.status, 403, "{}", r.text());

    // v1 scopes, narrower: tenant-b's client may read and search Patients, nothing else.
    let b = op.client_credentials("backend-b", "system/Patient.read").await;
    assert_eq!(jwt_parts(&b).1[TENANT_CLAIM], "tenant-b");
    assert_only_tenant(&s.get("/fhir/Patient", &b).await, "b-");
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &b).await.status, 404);
    assert_eq!(s.get("/fhir/Observation", &b).await.status, 403);

    // The provider grants only what it registered for the client: asking for more gets a token without it.
    let asked_more = op.client_credentials("backend-b", "system/*.rs").await;
    assert_eq!(s.get("/fhir/Patient", &asked_more).await.status, 403, "{}", jwt_parts(&asked_more).1);

    // Client authentication is the provider's: an assertion signed by a key it does not know gets no token.
    let stranger = ClientKey::generate("backend-a-key");
    let (status, body) = op.client_credentials_with("backend-a", &stranger, "system/*.rs").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "{body}");

    // The dev issuer still works beside it.
    assert_only_tenant(&s.get("/fhir/Patient", &s.issuer.token("tenant-b", READ_SCOPES)).await, "b-");
}

/// A patient signs in to an app (authorization code with PKCE through the provider's login and consent pages); the
/// token's `patient` claim confines it to that patient's compartment, inside the app's tenant.
#[tokio::test]
async fn a_patient_token_is_confined_to_its_compartment() {
    let (s, op) = with_provider(None, None).await;
    let response = op.sign_in("patient-app", "maria", "maria-pw-0123", "openid launch/patient patient/*.rs").await;
    let token = response["access_token"].as_str().unwrap();
    let (_, claims) = jwt_parts(token);
    assert_eq!((claims["patient"].as_str(), claims["sub"].as_str()), (Some("a-pat-1"), Some("maria")), "{claims}");
    assert_eq!(claims["scope"], "patient/*.rs");
    assert_eq!(claims[TENANT_CLAIM], "tenant-a");

    assert_eq!(s.get("/fhir/Patient/a-pat-1", token).await.status, 200);
    let other = s.get("/fhir/Patient/a-pat-2", token).await;
    let missing = s.get("/fhir/Patient/nope", token).await;
    assert_eq!((other.status, missing.status), (404, 404));
    assert_eq!(other.json()["issue"], missing.json()["issue"], "another patient must look missing");
    assert_eq!(s.get("/fhir/Observation/a-obs-3", token).await.status, 404, "a-pat-2's observation");
    let mut ids = s.get("/fhir/Observation", token).await.ids();
    ids.sort();
    assert_eq!(ids, ["Observation/a-obs-1", "Observation/a-obs-2"]);
    assert_eq!(s.get("/fhir/Patient", token).await.ids(), ["Patient/a-pat-1"]);
    assert_eq!(s.get("/fhir/Patient/b-pat-1", token).await.status, 404);
    let r = s
        .send(http().post(s.url("/fhir/Observation")).bearer_auth(token).json(&json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/a-pat-1"}})))
        .await;
    assert_eq!(r.status, 403, "patient/ scopes never write: {}", r.text());

    // A wrong password gets no token at all (the login page refuses it).
    assert_eq!(op.sign_in_refused("patient-app", "maria", "wrong", "openid patient/*.rs").await, 401);
}

/// Key rotation at the provider while the data plane runs: a token signed by the new key works at once, tokens of
/// the old key keep working while it is published, and stop once it has left the JWKS and the data plane's copy is
/// `jwks_max_age` old. No restart.
#[tokio::test]
async fn key_rotation_at_the_provider_is_followed_without_a_restart() {
    let (s, op) = with_provider(Some(JWKS_MAX_AGE), None).await;
    let first = op.keys().await;
    let old = op.client_credentials("backend-a", "system/*.rs").await;
    assert_eq!(jwt_parts(&old).0["kid"], first.signing.as_str());
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &old).await.status, 200);

    let rotated = op.rotate().await;
    assert_ne!(rotated.signing, first.signing);
    assert_eq!(rotated.published, [rotated.signing.clone(), first.signing.clone()]);
    let new = op.client_credentials("backend-a", "system/*.rs").await;
    assert_eq!(jwt_parts(&new).0["kid"], rotated.signing.as_str());
    let jwks_fetches = op.calls("jwks").await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &new).await.status, 200, "a new key is picked up on its kid");
    assert_eq!(op.calls("jwks").await, jwks_fetches + 1, "one refetch for the new kid");
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &old).await.status, 200, "the old key is still published");

    let retired = op.retire().await;
    assert_eq!(retired.published, std::slice::from_ref(&rotated.signing));
    assert_eq!(op.published_kids().await, std::slice::from_ref(&rotated.signing));
    let since = Instant::now();
    eventually("a token of the retired key is refused", Duration::from_secs(15), || async {
        let r = s.get("/fhir/Patient/a-pat-1", &old).await;
        (r.status == 401).then_some(())
    })
    .await;
    let took = since.elapsed();
    eprintln!("a retired key was refused {took:?} after it left the provider's JWKS (jwks_max_age {JWKS_MAX_AGE:?})");
    assert!(took <= JWKS_MAX_AGE + Duration::from_secs(2), "took {took:?}");
    let r = s.get("/fhir/Patient/a-pat-1", &old).await;
    assert!(r.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"), "{:?}", r.headers);

    // The current key keeps working, for tokens issued before and after.
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &new).await.status, 200);
    let newer = op.client_credentials("backend-a", "system/*.rs").await;
    assert_only_tenant(&s.get("/fhir/Patient", &newer).await, "a-");
}

/// Opaque tokens: the data plane asks the provider's introspection endpoint (as its own confidential client) and
/// takes tenant and scopes from the answer; an active answer is reused, a token revoked at the provider stops
/// working within `introspection_max_age`, and one revoked before its first use never works.
#[tokio::test]
async fn opaque_tokens_are_introspected_and_revocation_is_honoured() {
    let (s, op) = with_provider(None, Some(INTROSPECTION_MAX_AGE)).await;
    let token = op.client_credentials("backend-a-opaque", "system/*.rs").await;
    assert_eq!(token.split('.').count(), 1, "an opaque token: {token}");
    let answer = op.introspect(&token).await;
    assert_eq!((answer["active"].as_bool(), answer[TENANT_CLAIM].as_str()), (Some(true), Some("tenant-a")));
    assert_eq!(answer["aud"], AUDIENCE);

    let before = op.calls("introspection").await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &token).await.status, 200);
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &token).await.status, 404);
    assert_only_tenant(&s.get("/fhir/Observation", &token).await, "a-");
    assert_eq!(op.calls("introspection").await, before + 1, "an active answer is reused");

    op.revoke("backend-a-opaque", &token).await;
    assert_eq!(op.introspect(&token).await["active"], false);
    let since = Instant::now();
    eventually("a revoked token is refused", Duration::from_secs(15), || async {
        let r = s.get("/fhir/Patient/a-pat-1", &token).await;
        (r.status == 401).then_some(())
    })
    .await;
    let took = since.elapsed();
    eprintln!(
        "a revoked token was refused {took:?} after revocation (introspection_max_age {INTROSPECTION_MAX_AGE:?})"
    );
    assert!(took <= INTROSPECTION_MAX_AGE + Duration::from_secs(2), "took {took:?}");

    let early = op.client_credentials("backend-a-opaque", "system/*.rs").await;
    op.revoke("backend-a-opaque", &early).await;
    let r = s.get("/fhir/Patient/a-pat-1", &early).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"));

    // JWTs of the same provider are still verified locally, not introspected.
    let calls = op.calls("introspection").await;
    let jwt = op.client_credentials("backend-a", "system/*.rs").await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &jwt).await.status, 200);
    assert_eq!(op.calls("introspection").await, calls);
}
