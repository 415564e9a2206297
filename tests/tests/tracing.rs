//! OpenTelemetry end to end: a real OTLP receiver in the test, real processes exporting to it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure, grant};
use fhirgw_e2e::{World, admin, eventually, grpc_url, http};
use fhirgw_proto::admin::v1 as api;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    fn named(&self, name: &str) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().iter().filter(|(_, s)| s.name == name).cloned().collect()
    }
}

#[tokio::test]
async fn a_request_and_a_grant_change_are_traced_end_to_end() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream_like(listener))
            .await
            .unwrap();
    });

    let mut world = World::new();
    world.otlp_endpoint = Some(format!("http://{addr}"));
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;

    // The caller's trace is continued through the data plane and to the upstream.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let r = http()
        .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
        .bearer_auth(issuer.token("tenant-a", READ_SCOPES))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let want = hex(trace_id);
    let request_span = eventually("the request span exported", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let want = want.clone();
        async move { receiver.named("request").into_iter().map(|(_, s)| s).find(|s| s.trace_id == want) }
    })
    .await;
    assert_eq!(request_span.parent_span_id, hex(parent), "the request span must be a child of the caller's span");
    for child in ["authenticate", "policy", "upstream"] {
        let found = eventually(&format!("a `{child}` span in the trace"), Duration::from_secs(20), || {
            let receiver = receiver.clone();
            let want = want.clone();
            async move { receiver.named(child).into_iter().map(|(_, s)| s).find(|s| s.trace_id == want) }
        })
        .await;
        assert!(!found.parent_span_id.is_empty());
    }
    let log: serde_json::Value = http()
        .get(format!("http://{}/__admin/requests", fhir.ready["listening"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upstream_request =
        log.as_array().unwrap().iter().rev().find(|r| r["path"].as_str().unwrap().contains("a-pat-1")).unwrap();
    let sent = upstream_request["headers"]["traceparent"].as_str().expect("traceparent sent upstream");
    assert!(sent.contains(trace_id) && !sent.contains(parent), "{sent}: same trace, the gateway's own span as parent");

    // A filtered Bundle has a `filter` span saying how many entries were dropped (here: the cross-tenant one).
    let everything = http()
        .get(format!("http://{}/fhir/Patient/a-pat-1/$everything", dp.addr("fhir")))
        .bearer_auth(issuer.token("tenant-a", READ_SCOPES))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(everything.status(), 200);
    everything.bytes().await.unwrap();
    let filter = eventually("a filter span", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let want = want.clone();
        async move { receiver.named("filter").into_iter().map(|(_, s)| s).find(|s| s.trace_id == want) }
    })
    .await;
    let dropped = filter.attributes.iter().find(|a| a.key == "entries_dropped").and_then(|a| a.value.clone());
    assert!(format!("{dropped:?}").contains("IntValue(1)"), "{dropped:?}");

    // Errors carry the trace id.
    let r = http()
        .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-trace-id"], trace_id);
    assert!(r.text().await.unwrap().contains(trace_id));

    // A grant change: the admin call's trace, linked from the data plane's apply.
    admin
        .put_grant(api::PutGrantRequest { grant: Some(grant("tenant-a", "extra")), expected_version: String::new() })
        .await
        .unwrap();
    let put = eventually("the admin.put span", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        async move { receiver.named("admin.put").into_iter().map(|(_, s)| s).next_back() }
    })
    .await;
    eventually("a data plane apply linked to the admin call", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let put = put.clone();
        async move {
            receiver
                .named("config_apply")
                .into_iter()
                .find(|(_, s)| s.links.iter().any(|l| l.trace_id == put.trace_id))
                .map(|_| ())
        }
    })
    .await;

    // An operator's call with a `traceparent`: the control plane's server span continues it, the write and the
    // data plane's apply join the operator's trace.
    let operator_trace = "5c2f8b3e9a1d4f6e8b7a6c5d4e3f2a1b";
    let operator_span = "a1b2c3d4e5f60718";
    let mut request = tonic::Request::new(api::PutGrantRequest {
        grant: Some(grant("tenant-a", "traced")),
        expected_version: String::new(),
    });
    let traceparent = format!("00-{operator_trace}-{operator_span}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    admin.put_grant(request).await.unwrap();
    let want = hex(operator_trace);
    let server = eventually("the PutGrant server span in the operator's trace", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let want = want.clone();
        async move {
            receiver.named("fhirgw.admin.v1.Admin/PutGrant").into_iter().map(|(_, s)| s).find(|s| s.trace_id == want)
        }
    })
    .await;
    assert_eq!(server.parent_span_id, hex(operator_span), "the server span is a child of the operator's span");
    let put = eventually("admin.put in the operator's trace", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let want = want.clone();
        async move { receiver.named("admin.put").into_iter().map(|(_, s)| s).find(|s| s.trace_id == want) }
    })
    .await;
    assert_eq!(put.parent_span_id, server.span_id);
    eventually("a data plane apply linked to the operator's trace", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let want = want.clone();
        async move {
            receiver
                .named("config_apply")
                .into_iter()
                .find(|(_, s)| s.links.iter().any(|l| l.trace_id == want))
                .map(|_| ())
        }
    })
    .await;
}

