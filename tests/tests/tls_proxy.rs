//! Issue 5 behind a real TLS-terminating reverse proxy: Debian's nginx with a certificate made for the test,
//! sending what a load balancer sends (`X-Forwarded-Proto/-Host/-Port`, or RFC 7239 `Forwarded`) to a data plane
//! that trusts 127.0.0.1. Every URL a client receives through the TLS endpoint must be `https://localhost:<port>`,
//! and following them through nginx must work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Stack, stack_with};
use fhirgw_e2e::{Process, eventually, smart_client};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::Command;

/// nginx: `FHIRGW_NGINX`, else `nginx` on PATH, else Debian's `/usr/sbin/nginx`.
fn nginx_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FHIRGW_NGINX") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file());
    let found = on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!("nginx is missing: `./dev tools` installs it (Debian: apt-get install -y nginx), or set FHIRGW_NGINX")
    })
}

/// A CA made for this test, and a certificate for `localhost` and 127.0.0.1 signed by it, as PEM files in `dir`.
/// Returns the CA certificate (DER) to trust.
fn certificates(dir: &Path) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "fhirgw e2e test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem() + &ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    ca_cert.der().to_vec()
}

/// A loopback port nothing listens on right now (nginx cannot report the one it bound).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nginx in the foreground with a generated configuration: one TLS server sending `X-Forwarded-*`, one sending
/// `Forwarded`, both proxying to `upstream` (the data plane).
struct Nginx {
    _process: Process,
    xfwd_port: u16,
    forwarded_port: u16,
    /// The test CA (DER), the only root the clients trust.
    ca: Vec<u8>,
}

async fn nginx(world: &fhirgw_e2e::World, upstream: &str) -> Nginx {
    let prefix = world.path("nginx");
    for sub in ["", "client_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"] {
        std::fs::create_dir_all(prefix.join(sub)).unwrap();
    }
    let ca = certificates(&prefix);
    let (xfwd_port, forwarded_port) = (free_port(), free_port());
    let p = prefix.display();
    let common = format!(
        "ssl_certificate {p}/server.pem; ssl_certificate_key {p}/server.key; ssl_protocols TLSv1.2 TLSv1.3;
         proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off;"
    );
    let conf = format!(
        r#"
# One process: killing it (the harness does on drop, panics included) leaves no orphaned workers behind.
master_process off;
pid {p}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    log_format ports '$server_port $request_method $request_uri $status';
    access_log {p}/access.log ports;
    client_body_temp_path {p}/client_temp; proxy_temp_path {p}/proxy_temp; fastcgi_temp_path {p}/fastcgi_temp;
    uwsgi_temp_path {p}/uwsgi_temp; scgi_temp_path {p}/scgi_temp;
    # What a TLS-terminating load balancer sends.
    server {{
        listen 127.0.0.1:{xfwd_port} ssl;
        server_name localhost;
        {common}
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
    # The same with RFC 7239 Forwarded only (the client's own Forwarded is replaced, not appended to).
    server {{
        listen 127.0.0.1:{forwarded_port} ssl;
        server_name localhost;
        {common}
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\"$http_host\"";
        }}
    }}
}}
"#
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let nginx = nginx_binary();
    // nginx prints nothing on stdout when it starts: a wrapper reports the ports once it runs (checked below).
    let script = format!(
        "{} -t -q -c {} -p {p} && echo '{{\"xfwd\":\"{xfwd_port}\",\"forwarded\":\"{forwarded_port}\"}}' && exec {} -c {} -p {p} -g 'daemon off;'",
        nginx.display(),
        conf_path.display(),
        nginx.display(),
        conf_path.display(),
    );
    let mut command = Command::new("bash");
    command.arg("-c").arg(script);
    let process = Process::spawn("nginx", command, world.dir.path()).await;
    Nginx { _process: process, xfwd_port, forwarded_port, ca }
}

