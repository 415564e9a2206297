//! Bulk export's pure parts, table-driven.

use std::time::{Duration, SystemTime};

use fhirgw_config::tenant::Tag;
use serde_json::{Value, json};

use super::*;
use crate::policy::paging::{PageError, PageSigner};
use crate::policy::query::{self, MAX_PARAMS, Params, QueryError};
use crate::policy::scopes::Scopes;
use crate::policy::verify::Grants;
use fhirgw_config::route::QueryGuard;

const DS: &str = "https://fhirgw.dev/dataset";

fn tag(code: &str) -> Tag {
    Tag { system: DS.into(), code: code.into() }
}

fn kick(q: &str, scopes: &str, tags: &[&Tag]) -> Result<Vec<(String, String)>, KickOffError> {
    kickoff(&query::parse(Some(q)), tags, &Scopes::parse(scopes), &QueryGuard::default())
}

/// A `_typeFilter` value decoded for reading: `Type?name=value&…`.
fn decoded(filter: &str) -> String {
    let (ty, q) = filter.split_once('?').unwrap_or_default();
    let pairs: Vec<String> = query::parse(Some(q)).iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{ty}?{}", pairs.join("&"))
}

#[test]
fn post_parameters_become_query_parameters() {
    type Case = (&'static str, Value, Result<Vec<(&'static str, &'static str)>, &'static str>);
    // Patients come back separately; here they are listed as ("patient", id).
    let p = |parameter: Value| json!({"resourceType": "Parameters", "parameter": parameter});
    let cases: Vec<Case> = vec![
        ("empty", json!({"resourceType": "Parameters"}), Ok(vec![])),
        (
            "all four",
            p(json!([
                {"name": "_type", "valueString": "Patient,Observation"},
                {"name": "_type", "valueString": "Condition"},
                {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"},
                {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
                {"name": "_typeFilter", "valueString": "Observation?code=1"}
            ])),
            Ok(vec![
                ("_type", "Patient,Observation"),
                ("_type", "Condition"),
                ("_since", "2026-01-01T00:00:00Z"),
                ("_outputFormat", "application/fhir+ndjson"),
                ("_typeFilter", "Observation?code=1"),
            ]),
        ),
        (
            "_since as a string",
            p(json!([{"name": "_since", "valueString": "2026-01-01"}])),
            Ok(vec![("_since", "2026-01-01")]),
        ),
        (
            "with an id",
            p(json!([{"id": "x", "name": "_type", "valueString": "Patient"}])),
            Ok(vec![("_type", "Patient")]),
        ),
        ("not Parameters", json!({"resourceType": "Patient"}), Err("resourceType")),
        ("not JSON object", json!(["_type"]), Err("resourceType")),
        ("parameter not an array", json!({"resourceType": "Parameters", "parameter": {}}), Err("parameter")),
        ("entry not an object", p(json!(["_type"])), Err("parameter")),
        ("no name", p(json!([{"valueString": "Patient"}])), Err("parameter")),
        (
            "patients",
            p(json!([
                {"name": "patient", "valueReference": {"reference": "Patient/1"}},
                {"name": "_type", "valueString": "Observation"},
                {"name": "patient", "valueReference": {"reference": "Patient/a-2"}}
            ])),
            Ok(vec![("_type", "Observation"), ("patient", "1"), ("patient", "a-2")]),
        ),
        (
            "patient of another type",
            p(json!([{"name": "patient", "valueReference": {"reference": "Group/1"}}])),
            Err("patient"),
        ),
        (
            "absolute patient",
            p(json!([{"name": "patient", "valueReference": {"reference": "http://x/fhir/Patient/1"}}])),
            Err("patient"),
        ),
        (
            "patient with a bad id",
            p(json!([{"name": "patient", "valueReference": {"reference": "Patient/a/b"}}])),
            Err("patient"),
        ),
        (
            "patient with more than a reference",
            p(json!([{"name": "patient", "valueReference": {"reference": "Patient/1", "identifier": {"value": "x"}}}])),
            Err("patient"),
        ),
        ("patient as a string", p(json!([{"name": "patient", "valueString": "Patient/1"}])), Err("patient")),
        (
            "includeAssociatedData",
            p(json!([{"name": "includeAssociatedData", "valueCode": "x"}])),
            Err("includeAssociatedData"),
        ),
        ("unknown", p(json!([{"name": "_elements", "valueString": "id"}])), Err("_elements")),
        ("no value", p(json!([{"name": "_type"}])), Err("_type")),
        (
            "two values",
            p(json!([{"name": "_since", "valueInstant": "2026-01-01T00:00:00Z", "valueString": "x"}])),
            Err("_since"),
        ),
        ("wrong value type", p(json!([{"name": "_type", "valueCode": "Patient"}])), Err("_type")),
        ("value not a string", p(json!([{"name": "_type", "valueString": 1}])), Err("_type")),
        ("parts", p(json!([{"name": "_type", "valueString": "Patient", "part": []}])), Err("_type")),
        ("resource", p(json!([{"name": "_type", "resource": {"resourceType": "Patient"}}])), Err("_type")),
    ];
    for (what, body, want) in cases {
        let got = parameters(&body).map(|(mut params, patients)| {
            params.extend(patients.into_iter().map(|id| ("patient".to_owned(), id)));
            params
        });
        let got = got.map_err(|e| match e {
            KickOffError::Query(QueryError::Refused { param, .. }) => param,
            other => panic!("{what}: {other}"),
        });
        let want = want
            .map(|pairs| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>())
            .map_err(str::to_owned);
        assert_eq!(got, want, "{what}");
    }
    let many = p(Value::Array(vec![json!({"name": "_type", "valueString": "Patient"}); MAX_PARAMS + 1]));
    assert!(parameters(&many).is_err(), "too many");
}

#[test]
fn upstream_parameters_carry_the_narrowed_list_and_the_patients() {
    let params = vec![
        ("_type".to_owned(), "Observation".to_owned()),
        ("_since".to_owned(), "2026-01-01T00:00:00Z".to_owned()),
        ("_typeFilter".to_owned(), "Observation?_tag=s%7Ca".to_owned()),
    ];
    let body = upstream_parameters(&params, &["p1".to_owned()]);
    assert_eq!(
        body,
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Observation"},
            {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"},
            {"name": "_typeFilter", "valueString": "Observation?_tag=s%7Ca"},
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}}
        ]})
    );
    // Read back by the gateway's own parser, it is the same list (what a server gets is what was checked).
    assert_eq!(parameters(&body).unwrap_or_else(|e| panic!("{e}")), (params, vec!["p1".to_owned()]));
}

