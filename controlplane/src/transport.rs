//! The gRPC port's connections, plaintext or TLS, handed to tonic as an incoming stream.
//!
//! TLS is done here rather than by tonic so that the certificate is reloaded from its files (each handshake takes
//! the current configuration; open streams keep theirs) and so that each connection carries what its client
//! certificate says ([`PeerInfo`]: the issuing CA's role and the SAN identity) into every request's extensions,
//! where the interceptors decide (see `peer_auth`). Handshakes run on their own tasks, at most
//! [`MAX_HANDSHAKES`] at once and each within [`HANDSHAKE_TIMEOUT`], so a slow or silent client holds up nobody.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fhirgw_tls::explain::HandshakeLog;
use fhirgw_tls::reload::Reloading;
use fhirgw_tls::server::{PeerCert, ServerTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::warn;

/// The role of a client certificate issued by `--dataplane-ca-file`.
pub const DATAPLANE: &str = "data-plane";
/// The role of a client certificate issued by `--operator-ca-file`.
pub const OPERATOR: &str = "operator";

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified client certificate, if one was presented (TLS only).
    pub cert: Option<PeerCert>,
}

impl PeerInfo {
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.cert.as_ref().is_some_and(|c| c.has_role(role))
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<fhirgw_tls::tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection.
pub struct Conn {
    io: Io,
    info: PeerInfo,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Accepts on `listener` until the stream is dropped; with `tls`, only connections whose handshake succeeded are
/// yielded.
pub fn incoming(listener: TcpListener, tls: Option<Arc<Reloading<ServerTls>>>) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let log = Arc::new(HandshakeLog::new("grpc"));
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let _ = stream.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn { io: Io::Plain(stream), info: PeerInfo { remote, cert: None } })).await.is_err() {
                    break;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn!(%remote, limit = MAX_HANDSHAKES, "too many TLS handshakes in progress; closing a new connection");
                continue;
            };
            let (config, tx, log) = (tls.current(), tx.clone(), log.clone());
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, config.acceptor().accept(stream)).await;
                drop(permit);
                match accepted {
                    Ok(Ok(stream)) => {
                        let cert = config.peer(stream.get_ref().1);
                        let _ =
                            tx.send(Ok(Conn { io: Io::Tls(Box::new(stream)), info: PeerInfo { remote, cert } })).await;
                    }
                    Ok(Err(e)) => log.refused(remote, &e, "the client"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake not finished within 10 s; closed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
