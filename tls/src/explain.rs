//! Handshake failures as sentences: which side refused which certificate, and why. Both ends of a refused
//! handshake log one of these, so an operator reading either log knows what to fix.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, CertificateError, Error};
use tracing::{debug, warn};

/// The first rustls error in `err`'s chain (looking inside `io::Error`s, whose `source` skips their payload).
pub fn find_rustls<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        if let Some(found) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = found.downcast_ref::<Error>() {
                return Some(found);
            }
            next = found.source();
            continue;
        }
        next = e.source();
    }
    None
}

/// Every message of `err`'s chain, `a: b: c` (what `tonic::transport::Error`'s own Display leaves out).
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let message = e.to_string();
        if !out.contains(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        next = e.source();
    }
    out
}

/// Why a handshake with `peer` (e.g. "the client", "the control plane") failed, in words; `None` when no TLS error
/// is in the chain (a connection refused or reset, say).
pub fn explain(err: &(dyn StdError + 'static), peer: &str) -> Option<String> {
    if let Some(found) = find_rustls(err) {
        return Some(explain_rustls(found, peer));
    }
    // An alert received after the handshake (TLS 1.3 refuses a client certificate only then) reaches hyper through
    // rustls's reader as a plain message, no longer as a typed error: recognise the message.
    let text = chain(err);
    let name = text.split("received fatal alert: ").nth(1)?.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    let alert = ALERTS.iter().find(|a| format!("{a:?}") == name).copied()?;
    Some(explain_rustls(&Error::AlertReceived(alert), peer))
}

/// The alerts a certificate refusal is told with.
const ALERTS: [AlertDescription; 10] = [
    AlertDescription::CertificateExpired,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateRequired,
    AlertDescription::BadCertificate,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::AccessDenied,
    AlertDescription::DecryptError,
    AlertDescription::HandshakeFailure,
];

pub fn explain_rustls(err: &Error, peer: &str) -> String {
    match err {
        Error::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => "it is not issued by a CA trusted here (unknown issuer)".to_owned(),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("it has expired ({cert})")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!("it is not valid yet ({cert})")
                }
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    format!("it is not issued for the name connected to ({cert})")
                }
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                    format!("its extended key usage does not allow this use ({cert})")
                }
                other => other.to_string(),
            };
            format!("{peer}'s certificate is refused: {why}")
        }
        Error::NoCertificatesPresented => format!("{peer} presented no certificate"),
        Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::CertificateExpired => ": it has expired",
                AlertDescription::UnknownCA => ": it is not issued by a CA trusted there",
                AlertDescription::CertificateRequired => ": a certificate is required there and none was presented",
                AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError => "",
                _ => return format!("{peer} ended the TLS handshake (alert {alert:?})"),
            };
            format!("{peer} refused this side's certificate (TLS alert {alert:?}){why}")
        }
        Error::InvalidMessage(_) => {
            format!("TLS handshake with {peer} failed: {err} (is it speaking plaintext to a TLS port?)")
        }
        other => format!("TLS handshake with {peer} failed: {other}"),
    }
}

/// Logs refused handshakes on a listener: one warning per kind of refusal per interval (with how many were held
/// back), so a misconfigured client is visible at once and a scanner cannot flood the log. Failures that are not
/// TLS errors (a client that hung up mid-handshake) go to debug.
pub struct HandshakeLog {
    listener: &'static str,
    interval: Duration,
    seen: Mutex<HashMap<String, (Option<Instant>, u64)>>,
}

impl HandshakeLog {
    pub fn new(listener: &'static str) -> Self {
        HandshakeLog { listener, interval: Duration::from_secs(10), seen: Mutex::new(HashMap::new()) }
    }

    /// `peer_name`: how to call the other side ("the client", "the data plane").
    pub fn refused(&self, remote: SocketAddr, err: &(dyn StdError + 'static), peer_name: &str) {
        let Some(reason) = explain(err, peer_name) else {
            debug!(listener = self.listener, %remote, error = %chain(err), "TLS handshake did not complete");
            return;
        };
        // The kind of refusal: the sentence without its particulars (times, names) in parentheses.
        let kind = reason.split(" (").next().unwrap_or(&reason).to_owned();
        let now = Instant::now();
        let due = match self.seen.lock() {
            Ok(mut seen) => {
                if seen.len() > 64 {
                    seen.clear();
                }
                let entry = seen.entry(kind).or_insert((None, 0));
                entry.1 += 1;
                if entry.0.is_none_or(|at| now.duration_since(at) >= self.interval) {
                    entry.0 = Some(now);
                    Some(std::mem::take(&mut entry.1))
                } else {
                    None
                }
            }
            Err(_) => Some(1),
        };
        if let Some(times) = due {
            warn!(listener = self.listener, %remote, %reason, times, "TLS handshake refused (each kind logged at most once per 10 s)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences() {
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "the client's certificate is refused: it is not issued by a CA trusted here",
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "the client's certificate is refused: it has expired",
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateExpired),
                "the client refused this side's certificate (TLS alert CertificateExpired): it has expired",
            ),
            (Error::AlertReceived(AlertDescription::UnknownCA), "not issued by a CA trusted there"),
            (Error::NoCertificatesPresented, "the client presented no certificate"),
        ];
        for (err, want) in cases {
            let got = explain(&io(err), "the client").unwrap_or_default();
            assert!(got.contains(want), "{got} / {want}");
        }
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(explain(&plain, "the client"), None);
        // Deeper in a chain, behind an error with a source.
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(io(Error::AlertReceived(AlertDescription::CertificateRequired)));
        assert!(explain(&outer, "the control plane").unwrap_or_default().contains("a certificate is required"));
        assert!(chain(&outer).starts_with("transport error: "), "{}", chain(&outer));
        // As hyper passes an alert on after the handshake: a message, not a typed error.
        let late =
            Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, "received fatal alert: CertificateExpired"));
        assert!(
            explain(&late, "the control plane")
                .unwrap_or_default()
                .contains("(TLS alert CertificateExpired): it has expired")
        );
    }
}
