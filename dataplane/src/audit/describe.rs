//! What an interaction is, in the audit's terms: the classified interaction (and the route's handler) becomes an
//! [`Act`] (BALP subtype and action, the resource, the query form, the patients named), and a batch or transaction
//! Bundle becomes one act per entry, read with the planner's own pure functions (`policy::batch`, `classify`), so
//! each entry is described as the request the planner planned. Pure.

use fhirgw_config::audit::{AuditInteraction, AuditPolicy};
use fhirgw_config::route::{Handler, RouteTable};
use http::Method;
use serde_json::Value;

use super::event::{Act, Action};
use crate::policy::batch::{self, entry_request};
use crate::policy::classify::{Interaction, classify};
use crate::policy::compartment::{self, patient_id};
use crate::policy::query;

/// Query parameters whose values are bearer capabilities (signed page and export links, tokens); never recorded.
fn secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "_page" | "_token" | "_getpages") || name.contains("token") || name.contains("secret")
}

/// A query string with the values of secret parameters replaced, otherwise as sent (BALP wants what was asked,
/// malformed parts included).
pub fn redact(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded: String = form_urlencoded::parse(name.as_bytes()).map(|(k, _)| k.into_owned()).collect();
            if secret(&decoded) { format!("{name}=redacted") } else { pair.to_owned() }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The request in BALP's query form: method, URL on the public base, and for a form body the body.
pub fn query_form(
    method: &Method,
    public: &str,
    relative: &[String],
    query: Option<&str>,
    form: Option<&str>,
) -> String {
    let mut out = if relative.is_empty() {
        format!("{method} {public}")
    } else {
        format!("{method} {public}/{}", relative.join("/"))
    };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        out.push('?');
        out.push_str(&redact(q));
    }
    if let Some(form) = form {
        out.push_str("\n\n");
        out.push_str(&redact(form));
    }
    out
}

/// Patients a search's parameters confine it to: `_id` on Patient; `patient`, `subject`, `beneficiary` (their
/// `:Patient` forms, and plain ids for `patient`) on other types. At most `MAX_PATIENTS`.
pub fn patients_in_params(ty: &str, params: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, value) in params {
        let (base, modifier) = name.split_once(':').map_or((name.as_str(), None), |(b, m)| (b, Some(m)));
        let plain_ids = match (ty, base) {
            ("Patient", "_id") => true,
            (_, "patient") => modifier.is_none() || modifier == Some("Patient"),
            (_, "subject" | "beneficiary") => modifier == Some("Patient"),
            _ => continue,
        };
        if modifier.is_some_and(|m| m != "Patient") {
            continue;
        }
        for item in value.split(',') {
            let id = patient_id(item)
                .or_else(|| (plain_ids && fhirgw_config::pattern::Class::Id.accepts(item)).then_some(item));
            if let Some(id) = id.filter(|id| !out.iter().any(|o| o == id)) {
                out.push(id.to_owned());
            }
        }
    }
    out.truncate(super::MAX_PATIENTS);
    out
}

const EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

fn resource(ty: &str, id: Option<&str>, vid: Option<&str>) -> Option<(String, Option<String>, Option<String>)> {
    Some((ty.to_owned(), id.map(str::to_owned), vid.map(str::to_owned)))
}

/// The policy interaction a request is (cheaper than [`act`]); `None` for a batch, whose entries decide.
pub fn category(interaction: &Interaction, handler: Option<Handler>) -> Option<AuditInteraction> {
    use AuditInteraction as I;
    use Interaction::*;
    Some(match (handler, interaction) {
        (Some(Handler::DocRef), _) => I::Operation,
        (Some(Handler::Export), _) => I::Export,
        (None, Capabilities) => I::Capabilities,
        (None, Read { .. } | VRead { .. }) => I::Read,
        (None, SearchType { .. } | SearchSystem | Compartment { .. }) => I::Search,
        (None, HistoryInstance { .. } | HistoryType { .. } | HistorySystem) => I::History,
        (None, Create { .. }) => I::Create,
        (None, Update { .. }) => I::Update,
        (None, Patch { .. }) => I::Patch,
        (None, Delete { .. }) => I::Delete,
        (None, Conditional { method, .. }) if *method == Method::PUT => I::Update,
        (None, Conditional { method, .. }) if *method == Method::PATCH => I::Patch,
        (None, Conditional { .. }) => I::Delete,
        (None, BatchOrTransaction) => return None,
        (None, Operation { .. } | Unknown) => I::Operation,
    })
}

