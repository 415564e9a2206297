//! Kick-offs, narrowed before they leave: parameters from a query or a `Parameters` body, `_type` required or filled
//! from the scopes, one `_typeFilter` with the tenant's tags per type, a client's own filters narrowed one by one.

use fhirgw_config::pattern::Class;
use fhirgw_config::route::QueryGuard;
use fhirgw_config::tenant::Tag;
use serde_json::{Value, json};

use crate::policy::query::{self, MAX_PARAMS, Params, QueryError, Use, is_date_time};
use crate::policy::scopes::{Allowed, Permission, Scopes};

/// `_outputFormat` values meaning FHIR NDJSON; the upstream is always asked for the first.
const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// Control parameters a `_typeFilter` may use; ordinary search parameters are checked like any search.
const FILTER_CONTROL: &[&str] = &["_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"];

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
