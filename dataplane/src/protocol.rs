//! Which HTTP version a connection speaks, decided before hyper takes it, so that hyper's buffers are sized once;
//! and, for plaintext HTTP/1.1, hyper's state dropped while a keep-alive connection waits for its next request.
//!
//! hyper-util's version-sniffing server reads the first 24 bytes itself and hands them back to the HTTP/1 parser,
//! whose first `reserve` then doubles its read buffer to 16 KiB: each idle keep-alive connection held 24 KiB of
//! buffers (measured with valgrind's DHAT on 2,000 idle connections). Here a plaintext connection's first bytes are
//! *peeked* (the kernel keeps them), compared with the HTTP/2 preface, and the connection is then served by a
//! builder that knows its version and reads from the socket directly (one 8 KiB read buffer). A TLS connection's
//! version is what ALPN chose; without ALPN it is sniffed as before.
//!
//! **Parking.** hyper keeps its 8 KiB read buffer (and its connection state) for as long as a connection is open,
//! and has no setting to release it. A plaintext HTTP/1.1 connection with nothing in flight for `park_after` after
//! an exchange that left it at the start of the next request (its owner's [`Activity`] tells) is therefore *parked*: hyper is asked to end the connection without shutting the
//! socket (`graceful_shutdown` of an idle connection writes nothing), the socket and the service are taken back with
//! `into_parts`, and the socket alone is held until it is readable again, when a new hyper connection takes it. Bytes
//! hyper had read but not parsed (a request head that is still arriving) are served first by the new connection,
//! which is then not parked again before its next request starts. The client sees one connection throughout. A
//! parked connection is closed by its owner's idle timeout like any other (`graceful_shutdown` drops the socket),
//! and hyper's header-read timeout, which runs from the moment hyper waits for a head, no longer cuts idle
//! keep-alive connections at 30 s whatever `--idle-timeout-secs` says.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::{HttpService, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

/// The HTTP/2 connection preface (RFC 9113 §3.4): a plaintext connection that opens with it is HTTP/2 ("prior
/// knowledge"); any other first bytes are HTTP/1.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Peeked bytes that are a strict prefix of the preface: the rest has not arrived yet, look again this much later.
const PEEK_AGAIN: Duration = Duration::from_millis(5);

/// How long hyper waits for a whole request head once it waits for one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's largest read buffer (a request head must fit).
const MAX_BUF_SIZE: usize = 64 * 1024;
/// How long a plaintext HTTP/1.1 connection has had nothing in flight before it is parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// One builder per way of choosing the version; the same settings in each.
pub struct Builders {
    /// Plaintext HTTP/1.1: hyper's own HTTP/1 builder, whose connections hand their socket back (parking).
    plain_http1: http1::Builder,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    sniffing: auto::Builder<TokioExecutor>,
}

impl Builders {
    /// `idle_timeout`: the owner's keep-alive idle timeout. hyper's header-read timeout runs from the moment it waits
    /// for a head, idle keep-alive time included; for connections that are not parked (TLS) it is therefore set past
    /// the idle timeout, so that the idle timeout, not hyper, ends an idle keep-alive connection (a trickled head is
    /// bounded by the idle timeout all the same: nothing is in flight).
    pub fn new(idle_timeout: Duration) -> Self {
        let unparked_head_timeout = HEADER_READ_TIMEOUT.max(idle_timeout + Duration::from_secs(1));
        let configured = || {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(unparked_head_timeout)
                .max_buf_size(MAX_BUF_SIZE);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(256)
                .keep_alive_interval(Duration::from_secs(30));
            builder
        };
        let mut plain_http1 = http1::Builder::new();
        plain_http1.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_BUF_SIZE);
        Builders {
            plain_http1,
            http1: configured().http1_only(),
            http2: configured().http2_only(),
            sniffing: configured(),
        }
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

/// A connection served by hyper-util's builder.
pub type Connection<I, S> = auto::Connection<'static, I, S, TokioExecutor>;

/// What the owner of a plaintext connection knows of its use (the accept loop counts requests and responses).
pub trait Activity: Send + Sync + 'static {
    /// Requests started on the connection so far.
    fn requests(&self) -> u64;
    /// Since when nothing has been in flight, if the last exchange left the connection exactly at the start of the
    /// next request (it had no request body left unread, and neither side asked to close); `None` otherwise, and
    /// while a request is being answered. hyper closes a connection whose request body the service left unread; a
    /// parked one would read the rest of that body as its next request.
    fn quiet_since(&self) -> Option<Instant>;
}