/// The act an interaction is, before its plan and outcome are known.
pub fn act(interaction: &Interaction, handler: Option<Handler>, method: &Method, relative: &[String]) -> Act {
    use AuditInteraction as I;
    use Interaction::*;
    if let Some(handler) = handler {
        return handler_act(handler, method, relative);
    }
    let patient_if = |ty: &str, id: &str| if ty == "Patient" { vec![id.to_owned()] } else { Vec::new() };
    let mut act = match interaction {
        Capabilities => Act::new(I::Capabilities, Some("capabilities"), Action::Execute),
        Read { ty, id } => {
            let mut a = Act::new(I::Read, Some("read"), Action::Read);
            a.resource = resource(ty, Some(id), None);
            a.patients = patient_if(ty, id);
            a
        }
        VRead { ty, id, vid } => {
            let mut a = Act::new(I::Read, Some("vread"), Action::Read);
            a.resource = resource(ty, Some(id), Some(vid));
            a.patients = patient_if(ty, id);
            a
        }
        SearchType { .. } => Act::new(I::Search, Some("search-type"), Action::Execute),
        SearchSystem => Act::new(I::Search, Some("search-system"), Action::Execute),
        Compartment { ty, id, .. } => {
            let mut a = Act::new(I::Search, Some("search-type"), Action::Execute);
            a.patients = patient_if(ty, id);
            a
        }
        HistoryInstance { ty, id } => {
            let mut a = Act::new(I::History, Some("history-instance"), Action::Read);
            a.resource = resource(ty, Some(id), None);
            a.patients = patient_if(ty, id);
            a
        }
        HistoryType { .. } => Act::new(I::History, Some("history-type"), Action::Execute),
        HistorySystem => Act::new(I::History, Some("history-system"), Action::Execute),
        Create { ty } => {
            let mut a = Act::new(I::Create, Some("create"), Action::Create);
            a.resource = resource(ty, None, None);
            a
        }
        Update { ty, id } | Patch { ty, id } | Delete { ty, id } => {
            let (category, code, action) = match interaction {
                Update { .. } => (I::Update, "update", Action::Update),
                Patch { .. } => (I::Patch, "patch", Action::Update),
                _ => (I::Delete, "delete", Action::Delete),
            };
            let mut a = Act::new(category, Some(code), action);
            a.resource = resource(ty, Some(id), None);
            a.patients = patient_if(ty, id);
            a
        }
        Conditional { ty, method } => {
            let (category, code, action) = match *method {
                Method::PUT => (I::Update, "update", Action::Update),
                Method::PATCH => (I::Patch, "patch", Action::Update),
                _ => (I::Delete, "delete", Action::Delete),
            };
            let mut a = Act::new(category, Some(code), action);
            a.resource = resource(ty, None, None);
            a
        }
        BatchOrTransaction => Act::new(I::Batch, Some("batch"), Action::Execute),
        Operation { ty, id, name } => {
            let canonical = match (ty.as_deref(), id.is_some(), name.as_str()) {
                (Some("Patient"), true, "$everything") => {
                    Some("http://hl7.org/fhir/OperationDefinition/Patient-everything")
                }
                (Some(_), true, "$meta-add") => Some("http://hl7.org/fhir/OperationDefinition/Resource-meta-add"),
                (Some(_), true, "$meta-delete") => Some("http://hl7.org/fhir/OperationDefinition/Resource-meta-delete"),
                _ => None,
            };
            let action = if name.starts_with("$meta-") { Action::Update } else { Action::Execute };
            let mut a = Act::new(I::Operation, Some("operation"), action);
            a.operation = Some((canonical, name.clone()));
            if let Some(ty) = ty {
                a.resource = resource(ty, id.as_deref(), None);
                if let Some(id) = id {
                    a.patients = patient_if(ty, id);
                }
            }
            a
        }
        Unknown => Act::new(I::Operation, None, Action::Execute),
    };
    if act.action == Action::Execute || matches!(interaction, Conditional { .. }) {
        act.query = Some(String::new());
    }
    act
}

