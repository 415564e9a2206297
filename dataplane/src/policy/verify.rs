//! Verification of what the upstream returns: a resource is visible only if its `meta.tag` carries one of the
//! tenant's active tags. A resource whose tags cannot be seen (no `meta`, `_elements` dropped it, not JSON) is
//! outside the grants.

use fhirgw_config::tenant::Tag;
use serde_json::Value;

/// The tags a request may see, fixed for the request at its start: sorted, so a lookup is a binary search with no
/// hashing and no allocation (tenants hold a handful of tags; building this is on every request's path).
#[derive(Debug, Clone, Default)]
pub struct Grants {
    tags: Vec<(String, String)>,
}

impl Grants {
    pub fn new<'a>(tags: impl IntoIterator<Item = &'a Tag>) -> Self {
        let mut tags: Vec<(String, String)> = tags.into_iter().map(|t| (t.system.clone(), t.code.clone())).collect();
        tags.sort_unstable();
        tags.dedup();
        Grants { tags }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    pub fn contains(&self, system: &str, code: &str) -> bool {
        self.tags.binary_search_by(|(s, c)| (s.as_str(), c.as_str()).cmp(&(system, code))).is_ok()
    }

    pub fn covers(&self, resource: &Value) -> bool {
        let Some(tags) = resource.get("meta").and_then(|m| m.get("tag")).and_then(Value::as_array) else {
            return false;
        };
        tags.iter().any(|tag| {
            let system = tag.get("system").and_then(Value::as_str);
            let code = tag.get("code").and_then(Value::as_str);
            matches!((system, code), (Some(s), Some(c)) if self.contains(s, c))
        })
    }
}

/// A single resource from a read: visible, or indistinguishable from missing.
pub fn resource_visible(resource: &Value, ty: &str, id: &str, grants: &Grants) -> bool {
    resource.get("resourceType").and_then(Value::as_str) == Some(ty)
        && resource.get("id").and_then(Value::as_str) == Some(id)
        && grants.covers(resource)
}

/// The rule for one Bundle entry, buffered or streamed: its resource must be of a type the scopes allow and
/// covered by the grants. Entries without a resource (history deletes), OperationOutcome entries (upstream
/// diagnostics) and nested Bundles (their contents cannot be checked here) are never visible.
pub fn entry_visible(entry: &Value, grants: &Grants, type_allowed: &dyn Fn(&str) -> bool) -> bool {
    entry.get("resource").is_some_and(|r| match r.get("resourceType").and_then(Value::as_str) {
        None | Some("OperationOutcome") | Some("Bundle") => false,
        Some(ty) => type_allowed(ty) && grants.covers(r),
    })
}

/// Moves one entry's `fullUrl` from `upstream_base` to `public_base`.
pub fn rewrite_full_url(entry: &mut Value, upstream_base: &str, public_base: &str) {
    if let Some(Value::String(url)) = entry.get_mut("fullUrl")
        && let Some(rest) = url.strip_prefix(upstream_base).filter(|r| r.is_empty() || r.starts_with('/'))
    {
        *url = format!("{public_base}{rest}");
    }
}

/// Why an entry is in a searchset (`entry.search.mode`). Only matches count towards `Bundle.total` (FHIR R4
/// §3.1.1.5.1): an entry without a mode, or with one the gateway does not know, is taken for a match, so that an
/// upstream that leaves modes out can only make the gateway omit `total`, never publish a partial count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    Match,
    Include,
    Outcome,
}

impl EntryMode {
    pub fn parse(mode: Option<&str>) -> Self {
        match mode {
            Some("include") => EntryMode::Include,
            Some("outcome") => EntryMode::Outcome,
            _ => EntryMode::Match,
        }
    }

    /// The mode of a parsed entry.
    pub fn of(entry: &Value) -> Self {
        Self::parse(entry.get("search").and_then(|s| s.get("mode")).and_then(Value::as_str))
    }
}

