//! Authorization and rewriting per interaction, and verification of what comes back.
//!
//! Supported through the gateway today: read, vread, type-level search (GET and `POST _search`), instance and type
//! history, `Patient/[id]/$everything`, paging through signed page links, writes (`write.rs`) and batches and
//! transactions checked entry by entry (`batch.rs`), and the dedicated handlers `$docref` (`docref.rs`) and bulk
//! `$export` (`export.rs`). Every other interaction is refused with 403 until it has its own checks: the gateway
//! never forwards what it cannot verify.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use fhirgw_config::Snapshot;
use fhirgw_config::path::join_encoded;
use fhirgw_config::pattern::Class;
use fhirgw_config::route::{Handler, QueryGuard};
use fhirgw_config::tenant::Tag;
use fhirgw_config::upstream::Upstream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{Proxy, ProxyError, bundle_stream, headers, json_response, validators};
use crate::authn::Caller;
use crate::body::Body;
use crate::policy::classify::Interaction;
use crate::policy::compartment::{self, Reach};
use crate::policy::query::{self, PAGE_PARAM, Params, QueryError, Use};
use crate::policy::raw;
use crate::policy::scopes::{Allowed, Permission};
use crate::policy::verify::{Grants, resource_visible};
use crate::upstream::UpstreamError;

/// Largest single resource the gateway verifies.
const READ_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Largest form body of a `POST _search`.
const FORM_MAX_BYTES: usize = 64 * 1024;

pub(super) struct Ctx<'a> {
    pub proxy: &'a Proxy,
    pub snapshot: &'a Snapshot,
    pub caller: &'a Caller,
    pub upstream: Arc<Upstream>,
    /// The public FHIR base for this request.
    pub public: String,
    pub relative: &'a [String],
    pub guard: &'a QueryGuard,
    /// The client's headers that may reach the upstream (`headers::for_upstream`: the allow-list plus the matched
    /// route's `forward_headers`), chosen once for the request; every upstream call starts from them.
    pub forwarded: HeaderMap,
    /// References already found visible during this request (a batch checks each distinct one once).
    pub visible_references: std::sync::Mutex<std::collections::HashSet<crate::policy::references::Reference>>,
    /// The route table the request was matched in (batch entries are matched in it too).
    pub table: &'a fhirgw_config::route::RouteTable,
}

fn wants_xml_only(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|accept| {
        let accept = accept.to_ascii_lowercase();
        accept.contains("xml") && !accept.contains("json") && !accept.contains("*/*")
    })
}

impl<'a> Ctx<'a> {
    /// What every interaction starts with: JSON only, grants confirmed recently enough, and the tenant's tags active
    /// at one instant, `now`, used for the whole request.
    fn grants_now(&self, headers: &HeaderMap) -> Result<(SystemTime, Vec<&'a Tag>, Grants), ProxyError> {
        if wants_xml_only(headers) {
            return Err(QueryError::NotAcceptable { format: "XML".into() }.into());
        }
        let now = SystemTime::now();
        // Cut off from the control plane for longer than the grant TTL: grants may have been revoked meanwhile.
        let confirmed = self.proxy.state.confirmed_at().and_then(|at| now.duration_since(at).ok());
        if confirmed.is_none_or(|age| age > self.proxy.grant_ttl) {
            return Err(ProxyError::GrantsStale);
        }
        let snapshot: &'a Snapshot = self.snapshot;
        let tags: Vec<&'a Tag> =
            snapshot.tenants.get(&self.caller.tenant).map(|t| t.active_tags(now).collect()).unwrap_or_default();
        let grants = Grants::new(tags.iter().copied());
        Ok((now, tags, grants))
    }

    /// A dedicated handler's request (`docref.rs`, `export.rs`), with the same start as every interaction.
    pub async fn handler(&self, handler: Handler, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let (now, tags, grants) = self.grants_now(request.headers())?;
        match handler {
            Handler::DocRef => self.docref(request, &tags, &grants, now).await,
            Handler::Export => self.export(request, &tags, &grants, now).await,
        }
    }
}

