//! A light look at one Bundle entry, for the streaming filter's fast path: most entries can be decided, and kept
//! byte for byte, without building a `serde_json::Value` tree and serialising it again.
//!
//! [`entry_prefix`] deserialises only what the decision needs (`fullUrl`, `resource.resourceType`, `resource.meta.tag`)
//! and skips the rest with serde's `IgnoredAny`, which still checks the JSON syntax of everything it skips. It
//! answers `None` (so the caller takes the full path) for anything unusual: invalid UTF-8 (which the skipping does
//! not check), a duplicate of a field that matters (serde refuses it), a type other than expected, and any `\u` or
//! `\/` escape, so that every string that could spell an upstream URL appears literally in the bytes.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::verify::{EntryMode, Grants};

mod scan;

// The views are deserialised by hand, not derived: a derived struct also accepts a JSON *array* in place of an
// object (serde's positional form), so `"resource": ["Patient", "p1", {"tag": [...]}]` would have looked like a
// tagged Patient here while the full rule (a parsed `Value`) sees no resource at all. Here every view is an object
// or an error (the full path then decides). Member names are compared as bytes, as serde_json hands them over
// without checking their UTF-8 (`plain` checks the whole input once); a duplicate of a member that matters is an
// error, as with serde's derive; strings are borrowed (one with an escape is an error: the full path decides).

#[derive(Debug, Default, PartialEq)]
pub struct EntryView<'a> {
    pub full_url: Option<&'a str>,
    pub resource: Option<ResourceView<'a>>,
    search: Option<SearchView<'a>>,
}

#[derive(Debug, Default, PartialEq)]
struct SearchView<'a> {
    mode: Option<&'a str>,
}

impl EntryView<'_> {
    /// `search.mode`, as the Bundle filter counts it.
    pub fn mode(&self) -> EntryMode {
        EntryMode::parse(self.search.as_ref().and_then(|s| s.mode))
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct ResourceView<'a> {
    pub resource_type: Option<&'a str>,
    pub id: Option<&'a str>,
    meta: Option<MetaView<'a>>,
}

#[derive(Debug, Default, PartialEq)]
struct MetaView<'a> {
    tag: Option<Vec<TagView<'a>>>,
}

#[derive(Debug, Default, PartialEq)]
struct TagView<'a> {
    system: Option<&'a str>,
    code: Option<&'a str>,
}

/// A member name, as far as the views care.
enum Name {
    FullUrl,
    Resource,
    Search,
    Mode,
    ResourceType,
    Id,
    Meta,
    Tag,
    System,
    Code,
    Other,
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl Visitor<'_> for Names {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Name, E> {
                Ok(match name {
                    b"fullUrl" => Name::FullUrl,
                    b"resource" => Name::Resource,
                    b"search" => Name::Search,
                    b"mode" => Name::Mode,
                    b"resourceType" => Name::ResourceType,
                    b"id" => Name::Id,
                    b"meta" => Name::Meta,
                    b"tag" => Name::Tag,
                    b"system" => Name::System,
                    b"code" => Name::Code,
                    _ => Name::Other,
                })
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Name, E> {
                self.visit_bytes(name.as_bytes())
            }
        }
        deserializer.deserialize_bytes(Names)
    }
}

/// Sets `slot` from the map's next value, refusing a second occurrence of the member.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    seen: &mut bool,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if std::mem::replace(seen, true) {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = map.next_value()?;
    Ok(())
}

