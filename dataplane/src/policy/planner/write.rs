//! Writes, checked on both sides: the stored resource is read and verified before an update, patch, delete or
//! `$meta-*` (out of grant or missing: the same 404; an update of an invisible id is refused, never turned into a
//! create), the new content carries only the caller's dataset tags (`policy::write`), every reference it writes
//! is visible to the caller (`policy::references`), and the write is pinned with `If-Match` to the version
//! checked. Conditional writes resolve their condition with a search narrowed to the tenant.

use std::collections::BTreeMap;

use http::Method;
use http::header::{self, HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::{Planned, Planner, Stop, version_of};
use crate::policy::compartment::Reach;
use crate::policy::fhirpath_patch;
use crate::policy::input::{RequestBody, Within};
use crate::policy::plan::{Call, Expect, Fact, Payload, Query, Step};
use crate::policy::query::{self, PAGE_PARAM, Use};
use crate::policy::references::{self, MAX_REFERENCES, Reference};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;
use crate::policy::verify::resource_visible;
use crate::policy::write::{check_json_patch, check_meta_change, check_tags, granted_tags};

pub(super) const FHIR_JSON: &str = "application/fhir+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// The references a write carries, classified: local ones to read, conditional ones narrowed.
#[derive(Default)]
struct Refs {
    local: Vec<(Query, String, String)>,
    narrowed: BTreeMap<String, String>,
}

impl Refs {
    fn queries(&self) -> impl Iterator<Item = Query> + '_ {
        self.local.iter().map(|(q, _, _)| q.clone())
    }
}

