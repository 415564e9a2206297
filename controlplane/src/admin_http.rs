//! The control plane's admin HTTP port: liveness and Prometheus metrics. HTTP/1.1, over TLS when the control plane
//! has a certificate (the same one as the gRPC port, reloaded the same way; no client certificate is asked for),
//! separate from the gRPC port so scrapers and probes need neither gRPC nor the operator token.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use fhirgw_tls::explain::HandshakeLog;
use fhirgw_tls::reload::Reloading;
use fhirgw_tls::server::ServerTls;

use crate::metrics::Metrics;
use crate::transport::HANDSHAKE_TIMEOUT;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn handle(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let openmetrics = fhirgw_telemetry::metrics::wants_openmetrics(request.headers().get(ACCEPT));
            let (content_type, text) = metrics.encode(openmetrics);
            respond(StatusCode::OK, content_type, text)
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves until the process ends; each connection on its own task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, tls: Option<Arc<Reloading<ServerTls>>>) {
    let log = Arc::new(HandshakeLog::new("admin"));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, tls, log) = (metrics.clone(), tls.clone(), log.clone());
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(TokioIo::new(stream), peer, metrics).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.current().acceptor().accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), peer, metrics).await,
                Ok(Err(e)) => log.refused(peer, &e, "the client"),
                Err(_) => debug!(%peer, "admin TLS handshake not finished within 10 s; closed"),
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, peer: std::net::SocketAddr, metrics: Arc<Metrics>)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let response = handle(&metrics, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .serve_connection(io, service);
    if let Err(e) = connection.await {
        debug!(%peer, error = %e, "admin connection ended with an error");
    }
}
