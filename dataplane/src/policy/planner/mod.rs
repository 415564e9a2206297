//! The request planner: every request shape becomes a checked [`Step`], by one exhaustive match on the
//! interaction (a new interaction does not compile until it has a plan), and batch entries and handlers through the
//! same functions as direct requests.
//!
//! [`plan`] is pure. It is called again with more facts until it answers something other than `Need`; each call
//! re-derives the decision from the request, the access and the facts, so nothing depends on the order the facts
//! arrived in. Inside, plan functions return `Result<Step, Stop>`: `?` stops at the first refusal or the first facts
//! still missing.

mod batch;
mod binary;
mod handlers;
mod read;
mod search;
#[cfg(test)]
mod tests;
mod write;

pub use batch::{refused_entry, status_line};

use fhirgw_config::path::join_encoded;
use fhirgw_config::pattern::Class;
use serde_json::Value;

use super::classify::Interaction;
use super::compartment::{self, Reach};
use super::input::{Access, Env, Input};
use super::plan::{Call, Expect, Facts, Query, Step};
use super::refusal::Refusal;
use super::scopes::{Allowed, Permission};
use super::verify::resource_visible;

/// What stops a plan function before its final step: a refusal, or facts still needed.
#[derive(Debug)]
enum Stop {
    Refuse(Refusal),
    Need(Vec<Query>),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Stop::Refuse(refusal)
    }
}

impl From<Stop> for Step {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Refuse(refusal) => Step::Refuse(refusal),
            Stop::Need(queries) => Step::Need(queries),
        }
    }
}

/// A plan function's result: the final step, or what stops it.
type Planned = Result<Step, Stop>;

/// Plans `input` for a caller with `access`, given the facts read so far.
pub fn plan(input: &Input, env: &Env<'_>, access: &Access, facts: &Facts) -> Step {
    let planner = Planner { input, env, access, facts };
    match planner.plan() {
        Ok(step) => step,
        Err(stop) => stop.into(),
    }
}

/// The upstream call for the CapabilityStatement (`GET metadata`), which needs no caller.
pub fn capabilities(input: &Input, env: &Env<'_>) -> Call {
    let target = join_encoded(&env.upstream.base_path, &input.relative);
    let target =
        if input.params.is_empty() { target } else { format!("{target}?{}", super::query::encode(&input.params)) };
    Call::get(target, Expect::Capabilities)
}

struct Planner<'a> {
    input: &'a Input,
    env: &'a Env<'a>,
    access: &'a Access,
    facts: &'a Facts,
}

