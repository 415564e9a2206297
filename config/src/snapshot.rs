//! A whole configuration, validated as one unit. Built by the data plane from each push and by the control plane
//! before each write, with this one function.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fhirgw_proto::config::v1 as pb;
use prost::Message;

use crate::identity::IdentityProvider;
use crate::path::NormalPath;
use crate::resource::{Kind, RawResource, Rejection, ResourceSet, set_digest};
use crate::route::RouteTable;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Store revision this configuration was computed from (0 before any).
    pub system_version: u64,
    /// Digest of `resources`: the configuration's identity on both planes.
    pub digest: String,
    pub resources: ResourceSet,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Longest base path first.
    pub tables: Vec<RouteTable>,
    pub tenants: HashMap<String, Tenant>,
    pub identity_providers: Vec<IdentityProvider>,
}

fn decode<M: Message + Default>(raw: &RawResource) -> Result<M, String> {
    M::decode(raw.body.value.as_slice()).map_err(|e| format!("body does not decode: {e}"))
}

fn check_name(key: &str, body: &str) -> Result<(), String> {
    if key == body { Ok(()) } else { Err(format!("resource name `{key}` differs from the name in its body `{body}`")) }
}

impl Snapshot {
    pub fn empty() -> Self {
        Self::build(ResourceSet::new(), 0).unwrap_or_else(|_| Snapshot {
            system_version: 0,
            digest: set_digest(&ResourceSet::new()),
            resources: ResourceSet::new(),
            upstreams: BTreeMap::new(),
            tables: Vec::new(),
            tenants: HashMap::new(),
            identity_providers: Vec::new(),
        })
    }

    /// Validates every resource and the references between them. On failure, every rejected resource is named.
    pub fn build(resources: ResourceSet, system_version: u64) -> Result<Self, Vec<Rejection>> {
        let mut rejections = Vec::new();
        let mut upstreams = BTreeMap::new();
        let mut tables = Vec::new();
        let mut tenants = HashMap::new();
        let mut identity_providers: Vec<IdentityProvider> = Vec::new();

        for ((kind, name), raw) in &resources {
            let reject =
                |reason: String| Rejection { kind: *kind, name: name.clone(), version: raw.version.clone(), reason };
            let result: Result<(), String> = match kind {
                Kind::Upstream => decode::<pb::Upstream>(raw).and_then(|msg| {
                    check_name(name, &msg.name)?;
                    let upstream = Upstream::try_from(&msg).map_err(|e| e.to_string())?;
                    upstreams.insert(name.clone(), Arc::new(upstream));
                    Ok(())
                }),
                Kind::RouteTable => decode::<pb::RouteTable>(raw).and_then(|msg| {
                    check_name(name, &msg.name)?;
                    tables.push((raw.version.clone(), RouteTable::try_from(&msg).map_err(|e| e.to_string())?));
                    Ok(())
                }),
                Kind::Tenant => decode::<pb::TenantConfig>(raw).and_then(|msg| {
                    check_name(name, msg.tenant.as_ref().map(|t| t.name.as_str()).unwrap_or_default())?;
                    tenants.insert(name.clone(), Tenant::try_from(&msg).map_err(|e| e.to_string())?);
                    Ok(())
                }),
                Kind::IdentityProvider => decode::<pb::IdentityProvider>(raw).and_then(|msg| {
                    check_name(name, &msg.name)?;
                    let idp = IdentityProvider::try_from(&msg).map_err(|e| e.to_string())?;
                    if let Some(other) = identity_providers.iter().find(|o| o.issuer == idp.issuer) {
                        return Err(format!("issuer `{}` is also configured by `{}`", idp.issuer, other.name));
                    }
                    identity_providers.push(idp);
                    Ok(())
                }),
            };
            if let Err(reason) = result {
                rejections.push(reject(reason));
            }
        }

        // References and overlaps between tables.
        for (i, (version, table)) in tables.iter().enumerate() {
            let reject = |reason: String| Rejection {
                kind: Kind::RouteTable,
                name: table.name.clone(),
                version: version.clone(),
                reason,
            };
            for route in table.routes() {
                if let Some(up) = route.action.upstream().filter(|up| !upstreams.contains_key(*up)) {
                    rejections.push(reject(format!("route `{}` refers to unknown upstream `{up}`", route.id)));
                }
            }
            for (_, other) in &tables[i + 1..] {
                let (short, long) = if table.base_segments.len() <= other.base_segments.len() {
                    (table, other)
                } else {
                    (other, table)
                };
                if long.base_segments.starts_with(&short.base_segments) {
                    rejections.push(reject(format!(
                        "base path `{}` of `{}` overlaps base path `{}` of `{}`",
                        table.base_path, table.name, other.base_path, other.name
                    )));
                }
            }
        }

        if !rejections.is_empty() {
            return Err(rejections);
        }
        let mut tables: Vec<RouteTable> = tables.into_iter().map(|(_, t)| t).collect();
        tables.sort_by(|a, b| b.base_segments.len().cmp(&a.base_segments.len()).then_with(|| a.name.cmp(&b.name)));
        Ok(Snapshot {
            system_version,
            digest: set_digest(&resources),
            resources,
            upstreams,
            tables,
            tenants,
            identity_providers,
        })
    }

