//! Shared set-up for the end-to-end access-control suites: a FHIR server with two tenants' data, a control plane,
//! a data plane and a token issuer, configured through the operator API.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure};
use fhirgw_e2e::issuer::Issuer;
use fhirgw_e2e::{Admin, Process, UPSTREAM_TOKEN, World, admin, grpc_url, http};
use serde_json::Value;

pub struct Stack {
    pub world: World,
    pub fhir: Process,
    pub cp: Process,
    pub dp: Process,
    pub issuer: Issuer,
    pub admin: Admin,
    pub a: String,
    pub b: String,
}

pub async fn stack() -> Stack {
    stack_with(&[], &[]).await
}

pub async fn stack_with(cp_args: &[&str], dp_args: &[&str]) -> Stack {
    stack_full(&[], cp_args, dp_args).await
}

/// A stack whose FHIR server gets extra flags too (e.g. `--gzip always`).
pub async fn stack_full(fhir_args: &[&str], cp_args: &[&str], dp_args: &[&str]) -> Stack {
    let world = World::new();
    let fhir = world.fhir_server_args(fhir_args).await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane_args("cp", "cp.db", "127.0.0.1:0", cp_args).await;
    let dp = world.data_plane_args("dp", &grpc_url(&cp), "dp-state", &world.path("dataplane.token"), dp_args).await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let a = issuer.token("tenant-a", READ_SCOPES);
    let b = issuer.token("tenant-b", READ_SCOPES);
    Stack { world, fhir, cp, dp, issuer, admin, a, b }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Type/id` of every entry.
    pub fn ids(&self) -> Vec<String> {
        self.json()["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e["resource"]["resourceType"].as_str().unwrap(),
                            e["resource"]["id"].as_str().unwrap()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Stack {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.dp.addr("fhir"))
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(http().get(self.url(path)).bearer_auth(token)).await
    }

    /// Straight to the upstream, as the gateway would (for facts the test needs, never for assertions on access).
    pub async fn upstream(&self, path: &str) -> Value {
        let base = self.fhir.ready["base_url"].as_str().unwrap();
        http().get(format!("{base}{path}")).bearer_auth(UPSTREAM_TOKEN).send().await.unwrap().json().await.unwrap()
    }

    /// Writes a resource straight to the upstream (test set-up the gateway could not do, e.g. with the upstream's own
    /// absolute URLs in it).
    pub async fn put_upstream(&self, resource: &Value) {
        let base = self.fhir.ready["base_url"].as_str().unwrap();
        let path = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
        let response = http()
            .put(format!("{base}/{path}"))
            .bearer_auth(UPSTREAM_TOKEN)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(status.is_success(), "seeding {path}: {status} {}", response.text().await.unwrap_or_default());
    }

    pub async fn upstream_requests(&self) -> Vec<Value> {
        let addr = self.fhir.ready["listening"].as_str().unwrap();
        http().get(format!("http://{addr}/__admin/requests")).send().await.unwrap().json().await.unwrap()
    }
}

pub fn assert_only_tenant(reply: &Reply, prefix: &str) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    for id in reply.ids() {
        let bare = id.split('/').nth(1).unwrap();
        assert!(bare.starts_with(prefix), "{id} leaked to a caller of `{prefix}`: {}", reply.text());
    }
}
