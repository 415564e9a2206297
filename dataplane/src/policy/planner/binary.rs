//! Binary content (a PDF, an image, a DICOM file: how attachments reach clients) cannot be tag-checked from its
//! bytes. So a read of `Binary/[id]` asking for a non-FHIR type is checked as the Binary's metadata first (read as
//! FHIR without its content: tags, version, `securityContext`), exactly like any read (out of grant and missing:
//! the same 404); its security context, when it names a resource on this server, must be visible too. Then the raw
//! content is fetched at the version checked (`_history/v`), so what streams back is the content of the Binary that
//! was checked, at wire speed and in flat memory.
//!
//! A create or update of `Binary` with a non-FHIR body uploads raw content the same way in reverse: the gateway
//! never reads it. It sends the upstream a Binary resource it built and checked itself (its `contentType`, its
//! security context, its dataset tags, its id) with the client's bytes streamed into `data` as base64. The dataset
//! is the one of the resource named by `X-Security-Context` (which must be visible to the caller), else the stored
//! Binary's (an update), else the tenant's only dataset; with none of these the upload is refused.

use http::Method;
use http::header::{self, HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::write::{etag_version, if_match};
use super::{Planned, Planner, Stop, version_of};
use crate::policy::input::RequestBody;
use crate::policy::plan::{Call, Expect, Payload, Query, Step};
use crate::policy::query::{self, Use};
use crate::policy::references::{self, Reference};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;
use crate::policy::verify::resource_visible;
use crate::policy::write::{check_tags, granted_tags};

/// Longest `Content-Type` kept as a Binary's `contentType`.
const MAX_CONTENT_TYPE: usize = 256;

impl Planner<'_> {
    /// `GET Binary/[id]` (or a version) with a non-FHIR `Accept`: the metadata checked, the content streamed.
    pub(super) fn binary_content(&self, id: &str, vid: Option<&str>) -> Planned {
        self.require_read("Binary", Permission::Read)?;
        query::check(Use::Read, &self.input.params, self.env.guard).map_err(Refusal::from)?;
        if !self.input.params.is_empty() {
            return Err(Refusal::bad_request("a Binary's content is read without parameters").into());
        }
        if self.access.grants.is_empty() {
            return Err(Refusal::NotFound.into());
        }
        let meta = Query::BinaryMeta { id: id.to_owned(), vid: vid.map(str::to_owned) };
        self.need([meta.clone()])?;
        let binary = self.facts.resource(&meta).flatten().ok_or(Refusal::NotFound)?;
        let version_matches = vid.is_none_or(|v| version_of(binary) == Some(v));
        if !resource_visible(binary, "Binary", id, &self.access.grants) || !version_matches {
            return Err(Refusal::NotFound.into());
        }
        // The resource whose access rules apply to this Binary must be visible to the caller as well.
        let context = binary.get("securityContext").and_then(|c| c.get("reference")).and_then(Value::as_str);
        if let Some(context) = context {
            let bases = [self.env.public, self.env.upstream.base_url.as_str()];
            match references::classify(context, &bases) {
                Some(Reference::Local { ty, id: context_id, version }) => {
                    let query = Query::Resource { ty: ty.clone(), id: context_id.clone(), vid: version.clone() };
                    self.need([query.clone()])?;
                    let visible = self.facts.resource(&query).flatten().is_some_and(|r| {
                        resource_visible(r, &ty, &context_id, &self.access.grants)
                            && version.as_deref().is_none_or(|v| version_of(r) == Some(v))
                    });
                    if !visible {
                        return Err(Refusal::NotFound.into());
                    }
                }
                // A context elsewhere, conditional or contained: the gateway cannot check it, so it does not pass.
                _ => return Err(Refusal::NotFound.into()),
            }
        }
        let version = version_of(binary)
            .filter(|v| fhirgw_config::pattern::Class::Id.accepts(v))
            .ok_or_else(|| Refusal::UpstreamUnusable("the Binary has no version to read its content at".into()))?;
        let segments = ["Binary".to_owned(), id.to_owned(), "_history".to_owned(), version.to_owned()];
        let mut call = Call::get(self.target(&segments, &[]), Expect::BinaryContent { head: self.input.head });
        if let Some(accept) = self.input.raw_accept.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
            call.headers.push((header::ACCEPT, accept));
        }
        Ok(Step::Send(call))
    }
}

