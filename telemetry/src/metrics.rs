//! The Prometheus exposition both planes serve on their admin ports: one encoder and one content negotiation. Each
//! plane's registry is followed by what every fhirgw binary exports (`fhirgw_build_info`, `process_*`; see
//! [`crate::process`]), unprefixed.

use prometheus_client::registry::Registry;

use crate::process::ProcessCollector;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does; curl does not).
pub fn wants_openmetrics(accept: Option<&http::HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// The registry, then the build and process metrics, as text: Prometheus 0.0.4, or OpenMetrics when `openmetrics`.
/// Returns (content type, body).
pub fn encode(registry: &Registry, openmetrics: bool) -> (&'static str, String) {
    let mut process = Registry::default();
    process.register_collector(Box::new(ProcessCollector));
    let mut out = String::new();
    let result = if openmetrics {
        use prometheus_client::encoding::text;
        text::encode_registry(&mut out, registry)
            .and_then(|()| text::encode_registry(&mut out, &process))
            .and_then(|()| text::encode_eof(&mut out))
    } else {
        use prometheus_client::encoding::prometheus_text;
        prometheus_text::encode(&mut out, registry).and_then(|()| prometheus_text::encode(&mut out, &process))
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

    #[test]
    fn build_and_process_metrics_follow_the_planes_own() {
        let mut registry = Registry::with_prefix("fhirgw_dp");
        registry.register("up", "A plane's own metric", prometheus_client::metrics::gauge::Gauge::<i64>::default());
        for openmetrics in [false, true] {
            let (_, text) = encode(&registry, openmetrics);
            let names: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(['{', ' ']).next().unwrap_or_default())
                .collect();
            for want in [
                "fhirgw_dp_up",
                "fhirgw_build_info",
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_threads",
                "process_start_time_seconds",
            ] {
                assert!(names.contains(&want), "{want} missing (openmetrics: {openmetrics}):\n{text}");
            }
            let build = format!(
                "fhirgw_build_info{{version=\"{}\",commit=\"{}\"}} 1",
                crate::process::VERSION,
                crate::process::COMMIT
            );
            assert!(text.lines().any(|l| l == build), "no `{build}` in:\n{text}");
            assert_eq!(text.matches("# EOF").count(), usize::from(openmetrics), "{text}");
        }
    }
}
