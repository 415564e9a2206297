//! Public URLs and the rewriting of links the upstream wrote.
//!
//! Every public URL starts from `PublicConfig::base` (see `public.rs`); these functions only move upstream URLs
//! onto it.

use std::time::SystemTime;

use fhirgw_config::upstream::Upstream;
use serde_json::Value;

use crate::policy::paging::PageSigner;
use crate::policy::query::PAGE_PARAM;

/// What a page link needs to be signed.
pub struct PageContext<'a> {
    pub signer: &'a PageSigner,
    pub tenant: &'a str,
    /// Gateway path relative to the base, e.g. `Observation` or `Patient/1/_history`.
    pub path: &'a str,
    pub upstream: &'a Upstream,
    /// Public URL of this request (for `self`).
    pub self_url: String,
    pub public_base: &'a str,
    /// The search was narrowed upstream (carried in the page tokens, for `total`).
    pub narrowed: bool,
}

/// Rewrites `Bundle.link`: `self` becomes the request's public URL; `next`/`previous`/`first`/`last` on the upstream
/// become signed page links; anything else (or any link not on the upstream) is dropped.
pub fn rewrite_links(bundle: &mut Value, ctx: &PageContext<'_>, now: SystemTime) {
    let Some(links) = bundle.get_mut("link").and_then(Value::as_array_mut) else { return };
    links.retain_mut(|link| {
        let relation = link.get("relation").and_then(Value::as_str).unwrap_or_default().to_owned();
        let url = link.get("url").and_then(Value::as_str).unwrap_or_default().to_owned();
        let new_url = match relation.as_str() {
            "self" => Some(ctx.self_url.clone()),
            "next" | "previous" | "prev" | "first" | "last" => upstream_target(ctx.upstream, &url).map(|target| {
                let mut claims = PageSigner::claims(ctx.tenant, ctx.path, &ctx.upstream.name, &target, now);
                claims.narrowed = ctx.narrowed;
                let token = ctx.signer.sign(&claims);
                format!("{}/{}?{PAGE_PARAM}={token}", ctx.public_base, ctx.path)
            }),
            _ => None,
        };
        match new_url {
            Some(u) => {
                link["url"] = Value::String(u);
                true
            }
            None => false,
        }
    });
}

/// Path and query of an absolute URL on the upstream's base, if it is one.
pub fn upstream_target(upstream: &Upstream, url: &str) -> Option<String> {
    let rest = url.strip_prefix(&upstream.origin)?;
    let on_base = rest.strip_prefix(&upstream.base_path)?;
    if !(on_base.is_empty() || on_base.starts_with('/') || on_base.starts_with('?')) {
        return None;
    }
    Some(rest.to_owned())
}

/// What follows the upstream's base in an absolute URL on it: empty, or starting with `/`, `?` or `#`. Scheme and
/// host compare case-insensitively (RFC 3986 §6.2.2.1), the path exactly; `None` for any other URL.
fn on_upstream_base<'u>(upstream: &Upstream, url: &'u str) -> Option<&'u str> {
    let origin = url.get(..upstream.origin.len()).filter(|o| o.eq_ignore_ascii_case(&upstream.origin))?;
    let rest = url[origin.len()..].strip_prefix(upstream.base_path.as_str())?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

/// Whether `text` spells the upstream's origin (`scheme://authority`) anywhere, scheme and host in any case. A
/// longer authority that starts with it (`:80900` for `:8090`) counts too: this only decides whether text can pass
/// without looking closer, so it errs towards yes. No copy of `text` is made. For many texts of one upstream (a
/// stream's entries or lines), build an [`OriginFinder`] once instead.
pub fn mentions_origin(text: &[u8], upstream: &Upstream) -> bool {
    OriginFinder::new(upstream).mentions(text).next().is_some()
}

