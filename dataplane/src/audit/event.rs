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
use serde::Serialize;

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

// The AuditEvent as typed, borrowed parts: serialised straight to bytes on the request path, no JSON tree.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent<'a> {
    resource_type: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    extension: Vec<Extension<'a>>,
    #[serde(rename = "type")]
    kind: Coding<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    subtype: Vec<Coding<'a>>,
    action: &'static str,
    recorded: String,
    outcome: &'static str,
    outcome_desc: String,
    agent: Vec<Agent<'a>>,
    source: Source<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entity: Vec<Entity<'a>>,
}

#[derive(Serialize)]
struct Meta {
    profile: [String; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Extension<'a> {
    url: &'static str,
    value_string: &'a str,
}

#[derive(Serialize, Default)]
struct Coding<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
}

fn coding<'a>(system: &'a str, code: &'a str, display: &'a str) -> Coding<'a> {
    Coding { system: Some(system), code: Some(code), display: Some(display) }
}

#[derive(Serialize)]
struct Concept<'a> {
    coding: [Coding<'a>; 1],
}

#[derive(Serialize, Default)]
struct Reference<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identifier: Option<Identifier<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<String>,
}

#[derive(Serialize)]
struct Identifier<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    value: &'a str,
}

#[derive(Serialize)]
struct Agent<'a> {
    #[serde(rename = "type")]
    kind: Concept<'a>,
    who: Reference<'a>,
    requestor: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<Network<'a>>,
}