impl Planner<'_> {
    fn plan(&self) -> Planned {
        let binary = matches!(&self.input.interaction,
            Interaction::Read { ty, .. } | Interaction::VRead { ty, .. } if ty == "Binary")
            && self.input.raw_accept.is_some();
        let upload = matches!(self.input.body, super::input::RequestBody::Upload { .. });
        if self.input.xml_only && !binary && !upload {
            return Err(Refusal::Query(super::query::QueryError::NotAcceptable { format: "XML".into() }).into());
        }
        if let Some(handler) = self.input.handler {
            return self.handler(handler);
        }
        let input = self.input;
        match &input.interaction {
            Interaction::Capabilities => Ok(Step::Send(capabilities(input, self.env))),
            Interaction::Read { id, .. } if binary => self.binary_content(id, None),
            Interaction::VRead { id, vid, .. } if binary => self.binary_content(id, Some(vid)),
            Interaction::Read { ty, id } => self.read(ty, id, None),
            Interaction::VRead { ty, id, vid } => self.read(ty, id, Some(vid)),
            Interaction::SearchType { ty, post } => self.search_type(ty, *post),
            Interaction::SearchSystem => self.search_system(),
            Interaction::HistoryType { ty } => self.history(ty, None),
            Interaction::HistoryInstance { ty, id } => self.history(ty, Some(id)),
            Interaction::Compartment { ty, id, target } => self.compartment(ty, id, target),
            Interaction::Operation { ty: Some(ty), id: Some(id), name } => self.instance_operation(ty, id, name),
            Interaction::Create { ty } if upload => self.binary_upload(ty, None),
            Interaction::Update { ty, id } if upload => self.binary_upload(ty, Some(id)),
            Interaction::Create { ty } => self.create(ty),
            Interaction::Update { ty, id } => self.update(ty, id, false),
            Interaction::Patch { ty, id } => self.patch(ty, id),
            Interaction::Delete { ty, id } => self.delete(ty, id),
            Interaction::Conditional { ty, method } => self.conditional(ty, method),
            Interaction::BatchOrTransaction => self.batch(),
            other @ (Interaction::Operation { .. } | Interaction::HistorySystem | Interaction::Unknown) => {
                Err(Refusal::forbidden(format!("{} is not supported through the gateway yet.", other.describe()))
                    .into())
            }
        }
    }

    /// Tenant-wide permission, as writes and batches need: a `patient/` scope is not enough.
    fn require(&self, ty: &str, permission: Permission) -> Result<(), Stop> {
        match self.access.scopes.allows(ty, permission) {
            Allowed::Tenant => Ok(()),
            Allowed::PatientOnly => Err(Refusal::forbidden(
                "patient/ scopes allow direct reads and searches only; this needs a user/ or system/ scope.",
            )
            .into()),
            Allowed::No => {
                Err(Refusal::forbidden(format!("The token's scopes do not allow this interaction on {ty}.")).into())
            }
        }
    }

    /// How far the caller may read `ty`: the tenant, or (`patient/` scopes) the compartment of the token's patient.
    fn require_read(&self, ty: &str, permission: Permission) -> Result<Reach, Stop> {
        match self.access.scopes.allows(ty, permission) {
            Allowed::Tenant => Ok(Reach::Tenant),
            Allowed::PatientOnly => {
                let patient = self.access.patient.as_deref().filter(|p| Class::Id.accepts(p)).ok_or_else(|| {
                    Refusal::forbidden("patient/ scopes need the token's `patient` claim (a patient id).")
                })?;
                if compartment::search_param(ty, patient).is_none() {
                    return Err(Refusal::forbidden(format!(
                        "{ty} is not in the patient compartment, so a patient/ scope grants nothing on it."
                    ))
                    .into());
                }
                Ok(Reach::Patient(patient.to_owned()))
            }
            Allowed::No => {
                Err(Refusal::forbidden(format!("The token's scopes do not allow this interaction on {ty}.")).into())
            }
        }
    }

    /// Every query of `queries` not read yet, as one `Need`; `Ok` once all are facts.
    fn need(&self, queries: impl IntoIterator<Item = Query>) -> Result<(), Stop> {
        let mut missing: Vec<Query> = queries.into_iter().filter(|q| !self.facts.contains(q)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort();
        missing.dedup();
        Err(Stop::Need(missing))
    }

    /// `ty/id` (or its version `vid`) as read, if it exists, is inside the grants and within `reach`; otherwise the
    /// one 404 of a missing resource. Needs the read first.
    fn visible(&self, ty: &str, id: &str, vid: Option<&str>, reach: &Reach) -> Result<&Value, Stop> {
        if self.access.grants.is_empty() {
            return Err(Refusal::NotFound.into());
        }
        let query = Query::Resource { ty: ty.to_owned(), id: id.to_owned(), vid: vid.map(str::to_owned) };
        self.need([query.clone()])?;
        let resource = self.facts.resource(&query).flatten().ok_or(Refusal::NotFound)?;
        let version_matches = vid.is_none_or(|v| version_of(resource) == Some(v));
        if resource_visible(resource, ty, id, &self.access.grants) && reach.admits(resource) && version_matches {
            Ok(resource)
        } else {
            Err(Refusal::NotFound.into())
        }
    }

    /// The upstream path of `segments` relative to its base, with `params`.
    fn target(&self, segments: &[String], params: &[(String, String)]) -> String {
        let path = join_encoded(&self.env.upstream.base_path, segments);
        if params.is_empty() { path } else { format!("{path}?{}", super::query::encode(params)) }
    }
}

/// A resource's `meta.versionId`.
fn version_of(resource: &Value) -> Option<&str> {
    resource.get("meta").and_then(|m| m.get("versionId")).and_then(Value::as_str)
}
