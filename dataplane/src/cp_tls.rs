//! TLS towards the control plane: each config session connects through [`ControlPlaneTls::connector`], which takes
//! the client configuration current at that moment (certificate, key and CA bundle are reloaded from their files,
//! see `fhirgw_tls::reload`), so a rotated client certificate is used from the next connection on while the open
//! stream carries on.
//!
//! The name the control plane's certificate is checked against is the configured URL's host, also when that name
//! was resolved to several replicas' addresses (one certificate names the Service), unless `--control-plane-server-name`
//! says otherwise.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fhirgw_tls::client::ClientSpec;
use fhirgw_tls::pki_types::ServerName;
use fhirgw_tls::reload::Reloading;
use fhirgw_tls::rustls::ClientConfig;
use fhirgw_tls::tokio_rustls::TlsConnector;
use fhirgw_tls::tokio_rustls::client::TlsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Clone)]
pub struct ControlPlaneTls {
    config: Arc<Reloading<ClientConfig>>,
    server_name: Option<String>,
}

impl ControlPlaneTls {
    /// Loads the files now (an error is fatal at start-up) and follows them afterwards.
    pub fn start(spec: ClientSpec, server_name: Option<String>) -> Result<Self, fhirgw_tls::TlsError> {
        let spec = ClientSpec { alpn: vec!["h2"], ..spec };
        Ok(ControlPlaneTls { config: spec.start("control-plane client")?, server_name })
    }

    /// A connector for one session to `host` (the configured URL's host).
    pub fn connector(&self, host: &str) -> Result<Connector, String> {
        let name = self.server_name.as_deref().unwrap_or(host).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| format!("{name:?} is not a DNS name or IP address to check the certificate against"))?;
        Ok(Connector { tls: TlsConnector::from(self.config.current()), name })
    }
}

/// Opens a TCP connection to the URI's address and makes the TLS handshake; for tonic's `connect_with_connector`.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    name: ServerName<'static>,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<Prefixed>>> + Send>>;

/// How long the connector waits for the control plane's first bytes after the handshake.
const FIRST_READ: Duration = Duration::from_secs(3);

impl tonic::codegen::Service<http::Uri> for Connector {
    type Response = TokioIo<Prefixed>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.name.clone());
        Box::pin(async move {
            let host = uri.host().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned());
            let host = host.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the URL"))?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let mut stream = tls.connect(name, tcp).await?;
            // TLS 1.3 finishes the client's side of the handshake before the server has checked the client
            // certificate: a refusal comes as an alert on the first read, which hyper would only report as a closed
            // connection. The server's HTTP/2 SETTINGS come at once, so read them here: a refusal surfaces as a
            // typed error the session logs in words, and what was read is handed on to hyper first.
            let mut first = vec![0u8; 1024];
            let read = match tokio::time::timeout(FIRST_READ, stream.read(&mut first)).await {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the control plane closed the connection right after the TLS handshake",
                    ));
                }
                Ok(read) => read?,
                Err(_) => 0,
            };
            first.truncate(read);
            Ok(TokioIo::new(Prefixed { first, at: 0, stream }))
        })
    }
}

/// The TLS stream with the bytes already read from it in front.
pub struct Prefixed {
    first: Vec<u8>,
    at: usize,
    stream: TlsStream<TcpStream>,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_names() {
        let tls = ControlPlaneTls::start(ClientSpec::default(), None).unwrap_or_else(|e| panic!("{e}"));
        let name = |t: &ControlPlaneTls, host: &str| t.connector(host).map(|c| c.name);
        let want = |n: &str| ServerName::try_from(n.to_owned()).ok();
        assert_eq!(name(&tls, "fhirgw-controlplane-replicas").ok(), want("fhirgw-controlplane-replicas"));
        assert_eq!(name(&tls, "127.0.0.1").ok(), want("127.0.0.1"));
        assert_eq!(name(&tls, "[::1]").ok(), want("::1"));
        assert!(name(&tls, "bad name!").is_err());
        let fixed = ControlPlaneTls { server_name: Some("cp.example".into()), ..tls };
        assert_eq!(name(&fixed, "10.0.0.3").ok(), want("cp.example"));
    }
}
