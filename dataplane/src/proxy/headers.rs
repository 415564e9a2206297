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
}
