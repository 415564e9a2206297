//! Bulk `$export` (Bulk Data Access IG v2), the pure parts.
//!
//! - A kick-off is narrowed before it leaves: `_type` is required (or filled from the types the scopes name), every
//!   type must be readable under the scopes, and each type gets a `_typeFilter` carrying the tenant's tags. A
//!   client's own `_typeFilter`s are kept, checked like searches (no chains, `_has`, `_filter`, …) and narrowed the
//!   same way: filters for one type are ORed by the server, so every one of them carries the tags.
//! - The upstream's status and file URLs are bearer capabilities; the client only ever sees gateway links carrying
//!   a token signed under a context of its own (a page token is never an export link, nor the reverse), bound to
//!   the tenant, the upstream and the kind of link, valid for 24 hours.
//! - The manifest keeps only what can be verified: file URLs on the upstream's base become signed links, per-file
//!   counts (which could count other tenants' resources) are dropped, `requiresAccessToken` is true. For the same
//!   reason a progress text with digits in it is not relayed.
//! - Every line of every file is verified on the way back (`line_visible`), so an upstream that ignores
//!   `_typeFilter` still hands out nothing outside the grants.

use std::time::{Duration, SystemTime};

use fhirgw_config::pattern::Class;
use fhirgw_config::route::QueryGuard;
use fhirgw_config::tenant::Tag;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::paging::{PageError, PageSigner, unix};
use super::query::{self, MAX_PARAMS, Params, QueryError, Use, is_date_time};
use super::verify::Grants;
use crate::policy::scopes::{Allowed, Permission, Scopes};

/// How long status and file links stay valid.
pub const EXPORT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The signing context of export links (see `PageSigner::seal`).
const EXPORT_CONTEXT: &[u8] = b"fhirgw/export\0";
/// The query parameter carrying an export link's token.
pub const TOKEN_PARAM: &str = "_token";
/// The gateway's status endpoint, relative to the FHIR base.
pub const STATUS_OP: &str = "$export-poll-status";
/// The gateway's file endpoint, relative to the FHIR base.
pub const FILE_OP: &str = "$export-file";
/// `_outputFormat` values meaning FHIR NDJSON; the upstream is always asked for the first.
const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// Control parameters a `_typeFilter` may use; ordinary search parameters are checked like any search.
const FILTER_CONTROL: &[&str] = &["_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    #[serde(rename = "status")]
    Status,
    #[serde(rename = "file")]
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportClaims {
    #[serde(rename = "k")]
    pub kind: LinkKind,
    #[serde(rename = "t")]
    pub tenant: String,
    /// Upstream name.
    #[serde(rename = "u")]
    pub upstream: String,
    /// Path and query on the upstream.
    #[serde(rename = "l")]
    pub target: String,
    /// For a file: the resource type the manifest declared for it; every line must be of that type.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the export link is malformed")]
    Malformed,
    #[error("the export link's signature is invalid")]
    BadSignature,
    #[error("the export link has expired")]
    Expired,
    #[error("the export link is not valid for this request")]
    Mismatch,
}

/// What a link must be bound to, to be honoured here.
pub struct Binding<'a> {
    pub kind: LinkKind,
    pub tenant: &'a str,
    pub upstream: &'a str,
    /// The upstream's base path (`/fhir`, or empty): the target must be on it.
    pub base_path: &'a str,
}

impl ExportClaims {
    pub fn new(binding: &Binding<'_>, target: String, resource_type: Option<String>, now: SystemTime) -> Self {
        ExportClaims {
            kind: binding.kind,
            tenant: binding.tenant.to_owned(),
            upstream: binding.upstream.to_owned(),
            target,
            resource_type,
            expires: unix(now + EXPORT_TTL),
        }
    }

    pub fn sign(&self, signer: &PageSigner) -> String {
        signer.seal(EXPORT_CONTEXT, self)
    }

