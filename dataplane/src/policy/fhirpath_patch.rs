//! FHIRPath Patch (FHIR R4 §3.1.0.10.3, the patch form HAPI FHIR documents first): a `Parameters` resource whose
//! `operation` parameters name a FHIRPath expression to change. The rule is the JSON Patch rule: a patch may change
//! the resource's content but never its `meta` (where the tenant's tags live), `id` or `resourceType`.
//!
//! FHIRPath can reach any node from anywhere (`Patient.name.select(%resource.meta)`, `Patient.name | Patient.meta`,
//! `descendants()`), so paths are held to a small grammar that provably stays below the first element it names:
//!
//! ```text
//! path  := Type ( "." step )*          with the first step an element name other than meta, id, resourceType
//! step  := name ( "[" digits "]" )?    an element (optionally one item of it)
//!        | "where(" balanced ")"        a filter: its result is a subset of its input, whatever it tests
//!        | "first()" | "last()"        a filter
//!        | "ofType(" name ")"          a filter
//!        | "extension(" string ")"     the extensions with that url, below the current node
//! ```
//!
//! Anything else (whitespace, backquoted names, other functions, operators, environment variables outside a
//! `where`) is refused with a message that says what is accepted.

use serde_json::Value;

/// Element names a patch must never reach from the resource root.
const PROTECTED: &[&str] = &["meta", "id", "resourceType"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirPathPatchError {
    #[error("a FHIRPath Patch is a Parameters resource with one or more `operation` parameters")]
    NotAPatch,
    #[error("FHIRPath Patch operation {index}: {reason}")]
    BadOperation { index: usize, reason: String },
    #[error(
        "FHIRPath Patch operation {index}: the path `{path}` is not accepted through the gateway: use `{ty}.element` \
         steps, `[n]`, `where(…)`, `first()`, `last()`, `ofType(T)` or `extension('url')`, starting with an element \
         other than meta, id or resourceType"
    )]
    UnsupportedPath { index: usize, path: String, ty: String },
    #[error(
        "FHIRPath Patch operation {index} would change {element}: patches must not change meta, id or resourceType"
    )]
    Forbidden { index: usize, element: String },
}