/// A plaintext connection: peeked until its version is known, then served, and parked while idle if it is HTTP/1.1
/// (see the module documentation). Its output and `graceful_shutdown` are those of the hyper connection; shut down
/// before the version is known (a connection that has not sent anything) or while parked, it ends at once.
pub struct Plain<S: HttpService<Incoming>> {
    state: State<S>,
    builders: std::sync::Arc<Builders>,
    activity: std::sync::Arc<dyn Activity>,
    /// Connections parked now (a gauge of the listener).
    parked: Gauge,
    park_after: Duration,
    /// Not parked again until more requests than this have started (bytes of a head were pending at the last park).
    hold_through: u64,
    shutting_down: bool,
}

enum State<S: HttpService<Incoming>> {
    Peeking {
        stream: TcpStream,
        service: S,
        again: Option<Pin<Box<Sleep>>>,
    },
    Http1 {
        connection: Box<http1::Connection<TokioIo<Resumed>, S>>,
        /// When to look at the connection's activity next.
        check: Pin<Box<Sleep>>,
        /// `graceful_shutdown` was called to park it: its end hands the socket back.
        parking: bool,
    },
    Parked {
        stream: TcpStream,
        service: S,
        /// What hyper had read and not parsed: served before anything else.
        pending: Bytes,
    },
    Http2(Pin<Box<Connection<TokioIo<TcpStream>, S>>>),
    Done,
}

impl<S, B> Plain<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Unpin + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(
        stream: TcpStream,
        service: S,
        builders: std::sync::Arc<Builders>,
        activity: std::sync::Arc<dyn Activity>,
        parked: Gauge,
    ) -> Self {
        Plain {
            state: State::Peeking { stream, service, again: None },
            builders,
            activity,
            parked,
            park_after: PARK_AFTER,
            hold_through: 0,
            shutting_down: false,
        }
    }

    /// How long a connection must have had nothing in flight before it is parked ([`PARK_AFTER`] by default).
    pub fn park_after(mut self, after: Duration) -> Self {
        self.park_after = after;
        self
    }

    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        this.shutting_down = true;
        match &mut this.state {
            State::Http2(connection) => connection.as_mut().graceful_shutdown(),
            State::Http1 { connection, parking, .. } => {
                if !*parking {
                    Pin::new(connection.as_mut()).graceful_shutdown();
                }
            }
            State::Parked { .. } => {
                this.parked.dec();
                this.state = State::Done;
            }
            State::Peeking { .. } | State::Done => this.state = State::Done,
        }
    }

    /// Hands `stream` to a new HTTP/1.1 connection, `pending` (bytes read earlier and not parsed) first.
    fn serve_http1(&mut self, stream: TcpStream, service: S, pending: Bytes) {
        let io = TokioIo::new(Resumed { pending, stream });
        let connection = Box::new(self.builders.plain_http1.serve_connection(io, service));
        let check = Box::pin(tokio::time::sleep(self.park_after));
        self.state = State::Http1 { connection, check, parking: false };
    }
}

impl<S: HttpService<Incoming>> Drop for Plain<S> {
    fn drop(&mut self) {
        // Dropped while parked (its task ended from outside): no longer counted.
        if matches!(self.state, State::Parked { .. }) {
            self.parked.dec();
        }
    }
}

