//! Header hygiene between client and upstream.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Client headers an upstream might trust as set by a trusted hop. Removed from every client request; the data
/// plane sets its own where needed.
const CLIENT_INTERNAL: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "x-cascade",
    "x-tenant",
    "x-tenant-id",
    "x-user",
    "x-user-id",
    "x-patient",
    "x-patient-id",
    "x-fhirgw-tenant",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Prepares client headers for the upstream. `extra` is the upstream's own list of internal headers.
pub fn sanitize_request(headers: &mut HeaderMap, extra: &[HeaderName]) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    headers.remove(header::COOKIE);
    for name in CLIENT_INTERNAL {
        headers.remove(*name);
    }
    for name in extra {
        headers.remove(name);
    }
}

/// The gateway reads every body it passes on, so it asks the upstream for `Accept-Encoding: identity`. An upstream
/// that compresses anyway gets a clean 502 (logged), not a body misread as malformed or missing.
pub(super) fn require_identity(headers: &HeaderMap) -> Result<(), super::ProxyError> {
    let encodings: Vec<&str> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not ASCII)"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case("identity"))
        .collect();
    if encodings.is_empty() {
        return Ok(());
    }
    Err(super::ProxyError::Unverifiable(format!(
        "the upstream sent Content-Encoding `{}` although identity was asked for",
        encodings.join(", ")
    )))
}

/// The size of a header block as a route's guard counts it: each name and value plus 4 bytes (`: ` and CRLF).
pub fn total_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn request_sanitising_table() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("authorization", "Bearer client"),
            ("host", "gw.example"),
            ("cookie", "session=1"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
            ("x-tenant", "other"),
            ("x-internal-user", "admin"),
            ("accept", "application/fhir+json"),
            ("if-none-match", "W/\"1\""),
            ("prefer", "return=representation"),
        ] {
            h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        sanitize_request(&mut h, &[HeaderName::from_static("x-internal-user")]);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "if-none-match", "prefer"]);
    }

    #[test]
    fn only_identity_bodies_are_read() {
        let cases: &[(&[&str], bool)] = &[
            (&[], true),
            (&["identity"], true),
            (&["Identity"], true),
            (&["gzip"], false),
            (&["identity", "br"], false),
            (&["gzip, identity"], false),
            (&[""], true),
        ];
        for (values, ok) in cases {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_static(v));
            }
            assert_eq!(require_identity(&h).is_ok(), *ok, "{values:?}");
        }
    }
}
