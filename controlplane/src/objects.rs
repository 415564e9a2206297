//! What the store holds, and how it becomes the resources pushed to data planes.
//!
//! Operators write tenants and grants separately; data planes receive one `TenantConfig` per tenant with all its
//! grants, so a tenant's access is always applied as a unit.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use fhirgw_config::{Kind, RawResource, ResourceSet};
use fhirgw_proto::config::v1 as pb;
use prost::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjKind {
    Tenant,
    Grant,
    Upstream,
    RouteTable,
    IdentityProvider,
}

impl ObjKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjKind::Tenant => "tenant",
            ObjKind::Grant => "grant",
            ObjKind::Upstream => "upstream",
            ObjKind::RouteTable => "route_table",
            ObjKind::IdentityProvider => "identity_provider",
        }
    }
}

impl fmt::Display for ObjKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ObjKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "tenant" => ObjKind::Tenant,
            "grant" => ObjKind::Grant,
            "upstream" => ObjKind::Upstream,
            "route_table" => ObjKind::RouteTable,
            "identity_provider" => ObjKind::IdentityProvider,
            other => return Err(format!("unknown object kind `{other}` in store")),
        })
    }
}

/// One stored object: an encoded config message and its store metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub body: Vec<u8>,
    /// Store revision of the last write to this object.
    pub revision: u64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

pub type ObjKey = (ObjKind, String);
pub type Objects = BTreeMap<ObjKey, Object>;

/// Store key of a grant: tenant names never contain '/', so the first '/' separates it from the tag.
pub fn grant_key(tenant: &str, tag: &pb::Tag) -> String {
    format!("{tenant}/{}|{}", tag.system, tag.code)
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("stored {kind} `{name}` does not decode: {source}")]
    Decode {
        kind: ObjKind,
        name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("grant `{grant}` refers to unknown tenant `{tenant}`")]
    UnknownTenant { grant: String, tenant: String },
}

fn decode<M: Message + Default>(key: &ObjKey, obj: &Object) -> Result<M, ComposeError> {
    M::decode(obj.body.as_slice()).map_err(|source| ComposeError::Decode { kind: key.0, name: key.1.clone(), source })
}

/// The resources data planes receive for these objects.
pub fn pushed_resources(objects: &Objects) -> Result<ResourceSet, ComposeError> {
    let mut set = ResourceSet::new();
    let mut tenants: BTreeMap<String, pb::TenantConfig> = BTreeMap::new();
    for (key, obj) in objects {
        let (kind, name) = key;
        match kind {
            ObjKind::Tenant => {
                let tenant: pb::Tenant = decode(key, obj)?;
                tenants.insert(name.clone(), pb::TenantConfig { tenant: Some(tenant), grants: Vec::new() });
            }
            ObjKind::Grant => {}
            ObjKind::Upstream => {
                set.insert((Kind::Upstream, name.clone()), RawResource::new(Kind::Upstream, obj.body.clone()));
            }
            ObjKind::RouteTable => {
                set.insert((Kind::RouteTable, name.clone()), RawResource::new(Kind::RouteTable, obj.body.clone()));
            }
            ObjKind::IdentityProvider => {
                set.insert(
                    (Kind::IdentityProvider, name.clone()),
                    RawResource::new(Kind::IdentityProvider, obj.body.clone()),
                );
            }
        }
    }
    // BTreeMap order: a tenant's grants are sorted by key, so the encoding (and version) is deterministic.
    for (key, obj) in objects.iter().filter(|(k, _)| k.0 == ObjKind::Grant) {
        let grant: pb::Grant = decode(key, obj)?;
        let Some(cfg) = tenants.get_mut(&grant.tenant) else {
            return Err(ComposeError::UnknownTenant { grant: key.1.clone(), tenant: grant.tenant });
        };
        cfg.grants.push(grant);
    }
    for (name, cfg) in tenants {
        set.insert((Kind::Tenant, name), RawResource::encode(Kind::Tenant, &cfg));
    }
    Ok(set)
}
