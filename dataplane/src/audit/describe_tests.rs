use fhirgw_config::{Kind, RawResource, ResourceSet, Snapshot};
use fhirgw_proto::config::v1 as pb;
use serde_json::json;

use super::*;

fn segs(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

type Resource = Option<(String, Option<String>, Option<String>)>;
type ActCase<'a> =
    (Method, &'a str, bool, Option<Handler>, AuditInteraction, Option<&'a str>, Action, Resource, Vec<&'a str>, bool);

#[test]
fn interactions_become_balp_acts() {
    use AuditInteraction as I;
    let r = |ty: &str, id: Option<&str>, vid: Option<&str>| resource(ty, id, vid);
    #[rustfmt::skip]
    let cases: Vec<ActCase> = vec![
        (Method::GET, "/Patient/p1", false, None, I::Read, Some("read"), Action::Read, r("Patient", Some("p1"), None), vec!["p1"], false),
        (Method::GET, "/Observation/o1", false, None, I::Read, Some("read"), Action::Read, r("Observation", Some("o1"), None), vec![], false),
        (Method::GET, "/Patient/p1/_history/2", false, None, I::Read, Some("vread"), Action::Read, r("Patient", Some("p1"), Some("2")), vec!["p1"], false),
        (Method::GET, "/Observation", true, None, I::Search, Some("search-type"), Action::Execute, None, vec![], true),
        (Method::POST, "/Observation/_search", false, None, I::Search, Some("search-type"), Action::Execute, None, vec![], true),
        (Method::GET, "/", true, None, I::Search, Some("search-system"), Action::Execute, None, vec![], true),
        (Method::GET, "/Patient/p1/Observation", false, None, I::Search, Some("search-type"), Action::Execute, None, vec!["p1"], true),
        (Method::GET, "/Patient/p1/_history", false, None, I::History, Some("history-instance"), Action::Read, r("Patient", Some("p1"), None), vec!["p1"], false),
        (Method::GET, "/Patient/_history", false, None, I::History, Some("history-type"), Action::Execute, None, vec![], true),
        (Method::POST, "/Observation", false, None, I::Create, Some("create"), Action::Create, r("Observation", None, None), vec![], false),
        (Method::PUT, "/Patient/p1", false, None, I::Update, Some("update"), Action::Update, r("Patient", Some("p1"), None), vec!["p1"], false),
        (Method::PATCH, "/Observation/o1", false, None, I::Patch, Some("patch"), Action::Update, r("Observation", Some("o1"), None), vec![], false),
        (Method::DELETE, "/Observation/o1", false, None, I::Delete, Some("delete"), Action::Delete, r("Observation", Some("o1"), None), vec![], false),
        (Method::PUT, "/Patient", true, None, I::Update, Some("update"), Action::Update, r("Patient", None, None), vec![], true),
        (Method::DELETE, "/Patient", true, None, I::Delete, Some("delete"), Action::Delete, r("Patient", None, None), vec![], true),
        (Method::GET, "/Patient/p1/$everything", false, None, I::Operation, Some("operation"), Action::Execute, r("Patient", Some("p1"), None), vec!["p1"], true),
        (Method::POST, "/Patient/p1/$meta-add", false, None, I::Operation, Some("operation"), Action::Update, r("Patient", Some("p1"), None), vec!["p1"], false),
        (Method::GET, "/metadata", false, None, I::Capabilities, Some("capabilities"), Action::Execute, None, vec![], true),
        (Method::GET, "/_history", false, None, I::History, Some("history-system"), Action::Execute, None, vec![], true),
        (Method::POST, "/", false, None, I::Batch, Some("batch"), Action::Execute, None, vec![], true),
        (Method::OPTIONS, "/Patient", false, None, I::Operation, None, Action::Execute, None, vec![], true),
        (Method::GET, "/Patient/$export", false, Some(Handler::Export), I::Export, Some("operation"), Action::Execute, None, vec![], true),
        (Method::GET, "/Group/g1/$export", false, Some(Handler::Export), I::Export, Some("operation"), Action::Execute, r("Group", Some("g1"), None), vec![], true),
        (Method::GET, "/$export-file", true, Some(Handler::Export), I::Export, Some("operation"), Action::Read, None, vec![], true),
        (Method::DELETE, "/$export-poll-status", true, Some(Handler::Export), I::Export, Some("operation"), Action::Delete, None, vec![], true),
        (Method::GET, "/DocumentReference/$docref", true, Some(Handler::DocRef), I::Operation, Some("operation"), Action::Execute, None, vec![], true),
    ];
    for (method, path, query, handler, want, subtype, action, res, patients, has_query) in cases {
        let relative = segs(path);
        let interaction = classify(&method, &relative, query);
        let got = act(&interaction, handler, &method, &relative);
        let what = format!("{method} {path}");
        assert_eq!(got.category, want, "{what}");
        assert_eq!(category(&interaction, handler).unwrap_or(I::Batch), want, "{what}: category()");
        assert_eq!(got.subtype, subtype, "{what}");
        assert_eq!(got.action, action, "{what}");
        assert_eq!(got.resource, res, "{what}");
        assert_eq!(got.patients, patients, "{what}");
        assert_eq!(got.query.is_some(), has_query, "{what}");
    }
}

#[test]
fn bearer_capabilities_in_queries_are_redacted() {
    let cases = [
        ("name=smith&_count=5", "name=smith&_count=5"),
        ("_page=abc.def&_count=5", "_page=redacted&_count=5"),
        ("_token=x", "_token=redacted"),
        ("access_token=eyJ", "access_token=redacted"),
        ("%61ccess_token=eyJ", "%61ccess_token=redacted"),
        ("client_secret=s&x=1", "client_secret=redacted&x=1"),
        ("_getpages=id&_getpagesoffset=20", "_getpages=redacted&_getpagesoffset=20"),
        ("broken&&=x", "broken&&=x"),
    ];
    for (query, want) in cases {
        assert_eq!(redact(query), want, "{query}");
    }
    let form = query_form(&Method::POST, "https://gw/fhir", &segs("/Observation/_search"), None, Some("patient=p1"));
    assert_eq!(form, "POST https://gw/fhir/Observation/_search\n\npatient=p1");
}

#[test]
fn patients_named_by_search_parameters() {
    let p = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();
    type Case<'a> = (&'a str, Vec<(String, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("Observation", p(&[("patient", "Patient/p1")]), vec!["p1"]),
        ("Observation", p(&[("patient", "p1")]), vec!["p1"]),
        ("Observation", p(&[("patient:Patient", "p1,p2")]), vec!["p1", "p2"]),
        ("Observation", p(&[("subject", "Patient/p3")]), vec!["p3"]),
        ("Observation", p(&[("subject:Patient", "p3")]), vec!["p3"]),
        ("Observation", p(&[("subject", "p3")]), vec![]),
        ("Observation", p(&[("subject", "Group/g1")]), vec![]),
        ("Observation", p(&[("patient:missing", "true")]), vec![]),
        ("Observation", p(&[("code", "1234"), ("patient", "https://gw/fhir/Patient/p4")]), vec!["p4"]),
        ("Patient", p(&[("_id", "p1,p2"), ("name", "x")]), vec!["p1", "p2"]),
        ("Observation", p(&[("_id", "o1")]), vec![]),
        ("Coverage", p(&[("beneficiary:Patient", "p5")]), vec!["p5"]),
    ];
    for (ty, params, want) in cases {
        assert_eq!(patients_in_params(ty, &params), want, "{ty} {params:?}");
    }
    let many: Vec<(String, String)> = (0..50).map(|i| ("patient".to_owned(), format!("p{i}"))).collect();
    assert_eq!(patients_in_params("Observation", &many).len(), super::super::MAX_PATIENTS);
}

fn table() -> RouteTable {
    let route = |id: &str, path: &str, audit: Option<pb::AuditPolicy>| pb::Route {
        id: id.into(),
        path: path.into(),
        action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "fhir".into() })),
        audit,
        ..Default::default()
    };
    let off = pb::AuditPolicy { mode: pb::AuditMode::Off as i32, interactions: Vec::new() };
    let msg = pb::RouteTable {
        name: "main".into(),
        base_path: "/fhir".into(),
        routes: vec![
            route("instance", "/{type}/{id}", None),
            route("type", "/{type}", None),
            route("quiet", "/Basic/{id}", Some(off)),
        ],
    };
    let upstream = pb::Upstream { name: "fhir".into(), base_url: "http://up/fhir".into(), ..Default::default() };
    let set: ResourceSet = [
        ((Kind::Upstream, "fhir".to_owned()), RawResource::encode(Kind::Upstream, &upstream)),
        ((Kind::RouteTable, "main".to_owned()), RawResource::encode(Kind::RouteTable, &msg)),
    ]
    .into();
    let snapshot = Snapshot::build(set, 1).unwrap_or_else(|e| panic!("{e:?}"));
    snapshot.tables.first().cloned().unwrap_or_else(|| panic!("no table"))
}

