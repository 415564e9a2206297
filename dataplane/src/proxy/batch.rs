//! Batch and transaction Bundles, checked entry by entry.
//!
//! Every entry is treated as the request it describes: routed through the same route table (it must reach the same
//! upstream as the Bundle, on a proxied route), classified, scope-checked, and given the same checks as the direct
//! request: reads are verified after the fact, searches are narrowed with the tenant's tags and their results
//! filtered, creates get the tag rules (and a narrowed `ifNoneExist`), and updates and deletes first read and verify
//! the stored resource and are pinned to its version with `ifMatch`. What has no check (conditional writes,
//! operations, history, patches inside a Bundle) is refused.
//!
//! A transaction is all or nothing, and so is what it can reveal. Its reads and vreads are checked before anything
//! is sent (out of grant or missing: the whole transaction gets the same 404 a direct read would, whichever way the
//! upstream treats a missing read inside a transaction), and then pinned to the version checked (`_history/v`), so
//! the upstream only ever reads what the caller may see. One refused entry refuses the transaction whole, before
//! anything reaches the upstream; and an upstream that answers a transaction with a failed or unverifiable entry
//! inside a success gets a 502, never a half-successful transaction. In a batch, refused entries get their own
//! error response in place and the rest are forwarded; responses are verified the same way: resources outside the
//! grants become the same `404` entry as missing ones, nested search results are filtered, locations are made
//! public, and the upstream's per-entry diagnostics are dropped.

use bytes::Bytes;
use fhirgw_config::path::join_encoded;
use fhirgw_config::route::Action;
use fhirgw_config::tenant::Tag;
use http::header::HeaderMap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::access::Ctx;
use super::write::{json_body, stored_version, update_error};
use super::{ProxyError, json_response};
use crate::policy::batch::{self, Kind, entry_request, request_field};
use crate::policy::classify::{Interaction, classify};
use crate::policy::links::{rewrite_references, rewrite_url};
use crate::policy::query::{self, Use};
use crate::policy::scopes::Permission;
use crate::policy::verify::{Grants, filter_bundle, resource_visible, rewrite_full_url, rewrite_full_urls};
use crate::policy::write::{check_tags, dataset_systems, granted_tags};

/// Largest batch response the gateway verifies.
const RESPONSE_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Largest single resource read to check a transaction's read.
const RESOURCE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// What the gateway must check in an entry's response.
#[derive(Debug)]
enum Check {
    /// A read of `ty/id`: the resource must be visible, else the entry looks like a missing resource.
    Read { ty: String, id: String },
    /// A search: the nested searchset is filtered.
    Search,
    /// A write: a returned resource is kept only if visible.
    Write { ty: String },
}

/// One entry after the checks: forwarded (with the entry to send) or answered by the gateway.
enum Planned {
    Forward(Value, Check),
    Answer(Value),
}

fn status_line(status: StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or_default())
}

/// The response entry for an entry the gateway refused.
fn refused_entry(error: &ProxyError) -> Value {
    let outcome = error.outcome();
    json!({ "response": { "status": status_line(outcome.status), "outcome": outcome.body() } })
}

