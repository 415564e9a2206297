//! The planner's decisions, table-driven: for every interaction kind an allowed and a refused row, the shapes of
//! `shared/security-cases.md`, and the existence-oracle pairs (another tenant's resource and a missing one must be
//! planned identically). The planner runs against an in-memory upstream that answers its fact queries, so most of
//! the security matrix runs here in milliseconds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fhirgw_config::{Kind, RawResource, ResourceSet, Snapshot};
use fhirgw_proto::config::v1 as pb;
use http::Method;
use serde_json::{Value, json};

use super::plan;
use crate::policy::classify::{Interaction, classify};
use crate::policy::input::{Access, Env, Input, RequestBody, is_fhir_media};
use crate::policy::paging::PageSigner;
use crate::policy::plan::{Expect, Fact, Facts, Query, Step};
use crate::policy::scopes::Scopes;

const DS: &str = "https://fhirgw.dev/dataset";
const UP: &str = "http://up:8080/fhir";
const PUBLIC: &str = "https://gw.example/fhir";

fn snapshot() -> Snapshot {
    let upstream = pb::Upstream { name: "fhir".into(), base_url: UP.into(), ..Default::default() };
    let proxy = |id: &str, path: &str, methods: &[&str]| pb::Route {
        id: id.into(),
        path: path.into(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "fhir".into() })),
        ..Default::default()
    };
    let handler = |id: &str, path: &str, name: &str| pb::Route {
        id: id.into(),
        path: path.into(),
        methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
        action: Some(pb::route::Action::Handler(pb::HandlerAction { name: name.into(), upstream: "fhir".into() })),
        ..Default::default()
    };
    let table = pb::RouteTable {
        name: "main".into(),
        base_path: "/fhir".into(),
        routes: vec![
            proxy("root", "/", &["GET", "POST"]),
            proxy("type", "/{type}", &["GET", "POST", "PUT", "PATCH", "DELETE"]),
            proxy("instance", "/{type}/{id}", &["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
            proxy("history", "/{type}/{id}/_history", &["GET"]),
            proxy("vread", "/{type}/{id}/_history/{vid}", &["GET"]),
            proxy("compartment", "/{type}/{id}/*", &["GET"]),
            proxy("instance-operations", "/{type}/{id}/{op}", &["GET", "POST"]),
            proxy("system-history", "/_history", &["GET"]),
            pb::Route {
                action: Some(pb::route::Action::Deny(pb::DenyAction { status: 451, message: "no".into() })),
                ..proxy("denied", "/Basic/{id}", &["GET"])
            },
            handler("docref", "/DocumentReference/$docref", "docref"),
            handler("export-system", "/$export", "export"),
            handler("export-group", "/Group/{id}/$export", "export"),
            handler("export-status", "/$export-poll-status", "export"),
            handler("export-file", "/$export-file", "export"),
        ],
    };
    let tenant = |name: &str| pb::TenantConfig {
        tenant: Some(pb::Tenant { name: name.into(), display_name: name.into(), audit: None }),
        grants: vec![pb::Grant {
            tenant: name.into(),
            tag: Some(pb::Tag { system: DS.into(), code: name.into() }),
            expires_at: None,
        }],
    };
    // A tenant holding both datasets.
    let mut both = tenant("ab");
    both.grants = [tenant("a"), tenant("b")]
        .into_iter()
        .flat_map(|t| t.grants)
        .map(|g| pb::Grant { tenant: "ab".into(), ..g })
        .collect();
    let set: ResourceSet = [
        ((Kind::Upstream, "fhir".to_owned()), RawResource::encode(Kind::Upstream, &upstream)),
        ((Kind::RouteTable, "main".to_owned()), RawResource::encode(Kind::RouteTable, &table)),
        ((Kind::Tenant, "a".to_owned()), RawResource::encode(Kind::Tenant, &tenant("a"))),
        ((Kind::Tenant, "b".to_owned()), RawResource::encode(Kind::Tenant, &tenant("b"))),
        ((Kind::Tenant, "ab".to_owned()), RawResource::encode(Kind::Tenant, &both)),
    ]
    .into();
    Snapshot::build(set, 1).unwrap_or_else(|e| panic!("{e:?}"))
}

/// The upstream the tests plan against: A's and B's resources, each at version 1.
fn store() -> BTreeMap<(String, String), Value> {
    let r = |ty: &str, id: &str, code: &str, extra: Value| {
        let mut v =
            json!({"resourceType": ty, "id": id, "meta": {"versionId": "1", "tag": [{"system": DS, "code": code}]}});
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        ((ty.to_owned(), id.to_owned()), v)
    };
    [
        r("Patient", "a1", "a", json!({"identifier": [{"system": "mrn", "value": "A1"}]})),
        r("Patient", "b1", "b", json!({"identifier": [{"system": "mrn", "value": "B1"}]})),
        r("Observation", "a-obs", "a", json!({"subject": {"reference": "Patient/a1"}})),
        r("Observation", "b-obs", "b", json!({"subject": {"reference": "Patient/b1"}})),
        r("Group", "ga", "a", json!({})),
        r("Group", "gb", "b", json!({})),
        r("Binary", "bin-a", "a", json!({"contentType": "application/pdf"})),
        r("Binary", "bin-b", "b", json!({"contentType": "application/pdf"})),
        r("Binary", "bin-a-ctx-b", "a", json!({"securityContext": {"reference": "Patient/b1"}})),
    ]
    .into()
}

/// Answers a fact query as the upstream would: a resource by id (and version), or a search narrowed by `_tag`.
fn answer(query: &Query) -> Fact {
    let store = store();
    match query {
        Query::BinaryMeta { id, vid } => {
            answer(&Query::Resource { ty: "Binary".into(), id: id.clone(), vid: vid.clone() })
        }
        Query::Resource { ty, id, vid } => Fact::Resource(
            store
                .get(&(ty.clone(), id.clone()))
                .filter(|r| vid.as_deref().is_none_or(|v| r["meta"]["versionId"] == v))
                .cloned(),
        ),
        Query::Search { ty, params } => {
            let tag = params.iter().rev().find(|(n, _)| n == "_tag").map(|(_, v)| v.clone()).unwrap_or_default();
            let identifier = params.iter().find(|(n, _)| n == "identifier").map(|(_, v)| v.clone());
            let entry: Vec<Value> = store
                .values()
                .filter(|r| r["resourceType"] == ty.as_str())
                .filter(|r| tag.ends_with(&format!("|{}", r["meta"]["tag"][0]["code"].as_str().unwrap_or("?"))))
                .filter(|r| {
                    identifier.as_ref().is_none_or(|i| i.ends_with(r["identifier"][0]["value"].as_str().unwrap_or("?")))
                })
                .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
                .collect();
            Fact::Bundle(json!({"resourceType": "Bundle", "type": "searchset", "entry": entry}))
        }
    }
}

struct Case {
    tenant: &'static str,
    scopes: &'static str,
    patient: Option<&'static str>,
    method: Method,
    path: &'static str,
    query: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
    media: &'static str,
}

fn case(method: Method, path: &'static str) -> Case {
    Case {
        tenant: "a",
        scopes: "user/*.*",
        patient: None,
        method,
        path,
        query: None,
        headers: Vec::new(),
        body: None,
        media: "application/fhir+json",
    }
}

impl Case {
    fn q(mut self, query: &'static str) -> Self {
        self.query = Some(query);
        self
    }
    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    fn scopes(mut self, scopes: &'static str) -> Self {
        self.scopes = scopes;
        self
    }
    fn media(mut self, media: &'static str) -> Self {
        self.media = media;
        self
    }
    fn patient(mut self, patient: &'static str) -> Self {
        self.patient = Some(patient);
        self
    }
    fn tenant(mut self, tenant: &'static str) -> Self {
        self.tenant = tenant;
        self
    }
}

/// What a case plans to, and the fact queries it needed on the way.
fn run(case: &Case, snapshot: &Snapshot, signer: &PageSigner, now: SystemTime) -> (Step, Vec<Query>) {
    let relative: Vec<String> = case.path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let (table, _) = (&snapshot.tables[0], ());
    let matched = table.route(&case.method, &relative);
    let handler = matched.as_ref().and_then(|m| match &m.route.action {
        fhirgw_config::route::Action::Handler { handler, .. } => Some(*handler),
        _ => None,
    });
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(case.media));
    for (name, value) in &case.headers {
        headers.append(*name, http::HeaderValue::from_str(value).unwrap_or(http::HeaderValue::from_static("x")));
    }
    // A JSON string stands for a form body's text.
    let body = case.body.as_ref().map(|b| match b {
        Value::String(form) => form.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    });
    let interaction = classify(&case.method, &relative, case.query.is_some());
    let mut input = Input::new(&case.method, interaction, handler, &relative, case.query, &headers, body.as_deref());
    // As the proxy reads it: a Binary create or update with raw content is not read, but streamed.
    let binary_write =
        matches!(&input.interaction, Interaction::Create { ty } | Interaction::Update { ty, .. } if ty == "Binary");
    if binary_write && !is_fhir_media(case.media) {
        input.body = RequestBody::Upload { content_type: case.media.to_owned(), length: None };
    }
    let guard = matched.map(|m| m.route.guard.clone()).unwrap_or_default();
    let upstream = snapshot.upstreams["fhir"].clone();
    let env = Env { snapshot, upstream: &upstream, public: PUBLIC, guard: &guard, table, signer };
    let access = Access::new(case.tenant, Scopes::parse(case.scopes), case.patient.map(str::to_owned), snapshot, now);
    let mut facts = Facts::default();
    let mut asked = Vec::new();
    for _ in 0..6 {
        match plan(&input, &env, &access, &facts) {
            Step::Need(queries) => {
                for q in queries {
                    assert!(!facts.contains(&q), "asked twice for {q:?}");
                    facts.insert(q.clone(), answer(&q));
                    asked.push(q);
                }
            }
            other => return (other, asked),
        }
    }
    panic!("the plan did not settle")
}

