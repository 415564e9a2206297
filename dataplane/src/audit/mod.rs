//! The audit trail: every FHIR interaction through the data plane recorded as an IHE BALP `AuditEvent`, durably.
//!
//! ```text
//! Proxy::handle ─ begin: a Trail per request ─┐
//!   pipeline: caller, route, interaction ───▶ │ Trail (trail.rs): what the request is (describe.rs), its plan's
//!   Exec: the final Step, verified answers ─▶ │ upstream call or refusal, what was verified, then the events
//!   admit: strict mode, room in the spool? ───┤   (event.rs) once the outcome is known
//!   finish: events ─▶ Appender (writer.rs): one thread, group commit ─▶ Spool (spool.rs): segments, CRCs
//!                        strict: the response waits for the fsync          │
//!                        relaxed: queued, dropped when full (counted)      ▼
//!                                                   Shipper per sink (ship.rs): FHIR `PUT AuditEvent/<id>`
//!                                                   batches, NDJSON; cursors; backoff; at least once
//! ```
//!
//! What is recorded is decided per request from the tenant's and the route's `AuditPolicy` (pushed by the control
//! plane); where events go is the data plane's own configuration (`--audit-*` flags): the spool lives on its disk,
//! must drain when the control plane is away, and the audit store is not something an operator of the admin API
//! should be able to redirect.

pub mod describe;
pub mod event;
pub mod ship;
pub mod sink;
pub mod spool;
mod trail;
pub mod writer;

pub use trail::Trail;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fhirgw_config::audit::AuditMode;
use http::{HeaderMap, Request, StatusCode};
use rand::Rng;
use tokio::sync::watch;

use self::ship::{Backoff, Shipper, SinkConfig};
use self::spool::{Limits, Spool, SpoolError};
use self::writer::Appender;
use crate::limits::Throttled;
use crate::metrics::{AuditCounters, AuditGauges, Metrics};
use crate::proxy::PublicConfig;
use crate::upstream::UpstreamClient;

/// Patients recorded for one interaction at most (BALP: one event per patient).
pub const MAX_PATIENTS: usize = 20;
/// How long a strict request waits for its event to be durable before it is answered 503.
const STRICT_WAIT: Duration = Duration::from_secs(10);
/// After a failed spool write, strict requests are refused at once for this long (then tried again).
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// The data plane's audit settings (its `--audit-*` flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The spool directory; `None`: no spool, so strict tenants get 503 and relaxed events are dropped (counted).
    pub dir: Option<PathBuf>,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// Relaxed events queued for the writer, at most.
    pub relaxed_queue: usize,
    /// How long a group commit waits for strict events already admitted (see `writer`); zero: not at all.
    pub commit_delay: Duration,
    /// How refused requests without a caller (401, a malformed request) are recorded.
    pub unauthenticated: AuditMode,
    pub node: String,
    pub sinks: Vec<SinkConfig>,
    pub backoff: Backoff,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("starting the audit writer: {0}")]
    Thread(std::io::Error),
}

/// A request's events, framed as spool records in one buffer as they are written.
pub struct Events {
    at_ms: u64,
    records: Vec<u8>,
    count: u64,
    /// Whether one of them (even one too large to record) is to be recorded in strict mode.
    strict: bool,
    too_large: u64,
}

impl Events {
    fn new(at_ms: u64) -> Self {
        Events { at_ms, records: Vec::new(), count: 0, strict: false, too_large: 0 }
    }

    /// One more event, in `mode`, whose JSON `write` appends.
    pub fn push(&mut self, mode: AuditMode, write: impl FnOnce(&mut Vec<u8>)) {
        self.strict |= mode == AuditMode::Strict;
        if self.records.capacity() == 0 {
            // An event is about 2.5 KB; most requests record one.
            self.records.reserve(3072);
        }
        match spool::frame_with(&mut self.records, self.at_ms, write) {
            Ok(()) => self.count += 1,
            Err(_) => self.too_large += 1,
        }
    }
}

/// The request could not be recorded as its strict mode requires.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit event cannot be made durable")]
pub struct Unrecorded;

struct Running {
    spool: Arc<Spool>,
    appender: Arc<Appender>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    shippers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    sinks: usize,
}

pub struct Auditor {
    running: Option<Running>,
    unauthenticated: AuditMode,
    node: String,
    counters: AuditCounters,
    drops: Throttled,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").field("spooled", &self.running.is_some()).finish_non_exhaustive()
    }
}

