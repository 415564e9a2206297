//! Metrics and logs, end to end: both planes' `/metrics` scraped over HTTP after known traffic, and JSON log lines
//! that carry the caller's trace id.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::stack_with;
use fhirgw_e2e::fixtures::{self, grant};
use fhirgw_e2e::{Process, eventually, http};
use fhirgw_proto::admin::v1 as api;

/// One sample of the Prometheus text format: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format (0.0.4): comments skipped, label values unescaped.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("bad value in {line}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                (name.to_owned(), parse_labels(body))
            }
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad metric name in {line}");
        out.push(Sample { name, labels, value });
    }
    out
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('='), "{body}");
        assert_eq!(chars.next(), Some('"'), "{body}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape: {body}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated value: {body}"),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        chars.next_if_eq(&',');
    }
    labels
}

#[test]
fn the_parser_reads_what_prometheus_reads() {
    let text = "# HELP a_total help\n# TYPE a_total counter\na_total{route=\"x\",method=\"GET\"} 3\nb 1.5\n\
                c_bucket{le=\"+Inf\"} 2\nd{v=\"q\\\"uote\\\\\"} 0\n";
    let samples = parse(text);
    assert_eq!(samples.len(), 4);
    assert_eq!(samples[0].labels["route"], "x");
    assert_eq!(samples[0].labels["method"], "GET");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!((samples[1].name.as_str(), samples[1].value), ("b", 1.5));
    assert_eq!(samples[2].labels["le"], "+Inf");
    assert_eq!(samples[3].labels["v"], "q\"uote\\");
}

struct Scrape(Vec<Sample>);

impl Scrape {
    async fn of(admin_addr: &str) -> Scrape {
        let response = http().get(format!("http://{admin_addr}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        Scrape(parse(&response.text().await.unwrap()))
    }

    /// The samples of `name` whose labels include all of `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect()
    }

    /// The one sample of `name` with exactly these labels; 0 when absent (a counter never incremented).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> =
            self.matching(name, labels).into_iter().filter(|s| s.labels.len() == labels.len()).collect();
        assert!(found.len() <= 1, "several samples of {name}{labels:?}: {found:?}");
        found.first().map_or(0.0, |s| s.value)
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }
}

const REQUESTS: &str = "fhirgw_dp_requests_total";

