//! The one writer of the spool: a thread of its own (writes and fsyncs block) fed by a queue. Each turn it takes
//! everything queued, appends it, and makes it durable with one `fdatasync` (group commit): under load many events
//! share one sync, and a request in strict mode waits for at most the sync in progress plus its own.
//!
//! Strict events carry a channel on which they learn whether they are durable; relaxed ones do not, and are refused
//! at the door when the queue already holds `relaxed_capacity` of them (a drop, counted), so a slow disk never
//! slows relaxed traffic. Strict events are not bounded by count: each belongs to a request waiting for it.

use std::sync::{Arc, Condvar, Mutex};

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

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    relaxed_events: usize,
    bytes: usize,
    closed: bool,
}

/// The queue in front of the writer thread.
pub struct Appender {
    queue: Mutex<Queue>,
    wake: Condvar,
    relaxed_capacity: usize,
    counters: AuditCounters,
    /// When a write last failed.
    failed_at: Mutex<Option<std::time::Instant>>,
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
        counters: AuditCounters,
    ) -> std::io::Result<(Arc<Appender>, std::thread::JoinHandle<()>)> {
        let appender = Arc::new(Appender {
            queue: Mutex::default(),
            wake: Condvar::new(),
            relaxed_capacity,
            counters,
            failed_at: Mutex::new(None),
        });
        let thread = std::thread::Builder::new().name("audit-writer".into()).spawn({
            let appender = appender.clone();
            move || appender.run(&spool, segment)
        })?;
        Ok((appender, thread))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes queued, not yet written (for the strict mode's room check).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether a write failed within `window`.
    pub fn failed_within(&self, window: std::time::Duration) -> bool {
        self.failed_at.lock().ok().and_then(|at| *at).is_some_and(|at| at.elapsed() < window)
    }

    /// Queues framed records of `events` events; resolves once they are durable.
    pub async fn strict(&self, records: Vec<u8>, events: u64) -> Result<(), NotDurable> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.lock();
            if queue.closed {
                return Err(NotDurable::Stopped);
            }
            queue.bytes += records.len();
            queue.items.push(Item { records, events, done: Some(tx) });
        }
        self.wake.notify_one();
        rx.await.unwrap_or(Err(NotDurable::Stopped))
    }

    /// Queues framed records without waiting; refused when the queue holds its capacity of relaxed events.
    pub fn relaxed(&self, records: Vec<u8>, events: u64) -> Result<(), NotDurable> {
        {
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
        }
        self.wake.notify_one();
        Ok(())
    }

    /// No more events: the writer finishes what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    fn run(&self, spool: &Spool, mut segment: SegmentWriter) {
        loop {
            let batch = {
                let mut queue = self.lock();
                while queue.items.is_empty() && !queue.closed {
                    queue = self.wake.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if queue.items.is_empty() {
                    return;
                }
                queue.relaxed_events = 0;
                queue.bytes = 0;
                std::mem::take(&mut queue.items)
            };
            self.write(spool, &mut segment, batch);
        }
    }

    /// Appends a batch with one sync; an item that no longer fits is refused alone.
    fn write(&self, spool: &Spool, segment: &mut SegmentWriter, batch: Vec<Item>) {
        let room = spool.limits().max_bytes.saturating_sub(spool.bytes()).saturating_sub(64);
        let mut records = Vec::new();
        let mut accepted = Vec::with_capacity(batch.len());
        for item in batch {
            if (records.len() + item.records.len()) as u64 > room {
                self.finish(item, Err(NotDurable::Full));
                continue;
            }
            records.extend_from_slice(&item.records);
            accepted.push(item);
        }
        let result = match spool.append(segment, &records) {
            Ok(_) => Ok(()),
            Err(SpoolError::Full { .. }) => Err(NotDurable::Full),
            Err(e) => {
                tracing::error!(error = %e, "audit spool write failed; the events of this batch are not durable");
                if let Ok(mut at) = self.failed_at.lock() {
                    *at = Some(std::time::Instant::now());
                }
                Err(NotDurable::Failed)
            }
        };
        for item in accepted {
            self.finish(item, result);
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
