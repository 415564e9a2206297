//! The operator API. Every write goes through `Store::write`, which validates the resulting configuration with the
//! data plane's own code; handlers here check only what depends on the request itself (required fields, the clock).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fhirgw_config::resource::MAX_RESOURCE_BYTES;
use fhirgw_config::tenant::{grant_fields, system_to_timestamp};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::admin::v1::admin_server::Admin;
use fhirgw_proto::config::v1 as pb;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::objects::{ObjKind, Object, grant_key};
use crate::operators::Operator;
use crate::status::Registry;
use crate::store::{Change, Expected, Store, StoreError, now_millis};

mod audit;
mod kinds;

use audit::{audit_entry, audit_query};
use kinds::StoredKind;

pub struct AdminService {
    store: Arc<Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl AdminService {
    pub fn new(store: Arc<Store>, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Self { store, registry, metrics }
    }
}

/// The authenticated operator's name (the interceptor put it there), for the audit log.
fn actor<T>(request: &Request<T>) -> String {
    request.extensions().get::<Operator>().map_or_else(|| crate::operators::SINGLE.to_owned(), |o| o.0.clone())
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn to_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::VersionMismatch { .. } | StoreError::Conflict(_) => Status::failed_precondition(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        // Nothing was written; the operator retries (or another replica takes the call).
        StoreError::Unavailable(_) => {
            error!(error = %e, "store unavailable");
            Status::unavailable(e.to_string())
        }
        StoreError::Backend(_) | StoreError::Corrupt(_) | StoreError::Locked(_) => {
            error!(error = %e, "store failure");
            Status::internal("store failure; see the control plane's log")
        }
    }
}

fn meta(revision: u64, updated_at: i64) -> Option<api::Meta> {
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(updated_at).unwrap_or(0));
    Some(api::Meta { version: revision.to_string(), updated_at: Some(system_to_timestamp(at)) })
}

fn now_meta(revision: u64) -> Option<api::Meta> {
    Some(api::Meta { version: revision.to_string(), updated_at: Some(system_to_timestamp(SystemTime::now())) })
}

fn required<T>(value: Option<T>, what: &str) -> Result<T, Status> {
    value.ok_or_else(|| invalid(format!("`{what}` is required")))
}

fn decode<M: Message + Default>(obj: &Object) -> Result<M, Status> {
    M::decode(obj.body.as_slice()).map_err(|e| {
        error!(error = %e, "stored object does not decode");
        Status::internal("store holds an unreadable object; see the control plane's log")
    })
}

impl AdminService {
    async fn put<M: Message>(
        &self,
        actor: String,
        kind: ObjKind,
        name: String,
        msg: &M,
        expected: &str,
        check: impl Fn(&crate::objects::Objects) -> Result<(), StoreError>,
    ) -> Result<u64, Status> {
        let result = self.put_inner(&actor, kind, name, msg, expected, check).await;
        self.metrics.write(kind, "put", result.as_ref().map(|_| ()).map_err(Status::code));
        result
    }

    async fn put_inner<M: Message>(
        &self,
        actor: &str,
        kind: ObjKind,
        name: String,
        msg: &M,
        expected: &str,
        check: impl Fn(&crate::objects::Objects) -> Result<(), StoreError>,
    ) -> Result<u64, Status> {
        if name.is_empty() {
            return Err(invalid(format!("{kind} name is required")));
        }
        let body = msg.encode_to_vec();
        if body.len() > MAX_RESOURCE_BYTES {
            return Err(invalid(format!("{kind} is {} bytes; the limit is {MAX_RESOURCE_BYTES}", body.len())));
        }
        let expected = Expected::parse(expected).map_err(invalid)?;
        // The write's span travels with the new revision to every data plane (ConfigResponse.trace_context).
        let span = tracing::info_span!("admin.put", %kind, %name);
        let write = self.store.write(actor, Change::Put { kind, name: name.clone(), body }, expected, check);
        let revision = tracing::Instrument::instrument(write, span).await.map_err(to_status)?;
        info!(%kind, %name, revision, "stored");
        Ok(revision)
    }

