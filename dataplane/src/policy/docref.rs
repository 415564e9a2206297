//! `DocumentReference/$docref` (US Core, IPA): the operation's parameters, from a query or a `Parameters` body,
//! translated into an ordinary DocumentReference search, which the gateway then checks and narrows like any other.
//!
//! `patient` (required), `start` and `end` (`date=ge…`, `date=le…`), `type` (a token) and `on-demand=false` are
//! understood; `on-demand=true` and `profile` are refused as not supported, and anything else as unknown.

use fhirgw_config::pattern::Class;
use serde_json::Value;

use super::query::{Params, QueryError, is_date_time};

/// One `$docref` request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRef {
    /// The Patient's id.
    pub patient: String,
    pub start: Option<String>,
    pub end: Option<String>,
    /// A token search value: `system|code`, several ORed with commas.
    pub types: Option<String>,
    /// `_format` and `_pretty`, passed on to the search (and checked there).
    pub shaping: Params,
}

fn refuse(param: &str, reason: &'static str) -> QueryError {
    QueryError::Refused { param: param.to_owned(), reason }
}

/// A token, or several ORed: `system|code`, `code` or `|code`, without characters a search value would have to
/// escape.
fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 2048
        && value.split(',').all(|item| {
            let (system, code) = item.split_once('|').unwrap_or(("", item));
            !code.is_empty()
                && !code.contains('|')
                && !item.chars().any(|c| c.is_control() || c.is_whitespace() || matches!(c, '\\' | '$'))
                && (system.is_empty() || system.contains(':'))
        })
}

/// Checks the parameters of a `$docref` (query pairs, or those of a `Parameters` body).
pub fn parse(params: &[(String, String)]) -> Result<DocRef, QueryError> {
    let mut patient = None;
    let mut start = None;
    let mut end = None;
    let mut types = None;
    let mut on_demand = false;
    let mut shaping = Params::new();
    for (key, value) in params {
        let once =
            |slot: &Option<String>| if slot.is_some() { Err(refuse(key, "may be given only once")) } else { Ok(()) };
        match key.as_str() {
            "patient" => {
                once(&patient)?;
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                if !Class::Id.accepts(id) {
                    return Err(refuse(key, "must be the id of a Patient"));
                }
                patient = Some(id.to_owned());
            }
            "start" | "end" => {
                let slot = if key == "start" { &mut start } else { &mut end };
                once(slot)?;
                if !is_date_time(value) {
                    return Err(refuse(key, "must be a FHIR date or dateTime"));
                }
                *slot = Some(value.clone());
            }
            "type" => {
                once(&types)?;
                if !is_token(value) {
                    return Err(refuse(key, "must be a token such as http://loinc.org|34133-9"));
                }
                types = Some(value.clone());
            }
            "on-demand" => {
                if on_demand {
                    return Err(refuse(key, "may be given only once"));
                }
                on_demand = true;
                match value.as_str() {
                    "false" => {}
                    "true" => return Err(refuse(key, "on-demand documents are not supported by this gateway")),
                    _ => return Err(refuse(key, "must be true or false")),
                }
            }
            "_format" | "_pretty" => shaping.push((key.clone(), value.clone())),
            "profile" => return Err(refuse(key, "is not supported by this gateway")),
            _ => return Err(refuse(key, "is not a parameter of $docref")),
        }
    }
    let patient = patient.ok_or_else(|| refuse("patient", "is required"))?;
    Ok(DocRef { patient, start, end, types, shaping })
}

impl DocRef {
    /// The DocumentReference search this request stands for (before narrowing).
    pub fn search_params(&self) -> Params {
        let mut out: Params = vec![("patient".into(), format!("Patient/{}", self.patient))];
        if let Some(start) = &self.start {
            out.push(("date".into(), format!("ge{start}")));
        }
        if let Some(end) = &self.end {
            out.push(("date".into(), format!("le{end}")));
        }
        if let Some(types) = &self.types {
            out.push(("type".into(), types.clone()));
        }
        out.extend(self.shaping.iter().cloned());
        out
    }
}

