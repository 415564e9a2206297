//! What a SMART on FHIR app discovers: `.well-known/smart-configuration` from the pushed identity settings, and
//! the upstream's CapabilityStatement rewritten to the public base, with the SMART security extension and only the
//! interactions and operations the gateway actually lets through, plus those its own handlers serve (`$docref`,
//! bulk `$export`).

use fhirgw_config::Snapshot;
use fhirgw_config::route::{Action, Handler, RouteTable};
use http::Method;
use serde_json::{Value, json};

/// The SMART configuration document, or `None` when no identity provider is configured.
pub fn smart_configuration(snapshot: &Snapshot) -> Option<Value> {
    let idp = snapshot
        .identity_providers
        .iter()
        .filter(|p| p.token_endpoint.is_some())
        .chain(snapshot.identity_providers.iter())
        .min_by_key(|p| (p.token_endpoint.is_none(), p.name.clone()))?;
    let mut doc = json!({
        "issuer": idp.issuer,
        "jwks_uri": idp.jwks_uri,
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
        "scopes_supported": [
            "openid", "fhirUser", "offline_access",
            "user/*.read", "user/*.rs", "user/*.cruds", "system/*.read", "system/*.rs", "system/*.cruds"
        ],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "permission-v1", "permission-v2", "permission-user"
        ],
    });
    let obj = doc.as_object_mut()?;
    for (key, value) in [
        ("authorization_endpoint", &idp.authorization_endpoint),
        ("token_endpoint", &idp.token_endpoint),
        ("introspection_endpoint", &idp.introspection_endpoint),
    ] {
        if let Some(v) = value {
            obj.insert(key.into(), json!(v));
        }
    }
    Some(doc)
}

fn proxied(table: &RouteTable, method: &Method, path: &[&str]) -> bool {
    let segments: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
    table.route(method, &segments).is_some_and(|m| matches!(m.route.action, Action::Proxy { .. }))
}

fn handled(table: &RouteTable, method: &Method, path: &[&str], handler: Handler) -> bool {
    let segments: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
    table
        .route(method, &segments)
        .is_some_and(|m| matches!(m.route.action, Action::Handler { handler: h, .. } if h == handler))
}

const BULK: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition";

/// The operations the gateway's own handlers serve on `ty` (`None`: at the system level), as CapabilityStatement
/// entries. Bulk export counts only with its status endpoint routed too.
fn handler_operations(table: &RouteTable, ty: Option<&str>) -> Vec<Value> {
    let get = Method::GET;
    let export = |path: &[&str]| {
        handled(table, &get, path, Handler::Export)
            && handled(table, &get, &[crate::policy::export::STATUS_OP], Handler::Export)
    };
    let mut ops = Vec::new();
    match ty {
        None if export(&["$export"]) => ops.push(json!({"name": "export", "definition": format!("{BULK}/export")})),
        Some("Patient") if export(&["Patient", "$export"]) => {
            ops.push(json!({"name": "export", "definition": format!("{BULK}/patient-export")}));
        }
        Some("Group") if export(&["Group", "x", "$export"]) => {
            ops.push(json!({"name": "export", "definition": format!("{BULK}/group-export")}));
        }
        Some("DocumentReference") if handled(table, &get, &["DocumentReference", "$docref"], Handler::DocRef) => {
            ops.push(json!({"name": "docref", "definition": "http://hl7.org/fhir/us/core/OperationDefinition/docref"}));
        }
        _ => {}
    }
    ops
}

/// Instance-level interactions the gateway serves, with a request that exercises each.
const INTERACTIONS: &[(&str, &str, &[&str])] = &[
    ("read", "GET", &["{type}", "x"]),
    ("vread", "GET", &["{type}", "x", "_history", "1"]),
    ("search-type", "GET", &["{type}"]),
    ("history-instance", "GET", &["{type}", "x", "_history"]),
    ("history-type", "GET", &["{type}", "_history"]),
    ("create", "POST", &["{type}"]),
    ("update", "PUT", &["{type}", "x"]),
    ("patch", "PATCH", &["{type}", "x"]),
    ("delete", "DELETE", &["{type}", "x"]),
];

