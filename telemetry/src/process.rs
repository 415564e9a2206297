//! What every fhirgw binary exports besides its own metrics, read at each scrape: `fhirgw_build_info{version,commit}`
//! and the standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_threads`,
//! `process_start_time_seconds`), from `/proc/self` (Linux; elsewhere only the build info). The names are the ones
//! Prometheus client libraries use, unprefixed, so existing dashboards and alerts apply.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;

/// The workspace version (every crate shares it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built (see `build.rs`): `FHIRGW_BUILD_COMMIT`, `git rev-parse HEAD`, or `unknown`.
pub const COMMIT: &str = env!("FHIRGW_BUILD_COMMIT");

/// `0.1.0 (commit 1234abcd5678)`: what a data plane reports as its build to the control plane.
pub fn build_version() -> String {
    format!("{VERSION} (commit {})", COMMIT.get(..12).unwrap_or(COMMIT))
}

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub cpu_seconds: f64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// Parses `/proc/self/stat` (`proc(5)`); `boot_time` is `btime` of `/proc/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its last `)`.
pub fn parse_stat(stat: &str, boot_time: u64, ticks_per_second: u64, page_size: u64) -> Option<Reading> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest[0] is field 3 (state): field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = ticks_per_second.max(1) as f64;
    Some(Reading {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

fn read() -> Option<(Reading, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let reading = parse_stat(&stat, boot, rustix::param::clock_ticks_per_second(), rustix::param::page_size() as u64)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    Some((reading, open_fds, max_fds))
}

/// Registered (unprefixed) next to each plane's registry; see [`crate::metrics::encode`].
#[derive(Debug)]
pub struct ProcessCollector;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = Info::new(vec![("version", VERSION), ("commit", COMMIT)]);
        info.encode(encoder.encode_descriptor(
            "fhirgw_build",
            "The fhirgw build: workspace version and git commit.",
            None,
            MetricType::Info,
        )?)?;
        let Some((reading, open_fds, max_fds)) = read() else {
            return Ok(());
        };
        ConstCounter::new(reading.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            reading.resident_bytes as f64,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            reading.virtual_bytes as f64,
        )?;
        gauge(&mut encoder, "process_open_fds", "Number of open file descriptors.", open_fds as f64)?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors (soft limit).",
            max_fds as f64,
        )?;
        gauge(&mut encoder, "process_threads", "Number of OS threads in the process.", reading.threads as f64)?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            reading.start_time_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        // Field 2 with spaces and a parenthesis; utime 250 + stime 50 ticks, 7 threads, started 1000 ticks after boot,
        // 4 MiB virtual, 256 resident pages.
        let tail = "S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 7 0 1000 4194304 256 18446744073709551615";
        let cases: &[(&str, Option<Reading>)] = &[
            (
                &format!("42 (fhirgw-dataplane) {tail}"),
                Some(Reading {
                    cpu_seconds: 3.0,
                    threads: 7,
                    start_time_seconds: 1_700_000_010.0,
                    virtual_bytes: 4_194_304,
                    resident_bytes: 256 * 4096,
                }),
            ),
            (&format!("42 (a) b) (c) {tail}"), parse_stat(&format!("1 (x) {tail}"), 1_700_000_000, 100, 4096)),
            ("42 (cut) S 1 2", None),
            ("no parenthesis at all", None),
            (&format!("42 (x) {}", tail.replace("250", "-1")), None),
        ];
        for (stat, want) in cases {
            assert_eq!(parse_stat(stat, 1_700_000_000, 100, 4096), *want, "{stat}");
        }
        assert_eq!(boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 5\n"), Some(1_700_000_000));
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_read() {
        let (reading, open_fds, max_fds) = read().unwrap_or_else(|| panic!("/proc/self is readable on Linux"));
        assert!(reading.resident_bytes > 0 && reading.threads >= 1 && reading.start_time_seconds > 1e9, "{reading:?}");
        assert!(open_fds >= 3 && max_fds >= open_fds, "{open_fds} of {max_fds}");
        assert!(!COMMIT.is_empty() && build_version().starts_with(VERSION));
    }
}
