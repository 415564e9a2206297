use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use super::*;

/// The event as JSON, as it is spooled (and it must parse).
fn build(id: &str, context: &Context, who: Option<&Who>, act: &Act, outcome: &Outcome, patient: Option<&str>) -> Value {
    let mut out = Vec::new();
    write(&mut out, id, context, who, act, outcome, patient);
    serde_json::from_slice(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)))
}

fn context() -> Context<'static> {
    Context {
        recorded: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
        client: "203.0.113.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        public_base: "https://gw.example/fhir",
        node: "dp-1",
        transaction: "req-42",
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
    }
}

fn who() -> Who<'static> {
    Who { tenant: "clinic-a", subject: "user-7", client_id: Some("app-1"), issuer: Some("https://idp.example") }
}

fn codes(event: &Value, path: &str) -> Vec<String> {
    event
        .pointer(path)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    let c = i.pointer("/type/coding/0/code").or_else(|| i.pointer("/type/code")).or(i.get("code"));
                    c.and_then(Value::as_str).unwrap_or_default().to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn entity<'a>(event: &'a Value, role: &str) -> Option<&'a Value> {
    event["entity"].as_array()?.iter().find(|e| e.pointer("/role/code").and_then(Value::as_str) == Some(role))
}

#[test]
fn a_patient_read_follows_balp_patient_read() {
    let mut act = Act::new(AuditInteraction::Read, Some("read"), Action::Read);
    act.resource = Some(("Observation".into(), Some("o1".into()), Some("3".into())));
    let event = build("id-1", &context(), Some(&who()), &act, &Outcome { status: 200, detail: None }, Some("p1"));
    assert_eq!(event["resourceType"], "AuditEvent");
    assert_eq!(event["id"], "id-1");
    assert_eq!(event["meta"]["profile"][0], format!("{BALP}PatientRead"));
    assert_eq!(event["type"]["code"], "rest");
    assert_eq!(event["subtype"][0]["code"], "read");
    assert_eq!(event["action"], "R");
    assert_eq!(event["outcome"], "0");
    assert_eq!(event["recorded"], "2026-09-21T14:13:20.123Z");
    assert_eq!(codes(&event, "/agent"), ["110152", "110153", "IRCP"], "BALP Read: the client is the destination");
    assert_eq!(event["agent"][0]["network"]["address"], "203.0.113.7");
    assert_eq!(event["agent"][0]["who"]["identifier"]["value"], "app-1");
    assert_eq!(event["agent"][0]["who"]["identifier"]["system"], "https://idp.example");
    assert_eq!(event["agent"][2]["who"]["identifier"]["value"], "user-7");
    assert_eq!(event["agent"][2]["requestor"], true);
    assert_eq!(event["source"]["observer"]["identifier"]["value"], "dp-1");
    assert_eq!(event["extension"][0]["valueString"], "clinic-a");
    let patient = entity(&event, "1").unwrap_or_else(|| panic!("no patient entity: {event}"));
    assert_eq!(patient["what"]["reference"], "https://gw.example/fhir/Patient/p1");
    assert_eq!(patient["type"]["code"], "1");
    let data = entity(&event, "4").unwrap_or_else(|| panic!("no data entity: {event}"));
    assert_eq!(data["what"]["reference"], "https://gw.example/fhir/Observation/o1/_history/3");
    let transaction = event["entity"].as_array().and_then(|e| e.iter().find(|e| e["type"]["code"] == "XrequestId"));
    let transaction = transaction.unwrap_or_else(|| panic!("no transaction entity: {event}"));
    assert_eq!(transaction["what"]["identifier"]["value"], "req-42");
    assert_eq!(transaction["detail"][0]["valueString"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(event["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("200 OK") && d.contains("trace 4bf9")));
}

#[test]
fn a_query_carries_the_request_base64_and_what_ran_upstream() {
    let mut act = Act::new(AuditInteraction::Search, Some("search-type"), Action::Execute);
    act.query = Some("GET https://gw.example/fhir/Observation?patient=p1&_page=redacted".into());
    act.executed = Some("GET Observation?patient=p1&_tag=https%3A%2F%2Ffhirgw.dev%2Fdataset%7Ca".into());
    let plain = build("q", &context(), Some(&who()), &act, &Outcome { status: 200, detail: None }, None);
    assert_eq!(plain["meta"]["profile"][0], format!("{BALP}Query"));
    assert_eq!(codes(&plain, "/agent"), ["110153", "110152", "IRCP"]);
    let query = entity(&plain, "24").unwrap_or_else(|| panic!("no query entity: {plain}"));
    let decoded = STANDARD.decode(query["query"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&decoded), "GET https://gw.example/fhir/Observation?patient=p1&_page=redacted");
    assert!(query["description"].as_str().is_some_and(|d| d.contains("_tag=")));
    assert!(query.get("what").is_none(), "BALP: a query entity names no resource");
    let patient = build("q", &context(), Some(&who()), &act, &Outcome { status: 200, detail: None }, Some("p1"));
    assert_eq!(patient["meta"]["profile"][0], format!("{BALP}PatientQuery"));
}

#[test]
fn writes_name_the_user_as_author() {
    for (code, action, profile) in [
        ("create", Action::Create, "Create"),
        ("update", Action::Update, "Update"),
        ("delete", Action::Delete, "Delete"),
    ] {
        let mut act = Act::new(AuditInteraction::Create, Some(code), action);
        act.resource = Some(("Patient".into(), Some("p9".into()), None));
        let event = build("w", &context(), Some(&who()), &act, &Outcome { status: 201, detail: None }, Some("p9"));
        assert_eq!(event["meta"]["profile"][0], format!("{BALP}Patient{profile}"), "{code}");
        assert_eq!(codes(&event, "/agent"), ["110153", "110152", "AUT"], "{code}");
        assert_eq!(event["action"], action.code());
    }
}

#[test]
fn failures_say_why_and_claim_no_profile() {
    let mut act = Act::new(AuditInteraction::Read, Some("read"), Action::Read);
    act.resource = Some(("Patient".into(), Some("b1".into()), None));
    let cases = [
        (401, None, "4", "401 Unauthorized"),
        (403, Some("forbidden: scopes"), "4", "403 Forbidden: forbidden: scopes"),
        (404, Some("outside the grants"), "4", "404 Not Found: outside the grants"),
        (502, None, "8", "502 Bad Gateway"),
        (500, None, "12", "500 Internal Server Error"),
    ];
    for (status, detail, outcome, desc) in cases {
        let outcome_in = Outcome { status, detail: detail.map(str::to_owned) };
        let who = (status != 401).then(who);
        let event = build("f", &context(), who.as_ref(), &act, &outcome_in, None);
        assert_eq!(event["outcome"], outcome, "{status}");
        assert!(event["outcomeDesc"].as_str().is_some_and(|d| d.starts_with(desc)), "{status}: {event}");
        assert!(event.get("meta").is_none(), "{status}: a failure claims no BALP profile");
    }
    let anonymous = build("f", &context(), None, &act, &Outcome { status: 401, detail: None }, None);
    assert_eq!(anonymous["agent"][0]["who"]["display"], "unauthenticated client");
    assert_eq!(anonymous["agent"].as_array().map(Vec::len), Some(2), "no user without a token");
    assert!(anonymous.get("extension").is_none());
}

#[test]
fn operations_name_their_definition() {
    let mut act = Act::new(AuditInteraction::Operation, Some("operation"), Action::Execute);
    act.operation = Some((Some("http://hl7.org/fhir/OperationDefinition/Patient-everything"), "$everything".into()));
    act.entry = Some(3);
    let event = build("o", &context(), Some(&who()), &act, &Outcome { status: 200, detail: None }, Some("p1"));
    assert_eq!(event["subtype"][1]["code"], "http://hl7.org/fhir/OperationDefinition/Patient-everything");
    assert!(event.get("meta").is_none());
    let transaction = event["entity"].as_array().and_then(|e| e.last()).cloned().unwrap_or_default();
    assert_eq!(transaction["detail"][1]["valueString"], "3", "{event}");
}

#[test]
fn strings_are_written_as_serde_json_would() {
    for text in
        ["", "Patient/p1", "a\"b", "back\\slash", "line\nbreak", "tab\t", "\u{1}", "é ü ✓", "</script>", "\u{7f}"]
    {
        let mut out = Vec::new();
        Json(&mut out).text(text);
        assert_eq!(String::from_utf8_lossy(&out), serde_json::to_string(text).unwrap_or_default(), "{text:?}");
    }
    // Checked sixteen bytes at a time: a character to escape at every position of a block and of the remainder.
    for len in [15, 16, 17, 31, 32, 33, 47] {
        for at in 0..len {
            for special in ['"', '\\', '\n', '\u{1f}'] {
                let mut text: String = "x".repeat(len);
                text.replace_range(at..=at, &special.to_string());
                let mut out = Vec::new();
                Json(&mut out).text(&text);
                assert_eq!(String::from_utf8_lossy(&out), serde_json::to_string(&text).unwrap_or_default(), "{text:?}");
            }
        }
        assert!(plain("é✓/x ".repeat(len).as_bytes()));
    }
}

#[test]
fn instants_are_utc_to_the_millisecond() {
    for (ms, text) in [
        (1_790_000_000_123u64, "2026-09-21T14:13:20.123Z"),
        (1_790_000_000_120, "2026-09-21T14:13:20.120Z"),
        (1_790_000_000_000, "2026-09-21T14:13:20.000Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (951_782_400_007, "2000-02-29T00:00:00.007Z"),
    ] {
        let mut out = Vec::new();
        instant(&mut Json(&mut out), UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(String::from_utf8_lossy(&out), format!("\"{text}\""));
    }
    let mut out = Vec::new();
    for (n, width) in [(0, 1), (7, 3), (42, 1), (2026, 4), (u64::MAX, 1)] {
        Json(&mut out).digits(n, width);
        out.push(b' ');
    }
    assert_eq!(String::from_utf8_lossy(&out), format!("0 007 42 2026 {} ", u64::MAX));
}
