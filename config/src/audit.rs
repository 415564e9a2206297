//! Audit policies: which requests a data plane records as IHE BALP AuditEvents, and how durably.
//!
//! A tenant's policy says the mode and the interactions recorded for its callers; a route's policy can turn auditing
//! off on that route, raise the mode for every tenant, or replace the list of interactions. [`effective`] combines
//! the two; both planes validate policies with [`AuditPolicy::parse`].

use fhirgw_proto::config::v1 as pb;

/// How durably an event is recorded. Ordered: a stricter mode compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuditMode {
    Off,
    /// Queued for the spool; dropped (counted, logged) when the queue or the spool is full. Never slows traffic.
    Relaxed,
    /// The response waits until the event is durable in the spool; 503 when it cannot be.
    Strict,
}

impl AuditMode {
    pub fn name(self) -> &'static str {
        match self {
            AuditMode::Off => "off",
            AuditMode::Relaxed => "relaxed",
            AuditMode::Strict => "strict",
        }
    }

    /// `off`, `relaxed` or `strict` (data-plane flags use the same words).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "off" => Some(AuditMode::Off),
            "relaxed" => Some(AuditMode::Relaxed),
            "strict" => Some(AuditMode::Strict),
            _ => None,
        }
    }
}

/// The interactions a policy can select, by the names operators write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditInteraction {
    Capabilities,
    /// Read and vread.
    Read,
    /// Type, system and compartment searches.
    Search,
    History,
    Create,
    /// Updates and conditional updates.
    Update,
    Patch,
    Delete,
    /// `$everything`, `$meta-add`, `$meta-delete`, `$docref`, and operations the gateway refuses.
    Operation,
    /// Bulk export: kick-off, status, files, cancel.
    Export,
    /// A batch or transaction refused before its entries could be read (entries count as their own interaction).
    Batch,
}

