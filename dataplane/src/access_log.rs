//! The access log: one structured line per FHIR request, written when the response body ends (or the request is
//! abandoned), from `metrics::InFlight`, the one place that knows the whole request: its duration and bytes.
//!
//! A line names the method, the route id, the status, the duration, the response bytes, the tenant and the OAuth
//! client id from the token, the trace id, and for refusals and failures a short stable reason code
//! (`ProxyError::code`: `token_expired`, `not_found`, `grants_stale`, …). Never a token, a path, a query, a resource
//! id or a patient id: only values the gateway itself chose or checked (route ids, tenant names the control plane
//! knows) and the client id, cleaned. Lines go to the log on stderr with target `fhirgw::access` at INFO, as text or
//! JSON like every other line (`--log-format json`), outside any span so that each line stands alone.

use std::str::FromStr;
use std::time::Duration;

/// The log target of access lines (`RUST_LOG=…,fhirgw::access=off` also silences them).
pub const TARGET: &str = "fhirgw::access";

/// Longest client id written; longer ones are cut.
const CLIENT_ID_MAX: usize = 128;

/// `--access-log`: `on` (every request), `off`, or `sample=P` (every response that is not a complete 2xx, and a
/// fraction P of the complete 2xx ones: errors, refusals and aborted responses are never sampled away).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum AccessLog {
    Off,
    #[default]
    On,
    Sample(f64),
}

impl FromStr for AccessLog {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "on" => Ok(AccessLog::On),
            "off" => Ok(AccessLog::Off),
            other => {
                let fraction = other
                    .strip_prefix("sample=")
                    .ok_or_else(|| format!("`{other}`: expected on, off or sample=<fraction between 0 and 1>"))?;
                match fraction.parse::<f64>() {
                    Ok(p) if (0.0..=1.0).contains(&p) => Ok(AccessLog::Sample(p)),
                    _ => Err(format!("`{fraction}`: the sample fraction must be a number from 0 to 1")),
                }
            }
        }
    }
}

impl AccessLog {
    /// Whether the line of a request is written. `status` 0: no response head was sent. `draw` is uniform in [0, 1).
    fn keeps(self, status: u16, aborted: bool, draw: impl FnOnce() -> f64) -> bool {
        match self {
            AccessLog::Off => false,
            AccessLog::On => true,
            AccessLog::Sample(p) => aborted || !(200..300).contains(&status) || draw() < p,
        }
    }
}

/// What the pipeline learned about a request, for the metrics and the access log.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// The route id matched.
    pub route: Option<String>,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
}

impl Facts {
    /// Takes the authenticated caller's tenant and client id.
    pub fn caller(&mut self, caller: &crate::authn::Caller) {
        self.tenant = Some(caller.tenant.clone());
        self.client_id = caller.client_id.clone();
    }
}

/// One access line.
#[derive(Debug, Default)]
pub struct Line<'a> {
    pub method: &'static str,
    pub route: &'a str,
    /// 0 when the client went away before a response head was sent.
    pub status: u16,
    pub duration: Duration,
    pub bytes: u64,
    pub tenant: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    /// Why the gateway refused or failed the request (`ProxyError::code`); `client_closed` without a response.
    pub reason: Option<&'static str>,
    /// Why the response body was cut off after its head (`requests_aborted_total`'s reason, or `client_closed`).
    pub aborted: Option<&'static str>,
}

impl AccessLog {
    /// Writes `line` unless this setting leaves it out.
    pub fn write(self, line: &Line<'_>) {
        if !self.keeps(line.status, line.aborted.is_some(), rand::random::<f64>) {
            return;
        }
        let client_id = line.client_id.map(clean);
        // Milliseconds with microsecond precision: short to read, exact enough to sum.
        let duration_ms = (line.duration.as_secs_f64() * 1_000_000.0).round() / 1000.0;
        tracing::info!(
            target: TARGET,
            parent: None,
            method = line.method,
            route = line.route,
            status = line.status,
            duration_ms,
            bytes = line.bytes,
            tenant = line.tenant,
            client_id = client_id.as_deref(),
            trace_id = line.trace_id,
            reason = line.reason,
            aborted = line.aborted,
            "access"
        );
    }
}

