//! The admin port: liveness, readiness, the applied configuration, Prometheus metrics, and the operator's one-time
//! override of the configuration rollback guard (`POST /config/accept-next`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
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

fn secs_since(at: Option<SystemTime>) -> serde_json::Value {
    at.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(serde_json::Value::Null, |d| d.as_secs_f64().into())
}

/// What the admin port reads.
pub struct Admin {
    pub state: Arc<ConfigState>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
}

/// `/readyz`: not ready while shutting down or before a configuration; ready, with what is refused, while refusing
/// the control plane's configuration (the last good snapshot is still served).
fn readiness(admin: &Admin) -> Response<Body> {
    if admin.lifecycle.phase() != Phase::Serving {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into());
    }
    let Some(snapshot) = admin.state.load() else {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no configuration loaded yet\n".into());
    };
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
                "last_rejection": if rejection.summary.is_empty() { serde_json::Value::Null } else { serde_json::json!({
                    "seconds_ago": secs_since(rejection.at),
                    "summary": rejection.summary,
                })},
                "received": { "responses": received.responses, "resources": received.resources },
                "resources": snapshot.as_ref().map(|s| s.resources.iter().map(|((kind, name), raw)| serde_json::json!({
                    "kind": kind.as_str(), "name": name, "version": raw.version,
                })).collect::<Vec<_>>()).unwrap_or_default(),
            });
            respond(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}
