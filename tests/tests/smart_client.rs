//! Issue 5: a real third-party SMART on FHIR client (Python `fhirclient`) discovers the gateway, reads and searches
//! through it, following its paging links, and sees only its own tenant's data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{Stack, stack};
use fhirgw_e2e::fixtures::DATASET;
use fhirgw_e2e::smart_client;
use serde_json::{Value, json};

/// The Observation ids tagged for `tenant`, asked of the upstream directly (the truth the gateway must match).
async fn upstream_observations(s: &Stack, tenant: &str) -> BTreeSet<String> {
    let bundle = s.upstream(&format!("/Observation?_tag={DATASET}|{tenant}&_count=1000")).await;
    let ids: BTreeSet<String> =
        bundle["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap().to_owned()).collect();
    assert!(ids.len() >= 3, "the seed data should give {tenant} several Observations: {ids:?}");
    ids
}

fn seen_ids(output: &Value) -> Vec<String> {
    output["pages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn fhirclient_discovers_reads_and_pages_through_the_gateway() {
    let s = stack().await;
    let base = s.url("/fhir");

    for (tenant, token, patient, other) in
        [("tenant-a", &s.a, "a-pat-1", "tenant-b"), ("tenant-b", &s.b, "b-pat-1", "tenant-a")]
    {
        let run = smart_client(&base, token, patient, "Observation", 2, &[]).await;
        assert!(run.success, "{tenant}: the SMART client failed:\n{}", run.stderr);
        let out = &run.output;

        // Discovery: fhirclient parsed the rewritten CapabilityStatement with its own R4 models.
        let discovered = &out["discovered"];
        assert_eq!(discovered["fhirVersion"], "4.0.1");
        assert_eq!(discovered["implementation_url"], json!(base));
        assert_eq!(discovered["security_service"], json!(["SMART-on-FHIR"]));
        assert_eq!(discovered["oauth_uris"]["token"], json!(format!("{}/token", s.issuer.url)));
        assert_eq!(discovered["smart_configuration"]["token_endpoint"], discovered["oauth_uris"]["token"]);
        assert!(discovered["resource_types"].as_array().unwrap().contains(&json!("Observation")));

        // The read.
        assert_eq!(out["patient"]["id"], patient);

        // The search, every page fhirclient followed: exactly this tenant's Observations, once each.
        let pages = out["pages"].as_array().unwrap();
        let ids = seen_ids(out);
        let want = upstream_observations(&s, tenant).await;
        let unwanted = upstream_observations(&s, other).await;
        assert!(pages.len() >= 2, "{tenant}: with _count=2 fhirclient should have followed next links: {out}");
        assert_eq!(ids.len(), want.len(), "{tenant}: each Observation once: {ids:?}");
        assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), want, "{tenant}");
        assert!(ids.iter().all(|id| !unwanted.contains(id)), "{tenant} saw another tenant's data: {ids:?}");
        for page in pages {
            for (relation, url) in page["links"].as_object().unwrap() {
                assert!(url.as_str().unwrap().starts_with(&base), "{relation} link {url} is not on {base}");
            }
            for url in page["full_urls"].as_array().unwrap() {
                assert!(url.as_str().unwrap().starts_with(&format!("{base}/Observation/")), "{url}");
            }
        }
    }

    // The other tenant's patient is not found (fhirclient's FHIRNotFoundException).
    let run = smart_client(&base, &s.a, "b-pat-1", "Observation", 2, &[]).await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.output["patient"], json!({"not_found": "b-pat-1"}));
}
