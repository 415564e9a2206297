//! A real PostgreSQL for the end-to-end tests: Debian's binaries (`initdb`, `postgres`, `pg_ctl`) on a temporary
//! directory, on a free loopback port, as the unprivileged `postgres` user when the tests run as root (CI does).
//!
//! `Postgres::shared()` is one instance per test binary (each test gets its own database); `Postgres::start()` is a
//! dedicated one a test may stop and restart. Each server runs under a small shell supervisor that holds a pipe
//! from this process: when the test binary exits, however it exits, the pipe closes and the supervisor stops the
//! server (and, for the shared one, removes its directory), so no server outlives its tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The database user the harness creates; its password is in `password_file()`.
pub const USER: &str = "fhirgw";
const PASSWORD: &str = "fhirgw-test-password-0123456789";

pub struct Postgres {
    dir: PathBuf,
    /// Removes `dir` when a dedicated instance is dropped (the shared one's supervisor removes its own).
    _tempdir: Option<tempfile::TempDir>,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    supervisor: Mutex<Option<Child>>,
}

/// The directory of Debian's PostgreSQL binaries (the newest installed), or `FHIRGW_PG_BIN`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FHIRGW_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().unwrap_or_else(|| {
        panic!("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `./dev tools` (apt-get install postgresql)")
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

impl Postgres {
    /// One server per test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| Postgres::init(true))
    }

    /// A server of its own, for a test that stops and restarts it.
    pub fn start() -> Postgres {
        Postgres::init(false)
    }

    fn init(shared: bool) -> Postgres {
        let tempdir = tempfile::Builder::new().prefix("fhirgw-pg-").tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempdir.path().to_owned();
        let as_postgres = is_root();
        let bin = bin_dir();
        std::fs::write(dir.join("pwfile"), format!("{PASSWORD}\n")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("password"), PASSWORD).unwrap_or_else(|e| panic!("{e}"));
        if as_postgres {
            let ok = Command::new("chown").arg("-R").arg("postgres:").arg(&dir).status().is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", dir.display());
        }
        let mut initdb = Self::command(as_postgres, &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", dir.join("pwfile").display()));
        let out = initdb.output().unwrap_or_else(|e| panic!("running initdb: {e}"));
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres {
            dir,
            // A static is never dropped: the shared server's supervisor removes the directory at exit instead.
            _tempdir: Some(tempdir),
            bin,
            port: free_port(),
            as_postgres,
            supervisor: Mutex::new(None),
        };
        // The free port may be taken by someone else before the server binds it: try another.
        for attempt in 1..=3 {
            match pg.try_spawn(shared) {
                Ok(()) => return pg,
                Err(e) if attempt < 3 => {
                    eprintln!("postgres on port {} did not start ({e}); trying another port", pg.port);
                    pg.stop();
                    pg.port = free_port();
                }
                Err(e) => panic!("{e}"),
            }
        }
        pg
    }

    fn command(as_postgres: bool, program: &Path) -> Command {
        if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Starts the server under its supervisor and waits until it accepts connections.
    fn spawn(&self, remove_dir_at_exit: bool) {
        self.try_spawn(remove_dir_at_exit).unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_spawn(&self, remove_dir_at_exit: bool) -> Result<(), String> {
        let script = r#"
            "$PG_BIN/postgres" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR" -c listen_addresses=127.0.0.1 \
                -c fsync=off -c full_page_writes=off -c max_connections=300 >>"$PG_DIR/postgres.log" 2>&1 &
            pid=$!
            read -r _ || true
            kill -INT "$pid" 2>/dev/null
            wait "$pid"
            if [ "$PG_RM" = 1 ]; then rm -rf "$PG_DIR"; fi
        "#;
        let mut command = Self::command(self.as_postgres, Path::new("/bin/sh"));
        command
            .arg("-c")
            .arg(script)
            .env("PG_BIN", &self.bin)
            .env("PG_DIR", &self.dir)
            .env("PG_PORT", self.port.to_string())
            .env("PG_RM", if remove_dir_at_exit { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| format!("starting postgres: {e}"))?;
        *self.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let started = Instant::now();
        loop {
            let exited = self
                .supervisor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-d", "postgres"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            let log = || std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
            if log().contains("could not bind") || (exited && started.elapsed() > Duration::from_secs(1)) {
                return Err(format!("postgres exited; log:\n{}", log()));
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("postgres did not start within 30 s; log:\n{}", log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: open connections are cut, as when a database fails over) and waits.
    pub fn stop(&self) {
        let child = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = child {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.spawn(false);
    }

    /// Starts it again after `stop`.
    pub fn start_again(&self) {
        self.spawn(false);
    }

    /// A file holding the user's password, for `--store-password-file`.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// The URL of `database` (no password in it: it is in `password_file()`).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database (over the local socket, where the harness user is trusted).
    pub fn create_database(&self, name: &str) {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, name])
            .output()
            .unwrap_or_else(|e| panic!("running createdb: {e}"));
        assert!(out.status.success(), "createdb {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs SQL as the harness user (psql over the local socket); returns stdout.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database, "-XAtq", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running psql: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(sql.as_bytes()).unwrap_or_else(|e| panic!("psql stdin: {e}"));
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("psql: {e}"));
        assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
