//! Binary content (a PDF, an image, a DICOM file: how attachments reach clients) cannot be tag-checked from its
//! bytes. So a read of `Binary/[id]` asking for a non-FHIR type is checked as the Binary's metadata first (read as
//! FHIR without its content: tags, version, `securityContext`), exactly like any read (out of grant and missing:
//! the same 404); its security context, when it names a resource on this server, must be visible too. Then the raw
//! content is fetched at the version checked (`_history/v`), so what streams back is the content of the Binary that
//! was checked, at wire speed and in flat memory.

use http::header::{self, HeaderValue};
use serde_json::Value;

use super::{Planned, Planner, version_of};
use crate::policy::plan::{Call, Expect, Query, Step};
use crate::policy::query::{self, Use};
use crate::policy::references::{self, Reference};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;
use crate::policy::verify::resource_visible;

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
