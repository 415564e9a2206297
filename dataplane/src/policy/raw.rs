//! A light look at one Bundle entry, for the streaming filter's fast path: most entries can be decided, and kept
//! byte for byte, without building a `serde_json::Value` tree and serialising it again.
//!
//! [`entry_prefix`] deserialises only what the decision needs (`fullUrl`, `resource.resourceType`, `resource.meta.tag`)
//! and skips the rest with serde's `IgnoredAny`, which still checks the JSON syntax of everything it skips. It
//! answers `None` (so the caller takes the full path) for anything unusual: invalid UTF-8 (which the skipping does
//! not check), a duplicate of a field that matters (serde refuses it), a type other than expected, and any `\u` or
//! `\/` escape, so that every string that could spell an upstream URL appears literally in the bytes.

use std::borrow::Cow;

use serde::Deserialize;

use super::verify::{EntryMode, Grants};

#[derive(Debug, Deserialize)]
pub struct EntryView<'a> {
    #[serde(rename = "fullUrl", borrow, default)]
    pub full_url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub resource: Option<ResourceView<'a>>,
    #[serde(borrow, default)]
    search: Option<SearchView<'a>>,
}

#[derive(Debug, Deserialize)]
struct SearchView<'a> {
    #[serde(borrow, default)]
    mode: Option<Cow<'a, str>>,
}

impl EntryView<'_> {
    /// `search.mode`, as the Bundle filter counts it.
    pub fn mode(&self) -> EntryMode {
        EntryMode::parse(self.search.as_ref().and_then(|s| s.mode.as_deref()))
    }
}

#[derive(Debug, Deserialize)]
pub struct ResourceView<'a> {
    #[serde(rename = "resourceType", borrow, default)]
    pub resource_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    meta: Option<MetaView<'a>>,
}

#[derive(Debug, Deserialize)]
struct MetaView<'a> {
    #[serde(borrow, default)]
    tag: Option<Vec<TagView<'a>>>,
}

#[derive(Debug, Deserialize)]
struct TagView<'a> {
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

impl ResourceView<'_> {
    /// The same rule as `Grants::covers`: some `meta.tag` with a string system and code the grants hold.
    pub fn covered_by(&self, grants: &Grants) -> bool {
        self.meta.as_ref().and_then(|m| m.tag.as_ref()).is_some_and(|tags| {
            tags.iter().any(|t| matches!((&t.system, &t.code), (Some(s), Some(c)) if grants.contains(s, c)))
        })
    }
}

/// The entry at the start of `input` (more bytes may follow it): its length and its light view. `None` when `input`
/// does not start with one complete, valid JSON object (it may be cut short: the caller then buffers the rest). The
/// view is `None` when only the full path can decide the entry (see [`plain`]); its bytes are valid JSON either way.
pub fn entry_prefix(input: &[u8]) -> Option<(usize, Option<EntryView<'_>>)> {
    if input.first() != Some(&b'{') {
        return None;
    }
    // One pass of serde over the entry both finds its end and validates it. A string it cannot borrow (an escape)
    // still parses; `plain` below sends that entry to the full path.
    let mut entries = serde_json::Deserializer::from_slice(input).into_iter::<serde::de::IgnoredAny>();
    let mut views = serde_json::Deserializer::from_slice(input).into_iter::<EntryView<'_>>();
    match views.next() {
        Some(Ok(view)) => {
            let len = views.byte_offset();
            Some((len, plain(&input[..len]).map(|_| view)))
        }
        // Not the light view's shape (a duplicate field, a number for a tag): valid JSON still goes to the full path.
        Some(Err(e)) if !e.is_eof() => match entries.next() {
            Some(Ok(_)) => Some((entries.byte_offset(), None)),
            _ => None,
        },
        _ => None,
    }
}

/// The light view of one resource (a read's body), or `None` when only the full path can decide it.
pub fn resource_view(raw: &[u8]) -> Option<ResourceView<'_>> {
    serde_json::from_str(plain(raw)?).ok()
}

