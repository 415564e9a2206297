//! Accept loop shared by the FHIR and admin listeners: HTTP/1.1 and HTTP/2 (chosen per connection by
//! [`crate::protocol`]), bounded connections, graceful drain.
//!
//! Limits (see README, "Connections"): at most `max_connections` at once (a semaphore permit per connection); a
//! connection that has not sent a whole request head within `first_request_timeout` of accept is closed, and one
//! with nothing in flight for `idle_timeout` is closed gracefully (HTTP/2: GOAWAY). At the cap, the oldest
//! connection that has not sent a request yet is evicted to make room (a client that connects and sends at once is
//! served even while hundreds of silent connections are held open); if there is none, the new connection is closed
//! at once. Either condition is logged once per interval and counted.
//!
//! With TLS (`--tls-cert-file`), the handshake happens on the connection's own task, inside the same limits: it
//! holds a connection permit, may be evicted at the cap, and must be over before the first-request timeout (which
//! runs from accept), so a client that opens a connection and never finishes its handshake is closed like one that
//! never sends a request. ALPN offers `h2` and `http/1.1`; the certificate is reloaded from its files (each
//! handshake takes the current one).
//!
//! Shutdown follows [`Phase`]: while `Draining`, HTTP/1.1 responses carry `Connection: close` and HTTP/2
//! connections get GOAWAY; at `Stopping` the listener closes, and each connection closes once nothing is in flight
//! and it has been quiet for [`QUIET`] (a request already on its way on it is answered, not dropped).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fhirgw_tls::explain::HandshakeLog;
use fhirgw_tls::reload::Reloading;
use fhirgw_tls::server::ServerTls;
use fhirgw_tls::tokio_rustls::server::TlsStream;
use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::{Body, BoxError};
use crate::lifecycle::Phase;
use crate::limits::Throttled;
use crate::metrics::ListenerMetrics;
use crate::protocol::{Activity, Builders, Plain};

/// While stopping, a connection with nothing in flight closes once it has been quiet this long: long enough for a
/// client that has just connected, or just read a response, to have sent the request it was about to send.
pub const QUIET: Duration = Duration::from_secs(1);
/// How often a condition at the cap or an accept error is logged at most.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
    /// After the listener closes, how long connections get to finish before the server returns anyway.
    pub drain: Duration,
}

/// What one connection has done, shared between its task, its requests and the eviction queue.
#[derive(Debug)]
struct Conn {
    accepted: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds from `accepted` to the last request start or response end.
    last_active_ms: AtomicU64,
    http2: AtomicBool,
    /// The last finished exchange left the connection at the start of the next request (see
    /// [`request_ends_cleanly`]).
    clean: AtomicBool,
    evict: Notify,
}

impl Conn {
    fn new(accepted: Instant) -> Self {
        Conn {
            accepted,
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            clean: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn view(&self) -> ConnView {
        ConnView {
            accepted: self.accepted,
            requests: self.requests.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last_active: self.accepted + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)),
        }
    }
}

impl Activity for Conn {
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn quiet_since(&self) -> Option<Instant> {
        let view = self.view();
        (view.in_flight == 0 && self.clean.load(Ordering::Relaxed)).then_some(view.last_active)
    }
}

/// Whether an HTTP/1.1 request leaves its connection exactly at the start of the next request once answered, so that
/// the connection may be parked: it had no body (hyper stops reading a body the handler left unread and closes the
/// connection after the response; parked, what is left of that body would be read as the next request) and it does
/// not ask to close. HTTP/1.0 and HTTP/2 are never parked. The response must not ask to close either.
fn request_ends_cleanly(version: Version, body_empty: bool, headers: &http::HeaderMap) -> bool {
    version == Version::HTTP_11 && body_empty && !asks_to_close(headers)
}

/// A `Connection` header with the `close` option (or one that cannot be read).
fn asks_to_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(|option| option.trim().eq_ignore_ascii_case("close"))))
}

/// A request in flight on a connection; ends when the response body is finished or dropped.
struct RequestGuard {
    conn: Arc<Conn>,
    /// The exchange ends cleanly (see [`request_ends_cleanly`]); decided when the response head is known.
    clean: bool,
}

impl RequestGuard {
    fn start(conn: Arc<Conn>, version: Version) -> Self {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.clean.store(false, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            conn.http2.store(true, Ordering::Relaxed);
        }
        conn.touch();
        RequestGuard { conn, clean: false }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.touch();
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn.clean.store(self.clean, Ordering::Relaxed);
        }
    }
}

