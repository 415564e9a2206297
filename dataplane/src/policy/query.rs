//! Query parameters: parsed once, checked against what each interaction may carry, narrowed to the tenant's tags,
//! and re-encoded canonically, so the upstream receives exactly the parameters that were checked.

use fhirgw_config::route::{DEFAULT_MAX_COUNT, QueryGuard};
use fhirgw_config::tenant::Tag;

/// Most parameters one request may carry.
pub const MAX_PARAMS: usize = 100;

/// The gateway's own paging parameter (a signed page token).
pub const PAGE_PARAM: &str = "_page";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// 400: the parameter is refused, with the reason.
    Refused { param: String, reason: &'static str },
    /// 406: only JSON is served.
    NotAcceptable { format: String },
}

impl std::error::Error for QueryError {}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Refused { param, reason } => write!(f, "parameter `{param}`: {reason}"),
            QueryError::NotAcceptable { format } => write!(f, "format `{format}` is not served; use JSON"),
        }
    }
}

pub type Params = Vec<(String, String)>;

pub fn parse(query: Option<&str>) -> Params {
    query.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

pub fn encode(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}

/// What a request's parameters are used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Type-level search: narrowed with `_tag`, every entry verified.
    Search,
    /// Read and vread: the resource is verified after the fetch.
    Read,
    /// History: every entry verified.
    History,
    /// `$everything`: every entry verified.
    Everything,
}

/// Control parameters (`_…`) each use accepts. Any other `_` parameter is refused: what the gateway cannot
/// classify, it does not forward.
fn control_allowed(u: Use, name: &str) -> bool {
    const SHAPING: &[&str] = &["_format", "_pretty", "_summary", "_elements"];
    if SHAPING.contains(&name) {
        return true;
    }
    match u {
        Use::Search => matches!(
            name,
            "_id"
                | "_lastUpdated"
                | "_tag"
                | "_profile"
                | "_security"
                | "_source"
                | "_text"
                | "_content"
                | "_count"
                | "_offset"
                | "_sort"
                | "_total"
                | "_include"
                | "_revinclude"
        ),
        Use::Read => false,
        Use::History => matches!(name, "_count" | "_since" | "_at"),
        Use::Everything => matches!(name, "_count" | "_since" | "_type"),
    }
}

/// Ordinary (non-`_`) parameters each use accepts.
fn plain_allowed(u: Use, name: &str) -> bool {
    match u {
        Use::Search => true,
        Use::Read | Use::History => false,
        Use::Everything => matches!(name, "start" | "end"),
    }
}

const JSON_FORMATS: &[&str] = &["json", "application/json", "application/fhir+json", "application/json+fhir"];

