//! JSON log lines that name their trace: every event inside a span with a valid OpenTelemetry context gets
//! `trace_id` and `span_id` (W3C hex), so a log search by the id in a caller's `traceparent` or a response's
//! `x-trace-id` finds the lines. The line itself is tracing-subscriber's JSON; the ids are appended to it.

use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Wraps a JSON event formatter. The dispatch is set once the subscriber is installed (it contains this formatter,
/// so it cannot be known at construction); it is held weakly to avoid a cycle.
pub struct WithTraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<F> WithTraceIds<F> {
    pub fn new(inner: F, dispatch: Arc<OnceLock<WeakDispatch>>) -> Self {
        Self { inner, dispatch }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let dispatch = self.dispatch.get().and_then(WeakDispatch::upgrade);
        // The event's own span (an explicit `parent:` included), not the thread's current one, from the registry:
        // this layer's context does not show the spans only traces get (`TRACE_ONLY`).
        let leaf = dispatch.as_ref().and_then(|dispatch| {
            let registry = dispatch.downcast_ref::<Registry>()?;
            let id = match event.parent() {
                Some(id) => id.clone(),
                None if event.is_contextual() => registry.current_span().id()?.clone(),
                None => return None,
            };
            let metadata = registry.span(&id)?.metadata();
            Some((id, metadata))
        });
        let ids = leaf.as_ref().zip(dispatch.as_ref()).and_then(|((id, _), dispatch)| {
            // No extension lock is held here: get_otel_context takes the span's extensions itself.
            let cx = tracing_opentelemetry::get_otel_context(id, dispatch)?;
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        // A line in a span the log layer does not see has no `span` of the inner formatter's: it gets the name.
        let shown = event.parent().and_then(|id| ctx.span(id)).or_else(|| ctx.lookup_current()).is_some();
        let name = leaf.filter(|(_, metadata)| !shown && metadata.target() == crate::TRACE_ONLY).map(|(_, m)| m.name());
        match line.strip_suffix("}\n") {
            Some(open) if ids.is_some() || name.is_some() => {
                writer.write_str(open)?;
                if let Some(name) = name {
                    // Span names are identifiers in this code base: nothing to escape.
                    write!(writer, ",\"span\":{{\"name\":\"{name}\"}}")?;
                }
                if let Some((trace_id, span_id)) = ids {
                    write!(writer, ",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"")?;
                }
                writer.write_str("}\n")
            }
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        /// What was written, and its lines as JSON.
        fn lines(&self) -> (String, Vec<serde_json::Value>) {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            let lines = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            (text, lines)
        }
    }

    /// JSON logs (the log layer seeing what `filter` lets through) beside an OpenTelemetry layer whose provider exports
    /// nothing and samples only what the caller sampled, as `init` sets them up without an endpoint.
    fn json_logs(filter: fn(&tracing::Metadata<'_>) -> bool) -> (Buffer, tracing::Dispatch) {
        use tracing_subscriber::Layer as _;

        let buffer = Buffer::default();
        let cell = Arc::new(OnceLock::new());
        let provider =
            SdkTracerProvider::builder().with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))).build();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(buffer.clone())
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(WithTraceIds::new(
                        tracing_subscriber::fmt::format().json().with_current_span(true),
                        cell.clone(),
                    ))
                    .with_filter(tracing_subscriber::filter::filter_fn(filter)),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let dispatch = tracing::Dispatch::new(subscriber);
        cell.set(dispatch.downgrade()).unwrap();
        (buffer, dispatch)
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn lines_in_a_traced_span_carry_its_ids() {
        // No exporter, and not sampled unless the caller's trace is: ids exist all the same.
        let (buffer, dispatch) = json_logs(|_| true);
        let caller = "4bf92f3577b34da6a3ce929d0e0e4736";
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("request");
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", format!("00-{caller}-00f067aa0ba902b7-01").parse().unwrap());
            crate::continue_from_headers(&span, &headers);
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::warn!(parent: &span, "explicit parent");
            let own = tracing::info_span!("unsampled");
            own.in_scope(|| tracing::info!("new trace"));
        });
        let (text, lines) = buffer.lines();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        for line in &lines[1..3] {
            assert_eq!(line["trace_id"], caller, "{line}");
            assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
            assert_ne!(line["span_id"], "00f067aa0ba902b7", "the gateway's own span, not the caller's");
        }
        assert_eq!(lines[1]["fields"]["answer"], 42);
        assert_eq!(lines[1]["span"]["name"], "request");
        let fresh = lines[3]["trace_id"].as_str().unwrap();
        assert!(fresh.len() == 32 && fresh != caller && fresh != "0".repeat(32), "{}", lines[3]);
    }

    /// Spans only traces get (`TRACE_ONLY`, as every request's) are not formatted by the log layer, yet a line
    /// inside one names it and its trace; a line inside a span the logs see keeps that span's fields.
    #[test]
    fn lines_in_trace_only_spans_name_them() {
        let (buffer, dispatch) = json_logs(crate::in_logs);
        let caller = "4bf92f3577b34da6a3ce929d0e0e4736";
        tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!(target: crate::TRACE_ONLY, "request", route = tracing::field::Empty);
            span.record("route", "read");
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", format!("00-{caller}-00f067aa0ba902b7-01").parse().unwrap());
            crate::continue_from_headers(&span, &headers);
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::warn!(parent: &span, "explicit parent");
            let logged = tracing::info_span!("config_apply", revision = 7);
            logged.in_scope(|| tracing::info!("applied"));
        });
        let (text, lines) = buffer.lines();
        assert_eq!(lines.len(), 3, "{text}");
        for line in &lines[..2] {
            assert_eq!(line["span"], serde_json::json!({"name": "request"}), "no fields, only the name: {line}");
            assert_eq!(line["trace_id"], caller, "{line}");
            assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
        }
        assert_eq!(lines[0]["fields"]["answer"], 42);
        assert_eq!(lines[2]["span"]["name"], "config_apply", "{}", lines[2]);
        assert_eq!(lines[2]["span"]["revision"], 7, "{}", lines[2]);
    }
}
