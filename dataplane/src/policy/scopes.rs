//! SMART on FHIR scopes, v1 (`user/Observation.read`) and v2 (`user/Observation.rs`) grammars.
//!
//! A scope the gateway does not fully understand grants nothing: granular v2 scopes (`?category=…`) and unknown
//! forms are ignored rather than widened.

use std::collections::BTreeSet;

/// Whose data a scope covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    /// Only the compartment of the patient in the token's `patient` claim.
    Patient,
    /// Whatever the user may see: here, the tenant's grants.
    User,
    /// A backend service: the tenant's grants.
    System,
}

/// The SMART v2 permission letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scope {
    pub context: Context,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub permissions: BTreeSet<Permission>,
}

impl Scope {
    pub fn parse(raw: &str) -> Option<Scope> {
        let (context, rest) = raw.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        if rest.contains('?') {
            // Granular v2 scopes narrow by search parameters; not enforced yet, so they grant nothing.
            return None;
        }
        let (ty, perms) = rest.split_once('.')?;
        let resource_type = match ty {
            "*" => None,
            t if !t.is_empty()
                && t.starts_with(|c: char| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphabetic()) =>
            {
                Some(t.to_owned())
            }
            _ => return None,
        };
        use Permission::*;
        let permissions: BTreeSet<Permission> = match perms {
            "read" => [Read, Search].into(),
            "write" => [Create, Update, Delete].into(),
            "*" => [Create, Read, Update, Delete, Search].into(),
            v2 => {
                // Letters in the order c, r, u, d, s, each at most once.
                let mut out = BTreeSet::new();
                let mut last = 0;
                for c in v2.chars() {
                    let (rank, p) = match c {
                        'c' => (1, Create),
                        'r' => (2, Read),
                        'u' => (3, Update),
                        'd' => (4, Delete),
                        's' => (5, Search),
                        _ => return None,
                    };
                    if rank <= last {
                        return None;
                    }
                    last = rank;
                    out.insert(p);
                }
                if out.is_empty() {
                    return None;
                }
                out
            }
        };
        Some(Scope { context, resource_type, permissions })
    }

    fn covers(&self, resource_type: &str, permission: Permission) -> bool {
        self.resource_type.as_deref().is_none_or(|t| t == resource_type) && self.permissions.contains(&permission)
    }
}

/// The scopes of one token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    scopes: Vec<Scope>,
}

/// What the scopes allow for one interaction on one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Tenant-wide (`user/` or `system/`).
    Tenant,
    /// Only within the token's patient compartment.
    PatientOnly,
    No,
}

impl Scopes {
    /// Parses a space-separated `scope` claim; unknown scopes (openid, launch, offline_access, …) are ignored.
    pub fn parse(claim: &str) -> Scopes {
        Scopes { scopes: claim.split_ascii_whitespace().filter_map(Scope::parse).collect() }
    }

    pub fn from_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Scopes {
        Scopes { scopes: items.into_iter().filter_map(Scope::parse).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The resource types named by `user/` or `system/` scopes granting `permission`, in order; `None` when a
    /// wildcard (`*`) grants it for every type, so no list can be given.
    pub fn named_types(&self, permission: Permission) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for scope in self.scopes.iter().filter(|s| s.context != Context::Patient && s.permissions.contains(&permission))
        {
            match &scope.resource_type {
                None => return None,
                Some(ty) if !out.contains(ty) => out.push(ty.clone()),
                Some(_) => {}
            }
        }
        Some(out)
    }

    pub fn allows(&self, resource_type: &str, permission: Permission) -> Allowed {
        let mut patient = false;
        for scope in self.scopes.iter().filter(|s| s.covers(resource_type, permission)) {
            match scope.context {
                Context::User | Context::System => return Allowed::Tenant,
                Context::Patient => patient = true,
            }
        }
        if patient { Allowed::PatientOnly } else { Allowed::No }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    type Expected<'a> = Option<(Context, Option<&'a str>, &'a [Permission])>;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Expected)] = &[
            ("patient/*.read", Some((Context::Patient, None, &[Read, Search]))),
            ("user/Observation.read", Some((Context::User, Some("Observation"), &[Read, Search]))),
            ("system/*.write", Some((Context::System, None, &[Create, Update, Delete]))),
            ("system/*.*", Some((Context::System, None, &[Create, Read, Update, Delete, Search]))),
            ("patient/Observation.rs", Some((Context::Patient, Some("Observation"), &[Read, Search]))),
            ("user/Patient.cruds", Some((Context::User, Some("Patient"), &[Create, Read, Update, Delete, Search]))),
            ("user/Patient.r", Some((Context::User, Some("Patient"), &[Read]))),
            ("user/Patient.sr", None),
            ("user/Patient.rr", None),
            ("user/Patient.x", None),
            ("user/Patient.", None),
            ("user/patient.read", None),
            ("user/Observation.rs?category=laboratory", None),
            ("admin/*.read", None),
            ("openid", None),
            ("launch/patient", None),
            ("offline_access", None),
        ];
        for (raw, want) in cases {
            let got = Scope::parse(raw)
                .map(|s| (s.context, s.resource_type.clone(), s.permissions.iter().copied().collect::<Vec<_>>()));
            let want = want.map(|(c, t, p)| (c, t.map(str::to_owned), p.to_vec()));
            assert_eq!(got, want, "{raw}");
        }
    }

    #[test]
    fn allows_table() {
        let s = Scopes::parse("openid user/Observation.rs patient/Patient.read system/Encounter.c");
        let cases = [
            ("Observation", Read, Allowed::Tenant),
            ("Observation", Search, Allowed::Tenant),
            ("Observation", Update, Allowed::No),
            ("Patient", Read, Allowed::PatientOnly),
            ("Patient", Create, Allowed::No),
            ("Encounter", Create, Allowed::Tenant),
            ("Encounter", Read, Allowed::No),
            ("Condition", Read, Allowed::No),
        ];
        for (ty, p, want) in cases {
            assert_eq!(s.allows(ty, p), want, "{ty} {p:?}");
        }
        assert!(Scopes::parse("openid profile").is_empty());
    }

    #[test]
    fn named_types_table() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("user/Observation.rs system/Patient.read user/Observation.r", Some(&["Observation", "Patient"])),
            ("user/Observation.c patient/Condition.read", Some(&[])),
            ("user/Observation.read user/*.rs", None),
            ("patient/*.read user/Encounter.r", Some(&["Encounter"])),
            ("openid", Some(&[])),
        ];
        for (claim, want) in cases {
            let want = want.map(|w| w.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>());
            assert_eq!(Scopes::parse(claim).named_types(Read), want, "{claim}");
        }
    }
}
