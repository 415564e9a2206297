//! Completion manifests keep only what can be verified, progress texts carry no digits, and every line of every
//! file is verified on the way back.

use fhirgw_config::pattern::Class;
use serde_json::{Value, json};

use crate::policy::verify::Grants;

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
