//! Tenants and their dataset grants.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fhirgw_proto::config::v1 as pb;

use crate::audit::{AuditPolicy, AuditPolicyError};
use crate::names::{self, NameError};

/// Most grants one tenant may hold.
pub const MAX_GRANTS_PER_TENANT: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag {
    pub system: String,
    pub code: String,
}

impl Tag {
    pub fn parse(msg: Option<&pb::Tag>) -> Result<Self, NameError> {
        let Some(msg) = msg else {
            return Err(NameError::Empty { what: "tag" });
        };
        names::tag_system(&msg.system)?;
        names::tag_code(&msg.code)?;
        Ok(Tag { system: msg.system.clone(), code: msg.code.clone() })
    }

    /// `system|code`, as used in `_tag` searches.
    pub fn token(&self) -> String {
        format!("{}|{}", self.system, self.code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub tag: Tag,
    pub expires_at: Option<SystemTime>,
}

impl Grant {
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub display_name: String,
    pub grants: Vec<Grant>,
    /// What the data planes record of this tenant's requests.
    pub audit: AuditPolicy,
}

impl Tenant {
    /// Tags granted at `now`. Expiry is evaluated by the caller's clock at each use, so a grant stops working at the
    /// instant it expires, with no push needed.
    pub fn active_tags(&self, now: SystemTime) -> impl Iterator<Item = &Tag> {
        self.grants.iter().filter(move |g| g.is_active(now)).map(|g| &g.tag)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Audit(#[from] AuditPolicyError),
    #[error("{0}")]
    Invalid(String),
}

pub fn timestamp_to_system(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

pub fn system_to_timestamp(at: SystemTime) -> prost_types::Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// Checks a tenant's own fields; returns its audit policy.
pub fn tenant_fields(msg: &pb::Tenant) -> Result<AuditPolicy, TenantError> {
    names::object_name("tenant name", &msg.name)?;
    names::text("display_name", &msg.display_name)?;
    Ok(AuditPolicy::parse(msg.audit.as_ref())?)
}

/// Checks a grant's own fields (not whether its tenant exists, nor whether it already expired).
pub fn grant_fields(msg: &pb::Grant) -> Result<Grant, TenantError> {
    names::object_name("grant tenant", &msg.tenant)?;
    let tag = Tag::parse(msg.tag.as_ref())?;
    let expires_at = match &msg.expires_at {
        None => None,
        Some(ts) => {
            Some(timestamp_to_system(ts).ok_or_else(|| TenantError::Invalid("expires_at is out of range".into()))?)
        }
    };
    Ok(Grant { tag, expires_at })
}

impl TryFrom<&pb::TenantConfig> for Tenant {
    type Error = TenantError;

    fn try_from(msg: &pb::TenantConfig) -> Result<Self, Self::Error> {
        let Some(tenant) = &msg.tenant else {
            return Err(TenantError::Invalid("tenant config has no tenant".into()));
        };
        let audit = tenant_fields(tenant)?;
        if msg.grants.len() > MAX_GRANTS_PER_TENANT {
            return Err(TenantError::Invalid(format!("more than {MAX_GRANTS_PER_TENANT} grants")));
        }
        let mut grants: Vec<Grant> = Vec::with_capacity(msg.grants.len());
        for g in &msg.grants {
            if g.tenant != tenant.name {
                return Err(TenantError::Invalid(format!("grant for `{}` inside tenant `{}`", g.tenant, tenant.name)));
            }
            let grant = grant_fields(g)?;
            if grants.iter().any(|existing| existing.tag == grant.tag) {
                return Err(TenantError::Invalid(format!("tag `{}` is granted twice", grant.tag.token())));
            }
            grants.push(grant);
        }
        Ok(Tenant { name: tenant.name.clone(), display_name: tenant.display_name.clone(), grants, audit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(tenant: &str, code: &str, expires: Option<i64>) -> pb::Grant {
        pb::Grant {
            tenant: tenant.into(),
            tag: Some(pb::Tag { system: "https://fhirgw.dev/dataset".into(), code: code.into() }),
            expires_at: expires.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        }
    }

    #[test]
    fn expiry_is_evaluated_at_use() {
        let cfg = pb::TenantConfig {
            tenant: Some(pb::Tenant { name: "a".into(), ..Default::default() }),
            grants: vec![grant("a", "x", Some(1_000)), grant("a", "y", None)],
        };
        let t = Tenant::try_from(&cfg).unwrap_or_else(|e| panic!("{e}"));
        let before = UNIX_EPOCH + Duration::from_secs(999);
        let at = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(t.active_tags(before).count(), 2);
        let after: Vec<_> = t.active_tags(at).map(|tag| tag.code.as_str()).collect();
        assert_eq!(after, ["y"]);
    }

    #[test]
    fn invalid_tenant_configs() {
        let tenant = Some(pb::Tenant { name: "a".into(), ..Default::default() });
        let cases = [
            ("no tenant", pb::TenantConfig { tenant: None, grants: vec![] }),
            ("foreign grant", pb::TenantConfig { tenant: tenant.clone(), grants: vec![grant("b", "x", None)] }),
            (
                "duplicate tag",
                pb::TenantConfig { tenant: tenant.clone(), grants: vec![grant("a", "x", None), grant("a", "x", None)] },
            ),
            ("bad code", pb::TenantConfig { tenant: tenant.clone(), grants: vec![grant("a", "x y", None)] }),
            ("bad expiry", pb::TenantConfig { tenant, grants: vec![grant("a", "x", Some(-5))] }),
        ];
        for (what, cfg) in cases {
            assert!(Tenant::try_from(&cfg).is_err(), "{what} should be refused");
        }
    }
}
