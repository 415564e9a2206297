//! NDJSON verified line by line while it streams: memory is bounded by the longest line (capped), whatever the
//! size of the file. Each line is decided on its own by a [`LinePolicy`]: from its bytes when its light view is
//! enough (the line is then validated as one JSON value and copied as it is), otherwise parsed and re-serialised
//! from the parsed value; either way the client receives only what was checked. A line that is not JSON cannot be
//! verified and is dropped; a line longer than the cap fails the whole stream (the client sees a reset, never a cut
//! line).

use serde_json::Value;

/// What [`LinePolicy::line_raw`] decided about a line from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineVerdict {
    /// Send the line's bytes as they are.
    Keep,
    Drop,
    /// Only the parsed path ([`LinePolicy::line`]) can decide.
    Undecided,
}

/// Decides the lines of one file.
pub trait LinePolicy {
    /// The fast path: decides a line (without its line break) from its bytes. `Keep` must only be answered for bytes
    /// the policy has validated as one complete JSON value. The default leaves every line to [`LinePolicy::line`].
    fn line_raw(&mut self, _line: &[u8]) -> LineVerdict {
        LineVerdict::Undecided
    }
    /// Decides one parsed line: `Some` (possibly modified) to keep it.
    fn line(&mut self, value: Value) -> Option<Value>;
}

impl<F: FnMut(Value) -> Option<Value>> LinePolicy for F {
    fn line(&mut self, value: Value) -> Option<Value> {
        self(value)
    }
}

/// Longest accepted line, in bytes (without its line break).
pub const MAX_LINE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("NDJSON line {line} is longer than {limit} bytes")]
    TooLong { line: u64, limit: usize },
    #[error("the filter already failed")]
    Failed,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub kept: usize,
    pub dropped: usize,
}

/// Splits a byte stream into lines and filters them. Pure and synchronous: the caller feeds chunks as they arrive.
pub struct LineFilter {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    max: usize,
    /// 1-based number of the line being read.
    line: u64,
    stats: Stats,
    failed: bool,
}

impl LineFilter {
    pub fn new(max_line_bytes: usize) -> Self {
        LineFilter { partial: Vec::new(), max: max_line_bytes, line: 1, stats: Stats::default(), failed: false }
    }