/// The response body, holding its request's guard.
struct Tracked {
    inner: Body,
    _guard: Option<RequestGuard>,
}

/// The answer to one request: the handler's response, with `Connection: close` while draining (HTTP/1.1), its body
/// holding the request's guard. A future of its own rather than an `async` block, so that it is `Unpin` without a
/// box per request (a plaintext HTTP/1.1 connection is polled through `&mut`, to hand its socket back when parked).
struct Respond<F> {
    response: F,
    guard: Option<RequestGuard>,
    http1: bool,
    /// [`request_ends_cleanly`]: HTTP/1.1, no body, no `Connection: close`.
    clean_request: bool,
    phase: watch::Receiver<Phase>,
}

impl<F> Future for Respond<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Unpin,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(mut response) = std::task::ready!(Pin::new(&mut self.response).poll(cx));
        // Shutting down: this connection's last response.
        if self.http1 && *self.phase.borrow() >= Phase::Draining {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let clean = self.clean_request && !asks_to_close(response.headers());
        let mut guard = self.guard.take();
        if let Some(guard) = &mut guard {
            guard.clean = clean;
        }
        Poll::Ready(Ok(response.map(|inner| Tracked { inner, _guard: guard }.boxed_unsync())))
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connections that have not sent a request yet, oldest first: the ones evicted at the cap.
struct Unused {
    queue: Mutex<VecDeque<Weak<Conn>>>,
    prune_at: usize,
}

impl Unused {
    fn push(&self, conn: &Arc<Conn>) {
        let Ok(mut queue) = self.queue.lock() else { return };
        if queue.len() >= self.prune_at {
            queue.retain(|w| w.upgrade().is_some_and(|c| c.requests.load(Ordering::Relaxed) == 0));
        }
        queue.push_back(Arc::downgrade(conn));
    }

    /// Signals the oldest connection that has sent nothing to close; false when there is none.
    fn evict_oldest(&self) -> bool {
        let Ok(mut queue) = self.queue.lock() else { return false };
        while let Some(weak) = queue.pop_front() {
            if let Some(conn) = weak.upgrade()
                && conn.requests.load(Ordering::Relaxed) == 0
            {
                conn.evict.notify_one();
                return true;
            }
        }
        false
    }
}

/// A connection's state at one instant, for [`next_action`].
#[derive(Debug, Clone, Copy)]
struct ConnView {
    accepted: Instant,
    requests: u64,
    in_flight: usize,
    last_active: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    FirstRequestTimeout,
    Idle,
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Wait(Instant),
    /// Drop the connection: it has sent nothing, so nothing can be lost.
    Close(Close),
    /// Let hyper close it: HTTP/1.1 closes once idle, HTTP/2 sends GOAWAY and finishes its streams.
    Graceful(Close),
}

/// What to do with a connection now, given its state, the phase and the limits.
fn next_action(c: ConnView, now: Instant, phase: Phase, limits: &Limits) -> Action {
    let stopping = phase >= Phase::Stopping;
    // While draining, HTTP/2 connections opened meanwhile must get their GOAWAY soon after their first stream.
    let cap = |at: Instant| if phase >= Phase::Draining { at.min(now + Duration::from_millis(100)) } else { at };
    if c.requests == 0 {
        let deadline = c.accepted + limits.first_request_timeout;
        if now >= deadline {
            return Action::Close(Close::FirstRequestTimeout);
        }
        if stopping {
            if now >= c.accepted + QUIET {
                return Action::Graceful(Close::Drain);
            }
            return Action::Wait(deadline.min(c.accepted + QUIET));
        }
        return Action::Wait(cap(deadline));
    }
    if c.in_flight > 0 {
        return Action::Wait(cap(now + limits.idle_timeout));
    }
    if now >= c.last_active + limits.idle_timeout {
        return Action::Graceful(Close::Idle);
    }
    if stopping {
        if now >= c.last_active + QUIET {
            return Action::Graceful(Close::Drain);
        }
        return Action::Wait(c.last_active + QUIET);
    }
    Action::Wait(cap(c.last_active + limits.idle_timeout))
}

/// Runs one connection to its end, applying the timeouts, eviction and the shutdown phases. A macro rather than a
/// function: hyper-util's connection type would need its whole set of bounds spelled out again.
macro_rules! drive {
    ($connection:expr, $conn:expr, $phase:expr, $limits:expr, $metrics:expr, $peer:expr) => {{
        let (conn, limits, metrics, peer) = ($conn, $limits, $metrics, $peer);
        let mut phase = $phase;
        let connection = $connection;
        tokio::pin!(connection);
        let mut graceful = false;
        loop {
            let current = *phase.borrow_and_update();
            if current >= Phase::Draining && !graceful && conn.http2.load(Ordering::Relaxed) {
                // GOAWAY: the client sends its next requests on a new connection (to this or another replica).
                connection.as_mut().graceful_shutdown();
                graceful = true;
            }
            let wait = match next_action(conn.view(), Instant::now(), current, limits) {
                Action::Wait(at) => at,
                Action::Close(reason) => {
                    if reason == Close::FirstRequestTimeout {
                        metrics.closed_first_request_timeout.inc();
                    }
                    debug!(%peer, ?reason, "closing a connection that sent no request");
                    break;
                }
                Action::Graceful(reason) => {
                    if !graceful {
                        // Whatever the client sent meanwhile is taken in first (one poll of the connection): a
                        // request that arrived just now starts and is answered rather than dropped with the close.
                        let before = conn.requests.load(Ordering::Relaxed);
                        let polled = std::future::poll_fn(|cx| Poll::Ready(connection.as_mut().poll(cx))).await;
                        if let Poll::Ready(result) = polled {
                            if let Err(e) = result {
                                debug!(%peer, error = %e, "connection ended with an error");
                            }
                            break;
                        }
                        if conn.requests.load(Ordering::Relaxed) != before {
                            continue;
                        }
                        if reason == Close::Idle {
                            metrics.closed_idle.inc();
                        }
                        connection.as_mut().graceful_shutdown();
                        graceful = true;
                    }
                    // Looked at again later all the same: an HTTP/2 connection may still carry streams.
                    Instant::now() + limits.idle_timeout.min(QUIET)
                }
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = tokio::time::sleep_until(wait) => {}
                changed = phase.changed() => {
                    if changed.is_err() {
                        // The server is gone: nothing will move the phase again.
                        phase = watch::channel(Phase::Stopping).1;
                    }
                }
                () = conn.evict.notified() => {
                    if conn.requests.load(Ordering::Relaxed) == 0 {
                        metrics.closed_evicted.inc();
                        debug!(%peer, "evicting a connection that sent no request, to make room at the connection limit");
                        break;
                    }
                }
            }
        }
    }};
}

/// A TLS handshake under the connection's limits (see the module doc).
struct Handshake<'a> {
    conn: &'a Conn,
    limits: &'a Limits,
    metrics: &'a ListenerMetrics,
    peer: SocketAddr,
}

