//! The audit trail (issue 15), end to end: every interaction kind through a real data plane arrives in a real FHIR
//! server (a second instance of the test FHIR server, behind a switchable TCP forwarder) as an AuditEvent that its
//! R4 validator (`@medplum/core`'s `validateResource`) accepts and that carries the BALP elements; strict mode
//! survives `kill -9` with every answered request recorded once; an outage of the audit server loses nothing; a
//! relaxed tenant with a tiny queue drops (counted) without being slowed; SIGTERM drains the spool.
//!
//! Outage and retry timings: the data planes here retry every 50 ms to 500 ms (`--audit-retry-*-ms`), so an outage
//! of any length is followed by delivery within about half a second; what an outage's length changes is only how
//! many retries happen and how much the spool holds, which the test measures. The outage lasts
//! `FHIRGW_TEST_AUDIT_OUTAGE_SECS` (default 8; the issue's 30 s with `FHIRGW_TEST_AUDIT_OUTAGE_SECS=30`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure};
use fhirgw_e2e::issuer::Issuer;
use fhirgw_e2e::outage::Switch;
use fhirgw_e2e::{Admin, Process, World, admin, eventually, grpc_url, http, workspace};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use serde_json::{Value, json};
use tokio::process::Command;

const AUDIT_TOKEN: &str = "audit-sink-token-0123456789abcdef";
const WRITE: &str = "openid user/*.*";
const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";

struct Audited {
    world: World,
    fhir: Process,
    sink: Process,
    switch: Switch,
    _cp: Process,
    dp: Process,
    dp_args: Vec<String>,
    issuer: Issuer,
    admin: Admin,
}

fn mode(mode: pb::AuditMode) -> Option<pb::AuditPolicy> {
    Some(pb::AuditPolicy { mode: mode as i32, interactions: Vec::new() })
}