/// Rewrites an upstream CapabilityStatement for the gateway.
pub fn capability_statement(mut cs: Value, snapshot: &Snapshot, table: &RouteTable, public: &str) -> Value {
    if let Some(obj) = cs.as_object_mut() {
        let implementation = obj.entry("implementation").or_insert_with(|| json!({"description": "fhirgw"}));
        if let Some(i) = implementation.as_object_mut() {
            i.insert("url".into(), json!(public));
        }
    }
    let idp = snapshot.identity_providers.iter().min_by_key(|p| (p.token_endpoint.is_none(), p.name.clone()));
    let Some(rests) = cs.get_mut("rest").and_then(Value::as_array_mut) else { return cs };
    for rest in rests.iter_mut() {
        let Some(rest) = rest.as_object_mut() else { continue };
        // Of the system-level interactions, batch and transaction (entry by entry) and search (narrowed) are
        // served; system history and system operations are refused.
        let batch = proxied(table, &Method::POST, &[]);
        let system_search = proxied(table, &Method::GET, &[]);
        if let Some(list) = rest.get_mut("interaction").and_then(Value::as_array_mut) {
            list.retain(|i| match i.get("code").and_then(Value::as_str) {
                Some("batch" | "transaction") => batch,
                Some("search-system") => system_search,
                _ => false,
            });
        }
        if rest.get("interaction").and_then(Value::as_array).is_some_and(Vec::is_empty) {
            rest.remove("interaction");
        }
        rest.remove("operation");
        let system_ops = handler_operations(table, None);
        if !system_ops.is_empty() {
            rest.insert("operation".into(), Value::Array(system_ops));
        }
        if let Some(idp) = idp {
            let mut uris = Vec::new();
            for (name, value) in [
                ("token", &idp.token_endpoint),
                ("authorize", &idp.authorization_endpoint),
                ("introspect", &idp.introspection_endpoint),
            ] {
                if let Some(v) = value {
                    uris.push(json!({"url": name, "valueUri": v}));
                }
            }
            rest.insert(
                "security".into(),
                json!({
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                    "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": uris}],
                }),
            );
        }
        let Some(resources) = rest.get_mut("resource").and_then(Value::as_array_mut) else { continue };
        resources.retain_mut(|resource| {
            let ty = resource.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
            let Some(r) = resource.as_object_mut() else { return false };
            let allowed: Vec<&str> = INTERACTIONS
                .iter()
                .filter(|(_, method, path)| {
                    let path: Vec<&str> = path.iter().map(|s| if *s == "{type}" { ty.as_str() } else { s }).collect();
                    Method::from_bytes(method.as_bytes()).is_ok_and(|m| proxied(table, &m, &path))
                })
                .map(|(code, _, _)| *code)
                .collect();
            if let Some(list) = r.get_mut("interaction").and_then(Value::as_array_mut) {
                list.retain(|i| i.get("code").and_then(Value::as_str).is_some_and(|c| allowed.contains(&c)));
            }
            // Conditional writes are resolved by the gateway with a narrowed search, one match at a time.
            r.insert("conditionalUpdate".into(), json!(proxied(table, &Method::PUT, &[ty.as_str()])));
            // An update never creates: the id could be taken in another tenant (see `ProxyError::UpdateAsCreate`).
            r.insert("updateCreate".into(), json!(false));
            let conditional_delete =
                if proxied(table, &Method::DELETE, &[ty.as_str()]) { "single" } else { "not-supported" };
            r.insert("conditionalDelete".into(), json!(conditional_delete));
            let everything = ty == "Patient" && proxied(table, &Method::GET, &["Patient", "x", "$everything"]);
            if let Some(ops) = r.get_mut("operation").and_then(Value::as_array_mut) {
                ops.retain(|o| everything && o.get("name").and_then(Value::as_str) == Some("everything"));
            }
            let own = handler_operations(table, Some(&ty));
            if !own.is_empty() {
                let ops = r.entry("operation").or_insert_with(|| json!([]));
                if let Some(ops) = ops.as_array_mut() {
                    ops.extend(own);
                }
            }
            !allowed.is_empty()
        });
    }
    cs
}
