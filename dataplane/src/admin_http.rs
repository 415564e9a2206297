//! The admin port: liveness, readiness, the applied configuration and Prometheus metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::state::{ConfigState, Source};
use crate::upstream::Body;

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

pub async fn handle(
    state: Arc<ConfigState>,
    metrics: Arc<Metrics>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match request.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let (content_type, text) = metrics
                .encode(fhirgw_telemetry::metrics::wants_openmetrics(request.headers().get(http::header::ACCEPT)));
            respond(StatusCode::OK, content_type, text)
        }
        "/readyz" => {
            if state.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no configuration loaded yet\n".into())
            }
        }
        "/config" => {
            let snapshot = state.load();
            let applied = state.applied();
            let rejection = state.last_rejection();
            let received = state.received();
            let body = serde_json::json!({
                "ready": snapshot.is_some(),
                "version": snapshot.as_ref().map(|s| s.digest.clone()),
                "system_version": snapshot.as_ref().map(|s| s.system_version),
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