impl Audited {
    /// A clinical FHIR server, an audit FHIR server behind a switch, a control plane and a data plane auditing into
    /// it; tenant-a and tenant-b with the given audit policies.
    async fn start(a: Option<pb::AuditPolicy>, b: Option<pb::AuditPolicy>, dp_extra: &[&str]) -> Audited {
        let world = World::new();
        std::fs::write(world.path("audit.token"), format!("{AUDIT_TOKEN}\n")).unwrap();
        let fhir = world.fhir_server().await;
        let mut command = Command::new(workspace().join("tests/fhir-server/run.sh"));
        command.arg("--listen").arg("127.0.0.1:0").arg("--require-token").arg(world.path("audit.token"));
        let sink = Process::spawn("audit-fhir", command, world.dir.path()).await;
        let switch = Switch::start(sink.addr("listening").parse().unwrap()).await;
        let issuer = fixtures::issuer().await;
        let cp = world.control_plane("cp", "cp.db").await;
        let auth = format!(r#"{{"static_token":{{"token_file":"{}"}}}}"#, world.path("audit.token").display());
        let mut dp_args: Vec<String> = vec![
            "--audit-dir".into(),
            world.path("audit-spool").display().to_string(),
            "--audit-fhir-url".into(),
            format!("http://{}/fhir", switch.addr()),
            "--audit-fhir-auth".into(),
            auth,
            "--audit-retry-initial-ms".into(),
            "50".into(),
            "--audit-retry-max-ms".into(),
            "500".into(),
        ];
        dp_args.extend(dp_extra.iter().map(|s| (*s).to_owned()));
        let dp = start_dp(&world, &cp, &dp_args).await;
        let mut admin = admin(&cp).await;
        configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
        let mut revision = 0;
        for (name, audit) in [("tenant-a", a), ("tenant-b", b)] {
            let tenant = pb::Tenant { name: name.into(), display_name: format!("Tenant {name}"), audit };
            let put = api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() };
            let entry = admin.put_tenant(put).await.unwrap().into_inner();
            revision = entry.meta.unwrap().version.parse().unwrap();
        }
        fixtures::wait_in_sync(&admin, 1, revision).await;
        Audited { world, fhir, sink, switch, _cp: cp, dp, dp_args, issuer, admin }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.dp.addr("fhir"))
    }

    fn sink_base(&self) -> String {
        self.sink.ready["base_url"].as_str().unwrap().to_owned()
    }

    /// Every AuditEvent in the audit server, read directly (not through the switch).
    async fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let url = format!("{}/AuditEvent?_count=1000&_offset={}", self.sink_base(), out.len());
            let page: Value = http().get(url).bearer_auth(AUDIT_TOKEN).send().await.unwrap().json().await.unwrap();
            let entries = page["entry"].as_array().cloned().unwrap_or_default();
            let n = entries.len();
            out.extend(entries.into_iter().map(|e| e["resource"].clone()));
            if n < 1000 {
                return out;
            }
        }
    }

    /// The events recorded for the request sent with `X-Request-Id: id`, once `n` have arrived.
    async fn events_for(&self, id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<Value> = self.events().await.into_iter().filter(|e| transaction(e) == Some(id)).collect();
            if found.len() >= n {
                return found;
            }
            if Instant::now() > deadline {
                let metrics = http().get(format!("http://{}/metrics", self.dp.addr("admin"))).send().await;
                let metrics = metrics.unwrap().text().await.unwrap();
                let audit: Vec<&str> = metrics.lines().filter(|l| l.contains("audit")).collect();
                let log = std::fs::read_to_string(&self.dp.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "{n} AuditEvent(s) for request {id}: found {found:#?}\n{}\n{}",
                    audit.join("\n"),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `@medplum/core`'s validator on one resource, as the audit server runs it.
    async fn validate(&self, resource: &Value) -> Value {
        let url = format!("http://{}/__admin/validate", self.sink.addr("listening"));
        http().post(url).json(resource).send().await.unwrap().json().await.unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(&self.dp, name).await
    }

    async fn restart_dp(&mut self) {
        self.dp = start_dp(&self.world, &self._cp, &self.dp_args).await;
    }
}

async fn start_dp(world: &World, cp: &Process, args: &[String]) -> Process {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    world.data_plane_args("dp", &grpc_url(cp), "dp-state", &world.path("dataplane.token"), &args).await
}

/// A metric's value (the sum over its label sets) on a data plane's admin port.
async fn metric(dp: &Process, name: &str) -> f64 {
    let text = http().get(format!("http://{}/metrics", dp.addr("admin"))).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The request id (BALP's transaction entity) an event carries.
fn transaction(event: &Value) -> Option<&str> {
    event["entity"].as_array()?.iter().find(|e| e["type"]["code"] == "XrequestId")?["what"]["identifier"]["value"]
        .as_str()
}

fn entity<'a>(event: &'a Value, role: &str) -> Option<&'a Value> {
    event["entity"].as_array()?.iter().find(|e| e["role"]["code"] == role)
}

fn agent_codes(event: &Value) -> Vec<String> {
    event["agent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["type"]["coding"][0]["code"].as_str().unwrap().to_owned())
        .collect()
}

fn decoded_query(event: &Value) -> String {
    let q = entity(event, "24").unwrap_or_else(|| panic!("no query entity: {event}"))["query"].as_str().unwrap();
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(q).unwrap()).unwrap()
}

/// What one request must have produced.
#[derive(Default)]
struct Want {
    status: u16,
    subtype: Option<&'static str>,
    action: &'static str,
    profile: Option<&'static str>,
    patients: Vec<&'static str>,
    /// The data entity's reference ends with this.
    data: Option<String>,
    /// The decoded query is this.
    query: Option<String>,
    /// outcomeDesc contains this.
    desc: Option<&'static str>,
}

fn want(status: u16, subtype: &'static str, action: &'static str) -> Want {
    Want { status, subtype: Some(subtype), action, ..Want::default() }
}

/// Sends requests with fresh ids and checks what each one recorded.
struct Checker<'a> {
    s: &'a Audited,
    n: usize,
    checked: usize,
    tokens: Vec<String>,
}

/// A response as the client saw it.
struct Seen {
    headers: reqwest::header::HeaderMap,
    events: Vec<Value>,
}

impl Checker<'_> {
    fn id(&mut self) -> String {
        self.n += 1;
        format!("audit-test-{}", self.n)
    }

    async fn check(&mut self, what: &str, request: reqwest::RequestBuilder, want: Want) -> Seen {
        let id = self.id();
        let response = request.header("x-request-id", &id).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, want.status, "{what}: {body}");
        let expected = want.patients.len().max(1);
        let events = self.s.events_for(&id, expected).await;
        assert_eq!(events.len(), expected, "{what}: one event per patient: {events:#?}");
        let outcome = if status < 400 {
            "0"
        } else if status < 500 {
            "4"
        } else {
            "8"
        };
        let public = self.s.url("/fhir");
        let mut patients = BTreeSet::new();
        for event in &events {
            self.valid(event).await;
            assert_eq!(event["type"]["code"], "rest", "{what}");
            assert_eq!(event["subtype"][0]["code"].as_str(), want.subtype, "{what}: {event:#}");
            assert_eq!(event["action"], want.action, "{what}");
            assert_eq!(event["outcome"], outcome, "{what}: {event:#}");
            if let Some(desc) = want.desc {
                assert!(event["outcomeDesc"].as_str().unwrap().contains(desc), "{what}: {event:#}");
            }
            match want.profile {
                Some(p) => assert_eq!(event["meta"]["profile"][0], format!("{BALP}{p}"), "{what}"),
                None => assert!(event["meta"]["profile"].is_null(), "{what}: {event:#}"),
            }
            // The client (with its real address), the server, the observer.
            let agents = agent_codes(event);
            assert!(agents.iter().any(|c| c == "110153") && agents.iter().any(|c| c == "110152"), "{what}");
            let client = event["agent"].as_array().unwrap().iter().find(|a| a["network"]["type"] == "2").unwrap();
            assert_eq!(client["network"]["address"], "127.0.0.1", "{what}");
            assert_eq!(event["source"]["observer"]["identifier"]["value"], "dp");
            if let Some(p) = entity(event, "1") {
                let reference = p["what"]["reference"].as_str().unwrap();
                assert!(reference.starts_with(&format!("{public}/Patient/")), "{what}: {reference}");
                patients.insert(reference.rsplit('/').next().unwrap().to_owned());
            }
            if let Some(data) = &want.data {
                let r = entity(event, "4").unwrap_or_else(|| panic!("{what}: no data entity: {event:#}"));
                let reference = r["what"]["reference"].as_str().unwrap();
                assert!(reference.starts_with(&public) && reference.ends_with(data.as_str()), "{what}: {reference}");
            }
            if let Some(query) = &want.query {
                assert_eq!(&decoded_query(event), query, "{what}");
            }
            self.checked += 1;
        }
        let want_patients: BTreeSet<String> = want.patients.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(patients, want_patients, "{what}");
        Seen { headers, events }
    }

    /// Valid FHIR R4 by the audit server's own validator, and no token in it.
    async fn valid(&self, event: &Value) {
        let verdict = self.s.validate(event).await;
        assert_eq!(verdict["valid"], true, "not valid FHIR R4: {verdict}\n{event:#}");
        let text = event.to_string();
        for token in &self.tokens {
            assert!(!text.contains(token.as_str()), "a token in the audit trail: {event:#}");
        }
        assert!(!text.contains("Bearer"), "{event:#}");
    }
}