#[test]
fn batch_entries_are_described_one_by_one() {
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/p2"}}},
        {"request": {"method": "GET", "url": "Observation?patient=p3&_page=secret"}},
        {"request": {"method": "GET", "url": "Basic/b1"}},
        {"request": {"method": "TRACE", "url": "Patient/p1"}},
    ]});
    let described = entries(&bundle, &table(), "https://gw/fhir").unwrap_or_else(|| panic!("a batch"));
    let got: Vec<(AuditInteraction, Option<usize>, Vec<String>)> =
        described.iter().map(|e| (e.act.category, e.act.entry, e.act.patients.clone())).collect();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        got,
        vec![
            (AuditInteraction::Read, Some(0), s(&["p1"])),
            (AuditInteraction::Create, Some(1), s(&["p2"])),
            (AuditInteraction::Search, Some(2), s(&["p3"])),
            (AuditInteraction::Read, Some(3), s(&[])),
            (AuditInteraction::Batch, Some(4), s(&[])),
        ]
    );
    assert_eq!(described[2].act.query.as_deref(), Some("GET https://gw/fhir/Observation?patient=p3&_page=redacted"));
    assert_eq!(
        described[3].route.and_then(|r| r.mode),
        Some(fhirgw_config::audit::AuditMode::Off),
        "its own route's policy"
    );
    assert!(entries(&json!({"resourceType": "Patient"}), &table(), "https://gw/fhir").is_none());
}
