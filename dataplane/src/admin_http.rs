//! The admin port: liveness, readiness, the applied configuration, Prometheus metrics, and the operator's one-time
//! override of the configuration rollback guard (`POST /config/accept-next`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use fhirgw_config::tenant::system_to_timestamp;
use fhirgw_config::{Kind, Snapshot};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::body::Body;
use crate::lifecycle::{Lifecycle, Phase};
use crate::metrics::Metrics;
use crate::state::{ConfigState, Source};

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Every tenant with its grants as the data plane enforces them at `now`: tag, expiry (RFC 3339, `null`: none),
/// whether it is active and for how long still. Sorted, so two data planes' documents compare line by line.
fn tenants(snapshot: &Snapshot, now: SystemTime) -> serde_json::Value {
    let mut tenants: Vec<_> = snapshot.tenants.values().collect();
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    tenants
        .into_iter()
        .map(|tenant| {
            let mut grants: Vec<_> = tenant.grants.iter().collect();
            grants.sort_by(|a, b| a.tag.cmp(&b.tag));
            let grants: Vec<_> = grants
                .into_iter()
                .map(|grant| {
                    serde_json::json!({
                        "system": grant.tag.system,
                        "code": grant.tag.code,
                        "expires_at": grant.expires_at.map(|at| system_to_timestamp(at).to_string()),
                        "active": grant.is_active(now),
                        "expires_in_seconds": grant.expires_at.map(|at| at.duration_since(now).map_or(0, |d| d.as_secs())),
                    })
                })
                .collect();
            let version = snapshot.resources.get(&(Kind::Tenant, tenant.name.clone())).map(|r| r.version.clone());
            serde_json::json!({
                "name": tenant.name,
                "display_name": tenant.display_name,
                "version": version,
                "grants": grants,
            })
        })
        .collect()
}

fn secs_since(at: Option<SystemTime>) -> serde_json::Value {
    at.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(serde_json::Value::Null, |d| d.as_secs_f64().into())
}

/// What the admin port reads.
pub struct Admin {
    pub state: Arc<ConfigState>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    /// `--ready-with-stale-grants`: past the grant TTL, answer 200 "degraded" instead of 503.
    pub ready_with_stale_grants: bool,
}

/// Why grants are stale, for `/readyz`: how long since the control plane confirmed them, against the TTL.
fn stale_grants(state: &ConfigState, now: SystemTime) -> Option<String> {
    if !state.grants_stale(now) {
        return None;
    }
    let ttl = state.grant_ttl().as_secs();
    Some(match state.confirmation_age(now) {
        Some(age) => format!(
            "grants not confirmed by the control plane for {}s (grant TTL {ttl}s): requests that need grants get 503",
            age.as_secs()
        ),
        None => format!(
            "grants never confirmed by the control plane (or confirmed in the future; grant TTL {ttl}s): requests that need grants get 503"
        ),
    })
}

/// `/readyz`: not ready while shutting down, before a configuration, or past the grant TTL (every grant-dependent
/// request would get 503, so a load balancer should send them elsewhere; `--ready-with-stale-grants` answers 200
/// "degraded" instead, see deploy/README.md). Ready, with what is refused, while refusing the control plane's
/// configuration (the last good snapshot is still served).
fn readiness(admin: &Admin) -> Response<Body> {
    if admin.lifecycle.phase() != Phase::Serving {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into());
    }
    let Some(snapshot) = admin.state.load() else {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no configuration loaded yet\n".into());
    };
    if let Some(stale) = stale_grants(&admin.state, SystemTime::now()) {
        return if admin.ready_with_stale_grants {
            respond(StatusCode::OK, "text/plain", format!("degraded: {stale}\n"))
        } else {
            respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {stale}\n"))
        };
    }
    let body = match admin.state.refusing() {
        None => "ready\n".to_owned(),
        Some(refusing) => format!(
            "ready: serving revision {} of store `{}` (the last good snapshot); refusing the control plane's configuration for {}s: {}\n",
            snapshot.system_version,
            admin.state.store_id(),
            SystemTime::now().duration_since(refusing.since).map_or(0, |d| d.as_secs()),
            refusing.reason,
        ),
    };
    respond(StatusCode::OK, "text/plain", body)
}

