//! Logs and traces for both planes.
//!
//! Logs go to stderr, human-readable or JSON. Traces are exported over OTLP/gRPC only when an endpoint is
//! configured through the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`;
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and the batch-processor variables are honoured by the SDK). JSON
//! logs carry `trace_id`/`span_id` (see [`json`]); without an endpoint they still get ids from a tracer provider that
//! exports nothing and samples only what the caller sampled. Text logs without an endpoint: no OpenTelemetry layer
//! at all. W3C trace context is the propagation format.
//!
//! Exported spans carry their own fields and the OpenTelemetry conventions' attributes ([`semconv`]), not the
//! bridge's diagnostics (`code.*`, `thread.*`, `busy_ns`/`idle_ns`, `target`) unless `FHIRGW_OTEL_DEBUG_ATTRIBUTES`
//! is `1` or `true`. Spans whose target is [`LOG_ONLY`] reach the logs but are never exported; spans whose target is
//! [`TRACE_ONLY`] (every request's) are exported but give log lines no context, and without a tracer provider (text
//! logs, no endpoint) they are not even created.

pub mod json;
pub mod metrics;
pub mod process;
pub mod semconv;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and shuts the exporter down when dropped (at the end of `main`).
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The target of spans that give log lines context but are never exported: long-lived ones (a config session that
/// lasts until the stream ends) would be exported only when they end, minutes later, leaving every span begun
/// inside them without its parent meanwhile. `info_span!(target: LOG_ONLY, "config_session", …)`.
pub const LOG_ONLY: &str = "fhirgw::log_only";

/// The target of spans that are exported but not formatted into log lines: the spans of every request. The log
/// layer formats a span's fields when it is created and again at each `record` (in JSON, by parsing and rewriting
/// them), which cost more than the gateway's whole work on a read (callgrind: ~150k instructions per read in JSON
/// logs, ~65k in text). Log lines inside them carry what they need as their own fields; JSON lines still name the
/// span and its trace (see [`json`]). `info_span!(target: TRACE_ONLY, "request", …)`.
pub const TRACE_ONLY: &str = "fhirgw::trace";

/// What the log layer sees: every event, and the spans that are not [`TRACE_ONLY`].
pub(crate) fn in_logs(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target() == TRACE_ONLY)
}

/// Whether exported spans also get the bridge's diagnostic attributes (source location, thread, busy/idle time,
/// target): `FHIRGW_OTEL_DEBUG_ATTRIBUTES=1` (or `true`).
fn debug_attributes() -> bool {
    std::env::var("FHIRGW_OTEL_DEBUG_ATTRIBUTES").is_ok_and(|v| matches!(v.trim(), "1" | "true"))
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs logging (and tracing export if configured). `default_filter` applies when `RUST_LOG` is unset. Call once,
/// from inside the Tokio runtime.
pub fn init(service: &'static str, json_logs: bool, default_filter: &str) -> Result<Guard, Box<dyn std::error::Error>> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let dispatch = Arc::new(OnceLock::new());
    // Colours only for a terminal: a file, a pipe or journald would get the escape codes as text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json_logs {
        fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(json::WithTraceIds::new(
                tracing_subscriber::fmt::format().json().with_current_span(true),
                dispatch.clone(),
            ))
            .boxed()
    } else {
        fmt.boxed()
    };
    let fmt = fmt.with_filter(tracing_subscriber::filter::filter_fn(in_logs));
    let provider = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
        Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    } else if json_logs {
        // Ids for the log lines only: nothing is exported, and a span is recorded only when the caller sampled it.
        Some(SdkTracerProvider::builder().with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))).build())
    } else {
        None
    };
    if provider.is_none() {
        // Nothing would read them: not created at all.
        filter = filter.add_directive(format!("{TRACE_ONLY}=off").parse()?);
    }
    let debug = debug_attributes();
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_location(debug)
            .with_threads(debug)
            .with_tracked_inactivity(debug)
            .with_target(debug)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| meta.target() != LOG_ONLY))
    });
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init()?;
    // The subscriber is installed: the JSON formatter can now find the OpenTelemetry context of a span.
    let _ = dispatch.set(tracing::dispatcher::get_default(tracing::Dispatch::downgrade));
    Ok(Guard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// Continues a caller's W3C trace context (`traceparent`, `tracestate`) in `span`.
pub fn continue_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s W3C trace context into outgoing headers, replacing what is there (the caller's, passed on). A
/// span without one (traces off: no tracer provider) leaves the headers as they are.
pub fn inject_into_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        headers.remove("traceparent");
        headers.remove("tracestate");
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// `span`'s trace context as a map, for carrying across the config push.
pub fn to_map(span: &tracing::Span) -> BTreeMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut map);
    }
    map.into_iter().collect()
}

/// Links `span` to the trace context in `map` (a config change's trace, seen when a data plane applies it).
pub fn link_from_map(span: &tracing::Span, map: &BTreeMap<String, String>) {
    let plain: HashMap<String, String> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let cx = TraceContextPropagator::new().extract(&plain);
    let context = cx.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// The trace id of `span`, when traces are on; else the caller's, when it sent a valid `traceparent`.
pub fn trace_id(span: &tracing::Span, headers: Option<&http::HeaderMap>) -> Option<String> {
    let own = span.context().span().span_context().trace_id();
    if own != opentelemetry::trace::TraceId::INVALID {
        return Some(own.to_string());
    }
    let headers = headers?;
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let id = parent.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

/// Resolves on SIGTERM or Ctrl-C: when a process should stop accepting work and drain.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
