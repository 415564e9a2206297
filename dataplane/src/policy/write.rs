//! Rules for writes: which tags a written resource may carry, and which JSON Patch operations are allowed.
//!
//! A "dataset tag" is a `meta.tag` whose system is used by any grant of any tenant. A written resource must carry
//! only dataset tags the caller's tenant holds, and at least one; a write without one is stamped (create: the
//! tenant's only tag; update: the tags the stored resource had). A write can therefore never move a resource into
//! another tenant's dataset nor strip its tag.

use std::collections::HashSet;

use fhirgw_config::Snapshot;
use fhirgw_config::tenant::Tag;
use serde_json::{Value, json};

use super::verify::Grants;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the resource carries the dataset tag {0}, which is not granted to you")]
    ForeignTag(String),
    #[error("meta.tag must name one of your datasets (several are granted, so none is chosen for you)")]
    NoDataset,
    #[error("meta.tag is malformed")]
    Malformed,
    /// A tag without a string `system` or `code`: stored as is, it would sit beside the dataset tags with a meaning
    /// nobody can check.
    #[error("meta.tag[{0}] must have both a system and a code")]
    IncompleteTag(usize),
    #[error("patch operation {0} is not allowed: patches must not change meta, id or resourceType")]
    ForbiddenPatch(usize),
    #[error("the patch is not a JSON Patch document")]
    BadPatch,
    #[error("the resource must keep at least one of your datasets' tags")]
    WouldOrphan,
}

/// `$meta-add` (`add`) or `$meta-delete` of `tags` on a stored resource the caller may see: every dataset tag named
/// must be one the caller holds (nothing is moved into, or taken out of, another tenant's dataset), and after a
/// delete the resource must still carry one of the caller's dataset tags. Tags of other systems are free.
pub fn check_meta_change(
    stored: &Value,
    tags: &[Value],
    add: bool,
    grants: &Grants,
    systems: &HashSet<String>,
) -> Result<(), WriteError> {
    let mut removed = Vec::new();
    for (index, tag) in tags.iter().enumerate() {
        let (system, code) = system_and_code(tag, index)?;
        if !systems.contains(system) {
            continue;
        }
        if !grants.contains(system, code) {
            return Err(WriteError::ForeignTag(format!("{system}|{code}")));
        }
        removed.push((system, code));
    }
    if !add && granted_tags(stored, grants).iter().all(|t| removed.contains(&(t.system.as_str(), t.code.as_str()))) {
        return Err(WriteError::WouldOrphan);
    }
    Ok(())
}

/// A tag's system and code, both required to be non-empty strings.
fn system_and_code(tag: &Value, index: usize) -> Result<(&str, &str), WriteError> {
    let field = |name: &str| tag.get(name).and_then(Value::as_str).filter(|v| !v.is_empty());
    match (tag.is_object(), field("system"), field("code")) {
        (true, Some(system), Some(code)) => Ok((system, code)),
        (true, _, _) => Err(WriteError::IncompleteTag(index)),
        (false, _, _) => Err(WriteError::Malformed),
    }
}

/// Systems of every tag granted to any tenant, expired or not.
pub fn dataset_systems(snapshot: &Snapshot) -> HashSet<String> {
    snapshot.tenants.values().flat_map(|t| t.grants.iter().map(|g| g.tag.system.clone())).collect()
}

/// Checks a resource about to be written, stamping `stamp` when it carries none of the caller's dataset tags.
pub fn check_tags(
    resource: &mut Value,
    grants: &Grants,
    systems: &HashSet<String>,
    stamp: &[Tag],
) -> Result<(), WriteError> {
    let tags = match resource.get("meta").and_then(|m| m.get("tag")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tags)) => tags.clone(),
        Some(_) => return Err(WriteError::Malformed),
    };
    let mut granted = 0;
    for (index, tag) in tags.iter().enumerate() {
        let (system, code) = system_and_code(tag, index)?;
        if !systems.contains(system) {
            continue;
        }
        if grants.contains(system, code) {
            granted += 1;
        } else {
            return Err(WriteError::ForeignTag(format!("{system}|{code}")));
        }
    }
    if granted > 0 {
        return Ok(());
    }
    if stamp.is_empty() {
        return Err(WriteError::NoDataset);
    }
    let Some(obj) = resource.as_object_mut() else { return Err(WriteError::Malformed) };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else { return Err(WriteError::Malformed) };
    let list = meta.entry("tag").or_insert_with(|| json!([]));
    if list.is_null() {
        *list = json!([]);
    }
    let Some(list) = list.as_array_mut() else { return Err(WriteError::Malformed) };
    for tag in stamp {
        list.push(json!({ "system": tag.system, "code": tag.code }));
    }
    Ok(())
}

