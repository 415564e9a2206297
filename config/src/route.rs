//! Route tables: conversion, validation and matching.

use fhirgw_proto::config::v1 as pb;
use http::{Method, StatusCode};

use crate::audit::AuditPolicy;
use crate::names;
use crate::pattern::{Pattern, Rank};

/// Most routes one table may hold.
pub const MAX_ROUTES: usize = 1000;
/// Default cap on `_count` when a guard sets none.
pub const DEFAULT_MAX_COUNT: u32 = 1000;
/// Default cap on the request target length when a guard sets none.
pub const DEFAULT_MAX_URL_BYTES: u32 = 8192;
/// Default cap on the total size of a request's header fields when a guard sets none.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 16 * 1024;
/// The data plane reads at most this much of a request head: a guard cannot allow more.
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Most extra headers one route may forward.
pub const MAX_FORWARD_HEADERS: usize = 32;

/// Request headers no route may forward: each would change what the upstream does with a request the gateway
/// checked (a method override turns a checked read into a delete; a URL rewrite reads another resource; a trusted
/// user, tenant or scope header impersonates), or carries the caller's credentials, or is the gateway's own to set.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "content-encoding",
    "accept",
    "accept-encoding",
    "range",
    "expect",
    "forwarded",
    "via",
    "traceparent",
    "tracestate",
    "baggage",
    "prefer",
    "x-real-ip",
    "x-cascade",
    "x-method-override",
    "x-original-method",
    "remote-user",
    // HAPI applies it to a Binary create or update: the gateway sets a checked securityContext itself.
    "x-security-context",
];

/// Prefixes of header names no route may forward (see [`NEVER_FORWARDED`]).
const NEVER_FORWARDED_PREFIXES: &[&str] = &[
    "if-",
    "x-forwarded-",
    "x-original-",
    "x-rewrite-",
    "x-http-method",
    "x-remote-",
    "x-auth",
    "x-user",
    "x-tenant",
    "x-patient",
    "x-scope",
    "x-dataset",
    "x-fhirgw",
    "x-envoy-",
    "x-amzn-",
    "x-goog-",
    "x-ms-",
    "proxy-",
    "sec-",
    "access-control-",
];

/// A header name a route may forward: a valid, lowercase name outside the never-forwarded set.
pub fn forward_header(name: &str) -> Result<http::HeaderName, &'static str> {
    if name.is_empty() || name.len() > 64 || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("must be a lowercase header name of at most 64 bytes");
    }
    let header = http::HeaderName::try_from(name).map_err(|_| "is not a valid header name")?;
    if NEVER_FORWARDED.contains(&name) || NEVER_FORWARDED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err("may never be forwarded: it would change what the upstream does with a checked request");
    }
    Ok(header)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// `$docref`: translated into a DocumentReference search.
    DocRef,
    /// Bulk `$export` kick-off and status polling.
    Export,
}

impl Handler {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "docref" => Some(Handler::DocRef),
            "export" => Some(Handler::Export),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Proxy { upstream: String },
    Deny { status: StatusCode, message: String },
    Handler { handler: Handler, upstream: String },
}

impl Action {
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Action::Proxy { upstream } | Action::Handler { upstream, .. } => Some(upstream),
            Action::Deny { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueryGuard {
    pub allowed_params: Vec<String>,
    pub denied_params: Vec<String>,
    pub denied_modifiers: Vec<String>,
    pub max_count: u32,
    pub max_url_bytes: u32,
    pub max_header_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub id: String,
    pub pattern: Pattern,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub action: Action,
    pub guard: QueryGuard,
    /// Extra client headers this route passes to the upstream (see `forward_header`).
    pub forward_headers: Vec<http::HeaderName>,
    /// Auditing on this route (see `audit::effective`).
    pub audit: AuditPolicy,
    rank: Rank,
}

impl Route {
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }

    fn common_method(&self, other: &Route) -> Option<Method> {
        match (&self.methods, &other.methods) {
            (None, None) => Some(Method::GET),
            (Some(m), None) | (None, Some(m)) => m.first().cloned(),
            (Some(a), Some(b)) => a.iter().find(|m| b.contains(m)).cloned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    pub name: String,
    /// Normalised, e.g. `/fhir`; empty for the root.
    pub base_path: String,
    pub base_segments: Vec<String>,
    /// Most specific first.
    routes: Vec<Route>,
}

/// The route chosen for a request and the parameters its pattern captured.
#[derive(Debug)]
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub params: Vec<(&'a str, &'a str)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("route table: {0}")]
    Table(String),
    #[error("route `{route}`: {message}")]
    Route { route: String, message: String },
    #[error(
        "routes `{first}` and `{second}` both match {method} {example} with equal specificity; make one more specific or split their methods"
    )]
    Ambiguous { first: String, second: String, method: Method, example: String },
}

