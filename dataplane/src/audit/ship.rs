//! Shipping: one task per sink reads the spool from its cursor, delivers a batch, and only then moves the cursor
//! (at least once: a crash between delivery and cursor means the batch is delivered again, which a FHIR sink absorbs
//! because every event keeps its id and is written with `PUT AuditEvent/<id>`). A failed delivery is retried with
//! exponential backoff (jittered, from `initial` to `max`) for as long as it takes; the spool holds the events
//! meanwhile. An event a sink refuses for good (a 4xx for that entry) is kept in `rejected.ndjson` in the spool
//! directory and counted, so one bad event cannot stop the trail.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgw_config::upstream::Upstream;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use rand::Rng;
use serde_json::Value;
use tokio::sync::watch;

use super::spool::{Position, Record, Spool};
use crate::limits::Throttled;
use crate::metrics::AuditCounters;
use crate::upstream::UpstreamClient;

/// Largest answer read from a FHIR sink.
const ANSWER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of events per delivery, at most (besides the count limit).
const BATCH_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Once caught up (the spool had less than a batch), a shipper waits this long before it delivers again.
/// While it delivers full batches, it stores its cursor at most this often.
const COMMIT_EVERY: Duration = LINGER;
const LINGER: Duration = Duration::from_millis(100);

/// Where events go.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// A FHIR server: batches of `PUT AuditEvent/<id>` with its own credential (an upstream definition built from
    /// the data plane's flags, so every upstream credential source works).
    Fhir { upstream: Arc<Upstream>, batch: usize },
    /// NDJSON lines on stdout (`None`) or appended to a file, for log pipelines.
    Ndjson { path: Option<PathBuf> },
}

impl SinkConfig {
    pub fn name(&self) -> &'static str {
        match self {
            SinkConfig::Fhir { .. } => "fhir",
            SinkConfig::Ndjson { .. } => "ndjson",
        }
    }
}

/// Retry delays.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Where a shipper is: delivered up to, and recorded as delivered (its cursor in the spool) up to.
struct Progress {
    delivered: Position,
    committed: Position,
    committed_at: Instant,
}

/// A delivery that failed as a whole (retried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

pub struct Shipper {
    pub spool: Arc<Spool>,
    pub sink: SinkConfig,
    pub upstreams: Arc<UpstreamClient>,
    pub backoff: Backoff,
    pub counters: AuditCounters,
}

