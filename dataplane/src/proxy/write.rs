//! Writes: create, update, patch and delete, checked on both sides.
//!
//! The stored resource is read and verified before any update, patch or delete (out of grant or missing: the same
//! 404, and no update-as-create, which would be an existence oracle), and the write is forwarded with `If-Match` on
//! the version that was checked, so nothing can change in between. The new content must carry only the caller's
//! dataset tags (see `policy::write`). Conditional creates are narrowed to the tenant like searches.

use bytes::Bytes;
use fhirgw_config::path::join_encoded;
use fhirgw_config::tenant::Tag;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;

use super::access::Ctx;
use super::{ProxyError, json_response, validators};
use crate::body::Body;
use crate::policy::links::rewrite_url;
use crate::policy::query::{self, PAGE_PARAM, Use};
use crate::policy::scopes::Permission;
use crate::policy::verify::{Grants, resource_visible};
use crate::policy::write::{check_json_patch, check_meta_change, check_tags, dataset_systems, granted_tags};

/// Largest resource or patch accepted for a write.
const WRITE_MAX_BYTES: usize = 16 * 1024 * 1024;
const FHIR_JSON: &str = "application/fhir+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

async fn read_body(request: Request<Incoming>) -> Result<(HeaderMap, Bytes), ProxyError> {
    // Within the process-wide body budget; 413 past the limit, 415 for a compressed body.
    let (parts, bytes) = crate::body_budget::read(request, WRITE_MAX_BYTES).await?;
    Ok((parts.headers, bytes))
}

fn json_resource(headers: &HeaderMap, body: &[u8], ty: &str) -> Result<Value, ProxyError> {
    let media = media_type(headers);
    if !matches!(media.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir") {
        return Err(ProxyError::UnsupportedMedia(media));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::BadRequest(format!("the body is not JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some(ty) {
        return Err(ProxyError::BadRequest(format!("the body must be a {ty}")));
    }
    Ok(value)
}

/// A FHIR JSON request body that must be a `ty`.
pub(super) async fn json_body(request: Request<Incoming>, ty: &str) -> Result<(HeaderMap, Value), ProxyError> {
    let (headers, body) = read_body(request).await?;
    let value = json_resource(&headers, &body, ty)?;
    Ok((headers, value))
}

/// The stored resource `ty/id`, read from the upstream and verified against the grants (out of grant or missing:
/// the same 404), and its version. `if_match`, the client's precondition, must name that version.
pub(super) async fn stored_version(
    ctx: &Ctx<'_>,
    ty: &str,
    id: &str,
    grants: &Grants,
    if_match: Option<&str>,
) -> Result<(Value, String), ProxyError> {
    if grants.is_empty() {
        return Err(ProxyError::ResourceNotFound);
    }
    let target = join_encoded(&ctx.upstream.base_path, &[ty.to_owned(), id.to_owned()]);
    let (status, _, body) = ctx.exchange(Method::GET, &target, None, WRITE_MAX_BYTES).await?;
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
        other => return Err(ProxyError::UpstreamStatus(other)),
    }
    let stored: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::ResourceNotFound)?;
    if !resource_visible(&stored, ty, id, grants) {
        return Err(ProxyError::ResourceNotFound);
    }
    let version = stored
        .get("meta")
        .and_then(|m| m.get("versionId"))
        .and_then(Value::as_str)
        .ok_or_else(|| ProxyError::Unverifiable("the stored resource has no versionId to write against".into()))?
        .to_owned();
    if let Some(wanted) = if_match
        && version_of(wanted) != version
    {
        return Err(ProxyError::PreconditionFailed);
    }
    Ok((stored, version))
}

/// An update of a resource the caller cannot see (missing, or another tenant's) is an update-as-create, which the
/// gateway refuses with one answer for both.
pub(super) fn update_error(error: ProxyError) -> ProxyError {
    match error {
        ProxyError::ResourceNotFound => ProxyError::UpdateAsCreate,
        other => other,
    }
}

impl<'a> Ctx<'a> {
    /// Checks the references `resource` carries (`references.rs`) and narrows its conditional ones in place.
    pub(super) async fn checked_references(
        &self,
        resource: &mut Value,
        grants: &Grants,
        tags: &[&Tag],
    ) -> Result<(), ProxyError> {
        let narrowed = {
            let mut found = Vec::new();
            crate::policy::references::collect(resource, &mut String::new(), &mut found);
            self.check_references(&found, grants, tags, true).await?
        };
        narrowed.apply(resource);
        Ok(())
    }

    /// The caller's tenant's tags active now.
    fn tenant_tags(&self) -> Vec<&'a Tag> {
        let now = std::time::SystemTime::now();
        self.snapshot.tenants.get(&self.caller.tenant).map(|t| t.active_tags(now).collect()).unwrap_or_default()
    }
}