impl Handshake<'_> {
    async fn run(
        self,
        stream: TcpStream,
        tls: &Reloading<ServerTls>,
        mut phase: watch::Receiver<Phase>,
        log: &HandshakeLog,
    ) -> Option<TlsStream<TcpStream>> {
        let accept = tls.current().acceptor().accept(stream);
        tokio::pin!(accept);
        loop {
            let current = *phase.borrow_and_update();
            let wait = match next_action(self.conn.view(), Instant::now(), current, self.limits) {
                Action::Wait(at) => at,
                Action::Close(Close::FirstRequestTimeout) => {
                    self.metrics.closed_first_request_timeout.inc();
                    debug!(peer = %self.peer, "closing a connection whose TLS handshake did not finish in time");
                    return None;
                }
                Action::Close(_) | Action::Graceful(_) => return None,
            };
            tokio::select! {
                result = &mut accept => return match result {
                    Ok(stream) => Some(stream),
                    Err(e) => {
                        self.metrics.closed_tls_handshake.inc();
                        log.refused(self.peer, &e, "the client");
                        None
                    }
                },
                () = tokio::time::sleep_until(wait) => {}
                changed = phase.changed() => if changed.is_err() {
                    return None;
                },
                () = self.conn.evict.notified() => {
                    self.metrics.closed_evicted.inc();
                    debug!(peer = %self.peer, "evicting a connection still in its TLS handshake, to make room at the connection limit");
                    return None;
                }
            }
        }
    }
}

