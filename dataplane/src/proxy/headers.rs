//! Header hygiene between client and upstream.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method};

/// Builds the headers of a request to the upstream from the client's, by allow-list: only what FHIR needs passes,
/// and the gateway adds its own afterwards (the credential in `UpstreamClient::send`, trace context, `Accept`,
/// `Accept-Encoding: identity`, `Content-Type`, `If-Match` on the version it checked, a narrowed `If-None-Exist`).
///
/// What passes: `Accept-Language`; one `X-Request-Id` of a plain form; the caller's W3C trace context when it is
/// well-formed (see [`trace_context`]; the gateway's own replaces it when the gateway traces the request); the `Prefer` preferences the gateway
/// understands for the method (`return=minimal|representation|OperationOutcome` on writes, `handling=strict|lenient`
/// on reads and searches), rebuilt from their parsed values; and the names the route lists in `forward_headers`
/// (never one of the names `fhirgw_config::route::forward_header` refuses), unless the upstream strips them.
/// Everything else (method overrides, URL rewrites, identity and tenant assertions, cookies, conditionals, ranges,
/// encodings) is dropped, whatever its name.
pub fn for_upstream(client: &HeaderMap, method: &Method, route: &[HeaderName], strip: &[HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for value in client.get_all(header::ACCEPT_LANGUAGE) {
        if value.len() <= 256 && value.as_bytes().iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            out.append(header::ACCEPT_LANGUAGE, value.clone());
        }
    }
    if let Some(id) = request_id(client) {
        out.insert(REQUEST_ID, id.clone());
    }
    if let Ok(Some(prefer)) = prefer(client, method) {
        out.insert(PREFER, prefer);
    }
    trace_context(client, &mut out);
    for name in route.iter().filter(|n| !strip.contains(n)) {
        for value in client.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// What of `tracestate` is passed on at most (the W3C minimum a vendor must propagate).
const TRACESTATE_MAX: usize = 512;

/// Passes the caller's W3C trace context on unchanged, so that an upstream that traces joins the caller's trace
/// while the gateway does not trace (text logs and no OTLP endpoint: its request spans are not even created): one
/// `traceparent` of version `00` with ids that are not all zero, and with it the `tracestate` lines if together they
/// are at most 512 bytes of visible ASCII. When the gateway traces the request, `UpstreamClient::send` replaces both
/// with its own span's context, a child of the caller's.
fn trace_context(client: &HeaderMap, out: &mut HeaderMap) {
    let mut parents = client.get_all(TRACEPARENT).iter();
    let (Some(parent), None) = (parents.next(), parents.next()) else { return };
    if !traceparent_is_valid(parent.as_bytes()) {
        return;
    }
    out.insert(TRACEPARENT, parent.clone());
    let states = client.get_all(TRACESTATE);
    let (mut total, mut plain) = (0, true);
    for state in states.iter() {
        total += state.len() + 1;
        plain &= state.as_bytes().iter().all(|b| (b' '..=b'~').contains(b) || *b == b'\t');
    }
    if plain && total <= TRACESTATE_MAX + 1 {
        for state in states {
            out.append(TRACESTATE, state.clone());
        }
    }
}

/// `00-<32 lowercase hex, not all 0>-<16 lowercase hex, not all 0>-<2 lowercase hex>` (W3C Trace Context, level 1).
fn traceparent_is_valid(value: &[u8]) -> bool {
    let hex = |part: &[u8]| part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |part: &[u8]| part.iter().any(|&b| b != b'0');
    value.len() == 55
        && value.starts_with(b"00-")
        && value[35] == b'-'
        && value[52] == b'-'
        && hex(&value[3..35])
        && nonzero(&value[3..35])
        && hex(&value[36..52])
        && nonzero(&value[36..52])
        && hex(&value[53..55])
}

/// The client's one `X-Request-Id`, if it has a plain form (`[A-Za-z0-9._:-]`, at most 128 bytes).
pub fn request_id(client: &HeaderMap) -> Option<&HeaderValue> {
    let mut ids = client.get_all(REQUEST_ID).iter();
    match (ids.next(), ids.next()) {
        (Some(id), None)
            if (1..=128).contains(&id.len())
                && id
                    .as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) =>
        {
            Some(id)
        }
        _ => None,
    }
}
const PREFER: HeaderName = HeaderName::from_static("prefer");

/// The `Prefer` the upstream gets: the client's preferences the gateway understands for `method`, rebuilt. Two
/// different values for one preference are ambiguous (400).
fn prefer(client: &HeaderMap, method: &Method) -> Result<Option<HeaderValue>, Ambiguous> {
    let mut chosen: Vec<(&str, &'static str)> = Vec::new();
    let write = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    for value in client.get_all(PREFER) {
        let text = value.to_str().map_err(|_| Ambiguous("Prefer"))?;
        for preference in text.split(',') {
            let token = preference.split(';').next().unwrap_or_default().trim();
            let (name, value) = token.split_once('=').map_or((token, ""), |(n, v)| (n.trim(), v.trim()));
            let value = value.trim_matches('"');
            let known: Option<(&str, &'static str)> = match (name.to_ascii_lowercase().as_str(), value) {
                ("return", "minimal") if write => Some(("return", "minimal")),
                ("return", "representation") if write => Some(("return", "representation")),
                ("return", "OperationOutcome") if write => Some(("return", "OperationOutcome")),
                ("handling", "strict") if !write => Some(("handling", "strict")),
                ("handling", "lenient") if !write => Some(("handling", "lenient")),
                _ => None,
            };
            let Some((name, value)) = known else { continue };
            match chosen.iter().find(|(n, _)| *n == name) {
                Some((_, existing)) if *existing != value => return Err(Ambiguous("Prefer")),
                Some(_) => {}
                None => chosen.push((name, value)),
            }
        }
    }
    if chosen.is_empty() {
        return Ok(None);
    }
    let text = chosen.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(", ");
    Ok(HeaderValue::try_from(text).ok())
}

/// A request header whose value decides something, given in a way the gateway cannot read one way only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request has more than one `{0}`, or one that holds several values; send exactly one")]
pub struct Ambiguous(pub &'static str);

/// Headers whose one value decides what the gateway does must be there at most once: `Host` (the public base),
/// `Content-Type` (how a body is read), `Content-Encoding`, `If-Match` (the version a write is pinned to; one entity
/// tag), `If-None-Exist` (the condition of a create), `X-Security-Context` (a raw upload's dataset) and `Prefer`
/// (consistent preferences). `Authorization` is checked where it is read (`authn`). Forwarding headers from trusted
/// proxies are lists by design: the value of the nearest proxy counts (`public.rs`).
pub fn check_unambiguous(headers: &HeaderMap, method: &Method) -> Result<(), Ambiguous> {
    for (name, label) in [
        (header::HOST, "Host"),
        (header::CONTENT_TYPE, "Content-Type"),
        (header::CONTENT_ENCODING, "Content-Encoding"),
        (header::IF_MATCH, "If-Match"),
        (HeaderName::from_static("if-none-exist"), "If-None-Exist"),
        (HeaderName::from_static("x-security-context"), "X-Security-Context"),
    ] {
        if headers.get_all(&name).iter().nth(1).is_some() {
            return Err(Ambiguous(label));
        }
    }
    if let Some(value) = headers.get(header::IF_MATCH)
        && value.to_str().map_or(true, |v| v.contains(',') || v.trim() == "*")
    {
        return Err(Ambiguous("If-Match"));
    }
    prefer(headers, method).map(|_| ())
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

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap_or(header::HOST);
            h.append(name, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("x")));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.iter().map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?"))).collect();
        v.sort_unstable();
        v
    }

    /// Only the allow-list passes, whatever the client sends; what an upstream or sidecar might honour is dropped.
    #[test]
    fn upstream_headers_are_an_allow_list() {
        let client = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer client"),
            ("proxy-authorization", "Basic x"),
            ("host", "gw.example"),
            ("cookie", "session=1"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/fhir/Patient/b-pat-1"),
            ("x-rewrite-url", "/fhir/Patient/b-pat-1"),
            ("x-remote-user", "admin"),
            ("x-auth-request-user", "admin"),
            ("x-scope", "system/*.*"),
            ("x-dataset", "tenant-b"),
            ("x-tenant", "tenant-b"),
            ("x-internal-user", "admin"),
            ("if-none-match", "W/\"1\""),
            ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("range", "bytes=0-1"),
            ("accept-encoding", "gzip"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("user-agent", "curl/8"),
            ("accept", "application/fhir+xml"),
            ("accept-language", "de-CH, en;q=0.5"),
            ("x-request-id", "req-42"),
            ("x-correlation-id", "c-1"),
            ("prefer", "return=minimal, handling=strict, respond-async, wait=10"),
        ]);
        let route = [HeaderName::from_static("x-correlation-id"), HeaderName::from_static("x-internal-user")];
        let strip = [HeaderName::from_static("x-internal-user")];
        assert_eq!(
            names(&for_upstream(&client, &Method::GET, &route, &strip)),
            [
                "accept-language: de-CH, en;q=0.5",
                "prefer: handling=strict",
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "x-correlation-id: c-1",
                "x-request-id: req-42"
            ]
        );
        assert_eq!(
            names(&for_upstream(&client, &Method::PUT, &[], &[])),
            [
                "accept-language: de-CH, en;q=0.5",
                "prefer: return=minimal",
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "x-request-id: req-42"
            ]
        );
        // A request id of an odd form, or two of them, is not passed on.
        for ids in [&[("x-request-id", "a b")][..], &[("x-request-id", "a"), ("x-request-id", "b")]] {
            assert!(for_upstream(&map(ids), &Method::GET, &[], &[]).is_empty(), "{ids:?}");
        }
    }

    /// The caller's trace context passes only well-formed: one version-00 `traceparent`, and `tracestate` with it
    /// when it is small and plain.
    #[test]
    fn trace_context_passes_only_well_formed() {
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<String>);
        const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let long = format!("k={}", "v".repeat(TRACESTATE_MAX - 2));
        let too_long = format!("k={}", "v".repeat(TRACESTATE_MAX - 1));
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("none", vec![], vec![]),
            ("good", vec![("traceparent", GOOD)], vec![format!("traceparent: {GOOD}")]),
            ("good with state", vec![("traceparent", GOOD), ("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")],
                vec![format!("traceparent: {GOOD}"), "tracestate: congo=t61rcWkgMzE, rojo=00f067aa0ba902b7".into()]),
            ("two state lines", vec![("traceparent", GOOD), ("tracestate", "a=1"), ("tracestate", "b=2")],
                vec![format!("traceparent: {GOOD}"), "tracestate: a=1".into(), "tracestate: b=2".into()]),
            ("state of 512 bytes", vec![("traceparent", GOOD), ("tracestate", &long)],
                vec![format!("traceparent: {GOOD}"), format!("tracestate: {long}")]),
            ("state too long: parent only", vec![("traceparent", GOOD), ("tracestate", &too_long)], vec![format!("traceparent: {GOOD}")]),
            ("state without a parent", vec![("tracestate", "a=1")], vec![]),
            ("two parents", vec![("traceparent", GOOD), ("traceparent", GOOD)], vec![]),
            ("upper-case hex", vec![("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")], vec![]),
            ("zero trace id", vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")], vec![]),
            ("zero parent id", vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01")], vec![]),
            ("other version", vec![("traceparent", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], vec![]),
            ("ff version", vec![("traceparent", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], vec![]),
            ("trailing data", vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")], vec![]),
            ("short", vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")], vec![]),
            ("wrong separator", vec![("traceparent", "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], vec![]),
            ("not hex", vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01")], vec![]),
        ];
        for (what, headers, want) in cases {
            assert_eq!(names(&for_upstream(&map(&headers), &Method::GET, &[], &[])), want, "{what}");
        }
    }

    #[test]
    fn ambiguous_headers_table() {
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("nothing", vec![], None),
            ("one of each", vec![("host", "a"), ("content-type", "application/fhir+json"), ("if-match", "W/\"1\""), ("prefer", "return=minimal")], None),
            ("two hosts", vec![("host", "a"), ("host", "b")], Some("Host")),
            ("two content types", vec![("content-type", "application/fhir+json"), ("content-type", "application/json-patch+json")], Some("Content-Type")),
            ("two encodings", vec![("content-encoding", "gzip"), ("content-encoding", "identity")], Some("Content-Encoding")),
            ("two If-Match", vec![("if-match", "W/\"1\""), ("if-match", "W/\"2\"")], Some("If-Match")),
            ("If-Match list", vec![("if-match", "W/\"1\", W/\"2\"")], Some("If-Match")),
            ("If-Match any", vec![("if-match", "*")], Some("If-Match")),
            ("two If-None-Exist", vec![("if-none-exist", "a=1"), ("if-none-exist", "a=2")], Some("If-None-Exist")),
            ("two X-Security-Context", vec![("x-security-context", "Patient/1"), ("x-security-context", "Patient/2")], Some("X-Security-Context")),
            ("conflicting Prefer", vec![("prefer", "return=minimal"), ("prefer", "return=representation")], Some("Prefer")),
            ("conflicting Prefer in one value", vec![("prefer", "return=minimal, return=OperationOutcome")], Some("Prefer")),
            ("repeated Prefer", vec![("prefer", "return=minimal"), ("prefer", "return=minimal, respond-async")], None),
        ];
        for (what, pairs, want) in cases {
            let got = check_unambiguous(&map(&pairs), &Method::PUT).err().map(|Ambiguous(name)| name);
            assert_eq!(got, want, "{what}");
        }
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
