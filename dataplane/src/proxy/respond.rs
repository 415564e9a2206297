//! Response builders: FHIR JSON the gateway produced or verified, with only the headers it chose.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use serde_json::Value;

use crate::body::{self, Body};
use crate::outcome::FHIR_JSON;

/// A JSON response re-serialised from the parsed value, so the client receives exactly what was verified. `keep`
/// holds the only upstream headers passed on (validators, rewritten locations), chosen by the caller.
pub(crate) fn json_response(status: StatusCode, value: &Value, keep: &HeaderMap, head: bool) -> Response<Body> {
    let bytes = if head { Bytes::new() } else { Bytes::from(value.to_string()) };
    bytes_response_with(status, bytes, keep.clone(), false)
}

/// The upstream's validators (`ETag`, `Last-Modified`), for a response that is the upstream's representation.
pub(crate) fn validators(upstream: &HeaderMap) -> HeaderMap {
    let mut keep = HeaderMap::new();
    for name in [header::ETAG, header::LAST_MODIFIED] {
        if let Some(v) = upstream.get(&name) {
            keep.insert(name, v.clone());
        }
    }
    keep
}

/// A FHIR JSON response from bytes the gateway produced.
pub(crate) fn bytes_response(status: StatusCode, body: Bytes) -> Response<Body> {
    bytes_response_with(status, body, HeaderMap::new(), false)
}

/// A FHIR JSON response from verified bytes, with the headers in `keep` (validators) and no body for HEAD.
pub(crate) fn bytes_response_with(status: StatusCode, body: Bytes, keep: HeaderMap, head: bool) -> Response<Body> {
    let body = if head { Bytes::new() } else { body };
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    *response.headers_mut() = keep;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}
