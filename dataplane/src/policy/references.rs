//! References in what a caller writes. FHIR servers resolve them: HAPI FHIR refuses a write whose reference points
//! at nothing (referential integrity, on by default) and resolves conditional references (`Patient?identifier=…`)
//! with a search across the whole server. Passed on unchecked, a write would tell its caller whether any id exists
//! in any tenant (success or failure), link the caller's records to another tenant's resources, and run an
//! unnarrowed search. So every reference a written resource or patch carries is classified here, and the proxy
//! checks each local one (it must be visible to the caller: out of grant and missing get one answer) and narrows each
//! conditional one with the tenant's tags before anything is sent.

use serde_json::Value;

use super::query::{self, Params};

/// Most distinct references one request may carry for the gateway to check.
pub const MAX_REFERENCES: usize = 200;

/// One reference, by what the gateway must do with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reference {
    /// `Type/id` or `Type/id/_history/v` on this server: must be visible to the caller.
    Local { ty: String, id: String, version: Option<String> },
    /// `Type?criteria`: resolved by the server with a search, which must be narrowed to the tenant.
    Conditional { ty: String, params: Params },
}

/// Where a reference string points, as the gateway classifies it: `None` for references the server resolves
/// without looking at other resources (`#contained`, `urn:uuid:` / `urn:oid:` placeholders of a transaction,
/// absolute URLs elsewhere) and for text that is no reference at all (the server refuses it).
///
/// `bases` are the absolute forms of this server's base (the public base and the upstream's): a reference on one of
/// them is local.
pub fn classify(reference: &str, bases: &[&str]) -> Option<Reference> {
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return None;
    }
    // Absolute when the part before any query names a scheme (a query may hold URLs of its own).
    let before_query = reference.split('?').next().unwrap_or_default();
    let relative = if before_query.contains("://") {
        bases.iter().find_map(|base| {
            reference.strip_prefix(base.trim_end_matches('/')).and_then(|rest| rest.strip_prefix('/'))
        })?
    } else {
        reference
    };
    let (path, query) = match relative.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (relative, None),
    };
    let segments: Vec<&str> = path.split('/').collect();
    let is_type = |s: &str| fhirgw_config::pattern::Class::Type.accepts(s);
    let is_id = |s: &str| fhirgw_config::pattern::Class::Id.accepts(s);
    match (segments.as_slice(), query) {
        ([ty], Some(query)) if is_type(ty) => {
            Some(Reference::Conditional { ty: (*ty).to_owned(), params: query::parse(Some(query)) })
        }
        ([ty, id], None) if is_type(ty) && is_id(id) => {
            Some(Reference::Local { ty: (*ty).to_owned(), id: (*id).to_owned(), version: None })
        }
        ([ty, id, "_history", v], None) if is_type(ty) && is_id(id) && is_id(v) => {
            Some(Reference::Local { ty: (*ty).to_owned(), id: (*id).to_owned(), version: Some((*v).to_owned()) })
        }
        _ => None,
    }
}

/// Every `reference` string in `value` (a resource, or a patch's values), at any depth: elements, extensions and
/// contained resources alike, as a server resolves them all. `path` names where each one is, for messages.
pub fn collect<'a>(value: &'a Value, path: &mut String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match (key.as_str(), child) {
                    ("reference", Value::String(reference)) => out.push((path.clone(), reference)),
                    _ => collect(child, path, out),
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{index}]"));
                collect(item, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The reference strings a JSON Patch (RFC 6902) would write: in `value`s, and a `value` string set at a path
/// ending in `/reference`.
pub fn in_json_patch(patch: &Value) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    for (index, op) in patch.as_array().into_iter().flatten().enumerate() {
        let Some(value) = op.get("value") else { continue };
        let target = op.get("path").and_then(Value::as_str).unwrap_or_default();
        match value {
            Value::String(reference) if target.ends_with("/reference") => {
                out.push((format!("patch operation {index}"), reference.as_str()));
            }
            other => collect(other, &mut format!("patch operation {index}"), &mut out),
        }
    }
    out
}

/// The reference strings a FHIRPath Patch would write: in its `value[x]` parts, and a string value set at a path
/// ending in `.reference`.
pub fn in_fhirpath_patch(patch: &Value) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    for (index, op) in patch.get("parameter").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let parts = op.get("part").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let path = parts
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some("path"))
            .and_then(|p| p.get("valueString"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = parts
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some("name"))
            .and_then(|p| p.get("valueString"))
            .and_then(Value::as_str);
        let sets_reference = path.ends_with(".reference") || name == Some("reference");
        for part in parts.iter().filter(|p| p.get("name").and_then(Value::as_str) == Some("value")) {
            let Some(obj) = part.as_object() else { continue };
            for (key, value) in obj.iter().filter(|(k, _)| k.starts_with("value") || *k == "part") {
                match value {
                    Value::String(reference) if sets_reference && key != "part" => {
                        out.push((format!("patch operation {index}"), reference.as_str()));
                    }
                    other => collect(other, &mut format!("patch operation {index}"), &mut out),
                }
            }
        }
    }
    out
}

