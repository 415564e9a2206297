//! The operator API. Every write goes through `Store::write`, which validates the resulting configuration with the
//! data plane's own code; handlers here check only what depends on the request itself (required fields, the clock).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fhirgw_config::resource::MAX_RESOURCE_BYTES;
use fhirgw_config::tenant::{grant_fields, system_to_timestamp, tenant_fields};
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
use crate::store::{AuditQuery, AuditRecord, Change, Expected, Store, StoreError, now_millis};

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

/// A stored grant's entry, marked when it has expired.
fn grant_entry(grant: pb::Grant, meta: Option<api::Meta>, now: SystemTime) -> api::GrantEntry {
    let expired = grant_expired(&grant, now);
    api::GrantEntry { grant: Some(grant), meta, expired }
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

#[tonic::async_trait]
impl Admin for AdminService {
    async fn put_tenant(&self, request: Request<api::PutTenantRequest>) -> Result<Response<api::TenantEntry>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let tenant = required(req.tenant, "tenant")?;
        tenant_fields(&tenant).map_err(|e| invalid(e.to_string()))?;
        let revision =
            self.put(actor, ObjKind::Tenant, tenant.name.clone(), &tenant, &req.expected_version, |_| Ok(())).await?;
        Ok(Response::new(api::TenantEntry { tenant: Some(tenant), meta: now_meta(revision) }))
    }

    async fn get_tenant(&self, request: Request<api::GetRequest>) -> Result<Response<api::TenantEntry>, Status> {
        let (tenant, meta) = self.get(ObjKind::Tenant, &request.into_inner().name)?;
        Ok(Response::new(api::TenantEntry { tenant: Some(tenant), meta }))
    }

    async fn list_tenants(&self, _: Request<api::ListRequest>) -> Result<Response<api::ListTenantsResponse>, Status> {
        let tenants = self
            .list(ObjKind::Tenant)?
            .into_iter()
            .map(|(tenant, meta)| api::TenantEntry { tenant: Some(tenant), meta })
            .collect();
        Ok(Response::new(api::ListTenantsResponse { tenants }))
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
        let actor = actor(&request);
        let req = request.into_inner();
        let grant = required(req.grant, "grant")?;
        let name = check_grant(&grant)?;
        let revision = self.put(actor, ObjKind::Grant, name, &grant, &req.expected_version, |_| Ok(())).await?;
        Ok(Response::new(grant_entry(grant, now_meta(revision), SystemTime::now())))
    }

    async fn get_grant(&self, request: Request<api::GrantKey>) -> Result<Response<api::GrantEntry>, Status> {
        let req = request.into_inner();
        let (grant, meta) = self.get(ObjKind::Grant, &grant_name(&req.tenant, req.tag.as_ref())?)?;
        Ok(Response::new(grant_entry(grant, meta, SystemTime::now())))
    }

    async fn list_grants(
        &self,
        request: Request<api::ListGrantsRequest>,
    ) -> Result<Response<api::ListGrantsResponse>, Status> {
        let tenant = request.into_inner().tenant;
        let now = SystemTime::now();
        let grants = self
            .list::<pb::Grant>(ObjKind::Grant)?
            .into_iter()
            .filter(|(g, _)| tenant.is_empty() || g.tenant == tenant)
            .map(|(grant, meta)| grant_entry(grant, meta, now))
            .collect();
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
        let actor = actor(&request);
        let req = request.into_inner();
        let upstream = required(req.upstream, "upstream")?;
        let revision = self
            .put(actor, ObjKind::Upstream, upstream.name.clone(), &upstream, &req.expected_version, |_| Ok(()))
            .await?;
        Ok(Response::new(api::UpstreamEntry { upstream: Some(upstream), meta: now_meta(revision) }))
    }

    async fn get_upstream(&self, request: Request<api::GetRequest>) -> Result<Response<api::UpstreamEntry>, Status> {
        let (upstream, meta) = self.get(ObjKind::Upstream, &request.into_inner().name)?;
        Ok(Response::new(api::UpstreamEntry { upstream: Some(upstream), meta }))
    }

    async fn list_upstreams(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListUpstreamsResponse>, Status> {
        let upstreams = self
            .list(ObjKind::Upstream)?
            .into_iter()
            .map(|(upstream, meta)| api::UpstreamEntry { upstream: Some(upstream), meta })
            .collect();
        Ok(Response::new(api::ListUpstreamsResponse { upstreams }))
    }

    async fn delete_upstream(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        self.delete(actor, ObjKind::Upstream, req.name, &req.expected_version, |_| Ok(())).await
    }

    async fn put_route_table(
        &self,
        request: Request<api::PutRouteTableRequest>,
    ) -> Result<Response<api::RouteTableEntry>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let table = required(req.route_table, "route_table")?;
        let revision =
            self.put(actor, ObjKind::RouteTable, table.name.clone(), &table, &req.expected_version, |_| Ok(())).await?;
        Ok(Response::new(api::RouteTableEntry { route_table: Some(table), meta: now_meta(revision) }))
    }

    async fn get_route_table(
        &self,
        request: Request<api::GetRequest>,
    ) -> Result<Response<api::RouteTableEntry>, Status> {
        let (table, meta) = self.get(ObjKind::RouteTable, &request.into_inner().name)?;
        Ok(Response::new(api::RouteTableEntry { route_table: Some(table), meta }))
    }

    async fn list_route_tables(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListRouteTablesResponse>, Status> {
        let route_tables = self
            .list(ObjKind::RouteTable)?
            .into_iter()
            .map(|(t, meta)| api::RouteTableEntry { route_table: Some(t), meta })
            .collect();
        Ok(Response::new(api::ListRouteTablesResponse { route_tables }))
    }

    async fn delete_route_table(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        self.delete(actor, ObjKind::RouteTable, req.name, &req.expected_version, |_| Ok(())).await
    }

    async fn put_identity_provider(
        &self,
        request: Request<api::PutIdentityProviderRequest>,
    ) -> Result<Response<api::IdentityProviderEntry>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let idp = required(req.identity_provider, "identity_provider")?;
        let revision = self
            .put(actor, ObjKind::IdentityProvider, idp.name.clone(), &idp, &req.expected_version, |_| Ok(()))
            .await?;
        Ok(Response::new(api::IdentityProviderEntry { identity_provider: Some(idp), meta: now_meta(revision) }))
    }

    async fn get_identity_provider(
        &self,
        request: Request<api::GetRequest>,
    ) -> Result<Response<api::IdentityProviderEntry>, Status> {
        let (idp, meta) = self.get(ObjKind::IdentityProvider, &request.into_inner().name)?;
        Ok(Response::new(api::IdentityProviderEntry { identity_provider: Some(idp), meta }))
    }

    async fn list_identity_providers(
        &self,
        _: Request<api::ListRequest>,
    ) -> Result<Response<api::ListIdentityProvidersResponse>, Status> {
        let identity_providers = self
            .list(ObjKind::IdentityProvider)?
            .into_iter()
            .map(|(i, meta)| api::IdentityProviderEntry { identity_provider: Some(i), meta })
            .collect();
        Ok(Response::new(api::ListIdentityProvidersResponse { identity_providers }))
    }

    async fn delete_identity_provider(
        &self,
        request: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        self.delete(actor, ObjKind::IdentityProvider, req.name, &req.expected_version, |_| Ok(())).await
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

const AUDIT_PAGE: u32 = 100;
const AUDIT_PAGE_MAX: u32 = 1000;

fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn audit_query(req: &api::ListAuditRequest) -> Result<AuditQuery, Status> {
    if !req.kind.is_empty() {
        req.kind.parse::<ObjKind>().map_err(|_| {
            invalid(format!(
                "kind `{}` is not one of tenant, grant, upstream, route_table, identity_provider",
                req.kind
            ))
        })?;
    }
    let before_revision = match req.page_token.as_str() {
        "" => None,
        token => Some(token.parse::<u64>().map_err(|_| invalid("page_token is not one this API issued"))?),
    };
    let limit = match req.page_size {
        0 => AUDIT_PAGE,
        n => n.min(AUDIT_PAGE_MAX),
    };
    Ok(AuditQuery {
        kind: req.kind.clone(),
        name: req.name.clone(),
        actor: req.actor.clone(),
        since: req.since.as_ref().map(millis),
        until: req.until.as_ref().map(millis),
        before_revision,
        limit,
    })
}

fn audit_entry(r: AuditRecord) -> api::AuditEntry {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(r.at).unwrap_or(0));
    let message = match r.kind.parse::<ObjKind>() {
        Ok(ObjKind::Tenant) => "Tenant",
        Ok(ObjKind::Grant) => "Grant",
        Ok(ObjKind::Upstream) => "Upstream",
        Ok(ObjKind::RouteTable) => "RouteTable",
        Ok(ObjKind::IdentityProvider) => "IdentityProvider",
        Err(_) => "",
    };
    let body = r
        .body
        .filter(|_| !message.is_empty())
        .map(|value| prost_types::Any { type_url: format!("type.googleapis.com/fhirgw.config.v1.{message}"), value });
    api::AuditEntry {
        revision: r.revision,
        at: Some(system_to_timestamp(at)),
        actor: r.actor,
        version_after: if r.op == "delete" { String::new() } else { r.revision.to_string() },
        operation: r.op,
        kind: r.kind,
        name: r.name,
        version_before: r.version_before.map(|v| v.to_string()).unwrap_or_default(),
        body,
        replica: r.replica,
    }
}