    /// The claims of `token`, if it is a valid, unexpired export link bound exactly to `binding`.
    pub fn verify(
        signer: &PageSigner,
        token: &str,
        binding: &Binding<'_>,
        now: SystemTime,
    ) -> Result<ExportClaims, LinkError> {
        let claims: ExportClaims = signer.open(EXPORT_CONTEXT, token).map_err(|e| match e {
            PageError::BadSignature => LinkError::BadSignature,
            PageError::Malformed | PageError::Expired => LinkError::Malformed,
        })?;
        if unix(now) >= claims.expires {
            return Err(LinkError::Expired);
        }
        let base = binding.base_path;
        let on_base = claims.target.starts_with(&format!("{base}/")) || claims.target.starts_with(&format!("{base}?"));
        if claims.kind != binding.kind
            || claims.tenant != binding.tenant
            || claims.upstream != binding.upstream
            || !on_base
        {
            return Err(LinkError::Mismatch);
        }
        Ok(claims)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KickOffError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// 403: the scopes do not allow reading this type tenant-wide.
    #[error("The token's scopes do not allow exporting {0}.")]
    Scope(String),
    /// 403: nothing the caller may export.
    #[error("{0}")]
    Nothing(&'static str),
}

fn refuse(param: &str, reason: &'static str) -> KickOffError {
    KickOffError::Query(QueryError::Refused { param: param.to_owned(), reason })
}

/// The parameters of a `POST` kick-off (a `Parameters` resource), in the form a `GET` kick-off's query carries them,
/// for [`kickoff`] to check: `_type`, `_typeFilter` and `_outputFormat` as `valueString`, `_since` as `valueInstant`
/// (or `valueString`); and the ids of the `patient` references (`valueReference` to `Patient/<id>`), which the caller
/// must show to be visible before they go upstream. Any other parameter (`includeAssociatedData`, …), a parameter
/// with parts or a resource, or a value of another type is refused by name: nothing in the body is passed on
/// unchecked.
pub fn parameters(body: &Value) -> Result<(Params, Vec<String>), KickOffError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(refuse("resourceType", "a POST kick-off takes a Parameters resource"));
    }
    let entries = match body.get("parameter") {
        None => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(refuse("parameter", "must be an array")),
    };
    if entries.len() > MAX_PARAMS {
        return Err(refuse("*", "too many parameters"));
    }
    let (mut params, mut patients) = (Vec::with_capacity(entries.len()), Vec::new());
    for entry in entries {
        let Some(fields) = entry.as_object() else { return Err(refuse("parameter", "must be objects")) };
        let Some(name) = fields.get("name").and_then(Value::as_str) else {
            return Err(refuse("parameter", "each needs a name"));
        };
        let accepted: &[&str] = match name {
            "_type" | "_typeFilter" | "_outputFormat" => &["valueString"],
            "_since" => &["valueInstant", "valueString"],
            "patient" => &["valueReference"],
            _ => return Err(refuse(name, "is not supported by this gateway's bulk export")),
        };
        let mut value = None;
        for (key, item) in fields {
            match key.as_str() {
                "name" | "id" => {}
                key if accepted.contains(&key) && value.is_none() => value = Some(item),
                _ => {
                    return Err(refuse(name, "must have exactly one value (valueString; valueInstant for _since)"));
                }
            }
        }
        let Some(value) = value else { return Err(refuse(name, "has no value")) };
        if name == "patient" {
            let reference = value.as_object().filter(|r| r.len() == 1).and_then(|r| r.get("reference"));
            let id = reference.and_then(Value::as_str).and_then(|r| r.strip_prefix("Patient/"));
            match id {
                Some(id) if Class::Id.accepts(id) => patients.push(id.to_owned()),
                _ => return Err(refuse(name, "must be a reference to Patient/<id> and nothing else")),
            }
        } else {
            let Some(text) = value.as_str() else { return Err(refuse(name, "must be a string")) };
            params.push((name.to_owned(), text.to_owned()));
        }
    }
    Ok((params, patients))
}

/// The `Parameters` body of a kick-off sent upstream by `POST` (when it names patients): the narrowed parameters
/// from [`kickoff`] and the patients, each already shown visible.
pub fn upstream_parameters(params: &[(String, String)], patients: &[String]) -> Value {
    let mut parameter: Vec<Value> = params
        .iter()
        .map(|(name, value)| match name.as_str() {
            "_since" => json!({"name": name, "valueInstant": value}),
            _ => json!({"name": name, "valueString": value}),
        })
        .collect();
    parameter.extend(
        patients.iter().map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}})),
    );
    json!({"resourceType": "Parameters", "parameter": parameter})
}