pub async fn handle(admin: Arc<Admin>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (state, metrics) = (&admin.state, &admin.metrics);
    if request.uri().path() == "/config/accept-next" {
        if request.method() != http::Method::POST {
            return Ok(respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST only\n".into()));
        }
        tracing::warn!("an operator accepts the control plane's next configuration whatever its store and revision");
        state.accept_next();
        return Ok(respond(
            StatusCode::ACCEPTED,
            "text/plain",
            "the next configuration from the control plane will be accepted once, whatever its store and revision\n"
                .into(),
        ));
    }
    Ok(match request.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let (content_type, text) = metrics
                .encode(fhirgw_telemetry::metrics::wants_openmetrics(request.headers().get(http::header::ACCEPT)));
            respond(StatusCode::OK, content_type, text)
        }
        "/readyz" => readiness(&admin),
        "/config" => {
            let snapshot = state.load();
            let applied = state.applied();
            let rejection = state.last_rejection();
            let received = state.received();
            let refusing = state.refusing();
            let now = SystemTime::now();
            let body = serde_json::json!({
                "ready": snapshot.is_some(),
                "version": snapshot.as_ref().map(|s| s.digest.clone()),
                "system_version": snapshot.as_ref().map(|s| s.system_version),
                "store_id": state.store_id(),
                "refusing": refusing.map(|r| serde_json::json!({
                    "seconds": secs_since(Some(r.since)),
                    "reason": r.reason,
                    "offered_store_id": r.offered_store_id,
                    "offered_revision": r.offered_revision,
                })),
                "accept_next_pending": state.accept_next_pending(),
                "shutting_down": admin.lifecycle.phase() != Phase::Serving,
                "source": applied.as_ref().map(|a| match a.source { Source::ControlPlane => "control_plane", Source::Disk => "disk" }),
                "seconds_since_applied": secs_since(applied.map(|a| a.applied_at)),
                "seconds_since_confirmed": secs_since(state.confirmed_at()),
                "grant_ttl_seconds": state.grant_ttl().as_secs(),
                "grants_stale": state.grants_stale(now),
                "last_rejection": if rejection.summary.is_empty() { serde_json::Value::Null } else { serde_json::json!({
                    "seconds_ago": secs_since(rejection.at),
                    "summary": rejection.summary,
                })},
                "received": { "responses": received.responses, "resources": received.resources },
                "tenants": snapshot.as_deref().map_or(serde_json::Value::Array(Vec::new()), |s| tenants(s, now)),
                "resources": snapshot.as_ref().map(|s| s.resources.iter().map(|((kind, name), raw)| serde_json::json!({
                    "kind": kind.as_str(), "name": name, "version": raw.version,
                })).collect::<Vec<_>>()).unwrap_or_default(),
            });
            respond(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fhirgw_config::tenant::{Grant, Tag, Tenant};

    use super::*;

    #[test]
    fn tenants_list_grants_with_their_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let tag = |code: &str| Tag { system: "https://fhirgw.dev/dataset".into(), code: code.into() };
        let mut snapshot = Snapshot::empty();
        for (name, grants) in [
            ("clinic-b", vec![]),
            (
                "clinic-a",
                vec![
                    Grant { tag: tag("z"), expires_at: None },
                    Grant { tag: tag("a"), expires_at: Some(now + Duration::from_secs(90)) },
                    Grant { tag: tag("m"), expires_at: Some(now - Duration::from_secs(1)) },
                ],
            ),
        ] {
            let tenant =
                Tenant { name: name.into(), display_name: format!("Clinic {name}"), grants, audit: Default::default() };
            snapshot.tenants.insert(name.into(), tenant);
        }
        let got = tenants(&snapshot, now);
        let want = serde_json::json!([
            {"name": "clinic-a", "display_name": "Clinic clinic-a", "version": null, "grants": [
                {"system": "https://fhirgw.dev/dataset", "code": "a", "expires_at": "2027-01-15T08:01:30Z",
                 "active": true, "expires_in_seconds": 90},
                {"system": "https://fhirgw.dev/dataset", "code": "m", "expires_at": "2027-01-15T07:59:59Z",
                 "active": false, "expires_in_seconds": 0},
                {"system": "https://fhirgw.dev/dataset", "code": "z", "expires_at": null,
                 "active": true, "expires_in_seconds": null},
            ]},
            {"name": "clinic-b", "display_name": "Clinic clinic-b", "version": null, "grants": []},
        ]);
        assert_eq!(got, want, "{got:#}");
    }
}
