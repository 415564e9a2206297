//! The standard configuration the tests put through the operator API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;

use crate::issuer::Issuer;
use crate::{Admin, World};

pub const DATASET: &str = "https://fhirgw.dev/dataset";
/// The gateway's public FHIR base as tokens name it in `aud`.
pub const AUDIENCE: &str = "https://fhirgw.test/fhir";
/// What the tests' callers may do by default.
pub const READ_SCOPES: &str = "openid user/*.read";

pub async fn issuer() -> Issuer {
    Issuer::start("127.0.0.1:0".parse().unwrap(), AUDIENCE).await
}

pub fn upstream(world: &World, base_url: &str) -> pb::Upstream {
    pb::Upstream {
        name: "fhir".into(),
        base_url: base_url.into(),
        auth: Some(pb::UpstreamAuth {
            source: Some(pb::upstream_auth::Source::StaticToken(pb::StaticToken {
                token_file: world.path("upstream.token").display().to_string(),
            })),
        }),
        ..Default::default()
    }
}

fn proxy(id: &str, path: &str, methods: &[&str]) -> pb::Route {
    pb::Route {
        id: id.into(),
        path: path.into(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "fhir".into() })),
        query_guard: None,
        forward_headers: Vec::new(),
        audit: None,
    }
}

fn handler(id: &str, path: &str, methods: &[&str], name: &str) -> pb::Route {
    pb::Route {
        id: id.into(),
        path: path.into(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        action: Some(pb::route::Action::Handler(pb::HandlerAction { name: name.into(), upstream: "fhir".into() })),
        query_guard: None,
        forward_headers: Vec::new(),
        audit: None,
    }
}

pub fn route_table() -> pb::RouteTable {
    pb::RouteTable {
        name: "main".into(),
        base_path: "/fhir".into(),
        routes: vec![
            proxy("metadata", "/metadata", &["GET"]),
            // Routed, so the access policy (not the route table) is what refuses system-level calls.
            proxy("root", "/", &["GET", "POST"]),
            // PUT, PATCH and DELETE on a type are conditional writes.
            proxy("type", "/{type}", &["GET", "POST", "PUT", "PATCH", "DELETE"]),
            proxy("search", "/{type}/_search", &["POST"]),
            proxy("system-search", "/_search", &["POST"]),
            proxy("instance", "/{type}/{id}", &["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
            proxy("type-history", "/{type}/_history", &["GET"]),
            proxy("history", "/{type}/{id}/_history", &["GET"]),
            proxy("vread", "/{type}/{id}/_history/{vid}", &["GET"]),
            proxy("everything", "/Patient/{id}/$everything", &["GET"]),
            proxy("compartment", "/{type}/{id}/*", &["GET"]),
            proxy("instance-operations", "/{type}/{id}/{op}", &["POST"]),
            proxy("operations", "/{type}/{op}", &["GET", "POST"]),
            // The gateway's own handlers: exact paths, more specific than the routes above.
            handler("docref", "/DocumentReference/$docref", &["GET", "POST"], "docref"),
            handler("export-system", "/$export", &["GET", "POST"], "export"),
            handler("export-patient", "/Patient/$export", &["GET", "POST"], "export"),
            handler("export-group", "/Group/{id}/$export", &["GET", "POST"], "export"),
            handler("export-status", "/$export-poll-status", &["GET", "DELETE"], "export"),
            handler("export-file", "/$export-file", &["GET"], "export"),
        ],
    }
}

pub fn tag(code: &str) -> pb::Tag {
    pb::Tag { system: DATASET.into(), code: code.into() }
}

pub fn grant(tenant: &str, code: &str) -> pb::Grant {
    pb::Grant { tenant: tenant.into(), tag: Some(tag(code)), expires_at: None }
}

/// Upstream, route table, the issuer, tenants `tenant-a` and `tenant-b` each granted its own dataset tag; returns
/// the store revision of the last write.
pub async fn configure(admin: &mut Admin, world: &World, fhir_base: &str, issuer: &Issuer) -> u64 {
    let none = String::new;
    admin
        .put_upstream(api::PutUpstreamRequest { upstream: Some(upstream(world, fhir_base)), expected_version: none() })
        .await
        .unwrap();
    admin
        .put_route_table(api::PutRouteTableRequest { route_table: Some(route_table()), expected_version: none() })
        .await
        .unwrap();
    let idp = api::PutIdentityProviderRequest {
        identity_provider: Some(issuer.identity_provider()),
        expected_version: none(),
    };
    admin.put_identity_provider(idp).await.unwrap();
    let mut revision = 0;
    for name in ["tenant-a", "tenant-b"] {
        let tenant = pb::Tenant { name: name.into(), display_name: format!("Tenant {name}"), audit: None };
        admin.put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: none() }).await.unwrap();
        let put = api::PutGrantRequest { grant: Some(grant(name, name)), expected_version: none() };
        let entry = admin.put_grant(put).await.unwrap().into_inner();
        revision = entry.meta.unwrap().version.parse().unwrap();
    }
    revision
}

pub async fn status(admin: &mut Admin) -> api::StatusResponse {
    admin.get_status(api::GetStatusRequest {}).await.unwrap().into_inner()
}

/// Waits until `n` data planes are connected, in sync, and have ACKed at least `revision`.
pub async fn wait_in_sync(admin: &Admin, n: usize, revision: u64) -> api::StatusResponse {
    let admin = admin.clone();
    crate::eventually(
        &format!("{n} data plane(s) in sync at revision {revision}"),
        std::time::Duration::from_secs(20),
        move || {
            let mut admin = admin.clone();
            async move {
                let s = status(&mut admin).await;
                let ok =
                    s.data_planes.len() == n && s.data_planes.iter().all(|d| d.in_sync && d.acked_revision >= revision);
                ok.then_some(s)
            }
        },
    )
    .await
}
