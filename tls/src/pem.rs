//! PEM files: certificate chains, private keys, CA bundles. Errors name the file and what was wrong with it.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

fn pem_error(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Pem { path: path.to_owned(), what: what.into() }
}

/// Every `CERTIFICATE` block of `bytes` (read from `path`), in order; at least one.
pub fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The first private key of `bytes` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => pem_error(path, "holds no PRIVATE KEY block"),
        other => pem_error(path, format!("not a PEM private key: {other}")),
    })
}

/// A CA bundle: every certificate of `bytes` becomes a trust anchor; one that cannot be is an error, not skipped.
pub fn roots(path: &Path, bytes: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path, bytes)? {
        store.add(cert).map_err(|e| pem_error(path, format!("a certificate cannot be a trust anchor: {e}")))?;
    }
    Ok(store)
}

/// Reads a file whole.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap().self_signed(&key).unwrap();
        let p = Path::new("x.pem");
        assert_eq!(certificates(p, (cert.pem() + &cert.pem()).as_bytes()).unwrap().len(), 2);
        assert!(private_key(p, key.serialize_pem().as_bytes()).is_ok());
        assert_eq!(roots(p, cert.pem().as_bytes()).unwrap().len(), 1);
        for (bytes, want) in [
            (&b""[..], "no CERTIFICATE"),
            (b"garbage", "no CERTIFICATE"),
            (key.serialize_pem().as_bytes(), "no CERTIFICATE"),
        ] {
            let err = certificates(p, bytes).unwrap_err().to_string();
            assert!(err.starts_with("x.pem: ") && err.contains(want), "{err}");
        }
        let err = private_key(p, cert.pem().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("no PRIVATE KEY"), "{err}");
    }
}
