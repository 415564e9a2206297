//! Harness for end-to-end tests: starts the real binaries and the real FHIR server on port 0, learns their ports
//! from the one JSON line each prints on stdout, and keeps their logs (printed when a test fails).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fhirgw_proto::admin::v1::admin_client::AdminClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub mod config_stream;
pub mod fixtures;
pub mod issuer;
pub mod oidc;
pub mod outage;
pub mod pki;
pub mod postgres;

pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0123456789";
pub const DATAPLANE_TOKEN: &str = "dataplane-token-for-tests-0123456789";
pub const UPSTREAM_TOKEN: &str = "upstream-service-token-0123456789";

/// Root of the workspace.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A binary built by `cargo build --bins` in the same profile as this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Test executables live in `target/<profile>/deps`, binaries in `target/<profile>`.
    let mut profile_dir = exe.parent().unwrap();
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().unwrap();
    }
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// grpcurl: `FHIRGW_GRPCURL`, else `.tools/venv/bin/grpcurl`, else `grpcurl` on PATH.
pub fn grpcurl_path() -> PathBuf {
    if let Ok(p) = std::env::var("FHIRGW_GRPCURL") {
        return p.into();
    }
    let local = workspace().join(".tools/venv/bin/grpcurl");
    if local.exists() { local } else { "grpcurl".into() }
}

/// A child process killed when dropped; its stderr is kept in a file and shown if the test is failing.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub ready: serde_json::Value,
}

