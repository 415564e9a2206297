//! Which HTTP version a connection speaks, decided before hyper takes it, so that hyper's buffers are sized once.
//!
//! hyper-util's version-sniffing server reads the first 24 bytes itself and hands them back to the HTTP/1 parser,
//! whose first `reserve` then doubles its read buffer to 16 KiB: each idle keep-alive connection held 24 KiB of
//! buffers (measured with valgrind's DHAT on 2,000 idle connections). Here a plaintext connection's first bytes are
//! *peeked* (the kernel keeps them), compared with the HTTP/2 preface, and the connection is then served by a
//! builder that knows its version and reads from the socket directly (one 8 KiB read buffer). A TLS connection's
//! version is what ALPN chose; without ALPN it is sniffed as before.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::{HttpService, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::body::BoxError;

/// The HTTP/2 connection preface (RFC 9113 §3.4): a plaintext connection that opens with it is HTTP/2 ("prior
/// knowledge"); any other first bytes are HTTP/1.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Peeked bytes that are a strict prefix of the preface: the rest has not arrived yet, look again this much later.
const PEEK_AGAIN: Duration = Duration::from_millis(5);

/// One builder per way of choosing the version; the same settings in each.
pub struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    sniffing: auto::Builder<TokioExecutor>,
}

impl Builders {
    pub fn new() -> Self {
        let configured = || {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(256)
                .keep_alive_interval(Duration::from_secs(30));
            builder
        };
        Builders { http1: configured().http1_only(), http2: configured().http2_only(), sniffing: configured() }
    }

    /// A TLS connection, by the protocol ALPN chose (`h2`, `http/1.1`), sniffed when there was none.
    pub fn tls<I, S, B>(&self, io: I, alpn: Option<&[u8]>, service: S) -> Connection<I, S>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let builder = match alpn {
            Some(b"h2") => &self.http2,
            Some(b"http/1.1") => &self.http1,
            _ => &self.sniffing,
        };
        builder.serve_connection(io, service).into_owned()
    }
}

impl Default for Builders {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection served by hyper-util's builder.
pub type Connection<I, S> = auto::Connection<'static, I, S, TokioExecutor>;

/// A plaintext connection: peeked until its version is known, then served (see the module documentation). Its
/// output and `graceful_shutdown` are those of the hyper connection; shut down before the version is known (a
/// connection that has not sent anything), it ends at once.
pub struct Plain<S: HttpService<Incoming>> {
    state: State<S>,
    builders: std::sync::Arc<Builders>,
}

enum State<S: HttpService<Incoming>> {
    Peeking { stream: TcpStream, service: S, again: Option<Pin<Box<Sleep>>> },
    Serving(Pin<Box<Connection<TokioIo<TcpStream>, S>>>),
    Done,
}

impl<S, B> Plain<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Unpin + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(stream: TcpStream, service: S, builders: std::sync::Arc<Builders>) -> Self {
        Plain { state: State::Peeking { stream, service, again: None }, builders }
    }

    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Serving(connection) => connection.as_mut().graceful_shutdown(),
            State::Peeking { .. } | State::Done => this.state = State::Done,
        }
    }
}

/// What the first bytes of a connection say: `Some(true)` HTTP/2, `Some(false)` HTTP/1, `None` not yet known.
fn is_http2(first: &[u8]) -> Option<bool> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(false)
    } else if n == PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

impl<S, B> Future for Plain<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Unpin + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Serving(connection) => return connection.as_mut().poll(cx),
                State::Peeking { stream, again, .. } => {
                    if let Some(sleep) = again {
                        ready!(sleep.as_mut().poll(cx));
                        *again = None;
                    }
                    let mut first = [0u8; PREFACE.len()];
                    let mut buf = ReadBuf::new(&mut first);
                    let seen = match ready!(stream.poll_peek(cx, &mut buf)) {
                        Ok(0) => {
                            // Closed before sending anything.
                            this.state = State::Done;
                            return Poll::Ready(Ok(()));
                        }
                        Ok(n) => n,
                        Err(e) => {
                            this.state = State::Done;
                            return Poll::Ready(Err(e.into()));
                        }
                    };
                    let Some(http2) = is_http2(&first[..seen]) else {
                        // The data that is there stays readable: peeking again at once would spin.
                        *again = Some(Box::pin(tokio::time::sleep(PEEK_AGAIN)));
                        continue;
                    };
                    let State::Peeking { stream, service, .. } = std::mem::replace(&mut this.state, State::Done) else {
                        continue;
                    };
                    let builder = if http2 { &this.builders.http2 } else { &this.builders.http1 };
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    this.state = State::Serving(Box::pin(connection));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes() {
        let cases: &[(&[u8], Option<bool>)] = &[
            (b"GET /fhir/metadata HTTP/1.1\r\n", Some(false)),
            (b"G", Some(false)),
            (b"POST /fhir HTTP/1.1\r\n", Some(false)),
            (b"PUT /fhir/Patient/1 HTTP/1.1\r\n", Some(false)),
            (b"PRI * HTTP/1.1\r\n", Some(false)),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (PREFACE, Some(true)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Some(true)),
        ];
        for (first, want) in cases {
            assert_eq!(is_http2(first), *want, "{}", String::from_utf8_lossy(first));
        }
    }
}