/// Checks every parameter. Joins that could act as an oracle on other tenants' data (chains, `_has`, `_filter`,
/// `_list`, `_query`, `_contained`) are refused, as is any control parameter the gateway does not know.
pub fn check(u: Use, params: &[(String, String)], guard: &QueryGuard) -> Result<(), QueryError> {
    let refuse = |param: &str, reason| Err(QueryError::Refused { param: param.to_owned(), reason });
    if params.len() > MAX_PARAMS {
        return refuse("*", "too many parameters");
    }
    let max_count = if guard.max_count == 0 { DEFAULT_MAX_COUNT } else { guard.max_count };
    for (key, value) in params {
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return refuse(key, "not a valid parameter name");
        }
        if name.starts_with("_has") {
            return refuse(key, "reverse chaining (_has) is not allowed through the gateway");
        }
        if name.contains('.') || modifier.is_some_and(|m| m.contains('.')) {
            return refuse(key, "chained parameters are not allowed through the gateway");
        }
        if name == PAGE_PARAM {
            return refuse(key, "page tokens are only valid alone, as handed out in Bundle.link");
        }
        // RFC 6750 §2.3: a token in the query would be a second credential, and one an upstream or a sidecar might
        // honour instead of the gateway's own.
        if name == "access_token" {
            return refuse(key, "tokens are accepted only in the Authorization header");
        }
        let allowed = if name.starts_with('_') { control_allowed(u, name) } else { plain_allowed(u, name) };
        if !allowed {
            return refuse(key, "not supported through the gateway for this interaction");
        }
        if (name == "_include" || name == "_revinclude") && modifier.is_some_and(|m| m != "iterate") {
            return refuse(key, "unknown modifier");
        }
        if let Some(m) = modifier
            && guard.denied_modifiers.iter().any(|d| d == m)
        {
            return refuse(key, "modifier denied by route policy");
        }
        if !guard.allowed_params.is_empty() && !name.starts_with('_') && !guard.allowed_params.iter().any(|a| a == name)
        {
            return refuse(key, "not allowed by route policy");
        }
        if guard.denied_params.iter().any(|d| d == name) {
            return refuse(key, "denied by route policy");
        }
        match name {
            "_count" => match value.parse::<u32>() {
                Ok(n) if n <= max_count => {}
                Ok(_) => return refuse(key, "exceeds the maximum page size"),
                Err(_) => return refuse(key, "must be a non-negative integer"),
            },
            "_format" if !JSON_FORMATS.contains(&value.as_str()) => {
                return Err(QueryError::NotAcceptable { format: value.clone() });
            }
            "_summary" if !matches!(value.as_str(), "true" | "false" | "text" | "data" | "count") => {
                return refuse(key, "must be one of true, false, text, data, count");
            }
            _ => {}
        }
    }
    Ok(())
}

/// A FHIR date, dateTime or instant as a search value: `YYYY`, `YYYY-MM-DD`, `YYYY-MM-DDThh:mm:ss.sss+zz:zz` and
/// the forms between. Only the shape is checked (the upstream checks the calendar); nothing else can reach a
/// search through it, such as a prefix (`ge`) or a second value.
pub fn is_date_time(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.len() >= 4
        && bytes.len() <= 40
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes.iter().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b'T' | b'Z' | b'+' | b'.'))
}