impl Ctx<'_> {
    pub(super) async fn batch(
        &self,
        request: Request<Incoming>,
        grants: &Grants,
        tags: &[&Tag],
    ) -> Result<Response<Body>, ProxyError> {
        let (_, body) = json_body(request, "Bundle").await?;
        let (kind, entries) = batch::parse(&body).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let mut plans = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match self.plan(kind, entry, grants, tags).await {
                Ok(plan) => plans.push(plan),
                Err(error) if kind == Kind::Transaction || !error.is_entry_level() => {
                    return Err(ProxyError::Entry { index, error: Box::new(error) });
                }
                Err(error) => plans.push(Planned::Answer(refused_entry(&error))),
            }
        }
        let forward: Vec<&Value> =
            plans.iter().filter_map(|p| if let Planned::Forward(e, _) = p { Some(e) } else { None }).collect();
        let mut answers = if forward.is_empty() {
            Vec::new()
        } else {
            let outbound = json!({ "resourceType": "Bundle", "type": body["type"], "entry": forward });
            self.forward_batch(kind, outbound).await?
        };
        if answers.len() != forward.len() {
            return Err(ProxyError::Unverifiable(format!(
                "{} response entries for {} request entries",
                answers.len(),
                forward.len()
            )));
        }
        let mut answers = answers.drain(..);
        let mut out = Vec::with_capacity(plans.len());
        for (index, plan) in plans.into_iter().enumerate() {
            out.push(match plan {
                Planned::Answer(entry) => entry,
                Planned::Forward(_, check) => {
                    let answer = answers.next().unwrap_or_default();
                    let (entry, ok) = self.verify_entry(answer, &check, grants);
                    if kind == Kind::Transaction && !ok {
                        return Err(ProxyError::Unverifiable(format!(
                            "entry {index} of a successful transaction failed or could not be verified"
                        )));
                    }
                    entry
                }
            });
        }
        let bundle = json!({ "resourceType": "Bundle", "type": kind.response_type(), "entry": out });
        Ok(json_response(StatusCode::OK, &bundle, &HeaderMap::new(), false))
    }

    /// The version of `ty/id` (or of its version `vid`) the caller may see: read and verified, else the one 404 of a
    /// missing resource.
    async fn visible_version(
        &self,
        ty: &str,
        id: &str,
        vid: Option<&str>,
        grants: &Grants,
    ) -> Result<String, ProxyError> {
        let mut segments = vec![ty.to_owned(), id.to_owned()];
        if let Some(vid) = vid {
            segments.extend(["_history".to_owned(), vid.to_owned()]);
        }
        let target = join_encoded(&self.upstream.base_path, &segments);
        let (status, _, body) = self.exchange(Method::GET, &target, None, RESOURCE_MAX_BYTES).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let resource: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::ResourceNotFound)?;
        if !resource_visible(&resource, ty, id, grants) {
            return Err(ProxyError::ResourceNotFound);
        }
        let version = resource.get("meta").and_then(|m| m.get("versionId")).and_then(Value::as_str);
        match (version, vid) {
            (Some(version), Some(vid)) if version != vid => Err(ProxyError::ResourceNotFound),
            (Some(version), _) if fhirgw_config::pattern::Class::Id.accepts(version) => Ok(version.to_owned()),
            _ => Err(ProxyError::Unverifiable("the resource has no versionId to pin the read to".into())),
        }
    }

    /// Checks one entry and prepares what is forwarded for it.
    async fn plan(&self, kind: Kind, entry: &Value, grants: &Grants, tags: &[&Tag]) -> Result<Planned, ProxyError> {
        let request = entry_request(entry, &self.public).map_err(ProxyError::BadRequest)?;
        let Some(matched) = self.table.route(&request.method, &request.path) else {
            let known = self.table.path_known(&request.path);
            return Err(if known { ProxyError::MethodNotAllowed } else { ProxyError::NotFound });
        };
        match &matched.route.action {
            Action::Proxy { upstream } if *upstream == self.upstream.name => {}
            Action::Deny { status, message } => {
                return Err(ProxyError::Denied {
                    route: matched.route.id.clone(),
                    status: *status,
                    message: message.clone(),
                });
            }
            _ => {
                return Err(ProxyError::Forbidden(
                    "This entry is not served by the same server as the Bundle; send it on its own.".into(),
                ));
            }
        }
        let guard = &matched.route.guard;
        let params = query::parse(request.query.as_deref());
        let mut entry = entry.clone();
        let set_url = |entry: &mut Value, url: String| entry["request"]["url"] = Value::String(url);
        match classify(&request.method, &request.path, request.query.is_some()) {
            Interaction::Read { ty, id } | Interaction::VRead { ty, id, .. } => {
                // A vread's path is `ty/id/_history/vid`.
                let vid = request.path.get(3).cloned();
                self.require(&ty, Permission::Read)?;
                query::check(Use::Read, &params, guard)?;
                if grants.is_empty() {
                    return Err(ProxyError::ResourceNotFound);
                }
                if kind == Kind::Transaction {
                    let version = self.visible_version(&ty, &id, vid.as_deref(), grants).await?;
                    let query = request.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default();
                    set_url(&mut entry, format!("{ty}/{id}/_history/{version}{query}"));
                }
                Ok(Planned::Forward(entry, Check::Read { ty, id }))
            }
            Interaction::SearchType { ty, post: false } => {
                self.require(&ty, Permission::Search)?;
                query::check(Use::Search, &params, guard)?;
                let narrowed = match query::narrow(&params, tags) {
                    Some(narrowed) if !grants.is_empty() => narrowed,
                    _ => {
                        let empty = json!({"resourceType": "Bundle", "type": "searchset", "total": 0});
                        return Ok(Planned::Answer(json!({"resource": empty, "response": {"status": "200 OK"}})));
                    }
                };
                set_url(&mut entry, format!("{ty}?{}", query::encode(&narrowed)));
                Ok(Planned::Forward(entry, Check::Search))
            }
            Interaction::Create { ty } => {
                self.require(&ty, Permission::Create)?;
                if grants.is_empty() {
                    return Err(ProxyError::Forbidden("Your tenant holds no dataset to write into.".into()));
                }
                let resource = entry_resource(&mut entry, &ty)?;
                let stamp: Vec<Tag> = if tags.len() == 1 { vec![tags[0].clone()] } else { Vec::new() };
                check_tags(resource, grants, &dataset_systems(self.snapshot), &stamp)?;
                self.checked_references(resource, grants, tags).await?;
                if let Some(condition) = request_field(&entry, "ifNoneExist").map(str::to_owned) {
                    let params = query::parse(Some(condition.trim_start_matches('?')));
                    query::check(Use::Search, &params, guard)?;
                    let narrowed = query::narrow(&params, tags).ok_or(ProxyError::ResourceNotFound)?;
                    entry["request"]["ifNoneExist"] = Value::String(query::encode(&narrowed));
                }
                if !params.is_empty() {
                    return Err(ProxyError::BadRequest("a create entry's url takes no parameters".into()));
                }
                Ok(Planned::Forward(entry, Check::Write { ty }))
            }
            Interaction::Update { ty, id } => {
                self.require(&ty, Permission::Update)?;
                if !params.is_empty() {
                    return Err(ProxyError::BadRequest("an update entry's url takes no parameters".into()));
                }
                if entry.get("resource").and_then(|r| r.get("id")).and_then(Value::as_str) != Some(id.as_str()) {
                    return Err(ProxyError::BadRequest(format!("the entry's resource id must be `{id}`")));
                }
                let (stored, version) = stored_version(self, &ty, &id, grants, request_field(&entry, "ifMatch"))
                    .await
                    .map_err(update_error)?;
                let keep = granted_tags(&stored, grants);
                let resource = entry_resource(&mut entry, &ty)?;
                check_tags(resource, grants, &dataset_systems(self.snapshot), &keep)?;
                self.checked_references(resource, grants, tags).await?;
                entry["request"]["ifMatch"] = Value::String(format!("W/\"{version}\""));
                Ok(Planned::Forward(entry, Check::Write { ty }))
            }
            Interaction::Delete { ty, id } => {
                self.require(&ty, Permission::Delete)?;
                if !params.is_empty() {
                    return Err(ProxyError::BadRequest("a delete entry's url takes no parameters".into()));
                }
                let (_, version) = stored_version(self, &ty, &id, grants, request_field(&entry, "ifMatch")).await?;
                entry["request"]["ifMatch"] = Value::String(format!("W/\"{version}\""));
                Ok(Planned::Forward(entry, Check::Write { ty }))
            }
            Interaction::Patch { .. } => Err(ProxyError::Forbidden(
                "Patches inside a Bundle are not supported through the gateway; send PATCH on its own.".into(),
            )),
            other => Err(ProxyError::Forbidden(format!(
                "{} is not supported inside a batch or transaction.",
                super::access::describe(&other)
            ))),
        }
    }

    async fn forward_batch(&self, kind: Kind, outbound: Value) -> Result<Vec<Value>, ProxyError> {
        let target = join_encoded(&self.upstream.base_path, &[]);
        let body = Some(("application/fhir+json", Bytes::from(outbound.to_string())));
        let (status, _, bytes) = self.exchange(Method::POST, &target, body, RESPONSE_MAX_BYTES).await?;
        match status {
            StatusCode::OK => {}
            // A transaction the upstream refused: its diagnostics are not relayed.
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => return Err(ProxyError::PreconditionFailed),
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ProxyError::ResourceNotFound),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                return Err(ProxyError::BadRequest(format!("the server refused the {kind:?}: an entry is invalid")));
            }
            other => return Err(ProxyError::UpstreamStatus(other)),
        }
        let response: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ProxyError::Unverifiable(format!("the batch response is not JSON: {e}")))?;
        if response.get("type").and_then(Value::as_str) != Some(kind.response_type()) {
            return Err(ProxyError::Unverifiable(format!(
                "the upstream did not answer with a {}",
                kind.response_type()
            )));
        }
        match response.get("entry") {
            Some(Value::Array(entries)) => Ok(entries.clone()),
            _ => Ok(Vec::new()),
        }
    }

    /// Verifies one response entry: only what the caller may see, with public URLs and no upstream diagnostics; and
    /// whether the entry succeeded as sent (a success status, and a read's resource visible).
    fn verify_entry(&self, mut answer: Value, check: &Check, grants: &Grants) -> (Value, bool) {
        let Some(obj) = answer.as_object_mut() else {
            return (json!({ "response": { "status": status_line(StatusCode::BAD_GATEWAY) } }), false);
        };
        let response = obj.get_mut("response").and_then(Value::as_object_mut);
        let mut status = String::from("502 Bad Gateway");
        if let Some(response) = response {
            response.remove("outcome");
            if let Some(Value::String(s)) = response.get("status") {
                status.clone_from(s);
            }
            let public_location = |l: &str| {
                if l.contains("://") {
                    rewrite_url(&self.upstream, &self.public, l)
                } else {
                    // Relative to the base, as FHIR allows: made absolute on the public base.
                    Some(format!("{}/{}", self.public, l.trim_start_matches('/')))
                }
            };
            match response.get("location").and_then(Value::as_str).map(public_location) {
                Some(Some(public)) => {
                    response.insert("location".into(), Value::String(public));
                }
                Some(None) => {
                    response.remove("location");
                }
                None => {}
            }
        }
        let visible = match (check, obj.get("resource")) {
            (_, None) => true,
            (Check::Read { ty, id }, Some(resource)) => resource_visible(resource, ty, id, grants),
            (Check::Write { ty }, Some(resource)) => {
                let id = resource.get("id").and_then(Value::as_str).unwrap_or_default();
                resource_visible(resource, ty, id, grants)
            }
            (Check::Search, Some(_)) => true,
        };
        if let (Check::Search, Some(bundle)) = (check, obj.get_mut("resource")) {
            if bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                let scopes = &self.caller.scopes;
                filter_bundle(bundle, grants, true, &|ty| {
                    scopes.allows(ty, Permission::Read) == crate::policy::scopes::Allowed::Tenant
                });
                rewrite_full_urls(bundle, &self.upstream.base_url, &self.public);
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
                Check::Read { .. } => {
                    return (json!({ "response": { "status": status_line(StatusCode::NOT_FOUND) } }), false);
                }
                _ => {
                    obj.remove("resource");
                }
            }
        }
        let code = status.get(..3).and_then(|c| c.parse::<u16>().ok()).and_then(|c| StatusCode::from_u16(c).ok());
        match code {
            Some(code) if code.is_success() => {
                rewrite_full_url(&mut answer, &self.upstream.base_url, &self.public);
                if let Some(resource) = answer.get_mut("resource") {
                    rewrite_references(resource, &self.upstream, &self.public);
                }
                answer["response"]["status"] = Value::String(status_line(code));
                (answer, true)
            }
            // A failed entry says only its status, in one canonical form: no resource, no upstream diagnostics.
            Some(code) => (json!({ "response": { "status": status_line(code) } }), false),
            None => (json!({ "response": { "status": status_line(StatusCode::BAD_GATEWAY) } }), false),
        }
    }
}

/// The entry's resource, which must be of type `ty`.
fn entry_resource<'a>(entry: &'a mut Value, ty: &str) -> Result<&'a mut Value, ProxyError> {
    let resource =
        entry.get_mut("resource").ok_or_else(|| ProxyError::BadRequest("the entry has no resource".into()))?;
    if resource.get("resourceType").and_then(Value::as_str) != Some(ty) {
        return Err(ProxyError::BadRequest(format!("the entry's resource must be a {ty}")));
    }
    Ok(resource)
}

use crate::body::Body;
