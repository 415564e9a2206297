//! A raw Binary upload on its way to the upstream. The planner checked and built the Binary resource (its
//! `contentType`, security context, dataset tags and id); this module sends it as JSON with the client's body
//! base64-encoded into its `data` while it streams. The gateway never holds the content whole and never reads it:
//! each client frame becomes one upstream frame, so memory stays flat however large the file.
//!
//! The client's body is bounded by [`UPLOAD_MAX_BYTES`] (a declared length over it is refused before anything is
//! sent; a chunked body that grows past it is cut off) and may not stall for longer than `--body-idle-timeout-secs` (30 s). Either
//! failure ends the upstream request with an error, so the upstream never stores a truncated Binary, and the client
//! gets the reason ([`Failure`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::sync::Notify;

use crate::body::{self, Body, BoxError};
use crate::body_budget::BodyError;

/// Largest raw Binary content accepted. FHIR servers keep a Binary's content in their database or blob store and
/// answer with it base64-encoded, a third larger; past a gigabyte, a file belongs in object storage with a link.
pub(super) const UPLOAD_MAX_BYTES: u64 = 1 << 30;
/// The client's body of a raw upload, not read yet.
pub(crate) struct Upload {
    pub body: Incoming,
    /// Its declared `Content-Length`.
    pub length: Option<u64>,
    /// Longest the body may stall (`--body-idle-timeout-secs`).
    pub idle: Duration,
}

/// Why the client's body ended the upload early (kept for the answer; the upstream request just fails).
#[derive(Default)]
pub(super) struct Failure(Mutex<Option<BodyError>>);

impl Failure {
    fn set(&self, error: BodyError) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(error);
        }
    }

    pub fn take(&self) -> Option<BodyError> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// The upstream request body of an upload.
pub(super) struct Outbound {
    pub body: Body,
    /// The body's exact length, when the client declared its own.
    pub length: Option<u64>,
    /// Notified once the client's body has been read to its end (the upstream's answer is due from then on).
    pub done: Arc<Notify>,
    pub failure: Arc<Failure>,
}

/// `binary` (a JSON object without `data`) with the client's body streamed into `data`. An empty body uploads a
/// Binary without `data` (FHIR has no empty base64 value).
pub(super) async fn encode(binary: &Value, upload: Upload) -> Result<Outbound, BodyError> {
    let Upload { mut body, length, idle } = upload;
    let done = Arc::new(Notify::new());
    let failure = Arc::new(Failure::default());
    // The first bytes decide whether there is any content at all.
    let first = loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Idle(idle)),
            Ok(None) => break None,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => break Some(data),
                _ => {}
            },
        }
    };
    let text = binary.to_string();
    let Some(first) = first else {
        done.notify_one();
        let length = Some(text.len() as u64);
        return Ok(Outbound { body: body::full(text), length, done, failure });
    };
    let (prefix, suffix) = envelope(&text);
    let length = length.map(|n| (prefix.len() + suffix.len()) as u64 + base64_len(n));
    let state = State {
        body,
        idle,
        first: Some(first),
        encoder: Base64Stream::default(),
        seen: 0,
        done: done.clone(),
        failure: failure.clone(),
    };
    let content = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let next = state.next().await;
        match next {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), Some(state))),
            Ok(None) => {
                let mut tail = state.encoder.finish();
                tail.push_str(SUFFIX);
                state.done.notify_one();
                Some((Ok(Frame::data(Bytes::from(tail))), None))
            }
            Err(error) => {
                let message = error.to_string();
                state.failure.set(error);
                Some((Err(BoxError::from(message)), None))
            }
        }
    });
    let frames = stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from(prefix)))]).chain(content);
    Ok(Outbound { body: StreamBody::new(frames).boxed_unsync(), length, done, failure })
}

const SUFFIX: &str = "\"}";