/// `raw` as text when every string in it is spelled literally (valid UTF-8, no `\u` or `\/` escape).
fn plain(raw: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(raw).ok()?;
    // One pass over the backslashes; `\\` is skipped whole, so `\\u` (a backslash, then `u`) is no escape.
    let mut rest = raw;
    while let Some(at) = memchr::memchr(b'\\', rest) {
        match rest.get(at + 1) {
            Some(b'u' | b'/') => return None,
            _ => rest = rest.get(at + 2..).unwrap_or_default(),
        }
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use fhirgw_config::tenant::Tag;
    use serde_json::{Value, json};

    use super::*;
    use crate::policy::verify::entry_visible;

    const DS: &str = "https://fhirgw.dev/dataset";

    /// Whatever the light view decides agrees with the full rule (`entry_visible` on the parsed entry).
    #[test]
    fn agrees_with_the_full_rule() {
        let a = Tag { system: DS.into(), code: "a".into() };
        let grants = Grants::new([&a]);
        let tag = |code: &str| json!({"system": DS, "code": code});
        let cases: Vec<(&str, String, Option<bool>)> = vec![
            ("own", json!({"resource": {"resourceType": "Patient", "meta": {"tag": [tag("a")]}}}).to_string(), Some(true)),
            ("other", json!({"resource": {"resourceType": "Patient", "meta": {"tag": [tag("b")]}}}).to_string(), Some(false)),
            ("untagged", json!({"resource": {"resourceType": "Patient"}}).to_string(), Some(false)),
            ("no resource", json!({"request": {"url": "Patient/1"}}).to_string(), Some(false)),
            ("tag without code", json!({"resource": {"resourceType": "Patient", "meta": {"tag": [{"system": DS}]}}}).to_string(), Some(false)),
            ("one of several", json!({"resource": {"resourceType": "Patient", "meta": {"tag": [tag("b"), tag("a")]}}}).to_string(), Some(true)),
            ("escaped quotes kept", json!({"resource": {"resourceType": "Patient", "text": {"div": "<div a=\"1\">"}, "meta": {"tag": [tag("a")]}}}).to_string(), Some(true)),
            (
                "duplicate meta",
                format!(r#"{{"resource":{{"resourceType":"Patient","meta":{{"tag":[{}]}},"meta":{{"tag":[{}]}}}}}}"#, tag("b"), tag("a")),
                None,
            ),
            (
                "duplicate code",
                format!(r#"{{"resource":{{"resourceType":"Patient","meta":{{"tag":[{{"system":"{DS}","code":"b","code":"a"}}]}}}}}}"#),
                None,
            ),
            ("duplicate resource", format!(r#"{{"resource":{{"resourceType":"Patient"}},"resource":{{"resourceType":"Patient","meta":{{"tag":[{}]}}}}}}"#, tag("a")), None),
            ("unicode escape", r#"{"resource":{"resourceType":"Pati\u0065nt","meta":{"tag":[]}}}"#.into(), None),
            ("escaped slash", r#"{"fullUrl":"http:\/\/x","resource":{"resourceType":"Patient"}}"#.into(), None),
            ("tag is not an array", json!({"resource": {"resourceType": "Patient", "meta": {"tag": tag("a")}}}).to_string(), None),
            ("code is a number", json!({"resource": {"resourceType": "Patient", "meta": {"tag": [{"system": DS, "code": 1}]}}}).to_string(), None),
            ("resourceType is a number", json!({"resource": {"resourceType": 1}}).to_string(), None),
            ("not JSON", r#"{"resource":{"resourceType":"Patient",}}"#.into(), None),
        ];
        for (what, raw, want) in cases {
            let decided = entry_prefix(raw.as_bytes())
                .and_then(|(_, view)| view)
                .map(|v| v.resource.as_ref().is_some_and(|r| r.resource_type.is_some() && r.covered_by(&grants)));
            assert_eq!(decided, want, "{what}");
            if let (Some(decided), Ok(parsed)) = (decided, serde_json::from_str::<Value>(&raw)) {
                assert_eq!(decided, entry_visible(&parsed, &grants, &|_| true), "{what} disagrees with entry_visible");
            }
        }
        assert!(
            entry_prefix(b"{\"resource\":{\"resourceType\":\"\xff\"}}").and_then(|(_, v)| v).is_none(),
            "invalid UTF-8"
        );
    }

    #[test]
    fn resource_views() {
        let a = Tag { system: DS.into(), code: "a".into() };
        let grants = Grants::new([&a]);
        let ok = |raw: &str| {
            resource_view(raw.as_bytes()).map(|v| {
                let covered = v.covered_by(&grants);
                (v.resource_type.map(Cow::into_owned), v.id.map(Cow::into_owned), covered)
            })
        };
        let own =
            format!(r#"{{"resourceType":"Patient","id":"p1","meta":{{"tag":[{{"system":"{DS}","code":"a"}}]}}}}"#);
        assert_eq!(ok(&own), Some((Some("Patient".into()), Some("p1".into()), true)));
        assert_eq!(ok(&format!("{own} x")), None, "trailing data");
        assert_eq!(ok(&own.replace(r#""id":"p1""#, r#""id":"p1","id":"p2""#)), None, "duplicate id");
        assert_eq!(ok(r#"{"resourceType":"Patient","id":"p\u0031"}"#), None, "escape");
        let p1 = Some((Some("Patient".into()), Some("p1".into()), false));
        assert_eq!(ok(r#"{"resourceType":"Patient","id":"p1","text":"a\\u"}"#), p1, "an escaped backslash, then u");
        assert_eq!(ok(r#"{"resourceType":"Patient","id":"p1","text":"\"q\""}"#), p1, "escaped quotes");
        assert_eq!(
            ok(r#"{"resourceType":"Patient","id":"p1","text":"a\\\/"}"#),
            None,
            "an escaped backslash, then an escaped slash"
        );
        assert_eq!(ok(r#"{"resourceType":"Patient","id":"p1","text":"a\/b"}"#), None, "escaped slash");
        assert_eq!(ok("{\"resourceType\":\"\\"), None, "a trailing backslash");
        assert_eq!(
            ok(r#"{"resourceType":"Patient","id":"p1"}"#),
            Some((Some("Patient".into()), Some("p1".into()), false))
        );
    }
}
