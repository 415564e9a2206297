//! The control plane's Prometheus metrics, served as text on its admin port (`GET /metrics`).
//!
//! One [`Metrics`] per process, shared through an `Arc`; no global registry. Per-data-plane series would grow with
//! the fleet, so the fleet is summarised (connected, out of sync, largest lag in revisions); `GetStatus` has the
//! detail. Gauges are computed at scrape time from the store and the stream registry.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::objects::ObjKind;
use crate::status;
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: &'static str,
    op: &'static str,
    /// `ok`, or the gRPC code of the refusal in snake case (`invalid_argument`, `failed_precondition`, …).
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pushes: Counter,
    acks: Counter,
    nacks: Counter,
    writes: Family<WriteLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(store: Arc<Store>, streams: Arc<status::Registry>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("fhirgw_cp");
        let (pushes, acks, nacks, writes) =
            (Counter::default(), Counter::default(), Counter::default(), Family::default());
        registry.register(
            "config_pushes",
            "Configuration responses sent to data planes (heartbeats included)",
            pushes.clone(),
        );
        registry.register("config_acks", "ACKs received from data planes", acks.clone());
        registry.register("config_nacks", "NACKs received from data planes", nacks.clone());
        registry.register(
            "admin_writes",
            "Operator writes by kind, operation (put, delete) and result",
            writes.clone(),
        );
        registry.register_collector(Box::new(Fleet { store, streams }));
        Arc::new(Metrics { registry, pushes, acks, nacks, writes })
    }

    pub fn pushed(&self) {
        self.pushes.inc();
    }

    pub fn replied(&self, ack: bool) {
        if ack {
            self.acks.inc()
        } else {
            self.nacks.inc()
        };
    }

    pub fn write(&self, kind: ObjKind, op: &'static str, result: Result<(), tonic::Code>) {
        let result = match result {
            Ok(()) => "ok",
            Err(code) => code_label(code),
        };
        self.writes.get_or_create(&WriteLabels { kind: kind.as_str(), op, result }).inc();
    }

    /// The exposition text: Prometheus 0.0.4, or OpenMetrics when `openmetrics`. Returns (content type, body).
    pub fn encode(&self, openmetrics: bool) -> (&'static str, String) {
        fhirgw_telemetry::metrics::encode(&self.registry, openmetrics)
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
        Unknown => "unknown",
    }
}

/// Store revision and the fleet summary, read at each scrape.
struct Fleet {
    store: Arc<Store>,
    streams: Arc<status::Registry>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fleet")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Gauge,
    )?)
}

impl Collector for Fleet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.store.state();
        let summary = self.streams.summary(&state);
        gauge(&mut encoder, "store_revision", "Store revision (one per write).", state.revision)?;
        gauge(
            &mut encoder,
            "store_available",
            "1 when the store answered this replica's last read or write, 0 while it cannot be reached (writes fail \
             UNAVAILABLE; config streams are served from memory).",
            u64::from(self.store.available()),
        )?;
        gauge(
            &mut encoder,
            "data_planes_connected",
            "Data planes with an open config stream.",
            summary.connected as u64,
        )?;
        gauge(
            &mut encoder,
            "data_planes_out_of_sync",
            "Connected data planes not holding the current configuration.",
            summary.out_of_sync as u64,
        )?;
        gauge(
            &mut encoder,
            "data_plane_max_lag_revisions",
            "Revisions between the store and the furthest-behind data plane (0 when all are in sync).",
            summary.max_lag_revisions,
        )
    }
}
