//! What a caller can learn about other tenants' data without seeing it: an independent test found two oracles
//! (a transaction's read answered differently for another tenant's resource than for a missing one, and `total`
//! counting an `_include` dropped from another tenant), and `total` wrong on every page after the first. Each test
//! runs through a real data plane in front of the real test FHIR server, in each of the server's behaviours that
//! matter (a missing read failing a whole transaction or answered per entry; offset or cursor paging).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Stack, stack, stack_full};
use fhirgw_e2e::fixtures::DATASET as DS;
use fhirgw_e2e::http;
use serde_json::{Value, json};

const WRITE: &str = "user/*.read user/*.write";

async fn patients(s: &Stack) -> u64 {
    s.upstream("/Patient?_summary=count").await["total"].as_u64().unwrap()
}

fn entry(method: &str, url: &str) -> Value {
    json!({"request": {"method": method, "url": url}})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

async fn post_bundle(s: &Stack, token: &str, bundle: &Value) -> common::Reply {
    s.send(http().post(s.url("/fhir")).bearer_auth(token).json(bundle)).await
}

/// Issue 11.1: a transaction's reads answer exactly as direct reads do. Another tenant's resource and a missing one
/// give byte-identical answers (the whole transaction refused with the one 404), whichever way the upstream treats a
/// missing read inside a transaction; nothing is sent upstream for them, and nothing the transaction would have
/// written is written. A read that is allowed is pinned to the version checked.
#[tokio::test]
async fn transaction_reads_are_no_existence_oracle() {
    for mode in ["fail", "per-entry"] {
        let s = stack_full(&["--transaction-reads", mode], &[], &[]).await;
        let a = s.issuer.token("tenant-a", WRITE);
        let b_version = s.upstream("/Patient/b-pat-1").await["meta"]["versionId"].as_str().unwrap().to_owned();
        let before = patients(&s).await;
        let create = json!({"request": {"method": "POST", "url": "Patient"},
            "resource": {"resourceType": "Patient", "name": [{"family": "Never"}]}});
        let pairs: Vec<(&str, String, String)> = vec![
            ("read", "Patient/b-pat-1".into(), "Patient/nope".into()),
            ("read of another type", "Observation/b-obs-1".into(), "Observation/nope".into()),
            ("vread", format!("Patient/b-pat-1/_history/{b_version}"), "Patient/nope/_history/1".into()),
            (
                "vread of a missing version",
                format!("Patient/b-pat-1/_history/{b_version}"),
                format!("Patient/a-pat-1/_history/{b_version}"),
            ),
        ];
        for (what, foreign, missing) in pairs {
            for with_create in [false, true] {
                let bundle = |url: &str| {
                    let mut entries = vec![entry("GET", url)];
                    if with_create {
                        entries.insert(0, create.clone());
                    }
                    transaction(entries)
                };
                let log_before = s.upstream_requests().await.len();
                let r_foreign = post_bundle(&s, &a, &bundle(&foreign)).await;
                let r_missing = post_bundle(&s, &a, &bundle(&missing)).await;
                let context = format!("{mode}, {what}, create first: {with_create}");
                assert_eq!(r_foreign.status, 404, "{context}: {}", r_foreign.text());
                assert_eq!(
                    (r_foreign.status, r_foreign.text()),
                    (r_missing.status, r_missing.text()),
                    "{context}: another tenant's and a missing resource must look the same"
                );
                assert_eq!(r_foreign.json()["resourceType"], "OperationOutcome");
                let log = s.upstream_requests().await;
                assert!(
                    log[log_before..].iter().all(|req| req["method"] != "POST"),
                    "{context}: a refused transaction reached the upstream: {:?}",
                    &log[log_before..]
                );
            }
        }
        assert_eq!(patients(&s).await, before, "{mode}: a refused transaction wrote something");

        // The same in a batch: each entry answered in place, out of grant exactly as missing.
        let r = post_bundle(
            &s,
            &a,
            &json!({"resourceType": "Bundle", "type": "batch", "entry": [
                entry("GET", "Patient/b-pat-1"), entry("GET", "Patient/nope"),
                entry("GET", &format!("Patient/b-pat-1/_history/{b_version}")), entry("GET", "Patient/nope/_history/1"),
            ]}),
        )
        .await;
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        let entries = r.json()["entry"].as_array().unwrap().clone();
        assert_eq!(entries[0], entries[1], "{mode}: batch read");
        assert_eq!(entries[2], entries[3], "{mode}: batch vread");
        assert_eq!(entries[0], json!({"response": {"status": "404 Not Found"}}));

        // An allowed read: answered, and the upstream was asked for exactly the version the gateway checked.
        let log_before = s.upstream_requests().await.len();
        let r = post_bundle(&s, &a, &transaction(vec![create.clone(), entry("GET", "Patient/a-pat-1")])).await;
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        let body = r.json();
        assert_eq!(body["type"], "transaction-response");
        assert_eq!(body["entry"][1]["resource"]["id"], "a-pat-1");
        assert!(body["entry"][1]["response"]["status"].as_str().unwrap().starts_with("200"), "{body}");
        let log = s.upstream_requests().await;
        let sent = log[log_before..].iter().find(|req| req["method"] == "POST").expect("the transaction was sent");
        assert!(sent["path"].as_str().unwrap().ends_with("/fhir"), "{sent}");
        assert_eq!(patients(&s).await, before + 1, "{mode}");
    }
}

/// Seeds tenant-a Observations whose subjects point into tenant B, and at nothing.
async fn seed_includes(s: &Stack) {
    for (id, subject) in [("a-obs-into-b", "Patient/b-pat-1"), ("a-obs-nowhere", "Patient/does-not-exist")] {
        s.put_upstream(&json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"text": "include probe"}, "subject": {"reference": subject},
            "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}}))
            .await;
    }
}

/// What a caller can observe of a searchset apart from ids: total, the modes of its entries in order, the link
/// relations.
fn shape(r: &common::Reply) -> (Option<u64>, Vec<String>, Vec<String>) {
    let body = r.json();
    let modes = body["entry"]
        .as_array()
        .map(|e| e.iter().map(|e| e["search"]["mode"].as_str().unwrap_or("?").to_owned()).collect())
        .unwrap_or_default();
    let links = body["link"]
        .as_array()
        .map(|l| l.iter().map(|l| l["relation"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    (body["total"].as_u64(), modes, links)
}

/// Issue 11.2: `total` counts matches only; an `_include` or `_revinclude` pointing into another tenant looks exactly
/// like one pointing at nothing.
#[tokio::test]
async fn includes_from_other_tenants_change_nothing_observable() {
    let s = stack().await;
    seed_includes(&s).await;
    let into_b = s.get("/fhir/Observation?_id=a-obs-1,a-obs-into-b&_include=Observation:subject", &s.a).await;
    let nowhere = s.get("/fhir/Observation?_id=a-obs-1,a-obs-nowhere&_include=Observation:subject", &s.a).await;
    assert_eq!(into_b.status, 200, "{}", into_b.text());
    assert!(!into_b.ids().contains(&"Patient/b-pat-1".to_owned()), "tenant-b's patient leaked: {}", into_b.text());
    assert_eq!(shape(&into_b), shape(&nowhere), "{}\n{}", into_b.text(), nowhere.text());
    assert_eq!(shape(&into_b).0, Some(2), "total is the number of matches: {}", into_b.text());

    // _revinclude: tenant-b holds a record about tenant-a's patient (b-obs-cross); it is dropped and changes nothing.
    let r = s.get("/fhir/Patient?_id=a-pat-1&_revinclude=Observation:subject", &s.a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("b-obs-cross"), "{}", r.text());
    assert_eq!(r.json()["total"], 1, "{}", r.text());
    let ids = r.ids();
    assert_eq!(ids.iter().filter(|id| id.starts_with("Observation/")).count(), 2, "{ids:?}");

    // Through a paged search too, every page.
    let mut next = Some("/fhir/Observation?_count=2&_include=Observation:subject".to_owned());
    let own = s.upstream(&format!("/Observation?_tag={DS}|tenant-a&_summary=count")).await["total"].as_u64().unwrap();
    while let Some(path) = next.take() {
        let r = s.get(&path, &s.a).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["total"].as_u64(), Some(own), "{path}: {}", r.text());
        next = page_link(&s, &r.json(), "next");
    }
}

/// The `next` (or other) link of a Bundle, as a path on the data plane.
fn page_link(s: &Stack, bundle: &Value, relation: &str) -> Option<String> {
    let links = bundle["link"].as_array()?;
    let url = links.iter().find(|l| l["relation"] == relation)?["url"].as_str()?;
    Some(url.strip_prefix(&s.url("")).unwrap_or_else(|| panic!("link not on the gateway: {url}")).to_owned())
}

/// Pages through `first` and returns (total on each page, ids of every match).
async fn walk(s: &Stack, token: &str, first: &str) -> (Vec<Option<u64>>, Vec<String>) {
    let (mut totals, mut ids) = (Vec::new(), Vec::new());
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        let r = s.get(&path, token).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let body = r.json();
        totals.push(body["total"].as_u64());
        for e in body["entry"].as_array().cloned().unwrap_or_default() {
            if e["search"]["mode"] == "match" {
                ids.push(format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                ));
            }
        }
        next = page_link(s, &body, "next");
        assert!(totals.len() < 50, "paging does not end");
    }
    (totals, ids)
}

/// Issue 19: `total` on every page (first, middle, last) is the upstream's total of the tenant-narrowed search, for
/// type, system (`_type`) and compartment searches and with `_include`, in both of the test server's paging styles.
#[tokio::test]
async fn total_is_the_search_total_on_every_page() {
    for paging in ["offset", "cursor"] {
        let s = stack_full(&["--paging", paging], &[], &[]).await;
        let count = |query: String| {
            let s = &s;
            async move { s.upstream(&format!("{query}&_summary=count")).await["total"].as_u64().unwrap() }
        };
        let tag = format!("_tag={DS}|tenant-a");
        let observations = count(format!("/Observation?{tag}")).await;
        let conditions = count(format!("/Condition?{tag}")).await;
        let compartment = count(format!("/Observation?{tag}&subject=Patient/a-pat-1")).await;
        let cases = [
            ("type search", "/fhir/Observation?_count=1".to_owned(), observations),
            (
                "type search with _include",
                "/fhir/Observation?_count=1&_include=Observation:subject".to_owned(),
                observations,
            ),
            ("system search", "/fhir?_type=Observation,Condition&_count=2".to_owned(), observations + conditions),
            ("compartment search", "/fhir/Patient/a-pat-1/Observation?_count=1".to_owned(), compartment),
        ];
        for (what, first, want) in cases {
            let (totals, ids) = walk(&s, &s.a, &first).await;
            assert!(totals.len() >= 2, "{paging}, {what}: one page only ({totals:?})");
            assert!(totals.iter().all(|t| *t == Some(want)), "{paging}, {what}: totals {totals:?}, want {want}");
            assert_eq!(ids.len() as u64, want, "{paging}, {what}: {ids:?}");
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), ids.len(), "{paging}, {what}: duplicates {ids:?}");
            assert!(ids.iter().all(|id| id.split('/').nth(1).unwrap().starts_with("a-")), "{paging}, {what}: {ids:?}");
        }
        // Pages of a search that was not narrowed upstream (history) carry no total at all, never a page count; type
        // history shows only the tenant's own versions.
        for path in ["/fhir/Patient/a-pat-1/_history", "/fhir/Observation/_history"] {
            let r = s.get(path, &s.a).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.json().get("total").is_none(), "{}", r.text());
            let ids = r.ids();
            assert!(!ids.is_empty() && ids.iter().all(|id| id.split('/').nth(1).unwrap().starts_with("a-")), "{ids:?}");
        }
    }
}