/// The caller's dataset tags a stored resource carries (what an update without tags keeps).
pub fn granted_tags(resource: &Value, grants: &Grants) -> Vec<Tag> {
    resource
        .get("meta")
        .and_then(|m| m.get("tag"))
        .and_then(Value::as_array)
        .map(|tags| {
            tags.iter()
                .filter_map(|t| {
                    let system = t.get("system")?.as_str()?;
                    let code = t.get("code")?.as_str()?;
                    grants.contains(system, code).then(|| Tag { system: system.to_owned(), code: code.to_owned() })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON Patch (RFC 6902) may change the resource's content but not its `meta`, `id` or `resourceType`, nor
/// replace the whole document.
pub fn check_json_patch(patch: &Value) -> Result<(), WriteError> {
    let ops = patch.as_array().ok_or(WriteError::BadPatch)?;
    if ops.is_empty() {
        return Err(WriteError::BadPatch);
    }
    let protected = |path: &str| {
        path.is_empty()
            || ["/meta", "/id", "/resourceType"].iter().any(|p| path == *p || path.starts_with(&format!("{p}/")))
    };
    for (i, op) in ops.iter().enumerate() {
        let kind = op.get("op").and_then(Value::as_str).ok_or(WriteError::BadPatch)?;
        if !matches!(kind, "add" | "remove" | "replace" | "move" | "copy" | "test") {
            return Err(WriteError::BadPatch);
        }
        let path = op.get("path").and_then(Value::as_str).ok_or(WriteError::BadPatch)?;
        if kind != "test" && protected(path) {
            return Err(WriteError::ForbiddenPatch(i));
        }
        if kind == "move" {
            let from = op.get("from").and_then(Value::as_str).ok_or(WriteError::BadPatch)?;
            if protected(from) {
                return Err(WriteError::ForbiddenPatch(i));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = "https://fhirgw.dev/dataset";

    fn tag(code: &str) -> Tag {
        Tag { system: DS.into(), code: code.into() }
    }

    fn systems() -> HashSet<String> {
        [DS.to_owned()].into()
    }

    type Case<'a> = (&'a str, Value, &'a [Tag], Result<usize, WriteError>);

    #[test]
    fn tag_rules_table() {
        let a = tag("a");
        let grants = Grants::new([&a]);
        let stamp_a = [tag("a")];
        let cases: Vec<Case> = vec![
            ("own tag", json!({"meta": {"tag": [{"system": DS, "code": "a"}]}}), &[], Ok(1)),
            (
                "foreign tag",
                json!({"meta": {"tag": [{"system": DS, "code": "b"}]}}),
                &[],
                Err(WriteError::ForeignTag(format!("{DS}|b"))),
            ),
            (
                "own and foreign",
                json!({"meta": {"tag": [{"system": DS, "code": "a"}, {"system": DS, "code": "b"}]}}),
                &[],
                Err(WriteError::ForeignTag(format!("{DS}|b"))),
            ),
            (
                "dataset tag without code",
                json!({"meta": {"tag": [{"system": DS}]}}),
                &[],
                Err(WriteError::IncompleteTag(0)),
            ),
            (
                "tag without a system beside the own tag",
                json!({"meta": {"tag": [{"system": DS, "code": "a"}, {"code": "sample-b"}]}}),
                &[],
                Err(WriteError::IncompleteTag(1)),
            ),
            (
                "tag without a system, stamping",
                json!({"meta": {"tag": [{"code": "b"}]}}),
                &stamp_a,
                Err(WriteError::IncompleteTag(0)),
            ),
            (
                "empty system",
                json!({"meta": {"tag": [{"system": "", "code": "a"}]}}),
                &stamp_a,
                Err(WriteError::IncompleteTag(0)),
            ),
            (
                "code not a string",
                json!({"meta": {"tag": [{"system": DS, "code": 1}]}}),
                &stamp_a,
                Err(WriteError::IncompleteTag(0)),
            ),
            (
                "other system without code",
                json!({"meta": {"tag": [{"system": "http://x"}]}}),
                &stamp_a,
                Err(WriteError::IncompleteTag(0)),
            ),
            ("tag not an object", json!({"meta": {"tag": ["a"]}}), &stamp_a, Err(WriteError::Malformed)),
            ("untagged, stamped", json!({}), &stamp_a, Ok(1)),
            ("meta without tag, stamped", json!({"meta": {"versionId": "1"}}), &stamp_a, Ok(1)),
            ("null tag, stamped", json!({"meta": {"tag": null}}), &stamp_a, Ok(1)),
            (
                "other systems are kept and stamped",
                json!({"meta": {"tag": [{"system": "http://x", "code": "y"}]}}),
                &stamp_a,
                Ok(2),
            ),
            ("untagged, nothing to stamp", json!({}), &[], Err(WriteError::NoDataset)),
            ("malformed tag", json!({"meta": {"tag": "a"}}), &stamp_a, Err(WriteError::Malformed)),
        ];
        for (what, mut resource, stamp, want) in cases {
            let got = check_tags(&mut resource, &grants, &systems(), stamp)
                .map(|()| resource["meta"]["tag"].as_array().map_or(0, Vec::len));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn granted_tags_of_a_stored_resource() {
        let a = tag("a");
        let grants = Grants::new([&a]);
        let stored = json!({"meta": {"tag": [{"system": DS, "code": "a"}, {"system": DS, "code": "b"}, {"system": "http://x", "code": "a"}]}});
        assert_eq!(granted_tags(&stored, &grants), vec![tag("a")]);
    }

    #[test]
    fn meta_change_table() {
        let (a, b) = (tag("a"), tag("b"));
        let grants = Grants::new([&a, &b]);
        let t = |code: &str| json!({"system": DS, "code": code});
        let stored = json!({"meta": {"tag": [t("a"), t("b"), {"system": "http://x", "code": "y"}]}});
        let only_a = json!({"meta": {"tag": [t("a"), t("c")]}});
        type Case<'a> = (&'a str, &'a Value, Value, bool, Result<(), WriteError>);
        let cases: Vec<Case> = vec![
            ("add own", &only_a, json!([t("b")]), true, Ok(())),
            ("add other system", &only_a, json!([{"system": "http://x", "code": "z"}]), true, Ok(())),
            ("add foreign", &only_a, json!([t("c")]), true, Err(WriteError::ForeignTag(format!("{DS}|c")))),
            (
                "add foreign among own",
                &stored,
                json!([t("a"), t("z")]),
                true,
                Err(WriteError::ForeignTag(format!("{DS}|z"))),
            ),
            ("delete one of two own", &stored, json!([t("b")]), false, Ok(())),
            ("delete both own", &stored, json!([t("a"), t("b")]), false, Err(WriteError::WouldOrphan)),
            ("delete the only own", &only_a, json!([t("a")]), false, Err(WriteError::WouldOrphan)),
            (
                "delete another tenant's",
                &only_a,
                json!([t("c")]),
                false,
                Err(WriteError::ForeignTag(format!("{DS}|c"))),
            ),
            ("delete other system", &stored, json!([{"system": "http://x", "code": "y"}]), false, Ok(())),
            ("malformed system", &stored, json!([{"system": 1, "code": "a"}]), true, Err(WriteError::IncompleteTag(0))),
            ("add a tag without a system", &stored, json!([{"code": "a"}]), true, Err(WriteError::IncompleteTag(0))),
            (
                "delete a tag without a code",
                &stored,
                json!([t("b"), {"system": DS}]),
                false,
                Err(WriteError::IncompleteTag(1)),
            ),
            ("not an object", &stored, json!(["a"]), true, Err(WriteError::Malformed)),
        ];
        for (what, stored, tags, add, want) in cases {
            let tags = tags.as_array().cloned().unwrap_or_default();
            assert_eq!(check_meta_change(stored, &tags, add, &grants, &systems()), want, "{what}");
        }
    }

    #[test]
    fn patch_rules_table() {
        let cases: Vec<(Value, Result<(), WriteError>)> = vec![
            (json!([{"op": "replace", "path": "/name/0/family", "value": "X"}]), Ok(())),
            (json!([{"op": "add", "path": "/telecom/-", "value": {}}]), Ok(())),
            (json!([{"op": "test", "path": "/meta/versionId", "value": "1"}]), Ok(())),
            (json!([{"op": "remove", "path": "/meta/tag/0"}]), Err(WriteError::ForbiddenPatch(0))),
            (json!([{"op": "replace", "path": "/meta", "value": {}}]), Err(WriteError::ForbiddenPatch(0))),
            (json!([{"op": "add", "path": "/meta/tag/-", "value": {}}]), Err(WriteError::ForbiddenPatch(0))),
            (json!([{"op": "replace", "path": "/id", "value": "x"}]), Err(WriteError::ForbiddenPatch(0))),
            (json!([{"op": "replace", "path": "", "value": {}}]), Err(WriteError::ForbiddenPatch(0))),
            (
                json!([{"op": "test", "path": "/x", "value": 1}, {"op": "move", "from": "/meta/tag", "path": "/x"}]),
                Err(WriteError::ForbiddenPatch(1)),
            ),
            (json!([{"op": "copy", "from": "/meta/tag", "path": "/extension"}]), Ok(())),
            (json!([{"op": "replace", "path": "/metadata", "value": 1}]), Ok(())),
            (json!([{"op": "bogus", "path": "/x"}]), Err(WriteError::BadPatch)),
            (json!([{"op": "replace"}]), Err(WriteError::BadPatch)),
            (json!([]), Err(WriteError::BadPatch)),
            (json!({"op": "replace"}), Err(WriteError::BadPatch)),
        ];
        for (patch, want) in cases {
            assert_eq!(check_json_patch(&patch), want, "{patch}");
        }
    }
}
