//! The one writer of the spool: a thread of its own (writes and fsyncs block) fed by a queue. Each turn it takes
//! everything queued and appends it with one write.
//!
//! Strict events carry a channel on which they learn that they are durable: a turn with a strict event ends with one
//! `fdatasync` for everything written so far (group commit: under load many events share one sync, and a request
//! waits for at most the sync in progress plus its own). With a commit delay, a turn that finds strict events also
//! waits, at most that long, for the strict requests already admitted but not yet queued ([`Appender::expect`]), as
//! PostgreSQL's `commit_delay` does with `commit_siblings`: under concurrent strict traffic a sync then carries
//! several times more events (each sync is a disk flush: most of strict mode's cost), at the price of that much
//! latency; a request alone never waits for it. Relaxed events are not waited for: the writer lets them
//! gather for `RELAXED_LINGER` (cut short by a strict event) and syncs them within `RELAXED_SYNC`, so relaxed
//! traffic costs a few writes and syncs per second rather than one per request. They are refused at the door when
//! the queue already holds `relaxed_capacity` of them (a drop, counted), so a slow disk never slows relaxed
//! traffic. Strict events are not bounded by count: each belongs to a request waiting for it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::spool::{Spool, SpoolError, Writer as SegmentWriter};
use crate::metrics::AuditCounters;

/// Why an event did not become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    #[error("the audit spool is full")]
    Full,
    #[error("the audit spool cannot be written")]
    Failed,
    #[error("the audit queue is full")]
    QueueFull,
    #[error("the audit writer has stopped")]
    Stopped,
}

impl NotDurable {
    /// The `reason` label of a drop.
    pub fn reason(self) -> &'static str {
        match self {
            NotDurable::Full => "spool_full",
            NotDurable::Failed => "spool_error",
            NotDurable::QueueFull => "queue_full",
            NotDurable::Stopped => "stopped",
        }
    }
}

struct Item {
    records: Vec<u8>,
    events: u64,
    done: Option<oneshot::Sender<Result<(), NotDurable>>>,
}

/// How long relaxed events may gather before they are written.
const RELAXED_LINGER: Duration = Duration::from_millis(5);
/// The writer's buffer is kept between turns up to this size.
const BUFFER_KEPT: usize = 4 << 20;
/// Written relaxed events are made durable at least this often (a strict event syncs them at once).
const RELAXED_SYNC: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    relaxed_events: usize,
    strict_items: usize,
    bytes: usize,
    closed: bool,
    /// Strict requests admitted whose events are not queued yet ([`Expected`]).
    expected: usize,
    /// While the writer waits out a commit delay: the queued strict items that end the wait early.
    delay_until: Option<usize>,
}

impl Queue {
    /// Whether queueing or giving up an expected event should wake the writer now: always, unless it is waiting out
    /// a commit delay that this does not end (waking it for every arrival would cost more than the delay saves).
    fn wakes_writer(&self) -> bool {
        self.delay_until.is_none_or(|until| self.strict_items >= until || self.expected == 0)
    }
}

