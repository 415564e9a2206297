//! The standard configuration the tests put through the operator API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;

use crate::{Admin, World};

pub const DATASET: &str = "https://fhirgw.dev/dataset";

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
    }
}

pub fn route_table() -> pb::RouteTable {
    pb::RouteTable {
        name: "main".into(),
        base_path: "/fhir".into(),
        routes: vec![
            proxy("metadata", "/metadata", &["GET"]),
            proxy("type", "/{type}", &["GET", "POST"]),
            proxy("search", "/{type}/_search", &["POST"]),
            proxy("instance", "/{type}/{id}", &["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
            proxy("history", "/{type}/{id}/_history", &["GET"]),
            proxy("vread", "/{type}/{id}/_history/{vid}", &["GET"]),
            proxy("everything", "/Patient/{id}/$everything", &["GET"]),
        ],
    }
}

pub fn tag(code: &str) -> pb::Tag {
    pb::Tag { system: DATASET.into(), code: code.into() }
}

pub fn grant(tenant: &str, code: &str) -> pb::Grant {
    pb::Grant { tenant: tenant.into(), tag: Some(tag(code)), expires_at: None }
}

/// Upstream, route table, tenants `tenant-a` and `tenant-b`; returns the store revision of the last write.
pub async fn configure(admin: &mut Admin, world: &World, fhir_base: &str) -> u64 {
    admin
        .put_upstream(api::PutUpstreamRequest {
            upstream: Some(upstream(world, fhir_base)),
            expected_version: String::new(),
        })
        .await
        .unwrap();
    admin
        .put_route_table(api::PutRouteTableRequest {
            route_table: Some(route_table()),
            expected_version: String::new(),
        })
        .await
        .unwrap();
    let mut revision = 0;
    for name in ["tenant-a", "tenant-b"] {
        let tenant = pb::Tenant { name: name.into(), display_name: format!("Tenant {name}") };
        let entry = admin
            .put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() })
            .await
            .unwrap()
            .into_inner();
        revision = entry.meta.unwrap().version.parse().unwrap();
    }
    revision
}

pub async fn status(admin: &mut Admin) -> api::StatusResponse {
    admin.get_status(api::GetStatusRequest {}).await.unwrap().into_inner()
}
