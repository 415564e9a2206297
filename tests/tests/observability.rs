//! The example alert rules and Grafana dashboard in deploy/observability/ name only metrics the binaries export:
//! every metric selected by every alert expression and dashboard query is found in a real scrape of a data plane
//! and a control plane that have served traffic. (deploy/validate.sh checks the files' structure.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::stack_with;
use fhirgw_e2e::{eventually, http, workspace};

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
];
/// Clauses whose parenthesised list holds label names, not metrics.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Open,
    Close,
    Other,
}

/// The metric names a PromQL expression selects: identifiers that are not functions (followed by `(`), keywords,
/// or label names (inside `{…}` matchers or `by (…)`-like lists); strings, ranges (`[5m]`) and numbers are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars>, quote: char) {
        while let Some(d) = chars.next() {
            if d == '\\' {
                chars.next();
            } else if d == quote {
                break;
            }
        }
    }
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => skip_string(&mut chars, c),
            // Label matchers, whose values may hold any character.
            '{' => {
                while let Some(d) = chars.next() {
                    match d {
                        '"' | '\'' | '`' => skip_string(&mut chars, d),
                        '}' => break,
                        _ => {}
                    }
                }
            }
            '[' => while chars.next().is_some_and(|d| d != ']') {},
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut ident = c.to_string();
                while let Some(d) = chars.next_if(|d| d.is_ascii_alphanumeric() || *d == '_' || *d == ':') {
                    ident.push(d);
                }
                tokens.push(Token::Ident(ident));
            }
            c if c.is_ascii_digit() || c == '.' => {
                while chars.next_if(|d| d.is_ascii_alphanumeric() || *d == '.').is_some() {}
                tokens.push(Token::Other);
            }
            c if c.is_whitespace() => {}
            _ => tokens.push(Token::Other),
        }
    }
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Ident(ident) = &tokens[i] {
            let next_is_open = tokens.get(i + 1) == Some(&Token::Open);
            // An aggregation's clause may come before its argument: `sum by (route) (…)`.
            let aggregation =
                matches!(tokens.get(i + 1), Some(Token::Ident(next)) if next == "by" || next == "without");
            if aggregation {
            } else if LABEL_LISTS.contains(&ident.as_str()) && next_is_open {
                while i < tokens.len() && tokens[i] != Token::Close {
                    i += 1;
                }
            } else if !next_is_open && !KEYWORDS.contains(&ident.as_str()) {
                names.insert(ident.clone());
            }
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_read_off_promql() {
    let cases: &[(&str, &[&str])] = &[
        ("fhirgw_dp_grants_stale == 1", &["fhirgw_dp_grants_stale"]),
        (
            "fhirgw_dp_config_seconds_since_confirmed > 0.5 * fhirgw_dp_grant_ttl_seconds",
            &["fhirgw_dp_config_seconds_since_confirmed", "fhirgw_dp_grant_ttl_seconds"],
        ),
        (
            r#"sum by (route) (rate(fhirgw_dp_requests_total{status_class="5xx", route=~"a|b"}[5m])) / sum by (route) (rate(fhirgw_dp_requests_total[$__rate_interval]))"#,
            &["fhirgw_dp_requests_total"],
        ),
        ("histogram_quantile(0.99, sum by (route, le) (rate(x_bucket[5m]))) > 2.5e3", &["x_bucket"]),
        (
            "process_open_fds / process_max_fds > 0.8 and on (job, instance) fhirgw_build_info",
            &["fhirgw_build_info", "process_max_fds", "process_open_fds"],
        ),
        ("count(count by (commit) (fhirgw_build_info)) > 1", &["fhirgw_build_info"]),
        ("absent(fhirgw_cp_store_revision)", &["fhirgw_cp_store_revision"]),
        (r#"sum without (instance) (a{l="{[x]}"}) unless ignoring (b) c offset 5m"#, &["a", "c"]),
    ];
    for (expr, want) in cases {
        let got = metric_names(expr);
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, want, "{expr}");
    }
}

/// Every `expr:` of the alert rules file (one line each, as the file's header promises).
fn alert_expressions(text: &str) -> Vec<String> {
    let exprs: Vec<String> =
        text.lines().filter_map(|l| l.trim_start().strip_prefix("expr:")).map(|e| e.trim().to_owned()).collect();
    let alerts = text.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert!(alerts > 0 && exprs.len() == alerts, "{alerts} alerts, {} one-line exprs", exprs.len());
    assert!(exprs.iter().all(|e| !e.is_empty() && !e.starts_with('|') && !e.starts_with('>')), "{exprs:?}");
    exprs
}

/// Every query of every panel of the dashboard (rows' nested panels included); each panel has at least one.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(panels: &[serde_json::Value], out: &mut Vec<String>) {
        for panel in panels {
            walk(panel["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {panel}"));
            assert!(!targets.is_empty(), "{panel}");
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("target without expr: {target}"));
                assert!(!expr.trim().is_empty(), "{panel}");
                out.push(expr.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().expect("the dashboard has panels"), &mut out);
    out
}

/// Sample names of a scrape (`name{labels} value` or `name value`).
async fn scraped_names(admin: &str) -> BTreeSet<String> {
    let text = http().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_exported_metrics() {
    let dir = workspace().join("deploy/observability");
    let alerts = alert_expressions(&std::fs::read_to_string(dir.join("alerts.yaml")).unwrap());
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .expect("grafana-dashboard.json parses");
    let queries = dashboard_queries(&dashboard);

    // Traffic that makes every family appear: reads (200, 404), a refusal (401), and a Bundle the upstream cuts off
    // after its head (an aborted response).
    let s = stack_with(&[], &[]).await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &s.a).await.status, 404);
    assert_eq!(s.send(http().get(s.url("/fhir/Patient/a-pat-1"))).await.status, 401);
    let fault = format!("http://{}/__admin/fault", s.fhir.ready["listening"].as_str().unwrap());
    assert_eq!(http().post(fault).body(r#"{"cut_bundles":1}"#).send().await.unwrap().status(), 200);
    let cut = http().get(s.url("/fhir/Observation?_count=50")).bearer_auth(&s.a).send().await.unwrap();
    assert!(cut.bytes().await.is_err(), "the Bundle is cut off");
    let dp_admin = s.dp.addr("admin");
    let mut exported = eventually("the abort counted", Duration::from_secs(10), || async {
        let names = scraped_names(&dp_admin).await;
        names.contains("fhirgw_dp_requests_aborted_total").then_some(names)
    })
    .await;
    exported.extend(scraped_names(&s.cp.addr("admin")).await);

    let mut missing = Vec::new();
    for (source, exprs) in [("alerts.yaml", &alerts), ("grafana-dashboard.json", &queries)] {
        for expr in exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{source}: `{expr}` selects no metric");
            missing.extend(
                names.into_iter().filter(|n| !exported.contains(n)).map(|n| format!("{source}: {n} in `{expr}`")),
            );
        }
    }
    assert!(missing.is_empty(), "not exported by the binaries:\n{}\nexported: {exported:?}", missing.join("\n"));
    assert!(alerts.len() >= 10 && queries.len() >= 20, "{} alerts, {} queries", alerts.len(), queries.len());
}
