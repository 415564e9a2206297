//! Bundles stream through the gateway: each `entry` is verified as it passes (`policy::bundle_filter::BundleFilter`), so
//! memory stays bounded by the largest entry whatever the Bundle's size. Links are rewritten and signed, `fullUrl`s
//! and absolute references on the upstream's base moved to the public base (each entry is whole and parsed by then,
//! so a URL split across upstream chunks is rewritten like any other), and `total` never reveals an unfiltered
//! count.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fhirgw_config::upstream::Upstream;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::filtered_body::Labels;
use crate::body::Body;
use crate::policy::bundle_filter::{BundleFilter, EntryPolicy, Options, RawVerdict, Splice};
use crate::policy::compartment;
use crate::policy::links::{OriginFinder, PageContext, rewrite_links, rewrite_references, rewrite_url};
use crate::policy::paging::PageSigner;
use crate::policy::raw;
use crate::policy::scopes::{Allowed, Permission, Scopes};
use crate::policy::verify::{Grants, entry_visible, rewrite_full_url};

/// Everything one Bundle's verification needs, owned: the body outlives the request handler.
pub(super) struct Rules {
    pub grants: Grants,
    pub scopes: Scopes,
    /// The token's patient: entries that only a `patient/` scope covers must be in this patient's compartment.
    pub patient: Option<String>,
    /// Where an entry names the upstream's origin (built once per Bundle).
    pub origin: OriginFinder,
    pub upstream: Arc<Upstream>,
    pub public: String,
    pub signer: PageSigner,
    pub tenant: String,
    /// Gateway path relative to the base (for page links).
    pub path: String,
    pub self_url: String,
    pub now: SystemTime,
    /// The search was narrowed upstream with the tenant's tags: its `total` may be kept (`verify::keeps_total`), and
    /// its page tokens say so.
    pub narrowed: bool,
}

impl Rules {
    /// The rules for one Bundle the executor streams back.
    pub fn new(exec: &super::execute::Exec<'_>, expect: crate::policy::plan::BundleExpect) -> Self {
        let access = exec.access;
        Rules {
            grants: access.grants.clone(),
            scopes: access.scopes.clone(),
            patient: access.patient.clone(),
            origin: OriginFinder::new(&exec.upstream),
            upstream: exec.upstream.clone(),
            public: exec.env.public.to_owned(),
            signer: exec.env.signer.clone(),
            tenant: access.tenant.clone(),
            path: expect.path,
            self_url: expect.self_url,
            now: access.now,
            narrowed: expect.narrowed,
        }
    }

    /// The fast path's decision on one entry's bytes (validated, every string spelled literally) and its light view:
    /// dropped, or kept byte for byte when the upstream's origin appears nowhere in it, or only at the start of its
    /// `fullUrl` (spliced to the public base). Anything else (a `patient/`-scoped type, an absolute reference to
    /// rewrite) takes the parsed path.
    fn decide(&self, raw: &[u8], view: &raw::EntryView<'_>) -> RawVerdict {
        let drop = RawVerdict::Drop(view.mode());
        let Some(resource) = &view.resource else { return drop };
        let ty = match resource.resource_type {
            None | Some("OperationOutcome" | "Bundle") => return drop,
            Some(ty) => ty,
        };
        match self.scopes.allows(ty, Permission::Read) {
            Allowed::No => return drop,
            Allowed::PatientOnly => return RawVerdict::Undecided,
            Allowed::Tenant => {}
        }
        if !resource.covered_by(&self.grants) {
            return drop;
        }
        let mut mentions = self.origin.mentions(raw);
        let at = match (mentions.next(), mentions.next()) {
            (None, _) => return RawVerdict::Keep(None),
            (Some(at), None) => at,
            (Some(_), Some(_)) => return RawVerdict::Undecided,
        };
        // The one mention must open the fullUrl's string literal. A fullUrl on the upstream's base starts with its
        // origin, so it is that mention; the literal's bytes equal the decoded value only without escapes, and a
        // `"` before a letter in valid JSON opens a string.
        let Some(full) = view.full_url else { return RawVerdict::Undecided };
        let Some(public) = rewrite_url(&self.upstream, &self.public, full) else { return RawVerdict::Undecided };
        let end = at + full.len();
        if at == 0 || raw[at - 1] != b'"' || raw.get(at..end) != Some(full.as_bytes()) || raw.get(end) != Some(&b'"') {
            return RawVerdict::Undecided;
        }
        // The new literal: quoted as it is unless it needs an escape (the public base is configured, the rest was
        // spelled without one).
        let with = if public.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            let Ok(with) = serde_json::to_vec(&public) else { return RawVerdict::Undecided };
            with
        } else {
            let mut with = Vec::with_capacity(public.len() + 2);
            with.push(b'"');
            with.extend_from_slice(public.as_bytes());
            with.push(b'"');
            with
        };
        RawVerdict::Keep(Some(Splice { range: at - 1..end + 1, with }))
    }
}