#[test]
fn kickoff_is_narrowed_to_the_tenant() {
    let a = tag("tenant-a");
    let mine = format!("_tag={DS}|tenant-a");
    // (query, scopes, expected _type, expected _typeFilters decoded)
    let cases: &[(&str, &str, &str, Vec<String>)] = &[
        (
            "_type=Patient,Observation",
            "user/*.read",
            "Patient,Observation",
            vec![format!("Patient?{mine}"), format!("Observation?{mine}")],
        ),
        (
            "_type=Patient&_type=Patient,Condition",
            "user/*.rs",
            "Patient,Condition",
            vec![format!("Patient?{mine}"), format!("Condition?{mine}")],
        ),
        // No `_type`: the types the scopes name.
        (
            "",
            "system/Observation.read system/Patient.rs user/Encounter.c",
            "Observation,Patient",
            vec![format!("Observation?{mine}"), format!("Patient?{mine}")],
        ),
        // The client's filters stay (ORed by the server), each narrowed.
        (
            "_type=Observation,Patient&_typeFilter=Observation%3Fcode%3D1234&_typeFilter=Observation%3Fstatus%3Dfinal",
            "user/*.read",
            "Observation,Patient",
            vec![
                format!("Observation?code=1234&{mine}"),
                format!("Observation?status=final&{mine}"),
                format!("Patient?{mine}"),
            ],
        ),
        // A client `_tag` only narrows further.
        (
            "_type=Observation&_typeFilter=Observation%3F_tag%3Dhttps%3A%2F%2Fevil%7Cx",
            "user/*.read",
            "Observation",
            vec![format!("Observation?_tag=https://evil|x&{mine}")],
        ),
    ];
    for (q, scopes, types, filters) in cases {
        let out = kick(q, scopes, &[&a]).unwrap_or_else(|e| panic!("{q}: {e}"));
        let get =
            |name: &str| -> Vec<String> { out.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect() };
        assert_eq!(get("_type"), vec![(*types).to_owned()], "{q}");
        assert_eq!(get("_outputFormat"), vec!["application/fhir+ndjson".to_owned()], "{q}");
        let got: Vec<String> = get("_typeFilter").iter().map(|f| decoded(f)).collect();
        assert_eq!(&got, filters, "{q}");
    }
    // Several tags: ORed in one `_tag`, exactly as searches are narrowed; encoded twice (a query in a query).
    let a2 = tag("tenant-a2");
    let out = kick("_type=Patient&_since=2024-01-01T00:00:00Z&_outputFormat=ndjson", "user/*.read", &[&a, &a2])
        .unwrap_or_default();
    assert_eq!(
        query::encode(&out),
        "_type=Patient&_since=2024-01-01T00%3A00%3A00Z&_outputFormat=application%2Ffhir%2Bndjson&_typeFilter=Patient%3F_tag%3Dhttps%253A%252F%252Ffhirgw.dev%252Fdataset%257Ctenant-a%252Chttps%253A%252F%252Ffhirgw.dev%252Fdataset%257Ctenant-a2"
    );
}

