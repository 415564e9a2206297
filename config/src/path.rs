//! Normalisation of request paths. Routes match the decoded, normalised segments and the upstream receives exactly
//! that form, re-encoded canonically, so what was checked is what is forwarded.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use thiserror::Error;

/// Longest path accepted, in bytes, both as received and in the canonical form sent upstream.
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the request path must start with '/'")]
    NotAbsolute,
    #[error("the request path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("the request path contains an empty segment ('//')")]
    EmptySegment,
    #[error("the request path contains a dot segment ('.' or '..')")]
    DotSegment,
    #[error("the request path contains an encoded separator or control character")]
    EncodedSeparator,
    #[error("the request path is not valid UTF-8 after decoding")]
    NotUtf8,
}

/// A request path split into decoded segments. A single trailing slash is dropped; every other irregular form is
/// refused rather than guessed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    segments: Vec<String>,
}

impl NormalPath {
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(PathError::NotAbsolute);
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Ok(Self { segments: Vec::new() });
        }
        let mut segments = Vec::new();
        for raw_segment in rest.split('/') {
            if raw_segment.is_empty() {
                return Err(PathError::EmptySegment);
            }
            let decoded = percent_decode_str(raw_segment).decode_utf8().map_err(|_| PathError::NotUtf8)?;
            if decoded == "." || decoded == ".." {
                return Err(PathError::DotSegment);
            }
            if decoded.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
                return Err(PathError::EncodedSeparator);
            }
            segments.push(decoded.into_owned());
        }
        // The limit holds for what the upstream receives too: the canonical form can be longer than the request's
        // (`!` is sent as `%21`), and is what gets forwarded.
        let canonical: usize =
            segments.iter().map(|s| 1 + utf8_percent_encode(s, SEGMENT).map(str::len).sum::<usize>()).sum();
        if canonical > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        Ok(Self { segments })
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The segments after `prefix`, if the path starts with it (segment-wise).
    pub fn strip_prefix(&self, prefix: &[String]) -> Option<&[String]> {
        self.segments.strip_prefix(prefix)
    }
}

/// Characters escaped when a decoded segment is written back into a path: everything but RFC 3986 unreserved
/// characters and the sub-delimiters FHIR uses in paths (`$`, `:`, `@`).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'!')
    .add(b'&')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*')
    .add(b'+')
    .add(b',')
    .add(b';')
    .add(b'=');

/// Joins a base path (no trailing slash, may be empty) and decoded segments into a canonical encoded path.
pub fn join_encoded(base: &str, segments: &[String]) -> String {
    let mut out = String::with_capacity(base.len() + segments.iter().map(|s| s.len() + 1).sum::<usize>());
    out.push_str(base.trim_end_matches('/'));
    for segment in segments {
        out.push('/');
        out.extend(utf8_percent_encode(segment, SEGMENT));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let ok: &[(&str, &[&str])] = &[
            ("/", &[]),
            ("/fhir", &["fhir"]),
            ("/fhir/", &["fhir"]),
            ("/fhir/Patient/123", &["fhir", "Patient", "123"]),
            ("/fhir/Patient/%24export", &["fhir", "Patient", "$export"]),
            ("/fhir/%50atient", &["fhir", "Patient"]),
            ("/fhir/Patient/a%20b", &["fhir", "Patient", "a b"]),
            ("/fhir/.well-known/smart-configuration", &["fhir", ".well-known", "smart-configuration"]),
        ];
        for (raw, want) in ok {
            let got = NormalPath::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(got.segments(), *want, "{raw}");
        }
        let bad: &[(&str, PathError)] = &[
            ("fhir", PathError::NotAbsolute),
            ("/fhir//Patient", PathError::EmptySegment),
            ("//fhir", PathError::EmptySegment),
            ("/fhir/Patient//", PathError::EmptySegment),
            ("/fhir/Patient/../Observation", PathError::DotSegment),
            ("/fhir/./Patient", PathError::DotSegment),
            ("/fhir/%2e%2e/admin", PathError::DotSegment),
            ("/fhir/%2E/x", PathError::DotSegment),
            ("/fhir/Patient%2F123", PathError::EncodedSeparator),
            ("/fhir/Patient%5C123", PathError::EncodedSeparator),
            ("/fhir/Patient%00", PathError::EncodedSeparator),
            ("/fhir/%ff", PathError::NotUtf8),
        ];
        for (raw, want) in bad {
            assert_eq!(NormalPath::parse(raw).as_ref().err(), Some(want), "{raw}");
        }
        assert_eq!(NormalPath::parse(&format!("/{}", "a".repeat(MAX_PATH_BYTES))), Err(PathError::TooLong));
        // Short as received, too long once re-encoded for the upstream (found by the `path` fuzz target).
        let bangs = format!("/{}", "!".repeat(MAX_PATH_BYTES / 2));
        assert_eq!(NormalPath::parse(&bangs), Err(PathError::TooLong));
        assert!(NormalPath::parse(&format!("/{}", "!".repeat(MAX_PATH_BYTES / 3 - 1))).is_ok());
    }

    #[test]
    fn re_encoding_is_canonical() {
        let cases: &[(&str, &str)] = &[
            ("/fhir/Patient/%24everything", "/r4/Patient/$everything"),
            ("/fhir/Patient/a%20b", "/r4/Patient/a%20b"),
            ("/fhir/%50atient/1", "/r4/Patient/1"),
            ("/fhir/Patient/x%3Fy", "/r4/Patient/x%3Fy"),
            ("/fhir/Patient/x%23y", "/r4/Patient/x%23y"),
            ("/fhir", "/r4"),
        ];
        for (raw, want) in cases {
            let path = NormalPath::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let rest = path.strip_prefix(&["fhir".to_owned()]).unwrap_or_default();
            assert_eq!(join_encoded("/r4", rest), *want, "{raw}");
        }
        assert_eq!(join_encoded("", &[]), "/");
    }

    #[test]
    fn decoded_then_encoded_is_a_fixed_point() {
        for raw in ["/a/%24b/c%20d/%E2%9C%93", "/x/y:z/@w"] {
            let once = NormalPath::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let encoded = join_encoded("", once.segments());
            let twice = NormalPath::parse(&encoded).unwrap_or_else(|e| panic!("{encoded}: {e}"));
            assert_eq!(once, twice);
        }
    }
}
