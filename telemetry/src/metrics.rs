//! The Prometheus exposition both planes serve on their admin ports: one encoder and one content negotiation.

use prometheus_client::registry::Registry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does; curl does not).
pub fn wants_openmetrics(accept: Option<&http::HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// The registry as text: Prometheus 0.0.4, or OpenMetrics when `openmetrics`. Returns (content type, body).
pub fn encode(registry: &Registry, openmetrics: bool) -> (&'static str, String) {
    let mut out = String::new();
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    let content_type =
        if openmetrics { OPENMETRICS } else { prometheus_client::encoding::prometheus_text::CONTENT_TYPE };
    (content_type, out)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn negotiation() {
        let cases: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain;version=0.0.4"), false),
            (Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"), true),
        ];
        for (accept, want) in cases {
            let value = accept.map(HeaderValue::from_static);
            assert_eq!(wants_openmetrics(value.as_ref()), *want, "{accept:?}");
            let (content_type, _) = encode(&Registry::default(), *want);
            assert_eq!(content_type.starts_with("application/openmetrics-text"), *want);
        }
    }
}
