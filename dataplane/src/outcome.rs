//! FHIR OperationOutcome responses: the only error body a FHIR client ever sees from the gateway.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::body::Body;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A FHIR `IssueType` code and the text for a client.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: StatusCode,
    /// FHIR issue type, e.g. `not-found`, `forbidden`, `transient`.
    pub code: &'static str,
    pub diagnostics: String,
    pub retry_after_secs: Option<u32>,
    /// `WWW-Authenticate` for 401s.
    pub www_authenticate: Option<&'static str>,
    /// Shown to the client so support can find the trace.
    pub trace_id: Option<String>,
}

impl Outcome {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            code,
            diagnostics: diagnostics.into(),
            retry_after_secs: None,
            www_authenticate: None,
            trace_id: None,
        }
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn challenge(mut self, value: &'static str) -> Self {
        self.www_authenticate = Some(value);
        self
    }

    pub fn body(&self) -> serde_json::Value {
        let severity = if self.status.is_server_error() { "fatal" } else { "error" };
        let diagnostics = match &self.trace_id {
            Some(id) => format!("{} (trace {id})", self.diagnostics),
            None => self.diagnostics.clone(),
        };
        serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": severity, "code": self.code, "diagnostics": diagnostics }],
        })
    }

    pub fn into_response(self) -> Response<Body> {
        let bytes = Bytes::from(self.body().to_string());
        let mut response = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed_unsync());
        *response.status_mut() = self.status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if let Some(id) = self.trace_id.as_deref().and_then(|id| HeaderValue::try_from(id).ok()) {
            response.headers_mut().insert("x-trace-id", id);
        }
        if let Some(challenge) = self.www_authenticate {
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_shape() {
        let o = Outcome::new(StatusCode::SERVICE_UNAVAILABLE, "transient", "not ready").retry_after(2);
        let body = o.body();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(body["issue"][0]["severity"], "fatal");
        assert_eq!(body["issue"][0]["code"], "transient");
        let response = o.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()[CONTENT_TYPE], FHIR_JSON);
    }
}