fn user(event: &Value) -> &Value {
    event["agent"].as_array().unwrap().iter().find(|a| a["requestor"] == true).unwrap()
}

#[tokio::test]
async fn every_interaction_kind_is_recorded_as_a_valid_balp_event() {
    let s = Audited::start(mode(pb::AuditMode::Strict), None, &[]).await;
    let read = s.issuer.token("tenant-a", READ_SCOPES);
    let write = s.issuer.token("tenant-a", WRITE);
    let narrow = s.issuer.token("tenant-a", "openid user/Observation.read");
    let public = s.url("/fhir");
    let mut c = Checker { s: &s, n: 0, checked: 0, tokens: vec![read.clone(), write.clone(), narrow.clone()] };
    let get = |path: &str, token: &str| http().get(s.url(path)).bearer_auth(token);

    // Reads: a patient, a resource in a patient's compartment, a version; history.
    let seen = c
        .check(
            "read Patient",
            get("/fhir/Patient/a-pat-1", &read),
            Want {
                profile: Some("PatientRead"),
                patients: vec!["a-pat-1"],
                data: Some("/Patient/a-pat-1".into()),
                ..want(200, "read", "R")
            },
        )
        .await;
    let version = seen.headers["etag"].to_str().unwrap().trim_start_matches("W/").trim_matches('"').to_owned();
    let seen = c
        .check(
            "read Observation",
            get("/fhir/Observation/a-obs-3", &read),
            Want {
                profile: Some("PatientRead"),
                patients: vec!["a-pat-2"],
                data: Some("/Observation/a-obs-3".into()),
                ..want(200, "read", "R")
            },
        )
        .await;
    assert_eq!(user(&seen.events[0])["who"]["identifier"]["value"], "client-tenant-a");
    assert_eq!(user(&seen.events[0])["type"]["coding"][0]["code"], "IRCP");
    assert_eq!(seen.events[0]["extension"][0]["valueString"], "tenant-a");
    c.check(
        "vread",
        get(&format!("/fhir/Patient/a-pat-1/_history/{version}"), &read),
        Want {
            profile: Some("PatientRead"),
            patients: vec!["a-pat-1"],
            data: Some(format!("/Patient/a-pat-1/_history/{version}")),
            ..want(200, "vread", "R")
        },
    )
    .await;
    c.check(
        "history",
        get("/fhir/Patient/a-pat-1/_history", &read),
        Want { patients: vec!["a-pat-1"], ..want(200, "history-instance", "R") },
    )
    .await;

    // Searches: narrowed to a patient (PatientQuery), or not (Query); POST _search; a compartment search.
    let seen = c
        .check(
            "search by patient",
            get("/fhir/Observation?patient=Patient/a-pat-1&_count=5", &read),
            Want {
                profile: Some("PatientQuery"),
                patients: vec!["a-pat-1"],
                query: Some(format!("GET {public}/Observation?patient=Patient/a-pat-1&_count=5")),
                ..want(200, "search-type", "E")
            },
        )
        .await;
    let executed = entity(&seen.events[0], "24").unwrap()["description"].as_str().unwrap().to_owned();
    assert!(executed.starts_with("GET Observation?") && executed.contains("_tag="), "ran upstream: {executed}");
    c.check(
        "search",
        get("/fhir/Condition", &read),
        Want {
            profile: Some("Query"),
            query: Some(format!("GET {public}/Condition")),
            ..want(200, "search-type", "E")
        },
    )
    .await;
    let form =
        http().post(s.url("/fhir/Observation/_search")).bearer_auth(&read).form(&[("subject", "Patient/a-pat-2")]);
    c.check(
        "POST _search",
        form,
        Want {
            profile: Some("PatientQuery"),
            patients: vec!["a-pat-2"],
            query: Some(format!("POST {public}/Observation/_search\n\nsubject=Patient%2Fa-pat-2")),
            ..want(200, "search-type", "E")
        },
    )
    .await;
    c.check(
        "compartment search",
        get("/fhir/Patient/a-pat-1/Observation", &read),
        Want { profile: Some("PatientQuery"), patients: vec!["a-pat-1"], ..want(200, "search-type", "E") },
    )
    .await;
    c.check(
        "$everything",
        get("/fhir/Patient/a-pat-1/$everything", &read),
        Want { patients: vec!["a-pat-1"], data: Some("/Patient/a-pat-1".into()), ..want(200, "operation", "E") },
    )
    .await;

    // Writes: create (the id and version from Location), update, patch, delete, each with its patient.
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "audited"},
        "subject": {"reference": "Patient/a-pat-3"}});
    let create = http().post(s.url("/fhir/Observation")).bearer_auth(&write).json(&obs);
    let seen = c
        .check(
            "create",
            create,
            Want { profile: Some("PatientCreate"), patients: vec!["a-pat-3"], ..want(201, "create", "C") },
        )
        .await;
    let location = seen.headers["location"].to_str().unwrap().to_owned();
    let created = entity(&seen.events[0], "4").unwrap()["what"]["reference"].as_str().unwrap().to_owned();
    assert_eq!(created, location, "the created resource, as the client was told");
    let id = created.split("/Observation/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    assert_eq!(user(&seen.events[0])["type"]["coding"][0]["code"], "AUT", "BALP: the user authored it");
    let mut updated = obs.clone();
    updated["id"] = json!(id);
    updated["status"] = json!("amended");
    let put = http().put(s.url(&format!("/fhir/Observation/{id}"))).bearer_auth(&write).json(&updated);
    let seen = c
        .check(
            "update",
            put,
            Want { profile: Some("PatientUpdate"), patients: vec!["a-pat-3"], ..want(200, "update", "U") },
        )
        .await;
    let etag = seen.headers["etag"].to_str().unwrap().trim_start_matches("W/").trim_matches('"').to_owned();
    let data = entity(&seen.events[0], "4").unwrap()["what"]["reference"].as_str().unwrap().to_owned();
    assert!(data.ends_with(&format!("/Observation/{id}/_history/{etag}")), "{data}");
    let patch = http()
        .patch(s.url(&format!("/fhir/Observation/{id}")))
        .bearer_auth(&write)
        .header("content-type", "application/json-patch+json")
        .body(json!([{"op": "replace", "path": "/status", "value": "corrected"}]).to_string());
    c.check(
        "patch",
        patch,
        Want { profile: Some("PatientUpdate"), patients: vec!["a-pat-3"], ..want(200, "patch", "U") },
    )
    .await;
    let delete = http().delete(s.url(&format!("/fhir/Observation/{id}"))).bearer_auth(&write);
    c.check(
        "delete",
        delete,
        Want {
            profile: Some("PatientDelete"),
            patients: vec!["a-pat-3"],
            data: Some(format!("/Observation/{id}")),
            ..want(204, "delete", "D")
        },
    )
    .await;

    // Bulk export kick-off.
    let kick = get("/fhir/Patient/$export?_type=Patient", &read).header("prefer", "respond-async");
    c.check(
        "$export",
        kick,
        Want { query: Some(format!("GET {public}/Patient/$export?_type=Patient")), ..want(202, "operation", "E") },
    )
    .await;

    // Refusals: no token (401), out of scope (403), another tenant's resource and a missing one (the same 404 to
    // the client, told apart in the record).
    c.check(
        "no token",
        http().get(s.url("/fhir/Patient/a-pat-1")),
        Want { patients: vec!["a-pat-1"], desc: Some("401 Unauthorized"), ..want(401, "read", "R") },
    )
    .await;
    c.check(
        "out of scope",
        get("/fhir/Patient/a-pat-1", &narrow),
        Want { patients: vec!["a-pat-1"], desc: Some("403 Forbidden"), ..want(403, "read", "R") },
    )
    .await;
    c.check(
        "another tenant's",
        get("/fhir/Patient/b-pat-1", &read),
        Want { patients: vec!["b-pat-1"], desc: Some("outside the caller's grants"), ..want(404, "read", "R") },
    )
    .await;
    let seen = c
        .check(
            "missing",
            get("/fhir/Patient/nobody", &read),
            Want { patients: vec!["nobody"], ..want(404, "read", "R") },
        )
        .await;
    assert!(!seen.events[0]["outcomeDesc"].as_str().unwrap().contains("outside"), "{:#}", seen.events[0]);

    // Batch and transaction: one event per entry, each tied to the request and its place in the Bundle.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/a-pat-2"}},
        {"request": {"method": "GET", "url": "Patient/b-pat-1"}},
        {"request": {"method": "GET", "url": "Observation?patient=a-pat-1"}},
    ]});
    let id = c.id();
    let r = http().post(s.url("/fhir")).bearer_auth(&read).header("x-request-id", &id).json(&batch).send().await;
    assert_eq!(r.unwrap().status(), 200);
    let mut by_entry = BTreeMap::new();
    for event in s.events_for(&id, 3).await {
        c.valid(&event).await;
        let tx = event["entity"].as_array().unwrap().iter().find(|e| e["type"]["code"] == "XrequestId").unwrap();
        let index = tx["detail"].as_array().unwrap().iter().find(|d| d["type"] == "bundle-entry").unwrap();
        by_entry.insert(index["valueString"].as_str().unwrap().to_owned(), event.clone());
    }
    assert_eq!(by_entry.len(), 3);
    assert_eq!((&by_entry["0"]["outcome"], &by_entry["0"]["subtype"][0]["code"]), (&json!("0"), &json!("read")));
    assert_eq!(by_entry["1"]["outcome"], "4");
    assert!(
        by_entry["1"]["outcomeDesc"].as_str().unwrap().contains("outside the caller's grants"),
        "{:#}",
        by_entry["1"]
    );
    assert_eq!(by_entry["2"]["subtype"][0]["code"], "search-type");
    assert_eq!(entity(&by_entry["2"], "1").unwrap()["what"]["reference"], format!("{public}/Patient/a-pat-1"));
    let transaction_bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": obs},
        {"request": {"method": "GET", "url": "Patient/a-pat-1"}},
    ]});
    let id = c.id();
    let r = http()
        .post(s.url("/fhir"))
        .bearer_auth(&write)
        .header("x-request-id", &id)
        .json(&transaction_bundle)
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 200);
    let events = s.events_for(&id, 2).await;
    for event in &events {
        c.valid(event).await;
    }
    let subtypes: BTreeSet<&str> = events.iter().map(|e| e["subtype"][0]["code"].as_str().unwrap()).collect();
    assert_eq!(subtypes, BTreeSet::from(["create", "read"]));
    // A transaction refused whole for another tenant's entry: each entry recorded as refused, only that one as
    // hidden.
    let refused = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient/a-pat-1"}},
        {"request": {"method": "GET", "url": "Patient/b-pat-1"}},
    ]});
    let id = c.id();
    let r = http().post(s.url("/fhir")).bearer_auth(&write).header("x-request-id", &id).json(&refused).send().await;
    assert_eq!(r.unwrap().status(), 404);
    for event in s.events_for(&id, 2).await {
        c.valid(&event).await;
        assert_eq!(event["outcome"], "4");
        let patient = entity(&event, "1").unwrap()["what"]["reference"].as_str().unwrap().to_owned();
        let hidden = event["outcomeDesc"].as_str().unwrap().contains("outside");
        assert_eq!(hidden, patient.ends_with("/b-pat-1"), "{event:#}");
    }

    // A Bundle with no entries is recorded as the request itself.
    let empty =
        http().post(s.url("/fhir")).bearer_auth(&read).json(&json!({"resourceType": "Bundle", "type": "batch"}));
    c.check("empty batch", empty, Want { query: Some(format!("POST {public}")), ..want(200, "batch", "E") }).await;

    // Tenant B is not audited: nothing of its requests arrives.
    let b = s.issuer.token("tenant-b", READ_SCOPES);
    let r = get("/fhir/Patient/b-pat-1", &b).header("x-request-id", "tenant-b-read").send().await;
    assert_eq!(r.unwrap().status(), 200);
    eventually("tenant A's events shipped", Duration::from_secs(10), || async {
        (s.metric("fhirgw_dp_audit_oldest_unshipped_seconds").await == 0.0).then_some(())
    })
    .await;
    assert!(s.events().await.iter().all(|e| transaction(e) != Some("tenant-b-read")));
    let checked = c.checked + 5;
    assert!(s.metric("fhirgw_dp_audit_events_written_total").await >= checked as f64);
    assert!(s.metric("fhirgw_dp_audit_events_shipped_total").await >= checked as f64);
    let _ = (&s.fhir, &s.admin);
}

