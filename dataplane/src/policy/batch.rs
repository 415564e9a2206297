//! Batch and transaction Bundles (`POST [base]`): each entry is parsed into a request of its own, which the proxy
//! then routes, classifies and checks exactly like a direct request. This module holds the pure parts.

use fhirgw_config::path::NormalPath;
use http::Method;
use serde_json::Value;

/// Most entries one batch or transaction may carry.
pub const MAX_ENTRIES: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Batch,
    Transaction,
}

impl Kind {
    pub fn response_type(self) -> &'static str {
        match self {
            Kind::Batch => "batch-response",
            Kind::Transaction => "transaction-response",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the body must be a Bundle of type batch or transaction")]
    NotBatch,
    #[error("a batch or transaction may carry at most {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// The kind of a batch or transaction Bundle, and its entries.
pub fn parse(bundle: &Value) -> Result<(Kind, &[Value]), BatchError> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(BatchError::NotBatch);
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => Kind::Batch,
        Some("transaction") => Kind::Transaction,
        _ => return Err(BatchError::NotBatch),
    };
    let entries = match bundle.get("entry") {
        None => &[][..],
        Some(Value::Array(entries)) => entries.as_slice(),
        Some(_) => return Err(BatchError::NotBatch),
    };
    if entries.len() > MAX_ENTRIES {
        return Err(BatchError::TooManyEntries);
    }
    Ok((kind, entries))
}

/// One entry's request: method, normalised path relative to the FHIR base, and raw query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRequest {
    pub method: Method,
    pub path: Vec<String>,
    pub query: Option<String>,
}

/// Reads `entry.request`. The URL is relative to the FHIR base (`Patient/1`, `Patient?name=x`); an absolute URL is
/// accepted only on the gateway's own public base. The path goes through the same normalisation as a request
/// path, so an entry cannot reach what a direct request could not.
pub fn entry_request(entry: &Value, public_base: &str) -> Result<EntryRequest, String> {
    let request = entry.get("request").ok_or("entry.request is missing")?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some("PUT") => Method::PUT,
        Some("PATCH") => Method::PATCH,
        Some("DELETE") => Method::DELETE,
        _ => return Err("entry.request.method must be GET, HEAD, POST, PUT, PATCH or DELETE".into()),
    };
    let url = request.get("url").and_then(Value::as_str).filter(|u| !u.is_empty());
    let url = url.ok_or("entry.request.url is missing")?;
    let relative = match url.strip_prefix(public_base) {
        Some(rest) if rest.starts_with('/') => rest,
        _ if url.contains("://") => return Err("entry.request.url is an absolute URL outside this server".into()),
        _ => url,
    };
    if relative.contains('#') {
        return Err("entry.request.url must not carry a fragment".into());
    }
    let (path, query) = match relative.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (relative, None),
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    let normal = NormalPath::parse(&format!("/{path}")).map_err(|e| format!("entry.request.url: {e}"))?;
    Ok(EntryRequest { method, path: normal.segments().to_vec(), query: query.filter(|q| !q.is_empty()) })
}

/// `entry.request.<name>` as a string, if present.
pub fn request_field<'a>(entry: &'a Value, name: &str) -> Option<&'a str> {
    entry.get("request").and_then(|r| r.get(name)).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BASE: &str = "https://gw.example/fhir";

    #[test]
    fn bundle_kinds() {
        type Case = (Value, Result<(Kind, usize), BatchError>);
        let cases: Vec<Case> = vec![
            (json!({"resourceType": "Bundle", "type": "batch", "entry": [{}]}), Ok((Kind::Batch, 1))),
            (json!({"resourceType": "Bundle", "type": "transaction"}), Ok((Kind::Transaction, 0))),
            (json!({"resourceType": "Bundle", "type": "searchset", "entry": []}), Err(BatchError::NotBatch)),
            (json!({"resourceType": "Bundle", "type": "batch", "entry": {}}), Err(BatchError::NotBatch)),
            (json!({"resourceType": "Patient", "type": "batch"}), Err(BatchError::NotBatch)),
            (json!([]), Err(BatchError::NotBatch)),
            (
                json!({"resourceType": "Bundle", "type": "batch", "entry": vec![json!({}); MAX_ENTRIES + 1]}),
                Err(BatchError::TooManyEntries),
            ),
        ];
        for (bundle, want) in cases {
            assert_eq!(parse(&bundle).map(|(k, e)| (k, e.len())), want, "{bundle}");
        }
    }

    #[test]
    fn entry_requests() {
        let ok = |m: Method, path: &[&str], q: Option<&str>| {
            Ok(EntryRequest {
                method: m,
                path: path.iter().map(|s| (*s).to_owned()).collect(),
                query: q.map(str::to_owned),
            })
        };
        let cases: Vec<(Value, Result<EntryRequest, &str>)> = vec![
            (json!({"method": "GET", "url": "Patient/1"}), ok(Method::GET, &["Patient", "1"], None)),
            (json!({"method": "GET", "url": "/Patient/1"}), ok(Method::GET, &["Patient", "1"], None)),
            (json!({"method": "GET", "url": "Patient?name=x"}), ok(Method::GET, &["Patient"], Some("name=x"))),
            (json!({"method": "GET", "url": "Patient?"}), ok(Method::GET, &["Patient"], None)),
            (json!({"method": "PUT", "url": format!("{BASE}/Patient/1")}), ok(Method::PUT, &["Patient", "1"], None)),
            (json!({"method": "GET", "url": "%24export"}), ok(Method::GET, &["$export"], None)),
            (json!({"method": "DELETE", "url": "Patient/1"}), ok(Method::DELETE, &["Patient", "1"], None)),
            (json!({"method": "GET", "url": "https://evil.example/fhir/Patient/1"}), Err("absolute URL")),
            (json!({"method": "GET", "url": format!("{BASE}evil/Patient/1")}), Err("absolute URL")),
            (json!({"method": "GET", "url": "Patient/../Observation/1"}), Err("entry.request.url")),
            (json!({"method": "GET", "url": "Patient/a%2Fb"}), Err("entry.request.url")),
            (json!({"method": "GET", "url": "Patient//1"}), Err("entry.request.url")),
            (json!({"method": "GET", "url": "Patient/1#x"}), Err("fragment")),
            (json!({"method": "GET", "url": ""}), Err("url is missing")),
            (json!({"method": "GET"}), Err("url is missing")),
            (json!({"method": "TRACE", "url": "Patient/1"}), Err("method")),
            (json!({"method": "get", "url": "Patient/1"}), Err("method")),
        ];
        for (request, want) in cases {
            let got = entry_request(&json!({ "request": request }), BASE);
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{request}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{request}: {g}"),
                _ => panic!("{request}: got {got:?}, want {want:?}"),
            }
        }
        assert!(entry_request(&json!({}), BASE).is_err_and(|e| e.contains("request is missing")));
    }
}
