//! Raw resources as they travel on the push stream and sit on disk: kind, name, content version, encoded body.

use std::collections::BTreeMap;
use std::fmt;

use fhirgw_proto::push::v1 as push;
use prost::Message;
use sha2::{Digest, Sha256};

/// Largest encoded body accepted for one resource.
pub const MAX_RESOURCE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Upstream,
    RouteTable,
    Tenant,
    IdentityProvider,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Upstream, Kind::RouteTable, Kind::Tenant, Kind::IdentityProvider];

    pub fn message_name(self) -> &'static str {
        match self {
            Kind::Upstream => "fhirgw.config.v1.Upstream",
            Kind::RouteTable => "fhirgw.config.v1.RouteTable",
            Kind::Tenant => "fhirgw.config.v1.TenantConfig",
            Kind::IdentityProvider => "fhirgw.config.v1.IdentityProvider",
        }
    }

    pub fn type_url(self) -> String {
        fhirgw_proto::type_url(self.message_name())
    }

    pub fn to_proto(self) -> push::ResourceKind {
        match self {
            Kind::Upstream => push::ResourceKind::Upstream,
            Kind::RouteTable => push::ResourceKind::RouteTable,
            Kind::Tenant => push::ResourceKind::Tenant,
            Kind::IdentityProvider => push::ResourceKind::IdentityProvider,
        }
    }

    pub fn from_proto(kind: i32) -> Option<Self> {
        match push::ResourceKind::try_from(kind).ok()? {
            push::ResourceKind::Upstream => Some(Kind::Upstream),
            push::ResourceKind::RouteTable => Some(Kind::RouteTable),
            push::ResourceKind::Tenant => Some(Kind::Tenant),
            push::ResourceKind::IdentityProvider => Some(Kind::IdentityProvider),
            push::ResourceKind::Unspecified => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Upstream => "upstream",
            Kind::RouteTable => "route_table",
            Kind::Tenant => "tenant",
            Kind::IdentityProvider => "identity_provider",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub type ResourceKey = (Kind, String);

#[derive(Debug, Clone, PartialEq)]
pub struct RawResource {
    pub version: String,
    pub body: prost_types::Any,
}

impl RawResource {
    /// Wraps an encoded message; its version is the content hash.
    pub fn new(kind: Kind, value: Vec<u8>) -> Self {
        let body = prost_types::Any { type_url: kind.type_url(), value };
        Self { version: content_version(&body), body }
    }

    pub fn encode<M: Message>(kind: Kind, message: &M) -> Self {
        Self::new(kind, message.encode_to_vec())
    }
}

/// Content hash of a body: the same bytes give the same version on every replica and after every restart.
pub fn content_version(body: &prost_types::Any) -> String {
    let mut hash = Sha256::new();
    hash.update(body.type_url.as_bytes());
    hash.update([0]);
    hash.update(&body.value);
    hex::encode(&hash.finalize()[..12])
}

/// Every resource of a configuration, in a deterministic order.
pub type ResourceSet = BTreeMap<ResourceKey, RawResource>;

/// Digest of a whole resource set: identifies a configuration across both planes.
pub fn set_digest(set: &ResourceSet) -> String {
    digest(set.iter().map(|((kind, name), raw)| (*kind, name.as_str(), raw.version.as_str())))
}

/// Digest of `(kind, name, version)` triples, which must come in key order.
pub fn digest<'a>(items: impl Iterator<Item = (Kind, &'a str, &'a str)>) -> String {
    let mut hash = Sha256::new();
    for (kind, name, version) in items {
        hash.update(kind.as_str().as_bytes());
        hash.update([0]);
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(version.as_bytes());
        hash.update([b'\n']);
    }
    hex::encode(&hash.finalize()[..12])
}

/// Why one resource of a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`: {}", self.kind, self.name, self.reason)
    }
}

impl From<&Rejection> for push::RejectedResource {
    fn from(r: &Rejection) -> Self {
        push::RejectedResource {
            kind: r.kind.to_proto() as i32,
            name: r.name.clone(),
            version: r.version.clone(),
            reason: r.reason.clone(),
        }
    }
}

impl From<&RawResource> for prost_types::Any {
    fn from(raw: &RawResource) -> Self {
        raw.body.clone()
    }
}

/// Converts a set to its wire form.
pub fn to_wire(set: &ResourceSet) -> Vec<push::Resource> {
    set.iter()
        .map(|((kind, name), raw)| push::Resource {
            kind: kind.to_proto() as i32,
            name: name.clone(),
            version: raw.version.clone(),
            body: Some(raw.body.clone()),
        })
        .collect()
}

/// Reads one wire resource, checking what can be checked without decoding the body.
pub fn from_wire(resource: push::Resource) -> Result<(ResourceKey, RawResource), Rejection> {
    let reject = |kind: Option<Kind>, reason: String| Rejection {
        kind: kind.unwrap_or(Kind::Upstream),
        name: resource.name.clone(),
        version: resource.version.clone(),
        reason,
    };
    let Some(kind) = Kind::from_proto(resource.kind) else {
        return Err(reject(None, format!("unknown resource kind {}", resource.kind)));
    };
    let Some(body) = resource.body.clone() else {
        return Err(reject(Some(kind), "resource has no body".into()));
    };
    if body.type_url != kind.type_url() {
        return Err(reject(Some(kind), format!("body is `{}`, expected `{}`", body.type_url, kind.type_url())));
    }
    if body.value.len() > MAX_RESOURCE_BYTES {
        return Err(reject(Some(kind), format!("body is larger than {MAX_RESOURCE_BYTES} bytes")));
    }
    let version = content_version(&body);
    if version != resource.version {
        return Err(reject(Some(kind), format!("version `{}` does not match its content", resource.version)));
    }
    Ok(((kind, resource.name), RawResource { version, body }))
}
