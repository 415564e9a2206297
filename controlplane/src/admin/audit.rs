//! `ListAudit`: the operators' audit trail, filtered and paged, newest first.

use std::time::{Duration, SystemTime};

use fhirgw_config::tenant::system_to_timestamp;
use fhirgw_proto::admin::v1 as api;
use tonic::Status;

use super::invalid;
use crate::objects::ObjKind;
use crate::store::{AuditQuery, AuditRecord};

const AUDIT_PAGE: u32 = 100;
const AUDIT_PAGE_MAX: u32 = 1000;

fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

pub(super) fn audit_query(req: &api::ListAuditRequest) -> Result<AuditQuery, Status> {
    if !req.kind.is_empty() {
        req.kind.parse::<ObjKind>().map_err(|_| {
            invalid(format!(
                "kind `{}` is not one of tenant, grant, upstream, route_table, identity_provider",
                req.kind
            ))
        })?;
    }
    let before_revision = match req.page_token.as_str() {
        "" => None,
        token => Some(token.parse::<u64>().map_err(|_| invalid("page_token is not one this API issued"))?),
    };
    let limit = match req.page_size {
        0 => AUDIT_PAGE,
        n => n.min(AUDIT_PAGE_MAX),
    };
    Ok(AuditQuery {
        kind: req.kind.clone(),
        name: req.name.clone(),
        actor: req.actor.clone(),
        since: req.since.as_ref().map(millis),
        until: req.until.as_ref().map(millis),
        before_revision,
        limit,
    })
}

pub(super) fn audit_entry(r: AuditRecord) -> api::AuditEntry {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(r.at).unwrap_or(0));
    let message = match r.kind.parse::<ObjKind>() {
        Ok(ObjKind::Tenant) => "Tenant",
        Ok(ObjKind::Grant) => "Grant",
        Ok(ObjKind::Upstream) => "Upstream",
        Ok(ObjKind::RouteTable) => "RouteTable",
        Ok(ObjKind::IdentityProvider) => "IdentityProvider",
        Err(_) => "",
    };
    let body = r
        .body
        .filter(|_| !message.is_empty())
        .map(|value| prost_types::Any { type_url: format!("type.googleapis.com/fhirgw.config.v1.{message}"), value });
    api::AuditEntry {
        revision: r.revision,
        at: Some(system_to_timestamp(at)),
        actor: r.actor,
        version_after: if r.op == "delete" { String::new() } else { r.revision.to_string() },
        operation: r.op,
        kind: r.kind,
        name: r.name,
        version_before: r.version_before.map(|v| v.to_string()).unwrap_or_default(),
        body,
        replica: r.replica,
    }
}