fn request(route: &str, method: &str, class: &str) -> [(&'static str, String); 3] {
    [("route", route.to_owned()), ("method", method.to_owned()), ("status_class", class.to_owned())]
}

fn labels<'a>(pairs: &'a [(&'static str, String); 3]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn both_planes_count_what_happened() {
    let stack = stack_with(&[], &[]).await;
    let dp_admin = stack.dp.addr("admin");
    let cp_admin = stack.cp.addr("admin");

    // Known traffic: two allowed reads, a read outside the grants (404 through the `instance` route), a read without
    // the scope (403, same route), an unknown path (404, no route), no token (401 before routing) and a made-up
    // method (a label of its own would be unbounded).
    let observations_only = stack.issuer.token("tenant-a", "user/Observation.read");
    let cases = [
        ("/fhir/Patient/a-pat-1", Some(&stack.a), "GET", 200),
        ("/fhir/Patient/a-pat-1", Some(&stack.a), "GET", 200),
        ("/fhir/Patient/b-pat-1", Some(&stack.a), "GET", 404),
        ("/fhir/Patient/a-pat-1", Some(&observations_only), "GET", 403),
        ("/fhir/Patient/a-pat-1/x/y/z", Some(&stack.a), "GET", 404),
        ("/fhir/Patient/a-pat-1", None, "GET", 401),
        ("/fhir/Patient/a-pat-1", Some(&stack.a), "BREW", 405),
    ];
    for (path, token, method, want) in cases {
        let mut builder = http().request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), stack.url(path));
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        let reply = stack.send(builder).await;
        assert_eq!(reply.status, want, "{method} {path}: {}", reply.text());
    }

    // Every response has been sent in full, so nothing is in flight and every duration is recorded.
    let dp = eventually("the data plane's request metrics settled", Duration::from_secs(10), || async {
        let s = Scrape::of(&dp_admin).await;
        let done = s.value("fhirgw_dp_requests_in_flight", &[]) == 0.0
            && s.sum("fhirgw_dp_request_duration_seconds_count", &[]) == cases.len() as f64;
        done.then_some(s)
    })
    .await;
    // Latency per route: the four answered on `instance`, the three that matched no route under `_none`.
    let durations = |route| dp.value("fhirgw_dp_request_duration_seconds_count", &[("route", route)]);
    assert_eq!((durations("instance"), durations("_none")), (4.0, 3.0));
    let le = [("route", "instance"), ("le", "+Inf")];
    assert_eq!(dp.value("fhirgw_dp_request_duration_seconds_bucket", &le), 4.0);
    for (route, method, class, want) in [
        ("instance", "GET", "2xx", 2.0),
        ("instance", "GET", "4xx", 2.0),
        ("_none", "GET", "4xx", 2.0),
        ("_none", "OTHER", "4xx", 1.0),
    ] {
        let pairs = request(route, method, class);
        assert_eq!(dp.value(REQUESTS, &labels(&pairs)), want, "{REQUESTS}{pairs:?}");
    }
    assert_eq!(dp.sum(REQUESTS, &[]), cases.len() as f64, "every request counted once");
    assert!(dp.matching(REQUESTS, &[("method", "BREW")]).is_empty(), "a client's method is not a label");
    assert!(dp.value("fhirgw_dp_response_bytes_total", &[("route", "instance")]) > 0.0);

    // Upstream: the reads and the out-of-grant read reached it (the 403, 404 and 401 did not).
    assert_eq!(dp.value("fhirgw_dp_upstream_requests_total", &[("upstream", "fhir"), ("status_class", "2xx")]), 3.0);
    assert_eq!(dp.value("fhirgw_dp_upstream_duration_seconds_count", &[("upstream", "fhir")]), 3.0);
    let inf = dp.value("fhirgw_dp_upstream_duration_seconds_bucket", &[("upstream", "fhir"), ("le", "+Inf")]);
    assert_eq!(inf, 3.0);

    // Caches: the JWKS is fetched once, then served from the cache; the upstream token file is read once.
    let cache =
        |cache: &str, result: &str| dp.value("fhirgw_dp_cache_lookups_total", &[("cache", cache), ("result", result)]);
    assert_eq!(cache("jwks", "miss"), 1.0);
    assert!(cache("jwks", "hit") >= 1.0, "{}", cache("jwks", "hit"));
    assert_eq!(cache("credential_file", "miss"), 1.0);
    assert_eq!(cache("credential_file", "hit"), 2.0);

    // Configuration: the version the control plane reports, ACKed, confirmed just now.
    let status = fixtures::status(&mut stack.admin.clone()).await;
    assert_eq!(dp.value("fhirgw_dp_config_loaded", &[]), 1.0);
    assert_eq!(dp.value("fhirgw_dp_config_revision", &[]), status.revision as f64);
    let info = dp.matching("fhirgw_dp_config_info", &[]);
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].labels["version"], status.config_version);
    assert_eq!(info[0].labels["source"], "control_plane");
    assert!(dp.value("fhirgw_dp_config_acks_total", &[]) >= 1.0);
    assert_eq!(dp.value("fhirgw_dp_config_nacks_total", &[]), 0.0);
    let age = dp.value("fhirgw_dp_config_seconds_since_confirmed", &[]);
    assert!((0.0..60.0).contains(&age), "{age}");

    // The control plane: one data plane, in sync; every successful write counted, a refused one by its code.
    let refused = api::PutGrantRequest { grant: Some(grant("no-such-tenant", "x")), expected_version: String::new() };
    let code = stack.admin.clone().put_grant(refused).await.unwrap_err().code();
    assert_eq!(code, tonic::Code::InvalidArgument);
    let cp = Scrape::of(&cp_admin).await;
    assert_eq!(cp.value("fhirgw_cp_data_planes_connected", &[]), 1.0);
    assert_eq!(cp.value("fhirgw_cp_data_planes_out_of_sync", &[]), 0.0);
    assert_eq!(cp.value("fhirgw_cp_data_plane_max_lag_revisions", &[]), 0.0);
    assert_eq!(cp.value("fhirgw_cp_store_revision", &[]), status.revision as f64);
    assert_eq!(cp.sum("fhirgw_cp_admin_writes_total", &[("result", "ok")]), status.revision as f64);
    assert_eq!(cp.value("fhirgw_cp_admin_writes_total", &[("kind", "tenant"), ("op", "put"), ("result", "ok")]), 2.0);
    let invalid = [("kind", "grant"), ("op", "put"), ("result", "invalid_argument")];
    assert_eq!(cp.value("fhirgw_cp_admin_writes_total", &invalid), 1.0);
    let (acks, pushes) = (cp.value("fhirgw_cp_config_acks_total", &[]), cp.value("fhirgw_cp_config_pushes_total", &[]));
    assert!(acks >= 1.0 && pushes >= acks, "acks {acks}, pushes {pushes}");
    assert_eq!(cp.value("fhirgw_cp_config_nacks_total", &[]), 0.0);

    // Both planes: which build runs, and the process's own numbers (read from /proc at the scrape).
    for (plane, scrape) in [("data plane", &dp), ("control plane", &cp)] {
        let build = scrape.matching("fhirgw_build_info", &[]);
        assert_eq!(build.len(), 1, "{plane}: {build:?}");
        assert_eq!(build[0].labels["version"], fhirgw_telemetry::process::VERSION, "{plane}");
        assert_eq!(build[0].labels["commit"], fhirgw_telemetry::process::COMMIT, "{plane}");
        assert_eq!(build[0].value, 1.0);
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(scrape.value(name, &[]) > 0.0, "{plane}: {name}");
        }
        assert!(scrape.value("process_cpu_seconds_total", &[]) >= 0.0, "{plane}");
        assert!(scrape.value("process_open_fds", &[]) <= scrape.value("process_max_fds", &[]), "{plane}");
    }

    // Both admin ports answer liveness; OpenMetrics for scrapers that ask for it.
    for addr in [&dp_admin, &cp_admin] {
        let r = http().get(format!("http://{addr}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = http()
            .get(format!("http://{addr}/metrics"))
            .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
            .send()
            .await
            .unwrap();
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        assert!(r.text().await.unwrap().ends_with("# EOF\n"));
    }
}

/// JSON lines of `process`'s log.
fn json_lines(process: &Process) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&process.log).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[tokio::test]
async fn json_logs_carry_the_callers_trace_id() {
    let json = ["--log-format", "json"];
    let stack = stack_with(&json, &json).await;

    // A refused request is logged inside its span: the line names the caller's trace.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let reply = stack
        .send(http().get(stack.url("/fhir/Patient/b-pat-1")).bearer_auth(&stack.a).header("traceparent", &traceparent))
        .await;
    assert_eq!(reply.status, 404);
    let line = eventually("the refusal logged with the caller's trace id", Duration::from_secs(10), || async {
        json_lines(&stack.dp)
            .into_iter()
            .find(|l| l["trace_id"] == trace_id && l["fields"]["message"] == "request refused")
    })
    .await;
    assert_eq!(line["span"]["name"], "request", "{line}");
    assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
    assert_ne!(line["span_id"], "b7ad6b7169203331", "the gateway's span, a child of the caller's: {line}");

    // Without a traceparent the request still has ids of its own, which the error response names.
    let reply = stack.send(http().get(stack.url("/fhir/Patient/b-pat-1")).bearer_auth(&stack.a)).await;
    assert_eq!(reply.status, 404);
    let own = reply.headers["x-trace-id"].to_str().unwrap().to_owned();
    assert!(own.len() == 32 && own != trace_id, "{own}");
    eventually("a log line with the request's own trace id", Duration::from_secs(10), || async {
        json_lines(&stack.dp).into_iter().find(|l| l["trace_id"] == own.as_str())
    })
    .await;

    // An operator's call with a traceparent: the control plane logs the write inside the caller's trace.
    let admin_trace = "5c2f8b3e9a1d4f6e8b7a6c5d4e3f2a1b";
    let mut request = tonic::Request::new(api::PutGrantRequest {
        grant: Some(grant("tenant-a", "traced")),
        expected_version: String::new(),
    });
    request.metadata_mut().insert("traceparent", format!("00-{admin_trace}-a1b2c3d4e5f60718-01").parse().unwrap());
    stack.admin.clone().put_grant(request).await.unwrap();
    let stored =
        eventually("the control plane's `stored` line in the operator's trace", Duration::from_secs(10), || async {
            json_lines(&stack.cp)
                .into_iter()
                .find(|l| l["trace_id"] == admin_trace && l["fields"]["message"] == "stored")
        })
        .await;
    assert_eq!(stored["fields"]["kind"], "grant", "{stored}");
}