/// Checks a kick-off's parameters and returns those sent upstream: `_type`, `_since`, `_outputFormat` and the
/// narrowed `_typeFilter`s. Every other parameter is refused.
pub fn kickoff(
    params: &[(String, String)],
    tags: &[&Tag],
    scopes: &Scopes,
    guard: &QueryGuard,
) -> Result<Params, KickOffError> {
    if params.len() > MAX_PARAMS {
        return Err(refuse("*", "too many parameters"));
    }
    let mut types: Option<Vec<String>> = None;
    let mut since: Option<&str> = None;
    let mut format_given = false;
    let mut filters: Vec<(String, Params)> = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "_type" => {
                let list = types.get_or_insert_with(Vec::new);
                for ty in value.split(',').map(str::trim) {
                    if !Class::Type.accepts(ty) {
                        return Err(refuse(key, "must list resource types"));
                    }
                    if !list.iter().any(|t| t == ty) {
                        list.push(ty.to_owned());
                    }
                }
            }
            "_since" => {
                if since.is_some() {
                    return Err(refuse(key, "may be given only once"));
                }
                if !is_date_time(value) {
                    return Err(refuse(key, "must be a FHIR instant"));
                }
                since = Some(value);
            }
            "_outputFormat" => {
                if format_given {
                    return Err(refuse(key, "may be given only once"));
                }
                if !NDJSON_FORMATS.contains(&value.as_str()) {
                    return Err(refuse(key, "only application/fhir+ndjson is served"));
                }
                format_given = true;
            }
            "_typeFilter" => {
                let (ty, search) = value.split_once('?').unwrap_or((value, ""));
                if !Class::Type.accepts(ty) {
                    return Err(refuse(key, "must be a resource type followed by a search, e.g. Observation?code=x"));
                }
                let search = query::parse(Some(search));
                query::check(Use::Search, &search, guard)?;
                for (name, _) in &search {
                    let bare = name.split(':').next().unwrap_or_default();
                    if bare.starts_with('_') && !FILTER_CONTROL.contains(&bare) {
                        return Err(KickOffError::Query(QueryError::Refused {
                            param: format!("_typeFilter {name}"),
                            reason: "is not allowed inside a _typeFilter",
                        }));
                    }
                }
                filters.push((ty.to_owned(), search));
            }
            _ => return Err(refuse(key, "is not supported through the gateway for bulk export")),
        }
    }
    let types = match types {
        Some(types) => types,
        None => scopes
            .named_types(Permission::Read)
            .ok_or_else(|| refuse("_type", "is required: name the resource types to export"))?,
    };
    if types.is_empty() {
        return Err(KickOffError::Nothing("The token's scopes allow exporting no resource type."));
    }
    if let Some(ty) = types.iter().find(|ty| scopes.allows(ty, Permission::Read) != Allowed::Tenant) {
        return Err(KickOffError::Scope(ty.clone()));
    }
    if filters.iter().any(|(ty, _)| !types.contains(ty)) {
        return Err(refuse("_typeFilter", "names a resource type that is not exported"));
    }
    if tags.is_empty() {
        return Err(KickOffError::Nothing("Your tenant holds no dataset to export."));
    }
    let mut out: Params = vec![("_type".into(), types.join(","))];
    if let Some(since) = since {
        out.push(("_since".into(), since.to_owned()));
    }
    out.push(("_outputFormat".into(), NDJSON_FORMATS[0].to_owned()));
    let tenant_only = Params::new();
    for ty in &types {
        let own: Vec<&Params> = filters.iter().filter(|(t, _)| t == ty).map(|(_, p)| p).collect();
        for search in if own.is_empty() { vec![&tenant_only] } else { own } {
            let narrowed = query::narrow(search, tags).ok_or(KickOffError::Nothing("no tags"))?;
            out.push(("_typeFilter".into(), format!("{ty}?{}", query::encode(&narrowed))));
        }
    }
    Ok(out)
}