/// Checks a FHIRPath Patch for a resource of type `ty`.
pub fn check(patch: &Value, ty: &str) -> Result<(), FhirPathPatchError> {
    if patch.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(FhirPathPatchError::NotAPatch);
    }
    let operations = match patch.get("parameter") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        _ => return Err(FhirPathPatchError::NotAPatch),
    };
    for (index, operation) in operations.iter().enumerate() {
        let bad = |reason: &str| FhirPathPatchError::BadOperation { index, reason: reason.to_owned() };
        if operation.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(bad("every parameter must be named `operation`"));
        }
        let parts = operation.get("part").and_then(Value::as_array).ok_or_else(|| bad("it has no parts"))?;
        let part = |name: &str| {
            let mut found = parts.iter().filter(|p| p.get("name").and_then(Value::as_str) == Some(name));
            match (found.next(), found.next()) {
                (Some(_), Some(_)) => Err(bad(&format!("`{name}` is given more than once"))),
                (found, _) => Ok(found),
            }
        };
        let kind = part("type")?
            .and_then(|p| p.get("valueCode"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`type` (valueCode) is required"))?;
        if !matches!(kind, "add" | "insert" | "delete" | "replace" | "move") {
            return Err(bad(&format!("unknown type `{kind}`")));
        }
        let path = part("path")?
            .and_then(|p| p.get("valueString"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`path` (valueString) is required"))?;
        let at_root = check_path(path, ty).map_err(|rule| match rule {
            PathRule::Unsupported => {
                FhirPathPatchError::UnsupportedPath { index, path: path.to_owned(), ty: ty.to_owned() }
            }
            PathRule::Protected(element) => FhirPathPatchError::Forbidden { index, element },
        })?;
        if kind == "add" {
            let name = part("name")?
                .and_then(|p| p.get("valueString"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`name` (valueString) is required for add"))?;
            if at_root && PROTECTED.contains(&name) {
                return Err(FhirPathPatchError::Forbidden { index, element: name.to_owned() });
            }
        } else if at_root {
            // Only `add` may work on the root itself (adding a new element to it).
            return Err(FhirPathPatchError::Forbidden { index, element: ty.to_owned() });
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathRule {
    Unsupported,
    Protected(String),
}

/// Whether `path` is the resource root itself (`Patient`); `Err` when it is outside the grammar or starts at a
/// protected element.
fn check_path(path: &str, ty: &str) -> Result<bool, PathRule> {
    let rest = path.strip_prefix(ty).ok_or(PathRule::Unsupported)?;
    if rest.is_empty() {
        return Ok(true);
    }
    let mut rest = rest.strip_prefix('.').ok_or(PathRule::Unsupported)?;
    let mut first = true;
    loop {
        let (step, after) = step(rest)?;
        if first {
            match step {
                Step::Element(name) if PROTECTED.contains(&name) => return Err(PathRule::Protected(name.to_owned())),
                Step::Element(_) => {}
                Step::Filter => return Err(PathRule::Unsupported),
            }
            first = false;
        }
        if after.is_empty() {
            return Ok(false);
        }
        rest = after.strip_prefix('.').ok_or(PathRule::Unsupported)?;
    }
}

enum Step<'a> {
    Element(&'a str),
    Filter,
}

/// One step at the start of `text`, and what follows it.
fn step(text: &str) -> Result<(Step<'_>, &str), PathRule> {
    let name_len = text.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
    let (name, after) = text.split_at(name_len);
    if name.is_empty() || !name.as_bytes()[0].is_ascii_alphabetic() {
        return Err(PathRule::Unsupported);
    }
    let Some(args) = after.strip_prefix('(') else {
        // An element, perhaps indexed.
        let after = match after.strip_prefix('[') {
            Some(index) => {
                let digits = index.bytes().take_while(u8::is_ascii_digit).count();
                let close = index[digits..].strip_prefix(']');
                match close {
                    Some(after) if digits > 0 => after,
                    _ => return Err(PathRule::Unsupported),
                }
            }
            None => after,
        };
        return Ok((Step::Element(name), after));
    };
    let close = closing_paren(args).ok_or(PathRule::Unsupported)?;
    let (inner, after) = (&args[..close], &args[close + 1..]);
    match name {
        "where" if !inner.trim().is_empty() => Ok((Step::Filter, after)),
        "first" | "last" if inner.is_empty() => Ok((Step::Filter, after)),
        "ofType" if !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            Ok((Step::Filter, after))
        }
        // The `extension` elements with that url: an element step.
        "extension" if is_string_literal(inner) => Ok((Step::Element("extension"), after)),
        _ => Err(PathRule::Unsupported),
    }
}

/// The index of the `)` closing an argument list that starts right after `(`, skipping string literals.
fn closing_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '\'') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '\'' => in_string = true,
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `'…'` with no unescaped quote inside.
fn is_string_literal(text: &str) -> bool {
    let Some(inner) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) else { return false };
    let mut escaped = false;
    for c in inner.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '\'') => return false,
            _ => {}
        }
    }
    !escaped
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn op(kind: &str, path: &str, extra: &[(&str, Value)]) -> Value {
        let mut parts = vec![json!({"name": "type", "valueCode": kind}), json!({"name": "path", "valueString": path})];
        for (name, value) in extra {
            let mut part = json!({"name": name});
            if let (Some(part), Some(value)) = (part.as_object_mut(), value.as_object()) {
                part.extend(value.clone());
            }
            parts.push(part);
        }
        json!({"name": "operation", "part": parts})
    }

    fn patch(ops: Vec<Value>) -> Value {
        json!({"resourceType": "Parameters", "parameter": ops})
    }

    #[test]
    fn paths_table() {
        let unsupported = Err(PathRule::Unsupported);
        let protected = |e: &str| Err(PathRule::Protected(e.to_owned()));
        #[rustfmt::skip]
        let cases: Vec<(&str, Result<bool, PathRule>)> = vec![
            ("Patient", Ok(true)),
            ("Patient.birthDate", Ok(false)),
            ("Patient.name[0].given", Ok(false)),
            ("Patient.name.where(use = 'official').given", Ok(false)),
            ("Patient.name.where(family.startsWith('(')).given[1]", Ok(false)),
            ("Patient.identifier.where(system='x' and value.exists()).first()", Ok(false)),
            ("Patient.extension('http://x/y').value", Ok(false)),
            ("Patient.contained.ofType(Patient).name", Ok(false)),
            ("Patient.contained.meta", Ok(false)),
            ("Patient.meta", protected("meta")),
            ("Patient.meta.tag", protected("meta")),
            ("Patient.meta.tag[0].code", protected("meta")),
            ("Patient.id", protected("id")),
            ("Patient.resourceType", protected("resourceType")),
            ("Patient.`meta`", unsupported.clone()),
            ("Patient .meta", unsupported.clone()),
            ("Patient. meta", unsupported.clone()),
            ("Patient.where(true).meta", unsupported.clone()),
            ("Patient.first().meta", unsupported.clone()),
            ("Patient.name.select(%resource.meta)", unsupported.clone()),
            ("Patient.name | Patient.meta", unsupported.clone()),
            ("Patient.name.union(Patient.meta)", unsupported.clone()),
            ("Patient.descendants()", unsupported.clone()),
            ("Patient.children().tag", unsupported.clone()),
            ("Patient.name.repeat(%resource.meta)", unsupported.clone()),
            ("%resource.meta", unsupported.clone()),
            ("Observation.status", unsupported.clone()),
            ("PatientX.name", unsupported.clone()),
            ("Patient.", unsupported.clone()),
            ("Patient..name", unsupported.clone()),
            ("Patient.name[]", unsupported.clone()),
            ("Patient.name[x]", unsupported.clone()),
            ("Patient.name.where(", unsupported.clone()),
            ("Patient.name.where()", unsupported.clone()),
            ("Patient.name.where(x)) | Patient.meta", unsupported.clone()),
            ("Patient.name.where(')').meta", Ok(false)),
            ("Patient.name.extension(url)", unsupported.clone()),
            ("Patient.name.ofType(%x)", unsupported.clone()),
            ("Patient.name.first(1)", unsupported.clone()),
            ("Patient.1name", unsupported.clone()),
        ];
        for (path, want) in cases {
            assert_eq!(check_path(path, "Patient"), want, "{path}");
        }
    }

    #[test]
    fn operations_table() {
        let v = |key: &str, value: &str| json!({ key: value });
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, Result<(), &str>)> = vec![
            ("replace a field", patch(vec![op("replace", "Patient.birthDate", &[("value", v("valueDate", "1990-01-01"))])]), Ok(())),
            ("add to the root", patch(vec![op("add", "Patient", &[("name", v("valueString", "gender")), ("value", v("valueCode", "other"))])]), Ok(())),
            ("add meta at the root", patch(vec![op("add", "Patient", &[("name", v("valueString", "meta"))])]), Err("would change meta")),
            ("add id at the root", patch(vec![op("add", "Patient", &[("name", v("valueString", "id"))])]), Err("would change id")),
            ("add a tag", patch(vec![op("add", "Patient.meta", &[("name", v("valueString", "tag"))])]), Err("would change meta")),
            ("delete the tags", patch(vec![op("delete", "Patient.meta.tag", &[])]), Err("would change meta")),
            ("replace the root", patch(vec![op("replace", "Patient", &[])]), Err("would change Patient")),
            ("delete the root", patch(vec![op("delete", "Patient", &[])]), Err("would change Patient")),
            ("insert", patch(vec![op("insert", "Patient.identifier", &[("index", json!({"valueInteger": 0}))])]), Ok(())),
            ("move", patch(vec![op("move", "Patient.name", &[("source", json!({"valueInteger": 1})), ("destination", json!({"valueInteger": 0}))])]), Ok(())),
            ("second operation refused", patch(vec![op("delete", "Patient.gender", &[]), op("delete", "Patient.meta", &[])]), Err("operation 1 would change meta")),
            ("escaping path", patch(vec![op("replace", "Patient.name.select(%resource.meta)", &[])]), Err("is not accepted")),
            ("unknown type", patch(vec![op("copy", "Patient.name", &[])]), Err("unknown type")),
            ("no path", patch(vec![json!({"name": "operation", "part": [{"name": "type", "valueCode": "delete"}]})]), Err("`path`")),
            ("two paths", patch(vec![json!({"name": "operation", "part": [{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.gender"}, {"name": "path", "valueString": "Patient.meta"}]})]), Err("more than once")),
            ("add without name", patch(vec![op("add", "Patient", &[])]), Err("`name`")),
            ("other parameter", patch(vec![json!({"name": "x"})]), Err("named `operation`")),
            ("no parameters", json!({"resourceType": "Parameters"}), Err("one or more")),
            ("not Parameters", json!({"resourceType": "Patient"}), Err("one or more")),
        ];
        for (what, patch, want) in cases {
            match (check(&patch, "Patient"), want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }
}