impl Ctx<'_> {
    pub async fn serve(
        &self,
        interaction: Interaction,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let (now, tags, grants) = self.grants_now(request.headers())?;
        let head = request.method() == Method::HEAD;
        match interaction {
            Interaction::Read { ty, id } | Interaction::VRead { ty, id, .. } => {
                self.read(&ty, &id, request, &grants, head).await
            }
            Interaction::SearchType { ty, post } => {
                let params = self.params(request, post).await?;
                self.bundle(&ty, Use::Search, params, &tags, &grants, now, head).await
            }
            Interaction::SearchSystem => {
                let post = request.method() == Method::POST;
                let params = self.params(request, post).await?;
                self.system_search(params, &tags, &grants, now, head).await
            }
            Interaction::HistoryType { ty } => {
                let params = query::parse(request.uri().query());
                self.bundle(&ty, Use::History, params, &tags, &grants, now, head).await
            }
            Interaction::HistoryInstance { ty, id } => {
                let params = query::parse(request.uri().query());
                self.focal(&ty, &id, &grants).await?;
                self.bundle(&ty, Use::History, params, &tags, &grants, now, head).await
            }
            Interaction::Operation { ty: Some(ty), id: Some(id), name }
                if ty == "Patient" && name == "$everything" && request.method() != Method::POST =>
            {
                let params = query::parse(request.uri().query());
                self.focal(&ty, &id, &grants).await?;
                self.bundle(&ty, Use::Everything, params, &tags, &grants, now, head).await
            }
            Interaction::Compartment { ty, id, target } if ty == "Patient" => {
                // `Patient/1/Observation?…` is `Observation?patient=Patient/1&…` once Patient/1 is known visible.
                self.focal(&ty, &id, &grants).await?;
                let (name, value) = compartment::search_param(&target, &id)
                    .ok_or_else(|| ProxyError::Forbidden(format!("{target} is not in the Patient compartment.")))?;
                let mut params = query::parse(request.uri().query());
                if params.iter().any(|(n, _)| n == PAGE_PARAM) {
                    return Err(ProxyError::BadRequest("page through the links the search returned".into()));
                }
                params.push((name, value));
                self.bundle(&target, Use::Search, params, &tags, &grants, now, head).await
            }
            Interaction::Operation { ty: Some(ty), id: Some(id), name }
                if matches!(name.as_str(), "$meta-add" | "$meta-delete") && request.method() == Method::POST =>
            {
                self.meta_change(&ty, &id, &name, request, &grants).await
            }
            Interaction::Create { ty } => self.create(&ty, request, &grants, &tags).await,
            Interaction::Conditional { ty, method } => self.conditional(&ty, method, request, &grants, &tags).await,
            Interaction::Update { ty, id } => self.update(&ty, &id, request, &grants).await,
            Interaction::Patch { ty, id } => self.patch(&ty, &id, request, &grants).await,
            Interaction::Delete { ty, id } => self.delete(&ty, &id, request, &grants).await,
            Interaction::BatchOrTransaction => self.batch(request, &grants, &tags).await,
            other => {
                Err(ProxyError::Forbidden(format!("{} is not supported through the gateway yet.", describe(&other))))
            }
        }
    }

    /// Tenant-wide permission, as writes and batches need: a `patient/` scope is not enough.
    pub(super) fn require(&self, ty: &str, permission: Permission) -> Result<(), ProxyError> {
        match self.caller.scopes.allows(ty, permission) {
            Allowed::Tenant => Ok(()),
            Allowed::PatientOnly => Err(ProxyError::Forbidden(
                "patient/ scopes allow direct reads and searches only; this needs a user/ or system/ scope.".into(),
            )),
            Allowed::No => {
                Err(ProxyError::Forbidden(format!("The token's scopes do not allow this interaction on {ty}.")))
            }
        }
    }

    /// How far the caller may read `ty`: the tenant, or (`patient/` scopes) the compartment of the token's patient.
    pub(super) fn require_read(&self, ty: &str, permission: Permission) -> Result<Reach, ProxyError> {
        match self.caller.scopes.allows(ty, permission) {
            Allowed::Tenant => Ok(Reach::Tenant),
            Allowed::PatientOnly => {
                let patient = self.caller.patient.as_deref().filter(|p| Class::Id.accepts(p)).ok_or_else(|| {
                    ProxyError::Forbidden("patient/ scopes need the token's `patient` claim (a patient id).".into())
                })?;
                if compartment::search_param(ty, patient).is_none() {
                    return Err(ProxyError::Forbidden(format!(
                        "{ty} is not in the patient compartment, so a patient/ scope grants nothing on it."
                    )));
                }
                Ok(Reach::Patient(patient.to_owned()))
            }
            Allowed::No => {
                Err(ProxyError::Forbidden(format!("The token's scopes do not allow this interaction on {ty}.")))
            }
        }
    }

    /// Query parameters, plus the form body of a `POST _search`.
    async fn params(&self, request: Request<Incoming>, post: bool) -> Result<Params, ProxyError> {
        let mut params = query::parse(request.uri().query());
        if post {
            let form = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
            if !form {
                return Err(ProxyError::BadRequest(
                    "POST _search needs an application/x-www-form-urlencoded body".into(),
                ));
            }
            let (_, body) = crate::body_budget::read(request, FORM_MAX_BYTES).await?;
            params.extend(form_urlencoded::parse(&body).into_owned());
        }
        Ok(params)
    }

    /// GETs `target` (path and query on the upstream) and buffers the body up to `max` bytes.
    async fn fetch(&self, target: &str, max: usize) -> Result<(StatusCode, HeaderMap, Bytes), ProxyError> {
        self.exchange(Method::GET, target, None, max).await
    }

    pub(super) async fn exchange(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
        max: usize,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ProxyError> {
        self.exchange_extra(method, target, body, max, HeaderMap::new()).await
    }

    /// Sends one request to `target` (path and query on the upstream) and buffers the response body up to `max`.
    /// `body` is `(content type, bytes)`; `extra` (the gateway's own preconditions) is added last.
    pub(super) async fn exchange_extra(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
        max: usize,
        extra: HeaderMap,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ProxyError> {
        let response = self.send_upstream(method, target, body, extra).await?;
        let status = response.status();
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| ProxyError::Unverifiable(format!("reading the body: {e}")))?
            .to_bytes();
        Ok((status, parts.headers, bytes))
    }

    /// Sends one request to the upstream; the response body is left to the caller.
    pub(super) async fn send_upstream(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
        extra: HeaderMap,
    ) -> Result<Response<Incoming>, ProxyError> {
        let uri = Uri::try_from(format!("{}{target}", self.upstream.origin))
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        // The allow-listed client headers: conditional, range and compression headers never pass (the gateway must
        // see the full body to verify it), nor anything an upstream or a sidecar could take as an instruction.
        let mut headers = self.forwarded.clone();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/fhir+json"));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        headers.extend(extra);
        let request_body = match body {
            Some((content_type, bytes)) => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
            }
            None => Empty::new().map_err(|never| match never {}).boxed_unsync(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(request_body)
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        *request.headers_mut() = headers;
        let response = self.proxy.upstreams.send(&self.upstream, request).await?;
        headers::require_identity(response.headers())?;
        Ok(response)
    }

    /// An instance-level history or operation on a resource outside the grants must look exactly like one on a
    /// resource that does not exist: the focal resource is read and verified first.
    async fn focal(&self, ty: &str, id: &str, grants: &Grants) -> Result<(), ProxyError> {
        let reach = self.require_read(ty, Permission::Read)?;
        self.visible(ty, id, grants, &reach).await
    }

    /// Whether `ty/id` exists, is inside the grants and within `reach`, as one answer: a 404 either way. Nothing of
    /// it is returned, so no scope is needed for `ty` (handlers check the resource a request is about this way).
    pub(super) async fn visible(&self, ty: &str, id: &str, grants: &Grants, reach: &Reach) -> Result<(), ProxyError> {
        if grants.is_empty() {
            return Err(ProxyError::ResourceNotFound);
        }
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned(), id.to_owned()]);
        let (status, _, body) = self.fetch(&target, READ_MAX_BYTES).await?;
        match status {
            StatusCode::OK => {
                let value: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::ResourceNotFound)?;
                if resource_visible(&value, ty, id, grants) && reach.admits(&value) {
                    Ok(())
                } else {
                    Err(ProxyError::ResourceNotFound)
                }
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProxyError::ResourceNotFound),
            other => Err(ProxyError::UpstreamStatus(other)),
        }
    }

    async fn read(
        &self,
        ty: &str,
        id: &str,
        request: Request<Incoming>,
        grants: &Grants,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let params = query::parse(request.uri().query());
        query::check(Use::Read, &params, self.guard)?;
        let reach = self.require_read(ty, Permission::Read)?;
        if grants.is_empty() {
            return Err(ProxyError::ResourceNotFound);
        }
        let mut target = join_encoded(&self.upstream.base_path, self.relative);
        if !params.is_empty() {
            target = format!("{target}?{}", query::encode(&params));
        }
        let (status, headers, body) = self.fetch(&target, READ_MAX_BYTES).await?;
        match status {
            StatusCode::OK => {
                if reach == Reach::Tenant && self.passes_verbatim(&body, ty, id, grants) {
                    return Ok(super::bytes_response_with(StatusCode::OK, body, validators(&headers), head));
                }
                let mut value: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::ResourceNotFound)?;
                if !resource_visible(&value, ty, id, grants) || !reach.admits(&value) {
                    return Err(ProxyError::ResourceNotFound);
                }
                crate::policy::links::rewrite_references(&mut value, &self.upstream, &self.public);
                Ok(json_response(StatusCode::OK, &value, &validators(&headers), head))
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProxyError::ResourceNotFound),
            other => Err(ProxyError::UpstreamStatus(other)),
        }
    }

    /// The fast path of a read: the body is exactly `ty/id`, inside the grants, and names the upstream's origin
    /// nowhere, so the upstream's bytes can go to the client as they are (validated JSON, nothing to rewrite).
    /// `false` leaves the decision to the parsed path.
    fn passes_verbatim(&self, body: &[u8], ty: &str, id: &str, grants: &Grants) -> bool {
        let Some(view) = raw::resource_view(body) else { return false };
        view.resource_type.as_deref() == Some(ty)
            && view.id.as_deref() == Some(id)
            && view.covered_by(grants)
            && !crate::policy::links::mentions_origin(body, &self.upstream)
    }

    /// The upstream target a signed page token stands for, if it was made for this tenant, this gateway path
    /// (relative to the base) and this upstream, and points inside the upstream's base; and whether the search it
    /// continues was narrowed upstream.
    fn page_target(&self, token: &str, path: &str, now: SystemTime) -> Result<(String, bool), ProxyError> {
        let claims = self.proxy.pages.verify(token, now)?;
        let base = self.upstream.base_path.trim_end_matches('/');
        let on_base = claims.target.strip_prefix(base).is_some_and(|rest| rest.starts_with(['/', '?']));
        if claims.tenant != self.caller.tenant
            || claims.path != path
            || claims.upstream != self.upstream.name
            || !on_base
        {
            return Err(ProxyError::BadRequest("page token is not valid for this request".into()));
        }
        Ok((claims.target, claims.narrowed))
    }

    /// A system-level search (`GET [base]?_type=…`, `POST [base]/_search`): `_type` is required and every type it
    /// names needs a tenant-wide search scope; the rest is checked and narrowed like a type search, and every entry
    /// is verified while it streams. Pages are signed for the base path.
    async fn system_search(
        &self,
        params: Params,
        tags: &[&Tag],
        grants: &Grants,
        now: SystemTime,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let public = self.public.as_str();
        let path = String::new();
        let base = join_encoded(&self.upstream.base_path, &[]);
        let (target, narrowed) = match params.as_slice() {
            [(name, token)] if name == PAGE_PARAM => self.page_target(token, &path, now)?,
            _ => {
                let (types, rest): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(name, _)| name == "_type");
                let types: Vec<String> =
                    types.iter().flat_map(|(_, v)| v.split(',')).map(|t| t.trim().to_owned()).collect();
                if types.is_empty() || types.iter().any(|t| t.is_empty()) {
                    return Err(ProxyError::BadRequest(
                        "a system-level search needs _type naming the resource types to search".into(),
                    ));
                }
                for ty in &types {
                    if !Class::Type.accepts(ty) {
                        return Err(ProxyError::BadRequest(format!("_type: `{ty}` is not a resource type")));
                    }
                    self.require(ty, Permission::Search)?;
                }
                query::check(Use::Search, &rest, self.guard)?;
                let Some(mut upstream_params) = query::narrow(&rest, tags).filter(|_| !grants.is_empty()) else {
                    return Ok(empty_bundle(Use::Search, public, &path, &params, head));
                };
                upstream_params.push(("_type".into(), types.join(",")));
                (format!("{base}?{}", query::encode(&upstream_params)), true)
            }
        };
        if grants.is_empty() {
            return Ok(empty_bundle(Use::Search, public, &path, &params, head));
        }
        let self_url = format!("{public}?{}", query::encode(&params));
        self.stream_bundle(Prepared { target, path, self_url, narrowed }, grants, now, head).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn bundle(
        &self,
        ty: &str,
        usage: Use,
        params: Params,
        tags: &[&Tag],
        grants: &Grants,
        now: SystemTime,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        // A search, GET or POST, is `[type]` on the upstream and in the links handed out.
        let segments: Vec<String> = if usage == Use::Search { vec![ty.to_owned()] } else { self.relative.to_vec() };
        let path = segments.join("/");
        let permission = if usage == Use::Search { Permission::Search } else { Permission::Read };
        let reach = self.require_read(ty, permission)?;
        let public = self.public.as_str();
        let page_token = match params.as_slice() {
            [(name, token)] if name == PAGE_PARAM => Some(token.clone()),
            _ => None,
        };
        let (target, narrowed) = match &page_token {
            // Tags may have changed since the token was made: entries are verified against today's grants.
            Some(token) => self.page_target(token, &path, now)?,
            None => {
                query::check(usage, &params, self.guard)?;
                let upstream_params = if usage == Use::Search {
                    match query::narrow(&params, tags) {
                        Some(mut p) => {
                            // A patient/ scope: confined upstream too (every entry is checked regardless).
                            if let Reach::Patient(patient) = &reach
                                && let Some(param) = compartment::search_param(ty, patient)
                            {
                                p.push(param);
                            }
                            p
                        }
                        None => return Ok(empty_bundle(usage, public, &path, &params, head)),
                    }
                } else if grants.is_empty() {
                    return Ok(empty_bundle(usage, public, &path, &params, head));
                } else {
                    params.clone()
                };
                let base = join_encoded(&self.upstream.base_path, &segments);
                let target = if upstream_params.is_empty() {
                    base
                } else {
                    format!("{base}?{}", query::encode(&upstream_params))
                };
                (target, usage == Use::Search)
            }
        };
        if grants.is_empty() {
            return Ok(empty_bundle(usage, public, &path, &params, head));
        }
        let self_url = if params.is_empty() {
            format!("{public}/{path}")
        } else {
            format!("{public}/{path}?{}", query::encode(&params))
        };
        self.stream_bundle(Prepared { target, path, self_url, narrowed }, grants, now, head).await
    }

    /// GETs a prepared search or read of many (already checked and narrowed) and streams the Bundle back, every
    /// entry verified against `grants` and the scopes.
    pub(super) async fn stream_bundle(
        &self,
        prepared: Prepared,
        grants: &Grants,
        now: SystemTime,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let Prepared { target, path, self_url, narrowed } = prepared;
        let public = self.public.as_str();
        let response = self.send_upstream(Method::GET, &target, None, HeaderMap::new()).await?;
        // The status is known before anything is sent to the client.
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let mut out = if head {
            Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
        } else {
            let rules = bundle_stream::Rules {
                grants: grants.clone(),
                scopes: self.caller.scopes.clone(),
                patient: self.caller.patient.clone(),
                upstream: self.upstream.clone(),
                public: public.to_owned(),
                signer: self.proxy.pages.clone(),
                tenant: self.caller.tenant.clone(),
                path: path.clone(),
                self_url,
                now,
                narrowed,
                origin: bundle_stream::Rules::origin_finder(&self.upstream),
            };
            Response::new(bundle_stream::filtered(response.into_body(), rules, self.upstream.idle_body_timeout))
        };
        // A filtered Bundle is not the upstream's representation: no ETag, Last-Modified or Content-Length.
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::outcome::FHIR_JSON));
        Ok(out)
    }
}