    async fn delete(
        &self,
        actor: String,
        kind: ObjKind,
        name: String,
        expected: &str,
        check: impl Fn(&crate::objects::Objects) -> Result<(), StoreError>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let result = self.delete_inner(&actor, kind, name, expected, check).await;
        self.metrics.write(kind, "delete", result.as_ref().map(|_| ()).map_err(Status::code));
        result
    }

    async fn delete_inner(
        &self,
        actor: &str,
        kind: ObjKind,
        name: String,
        expected: &str,
        check: impl Fn(&crate::objects::Objects) -> Result<(), StoreError>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let expected = Expected::parse(expected).map_err(invalid)?;
        if expected == Expected::Absent {
            return Err(invalid("expected_version \"0\" (absent) makes no sense for a delete"));
        }
        let span = tracing::info_span!("admin.delete", %kind, %name);
        let write = self.store.write(actor, Change::Delete { kind, name: name.clone() }, expected, check);
        let revision = tracing::Instrument::instrument(write, span).await.map_err(to_status)?;
        info!(%kind, %name, revision, "deleted");
        Ok(Response::new(api::DeleteResponse { revision: revision.to_string() }))
    }

    fn get<M: Message + Default>(&self, kind: ObjKind, name: &str) -> Result<(M, Option<api::Meta>), Status> {
        let state = self.store.state();
        let obj = state
            .objects
            .get(&(kind, name.to_owned()))
            .ok_or_else(|| Status::not_found(format!("{kind} `{name}` not found")))?;
        Ok((decode(obj)?, meta(obj.revision, obj.updated_at)))
    }

    fn list<M: Message + Default>(&self, kind: ObjKind) -> Result<Vec<(M, Option<api::Meta>)>, Status> {
        let state = self.store.state();
        state
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, obj)| Ok((decode(obj)?, meta(obj.revision, obj.updated_at))))
            .collect()
    }
}

fn check_grant(grant: &pb::Grant) -> Result<String, Status> {
    let parsed = grant_fields(grant).map_err(|e| invalid(e.to_string()))?;
    if parsed.expires_at.is_some_and(|at| at <= SystemTime::now()) {
        return Err(invalid("expires_at is in the past"));
    }
    Ok(grant_key(&grant.tenant, required(grant.tag.as_ref(), "grant.tag")?))
}

/// Whether `grant` has expired at `now` (data planes stop honouring it at that instant).
fn grant_expired(grant: &pb::Grant, now: SystemTime) -> bool {
    grant_fields(grant).ok().and_then(|g| g.expires_at).is_some_and(|at| at <= now)
}

/// The tenant's grants in `objects` (name, revision), split into expired at `now` and not.
fn tenant_grants(objects: &crate::objects::Objects, tenant: &str, now: SystemTime) -> (Vec<(String, u64)>, usize) {
    let prefix = format!("{tenant}/");
    let mut expired = Vec::new();
    let mut live = 0;
    for ((_, name), obj) in objects.iter().filter(|((k, n), _)| *k == ObjKind::Grant && n.starts_with(&prefix)) {
        // A grant that does not decode is not known to have expired: it keeps its tenant.
        match pb::Grant::decode(obj.body.as_slice()) {
            Ok(grant) if grant_expired(&grant, now) => expired.push((name.clone(), obj.revision)),
            _ => live += 1,
        }
    }
    (expired, live)
}

fn grant_name(tenant: &str, tag: Option<&pb::Tag>) -> Result<String, Status> {
    if tenant.is_empty() {
        return Err(invalid("`tenant` is required"));
    }
    Ok(grant_key(tenant, required(tag, "tag")?))
}

impl AdminService {
    async fn put_kind<K: StoredKind>(&self, request: Request<K::Put>) -> Result<Response<K::Entry>, Status> {
        let actor = actor(&request);
        let (object, expected) = K::from_put(request.into_inner());
        let object = required(object, K::FIELD)?;
        let key = object.key()?;
        let revision = self.put(actor, K::KIND, key, &object, &expected, |_| Ok(())).await?;
        Ok(Response::new(object.entry(now_meta(revision))))
    }

    fn get_kind<K: StoredKind>(&self, name: &str) -> Result<Response<K::Entry>, Status> {
        let (object, meta) = self.get::<K>(K::KIND, name)?;
        Ok(Response::new(object.entry(meta)))
    }

