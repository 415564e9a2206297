//! The upstream's answers, verified as each plan expects before anything reaches the client: one resource (passed
//! as the upstream's bytes when a light view proves it is exactly the requested, granted resource with nothing to
//! rewrite), a streamed Bundle, a write's result, `$meta-*` Parameters, a batch or transaction response entry by
//! entry, the CapabilityStatement; and the gateway's own answers.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::execute::{Exec, RESOURCE_MAX_BYTES, buffer, expect_status};
use super::{ProxyError, bundle_stream, json_response, validators};
use crate::body::Body;
use crate::policy::compartment::Reach;
use crate::policy::links::{rewrite_references, rewrite_url};
use crate::policy::plan::{Answer, BatchExpect, BundleExpect, EntryCheck, EntryExpect};
use crate::policy::planner::status_line;
use crate::policy::raw;
use crate::policy::refusal::Refusal;
use crate::policy::scopes::{Allowed, Permission};
use crate::policy::verify::{filter_bundle, resource_visible, rewrite_full_url, rewrite_full_urls};

/// Largest batch or transaction response the gateway verifies.
const BATCH_MAX_BYTES: usize = 64 * 1024 * 1024;

/// An answer the gateway gives without the upstream.
pub(super) fn local(answer: Answer) -> Response<Body> {
    match answer {
        Answer::EmptyBundle { kind, self_url, head } => {
            let bundle = json!({
                "resourceType": "Bundle",
                "type": kind,
                "total": 0,
                "link": [{ "relation": "self", "url": self_url }],
            });
            json_response(StatusCode::OK, &bundle, &HeaderMap::new(), head)
        }
        Answer::Batch { kind, entries } => {
            let bundle = json!({ "resourceType": "Bundle", "type": kind, "entry": entries });
            json_response(StatusCode::OK, &bundle, &HeaderMap::new(), false)
        }
    }
}