impl AuditInteraction {
    pub const ALL: [AuditInteraction; 11] = [
        AuditInteraction::Capabilities,
        AuditInteraction::Read,
        AuditInteraction::Search,
        AuditInteraction::History,
        AuditInteraction::Create,
        AuditInteraction::Update,
        AuditInteraction::Patch,
        AuditInteraction::Delete,
        AuditInteraction::Operation,
        AuditInteraction::Export,
        AuditInteraction::Batch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuditInteraction::Capabilities => "capabilities",
            AuditInteraction::Read => "read",
            AuditInteraction::Search => "search",
            AuditInteraction::History => "history",
            AuditInteraction::Create => "create",
            AuditInteraction::Update => "update",
            AuditInteraction::Patch => "patch",
            AuditInteraction::Delete => "delete",
            AuditInteraction::Operation => "operation",
            AuditInteraction::Export => "export",
            AuditInteraction::Batch => "batch",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of interactions (a bit set: checked on every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interactions(u16);

impl Interactions {
    pub fn contains(self, interaction: AuditInteraction) -> bool {
        self.0 & interaction.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn names(self) -> Vec<&'static str> {
        AuditInteraction::ALL.iter().filter(|i| self.contains(**i)).map(|i| i.name()).collect()
    }
}

impl FromIterator<AuditInteraction> for Interactions {
    fn from_iter<T: IntoIterator<Item = AuditInteraction>>(iter: T) -> Self {
        Interactions(iter.into_iter().fold(0, |bits, i| bits | i.bit()))
    }
}

/// A validated `AuditPolicy`: `mode` is `None` when unset (a tenant: off; a route: the tenant's), `interactions`
/// empty when every interaction is recorded (a route: the tenant's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditPolicy {
    pub mode: Option<AuditMode>,
    pub interactions: Interactions,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditPolicyError {
    #[error("audit mode {0} is not one of OFF, RELAXED, STRICT")]
    Mode(i32),
    #[error("audit interaction `{0}` is not one of {list}", list = AuditInteraction::ALL.map(AuditInteraction::name).join(", "))]
    Interaction(String),
}

impl AuditPolicy {
    pub fn parse(msg: Option<&pb::AuditPolicy>) -> Result<Self, AuditPolicyError> {
        let Some(msg) = msg else { return Ok(AuditPolicy::default()) };
        let mode = match pb::AuditMode::try_from(msg.mode) {
            Ok(pb::AuditMode::Unspecified) => None,
            Ok(pb::AuditMode::Off) => Some(AuditMode::Off),
            Ok(pb::AuditMode::Relaxed) => Some(AuditMode::Relaxed),
            Ok(pb::AuditMode::Strict) => Some(AuditMode::Strict),
            Err(_) => return Err(AuditPolicyError::Mode(msg.mode)),
        };
        let mut interactions = Vec::with_capacity(msg.interactions.len());
        for name in &msg.interactions {
            let interaction = AuditInteraction::ALL
                .into_iter()
                .find(|i| i.name() == name)
                .ok_or_else(|| AuditPolicyError::Interaction(name.chars().take(64).collect()))?;
            interactions.push(interaction);
        }
        Ok(AuditPolicy { mode, interactions: interactions.into_iter().collect() })
    }
}

/// How a request of `interaction` is recorded, given its tenant's policy (`None`: no tenant, e.g. an unauthenticated
/// request, whose mode is the data plane's `fallback`) and its route's (`None`: no route matched).
pub fn effective(
    tenant: Option<&AuditPolicy>,
    route: Option<&AuditPolicy>,
    fallback: AuditMode,
    interaction: AuditInteraction,
) -> AuditMode {
    let route = route.copied().unwrap_or_default();
    if route.mode == Some(AuditMode::Off) {
        return AuditMode::Off;
    }
    let base = match tenant {
        Some(policy) => policy.mode.unwrap_or(AuditMode::Off),
        None => fallback,
    };
    let mode = base.max(route.mode.unwrap_or(AuditMode::Off));
    let list = if route.interactions.is_empty() {
        tenant.map(|t| t.interactions).unwrap_or_default()
    } else {
        route.interactions
    };
    if list.is_empty() || list.contains(interaction) { mode } else { AuditMode::Off }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: i32, interactions: &[&str]) -> pb::AuditPolicy {
        pb::AuditPolicy { mode, interactions: interactions.iter().map(|s| (*s).to_owned()).collect() }
    }

    #[test]
    fn parsing() {
        let ok = AuditPolicy::parse(Some(&policy(3, &["read", "export"]))).unwrap_or_default();
        assert_eq!(ok.mode, Some(AuditMode::Strict));
        assert_eq!(ok.interactions.names(), ["read", "export"]);
        assert_eq!(AuditPolicy::parse(None), Ok(AuditPolicy::default()));
        assert_eq!(AuditPolicy::parse(Some(&policy(0, &[]))), Ok(AuditPolicy::default()));
        assert_eq!(AuditPolicy::parse(Some(&policy(9, &[]))), Err(AuditPolicyError::Mode(9)));
        assert!(matches!(
            AuditPolicy::parse(Some(&policy(2, &["read", "vread"]))),
            Err(AuditPolicyError::Interaction(name)) if name == "vread"
        ));
    }

    #[test]
    fn effective_table() {
        use AuditInteraction::{Create, Read};
        use AuditMode::{Off, Relaxed, Strict};
        let p = |mode: Option<AuditMode>, list: &[AuditInteraction]| AuditPolicy {
            mode,
            interactions: list.iter().copied().collect(),
        };
        let unset = p(None, &[]);
        #[rustfmt::skip]
        type Case = (Option<AuditPolicy>, Option<AuditPolicy>, AuditMode, AuditInteraction, AuditMode);
        let cases: Vec<Case> = vec![
            // A tenant alone.
            (Some(unset), None, Strict, Read, Off),
            (Some(p(Some(Relaxed), &[])), None, Off, Read, Relaxed),
            (Some(p(Some(Strict), &[Create])), None, Off, Read, Off),
            (Some(p(Some(Strict), &[Create])), None, Off, Create, Strict),
            // A route turns auditing off, raises the mode, or replaces the list.
            (Some(p(Some(Strict), &[])), Some(p(Some(Off), &[])), Off, Read, Off),
            (Some(unset), Some(p(Some(Relaxed), &[])), Off, Read, Relaxed),
            (Some(p(Some(Strict), &[])), Some(p(Some(Relaxed), &[])), Off, Read, Strict),
            (Some(p(Some(Relaxed), &[Create])), Some(p(None, &[Read])), Off, Read, Relaxed),
            (Some(p(Some(Relaxed), &[Read])), Some(p(None, &[Create])), Off, Read, Off),
            (Some(p(Some(Relaxed), &[])), Some(unset), Off, Read, Relaxed),
            // No tenant (unauthenticated): the data plane's fallback, still subject to the route.
            (None, None, Relaxed, Read, Relaxed),
            (None, Some(p(Some(Off), &[])), Strict, Read, Off),
            (None, Some(p(Some(Strict), &[])), Relaxed, Read, Strict),
            (None, Some(p(None, &[Create])), Relaxed, Read, Off),
        ];
        for (i, (tenant, route, fallback, interaction, want)) in cases.into_iter().enumerate() {
            assert_eq!(effective(tenant.as_ref(), route.as_ref(), fallback, interaction), want, "case {i}");
        }
    }
}
