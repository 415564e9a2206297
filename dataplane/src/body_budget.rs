//! One process-wide budget for the request bodies the data plane buffers (writes, batch and transaction Bundles,
//! `POST _search` forms, `$export` and `$docref` `Parameters`). Each body may hold up to its own limit; the budget
//! bounds them all at once, so concurrent large writes cannot take the process out of memory.
//!
//! A request's bytes are reserved before they are read: all of `Content-Length` when it is given, otherwise chunk by
//! chunk as they arrive. When the budget cannot take them the request is answered 503 with `Retry-After` without
//! reading the body (or the rest of it). The reservation lives in the request's extensions ([`Lease`]) and is given
//! back when `Proxy::handle` has the response head, by which time the parsed body and what was made from it are gone.
//!
//! A reservation is only as good as the client's pace: a body that stalls for [`BodyTiming::idle`], or is not
//! complete within [`BodyTiming::total`], is answered 408 and its share given back, so a few clients that declare
//! large bodies and then send nothing cannot hold the budget (and every other caller's writes) for ever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, HeaderMap};
use http::request::Parts;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;

use crate::outcome::Outcome;

/// Reserved in steps of at least this much when the length is not known up front.
const STEP: usize = 64 * 1024;
/// How much of a refused body is read and discarded, and for how long (see [`discard`]).
const LINGER_BYTES: u64 = 32 * 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a client may take over its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTiming {
    /// Longest wait for the next bytes of a body (buffered bodies and raw uploads): 408 past it.
    pub idle: Duration,
    /// Longest time to receive a whole buffered body (at most 16 MiB): 408 past it. Raw uploads (up to 1 GiB) are
    /// bounded by `idle` only.
    pub total: Duration,
}

impl Default for BodyTiming {
    fn default() -> Self {
        BodyTiming { idle: Duration::from_secs(30), total: Duration::from_secs(60) }
    }
}

#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
    /// `fhirgw_dp_request_body_bytes_reserved`.
    gauge: Gauge,
    timing: BodyTiming,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_gauge(limit, Gauge::default(), BodyTiming::default())
    }

    /// A budget that reports what is reserved in `gauge`, for bodies that arrive within `timing`.
    pub fn with_gauge(limit: usize, gauge: Gauge, timing: BodyTiming) -> Arc<Self> {
        Arc::new(BodyBudget { limit, used: AtomicUsize::new(0), gauge, timing })
    }

    /// Bytes reserved right now, by all requests.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if taken {
            self.gauge.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
        taken
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.gauge.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// One request's share of the budget, held in its extensions until the response head.
#[derive(Debug, Clone)]
pub struct Lease(Arc<Mutex<Held>>);

#[derive(Debug)]
struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

impl Lease {
    pub fn new(budget: Arc<BodyBudget>) -> Self {
        Lease(Arc::new(Mutex::new(Held { budget, bytes: 0 })))
    }

    /// How long the client may take over its body.
    pub fn timing(&self) -> BodyTiming {
        self.0.lock().map_or_else(|_| BodyTiming::default(), |held| held.budget.timing)
    }

    /// Makes sure `total` bytes are reserved for this request; false when the budget cannot take them.
    fn reserve(&self, total: usize) -> bool {
        let Ok(mut held) = self.0.lock() else { return false };
        if total <= held.bytes {
            return true;
        }
        let more = total - held.bytes;
        if !held.budget.try_take(more) {
            return false;
        }
        held.bytes = total;
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body budget is used up")]
    Busy,
    #[error("request Content-Encoding `{0}` is not accepted")]
    Encoding(String),
    #[error("reading the request body: {0}")]
    Read(#[source] hyper::Error),
    #[error("the client sent nothing of its body for {0:?}")]
    Idle(std::time::Duration),
    #[error("the request body did not arrive within {0:?}")]
    Slow(std::time::Duration),
}

impl BodyError {
    pub fn outcome(&self) -> Outcome {
        match self {
            BodyError::TooLarge { limit } => Outcome::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
                format!("The request body is larger than the {limit} bytes accepted here."),
            ),
            BodyError::Busy => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway is busy with other large requests; retry later.",
            )
            .retry_after(1),
            BodyError::Encoding(coding) => Outcome::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!("Content-Encoding `{coding}` is not accepted; send the body uncompressed."),
            ),
            BodyError::Read(_) => {
                Outcome::new(StatusCode::BAD_REQUEST, "invalid", "The request body could not be read.")
            }
            BodyError::Idle(after) => Outcome::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("The request body stalled: nothing arrived for {} seconds.", after.as_secs()),
            ),
            BodyError::Slow(within) => Outcome::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("The request body did not arrive within {} seconds.", within.as_secs()),
            ),
        }
    }
}