/// `Deserialize` for a view: a JSON object only; the listed members into their fields (each at most once), every
/// other member skipped (and validated).
macro_rules! object_view {
    ($view:ident, $what:literal, { $($name:ident => $field:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $view<'de> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Members;
                impl<'de> Visitor<'de> for Members {
                    type Value = $view<'de>;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                        let mut view = $view::default();
                        $(let mut $field = false;)+
                        while let Some(name) = map.next_key::<Name>()? {
                            match name {
                                $(Name::$name => once(&mut map, &mut $field, &mut view.$field, stringify!($field))?,)+
                                _ => {
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(view)
                    }
                }
                deserializer.deserialize_map(Members)
            }
        }
    };
}

object_view!(EntryView, "a Bundle entry", { FullUrl => full_url, Resource => resource, Search => search });
object_view!(SearchView, "Bundle.entry.search", { Mode => mode });
object_view!(ResourceView, "a resource", { ResourceType => resource_type, Id => id, Meta => meta });
object_view!(MetaView, "Resource.meta", { Tag => tag });
object_view!(TagView, "a Coding", { System => system, Code => code });

impl ResourceView<'_> {
    /// The same rule as `Grants::covers`: some `meta.tag` with a string system and code the grants hold.
    pub fn covered_by(&self, grants: &Grants) -> bool {
        self.meta.as_ref().and_then(|m| m.tag.as_ref()).is_some_and(|tags| {
            tags.iter().any(|t| matches!((t.system, t.code), (Some(s), Some(c)) if grants.contains(s, c)))
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
    match scan::entry(input) {
        Ok((len, view)) => Some((len, Some(view))),
        Err(scan::Unsure) => entry_prefix_serde(input),
    }
}

/// [`entry_prefix`] by serde alone: the reference that [`scan`] must agree with.
fn entry_prefix_serde(input: &[u8]) -> Option<(usize, Option<EntryView<'_>>)> {
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
    match scan::resource(raw) {
        Ok(view) => Some(view),
        Err(scan::Unsure) => resource_view_serde(raw),
    }
}

/// For the fuzz target `views` (`fuzz/`): both answers, in words, when [`scan`] answers for `input` (as a Bundle
/// entry's bytes, or as a whole resource) and serde's views answer otherwise.
#[doc(hidden)]
pub fn scan_disagreement(input: &[u8]) -> Option<String> {
    if let Ok((len, view)) = scan::entry(input) {
        let (scanned, reference) = (Some((len, Some(view))), entry_prefix_serde(input));
        if scanned != reference {
            return Some(format!("entry: the scan answered {scanned:?}, serde {reference:?}"));
        }
    }
    if let Ok(view) = scan::resource(input) {
        let (scanned, reference) = (Some(view), resource_view_serde(input));
        if scanned != reference {
            return Some(format!("resource: the scan answered {scanned:?}, serde {reference:?}"));
        }
    }
    None
}

/// [`resource_view`] by serde alone.
fn resource_view_serde(raw: &[u8]) -> Option<ResourceView<'_>> {
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
            // Arrays where objects belong: serde's derive took them positionally (a tagged Patient), the full rule
            // sees no resource, no meta, no tag.
            ("resource is an array", format!(r#"{{"resource":["Patient","p1",{{"tag":[{}]}}]}}"#, tag("a")), None),
            ("meta is an array", format!(r#"{{"resource":{{"resourceType":"Patient","meta":[[{}]]}}}}"#, tag("a")), None),
            ("a tag is an array", format!(r#"{{"resource":{{"resourceType":"Patient","meta":{{"tag":[["{DS}","a"]]}}}}}}"#), None),
            ("the entry is an array", format!(r#"["{DS}",{{"resourceType":"Patient","meta":{{"tag":[{}]}}}}]"#, tag("a")), None),
            ("an escaped quote in the code", format!(r#"{{"resource":{{"resourceType":"Patient","meta":{{"tag":[{{"system":"{DS}","code":"a\"b"}}]}}}}}}"#), None),
            ("other members skipped, any case", format!(r#"{{"Resource":1,"resource":{{"resourceType":"Patient","Meta":[],"meta":{{"tag":[{}]}},"x":{{"tag":[]}}}},"search":{{"mode":"match","score":1}}}}"#, tag("a")), Some(true)),
            ("null meta", r#"{"resource":{"resourceType":"Patient","meta":null}}"#.into(), Some(false)),
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
                (v.resource_type.map(str::to_owned), v.id.map(str::to_owned), covered)
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
        assert_eq!(ok(r#"["Patient","p1",{"tag":[]}]"#), None, "an array, not a resource");
        assert_eq!(ok(&own.replace(r#""meta":{"#, r#""meta":[{"#).replace("}]}}", "}]}]}")), None, "meta as an array");
        assert_eq!(ok("{\"resourceType\":\"\\"), None, "a trailing backslash");
        assert_eq!(
            ok(r#"{"resourceType":"Patient","id":"p1"}"#),
            Some((Some("Patient".into()), Some("p1".into()), false))
        );
    }
}