impl Exec<'_> {
    /// One resource `ty/id`: inside the grants and within `reach`, or the one 404.
    pub(super) async fn resource(
        &self,
        response: Response<Incoming>,
        ty: &str,
        id: &str,
        reach: &Reach,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::OK], false)?;
        let keep = validators(response.headers());
        let body = buffer(response, RESOURCE_MAX_BYTES).await?;
        let grants = &self.access.grants;
        if *reach == Reach::Tenant && self.passes_verbatim(&body, ty, id) {
            if self.trail.wants_patients(ty) {
                self.trail.answered(ty, id, serde_json::from_slice::<Value>(&body).ok().as_ref(), true);
            }
            return Ok(super::bytes_response_with(StatusCode::OK, body, keep, head));
        }
        let mut value: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::from(Refusal::NotFound))?;
        let shown = resource_visible(&value, ty, id, grants) && reach.admits(&value);
        if !shown || self.trail.wants_patients(ty) {
            self.trail.answered(ty, id, Some(&value), shown);
        }
        if !shown {
            return Err(Refusal::NotFound.into());
        }
        rewrite_references(&mut value, &self.upstream, self.env.public);
        Ok(json_response(StatusCode::OK, &value, &keep, head))
    }

    /// The fast path of a read: the body is exactly `ty/id`, inside the grants, and names the upstream's origin
    /// nowhere, so the upstream's bytes can go to the client as they are (validated JSON, nothing to rewrite).
    fn passes_verbatim(&self, body: &[u8], ty: &str, id: &str) -> bool {
        let Some(view) = raw::resource_view(body) else { return false };
        view.resource_type == Some(ty)
            && view.id == Some(id)
            && view.covered_by(&self.access.grants)
            && !crate::policy::links::mentions_origin(body, &self.upstream)
    }

    /// A Bundle, streamed back with every entry verified against the grants and the scopes.
    pub(super) fn bundle(
        &self,
        response: Response<Incoming>,
        expect: BundleExpect,
    ) -> Result<Response<Body>, ProxyError> {
        // The status is known before anything is sent to the client.
        expect_status(response.status(), &[StatusCode::OK], false)?;
        let mut out = if expect.head {
            Response::new(crate::body::empty())
        } else {
            let rules = bundle_stream::Rules::new(self, expect);
            Response::new(bundle_stream::filtered(response.into_body(), rules, self.upstream.idle_body_timeout))
        };
        // A filtered Bundle is not the upstream's representation: no ETag, Last-Modified or Content-Length.
        out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::outcome::FHIR_JSON));
        Ok(out)
    }

    /// A write's answer: only a resource the caller may see is returned; anything else (an outcome with upstream
    /// diagnostics, another resource) is reduced to the status and headers. Locations are made public.
    pub(super) async fn written(&self, response: Response<Incoming>, ty: &str) -> Result<Response<Body>, ProxyError> {
        let status = response.status();
        let keep = self.write_headers(&response)?;
        let body = buffer(response, RESOURCE_MAX_BYTES).await?;
        let visible = serde_json::from_slice::<Value>(&body).ok().filter(|v| {
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            resource_visible(v, ty, &id, &self.access.grants)
        });
        let mut out = match visible {
            Some(mut value) => {
                rewrite_references(&mut value, &self.upstream, self.env.public);
                json_response(status, &value, &keep, false)
            }
            None => {
                let mut r = Response::new(crate::body::empty());
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

    /// A raw Binary upload's answer: the status, validators and public locations; any body (the content again, as
    /// base64 JSON) is left unread.
    pub(super) fn uploaded(&self, response: Response<Incoming>) -> Result<Response<Body>, ProxyError> {
        let keep = self.write_headers(&response)?;
        let mut out = Response::new(crate::body::empty());
        *out.status_mut() =
            if response.status() == StatusCode::OK { StatusCode::NO_CONTENT } else { response.status() };
        *out.headers_mut() = keep;
        Ok(out)
    }

    /// A write's status checked, and the headers of its answer the client gets: validators, and `Location` /
    /// `Content-Location` made public (dropped when they lead elsewhere).
    fn write_headers(&self, response: &Response<Incoming>) -> Result<HeaderMap, ProxyError> {
        expect_status(response.status(), &[StatusCode::OK, StatusCode::CREATED, StatusCode::NO_CONTENT], true)?;
        let mut keep = validators(response.headers());
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(url) = response.headers().get(&name).and_then(|v| v.to_str().ok())
                && let Some(public) = rewrite_url(&self.upstream, self.env.public, url)
                && let Ok(value) = HeaderValue::try_from(public)
            {
                keep.insert(name, value);
            }
        }
        Ok(keep)
    }

    /// `$meta-add` / `$meta-delete`: the resource's new `meta`, passed on only as a Parameters resource.
    pub(super) async fn meta_parameters(
        &self,
        response: Response<Incoming>,
        operation: &str,
    ) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::OK], true)?;
        let body = buffer(response, RESOURCE_MAX_BYTES).await?;
        let answer: Value = serde_json::from_slice(&body)
            .ok()
            .filter(|v: &Value| v.get("resourceType").and_then(Value::as_str) == Some("Parameters"))
            .ok_or_else(|| ProxyError::Unverifiable(format!("{operation} did not answer with Parameters")))?;
        Ok(json_response(StatusCode::OK, &answer, &HeaderMap::new(), false))
    }

    /// A batch or transaction response: each forwarded entry's answer checked as its plan says, the gateway's own
    /// answers in place. A transaction answered with a failed or unverifiable entry inside a success is refused.
    pub(super) async fn batch(
        &self,
        response: Response<Incoming>,
        expect: BatchExpect,
    ) -> Result<Response<Body>, ProxyError> {
        let kind = if expect.transaction { "transaction" } else { "batch" };
        let response_type = format!("{kind}-response");
        match response.status() {
            // A transaction the upstream refused: its diagnostics are not relayed.
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                return Err(Refusal::bad_request(format!("the server refused the {kind}: an entry is invalid")).into());
            }
            status => expect_status(status, &[StatusCode::OK], true)?,
        }
        let body = buffer(response, BATCH_MAX_BYTES).await?;
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| ProxyError::Unverifiable(format!("the batch response is not JSON: {e}")))?;
        if answer.get("type").and_then(Value::as_str) != Some(response_type.as_str()) {
            return Err(ProxyError::Unverifiable(format!("the upstream did not answer with a {response_type}")));
        }
        let mut answers = match answer.get("entry") {
            Some(Value::Array(entries)) => entries.clone(),
            _ => Vec::new(),
        }
        .into_iter();
        let forwarded = expect.entries.iter().filter(|e| matches!(e, EntryExpect::Forwarded(_))).count();
        if answers.len() != forwarded {
            return Err(ProxyError::Unverifiable(format!(
                "{} response entries for {forwarded} request entries",
                answers.len()
            )));
        }
        let mut out = Vec::with_capacity(expect.entries.len());
        let mut hidden = Vec::new();
        for (index, entry) in expect.entries.into_iter().enumerate() {
            out.push(match entry {
                EntryExpect::Answered(value) => value,
                EntryExpect::Forwarded(check) => {
                    let (value, ok, was_hidden) = self.verify_entry(answers.next().unwrap_or_default(), &check);
                    if let (true, EntryCheck::Read { ty, id }) = (was_hidden, &check) {
                        hidden.push((ty.clone(), id.clone()));
                    }
                    if expect.transaction && !ok {
                        return Err(ProxyError::Unverifiable(format!(
                            "entry {index} of a successful transaction failed or could not be verified"
                        )));
                    }
                    value
                }
            });
        }
        self.trail.entries(&out, &hidden);
        let bundle = json!({ "resourceType": "Bundle", "type": response_type, "entry": out });
        Ok(json_response(StatusCode::OK, &bundle, &HeaderMap::new(), false))
    }

    /// One response entry: only what the caller may see, with public URLs and no upstream diagnostics; whether
    /// the entry succeeded as sent (a success status, and a read's resource visible); and whether a read found a
    /// resource it then hid (for the audit trail: hidden and missing look alike to the client only).
    fn verify_entry(&self, mut answer: Value, check: &EntryCheck) -> (Value, bool, bool) {
        let grants = &self.access.grants;
        let public = self.env.public;
        let Some(obj) = answer.as_object_mut() else {
            return (json!({ "response": { "status": status_line(StatusCode::BAD_GATEWAY) } }), false, false);
        };
        let mut status = String::from("502 Bad Gateway");
        if let Some(response) = obj.get_mut("response").and_then(Value::as_object_mut) {
            response.remove("outcome");
            if let Some(Value::String(s)) = response.get("status") {
                status.clone_from(s);
            }
            let public_location = |l: &str| {
                if l.contains("://") {
                    rewrite_url(&self.upstream, public, l)
                } else {
                    // Relative to the base, as FHIR allows: made absolute on the public base.
                    Some(format!("{public}/{}", l.trim_start_matches('/')))
                }
            };
            match response.get("location").and_then(Value::as_str).map(public_location) {
                Some(Some(location)) => {
                    response.insert("location".into(), Value::String(location));
                }
                Some(None) => {
                    response.remove("location");
                }
                None => {}
            }
        }
        let visible = match (check, obj.get("resource")) {
            (_, None) => true,
            (EntryCheck::Read { ty, id }, Some(resource)) => resource_visible(resource, ty, id, grants),
            (EntryCheck::Write { ty }, Some(resource)) => {
                let id = resource.get("id").and_then(Value::as_str).unwrap_or_default();
                resource_visible(resource, ty, id, grants)
            }
            (EntryCheck::Search, Some(_)) => true,
        };
        if let (EntryCheck::Search, Some(bundle)) = (check, obj.get_mut("resource")) {
            if bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                let scopes = &self.access.scopes;
                filter_bundle(bundle, grants, true, &|ty| scopes.allows(ty, Permission::Read) == Allowed::Tenant);
                rewrite_full_urls(bundle, &self.upstream.base_url, public);
                // Paging inside a batch is not offered: the page links would have to be signed per entry.
                if let Some(b) = bundle.as_object_mut() {
                    b.remove("link");
                }
            } else {
                obj.remove("resource");
            }
        }
        if !visible {
            match check {
                // Out of grant looks exactly like missing.
                EntryCheck::Read { .. } => {
                    return (json!({ "response": { "status": status_line(StatusCode::NOT_FOUND) } }), false, true);
                }
                _ => {
                    obj.remove("resource");
                }
            }
        }
        let code = status.get(..3).and_then(|c| c.parse::<u16>().ok()).and_then(|c| StatusCode::from_u16(c).ok());
        match code {
            Some(code) if code.is_success() => {
                rewrite_full_url(&mut answer, &self.upstream.base_url, public);
                if let Some(resource) = answer.get_mut("resource") {
                    rewrite_references(resource, &self.upstream, public);
                }
                answer["response"]["status"] = Value::String(status_line(code));
                (answer, true, false)
            }
            // A failed entry says only its status, in one canonical form: no resource, no upstream diagnostics.
            Some(code) => (json!({ "response": { "status": status_line(code) } }), false, false),
            None => (json!({ "response": { "status": status_line(StatusCode::BAD_GATEWAY) } }), false, false),
        }
    }

    /// A Binary's raw content at the version the plan checked: the upstream's bytes, streamed through unchanged
    /// (with its media type, length and validators), memory flat.
    pub(super) fn binary_content(
        &self,
        response: Response<Incoming>,
        head: bool,
    ) -> Result<Response<Body>, ProxyError> {
        expect_status(response.status(), &[StatusCode::OK], false)?;
        let mut keep = validators(response.headers());
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            if let Some(value) = response.headers().get(&name) {
                keep.insert(name, value.clone());
            }
        }
        let body = if head {
            crate::body::empty()
        } else {
            super::filtered_body::passthrough(response.into_body(), self.upstream.idle_body_timeout, "Binary")
        };
        let mut out = Response::new(body);
        *out.headers_mut() = keep;
        Ok(out)
    }

    /// The upstream's CapabilityStatement, rewritten for the gateway (see `discovery`), serialised.
    pub(super) async fn capabilities(&self, response: Response<Incoming>) -> Result<Bytes, ProxyError> {
        if response.status() != StatusCode::OK {
            return Err(ProxyError::UpstreamStatus(response.status()));
        }
        let body = buffer(response, RESOURCE_MAX_BYTES).await?;
        let cs: Value =
            serde_json::from_slice(&body).map_err(|e| ProxyError::Unverifiable(format!("CapabilityStatement: {e}")))?;
        if cs.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
            return Err(ProxyError::Unverifiable("metadata is not a CapabilityStatement".into()));
        }
        let rewritten = super::discovery::capability_statement(cs, self.env.snapshot, self.env.table, self.env.public);
        Ok(Bytes::from(rewritten.to_string()))
    }
}
