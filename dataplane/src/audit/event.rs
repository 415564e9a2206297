//! One FHIR R4 `AuditEvent`, shaped after the IHE Basic Audit Log Patterns (BALP): the Create, Read, Update,
//! Delete and Query patterns and their patient variants. Pure: everything comes in as an [`Act`] (what was asked,
//! derived from the classified interaction and its plan), an [`Outcome`] (what the client got) and the request's
//! [`Context`]; the caller's token never does.
//!
//! Agents: the client application (DICOM Source Role ID, or Destination Role ID for reads, as BALP has it) with the
//! caller's real network address; the gateway as the server it spoke to (its public base); the user (`sub`) as the
//! information recipient or author. `source.observer` is this data plane. Entities: the resource (type, id and
//! version, as an absolute reference on the gateway's public base, so the audit store never confuses it with its
//! own resources), or the query (BALP: the raw request, base64; the upstream call it became in `description`), the
//! patient when the interaction concerns one, and the transaction (`X-Request-Id`, else the trace id).

use std::net::IpAddr;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fhirgw_config::audit::AuditInteraction;
use serde_json::{Map, Value, json};

const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
/// The tenant a caller acted for (an extension of the gateway's own).
pub const TENANT_EXTENSION: &str = "https://fhirgw.dev/fhir/StructureDefinition/audit-tenant";
/// The data plane that recorded the event.
pub const NODE_SYSTEM: &str = "https://fhirgw.dev/fhir/data-plane";

/// BALP's action codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// What was asked, as the audit sees one interaction (a direct request, or one entry of a batch or transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Act {
    /// Which policy interaction this is (decides whether it is recorded).
    pub category: AuditInteraction,
    /// The FHIR restful-interaction code (`read`, `search-type`, `operation`, …), if there is one.
    pub subtype: Option<&'static str>,
    /// The operation's canonical URL (when it has a standard one) and name, for operations.
    pub operation: Option<(Option<&'static str>, String)>,
    pub action: Action,
    /// The resource acted on: type, id (when known), version (when known).
    pub resource: Option<(String, Option<String>, Option<String>)>,
    /// BALP's query form: the request as the client sent it (tokens redacted), recorded base64.
    pub query: Option<String>,
    /// What the gateway executed for it upstream (the narrowed search), in words.
    pub executed: Option<String>,
    /// Ids of the patients it concerns.
    pub patients: Vec<String>,
    /// Its index in a batch or transaction.
    pub entry: Option<usize>,
}

impl Act {
    pub fn new(category: AuditInteraction, subtype: Option<&'static str>, action: Action) -> Self {
        Act {
            category,
            subtype,
            operation: None,
            action,
            resource: None,
            query: None,
            executed: None,
            patients: Vec::new(),
            entry: None,
        }
    }
}

/// The caller, from the verified token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub tenant: String,
    pub subject: String,
    pub client_id: Option<String>,
    pub issuer: Option<String>,
}

/// What the client got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    /// Why, for a failure (operators only: may say more than the client was told).
    pub detail: Option<String>,
}

/// The request's circumstances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub recorded: SystemTime,
    /// The caller's network address, through trusted proxies.
    pub client: IpAddr,
    /// The gateway's public FHIR base for this request (no trailing slash).
    pub public_base: String,
    /// This data plane's node id.
    pub node: String,
    /// What ties the events of one request together: the client's `X-Request-Id`, else the trace id, else an id
    /// the gateway made up.
    pub transaction: String,
    pub trace_id: Option<String>,
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

/// R4 `AuditEvent.outcome`: 0 success, 4 minor failure (the client's request refused), 8 serious failure (the
/// upstream or the gateway failed it), 12 major failure (an internal error).
fn outcome_code(status: u16) -> &'static str {
    match status {
        100..=399 => "0",
        400..=499 => "4",
        500 => "12",
        _ => "8",
    }
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("")
}

/// The BALP profile a successful event conforms to (failures follow the pattern but claim none: BALP's profiles fix
/// the outcome to success).
fn profile(act: &Act, patient: bool) -> Option<String> {
    let base = match (act.action, act.subtype) {
        (Action::Create, Some("create")) => "Create",
        (Action::Read, Some("read" | "vread")) => "Read",
        (Action::Update, Some("update" | "patch")) => "Update",
        (Action::Delete, Some("delete")) => "Delete",
        (Action::Execute, Some("search" | "search-type" | "search-system")) => "Query",
        _ => return None,
    };
    Some(if patient { format!("{BALP}Patient{base}") } else { format!("{BALP}{base}") })
}

/// An absolute reference on the gateway's public base.
fn reference(base: &str, ty: &str, id: &str, vid: Option<&str>) -> String {
    match vid {
        Some(vid) => format!("{base}/{ty}/{id}/_history/{vid}"),
        None => format!("{base}/{ty}/{id}"),
    }
}

