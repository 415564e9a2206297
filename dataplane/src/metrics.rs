//! The data plane's Prometheus metrics, served as text on the admin port (`GET /metrics`).
//!
//! One [`Metrics`] per process, shared through an `Arc`; no global registry. Labels stay low-cardinality: route id,
//! a known HTTP method or `OTHER`, status class, upstream name, cache name. Never paths, tenants or client input.
//! The configuration gauges are computed at scrape time from [`ConfigState`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use fhirgw_telemetry::semconv::{self, Side};
use http::{Method, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::access_log::{AccessLog, Line};
use crate::body::{Body, BoxError};
use crate::state::{ConfigState, Source};

/// The `route` label of a request that matched no route (not ready, unknown path, SMART discovery).
pub const NO_ROUTE: &str = "_none";

/// Seconds; from a millisecond to the longest upstream timeouts.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamResultLabels {
    upstream: String,
    /// `2xx` … `5xx`, or `error` when no response came (connect failure, timeout).
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditSinkLabels {
    sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AbortLabels {
    route: String,
    reason: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    in_flight: Gauge,
    request_duration: HistogramFamily<RouteLabels>,
    response_bytes: Family<RouteLabels, Counter>,
    upstream_requests: Family<UpstreamResultLabels, Counter>,
    upstream_duration: HistogramFamily<UpstreamLabels>,
    cache_lookups: Family<CacheLabels, Counter>,
    config_acks: Counter,
    config_nacks: Counter,
    config_refusals: Counter,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_parked: Family<ListenerLabels, Gauge>,
    connections_refused: Family<ListenerReasonLabels, Counter>,
    connections_closed: Family<ListenerReasonLabels, Counter>,
    aborted: Family<AbortLabels, Counter>,
    body_reserved: Gauge,
    audit: AuditCounters,
    audit_gauges: Arc<std::sync::OnceLock<Arc<dyn AuditGauges>>>,
    /// Whether each finished request is also written to the access log (`--access-log`).
    access_log: AccessLog,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(state: Arc<ConfigState>) -> Arc<Self> {
        Self::with_access_log(state, AccessLog::default())
    }

    /// Metrics whose finished requests go to the access log as `access_log` says.
    pub fn with_access_log(state: Arc<ConfigState>, access_log: AccessLog) -> Arc<Self> {
        let mut registry = Registry::with_prefix("fhirgw_dp");
        let m = Metrics {
            requests: Family::default(),
            in_flight: Gauge::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            response_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            cache_lookups: Family::default(),
            config_acks: Counter::default(),
            config_nacks: Counter::default(),
            config_refusals: Counter::default(),
            connections_open: Family::default(),
            connections_parked: Family::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            aborted: Family::default(),
            body_reserved: Gauge::default(),
            audit: AuditCounters::default(),
            audit_gauges: Arc::default(),
            access_log,
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "FHIR requests answered, by route, method and status class (counted when the response head is sent)",
            m.requests.clone(),
        );
        registry.register("requests_in_flight", "FHIR requests whose response has not finished", m.in_flight.clone());
        registry.register(
            "request_duration_seconds",
            "FHIR request time, from arrival to the end of the response body, by route (`_none`: no route matched)",
            m.request_duration.clone(),
        );
        registry.register("response_bytes", "FHIR response body bytes sent, by route", m.response_bytes.clone());
        registry.register(
            "upstream_requests",
            "Requests sent to upstreams, by upstream and status class (`error`: no response)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream time to response head, by upstream",
            m.upstream_duration.clone(),
        );
        registry.register(
            "cache_lookups",
            "Cache lookups by cache (upstream_token, credential_file, jwks, verified_token) and result (hit, miss)",
            m.cache_lookups.clone(),
        );
        registry.register("config_acks", "Configuration responses accepted and ACKed", m.config_acks.clone());
        registry.register("config_nacks", "Configuration responses rejected and NACKed", m.config_nacks.clone());
        registry.register(
            "config_refusals",
            "Configuration responses refused because they came from another store or an older revision (NACKed too)",
            m.config_refusals.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open, by listener (fhir, admin)",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_parked",
            "Plaintext HTTP/1.1 keep-alive connections idle for a second or more, held as a bare socket without the HTTP parser's buffers, by listener (in connections_open too)",
            m.connections_parked.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted, by listener and reason (limit: at the connection cap with none to evict; accept_error: the accept call failed, e.g. out of file descriptors)",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the data plane closed, by listener and reason (first_request_timeout, idle, evicted: a connection that had sent no request made room for a new one at the cap)",
            m.connections_closed.clone(),
        );
        registry.register(
            "requests_aborted",
            "Responses cut off after their head was sent (also counted in requests_total by that head's status), by route and reason (upstream_error, upstream_idle, unverifiable, other)",
            m.aborted.clone(),
        );
        registry.register(
            "request_body_bytes_reserved",
            "Request body bytes reserved from the body budget right now (--body-budget-bytes)",
            m.body_reserved.clone(),
        );
        m.audit.register(&mut registry);
        registry.register_collector(Box::new(AuditCollector(m.audit_gauges.clone())));
        registry.register_collector(Box::new(ConfigCollector(state)));
        Arc::new(Metrics { registry, ..m })
    }

    /// The exposition text: Prometheus 0.0.4, or OpenMetrics when `openmetrics`. Returns (content type, body).
    pub fn encode(&self, openmetrics: bool) -> (&'static str, String) {
        fhirgw_telemetry::metrics::encode(&self.registry, openmetrics)
    }

    /// Counters for one named cache.
    pub fn cache(&self, cache: &'static str) -> CacheCounter {
        let counter = |result| self.cache_lookups.get_or_create_owned(&CacheLabels { cache, result });
        CacheCounter { hits: counter("hit"), misses: counter("miss") }
    }

    pub fn config_replied(&self, ack: bool) {
        if ack {
            self.config_acks.inc()
        } else {
            self.config_nacks.inc()
        };
    }

    /// The connection counters of one listener.
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let refused = |reason| self.connections_refused.get_or_create_owned(&ListenerReasonLabels { listener, reason });
        let closed = |reason| self.connections_closed.get_or_create_owned(&ListenerReasonLabels { listener, reason });
        ListenerMetrics {
            open: self.connections_open.get_or_create_owned(&ListenerLabels { listener }),
            parked: self.connections_parked.get_or_create_owned(&ListenerLabels { listener }),
            refused_limit: refused("limit"),
            refused_accept_error: refused("accept_error"),
            closed_first_request_timeout: closed("first_request_timeout"),
            closed_idle: closed("idle"),
            closed_evicted: closed("evicted"),
            closed_tls_handshake: closed("tls_handshake"),
        }
    }

    /// The gauge the body budget reports into.
    pub fn body_reserved(&self) -> Gauge {
        self.body_reserved.clone()
    }

    /// The audit counters (see `audit`).
    pub fn audit(&self) -> AuditCounters {
        self.audit.clone()
    }

    /// Where the audit gauges are read at each scrape (set once, when the spool is open).
    pub fn set_audit_gauges(&self, gauges: Arc<dyn AuditGauges>) {
        let _ = self.audit_gauges.set(gauges);
    }

    pub fn config_refused(&self) {
        self.config_refusals.inc();
    }

    /// A request to `upstream` finished its head (`Some(status)`) or failed (`None`) after `elapsed`.
    pub fn upstream(&self, upstream: &str, status: Option<StatusCode>, elapsed: std::time::Duration) {
        let status_class = status.map_or("error", status_class);
        self.upstream_requests
            .get_or_create(&UpstreamResultLabels { upstream: upstream.to_owned(), status_class })
            .inc();
        self.upstream_duration
            .get_or_create(&UpstreamLabels { upstream: upstream.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// Marks a request in flight until the returned guard is finished or dropped.
    pub fn request_started(self: &Arc<Self>, method: &Method) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
            started: Instant::now(),
            method: method.clone(),
            route: None,
            bytes: 0,
            span: None,
            access: Access::default(),
        }
    }
}

pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The method as a label: the standard ones by name, anything a client invents as `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Connection counters of one listener (see [`Metrics::listener`]).
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    pub open: Gauge,
    /// Plaintext HTTP/1.1 keep-alive connections held without hyper's state (see `protocol`).
    pub parked: Gauge,
    pub refused_limit: Counter,
    pub refused_accept_error: Counter,
    pub closed_first_request_timeout: Counter,
    pub closed_idle: Counter,
    pub closed_evicted: Counter,
    pub closed_tls_handshake: Counter,
}

/// Hits and misses of one cache.
#[derive(Clone, Debug, Default)]
pub struct CacheCounter {
    hits: Counter,
    misses: Counter,
}

impl CacheCounter {
    pub fn hit(&self) {
        self.hits.inc();
    }

    pub fn miss(&self) {
        self.misses.inc();
    }

    pub fn record(&self, hit: bool) {
        if hit { self.hit() } else { self.miss() }
    }
}

/// Why a response body was cut off after its head was sent: the reason label of `requests_aborted_total`. Bodies
/// the gateway streams wrap their errors in it; any other error counts as `upstream_error` (a hyper error) or
/// `other`.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {source}")]
pub struct Aborted {
    pub reason: &'static str,
    #[source]
    pub source: BoxError,
}

impl Aborted {
    pub fn boxed(reason: &'static str, source: impl Into<BoxError>) -> BoxError {
        Box::new(Aborted { reason, source: source.into() })
    }
}

fn abort_reason(error: &BoxError) -> &'static str {
    if let Some(aborted) = error.downcast_ref::<Aborted>() {
        aborted.reason
    } else if error.downcast_ref::<hyper::Error>().is_some() {
        "upstream_error"
    } else {
        "other"
    }
}

/// One request in flight. [`InFlight::finish`] counts the response and hands its body back wrapped, so the body's
/// bytes and the request's whole duration are recorded, and its access line written, when the body ends or is
/// dropped; a request dropped before its response head (the client went away) is recorded then too.
pub struct InFlight {
    metrics: Arc<Metrics>,
    started: Instant,
    method: Method,
    route: Option<String>,
    bytes: u64,
    /// The request's span and trace id, for a response aborted mid-body (see [`InFlight::traced`]).
    span: Option<(tracing::Span, Option<String>)>,
    access: Access,
}

/// What the access line needs beyond the metrics.
#[derive(Debug, Default)]
struct Access {
    /// The response head's status, once [`InFlight::finish`] ran.
    status: Option<StatusCode>,
    tenant: Option<String>,
    client_id: Option<String>,
    reason: Option<&'static str>,
    aborted: Option<&'static str>,
    /// The body was read to its end (or has none).
    ended: bool,
}

impl InFlight {
    /// Ties the request's span to the response: [`InFlight::finish`] records the HTTP conventions' attributes on it
    /// (method, route, status; a 5xx fails it), and an abort after the head fails it with the abort's reason as
    /// `error.type` and is logged with the trace id.
    pub fn traced(mut self, span: tracing::Span, trace_id: Option<String>) -> Self {
        self.span = Some((span, trace_id));
        self
    }

    /// Who asked (tenant and client id from the token) and why the gateway refused, if it did: for the access line.
    pub fn caller(mut self, tenant: Option<String>, client_id: Option<String>, reason: Option<&'static str>) -> Self {
        self.access.tenant = tenant;
        self.access.client_id = client_id;
        self.access.reason = reason;
        self
    }

    fn aborted(&mut self, error: &BoxError) {
        let reason = abort_reason(error);
        self.access.aborted = Some(reason);
        let route = self.route.clone().unwrap_or_else(|| NO_ROUTE.to_owned());
        self.metrics.aborted.get_or_create(&AbortLabels { route: route.clone(), reason }).inc();
        match &self.span {
            Some((span, trace_id)) => {
                semconv::error(span, reason);
                let trace_id = trace_id.as_deref().unwrap_or("");
                tracing::warn!(parent: span, %route, reason, %trace_id, error = %error, bytes_sent = self.bytes, "response aborted after its head was sent");
            }
            None => tracing::warn!(%route, reason, error = %error, "response aborted after its head was sent"),
        }
    }

    pub fn finish(mut self, route: Option<String>, response: Response<Body>) -> Response<Body> {
        if let Some((span, _)) = &self.span {
            semconv::method(span, &self.method);
            if let Some(route) = &route {
                semconv::route(span, route);
            }
            semconv::status(span, Side::Server, response.status().as_u16());
        }
        let route = route.unwrap_or_else(|| NO_ROUTE.to_owned());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                method: method_label(&self.method),
                status_class: status_class(response.status()),
            })
            .inc();
        self.route = Some(route);
        let status = response.status();
        self.access.status = Some(status);
        // Bodies hyper never reads to the end: none at all, or none by definition of the status or method.
        self.access.ended = http_body::Body::is_end_stream(response.body())
            || self.method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        response.map(|inner| Counted { inner, guard: self }.boxed_unsync())
    }

    /// The access line, once the request is over.
    fn log(&self, duration: std::time::Duration) {
        let Access { status, tenant, client_id, reason, aborted, ended } = &self.access;
        let (reason, aborted) = match status {
            None => (Some("client_closed"), *aborted),
            Some(_) if !ended && aborted.is_none() => (*reason, Some("client_closed")),
            Some(_) => (*reason, *aborted),
        };
        self.metrics.access_log.write(&Line {
            method: method_label(&self.method),
            route: self.route.as_deref().unwrap_or(NO_ROUTE),
            status: status.map_or(0, |s| s.as_u16()),
            duration,
            bytes: self.bytes,
            tenant: tenant.as_deref(),
            client_id: client_id.as_deref(),
            trace_id: self.span.as_ref().and_then(|(_, id)| id.as_deref()),
            reason,
            aborted,
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        let duration = self.started.elapsed();
        let labels = RouteLabels { route: self.route.clone().unwrap_or_else(|| NO_ROUTE.to_owned()) };
        self.metrics.request_duration.get_or_create(&labels).observe(duration.as_secs_f64());
        if self.bytes > 0 {
            self.metrics.response_bytes.get_or_create(&labels).inc_by(self.bytes);
        }
        self.log(duration);
    }
}

/// A response body that counts what passes through it.
struct Counted {
    inner: Body,
    guard: InFlight,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.guard.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.guard.access.ended = true;
                }
            }
            Poll::Ready(Some(Err(error))) => self.guard.aborted(error),
            Poll::Ready(None) => self.guard.access.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The audit trail's counters (`fhirgw_dp_audit_*`): events made durable in the spool, shipped and retried per sink,
/// dropped per reason, and requests refused (503) in strict mode because their event could not be made durable.
#[derive(Clone, Debug, Default)]
pub struct AuditCounters {
    written: Counter,
    shipped: Family<AuditSinkLabels, Counter>,
    retried: Family<AuditSinkLabels, Counter>,
    dropped: Family<AuditReasonLabels, Counter>,
    refused: Counter,
}

impl AuditCounters {
    fn register(&self, registry: &mut Registry) {
        registry.register("audit_events_written", "Audit events made durable in the spool", self.written.clone());
        registry.register(
            "audit_events_shipped",
            "Audit events delivered, by sink (fhir, ndjson)",
            self.shipped.clone(),
        );
        registry.register(
            "audit_events_retried",
            "Audit events whose delivery failed and will be tried again, by sink",
            self.retried.clone(),
        );
        registry.register(
            "audit_events_dropped",
            "Audit events lost, by reason (queue_full, spool_full, spool_error: relaxed mode; rejected: refused by a sink for good, kept in the spool directory's rejected.ndjson; too_large)",
            self.dropped.clone(),
        );
        registry.register(
            "audit_strict_refusals",
            "Requests answered 503 in strict mode because their audit event could not be made durable",
            self.refused.clone(),
        );
    }

    pub fn written(&self, events: u64) {
        self.written.inc_by(events);
    }

    pub fn shipped(&self, sink: &'static str, events: u64) {
        self.shipped.get_or_create(&AuditSinkLabels { sink }).inc_by(events);
    }

    pub fn retried(&self, sink: &'static str, events: u64) {
        self.retried.get_or_create(&AuditSinkLabels { sink }).inc_by(events);
    }

    pub fn dropped(&self, reason: &'static str, events: u64) {
        self.dropped.get_or_create(&AuditReasonLabels { reason }).inc_by(events);
    }

    pub fn refused(&self) {
        self.refused.inc();
    }
}

/// What the audit spool reports at scrape time.
pub trait AuditGauges: Send + Sync {
    /// Bytes in spool segments.
    fn spool_bytes(&self) -> u64;
    /// The spool's size limit.
    fn spool_capacity(&self) -> u64;
    /// Age of the oldest event some sink has not received (zero when every sink is caught up).
    fn oldest_unshipped(&self) -> std::time::Duration;
}

struct AuditCollector(Arc<std::sync::OnceLock<Arc<dyn AuditGauges>>>);

impl std::fmt::Debug for AuditCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditCollector")
    }
}

impl Collector for AuditCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(gauges) = self.0.get() else { return Ok(()) };
        let bytes = ConstGauge::new(i64::try_from(gauges.spool_bytes()).unwrap_or(i64::MAX));
        bytes.encode(encoder.encode_descriptor(
            "audit_spool_bytes",
            "Bytes in the audit spool's segment files (events not yet delivered to every sink, and the segment being written)",
            None,
            MetricType::Gauge,
        )?)?;
        let capacity = ConstGauge::new(i64::try_from(gauges.spool_capacity()).unwrap_or(i64::MAX));
        capacity.encode(encoder.encode_descriptor(
            "audit_spool_capacity_bytes",
            "The audit spool's size limit (--audit-spool-max-bytes)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(gauges.oldest_unshipped().as_secs_f64()).encode(encoder.encode_descriptor(
            "audit_oldest_unshipped_seconds",
            "Age of the oldest audit event not yet delivered to every sink (0 when all are delivered)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// The configuration gauges, read from [`ConfigState`] at each scrape.
struct ConfigCollector(Arc<ConfigState>);

impl std::fmt::Debug for ConfigCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigCollector")
    }
}

impl Collector for ConfigCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let refusing = ConstGauge::new(i64::from(self.0.refusing().is_some()));
        refusing.encode(encoder.encode_descriptor(
            "config_refusing",
            "1 while the control plane's configuration is refused (another store, an older revision): alert on it.",
            None,
            MetricType::Gauge,
        )?)?;
        let loaded = self.0.load();
        let ready = ConstGauge::new(i64::from(loaded.is_some()));
        ready.encode(encoder.encode_descriptor(
            "config_loaded",
            "1 once a configuration is loaded (ready), else 0.",
            None,
            MetricType::Gauge,
        )?)?;
        let Some(snapshot) = loaded else {
            return Ok(());
        };
        let revision = ConstGauge::new(i64::try_from(snapshot.system_version).unwrap_or(i64::MAX));
        revision.encode(encoder.encode_descriptor(
            "config_revision",
            "Control plane store revision of the configuration served.",
            None,
            MetricType::Gauge,
        )?)?;
        let source = match self.0.applied().map(|a| a.source) {
            Some(Source::Disk) => "disk",
            _ => "control_plane",
        };
        let info =
            Info::new(vec![("version".to_owned(), snapshot.digest.clone()), ("source".to_owned(), source.to_owned())]);
        info.encode(encoder.encode_descriptor(
            "config",
            "The configuration version (content digest) served and where it came from.",
            None,
            MetricType::Info,
        )?)?;
        let now = SystemTime::now();
        if let Some(age) = self.0.confirmation_age(now) {
            ConstGauge::new(age.as_secs_f64()).encode(encoder.encode_descriptor(
                "config_seconds_since_confirmed",
                "Seconds since the control plane last confirmed the configuration (a push or a heartbeat).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(self.0.grant_ttl().as_secs_f64()).encode(encoder.encode_descriptor(
            "grant_ttl_seconds",
            "How long grants are trusted without confirmation from the control plane (--grant-ttl-secs).",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(self.0.grants_stale(now))).encode(encoder.encode_descriptor(
            "grants_stale",
            "1 while grants are past the grant TTL: requests that need grants get 503 and /readyz fails. Alert on it.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let cases = [
            (Method::GET, "GET"),
            (Method::DELETE, "DELETE"),
            (Method::from_bytes(b"BREW").unwrap_or(Method::GET), "OTHER"),
            (Method::CONNECT, "OTHER"),
        ];
        for (method, want) in cases {
            assert_eq!(method_label(&method), want, "{method}");
        }
        let classes =
            [(100, "1xx"), (200, "2xx"), (204, "2xx"), (304, "3xx"), (404, "4xx"), (503, "5xx"), (599, "5xx")];
        for (code, want) in classes {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(status_class(status), want, "{code}");
        }
    }

    #[tokio::test]
    async fn aborted_bodies_are_counted_by_reason() {
        let metrics = Metrics::new(ConfigState::new());
        let cases: Vec<(BoxError, &str)> = vec![
            (Aborted::boxed("upstream_idle", "idle"), "upstream_idle"),
            (Aborted::boxed("unverifiable", "bad entry"), "unverifiable"),
            ("something else".into(), "other"),
        ];
        for (error, reason) in cases {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(Bytes::from_static(b"{"))), Err(error)];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
            let response = metrics.request_started(&Method::GET).finish(Some("search".into()), Response::new(body));
            assert!(response.into_body().collect().await.is_err());
            let (_, text) = metrics.encode(false);
            let line = format!("fhirgw_dp_requests_aborted_total{{route=\"search\",reason=\"{reason}\"}} 1");
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn exposition_names() {
        let metrics = Metrics::new(ConfigState::new());
        let guard = metrics.request_started(&Method::GET);
        drop(guard.finish(Some("instance".into()), Response::new(Body::default())));
        metrics.cache("jwks").hit();
        metrics.config_replied(false);
        let (content_type, text) = metrics.encode(false);
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        for line in [
            "fhirgw_dp_requests_total{route=\"instance\",method=\"GET\",status_class=\"2xx\"} 1",
            "fhirgw_dp_requests_in_flight 0",
            "fhirgw_dp_request_duration_seconds_count{route=\"instance\"} 1",
            "fhirgw_dp_cache_lookups_total{cache=\"jwks\",result=\"hit\"} 1",
            "fhirgw_dp_cache_lookups_total{cache=\"jwks\",result=\"miss\"} 0",
            "fhirgw_dp_config_nacks_total 1",
            "fhirgw_dp_config_loaded 0",
            "fhirgw_dp_config_refusing 0",
            "fhirgw_dp_config_refusals_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        let (content_type, text) = metrics.encode(true);
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn request_durations_are_per_route() {
        let metrics = Metrics::new(ConfigState::new());
        for route in [Some("instance"), Some("search"), Some("search"), None] {
            let guard = metrics.request_started(&Method::GET);
            drop(guard.finish(route.map(str::to_owned), Response::new(Body::default())));
        }
        // A request whose response never got a head (the client went away) still counts, under no route.
        drop(metrics.request_started(&Method::GET));
        let (_, text) = metrics.encode(false);
        for line in [
            "fhirgw_dp_request_duration_seconds_count{route=\"instance\"} 1",
            "fhirgw_dp_request_duration_seconds_count{route=\"search\"} 2",
            "fhirgw_dp_request_duration_seconds_count{route=\"_none\"} 2",
            "fhirgw_dp_request_duration_seconds_bucket{route=\"search\",le=\"+Inf\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }
}