/// The queue in front of the writer thread.
pub struct Appender {
    queue: Mutex<Queue>,
    wake: Condvar,
    relaxed_capacity: usize,
    /// How long a turn with strict events waits for the expected ones (zero: not at all).
    commit_delay: Duration,
    counters: AuditCounters,
    /// When a write last failed.
    failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender").field("relaxed_capacity", &self.relaxed_capacity).finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the writer thread. It ends once [`Appender::close`] is called and everything queued is written.
    pub fn start(
        spool: Arc<Spool>,
        segment: SegmentWriter,
        relaxed_capacity: usize,
        commit_delay: Duration,
        counters: AuditCounters,
    ) -> std::io::Result<(Arc<Appender>, std::thread::JoinHandle<()>)> {
        let appender = Arc::new(Appender {
            queue: Mutex::default(),
            wake: Condvar::new(),
            relaxed_capacity,
            commit_delay,
            counters,
            failed_at: Mutex::new(None),
        });
        let thread = std::thread::Builder::new().name("audit-writer".into()).spawn({
            let appender = appender.clone();
            move || appender.run(&spool, segment)
        })?;
        Ok((appender, thread))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces a strict request that will queue its event (with [`Appender::strict`]) once its outcome is known:
    /// a turn with a commit delay waits for it. Dropping the guard unqueued withdraws the announcement.
    pub fn expect(self: &Arc<Self>) -> Expected {
        self.lock().expected += 1;
        Expected { appender: Some(self.clone()) }
    }

    /// Bytes queued, not yet written (for the strict mode's room check).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether a write failed within `window`.
    pub fn failed_within(&self, window: Duration) -> bool {
        self.failed_at.lock().ok().and_then(|at| *at).is_some_and(|at| at.elapsed() < window)
    }

    /// Queues framed records of `events` events; resolves once they are durable.
    /// `expected`: its announcement ([`Appender::expect`]), if it was made; settled here.
    pub async fn strict(&self, records: Vec<u8>, events: u64, expected: Option<Expected>) -> Result<(), NotDurable> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut queue = self.lock();
            if let Some(mut expected) = expected
                && expected.appender.take().is_some()
            {
                queue.expected = queue.expected.saturating_sub(1);
            }
            if queue.closed {
                return Err(NotDurable::Stopped);
            }
            queue.bytes += records.len();
            queue.strict_items += 1;
            queue.items.push(Item { records, events, done: Some(tx) });
            queue.wakes_writer()
        };
        // A strict event cuts a relaxed linger short: it is written and synced now.
        if wake {
            self.wake.notify_one();
        }
        rx.await.unwrap_or(Err(NotDurable::Stopped))
    }

    /// Queues framed records without waiting; refused when the queue holds its capacity of relaxed events.
    pub fn relaxed(&self, records: Vec<u8>, events: u64) -> Result<(), NotDurable> {
        let was_empty = {
            let mut queue = self.lock();
            if queue.closed {
                return Err(NotDurable::Stopped);
            }
            let count = usize::try_from(events).unwrap_or(usize::MAX);
            if queue.relaxed_events.saturating_add(count) > self.relaxed_capacity {
                return Err(NotDurable::QueueFull);
            }
            queue.relaxed_events += count;
            queue.bytes += records.len();
            queue.items.push(Item { records, events, done: None });
            queue.items.len() == 1
        };
        // Only the first event of a turn wakes the writer; the others join its linger.
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// No more events: the writer finishes what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    fn run(&self, spool: &Spool, mut segment: SegmentWriter) {
        // One buffer for every turn's write (kept unless a backlog made it large).
        let mut buffer = Vec::new();
        let mut synced_at = Instant::now();
        let mut unsynced = false;
        loop {
            let (batch, strict, closing) = {
                let mut queue = self.lock();
                // Nothing queued: sleep until something is, or until written relaxed events are due to be synced.
                while queue.items.is_empty() && !queue.closed {
                    if !unsynced {
                        queue = self.wake.wait(queue).unwrap_or_else(PoisonError::into_inner);
                        continue;
                    }
                    let due = RELAXED_SYNC.saturating_sub(synced_at.elapsed());
                    if due.is_zero() {
                        break;
                    }
                    queue = self.wake.wait_timeout(queue, due).unwrap_or_else(PoisonError::into_inner).0;
                }
                // Only relaxed events: let more gather (a strict one, or closing, ends the wait).
                if !queue.items.is_empty() && queue.strict_items == 0 && !queue.closed {
                    queue = self.wake.wait_timeout(queue, RELAXED_LINGER).unwrap_or_else(PoisonError::into_inner).0;
                }
                queue = self.delay_commit(queue);
                if queue.items.is_empty() && queue.closed && !unsynced {
                    return;
                }
                let strict = queue.strict_items > 0;
                queue.relaxed_events = 0;
                queue.strict_items = 0;
                queue.bytes = 0;
                (std::mem::take(&mut queue.items), strict, queue.closed)
            };
            let sync = strict || closing || synced_at.elapsed() >= RELAXED_SYNC;
            let wrote = !batch.is_empty();
            self.write(spool, &mut segment, batch, sync, &mut buffer);
            if buffer.capacity() > BUFFER_KEPT {
                buffer = Vec::new();
            }
            if sync {
                synced_at = Instant::now();
                unsynced = false;
            } else if wrote {
                unsynced = true;
            }
        }
    }

    /// Strict events queued and more expected: waits up to the commit delay for those expected now (not for
    /// requests admitted during the wait), so that one sync carries them all.
    fn delay_commit<'q>(&self, mut queue: MutexGuard<'q, Queue>) -> MutexGuard<'q, Queue> {
        if queue.strict_items == 0 || queue.expected == 0 || queue.closed || self.commit_delay.is_zero() {
            return queue;
        }
        let until = queue.strict_items + queue.expected;
        queue.delay_until = Some(until);
        let deadline = Instant::now() + self.commit_delay;
        while !queue.wakes_writer() && !queue.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = self.wake.wait_timeout(queue, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        queue.delay_until = None;
        queue
    }

    /// Appends a batch with one write (and, with `sync`, one fsync); an item that no longer fits is refused alone.
    fn write(&self, spool: &Spool, segment: &mut SegmentWriter, batch: Vec<Item>, sync: bool, records: &mut Vec<u8>) {
        let room = spool.limits().max_bytes.saturating_sub(spool.bytes()).saturating_sub(64);
        records.clear();
        let mut accepted = Vec::with_capacity(batch.len());
        for item in batch {
            if (records.len() + item.records.len()) as u64 > room {
                self.finish(item, Err(NotDurable::Full));
                continue;
            }
            records.extend_from_slice(&item.records);
            accepted.push(item);
        }
        let result = match spool.append(segment, records, sync) {
            Ok(_) => Ok(()),
            Err(SpoolError::Full { .. }) => Err(NotDurable::Full),
            Err(e) => {
                tracing::error!(error = %e, "audit spool write failed; the events of this batch are not durable");
                if let Ok(mut at) = self.failed_at.lock() {
                    *at = Some(Instant::now());
                }
                Err(NotDurable::Failed)
            }
        };
        for item in accepted {
            self.finish(item, result);
        }
    }

    /// Withdraws one announcement (its request ended without queueing an event).
    fn unexpect(&self) {
        let wake = {
            let mut queue = self.lock();
            queue.expected = queue.expected.saturating_sub(1);
            queue.delay_until.is_some() && queue.wakes_writer()
        };
        if wake {
            self.wake.notify_one();
        }
    }

    fn finish(&self, item: Item, result: Result<(), NotDurable>) {
        match result {
            Ok(()) => self.counters.written(item.events),
            // A strict event's request answers 503 (counted there); a relaxed one is lost.
            Err(reason) if item.done.is_none() => self.counters.dropped(reason.reason(), item.events),
            Err(_) => {}
        }
        if let Some(done) = item.done {
            let _ = done.send(result);
        }
    }
}