/// A fresh AuditEvent id (a random UUID): assigned once, so every delivery of the event carries the same one.
pub fn new_id() -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::rng().random();
    // Version 4, variant 1 (RFC 9562).
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = DIGITS[usize::from(byte >> 4)];
        out[at + 1] = DIGITS[usize::from(byte & 0xf)];
        at += 2;
    }
    // Hex digits and dashes only.
    String::from_utf8_lossy(&out).into_owned()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Auditor {
    /// Opens the spool (recovering it), starts the writer thread and one shipper per sink (which begin with what
    /// earlier runs left unshipped). Call from inside the Tokio runtime.
    pub fn start(
        settings: Settings,
        metrics: &Metrics,
        upstreams: Arc<UpstreamClient>,
    ) -> Result<Arc<Auditor>, AuditError> {
        let counters = metrics.audit();
        let Some(dir) = &settings.dir else {
            return Ok(Arc::new(Auditor {
                running: None,
                unauthenticated: AuditMode::Off,
                node: settings.node,
                counters,
                drops: Throttled::new(Duration::from_secs(10)),
            }));
        };
        let names: Vec<&str> = settings.sinks.iter().map(SinkConfig::name).collect();
        let limits = Limits { max_bytes: settings.max_bytes, segment_bytes: settings.segment_bytes };
        let (spool, segment) = Spool::open(dir, limits, &names)?;
        let spool = Arc::new(spool);
        let (appender, writer) =
            Appender::start(spool.clone(), segment, settings.relaxed_queue, settings.commit_delay, counters.clone())
                .map_err(AuditError::Thread)?;
        let (stop, _) = watch::channel(false);
        let mut shippers = Vec::new();
        for sink in settings.sinks.clone() {
            let shipper = Shipper {
                spool: spool.clone(),
                sink,
                upstreams: upstreams.clone(),
                backoff: settings.backoff,
                counters: counters.clone(),
            };
            shippers.push(tokio::spawn(shipper.run(stop.subscribe())));
        }
        metrics.set_audit_gauges(Arc::new(Gauges(spool.clone(), settings.sinks.len())));
        tracing::info!(dir = %dir.display(), sinks = ?names, spool_bytes = spool.bytes(), "audit spool open");
        if settings.sinks.is_empty() {
            tracing::warn!(
                "audit: no sink configured; events stay in the spool until one is (and strict tenants stop when it is full)"
            );
        }
        Ok(Arc::new(Auditor {
            running: Some(Running {
                spool,
                appender,
                writer: Mutex::new(Some(writer)),
                stop,
                shippers: Mutex::new(shippers),
                sinks: settings.sinks.len(),
            }),
            unauthenticated: settings.unauthenticated,
            node: settings.node,
            counters,
            drops: Throttled::new(Duration::from_secs(10)),
        }))
    }

    /// An auditor with no spool (tests, and data planes without `--audit-dir`).
    pub fn without_spool(metrics: &Metrics) -> Arc<Auditor> {
        Arc::new(Auditor {
            running: None,
            unauthenticated: AuditMode::Off,
            node: String::new(),
            counters: metrics.audit(),
            drops: Throttled::new(Duration::from_secs(10)),
        })
    }

    /// A request's trail, with what only the raw request tells: the caller's real address (through trusted proxies)
    /// and its request id.
    pub fn begin<B>(&self, request: &Request<B>, peer: SocketAddr, public: &PublicConfig) -> Trail {
        let spooled = self.running.is_some();
        let (client, id) = if spooled {
            let id = crate::proxy::request_id(request.headers()).and_then(|v| v.to_str().ok());
            (Some(public.client_ip(peer, request.headers())), id)
        } else {
            (None, None)
        };
        Trail::new(spooled, request.method(), request.uri(), client, id)
    }

    /// Before a request is carried out: in strict mode, refuses it (503) when its event could not be made durable
    /// (no spool, a spool without room, or one that just failed), so nothing happens that would go unrecorded.
    pub fn admit(&self, trail: &Trail) -> Result<(), Unrecorded> {
        // Only refusals are recorded under `unauthenticated`, and a request admitted here is not one (yet): a
        // caller-less request reaching this point (the CapabilityStatement) is strict only if its route says so.
        if trail.mode(AuditMode::Off) != AuditMode::Strict {
            return Ok(());
        }
        let ok = self.running.as_ref().is_some_and(|r| {
            let max = r.spool.limits().max_bytes;
            let headroom = (max / 16).min(1 << 20);
            let used = r.spool.bytes() + r.appender.queued_bytes() as u64;
            used + headroom <= max && !r.appender.failed_within(FAILURE_HOLD)
        });
        if ok {
            if let Some(running) = &self.running {
                trail.expect(running.appender.expect());
            }
            Ok(())
        } else {
            trail.refused_unrecordable();
            self.counters.refused();
            if let Some(n) = self.drops.hit() {
                tracing::warn!(
                    occurrences = n,
                    spooled = self.running.is_some(),
                    "audit: strict request refused (503): the spool has no room or cannot be written"
                );
            }
            Err(Unrecorded)
        }
    }

    /// Records the request's events now that its outcome is known (`error`: the failure in words). In strict mode
    /// this returns once they are durable, or `Err` (the caller answers 503 instead); in relaxed mode at once.
    pub async fn finish(
        &self,
        trail: &Trail,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&(dyn std::fmt::Display + Sync)>,
        trace_id: Option<String>,
    ) -> Result<(), Unrecorded> {
        let mut events = Events::new(now_ms());
        trail.events(status, headers, error, trace_id, &self.node, self.unauthenticated, &mut events);
        if events.too_large > 0 {
            tracing::error!(events = events.too_large, "audit: an event is too large to record");
            self.counters.dropped("too_large", events.too_large);
        }
        if events.count == 0 && !events.strict {
            return Ok(());
        }
        let Events { records, count, strict, .. } = events;
        let Some(running) = &self.running else {
            if strict {
                // Counted once: the admission check already refused it.
                return Err(Unrecorded);
            }
            self.dropped("no_spool", count);
            return Ok(());
        };
        if strict {
            let written = running.appender.strict(records, count, trail.take_expected());
            match tokio::time::timeout(STRICT_WAIT, written).await {
                Ok(Ok(())) => Ok(()),
                outcome => {
                    if !trail.was_refused_unrecordable() {
                        self.counters.refused();
                    }
                    tracing::warn!(reason = ?outcome, "audit: a strict request's event is not durable; answering 503");
                    Err(Unrecorded)
                }
            }
        } else {
            if let Err(reason) = running.appender.relaxed(records, count) {
                self.dropped(reason.reason(), count);
            }
            Ok(())
        }
    }

    fn dropped(&self, reason: &'static str, events: u64) {
        self.counters.dropped(reason, events);
        if let Some(n) = self.drops.hit() {
            tracing::warn!(reason, occurrences = n, "audit: relaxed events dropped");
        }
    }

    /// On shutdown, once no request is in flight: writes what is queued, then lets the shippers deliver until every
    /// sink has everything or `deadline` passes; what is left stays in the spool for the next start.
    pub async fn drain(&self, deadline: Instant) {
        let Some(running) = &self.running else { return };
        running.appender.close();
        let writer = running.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        let mut waited = false;
        while running.sinks > 0 && running.spool.oldest_cursor().is_some() && Instant::now() < deadline {
            waited = true;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = running.stop.send(true);
        let shippers: Vec<_> = running.shippers.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        for shipper in shippers {
            let _ = shipper.await;
        }
        let left = running.spool.oldest_cursor().is_some() && running.sinks > 0;
        if left {
            tracing::warn!(
                spool_bytes = running.spool.bytes(),
                "audit: drain window over; undelivered events stay in the spool and are shipped on the next start"
            );
        } else if waited {
            tracing::info!("audit: every event delivered");
        }
    }
}

/// The spool's gauges, read at scrape time.
struct Gauges(Arc<Spool>, usize);

impl AuditGauges for Gauges {
    fn spool_bytes(&self) -> u64 {
        self.0.bytes()
    }

    fn spool_capacity(&self) -> u64 {
        self.0.limits().max_bytes
    }

    fn oldest_unshipped(&self) -> Duration {
        let from = if self.1 == 0 { Some(self.0.first()) } else { self.0.oldest_cursor() };
        let oldest = from.and_then(|p| self.0.read(p, 1, 1).ok()).and_then(|r| r.first().map(|r| r.at_ms));
        oldest.map_or(Duration::ZERO, |at| Duration::from_millis(now_ms().saturating_sub(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuids() {
        let a = new_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(matches!(a.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'), "{a}");
        assert_ne!(a, new_id());
    }
}