/// A client id as it may be logged: printable ASCII without spaces, quotes or backslashes (anything else becomes
/// `?`), at most `CLIENT_ID_MAX` characters. It comes from a verified token, but it is still the caller's text.
fn clean(id: &str) -> String {
    id.chars()
        .take(CLIENT_ID_MAX)
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let cases = [
            ("on", Ok(AccessLog::On)),
            ("off", Ok(AccessLog::Off)),
            ("sample=0.1", Ok(AccessLog::Sample(0.1))),
            ("sample=0", Ok(AccessLog::Sample(0.0))),
            ("sample=1", Ok(AccessLog::Sample(1.0))),
            ("sample=1.5", Err("from 0 to 1")),
            ("sample=-0.1", Err("from 0 to 1")),
            ("sample=lots", Err("from 0 to 1")),
            ("sampled", Err("expected on, off or sample")),
            ("", Err("expected on, off or sample")),
        ];
        for (text, want) in cases {
            match (text.parse::<AccessLog>(), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{text}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{text}: {got}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Sampling drops only complete 2xx responses; errors, refusals, abandoned and aborted requests are all kept.
    #[test]
    fn sampling_keeps_every_error() {
        let sample = AccessLog::Sample(0.25);
        #[rustfmt::skip]
        let cases = [
            // status, aborted, draw, kept
            (200, false, 0.1, true),
            (200, false, 0.5, false),
            (204, false, 0.99, false),
            (200, true, 0.99, true),
            (304, false, 0.99, true),
            (401, false, 0.99, true),
            (404, false, 0.99, true),
            (503, false, 0.99, true),
            (0, false, 0.99, true),
        ];
        for (status, aborted, draw, kept) in cases {
            assert_eq!(sample.keeps(status, aborted, || draw), kept, "{status} {aborted} {draw}");
            assert!(AccessLog::On.keeps(status, aborted, || draw));
            assert!(!AccessLog::Off.keeps(status, aborted, || draw));
        }
        assert!(!AccessLog::Sample(0.0).keeps(200, false, || 0.0));
        assert!(AccessLog::Sample(1.0).keeps(200, false, || 0.999_999));
    }

    /// Access lines as `InFlight` writes them: a complete response, one refused, one abandoned before its head, one
    /// whose body the client dropped half-read, one cut off by an error, and none at all when off.
    #[tokio::test]
    async fn lines_from_requests_in_flight() {
        use std::sync::{Arc, Mutex};

        use bytes::Bytes;
        use http::{Method, Response, StatusCode};
        use http_body::Frame;
        use http_body_util::{BodyExt, Full, StreamBody};

        use crate::body::BoxError;
        use crate::metrics::{Aborted, Metrics};
        use crate::state::ConfigState;

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().json().with_writer(move || writer.clone()).with_max_level(tracing::Level::INFO);
        let _guard = tracing::subscriber::set_default(subscriber.finish());

        let full =
            |text: &'static str| Full::new(Bytes::from_static(text.as_bytes())).map_err(|n| match n {}).boxed_unsync();
        let metrics = Metrics::with_access_log(ConfigState::new(), AccessLog::On);
        let ok = metrics
            .request_started(&Method::GET)
            .caller(Some("tenant-a".into()), Some("app 7".into()), None)
            .finish(Some("instance".into()), Response::new(full("{\"ok\":true}")));
        assert!(ok.into_body().collect().await.is_ok());
        let mut refused = Response::new(full("{}"));
        *refused.status_mut() = StatusCode::UNAUTHORIZED;
        let refused =
            metrics.request_started(&Method::POST).caller(None, None, Some("token_expired")).finish(None, refused);
        assert!(refused.into_body().collect().await.is_ok());
        drop(metrics.request_started(&Method::DELETE));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"{"))), Ok(Frame::data(Bytes::from_static(b"}")))];
        let half_read = metrics.request_started(&Method::GET).finish(
            Some("search".into()),
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()),
        );
        let mut body = half_read.into_body();
        assert!(body.frame().await.is_some());
        drop(body);
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"{"))), Err(Aborted::boxed("unverifiable", "bad entry"))];
        let cut = metrics.request_started(&Method::GET).finish(
            Some("search".into()),
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()),
        );
        assert!(cut.into_body().collect().await.is_err());
        let silent = Metrics::with_access_log(ConfigState::new(), AccessLog::Off);
        drop(silent.request_started(&Method::GET).finish(None, Response::new(full("{}"))));

        let text = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["target"] == TARGET)
            .map(|l| l["fields"].clone())
            .collect();
        assert_eq!(lines.len(), 5, "{text}");
        let pick = |l: &serde_json::Value| {
            ["method", "route", "status", "bytes", "tenant", "client_id", "reason", "aborted"]
                .map(|k| l.get(k).map_or_else(|| "-".to_owned(), |v| v.to_string().replace('"', "")))
                .join(" ")
        };
        let got: Vec<String> = lines.iter().map(pick).collect();
        assert_eq!(
            got,
            [
                "GET instance 200 11 tenant-a app?7 - -",
                "POST _none 401 2 - - token_expired -",
                "DELETE _none 0 0 - - client_closed -",
                "GET search 200 1 - - - client_closed",
                "GET search 200 1 - - - unverifiable",
            ]
        );
        assert!(lines.iter().all(|l| l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0)), "{text}");
    }

    #[test]
    fn client_ids_are_cleaned() {
        let long = "x".repeat(300);
        let cases = [
            ("app-7", "app-7"),
            ("https://app.example/client.json", "https://app.example/client.json"),
            ("a b\"c\\d\ne", "a?b?c?d?e"),
            ("é", "?"),
            (long.as_str(), &long[..CLIENT_ID_MAX]),
        ];
        for (id, want) in cases {
            assert_eq!(clean(id), want, "{id}");
        }
    }
}