impl RouteTable {
    /// The most specific route for a request path relative to the base.
    pub fn route<'a>(&'a self, method: &Method, relative: &'a [String]) -> Option<RouteMatch<'a>> {
        self.routes
            .iter()
            .filter(|r| r.allows(method))
            .find_map(|route| route.pattern.matches(relative).map(|params| RouteMatch { route, params }))
    }

    /// Any route matching the path, whatever the method: tells 404 from 405.
    pub fn path_known(&self, relative: &[String]) -> bool {
        self.routes.iter().any(|r| r.pattern.matches(relative).is_some())
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn parse_base_path(base: &str) -> Result<(String, Vec<String>), TableError> {
    let invalid = || TableError::Table(format!("base_path `{base}` must be '/' or like '/fhir' or '/r4/fhir'"));
    let Some(body) = base.strip_prefix('/') else {
        return Err(invalid());
    };
    let body = body.strip_suffix('/').unwrap_or(body);
    if body.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let segments: Vec<String> = body.split('/').map(str::to_owned).collect();
    let ok = segments.iter().all(|s| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    });
    if !ok {
        return Err(invalid());
    }
    Ok((format!("/{body}"), segments))
}

fn parse_methods(route: &str, methods: &[String]) -> Result<Option<Vec<Method>>, TableError> {
    if methods.is_empty() {
        return Ok(None);
    }
    let mut out: Vec<Method> = Vec::new();
    for m in methods {
        let method = match m.as_str() {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            "OPTIONS" => Method::OPTIONS,
            other => {
                return Err(TableError::Route {
                    route: route.to_owned(),
                    message: format!("method `{other}` is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                });
            }
        };
        if !out.contains(&method) {
            out.push(method);
        }
    }
    Ok(Some(out))
}

fn parse_route(msg: &pb::Route) -> Result<Route, TableError> {
    names::route_id(&msg.id).map_err(|e| TableError::Route { route: msg.id.clone(), message: e.to_string() })?;
    let err = |message: String| TableError::Route { route: msg.id.clone(), message };
    let pattern = Pattern::parse(&msg.path).map_err(|e| err(format!("path `{}`: {e}", msg.path)))?;
    let methods = parse_methods(&msg.id, &msg.methods)?;
    let action = match &msg.action {
        None => return Err(err("has no action (proxy, deny or handler)".into())),
        Some(pb::route::Action::Proxy(p)) => {
            names::object_name("upstream", &p.upstream).map_err(|e| err(e.to_string()))?;
            Action::Proxy { upstream: p.upstream.clone() }
        }
        Some(pb::route::Action::Deny(d)) => {
            let code = if d.status == 0 { 403 } else { d.status };
            let status = u16::try_from(code)
                .ok()
                .filter(|c| (400..600).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| err(format!("deny status {code} is not between 400 and 599")))?;
            names::text("deny message", &d.message).map_err(|e| err(e.to_string()))?;
            Action::Deny { status, message: d.message.clone() }
        }
        Some(pb::route::Action::Handler(h)) => {
            let handler = Handler::parse(&h.name)
                .ok_or_else(|| err(format!("unknown handler `{}` (known: docref, export)", h.name)))?;
            names::object_name("upstream", &h.upstream).map_err(|e| err(e.to_string()))?;
            Action::Handler { handler, upstream: h.upstream.clone() }
        }
    };
    let guard = match &msg.query_guard {
        None => QueryGuard::default(),
        Some(g) => {
            for p in g.allowed_params.iter().chain(&g.denied_params).chain(&g.denied_modifiers) {
                let ok = !p.is_empty()
                    && p.len() <= 128
                    && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
                if !ok {
                    return Err(err(format!("query guard entry `{p}` is not a parameter name")));
                }
            }
            if g.max_header_bytes > MAX_HEADER_BYTES {
                return Err(err(format!(
                    "query guard max_header_bytes {} exceeds the data plane's {MAX_HEADER_BYTES}-byte header buffer",
                    g.max_header_bytes
                )));
            }
            QueryGuard {
                allowed_params: g.allowed_params.clone(),
                denied_params: g.denied_params.clone(),
                denied_modifiers: g.denied_modifiers.clone(),
                max_count: g.max_count,
                max_url_bytes: g.max_url_bytes,
                max_header_bytes: g.max_header_bytes,
            }
        }
    };
    if msg.forward_headers.len() > MAX_FORWARD_HEADERS {
        return Err(err(format!("forward_headers lists more than {MAX_FORWARD_HEADERS} names")));
    }
    let mut forward_headers = Vec::with_capacity(msg.forward_headers.len());
    for name in &msg.forward_headers {
        let header = forward_header(name).map_err(|reason| err(format!("forward_headers: `{name}` {reason}")))?;
        if !forward_headers.contains(&header) {
            forward_headers.push(header);
        }
    }
    let audit = AuditPolicy::parse(msg.audit.as_ref()).map_err(|e| err(e.to_string()))?;
    let rank = pattern.rank();
    Ok(Route { id: msg.id.clone(), pattern, methods, action, guard, forward_headers, audit, rank })
}

impl TryFrom<&pb::RouteTable> for RouteTable {
    type Error = TableError;

    fn try_from(msg: &pb::RouteTable) -> Result<Self, Self::Error> {
        names::object_name("route table name", &msg.name).map_err(|e| TableError::Table(e.to_string()))?;
        let (base_path, base_segments) = parse_base_path(&msg.base_path)?;
        if msg.routes.is_empty() {
            return Err(TableError::Table("has no routes".into()));
        }
        if msg.routes.len() > MAX_ROUTES {
            return Err(TableError::Table(format!("has more than {MAX_ROUTES} routes")));
        }
        let mut routes: Vec<Route> = Vec::with_capacity(msg.routes.len());
        for r in &msg.routes {
            let route = parse_route(r)?;
            if routes.iter().any(|existing| existing.id == route.id) {
                return Err(TableError::Route { route: route.id, message: "id is used twice".into() });
            }
            routes.push(route);
        }
        // Two routes that can match one request must differ in rank, or nothing decides between them.
        for (i, a) in routes.iter().enumerate() {
            for b in &routes[i + 1..] {
                if a.rank != b.rank {
                    continue;
                }
                let Some(method) = a.common_method(b) else {
                    continue;
                };
                if let Some(path) = a.pattern.overlap(&b.pattern) {
                    let example = if path == "/" && !base_path.is_empty() {
                        base_path.clone()
                    } else {
                        format!("{base_path}{path}")
                    };
                    return Err(TableError::Ambiguous { first: a.id.clone(), second: b.id.clone(), method, example });
                }
            }
        }
        routes.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| a.id.cmp(&b.id)));
        Ok(RouteTable { name: msg.name.clone(), base_path, base_segments, routes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, path: &str, methods: &[&str]) -> pb::Route {
        pb::Route {
            id: id.into(),
            path: path.into(),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "hapi".into() })),
            query_guard: None,
            forward_headers: Vec::new(),
            audit: None,
        }
    }

    #[test]
    fn forward_headers_table() {
        #[rustfmt::skip]
        let cases: &[(&str, bool)] = &[
            ("x-correlation-id", true), ("x-b3-traceid", true), ("accept-language", true), ("x-api-version", true),
            ("X-Correlation-Id", false), ("", false), ("bad header", false),
            ("authorization", false), ("cookie", false), ("host", false), ("content-type", false), ("prefer", false),
            ("if-match", false), ("if-none-exist", false), ("range", false), ("transfer-encoding", false),
            ("x-http-method-override", false), ("x-security-context", false), ("x-http-method", false), ("x-method-override", false),
            ("x-original-url", false), ("x-rewrite-url", false), ("x-forwarded-for", false), ("forwarded", false),
            ("x-remote-user", false), ("remote-user", false), ("x-auth-request-user", false), ("x-user-id", false),
            ("x-tenant", false), ("x-patient-id", false), ("x-scope", false), ("x-dataset", false),
            ("traceparent", false), ("proxy-authorization", false), ("sec-fetch-site", false),
        ];
        for (name, ok) in cases {
            assert_eq!(forward_header(name).is_ok(), *ok, "{name}");
        }
        let mut r = route("r", "/**", &[]);
        r.forward_headers = vec!["x-correlation-id".into(), "x-correlation-id".into()];
        let t = RouteTable::try_from(&table(vec![r.clone()])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.routes[0].forward_headers, vec![http::HeaderName::from_static("x-correlation-id")]);
        r.forward_headers = vec!["x-http-method-override".into()];
        let e = RouteTable::try_from(&table(vec![r.clone()])).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x-http-method-override") && e.contains("never be forwarded"), "{e}");
        r.forward_headers = (0..=MAX_FORWARD_HEADERS).map(|i| format!("x-h{i}")).collect();
        assert!(RouteTable::try_from(&table(vec![r])).is_err());
    }

    fn table(routes: Vec<pb::Route>) -> pb::RouteTable {
        pb::RouteTable { name: "main".into(), base_path: "/fhir".into(), routes }
    }

    fn segs(path: &str) -> Vec<String> {
        path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    #[test]
    fn most_specific_route_wins_whatever_the_order() {
        let routes = vec![
            route("catch-all", "/**", &[]),
            route("patient-catch-all", "/Patient/**", &[]),
            route("read", "/{type}/{id}", &["GET"]),
            route("type-op", "/{type}/{op}", &[]),
            route("export", "/Patient/$export", &["GET"]),
            route("poll", "/$export-poll-status", &["GET", "DELETE"]),
            route("docref", "/DocumentReference/$docref", &["GET", "POST"]),
            route("compartment", "/{type}/{id}/*", &["GET"]),
            route("group-export", "/Group/{id}/$export", &["GET"]),
            route("file", "/$export-file", &["GET"]),
        ];
        let cases: &[(&str, &str, &str)] = &[
            ("GET", "/Patient/$export", "export"),
            ("POST", "/Patient/$export", "type-op"),
            ("GET", "/$export-poll-status", "poll"),
            ("GET", "/DocumentReference/$docref", "docref"),
            ("GET", "/Patient/123", "read"),
            ("PUT", "/Patient/123", "patient-catch-all"),
            ("GET", "/Observation/1", "read"),
            ("GET", "/Observation/$lastn", "type-op"),
            ("GET", "/Patient", "patient-catch-all"),
            ("GET", "/metadata", "catch-all"),
            ("GET", "/Group/g1/$export", "group-export"),
            ("GET", "/Group/g1/Patient", "compartment"),
            ("GET", "/Patient/p1/$export", "compartment"),
            ("DELETE", "/$export-poll-status", "poll"),
            ("GET", "/$export-file", "file"),
        ];
        for order in [routes.clone(), routes.iter().rev().cloned().collect()] {
            let t = RouteTable::try_from(&table(order)).unwrap_or_else(|e| panic!("{e}"));
            for (method, path, want) in cases {
                let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
                let rel = segs(path);
                let got = t.route(&method, &rel).map(|m| m.route.id.as_str());
                assert_eq!(got, Some(*want), "{method} {path}");
            }
        }
    }

    #[test]
    fn ambiguous_tables_are_refused_naming_both_routes() {
        let cases: Vec<(Vec<pb::Route>, &str, &str, &str)> = vec![
            (
                vec![route("a", "/{type}/{id}", &[]), route("b", "/{type}/{id}", &["GET"])],
                "a",
                "b",
                "GET /fhir/Patient/123",
            ),
            (vec![route("x", "/Patient/{id}", &[]), route("y", "/{type}/123", &[])], "x", "y", "GET /fhir/Patient/123"),
            (vec![route("all", "/**", &["GET"]), route("all2", "/**", &["GET", "POST"])], "all", "all2", "GET /fhir"),
            (
                vec![route("p", "/Patient/*", &["DELETE"]), route("q", "/*/123", &["DELETE"])],
                "p",
                "q",
                "DELETE /fhir/Patient/123",
            ),
        ];
        for (routes, first, second, example) in cases {
            let err = RouteTable::try_from(&table(routes)).err();
            let Some(TableError::Ambiguous { first: f, second: s, method, example: e }) = err else {
                panic!("expected ambiguity between {first} and {second}, got {err:?}");
            };
            assert_eq!((f.as_str(), s.as_str()), (first, second));
            assert_eq!(format!("{method} {e}"), example);
        }
    }

    #[test]
    fn same_shape_with_disjoint_methods_is_fine() {
        let t = table(vec![
            route("read", "/{type}/{id}", &["GET", "HEAD"]),
            route("write", "/{type}/{id}", &["PUT", "DELETE"]),
        ]);
        assert!(RouteTable::try_from(&t).is_ok());
    }

    #[test]
    fn invalid_tables() {
        let mut no_action = route("a", "/x", &[]);
        no_action.action = None;
        let mut bad_deny = route("a", "/x", &[]);
        bad_deny.action = Some(pb::route::Action::Deny(pb::DenyAction { status: 302, message: String::new() }));
        let mut bad_handler = route("a", "/x", &[]);
        bad_handler.action =
            Some(pb::route::Action::Handler(pb::HandlerAction { name: "nope".into(), upstream: "hapi".into() }));
        let cases: Vec<(&str, pb::RouteTable)> = vec![
            ("empty", table(vec![])),
            (
                "bad base",
                pb::RouteTable { name: "m".into(), base_path: "fhir".into(), routes: vec![route("a", "/x", &[])] },
            ),
            ("dup id", table(vec![route("a", "/x", &[]), route("a", "/y", &[])])),
            ("bad method", table(vec![route("a", "/x", &["FETCH"])])),
            ("bad pattern", table(vec![route("a", "/**/x", &[])])),
            ("no action", table(vec![no_action])),
            ("bad deny", table(vec![bad_deny])),
            ("bad handler", table(vec![bad_handler])),
        ];
        for (what, t) in cases {
            assert!(RouteTable::try_from(&t).is_err(), "{what} should be refused");
        }
    }
}
