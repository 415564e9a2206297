//! A TLS configuration kept in step with its files.
//!
//! The files are read every [`INTERVAL`] and compared with what was last seen (contents, not modification times:
//! Kubernetes swaps a Secret volume's files through a symlink, and cert-manager may write the same certificate
//! again). When they differ the configuration is rebuilt; if that fails (say, a certificate and key read halfway
//! through an update, or an expired CA bundle that does not parse) the previous configuration stays, the refusal is
//! logged, and the next change is tried again. Handshakes take [`Reloading::current`] each time, so connections
//! opened after a reload use the new certificate while open ones (and the streams on them) carry on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::TlsError;

/// How often the files are compared with what is loaded.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Builds a configuration from the files' contents (in the order given); returns it with a one-line summary for
/// the log (names, fingerprints).
pub type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<(T, String), TlsError> + Send + Sync;

pub struct Reloading<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    current: ArcSwap<T>,
    build: Box<Build<T>>,
}

fn read_all(files: &[PathBuf]) -> Result<Vec<Vec<u8>>, TlsError> {
    files.iter().map(|path| crate::pem::read(path)).collect()
}

fn digest(contents: &[Vec<u8>]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for bytes in contents {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    }
    hash.finalize().into()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads the configuration now (an error here is fatal: the process must not start without it), then keeps it
    /// in step with its files on a background task. Needs a Tokio runtime.
    pub fn start(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<(T, String), TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        Self::start_every(what, files, INTERVAL, build)
    }

    fn start_every(
        what: &'static str,
        files: Vec<PathBuf>,
        every: Duration,
        build: impl Fn(&[Vec<u8>]) -> Result<(T, String), TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let contents = read_all(&files)?;
        let (first, summary) = build(&contents)?;
        info!(tls = what, %summary, "TLS configuration loaded");
        let this = Arc::new(Reloading { what, files, current: ArcSwap::from_pointee(first), build: Box::new(build) });
        let seen = digest(&contents);
        tokio::spawn(this.clone().follow(seen, every));
        Ok(this)
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    async fn follow(self: Arc<Self>, mut seen: [u8; 32], every: Duration) {
        let mut unreadable: Option<String> = None;
        loop {
            tokio::time::sleep(every).await;
            let contents = match read_all(&self.files) {
                Ok(contents) => contents,
                Err(e) => {
                    let message = e.to_string();
                    if unreadable.as_deref() != Some(message.as_str()) {
                        warn!(tls = self.what, error = %message, "cannot read the TLS files; keeping the loaded configuration");
                        unreadable = Some(message);
                    }
                    continue;
                }
            };
            unreadable = None;
            let now = digest(&contents);
            if now == seen {
                continue;
            }
            seen = now;
            match (self.build)(&contents) {
                Ok((next, summary)) => {
                    self.current.store(Arc::new(next));
                    info!(tls = self.what, %summary, "TLS files changed: new connections use the reloaded configuration; open ones keep theirs");
                }
                Err(e) => warn!(
                    tls = self.what,
                    error = %e,
                    "TLS files changed but do not make a valid configuration; keeping the previous one"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn follows_the_files_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("value");
        std::fs::write(&file, "1").unwrap();
        let parse = |c: &[Vec<u8>]| {
            let text = String::from_utf8_lossy(&c[0]).into_owned();
            text.parse::<u32>().map(|n| (n, text.clone())).map_err(|e| TlsError::Config(e.to_string()))
        };
        let every = Duration::from_millis(10);
        let r = Reloading::start_every("test", vec![file.clone()], every, parse).unwrap();
        assert_eq!(*r.current(), 1);
        let becomes = |want: u32| {
            let r = r.clone();
            async move {
                for _ in 0..500 {
                    if *r.current() == want {
                        return true;
                    }
                    tokio::time::sleep(every).await;
                }
                false
            }
        };
        std::fs::write(&file, "2").unwrap();
        assert!(becomes(2).await);
        std::fs::write(&file, "not a number").unwrap();
        tokio::time::sleep(every * 20).await;
        assert_eq!(*r.current(), 2, "a change that does not build is refused");
        std::fs::remove_file(&file).unwrap();
        tokio::time::sleep(every * 20).await;
        assert_eq!(*r.current(), 2, "a missing file keeps what is loaded");
        std::fs::write(&file, "3").unwrap();
        assert!(becomes(3).await);
        assert!(Reloading::start("test", vec![dir.path().join("missing")], parse).is_err());
    }
}
