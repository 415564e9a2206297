//! Bulk export files stream through the gateway line by line (`policy::ndjson::LineFilter`): every line is verified
//! (`policy::export::line_visible`, or the same rule on its light view) as it passes, kept lines that mention the
//! upstream get their absolute references moved to the public base, and memory stays bounded by the longest line
//! (16 MiB, beyond which the stream is aborted).

use std::sync::Arc;
use std::time::Duration;

use fhirgw_config::upstream::Upstream;
use hyper::body::Incoming;
use serde_json::Value;

use super::filtered_body::Labels;
use crate::body::Body;
use crate::policy::export::line_visible;
use crate::policy::links::{OriginFinder, rewrite_references};
use crate::policy::ndjson::{LineError, LineFilter, LinePolicy, LineVerdict, MAX_LINE_BYTES};
use crate::policy::raw;
use crate::policy::scopes::{Allowed, Permission, Scopes};
use crate::policy::verify::Grants;

/// Everything one file's verification needs, owned: the body outlives the request handler.
pub(super) struct LineRules {
    pub grants: Grants,
    pub scopes: Scopes,
    /// The resource type the manifest declared for the file.
    pub declared: Option<String>,
    /// Where a line names the upstream's origin (built once per file).
    pub origin: OriginFinder,
    pub upstream: Arc<Upstream>,
    pub public: String,
}

impl LinePolicy for LineRules {
    /// The fast path: the same rule as `line_visible` on the line's light view (`policy::raw`); a visible line is
    /// sent byte for byte when the upstream's origin appears nowhere in it (no reference to rewrite).
    fn line_raw(&mut self, line: &[u8]) -> LineVerdict {
        let Some(view) = raw::resource_view(line) else { return LineVerdict::Undecided };
        let ty = match view.resource_type {
            None | Some("OperationOutcome" | "Bundle") => return LineVerdict::Drop,
            Some(ty) => ty,
        };
        if self.declared.as_deref().is_some_and(|d| d != ty)
            || self.scopes.allows(ty, Permission::Read) != Allowed::Tenant
            || !view.covered_by(&self.grants)
        {
            return LineVerdict::Drop;
        }
        if self.origin.any(line) {
            return LineVerdict::Undecided;
        }
        LineVerdict::Keep
    }

    fn line(&mut self, mut resource: Value) -> Option<Value> {
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
        self.filter.push(chunk, out, &mut self.rules)
    }

    fn finish(mut self, out: &mut Vec<u8>) -> Result<(usize, usize), LineError> {
        self.filter.finish(out, &mut self.rules).map(|stats| (stats.kept, stats.dropped))
    }
}

/// The client body: the upstream's NDJSON, verified line by line while it streams (see `filtered_body`).
pub(super) fn filtered(body: Incoming, rules: LineRules, idle: Duration) -> Body {
    let span = tracing::info_span!(target: fhirgw_telemetry::TRACE_ONLY, "filter", lines_kept = tracing::field::Empty, lines_dropped = tracing::field::Empty);
    let lines = Lines { filter: LineFilter::new(MAX_LINE_BYTES), rules };
    let labels = Labels { kept: "lines_kept", dropped: "lines_dropped", what: "NDJSON file" };
    super::filtered_body::filtered(body, lines, idle, span, labels)
}

#[cfg(test)]
mod tests {
    use fhirgw_config::tenant::Tag;
    use fhirgw_proto::config::v1 as pb;

    use super::*;

    const UP: &str = "http://upstream:8090/fhir";
    const PUBLIC: &str = "https://fhir.example.org:8443/fhir";

    fn rules(scopes: &str) -> LineRules {
        let msg = pb::Upstream { name: "fhir".into(), base_url: UP.into(), ..Default::default() };
        let tag = Tag { system: "https://fhirgw.dev/dataset".into(), code: "tenant-a".into() };
        let upstream = Arc::new(Upstream::try_from(&msg).unwrap_or_else(|e| panic!("{e}")));
        LineRules {
            grants: Grants::new([&tag]),
            scopes: Scopes::parse(scopes),
            declared: Some("Observation".into()),
            origin: OriginFinder::new(&upstream),
            upstream,
            public: PUBLIC.into(),
        }
    }