impl Planner<'_> {
    /// The JSON request body, which must be a `ty`.
    pub(super) fn resource_body(&self, ty: &str) -> Result<Value, Stop> {
        let input = self.input;
        if !matches!(input.media.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir") {
            return Err(Refusal::UnsupportedMedia(input.media.clone()).into());
        }
        let value = match &input.body {
            RequestBody::Json(value) => value,
            RequestBody::Invalid(reason) => return Err(Refusal::bad_request(reason.clone()).into()),
            _ if input.within != Within::Request => {
                return Err(Refusal::bad_request("the entry has no resource").into());
            }
            _ => return Err(Refusal::bad_request("the body must be JSON").into()),
        };
        if value.get("resourceType").and_then(Value::as_str) != Some(ty) {
            let what = if input.within == Within::Request { "body" } else { "entry's resource" };
            return Err(Refusal::bad_request(format!("the {what} must be a {ty}")).into());
        }
        Ok(value.clone())
    }

    /// A batch entry's write takes no parameters in its URL (a direct write's query is not sent on).
    fn no_entry_params(&self, what: &str) -> Result<(), Stop> {
        if self.input.within != Within::Request && !self.input.params.is_empty() {
            return Err(Refusal::bad_request(format!("a {what} entry's url takes no parameters")).into());
        }
        Ok(())
    }

    /// The stored `ty/id`, read and verified (else the one 404), with its version, which a client `If-Match` must
    /// name. `also` are facts to read in the same round (the references the write carries).
    fn stored(&self, ty: &str, id: &str, also: impl IntoIterator<Item = Query>) -> Result<(Value, String), Stop> {
        if self.access.grants.is_empty() {
            return Err(Refusal::NotFound.into());
        }
        self.need(std::iter::once(Query::resource(ty, id)).chain(also))?;
        let stored = self.visible(ty, id, None, &Reach::Tenant)?.clone();
        let version = version_of(&stored)
            .ok_or_else(|| Refusal::UpstreamUnusable("the stored resource has no versionId to write against".into()))?
            .to_owned();
        if let Some(wanted) = &self.input.if_match
            && etag_version(wanted) != version
        {
            return Err(Refusal::PreconditionFailed.into());
        }
        Ok((stored, version))
    }

    pub(super) fn create(&self, ty: &str) -> Planned {
        self.require(ty, Permission::Create)?;
        if self.access.grants.is_empty() {
            return Err(Refusal::forbidden("Your tenant holds no dataset to write into.").into());
        }
        self.no_entry_params("create")?;
        let mut resource = self.resource_body(ty)?;
        let stamp = if self.access.tags.len() == 1 { self.access.tags.clone() } else { Vec::new() };
        check_tags(&mut resource, &self.access.grants, &self.env.dataset_systems(), &stamp).map_err(Refusal::from)?;
        let refs = self.resource_refs(&resource)?;
        self.need(refs.queries())?;
        self.check_refs(&refs)?;
        apply_narrowed(&refs, &mut resource);
        let mut headers = Vec::new();
        if let Some(condition) = &self.input.if_none_exist {
            // The match must only ever find the tenant's own resources, like any search.
            let params = query::parse(Some(condition.trim_start_matches('?')));
            query::check(Use::Search, &params, self.env.guard).map_err(Refusal::from)?;
            let narrowed = query::narrow(&params, &self.access.tag_refs()).ok_or(Refusal::NotFound)?;
            let value = HeaderValue::try_from(query::encode(&narrowed))
                .map_err(|_| Refusal::bad_request("bad If-None-Exist"))?;
            headers.push((HeaderName::from_static("if-none-exist"), value));
        }
        Ok(Step::Send(Call {
            method: Method::POST,
            target: self.target(&[ty.to_owned()], &[]),
            body: Some(Payload::Json { content_type: FHIR_JSON, value: resource }),
            headers,
            expect: Expect::Written { ty: ty.to_owned() },
        }))
    }

    /// `conditional`: the id comes from a resolved condition, and the body may leave it out.
    pub(super) fn update(&self, ty: &str, id: &str, conditional: bool) -> Planned {
        self.require(ty, Permission::Update)?;
        self.no_entry_params("update")?;
        let mut resource = self.resource_body(ty)?;
        if conditional
            && resource.get("id").is_none()
            && let Some(obj) = resource.as_object_mut()
        {
            obj.insert("id".into(), Value::String(id.to_owned()));
        }
        if resource.get("id").and_then(Value::as_str) != Some(id) {
            let what = if self.input.within == Within::Request { "body's" } else { "entry's resource" };
            return Err(Refusal::bad_request(format!("the {what} id must be `{id}`")).into());
        }
        let refs = self.resource_refs(&resource)?;
        let (stored, version) = self.stored(ty, id, refs.queries()).map_err(update_as_create)?;
        let keep = granted_tags(&stored, &self.access.grants);
        check_tags(&mut resource, &self.access.grants, &self.env.dataset_systems(), &keep).map_err(Refusal::from)?;
        self.check_refs(&refs)?;
        apply_narrowed(&refs, &mut resource);
        Ok(Step::Send(Call {
            method: Method::PUT,
            target: self.target(&[ty.to_owned(), id.to_owned()], &[]),
            body: Some(Payload::Json { content_type: FHIR_JSON, value: resource }),
            headers: vec![if_match(&version)?],
            expect: Expect::Written { ty: ty.to_owned() },
        }))
    }

    /// JSON Patch or FHIRPath Patch: the same rule for both (never `meta`, `id` or `resourceType`).
    pub(super) fn patch(&self, ty: &str, id: &str) -> Planned {
        if self.input.within != Within::Request {
            return Err(Refusal::forbidden(
                "Patches inside a Bundle are not supported through the gateway; send PATCH on its own.",
            )
            .into());
        }
        self.require(ty, Permission::Update)?;
        let content_type = match self.input.media.as_str() {
            JSON_PATCH => JSON_PATCH,
            "application/fhir+json" | "application/json+fhir" => FHIR_JSON,
            other => return Err(Refusal::UnsupportedMedia(other.to_owned()).into()),
        };
        let patch = match &self.input.body {
            RequestBody::Json(value) => value.clone(),
            RequestBody::Invalid(reason) => return Err(Refusal::bad_request(reason.clone()).into()),
            _ => return Err(Refusal::bad_request("the patch must be JSON").into()),
        };
        let found = if content_type == JSON_PATCH {
            check_json_patch(&patch).map_err(Refusal::from)?;
            references::in_json_patch(&patch)
        } else {
            fhirpath_patch::check(&patch, ty).map_err(Refusal::from)?;
            references::in_fhirpath_patch(&patch)
        };
        let refs = self.refs(&found, false)?;
        let (_, version) = self.stored(ty, id, refs.queries())?;
        self.check_refs(&refs)?;
        Ok(Step::Send(Call {
            method: Method::PATCH,
            target: self.target(&[ty.to_owned(), id.to_owned()], &[]),
            body: Some(Payload::Json { content_type, value: patch }),
            headers: vec![if_match(&version)?],
            expect: Expect::Written { ty: ty.to_owned() },
        }))
    }

    pub(super) fn delete(&self, ty: &str, id: &str) -> Planned {
        self.require(ty, Permission::Delete)?;
        self.no_entry_params("delete")?;
        let (_, version) = self.stored(ty, id, [])?;
        Ok(Step::Send(Call {
            method: Method::DELETE,
            target: self.target(&[ty.to_owned(), id.to_owned()], &[]),
            body: None,
            headers: vec![if_match(&version)?],
            expect: Expect::Written { ty: ty.to_owned() },
        }))
    }

    /// A conditional update, patch or delete (`PUT Patient?identifier=…`): the condition is searched narrowed to
    /// the tenant like any search, and only the caller's own matches count. One match: the ordinary checked write on
    /// it. None: an update becomes a create (tag rules apply), a patch or delete finds nothing. Several: 412.
    pub(super) fn conditional(&self, ty: &str, method: &Method) -> Planned {
        if self.input.within != Within::Request {
            return Err(
                Refusal::forbidden("A conditional write is not supported inside a batch or transaction.").into()
            );
        }
        let permission = if *method == Method::DELETE { Permission::Delete } else { Permission::Update };
        self.require(ty, permission)?;
        let params = &self.input.params;
        query::check(Use::Search, params, self.env.guard).map_err(Refusal::from)?;
        if params.iter().any(|(name, _)| matches!(name.as_str(), "_count" | "_sort" | PAGE_PARAM)) {
            return Err(Refusal::bad_request("a condition takes search criteria only").into());
        }
        let matches = self.matching(ty, params)?;
        match (matches.as_slice(), method) {
            ([], &Method::PUT) => self.create(ty),
            ([], _) => Err(Refusal::NotFound.into()),
            ([id], &Method::PUT) => self.update(ty, id, true),
            ([id], &Method::PATCH) => self.patch(ty, id),
            ([id], &Method::DELETE) => self.delete(ty, id),
            ([_], _) => Err(Refusal::MethodNotAllowed.into()),
            _ => Err(Refusal::MultipleMatches.into()),
        }
    }

    /// Ids of the caller's resources of type `ty` matching `params` (at most two: enough to tell one from several).
    fn matching(&self, ty: &str, params: &[(String, String)]) -> Result<Vec<String>, Stop> {
        let Some(mut narrowed) = query::narrow(params, &self.access.tag_refs()) else { return Ok(Vec::new()) };
        if self.access.grants.is_empty() {
            return Ok(Vec::new());
        }
        narrowed.push(("_count".into(), "2".into()));
        let query = Query::Search { ty: ty.to_owned(), params: narrowed };
        self.need([query.clone()])?;
        let Some(Fact::Bundle(bundle)) = self.facts.get(&query) else {
            return Err(Refusal::UpstreamUnusable("the condition's search gave no Bundle".into()).into());
        };
        let more = bundle
            .get("link")
            .and_then(Value::as_array)
            .is_some_and(|links| links.iter().any(|l| l.get("relation").and_then(Value::as_str) == Some("next")));
        let mut ids: Vec<String> = bundle
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| {
                e.get("search").and_then(|s| s.get("mode")).and_then(Value::as_str).is_none_or(|m| m == "match")
            })
            .filter_map(|e| e.get("resource"))
            .filter_map(|r| {
                let id = r.get("id").and_then(Value::as_str)?;
                resource_visible(r, ty, id, &self.access.grants).then(|| id.to_owned())
            })
            .collect();
        if more && ids.len() == 1 {
            // More pages of matches: several, whatever this page showed.
            ids.push(String::new());
        }
        Ok(ids)
    }

    /// `$meta-add` / `$meta-delete` on `ty/id`: the stored resource is verified first, the tags named are checked
    /// (`check_meta_change`), and only the `meta` parameter is sent.
    pub(super) fn meta_change(&self, ty: &str, id: &str, operation: &str) -> Planned {
        self.require(ty, Permission::Update)?;
        let parameters = self.resource_body("Parameters")?;
        let metas: Vec<&Value> = parameters
            .get("parameter")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter(|p| p.get("name").and_then(Value::as_str) == Some("meta")).collect())
            .unwrap_or_default();
        let [meta] = metas.as_slice() else {
            return Err(Refusal::bad_request(format!("{operation} takes exactly one `meta` parameter")).into());
        };
        let value_meta = meta
            .get("valueMeta")
            .filter(|m| m.is_object())
            .ok_or_else(|| Refusal::bad_request("the `meta` parameter needs a valueMeta"))?;
        let tags = match value_meta.get("tag") {
            None => Vec::new(),
            Some(Value::Array(tags)) => tags.clone(),
            Some(_) => return Err(Refusal::bad_request("valueMeta.tag must be a list").into()),
        };
        let (stored, version) = self.stored(ty, id, [])?;
        let add = operation == "$meta-add";
        check_meta_change(&stored, &tags, add, &self.access.grants, &self.env.dataset_systems())
            .map_err(Refusal::from)?;
        let body = json!({ "resourceType": "Parameters", "parameter": [{ "name": "meta", "valueMeta": value_meta }] });
        Ok(Step::Send(Call {
            method: Method::POST,
            target: self.target(&[ty.to_owned(), id.to_owned(), operation.to_owned()], &[]),
            body: Some(Payload::Json { content_type: FHIR_JSON, value: body }),
            headers: vec![if_match(&version)?],
            expect: Expect::MetaParameters { operation: operation.to_owned() },
        }))
    }

    /// The references a resource carries, classified.
    fn resource_refs(&self, resource: &Value) -> Result<Refs, Stop> {
        let mut found = Vec::new();
        references::collect(resource, &mut String::new(), &mut found);
        self.refs(&found, true)
    }

    /// Classifies `found` (location, reference): local references to read, conditional ones narrowed to the
    /// tenant (refused where the narrowed form cannot be put back: `conditional_allowed` false).
    fn refs(&self, found: &[(String, &str)], conditional_allowed: bool) -> Result<Refs, Stop> {
        let public = self.env.public;
        let bases = [public, self.env.upstream.base_url.as_str()];
        let mut refs = Refs::default();
        let tags = self.access.tag_refs();
        for (path, reference) in found {
            let Some(classified) = references::classify(reference, &bases) else { continue };
            match classified {
                Reference::Local { ty, id, version } => {
                    let query = Query::Resource { ty, id, vid: version };
                    if !refs.local.iter().any(|(q, _, _)| *q == query) {
                        refs.local.push((query, path.clone(), (*reference).to_owned()));
                    }
                }
                Reference::Conditional { ty, params } => {
                    if !conditional_allowed {
                        return Err(Refusal::bad_request(format!(
                            "{path}: conditional references are not supported here; resolve `{reference}` first"
                        ))
                        .into());
                    }
                    if params.is_empty() {
                        return Err(Refusal::bad_request(format!("{path}: `{reference}` has no criteria")).into());
                    }
                    query::check(Use::Search, &params, self.env.guard).map_err(Refusal::from)?;
                    let within = query::narrow(&params, &tags).ok_or_else(|| dangling(path, reference))?;
                    refs.narrowed.insert((*reference).to_owned(), format!("{ty}?{}", query::encode(&within)));
                }
            }
            if refs.local.len() + refs.narrowed.len() > MAX_REFERENCES {
                return Err(Refusal::bad_request(format!(
                    "more than {MAX_REFERENCES} distinct references in one request"
                ))
                .into());
            }
        }
        Ok(refs)
    }

    /// Every local reference must be visible to the caller (facts read): another tenant's and a missing one get one
    /// answer.
    fn check_refs(&self, refs: &Refs) -> Result<(), Stop> {
        self.need(refs.queries())?;
        for (query, path, reference) in &refs.local {
            let Query::Resource { ty, id, vid } = query else { continue };
            let visible = self.facts.resource(query).flatten().is_some_and(|resource| {
                resource_visible(resource, ty, id, &self.access.grants)
                    && vid.as_deref().is_none_or(|v| version_of(resource) == Some(v))
            });
            if !visible || self.access.grants.is_empty() {
                return Err(dangling(path, reference).into());
            }
        }
        Ok(())
    }
}

fn apply_narrowed(refs: &Refs, value: &mut Value) {
    if !refs.narrowed.is_empty() {
        references::rewrite(value, &|r| refs.narrowed.get(r).cloned());
    }
}

fn dangling(path: &str, reference: &str) -> Refusal {
    Refusal::Reference { path: path.to_owned(), reference: reference.to_owned() }
}

/// An update of a resource the caller cannot see is an update-as-create: refused, with one answer for a free id
/// and another tenant's.
fn update_as_create(stop: Stop) -> Stop {
    match stop {
        Stop::Refuse(Refusal::NotFound) => Stop::Refuse(Refusal::UpdateAsCreate),
        other => other,
    }
}

/// `If-Match` on the version the gateway checked.
pub(super) fn if_match(version: &str) -> Result<(HeaderName, HeaderValue), Stop> {
    let value = HeaderValue::try_from(format!("W/\"{version}\""))
        .map_err(|_| Refusal::UpstreamUnusable("the stored versionId is not a valid header value".into()))?;
    Ok((header::IF_MATCH, value))
}

/// `W/"3"`, `"3"` or `3` → `3`.
pub(super) fn etag_version(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/").trim_matches('"')
}