impl EntryPolicy for Rules {
    fn entry_raw(&mut self, input: &[u8]) -> Option<(usize, RawVerdict)> {
        let (len, view) = raw::entry_prefix(input)?;
        let verdict = match view {
            Some(view) => self.decide(&input[..len], &view),
            None => RawVerdict::Undecided,
        };
        Some((len, verdict))
    }

    fn entry(&mut self, mut entry: Value) -> Option<Value> {
        let scopes = &self.scopes;
        let allowed = |ty: &str| scopes.allows(ty, Permission::Read) != Allowed::No;
        if !entry_visible(&entry, &self.grants, &allowed) {
            return None;
        }
        let resource = entry.get("resource")?;
        let ty = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        if scopes.allows(ty, Permission::Read) == Allowed::PatientOnly
            && !self.patient.as_deref().is_some_and(|p| compartment::contains(resource, p))
        {
            return None;
        }
        rewrite_full_url(&mut entry, &self.upstream.base_url, &self.public);
        if let Some(resource) = entry.get_mut("resource") {
            rewrite_references(resource, &self.upstream, &self.public);
        }
        Some(entry)
    }

    fn links(&mut self, links: Value) -> Value {
        let mut wrapper = json!({ "link": links });
        let ctx = PageContext {
            signer: &self.signer,
            tenant: &self.tenant,
            path: &self.path,
            upstream: &self.upstream,
            self_url: self.self_url.clone(),
            public_base: &self.public,
            narrowed: self.narrowed,
        };
        rewrite_links(&mut wrapper, &ctx, self.now);
        wrapper["link"].take()
    }
}

impl super::filtered_body::ChunkFilter for BundleFilter<Rules> {
    type Error = crate::policy::bundle_filter::StreamError;

    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Self::Error> {
        BundleFilter::push(self, chunk, out)
    }

    fn finish(self, out: &mut Vec<u8>) -> Result<(usize, usize), Self::Error> {
        BundleFilter::finish(self, out).map(|stats| (stats.kept, stats.dropped))
    }
}

/// The client body: the upstream's Bundle, filtered entry by entry while it streams (see `filtered_body`).
pub(super) fn filtered(body: Incoming, rules: Rules, idle: Duration) -> Body {
    let keep_total = rules.narrowed;
    let filter = BundleFilter::new(rules, Options { keep_total, ..Options::default() });
    let span = tracing::info_span!(target: fhirgw_telemetry::TRACE_ONLY, "filter", entries_kept = tracing::field::Empty, entries_dropped = tracing::field::Empty);
    let labels = Labels { kept: "entries_kept", dropped: "entries_dropped", what: "Bundle" };
    super::filtered_body::filtered(body, filter, idle, span, labels)
}

#[cfg(test)]
mod tests {
    use fhirgw_config::tenant::Tag;
    use fhirgw_proto::config::v1 as pb;

    use super::*;

    const UP: &str = "http://upstream:8090/fhir";
    const PUBLIC: &str = "https://fhir.example.org:8443/fhir";

    fn rules() -> Rules {
        let msg = pb::Upstream { name: "fhir".into(), base_url: UP.into(), ..Default::default() };
        let tag = Tag { system: "https://fhirgw.dev/dataset".into(), code: "tenant-a".into() };
        let upstream = Arc::new(Upstream::try_from(&msg).unwrap_or_else(|e| panic!("{e}")));
        Rules {
            grants: Grants::new([&tag]),
            scopes: Scopes::parse("user/*.read"),
            patient: None,
            origin: OriginFinder::new(&upstream),
            upstream,
            public: PUBLIC.into(),
            signer: PageSigner::new(&[7; 32]),
            tenant: "tenant-a".into(),
            path: "Observation".into(),
            self_url: format!("{PUBLIC}/Observation"),
            now: SystemTime::now(),
            narrowed: true,
        }
    }