/// Where texts spell one upstream's origin, as [`mentions_origin`] counts it.
///
/// It searches for the longest run of `://authority` without an ASCII letter (`://10.0.0.7:8080` whole, `:8080` of
/// `://hapi:8080`, at least `://`): that run is spelled the same in any case, so each mention holds it at the same
/// offset, and the few places that hold it are checked whole. Text is full of other URLs (`http://loinc.org` in
/// every coding); searching for `://` stopped at each of them.
pub struct OriginFinder {
    /// `scheme://authority` as configured; `None` for an origin without `://` (never built by the configuration),
    /// which every text mentions at offset 0.
    origin: Option<Box<[u8]>>,
    /// Where the searched run starts in `origin`.
    run_at: usize,
    run: memchr::memmem::Finder<'static>,
}

impl OriginFinder {
    pub fn new(upstream: &Upstream) -> Self {
        let origin = upstream.origin.as_bytes();
        let Some(separator) = upstream.origin.find("://") else {
            return OriginFinder { origin: None, run_at: 0, run: memchr::memmem::Finder::new(b"://").into_owned() };
        };
        // The longest letter-free run from the separator on (the first one found among equals): it starts at the
        // separator at the latest, which is a run of three.
        let (mut best, mut at) = ((separator, separator), separator);
        for (i, byte) in origin.iter().enumerate().skip(separator) {
            if byte.is_ascii_alphabetic() {
                at = i + 1;
            } else if i + 1 - at > best.1 - best.0 {
                best = (at, i + 1);
            }
        }
        let (start, end) = best;
        OriginFinder {
            origin: Some(origin.into()),
            run_at: start,
            run: memchr::memmem::Finder::new(&origin[start..end]).into_owned(),
        }
    }

    /// Whether `text` mentions the origin.
    pub fn any(&self, text: &[u8]) -> bool {
        self.mentions(text).next().is_some()
    }

    /// The offset of each mention's first byte in `text`, in order.
    pub fn mentions<'t>(&'t self, text: &'t [u8]) -> impl Iterator<Item = usize> + 't {
        let mut from = 0;
        let mut malformed = self.origin.is_none();
        std::iter::from_fn(move || {
            if std::mem::take(&mut malformed) {
                return Some(0);
            }
            let origin = self.origin.as_deref()?;
            // One occurrence of the run after another, overlapping ones included: each is a candidate start.
            while let Some(found) = text.get(from..).and_then(|rest| self.run.find(rest)) {
                let run = from + found;
                from = run + 1;
                let Some(start) = run.checked_sub(self.run_at) else { continue };
                if text.get(start..start + origin.len()).is_some_and(|t| t.eq_ignore_ascii_case(origin)) {
                    return Some(start);
                }
            }
            from = text.len() + 1;
            None
        })
    }
}

/// An absolute URL on the upstream's base, moved to the public base; `None` for any other URL.
pub fn rewrite_url(upstream: &Upstream, public_base: &str, url: &str) -> Option<String> {
    on_upstream_base(upstream, url).map(|rest| {
        // Once per kept entry of every Bundle: two copies, without the formatting machinery.
        let mut public = String::with_capacity(public_base.len() + rest.len());
        public.push_str(public_base);
        public.push_str(rest);
        public
    })
}