/// `{"resourceType":"Binary",…}` → (`{"resourceType":"Binary",…,"data":"`, `"}`).
fn envelope(text: &str) -> (String, &'static str) {
    let open = text.strip_suffix('}').unwrap_or(text);
    let comma = if open.trim_end().ends_with('{') { "" } else { "," };
    (format!("{open}{comma}\"data\":\""), SUFFIX)
}

/// The base64 length of `n` bytes, padded.
fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

struct State {
    body: Incoming,
    idle: Duration,
    first: Option<Bytes>,
    encoder: Base64Stream,
    seen: u64,
    done: Arc<Notify>,
    failure: Arc<Failure>,
}

impl State {
    /// The next encoded bytes, `None` at the end of the client's body.
    async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            let data = match self.first.take() {
                Some(first) => first,
                None => match tokio::time::timeout(self.idle, self.body.frame()).await {
                    Err(_) => return Err(BodyError::Idle(self.idle)),
                    Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => return Err(BodyError::Read(e)),
                    Ok(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                },
            };
            self.seen += data.len() as u64;
            if self.seen > UPLOAD_MAX_BYTES {
                return Err(BodyError::TooLarge { limit: UPLOAD_MAX_BYTES as usize });
            }
            let out = self.encoder.push(&data);
            if !out.is_empty() {
                return Ok(Some(Bytes::from(out)));
            }
        }
    }
}

/// Base64 over a stream of chunks: whole 3-byte groups are encoded as they arrive, the 0–2 bytes left over carried
/// into the next chunk, the padding written at the end only.
#[derive(Default)]
struct Base64Stream {
    carry: [u8; 2],
    held: usize,
}

impl Base64Stream {
    fn push(&mut self, mut chunk: &[u8]) -> String {
        let mut out = String::with_capacity((chunk.len() / 3 + 2) * 4);
        if self.held > 0 {
            let need = 3 - self.held;
            if chunk.len() < need {
                self.carry[self.held..self.held + chunk.len()].copy_from_slice(chunk);
                self.held += chunk.len();
                return out;
            }
            let mut group = [0u8; 3];
            group[..self.held].copy_from_slice(&self.carry[..self.held]);
            group[self.held..].copy_from_slice(&chunk[..need]);
            STANDARD.encode_string(group, &mut out);
            chunk = &chunk[need..];
            self.held = 0;
        }
        let whole = chunk.len() / 3 * 3;
        STANDARD.encode_string(&chunk[..whole], &mut out);
        let rest = &chunk[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.held = rest.len();
        out
    }

    fn finish(self) -> String {
        STANDARD.encode(&self.carry[..self.held])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_in_chunks_is_base64_of_the_whole() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let splits: &[&[usize]] = &[&[], &[1], &[2], &[3], &[1, 2], &[1, 1, 1, 1], &[2, 2, 2], &[999], &[500, 1, 1]];
        for cuts in splits {
            for len in [0, 1, 2, 3, 4, 5, 999, 1000] {
                let whole = &data[..len];
                let mut encoder = Base64Stream::default();
                let (mut out, mut at) = (String::new(), 0);
                for &cut in *cuts {
                    let end = (at + cut).min(len);
                    out.push_str(&encoder.push(&whole[at..end]));
                    at = end;
                }
                out.push_str(&encoder.push(&whole[at..]));
                out.push_str(&encoder.finish());
                assert_eq!(out, STANDARD.encode(whole), "len {len}, cuts {cuts:?}");
                assert_eq!(out.len() as u64, base64_len(len as u64));
            }
        }
    }

    #[test]
    fn the_envelope_is_the_binary_with_data_last() {
        let binary = serde_json::json!({"resourceType": "Binary", "contentType": "application/pdf"});
        let (prefix, suffix) = envelope(&binary.to_string());
        let whole = format!("{prefix}AAEC{suffix}");
        let parsed: Value = serde_json::from_str(&whole).unwrap_or_else(|e| panic!("{e}: {whole}"));
        assert_eq!(parsed["data"], "AAEC");
        assert_eq!(parsed["contentType"], "application/pdf");
        assert_eq!(envelope("{}").0, "{\"data\":\"");
    }
}
