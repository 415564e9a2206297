//! Bulk export files stream through the gateway line by line (`policy::ndjson::LineFilter`): every line is parsed
//! and verified (`policy::export::line_visible`) as it passes, kept lines get their absolute references moved to
//! the public base, and memory stays bounded by the longest line (16 MiB, beyond which the stream is aborted).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fhirgw_config::upstream::Upstream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::{debug, warn};

use super::links::rewrite_references;
use crate::authn::scopes::{Allowed, Permission, Scopes};
use crate::policy::export::line_visible;
use crate::policy::ndjson::{LineFilter, MAX_LINE_BYTES};
use crate::policy::verify::Grants;
use crate::upstream::{Body, BoxError};

/// Everything one file's verification needs, owned: the body outlives the request handler.
pub(super) struct LineRules {
    pub grants: Grants,
    pub scopes: Scopes,
    /// The resource type the manifest declared for the file.
    pub declared: Option<String>,
    pub upstream: Arc<Upstream>,
    pub public: String,
}

impl LineRules {
    fn keep(&self, mut resource: Value) -> Option<Value> {
        let allowed = |ty: &str| self.scopes.allows(ty, Permission::Read) == Allowed::Tenant;
        if !line_visible(&resource, self.declared.as_deref(), &self.grants, &allowed) {
            return None;
        }
        rewrite_references(&mut resource, &self.upstream, &self.public);
        Some(resource)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream body idle for more than {0:?}")]
struct IdleTimeout(Duration);

/// The client body: the upstream's NDJSON, verified line by line while it streams. An error (upstream failure,
/// idle timeout, over-long line) ends the body with an error, so the client sees a reset rather than a file that
/// looks complete.
pub(super) fn filtered(body: Incoming, rules: LineRules, idle: Duration) -> Body {
    let span = tracing::info_span!("filter", lines_kept = tracing::field::Empty, lines_dropped = tracing::field::Empty);
    let filter = LineFilter::new(MAX_LINE_BYTES);
    let stream = futures_util::stream::unfold(Some((body, filter, rules, span)), move |state| async move {
        let (mut body, mut filter, rules, span) = state?;
        let mut keep = |value: Value| rules.keep(value);
        loop {
            let next = match tokio::time::timeout(idle, body.frame()).await {
                Ok(next) => next,
                Err(_) => return Some((Err(Box::new(IdleTimeout(idle)) as BoxError), None)),
            };
            match next {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let mut out = Vec::new();
                    if let Err(e) = filter.push(&data, &mut out, &mut keep) {
                        warn!(error = %e, "upstream NDJSON rejected while streaming");
                        return Some((Err(Box::new(e) as BoxError), None));
                    }
                    if !out.is_empty() {
                        return Some((Ok(Frame::data(Bytes::from(out))), Some((body, filter, rules, span))));
                    }
                }
                Some(Err(e)) => return Some((Err(Box::new(e) as BoxError), None)),
                None => {
                    let mut out = Vec::new();
                    return match filter.finish(&mut out, &mut keep) {
                        Ok(stats) => {
                            span.record("lines_kept", i64::try_from(stats.kept).unwrap_or(i64::MAX))
                                .record("lines_dropped", i64::try_from(stats.dropped).unwrap_or(i64::MAX));
                            debug!(parent: &span, kept = stats.kept, dropped = stats.dropped, "export file verified");
                            Some((Ok(Frame::data(Bytes::from(out))), None))
                        }
                        Err(e) => Some((Err(Box::new(e) as BoxError), None)),
                    };
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}