/// An attribute's value as a plain JSON value (string, int, bool), if the span has it.
fn attribute(span: &Span, key: &str) -> Option<serde_json::Value> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone().into(),
        Value::IntValue(i) => (*i).into(),
        Value::BoolValue(b) => (*b).into(),
        other => format!("{other:?}").into(),
    })
}

/// Status code of a span: 0 unset, 1 ok, 2 error.
fn status_code(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

/// The spans a collector shows in Jaeger and Grafana: SERVER and CLIENT kinds, the HTTP semantic conventions'
/// attribute names, error status on a 5xx, no bridge diagnostics, config applies as trace roots linked to the admin
/// write, and no span whose parent is never exported.
#[tokio::test]
async fn spans_follow_the_http_conventions_and_none_is_orphaned() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream_like(listener))
            .await
            .unwrap();
    });
    let mut world = World::new();
    world.otlp_endpoint = Some(format!("http://{addr}"));
    let mut fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);

    // Three callers' traces: a read (200), a read outside the grants (404), and one the upstream cannot serve (502).
    let caller_span = "00f067aa0ba902b7";
    let get = |trace: &'static str, path: &'static str| {
        let (dp, token) = (dp.addr("fhir"), token.clone());
        async move {
            let r = http()
                .get(format!("http://{dp}/fhir/{path}"))
                .bearer_auth(token)
                .header("traceparent", format!("00-{trace}-{caller_span}-01"))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    let (ok, missing, failed) =
        ("11111111111111111111111111111111", "22222222222222222222222222222222", "33333333333333333333333333333333");
    assert_eq!(get(ok, "Patient/a-pat-1").await, 200);
    assert_eq!(get(missing, "Patient/b-pat-1").await, 404);
    fhir.kill().await;
    assert_eq!(get(failed, "Patient/a-pat-1").await, 502);

    // A grant change reaches the data plane as a trace of its own, linked to the admin write.
    admin
        .put_grant(api::PutGrantRequest { grant: Some(grant("tenant-a", "extra")), expected_version: String::new() })
        .await
        .unwrap();
    let put = eventually("the admin.put span", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        async move { receiver.named("admin.put").into_iter().map(|(_, s)| s).next_back() }
    })
    .await;
    let apply = eventually("an apply linked to the admin write", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        let put = put.clone();
        async move {
            let applies = receiver.named("config_apply").into_iter().map(|(_, s)| s);
            applies.into_iter().find(|s| s.links.iter().any(|l| l.trace_id == put.trace_id && l.span_id == put.span_id))
        }
    })
    .await;
    assert!(apply.parent_span_id.is_empty(), "config_apply is a trace root: {apply:?}");
    assert_ne!(apply.trace_id, put.trace_id, "its own trace, linked to the write's");

    let in_trace = |trace: &str, name: &str| {
        let (receiver, want, name) = (receiver.clone(), hex(trace), name.to_owned());
        async move {
            eventually(
                &format!("`{name}` in trace {}", String::from_utf8_lossy(&want)),
                Duration::from_secs(20),
                || {
                    let (receiver, want, name) = (receiver.clone(), want.clone(), name.clone());
                    async move { receiver.named(&name).into_iter().map(|(_, s)| s).find(|s| s.trace_id == want) }
                },
            )
            .await
        }
    };
    // The request: a SERVER span continuing the caller's, named by the conventions.
    let request = in_trace(ok, "request").await;
    assert_eq!(request.kind, SpanKind::Server as i32, "{request:?}");
    assert_eq!(request.parent_span_id, hex(caller_span));
    assert_eq!(attribute(&request, "http.request.method"), Some("GET".into()));
    assert_eq!(attribute(&request, "http.route"), Some("instance".into()));
    assert_eq!(attribute(&request, "http.response.status_code"), Some(200.into()));
    assert_eq!(attribute(&request, "error.type"), None);
    assert_eq!(status_code(&request), 0, "{request:?}");
    let policy = in_trace(ok, "policy").await;
    assert_eq!(attribute(&policy, "interaction"), Some("read".into()), "a name, not a Rust debug string");
    // The upstream call: a CLIENT span, a child in the same trace, naming the server but not the path.
    let upstream = in_trace(ok, "upstream").await;
    assert_eq!(upstream.kind, SpanKind::Client as i32, "{upstream:?}");
    assert_eq!(attribute(&upstream, "http.request.method"), Some("GET".into()));
    assert_eq!(attribute(&upstream, "server.address"), Some("127.0.0.1".into()));
    let port: i64 =
        fhir.ready["base_url"].as_str().unwrap().split(':').nth(2).unwrap().split('/').next().unwrap().parse().unwrap();
    assert_eq!(attribute(&upstream, "server.port"), Some(port.into()));
    assert_eq!(attribute(&upstream, "http.response.status_code"), Some(200.into()));
    assert_eq!(status_code(&upstream), 0);

    // A 404 is the client's doing: not an error on the server span.
    let request = in_trace(missing, "request").await;
    assert_eq!(attribute(&request, "http.response.status_code"), Some(404.into()));
    assert_eq!(status_code(&request), 0, "{request:?}");

    // A 502: the server span fails with the status as error.type; the upstream call fails with why.
    let request = in_trace(failed, "request").await;
    assert_eq!(attribute(&request, "http.response.status_code"), Some(502.into()));
    assert_eq!(attribute(&request, "error.type"), Some("502".into()));
    assert_eq!(status_code(&request), 2, "{request:?}");
    let upstream = in_trace(failed, "upstream").await;
    let why = attribute(&upstream, "error.type").unwrap_or_else(|| panic!("{upstream:?}"));
    assert!(why == "connect_error" || why == "request_error", "{why}");
    assert_eq!(status_code(&upstream), 2);

    // No bridge diagnostics on any span, and no span waits for a parent that is never exported (the callers' own
    // span is theirs to export).
    eventually("every exported span's parent exported too", Duration::from_secs(20), || {
        let receiver = receiver.clone();
        async move {
            let spans: Vec<Span> = receiver.spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect();
            let ids: std::collections::HashSet<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
            let orphans: Vec<&Span> = spans
                .iter()
                .filter(|s| !s.parent_span_id.is_empty() && s.parent_span_id != hex(caller_span))
                .filter(|s| !ids.contains(&s.parent_span_id))
                .collect();
            orphans.is_empty().then_some(()).or_else(|| {
                eprintln!("orphans so far: {:?}", orphans.iter().map(|s| &s.name).collect::<Vec<_>>());
                None
            })
        }
    })
    .await;
    let spans: Vec<(String, Span)> = receiver.spans.lock().unwrap().clone();
    assert!(spans.iter().all(|(_, s)| s.name != "config_session"), "sessions are log context, never exported");
    for (service, span) in &spans {
        for a in &span.attributes {
            let noise = a.key.starts_with("code.")
                || a.key.starts_with("thread.")
                || ["busy_ns", "idle_ns", "target"].contains(&a.key.as_str());
            assert!(!noise, "{service}: span {} carries {}", span.name, a.key);
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn tokio_stream_like(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// A data plane that does not trace (text logs, no OTLP endpoint: its request spans are not created) passes the
/// caller's well-formed W3C trace context on unchanged, so that an upstream that traces joins the caller's trace; a
/// malformed one does not reach the upstream.
#[tokio::test]
async fn without_traces_the_callers_trace_context_passes_through() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let log_url = format!("http://{}/__admin/requests", fhir.ready["listening"].as_str().unwrap());

    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let bad = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
    for (id, traceparent) in [("a-pat-1", good), ("a-pat-2", bad)] {
        let r = http()
            .get(format!("http://{}/fhir/Patient/{id}", dp.addr("fhir")))
            .bearer_auth(&token)
            .header("traceparent", traceparent)
            .header("tracestate", "congo=t61rcWkgMzE")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let log: serde_json::Value = http().get(&log_url).send().await.unwrap().json().await.unwrap();
        let seen = log.as_array().unwrap().iter().rev().find(|r| r["path"].as_str().unwrap().contains(id)).unwrap();
        let headers = &seen["headers"];
        if traceparent == good {
            assert_eq!(headers["traceparent"], good, "{headers}");
            assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE", "{headers}");
        } else {
            assert!(headers.get("traceparent").is_none() && headers.get("tracestate").is_none(), "{headers}");
        }
    }
}
