//! The one driver for response bodies the gateway verifies while they stream (Bundles, bulk NDJSON files): each
//! upstream frame goes through a [`ChunkFilter`] and only its output reaches the client. An upstream error, a body
//! idle for longer than the upstream's timeout, or a filter error ends the client's body with an error, so the
//! client sees a reset, never a document that looks complete but was not verified. Errors carry their reason
//! ([`Aborted`]): the metrics body wrapper counts them, logs them at warn with the trace id and fails the request
//! span.

use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tracing::{Span, debug};

use crate::body::Body;
use crate::metrics::Aborted;

/// An incremental, synchronous filter over the bytes of one response body.
pub(super) trait ChunkFilter: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Feeds one chunk; what may be sent so far is appended to `out`.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Self::Error>;
    /// The end of the body: the rest of the output, and how many items were (kept, dropped).
    fn finish(self, out: &mut Vec<u8>) -> Result<(usize, usize), Self::Error>;
}

/// What the `filter` span records and the log says about one kind of body.
pub(super) struct Labels {
    /// Span fields for the kept and dropped counts (declared `Empty` on `span`).
    pub kept: &'static str,
    pub dropped: &'static str,
    /// What the body is, for the log ("Bundle", "NDJSON file").
    pub what: &'static str,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream body idle for more than {0:?}")]
struct IdleTimeout(Duration);

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The client's body: `body` through `filter`, with `span` (a child of the request's) living as long as it streams.
pub(super) fn filtered<F: ChunkFilter>(body: Incoming, filter: F, idle: Duration, span: Span, labels: Labels) -> Body {
    let stream = futures_util::stream::unfold(Some((body, filter, span)), move |state| async move {
        let (mut body, mut filter, span) = state?;
        loop {
            let next = match tokio::time::timeout(idle, body.frame()).await {
                Ok(next) => next,
                Err(_) => return Some((Err(Aborted::boxed("upstream_idle", IdleTimeout(idle))), None)),
            };
            match next {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    // Room for the whole chunk: kept bytes are most of it, and growing would copy them again.
                    let mut out = Vec::with_capacity(data.len() + 256);
                    if let Err(e) = filter.push(&data, &mut out) {
                        debug!(parent: &span, error = %e, "upstream {} rejected while streaming", labels.what);
                        return Some((Err(Aborted::boxed("unverifiable", e)), None));
                    }
                    if !out.is_empty() {
                        return Some((Ok(Frame::data(Bytes::from(out))), Some((body, filter, span))));
                    }
                }
                Some(Err(e)) => return Some((Err(Aborted::boxed("upstream_error", e)), None)),
                None => {
                    let mut out = Vec::new();
                    return match filter.finish(&mut out) {
                        Ok((kept, dropped)) => {
                            span.record(labels.kept, count(kept)).record(labels.dropped, count(dropped));
                            debug!(parent: &span, kept, dropped, "{} verified", labels.what);
                            Some((Ok(Frame::data(Bytes::from(out))), None))
                        }
                        Err(e) => {
                            debug!(parent: &span, error = %e, "upstream {} rejected at its end", labels.what);
                            Some((Err(Aborted::boxed("unverifiable", e)), None))
                        }
                    };
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// A body the gateway passes through unchanged once the plan has checked what it is (a Binary's content at the
/// version checked): the upstream's frames as they come, no copy, with the same idle timeout and abort accounting
/// as the verified bodies above.
pub(super) fn passthrough(body: Incoming, idle: Duration, what: &'static str) -> Body {
    let stream = futures_util::stream::unfold(Some(body), move |state| async move {
        let mut body = state?;
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => Some((Err(Aborted::boxed("upstream_idle", IdleTimeout(idle))), None)),
            Ok(Some(Ok(frame))) => Some((Ok(frame), Some(body))),
            Ok(Some(Err(e))) => {
                debug!(error = %e, "upstream {what} failed while streaming");
                Some((Err(Aborted::boxed("upstream_error", e)), None))
            }
            Ok(None) => None,
        }
    });
    StreamBody::new(stream).boxed_unsync()
}