/// The AuditEvent `id` records `act` by `who` (`None`: unauthenticated) with `outcome`, for `patient` (one of
/// `act.patients`, BALP's patient variants having exactly one).
pub fn build(
    id: &str,
    context: &Context,
    who: Option<&Who>,
    act: &Act,
    outcome: &Outcome,
    patient: Option<&str>,
) -> Value {
    let success = outcome_code(outcome.status) == "0";
    let mut event = Map::new();
    event.insert("resourceType".into(), json!("AuditEvent"));
    event.insert("id".into(), json!(id));
    if let Some(profile) = profile(act, patient.is_some()).filter(|_| success) {
        event.insert("meta".into(), json!({ "profile": [profile] }));
    }
    if let Some(who) = who {
        event.insert("extension".into(), json!([{ "url": TENANT_EXTENSION, "valueString": who.tenant }]));
    }
    event.insert(
        "type".into(),
        coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"),
    );
    let mut subtype = Vec::new();
    if let Some(code) = act.subtype {
        subtype.push(coding(RESTFUL, code, code));
    }
    match &act.operation {
        Some((Some(canonical), name)) => subtype.push(coding("urn:ietf:rfc:3986", canonical, name)),
        Some((None, name)) => subtype.push(json!({ "display": name })),
        None => {}
    }
    if !subtype.is_empty() {
        event.insert("subtype".into(), Value::Array(subtype));
    }
    event.insert("action".into(), json!(act.action.code()));
    // Milliseconds, as FHIR servers usually keep them.
    let at = time::OffsetDateTime::from(context.recorded);
    let recorded = at
        .replace_millisecond(at.millisecond())
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned());
    event.insert("recorded".into(), json!(recorded));
    event.insert("outcome".into(), json!(outcome_code(outcome.status)));
    let mut desc = format!("{} {}", outcome.status, reason(outcome.status));
    if let Some(detail) = &outcome.detail {
        desc.push_str(": ");
        desc.push_str(detail);
    }
    if let Some(trace) = &context.trace_id {
        desc.push_str("; trace ");
        desc.push_str(trace);
    }
    event.insert("outcomeDesc".into(), json!(desc));
    event.insert("agent".into(), Value::Array(agents(context, who, act)));
    event.insert(
        "source".into(),
        json!({
            "site": context.public_base,
            "observer": {
                "identifier": { "system": NODE_SYSTEM, "value": context.node },
                "display": format!("fhirgw data plane {}", context.node),
            },
            "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
        }),
    );
    let entities = entities(context, act, patient);
    if !entities.is_empty() {
        event.insert("entity".into(), Value::Array(entities));
    }
    Value::Object(event)
}

fn agents(context: &Context, who: Option<&Who>, act: &Act) -> Vec<Value> {
    // BALP: the client is the Source Role ID and the server the Destination, except in the Read pattern.
    let (client_role, server_role) = if act.action == Action::Read {
        (("110152", "Destination Role ID"), ("110153", "Source Role ID"))
    } else {
        (("110153", "Source Role ID"), ("110152", "Destination Role ID"))
    };
    let client_who = match who {
        Some(Who { client_id: Some(client), issuer, .. }) => {
            let mut identifier = json!({ "value": client });
            if let Some(issuer) = issuer {
                identifier["system"] = json!(issuer);
            }
            json!({ "identifier": identifier })
        }
        Some(who) => json!({ "display": format!("a client of tenant {}", who.tenant) }),
        None => json!({ "display": "unauthenticated client" }),
    };
    let mut agents = vec![
        json!({
            "type": { "coding": [coding(DCM, client_role.0, client_role.1)] },
            "who": client_who,
            "requestor": false,
            "network": { "address": context.client.to_string(), "type": "2" },
        }),
        json!({
            "type": { "coding": [coding(DCM, server_role.0, server_role.1)] },
            "who": { "identifier": { "system": "urn:ietf:rfc:3986", "value": context.public_base } },
            "requestor": false,
            "network": { "address": context.public_base, "type": "5" },
        }),
    ];
    if let Some(who) = who.filter(|w| !w.subject.is_empty()) {
        let user_role = match act.action {
            Action::Create | Action::Update | Action::Delete => ("AUT", "author"),
            Action::Read | Action::Execute => ("IRCP", "information recipient"),
        };
        let mut identifier = json!({ "value": who.subject });
        if let Some(issuer) = &who.issuer {
            identifier["system"] = json!(issuer);
        }
        agents.push(json!({
            "type": { "coding": [coding(PARTICIPATION, user_role.0, user_role.1)] },
            "who": { "identifier": identifier },
            "requestor": true,
        }));
    }
    agents
}

fn entities(context: &Context, act: &Act, patient: Option<&str>) -> Vec<Value> {
    let base = &context.public_base;
    let mut out = Vec::new();
    if let Some(patient) = patient {
        out.push(json!({
            "what": { "reference": reference(base, "Patient", patient, None), "type": "Patient" },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    if let Some((ty, id, vid)) = &act.resource {
        let what = match id {
            Some(id) => json!({ "reference": reference(base, ty, id, vid.as_deref()), "type": ty }),
            None => json!({ "type": ty }),
        };
        out.push(json!({
            "what": what,
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
        }));
    }
    if let Some(query) = &act.query {
        let mut entity = json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "query": STANDARD.encode(query),
        });
        if let Some(executed) = &act.executed {
            entity["description"] = json!(executed);
        }
        out.push(entity);
    }
    let mut transaction = json!({
        "what": { "identifier": { "value": context.transaction } },
        "type": { "system": BALP_ENTITY_TYPE, "code": "XrequestId" },
    });
    let mut detail = Vec::new();
    if let Some(trace) = context.trace_id.as_ref().filter(|t| **t != context.transaction) {
        detail.push(json!({ "type": "trace-id", "valueString": trace }));
    }
    if let Some(index) = act.entry {
        detail.push(json!({ "type": "bundle-entry", "valueString": index.to_string() }));
    }
    if !detail.is_empty() {
        transaction["detail"] = Value::Array(detail);
    }
    out.push(transaction);
    out
}

#[cfg(test)]
#[path = "event_tests.rs"]
mod tests;
