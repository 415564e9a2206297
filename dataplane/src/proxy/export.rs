//! Bulk `$export` (Bulk Data Access IG v2): kick-off, status polling, cancellation and file download.
//!
//! - Kick-off (`GET [base]/$export`, `Patient/$export`, `Group/[id]/$export`, with `Prefer: respond-async`; or
//!   `POST` with the parameters in a `Parameters` body): the parameters are narrowed to the tenant
//!   (`policy::export::kickoff`), a Group and any `patient` a `POST` names must be visible to the caller (else the
//!   same 404 as a missing one), the upstream gets the narrowed `GET` (a `POST` when patients are named), and its
//!   `202 Content-Location` is handed out as `[base]/$export-poll-status?_token=…`, a link signed and bound to the
//!   tenant and upstream.
//! - Status (`GET` on that link): `202` passes through with `Retry-After` and `X-Progress` (`policy::export::progress`:
//!   never with digits); the `200` manifest is
//!   rewritten (`policy::export::rewrite_manifest`): each file becomes `[base]/$export-file?_token=…`.
//!   `DELETE` on it cancels the job upstream.
//! - File (`GET [base]/$export-file?_token=…`): the upstream's NDJSON streams back with every line verified.
//!
//! A link replayed by another tenant, for another upstream, or of the other kind, is refused with 400, as a page
//! token would be. The status and file endpoints are routes of their own (`/$export-poll-status`, `/$export-file`,
//! handler `export`); a kick-off is refused while they are not routed, since the links handed out would not work.

use std::time::SystemTime;

use fhirgw_config::path::join_encoded;
use fhirgw_config::pattern::Class;
use fhirgw_config::route::{Action, Handler};
use fhirgw_config::tenant::Tag;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;

use super::access::Ctx;
use super::ndjson_stream::{self, LineRules};
use super::{ProxyError, json_response};
use crate::body::Body;
use crate::policy::export::{self, Binding, ExportClaims, FILE_OP, KickOffError, LinkKind, STATUS_OP, TOKEN_PARAM};
use crate::policy::links::{rewrite_url, upstream_target};
use crate::policy::query;
use crate::policy::verify::Grants;

/// Largest completion manifest the gateway reads.
const MANIFEST_MAX_BYTES: usize = 16 * 1024 * 1024;
const NDJSON: &str = "application/fhir+ndjson";

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response
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

/// What a kick-off asks for: its headers, its parameters and the patients it names (`POST` only).
type KickOff = (HeaderMap, query::Params, Vec<String>);

/// A kick-off's headers and parameters: from the query of a `GET`, or from the `Parameters` body of a `POST` (which
/// then must not have a query as well: one place for the parameters, so none can slip past the checks).
async fn kickoff_params(request: Request<Incoming>, post: bool) -> Result<KickOff, ProxyError> {
    if !post {
        let params = query::parse(request.uri().query());
        return Ok((request.into_parts().0.headers, params, Vec::new()));
    }
    if request.uri().query().is_some_and(|q| !q.is_empty()) {
        return Err(ProxyError::BadRequest("A POST kick-off takes its parameters in the Parameters body only.".into()));
    }
    let (headers, body) = super::write::json_body(request, "Parameters").await?;
    let (params, patients) = export::parameters(&body).map_err(|e| match e {
        KickOffError::Query(e) => ProxyError::Query(e),
        other => ProxyError::Forbidden(other.to_string()),
    })?;
    Ok((headers, params, patients))
}

/// A short, printable header value from the upstream (`Retry-After`), or nothing.
fn printable(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let value = headers.get(name)?;
    let text = value.to_str().ok()?;
    (text.len() <= 100 && text.chars().all(|c| c == ' ' || c.is_ascii_graphic())).then(|| value.clone())
}

