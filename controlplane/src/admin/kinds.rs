//! The kinds the operator API stores, each described once ([`StoredKind`]) so that put, get, list and delete are one
//! generic implementation (`AdminService::put_kind` and the rest) rather than one per kind.

use fhirgw_config::tenant::tenant_fields;
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use prost::Message;
use tonic::Status;

use super::{check_grant, grant_expired, invalid};
use crate::objects::ObjKind;

/// An object kind the operator API stores: its protobuf message, its key, the checks that depend on the request
/// alone, and the API's request and entry shapes. Every kind's put, get and list are one generic implementation.
pub(super) trait StoredKind: Message + Default + Sized {
    const KIND: ObjKind;
    /// The request field holding the object, for "is required" errors.
    const FIELD: &'static str;
    type Put;
    type Entry;
    /// The object and the expected version a put request carries.
    fn from_put(request: Self::Put) -> (Option<Self>, String);
    /// The object's key in the store; checks what depends on the request alone (the clock, required fields).
    fn key(&self) -> Result<String, Status>;
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry;
}

impl StoredKind for pb::Tenant {
    const KIND: ObjKind = ObjKind::Tenant;
    const FIELD: &'static str = "tenant";
    type Put = api::PutTenantRequest;
    type Entry = api::TenantEntry;
    fn from_put(r: Self::Put) -> (Option<Self>, String) {
        (r.tenant, r.expected_version)
    }
    fn key(&self) -> Result<String, Status> {
        tenant_fields(self).map_err(|e| invalid(e.to_string()))?;
        Ok(self.name.clone())
    }
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry {
        api::TenantEntry { tenant: Some(self), meta }
    }
}

impl StoredKind for pb::Grant {
    const KIND: ObjKind = ObjKind::Grant;
    const FIELD: &'static str = "grant";
    type Put = api::PutGrantRequest;
    type Entry = api::GrantEntry;
    fn from_put(r: Self::Put) -> (Option<Self>, String) {
        (r.grant, r.expected_version)
    }
    fn key(&self) -> Result<String, Status> {
        check_grant(self)
    }
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry {
        let expired = grant_expired(&self, std::time::SystemTime::now());
        api::GrantEntry { grant: Some(self), meta, expired }
    }
}

impl StoredKind for pb::Upstream {
    const KIND: ObjKind = ObjKind::Upstream;
    const FIELD: &'static str = "upstream";
    type Put = api::PutUpstreamRequest;
    type Entry = api::UpstreamEntry;
    fn from_put(r: Self::Put) -> (Option<Self>, String) {
        (r.upstream, r.expected_version)
    }
    fn key(&self) -> Result<String, Status> {
        Ok(self.name.clone())
    }
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry {
        api::UpstreamEntry { upstream: Some(self), meta }
    }
}

impl StoredKind for pb::RouteTable {
    const KIND: ObjKind = ObjKind::RouteTable;
    const FIELD: &'static str = "route_table";
    type Put = api::PutRouteTableRequest;
    type Entry = api::RouteTableEntry;
    fn from_put(r: Self::Put) -> (Option<Self>, String) {
        (r.route_table, r.expected_version)
    }
    fn key(&self) -> Result<String, Status> {
        Ok(self.name.clone())
    }
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry {
        api::RouteTableEntry { route_table: Some(self), meta }
    }
}

impl StoredKind for pb::IdentityProvider {
    const KIND: ObjKind = ObjKind::IdentityProvider;
    const FIELD: &'static str = "identity_provider";
    type Put = api::PutIdentityProviderRequest;
    type Entry = api::IdentityProviderEntry;
    fn from_put(r: Self::Put) -> (Option<Self>, String) {
        (r.identity_provider, r.expected_version)
    }
    fn key(&self) -> Result<String, Status> {
        Ok(self.name.clone())
    }
    fn entry(self, meta: Option<api::Meta>) -> Self::Entry {
        api::IdentityProviderEntry { identity_provider: Some(self), meta }
    }
}