/// A Bundle request ready for the upstream.
pub(super) struct Prepared {
    /// Path and query on the upstream.
    pub target: String,
    /// The gateway path (relative to the base) its page links continue, e.g. `DocumentReference`.
    pub path: String,
    /// The public URL of the request, for `self`.
    pub self_url: String,
    /// Narrowed upstream with the tenant's tags (so the upstream's `total` may be kept).
    pub narrowed: bool,
}

fn empty_bundle(usage: Use, public: &str, path: &str, params: &Params, head: bool) -> Response<Body> {
    let kind = if usage == Use::History { "history" } else { "searchset" };
    let self_url = if params.is_empty() {
        format!("{public}/{path}")
    } else {
        format!("{public}/{path}?{}", query::encode(params))
    };
    let bundle = json!({
        "resourceType": "Bundle",
        "type": kind,
        "total": 0,
        "link": [{ "relation": "self", "url": self_url }],
    });
    json_response(StatusCode::OK, &bundle, &HeaderMap::new(), head)
}

pub(super) fn describe(interaction: &Interaction) -> String {
    match interaction {
        Interaction::Compartment { .. } => "Compartment search".into(),
        Interaction::HistorySystem => "System-level history".into(),
        Interaction::Conditional { .. } => "A conditional write".into(),
        Interaction::BatchOrTransaction => "A batch or transaction".into(),
        Interaction::Operation { name, .. } => format!("The operation {name}"),
        _ => "This request".into(),
    }
}