/// The one `Content-Encoding` accepted on a request body: none (or `identity`).
pub(crate) fn check_encoding(headers: &HeaderMap) -> Result<(), BodyError> {
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().unwrap_or("(not text)");
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("identity") {
                return Err(BodyError::Encoding(coding.chars().take(32).collect()));
            }
        }
    }
    Ok(())
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Reads a request body of at most `max` bytes into one buffer, within the process-wide budget (the request's
/// [`Lease`]; a request without one is bounded by `max` only).
pub async fn read(request: Request<Incoming>, max: usize) -> Result<(Parts, Bytes), BodyError> {
    let (parts, mut body) = request.into_parts();
    match read_into(&parts, &mut body, max).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(e) => {
            if !matches!(e, BodyError::Read(_)) {
                discard(body, content_length(&parts.headers));
            }
            Err(e)
        }
    }
}

/// What is left of a refused body is read and thrown away (never buffered) for a while, so the client, still
/// sending, reads its 413/415/503 instead of a reset (a "lingering close"). Past [`LINGER_BYTES`] or
/// [`LINGER_TIME`] the body is dropped and the connection closed.
pub(crate) fn discard(mut body: Incoming, declared: Option<u64>) {
    if declared.is_some_and(|length| length > LINGER_BYTES) {
        return;
    }
    tokio::spawn(async move {
        let mut seen = 0u64;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > LINGER_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

async fn read_into(parts: &Parts, body: &mut Incoming, max: usize) -> Result<Bytes, BodyError> {
    check_encoding(&parts.headers)?;
    let lease = parts.extensions.get::<Lease>().cloned();
    let reserve = |total: usize| lease.as_ref().is_none_or(|l| l.reserve(total));
    let declared = content_length(&parts.headers);
    let mut buffer = Vec::new();
    if let Some(length) = declared {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length > max {
            return Err(BodyError::TooLarge { limit: max });
        }
        if !reserve(length) {
            return Err(BodyError::Busy);
        }
        // One allocation of the right size: no chunk list copied into a second buffer.
        buffer.reserve_exact(length);
    }
    let mut reserved = declared.map_or(0, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let timing = lease.as_ref().map_or_else(BodyTiming::default, Lease::timing);
    let deadline = tokio::time::Instant::now() + timing.total;
    loop {
        let next = tokio::time::timeout(timing.idle, tokio::time::timeout_at(deadline, body.frame()));
        let frame = match next.await {
            Err(_) => return Err(BodyError::Idle(timing.idle)),
            Ok(Err(_)) => return Err(BodyError::Slow(timing.total)),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(frame))) => frame,
        };
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else { continue };
        let total = buffer.len() + data.len();
        if total > max {
            return Err(BodyError::TooLarge { limit: max });
        }
        if total > reserved {
            let want = total.max(reserved + STEP).min(max);
            if !reserve(want) {
                return Err(BodyError::Busy);
            }
            reserved = want;
        }
        buffer.extend_from_slice(&data);
    }
    Ok(Bytes::from(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = BodyBudget::new(100);
        let (a, b) = (Lease::new(budget.clone()), Lease::new(budget.clone()));
        assert!(a.reserve(60));
        assert!(a.reserve(40), "already held");
        assert!(!b.reserve(41), "over what is left");
        assert!(b.reserve(40));
        assert_eq!(budget.used(), 100);
        assert!(!a.reserve(61));
        let copy = a.clone();
        drop(a);
        assert_eq!(budget.used(), 100, "held until the last clone goes");
        drop(copy);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn content_encodings() {
        let cases: &[(&[&str], bool)] = &[
            (&[], true),
            (&["identity"], true),
            (&["IDENTITY"], true),
            (&["gzip"], false),
            (&["identity, gzip"], false),
            (&["br"], false),
            (&["identity", "deflate"], false),
        ];
        for (values, ok) in cases {
            let mut headers = HeaderMap::new();
            for v in *values {
                headers.append(CONTENT_ENCODING, http::HeaderValue::from_static(v));
            }
            assert_eq!(check_encoding(&headers).is_ok(), *ok, "{values:?}");
        }
    }

    #[test]
    fn outcomes() {
        assert_eq!(BodyError::TooLarge { limit: 1 }.outcome().status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(BodyError::Busy.outcome().status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(BodyError::Encoding("gzip".into()).outcome().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