/// The one rule for `Bundle.total`, on every page of every Bundle the gateway filters: the upstream's total is
/// passed on only when it counts the tenant's own matches (the search was narrowed upstream with the tenant's tags)
/// and no match had to be dropped (which would make it count something the caller cannot see). Otherwise there is
/// no `total` at all: never a count of what one page kept, and never anything that depends on included resources,
/// so an `_include` pointing into another tenant and one pointing at nothing give the same answer.
pub fn keeps_total(narrowed: bool, dropped_matches: usize) -> bool {
    narrowed && dropped_matches == 0
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filtered {
    pub kept: usize,
    pub dropped: usize,
    /// Dropped entries that were matches (see [`EntryMode`]).
    pub dropped_matches: usize,
}

/// Keeps only entries whose resource is visible. Entries without a resource (history deletes), OperationOutcome
/// entries (upstream diagnostics) and nested Bundles (their contents cannot be checked here) are dropped. `total`
/// follows [`keeps_total`].
pub fn filter_bundle(
    bundle: &mut Value,
    grants: &Grants,
    narrowed: bool,
    type_allowed: &dyn Fn(&str) -> bool,
) -> Filtered {
    let mut stats = Filtered::default();
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        entries.retain(|entry| {
            let keep = entry_visible(entry, grants, type_allowed);
            if keep {
                stats.kept += 1;
            } else {
                stats.dropped += 1;
                if EntryMode::of(entry) == EntryMode::Match {
                    stats.dropped_matches += 1;
                }
            }
            keep
        });
    }
    if let Some(obj) = bundle.as_object_mut() {
        if !keeps_total(narrowed, stats.dropped_matches) {
            obj.remove("total");
        }
        if obj.get("entry").and_then(Value::as_array).is_some_and(Vec::is_empty) {
            obj.remove("entry");
        }
    }
    stats
}

