//! The client side: a data plane connecting to the control plane, verifying its certificate against a CA bundle
//! (or the public web PKI when none is given) and presenting its own client certificate.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use crate::reload::Reloading;
use crate::server::{fingerprint, names};
use crate::{TlsError, pem, provider};

#[derive(Debug, Clone, Default)]
pub struct ClientSpec {
    /// PEM bundle of the CAs the server's certificate must chain to; `None`: the public web PKI roots.
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM chain) and its key, presented when the server asks.
    pub identity: Option<(PathBuf, PathBuf)>,
    pub alpn: Vec<&'static str>,
}

impl ClientSpec {
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.ca.iter().cloned().collect();
        if let Some((cert, key)) = &self.identity {
            files.extend([cert.clone(), key.clone()]);
        }
        files
    }

    pub fn build(&self, contents: &[Vec<u8>]) -> Result<(ClientConfig, String), TlsError> {
        let mut contents = contents.iter();
        let mut next = || contents.next().ok_or_else(|| TlsError::Config("missing TLS file contents".into()));
        let (roots, trust) = match &self.ca {
            Some(path) => (pem::roots(path, next()?)?, path.display().to_string()),
            None => (RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }, "the web PKI roots".into()),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::rustls("TLS versions"))?
            .with_root_certificates(roots);
        let (mut config, presents) = match &self.identity {
            Some((cert_path, key_path)) => {
                let chain = pem::certificates(cert_path, next()?)?;
                let key = pem::private_key(key_path, next()?)?;
                let about = format!("client certificate {} for {:?}", fingerprint(&chain[0]), names(&chain[0]));
                let config = builder.with_client_auth_cert(chain, key).map_err(TlsError::rustls(format!(
                    "{} with {}",
                    cert_path.display(),
                    key_path.display()
                )))?;
                (config, about)
            }
            None => (builder.with_no_client_auth(), "no client certificate".into()),
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok((config, format!("server certificates checked against {trust}; {presents}")))
    }

    pub fn start(self, what: &'static str) -> Result<Arc<Reloading<ClientConfig>>, TlsError> {
        let files = self.files();
        Reloading::start(what, files, move |contents| self.build(contents))
    }
}