impl Ctx<'_> {
    pub(super) async fn export(
        &self,
        request: Request<Incoming>,
        tags: &[&Tag],
        grants: &Grants,
        now: SystemTime,
    ) -> Result<Response<Body>, ProxyError> {
        let path: Vec<&str> = self.relative.iter().map(String::as_str).collect();
        match (request.method(), path.as_slice()) {
            (&Method::GET, [STATUS_OP]) => self.export_status(&request, now).await,
            (&Method::DELETE, [STATUS_OP]) => self.export_cancel(&request, now).await,
            (&Method::GET, [FILE_OP]) => self.export_file(&request, grants, now).await,
            (method @ (&Method::GET | &Method::POST), ["$export"]) => {
                let post = method == Method::POST;
                let (headers, params, patients) = kickoff_params(request, post).await?;
                if !patients.is_empty() {
                    return Err(ProxyError::BadRequest(
                        "`patient` applies to Patient- and Group-level exports only.".into(),
                    ));
                }
                self.export_kickoff(&headers, params, &[], tags, None, now).await
            }
            (method @ (&Method::GET | &Method::POST), ["Patient", "$export"]) => {
                let post = method == Method::POST;
                let (headers, params, patients) = kickoff_params(request, post).await?;
                self.export_kickoff(&headers, params, &patients, tags, Some((None, grants)), now).await
            }
            (method @ (&Method::GET | &Method::POST), ["Group", id, "$export"]) if Class::Id.accepts(id) => {
                let post = method == Method::POST;
                let (headers, params, patients) = kickoff_params(request, post).await?;
                self.export_kickoff(&headers, params, &patients, tags, Some((Some(id), grants)), now).await
            }
            // A route that sends anything else to this handler.
            _ => Err(ProxyError::NotFound),
        }
    }

    fn binding(&self, kind: LinkKind) -> Binding<'_> {
        Binding {
            kind,
            tenant: &self.caller.tenant,
            upstream: &self.upstream.name,
            base_path: &self.upstream.base_path,
        }
    }

    /// A public link to `target` on the upstream, signed for this tenant.
    fn export_link(&self, kind: LinkKind, target: String, resource_type: Option<String>, now: SystemTime) -> String {
        let token = ExportClaims::new(&self.binding(kind), target, resource_type, now).sign(&self.proxy.pages);
        let op = if kind == LinkKind::Status { STATUS_OP } else { FILE_OP };
        format!("{}/{op}?{TOKEN_PARAM}={token}", self.public)
    }

    /// The claims of the link this request follows.
    fn followed(
        &self,
        request: &Request<Incoming>,
        kind: LinkKind,
        now: SystemTime,
    ) -> Result<ExportClaims, ProxyError> {
        let params = query::parse(request.uri().query());
        let [(name, token)] = params.as_slice() else {
            return Err(ProxyError::BadRequest("use the link exactly as the gateway handed it out".into()));
        };
        if name != TOKEN_PARAM {
            return Err(ProxyError::BadRequest("use the link exactly as the gateway handed it out".into()));
        }
        ExportClaims::verify(&self.proxy.pages, token, &self.binding(kind), now).map_err(ProxyError::ExportLink)
    }

    /// Path and query on the upstream of an absolute or origin-relative URL on its base.
    fn on_upstream(&self, url: &str) -> Option<String> {
        if url.starts_with('/') && !url.starts_with("//") {
            upstream_target(&self.upstream, &format!("{}{url}", self.upstream.origin))
        } else {
            upstream_target(&self.upstream, url)
        }
    }

    /// Whether the status and file endpoints lead back to this handler and upstream.
    fn export_routed(&self) -> bool {
        [STATUS_OP, FILE_OP].iter().all(|op| {
            let path = [(*op).to_owned()];
            self.table.route(&Method::GET, &path).is_some_and(|m| {
                matches!(&m.route.action, Action::Handler { handler: Handler::Export, upstream }
                    if *upstream == self.upstream.name)
            })
        })
    }

    /// `params`: the kick-off's, from the query or a `POST` body; `patients`: those a `POST` names; `level`: set for a
    /// Patient- or Group-level export (with the Group's id). The Group and every named patient must be visible
    /// to the caller (else the same 404 as a missing one). The upstream gets the narrowed parameters as a `GET`
    /// kick-off (which every Bulk Data server supports), or as a `POST` `Parameters` body when patients are named.
    async fn export_kickoff(
        &self,
        headers: &HeaderMap,
        params: query::Params,
        patients: &[String],
        tags: &[&Tag],
        level: Option<(Option<&str>, &Grants)>,
        now: SystemTime,
    ) -> Result<Response<Body>, ProxyError> {
        if !respond_async(headers) {
            return Err(ProxyError::BadRequest("Bulk export needs the header `Prefer: respond-async`.".into()));
        }
        let upstream_params = export::kickoff(&params, tags, &self.caller.scopes, self.guard).map_err(|e| match e {
            KickOffError::Query(e) => ProxyError::Query(e),
            other => ProxyError::Forbidden(other.to_string()),
        })?;
        if !self.export_routed() {
            return Err(ProxyError::Forbidden(
                "Bulk export is not fully routed on this gateway (its status and file endpoints are missing).".into(),
            ));
        }
        if let Some((group, grants)) = level {
            let reach = crate::policy::compartment::Reach::Tenant;
            if let Some(id) = group {
                self.visible("Group", id, grants, &reach).await?;
            }
            for id in patients {
                self.visible("Patient", id, grants, &reach).await?;
            }
        }
        let path = join_encoded(&self.upstream.base_path, self.relative);
        let mut extra = HeaderMap::new();
        extra.insert("prefer", HeaderValue::from_static("respond-async"));
        let response = if patients.is_empty() {
            let target = format!("{path}?{}", query::encode(&upstream_params));
            self.send_upstream(Method::GET, &target, None, extra).await?
        } else {
            let body = export::upstream_parameters(&upstream_params, patients).to_string();
            let body = Some((crate::outcome::FHIR_JSON, bytes::Bytes::from(body)));
            self.send_upstream(Method::POST, &path, body, extra).await?
        };
        match response.status() {
            StatusCode::ACCEPTED => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let status = response
            .headers()
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|location| self.on_upstream(location))
            .ok_or_else(|| {
                ProxyError::Unverifiable("the export kick-off named no status URL on the upstream".into())
            })?;
        let link = self.export_link(LinkKind::Status, status, None, now);
        let mut out = empty(StatusCode::ACCEPTED);
        let location = HeaderValue::try_from(link).map_err(|e| ProxyError::Unverifiable(e.to_string()))?;
        out.headers_mut().insert(header::CONTENT_LOCATION, location);
        Ok(out)
    }

    async fn export_status(&self, request: &Request<Incoming>, now: SystemTime) -> Result<Response<Body>, ProxyError> {
        let claims = self.followed(request, LinkKind::Status, now)?;
        let mut extra = HeaderMap::new();
        extra.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let (status, headers, body) =
            self.exchange_extra(Method::GET, &claims.target, None, MANIFEST_MAX_BYTES, extra).await?;
        match status {
            StatusCode::ACCEPTED => {
                // In progress: only the progress hints pass, never the upstream's body.
                let mut out = empty(StatusCode::ACCEPTED);
                let text = headers.get("x-progress").and_then(|v| v.to_str().ok());
                if let Ok(progress) = HeaderValue::try_from(export::progress(text)) {
                    out.headers_mut().insert(HeaderName::from_static("x-progress"), progress);
                }
                if let Some(value) = printable(&headers, &header::RETRY_AFTER) {
                    out.headers_mut().insert(header::RETRY_AFTER, value);
                }
                Ok(out)
            }
            StatusCode::OK => {
                let manifest: Value = serde_json::from_slice(&body)
                    .map_err(|e| ProxyError::Unverifiable(format!("the export manifest is not JSON: {e}")))?;
                let request_url = manifest
                    .get("request")
                    .and_then(Value::as_str)
                    .and_then(|url| rewrite_url(&self.upstream, &self.public, url))
                    .unwrap_or_else(|| format!("{}/$export", self.public));
                let target = |url: &str| self.on_upstream(url);
                let mut link =
                    |file: String, ty: &str| self.export_link(LinkKind::File, file, Some(ty.to_owned()), now);
                let rewritten = export::rewrite_manifest(&manifest, request_url, &target, &mut link)
                    .map_err(ProxyError::Unverifiable)?;
                let mut out = json_response(StatusCode::OK, &rewritten, &HeaderMap::new(), false);
                out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(out)
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProxyError::ResourceNotFound),
            other => Err(ProxyError::UpstreamStatus(other)),
        }
    }

    async fn export_cancel(&self, request: &Request<Incoming>, now: SystemTime) -> Result<Response<Body>, ProxyError> {
        let claims = self.followed(request, LinkKind::Status, now)?;
        let (status, _, _) = self.exchange(Method::DELETE, &claims.target, None, 64 * 1024).await?;
        match status {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(empty(StatusCode::ACCEPTED)),
            StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProxyError::ResourceNotFound),
            other => Err(ProxyError::UpstreamStatus(other)),
        }
    }

    async fn export_file(
        &self,
        request: &Request<Incoming>,
        grants: &Grants,
        now: SystemTime,
    ) -> Result<Response<Body>, ProxyError> {
        let claims = self.followed(request, LinkKind::File, now)?;
        let mut extra = HeaderMap::new();
        extra.insert(header::ACCEPT, HeaderValue::from_static(NDJSON));
        let response = self.send_upstream(Method::GET, &claims.target, None, extra).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let rules = LineRules {
            grants: grants.clone(),
            scopes: self.caller.scopes.clone(),
            declared: claims.resource_type,
            upstream: self.upstream.clone(),
            public: self.public.clone(),
        };
        let mut out =
            Response::new(ndjson_stream::filtered(response.into_body(), rules, self.upstream.idle_body_timeout));
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        Ok(out)
    }
}