    /// Feeds one chunk; complete lines that `keep` accepts are appended to `out`, each ending in `\n`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<u8>, keep: &mut dyn LinePolicy) -> Result<(), LineError> {
        if self.failed {
            return Err(LineError::Failed);
        }
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            let (head, rest) = (&chunk[..end], &chunk[end + 1..]);
            if self.partial.is_empty() {
                self.check(head.len())?;
                self.decide(head, out, keep);
            } else {
                self.check(self.partial.len() + head.len())?;
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.decide(&line, out, keep);
                // Keep the allocation for the next long line only if it is modest.
                if line.capacity() <= 64 * 1024 {
                    line.clear();
                    self.partial = line;
                }
            }
            self.line += 1;
            chunk = rest;
        }
        self.check(self.partial.len() + chunk.len())?;
        self.partial.extend_from_slice(chunk);
        Ok(())
    }

    /// The end of the stream: a last line without a line break is decided too.
    pub fn finish(&mut self, out: &mut Vec<u8>, keep: &mut dyn LinePolicy) -> Result<Stats, LineError> {
        if self.failed {
            return Err(LineError::Failed);
        }
        let last = std::mem::take(&mut self.partial);
        self.decide(&last, out, keep);
        Ok(self.stats)
    }

    fn check(&mut self, len: usize) -> Result<(), LineError> {
        if len > self.max {
            self.failed = true;
            self.partial = Vec::new();
            return Err(LineError::TooLong { line: self.line, limit: self.max });
        }
        Ok(())
    }

    fn decide(&mut self, line: &[u8], out: &mut Vec<u8>, keep: &mut dyn LinePolicy) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let kept = match keep.line_raw(line) {
            LineVerdict::Keep => {
                out.extend_from_slice(line);
                true
            }
            LineVerdict::Drop => false,
            LineVerdict::Undecided => {
                let kept = serde_json::from_slice::<Value>(line).ok().and_then(|value| keep.line(value));
                let start = out.len();
                let written = kept.is_some_and(|value| serde_json::to_writer(&mut *out, &value).is_ok());
                if !written {
                    out.truncate(start);
                }
                written
            }
        };
        if kept {
            out.push(b'\n');
            self.stats.kept += 1;
        } else {
            self.stats.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Keeps objects whose `keep` member is true, and marks them.
    fn policy(value: Value) -> Option<Value> {
        let mut value = value;
        if value.get("keep") == Some(&json!(true)) {
            value["seen"] = json!(true);
            Some(value)
        } else {
            None
        }
    }

    fn run(chunks: &[&[u8]], max: usize) -> Result<(String, Stats), LineError> {
        let mut filter = LineFilter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            filter.push(chunk, &mut out, &mut policy)?;
        }
        let stats = filter.finish(&mut out, &mut policy)?;
        Ok((String::from_utf8(out).unwrap_or_default(), stats))
    }

    #[test]
    fn lines_table() {
        let cases: &[(&str, &str, Stats)] = &[
            ("", "", Stats { kept: 0, dropped: 0 }),
            ("{\"keep\":true}\n", "{\"keep\":true,\"seen\":true}\n", Stats { kept: 1, dropped: 0 }),
            ("{\"keep\":true}", "{\"keep\":true,\"seen\":true}\n", Stats { kept: 1, dropped: 0 }),
            ("{\"keep\":true}\r\n\r\n  \n", "{\"keep\":true,\"seen\":true}\n", Stats { kept: 1, dropped: 0 }),
            (
                "{\"keep\":false}\n{\"keep\":true,\"n\":2}\n",
                "{\"keep\":true,\"n\":2,\"seen\":true}\n",
                Stats { kept: 1, dropped: 1 },
            ),
            (
                "not json\n{\"keep\":true}\n{\"keep\":true",
                "{\"keep\":true,\"seen\":true}\n",
                Stats { kept: 1, dropped: 2 },
            ),
            // Two documents on one line are not one JSON value.
            ("{\"keep\":true}{\"keep\":true}\n", "", Stats { kept: 0, dropped: 1 }),
        ];
        for (input, want, stats) in cases {
            assert_eq!(run(&[input.as_bytes()], 1024), Ok(((*want).to_owned(), *stats)), "{input:?}");
        }
    }

    /// Wherever the upstream's chunks split the stream (here: at every pair of positions), the result is the same.
    #[test]
    fn lines_split_across_chunks() {
        let input = "{\"keep\":true,\"s\":\"a\\nb\"}\n{\"keep\":false}\r\n{\"keep\":true,\"n\":3}\n";
        let whole = run(&[input.as_bytes()], 1024);
        assert_eq!(whole.as_ref().map(|(_, s)| *s), Ok(Stats { kept: 2, dropped: 1 }));
        let bytes = input.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = run(&[&bytes[..i], &bytes[i..j], &bytes[j..]], 1024);
                assert_eq!(got, whole, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn an_over_long_line_fails_the_stream() {
        let long = format!("{{\"keep\":true,\"pad\":\"{}\"}}\n", "x".repeat(100));
        let ok = format!("{{\"keep\":true}}\n{long}");
        assert!(run(&[ok.as_bytes()], long.len() - 1).is_ok(), "exactly the cap is accepted");
        assert_eq!(run(&[ok.as_bytes()], 50), Err(LineError::TooLong { line: 2, limit: 50 }));
        // Never ending, fed in small chunks: refused once the cap is passed, without buffering more.
        let mut filter = LineFilter::new(64);
        let mut out = Vec::new();
        let mut result = Ok(());
        for _ in 0..100 {
            result = filter.push(b"xxxxxxxxxx", &mut out, &mut policy);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(LineError::TooLong { line: 1, limit: 64 }));
        assert_eq!(filter.push(b"\n", &mut out, &mut policy), Err(LineError::Failed));
        assert_eq!(filter.finish(&mut out, &mut policy), Err(LineError::Failed));
        assert!(out.is_empty());
    }
}
