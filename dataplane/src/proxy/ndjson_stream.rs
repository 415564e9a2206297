//! Bulk export files stream through the gateway line by line (`policy::ndjson::LineFilter`): every line is parsed
//! and verified (`policy::export::line_visible`) as it passes, kept lines get their absolute references moved to
//! the public base, and memory stays bounded by the longest line (16 MiB, beyond which the stream is aborted).

use std::sync::Arc;
use std::time::Duration;

use fhirgw_config::upstream::Upstream;
use hyper::body::Incoming;
use serde_json::Value;

use super::filtered_body::Labels;
use crate::body::Body;
use crate::policy::export::line_visible;
use crate::policy::links::rewrite_references;
use crate::policy::ndjson::{LineError, LineFilter, MAX_LINE_BYTES};
use crate::policy::scopes::{Allowed, Permission, Scopes};
use crate::policy::verify::Grants;

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

/// One export file's line filter with the rules that decide each line.
struct Lines {
    filter: LineFilter,
    rules: LineRules,
}

impl super::filtered_body::ChunkFilter for Lines {
    type Error = LineError;

    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), LineError> {
        let rules = &self.rules;
        self.filter.push(chunk, out, &mut |value| rules.keep(value))
    }

    fn finish(mut self, out: &mut Vec<u8>) -> Result<(usize, usize), LineError> {
        let rules = &self.rules;
        self.filter.finish(out, &mut |value| rules.keep(value)).map(|stats| (stats.kept, stats.dropped))
    }
}

/// The client body: the upstream's NDJSON, verified line by line while it streams (see `filtered_body`).
pub(super) fn filtered(body: Incoming, rules: LineRules, idle: Duration) -> Body {
    let span = tracing::info_span!("filter", lines_kept = tracing::field::Empty, lines_dropped = tracing::field::Empty);
    let lines = Lines { filter: LineFilter::new(MAX_LINE_BYTES), rules };
    let labels = Labels { kept: "lines_kept", dropped: "lines_dropped", what: "NDJSON file" };
    super::filtered_body::filtered(body, lines, idle, span, labels)
}