/// Replaces, at any depth, every `reference` string that `replace` maps to a new value (a narrowed conditional
/// reference).
pub fn rewrite(value: &mut Value, replace: &dyn Fn(&str) -> Option<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                match child {
                    Value::String(reference) if key == "reference" => {
                        if let Some(new) = replace(reference) {
                            *reference = new;
                        }
                    }
                    other => rewrite(other, replace),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite(item, replace)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BASES: &[&str] = &["https://gw.example/fhir", "http://upstream:8080/fhir/"];

    fn local(ty: &str, id: &str, version: Option<&str>) -> Option<Reference> {
        Some(Reference::Local { ty: ty.into(), id: id.into(), version: version.map(str::to_owned) })
    }

    #[test]
    fn classify_table() {
        let cond = |ty: &str, q: &str| Some(Reference::Conditional { ty: ty.into(), params: query::parse(Some(q)) });
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<Reference>)> = vec![
            ("Patient/p1", local("Patient", "p1", None)),
            ("Patient/p1/_history/3", local("Patient", "p1", Some("3"))),
            ("https://gw.example/fhir/Patient/p1", local("Patient", "p1", None)),
            ("http://upstream:8080/fhir/Patient/p1", local("Patient", "p1", None)),
            ("Patient?identifier=http://x|1", cond("Patient", "identifier=http://x|1")),
            ("Patient?identifier=https://gw.example/fhir/x|1", cond("Patient", "identifier=https://gw.example/fhir/x|1")),
            ("https://gw.example/fhir/Patient?identifier=1", cond("Patient", "identifier=1")),
            ("#contained-1", None),
            ("urn:uuid:7f4b9e2a-0000-4000-8000-000000000001", None),
            ("urn:oid:1.2.3", None),
            ("https://elsewhere.example/fhir/Patient/p1", None),
            ("https://gw.example/fhirx/Patient/p1", None),
            ("patient/p1", None),
            ("Patient", None),
            ("Patient/", None),
            ("Patient/p1/extra", None),
            ("Patient/a b", None),
            ("", None),
        ];
        for (reference, want) in cases {
            assert_eq!(classify(reference, BASES), want, "{reference}");
        }
    }

    #[test]
    fn collected_everywhere() {
        let resource = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/x"}, {"display": "no reference"}],
            "extension": [{"url": "http://x", "valueReference": {"reference": "Patient/p2"}}],
            "contained": [{"resourceType": "Patient", "id": "c", "link": [{"other": {"reference": "Patient/p3"}}]}],
            "note": [{"text": "reference: Patient/p4"}],
            "reference": 7
        });
        let mut out = Vec::new();
        collect(&resource, &mut String::new(), &mut out);
        let mut refs: Vec<(&str, &str)> = out.iter().map(|(p, r)| (p.as_str(), *r)).collect();
        refs.sort_unstable();
        assert_eq!(
            refs,
            vec![
                ("contained[0].link[0].other.reference", "Patient/p3"),
                ("extension[0].valueReference.reference", "Patient/p2"),
                ("performer[0].reference", "Practitioner/x"),
                ("subject.reference", "Patient/p1"),
            ]
        );
    }

    #[test]
    fn rewritten_in_place() {
        let mut resource = json!({"subject": {"reference": "Patient?identifier=1"}, "focus": [{"reference": "Patient/p"}],
            "note": [{"text": "Patient?identifier=1"}]});
        rewrite(&mut resource, &|r| (r == "Patient?identifier=1").then(|| "Patient?identifier=1&_tag=x".to_owned()));
        assert_eq!(resource["subject"]["reference"], "Patient?identifier=1&_tag=x");
        assert_eq!(resource["focus"][0]["reference"], "Patient/p");
        assert_eq!(resource["note"][0]["text"], "Patient?identifier=1");
    }

    #[test]
    fn patches() {
        let json_patch = json!([
            {"op": "replace", "path": "/subject/reference", "value": "Patient/b"},
            {"op": "add", "path": "/performer/-", "value": {"reference": "Practitioner/c"}},
            {"op": "replace", "path": "/status", "value": "final"},
            {"op": "remove", "path": "/note"}
        ]);
        let refs: Vec<&str> = in_json_patch(&json_patch).into_iter().map(|(_, r)| r).collect();
        assert_eq!(refs, ["Patient/b", "Practitioner/c"]);
        let fhirpath = json!({"resourceType": "Parameters", "parameter": [
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.subject"},
                {"name": "value", "valueReference": {"reference": "Patient/b"}}]},
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.subject.reference"},
                {"name": "value", "valueString": "Patient/c"}]},
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Observation.focus[0]"},
                {"name": "name", "valueString": "reference"}, {"name": "value", "valueString": "Patient/d"}]},
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.status"},
                {"name": "value", "valueCode": "final"}]}
        ]});
        let refs: Vec<&str> = in_fhirpath_patch(&fhirpath).into_iter().map(|(_, r)| r).collect();
        assert_eq!(refs, ["Patient/b", "Patient/c", "Patient/d"]);
    }
}