/// Whether an HTTP/1.1 connection is to be parked now; if not, `check` is set for the next look.
fn should_park(activity: &dyn Activity, park_after: Duration, hold_through: u64, check: &mut Pin<Box<Sleep>>) -> bool {
    let now = Instant::now();
    match activity.quiet_since() {
        Some(since) if activity.requests() > hold_through => {
            let at = since + park_after;
            if now >= at {
                return true;
            }
            check.as_mut().reset(at);
        }
        _ => check.as_mut().reset(now + park_after),
    }
    false
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
    S::Future: Send + Unpin + 'static,
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
                State::Http2(connection) => return connection.as_mut().poll(cx),
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
                    if http2 {
                        let connection = this.builders.http2.serve_connection(TokioIo::new(stream), service);
                        this.state = State::Http2(Box::pin(connection.into_owned()));
                    } else {
                        this.serve_http1(stream, service, Bytes::new());
                    }
                }
                State::Parked { stream, pending, .. } => {
                    if pending.is_empty()
                        && let Err(e) = ready!(stream.poll_read_ready(cx))
                    {
                        this.parked.dec();
                        this.state = State::Done;
                        return Poll::Ready(Err(e.into()));
                    }
                    let State::Parked { stream, service, pending } = std::mem::replace(&mut this.state, State::Done)
                    else {
                        continue;
                    };
                    this.parked.dec();
                    this.serve_http1(stream, service, pending);
                }
                State::Http1 { connection, check, parking } => {
                    match connection.poll_without_shutdown(cx) {
                        Poll::Pending => {}
                        Poll::Ready(Err(e)) => {
                            this.state = State::Done;
                            return Poll::Ready(Err(e.into()));
                        }
                        Poll::Ready(Ok(())) => {
                            let park = *parking && !this.shutting_down;
                            let State::Http1 { connection, .. } = std::mem::replace(&mut this.state, State::Done)
                            else {
                                continue;
                            };
                            let parts = connection.into_parts();
                            let Resumed { pending: unread, mut stream } = parts.io.into_inner();
                            if !park {
                                // The end hyper would have made: the write side shut, then the socket closed.
                                let _ = Pin::new(&mut stream).poll_shutdown(cx);
                                return Poll::Ready(Ok(()));
                            }
                            // Bytes hyper read come before those it had not read yet.
                            let pending = match (parts.read_buf.is_empty(), unread.is_empty()) {
                                (true, _) => unread,
                                (false, true) => parts.read_buf,
                                (false, false) => [parts.read_buf, unread].concat().into(),
                            };
                            if !pending.is_empty() {
                                this.hold_through = this.activity.requests();
                            }
                            this.parked.inc();
                            this.state = State::Parked { stream, service: parts.service, pending };
                            continue;
                        }
                    }
                    if *parking || this.shutting_down {
                        return Poll::Pending;
                    }
                    while check.as_mut().poll(cx).is_ready() {
                        if should_park(this.activity.as_ref(), this.park_after, this.hold_through, check) {
                            // Idle: hyper closes it without writing anything, and hands the socket back.
                            Pin::new(connection.as_mut()).graceful_shutdown();
                            *parking = true;
                            break;
                        }
                    }
                    if !*parking {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// A plaintext socket as hyper's HTTP/1.1 connection reads it: bytes an earlier connection on it had read and not
/// parsed, then the socket.
struct Resumed {
    pending: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Resumed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pending.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Resumed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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

    mod parking {
        #![allow(clippy::expect_used)]

        use std::convert::Infallible;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        use http_body_util::Full;
        use hyper::service::service_fn;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;

        use super::*;

        const AFTER: Duration = Duration::from_millis(50);

        /// Counts like the accept loop: a request starts when its service is called and ends with its future.
        struct Counting {
            requests: AtomicU64,
            in_flight: AtomicUsize,
            last: Mutex<Instant>,
        }

        impl Counting {
            fn new() -> Arc<Self> {
                Arc::new(Counting {
                    requests: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    last: Mutex::new(Instant::now()),
                })
            }
        }

        impl Activity for Counting {
            fn requests(&self) -> u64 {
                self.requests.load(Ordering::SeqCst)
            }

            fn quiet_since(&self) -> Option<Instant> {
                let last = *self.last.lock().ok()?;
                (self.in_flight.load(Ordering::SeqCst) == 0).then_some(last)
            }
        }

        /// A server of plaintext connections answering `<path> <n>` (the n-th request of its connection); the gauge
        /// of parked connections and a channel that reports each connection's end.
        async fn server() -> (std::net::SocketAddr, Gauge, tokio::sync::mpsc::UnboundedReceiver<bool>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (parked, builders) = (Gauge::default(), Arc::new(Builders::new(Duration::from_secs(75))));
            let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
            let gauge = parked.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let activity = Counting::new();
                    let counting = activity.clone();
                    let service = service_fn(move |request: Request<Incoming>| {
                        let activity = counting.clone();
                        let n = activity.requests.fetch_add(1, Ordering::SeqCst) + 1;
                        activity.in_flight.fetch_add(1, Ordering::SeqCst);
                        Box::pin(async move {
                            let body = format!("{} {n}", request.uri().path());
                            *activity.last.lock().expect("lock") = Instant::now();
                            activity.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        })
                    });
                    let connection =
                        Plain::new(stream, service, builders.clone(), activity, gauge.clone()).park_after(AFTER);
                    let ended_tx = ended_tx.clone();
                    tokio::spawn(async move {
                        let _ = ended_tx.send(connection.await.is_ok());
                    });
                }
            });
            (addr, parked, ended)
        }

        /// Reads one response with a Content-Length body and returns the body.
        async fn response(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> String {
            loop {
                if let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buffered[..end]).to_ascii_lowercase();
                    assert!(head.starts_with("http/1.1 200"), "{head}");
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .expect("content-length");
                    if buffered.len() >= end + 4 + length {
                        let body = String::from_utf8_lossy(&buffered[end + 4..end + 4 + length]).into_owned();
                        buffered.drain(..end + 4 + length);
                        return body;
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                    .await
                    .expect("a response in time")
                    .expect("read");
                assert!(n > 0, "the connection closed; had {:?}", String::from_utf8_lossy(buffered));
                buffered.extend_from_slice(&chunk[..n]);
            }
        }

        fn get(path: &str) -> String {
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n")
        }

        /// Waits until the gauge reads `want` (parking happens `AFTER` a response, on the connection's own task).
        async fn parked_becomes(gauge: &Gauge, want: i64) {
            for _ in 0..200 {
                if gauge.get() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("parked connections: {} (want {want})", gauge.get());
        }

        #[tokio::test]
        async fn an_idle_connection_is_parked_and_serves_its_next_request() {
            let (addr, parked, mut ended) = server().await;
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let mut buffered = Vec::new();
            // Not parked before the first request, however long the client waits.
            tokio::time::sleep(AFTER * 4).await;
            assert_eq!(parked.get(), 0);
            for round in 1..=3 {
                client.write_all(get("/a").as_bytes()).await.expect("write");
                assert_eq!(response(&mut client, &mut buffered).await, format!("/a {round}"));
                parked_becomes(&parked, 1).await;
            }
            drop(client);
            // A parked connection that the client closes ends, and is no longer counted.
            parked_becomes(&parked, 0).await;
            assert_eq!(ended.recv().await, Some(true));
        }

        #[tokio::test]
        async fn a_head_arriving_across_a_park_is_served_whole() {
            let (addr, parked, _ended) = server().await;
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let mut buffered = Vec::new();
            client.write_all(get("/a").as_bytes()).await.expect("write");
            assert_eq!(response(&mut client, &mut buffered).await, "/a 1");
            // Half a head, then silence: parking finds the bytes hyper read and hands them to the next connection.
            let next = get("/b");
            client.write_all(&next.as_bytes()[..9]).await.expect("write");
            tokio::time::sleep(AFTER * 4).await;
            assert_eq!(parked.get(), 0, "a connection with a head pending stays with hyper");
            client.write_all(&next.as_bytes()[9..]).await.expect("write");
            assert_eq!(response(&mut client, &mut buffered).await, "/b 2");
            // After that request, idle again: parked.
            parked_becomes(&parked, 1).await;
            client.write_all(get("/c").as_bytes()).await.expect("write");
            assert_eq!(response(&mut client, &mut buffered).await, "/c 3");
        }

        #[tokio::test]
        async fn pipelined_requests_are_answered_in_order_around_parks() {
            let (addr, parked, _ended) = server().await;
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let mut buffered = Vec::new();
            client.write_all(format!("{}{}", get("/a"), get("/b")).as_bytes()).await.expect("write");
            assert_eq!(response(&mut client, &mut buffered).await, "/a 1");
            assert_eq!(response(&mut client, &mut buffered).await, "/b 2");
            parked_becomes(&parked, 1).await;
            // Written in one go to a parked connection: both are read by the connection that takes the socket.
            client.write_all(format!("{}{}{}", get("/c"), get("/d"), get("/e")).as_bytes()).await.expect("write");
            for (i, path) in ["/c", "/d", "/e"].into_iter().enumerate() {
                assert_eq!(response(&mut client, &mut buffered).await, format!("{path} {}", i + 3));
            }
            parked_becomes(&parked, 1).await;
        }

        #[tokio::test]
        async fn a_parked_connection_shut_down_or_dropped_closes_at_once() {
            for graceful in [true, false] {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let mut client = TcpStream::connect(addr).await.expect("connect");
                let (stream, _) = listener.accept().await.expect("accept");
                let activity = Counting::new();
                let counting = activity.clone();
                let service = service_fn(move |_: Request<Incoming>| {
                    counting.requests.fetch_add(1, Ordering::SeqCst);
                    *counting.last.lock().expect("lock") = Instant::now();
                    Box::pin(async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) })
                });
                let parked = Gauge::default();
                let builders = Arc::new(Builders::new(Duration::from_secs(75)));
                let connection = Plain::new(stream, service, builders, activity, parked.clone());
                let mut connection = Box::pin(connection.park_after(AFTER));
                client.write_all(get("/a").as_bytes()).await.expect("write");
                let mut buffered = Vec::new();
                tokio::select! {
                    body = response(&mut client, &mut buffered) => assert_eq!(body, "ok"),
                    end = connection.as_mut() => panic!("the connection ended: {end:?}"),
                }
                let waited = tokio::time::timeout(AFTER * 4, connection.as_mut()).await;
                assert!(waited.is_err(), "a parked connection waits for its client");
                assert_eq!(parked.get(), 1);
                if graceful {
                    connection.as_mut().graceful_shutdown();
                    assert!(connection.await.is_ok());
                } else {
                    // Its task ended from outside (the runtime shutting down, say).
                    drop(connection);
                }
                assert_eq!(parked.get(), 0, "graceful: {graceful}");
                let mut rest = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
                assert!(matches!(read, Ok(Ok(0))), "closed without a byte: {read:?} {rest:?}");
            }
        }
    }
}