/// Moves every absolute reference to the upstream's own base inside a resource to the public base: each
/// `reference` string at any depth (`Reference.reference` in elements, extensions and contained resources alike).
/// Relative references, references to other servers and URLs in any other element are left alone. Returns how
/// many were rewritten.
///
/// A client cannot resolve the upstream's internal address, and must not learn it. The depth is bounded by the
/// JSON parser (serde_json refuses nesting deeper than 128).
pub fn rewrite_references(value: &mut Value, upstream: &Upstream, public_base: &str) -> usize {
    match value {
        Value::Object(map) => map
            .iter_mut()
            .map(|(key, item)| match item {
                Value::String(url) if key == "reference" => match rewrite_url(upstream, public_base, url) {
                    Some(public) => {
                        *url = public;
                        1
                    }
                    None => 0,
                },
                other => rewrite_references(other, upstream, public_base),
            })
            .sum(),
        Value::Array(items) => items.iter_mut().map(|item| rewrite_references(item, upstream, public_base)).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use fhirgw_proto::config::v1 as pb;
    use serde_json::json;

    use super::*;

    fn upstream(base_url: &str) -> Upstream {
        let msg = pb::Upstream { name: "fhir".into(), base_url: base_url.into(), ..Default::default() };
        Upstream::try_from(&msg).unwrap_or_else(|e| panic!("{e}"))
    }

    const PUBLIC: &str = "https://fhir.example.org:8443/fhir";

    #[test]
    fn rewrite_url_table() {
        let up = upstream("http://upstream:8090/fhir");
        let root = upstream("http://upstream:8090");
        // (what, upstream, url, rewritten)
        let cases: &[(&str, &Upstream, &str, Option<&str>)] = &[
            ("resource", &up, "http://upstream:8090/fhir/Patient/123", Some("/Patient/123")),
            ("version", &up, "http://upstream:8090/fhir/Patient/1/_history/2", Some("/Patient/1/_history/2")),
            ("the base itself", &up, "http://upstream:8090/fhir", Some("")),
            ("query", &up, "http://upstream:8090/fhir?_id=1", Some("?_id=1")),
            ("fragment", &up, "http://upstream:8090/fhir#x", Some("#x")),
            ("scheme and host case", &up, "HTTP://UpStream:8090/fhir/Patient/1", Some("/Patient/1")),
            ("path case matters", &up, "http://upstream:8090/FHIR/Patient/1", None),
            ("longer path segment", &up, "http://upstream:8090/fhirx/Patient/1", None),
            ("other port", &up, "http://upstream:8091/fhir/Patient/1", None),
            ("port prefix", &up, "http://upstream:80900/fhir/Patient/1", None),
            ("other host", &up, "http://upstream.evil:8090/fhir/Patient/1", None),
            ("other scheme", &up, "https://upstream:8090/fhir/Patient/1", None),
            ("relative", &up, "Patient/1", None),
            ("urn", &up, "urn:uuid:0b7f3c0e-6a43-4e8e-9d7e-2c8c8b6f0a11", None),
            ("shorter than the origin", &up, "http://up", None),
            ("non-ASCII before the boundary", &up, "http://upstreäm:8090/fhir/Patient/1", None),
            ("root base", &root, "http://upstream:8090/Patient/1", Some("/Patient/1")),
            ("root base, other port", &root, "http://upstream:80901/Patient/1", None),
        ];
        for (what, upstream, url, want) in cases {
            let got = rewrite_url(upstream, PUBLIC, url);
            assert_eq!(got, want.map(|rest| format!("{PUBLIC}{rest}")), "{what}: {url}");
        }
    }

    #[test]
    fn mentions_origin_table() {
        let up = upstream("http://upstream:8090/fhir");
        let cases: &[(&str, &str, bool)] = &[
            ("reference", r#"{"reference":"http://upstream:8090/fhir/Patient/1"}"#, true),
            ("in any case", r#"{"x":"HTTP://UPSTREAM:8090/fhir"}"#, true),
            ("another base on the origin", r#"{"x":"http://upstream:8090/other"}"#, true),
            ("longer port", r#"{"x":"http://upstream:80900/fhir"}"#, true),
            ("at the very end", "http://upstream:8090", true),
            ("after other URLs", r#"["http://hl7.org/fhir","https://upstream:8090","http://upstream:8090"]"#, true),
            ("other scheme", r#"{"x":"https://upstream:8090/fhir"}"#, false),
            ("other port", r#"{"x":"http://upstream:8091/fhir"}"#, false),
            ("cut short", r#"{"x":"http://upstream:809"#, false),
            ("no scheme before", "://upstream:8090", false),
            ("scheme suffix only", r#"{"x":"ttp://upstream:8090"}"#, false),
            (
                "other hosts",
                r#"{"system":"http://loinc.org","url":"http://hl7.org/fhir/StructureDefinition/x"}"#,
                false,
            ),
            ("nothing", "", false),
        ];
        for (what, text, want) in cases {
            assert_eq!(mentions_origin(text.as_bytes(), &up), *want, "{what}: {text}");
        }
        let text =
            r#"["http://upstream:8090/a",{"x":"HTTP://Upstream:8090"},"https://upstream:8090","http://upstream:8090"]"#;
        assert_eq!(OriginFinder::new(&up).mentions(text.as_bytes()).collect::<Vec<_>>(), [2, 32, 80]);
    }

    /// The finder against the definition (every offset where the text spells the origin in any case), on texts
    /// built from pieces of the origin, its letter-free runs, case changes and other URLs, for origins whose run is
    /// the whole authority, a port, only `://`, or repeats itself.
    #[test]
    fn origin_finder_agrees_with_the_definition() {
        let origins = [
            "http://upstream:8090",
            "http://10.0.0.7:8080",
            "https://hapi.example.org",
            "http://a1.1.1.1",
            "http://x:1111",
            "HTTP://Mixed.Case:443",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for origin in origins {
            let up = upstream(&format!("{origin}/fhir"));
            let finder = OriginFinder::new(&up);
            let o = up.origin.as_str();
            let pieces: Vec<String> = vec![
                o.to_owned(),
                o.to_ascii_uppercase(),
                o.to_ascii_lowercase(),
                o[..o.len() - 1].to_owned(),
                o[3..].to_owned(),
                o.replace("://", ":/"),
                "://".into(),
                ":8090".into(),
                "1.1.1".into(),
                "11".into(),
                "http://loinc.org".into(),
                "\"".into(),
                "/fhir/Patient/1".into(),
                "x".into(),
            ];
            for _ in 0..2000 {
                let text: String = (0..next(8)).map(|_| pieces[next(pieces.len())].as_str()).collect();
                let want: Vec<usize> = (0..text.len())
                    .filter(|&i| {
                        text.as_bytes().get(i..i + o.len()).is_some_and(|t| t.eq_ignore_ascii_case(o.as_bytes()))
                    })
                    .collect();
                let got: Vec<usize> = finder.mentions(text.as_bytes()).collect();
                assert_eq!(got, want, "{origin}: {text}");
                assert_eq!(finder.any(text.as_bytes()), !want.is_empty(), "{origin}: {text}");
            }
        }
    }

    #[test]
    fn references_at_any_depth_and_nothing_else() {
        let up = upstream("http://upstream:8090/fhir");
        let base = "http://upstream:8090/fhir";
        let mut resource = json!({
            "resourceType": "Observation",
            "id": "o1",
            "subject": {"reference": format!("{base}/Patient/123"), "display": format!("{base}/Patient/123")},
            "encounter": {"reference": "Encounter/e1"},
            "performer": [
                {"reference": format!("{base}/Practitioner/p1/_history/3")},
                {"reference": "https://elsewhere.example/fhir/Practitioner/9"},
                {"reference": "#contained-1"}
            ],
            "contained": [{"resourceType": "Device", "id": "contained-1",
                           "owner": {"reference": format!("{base}/Organization/org1")}}],
            "extension": [{"url": "http://example.org/ext", "valueReference": {"reference": format!("{base}/Group/g1")}}],
            "valueAttachment": {"url": format!("{base}/Binary/b1")},
            "note": [{"text": format!("see {base}/Patient/123")}],
            "reference": 12
        });
        let n = rewrite_references(&mut resource, &up, PUBLIC);
        assert_eq!(n, 4);
        let p = PUBLIC;
        assert_eq!(resource["subject"]["reference"], format!("{p}/Patient/123"));
        assert_eq!(resource["subject"]["display"], format!("{base}/Patient/123"), "only `reference` elements");
        assert_eq!(resource["encounter"]["reference"], "Encounter/e1");
        assert_eq!(resource["performer"][0]["reference"], format!("{p}/Practitioner/p1/_history/3"));
        assert_eq!(resource["performer"][1]["reference"], "https://elsewhere.example/fhir/Practitioner/9");
        assert_eq!(resource["performer"][2]["reference"], "#contained-1");
        assert_eq!(resource["contained"][0]["owner"]["reference"], format!("{p}/Organization/org1"));
        assert_eq!(resource["extension"][0]["valueReference"]["reference"], format!("{p}/Group/g1"));
        assert_eq!(resource["extension"][0]["url"], "http://example.org/ext");
        assert_eq!(resource["valueAttachment"]["url"], format!("{base}/Binary/b1"));
        assert_eq!(resource["reference"], 12);
        // Idempotent: public references are not on the upstream's base.
        assert_eq!(rewrite_references(&mut resource, &up, PUBLIC), 0);
    }
}