    /// The same rules without the fast path.
    struct Parsed(LineRules);

    impl LinePolicy for Parsed {
        fn line(&mut self, value: Value) -> Option<Value> {
            self.0.line(value)
        }
    }

    fn synthetic(lines: usize) -> Vec<u8> {
        let mut file = Vec::new();
        for i in 0..lines {
            let code = if i % 3 == 0 { "tenant-b" } else { "tenant-a" };
            let ty = if i % 7 == 0 { "Patient" } else { "Observation" };
            // Every fourth line refers to the upstream by absolute URL, one in ten has a \u escape, one in eleven is
            // an OperationOutcome, one in thirteen is cut short, one in seventeen ends in \r.
            let subject = if i % 4 == 0 { format!("{UP}/Patient/p{i}") } else { format!("Patient/p{i}") };
            let family = if i % 10 == 0 { "Gr\\u00fcn" } else { "Green" };
            let ty = if i % 11 == 0 { "OperationOutcome" } else { ty };
            let mut line = format!(
                r#"{{"resourceType":"{ty}","id":"o{i}","meta":{{"versionId":"1","tag":[{{"system":"https://fhirgw.dev/dataset","code":"{code}"}}]}},"text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{family}</div>"}},"status":"final","subject":{{"reference":"{subject}"}},"valueQuantity":{{"value":{i}.5,"unit":"mg/dL"}}}}"#
            );
            if i % 13 == 0 {
                line.truncate(line.len() - 1);
            }
            file.extend_from_slice(line.as_bytes());
            file.extend_from_slice(if i % 17 == 0 { b"\r\n" } else { b"\n" });
        }
        file
    }

    fn filter_all(policy: &mut dyn LinePolicy, file: &[u8]) -> (Vec<u8>, crate::policy::ndjson::Stats) {
        let mut filter = LineFilter::new(MAX_LINE_BYTES);
        let mut out = Vec::new();
        for chunk in file.chunks(4096) {
            filter.push(chunk, &mut out, policy).unwrap_or_else(|e| panic!("{e}"));
        }
        let stats = filter.finish(&mut out, policy).unwrap_or_else(|e| panic!("{e}"));
        (out, stats)
    }

    /// Line by line, the fast path keeps exactly what the parsed path keeps, with the same content, for every scope.
    #[test]
    fn fast_path_matches_the_parsed_path() {
        let file = synthetic(1000);
        for scopes in ["user/*.read", "user/Observation.read", "patient/*.read", "user/Patient.read"] {
            let (fast, fast_stats) = filter_all(&mut rules(scopes), &file);
            let (parsed, parsed_stats) = filter_all(&mut Parsed(rules(scopes)), &file);
            assert_eq!(fast_stats, parsed_stats, "{scopes}");
            let values = |out: &[u8]| -> Vec<Value> {
                out.split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            };
            assert_eq!(values(&fast), values(&parsed), "{scopes}");
            assert!(!String::from_utf8_lossy(&fast).contains("upstream:8090"), "{scopes}");
        }
        let (_, stats) = filter_all(&mut rules("user/*.read"), &file);
        assert!(stats.kept > 400 && stats.dropped > 300, "{stats:?}");
    }

    /// `cargo test -p fhirgw-dataplane --lib --release proxy::ndjson_stream::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn throughput() {
        let file = synthetic(600_000);
        let mb = file.len() as f64 / 1e6;
        for (name, fast) in [("fast path, mixed", true), ("parsed path, mixed", false)] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                let mut filter = LineFilter::new(MAX_LINE_BYTES);
                let mut fast_rules = rules("user/*.read");
                let mut parsed = Parsed(rules("user/*.read"));
                let policy: &mut dyn LinePolicy = if fast { &mut fast_rules } else { &mut parsed };
                for chunk in file.chunks(64 << 10) {
                    let mut out = Vec::with_capacity(chunk.len() + 256);
                    filter.push(chunk, &mut out, policy).unwrap_or_else(|e| panic!("{e}"));
                    std::hint::black_box(out);
                }
                best = best.min(started.elapsed().as_secs_f64());
            }
            eprintln!("{name}: {mb:.0} MB at {:.0} MB/s", mb / best);
        }
    }
}