/// The name/value pairs of a `Parameters` body for `$docref`, to be checked by [`parse`].
pub fn from_parameters(body: &Value) -> Result<Params, QueryError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(refuse("body", "must be a Parameters resource"));
    }
    let items = match body.get("parameter") {
        None => return Ok(Params::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(refuse("parameter", "must be an array")),
    };
    let mut out = Params::new();
    for item in items {
        let name = item.get("name").and_then(Value::as_str).ok_or_else(|| refuse("parameter", "needs a name"))?;
        let string = |field: &str| item.get(field).and_then(Value::as_str).map(str::to_owned);
        let value = match name {
            "patient" => string("valueId").or_else(|| string("valueString")).or_else(|| {
                item.get("valueReference").and_then(|r| r.get("reference")).and_then(Value::as_str).map(str::to_owned)
            }),
            "start" | "end" => {
                string("valueDateTime").or_else(|| string("valueDate")).or_else(|| string("valueInstant"))
            }
            "type" => {
                let codings = match (item.get("valueCodeableConcept"), item.get("valueCoding")) {
                    (Some(concept), None) => {
                        concept.get("coding").and_then(Value::as_array).cloned().unwrap_or_default()
                    }
                    (None, Some(coding)) => vec![coding.clone()],
                    _ => Vec::new(),
                };
                let tokens: Option<Vec<String>> = codings
                    .iter()
                    .map(|c| {
                        let code = c.get("code").and_then(Value::as_str)?;
                        Some(match c.get("system").and_then(Value::as_str) {
                            Some(system) => format!("{system}|{code}"),
                            None => code.to_owned(),
                        })
                    })
                    .collect();
                tokens.filter(|t| !t.is_empty()).map(|t| t.join(","))
            }
            "on-demand" => item.get("valueBoolean").and_then(Value::as_bool).map(|b| b.to_string()),
            "profile" => string("valueCanonical").or_else(|| string("valueUri")),
            _ => return Err(QueryError::Refused { param: name.to_owned(), reason: "is not a parameter of $docref" }),
        };
        let value = value.ok_or_else(|| QueryError::Refused {
            param: name.to_owned(),
            reason: "has no value of a supported type",
        })?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::query;

    fn search(q: &str) -> Result<String, String> {
        parse(&query::parse(Some(q))).map(|d| query::encode(&d.search_params())).map_err(|e| match e {
            QueryError::Refused { param, .. } => param,
            other => other.to_string(),
        })
    }

    #[test]
    fn translation_table() {
        let ok: &[(&str, &str)] = &[
            ("patient=a-pat-1", "patient=Patient%2Fa-pat-1"),
            ("patient=Patient/a-pat-1", "patient=Patient%2Fa-pat-1"),
            ("patient=p1&start=2024-01-01", "patient=Patient%2Fp1&date=ge2024-01-01"),
            (
                "end=2024-12-31T23:59:59Z&patient=p1&start=2024",
                "patient=Patient%2Fp1&date=ge2024&date=le2024-12-31T23%3A59%3A59Z",
            ),
            ("patient=p1&type=http://loinc.org|34133-9", "patient=Patient%2Fp1&type=http%3A%2F%2Floinc.org%7C34133-9"),
            (
                "patient=p1&type=http://loinc.org|1,http://loinc.org|2",
                "patient=Patient%2Fp1&type=http%3A%2F%2Floinc.org%7C1%2Chttp%3A%2F%2Floinc.org%7C2",
            ),
            ("patient=p1&on-demand=false&_format=json", "patient=Patient%2Fp1&_format=json"),
        ];
        for (q, want) in ok {
            assert_eq!(search(q), Ok((*want).to_owned()), "{q}");
        }
        let refused: &[(&str, &str)] = &[
            ("", "patient"),
            ("start=2024", "patient"),
            ("patient=p1&patient=p2", "patient"),
            ("patient=Observation/1", "patient"),
            ("patient=a b", "patient"),
            ("patient=p1&start=ge2024", "start"),
            ("patient=p1&end=2024,2025", "end"),
            ("patient=p1&start=2024&start=2025", "start"),
            ("patient=p1&on-demand=true", "on-demand"),
            ("patient=p1&on-demand=maybe", "on-demand"),
            ("patient=p1&profile=http://x", "profile"),
            ("patient=p1&type=", "type"),
            ("patient=p1&type=a|b|c", "type"),
            ("patient=p1&type=http://x|a b", "type"),
            ("patient=p1&type=loinc|1", "type"),
            ("patient=p1&_tag=x", "_tag"),
            ("patient=p1&subject:Patient.name=x", "subject:Patient.name"),
            ("patient=p1&_include=DocumentReference:subject", "_include"),
        ];
        for (q, param) in refused {
            assert_eq!(search(q), Err((*param).to_owned()), "{q}");
        }
    }

    #[test]
    fn parameters_bodies() {
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueId": "a-pat-1"},
            {"name": "start", "valueDateTime": "2024-01-01T00:00:00Z"},
            {"name": "end", "valueDate": "2024-12-31"},
            {"name": "type", "valueCodeableConcept": {"coding": [
                {"system": "http://loinc.org", "code": "34133-9"}, {"system": "http://loinc.org", "code": "18842-5"}]}},
            {"name": "on-demand", "valueBoolean": false}
        ]});
        let params = from_parameters(&body).unwrap_or_default();
        let docref = parse(&params).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docref.patient, "a-pat-1");
        assert_eq!(docref.start.as_deref(), Some("2024-01-01T00:00:00Z"));
        assert_eq!(docref.end.as_deref(), Some("2024-12-31"));
        assert_eq!(docref.types.as_deref(), Some("http://loinc.org|34133-9,http://loinc.org|18842-5"));

        let reference = json!({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueReference": {"reference": "Patient/p9"}},
            {"name": "type", "valueCoding": {"code": "x"}}]});
        let docref = parse(&from_parameters(&reference).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((docref.patient.as_str(), docref.types.as_deref()), ("p9", Some("x")));

        let refused = [
            (json!({"resourceType": "Bundle"}), "body"),
            (json!({"resourceType": "Parameters", "parameter": {}}), "parameter"),
            (json!({"resourceType": "Parameters", "parameter": [{"valueId": "x"}]}), "parameter"),
            (json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueInteger": 1}]}), "patient"),
            (json!({"resourceType": "Parameters", "parameter": [{"name": "start", "valueString": "2024"}]}), "start"),
            (
                json!({"resourceType": "Parameters", "parameter": [{"name": "type", "valueCodeableConcept": {}}]}),
                "type",
            ),
            (json!({"resourceType": "Parameters", "parameter": [{"name": "_tag", "valueString": "x"}]}), "_tag"),
        ];
        for (body, param) in refused {
            match from_parameters(&body) {
                Err(QueryError::Refused { param: got, .. }) => assert_eq!(got, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let on_demand = json!({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueId": "p"}, {"name": "on-demand", "valueBoolean": true}]});
        assert!(parse(&from_parameters(&on_demand).unwrap_or_default()).is_err());
    }
}
