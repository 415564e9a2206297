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

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn tokio_stream_like(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
