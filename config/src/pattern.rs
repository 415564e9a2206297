//! Route path patterns: parsing, matching, specificity and overlap.
//!
//! Specificity is a total order computed from the pattern alone ([`Rank`]), so the route chosen for a request never
//! depends on the order routes were written in. The table validator uses [`Pattern::overlap`] to refuse two routes
//! that can match the same request with equal rank.

use std::fmt;

use thiserror::Error;

/// What a parameter segment accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A FHIR resource type name: `[A-Z][A-Za-z]{0,63}`.
    Type,
    /// A FHIR id: `[A-Za-z0-9.-]{1,64}` (never starts with `$` or `_`, so never an operation or `_history`).
    Id,
    /// An operation: `$[a-z][A-Za-z0-9-]*`.
    Operation,
    /// Any one segment.
    Any,
}

impl Class {
    pub fn accepts(self, segment: &str) -> bool {
        match self {
            Class::Type => {
                segment.len() <= 64
                    && segment.starts_with(|c: char| c.is_ascii_uppercase())
                    && segment.chars().all(|c| c.is_ascii_alphabetic())
            }
            Class::Id => {
                !segment.is_empty()
                    && segment.len() <= 64
                    && segment.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            }
            Class::Operation => segment.strip_prefix('$').is_some_and(|name| {
                name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }),
            Class::Any => true,
        }
    }

    /// A segment both classes accept, if any.
    fn common_example(self, other: Class) -> Option<&'static str> {
        use Class::*;
        match (self, other) {
            (Any, Any) => Some("x"),
            (Type, Type) | (Type, Id) | (Id, Type) | (Type, Any) | (Any, Type) => Some("Patient"),
            (Id, Id) | (Id, Any) | (Any, Id) => Some("123"),
            (Operation, Operation) | (Operation, Any) | (Any, Operation) => Some("$op"),
            (Operation, _) | (_, Operation) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Param { name: String, class: Class },
}

impl Segment {
    fn accepts(&self, segment: &str) -> bool {
        match self {
            Segment::Literal(lit) => lit == segment,
            Segment::Param { class, .. } => class.accepts(segment),
        }
    }

    /// A concrete segment both accept, if any.
    fn common_example(&self, other: &Segment) -> Option<String> {
        match (self, other) {
            (Segment::Literal(a), Segment::Literal(b)) => (a == b).then(|| a.clone()),
            (Segment::Literal(lit), Segment::Param { class, .. })
            | (Segment::Param { class, .. }, Segment::Literal(lit)) => class.accepts(lit).then(|| lit.clone()),
            (Segment::Param { class: a, .. }, Segment::Param { class: b, .. }) => {
                a.common_example(*b).map(str::to_owned)
            }
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("path pattern must start with '/'")]
    NotAbsolute,
    #[error("path pattern has an empty segment")]
    EmptySegment,
    #[error("'**' is only allowed as the last segment")]
    RestNotLast,
    #[error("segment `{0}` is not a valid literal (letters, digits, '$', '_', '-', '.', ':' only; not '.' or '..')")]
    BadLiteral(String),
    #[error("segment `{0}` is not a valid parameter (`{{name}}` with a lowercase name)")]
    BadParam(String),
    #[error("parameter name `{0}` is used twice")]
    DuplicateParam(String),
    #[error("path pattern is longer than 32 segments")]
    TooLong,
}

/// A parsed route pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
    /// Ends in `**`: matches any number (including zero) of further segments.
    rest: bool,
}

/// Specificity. Compared lexicographically: a pattern without `**` beats one with it; then an all-literal pattern
/// beats a parameterised one; then more literal segments win; then more typed parameters (`{type}`, `{id}`, `{op}`)
/// over `*`; then more segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    bounded: bool,
    exact: bool,
    literals: usize,
    typed_params: usize,
    segments: usize,
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        let Some(body) = source.strip_prefix('/') else {
            return Err(PatternError::NotAbsolute);
        };
        let mut segments = Vec::new();
        let mut rest = false;
        if !body.is_empty() {
            let parts: Vec<&str> = body.split('/').collect();
            if parts.len() > 32 {
                return Err(PatternError::TooLong);
            }
            for (i, part) in parts.iter().enumerate() {
                if part.is_empty() {
                    return Err(PatternError::EmptySegment);
                }
                if *part == "**" {
                    if i + 1 != parts.len() {
                        return Err(PatternError::RestNotLast);
                    }
                    rest = true;
                    continue;
                }
                segments.push(parse_segment(part)?);
            }
        }
        let mut names: Vec<&str> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param { name, .. } if name != "*" => Some(name.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(PatternError::DuplicateParam(pair[0].to_owned()));
        }
        Ok(Self { source: source.to_owned(), segments, rest })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn rank(&self) -> Rank {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let typed_params =
            self.segments.iter().filter(|s| matches!(s, Segment::Param { class, .. } if *class != Class::Any)).count();
        Rank {
            bounded: !self.rest,
            exact: !self.rest && literals == self.segments.len(),
            literals,
            typed_params,
            segments: self.segments.len(),
        }
    }