/// Requests sent with unique ids by `workers` loops until `stop`; returns the ids answered 200.
async fn load(url: String, token: String, prefix: &str, workers: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (url, token, stop, prefix) = (url.clone(), token.clone(), stop.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = http();
            let mut answered = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("{prefix}-{w}-{i}");
                let sent = client.get(&url).bearer_auth(&token).header("x-request-id", &id).send().await;
                match sent {
                    Ok(r) => {
                        if r.status() == 200 && r.bytes().await.is_ok() {
                            answered.push(id);
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            answered
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Waits until every id in `answered` has exactly one event in the sink, and none more.
async fn assert_each_recorded_once(s: &Audited, answered: &[String], prefix: &str) {
    let wanted: BTreeSet<&str> = answered.iter().map(String::as_str).collect();
    // First the data plane's own word that everything is delivered (cheap to ask). Reading every AuditEvent back from
    // the sink while it is still taking deliveries would slow the sink down (the in-memory test server pages with an
    // offset), and with it what is measured. The deadline grows with the backlog (the test server takes ~150 events/s
    // on this machine, alongside the data plane and the test).
    let deadline = Duration::from_secs(60) + Duration::from_millis(10 * answered.len() as u64);
    eventually("the data plane has delivered everything it recorded", deadline, || async {
        (s.metric("fhirgw_dp_audit_oldest_unshipped_seconds").await == 0.0).then_some(())
    })
    .await;
    let counts = eventually("every answered request's AuditEvent in the sink", Duration::from_secs(60), || async {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for event in s.events().await {
            if let Some(id) = transaction(&event).filter(|t| t.starts_with(prefix)) {
                *counts.entry(id.to_owned()).or_default() += 1;
            }
        }
        wanted.iter().all(|id| counts.contains_key(*id)).then_some(counts)
    })
    .await;
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "duplicated AuditEvents: {duplicated:?}");
}

#[tokio::test]
async fn strict_mode_survives_kill_9_with_every_answered_request_recorded_once() {
    let mut s = Audited::start(mode(pb::AuditMode::Strict), None, &[]).await;
    let token = s.issuer.token("tenant-a", READ_SCOPES);
    // The audit server is unreachable, so the spool holds events when the data plane dies...
    s.switch.down().await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(s.url("/fhir/Patient/a-pat-1"), token.clone(), "kill", 16, stop.clone()));
    eventually("requests answered before the kill", Duration::from_secs(20), || async {
        (metric(&s.dp, "fhirgw_dp_audit_events_written_total").await >= 40.0).then_some(())
    })
    .await;
    // ...and dies mid-load.
    s.dp.kill().await;
    stop.store(true, Ordering::Relaxed);
    let answered = running.await.unwrap();
    assert!(answered.len() >= 40, "{}", answered.len());
    // Restarted on the same spool, with the audit server back: the spool is replayed.
    s.switch.up().await;
    s.restart_dp().await;
    assert_each_recorded_once(&s, &answered, "kill-").await;
    // Traffic after the restart is recorded too.
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(s.url("/fhir/Patient/a-pat-1"), token, "after", 2, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let after = running.await.unwrap();
    assert!(!after.is_empty());
    assert_each_recorded_once(&s, &after, "after-").await;
}

#[tokio::test]
async fn an_audit_server_outage_under_load_loses_nothing() {
    let outage = std::env::var("FHIRGW_TEST_AUDIT_OUTAGE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    // Small segments, so the spool visibly shrinks back once delivered.
    let mut s = Audited::start(mode(pb::AuditMode::Strict), None, &["--audit-segment-bytes", "65536"]).await;
    let token = s.issuer.token("tenant-a", READ_SCOPES);
    s.switch.down().await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(s.url("/fhir/Patient/a-pat-1"), token, "outage", 4, stop.clone()));
    let started = Instant::now();
    // Through the outage: requests keep being answered (strict needs the local spool only), the spool grows, the
    // oldest undelivered event ages, deliveries are retried.
    let mut peak = 0.0_f64;
    while started.elapsed() < Duration::from_secs(outage) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(s.metric("fhirgw_dp_audit_spool_bytes").await);
    }
    stop.store(true, Ordering::Relaxed);
    let answered = running.await.unwrap();
    let age = s.metric("fhirgw_dp_audit_oldest_unshipped_seconds").await;
    assert!(age >= (outage as f64) - 2.0, "oldest unshipped event is {age} s old after a {outage} s outage");
    assert!(s.metric("fhirgw_dp_audit_events_retried_total").await > 0.0);
    assert!(peak > 3.0 * 65536.0, "the spool held the outage's events: peak {peak} bytes");
    assert!(answered.len() as f64 >= 5.0 * outage as f64, "{} requests answered in {outage} s", answered.len());
    assert!(s.events().await.iter().all(|e| transaction(e).is_none_or(|t| !t.starts_with("outage-"))));
    // The audit server returns: everything arrives, once; the spool shrinks back to its open segment.
    let back = Instant::now();
    s.switch.up().await;
    assert_each_recorded_once(&s, &answered, "outage-").await;
    eprintln!("{} events delivered {:?} after the audit server returned", answered.len(), back.elapsed());
    eventually("the spool shrinks back", Duration::from_secs(10), || async {
        let bytes = s.metric("fhirgw_dp_audit_spool_bytes").await;
        let age = s.metric("fhirgw_dp_audit_oldest_unshipped_seconds").await;
        (bytes <= 65536.0 * 2.0 && age == 0.0).then_some(())
    })
    .await;
    assert_eq!(s.metric("fhirgw_dp_audit_events_dropped_total").await, 0.0);
}

#[tokio::test]
async fn relaxed_mode_with_a_tiny_queue_drops_counted_and_is_not_slowed() {
    // Tenant A relaxed with a queue of 2 events and a spool that fills up (the audit server is down); tenant B not
    // audited (the baseline); tenant C strict.
    let mut s = Audited::start(
        mode(pb::AuditMode::Relaxed),
        None,
        &["--audit-queue-events", "2", "--audit-spool-max-bytes", "65536", "--audit-segment-bytes", "16384"],
    )
    .await;
    let tenant =
        pb::Tenant { name: "tenant-c".into(), display_name: String::new(), audit: mode(pb::AuditMode::Strict) };
    let put = api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() };
    let revision: u64 = s.admin.put_tenant(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&s.admin, 1, revision).await;
    s.switch.down().await;
    let a = s.issuer.token("tenant-a", READ_SCOPES);
    let b = s.issuer.token("tenant-b", READ_SCOPES);
    let c = s.issuer.token("tenant-c", READ_SCOPES);
    assert_eq!(http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&c).send().await.unwrap().status(), 404);
    // A burst larger than the queue: a batch of 5 entries is 5 events at once, dropped and counted.
    let entries: Vec<Value> = (0..5).map(|_| json!({"request": {"method": "GET", "url": "Patient/a-pat-1"}})).collect();
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let r = http().post(s.url("/fhir")).bearer_auth(&a).json(&batch).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let queue_full = r#"fhirgw_dp_audit_events_dropped_total{reason="queue_full"}"#;
    assert_eq!(metric_line(&s.dp, queue_full).await, 5.0, "the whole burst is dropped, and counted");
    // Load until the spool is full: relaxed requests keep being answered.
    let spool_full = r#"fhirgw_dp_audit_events_dropped_total{reason="spool_full"}"#;
    let started = Instant::now();
    while metric_line(&s.dp, spool_full).await == 0.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the spool never filled");
        for _ in 0..10 {
            let r = http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // Strict fails closed (503) while the spool is full.
    let r = http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&c).send().await.unwrap();
    assert_eq!(r.status(), 503, "strict fails closed when the spool is full");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(s.metric("fhirgw_dp_audit_strict_refusals_total").await >= 1.0);
    // Not slowed: relaxed reads whose events are dropped take what unaudited reads take, interleaved.
    let dropped_before = s.metric("fhirgw_dp_audit_events_dropped_total").await;
    let (mut relaxed_ms, mut baseline_ms) = (Vec::new(), Vec::new());
    let client = http();
    for _ in 0..60 {
        for (token, times) in [(&a, &mut relaxed_ms), (&b, &mut baseline_ms)] {
            let t = Instant::now();
            let path = if *token == a { "/fhir/Patient/a-pat-1" } else { "/fhir/Patient/b-pat-1" };
            let r = client.get(s.url(path)).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (relaxed, baseline) = (median(&mut relaxed_ms), median(&mut baseline_ms));
    eprintln!("median read: relaxed with a full spool {relaxed:.2} ms, unaudited {baseline:.2} ms");
    assert!(relaxed <= baseline * 2.0 + 2.0, "relaxed reads slowed: {relaxed:.2} ms vs {baseline:.2} ms unaudited");
    // Each of those events was dropped and counted (spool full; or queue full, when the writer thread lags). A
    // relaxed event is written after its answer, so the writer thread may count the last drops a moment later.
    eventually("the 60 relaxed events counted as dropped", Duration::from_secs(5), || async {
        let dropped = s.metric("fhirgw_dp_audit_events_dropped_total").await - dropped_before;
        assert!(dropped <= 60.0, "{dropped} events dropped for 60 requests");
        (dropped == 60.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.metric("fhirgw_dp_audit_events_dropped_total").await - dropped_before, 60.0, "no event counted twice");
    // Once the audit server is back, the spool drains and strict works again.
    s.switch.up().await;
    eventually("strict answers again once the spool drains", Duration::from_secs(20), || async {
        let r = http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&c).send().await.ok()?;
        (r.status() == 404).then_some(())
    })
    .await;
}

/// Strict mode answers only once the event is in the spool: a request whose events no longer fit (a batch larger
/// than what is left, admitted because the spool had room when it started) is answered 503 after it ran, and a
/// request arriving at a full spool is refused before it runs.
#[tokio::test]
async fn strict_mode_answers_503_when_the_event_cannot_be_made_durable() {
    let mut s = Audited::start(
        mode(pb::AuditMode::Strict),
        None,
        &["--audit-spool-max-bytes", "65536", "--audit-segment-bytes", "16384"],
    )
    .await;
    s.switch.down().await;
    let a = s.issuer.token("tenant-a", READ_SCOPES);
    let entries: Vec<Value> =
        (0..40).map(|_| json!({"request": {"method": "GET", "url": "Patient/a-pat-1"}})).collect();
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let r = http().post(s.url("/fhir")).bearer_auth(&a).json(&batch).send().await.unwrap();
    assert_eq!(r.status(), 503, "40 events do not fit in 64 KiB: the answer must not go out unrecorded");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(s.metric("fhirgw_dp_audit_strict_refusals_total").await, 1.0);
    assert_eq!(s.metric("fhirgw_dp_audit_events_written_total").await, 0.0);
    // Single reads fit until the spool is full; then they are refused before they run.
    let mut ok = 0;
    loop {
        let r = http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a).send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => break,
            other => panic!("{other}"),
        }
        assert!(ok < 100, "64 KiB never filled");
    }
    assert!(ok >= 10, "{ok}");
    // The refusal itself is recorded too: it fits in the headroom the admission check keeps.
    assert_eq!(s.metric("fhirgw_dp_audit_events_written_total").await, f64::from(ok + 1));
    // Every 200 was recorded: once the audit server is back, they all arrive, and the refusal.
    s.switch.up().await;
    let events = eventually("the answered reads delivered", Duration::from_secs(20), || async {
        let events = s.events().await;
        (events.len() == ok as usize + 1).then_some(events)
    })
    .await;
    assert_eq!(events.iter().filter(|e| e["outcome"] == "0").count(), ok as usize);
    let refused: Vec<&Value> = events.iter().filter(|e| e["outcome"] != "0").collect();
    assert!(refused[0]["outcomeDesc"].as_str().unwrap().starts_with("503"), "{:#}", refused[0]);
}

async fn metric_line(dp: &Process, series: &str) -> f64 {
    let text = http().get(format!("http://{}/metrics", dp.addr("admin"))).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn sigterm_delivers_the_spool_within_the_drain_window() {
    let mut s = Audited::start(mode(pb::AuditMode::Relaxed), None, &[]).await;
    let token = s.issuer.token("tenant-a", READ_SCOPES);
    s.switch.down().await;
    let mut answered = Vec::new();
    for i in 0..30 {
        let id = format!("drain-{i}");
        let r = http().get(s.url("/fhir/Patient/a-pat-2")).bearer_auth(&token).header("x-request-id", &id);
        assert_eq!(r.send().await.unwrap().status(), 200);
        answered.push(id);
    }
    eventually("events written", Duration::from_secs(10), || async {
        (s.metric("fhirgw_dp_audit_events_written_total").await >= 30.0).then_some(())
    })
    .await;
    // SIGTERM while undelivered; the audit server comes back within the drain window (5 s here).
    let signalled = Instant::now();
    s.dp.signal_term().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.switch.up().await;
    let exit = s.dp.wait().await.expect("the data plane did not exit");
    assert!(exit.success(), "{exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(7), "{:?}", signalled.elapsed());
    // Delivered before it exited: nothing is left for the next start.
    let counts: BTreeSet<String> = s
        .events()
        .await
        .iter()
        .filter_map(|e| transaction(e).map(str::to_owned))
        .filter(|t| t.starts_with("drain-"))
        .collect();
    assert_eq!(counts.len(), 30, "{counts:?}");
    let spool = s.world.path("audit-spool");
    let unsent: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .count() as u64;
    assert_eq!(unsent, 1, "only the open (delivered) segment is left");
}
