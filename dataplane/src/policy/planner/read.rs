//! Reads: read and vread, and the instance-level shapes that read a resource's neighbourhood (history,
//! `$everything`, compartment searches), which must first find their focal resource visible.

use http::Method;

use super::{Planned, Planner};
use crate::policy::compartment::{self, Reach};
use crate::policy::input::Within;
use crate::policy::plan::{Call, Expect, Step};
use crate::policy::query::{self, PAGE_PARAM, Use};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;

impl Planner<'_> {
    /// `GET [type]/[id]` or `[type]/[id]/_history/[vid]`. Inside a transaction the read is checked before the
    /// transaction is sent and pinned to the version checked, so another tenant's resource and a missing one fail
    /// the transaction the same way, whatever the upstream does with a missing read.
    pub(super) fn read(&self, ty: &str, id: &str, vid: Option<&str>) -> Planned {
        let input = self.input;
        let reach = match input.within {
            Within::Request => self.require_read(ty, Permission::Read)?,
            Within::Batch | Within::Transaction => {
                self.require(ty, Permission::Read)?;
                Reach::Tenant
            }
        };
        query::check(Use::Read, &input.params, self.env.guard).map_err(Refusal::from)?;
        if self.access.grants.is_empty() {
            return Err(Refusal::NotFound.into());
        }
        let mut segments = vec![ty.to_owned(), id.to_owned()];
        if input.within == Within::Transaction {
            let resource = self.visible(ty, id, vid, &reach)?;
            let version = super::version_of(resource)
                .filter(|v| fhirgw_config::pattern::Class::Id.accepts(v))
                .ok_or_else(|| Refusal::bad_request(format!("{ty}/{id} has no version to read it at")))?;
            segments.extend(["_history".to_owned(), version.to_owned()]);
        } else if let Some(vid) = vid {
            segments.extend(["_history".to_owned(), vid.to_owned()]);
        }
        let expect = Expect::Resource { ty: ty.to_owned(), id: id.to_owned(), reach, head: input.head };
        Ok(Step::Send(Call::get(self.target(&segments, &input.params), expect)))
    }

    /// Instance history (after its resource is found visible) or type history; every entry verified.
    pub(super) fn history(&self, ty: &str, id: Option<&str>) -> Planned {
        if let Some(id) = id {
            let reach = self.require_read(ty, Permission::Read)?;
            self.visible(ty, id, None, &reach)?;
        }
        self.bundle(ty, Use::History, self.input.params.clone())
    }

    /// `Patient/[id]/[type]`: `[type]?patient=Patient/[id]` once Patient/[id] is known visible.
    pub(super) fn compartment(&self, ty: &str, id: &str, target: &str) -> Planned {
        if ty != "Patient" {
            return Err(Refusal::forbidden("Compartment search is not supported through the gateway yet.").into());
        }
        let reach = self.require_read(ty, Permission::Read)?;
        self.visible(ty, id, None, &reach)?;
        let (name, value) = compartment::search_param(target, id)
            .ok_or_else(|| Refusal::forbidden(format!("{target} is not in the Patient compartment.")))?;
        let mut params = self.input.params.clone();
        if params.iter().any(|(n, _)| n == PAGE_PARAM) {
            return Err(Refusal::bad_request("page through the links the search returned").into());
        }
        params.push((name, value));
        self.bundle(target, Use::Search, params)
    }

    /// `[type]/[id]/$op`: `Patient/[id]/$everything` (GET) and `$meta-add` / `$meta-delete` (POST).
    pub(super) fn instance_operation(&self, ty: &str, id: &str, name: &str) -> Planned {
        let method = &self.input.method;
        match name {
            "$everything" if ty == "Patient" && method != Method::POST => {
                let reach = self.require_read(ty, Permission::Read)?;
                self.visible(ty, id, None, &reach)?;
                self.bundle(ty, Use::Everything, self.input.params.clone())
            }
            "$meta-add" | "$meta-delete" if method == Method::POST => self.meta_change(ty, id, name),
            _ => {
                Err(Refusal::forbidden(format!("The operation {name} is not supported through the gateway yet."))
                    .into())
            }
        }
    }
}
