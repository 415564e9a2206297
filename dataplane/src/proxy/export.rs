//! Bulk `$export` answers (the planning is in `policy::planner::handlers`): the kick-off's status URL and the
//! manifest's file URLs reach the client only as links signed for the tenant and upstream (`policy::export`);
//! progress passes without digits; files stream back line by line, every line verified.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

use super::execute::{Exec, buffer, expect_status};
use super::ndjson_stream::{self, LineRules};
use super::{ProxyError, json_response};
use crate::body::Body;
use crate::policy::export::{self, Binding, ExportClaims, FILE_OP, LinkKind, STATUS_OP, TOKEN_PARAM};
use crate::policy::links::{rewrite_url, upstream_target};

/// Largest completion manifest the gateway reads.
const MANIFEST_MAX_BYTES: usize = 16 * 1024 * 1024;
const NDJSON: &str = "application/fhir+ndjson";

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = status;
    response
}

/// A short, printable header value from the upstream (`Retry-After`), or nothing.
fn printable(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let value = headers.get(name)?;
    let text = value.to_str().ok()?;
    (text.len() <= 100 && text.chars().all(|c| c == ' ' || c.is_ascii_graphic())).then(|| value.clone())
}

impl Exec<'_> {
    /// A public link to `target` on the upstream, signed for this tenant.
    fn export_link(&self, kind: LinkKind, target: String, resource_type: Option<String>) -> String {
        let binding = Binding {
            kind,
            tenant: &self.access.tenant,
            upstream: &self.upstream.name,
            base_path: &self.upstream.base_path,
        };
        let token = ExportClaims::new(&binding, target, resource_type, self.access.now).sign(self.env.signer);
        let op = if kind == LinkKind::Status { STATUS_OP } else { FILE_OP };
        format!("{}/{op}?{TOKEN_PARAM}={token}", self.env.public)
    }

    /// Path and query on the upstream of an absolute or origin-relative URL on its base.
    fn on_upstream(&self, url: &str) -> Option<String> {
        if url.starts_with('/') && !url.starts_with("//") {
            upstream_target(&self.upstream, &format!("{}{url}", self.upstream.origin))
        } else {
            upstream_target(&self.upstream, url)
        }
    }

    /// `202` with the upstream's status URL as a signed link.
    pub(super) fn export_kickoff(&self, response: Response<Incoming>) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::ACCEPTED], false)?;
        let status = response
            .headers()
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|location| self.on_upstream(location))
            .ok_or_else(|| {
                ProxyError::Unverifiable("the export kick-off named no status URL on the upstream".into())
            })?;
        let link = self.export_link(LinkKind::Status, status, None);
        let mut out = empty(StatusCode::ACCEPTED);
        let location = HeaderValue::try_from(link).map_err(|e| ProxyError::Unverifiable(e.to_string()))?;
        out.headers_mut().insert(header::CONTENT_LOCATION, location);
        Ok(out)
    }

    /// In progress: only the progress hints pass, never the upstream's body. Complete: the manifest with signed
    /// file links (`export::rewrite_manifest`).
    pub(super) async fn export_status(&self, response: Response<Incoming>) -> Result<Response<Body>, ProxyError> {
        let status = response.status();
        expect_status(status, &[StatusCode::ACCEPTED, StatusCode::OK], false)?;
        let headers = response.headers().clone();
        let body = buffer(response, MANIFEST_MAX_BYTES).await?;
        if status == StatusCode::ACCEPTED {
            let mut out = empty(StatusCode::ACCEPTED);
            let text = headers.get("x-progress").and_then(|v| v.to_str().ok());
            if let Ok(progress) = HeaderValue::try_from(export::progress(text)) {
                out.headers_mut().insert(HeaderName::from_static("x-progress"), progress);
            }
            if let Some(value) = printable(&headers, &header::RETRY_AFTER) {
                out.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return Ok(out);
        }
        let manifest: Value = serde_json::from_slice(&body)
            .map_err(|e| ProxyError::Unverifiable(format!("the export manifest is not JSON: {e}")))?;
        let public = self.env.public;
        let request_url = manifest
            .get("request")
            .and_then(Value::as_str)
            .and_then(|url| rewrite_url(&self.upstream, public, url))
            .unwrap_or_else(|| format!("{public}/$export"));
        let target = |url: &str| self.on_upstream(url);
        let mut link = |file: String, ty: &str| self.export_link(LinkKind::File, file, Some(ty.to_owned()));
        let rewritten =
            export::rewrite_manifest(&manifest, request_url, &target, &mut link).map_err(ProxyError::Unverifiable)?;
        let mut out = json_response(StatusCode::OK, &rewritten, &HeaderMap::new(), false);
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(out)
    }

    pub(super) fn export_cancel(&self, response: Response<Incoming>) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::ACCEPTED, StatusCode::OK, StatusCode::NO_CONTENT], false)?;
        Ok(empty(StatusCode::ACCEPTED))
    }

    /// A file: NDJSON lines streamed back, each of the declared type, a type the scopes allow, and inside the grants.
    pub(super) fn export_file(
        &self,
        response: Response<Incoming>,
        declared: Option<String>,
    ) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::OK], false)?;
        let rules = LineRules {
            grants: self.access.grants.clone(),
            scopes: self.access.scopes.clone(),
            declared,
            origin: crate::policy::links::OriginFinder::new(&self.upstream),
            upstream: self.upstream.clone(),
            public: self.env.public.to_owned(),
        };
        let mut out =
            Response::new(ndjson_stream::filtered(response.into_body(), rules, self.upstream.idle_body_timeout));
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        Ok(out)
    }
}