impl Process {
    pub async fn spawn(name: &str, mut command: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        command.stdout(Stdio::piped()).stderr(log_file).stdin(Stdio::null()).kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let logs = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{name} did not report its address ({other:?}); log:\n{logs}");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name} printed {line:?}: {e}"));
        Process { name: name.to_owned(), child: Some(child), log, ready }
    }

    pub fn addr(&self, key: &str) -> String {
        self.ready[key]
            .as_str()
            .unwrap_or_else(|| panic!("{} reported no `{key}`: {}", self.name, self.ready))
            .to_owned()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL and wait.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends SIGTERM without waiting.
    pub async fn signal_term(&self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
    }

    /// Waits for the process to exit (up to 30 s).
    pub async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await.ok()?.ok()
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id()?;
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await.ok()?.ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("----- last lines of {} ({}) -----", self.name, self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

pub type Admin =
    AdminClient<InterceptedService<Channel, fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>>>;

fn operator_auth(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert("authorization", format!("Bearer {OPERATOR_TOKEN}").parse().unwrap());
    Ok(req)
}

/// The test world: a temporary directory with tokens, and helpers to start each process.
pub struct World {
    pub dir: tempfile::TempDir,
    /// When set, every binary started afterwards exports traces here (OTLP/gRPC).
    pub otlp_endpoint: Option<String>,
    /// Prefix of this world's PostgreSQL databases (one database per store name), and those created so far.
    pg_prefix: String,
    pg_databases: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The control plane's store backend for the suites: `FHIRGW_TEST_STORE=postgres` runs them on the shared
/// PostgreSQL (`postgres::Postgres::shared()`, one database per world and store name); anything else on SQLite.
pub fn test_store_is_postgres() -> bool {
    std::env::var("FHIRGW_TEST_STORE").is_ok_and(|v| v == "postgres")
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("fhirgw-e2e-").tempdir().unwrap();
        for (file, token) in [
            ("operator.token", OPERATOR_TOKEN),
            ("dataplane.token", DATAPLANE_TOKEN),
            ("upstream.token", UPSTREAM_TOKEN),
        ] {
            std::fs::write(dir.path().join(file), format!("{token}\n")).unwrap();
        }
        let pg_prefix = format!("w{:08x}", rand::random::<u32>());
        World { dir, otlp_endpoint: None, pg_prefix, pg_databases: Default::default() }
    }

    fn otel_env(&self, command: &mut Command, service: &str) {
        if let Some(endpoint) = &self.otlp_endpoint {
            command
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                .env("OTEL_SERVICE_NAME", service)
                .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The real FHIR server with both tenants' seed data; it requires the upstream token.
    pub async fn fhir_server(&self) -> Process {
        self.fhir_server_args(&[]).await
    }

    pub async fn fhir_server_args(&self, extra: &[&str]) -> Process {
        let root = workspace().join("tests/fhir-server");
        let mut command = Command::new(root.join("run.sh"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--seed")
            .arg(root.join("seed"))
            .arg("--require-token")
            .arg(self.path("upstream.token"))
            .args(extra);
        Process::spawn("fhir-server", command, self.dir.path()).await
    }

    /// The real OpenID provider (`tests/oidc-provider`, run on port 0), configured with `setup`.
    pub async fn oidc_provider(&self, setup: oidc::Setup) -> oidc::OidcProvider {
        oidc::OidcProvider::start(self, setup).await
    }

    pub async fn control_plane(&self, name: &str, store: &str) -> Process {
        self.control_plane_at(name, store, "127.0.0.1:0").await
    }

    pub async fn control_plane_at(&self, name: &str, store: &str, listen: &str) -> Process {
        self.control_plane_args(name, store, listen, &[]).await
    }

    /// The `--store` flags for the store named `store`: a SQLite file in the world's directory, or (with
    /// `FHIRGW_TEST_STORE=postgres`) this world's database of that name on the shared PostgreSQL.
    pub fn store_args(&self, store: &str) -> Vec<String> {
        if test_store_is_postgres() {
            let db: String = format!("{}_{store}", self.pg_prefix)
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
                .collect();
            self.pg_store_args(postgres::Postgres::shared(), &db)
        } else {
            vec!["--store".into(), self.path(store).display().to_string()]
        }
    }

    /// The `--store` flags for database `db` on `pg` (created on first use), with the password from its file.
    pub fn pg_store_args(&self, pg: &postgres::Postgres, db: &str) -> Vec<String> {
        let key = format!("{}:{db}", pg.port);
        if self.pg_databases.lock().unwrap().insert(key) {
            pg.create_database(db);
        }
        vec!["--store".into(), pg.url(db), "--store-password-file".into(), pg.password_file().display().to_string()]
    }

    /// A control plane on the store given by `store_args` (see `store_args`, `pg_store_args`).
    pub async fn control_plane_on(&self, name: &str, store_args: &[String], listen: &str, extra: &[&str]) -> Process {
        let mut command = Command::new(binary("fhirgw-controlplane"));
        command
            .arg("--listen")
            .arg(listen)
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(store_args)
            .arg("--replica-id")
            .arg(name)
            .arg("--operator-token-file")
            .arg(self.path("operator.token"))
            .arg("--dataplane-token-file")
            .arg(self.path("dataplane.token"))
            .args(extra)
            .env("RUST_LOG", "info,fhirgw_controlplane=debug");
        self.otel_env(&mut command, "fhirgw-controlplane");
        Process::spawn(name, command, self.dir.path()).await
    }

    pub async fn control_plane_args(&self, name: &str, store: &str, listen: &str, extra: &[&str]) -> Process {
        let mut command = Command::new(binary("fhirgw-controlplane"));
        command
            .arg("--listen")
            .arg(listen)
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(self.store_args(store))
            .arg("--operator-token-file")
            .arg(self.path("operator.token"))
            .arg("--dataplane-token-file")
            .arg(self.path("dataplane.token"))
            .args(extra)
            .env("RUST_LOG", "info,fhirgw_controlplane=debug");
        self.otel_env(&mut command, "fhirgw-controlplane");
        Process::spawn(name, command, self.dir.path()).await
    }

    /// A data plane following `control_plane` (a gRPC URL), keeping its snapshot in `state_dir`.
    pub async fn data_plane(&self, name: &str, control_plane: &str, state_dir: &str) -> Process {
        self.data_plane_with(name, control_plane, state_dir, &self.path("dataplane.token")).await
    }

    pub async fn data_plane_with(
        &self,
        name: &str,
        control_plane: &str,
        state_dir: &str,
        token_file: &Path,
    ) -> Process {
        self.data_plane_args(name, control_plane, state_dir, token_file, &[]).await
    }

    pub async fn data_plane_args(
        &self,
        name: &str,
        control_plane: &str,
        state_dir: &str,
        token_file: &Path,
        extra: &[&str],
    ) -> Process {
        self.data_plane_wrapped(name, control_plane, state_dir, token_file, &[], extra).await
    }

    /// A data plane started through `wrapper` (e.g. `["prlimit", "--nofile=256", "--"]`).
    pub async fn data_plane_wrapped(
        &self,
        name: &str,
        control_plane: &str,
        state_dir: &str,
        token_file: &Path,
        wrapper: &[&str],
        extra: &[&str],
    ) -> Process {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary("fhirgw-dataplane"));
                command
            }
            None => Command::new(binary("fhirgw-dataplane")),
        };
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--control-plane")
            .arg(control_plane)
            .arg("--token-file")
            .arg(token_file)
            .arg("--state-dir")
            .arg(self.path(state_dir))
            .arg("--node-id")
            .arg(name)
            .arg("--drain-secs")
            .arg("5")
            .args(extra)
            // No pause before closing on SIGTERM unless a test asks for one (`--shutdown-delay-secs` overrides this).
            .env("FHIRGW_DP_SHUTDOWN_DELAY_SECS", "0")
            .env("RUST_LOG", "info,fhirgw_dataplane=debug");
        self.otel_env(&mut command, name);
        Process::spawn(name, command, self.dir.path()).await
    }
}

/// Flags for TLS: the files of `--tls-cert-file`-style pairs and CA bundles, as strings for `args`.
pub fn path_str(path: &Path) -> String {
    path.display().to_string()
}

impl World {
    /// A control plane with only the operator token from the harness (no data-plane token): `extra` carries its TLS
    /// flags (`--tls-cert-file`, `--dataplane-ca-file`, …) and anything else.
    pub async fn control_plane_tls(&self, name: &str, store_args: &[String], extra: &[String]) -> Process {
        let mut command = Command::new(binary("fhirgw-controlplane"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(store_args)
            .arg("--replica-id")
            .arg(name)
            .arg("--operator-token-file")
            .arg(self.path("operator.token"))
            .args(extra)
            .env("RUST_LOG", "info,fhirgw_controlplane=debug");
        Process::spawn(name, command, self.dir.path()).await
    }

    /// A data plane without a data-plane token: `extra` carries its TLS flags (`--client-cert-file`, …).
    pub async fn data_plane_tls(&self, name: &str, control_plane: &str, state_dir: &str, extra: &[String]) -> Process {
        let mut command = Command::new(binary("fhirgw-dataplane"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--control-plane")
            .arg(control_plane)
            .arg("--state-dir")
            .arg(self.path(state_dir))
            .arg("--node-id")
            .arg(name)
            .arg("--drain-secs")
            .arg("5")
            .args(extra)
            .env_remove("FHIRGW_DATAPLANE_TOKEN")
            .env("FHIRGW_DP_SHUTDOWN_DELAY_SECS", "0")
            .env("RUST_LOG", "info,fhirgw_dataplane=debug");
        Process::spawn(name, command, self.dir.path()).await
    }
}

/// An operator's admin client over TLS to `cp` (checking its certificate against `ca` for the name `host`), with
/// the harness's operator token and, when given, a client certificate.
pub async fn admin_tls(cp: &Process, ca: &Path, host: &str, client: Option<&pki::Pair>) -> Admin {
    let spec = fhirgw_tls::client::ClientSpec {
        ca: Some(ca.to_owned()),
        identity: client.map(|p| (p.cert.clone(), p.key.clone())),
        alpn: Vec::new(),
    };
    let tls = fhirgw_dataplane::cp_tls::ControlPlaneTls::start(spec, None).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cp.addr("grpc")))
        .unwrap()
        .connect_with_connector(tls.connector(host).unwrap())
        .await
        .unwrap();
    AdminClient::with_interceptor(channel, operator_auth as fn(_) -> _)
}

/// grpcurl over TLS, as an operator runs it: `grpcurl FLAGS ADDRESS VERBS` (no `-plaintext`; FLAGS carry `-cacert`,
/// `-cert`, `-key`, `-H`). Returns (success, stdout, stderr).
pub async fn grpcurl_tls(address: &str, flags: &[String], verbs: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl_path())
        .args(flags)
        .arg(address)
        .args(verbs)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running grpcurl ({}): {e}", grpcurl_path().display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The log of `process` so far.
pub fn log_of(process: &Process) -> String {
    std::fs::read_to_string(&process.log).unwrap_or_default()
}

pub fn grpc_url(cp: &Process) -> String {
    format!("http://{}", cp.addr("grpc"))
}

pub async fn admin(cp: &Process) -> Admin {
    let channel = Channel::from_shared(grpc_url(cp)).unwrap().connect().await.unwrap();
    AdminClient::with_interceptor(channel, operator_auth as fn(_) -> _)
}

/// Sends `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct TokenAuth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl TokenAuth {
    pub fn bearer(token: &str) -> TokenAuth {
        TokenAuth(format!("Bearer {token}").parse().unwrap())
    }
}

impl tonic::service::Interceptor for TokenAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type AdminAs = AdminClient<InterceptedService<Channel, TokenAuth>>;

/// An admin client presenting `token` (a named operator's, say).
pub async fn admin_as(cp: &Process, token: &str) -> AdminAs {
    let channel = Channel::from_shared(grpc_url(cp)).unwrap().connect().await.unwrap();
    AdminClient::with_interceptor(channel, TokenAuth::bearer(token))
}

/// SHA-256 of a token, hex, made the way the README tells operators to (`printf %s "$TOKEN" | sha256sum`): a line
/// of an operators file is `name <this>`.
pub fn token_hash(token: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(token.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

/// Runs grpcurl exactly as an operator would: `grpcurl -plaintext -H 'authorization: Bearer …' FLAGS ADDRESS VERBS`.
/// Returns (success, stdout, stderr).
pub async fn grpcurl(cp: &Process, flags: &[&str], verbs: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl_path())
        .arg("-plaintext")
        .arg("-H")
        .arg(format!("authorization: Bearer {OPERATOR_TOKEN}"))
        .args(flags)
        .arg(cp.addr("grpc"))
        .args(verbs)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running grpcurl ({}): {e}", grpcurl_path().display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Python with the `fhirclient` SMART client (`./dev tools` installs it): `FHIRGW_PYTHON`, else
/// `.tools/venv/bin/python`.
pub fn smart_python() -> PathBuf {
    std::env::var_os("FHIRGW_PYTHON").map_or_else(|| workspace().join(".tools/venv/bin/python"), PathBuf::from)
}

/// What `tests/smart-client/client.py` reported.
pub struct SmartRun {
    pub success: bool,
    pub output: serde_json::Value,
    pub stderr: String,
}

/// Runs the third-party SMART client (`tests/smart-client/client.py`, Python `fhirclient`) against `base` with a
/// bearer token: discovery, a read of `Patient/{patient}`, and a search of `search_type` followed page by page.
/// `env` is added to its environment (e.g. `REQUESTS_CA_BUNDLE`).
pub async fn smart_client(
    base: &str,
    token: &str,
    patient: &str,
    search_type: &str,
    page_size: u32,
    env: &[(&str, &str)],
) -> SmartRun {
    let python = smart_python();
    let check = Command::new(&python).arg("-c").arg("import fhirclient").output().await;
    assert!(
        check.as_ref().is_ok_and(|o| o.status.success()),
        "{} cannot import fhirclient: run `./dev tools` (it installs fhirclient into .tools/venv), or set FHIRGW_PYTHON",
        python.display()
    );
    let mut command = Command::new(&python);
    command
        .arg(workspace().join("tests/smart-client/client.py"))
        .arg(base)
        .arg(patient)
        .arg(search_type)
        .arg(page_size.to_string())
        .env("FHIR_TOKEN", token)
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the SMART client did not finish within 120 s")
        .expect("running the SMART client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = if out.status.success() {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("the SMART client printed {stdout:?}: {e}"))
    } else {
        serde_json::Value::Null
    };
    SmartRun { success: out.status.success(), output, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The data plane's `/config` document.
pub async fn dp_config(dp: &Process) -> serde_json::Value {
    http().get(format!("http://{}/config", dp.addr("admin"))).send().await.unwrap().json().await.unwrap()
}
