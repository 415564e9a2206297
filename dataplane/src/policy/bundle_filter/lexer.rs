//! The small lexer under the Bundle filter: it finds where one JSON value ends, tracking only strings, escapes and
//! bracket depth (the value's bytes are validated by serde_json once complete).

/// Finds the end of one JSON value. It checks only what it needs to find the end (strings, escapes, bracket depth):
/// the value's bytes are validated by serde_json once complete.
#[derive(Debug, Default)]
pub(super) struct Scan {
    started: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
    scalar: bool,
}

impl Scan {
    /// How many bytes of `input` belong to the value, and whether it ended; `None` if no value starts with
    /// `input[0]`. A scalar ends before the first byte that cannot be part of it (which is not consumed).
    pub(super) fn scan(&mut self, input: &[u8]) -> Option<(usize, bool)> {
        let mut i = 0;
        if !self.started {
            let Some(&first) = input.first() else { return Some((0, false)) };
            match first {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth = 1,
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => self.scalar = true,
                _ => return None,
            }
            self.started = true;
            i = 1;
        }
        if self.scalar {
            return Some(match input[i..].iter().position(|&b| !is_scalar_byte(b)) {
                Some(n) => (i + n, true),
                None => (input.len(), false),
            });
        }
        while i < input.len() {
            if self.escape {
                self.escape = false;
                i += 1;
            } else if self.in_string {
                let Some(n) = find_quote_or_backslash(&input[i..]) else {
                    return Some((input.len(), false));
                };
                i += n;
                if input[i] == b'\\' {
                    self.escape = true;
                } else {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some((i + 1, true));
                    }
                }
                i += 1;
            } else {
                let Some(n) = input[i..].iter().position(|&b| matches!(b, b'"' | b'{' | b'[' | b'}' | b']')) else {
                    return Some((input.len(), false));
                };
                i += n;
                match input[i] {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    _ => {
                        // Containers only: depth >= 1 here.
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Some((i + 1, true));
                        }
                    }
                }
                i += 1;
            }
        }
        Some((input.len(), false))
    }
}

/// Index of the first `"` or `\\` in `s`. Strings are most of a Bundle's bytes: memchr looks at many bytes at a
/// time (SIMD where the CPU has it).
pub(super) fn find_quote_or_backslash(s: &[u8]) -> Option<usize> {
    memchr::memchr2(b'"', b'\\', s)
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

pub(super) enum FeedError {
    NoValue,
    TooLarge,
}

/// Scans the next bytes of a value into `buf`, refusing to grow it beyond `limit`.
pub(super) fn feed(scan: &mut Scan, buf: &mut Vec<u8>, input: &[u8], limit: usize) -> Result<(usize, bool), FeedError> {
    let (n, done) = scan.scan(input).ok_or(FeedError::NoValue)?;
    if buf.len().saturating_add(n) > limit {
        return Err(FeedError::TooLarge);
    }
    buf.extend_from_slice(&input[..n]);
    Ok((n, done))
}