    fn list_kind<K: StoredKind>(&self) -> Result<Vec<K::Entry>, Status> {
        Ok(self.list::<K>(K::KIND)?.into_iter().map(|(object, meta)| object.entry(meta)).collect())
    }

    async fn delete_kind<K: StoredKind>(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        self.delete(actor, K::KIND, req.name, &req.expected_version, |_| Ok(())).await
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn put_tenant(&self, request: Request<api::PutTenantRequest>) -> Result<Response<api::TenantEntry>, Status> {
        self.put_kind::<pb::Tenant>(request).await
    }

    async fn get_tenant(&self, request: Request<api::GetRequest>) -> Result<Response<api::TenantEntry>, Status> {
        self.get_kind::<pb::Tenant>(&request.into_inner().name)
    }

    async fn list_tenants(&self, _: Request<api::ListRequest>) -> Result<Response<api::ListTenantsResponse>, Status> {
        Ok(Response::new(api::ListTenantsResponse { tenants: self.list_kind::<pb::Tenant>()? }))
    }

    async fn delete_tenant(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        // Expired grants give nothing and do not keep their tenant: when the tenant can go (it exists at the expected
        // version and has no other grant), they are deleted first, each as its own write in the audit trail and only
        // at the version seen expired, so a grant renewed meanwhile stops the delete instead.
        let expired = {
            let state = self.store.state();
            let tenant = state.objects.get(&(ObjKind::Tenant, req.name.clone()));
            let version_ok = match Expected::parse(&req.expected_version) {
                Ok(Expected::Any) => true,
                Ok(Expected::Revision(want)) => tenant.is_some_and(|t| t.revision == want),
                Ok(Expected::Absent) | Err(_) => false,
            };
            let (expired, live) = tenant_grants(&state.objects, &req.name, SystemTime::now());
            if tenant.is_some() && version_ok && live == 0 { expired } else { Vec::new() }
        };
        for (name, revision) in expired {
            match self.delete(actor.clone(), ObjKind::Grant, name, &revision.to_string(), |_| Ok(())).await {
                Ok(_) => {}
                // Deleted by someone else meanwhile: just as good.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        self.delete(actor, ObjKind::Tenant, req.name.clone(), &req.expected_version, |objects| {
            let (expired, live) = tenant_grants(objects, &req.name, SystemTime::now());
            if live > 0 {
                return Err(StoreError::Conflict(format!(
                    "tenant `{}` still has {live} grant(s) that have not expired; delete them first",
                    req.name
                )));
            }
            if !expired.is_empty() {
                return Err(StoreError::Conflict(format!(
                    "tenant `{}` has {} grant(s) that expired meanwhile; retry",
                    req.name,
                    expired.len()
                )));
            }
            Ok(())
        })
        .await
    }

    async fn put_grant(&self, request: Request<api::PutGrantRequest>) -> Result<Response<api::GrantEntry>, Status> {
        self.put_kind::<pb::Grant>(request).await
    }

    async fn get_grant(&self, request: Request<api::GrantKey>) -> Result<Response<api::GrantEntry>, Status> {
        let req = request.into_inner();
        self.get_kind::<pb::Grant>(&grant_name(&req.tenant, req.tag.as_ref())?)
    }

    async fn list_grants(
        &self,
        request: Request<api::ListGrantsRequest>,
    ) -> Result<Response<api::ListGrantsResponse>, Status> {
        let tenant = request.into_inner().tenant;
        let mut grants = self.list_kind::<pb::Grant>()?;
        grants.retain(|entry| tenant.is_empty() || entry.grant.as_ref().is_some_and(|g| g.tenant == tenant));
        Ok(Response::new(api::ListGrantsResponse { grants }))
    }

    async fn delete_grant(
        &self,
        request: Request<api::DeleteGrantRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let name = grant_name(&req.tenant, req.tag.as_ref())?;
        self.delete(actor, ObjKind::Grant, name, &req.expected_version, |_| Ok(())).await
    }

    async fn put_upstream(
        &self,
        request: Request<api::PutUpstreamRequest>,
    ) -> Result<Response<api::UpstreamEntry>, Status> {
        self.put_kind::<pb::Upstream>(request).await
    }

    async fn get_upstream(&self, request: Request<api::GetRequest>) -> Result<Response<api::UpstreamEntry>, Status> {
        self.get_kind::<pb::Upstream>(&request.into_inner().name)
    }

    async fn list_upstreams(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListUpstreamsResponse>, Status> {
        Ok(Response::new(api::ListUpstreamsResponse { upstreams: self.list_kind::<pb::Upstream>()? }))
    }

    async fn delete_upstream(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        self.delete_kind::<pb::Upstream>(request).await
    }

    async fn put_route_table(
        &self,
        request: Request<api::PutRouteTableRequest>,
    ) -> Result<Response<api::RouteTableEntry>, Status> {
        self.put_kind::<pb::RouteTable>(request).await
    }

    async fn get_route_table(
        &self,
        request: Request<api::GetRequest>,
    ) -> Result<Response<api::RouteTableEntry>, Status> {
        self.get_kind::<pb::RouteTable>(&request.into_inner().name)
    }

    async fn list_route_tables(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListRouteTablesResponse>, Status> {
        Ok(Response::new(api::ListRouteTablesResponse { route_tables: self.list_kind::<pb::RouteTable>()? }))
    }

    async fn delete_route_table(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        self.delete_kind::<pb::RouteTable>(request).await
    }

    async fn put_identity_provider(
        &self,
        request: Request<api::PutIdentityProviderRequest>,
    ) -> Result<Response<api::IdentityProviderEntry>, Status> {
        self.put_kind::<pb::IdentityProvider>(request).await
    }

    async fn get_identity_provider(
        &self,
        request: Request<api::GetRequest>,
    ) -> Result<Response<api::IdentityProviderEntry>, Status> {
        self.get_kind::<pb::IdentityProvider>(&request.into_inner().name)
    }

    async fn list_identity_providers(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListIdentityProvidersResponse>, Status> {
        let identity_providers = self.list_kind::<pb::IdentityProvider>()?;
        Ok(Response::new(api::ListIdentityProvidersResponse { identity_providers }))
    }

    async fn delete_identity_provider(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        self.delete_kind::<pb::IdentityProvider>(request).await
    }

    async fn get_status(&self, _: Request<api::GetStatusRequest>) -> Result<Response<api::StatusResponse>, Status> {
        let state = self.store.state();
        let store_id = self.store.store_id();
        let changed_since = |rev| self.store.changed_since(rev);
        // The other replicas' data planes as they last published them, those that left recently included; without
        // the database, this replica's own.
        let now = now_millis();
        let since = now.saturating_sub(i64::try_from(crate::status::DEPARTED_FOR.as_millis()).unwrap_or(0));
        let remote = if self.store.is_shared() { self.remote_data_planes(since).await } else { Vec::new() };
        let fleet = self.registry.fleet(&state, store_id, remote, now, changed_since);
        Ok(Response::new(api::StatusResponse {
            revision: state.revision,
            config_version: state.digest.clone(),
            data_planes: fleet.connected,
            store_id: store_id.to_owned(),
            replica: self.store.replica().to_owned(),
            recently_disconnected: fleet.departed,
        }))
    }

    async fn list_audit(
        &self,
        request: Request<api::ListAuditRequest>,
    ) -> Result<Response<api::ListAuditResponse>, Status> {
        let req = request.into_inner();
        let query = audit_query(&req)?;
        let records = self.store.list_audit(&query).await.map_err(to_status)?;
        let next_page_token = if records.len() == query.limit as usize {
            records.last().map(|r| r.revision.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let entries = records.into_iter().map(audit_entry).collect();
        Ok(Response::new(api::ListAuditResponse { entries, next_page_token }))
    }
}

impl AdminService {
    async fn remote_data_planes(&self, since: i64) -> Vec<crate::store::DataPlaneRow> {
        match tokio::time::timeout(Duration::from_secs(2), self.store.data_planes(since)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                warn!(error = %e, "GetStatus: other replicas' data planes unavailable");
                Vec::new()
            }
            Err(_) => {
                warn!("GetStatus: other replicas' data planes unavailable (timed out)");
                Vec::new()
            }
        }
    }
}