/// The completion manifest as the client sees it. `target` maps an upstream URL to a path and query on the
/// upstream's base (`None` for any other URL: the gateway cannot fetch or verify it, so the manifest is refused);
/// `link` turns (target, declared type) into a signed public link; `request` is the kick-off URL to show.
pub fn rewrite_manifest(
    manifest: &Value,
    request: String,
    target: &dyn Fn(&str) -> Option<String>,
    link: &mut dyn FnMut(String, &str) -> String,
) -> Result<Value, String> {
    let obj = manifest.as_object().ok_or("the manifest is not a JSON object")?;
    let time = obj.get("transactionTime").and_then(Value::as_str).ok_or("the manifest has no transactionTime")?;
    let mut files = |member: &str, fixed_type: Option<&str>| -> Result<Vec<Value>, String> {
        let items = match obj.get(member) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(format!("manifest.{member} is not an array")),
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let ty = item.get("type").and_then(Value::as_str).filter(|t| Class::Type.accepts(t));
            let ty = ty.ok_or_else(|| format!("a manifest.{member} entry has no resource type"))?;
            let url = item.get("url").and_then(Value::as_str).unwrap_or_default();
            let on_upstream = target(url).ok_or_else(|| format!("manifest.{member} names a file off the upstream"))?;
            // Error files hold OperationOutcomes whatever their `type` says.
            let declared = fixed_type.unwrap_or(ty);
            out.push(json!({ "type": ty, "url": link(on_upstream, declared) }));
        }
        Ok(out)
    };
    let output = files("output", None)?;
    let error = files("error", Some("OperationOutcome"))?;
    Ok(json!({
        "transactionTime": time,
        "request": request,
        "requiresAccessToken": true,
        "output": output,
        "error": error,
    }))
}

/// The `X-Progress` shown while a job runs: the upstream's text if it is short, printable and free of digits;
/// otherwise `in progress`. A number could count other tenants' resources when the upstream did not narrow.
pub fn progress(upstream: Option<&str>) -> String {
    match upstream {
        Some(text)
            if !text.is_empty()
                && text.len() <= 100
                && text.chars().all(|c| c == ' ' || (c.is_ascii_graphic() && !c.is_ascii_digit())) =>
        {
            text.to_owned()
        }
        _ => "in progress".to_owned(),
    }
}

