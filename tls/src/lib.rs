//! TLS for both planes, on rustls with the ring provider.
//!
//! - [`pem`]: certificate chains, private keys and CA bundles from PEM files, with errors naming the file.
//! - [`reload`]: a configuration rebuilt from its files whenever they change (cert-manager rotates Secrets in
//!   place); a new set that does not build is refused and the previous one stays. Connections already open keep
//!   the configuration they were made with; new ones take the current one.
//! - [`server`]: server configurations (the control plane's gRPC and admin ports, the data plane's FHIR port), with
//!   optional client certificates verified against named CAs, and the peer's identity from its certificate.
//! - [`client`]: the data plane's client configuration towards the control plane.
//! - [`explain`]: a handshake error as a sentence an operator can act on.

pub mod client;
pub mod explain;
pub mod pem;
pub mod reload;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

pub use rustls;
pub use rustls_pki_types as pki_types;
pub use tokio_rustls;

/// The one crypto provider, named explicitly: the process-wide default is ambiguous when several crates in the
/// tree enable providers.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("{context}: {source}")]
    Rustls {
        context: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    fn rustls(context: impl Into<String>) -> impl FnOnce(rustls::Error) -> TlsError {
        let context = context.into();
        move |source| TlsError::Rustls { context, source }
    }
}