impl Planner<'_> {
    /// `POST Binary` (`id` none) or `PUT Binary/[id]` with raw content: a Binary built and checked here, its
    /// `data` streamed from the client's body.
    pub(super) fn binary_upload(&self, ty: &str, id: Option<&str>) -> Planned {
        let RequestBody::Upload { content_type, .. } = &self.input.body else {
            return Err(Refusal::UnsupportedMedia(self.input.media.clone()).into());
        };
        if ty != "Binary" {
            return Err(Refusal::UnsupportedMedia(self.input.media.clone()).into());
        }
        self.require("Binary", if id.is_some() { Permission::Update } else { Permission::Create })?;
        let content_type = content_type.trim();
        if !is_code(content_type) {
            return Err(Refusal::bad_request("the Content-Type of a Binary upload must be a plain media type").into());
        }
        let mut binary = json!({ "resourceType": "Binary", "contentType": content_type });
        if let Some(id) = id {
            binary["id"] = Value::String(id.to_owned());
        }
        // Every fact in one round: the security context and the stored Binary's metadata.
        let context = self.security_context()?;
        let stored = id.map(|id| Query::BinaryMeta { id: id.to_owned(), vid: None });
        if id.is_none() && self.access.grants.is_empty() {
            return Err(Refusal::forbidden("Your tenant holds no dataset to write into.").into());
        }
        if id.is_some() && self.access.grants.is_empty() {
            return Err(Refusal::UpdateAsCreate.into());
        }
        self.need(context.iter().map(|(query, _)| query.clone()).chain(stored.clone()))?;
        let mut stamp = Vec::new();
        if let Some((query, reference)) = &context {
            let Query::Resource { ty, id, vid } = query else { return Err(Refusal::NotFound.into()) };
            let resource = self.facts.resource(query).flatten().filter(|r| {
                resource_visible(r, ty, id, &self.access.grants)
                    && vid.as_deref().is_none_or(|v| version_of(r) == Some(v))
            });
            let Some(resource) = resource else {
                return Err(
                    Refusal::Reference { path: "X-Security-Context".into(), reference: reference.clone() }.into()
                );
            };
            binary["securityContext"] = json!({ "reference": local_reference(ty, id, vid.as_deref()) });
            stamp = granted_tags(resource, &self.access.grants);
        }
        let mut headers = vec![(HeaderName::from_static("prefer"), HeaderValue::from_static("return=minimal"))];
        if let (Some(query), Some(id)) = (&stored, id) {
            // The stored Binary must be the caller's (else the update would be a create, refused), at the version
            // a client `If-Match` names; the write is pinned to it.
            let meta =
                self.facts.resource(query).flatten().filter(|m| resource_visible(m, "Binary", id, &self.access.grants));
            let meta = meta.ok_or(Refusal::UpdateAsCreate)?;
            let version = version_of(meta).ok_or_else(|| {
                Refusal::UpstreamUnusable("the stored Binary has no versionId to write against".into())
            })?;
            if let Some(wanted) = &self.input.if_match
                && etag_version(wanted) != version
            {
                return Err(Refusal::PreconditionFailed.into());
            }
            headers.push(if_match(version)?);
            if stamp.is_empty() {
                stamp = granted_tags(meta, &self.access.grants);
            }
        }
        if stamp.is_empty() && self.access.tags.len() == 1 {
            stamp = self.access.tags.clone();
        }
        if stamp.is_empty() {
            return Err(Refusal::bad_request(
                "Name the resource this Binary belongs with in X-Security-Context: your tenant holds several \
                 datasets, so none is chosen for you.",
            )
            .into());
        }
        check_tags(&mut binary, &self.access.grants, &self.env.dataset_systems(), &stamp).map_err(Refusal::from)?;
        let (method, segments) = match id {
            Some(id) => (Method::PUT, vec!["Binary".to_owned(), id.to_owned()]),
            None => (Method::POST, vec!["Binary".to_owned()]),
        };
        Ok(Step::Send(Call {
            method,
            target: self.target(&segments, &[]),
            body: Some(Payload::BinaryUpload(binary)),
            headers,
            expect: Expect::Uploaded,
        }))
    }

    /// `X-Security-Context`, when sent: the read that checks it, and the reference as sent. It must name one
    /// resource on this server.
    fn security_context(&self) -> Result<Option<(Query, String)>, Stop> {
        let Some(reference) = self.input.security_context.as_deref().map(str::trim) else { return Ok(None) };
        let bases = [self.env.public, self.env.upstream.base_url.as_str()];
        match references::classify(reference, &bases) {
            Some(Reference::Local { ty, id, version }) => {
                Ok(Some((Query::Resource { ty, id, vid: version }, reference.to_owned())))
            }
            _ => Err(Refusal::bad_request(
                "X-Security-Context must name one resource on this server, as Type/id or Type/id/_history/vid",
            )
            .into()),
        }
    }
}

fn local_reference(ty: &str, id: &str, vid: Option<&str>) -> String {
    match vid {
        Some(vid) => format!("{ty}/{id}/_history/{vid}"),
        None => format!("{ty}/{id}"),
    }
}

/// A FHIR `code`: visible ASCII words separated by single spaces.
fn is_code(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_CONTENT_TYPE
        && text.split(' ').all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_graphic()))
}