#[test]
fn kickoff_refusals() {
    let a = tag("tenant-a");
    let param = |r: Result<Params, KickOffError>| match r {
        Err(KickOffError::Query(QueryError::Refused { param, .. })) => param,
        other => format!("{other:?}"),
    };
    let refused: &[(&str, &str)] = &[
        ("", "_type"),
        ("_type=patient", "_type"),
        ("_type=Patient,", "_type"),
        ("_type=Patient&_since=yesterday", "_since"),
        ("_type=Patient&_since=2024&_since=2025", "_since"),
        ("_type=Patient&_outputFormat=application/json", "_outputFormat"),
        ("_type=Patient&_elements=id", "_elements"),
        ("_type=Patient&patient=Patient/1", "patient"),
        ("_type=Patient&includeAssociatedData=LatestProvenanceResources", "includeAssociatedData"),
        ("_type=Patient&_typeFilter=Observation%3Fcode%3D1", "_typeFilter"),
        ("_type=Patient&_typeFilter=patient%3Fname%3Dx", "_typeFilter"),
        (
            "_type=Patient&_typeFilter=Patient%3F_has%3AObservation%3Asubject%3Acode%3D1",
            "_has:Observation:subject:code",
        ),
        ("_type=Patient&_typeFilter=Patient%3Fgeneral-practitioner.name%3Dx", "general-practitioner.name"),
        ("_type=Patient&_typeFilter=Patient%3F_filter%3Dx", "_filter"),
        ("_type=Patient&_typeFilter=Patient%3F_revinclude%3DObservation%3Asubject", "_typeFilter _revinclude"),
        ("_type=Patient&_typeFilter=Patient%3F_count%3D1", "_typeFilter _count"),
    ];
    for (q, want) in refused {
        assert_eq!(param(kick(q, "user/*.read", &[&a])), *want, "{q}");
    }
    assert_eq!(
        kick("_type=Patient,Observation", "user/Patient.read", &[&a]),
        Err(KickOffError::Scope("Observation".into()))
    );
    assert_eq!(kick("_type=Patient", "patient/*.read", &[&a]), Err(KickOffError::Scope("Patient".into())));
    assert!(matches!(kick("", "user/Patient.c", &[&a]), Err(KickOffError::Nothing(_))));
    assert!(matches!(kick("_type=Patient", "user/*.read", &[]), Err(KickOffError::Nothing(_))));
}

#[test]
fn links_are_bound_and_not_page_tokens() {
    let signer = PageSigner::new(&[9; 32]);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let bind = |kind, tenant| Binding { kind, tenant, upstream: "fhir", base_path: "/fhir" };
    let status = bind(LinkKind::Status, "tenant-a");
    let claims = ExportClaims::new(&status, "/fhir/$export-poll-status?_jobId=1".into(), None, now);
    let token = claims.sign(&signer);
    assert_eq!(ExportClaims::verify(&signer, &token, &status, now), Ok(claims.clone()));
    assert!(ExportClaims::verify(&signer, &token, &status, now + EXPORT_TTL - Duration::from_secs(1)).is_ok());
    assert_eq!(ExportClaims::verify(&signer, &token, &status, now + EXPORT_TTL), Err(LinkError::Expired));
    // Another tenant, kind, upstream or base.
    let mismatches = [
        bind(LinkKind::Status, "tenant-b"),
        bind(LinkKind::File, "tenant-a"),
        Binding { kind: LinkKind::Status, tenant: "tenant-a", upstream: "other", base_path: "/fhir" },
        Binding { kind: LinkKind::Status, tenant: "tenant-a", upstream: "fhir", base_path: "/r4" },
    ];
    for binding in &mismatches {
        assert_eq!(ExportClaims::verify(&signer, &token, binding, now), Err(LinkError::Mismatch));
    }
    assert_eq!(ExportClaims::verify(&PageSigner::new(&[8; 32]), &token, &status, now), Err(LinkError::BadSignature));
    // A page token is not an export link, and an export link is not a page token, even with the same key.
    let page = signer.sign(&PageSigner::claims("tenant-a", "x", "fhir", "/fhir/$export-poll-status?_jobId=1", now));
    assert_eq!(ExportClaims::verify(&signer, &page, &status, now), Err(LinkError::BadSignature));
    assert_eq!(signer.verify(&token, now), Err(PageError::BadSignature));
    for junk in ["", ".", "a.b", "!!.??"] {
        assert!(ExportClaims::verify(&signer, junk, &status, now).is_err(), "{junk}");
    }
}