/// An HTTPS client that trusts only the test CA.
struct Https {
    client: Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Full<Bytes>>,
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Https {
    fn new(ca_der: Vec<u8>) -> Https {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(ca_der)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        Https { client: Client::builder(TokioExecutor::new()).build(connector) }
    }

    async fn send(&self, method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
        let mut request = http::Request::builder().method(method).uri(url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(v) => {
                request = request.header("content-type", "application/fhir+json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let response =
            tokio::time::timeout(Duration::from_secs(30), self.client.request(request.body(Full::new(bytes)).unwrap()))
                .await
                .unwrap_or_else(|_| panic!("{method} {url}: timed out"))
                .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body }
    }

    async fn get(&self, url: &str, token: Option<&str>) -> Reply {
        self.send("GET", url, token, None).await
    }
}

/// Every `Bundle.link.url` and `entry.fullUrl`.
fn urls(bundle: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        bundle["link"].as_array().into_iter().flatten().map(|l| l["url"].as_str().unwrap().to_owned()).collect();
    out.extend(bundle["entry"].as_array().into_iter().flatten().map(|e| e["fullUrl"].as_str().unwrap().to_owned()));
    out
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == relation).map(|l| l["url"].as_str().unwrap().to_owned())
}

/// Everything a client sees through `https://localhost:{port}` names that origin.
async fn check_through(s: &Stack, https: &Https, port: u16) {
    let public = format!("https://localhost:{port}/fhir");
    let upstream = s.fhir.ready["base_url"].as_str().unwrap().to_owned();
    let data_plane = s.dp.addr("fhir");

    // SMART discovery through TLS, without a token: the endpoints are the identity provider's own (the gateway
    // neither hosts nor rewrites them).
    let smart = https.get(&format!("{public}/.well-known/smart-configuration"), None).await;
    assert_eq!(smart.status, 200, "{}", smart.text());
    let smart = smart.json();
    assert_eq!(smart["issuer"], json!(s.issuer.url));
    assert_eq!(smart["token_endpoint"], json!(format!("{}/token", s.issuer.url)));
    assert_eq!(smart["jwks_uri"], json!(format!("{}/jwks", s.issuer.url)));

    // The CapabilityStatement names the public base and the SMART endpoints.
    let cs = https.get(&format!("{public}/metadata"), None).await;
    assert_eq!(cs.status, 200, "{}", cs.text());
    let cs_text = cs.text();
    let cs = cs.json();
    assert_eq!(cs["implementation"]["url"], json!(public));
    let oauth = &cs["rest"][0]["security"]["extension"][0];
    assert_eq!(oauth["url"], "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris");
    let token_uri = oauth["extension"].as_array().unwrap().iter().find(|e| e["url"] == "token").unwrap();
    assert_eq!(token_uri["valueUri"], smart["token_endpoint"]);
    assert!(!cs_text.contains(&upstream) && !cs_text.contains(&data_plane), "an internal address leaked: {cs_text}");

    // A search: every link and fullUrl on the public origin; then every next page through nginx.
    let mut url = format!("{public}/Observation?_count=2");
    let mut seen = Vec::new();
    let mut pages = 0;
    while pages < 10 {
        let page = https.get(&url, Some(&s.a)).await;
        assert_eq!(page.status, 200, "{url}: {}", page.text());
        let text = page.text();
        assert!(!text.contains(&upstream) && !text.contains(&data_plane), "an internal address leaked: {text}");
        let bundle = page.json();
        let all = urls(&bundle);
        assert!(all.iter().any(|u| u.contains("/Observation/")), "{bundle}");
        for u in &all {
            assert!(u.starts_with(&format!("{public}/Observation")), "{u} is not on {public}");
        }
        for entry in bundle["entry"].as_array().unwrap() {
            seen.push(entry["resource"]["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        match link(&bundle, "next") {
            Some(next) => url = next,
            None => break,
        }
    }
    assert!(pages >= 2, "the search should have had more than one page");
    let mut direct: Vec<String> = s.get("/fhir/Observation?_count=100", &s.a).await.ids();
    direct.iter_mut().for_each(|id| *id = id.trim_start_matches("Observation/").to_owned());
    seen.sort();
    direct.sort();
    assert_eq!(seen, direct, "paging through nginx must return exactly the tenant's Observations, once each");

    // A read's absolute references to the upstream come back on the public origin.
    let obs = https.get(&format!("{public}/Observation/a-obs-abs"), Some(&s.a)).await;
    assert_eq!(obs.status, 200, "{}", obs.text());
    assert_eq!(obs.json()["subject"]["reference"], json!(format!("{public}/Patient/a-pat-1")));

    // The Location of a create.
    let writer = s.issuer.token("tenant-a", "user/*.cruds");
    let created = https
        .send("POST", &format!("{public}/Patient"), Some(&writer), Some(&json!({"resourceType": "Patient"})))
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let location = created.headers["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("{public}/Patient/")), "{location}");
    // …and it leads to the new resource through nginx.
    let new = https.get(&location, Some(&s.a)).await;
    assert_eq!(new.status, 200, "{location}: {}", new.text());
    assert_eq!(new.json()["resourceType"], "Patient");
}

#[tokio::test]
async fn behind_nginx_terminating_tls_every_url_is_https_public() {
    let s = stack_with(&[], &["--trusted-proxies", "127.0.0.1/32"]).await;
    let upstream = s.fhir.ready["base_url"].as_str().unwrap().to_owned();
    let tag = json!([{"system": fhirgw_e2e::fixtures::DATASET, "code": "tenant-a"}]);
    s.put_upstream(&json!({
        "resourceType": "Observation", "id": "a-obs-abs", "status": "final", "meta": {"tag": tag},
        "code": {"text": "absolute reference"}, "subject": {"reference": format!("{upstream}/Patient/a-pat-1")}
    }))
    .await;
    let nginx = nginx(&s.world, &s.dp.addr("fhir")).await;
    let https = Https::new(nginx.ca.clone());

    // nginx is up once its TLS endpoint answers.
    for port in [nginx.xfwd_port, nginx.forwarded_port] {
        let uri: http::Uri = format!("https://localhost:{port}/fhir/metadata").parse().unwrap();
        let client = &https.client;
        eventually(&format!("nginx answering on {port}"), Duration::from_secs(20), || {
            let uri = uri.clone();
            async move {
                let answered = tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await;
                answered.ok().and_then(Result::ok).map(|_| ())
            }
        })
        .await;
    }

    check_through(&s, &https, nginx.xfwd_port).await;
    check_through(&s, &https, nginx.forwarded_port).await;
    // Both variants were really proxied by nginx, next pages included.
    let access = std::fs::read_to_string(s.world.path("nginx/access.log")).unwrap();
    for port in [nginx.xfwd_port, nginx.forwarded_port] {
        let paged = access.lines().filter(|l| l.starts_with(&format!("{port} GET /fhir/Observation?_page=")));
        assert!(paged.filter(|l| l.ends_with(" 200")).count() >= 2, "port {port}:\n{access}");
    }

    // The third-party SMART client through the TLS endpoint too, trusting only the test CA.
    let public = format!("https://localhost:{}/fhir", nginx.xfwd_port);
    let ca = s.world.path("nginx/ca.pem").display().to_string();
    let run = smart_client(&public, &s.a, "a-pat-1", "Observation", 2, &[("REQUESTS_CA_BUNDLE", &ca)]).await;
    assert!(run.success, "the SMART client failed through nginx:\n{}", run.stderr);
    let out = &run.output;
    assert_eq!(out["discovered"]["implementation_url"], json!(public));
    assert_eq!(out["patient"]["id"], "a-pat-1");
    let pages = out["pages"].as_array().unwrap();
    assert!(pages.len() >= 2, "{out}");
    let mut ids: Vec<String> = pages
        .iter()
        .flat_map(|p| p["ids"].as_array().unwrap().iter().map(|id| format!("Observation/{}", id.as_str().unwrap())))
        .collect();
    let mut direct = s.get("/fhir/Observation?_count=100", &s.a).await.ids();
    ids.sort();
    direct.sort();
    assert_eq!(ids, direct);
    for page in pages {
        for url in page["links"].as_object().unwrap().values().chain(page["full_urls"].as_array().unwrap()) {
            assert!(url.as_str().unwrap().starts_with(&public), "{url} is not on {public}");
        }
        for reference in page["references"].as_array().unwrap() {
            let r = reference.as_str().unwrap();
            assert!(!r.starts_with("http") || r.starts_with(&public), "{r} is absolute but not on {public}");
        }
    }
}