/// The gateway's precondition for a write: `If-Match` on the version it checked.
fn if_match(version: &str) -> Result<HeaderMap, ProxyError> {
    let value = HeaderValue::try_from(format!("W/\"{version}\""))
        .map_err(|_| ProxyError::Unverifiable("the stored versionId is not a valid header value".into()))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::IF_MATCH, value);
    Ok(headers)
}

/// `W/"3"`, `"3"` or `3` → `3`.
fn version_of(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/").trim_matches('"')
}

impl Ctx<'_> {
    pub(super) async fn create(
        &self,
        ty: &str,
        request: Request<Incoming>,
        grants: &Grants,
        tags: &[&Tag],
    ) -> Result<Response<Body>, ProxyError> {
        self.require(ty, Permission::Create)?;
        if grants.is_empty() {
            return Err(ProxyError::Forbidden("Your tenant holds no dataset to write into.".into()));
        }
        let if_none_exist = request.headers().get("if-none-exist").map(|v| v.to_str().map(str::to_owned));
        let (headers, body) = read_body(request).await?;
        let mut resource = json_resource(&headers, &body, ty)?;
        drop(body); // memory: the parsed resource is what is kept
        let stamp: Vec<Tag> = if tags.len() == 1 { tags.iter().map(|t| (*t).clone()).collect() } else { Vec::new() };
        check_tags(&mut resource, grants, &dataset_systems(self.snapshot), &stamp)?;
        self.checked_references(&mut resource, grants, tags).await?;
        let mut preconditions = HeaderMap::new();
        if let Some(condition) = if_none_exist {
            // The match must only ever find the tenant's own resources, like any search.
            let condition = condition.map_err(|_| ProxyError::BadRequest("If-None-Exist is not ASCII".into()))?;
            let params = query::parse(Some(condition.trim_start_matches('?')));
            query::check(Use::Search, &params, self.guard)?;
            let narrowed = query::narrow(&params, tags).ok_or(ProxyError::ResourceNotFound)?;
            let value = HeaderValue::try_from(query::encode(&narrowed))
                .map_err(|_| ProxyError::BadRequest("bad If-None-Exist".into()))?;
            preconditions.insert("if-none-exist", value);
        }
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned()]);
        let body = Some((FHIR_JSON, Bytes::from(resource.to_string())));
        drop(resource);
        self.write_upstream(Method::POST, &target, body, preconditions, ty, grants).await
    }

    /// A conditional update, patch or delete (`PUT Patient?identifier=…`): the condition is searched narrowed to
    /// the tenant like any search, and only the caller's own matches count. One match: the ordinary checked write on
    /// it (pinned to the version seen). None: an update becomes a create (tag rules apply), a patch or delete finds
    /// nothing. Several: 412. Another tenant's resources can neither match nor be counted.
    pub(super) async fn conditional(
        &self,
        ty: &str,
        method: Method,
        request: Request<Incoming>,
        grants: &Grants,
        tags: &[&Tag],
    ) -> Result<Response<Body>, ProxyError> {
        let permission = if method == Method::DELETE { Permission::Delete } else { Permission::Update };
        self.require(ty, permission)?;
        let params = query::parse(request.uri().query());
        query::check(Use::Search, &params, self.guard)?;
        if params.iter().any(|(name, _)| matches!(name.as_str(), "_count" | "_sort" | PAGE_PARAM)) {
            return Err(ProxyError::BadRequest("a condition takes search criteria only".into()));
        }
        let matches = self.matching(ty, &params, grants, tags).await?;
        match (matches.as_slice(), method) {
            ([], Method::PUT) => self.create(ty, request, grants, tags).await,
            ([], _) => Err(ProxyError::ResourceNotFound),
            ([id], Method::PUT) => self.update_resource(ty, id, request, grants, true).await,
            ([id], Method::PATCH) => self.patch(ty, id, request, grants).await,
            ([id], Method::DELETE) => self.delete(ty, id, request, grants).await,
            ([_], _) => Err(ProxyError::MethodNotAllowed),
            _ => Err(ProxyError::MultipleMatches),
        }
    }

    /// `$meta-add` / `$meta-delete` on `ty/id`: the stored resource is read and verified first (out of grant looks
    /// missing), the tags named are checked (`check_meta_change`), and only the `meta` parameter is forwarded.
    pub(super) async fn meta_change(
        &self,
        ty: &str,
        id: &str,
        operation: &str,
        request: Request<Incoming>,
        grants: &Grants,
    ) -> Result<Response<Body>, ProxyError> {
        self.require(ty, Permission::Update)?;
        let (headers, parameters) = json_body(request, "Parameters").await?;
        let metas: Vec<&Value> = parameters
            .get("parameter")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter(|p| p.get("name").and_then(Value::as_str) == Some("meta")).collect())
            .unwrap_or_default();
        let [meta] = metas.as_slice() else {
            return Err(ProxyError::BadRequest(format!("{operation} takes exactly one `meta` parameter")));
        };
        let value_meta = meta
            .get("valueMeta")
            .filter(|m| m.is_object())
            .ok_or_else(|| ProxyError::BadRequest("the `meta` parameter needs a valueMeta".into()))?;
        let tags = match value_meta.get("tag") {
            None => Vec::new(),
            Some(Value::Array(tags)) => tags.clone(),
            Some(_) => return Err(ProxyError::BadRequest("valueMeta.tag must be a list".into())),
        };
        let (stored, version) = self.stored(ty, id, grants, &headers).await?;
        check_meta_change(&stored, &tags, operation == "$meta-add", grants, &dataset_systems(self.snapshot))?;
        let body = serde_json::json!({
            "resourceType": "Parameters",
            "parameter": [{ "name": "meta", "valueMeta": value_meta }],
        });
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned(), id.to_owned(), operation.to_owned()]);
        let body = Some((FHIR_JSON, Bytes::from(body.to_string())));
        let (status, _, response) =
            self.exchange_extra(Method::POST, &target, body, WRITE_MAX_BYTES, if_match(&version)?).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => return Err(ProxyError::PreconditionFailed),
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        // The answer is the resource's new `meta`: passed on only as a Parameters resource, re-serialised.
        let answer: Value = serde_json::from_slice(&response)
            .ok()
            .filter(|v: &Value| v.get("resourceType").and_then(Value::as_str) == Some("Parameters"))
            .ok_or_else(|| ProxyError::Unverifiable(format!("{operation} did not answer with Parameters")))?;
        Ok(json_response(StatusCode::OK, &answer, &HeaderMap::new(), false))
    }

    /// Ids of the caller's resources of type `ty` matching `params` (at most two: enough to tell one from several).
    async fn matching(
        &self,
        ty: &str,
        params: &[(String, String)],
        grants: &Grants,
        tags: &[&Tag],
    ) -> Result<Vec<String>, ProxyError> {
        let Some(mut narrowed) = query::narrow(params, tags) else { return Ok(Vec::new()) };
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        narrowed.push(("_count".into(), "2".into()));
        let target =
            format!("{}?{}", join_encoded(&self.upstream.base_path, &[ty.to_owned()]), query::encode(&narrowed));
        let (status, _, body) = self.exchange(Method::GET, &target, None, WRITE_MAX_BYTES).await?;
        if status != StatusCode::OK {
            return Err(ProxyError::UpstreamStatus(status));
        }
        let bundle: Value = serde_json::from_slice(&body)
            .map_err(|e| ProxyError::Unverifiable(format!("the condition's search result is not JSON: {e}")))?;
        let more = bundle
            .get("link")
            .and_then(Value::as_array)
            .is_some_and(|links| links.iter().any(|l| l.get("relation").and_then(Value::as_str) == Some("next")));
        let mut ids: Vec<String> = bundle
            .get("entry")
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| {
                        e.get("search").and_then(|s| s.get("mode")).and_then(Value::as_str).is_none_or(|m| m == "match")
                    })
                    .filter_map(|e| e.get("resource"))
                    .filter_map(|r| {
                        let id = r.get("id").and_then(Value::as_str)?;
                        resource_visible(r, ty, id, grants).then(|| id.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if more && ids.len() == 1 {
            // More pages of matches: several, whatever this page showed.
            ids.push(String::new());
        }
        Ok(ids)
    }

    pub(super) async fn update(
        &self,
        ty: &str,
        id: &str,
        request: Request<Incoming>,
        grants: &Grants,
    ) -> Result<Response<Body>, ProxyError> {
        self.update_resource(ty, id, request, grants, false).await
    }

    /// `conditional`: the body may leave out the id (the match supplies it).
    async fn update_resource(
        &self,
        ty: &str,
        id: &str,
        request: Request<Incoming>,
        grants: &Grants,
        conditional: bool,
    ) -> Result<Response<Body>, ProxyError> {
        self.require(ty, Permission::Update)?;
        let (headers, body) = read_body(request).await?;
        let mut resource = json_resource(&headers, &body, ty)?;
        drop(body); // memory: the parsed resource is what is kept
        if conditional
            && resource.get("id").is_none()
            && let Some(obj) = resource.as_object_mut()
        {
            obj.insert("id".into(), Value::String(id.to_owned()));
        }
        if resource.get("id").and_then(Value::as_str) != Some(id) {
            return Err(ProxyError::BadRequest(format!("the body's id must be `{id}`")));
        }
        let (stored, version) = self.stored(ty, id, grants, &headers).await.map_err(update_error)?;
        check_tags(&mut resource, grants, &dataset_systems(self.snapshot), &granted_tags(&stored, grants))?;
        let tags: Vec<&Tag> = self.tenant_tags();
        self.checked_references(&mut resource, grants, &tags).await?;
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned(), id.to_owned()]);
        let body = Some((FHIR_JSON, Bytes::from(resource.to_string())));
        drop(resource);
        self.write_upstream(Method::PUT, &target, body, if_match(&version)?, ty, grants).await
    }

    pub(super) async fn patch(
        &self,
        ty: &str,
        id: &str,
        request: Request<Incoming>,
        grants: &Grants,
    ) -> Result<Response<Body>, ProxyError> {
        self.require(ty, Permission::Update)?;
        let (headers, body) = read_body(request).await?;
        // JSON Patch, or FHIRPath Patch (a Parameters resource, HAPI's usual form): the same rule for both.
        let media = media_type(&headers);
        let content_type = match media.as_str() {
            "application/json-patch+json" => JSON_PATCH,
            "application/fhir+json" | "application/json+fhir" => FHIR_JSON,
            _ => return Err(ProxyError::UnsupportedMedia(media)),
        };
        let patch: Value =
            serde_json::from_slice(&body).map_err(|e| ProxyError::BadRequest(format!("the patch is not JSON: {e}")))?;
        let references = if content_type == JSON_PATCH {
            check_json_patch(&patch)?;
            crate::policy::references::in_json_patch(&patch)
        } else {
            crate::policy::fhirpath_patch::check(&patch, ty)?;
            crate::policy::references::in_fhirpath_patch(&patch)
        };
        self.check_references(&references, grants, &[], false).await?;
        let (_, version) = self.stored(ty, id, grants, &headers).await?;
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned(), id.to_owned()]);
        let body = Some((content_type, Bytes::from(patch.to_string())));
        self.write_upstream(Method::PATCH, &target, body, if_match(&version)?, ty, grants).await
    }

    pub(super) async fn delete(
        &self,
        ty: &str,
        id: &str,
        request: Request<Incoming>,
        grants: &Grants,
    ) -> Result<Response<Body>, ProxyError> {
        self.require(ty, Permission::Delete)?;
        let headers = request.headers().clone();
        let (_, version) = self.stored(ty, id, grants, &headers).await?;
        let target = join_encoded(&self.upstream.base_path, &[ty.to_owned(), id.to_owned()]);
        self.write_upstream(Method::DELETE, &target, None, if_match(&version)?, ty, grants).await
    }

    /// The stored resource, verified, and its version. A client `If-Match` must name that version.
    async fn stored(
        &self,
        ty: &str,
        id: &str,
        grants: &Grants,
        client: &HeaderMap,
    ) -> Result<(Value, String), ProxyError> {
        let if_match = client.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
        stored_version(self, ty, id, grants, if_match).await
    }

    /// Sends a checked write with the gateway's `preconditions` (`If-Match` on the checked version, a narrowed
    /// `If-None-Exist`) and passes on only what the caller may see of the answer.
    async fn write_upstream(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
        preconditions: HeaderMap,
        ty: &str,
        grants: &Grants,
    ) -> Result<Response<Body>, ProxyError> {
        let (status, upstream_headers, response) =
            self.exchange_extra(method, target, body, WRITE_MAX_BYTES, preconditions).await?;
        match status {
            StatusCode::OK | StatusCode::CREATED | StatusCode::NO_CONTENT => {}
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => return Err(ProxyError::PreconditionFailed),
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let mut keep = validators(&upstream_headers);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(url) = upstream_headers.get(&name).and_then(|v| v.to_str().ok())
                && let Some(public) = rewrite_url(&self.upstream, &self.public, url)
                && let Ok(value) = HeaderValue::try_from(public)
            {
                keep.insert(name, value);
            }
        }
        // Only a resource the caller may see is returned; anything else (an outcome with upstream diagnostics,
        // another resource) is reduced to the status and headers.
        let visible = serde_json::from_slice::<Value>(&response).ok().filter(|v| {
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            resource_visible(v, ty, &id, grants)
        });
        let mut out = match visible {
            Some(mut value) => {
                crate::policy::links::rewrite_references(&mut value, &self.upstream, &self.public);
                json_response(status, &value, &keep, false)
            }
            None => {
                let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
                *r.status_mut() = if status == StatusCode::OK { StatusCode::NO_CONTENT } else { status };
                *r.headers_mut() = keep;
                r
            }
        };
        if status == StatusCode::CREATED {
            *out.status_mut() = StatusCode::CREATED;
        }
        Ok(out)
    }
}
