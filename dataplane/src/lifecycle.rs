//! The data plane's shutdown phases, shared by the listeners and the admin port.
//!
//! On SIGTERM the data plane first fails `/readyz` while it keeps serving for `--shutdown-delay-secs`, so a load
//! balancer (or Kubernetes' endpoints controller) stops sending before anything closes. Meanwhile every HTTP/1.1
//! response carries `Connection: close` and HTTP/2 connections get GOAWAY, so clients move their next request to a
//! new connection. Then the FHIR listener closes, every request that has arrived is answered, and the process exits
//! when the last connection is gone or `--drain-secs` later.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Not ready; still accepting and answering, winding connections down.
    Draining,
    /// The FHIR listener is closed; connections close once what they carry is answered.
    Stopping,
}

#[derive(Debug)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Lifecycle { phase: watch::channel(Phase::Serving).0 })
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to `phase` (never back).
    pub fn advance(&self, phase: Phase) {
        self.phase.send_if_modified(|current| {
            let later = phase > *current;
            if later {
                *current = phase;
            }
            later
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Resolves once the phase is `phase` or later.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let life = Lifecycle::new();
        assert_eq!(life.phase(), Phase::Serving);
        life.advance(Phase::Stopping);
        life.advance(Phase::Draining);
        assert_eq!(life.phase(), Phase::Stopping);
        life.reached(Phase::Draining).await;
    }
}