impl Shipper {
    /// Ships until `stop` turns true (checked between deliveries and while waiting).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let name = self.sink.name();
        let Some(start) = self.spool.cursor(name) else { return };
        let mut progress = Progress { delivered: start, committed: start, committed_at: Instant::now() };
        self.ship(&mut stop, &mut progress).await;
        // Stopping: what was delivered is recorded as delivered (else it is delivered again on the next start).
        self.commit(&mut progress).await;
    }

    /// Stores the cursor where delivery has got to, if it moved; a failure only means those events are delivered
    /// again later (at least once).
    async fn commit(&self, progress: &mut Progress) {
        if progress.delivered == progress.committed {
            return;
        }
        let (name, to) = (self.sink.name(), progress.delivered);
        let spool = self.spool.clone();
        match tokio::task::spawn_blocking(move || spool.commit(name, to)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sink = name, error = %e, "audit: cannot store the sink's cursor"),
            Err(_) => {}
        }
        progress.committed = to;
        progress.committed_at = Instant::now();
    }

    async fn ship(&self, stop: &mut watch::Receiver<bool>, progress: &mut Progress) {
        let name = self.sink.name();
        let mut durable = self.spool.subscribe();
        let failures = Throttled::new(Duration::from_secs(10));
        let batch = match &self.sink {
            SinkConfig::Fhir { batch, .. } => (*batch).max(1),
            SinkConfig::Ndjson { .. } => 1000,
        };
        loop {
            let cursor = progress.delivered;
            if *stop.borrow() {
                return;
            }
            let spool = self.spool.clone();
            let read = tokio::task::spawn_blocking(move || spool.read(cursor, batch, BATCH_MAX_BYTES)).await;
            let records = match read {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => {
                    tracing::error!(sink = name, error = %e, "audit: cannot read the spool; retrying");
                    if sleep_or_stop(self.backoff.max, stop).await {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            };
            let Some(last) = records.last().map(|r| r.next) else {
                // Nothing more: what the last full batches delivered is recorded before waiting.
                self.commit(progress).await;
                tokio::select! {
                    changed = durable.changed() => if changed.is_err() { return },
                    changed = stop.changed() => if changed.is_err() { return },
                }
                // Caught up: let a batch gather rather than deliver (and sync a cursor) per write.
                if sleep_or_stop(LINGER, stop).await {
                    return;
                }
                continue;
            };
            let mut delay = self.backoff.initial;
            let rejected = loop {
                match self.deliver(&records).await {
                    Ok(rejected) => break rejected,
                    Err(e) => {
                        self.counters.retried(name, records.len() as u64);
                        if let Some(n) = failures.hit() {
                            tracing::warn!(sink = name, error = %e, events = records.len(), failures = n, retry_in_ms = delay.as_millis() as u64, "audit: delivery failed; the events stay in the spool and are retried");
                        }
                        if sleep_or_stop(jitter(delay), stop).await {
                            return;
                        }
                        delay = (delay * 2).min(self.backoff.max);
                    }
                }
            };
            if !rejected.is_empty() {
                self.reject(&records, &rejected).await;
            }
            progress.delivered = last;
            self.counters.shipped(name, (records.len() - rejected.len()) as u64);
            // A short batch means the shipper has caught up with a steady trickle: without a pause it would deliver
            // (and sync its cursor: two fsyncs and a directory sync) every few milliseconds, a few events at a time.
            let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
            let caught_up = records.len() < batch && bytes < BATCH_MAX_BYTES;
            // Full batches one after another (a backlog, or more events a second than a batch holds) store the
            // cursor at most every COMMIT_EVERY: per batch of 100 it would be hundreds of fsyncs a second. A crash
            // meanwhile delivers those batches again, which at least once allows.
            if caught_up || progress.committed_at.elapsed() >= COMMIT_EVERY {
                self.commit(progress).await;
            }
            if caught_up && sleep_or_stop(LINGER, stop).await {
                return;
            }
        }
    }

    /// Delivers `records`; returns the indices the sink refused for good.
    async fn deliver(&self, records: &[Record]) -> Result<Vec<usize>, Failed> {
        match &self.sink {
            SinkConfig::Ndjson { path } => {
                let mut lines = Vec::with_capacity(records.iter().map(|r| r.payload.len() + 1).sum());
                for record in records {
                    lines.extend_from_slice(&record.payload);
                    lines.push(b'\n');
                }
                let path = path.clone();
                tokio::task::spawn_blocking(move || write_lines(path.as_deref(), &lines))
                    .await
                    .map_err(|e| Failed(e.to_string()))?
                    .map_err(|e| Failed(e.to_string()))?;
                Ok(Vec::new())
            }
            SinkConfig::Fhir { upstream, .. } => self.deliver_fhir(upstream, records).await,
        }
    }

    /// One `batch` Bundle of `PUT AuditEvent/<id>` entries; each entry's answer is read.
    async fn deliver_fhir(&self, upstream: &Arc<Upstream>, records: &[Record]) -> Result<Vec<usize>, Failed> {
        let mut body = Vec::with_capacity(records.iter().map(|r| r.payload.len() + 96).sum::<usize>() + 64);
        body.extend_from_slice(br#"{"resourceType":"Bundle","type":"batch","entry":["#);
        for (i, record) in records.iter().enumerate() {
            let id = event_id(&record.payload).ok_or_else(|| Failed("an event in the spool has no id".into()))?;
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"request":{"method":"PUT","url":"AuditEvent/"#);
            body.extend_from_slice(id.as_bytes());
            body.extend_from_slice(br#""},"resource":"#);
            body.extend_from_slice(&record.payload);
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        let base = if upstream.base_path.is_empty() { "/" } else { upstream.base_path.as_str() };
        let uri = Uri::try_from(format!("{}{base}", upstream.origin)).map_err(|e| Failed(e.to_string()))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .header(header::ACCEPT, "application/fhir+json")
            .header(header::ACCEPT_ENCODING, "identity")
            .body(crate::body::full(Bytes::from(body)))
            .map_err(|e| Failed(e.to_string()))?;
        request.headers_mut().remove(header::AUTHORIZATION);
        let response = self.upstreams.send(upstream, request).await.map_err(|e| Failed(e.to_string()))?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), ANSWER_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| Failed(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(Failed(format!("the audit server answered {status}")));
        }
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|e| Failed(format!("the answer is not JSON: {e}")))?;
        let entries = answer.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if entries.len() != records.len() {
            return Err(Failed(format!("{} answers for {} events", entries.len(), records.len())));
        }
        let mut rejected = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let code: u16 = entry
                .get("response")
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str)
                .and_then(|s| s.get(..3))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            match code {
                200..=299 => {}
                // Refused for good: this event can never be written there.
                400..=499 if code != 408 && code != 429 => rejected.push(i),
                _ => return Err(Failed(format!("event {i} of the batch answered {code}"))),
            }
        }
        Ok(rejected)
    }

    /// Keeps events a sink refused for good in `rejected.ndjson`, so none is silently lost.
    async fn reject(&self, records: &[Record], rejected: &[usize]) {
        let mut lines = Vec::new();
        for i in rejected {
            if let Some(record) = records.get(*i) {
                lines.extend_from_slice(&record.payload);
                lines.push(b'\n');
                tracing::error!(
                    sink = self.sink.name(),
                    id = event_id(&record.payload).unwrap_or_default(),
                    "audit: the sink refused an event; kept in rejected.ndjson"
                );
            }
        }
        let path = self.spool.dir().join("rejected.ndjson");
        let written = tokio::task::spawn_blocking(move || write_lines(Some(&path), &lines)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(sink = self.sink.name(), "audit: cannot keep refused events in rejected.ndjson");
        }
        self.counters.dropped("rejected", rejected.len() as u64);
    }
}

/// Appends `lines` to `path` durably, or writes them to stdout.
fn write_lines(path: Option<&std::path::Path>, lines: &[u8]) -> std::io::Result<()> {
    match path {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            file.write_all(lines)?;
            file.sync_data()
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(lines)?;
            out.flush()
        }
    }
}

