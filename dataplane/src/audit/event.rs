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

use std::io::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fhirgw_config::audit::AuditInteraction;

const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub client_id: Option<&'a str>,
    pub issuer: Option<&'a str>,
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
pub struct Context<'a> {
    pub recorded: SystemTime,
    /// The caller's network address, through trusted proxies.
    pub client: IpAddr,
    /// The gateway's public FHIR base for this request (no trailing slash).
    pub public_base: &'a str,
    /// This data plane's node id.
    pub node: &'a str,
    /// What ties the events of one request together: the client's `X-Request-Id`, else the trace id, else an id
    /// the gateway made up.
    pub transaction: &'a str,
    pub trace_id: Option<&'a str>,
}

/// Writes JSON: the fixed parts of an AuditEvent (code systems, codes, displays) as they are, only the strings that
/// vary escaped. An event is written on every audited request, and most of its 2 KiB never changes.
struct Json<'o>(&'o mut Vec<u8>);

impl Json<'_> {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    /// A JSON string's content (escaped, not quoted). Most values (ids, types, addresses, base64) need no escape:
    /// copied whole. Escaping is character by character, so a string may be written in parts.
    fn escaped(&mut self, text: &str) {
        if plain(text.as_bytes()) {
            self.0.extend_from_slice(text.as_bytes());
        } else {
            // serde_json's escaping, without its quotes (serialising a str cannot fail).
            let quoted = serde_json::to_string(text).unwrap_or_default();
            self.0.extend_from_slice(quoted.as_bytes().get(1..quoted.len().saturating_sub(1)).unwrap_or_default());
        }
    }

    /// A JSON string (quoted, escaped).
    fn text(&mut self, text: &str) {
        self.0.push(b'"');
        self.escaped(text);
        self.0.push(b'"');
    }

    /// A number's decimal digits, at least `width` of them (zero-padded).
    fn digits(&mut self, n: u64, width: usize) {
        let mut buf = [b'0'; 20];
        let mut at = buf.len();
        let mut n = n;
        while n > 0 || at == buf.len() {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let at = at.min(buf.len().saturating_sub(width));
        self.0.extend_from_slice(&buf[at..]);
    }

    /// `"name":"value"` with the value escaped, after a comma.
    fn field(&mut self, name: &str, value: &str) {
        self.raw(",\"");
        self.raw(name);
        self.raw("\":");
        self.text(value);
    }
}

/// Whether `text` is a JSON string's content as it is (no control character, quote or backslash). Sixteen bytes at a
/// time, without an early exit inside a block, so the compiler can check a block with a few vector instructions: a
/// byte-at-a-time `any` was half of an event's cost.
fn plain(text: &[u8]) -> bool {
    let special = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    let mut blocks = text.chunks_exact(16);
    for block in &mut blocks {
        if block.iter().fold(false, |seen, b| seen | special(*b)) {
            return false;
        }
    }
    !blocks.remainder().iter().any(|b| special(*b))
}

