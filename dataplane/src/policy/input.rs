//! What the planner plans from: the request as read ([`Input`]), the caller's access at one instant ([`Access`]),
//! and the configuration it runs under ([`Env`]). All of it is built once per request (per entry, for a batch).

use std::collections::HashSet;
use std::time::SystemTime;

use fhirgw_config::Snapshot;
use fhirgw_config::route::{Handler, QueryGuard, RouteTable};
use fhirgw_config::tenant::Tag;
use fhirgw_config::upstream::Upstream;
use http::Method;
use http::header::{self, HeaderMap};
use serde_json::Value;

use super::classify::Interaction;
use super::paging::PageSigner;
use super::query::{self, Params};
use super::scopes::Scopes;
use super::verify::Grants;

/// The caller's access for one request, fixed at its start: one `now` for every grant expiry it meets.
#[derive(Debug, Clone)]
pub struct Access {
    pub tenant: String,
    pub scopes: Scopes,
    /// The token's `patient` claim (SMART launch context).
    pub patient: Option<String>,
    /// The tenant's tags active at `now`.
    pub tags: Vec<Tag>,
    pub grants: Grants,
    pub now: SystemTime,
}

impl Access {
    pub fn new(tenant: &str, scopes: Scopes, patient: Option<String>, snapshot: &Snapshot, now: SystemTime) -> Self {
        let tags: Vec<Tag> =
            snapshot.tenants.get(tenant).map(|t| t.active_tags(now).cloned().collect()).unwrap_or_default();
        let grants = Grants::new(tags.iter());
        Access { tenant: tenant.to_owned(), scopes, patient, tags, grants, now }
    }

    pub fn tag_refs(&self) -> Vec<&Tag> {
        self.tags.iter().collect()
    }
}

/// The configuration a request runs under.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    pub snapshot: &'a Snapshot,
    pub upstream: &'a Upstream,
    /// The public FHIR base for this request (no trailing slash).
    pub public: &'a str,
    /// The matched route's guard.
    pub guard: &'a QueryGuard,
    /// The table the request was matched in (batch entries are routed in it too).
    pub table: &'a RouteTable,
    pub signer: &'a PageSigner,
}

impl Env<'_> {
    /// Systems of every tag granted to any tenant (what makes a tag a dataset tag).
    pub fn dataset_systems(&self) -> HashSet<String> {
        super::write::dataset_systems(self.snapshot)
    }
}

/// Where a request comes from: the client directly, or an entry of a batch or transaction Bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Within {
    Request,
    Batch,
    Transaction,
}

/// A request body, read and parsed once.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestBody {
    None,
    /// A JSON body (any JSON media type), parsed.
    Json(Value),
    /// A form body (`POST _search`).
    Form(Params),
    /// A body that is not what its media type says, with the reason.
    Invalid(String),
    /// A body of a media type the gateway does not read.
    Other,
    /// The raw content of a Binary create or update (a PDF, an image): never read by the gateway, streamed to the
    /// upstream inside a Binary resource as it arrives. `content_type` is the client's `Content-Type` as sent,
    /// `length` its `Content-Length`.
    Upload {
        content_type: String,
        length: Option<u64>,
    },
}

/// The request as the planner sees it.
#[derive(Debug, Clone)]
pub struct Input {
    pub method: Method,
    pub interaction: Interaction,
    /// The route's handler, when the request is for one.
    pub handler: Option<Handler>,
    /// The normalised path relative to the FHIR base.
    pub relative: Vec<String>,
    /// The query parameters.
    pub params: Params,
    pub head: bool,
    /// The request's media type (lowercase, no parameters).
    pub media: String,
    pub body: RequestBody,
    /// `If-Match` (a batch entry's `request.ifMatch`).
    pub if_match: Option<String>,
    /// `If-None-Exist` (a batch entry's `request.ifNoneExist`).
    pub if_none_exist: Option<String>,
    /// `Prefer: respond-async` was asked for.
    pub respond_async: bool,
    /// The client accepts XML only.
    pub xml_only: bool,
    /// The client's `Accept` when its first media type is neither FHIR nor JSON nor `*/*` (a PDF, an image): for a
    /// Binary, the raw content is asked for.
    pub raw_accept: Option<String>,
    /// `X-Security-Context`: for a raw Binary upload, the resource whose access rules the Binary follows.
    pub security_context: Option<String>,
    pub within: Within,
}

impl Input {
    /// From a client request's parts (the body read separately).
    pub fn new(
        method: &Method,
        interaction: Interaction,
        handler: Option<Handler>,
        relative: &[String],
        query: Option<&str>,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let media = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let body = match body {
            None => RequestBody::None,
            Some(bytes) => parse_body(&media, bytes),
        };
        Input {
            method: method.clone(),
            interaction,
            handler,
            relative: relative.to_vec(),
            params: query::parse(query),
            head: method == Method::HEAD,
            media,
            body,
            if_match: text("if-match"),
            if_none_exist: text("if-none-exist"),
            respond_async: respond_async(headers),
            xml_only: wants_xml_only(headers),
            raw_accept: raw_accept(headers),
            security_context: text("x-security-context"),
            within: Within::Request,
        }
    }
}

/// Whether a request with this media type (lowercase, no parameters) carries a FHIR resource (or a form) rather
/// than raw content: what a Binary create or update with any other type uploads.
pub fn is_fhir_media(media: &str) -> bool {
    is_json(media) || media.contains("fhir") || media == "application/x-www-form-urlencoded" || media.is_empty()
}

fn is_json(media: &str) -> bool {
    media.ends_with("+json") || media == "application/json" || media == "application/json+fhir"
}

fn parse_body(media: &str, bytes: &[u8]) -> RequestBody {
    if media == "application/x-www-form-urlencoded" {
        return RequestBody::Form(form_urlencoded::parse(bytes).into_owned().collect());
    }
    if !is_json(media) {
        return RequestBody::Other;
    }
    match serde_json::from_slice(bytes) {
        Ok(value) => RequestBody::Json(value),
        Err(e) => RequestBody::Invalid(format!("the body is not JSON: {e}")),
    }
}

/// Whether the request asks for asynchronous processing (`Prefer: respond-async`, among other preferences).
fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.split(';').next().is_some_and(|name| name.trim().eq_ignore_ascii_case("respond-async")))
}

/// The `Accept` header, when its first media range is a concrete type that is not FHIR or JSON.
fn raw_accept(headers: &HeaderMap) -> Option<String> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    let first = accept.split(',').next()?.split(';').next()?.trim().to_ascii_lowercase();
    let fhir = first.contains("fhir") || first.contains("json") || first.contains('*') || first.is_empty();
    (!fhir && first.contains('/')).then(|| accept.to_owned())
}

fn wants_xml_only(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|accept| {
        let accept = accept.to_ascii_lowercase();
        accept.contains("xml") && !accept.contains("json") && !accept.contains("*/*")
    })
}