/// A strict request's announcement that it will queue an event ([`Appender::expect`]).
pub struct Expected {
    appender: Option<Arc<Appender>>,
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expected").field("pending", &self.appender.is_some()).finish()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Some(appender) = self.appender.take() {
            appender.unexpect();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::spool::{Limits, frame};

    /// A spool with one sink `s` in a temporary directory (kept alive by the first value) and its writer.
    fn started(
        relaxed_capacity: usize,
        commit_delay: Duration,
    ) -> (tempfile::TempDir, Arc<Spool>, Arc<Appender>, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, segment) =
            Spool::open(dir.path(), Limits { max_bytes: 1 << 20, segment_bytes: 1 << 20 }, &["s"]).unwrap();
        let spool = Arc::new(spool);
        let (appender, thread) =
            Appender::start(spool.clone(), segment, relaxed_capacity, commit_delay, AuditCounters::default()).unwrap();
        (dir, spool, appender, thread)
    }

    fn texts(records: Vec<crate::audit::spool::Record>) -> Vec<String> {
        records.into_iter().map(|r| String::from_utf8(r.payload.to_vec()).unwrap()).collect()
    }

    fn record(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        frame(text.as_bytes(), 1, &mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn strict_waits_relaxed_gathers_and_close_drains() {
        let (_dir, spool, appender, thread) = started(3, Duration::ZERO);
        let start = spool.cursor("s").unwrap();
        // Relaxed: accepted at once, written within the linger, a fourth over capacity refused.
        for i in 0..3 {
            appender.relaxed(record(&format!("r{i}")), 1).unwrap();
        }
        assert_eq!(appender.relaxed(record("r3"), 1), Err(NotDurable::QueueFull));
        // Strict: returns once written and synced, relaxed events queued before it included.
        appender.strict(record("s0"), 1, None).await.unwrap();
        assert_eq!(texts(spool.read(start, 100, usize::MAX).unwrap()), ["r0", "r1", "r2", "s0"]);
        appender.relaxed(record("r4"), 1).unwrap();
        appender.close();
        thread.join().unwrap();
        assert_eq!(texts(spool.read(start, 100, usize::MAX).unwrap()).last().map(String::as_str), Some("r4"));
        assert_eq!(appender.relaxed(record("late"), 1), Err(NotDurable::Stopped));
    }

    /// With a commit delay, a strict event waits for the strict requests admitted before it (so one sync carries
    /// them all), and no longer once they are queued or withdrawn; a request alone does not wait at all.
    #[tokio::test]
    async fn a_commit_delay_waits_for_expected_strict_events_only() {
        // Far longer than anything below may take: each wait that ends early ended for its reason, not the delay.
        let (_dir, spool, appender, thread) = started(10, Duration::from_secs(30));
        let start = spool.cursor("s").unwrap();
        let soon = Duration::from_secs(5);

        // Alone: written and synced at once.
        tokio::time::timeout(soon, appender.strict(record("alone"), 1, Some(appender.expect())))
            .await
            .unwrap()
            .unwrap();

        // Two admitted: the first waits for the second, and both are durable as soon as the second is queued.
        let (first, second) = (appender.expect(), appender.expect());
        let mut waiting = tokio::spawn({
            let appender = appender.clone();
            async move { appender.strict(record("a"), 1, Some(first)).await }
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(),
            "the turn did not wait for the expected event"
        );
        tokio::time::timeout(soon, appender.strict(record("b"), 1, Some(second))).await.unwrap().unwrap();
        tokio::time::timeout(soon, waiting).await.unwrap().unwrap().unwrap();

        // One admitted request gives up (its guard dropped unqueued): the wait for it ends.
        let (third, quitter) = (appender.expect(), appender.expect());
        let waiting = tokio::spawn({
            let appender = appender.clone();
            async move { appender.strict(record("c"), 1, Some(third)).await }
        });
        // Once "c" is queued (the writer holds it while it waits), the other request gives up.
        while appender.queued_bytes() == 0 {
            tokio::task::yield_now().await;
        }
        drop(quitter);
        tokio::time::timeout(soon, waiting).await.unwrap().unwrap().unwrap();

        appender.close();
        thread.join().unwrap();
        assert_eq!(texts(spool.read(start, 100, usize::MAX).unwrap()), ["alone", "a", "b", "c"]);
    }
}
