//! OpenTelemetry HTTP semantic conventions on spans (`http.request.method`, `http.route`, `server.address`,
//! `http.response.status_code`, `error.type`, span status), so Jaeger and Grafana show requests as HTTP calls.
//! Only bounded values go in: a method from the known set, a route id, the upstream's host; never a path, query or
//! resource id (they may name patients).

use opentelemetry::trace::Status;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Which side of an exchange a span is: a server span fails on 5xx only (a 4xx is the client's doing), a client span
/// on 4xx and 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// `http.request.method`: the method if it is one of the known ones, else `_OTHER` (as the conventions ask).
pub fn method(span: &tracing::Span, method: &http::Method) {
    let known = [
        http::Method::GET,
        http::Method::HEAD,
        http::Method::POST,
        http::Method::PUT,
        http::Method::PATCH,
        http::Method::DELETE,
        http::Method::OPTIONS,
        http::Method::CONNECT,
        http::Method::TRACE,
    ];
    let value = if known.contains(method) { method.as_str().to_owned() } else { "_OTHER".to_owned() };
    span.set_attribute("http.request.method", value);
}

/// `http.route`: the matched route, here the route id.
pub fn route(span: &tracing::Span, route: &str) {
    span.set_attribute("http.route", route.to_owned());
}

/// `http.response.status_code`; a status that fails `side` also sets `error.type` (the code) and the span status.
pub fn status(span: &tracing::Span, side: Side, status: u16) {
    span.set_attribute("http.response.status_code", i64::from(status));
    if fails(side, status) {
        error(span, &status.to_string());
    }
}

/// `error.type` (a low-cardinality identifier: `timeout`, `connect_error`, an abort reason, a status code) and the
/// span status ERROR.
pub fn error(span: &tracing::Span, error_type: &str) {
    span.set_attribute("error.type", error_type.to_owned());
    span.set_status(Status::error(""));
}

pub fn fails(side: Side, status: u16) -> bool {
    match side {
        Side::Server => status >= 500,
        Side::Client => status >= 400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_statuses_fail() {
        let cases = [
            (Side::Server, 200, false),
            (Side::Server, 404, false),
            (Side::Server, 499, false),
            (Side::Server, 500, true),
            (Side::Server, 503, true),
            (Side::Client, 304, false),
            (Side::Client, 404, true),
            (Side::Client, 502, true),
        ];
        for (side, status, want) in cases {
            assert_eq!(fails(side, status), want, "{side:?} {status}");
        }
    }
}