/// One connection the kernel has already completed on `listener`, asked of the kernel directly: the runtime's
/// readiness for the listener may lag behind its accept queue (a busy worker has not seen the event yet), and a
/// connection left in the queue is reset when the listener closes, its request written and never answered.
fn accept_pending(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    use rustix::net::{SocketFlags, accept_with};
    let fd = accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC).ok()?;
    let stream = std::net::TcpStream::from(fd);
    let peer = stream.peer_addr().ok()?;
    Some((TcpStream::from_std(stream).ok()?, peer))
}

/// Serves `listener` until `phase` reaches [`Phase::Stopping`], then stops accepting and returns once every
/// connection has closed, or `limits.drain` later.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    mut phase: watch::Receiver<Phase>,
    metrics: ListenerMetrics,
    name: &'static str,
    tls: Option<Arc<Reloading<ServerTls>>>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + Unpin + 'static,
{
    let builders = Arc::new(Builders::new(limits.idle_timeout));
    let handshake_log = Arc::new(HandshakeLog::new(name));
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let unused = Arc::new(Unused { queue: Mutex::new(VecDeque::new()), prune_at: max.saturating_mul(2) + 64 });
    let (at_cap, accept_errors) = (Throttled::new(LOG_INTERVAL), Throttled::new(LOG_INTERVAL));
    let mut stopping = false;
    loop {
        let accepted = if stopping {
            // Connections the kernel has completed already are served rather than reset along with the listener.
            match accept_pending(&listener) {
                Some(pair) => Ok(pair),
                None => break,
            }
        } else {
            tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p >= Phase::Stopping) => {
                    stopping = true;
                    continue;
                }
                accepted = listener.accept() => accepted,
            }
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning; the connection stays in the backlog.
                metrics.refused_accept_error.inc();
                if let Some(times) = accept_errors.hit() {
                    warn!(listener = name, error = %e, times, "accept failed (logged at most once per 10 s)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if unused.evict_oldest() => {
                tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            drop(stream);
            metrics.refused_limit.inc();
            if let Some(times) = at_cap.hit() {
                warn!(
                    listener = name,
                    max_connections = max,
                    refused = times,
                    "at the connection limit with no idle connection to evict; refusing connections (logged at most once per 10 s)"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::new(Instant::now()));
        unused.push(&conn);
        let service = {
            let (conn, phase, handler) = (conn.clone(), phase.clone(), handler.clone());
            service_fn(move |request: Request<Incoming>| {
                let guard = RequestGuard::start(conn.clone(), request.version());
                let http1 = request.version() < Version::HTTP_2;
                let clean_request =
                    request_ends_cleanly(request.version(), request.body().is_end_stream(), request.headers());
                let response = handler(request, peer);
                Respond { response, guard: Some(guard), http1, clean_request, phase: phase.clone() }
            })
        };
        let (phase, metrics, builders) = (phase.clone(), metrics.clone(), builders.clone());
        let (tls, handshake_log) = (tls.clone(), handshake_log.clone());
        metrics.open.inc();
        // Two task types, so that a plaintext connection's task is not sized for the TLS handshake and stream (the
        // task is allocated at its largest state: ~7.8 KB with both, per idle connection).
        match tls {
            None => {
                tokio::spawn(async move {
                    let activity: Arc<dyn Activity> = conn.clone();
                    let connection = Plain::new(stream, service, builders, activity, metrics.parked.clone());
                    drive!(connection, &conn, phase, &limits, &metrics, peer);
                    metrics.open.dec();
                    drop(permit);
                });
            }
            Some(tls) => {
                tokio::spawn(async move {
                    let handshake = Handshake { conn: &conn, limits: &limits, metrics: &metrics, peer };
                    if let Some(stream) = handshake.run(stream, &tls, phase.clone(), &handshake_log).await {
                        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                        let connection = builders.tls(TokioIo::new(stream), alpn.as_deref(), service);
                        drive!(connection, &conn, phase, &limits, &metrics, peer);
                    }
                    metrics.open.dec();
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    info!(listener = name, "listener closed; answering what has arrived");
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    match tokio::time::timeout(limits.drain, permits.acquire_many(all)).await {
        Ok(_) => info!(listener = name, "drained"),
        Err(_) => warn!(listener = name, "drain time over; closing the remaining connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 10,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(25),
        }
    }

    #[test]
    fn connection_actions() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let view = |requests, in_flight, last_active: Duration| ConnView {
            accepted: t0,
            requests,
            in_flight,
            last_active: t0 + last_active,
        };
        let l = limits();
        use Action::{Graceful, Wait};
        use Close::{Drain, FirstRequestTimeout, Idle};
        use Phase::{Draining, Serving, Stopping};
        let cases = [
            // Silent: waits for the first-request deadline, then is dropped.
            (view(0, 0, s(0)), s(1), Serving, Wait(t0 + s(10))),
            (view(0, 0, s(0)), s(10), Serving, Action::Close(FirstRequestTimeout)),
            // Busy: never closed for idleness.
            (view(3, 1, s(1)), s(500), Serving, Wait(t0 + s(560))),
            // Keep-alive idle: closed gracefully after the idle timeout since the last response.
            (view(3, 0, s(5)), s(30), Serving, Wait(t0 + s(65))),
            (view(3, 0, s(5)), s(65), Serving, Graceful(Idle)),
            // Stopping: quiet connections go, busy and just-active ones stay a moment.
            (view(3, 0, s(5)), s(6), Stopping, Graceful(Drain)),
            (view(3, 0, s(5)), s(5), Stopping, Wait(t0 + s(6))),
            (view(3, 1, s(5)), s(9), Stopping, Wait(t0 + s(9) + Duration::from_millis(100))),
            (view(0, 0, s(0)), Duration::from_millis(500), Stopping, Wait(t0 + s(1))),
            (view(0, 0, s(0)), s(2), Stopping, Graceful(Drain)),
            // Draining: still serving, but checked often (HTTP/2 GOAWAY).
            (view(1, 0, s(1)), s(2), Draining, Wait(t0 + s(2) + Duration::from_millis(100))),
        ];
        for (i, (view, at, phase, want)) in cases.into_iter().enumerate() {
            assert_eq!(next_action(view, t0 + at, phase, &l), want, "case {i}");
        }
    }

    /// Only an HTTP/1.1 request without a body and without `Connection: close` may leave its connection parked.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn requests_that_end_cleanly() {
        type Case<'a> = (&'a str, Version, bool, &'a [(&'a str, &'a str)], bool);
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (name, value) in pairs {
                h.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(value.as_bytes()).unwrap(),
                );
            }
            h
        };
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("GET", Version::HTTP_11, true, &[], true),
            ("keep-alive asked", Version::HTTP_11, true, &[("connection", "keep-alive")], true),
            ("a body", Version::HTTP_11, false, &[], false),
            ("close", Version::HTTP_11, true, &[("connection", "close")], false),
            ("Close among options", Version::HTTP_11, true, &[("connection", "x-a, Close")], false),
            ("close on a second line", Version::HTTP_11, true, &[("connection", "keep-alive"), ("connection", "close")], false),
            ("unreadable Connection", Version::HTTP_11, true, &[("connection", "\u{e9}")], false),
            ("closed-ish token", Version::HTTP_11, true, &[("connection", "closed")], true),
            ("HTTP/1.0", Version::HTTP_10, true, &[("connection", "keep-alive")], false),
            ("HTTP/2", Version::HTTP_2, true, &[], false),
        ];
        for (what, version, body_empty, pairs, want) in cases {
            assert_eq!(request_ends_cleanly(*version, *body_empty, &headers(pairs)), *want, "{what}");
        }
    }

    #[test]
    fn eviction_takes_the_oldest_connection_that_sent_nothing() {
        let unused = Unused { queue: Mutex::new(VecDeque::new()), prune_at: 4 };
        let conns: Vec<Arc<Conn>> = (0..3).map(|_| Arc::new(Conn::new(Instant::now()))).collect();
        for c in &conns {
            unused.push(c);
        }
        drop(RequestGuard::start(conns[0].clone(), Version::HTTP_11));
        assert!(unused.evict_oldest());
        assert_eq!(conns[0].requests.load(Ordering::Relaxed), 1, "a used connection is skipped");
        // conns[1] was signalled: its permit is stored for the task to see.
        let notified = conns[1].evict.notified();
        tokio::pin!(notified);
        assert!(notified.as_mut().enable(), "the oldest unused connection is told to close");
        assert!(unused.evict_oldest());
        assert!(!unused.evict_oldest(), "none left");
        // Pruning keeps the queue bounded by live, unused connections.
        for _ in 0..10 {
            unused.push(&conns[0]);
        }
        assert!(unused.queue.lock().map(|q| q.len()).unwrap_or_default() <= 5);
    }
}