/// The `id` of an event as spooled.
pub fn event_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(payload).ok().map(|i| i.id)
}

fn jitter(delay: Duration) -> Duration {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// Sleeps, or returns true at once when `stop` turns true.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let slept = tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    !slept || *stop.borrow()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::spool::{Limits, frame};
    use crate::metrics::Metrics;
    use crate::state::ConfigState;

    /// Events arriving faster than a delivery takes (as under steady load) reach the sink in a few deliveries, each
    /// committed once; before, a shipper that found a few events at each read delivered and committed its cursor
    /// (three fsyncs) again at once, hundreds of times a second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_steady_trickle_is_delivered_in_batches() {
        let (commits, produced) = ship_while_producing(1).await;
        // 0.6 s at one delivery per 100 ms linger, plus the first: well under 20.
        assert!(commits <= 12, "{commits} cursor commits for {produced} events over 0.6 s");
    }

    /// More events than a batch holds per linger (full batches one after another): the cursor is stored at most
    /// every 100 ms, not after each batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_batches_store_the_cursor_at_most_every_100_ms() {
        let (commits, produced) = ship_while_producing(100).await;
        assert!(produced > 20_000, "{produced} events: not enough for full batches");
        assert!(commits <= 12, "{commits} cursor commits for {produced} events over 0.6 s");
    }

    /// Runs an NDJSON shipper while a thread appends `per_tick` events every ~0.1 ms for 0.6 s; checks that every
    /// event arrived once, in order; returns how often the cursor was seen to move, and how many events there were.
    async fn ship_while_producing(per_tick: usize) -> (usize, usize) {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { max_bytes: 256 << 20, segment_bytes: 16 << 20 };
        let (spool, mut writer) = Spool::open(dir.path(), limits, &["ndjson"]).unwrap();
        let spool = Arc::new(spool);
        let out = dir.path().join("sink.ndjson");
        let shipper = Shipper {
            spool: spool.clone(),
            sink: SinkConfig::Ndjson { path: Some(out.clone()) },
            upstreams: UpstreamClient::new(Metrics::new(ConfigState::new())),
            backoff: Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(100) },
            counters: AuditCounters::default(),
        };
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(shipper.run(stopped));
        // The producer, on a thread of its own (as the writer thread is).
        let producer = std::thread::spawn({
            let spool = spool.clone();
            move || {
                let until = std::time::Instant::now() + Duration::from_millis(600);
                let mut n = 0;
                while std::time::Instant::now() < until {
                    let mut records = Vec::new();
                    for _ in 0..per_tick {
                        frame(format!("{{\"id\":\"e{n}\"}}").as_bytes(), 1, &mut records).unwrap();
                        n += 1;
                    }
                    spool.append(&mut writer, &records, false).unwrap();
                    std::thread::sleep(Duration::from_micros(100));
                }
                n
            }
        });
        let mut commits = 0;
        let mut last = spool.cursor("ndjson").unwrap();
        while !producer.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = spool.cursor("ndjson").unwrap();
            if now != last {
                commits += 1;
                last = now;
            }
        }
        let produced = producer.join().unwrap();
        let end = spool.end();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spool.cursor("ndjson") != Some(end) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap();
        let lines = std::fs::read_to_string(&out).unwrap();
        let want: String = (0..produced).map(|n| format!("{{\"id\":\"e{n}\"}}\n")).collect();
        assert!(lines == want, "every event delivered once, in order ({} lines for {produced})", lines.lines().count());
        (commits, produced)
    }
}