#[test]
fn manifests_keep_only_what_can_be_verified() {
    let up = "http://up:8090/fhir";
    let target = |url: &str| url.strip_prefix("http://up:8090").filter(|r| r.starts_with("/fhir/")).map(str::to_owned);
    let mut link = |t: String, ty: &str| format!("https://gw/fhir/$export-file?_token={ty}:{t}");
    let manifest = json!({
        "transactionTime": "2024-01-01T00:00:00Z",
        "request": format!("{up}/$export?_type=Patient"),
        "requiresAccessToken": false,
        "output": [{"type": "Patient", "url": format!("{up}/Binary/1"), "count": 99, "extension": {}}],
        "error": [{"type": "Patient", "url": format!("{up}/Binary/2")}],
        "deleted": [{"type": "Bundle", "url": format!("{up}/Binary/3")}],
        "extension": {"secret": true}
    });
    let out = rewrite_manifest(&manifest, "https://gw/fhir/$export".into(), &target, &mut link)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        json!({
            "transactionTime": "2024-01-01T00:00:00Z",
            "request": "https://gw/fhir/$export",
            "requiresAccessToken": true,
            "output": [{"type": "Patient", "url": "https://gw/fhir/$export-file?_token=Patient:/fhir/Binary/1"}],
            "error": [{"type": "Patient", "url": "https://gw/fhir/$export-file?_token=OperationOutcome:/fhir/Binary/2"}],
        })
    );
    let refused = [
        json!([]),
        json!({"output": []}),
        json!({"transactionTime": "t", "output": {}}),
        json!({"transactionTime": "t", "output": [{"type": "Patient", "url": "https://bucket.s3/x"}]}),
        json!({"transactionTime": "t", "output": [{"url": format!("{up}/Binary/1")}]}),
        json!({"transactionTime": "t", "error": [{"type": "bad type", "url": format!("{up}/Binary/1")}]}),
    ];
    for m in refused {
        assert!(rewrite_manifest(&m, String::new(), &target, &mut link).is_err(), "{m}");
    }
}

#[test]
fn progress_never_carries_numbers() {
    let cases = [
        (Some("in progress"), "in progress"),
        (Some("Building files, please wait"), "Building files, please wait"),
        (Some("exported 5000 of 120000 resources"), "in progress"),
        (Some("50%"), "in progress"),
        (Some("line\nbreak"), "in progress"),
        (Some("tab\there"), "in progress"),
        (Some(""), "in progress"),
        (None, "in progress"),
    ];
    for (upstream, want) in cases {
        assert_eq!(progress(upstream), want, "{upstream:?}");
    }
    assert_eq!(progress(Some(&"x".repeat(101))), "in progress");
}

#[test]
fn line_verification_table() {
    let a = tag("tenant-a");
    let grants = Grants::new([&a]);
    let tagged = |ty: &str, code: &str| json!({"resourceType": ty, "meta": {"tag": [{"system": DS, "code": code}]}});
    let only_patient = |ty: &str| ty == "Patient";
    let cases = [
        (tagged("Patient", "tenant-a"), Some("Patient"), true),
        (tagged("Patient", "tenant-a"), None, true),
        (tagged("Patient", "tenant-b"), Some("Patient"), false),
        (json!({"resourceType": "Patient"}), Some("Patient"), false),
        (tagged("Observation", "tenant-a"), Some("Patient"), false),
        (tagged("Observation", "tenant-a"), None, false),
        (tagged("OperationOutcome", "tenant-a"), Some("OperationOutcome"), false),
        (tagged("Bundle", "tenant-a"), None, false),
        (json!(["Patient"]), None, false),
    ];
    for (line, declared, want) in cases {
        assert_eq!(line_visible(&line, declared, &grants, &only_patient), want, "{line} {declared:?}");
    }
}