    /// Matches decoded request segments (relative to the table's base path); returns the captured parameters.
    pub fn matches<'a>(&self, path: &'a [String]) -> Option<Vec<(&str, &'a str)>> {
        if path.len() < self.segments.len() || (!self.rest && path.len() != self.segments.len()) {
            return None;
        }
        let mut captures = Vec::new();
        for (pattern, actual) in self.segments.iter().zip(path) {
            if !pattern.accepts(actual) {
                return None;
            }
            if let Segment::Param { name, .. } = pattern {
                captures.push((name.as_str(), actual.as_str()));
            }
        }
        Some(captures)
    }

    /// A request path that both patterns match, if one exists.
    pub fn overlap(&self, other: &Pattern) -> Option<String> {
        let (short, long) = if self.segments.len() <= other.segments.len() { (self, other) } else { (other, self) };
        // Without `**`, the shorter pattern cannot match the longer one's extra segments.
        if short.segments.len() < long.segments.len() && !short.rest {
            return None;
        }
        let mut example = Vec::with_capacity(long.segments.len());
        for (i, seg) in long.segments.iter().enumerate() {
            match short.segments.get(i) {
                Some(other_seg) => example.push(seg.common_example(other_seg)?),
                None => example.push(match seg {
                    Segment::Literal(lit) => lit.clone(),
                    Segment::Param { class, .. } => class.common_example(*class).unwrap_or("x").to_owned(),
                }),
            }
        }
        Some(format!("/{}", example.join("/")))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn parse_segment(part: &str) -> Result<Segment, PatternError> {
    if part == "*" {
        return Ok(Segment::Param { name: "*".to_owned(), class: Class::Any });
    }
    if let Some(inner) = part.strip_prefix('{') {
        let Some(name) = inner.strip_suffix('}') else {
            return Err(PatternError::BadParam(part.to_owned()));
        };
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(PatternError::BadParam(part.to_owned()));
        }
        let class = match name {
            "type" => Class::Type,
            "op" => Class::Operation,
            _ => Class::Id,
        };
        return Ok(Segment::Param { name: name.to_owned(), class });
    }
    let valid = part != "."
        && part != ".."
        && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '$' | '_' | '-' | '.' | ':'));
    if !valid {
        return Err(PatternError::BadLiteral(part.to_owned()));
    }
    Ok(Segment::Literal(part.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn segs(path: &str) -> Vec<String> {
        path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, PatternError)] = &[
            ("Patient", PatternError::NotAbsolute),
            ("/Patient//x", PatternError::EmptySegment),
            ("/**/x", PatternError::RestNotLast),
            ("/{Type}", PatternError::BadParam("{Type}".into())),
            ("/{id", PatternError::BadParam("{id".into())),
            ("/a b", PatternError::BadLiteral("a b".into())),
            ("/..", PatternError::BadLiteral("..".into())),
            ("/{id}/{id}", PatternError::DuplicateParam("id".into())),
        ];
        for (src, want) in cases {
            assert_eq!(Pattern::parse(src).as_ref().err(), Some(want), "{src}");
        }
    }

    #[test]
    fn matching_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("/{type}/{id}", "/Patient/123", true),
            ("/{type}/{id}", "/Patient/$everything", false),
            ("/{type}/{id}", "/Patient/_history", false),
            ("/{type}/{id}", "/patient/123", false),
            ("/{type}/{id}", "/Patient", false),
            ("/{type}/{id}", "/Patient/1/2", false),
            ("/{type}/{op}", "/Patient/$export", true),
            ("/{type}/{op}", "/Patient/123", false),
            ("/Patient/$export", "/Patient/$export", true),
            ("/**", "/", true),
            ("/**", "/a/b/c", true),
            ("/Patient/**", "/Patient", true),
            ("/Patient/**", "/Observation/1", false),
            ("/*/x", "/anything/x", true),
            ("/", "/", true),
            ("/", "/a", false),
        ];
        for (pattern, path, want) in cases {
            assert_eq!(p(pattern).matches(&segs(path)).is_some(), *want, "{pattern} vs {path}");
        }
        let pattern = p("/{type}/{id}/_history/{vid}");
        let path = segs("/Patient/7/_history/3");
        let captured = pattern.matches(&path);
        assert_eq!(captured, Some(vec![("type", "Patient"), ("id", "7"), ("vid", "3")]));
    }

    #[test]
    fn ranks_order_by_specificity() {
        // Each pattern strictly beats the next one.
        let ordered = ["/Patient/$export", "/{type}/$export", "/{type}/{op}", "/{type}/*", "/Patient/**", "/**"];
        for pair in ordered.windows(2) {
            assert!(p(pair[0]).rank() > p(pair[1]).rank(), "{} should beat {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn overlap_table() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("/{type}/{id}", "/Patient/{id}", Some("/Patient/123")),
            ("/{type}/{id}", "/{type}/$export", None),
            ("/{type}/{id}", "/{type}/_history", None),
            ("/Patient/{id}", "/{type}/123", Some("/Patient/123")),
            ("/**", "/Patient/$export", Some("/Patient/$export")),
            ("/Patient/**", "/Observation/**", None),
            ("/Patient/**", "/Patient", Some("/Patient")),
            ("/a/b", "/a/b/c", None),
            ("/*", "/{op}", Some("/$op")),
            ("/**", "/", Some("/")),
        ];
        for (a, b, want) in cases {
            assert_eq!(p(a).overlap(&p(b)).as_deref(), *want, "{a} ∩ {b}");
            assert_eq!(p(b).overlap(&p(a)).as_deref(), *want, "{b} ∩ {a}");
        }
    }

    #[test]
    fn overlap_witness_is_matched_by_both() {
        let patterns = ["/{type}/{id}", "/Patient/{id}", "/**", "/Patient/**", "/*/x", "/{type}/*", "/{op}"];
        for a in patterns {
            for b in patterns {
                if let Some(witness) = p(a).overlap(&p(b)) {
                    let path = segs(&witness);
                    assert!(p(a).matches(&path).is_some(), "{a} should match {witness}");
                    assert!(p(b).matches(&path).is_some(), "{b} should match {witness}");
                }
            }
        }
    }
}