fn handler_act(handler: Handler, method: &Method, relative: &[String]) -> Act {
    let last = relative.last().map(String::as_str).unwrap_or_default();
    let mut act = match handler {
        Handler::DocRef => {
            let mut a = Act::new(AuditInteraction::Operation, Some("operation"), Action::Execute);
            a.operation = Some((Some("http://hl7.org/fhir/us/core/OperationDefinition/docref"), "$docref".into()));
            a
        }
        Handler::Export => {
            let (canonical, action) = match (last, method) {
                ("$export-poll-status", &Method::DELETE) => (None, Action::Delete),
                ("$export-poll-status", _) => (None, Action::Execute),
                ("$export-file", _) => (None, Action::Read),
                _ => match relative.first().map(String::as_str) {
                    Some("Patient") => (Some(PATIENT_EXPORT), Action::Execute),
                    Some("Group") => (Some(GROUP_EXPORT), Action::Execute),
                    _ => (Some(EXPORT), Action::Execute),
                },
            };
            let mut a = Act::new(AuditInteraction::Export, Some("operation"), action);
            a.operation = Some((canonical, last.to_owned()));
            if let [group, id, _] = relative {
                a.resource = resource(group, Some(id), None);
            }
            a
        }
    };
    act.query = Some(String::new());
    act
}

/// One entry of a batch or transaction, as the audit records it: its act and its route's policy.
#[derive(Debug, Clone)]
pub struct Entry {
    pub act: Act,
    pub route: Option<AuditPolicy>,
}

/// The entries of a batch or transaction Bundle, each described as the request it stands for; `None` when the
/// body is not one (the request is then recorded as a whole).
pub fn entries(bundle: &Value, table: &RouteTable, public: &str) -> Option<Vec<Entry>> {
    let (_, entries) = batch::parse(bundle).ok()?;
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let described = match entry_request(entry, public) {
            Ok(request) => {
                let interaction = classify(&request.method, &request.path, request.query.is_some());
                let mut act = act(&interaction, None, &request.method, &request.path);
                if act.query.is_some() {
                    act.query =
                        Some(query_form(&request.method, public, &request.path, request.query.as_deref(), None));
                    if let Some(ty) = request.path.first() {
                        act.patients =
                            merge(act.patients, patients_in_params(ty, &query::parse(request.query.as_deref())));
                    }
                }
                if let Some(resource) = entry.get("resource") {
                    act.patients = merge(act.patients, compartment::patients_of(resource));
                }
                let route = table.route(&request.method, &request.path).map(|m| m.route.audit);
                Entry { act, route }
            }
            Err(_) => {
                let mut act = Act::new(AuditInteraction::Batch, None, Action::Execute);
                act.query = Some(entry.get("request").map(Value::to_string).unwrap_or_default());
                Entry { act, route: None }
            }
        };
        let mut described = described;
        described.act.entry = Some(index);
        out.push(described);
    }
    Some(out)
}

/// `a` then what `b` adds, without repeats, at most `MAX_PATIENTS`.
pub fn merge(mut a: Vec<String>, b: Vec<String>) -> Vec<String> {
    for id in b {
        if !a.contains(&id) {
            a.push(id);
        }
    }
    a.truncate(super::MAX_PATIENTS);
    a
}

#[cfg(test)]
#[path = "describe_tests.rs"]
mod tests;
