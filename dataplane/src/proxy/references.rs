//! The references a write carries, checked before the write is sent (see `policy::references` for why): each local
//! one must be visible to the caller, and each conditional one is narrowed to the tenant like any search. A
//! reference that fails gets one answer whether its target is missing or another tenant's.

use std::collections::BTreeMap;

use fhirgw_config::path::join_encoded;
use fhirgw_config::tenant::Tag;
use futures_util::{StreamExt, stream};
use http::{Method, StatusCode};
use serde_json::Value;

use super::ProxyError;
use super::access::Ctx;
use crate::policy::compartment::Reach;
use crate::policy::query::{self, Use};
use crate::policy::references::{self, MAX_REFERENCES, Reference};
use crate::policy::verify::{Grants, resource_visible};

/// Reads in flight at once while checking one request's references.
const CONCURRENCY: usize = 8;
const RESOURCE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// What the checks decided for a request: the narrowed form of each conditional reference.
#[derive(Debug, Default)]
pub(super) struct Narrowed(BTreeMap<String, String>);

impl Narrowed {
    /// Puts the narrowed conditional references into `value` (a resource or a patch).
    pub fn apply(&self, value: &mut Value) {
        if !self.0.is_empty() {
            references::rewrite(value, &|r| self.0.get(r).cloned());
        }
    }
}

impl Ctx<'_> {
    /// Checks the references `found` (location, reference string) of one write, or of a whole batch at once (each
    /// distinct reference is checked once). Local references must be visible to the caller; conditional ones are
    /// checked like searches and narrowed with `tags`. `conditional_allowed` is false where a narrowed reference
    /// cannot be put back (patches).
    pub(super) async fn check_references(
        &self,
        found: &[(String, &str)],
        grants: &Grants,
        tags: &[&Tag],
        conditional_allowed: bool,
    ) -> Result<Narrowed, ProxyError> {
        let public = self.public.as_str();
        let bases = [public, self.upstream.base_url.as_str()];
        let mut local: BTreeMap<Reference, (String, String)> = BTreeMap::new();
        let mut narrowed = Narrowed::default();
        for (path, reference) in found {
            let Some(classified) = references::classify(reference, &bases) else { continue };
            match classified {
                Reference::Local { .. } => {
                    local.entry(classified).or_insert_with(|| (path.clone(), (*reference).to_owned()));
                }
                Reference::Conditional { ty, params } => {
                    if !conditional_allowed {
                        return Err(ProxyError::BadRequest(format!(
                            "{path}: conditional references are not supported here; resolve `{reference}` first"
                        )));
                    }
                    query::check(Use::Search, &params, self.guard)?;
                    if params.is_empty() {
                        return Err(ProxyError::BadRequest(format!("{path}: `{reference}` has no criteria")));
                    }
                    let within = query::narrow(&params, tags).ok_or_else(|| dangling(path, reference))?;
                    narrowed.0.insert((*reference).to_owned(), format!("{ty}?{}", query::encode(&within)));
                }
            }
            if local.len() + narrowed.0.len() > MAX_REFERENCES {
                return Err(ProxyError::BadRequest(format!(
                    "more than {MAX_REFERENCES} distinct references in one request"
                )));
            }
        }
        if let Ok(seen) = self.visible_references.lock() {
            local.retain(|target, _| !seen.contains(target));
        }
        let mut checks = stream::iter(local)
            .map(|(target, (path, reference))| async move {
                match self.reference_visible(&target, grants).await {
                    Ok(true) => Ok(target),
                    Ok(false) => Err(dangling(&path, &reference)),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(result) = checks.next().await {
            let target = result?;
            if let Ok(mut seen) = self.visible_references.lock() {
                seen.insert(target);
            }
        }
        Ok(narrowed)
    }

    /// Whether a local reference's target exists and is inside the grants (a version, when it names one).
    async fn reference_visible(&self, target: &Reference, grants: &Grants) -> Result<bool, ProxyError> {
        let Reference::Local { ty, id, version } = target else { return Ok(true) };
        let Some(version) = version else {
            return match self.visible(ty, id, grants, &Reach::Tenant).await {
                Ok(()) => Ok(true),
                Err(ProxyError::ResourceNotFound) => Ok(false),
                Err(e) => Err(e),
            };
        };
        if grants.is_empty() {
            return Ok(false);
        }
        let path = [ty.clone(), id.clone(), "_history".to_owned(), version.clone()];
        let target = join_encoded(&self.upstream.base_path, &path);
        let (status, _, body) = self.exchange(Method::GET, &target, None, RESOURCE_MAX_BYTES).await?;
        match status {
            StatusCode::OK => {
                let resource: Value = serde_json::from_slice(&body).unwrap_or_default();
                Ok(resource_visible(&resource, ty, id, grants))
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(false),
            other => Err(ProxyError::UpstreamStatus(other)),
        }
    }
}

/// The one answer for a reference to a resource that is missing or outside the grants.
fn dangling(path: &str, reference: &str) -> ProxyError {
    ProxyError::Reference { path: path.to_owned(), reference: reference.to_owned() }
}
