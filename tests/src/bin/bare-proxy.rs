//! A reverse proxy with no logic at all, for `bench/proxy.sh`: the floor of the HTTP stack the data plane is built
//! on (hyper's server, hyper-util's pooled client, tokio), measured in the same run as nginx and the data plane.
//! Every request goes to the upstream origin unchanged except for hop-by-hop headers and `Authorization`, which is
//! replaced by the upstream token (as the data plane's credential injection does). Nothing is checked.
//!
//! `bare-proxy LISTEN UPSTREAM_ORIGIN TOKEN_FILE [multi|per-core]`: `multi` (default) is tokio's work-stealing
//! runtime with two workers, like the data plane; `per-core` runs one single-threaded runtime per core, each with its
//! own `SO_REUSEPORT` listener and upstream pool. Prints the bound address on stdout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

struct Target {
    origin: String,
    token: HeaderValue,
}

fn client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

async fn forward(
    target: Arc<Target>,
    client: Client<HttpConnector, Body>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let Ok(uri) = Uri::try_from(format!("{}{pq}", target.origin)) else {
        return Ok(status(http::StatusCode::BAD_REQUEST));
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    for name in [header::CONNECTION, header::TE, header::UPGRADE, header::TRANSFER_ENCODING, header::HOST] {
        parts.headers.remove(name);
    }
    parts.headers.insert(header::AUTHORIZATION, target.token.clone());
    let outbound = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
    match client.request(outbound).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers.remove(header::CONNECTION);
            parts.headers.remove(header::TRANSFER_ENCODING);
            Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
        }
        Err(_) => Ok(status(http::StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: http::StatusCode) -> Response<Body> {
    let mut response = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = code;
    response
}

async fn accept_loop(listener: tokio::net::TcpListener, target: Arc<Target>) {
    let client = client();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (target, client) = (target.clone(), client.clone());
        let service = service_fn(move |request| forward(target.clone(), client.clone(), request));
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, origin, token_file, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: bare-proxy LISTEN UPSTREAM_ORIGIN TOKEN_FILE [multi|per-core]");
    };
    let token = std::fs::read_to_string(token_file)?;
    let target =
        Arc::new(Target { origin: origin.clone(), token: HeaderValue::try_from(format!("Bearer {}", token.trim()))? });
    let listen: SocketAddr = listen.parse()?;
    match rest.first().map(String::as_str).unwrap_or("multi") {
        "multi" => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                println!("{}", listener.local_addr()?);
                accept_loop(listener, target).await;
                anyhow::Ok(())
            })
        }
        "per-core" => {
            // The first listener picks the port; the others join it.
            let first = std::net::TcpListener::bind(listen)?;
            let addr = first.local_addr()?;
            drop(first);
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let target = target.clone();
                    std::thread::spawn(move || -> anyhow::Result<()> {
                        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                        runtime.block_on(async {
                            accept_loop(reuseport_listener(addr)?, target).await;
                            anyhow::Ok(())
                        })
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            println!("{addr}");
            for thread in threads {
                let _ = thread.join();
            }
            Ok(())
        }
        other => anyhow::bail!("unknown mode `{other}`"),
    }
}