/// A Coding of fixed code system, code and display, as JSON.
macro_rules! coding {
    ($system:expr, $code:expr, $display:expr) => {
        concat!(r#"{"system":""#, $system, r#"","code":""#, $code, r#"","display":""#, $display, r#""}"#)
    };
}

macro_rules! dcm {
    () => {
        "http://dicom.nema.org/resources/ontology/DCM"
    };
}
macro_rules! entity_type {
    () => {
        "http://terminology.hl7.org/CodeSystem/audit-entity-type"
    };
}
macro_rules! object_role {
    () => {
        "http://terminology.hl7.org/CodeSystem/object-role"
    };
}

const SOURCE_ROLE: &str = coding!(dcm!(), "110153", "Source Role ID");
const DESTINATION_ROLE: &str = coding!(dcm!(), "110152", "Destination Role ID");
const AUTHOR: &str = coding!("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT", "author");
const RECIPIENT: &str =
    coding!("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient");
const PERSON_PATIENT: &str = concat!(
    r#""type":"#,
    coding!(entity_type!(), "1", "Person"),
    r#","role":"#,
    coding!(object_role!(), "1", "Patient")
);
const OBJECT_RESOURCE: &str = concat!(
    r#""type":"#,
    coding!(entity_type!(), "2", "System Object"),
    r#","role":"#,
    coding!(object_role!(), "4", "Domain Resource")
);
const OBJECT_QUERY: &str = concat!(
    r#""type":"#,
    coding!(entity_type!(), "2", "System Object"),
    r#","role":"#,
    coding!(object_role!(), "24", "Query")
);
const REST: &str = concat!(
    r#","type":"#,
    coding!("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation")
);
const APPLICATION_SERVER: &str = concat!(
    r#","type":["#,
    coding!("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server"),
    "]"
);
const TRANSACTION_TYPE: &str =
    r#""type":{"system":"https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType","code":"XrequestId"}"#;

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
fn profile(act: &Act, patient: bool) -> Option<(&'static str, &'static str)> {
    let base = match (act.action, act.subtype) {
        (Action::Create, Some("create")) => "Create",
        (Action::Read, Some("read" | "vread")) => "Read",
        (Action::Update, Some("update" | "patch")) => "Update",
        (Action::Delete, Some("delete")) => "Delete",
        (Action::Execute, Some("search" | "search-type" | "search-system")) => "Query",
        _ => return None,
    };
    Some((if patient { "Patient" } else { "" }, base))
}

/// An absolute reference on the gateway's public base, as a JSON string.
fn reference(json: &mut Json<'_>, base: &str, ty: &str, id: &str, vid: Option<&str>) {
    json.raw("\"");
    json.escaped(base);
    json.raw("/");
    json.escaped(ty);
    json.raw("/");
    json.escaped(id);
    if let Some(vid) = vid {
        json.raw("/_history/");
        json.escaped(vid);
    }
    json.raw("\"");
}

/// `recorded`: an RFC 3339 instant in UTC to the millisecond, as FHIR servers usually keep instants, as a JSON
/// string (written digit by digit: a formatter is most of an event's cost otherwise).
fn instant(json: &mut Json<'_>, at: SystemTime) {
    let at = time::OffsetDateTime::from(at);
    let Ok(year) = u64::try_from(at.year()).map_err(drop).and_then(|y| if y <= 9999 { Ok(y) } else { Err(()) }) else {
        // A clock outside the years RFC 3339 can write.
        json.raw("\"1970-01-01T00:00:00.000Z\"");
        return;
    };
    json.raw("\"");
    json.digits(year, 4);
    for (separator, value) in
        [("-", u8::from(at.month())), ("-", at.day()), ("T", at.hour()), (":", at.minute()), (":", at.second())]
    {
        json.raw(separator);
        json.digits(u64::from(value), 2);
    }
    json.raw(".");
    json.digits(u64::from(at.millisecond()), 3);
    json.raw("Z\"");
}

/// Writes the AuditEvent `id` that records `act` by `who` (`None`: unauthenticated) with `outcome`, for `patient`
/// (one of `act.patients`, BALP's patient variants having exactly one), as JSON into `out`.
pub fn write(
    out: &mut Vec<u8>,
    id: &str,
    context: &Context,
    who: Option<&Who<'_>>,
    act: &Act,
    outcome: &Outcome,
    patient: Option<&str>,
) {
    let json = &mut Json(out);
    let status = outcome.status;
    json.raw(r#"{"resourceType":"AuditEvent""#);
    json.field("id", id);
    if let Some((variant, base)) = profile(act, patient.is_some()).filter(|_| outcome_code(status) == "0") {
        json.raw(r#","meta":{"profile":[""#);
        json.raw(BALP);
        json.raw(variant);
        json.raw(base);
        json.raw(r#""]}"#);
    }
    if let Some(who) = who {
        json.raw(r#","extension":[{"url":""#);
        json.raw(TENANT_EXTENSION);
        json.raw("\"");
        json.field("valueString", who.tenant);
        json.raw("}]");
    }
    json.raw(REST);
    let mut subtypes = Vec::with_capacity(2);
    if let Some(code) = act.subtype {
        subtypes.push((Some(RESTFUL), Some(code), code));
    }
    if let Some((canonical, name)) = &act.operation {
        subtypes.push((canonical.map(|_| "urn:ietf:rfc:3986"), *canonical, name));
    }
    if !subtypes.is_empty() {
        json.raw(r#","subtype":["#);
        for (i, (system, code, display)) in subtypes.into_iter().enumerate() {
            json.raw(if i == 0 { "{" } else { ",{" });
            let mut first = true;
            for (name, value) in [("system", system), ("code", code), ("display", Some(display))] {
                if let Some(value) = value {
                    json.raw(if first { "\"" } else { ",\"" });
                    json.raw(name);
                    json.raw("\":");
                    json.text(value);
                    first = false;
                }
            }
            json.raw("}");
        }
        json.raw("]");
    }
    json.field("action", act.action.code());
    json.raw(r#","recorded":"#);
    instant(json, context.recorded);
    json.field("outcome", outcome_code(status));
    json.raw(r#","outcomeDesc":""#);
    json.digits(u64::from(status), 3);
    json.raw(" ");
    json.escaped(reason(status));
    if let Some(detail) = &outcome.detail {
        json.raw(": ");
        json.escaped(detail);
    }
    if let Some(trace) = context.trace_id {
        json.raw("; trace ");
        json.escaped(trace);
    }
    json.raw("\"");
    agents(json, context, who, act);
    json.raw(r#","source":{"site":"#);
    json.text(context.public_base);
    json.raw(r#","observer":{"identifier":{"system":""#);
    json.raw(NODE_SYSTEM);
    json.raw("\"");
    json.field("value", context.node);
    json.raw(r#"},"display":"fhirgw data plane "#);
    json.escaped(context.node);
    json.raw("\"");
    json.raw("}");
    json.raw(APPLICATION_SERVER);
    json.raw("}");
    entities(json, context, act, patient);
    json.raw("}");
}

/// `"who":{"identifier":{"system":…,"value":…}}` (no system when `None`).
fn who_identifier(json: &mut Json<'_>, system: Option<&str>, value: &str) {
    json.raw(r#","who":{"identifier":{"#);
    if let Some(system) = system {
        json.raw(r#""system":"#);
        json.text(system);
        json.raw(",");
    }
    json.raw(r#""value":"#);
    json.text(value);
    json.raw("}}");
}

fn agents(json: &mut Json<'_>, context: &Context, who: Option<&Who<'_>>, act: &Act) {
    // BALP: the client is the Source Role ID and the server the Destination, except in the Read pattern.
    let (client_role, server_role) =
        if act.action == Action::Read { (DESTINATION_ROLE, SOURCE_ROLE) } else { (SOURCE_ROLE, DESTINATION_ROLE) };
    json.raw(r#","agent":[{"type":{"coding":["#);
    json.raw(client_role);
    json.raw("]}");
    match who {
        Some(Who { client_id: Some(client), issuer, .. }) => who_identifier(json, *issuer, client),
        Some(who) => {
            json.raw(r#","who":{"display":"a client of tenant "#);
            json.escaped(who.tenant);
            json.raw("\"}");
        }
        None => json.raw(r#","who":{"display":"unauthenticated client"}"#),
    }
    json.raw(r#","requestor":false,"network":{"address":"#);
    // An address needs no escaping; written as it formats (a Vec cannot fail to take it).
    json.raw("\"");
    let _ = write!(json.0, "{}", context.client);
    json.raw("\"");
    json.raw(r#","type":"2"}},{"type":{"coding":["#);
    json.raw(server_role);
    json.raw("]}");
    who_identifier(json, Some("urn:ietf:rfc:3986"), context.public_base);
    json.raw(r#","requestor":false,"network":{"address":"#);
    json.text(context.public_base);
    json.raw(r#","type":"5"}}"#);
    if let Some(who) = who.filter(|w| !w.subject.is_empty()) {
        let user_role = match act.action {
            Action::Create | Action::Update | Action::Delete => AUTHOR,
            Action::Read | Action::Execute => RECIPIENT,
        };
        json.raw(r#",{"type":{"coding":["#);
        json.raw(user_role);
        json.raw("]}");
        who_identifier(json, who.issuer, who.subject);
        json.raw(r#","requestor":true}"#);
    }
    json.raw("]");
}

fn entities(json: &mut Json<'_>, context: &Context, act: &Act, patient: Option<&str>) {
    let base = context.public_base;
    json.raw(r#","entity":["#);
    if let Some(patient) = patient {
        json.raw(r#"{"what":{"reference":"#);
        reference(json, base, "Patient", patient, None);
        json.raw(r#","type":"Patient"},"#);
        json.raw(PERSON_PATIENT);
        json.raw("},");
    }
    if let Some((ty, id, vid)) = &act.resource {
        json.raw(r#"{"what":{"#);
        if let Some(id) = id {
            json.raw(r#""reference":"#);
            reference(json, base, ty, id, vid.as_deref());
            json.raw(",");
        }
        json.raw(r#""type":"#);
        json.text(ty);
        json.raw("},");
        json.raw(OBJECT_RESOURCE);
        json.raw("},");
    }
    if let Some(query) = &act.query {
        json.raw("{");
        json.raw(OBJECT_QUERY);
        if let Some(executed) = &act.executed {
            json.field("description", executed);
        }
        json.raw(r#","query":""#);
        let at = json.0.len();
        json.0.resize(at + base64::encoded_len(query.len(), true).unwrap_or(0), 0);
        // Sized just above: the encoding fits.
        let _ = STANDARD.encode_slice(query, json.0.get_mut(at..).unwrap_or_default());
        json.raw("\"");
        json.raw("},");
    }
    json.raw(r#"{"what":{"identifier":{"value":"#);
    json.text(context.transaction);
    json.raw("}},");
    json.raw(TRANSACTION_TYPE);
    let trace = context.trace_id.filter(|t| *t != context.transaction);
    if trace.is_some() || act.entry.is_some() {
        json.raw(r#","detail":["#);
        if let Some(trace) = trace {
            json.raw(r#"{"type":"trace-id","valueString":"#);
            json.text(trace);
            json.raw("}");
        }
        if let Some(index) = act.entry {
            json.raw(if trace.is_some() { "," } else { "" });
            json.raw(r#"{"type":"bundle-entry","valueString":""#);
            json.digits(index as u64, 1);
            json.raw("\"}");
        }
        json.raw("]");
    }
    json.raw("}]");
}

#[cfg(test)]
#[path = "event_tests.rs"]
mod tests;