    /// The table serving a path, and the path relative to its base.
    pub fn table_for<'a>(&'a self, path: &'a NormalPath) -> Option<(&'a RouteTable, &'a [String])> {
        self.tables.iter().find_map(|t| path.strip_prefix(&t.base_segments).map(|rel| (t, rel)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str) -> (crate::ResourceKey, RawResource) {
        let msg = pb::Upstream { name: name.into(), base_url: "http://127.0.0.1:1/fhir".into(), ..Default::default() };
        ((Kind::Upstream, name.into()), RawResource::encode(Kind::Upstream, &msg))
    }

    fn table(name: &str, base: &str, upstream: &str) -> (crate::ResourceKey, RawResource) {
        let msg = pb::RouteTable {
            name: name.into(),
            base_path: base.into(),
            routes: vec![pb::Route {
                id: "all".into(),
                path: "/**".into(),
                action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: upstream.into() })),
                ..Default::default()
            }],
        };
        ((Kind::RouteTable, name.into()), RawResource::encode(Kind::RouteTable, &msg))
    }

    #[test]
    fn a_valid_set_builds_and_routes_by_base() {
        let set: ResourceSet = [upstream("hapi"), table("r4", "/fhir", "hapi"), table("r5", "/r5", "hapi")].into();
        let snap = Snapshot::build(set.clone(), 7).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(snap.system_version, 7);
        assert_eq!(snap.digest, set_digest(&set));
        let path = NormalPath::parse("/r5/Patient/1").unwrap_or_else(|e| panic!("{e}"));
        let (t, rel) = snap.table_for(&path).unwrap_or_else(|| panic!("no table"));
        assert_eq!((t.name.as_str(), rel.len()), ("r5", 2));
    }

    #[test]
    fn dangling_references_and_nested_bases_are_rejected_by_name() {
        let set: ResourceSet = [table("r4", "/fhir", "missing")].into();
        let err = Snapshot::build(set, 1).err().unwrap_or_default();
        assert_eq!(err.len(), 1);
        assert!(err[0].reason.contains("unknown upstream `missing`"), "{}", err[0].reason);

        let set: ResourceSet = [upstream("hapi"), table("a", "/fhir", "hapi"), table("b", "/fhir/r4", "hapi")].into();
        let err = Snapshot::build(set, 1).err().unwrap_or_default();
        assert!(err.iter().any(|r| r.reason.contains("overlaps")), "{err:?}");
    }

    #[test]
    fn body_must_match_key_and_decode() {
        let (_, raw) = upstream("hapi");
        let set: ResourceSet = [((Kind::Upstream, "other".into()), raw)].into();
        assert!(Snapshot::build(set, 1).is_err());
        let junk = RawResource::new(Kind::Upstream, vec![0xff, 0xff, 0xff]);
        let set: ResourceSet = [((Kind::Upstream, "hapi".into()), junk)].into();
        assert!(Snapshot::build(set, 1).is_err());
    }
}
