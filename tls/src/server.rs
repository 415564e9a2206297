//! Server configurations, and who a client is by its certificate.
//!
//! Client certificates are optional at the TLS layer (operators without one, probes, and data planes in token
//! mode must still connect), but one that is presented must chain to one of the configured client CAs, or the
//! handshake fails. Each CA names a role; after the handshake [`ServerTls::peer`] tells which CA issued the
//! certificate (by verifying it again against each CA alone) and the identity it carries (SAN), so services decide
//! on roles, never on the mere presence of a certificate. Two role CAs may not share a certificate: a certificate
//! must never hold two roles.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};

use crate::reload::Reloading;
use crate::{TlsError, pem, provider};

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CAs whose client certificates are accepted, each with the role its certificates get. Empty: no client
    /// certificates are asked for.
    pub client_cas: Vec<(&'static str, PathBuf)>,
    /// ALPN protocols offered, in order of preference (e.g. `h2`, `http/1.1`).
    pub alpn: Vec<&'static str>,
}

/// One loaded server configuration.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    roles: Vec<(&'static str, Arc<dyn ClientCertVerifier>)>,
}

/// What the client's certificate says, after the handshake verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The roles of the CAs that issued it (at most one, see the module doc).
    pub roles: Vec<&'static str>,
    /// The first URI SAN (a SPIFFE id, say), else the first DNS SAN; `None` when it has neither.
    pub identity: Option<String>,
}

impl PeerCert {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(&role)
    }
}

/// Short SHA-256 fingerprint of a certificate, for logs.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// URI and DNS subject alternative names, URIs first.
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else { return Vec::new() };
    parsed.valid_uri_names().chain(parsed.valid_dns_names()).map(str::to_owned).collect()
}

impl ServerSpec {
    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_cas.iter().map(|(_, path)| path.clone()));
        files
    }

    /// Builds the configuration from the files' contents, in [`Self::files`] order.
    pub fn build(&self, contents: &[Vec<u8>]) -> Result<(ServerTls, String), TlsError> {
        let [cert, key, cas @ ..] = contents else {
            return Err(TlsError::Config("missing TLS file contents".into()));
        };
        let chain = pem::certificates(&self.cert, cert)?;
        let key = pem::private_key(&self.key, key)?;
        let leaf = chain[0].clone();
        let provider = provider();
        let mut all = RootCertStore::empty();
        let mut roles: Vec<(&'static str, Arc<dyn ClientCertVerifier>)> = Vec::new();
        let mut seen: Vec<(&'static str, CertificateDer<'static>)> = Vec::new();
        for ((role, path), bytes) in self.client_cas.iter().zip(cas) {
            let certs = pem::certificates(path, bytes)?;
            for cert in &certs {
                if let Some((other, _)) = seen.iter().find(|(r, c)| r != role && c == cert) {
                    return Err(TlsError::Config(format!(
                        "the {role} CA and the {other} CA share a certificate: use separate CAs, so that no \
                         certificate can hold both roles"
                    )));
                }
                seen.push((role, cert.clone()));
            }
            let roots = pem::roots(path, bytes)?;
            all.roots.extend(roots.roots.iter().cloned());
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            roles.push((role, verifier));
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::rustls("TLS versions"))?;
        let builder = if roles.is_empty() {
            builder.with_no_client_auth()
        } else {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(all), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(format!("client CAs: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder.with_single_cert(chain, key).map_err(TlsError::rustls(format!(
            "{} with {}",
            self.cert.display(),
            self.key.display()
        )))?;
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let client_cas: Vec<String> = roles.iter().map(|(role, _)| (*role).to_owned()).collect();
        let summary = format!(
            "certificate {} for {:?}; client certificates from: {}",
            fingerprint(&leaf),
            names(&leaf),
            if client_cas.is_empty() { "none (not asked for)".to_owned() } else { client_cas.join(", ") + " CA" }
        );
        Ok((ServerTls { config: Arc::new(config), roles }, summary))
    }

    /// Loads it now and reloads it whenever the files change (see [`Reloading`]).
    pub fn start(self, what: &'static str) -> Result<Arc<Reloading<ServerTls>>, TlsError> {
        let files = self.files();
        Reloading::start(what, files, move |contents| self.build(contents))
    }
}

impl ServerTls {
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The client's certificate, if it presented one (the handshake has verified it against the client CAs).
    pub fn peer(&self, connection: &ServerConnection) -> Option<PeerCert> {
        let (leaf, intermediates) = connection.peer_certificates()?.split_first()?;
        let now = UnixTime::now();
        let roles = self
            .roles
            .iter()
            .filter(|(_, verifier)| verifier.verify_client_cert(leaf, intermediates, now).is_ok())
            .map(|(role, _)| *role)
            .collect();
        Some(PeerCert { roles, identity: names(leaf).into_iter().next() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;

    fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    fn leaf(names: &[&str], issuer: &(rcgen::Certificate, rcgen::KeyPair)) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        (params.signed_by(&key, &issuer.0, &issuer.1).unwrap().pem(), key.serialize_pem())
    }

    fn spec(cas: usize) -> ServerSpec {
        let roles = ["data-plane", "operator"];
        ServerSpec {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            client_cas: (0..cas).map(|i| (roles[i], PathBuf::from(format!("ca{i}.pem")))).collect(),
            alpn: vec!["h2"],
        }
    }

    #[test]
    fn builds_and_refuses() {
        let (a, b) = (ca(), ca());
        let (cert, key) = leaf(&["localhost"], &a);
        let (other_cert, _) = leaf(&["localhost"], &a);
        let bytes = |s: &str| s.as_bytes().to_vec();
        let (tls, summary) = spec(2).build(&[bytes(&cert), bytes(&key), bytes(&a.0.pem()), bytes(&b.0.pem())]).unwrap();
        assert_eq!(tls.config.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(summary.contains("localhost") && summary.contains("data-plane, operator CA"), "{summary}");
        // The same CA for two roles, a key that is not the certificate's, a missing key: refused.
        let shared = spec(2).build(&[bytes(&cert), bytes(&key), bytes(&a.0.pem()), bytes(&(b.0.pem() + &a.0.pem()))]);
        assert!(shared.err().is_some_and(|e| e.to_string().contains("share a certificate")));
        let mismatched = spec(0).build(&[bytes(&other_cert), bytes(&key)]);
        assert!(mismatched.err().is_some_and(|e| e.to_string().contains("cert.pem with key.pem")));
        assert!(spec(0).build(&[bytes(&cert), Vec::new()]).is_err());
    }

    #[test]
    fn identity_prefers_the_uri() {
        let a = ca();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["dp.example".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(rcgen::Ia5String::try_from("spiffe://x/dp").unwrap()));
        let cert = params.signed_by(&key, &a.0, &a.1).unwrap();
        assert_eq!(names(cert.der()), vec!["spiffe://x/dp".to_owned(), "dp.example".to_owned()]);
        let (dns_only, _) = leaf(&["dp.example", "10.0.0.1"], &a);
        let der = pem::certificates(Path::new("x"), dns_only.as_bytes()).unwrap().remove(0);
        assert_eq!(names(&der), vec!["dp.example".to_owned()], "IP addresses are not identities");
    }
}