/// A short description of a final step, for the table: `SEND GET /fhir/...  resource`, `REFUSE 404`, `ANSWER`.
fn describe(step: &Step) -> String {
    match step {
        Step::Send(call) => {
            let expect = match &call.expect {
                Expect::Resource { .. } => "resource",
                Expect::Bundle(_) => "bundle",
                Expect::Written { .. } => "written",
                Expect::MetaParameters { .. } => "meta",
                Expect::Batch(_) => "batch",
                Expect::Capabilities => "capabilities",
                Expect::ExportKickOff => "export-kickoff",
                Expect::ExportStatus => "export-status",
                Expect::ExportCancel => "export-cancel",
                Expect::ExportFile { .. } => "export-file",
                Expect::BinaryContent { .. } => "binary-content",
                Expect::Uploaded => "uploaded",
            };
            format!("SEND {} {} {expect}", call.method, call.target)
        }
        Step::Refuse(refusal) => format!("REFUSE {}", refusal.outcome().status.as_u16()),
        Step::Answer(_) => "ANSWER".into(),
        Step::Need(_) => "NEED".into(),
    }
}

#[test]
fn plans_table() {
    let snapshot = snapshot();
    let signer = PageSigner::new(&[9; 32]);
    let now = SystemTime::now();
    let tag_a = "_tag=https%3A%2F%2Ffhirgw.dev%2Fdataset%7Ca";
    let obs = |subject: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": subject}});
    let a1 = json!({"resourceType": "Patient", "id": "a1", "meta": {"tag": [{"system": DS, "code": "a"}]}});
    let batch = |kind: &str, entries: Value| json!({"resourceType": "Bundle", "type": kind, "entry": entries});
    let get = |url: &str| json!({"request": {"method": "GET", "url": url}});
    #[rustfmt::skip]
    let cases: Vec<(&str, Case, String)> = vec![
        // read / vread: sent, then verified as one resource (the executor's 404 for another tenant's).
        ("read", case(Method::GET, "Patient/a1"), "SEND GET /fhir/Patient/a1 resource".into()),
        ("read of another tenant's: verified after", case(Method::GET, "Patient/b1"), "SEND GET /fhir/Patient/b1 resource".into()),
        ("vread", case(Method::GET, "Patient/a1/_history/1"), "SEND GET /fhir/Patient/a1/_history/1 resource".into()),
        ("read without scope", case(Method::GET, "Patient/a1").scopes("user/Observation.read"), "REFUSE 403".into()),
        ("read with a search parameter", case(Method::GET, "Patient/a1").q("name=x"), "REFUSE 400".into()),
        ("read as XML", case(Method::GET, "Patient/a1").header("accept", "application/fhir+xml"), "REFUSE 406".into()),
        ("read with _format=xml", case(Method::GET, "Patient/a1").q("_format=xml"), "REFUSE 406".into()),
        ("read of a denied route's path is the pipeline's", case(Method::GET, "Patient/a1").q("_elements=id"), "SEND GET /fhir/Patient/a1?_elements=id resource".into()),
        // searches: narrowed with the tenant's tag; joins refused (case 3).
        ("search", case(Method::GET, "Observation").q("code=1"), format!("SEND GET /fhir/Observation?code=1&{tag_a} bundle")),
        ("search with _include (entries verified, case 2)", case(Method::GET, "Observation").q("_include=Observation:subject"), format!("SEND GET /fhir/Observation?_include=Observation%3Asubject&{tag_a} bundle")),
        ("search with a chain", case(Method::GET, "Observation").q("subject:Patient.name=x"), "REFUSE 400".into()),
        ("search with _has", case(Method::GET, "Patient").q("_has:Observation:subject:code=1"), "REFUSE 400".into()),
        ("search with _filter", case(Method::GET, "Patient").q("_filter=name eq x"), "REFUSE 400".into()),
        ("search with _list", case(Method::GET, "Patient").q("_list=1"), "REFUSE 400".into()),
        ("search with _query", case(Method::GET, "Patient").q("_query=x"), "REFUSE 400".into()),
        ("search with _contained", case(Method::GET, "Patient").q("_contained=true"), "REFUSE 400".into()),
        ("search with access_token", case(Method::GET, "Patient").q("access_token=x"), "REFUSE 400".into()),
        ("search without scope", case(Method::GET, "Observation").scopes("user/Patient.read"), "REFUSE 403".into()),
        ("POST _search (case 4)", case(Method::POST, "Observation/_search").media("application/x-www-form-urlencoded").body(json!("code=1")), format!("SEND GET /fhir/Observation?code=1&{tag_a} bundle")),
        ("POST _search with a JSON body", case(Method::POST, "Observation/_search").body(json!({"code": 1})), "REFUSE 400".into()),
        ("POST _search with a join in the form", case(Method::POST, "Observation/_search").media("application/x-www-form-urlencoded").body(json!("_has:Observation:subject:code=1")), "REFUSE 400".into()),
        ("search by a tenant without grants", case(Method::GET, "Observation").tenant("z"), "ANSWER".into()),
        ("patient/ scope search confined", case(Method::GET, "Observation").scopes("patient/Observation.read").patient("a1"), format!("SEND GET /fhir/Observation?{tag_a}&patient=Patient%2Fa1 bundle")),
        ("patient/ scope without the claim", case(Method::GET, "Observation").scopes("patient/Observation.read"), "REFUSE 403".into()),
        ("system search", case(Method::GET, "").q("_type=Observation"), format!("SEND GET /fhir?{tag_a}&_type=Observation bundle")),
        ("system search without _type", case(Method::GET, "").q("code=1"), "REFUSE 400".into()),
        ("a page token of another tenant", case(Method::GET, "Observation").q("_page=not.a-token"), "REFUSE 400".into()),
        // instance shapes: the focal resource first (case 1, case 10).
        ("history", case(Method::GET, "Patient/a1/_history"), "SEND GET /fhir/Patient/a1/_history bundle".into()),
        ("history of another tenant's", case(Method::GET, "Patient/b1/_history"), "REFUSE 404".into()),
        ("system history", case(Method::GET, "_history"), "REFUSE 403".into()),
        ("$everything", case(Method::GET, "Patient/a1/$everything"), "SEND GET /fhir/Patient/a1/$everything bundle".into()),
        ("$everything of another tenant's", case(Method::GET, "Patient/b1/$everything"), "REFUSE 404".into()),
        ("compartment", case(Method::GET, "Patient/a1/Observation"), format!("SEND GET /fhir/Observation?patient=Patient%2Fa1&{tag_a} bundle")),
        ("compartment of another tenant's", case(Method::GET, "Patient/b1/Observation"), "REFUSE 404".into()),
        ("an unknown operation", case(Method::GET, "Patient/a1/$graphql"), "REFUSE 403".into()),
        // writes: both sides checked (case 5).
        ("create", case(Method::POST, "Observation").body(obs("Patient/a1")), "SEND POST /fhir/Observation written".into()),
        ("create into another tenant's dataset", case(Method::POST, "Patient").body(json!({"resourceType": "Patient", "meta": {"tag": [{"system": DS, "code": "b"}]}})), "REFUSE 403".into()),
        ("create referencing another tenant's", case(Method::POST, "Observation").body(obs("Patient/b1")), "REFUSE 422".into()),
        ("create without write scope", case(Method::POST, "Observation").scopes("user/*.read").body(obs("Patient/a1")), "REFUSE 403".into()),
        ("create as XML", case(Method::POST, "Patient").media("application/fhir+xml").body(json!(null)), "REFUSE 415".into()),
        ("update", case(Method::PUT, "Patient/a1").body(a1.clone()), "SEND PUT /fhir/Patient/a1 written".into()),
        ("update of another tenant's", case(Method::PUT, "Patient/b1").body(json!({"resourceType": "Patient", "id": "b1"})), "REFUSE 405".into()),
        ("update with a stale If-Match", case(Method::PUT, "Patient/a1").header("if-match", "W/\"2\"").body(a1.clone()), "REFUSE 412".into()),
        ("patch", case(Method::PATCH, "Patient/a1").media("application/json-patch+json").body(json!([{"op": "replace", "path": "/active", "value": true}])), "SEND PATCH /fhir/Patient/a1 written".into()),
        ("patch of meta", case(Method::PATCH, "Patient/a1").media("application/json-patch+json").body(json!([{"op": "remove", "path": "/meta/tag/0"}])), "REFUSE 403".into()),
        ("FHIRPath patch of meta", case(Method::PATCH, "Patient/a1").body(json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.meta"}]}]})), "REFUSE 403".into()),
        ("patch of another tenant's", case(Method::PATCH, "Patient/b1").media("application/json-patch+json").body(json!([{"op": "replace", "path": "/active", "value": true}])), "REFUSE 404".into()),
        ("delete", case(Method::DELETE, "Observation/a-obs"), "SEND DELETE /fhir/Observation/a-obs written".into()),
        ("delete of another tenant's", case(Method::DELETE, "Observation/b-obs"), "REFUSE 404".into()),
        ("conditional update of one's own", case(Method::PUT, "Patient").q("identifier=mrn|A1").body(json!({"resourceType": "Patient"})), "SEND PUT /fhir/Patient/a1 written".into()),
        ("conditional delete matching only another tenant's", case(Method::DELETE, "Patient").q("identifier=mrn|B1"), "REFUSE 404".into()),
        ("conditional update matching only another tenant's creates", case(Method::PUT, "Patient").q("identifier=mrn|B1").body(json!({"resourceType": "Patient"})), "SEND POST /fhir/Patient written".into()),
        ("$meta-add of one's own dataset", case(Method::POST, "Patient/a1/$meta-add").body(json!({"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [{"system": "http://x", "code": "y"}]}}]})), "SEND POST /fhir/Patient/a1/$meta-add meta".into()),
        ("$meta-add of another tenant's dataset", case(Method::POST, "Patient/a1/$meta-add").body(json!({"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [{"system": DS, "code": "b"}]}}]})), "REFUSE 403".into()),
        // batch and transaction (case 4).
        ("batch", case(Method::POST, "").body(batch("batch", json!([get("Patient/a1"), get("Patient/b1")]))), "SEND POST /fhir batch".into()),
        ("transaction reading another tenant's", case(Method::POST, "").body(batch("transaction", json!([get("Patient/b1")]))), "REFUSE 404".into()),
        ("transaction with a refused entry", case(Method::POST, "").body(batch("transaction", json!([get("Patient/a1"), get("Patient/a1/Observation")]))), "REFUSE 403".into()),
        ("batch of refused entries only", case(Method::POST, "").body(batch("batch", json!([get("Patient/a1/$everything")]))), "ANSWER".into()),
        ("a Bundle that is no batch", case(Method::POST, "").body(batch("collection", json!([]))), "REFUSE 400".into()),
        // handlers.
        ("$docref", case(Method::GET, "DocumentReference/$docref").q("patient=a1"), format!("SEND GET /fhir/DocumentReference?patient=Patient%2Fa1&{tag_a} bundle")),
        ("$docref of another tenant's patient", case(Method::GET, "DocumentReference/$docref").q("patient=b1"), "REFUSE 404".into()),
        ("$export", case(Method::GET, "$export").q("_type=Patient").header("prefer", "respond-async"), "SEND GET /fhir/$export?_type=Patient&_outputFormat=application%2Ffhir%2Bndjson&_typeFilter=Patient%3F_tag%3Dhttps%253A%252F%252Ffhirgw.dev%252Fdataset%257Ca export-kickoff".into()),
        ("$export without respond-async", case(Method::GET, "$export").q("_type=Patient"), "REFUSE 400".into()),
        ("$export of another tenant's Group", case(Method::GET, "Group/gb/$export").q("_type=Patient").header("prefer", "respond-async"), "REFUSE 404".into()),
        ("an export link of another kind", case(Method::GET, "$export-file").q("_token=x.y"), "REFUSE 400".into()),
        // Binary content: the metadata checked first (and its security context), then the content at that version.
        ("binary content", case(Method::GET, "Binary/bin-a").header("accept", "application/pdf"), "SEND GET /fhir/Binary/bin-a/_history/1 binary-content".into()),
        ("binary content of another tenant's", case(Method::GET, "Binary/bin-b").header("accept", "application/pdf"), "REFUSE 404".into()),
        ("binary content under another tenant's context", case(Method::GET, "Binary/bin-a-ctx-b").header("accept", "application/pdf"), "REFUSE 404".into()),
        ("binary content as XML is still content", case(Method::GET, "Binary/bin-a").header("accept", "application/xml"), "SEND GET /fhir/Binary/bin-a/_history/1 binary-content".into()),
        ("a Binary as FHIR XML", case(Method::GET, "Binary/bin-a").header("accept", "application/fhir+xml"), "REFUSE 406".into()),
        ("a Binary as FHIR JSON is a read", case(Method::GET, "Binary/bin-a"), "SEND GET /fhir/Binary/bin-a resource".into()),
        // Binary uploads: raw content streamed into a Binary the gateway builds and checks.
        ("binary upload", case(Method::POST, "Binary").media("application/pdf"), "SEND POST /fhir/Binary uploaded".into()),
        ("binary upload under a context", case(Method::POST, "Binary").media("application/pdf").header("x-security-context", "Patient/a1"), "SEND POST /fhir/Binary uploaded".into()),
        ("binary upload under another tenant's context", case(Method::POST, "Binary").media("application/pdf").header("x-security-context", "Patient/b1"), "REFUSE 422".into()),
        ("binary upload under a missing context", case(Method::POST, "Binary").media("application/pdf").header("x-security-context", "Patient/zz"), "REFUSE 422".into()),
        ("binary upload under a conditional context", case(Method::POST, "Binary").media("application/pdf").header("x-security-context", "Patient?identifier=A1"), "REFUSE 400".into()),
        ("binary upload under a context elsewhere", case(Method::POST, "Binary").media("application/pdf").header("x-security-context", "https://elsewhere.example/fhir/Patient/a1"), "REFUSE 400".into()),
        ("binary upload, several datasets, no context", case(Method::POST, "Binary").tenant("ab").media("application/pdf"), "REFUSE 400".into()),
        ("binary upload, several datasets, a context", case(Method::POST, "Binary").tenant("ab").media("application/pdf").header("x-security-context", "Patient/b1"), "SEND POST /fhir/Binary uploaded".into()),
        ("binary upload without create scope", case(Method::POST, "Binary").scopes("user/*.read").media("application/pdf"), "REFUSE 403".into()),
        ("binary upload with a bad content type", case(Method::POST, "Binary").media("application/pdf;  x=1"), "REFUSE 400".into()),
        ("binary re-upload", case(Method::PUT, "Binary/bin-a").media("image/png"), "SEND PUT /fhir/Binary/bin-a uploaded".into()),
        ("binary re-upload of another tenant's", case(Method::PUT, "Binary/bin-b").media("image/png"), "REFUSE 405".into()),
        ("binary re-upload of a missing one", case(Method::PUT, "Binary/zz").media("image/png"), "REFUSE 405".into()),
        ("binary re-upload with a stale If-Match", case(Method::PUT, "Binary/bin-a").media("image/png").header("if-match", "W/\"2\""), "REFUSE 412".into()),
        ("raw content is for Binary only", case(Method::POST, "DocumentReference").media("application/pdf"), "REFUSE 415".into()),
        // grants that expired (case 11): nothing is visible, nothing can be written.
        ("metadata needs no grants", case(Method::GET, "metadata"), "SEND GET /fhir/metadata capabilities".into()),
        ("unknown interactions are refused", case(Method::OPTIONS, "Patient"), "REFUSE 403".into()),
    ];
    // Signed links, valid for tenant a only.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let binding = |kind, tenant: &'static str| crate::policy::export::Binding {
        kind,
        tenant,
        upstream: "fhir",
        base_path: "/fhir",
    };
    let status = crate::policy::export::ExportClaims::new(
        &binding(crate::policy::export::LinkKind::Status, "a"),
        "/fhir/$export-poll-status?_jobId=1".into(),
        None,
        now,
    )
    .sign(&signer);
    let file = crate::policy::export::ExportClaims::new(
        &binding(crate::policy::export::LinkKind::File, "a"),
        "/fhir/$export-file/1/0.ndjson".into(),
        Some("Patient".into()),
        now,
    )
    .sign(&signer);
    let mut page =
        crate::policy::paging::PageSigner::claims("a", "Observation", "fhir", "/fhir/Observation?_offset=2", now);
    page.narrowed = true;
    let page = signer.sign(&page);
    let mut cases = cases;
    #[rustfmt::skip]
    cases.extend([
        ("export status", case(Method::GET, "$export-poll-status").q(leak(format!("_token={status}"))), "SEND GET /fhir/$export-poll-status?_jobId=1 export-status".to_owned()),
        ("export cancel", case(Method::DELETE, "$export-poll-status").q(leak(format!("_token={status}"))), "SEND DELETE /fhir/$export-poll-status?_jobId=1 export-cancel".to_owned()),
        ("export file", case(Method::GET, "$export-file").q(leak(format!("_token={file}"))), "SEND GET /fhir/$export-file/1/0.ndjson export-file".to_owned()),
        ("export status link replayed by tenant b", case(Method::GET, "$export-poll-status").q(leak(format!("_token={status}"))).tenant("b"), "REFUSE 400".to_owned()),
        ("a status link used as a file link", case(Method::GET, "$export-file").q(leak(format!("_token={status}"))), "REFUSE 400".to_owned()),
        ("a page", case(Method::GET, "Observation").q(leak(format!("_page={page}"))), "SEND GET /fhir/Observation?_offset=2 bundle".to_owned()),
        ("a page replayed by tenant b (case 6)", case(Method::GET, "Observation").q(leak(format!("_page={page}"))).tenant("b"), "REFUSE 400".to_owned()),
        ("a page on another path", case(Method::GET, "Patient").q(leak(format!("_page={page}"))), "REFUSE 400".to_owned()),
        ("a page token mixed with parameters", case(Method::GET, "Observation").q(leak(format!("_page={page}&code=1"))), "REFUSE 400".to_owned()),
    ]);
    for (name, case, want) in &cases {
        let (step, _) = run(case, &snapshot, &signer, now);
        let got = describe(&step);
        assert!(got.starts_with(want.as_str()), "{name}: got `{got}`, want `{want}`");
    }
    // Every interaction kind has a row.
    let kinds: std::collections::BTreeSet<&str> = cases
        .iter()
        .map(|(_, c, _)| {
            let relative: Vec<String> = c.path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            classify(&c.method, &relative, c.query.is_some()).name()
        })
        .collect();
    for kind in [
        "read",
        "vread",
        "search-type",
        "search-system",
        "search-compartment",
        "history-instance",
        "history-system",
        "create",
        "update",
        "patch",
        "delete",
        "conditional-update",
        "conditional-delete",
        "batch-or-transaction",
        "operation",
        "capabilities",
        "unknown",
    ] {
        assert!(kinds.contains(kind), "no row for {kind}");
    }
}

/// Case 10: another tenant's resource and a missing one are planned exactly alike, on every shape that names one.
#[test]
fn out_of_grant_and_missing_plan_alike() {
    let snapshot = snapshot();
    let signer = PageSigner::new(&[9; 32]);
    let now = SystemTime::now();
    let entry_get = |url: &str| json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "GET", "url": url}}]});
    let pairs: Vec<(&str, Case, Case)> = vec![
        ("history", case(Method::GET, "Patient/b1/_history"), case(Method::GET, "Patient/zz/_history")),
        ("$everything", case(Method::GET, "Patient/b1/$everything"), case(Method::GET, "Patient/zz/$everything")),
        ("compartment", case(Method::GET, "Patient/b1/Observation"), case(Method::GET, "Patient/zz/Observation")),
        (
            "update",
            case(Method::PUT, "Patient/b1").body(json!({"resourceType": "Patient", "id": "b1"})),
            case(Method::PUT, "Patient/zz").body(json!({"resourceType": "Patient", "id": "zz"})),
        ),
        ("delete", case(Method::DELETE, "Patient/b1"), case(Method::DELETE, "Patient/zz")),
        (
            "transaction read",
            case(Method::POST, "").body(entry_get("Patient/b1")),
            case(Method::POST, "").body(entry_get("Patient/zz")),
        ),
        (
            "transaction vread",
            case(Method::POST, "").body(entry_get("Patient/b1/_history/1")),
            case(Method::POST, "").body(entry_get("Patient/a1/_history/9")),
        ),
        (
            "reference",
            case(Method::POST, "Observation")
                .body(json!({"resourceType": "Observation", "subject": {"reference": "Patient/b1"}})),
            case(Method::POST, "Observation")
                .body(json!({"resourceType": "Observation", "subject": {"reference": "Patient/zz"}})),
        ),
        (
            "$docref",
            case(Method::GET, "DocumentReference/$docref").q("patient=b1"),
            case(Method::GET, "DocumentReference/$docref").q("patient=zz"),
        ),
        (
            "binary content",
            case(Method::GET, "Binary/bin-b").header("accept", "application/pdf"),
            case(Method::GET, "Binary/zz").header("accept", "application/pdf"),
        ),
        (
            "$export Group",
            case(Method::GET, "Group/gb/$export").q("_type=Patient").header("prefer", "respond-async"),
            case(Method::GET, "Group/zz/$export").q("_type=Patient").header("prefer", "respond-async"),
        ),
    ];
    for (name, foreign, missing) in &pairs {
        let (a, _) = run(foreign, &snapshot, &signer, now);
        let (b, _) = run(missing, &snapshot, &signer, now);
        let (a, b) = match (a, b) {
            (Step::Refuse(a), Step::Refuse(b)) => (a.outcome().body(), b.outcome().body()),
            (a, b) => panic!("{name}: {a:?} / {b:?}"),
        };
        let normalise = |v: Value| v.to_string().replace("b1", "X").replace("zz", "X");
        assert_eq!(normalise(a), normalise(b), "{name}");
    }
}

/// A transaction's read is checked first and pinned to the version checked; a batch's is not read twice.
#[test]
fn transaction_reads_are_pinned_and_facts_read_once() {
    let snapshot = snapshot();
    let signer = PageSigner::new(&[9; 32]);
    let body = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient/a1"}},
        {"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/a1"}}},
        {"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/a1"}}},
    ]});
    let (step, asked) = run(&case(Method::POST, "").body(body), &snapshot, &signer, SystemTime::now());
    assert_eq!(asked, vec![Query::resource("Patient", "a1")], "each fact once");
    let Step::Send(call) = step else { panic!("{step:?}") };
    let sent = match call.body {
        Some(crate::policy::plan::Payload::Json { value, .. }) => value,
        _ => Value::Null,
    };
    assert_eq!(sent["entry"][0]["request"]["url"], "Patient/a1/_history/1");
    assert_eq!(sent["entry"][1]["resource"]["meta"]["tag"][0]["code"], "a", "stamped");
}