/// A written reference is checked like a read (a FHIR server enforcing referential integrity, as HAPI does by
/// default, would otherwise tell the caller whether any id exists anywhere): another tenant's resource and a
/// missing one get the same 422, on every kind of write, and nothing is written. A conditional reference is
/// narrowed to the tenant, so it resolves only among the caller's resources.
#[tokio::test]
async fn references_in_writes_are_no_existence_oracle() {
    let s = stack_full(&["--referential-integrity"], &[], &[]).await;
    let a = s.issuer.token("tenant-a", WRITE);
    let b_version = s.upstream("/Patient/b-pat-1").await["meta"]["versionId"].as_str().unwrap().to_owned();
    let observations = || async { s.upstream("/Observation?_summary=count").await["total"].as_u64().unwrap() };
    let before = observations().await;
    let obs = |reference: &str| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "probe"},
            "subject": {"reference": reference}, "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}})
    };
    let mut a_obs = s.upstream("/Observation/a-obs-3").await;
    let public = s.url("/fhir");
    type Write = Box<dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync>;
    let writes: Vec<(&str, Write)> = vec![
        (
            "create",
            Box::new({
                let (url, a) = (s.url("/fhir/Observation"), a.clone());
                move |r: &str| http().post(&url).bearer_auth(&a).json(&obs(r))
            }),
        ),
        (
            "update",
            Box::new({
                let (url, a) = (s.url("/fhir/Observation/a-obs-3"), a.clone());
                a_obs["subject"] = json!({"reference": "x"});
                let body = a_obs.clone();
                move |r: &str| {
                    let mut body = body.clone();
                    body["subject"]["reference"] = json!(r);
                    http().put(&url).bearer_auth(&a).json(&body)
                }
            }),
        ),
        (
            "JSON Patch",
            Box::new({
                let (url, a) = (s.url("/fhir/Observation/a-obs-3"), a.clone());
                move |r: &str| {
                    http()
                        .patch(&url)
                        .bearer_auth(&a)
                        .header("content-type", "application/json-patch+json")
                        .body(json!([{"op": "replace", "path": "/subject/reference", "value": r}]).to_string())
                }
            }),
        ),
        (
            "FHIRPath Patch",
            Box::new({
                let (url, a) = (s.url("/fhir/Observation/a-obs-3"), a.clone());
                move |r: &str| {
                    http().patch(&url).bearer_auth(&a).header("content-type", "application/fhir+json").json(&json!({
                    "resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.subject"},
                        {"name": "value", "valueReference": {"reference": r}}]}]}))
                }
            }),
        ),
        (
            "transaction",
            Box::new({
                let (url, a) = (s.url("/fhir"), a.clone());
                move |r: &str| {
                    http().post(&url).bearer_auth(&a).json(&transaction(vec![
                        json!({"request": {"method": "POST", "url": "Observation"}, "resource": obs(r)}),
                    ]))
                }
            }),
        ),
    ];
    let pairs = [
        ("Patient/b-pat-1".to_owned(), "Patient/nope".to_owned()),
        (format!("Patient/b-pat-1/_history/{b_version}"), "Patient/a-pat-1/_history/nope".to_owned()),
        (format!("{public}/Patient/b-pat-1"), format!("{public}/Patient/nope")),
        ("Observation/b-obs-1".to_owned(), "Observation/nope".to_owned()),
    ];
    for (what, write) in &writes {
        for (foreign, missing) in &pairs {
            let from = s.upstream_requests().await.len();
            let r_foreign = s.send(write(foreign)).await;
            let r_missing = s.send(write(missing)).await;
            assert_eq!(r_foreign.status, 422, "{what} {foreign}: {}", r_foreign.text());
            assert_eq!(
                (r_foreign.status, r_foreign.text().replace(foreign, "X")),
                (r_missing.status, r_missing.text().replace(missing, "X")),
                "{what}: another tenant's and a missing reference must look the same"
            );
            let log = s.upstream_requests().await;
            assert!(
                log[from..].iter().all(|req| req["method"] == "GET"),
                "{what} {foreign}: a write reached the upstream: {:?}",
                &log[from..]
            );
        }
        // One's own resource may be referenced.
        let r = s.send(write("Patient/a-pat-2")).await;
        assert!(r.status < 300, "{what}: {} {}", r.status, r.text());
    }
    // In a batch, the entry is refused in place; the other entries go through.
    let r = s
        .send(http().post(s.url("/fhir")).bearer_auth(&a).json(
            &json!({"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "POST", "url": "Observation"}, "resource": obs("Patient/b-pat-1")},
                {"request": {"method": "POST", "url": "Observation"}, "resource": obs("Patient/nope")},
                {"request": {"method": "POST", "url": "Observation"}, "resource": obs("Patient/a-pat-1")},
            ]}),
        ))
        .await;
    let body = r.json();
    let status = |i: usize| body["entry"][i]["response"]["status"].as_str().unwrap().to_owned();
    assert!(status(0).starts_with("422") && status(1).starts_with("422") && status(2).starts_with("201"), "{body}");
    // create, transaction and batch each created one Observation referencing a-pat-2 or a-pat-1.
    assert_eq!(observations().await, before + 3);

    // A conditional reference resolves only among the caller's resources: tenant-b's identifier finds nothing, as
    // an unknown one does; the caller's own resolves.
    let b_mrn = s.upstream("/Patient/b-pat-1").await["identifier"][0].clone();
    let a_mrn = s.upstream("/Patient/a-pat-2").await["identifier"][0].clone();
    let cond =
        |id: &Value| format!("Patient?identifier={}|{}", id["system"].as_str().unwrap(), id["value"].as_str().unwrap());
    let post = |r: String| {
        s.send(http().post(s.url("/fhir")).bearer_auth(&a).json(&transaction(vec![
            json!({"request": {"method": "POST", "url": "Observation"}, "resource": obs(&r)}),
        ])))
    };
    let r_foreign = post(cond(&b_mrn)).await;
    let r_missing = post("Patient?identifier=http://nowhere|0".into()).await;
    assert!(r_foreign.status >= 400, "{}", r_foreign.text());
    assert_eq!(r_foreign.status, r_missing.status, "{} / {}", r_foreign.text(), r_missing.text());
    let r = post(cond(&a_mrn)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let location = r.json()["entry"][0]["response"]["location"].as_str().unwrap().to_owned();
    let id = location.split("/Observation/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    assert_eq!(s.upstream(&format!("/Observation/{id}")).await["subject"]["reference"], "Patient/a-pat-2");
}
