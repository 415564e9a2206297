//! Verification of what the upstream returns: a resource is visible only if its `meta.tag` carries one of the
//! tenant's active tags. A resource whose tags cannot be seen (no `meta`, `_elements` dropped it, not JSON) is
//! outside the grants.

use std::collections::{HashMap, HashSet};

use fhirgw_config::tenant::Tag;
use serde_json::Value;

/// The tags a request may see, fixed for the request at its start.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Codes by system, so a lookup needs no allocation.
    tags: HashMap<String, HashSet<String>>,
}

impl Grants {
    pub fn new<'a>(tags: impl IntoIterator<Item = &'a Tag>) -> Self {
        let mut by_system: HashMap<String, HashSet<String>> = HashMap::new();
        for tag in tags {
            by_system.entry(tag.system.clone()).or_default().insert(tag.code.clone());
        }
        Grants { tags: by_system }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    pub fn contains(&self, system: &str, code: &str) -> bool {
        self.tags.get(system).is_some_and(|codes| codes.contains(code))
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

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filtered {
    pub kept: usize,
    pub dropped: usize,
}

/// Keeps only entries whose resource is visible. Entries without a resource (history deletes), OperationOutcome
/// entries (upstream diagnostics) and nested Bundles (their contents cannot be checked here) are dropped.
///
/// `total` is kept only when it can reveal nothing: the search was narrowed upstream and nothing was dropped.
/// Otherwise it becomes the number of entries kept when this is the only page, and is removed when there are more.
pub fn filter_bundle(
    bundle: &mut Value,
    grants: &Grants,
    narrowed: bool,
    type_allowed: &dyn Fn(&str) -> bool,
) -> Filtered {
    let mut stats = Filtered::default();
    let has_next = bundle
        .get("link")
        .and_then(Value::as_array)
        .is_some_and(|links| links.iter().any(|l| l.get("relation").and_then(Value::as_str) == Some("next")));
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        entries.retain(|entry| {
            let keep = entry_visible(entry, grants, type_allowed);
            if keep {
                stats.kept += 1;
            } else {
                stats.dropped += 1;
            }
            keep
        });
    }
    if let Some(obj) = bundle.as_object_mut() {
        if !(narrowed && stats.dropped == 0) {
            if has_next {
                obj.remove("total");
            } else if obj.contains_key("total") {
                obj.insert("total".into(), Value::from(stats.kept));
            }
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
        assert_eq!(stats, Filtered { kept: 1, dropped: 5 });
        assert_eq!(b["total"], 1);
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
        assert_eq!(stats, Filtered { kept: 1, dropped: 1 });
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

    #[test]
    fn full_url_rewrite_is_prefix_exact() {
        let mut b = json!({"entry": [{"fullUrl": "http://up/fhirx/Patient/1"}, {"fullUrl": "http://up/fhir"}]});
        rewrite_full_urls(&mut b, "http://up/fhir", "https://gw/fhir");
        assert_eq!(b["entry"][0]["fullUrl"], "http://up/fhirx/Patient/1");
        assert_eq!(b["entry"][1]["fullUrl"], "https://gw/fhir");
    }
}