/// Rewrites `fullUrl`s on `upstream_base` to `public_base`. Other absolute URLs are left to the link rewriting.
pub fn rewrite_full_urls(bundle: &mut Value, upstream_base: &str, public_base: &str) {
    let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) else { return };
    for entry in entries {
        rewrite_full_url(entry, upstream_base, public_base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grants() -> Grants {
        let a = Tag { system: "https://fhirgw.dev/dataset".into(), code: "tenant-a".into() };
        Grants::new([&a])
    }

    fn res(ty: &str, id: &str, code: Option<&str>) -> Value {
        match code {
            Some(c) => {
                json!({"resourceType": ty, "id": id, "meta": {"tag": [{"system": "https://fhirgw.dev/dataset", "code": c}]}})
            }
            None => json!({"resourceType": ty, "id": id}),
        }
    }

    #[test]
    fn covers_table() {
        let g = grants();
        let cases = [
            (res("Patient", "1", Some("tenant-a")), true),
            (res("Patient", "1", Some("tenant-b")), false),
            (res("Patient", "1", None), false),
            (json!({"resourceType": "Patient", "meta": {"tag": [{"code": "tenant-a"}]}}), false),
            (
                json!({"resourceType": "Patient", "meta": {"tag": [{"system": "https://other", "code": "tenant-a"}]}}),
                false,
            ),
            (json!({"resourceType": "Patient", "meta": {"tag": "tenant-a"}}), false),
            (
                json!({"resourceType": "Patient", "meta": {"security": [{"system": "https://fhirgw.dev/dataset", "code": "tenant-a"}]}}),
                false,
            ),
            (
                json!({"resourceType": "Patient", "meta": {"tag": [{"system": "https://x", "code": "y"}, {"system": "https://fhirgw.dev/dataset", "code": "tenant-a"}]}}),
                true,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(g.covers(&r), want, "{r}");
        }
        assert!(!Grants::default().covers(&res("Patient", "1", Some("tenant-a"))));
    }

    #[test]
    fn read_must_be_the_resource_asked_for() {
        let g = grants();
        assert!(resource_visible(&res("Patient", "1", Some("tenant-a")), "Patient", "1", &g));
        assert!(!resource_visible(&res("Patient", "2", Some("tenant-a")), "Patient", "1", &g));
        assert!(!resource_visible(&res("Observation", "1", Some("tenant-a")), "Patient", "1", &g));
        assert!(!resource_visible(&res("Patient", "1", Some("tenant-b")), "Patient", "1", &g));
    }

    #[test]
    fn bundle_filtering() {
        let g = grants();
        let mut b = json!({
            "resourceType": "Bundle", "type": "searchset", "total": 6,
            "entry": [
                {"fullUrl": "http://up/fhir/Patient/1", "resource": res("Patient", "1", Some("tenant-a")), "search": {"mode": "match"}},
                {"resource": res("Observation", "x", Some("tenant-b")), "search": {"mode": "include"}},
                {"resource": res("Observation", "y", None)},
                {"resource": {"resourceType": "OperationOutcome", "meta": {"tag": [{"system": "https://fhirgw.dev/dataset", "code": "tenant-a"}]}}},
                {"resource": {"resourceType": "Bundle", "meta": {"tag": [{"system": "https://fhirgw.dev/dataset", "code": "tenant-a"}]}}},
                {"request": {"method": "DELETE", "url": "Patient/9"}}
            ]
        });
        let stats = filter_bundle(&mut b, &g, false, &|_| true);
        // Dropped matches: the y Observation (no mode), the OperationOutcome and the Bundle (no mode), the delete.
        assert_eq!(stats, Filtered { kept: 1, dropped: 5, dropped_matches: 4 });
        assert!(b.get("total").is_none(), "never a per-page count: {b}");
        assert_eq!(b["entry"].as_array().map(Vec::len), Some(1));
        rewrite_full_urls(&mut b, "http://up/fhir", "https://gw.example/fhir");
        assert_eq!(b["entry"][0]["fullUrl"], "https://gw.example/fhir/Patient/1");
    }

    #[test]
    fn entries_of_types_outside_the_scopes_are_dropped() {
        let g = grants();
        let mut b = json!({"resourceType": "Bundle", "entry": [
            {"resource": res("Patient", "1", Some("tenant-a"))},
            {"resource": res("Observation", "2", Some("tenant-a"))}
        ]});
        let stats = filter_bundle(&mut b, &g, false, &|ty| ty == "Patient");
        assert_eq!(stats, Filtered { kept: 1, dropped: 1, dropped_matches: 1 });
        assert_eq!(b["entry"][0]["resource"]["resourceType"], "Patient");
    }

    #[test]
    fn total_never_reveals_unfiltered_counts() {
        let g = grants();
        // Narrowed and nothing dropped: the upstream's total is the tenant's own count.
        let mut narrowed = json!({"resourceType": "Bundle", "total": 40, "entry": [{"resource": res("Patient", "1", Some("tenant-a"))}],
            "link": [{"relation": "next", "url": "x"}]});
        filter_bundle(&mut narrowed, &g, true, &|_| true);
        assert_eq!(narrowed["total"], 40);
        // Not narrowed, more pages: no total at all.
        let mut paged = json!({"resourceType": "Bundle", "total": 40, "entry": [{"resource": res("Patient", "1", Some("tenant-b"))}],
            "link": [{"relation": "next", "url": "x"}]});
        filter_bundle(&mut paged, &g, false, &|_| true);
        assert!(paged.get("total").is_none());
        assert!(paged.get("entry").is_none());
    }

    /// `total` counts matches: whatever happens to included entries, a narrowed search keeps the upstream's total;
    /// a dropped match (or an entry of unknown mode) removes it; a search not narrowed upstream never has one.
    #[test]
    fn total_rule_table() {
        let g = grants();
        let entry = |code: &str, mode: Option<&str>| match mode {
            Some(m) => json!({"resource": res("Observation", code, Some(code)), "search": {"mode": m}}),
            None => json!({"resource": res("Observation", code, Some(code))}),
        };
        let a = "tenant-a";
        let b = "tenant-b";
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Value>, bool, Option<u64>)> = vec![
            ("narrowed, all kept", vec![entry(a, Some("match")), entry(a, Some("include"))], true, Some(37)),
            ("narrowed, include of another tenant dropped", vec![entry(a, Some("match")), entry(b, Some("include"))], true, Some(37)),
            ("narrowed, outcome dropped", vec![entry(a, Some("match")), json!({"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}})], true, Some(37)),
            ("narrowed, match dropped", vec![entry(a, Some("match")), entry(b, Some("match"))], true, None),
            ("narrowed, entry without a mode dropped", vec![entry(a, Some("match")), entry(b, None)], true, None),
            ("narrowed, unknown mode dropped", vec![entry(b, Some("other"))], true, None),
            ("narrowed, no entries", vec![], true, Some(37)),
            ("not narrowed, all kept", vec![entry(a, Some("match"))], false, None),
            ("not narrowed, no entries", vec![], false, None),
        ];
        for (name, entries, narrowed, want) in cases {
            let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": 37, "entry": entries});
            filter_bundle(&mut bundle, &g, narrowed, &|_| true);
            assert_eq!(bundle.get("total").and_then(Value::as_u64), want, "{name}: {bundle}");
        }
    }

    #[test]
    fn full_url_rewrite_is_prefix_exact() {
        let mut b = json!({"entry": [{"fullUrl": "http://up/fhirx/Patient/1"}, {"fullUrl": "http://up/fhir"}]});
        rewrite_full_urls(&mut b, "http://up/fhir", "https://gw/fhir");
        assert_eq!(b["entry"][0]["fullUrl"], "http://up/fhirx/Patient/1");
        assert_eq!(b["entry"][1]["fullUrl"], "https://gw/fhir");
    }
}