#[derive(Serialize)]
struct Network<'a> {
    address: std::borrow::Cow<'a, str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Source<'a> {
    site: &'a str,
    observer: Reference<'a>,
    #[serde(rename = "type")]
    kind: [Coding<'a>; 1],
}

#[derive(Serialize)]
struct Entity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    what: Option<Reference<'a>>,
    #[serde(rename = "type")]
    kind: Coding<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    detail: Vec<Detail<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    value_string: std::borrow::Cow<'a, str>,
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

/// `recorded`: RFC 3339 in milliseconds, as FHIR servers usually keep instants.
fn instant(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.replace_millisecond(at.millisecond())
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The AuditEvent `id` records `act` by `who` (`None`: unauthenticated) with `outcome`, for `patient` (one of
/// `act.patients`, BALP's patient variants having exactly one). Serialise it with `serde_json`.
pub fn build<'a>(
    id: &'a str,
    context: &'a Context,
    who: Option<&'a Who>,
    act: &'a Act,
    outcome: &'a Outcome,
    patient: Option<&'a str>,
) -> AuditEvent<'a> {
    let success = outcome_code(outcome.status) == "0";
    let mut subtype = Vec::new();
    if let Some(code) = act.subtype {
        subtype.push(coding(RESTFUL, code, code));
    }
    match &act.operation {
        Some((Some(canonical), name)) => subtype.push(coding("urn:ietf:rfc:3986", canonical, name)),
        Some((None, name)) => subtype.push(Coding { display: Some(name), ..Coding::default() }),
        None => {}
    }
    let mut desc = format!("{} {}", outcome.status, reason(outcome.status));
    if let Some(detail) = &outcome.detail {
        desc.push_str(": ");
        desc.push_str(detail);
    }
    if let Some(trace) = &context.trace_id {
        desc.push_str("; trace ");
        desc.push_str(trace);
    }
    AuditEvent {
        resource_type: "AuditEvent",
        id,
        meta: profile(act, patient.is_some()).filter(|_| success).map(|p| Meta { profile: [p] }),
        extension: who.map(|w| Extension { url: TENANT_EXTENSION, value_string: &w.tenant }).into_iter().collect(),
        kind: coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"),
        subtype,
        action: act.action.code(),
        recorded: instant(context.recorded),
        outcome: outcome_code(outcome.status),
        outcome_desc: desc,
        agent: agents(context, who, act),
        source: Source {
            site: &context.public_base,
            observer: Reference {
                identifier: Some(Identifier { system: Some(NODE_SYSTEM), value: &context.node }),
                display: Some(format!("fhirgw data plane {}", context.node)),
                ..Reference::default()
            },
            kind: [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
        },
        entity: entities(context, act, patient),
    }
}

fn agents<'a>(context: &'a Context, who: Option<&'a Who>, act: &Act) -> Vec<Agent<'a>> {
    // BALP: the client is the Source Role ID and the server the Destination, except in the Read pattern.
    let (client_role, server_role) = if act.action == Action::Read {
        (("110152", "Destination Role ID"), ("110153", "Source Role ID"))
    } else {
        (("110153", "Source Role ID"), ("110152", "Destination Role ID"))
    };
    let client_who = match who {
        Some(Who { client_id: Some(client), issuer, .. }) => Reference {
            identifier: Some(Identifier { system: issuer.as_deref(), value: client }),
            ..Reference::default()
        },
        Some(who) => Reference { display: Some(format!("a client of tenant {}", who.tenant)), ..Reference::default() },
        None => Reference { display: Some("unauthenticated client".to_owned()), ..Reference::default() },
    };
    let mut agents = vec![
        Agent {
            kind: Concept { coding: [coding(DCM, client_role.0, client_role.1)] },
            who: client_who,
            requestor: false,
            network: Some(Network { address: context.client.to_string().into(), kind: "2" }),
        },
        Agent {
            kind: Concept { coding: [coding(DCM, server_role.0, server_role.1)] },
            who: Reference {
                identifier: Some(Identifier { system: Some("urn:ietf:rfc:3986"), value: &context.public_base }),
                ..Reference::default()
            },
            requestor: false,
            network: Some(Network { address: context.public_base.as_str().into(), kind: "5" }),
        },
    ];
    if let Some(who) = who.filter(|w| !w.subject.is_empty()) {
        let user_role = match act.action {
            Action::Create | Action::Update | Action::Delete => ("AUT", "author"),
            Action::Read | Action::Execute => ("IRCP", "information recipient"),
        };
        agents.push(Agent {
            kind: Concept { coding: [coding(PARTICIPATION, user_role.0, user_role.1)] },
            who: Reference {
                identifier: Some(Identifier { system: who.issuer.as_deref(), value: &who.subject }),
                ..Reference::default()
            },
            requestor: true,
            network: None,
        });
    }
    agents
}

fn entities<'a>(context: &'a Context, act: &'a Act, patient: Option<&'a str>) -> Vec<Entity<'a>> {
    let base = &context.public_base;
    let mut out = Vec::with_capacity(4);
    if let Some(patient) = patient {
        out.push(Entity {
            what: Some(Reference {
                reference: Some(reference(base, "Patient", patient, None)),
                kind: Some("Patient"),
                ..Reference::default()
            }),
            kind: coding(ENTITY_TYPE, "1", "Person"),
            role: Some(coding(OBJECT_ROLE, "1", "Patient")),
            description: None,
            query: None,
            detail: Vec::new(),
        });
    }
    if let Some((ty, id, vid)) = &act.resource {
        out.push(Entity {
            what: Some(Reference {
                reference: id.as_ref().map(|id| reference(base, ty, id, vid.as_deref())),
                kind: Some(ty),
                ..Reference::default()
            }),
            kind: coding(ENTITY_TYPE, "2", "System Object"),
            role: Some(coding(OBJECT_ROLE, "4", "Domain Resource")),
            description: None,
            query: None,
            detail: Vec::new(),
        });
    }
    if let Some(query) = &act.query {
        out.push(Entity {
            what: None,
            kind: coding(ENTITY_TYPE, "2", "System Object"),
            role: Some(coding(OBJECT_ROLE, "24", "Query")),
            description: act.executed.as_deref(),
            query: Some(STANDARD.encode(query)),
            detail: Vec::new(),
        });
    }
    let mut detail = Vec::new();
    if let Some(trace) = context.trace_id.as_ref().filter(|t| **t != context.transaction) {
        detail.push(Detail { kind: "trace-id", value_string: trace.as_str().into() });
    }
    if let Some(index) = act.entry {
        detail.push(Detail { kind: "bundle-entry", value_string: index.to_string().into() });
    }
    out.push(Entity {
        what: Some(Reference {
            identifier: Some(Identifier { system: None, value: &context.transaction }),
            ..Reference::default()
        }),
        kind: Coding { system: Some(BALP_ENTITY_TYPE), code: Some("XrequestId"), display: None },
        role: None,
        description: None,
        query: None,
        detail,
    });
    out
}

#[cfg(test)]
#[path = "event_tests.rs"]
mod tests;