/// Case 11: a grant that has expired is gone at that instant, with no push.
#[test]
fn expired_grants_see_nothing() {
    let mut snapshot = snapshot();
    let signer = PageSigner::new(&[9; 32]);
    if let Some(tenant) = snapshot.tenants.get_mut("a") {
        for grant in &mut tenant.grants {
            grant.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        }
    }
    let now = SystemTime::now();
    let (step, _) = run(&case(Method::GET, "Patient/a1"), &snapshot, &signer, now);
    assert_eq!(describe(&step), "REFUSE 404");
    let (step, _) = run(&case(Method::GET, "Observation"), &snapshot, &signer, now);
    assert_eq!(describe(&step), "ANSWER");
    let (step, _) =
        run(&case(Method::POST, "Observation").body(json!({"resourceType": "Observation"})), &snapshot, &signer, now);
    assert_eq!(describe(&step), "REFUSE 403");
}

/// What a raw upload sends: a Binary built here with the content type, the checked context, the dataset of that
/// context (or the stored Binary's, or the tenant's only one), pinned to the stored version on an update.
#[test]
fn binary_uploads_carry_the_checked_context_and_dataset() {
    let snapshot = snapshot();
    let signer = PageSigner::new(&[9; 32]);
    let now = SystemTime::now();
    let tag = |code: &str| json!([{"system": DS, "code": code}]);
    let cases = [
        (
            case(Method::POST, "Binary").media("application/pdf"),
            json!({"resourceType": "Binary", "contentType": "application/pdf", "meta": {"tag": tag("a")}}),
            None,
        ),
        (
            case(Method::POST, "Binary")
                .tenant("ab")
                .media("text/plain; charset=utf-8")
                .header("x-security-context", &format!("{PUBLIC}/Patient/b1")),
            json!({"resourceType": "Binary", "contentType": "text/plain; charset=utf-8",
                   "securityContext": {"reference": "Patient/b1"}, "meta": {"tag": tag("b")}}),
            None,
        ),
        (
            case(Method::PUT, "Binary/bin-a").media("image/png").header("if-match", "W/\"1\""),
            json!({"resourceType": "Binary", "id": "bin-a", "contentType": "image/png", "meta": {"tag": tag("a")}}),
            Some("W/\"1\""),
        ),
    ];
    for (case, want, if_match) in cases {
        let (step, _) = run(&case, &snapshot, &signer, now);
        let Step::Send(call) = step else { panic!("{} {}: {step:?}", case.method, case.path) };
        let Some(crate::policy::plan::Payload::BinaryUpload(binary)) = &call.body else {
            panic!("not an upload: {call:?}")
        };
        assert_eq!(binary, &want, "{} {}", case.method, case.path);
        let header = |name: &str| call.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.to_str().ok());
        assert_eq!(header("if-match"), if_match);
        assert_eq!(header("prefer"), Some("return=minimal"));
    }
}
