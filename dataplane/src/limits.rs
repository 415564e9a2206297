//! Resource limits sized from the process: the connection cap from the file-descriptor limit, and a log line that
//! is written at most once per interval however often its condition recurs (an accept loop at its cap would
//! otherwise log at the rate an attacker connects).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// File descriptors kept out of the FHIR connection budget: the admin listener and its connections
/// ([`ADMIN_MAX_CONNECTIONS`]), the config stream, the state file, JWKS, introspection and token fetches, stdio,
/// the runtime's own descriptors.
pub const RESERVED_FDS: u64 = 64;
/// Connections the admin port holds at once (probes and scrapes need few).
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Raises the soft file limit to the hard one (as Go's runtime does) and returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = Rlimit { current: Some(maximum), maximum: Some(maximum) };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return maximum;
        }
        return current;
    }
    // `None` is "unlimited": count it as plenty.
    limit.current.unwrap_or(1 << 20)
}

/// The default FHIR connection cap for a file limit: what is left after [`RESERVED_FDS`], halved, because each
/// client connection with a request in flight may hold one upstream connection from the pool too.
pub fn default_max_connections(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(usable.max(16)).unwrap_or(usize::MAX)
}

/// A condition logged at most once per `interval`, with how many times it occurred since the last line.
#[derive(Debug)]
pub struct Throttled {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttled {
    pub fn new(interval: Duration) -> Self {
        Throttled { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Counts one occurrence; returns `Some(occurrences since the last line, this one included)` when a line is due.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let Ok(mut last) = self.last.lock() else { return None };
        match *last {
            Some(at) if now.duration_since(at) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed) + 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cap_from_the_file_limit() {
        for (nofile, want) in [(0, 16), (64, 16), (256, 96), (1024, 480), (1_048_576, 524_256)] {
            assert_eq!(default_max_connections(nofile), want, "{nofile}");
        }
    }

    #[test]
    fn throttled_logs_once_per_interval() {
        let t = Throttled::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.hit_at(start), Some(1));
        for i in 1..=500 {
            assert_eq!(t.hit_at(start + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit_at(start + Duration::from_secs(11)), Some(501));
        assert_eq!(t.hit_at(start + Duration::from_secs(12)), None);
    }
}