/// Adds the tenant's tags as one more `_tag` parameter (OR across the tags). The caller's own `_tag` parameters stay:
/// they constrain further, never replace. `None` when the tenant holds no tag, so the search can only be empty.
pub fn narrow(params: &[(String, String)], tags: &[&Tag]) -> Option<Params> {
    if tags.is_empty() {
        return None;
    }
    let mut out: Params = params.to_vec();
    let value = tags.iter().map(|t| t.token()).collect::<Vec<_>>().join(",");
    out.push(("_tag".to_owned(), value));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(q: &str) -> Params {
        parse(Some(q))
    }

    #[test]
    fn search_checks_table() {
        let g = QueryGuard::default();
        let ok = [
            "name=smith",
            "subject=Patient/1&_count=10",
            "_tag=https://x|y",
            "_include=Observation:subject",
            "_revinclude:iterate=Provenance:target",
            "_summary=count",
            "_format=json",
            "code:text=glucose",
            "date=ge2020-01-01",
            "_elements=id,meta",
            "_lastUpdated=gt2020",
        ];
        for q in ok {
            assert_eq!(check(Use::Search, &p(q), &g), Ok(()), "{q}");
        }
        let refused = [
            ("subject:Patient.name=x", "subject:Patient.name"),
            ("subject.name=x", "subject.name"),
            ("_has:Observation:subject:code=1234", "_has:Observation:subject:code"),
            ("_has=x", "_has"),
            ("_filter=name eq x", "_filter"),
            ("_list=123", "_list"),
            ("_query=custom", "_query"),
            ("_contained=true", "_contained"),
            ("_containedType=contained", "_containedType"),
            ("_getpages=abc", "_getpages"),
            ("access_token=eyJ", "access_token"),
            ("name=x&access_token=eyJ", "access_token"),
            ("_page=abc", "_page"),
            ("_count=abc", "_count"),
            ("_count=100000", "_count"),
            ("_summary=bogus", "_summary"),
            ("_include:foo=Observation:subject", "_include:foo"),
            ("_whatever=1", "_whatever"),
            ("=1", ""),
            ("a%20b=1", "a b"),
        ];
        for (q, param) in refused {
            match check(Use::Search, &p(q), &g) {
                Err(QueryError::Refused { param: got, .. }) => assert_eq!(got, param, "{q}"),
                other => panic!("{q}: expected refusal, got {other:?}"),
            }
        }
        assert_eq!(check(Use::Search, &p("_format=xml"), &g), Err(QueryError::NotAcceptable { format: "xml".into() }));
        assert!(check(Use::Search, &p(&"a=1&".repeat(MAX_PARAMS + 1)), &g).is_err());
    }

    #[test]
    fn per_use_checks() {
        let g = QueryGuard::default();
        assert!(check(Use::Read, &p("_format=json&_elements=id"), &g).is_ok());
        assert!(check(Use::Read, &p("_tag=x"), &g).is_err());
        assert!(check(Use::Read, &p("name=x"), &g).is_err());
        assert!(check(Use::History, &p("_count=5&_since=2020-01-01"), &g).is_ok());
        assert!(check(Use::History, &p("_include=x"), &g).is_err());
        assert!(check(Use::Everything, &p("_count=5&start=2020&_type=Observation"), &g).is_ok());
        assert!(check(Use::Everything, &p("name=x"), &g).is_err());
    }

    #[test]
    fn route_guard() {
        let g = QueryGuard {
            allowed_params: vec!["name".into(), "birthdate".into()],
            denied_params: vec!["_revinclude".into()],
            denied_modifiers: vec!["missing".into()],
            max_count: 50,
            max_url_bytes: 0,
            max_header_bytes: 0,
        };
        assert!(check(Use::Search, &p("name=x&_count=50"), &g).is_ok());
        assert!(check(Use::Search, &p("_count=51"), &g).is_err());
        assert!(check(Use::Search, &p("gender=x"), &g).is_err());
        assert!(check(Use::Search, &p("name:missing=true"), &g).is_err());
        assert!(check(Use::Search, &p("_revinclude=Observation:subject"), &g).is_err());
    }

    #[test]
    fn narrowing_adds_never_replaces() {
        let a = Tag { system: "https://fhirgw.dev/dataset".into(), code: "a".into() };
        let b = Tag { system: "https://fhirgw.dev/dataset".into(), code: "b".into() };
        let narrowed = narrow(&p("_tag=https://evil|x&name=smith"), &[&a, &b]).unwrap_or_default();
        assert_eq!(
            narrowed,
            vec![
                ("_tag".to_owned(), "https://evil|x".to_owned()),
                ("name".to_owned(), "smith".to_owned()),
                ("_tag".to_owned(), "https://fhirgw.dev/dataset|a,https://fhirgw.dev/dataset|b".to_owned()),
            ]
        );
        assert_eq!(
            encode(&narrowed),
            "_tag=https%3A%2F%2Fevil%7Cx&name=smith&_tag=https%3A%2F%2Ffhirgw.dev%2Fdataset%7Ca%2Chttps%3A%2F%2Ffhirgw.dev%2Fdataset%7Cb"
        );
        assert_eq!(narrow(&p("name=x"), &[]), None);
    }

    #[test]
    fn date_times() {
        for ok in ["2024", "2024-01", "2024-01-31", "2024-01-31T10:00:00Z", "2024-01-31T10:00:00.123+01:00"] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in ["", "24", "ge2024", "2024-01-01,2025", "2024 01", "2024-01-01&_tag=x", "abcd", &"1".repeat(41)] {
            assert!(!is_date_time(bad), "{bad}");
        }
    }

    #[test]
    fn parse_encode_round_trip() {
        for q in ["a=1&b=2&a=3", "name=O%27Connor", "date=ge2020-01-01T00%3A00%3A00%2B01%3A00", "x=a+b"] {
            let once = parse(Some(q));
            assert_eq!(parse(Some(&encode(&once))), once, "{q}");
        }
    }
}