    /// The upstream's absolute references reach the client on the public base wherever the upstream's chunks split
    /// them (here: at every byte), in kept entries; dropped entries are not rewritten, they are gone.
    #[test]
    fn references_split_across_chunks_are_rewritten() {
        let tag = r#"{"tag":[{"system":"https://fhirgw.dev/dataset","code":"tenant-a"}]}"#;
        let other = r#"{"tag":[{"system":"https://fhirgw.dev/dataset","code":"tenant-b"}]}"#;
        let input = format!(
            r#"{{"resourceType":"Bundle","type":"searchset","entry":[
              {{"fullUrl":"{UP}/Observation/o1","resource":{{"resourceType":"Observation","id":"o1","meta":{tag},
                "subject":{{"reference":"{UP}/Patient/p\u0031"}},"focus":[{{"reference":"{UP}/Group/g1"}}],
                "encounter":{{"reference":"Encounter/e1"}}}}}},
              {{"fullUrl":"{UP}/Observation/o2","resource":{{"resourceType":"Observation","id":"o2","meta":{other},
                "subject":{{"reference":"{UP}/Patient/secret"}}}}}}],
              "link":[{{"relation":"self","url":"{UP}/Observation"}}]}}"#
        );
        let bytes = input.as_bytes();
        for split in 0..=bytes.len() {
            let mut filter = BundleFilter::new(rules(), Options::default());
            let mut out = Vec::new();
            for chunk in [&bytes[..split], &bytes[split..]] {
                filter.push(chunk, &mut out).unwrap_or_else(|e| panic!("split at {split}: {e}"));
            }
            filter.finish(&mut out).unwrap_or_else(|e| panic!("split at {split}: {e}"));
            let text = String::from_utf8(out).unwrap_or_default();
            assert!(!text.contains("upstream:8090"), "split at {split}: {text}");
            assert!(!text.contains("secret"), "split at {split}: {text}");
            let bundle: Value = serde_json::from_str(&text).unwrap_or_default();
            let entry = &bundle["entry"][0];
            assert_eq!(entry["fullUrl"], format!("{PUBLIC}/Observation/o1"), "split at {split}");
            assert_eq!(entry["resource"]["subject"]["reference"], format!("{PUBLIC}/Patient/p1"), "split at {split}");
            assert_eq!(entry["resource"]["focus"][0]["reference"], format!("{PUBLIC}/Group/g1"), "split at {split}");
            assert_eq!(entry["resource"]["encounter"]["reference"], "Encounter/e1", "split at {split}");
            assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(1), "split at {split}");
        }
    }

    /// The same policy without the fast path: every entry parsed, decided and re-serialised.
    struct Parsed(Rules);

    impl EntryPolicy for Parsed {
        fn entry(&mut self, entry: Value) -> Option<Value> {
            self.0.entry(entry)
        }

        fn links(&mut self, links: Value) -> Value {
            self.0.links(links)
        }
    }

    fn synthetic(entries: usize) -> Vec<u8> {
        let mut body = format!(r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"relation":"self","url":"{UP}/Observation"}}],"entry":["#).into_bytes();
        for i in 0..entries {
            if i > 0 {
                body.push(b',');
            }
            let code = if i % 3 == 0 { "tenant-b" } else { "tenant-a" };
            // Every fourth entry refers to the upstream by absolute URL (the parsed path's job); one in ten has a
            // \u escape; the rest are what a FHIR server usually sends: fullUrl on its base, relative references,
            // a narrative with escaped quotes.
            let subject = if i % 4 == 0 { format!("{UP}/Patient/p{i}") } else { format!("Patient/p{i}") };
            let family = if i % 10 == 0 { "Gr\\u00fcn" } else { "Green" };
            body.extend_from_slice(format!(
                r#"{{"fullUrl":"{UP}/Observation/o{i}","resource":{{"resourceType":"Observation","id":"o{i}","meta":{{"versionId":"1","lastUpdated":"2026-01-01T00:00:00Z","tag":[{{"system":"https://fhirgw.dev/dataset","code":"{code}"}}]}},"text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">Glucose {family}</div>"}},"status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"2339-0","display":"Glucose"}}]}},"subject":{{"reference":"{subject}"}},"valueQuantity":{{"value":{i}.5,"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"}}}},"search":{{"mode":"match"}}}}"#
            ).as_bytes());
        }
        body.extend_from_slice(b"],\"total\":0}");
        body
    }

    /// Entries shaped like `bench/proxy.sh`'s 1 GiB Bundle: every one kept, the upstream's origin only in `fullUrl`.
    pub(super) fn kept_entries(entries: usize) -> Vec<u8> {
        let mut body = format!(r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"relation":"self","url":"{UP}/Observation"}}],"entry":["#).into_bytes();
        for i in 0..entries {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(format!(
                r#"{{"fullUrl":"{UP}/Observation/o{i}","resource":{{"resourceType":"Observation","id":"o{i}","meta":{{"versionId":"1","lastUpdated":"2026-11-20T09:14:03.512+00:00","tag":[{{"system":"https://fhirgw.dev/dataset","code":"tenant-a"}}]}},"status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital Signs"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"85354-9","display":"Blood pressure panel with all children optional"}}],"text":"Blood pressure systolic and diastolic"}},"subject":{{"reference":"Patient/p1","display":"Amy V. Shaw"}},"effectiveDateTime":"2026-11-20T09:10:00+00:00","performer":[{{"reference":"Practitioner/pr1","display":"Dr. Ronald Bone"}}],"interpretation":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"L","display":"low"}}]}}],"bodySite":{{"coding":[{{"system":"http://snomed.info/sct","code":"368209003","display":"Right arm"}}]}},"component":[{{"code":{{"coding":[{{"system":"http://loinc.org","code":"8480-6","display":"Systolic blood pressure"}}]}},"valueQuantity":{{"value":107,"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}},{{"code":{{"coding":[{{"system":"http://loinc.org","code":"8462-4","display":"Diastolic blood pressure"}}]}},"valueQuantity":{{"value":60,"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}}]}},"search":{{"mode":"match"}}}}"#
            ).as_bytes());
        }
        body.extend_from_slice(b"]}");
        body
    }

    fn filter_all<P: EntryPolicy>(policy: P, body: &[u8]) -> Vec<u8> {
        let mut filter = BundleFilter::new(policy, Options::default());
        let mut out = Vec::new();
        for chunk in body.chunks(64 << 10) {
            filter.push(chunk, &mut out).unwrap_or_else(|e| panic!("{e}"));
        }
        filter.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    /// As the data plane streams: one output buffer per 64 KiB chunk, sized as `filtered_body` does; bytes out.
    fn filter_chunks<P: EntryPolicy>(policy: P, body: &[u8]) -> usize {
        let mut filter = BundleFilter::new(policy, Options::default());
        let mut sent = 0;
        for chunk in body.chunks(64 << 10) {
            let mut out = Vec::with_capacity(chunk.len() + 256);
            filter.push(chunk, &mut out).unwrap_or_else(|e| panic!("{e}"));
            sent += std::hint::black_box(out).len();
        }
        let mut out = Vec::new();
        filter.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
        sent + out.len()
    }

    /// The fast path decides exactly as the parsed path: the same entries, the same URLs, the same document.
    #[test]
    fn fast_path_matches_the_parsed_path() {
        let body = synthetic(400);
        let fast = filter_all(rules(), &body);
        let parsed = filter_all(Parsed(rules()), &body);
        let fast: Value = serde_json::from_slice(&fast).unwrap_or_default();
        let parsed: Value = serde_json::from_slice(&parsed).unwrap_or_default();
        assert_eq!(fast["entry"].as_array().map(Vec::len), Some(266));
        assert_eq!(fast, parsed);
        assert!(!fast.to_string().contains("upstream:8090"));
    }

    /// `cargo test -p fhirgw-dataplane --lib --release proxy::bundle_stream::tests::throughput -- --ignored --nocapture`
    /// (`THROUGHPUT_ONLY=kept` for one row)
    #[test]
    #[ignore = "benchmark"]
    fn throughput() {
        let only = std::env::var("THROUGHPUT_ONLY").ok();
        for (name, body, fast) in [
            ("kept byte for byte (bench/proxy.sh's Bundle)", kept_entries(120_000), true),
            ("fast path, mixed", synthetic(300_000), true),
            ("parsed path, mixed", synthetic(300_000), false),
        ] {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let mb = body.len() as f64 / 1e6;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                let sent = if fast { filter_chunks(rules(), &body) } else { filter_chunks(Parsed(rules()), &body) };
                std::hint::black_box(sent);
                best = best.min(started.elapsed().as_secs_f64());
            }
            eprintln!("{name}: {mb:.0} MB at {:.0} MB/s", mb / best);
        }
    }
}