/// One NDJSON line of an export file: a resource of the file's declared type, of a type the scopes allow, covered
/// by the grants. OperationOutcomes (upstream diagnostics) and Bundles are never shown.
pub fn line_visible(
    resource: &Value,
    declared: Option<&str>,
    grants: &Grants,
    type_allowed: &dyn Fn(&str) -> bool,
) -> bool {
    match resource.get("resourceType").and_then(Value::as_str) {
        None | Some("OperationOutcome") | Some("Bundle") => false,
        Some(ty) => declared.is_none_or(|d| d == ty) && type_allowed(ty) && grants.covers(resource),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = "https://fhirgw.dev/dataset";

    fn tag(code: &str) -> Tag {
        Tag { system: DS.into(), code: code.into() }
    }

    fn kick(q: &str, scopes: &str, tags: &[&Tag]) -> Result<Vec<(String, String)>, KickOffError> {
        kickoff(&query::parse(Some(q)), tags, &Scopes::parse(scopes), &QueryGuard::default())
    }

    /// A `_typeFilter` value decoded for reading: `Type?name=value&…`.
    fn decoded(filter: &str) -> String {
        let (ty, q) = filter.split_once('?').unwrap_or_default();
        let pairs: Vec<String> = query::parse(Some(q)).iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{ty}?{}", pairs.join("&"))
    }

    #[test]
    fn post_parameters_become_query_parameters() {
        type Case = (&'static str, Value, Result<Vec<(&'static str, &'static str)>, &'static str>);
        // Patients come back separately; here they are listed as ("patient", id).
        let p = |parameter: Value| json!({"resourceType": "Parameters", "parameter": parameter});
        let cases: Vec<Case> = vec![
            ("empty", json!({"resourceType": "Parameters"}), Ok(vec![])),
            (
                "all four",
                p(json!([
                    {"name": "_type", "valueString": "Patient,Observation"},
                    {"name": "_type", "valueString": "Condition"},
                    {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"},
                    {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
                    {"name": "_typeFilter", "valueString": "Observation?code=1"}
                ])),
                Ok(vec![
                    ("_type", "Patient,Observation"),
                    ("_type", "Condition"),
                    ("_since", "2026-01-01T00:00:00Z"),
                    ("_outputFormat", "application/fhir+ndjson"),
                    ("_typeFilter", "Observation?code=1"),
                ]),
            ),
            (
                "_since as a string",
                p(json!([{"name": "_since", "valueString": "2026-01-01"}])),
                Ok(vec![("_since", "2026-01-01")]),
            ),
            (
                "with an id",
                p(json!([{"id": "x", "name": "_type", "valueString": "Patient"}])),
                Ok(vec![("_type", "Patient")]),
            ),
            ("not Parameters", json!({"resourceType": "Patient"}), Err("resourceType")),
            ("not JSON object", json!(["_type"]), Err("resourceType")),
            ("parameter not an array", json!({"resourceType": "Parameters", "parameter": {}}), Err("parameter")),
            ("entry not an object", p(json!(["_type"])), Err("parameter")),
            ("no name", p(json!([{"valueString": "Patient"}])), Err("parameter")),
            (
                "patients",
                p(json!([
                    {"name": "patient", "valueReference": {"reference": "Patient/1"}},
                    {"name": "_type", "valueString": "Observation"},
                    {"name": "patient", "valueReference": {"reference": "Patient/a-2"}}
                ])),
                Ok(vec![("_type", "Observation"), ("patient", "1"), ("patient", "a-2")]),
            ),
            (
                "patient of another type",
                p(json!([{"name": "patient", "valueReference": {"reference": "Group/1"}}])),
                Err("patient"),
            ),
            (
                "absolute patient",
                p(json!([{"name": "patient", "valueReference": {"reference": "http://x/fhir/Patient/1"}}])),
                Err("patient"),
            ),
            (
                "patient with a bad id",
                p(json!([{"name": "patient", "valueReference": {"reference": "Patient/a/b"}}])),
                Err("patient"),
            ),
            (
                "patient with more than a reference",
                p(
                    json!([{"name": "patient", "valueReference": {"reference": "Patient/1", "identifier": {"value": "x"}}}]),
                ),
                Err("patient"),
            ),
            ("patient as a string", p(json!([{"name": "patient", "valueString": "Patient/1"}])), Err("patient")),
            (
                "includeAssociatedData",
                p(json!([{"name": "includeAssociatedData", "valueCode": "x"}])),
                Err("includeAssociatedData"),
            ),
            ("unknown", p(json!([{"name": "_elements", "valueString": "id"}])), Err("_elements")),
            ("no value", p(json!([{"name": "_type"}])), Err("_type")),
            (
                "two values",
                p(json!([{"name": "_since", "valueInstant": "2026-01-01T00:00:00Z", "valueString": "x"}])),
                Err("_since"),
            ),
            ("wrong value type", p(json!([{"name": "_type", "valueCode": "Patient"}])), Err("_type")),
            ("value not a string", p(json!([{"name": "_type", "valueString": 1}])), Err("_type")),
            ("parts", p(json!([{"name": "_type", "valueString": "Patient", "part": []}])), Err("_type")),
            ("resource", p(json!([{"name": "_type", "resource": {"resourceType": "Patient"}}])), Err("_type")),
        ];
        for (what, body, want) in cases {
            let got = parameters(&body).map(|(mut params, patients)| {
                params.extend(patients.into_iter().map(|id| ("patient".to_owned(), id)));
                params
            });
            let got = got.map_err(|e| match e {
                KickOffError::Query(QueryError::Refused { param, .. }) => param,
                other => panic!("{what}: {other}"),
            });
            let want = want
                .map(|pairs| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>())
                .map_err(str::to_owned);
            assert_eq!(got, want, "{what}");
        }
        let many = p(Value::Array(vec![json!({"name": "_type", "valueString": "Patient"}); MAX_PARAMS + 1]));
        assert!(parameters(&many).is_err(), "too many");
    }

    #[test]
    fn upstream_parameters_carry_the_narrowed_list_and_the_patients() {
        let params = vec![
            ("_type".to_owned(), "Observation".to_owned()),
            ("_since".to_owned(), "2026-01-01T00:00:00Z".to_owned()),
            ("_typeFilter".to_owned(), "Observation?_tag=s%7Ca".to_owned()),
        ];
        let body = upstream_parameters(&params, &["p1".to_owned()]);
        assert_eq!(
            body,
            json!({"resourceType": "Parameters", "parameter": [
                {"name": "_type", "valueString": "Observation"},
                {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"},
                {"name": "_typeFilter", "valueString": "Observation?_tag=s%7Ca"},
                {"name": "patient", "valueReference": {"reference": "Patient/p1"}}
            ]})
        );
        // Read back by the gateway's own parser, it is the same list (what a server gets is what was checked).
        assert_eq!(parameters(&body).unwrap_or_else(|e| panic!("{e}")), (params, vec!["p1".to_owned()]));
    }

    #[test]
    fn kickoff_is_narrowed_to_the_tenant() {
        let a = tag("tenant-a");
        let mine = format!("_tag={DS}|tenant-a");
        // (query, scopes, expected _type, expected _typeFilters decoded)
        let cases: &[(&str, &str, &str, Vec<String>)] = &[
            (
                "_type=Patient,Observation",
                "user/*.read",
                "Patient,Observation",
                vec![format!("Patient?{mine}"), format!("Observation?{mine}")],
            ),
            (
                "_type=Patient&_type=Patient,Condition",
                "user/*.rs",
                "Patient,Condition",
                vec![format!("Patient?{mine}"), format!("Condition?{mine}")],
            ),
            // No `_type`: the types the scopes name.
            (
                "",
                "system/Observation.read system/Patient.rs user/Encounter.c",
                "Observation,Patient",
                vec![format!("Observation?{mine}"), format!("Patient?{mine}")],
            ),
            // The client's filters stay (ORed by the server), each narrowed.
            (
                "_type=Observation,Patient&_typeFilter=Observation%3Fcode%3D1234&_typeFilter=Observation%3Fstatus%3Dfinal",
                "user/*.read",
                "Observation,Patient",
                vec![
                    format!("Observation?code=1234&{mine}"),
                    format!("Observation?status=final&{mine}"),
                    format!("Patient?{mine}"),
                ],
            ),
            // A client `_tag` only narrows further.
            (
                "_type=Observation&_typeFilter=Observation%3F_tag%3Dhttps%3A%2F%2Fevil%7Cx",
                "user/*.read",
                "Observation",
                vec![format!("Observation?_tag=https://evil|x&{mine}")],
            ),
        ];
        for (q, scopes, types, filters) in cases {
            let out = kick(q, scopes, &[&a]).unwrap_or_else(|e| panic!("{q}: {e}"));
            let get =
                |name: &str| -> Vec<String> { out.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect() };
            assert_eq!(get("_type"), vec![(*types).to_owned()], "{q}");
            assert_eq!(get("_outputFormat"), vec!["application/fhir+ndjson".to_owned()], "{q}");
            let got: Vec<String> = get("_typeFilter").iter().map(|f| decoded(f)).collect();
            assert_eq!(&got, filters, "{q}");
        }
        // Several tags: ORed in one `_tag`, exactly as searches are narrowed; encoded twice (a query in a query).
        let a2 = tag("tenant-a2");
        let out = kick("_type=Patient&_since=2024-01-01T00:00:00Z&_outputFormat=ndjson", "user/*.read", &[&a, &a2])
            .unwrap_or_default();
        assert_eq!(
            query::encode(&out),
            "_type=Patient&_since=2024-01-01T00%3A00%3A00Z&_outputFormat=application%2Ffhir%2Bndjson&_typeFilter=Patient%3F_tag%3Dhttps%253A%252F%252Ffhirgw.dev%252Fdataset%257Ctenant-a%252Chttps%253A%252F%252Ffhirgw.dev%252Fdataset%257Ctenant-a2"
        );
    }

    #[test]
    fn kickoff_refusals() {
        let a = tag("tenant-a");
        let param = |r: Result<Params, KickOffError>| match r {
            Err(KickOffError::Query(QueryError::Refused { param, .. })) => param,
            other => format!("{other:?}"),
        };
        let refused: &[(&str, &str)] = &[
            ("", "_type"),
            ("_type=patient", "_type"),
            ("_type=Patient,", "_type"),
            ("_type=Patient&_since=yesterday", "_since"),
            ("_type=Patient&_since=2024&_since=2025", "_since"),
            ("_type=Patient&_outputFormat=application/json", "_outputFormat"),
            ("_type=Patient&_elements=id", "_elements"),
            ("_type=Patient&patient=Patient/1", "patient"),
            ("_type=Patient&includeAssociatedData=LatestProvenanceResources", "includeAssociatedData"),
            ("_type=Patient&_typeFilter=Observation%3Fcode%3D1", "_typeFilter"),
            ("_type=Patient&_typeFilter=patient%3Fname%3Dx", "_typeFilter"),
            (
                "_type=Patient&_typeFilter=Patient%3F_has%3AObservation%3Asubject%3Acode%3D1",
                "_has:Observation:subject:code",
            ),
            ("_type=Patient&_typeFilter=Patient%3Fgeneral-practitioner.name%3Dx", "general-practitioner.name"),
            ("_type=Patient&_typeFilter=Patient%3F_filter%3Dx", "_filter"),
            ("_type=Patient&_typeFilter=Patient%3F_revinclude%3DObservation%3Asubject", "_typeFilter _revinclude"),
            ("_type=Patient&_typeFilter=Patient%3F_count%3D1", "_typeFilter _count"),
        ];
        for (q, want) in refused {
            assert_eq!(param(kick(q, "user/*.read", &[&a])), *want, "{q}");
        }
        assert_eq!(
            kick("_type=Patient,Observation", "user/Patient.read", &[&a]),
            Err(KickOffError::Scope("Observation".into()))
        );
        assert_eq!(kick("_type=Patient", "patient/*.read", &[&a]), Err(KickOffError::Scope("Patient".into())));
        assert!(matches!(kick("", "user/Patient.c", &[&a]), Err(KickOffError::Nothing(_))));
        assert!(matches!(kick("_type=Patient", "user/*.read", &[]), Err(KickOffError::Nothing(_))));
    }

    #[test]
    fn links_are_bound_and_not_page_tokens() {
        let signer = PageSigner::new(&[9; 32]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let bind = |kind, tenant| Binding { kind, tenant, upstream: "fhir", base_path: "/fhir" };
        let status = bind(LinkKind::Status, "tenant-a");
        let claims = ExportClaims::new(&status, "/fhir/$export-poll-status?_jobId=1".into(), None, now);
        let token = claims.sign(&signer);
        assert_eq!(ExportClaims::verify(&signer, &token, &status, now), Ok(claims.clone()));
        assert!(ExportClaims::verify(&signer, &token, &status, now + EXPORT_TTL - Duration::from_secs(1)).is_ok());
        assert_eq!(ExportClaims::verify(&signer, &token, &status, now + EXPORT_TTL), Err(LinkError::Expired));
        // Another tenant, kind, upstream or base.
        let mismatches = [
            bind(LinkKind::Status, "tenant-b"),
            bind(LinkKind::File, "tenant-a"),
            Binding { kind: LinkKind::Status, tenant: "tenant-a", upstream: "other", base_path: "/fhir" },
            Binding { kind: LinkKind::Status, tenant: "tenant-a", upstream: "fhir", base_path: "/r4" },
        ];
        for binding in &mismatches {
            assert_eq!(ExportClaims::verify(&signer, &token, binding, now), Err(LinkError::Mismatch));
        }
        assert_eq!(
            ExportClaims::verify(&PageSigner::new(&[8; 32]), &token, &status, now),
            Err(LinkError::BadSignature)
        );
        // A page token is not an export link, and an export link is not a page token, even with the same key.
        let page = signer.sign(&PageSigner::claims("tenant-a", "x", "fhir", "/fhir/$export-poll-status?_jobId=1", now));
        assert_eq!(ExportClaims::verify(&signer, &page, &status, now), Err(LinkError::BadSignature));
        assert_eq!(signer.verify(&token, now), Err(PageError::BadSignature));
        for junk in ["", ".", "a.b", "!!.??"] {
            assert!(ExportClaims::verify(&signer, junk, &status, now).is_err(), "{junk}");
        }
    }

    #[test]
    fn manifests_keep_only_what_can_be_verified() {
        let up = "http://up:8090/fhir";
        let target =
            |url: &str| url.strip_prefix("http://up:8090").filter(|r| r.starts_with("/fhir/")).map(str::to_owned);
        let mut link = |t: String, ty: &str| format!("https://gw/fhir/$export-file?_token={ty}:{t}");
        let manifest = json!({
            "transactionTime": "2024-01-01T00:00:00Z",
            "request": format!("{up}/$export?_type=Patient"),
            "requiresAccessToken": false,
            "output": [{"type": "Patient", "url": format!("{up}/Binary/1"), "count": 99, "extension": {}}],
            "error": [{"type": "Patient", "url": format!("{up}/Binary/2")}],
            "deleted": [{"type": "Bundle", "url": format!("{up}/Binary/3")}],
            "extension": {"secret": true}
        });
        let out = rewrite_manifest(&manifest, "https://gw/fhir/$export".into(), &target, &mut link)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out,
            json!({
                "transactionTime": "2024-01-01T00:00:00Z",
                "request": "https://gw/fhir/$export",
                "requiresAccessToken": true,
                "output": [{"type": "Patient", "url": "https://gw/fhir/$export-file?_token=Patient:/fhir/Binary/1"}],
                "error": [{"type": "Patient", "url": "https://gw/fhir/$export-file?_token=OperationOutcome:/fhir/Binary/2"}],
            })
        );
        let refused = [
            json!([]),
            json!({"output": []}),
            json!({"transactionTime": "t", "output": {}}),
            json!({"transactionTime": "t", "output": [{"type": "Patient", "url": "https://bucket.s3/x"}]}),
            json!({"transactionTime": "t", "output": [{"url": format!("{up}/Binary/1")}]}),
            json!({"transactionTime": "t", "error": [{"type": "bad type", "url": format!("{up}/Binary/1")}]}),
        ];
        for m in refused {
            assert!(rewrite_manifest(&m, String::new(), &target, &mut link).is_err(), "{m}");
        }
    }

    #[test]
    fn progress_never_carries_numbers() {
        let cases = [
            (Some("in progress"), "in progress"),
            (Some("Building files, please wait"), "Building files, please wait"),
            (Some("exported 5000 of 120000 resources"), "in progress"),
            (Some("50%"), "in progress"),
            (Some("line\nbreak"), "in progress"),
            (Some("tab\there"), "in progress"),
            (Some(""), "in progress"),
            (None, "in progress"),
        ];
        for (upstream, want) in cases {
            assert_eq!(progress(upstream), want, "{upstream:?}");
        }
        assert_eq!(progress(Some(&"x".repeat(101))), "in progress");
    }

    #[test]
    fn line_verification_table() {
        let a = tag("tenant-a");
        let grants = Grants::new([&a]);
        let tagged =
            |ty: &str, code: &str| json!({"resourceType": ty, "meta": {"tag": [{"system": DS, "code": code}]}});
        let only_patient = |ty: &str| ty == "Patient";
        let cases = [
            (tagged("Patient", "tenant-a"), Some("Patient"), true),
            (tagged("Patient", "tenant-a"), None, true),
            (tagged("Patient", "tenant-b"), Some("Patient"), false),
            (json!({"resourceType": "Patient"}), Some("Patient"), false),
            (tagged("Observation", "tenant-a"), Some("Patient"), false),
            (tagged("Observation", "tenant-a"), None, false),
            (tagged("OperationOutcome", "tenant-a"), Some("OperationOutcome"), false),
            (tagged("Bundle", "tenant-a"), None, false),
            (json!(["Patient"]), None, false),
        ];
        for (line, declared, want) in cases {
            assert_eq!(line_visible(&line, declared, &grants, &only_patient), want, "{line} {declared:?}");
        }
    }
}
