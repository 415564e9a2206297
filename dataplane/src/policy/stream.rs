//! Streaming verification of upstream Bundles: entries are filtered one by one while the body flows, so memory is
//! bounded by the largest single entry (plus small buffers) whatever the size of the Bundle.
//!
//! [`BundleFilter`] is a pure, synchronous, incremental byte transformer. A small lexer finds the top-level members
//! and, inside `entry`, the element boundaries (it tracks only depth and string/escape state); each element is then
//! buffered, parsed with serde_json, decided by the [`EntryPolicy`] and re-serialised if kept. Every byte that reaches
//! the output has been validated by serde_json (entries, `link` and `total` are parsed; other top-level members are
//! validated and copied verbatim), and the closing `}` is written only by [`BundleFilter::finish`], so the output is
//! a complete JSON document only if the whole input was a valid Bundle.
//!
//! Output rules:
//! - Members other than `entry`, `link`, `total` are copied unchanged, in place.
//! - `entry`: only kept entries, in order. When no entry is kept (or the upstream sent `[]`) the member is omitted,
//!   as `verify::filter_bundle` does.
//! - `link`: replaced, in place, by what [`EntryPolicy::links`] returns.
//! - `total`: always moved to the last member, and only ever written if the upstream sent one: the upstream's value
//!   when `keep_total` is set and no match entry was dropped (`verify::keeps_total`, the one rule for every page);
//!   otherwise it is removed. Dropped `include` and `outcome` entries do not count.
//! - A second `resourceType`, `entry`, `link` or `total` member (names compared after unescaping) is an error: a
//!   client parser might pick the other one.

use serde::de::IgnoredAny;
use serde_json::Value;

use super::verify::{EntryMode, keeps_total};

/// What [`EntryPolicy::entry_raw`] decided about an entry from its bytes.
#[derive(Debug)]
pub enum RawVerdict<'a> {
    /// Keep these bytes as the entry (the input itself, or the input with a splice).
    Keep(std::borrow::Cow<'a, [u8]>),
    /// Drop the entry, which had this `search.mode`.
    Drop(EntryMode),
    /// Only the parsed path ([`EntryPolicy::entry`]) can decide.
    Undecided,
}

/// Decides the entries and links of one Bundle.
pub trait EntryPolicy {
    /// Decides one entry from its raw bytes when that is enough (the fast path). The bytes were delimited by the
    /// lexer but not validated: a verdict other than `Undecided` must only be given for bytes the policy has
    /// validated as one complete JSON value. The default leaves every entry to [`EntryPolicy::entry`].
    fn entry_raw<'a>(&mut self, _raw: &'a [u8]) -> RawVerdict<'a> {
        RawVerdict::Undecided
    }
    /// Decide one entry (the whole `entry` array element, parsed). Return `Some` (possibly modified, e.g. `fullUrl`
    /// rewritten) to keep it, `None` to drop it.
    fn entry(&mut self, entry: Value) -> Option<Value>;
    /// Rewrite the whole `link` array (parsed; it is small). Return the new array (it may drop links).
    fn links(&mut self, links: Value) -> Value;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Largest accepted `entry` element, in bytes of upstream JSON.
    pub max_entry_bytes: usize,
    /// Largest accepted value (or name) of any other top-level member, `link` and `total` included.
    pub max_other_bytes: usize,
    /// The upstream's `total` may be kept (the search was narrowed upstream with the tenant's tags). It is still
    /// removed if a match entry is dropped, so it can never reveal an unfiltered count.
    pub keep_total: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_entry_bytes: 16 << 20, max_other_bytes: 1 << 20, keep_total: false }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub kept: usize,
    pub dropped: usize,
    /// Dropped entries that were matches (`EntryMode::Match`).
    pub dropped_matches: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("malformed JSON at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("the body is not a Bundle")]
    NotABundle,
    #[error("Bundle.{member} at byte {offset} is not an array")]
    NotAnArray { member: &'static str, offset: u64 },
    #[error("a Bundle entry at byte {offset} is larger than {limit} bytes")]
    EntryTooLarge { offset: u64, limit: usize },
    #[error("a Bundle member at byte {offset} is larger than {limit} bytes")]
    MemberTooLarge { offset: u64, limit: usize },
    #[error("duplicate Bundle.{0}")]
    DuplicateMember(&'static str),
    #[error("data after the end of the Bundle at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("the body ended before the Bundle was complete")]
    Incomplete,
    #[error("cannot encode an entry: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the filter already failed")]
    Failed,
}

/// Top-level members with a meaning here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    ResourceType,
    Entry,
    Link,
    Total,
    Other,
}

impl Member {
    fn name(self) -> &'static str {
        match self {
            Member::ResourceType => "resourceType",
            Member::Entry => "entry",
            Member::Link => "link",
            Member::Total => "total",
            Member::Other => "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level `{`.
    Start,
    /// After `{`: a member name or `}`.
    FirstKey,
    /// After `,`: a member name.
    NextKey,
    /// Inside a member name (buffered in `key`).
    Key,
    Colon(Member),
    /// After `:`, skipping whitespace.
    ValueStart(Member),
    /// Inside a member value (buffered in `buf`).
    Value(Member),
    /// After a member: `,` or `}`.
    AfterMember,
    /// After `entry`'s `[`: an element or `]`.
    EntryStart,
    /// After `,` in `entry`: an element.
    NextEntry,
    /// Inside an element (buffered in `buf`).
    Entry,
    /// After an element: `,` or `]`.
    AfterEntry,
    /// After the top-level `}`: only whitespace.
    Done,
}

/// Finds the end of one JSON value. It checks only what it needs to find the end (strings, escapes, bracket depth):
/// the value's bytes are validated by serde_json once complete.
#[derive(Debug, Default)]
struct Scan {
    started: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
    scalar: bool,
}

impl Scan {
    /// How many bytes of `input` belong to the value, and whether it ended; `None` if no value starts with
    /// `input[0]`. A scalar ends before the first byte that cannot be part of it (which is not consumed).
    fn scan(&mut self, input: &[u8]) -> Option<(usize, bool)> {
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
fn find_quote_or_backslash(s: &[u8]) -> Option<usize> {
    memchr::memchr2(b'"', b'\\', s)
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

enum FeedError {
    NoValue,
    TooLarge,
}

/// Scans the next bytes of a value into `buf`, refusing to grow it beyond `limit`.
fn feed(scan: &mut Scan, buf: &mut Vec<u8>, input: &[u8], limit: usize) -> Result<(usize, bool), FeedError> {
    let (n, done) = scan.scan(input).ok_or(FeedError::NoValue)?;
    if buf.len().saturating_add(n) > limit {
        return Err(FeedError::TooLarge);
    }
    buf.extend_from_slice(&input[..n]);
    Ok((n, done))
}

/// Filters one Bundle, streaming. See the module documentation for the output rules.
pub struct BundleFilter<P: EntryPolicy> {
    policy: P,
    options: Options,
    state: State,
    scan: Scan,
    /// The member name being read (and, for members copied verbatim, written).
    key: Vec<u8>,
    /// The value or entry being read. Reused: its capacity is that of the largest value so far.
    buf: Vec<u8>,
    /// Offset of the next input byte.
    offset: u64,
    /// Offset where the buffered value started.
    value_start: u64,
    /// Members written so far (for commas).
    written: usize,
    seen: [bool; 4],
    total: Option<Value>,
    stats: Stats,
    failed: bool,
}

impl<P: EntryPolicy> BundleFilter<P> {
    pub fn new(policy: P, options: Options) -> Self {
        BundleFilter {
            policy,
            options,
            state: State::Start,
            scan: Scan::default(),
            key: Vec::new(),
            buf: Vec::new(),
            offset: 0,
            value_start: 0,
            written: 0,
            seen: [false; 4],
            total: None,
            stats: Stats::default(),
            failed: false,
        }
    }

    /// Entries decided so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Feeds the next chunk of upstream bytes (split anywhere) and appends the output bytes to `out`. After an error
    /// the response must be aborted; further calls fail.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.failed {
            return Err(StreamError::Failed);
        }
        let mut i = 0;
        while i < chunk.len() {
            match self.step(&chunk[i..], out) {
                Ok(n) => {
                    i += n;
                    self.offset += n as u64;
                }
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// End of input: checks the document was a complete Bundle and writes the tail (`total`, the closing `}`).
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Stats, StreamError> {
        if self.failed {
            return Err(StreamError::Failed);
        }
        if self.state != State::Done {
            return Err(StreamError::Incomplete);
        }
        if !self.seen[0] {
            return Err(StreamError::NotABundle);
        }
        if let Some(total) = self.total.take()
            && keeps_total(self.options.keep_total, self.stats.dropped_matches)
        {
            self.member_prefix(out, b"\"total\":");
            serde_json::to_writer(&mut *out, &total).map_err(StreamError::Encode)?;
        }
        out.push(b'}');
        Ok(self.stats)
    }

    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.buf.capacity() + self.key.capacity()
    }

    /// Consumes a prefix of `input` (non-empty); 0 only when the state changes.
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, StreamError> {
        let b = input[0];
        let ws = is_ws(b);
        match self.state {
            State::Start => {
                if ws {
                    return Ok(1);
                }
                if b != b'{' {
                    return Err(StreamError::NotAnObject);
                }
                out.push(b'{');
                self.state = State::FirstKey;
                Ok(1)
            }
            State::FirstKey | State::NextKey => {
                if ws {
                    return Ok(1);
                }
                match b {
                    b'"' => {
                        self.key.clear();
                        self.begin_value(State::Key);
                        Ok(0)
                    }
                    b'}' if self.state == State::FirstKey => {
                        self.state = State::Done;
                        Ok(1)
                    }
                    _ => Err(self.malformed("expected a member name")),
                }
            }
            State::Key => {
                let (n, done) =
                    feed(&mut self.scan, &mut self.key, input, self.options.max_other_bytes).map_err(|_| {
                        StreamError::MemberTooLarge { offset: self.value_start, limit: self.options.max_other_bytes }
                    })?;
                if done {
                    let member = self.member()?;
                    self.state = State::Colon(member);
                }
                Ok(n)
            }
            State::Colon(member) => {
                if ws {
                    return Ok(1);
                }
                if b != b':' {
                    return Err(self.malformed("expected `:`"));
                }
                self.state = State::ValueStart(member);
                Ok(1)
            }
            State::ValueStart(member) => {
                if ws {
                    return Ok(1);
                }
                if member == Member::Entry {
                    if b != b'[' {
                        return Err(StreamError::NotAnArray { member: "entry", offset: self.offset });
                    }
                    self.state = State::EntryStart;
                    return Ok(1);
                }
                self.buf.clear();
                self.begin_value(State::Value(member));
                Ok(0)
            }
            State::Value(member) => {
                let limit = self.options.max_other_bytes;
                let (n, done) = feed(&mut self.scan, &mut self.buf, input, limit).map_err(|e| match e {
                    FeedError::NoValue => self.malformed("expected a value"),
                    FeedError::TooLarge => StreamError::MemberTooLarge { offset: self.value_start, limit },
                })?;
                if done {
                    self.write_member(member, out)?;
                    self.state = State::AfterMember;
                }
                Ok(n)
            }
            State::AfterMember => {
                if ws {
                    return Ok(1);
                }
                match b {
                    b',' => self.state = State::NextKey,
                    b'}' => self.state = State::Done,
                    _ => return Err(self.malformed("expected `,` or `}`")),
                }
                Ok(1)
            }
            State::EntryStart | State::NextEntry => {
                if ws {
                    return Ok(1);
                }
                if b == b']' && self.state == State::EntryStart {
                    self.state = State::AfterMember;
                    return Ok(1);
                }
                self.buf.clear();
                self.begin_value(State::Entry);
                Ok(0)
            }
            State::Entry => {
                let limit = self.options.max_entry_bytes;
                let (n, done) = feed(&mut self.scan, &mut self.buf, input, limit).map_err(|e| match e {
                    FeedError::NoValue => self.malformed("expected an entry"),
                    FeedError::TooLarge => StreamError::EntryTooLarge { offset: self.value_start, limit },
                })?;
                if done {
                    self.write_entry(out)?;
                    self.state = State::AfterEntry;
                }
                Ok(n)
            }
            State::AfterEntry => {
                if ws {
                    return Ok(1);
                }
                match b {
                    b',' => self.state = State::NextEntry,
                    b']' => {
                        if self.stats.kept > 0 {
                            out.push(b']');
                        }
                        self.state = State::AfterMember;
                    }
                    _ => return Err(self.malformed("expected `,` or `]`")),
                }
                Ok(1)
            }
            State::Done => {
                if ws {
                    return Ok(1);
                }
                Err(StreamError::TrailingData { offset: self.offset })
            }
        }
    }

    fn begin_value(&mut self, state: State) {
        self.scan = Scan::default();
        self.value_start = self.offset;
        self.state = state;
    }

    fn malformed(&self, reason: &str) -> StreamError {
        StreamError::Malformed { offset: self.offset, reason: reason.to_owned() }
    }

    fn invalid(&self, e: &serde_json::Error) -> StreamError {
        StreamError::Malformed { offset: self.value_start, reason: e.to_string() }
    }

    /// Classifies the member name just read, refusing a second occurrence of a member with a meaning here.
    fn member(&mut self) -> Result<Member, StreamError> {
        let name: String = serde_json::from_slice(&self.key).map_err(|e| self.invalid(&e))?;
        let (member, seen) = match name.as_str() {
            "resourceType" => (Member::ResourceType, 0),
            "entry" => (Member::Entry, 1),
            "link" => (Member::Link, 2),
            "total" => (Member::Total, 3),
            _ => return Ok(Member::Other),
        };
        if std::mem::replace(&mut self.seen[seen], true) {
            return Err(StreamError::DuplicateMember(member.name()));
        }
        Ok(member)
    }

    fn member_prefix(&mut self, out: &mut Vec<u8>, name: &[u8]) {
        if self.written > 0 {
            out.push(b',');
        }
        self.written += 1;
        out.extend_from_slice(name);
    }

    fn parse_buf<T: serde::de::DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.buf).map_err(|e| self.invalid(&e))
    }

    /// A complete value of a member other than `entry` is in `buf`.
    fn write_member(&mut self, member: Member, out: &mut Vec<u8>) -> Result<(), StreamError> {
        match member {
            Member::ResourceType => {
                let value: Value = self.parse_buf()?;
                if value.as_str() != Some("Bundle") {
                    return Err(StreamError::NotABundle);
                }
                self.member_prefix(out, b"\"resourceType\":\"Bundle\"");
            }
            Member::Link => {
                let links: Value = self.parse_buf()?;
                if !links.is_array() {
                    return Err(StreamError::NotAnArray { member: "link", offset: self.value_start });
                }
                let links = self.policy.links(links);
                self.member_prefix(out, b"\"link\":");
                serde_json::to_writer(&mut *out, &links).map_err(StreamError::Encode)?;
            }
            Member::Total => self.total = Some(self.parse_buf()?),
            // (`entry` never gets here.)
            Member::Other | Member::Entry => {
                // Copied verbatim, so validated first (serde skips values without checking their UTF-8).
                if std::str::from_utf8(&self.buf).is_err() {
                    return Err(StreamError::Malformed { offset: self.value_start, reason: "invalid UTF-8".into() });
                }
                self.parse_buf::<IgnoredAny>()?;
                if self.written > 0 {
                    out.push(b',');
                }
                self.written += 1;
                out.extend_from_slice(&self.key);
                out.push(b':');
                out.extend_from_slice(&self.buf);
            }
        }
        Ok(())
    }

    fn count_dropped(&mut self, mode: EntryMode) {
        self.stats.dropped += 1;
        if mode == EntryMode::Match {
            self.stats.dropped_matches += 1;
        }
    }

    /// A complete `entry` element is in `buf`.
    fn write_entry(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        match self.policy.entry_raw(&self.buf) {
            RawVerdict::Drop(mode) => {
                self.count_dropped(mode);
                return Ok(());
            }
            RawVerdict::Keep(bytes) => {
                if self.stats.kept == 0 {
                    // As `member_prefix`, on fields disjoint from the borrowed `buf`.
                    if self.written > 0 {
                        out.push(b',');
                    }
                    self.written += 1;
                    out.extend_from_slice(b"\"entry\":[");
                } else {
                    out.push(b',');
                }
                out.extend_from_slice(&bytes);
                self.stats.kept += 1;
                return Ok(());
            }
            RawVerdict::Undecided => {}
        }
        let entry: Value = self.parse_buf()?;
        let mode = EntryMode::of(&entry);
        let Some(entry) = self.policy.entry(entry) else {
            self.count_dropped(mode);
            return Ok(());
        };
        if self.stats.kept == 0 {
            self.member_prefix(out, b"\"entry\":[");
        } else {
            out.push(b',');
        }
        self.stats.kept += 1;
        serde_json::to_writer(&mut *out, &entry).map_err(StreamError::Encode)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use fhirgw_config::tenant::Tag;
    use serde_json::json;

    use super::*;
    use crate::policy::verify::Grants;

    const UP: &str = "http://up/fhir";
    const PUB: &str = "https://gw/fhir";
    const DATASET: &str = "https://fhirgw.dev/dataset";

    /// What the proxy does: `verify::filter_bundle`'s entry rule, `rewrite_full_urls`, and links kept only when on
    /// the upstream (moved to the public base).
    struct TestPolicy {
        grants: Grants,
    }

    fn policy() -> TestPolicy {
        let tag = Tag { system: DATASET.into(), code: "a".into() };
        TestPolicy { grants: Grants::new([&tag]) }
    }

    impl EntryPolicy for TestPolicy {
        fn entry(&mut self, mut entry: Value) -> Option<Value> {
            let keep = entry.get("resource").is_some_and(|r| {
                !matches!(r.get("resourceType").and_then(Value::as_str), None | Some("OperationOutcome" | "Bundle"))
                    && self.grants.covers(r)
            });
            if !keep {
                return None;
            }
            if let Some(Value::String(url)) = entry.get_mut("fullUrl")
                && let Some(rest) = url.strip_prefix(UP)
            {
                *url = format!("{PUB}{rest}");
            }
            Some(entry)
        }

        fn links(&mut self, mut links: Value) -> Value {
            if let Some(list) = links.as_array_mut() {
                list.retain_mut(|link| {
                    let Some(Value::String(url)) = link.get_mut("url") else { return false };
                    match url.strip_prefix(UP) {
                        Some(rest) => {
                            *url = format!("{PUB}{rest}");
                            true
                        }
                        None => false,
                    }
                });
            }
            links
        }
    }

    fn opts(keep_total: bool) -> Options {
        Options { max_entry_bytes: 4096, max_other_bytes: 1024, keep_total }
    }

    type Outcome = Result<(Vec<u8>, Stats), StreamError>;

    fn run_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, options: Options) -> Outcome {
        let mut filter = BundleFilter::new(policy(), options);
        let mut out = Vec::new();
        for chunk in chunks {
            filter.push(chunk, &mut out)?;
        }
        let stats = filter.finish(&mut out)?;
        Ok((out, stats))
    }

    fn run(input: &[u8], options: Options) -> Outcome {
        run_chunks([input], options)
    }

    fn same(a: &Outcome, b: &Outcome) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }

    /// Same output (bytes, or error) whatever the chunking: every single cut point, and 1-byte chunks.
    fn assert_chunking_invariant(input: &[u8], options: Options) -> Outcome {
        let whole = run(input, options);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let split = run_chunks([a, b], options);
            assert!(same(&whole, &split), "cut at {cut} of {}: {whole:?} vs {split:?}", String::from_utf8_lossy(input));
        }
        let bytes = run_chunks(input.chunks(1), options);
        assert!(same(&whole, &bytes), "1-byte chunks of {}", String::from_utf8_lossy(input));
        whole
    }

    /// The buffered approach, with the same rules.
    fn reference(input: &[u8], options: Options) -> Option<(Value, Stats)> {
        let mut doc: Value = serde_json::from_slice(input).ok()?;
        let obj = doc.as_object_mut()?;
        if obj.get("resourceType")? != "Bundle" {
            return None;
        }
        let mut policy = policy();
        let mut stats = Stats::default();
        if let Some(entries) = obj.remove("entry") {
            let mut kept = Vec::new();
            let Value::Array(entries) = entries else { return None };
            for entry in entries {
                let mode = EntryMode::of(&entry);
                match policy.entry(entry) {
                    Some(e) => kept.push(e),
                    None => {
                        stats.dropped += 1;
                        stats.dropped_matches += usize::from(mode == EntryMode::Match);
                    }
                }
            }
            stats.kept = kept.len();
            if !kept.is_empty() {
                obj.insert("entry".into(), Value::Array(kept));
            }
        }
        if let Some(links) = obj.remove("link") {
            links.as_array()?;
            let links = policy.links(links);
            obj.insert("link".into(), links);
        }
        if let Some(total) = obj.remove("total")
            && keeps_total(options.keep_total, stats.dropped_matches)
        {
            obj.insert("total".into(), total);
        }
        Some((doc, stats))
    }

    fn parsed(outcome: &Outcome) -> (Value, Stats) {
        let (bytes, stats) = outcome.as_ref().unwrap();
        let value = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)));
        (value, *stats)
    }

    fn entry_json(id: &str, code: &str, base: &str) -> Value {
        json!({
            "fullUrl": format!("{base}/Patient/{id}"),
            "resource": {"resourceType": "Patient", "id": id, "meta": {"tag": [{"system": DATASET, "code": code}]}},
            "search": {"mode": "match"}
        })
    }

    /// Kept entry as the upstream writes it, and as it comes out.
    fn k(id: &str) -> String {
        entry_json(id, "a", UP).to_string()
    }
    fn k_out(id: &str) -> Value {
        entry_json(id, "a", PUB)
    }
    /// Dropped entry (a match).
    fn d(id: &str) -> String {
        entry_json(id, "b", UP).to_string()
    }
    /// Dropped entry, included.
    fn d_include(id: &str) -> String {
        let mut e = entry_json(id, "b", UP);
        e["search"]["mode"] = json!("include");
        e.to_string()
    }
    /// Dropped entry without `search`.
    fn d_no_mode(id: &str) -> String {
        let mut e = entry_json(id, "b", UP);
        e.as_object_mut().map(|o| o.remove("search"));
        e.to_string()
    }

    fn table() -> Vec<(&'static str, String, bool, Value)> {
        let self_link = r#"{"relation":"self","url":"http://up/fhir/Patient"}"#;
        let next_link = r#"{"relation":"next","url":"http://up/fhir?page=2"}"#;
        let foreign_next = r#"{"relation":"next","url":"http://elsewhere/fhir?page=2"}"#;
        let self_out = json!({"relation": "self", "url": "https://gw/fhir/Patient"});
        let next_out = json!({"relation": "next", "url": "https://gw/fhir?page=2"});
        vec![
            (
                "kept and dropped, total before, link after",
                format!(
                    r#"{{"resourceType":"Bundle","type":"searchset","total":3,"entry":[{},{},{}],"link":[{self_link}]}}"#,
                    k("1"),
                    d("2"),
                    k("3")
                ),
                false,
                json!({"resourceType": "Bundle", "type": "searchset", "entry": [k_out("1"), k_out("3")],
                    "link": [self_out]}),
            ),
            (
                "no entry member",
                r#"{"resourceType":"Bundle","type":"searchset","total":0}"#.into(),
                true,
                json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
            ),
            (
                "empty entry array is omitted",
                r#"{"resourceType":"Bundle","entry":[],"total":7}"#.into(),
                false,
                json!({"resourceType": "Bundle"}),
            ),
            (
                "all dropped, more pages: no entry, no total",
                format!(r#"{{"resourceType":"Bundle","total":9,"entry":[{},{}],"link":[{next_link}]}}"#, d("1"), d("2")),
                false,
                json!({"resourceType": "Bundle", "link": [next_out]}),
            ),
            (
                "link before entry with next",
                format!(r#"{{"link":[{self_link},{next_link}],"resourceType":"Bundle","entry":[{}],"total":40}}"#, k("1")),
                false,
                json!({"resourceType": "Bundle", "link": [self_out, next_out], "entry": [k_out("1")]}),
            ),
            (
                "next link off the upstream is dropped: this is the last page",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{},{}],"link":[{foreign_next}]}}"#, k("1"), d("2")),
                false,
                json!({"resourceType": "Bundle", "entry": [k_out("1")], "link": []}),
            ),
            (
                "resourceType last, total in the middle",
                format!(r#"{{"entry":[{},{}],"total":5,"id":"x","resourceType":"Bundle"}}"#, k("1"), d("2")),
                false,
                json!({"resourceType": "Bundle", "id": "x", "entry": [k_out("1")]}),
            ),
            (
                "keep_total and nothing dropped: the upstream's total",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{}],"link":[{next_link}]}}"#, k("1")),
                true,
                json!({"resourceType": "Bundle", "total": 40, "entry": [k_out("1")], "link": [next_out]}),
            ),
            (
                "keep_total but a match dropped, last page: no total, never the kept count",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{},{}]}}"#, k("1"), d("2")),
                true,
                json!({"resourceType": "Bundle", "entry": [k_out("1")]}),
            ),
            (
                "keep_total, an include dropped: the upstream's total",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{},{}],"link":[{next_link}]}}"#, k("1"), d_include("2")),
                true,
                json!({"resourceType": "Bundle", "total": 40, "entry": [k_out("1")], "link": [next_out]}),
            ),
            (
                "keep_total, an entry without a mode dropped: taken for a match",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{},{}]}}"#, k("1"), d_no_mode("2")),
                true,
                json!({"resourceType": "Bundle", "entry": [k_out("1")]}),
            ),
            (
                "keep_total but an entry dropped and more pages: no total",
                format!(r#"{{"resourceType":"Bundle","total":40,"entry":[{},{}],"link":[{next_link}]}}"#, k("1"), d("2")),
                true,
                json!({"resourceType": "Bundle", "entry": [k_out("1")], "link": [next_out]}),
            ),
            (
                "no total upstream: none added",
                format!(r#"{{"resourceType":"Bundle","type":"collection","entry":[{},{}]}}"#, k("1"), d("2")),
                false,
                json!({"resourceType": "Bundle", "type": "collection", "entry": [k_out("1")]}),
            ),
            (
                "strings with brackets, commas, quotes, escapes and member names",
                format!(
                    r#"{{"resourceType":"Bundle","text":"\"entry\":[{{]}},","entry":[{{"resource":{{"resourceType":"Patient","meta":{{"tag":[{{"system":"{DATASET}","code":"a"}}]}},"text":{{"div":"<div>] }} , \"entry\":[ {{ \\</div>"}},"name":[[["\u00e9\ud83d\ude00"]],{{}},[]],"]":"}}","x\\":"\\"}}}},{}]}}"#,
                    d("2")
                ),
                false,
                json!({"resourceType": "Bundle", "text": "\"entry\":[{]},", "entry": [{"resource": {
                    "resourceType": "Patient", "meta": {"tag": [{"system": DATASET, "code": "a"}]},
                    "text": {"div": "<div>] } , \"entry\":[ { \\</div>"},
                    "name": [[["é😀"]], {}, []], "]": "}", "x\\": "\\"}}]}),
            ),
            (
                "whitespace everywhere",
                format!(
                    " \n{{\r\n\t\"resourceType\" :\t\"Bundle\" ,\n \"total\"\n:\n3 , \"entry\" : [ \n {} , \n {}\n\t] , \"id\" : \"x\" \n , \"n\" : -1.5e3 }} \n\t",
                    k("1"),
                    d("2")
                ),
                true,
                json!({"resourceType": "Bundle", "entry": [k_out("1")], "id": "x", "n": -1.5e3}),
            ),
            (
                "escaped member names are the same members",
                format!(r#"{{"\u0072esourceType":"Bundle","\u0065ntry":[{},{}],"\u0074otal":2}}"#, d_include("1"), k("2")),
                true,
                json!({"resourceType": "Bundle", "entry": [k_out("2")], "total": 2}),
            ),
            (
                "entries that are not objects or have no resource are dropped",
                r#"{"resourceType":"Bundle","entry":[null,1,-2.5,"x",true,[],{},{"resource":null},{"request":{"method":"DELETE"}}]}"#.into(),
                false,
                json!({"resourceType": "Bundle"}),
            ),
            (
                "other members of every kind pass through",
                r#"{"resourceType":"Bundle","id":"b","meta":{"lastUpdated":"2024-01-01T00:00:00Z"},"n":null,"t":true,"f":false,"num":-0.5e-3,"big":12345678901234567890123,"arr":[1,[2,{"]":"}"}]],"s":"\u0000\n"}"#.into(),
                false,
                json!({"resourceType": "Bundle", "id": "b", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}, "n": null,
                    "t": true, "f": false, "num": -0.5e-3, "big": 1.2345678901234568e22, "arr": [1, [2, {"]": "}"}]],
                    "s": "\u{0}\n"}),
            ),
            (
                "an empty Bundle",
                r#"{"resourceType":"Bundle"}"#.into(),
                false,
                json!({"resourceType": "Bundle"}),
            ),
        ]
    }

    #[test]
    fn table_cases() {
        for (name, input, keep_total, want) in table() {
            let options = opts(keep_total);
            let outcome = assert_chunking_invariant(input.as_bytes(), options);
            let (got, stats) = parsed(&outcome);
            assert_eq!(got, want, "{name}");
            let (reference, reference_stats) = reference(input.as_bytes(), options).expect(name);
            assert_eq!(got, reference, "{name}: reference");
            assert_eq!(stats, reference_stats, "{name}: stats");
        }
    }

    #[test]
    fn other_members_are_copied_verbatim() {
        let input = br#"{"resourceType" : "Bundle", "x" : { "a" : 1.50 } ,"total":1,"entry":[]}"#;
        let (out, stats) = run(input, opts(true)).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"resourceType":"Bundle","x":{ "a" : 1.50 },"total":1}"#);
        assert_eq!(stats, Stats::default());
    }

    #[test]
    fn errors() {
        let big_entry = format!(r#"{{"resourceType":"Bundle","entry":[{{"x":"{}"}}]}}"#, "y".repeat(5000));
        let big_member = format!(r#"{{"resourceType":"Bundle","text":"{}"}}"#, "y".repeat(2000));
        let big_key = format!(r#"{{"resourceType":"Bundle","{}":1}}"#, "y".repeat(2000));
        let big_link = format!(r#"{{"resourceType":"Bundle","link":[{{"url":"{}"}}]}}"#, "y".repeat(2000));
        let invalid_utf8_entry = b"{\"resourceType\":\"Bundle\",\"entry\":[{\"a\":\"\xff\"}]}".to_vec();
        let invalid_utf8_member = b"{\"resourceType\":\"Bundle\",\"x\":[\"\xc3\"]}".to_vec();
        type Check = fn(&StreamError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"".to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (b"  ".to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (b"[]".to_vec(), |e| matches!(e, StreamError::NotAnObject)),
            (br#""Bundle""#.to_vec(), |e| matches!(e, StreamError::NotAnObject)),
            (b"\xef\xbb\xbf{}".to_vec(), |e| matches!(e, StreamError::NotAnObject)),
            (br#"{"resourceType":"Patient","id":"1"}"#.to_vec(), |e| matches!(e, StreamError::NotABundle)),
            (br#"{"resourceType":["Bundle"]}"#.to_vec(), |e| matches!(e, StreamError::NotABundle)),
            (br#"{"entry":[],"resourceType":"Patient"}"#.to_vec(), |e| matches!(e, StreamError::NotABundle)),
            (br#"{"id":"1","entry":[]}"#.to_vec(), |e| matches!(e, StreamError::NotABundle)),
            (b"{}".to_vec(), |e| matches!(e, StreamError::NotABundle)),
            (br#"{"resourceType":"Bundle","entry":[{"a":1}"#.to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (br#"{"resourceType":"Bundle","entry":[{"a":"#.to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (br#"{"resourceType":"Bundle""#.to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (br#"{"resourceType":"Bundle","total":1"#.to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (br#"{"resourceType":"Bu"#.to_vec(), |e| matches!(e, StreamError::Incomplete)),
            (br#"{"resourceType":"Bundle"} x"#.to_vec(), |e| matches!(e, StreamError::TrailingData { offset: 26 })),
            (br#"{"resourceType":"Bundle"}{}"#.to_vec(), |e| matches!(e, StreamError::TrailingData { .. })),
            (big_entry.into_bytes(), |e| matches!(e, StreamError::EntryTooLarge { limit: 4096, .. })),
            (big_member.into_bytes(), |e| matches!(e, StreamError::MemberTooLarge { limit: 1024, .. })),
            (big_key.into_bytes(), |e| matches!(e, StreamError::MemberTooLarge { limit: 1024, .. })),
            (big_link.into_bytes(), |e| matches!(e, StreamError::MemberTooLarge { limit: 1024, .. })),
            (br#"{"resourceType":"Bundle","entry":[],"entry":[]}"#.to_vec(), |e| {
                matches!(e, StreamError::DuplicateMember("entry"))
            }),
            (br#"{"resourceType":"Bundle","entry":[],"\u0065ntry":[]}"#.to_vec(), |e| {
                matches!(e, StreamError::DuplicateMember("entry"))
            }),
            (br#"{"resourceType":"Bundle","link":[],"link":[]}"#.to_vec(), |e| {
                matches!(e, StreamError::DuplicateMember("link"))
            }),
            (br#"{"resourceType":"Bundle","resourceType":"Bundle"}"#.to_vec(), |e| {
                matches!(e, StreamError::DuplicateMember("resourceType"))
            }),
            (br#"{"resourceType":"Bundle","total":1,"total":2}"#.to_vec(), |e| {
                matches!(e, StreamError::DuplicateMember("total"))
            }),
            (br#"{"resourceType":"Bundle","entry":{}}"#.to_vec(), |e| {
                matches!(e, StreamError::NotAnArray { member: "entry", .. })
            }),
            (br#"{"resourceType":"Bundle","entry":null}"#.to_vec(), |e| {
                matches!(e, StreamError::NotAnArray { member: "entry", .. })
            }),
            (br#"{"resourceType":"Bundle","link":{"relation":"next"}}"#.to_vec(), |e| {
                matches!(e, StreamError::NotAnArray { member: "link", .. })
            }),
            (br#"{"resourceType":"Bundle",}"#.to_vec(), |e| matches!(e, StreamError::Malformed { offset: 25, .. })),
            (br#"{"resourceType" "Bundle"}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle" "id":"1"}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","id":}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","id":tru}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","id":01}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","id":1"x":2}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{resourceType:"Bundle"}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","entry":[{"a":1},]}"#.to_vec(), |e| {
                matches!(e, StreamError::Malformed { .. })
            }),
            (br#"{"resourceType":"Bundle","entry":[,]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","entry":[{"a":}]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","entry":[1 2]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","entry":[{"a":[}]}]}"#.to_vec(), |e| {
                matches!(e, StreamError::Malformed { .. })
            }),
            (br#"{"resourceType":"Bundle","x":{"a":[}]}}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","x":"\q"}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (b"{\"resourceType\":\"Bundle\",\"x\":\"a\x01\"}".to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
            (invalid_utf8_entry, |e| matches!(e, StreamError::Malformed { .. })),
            (invalid_utf8_member, |e| matches!(e, StreamError::Malformed { .. })),
            (br#"{"resourceType":"Bundle","total":-}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
        ];
        for (input, want) in cases {
            let outcome = assert_chunking_invariant(&input, opts(false));
            match outcome {
                Err(e) => assert!(want(&e), "{}: {e:?}", String::from_utf8_lossy(&input)),
                Ok((out, _)) => panic!("{} passed: {}", String::from_utf8_lossy(&input), String::from_utf8_lossy(&out)),
            }
        }
    }

    #[test]
    fn quote_search_matches_the_naive_one() {
        let mut rng = Rng(7);
        for len in 0..64 {
            for _ in 0..500 {
                let s: Vec<u8> = (0..len).map(|_| *rng.pick(b"aaaaaaaaaab\x00\x80\xff\x21\x23\x5b\x5d\"\\")).collect();
                let naive = s.iter().position(|&c| c == b'"' || c == b'\\');
                assert_eq!(find_quote_or_backslash(&s), naive, "{s:?}");
            }
        }
    }

    #[test]
    fn no_output_is_complete_before_finish_and_errors_stick() {
        let mut filter = BundleFilter::new(policy(), opts(false));
        let mut out = Vec::new();
        filter.push(format!(r#"{{"resourceType":"Bundle","entry":[{}]}}"#, k("1")).as_bytes(), &mut out).unwrap();
        assert!(serde_json::from_slice::<Value>(&out).is_err(), "the closing brace is written by finish");
        assert_eq!(filter.stats(), Stats { kept: 1, ..Stats::default() });
        assert!(matches!(filter.push(b"x", &mut out), Err(StreamError::TrailingData { .. })));
        assert!(matches!(filter.push(b" ", &mut out), Err(StreamError::Failed)));
        assert!(matches!(filter.finish(&mut out), Err(StreamError::Failed)));
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    const STRINGS: &[&str] = &[
        "plain",
        "] } , {",
        "\"entry\":[",
        "\\",
        "a\\\"b",
        "é",
        "😀",
        "\u{1}\u{1f}",
        "line\nbreak\ttab",
        "entry",
        "total",
        "link",
        "resourceType",
        "",
        "\u{2028}",
        "http://up/fhir/Patient/1",
    ];
    const KEYS: &[&str] = &["a", "entry", "link", "total", "resourceType", "]", "}", "\"", "é", "value", ""];

    fn random_value(rng: &mut Rng, depth: usize) -> Value {
        match rng.below(if depth == 0 { 4 } else { 6 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.chance(50)),
            2 => {
                let n = rng.below(2_000_000) as i64 - 1_000_000;
                if rng.chance(50) { json!(n) } else { json!(n as f64 / 1000.0) }
            }
            3 => Value::String((*rng.pick(STRINGS)).into()),
            4 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth - 1)).collect()),
            _ => Value::Object(
                (0..rng.below(4)).map(|_| ((*rng.pick(KEYS)).to_owned(), random_value(rng, depth - 1))).collect(),
            ),
        }
    }

    fn random_entry(rng: &mut Rng) -> Value {
        if rng.chance(5) {
            return random_value(rng, 2);
        }
        let ty = *rng.pick(&["Patient", "Observation", "Patient", "Observation", "OperationOutcome", "Bundle"]);
        let id = rng.below(1000).to_string();
        let mut resource = json!({"resourceType": ty, "id": id});
        if rng.chance(90) {
            let tags: Vec<Value> = (0..rng.below(3))
                .map(|_| json!({"system": rng.pick(&[DATASET, DATASET, "https://other"]), "code": rng.pick(&["a", "b"])}))
                .collect();
            resource["meta"] = json!({"tag": tags});
        }
        if rng.chance(60) {
            resource[*rng.pick(&["text", "code", "entry", "link"])] = random_value(rng, 3);
        }
        let base = *rng.pick(&[UP, UP, "http://elsewhere/fhir"]);
        let mut entry = json!({"fullUrl": format!("{base}/{ty}/{id}"), "search": {"mode": "match"}});
        if rng.chance(92) {
            entry["resource"] = resource;
        }
        if rng.chance(20) {
            entry["extension"] = random_value(rng, 2);
        }
        entry
    }

    fn ws(rng: &mut Rng, out: &mut String) {
        if rng.chance(25) {
            let space: &&str = rng.pick(&[" ", "\n", "\t", "\r\n", "  ", "\n\t "]);
            out.push_str(space);
        }
    }

    /// JSON with random whitespace and random `\u` escapes.
    fn write_str(rng: &mut Rng, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str(if rng.chance(50) { "\\\\" } else { "\\u005c" }),
                '\n' if rng.chance(50) => out.push_str("\\n"),
                c if (c as u32) < 0x20 || rng.chance(10) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn write_value(rng: &mut Rng, value: &Value, out: &mut String) {
        match value {
            Value::String(s) => write_str(rng, s, out),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    write_value(rng, item, out);
                    ws(rng, out);
                }
                out.push(']');
            }
            Value::Object(members) => {
                let members: Vec<_> = members.iter().collect();
                write_members(rng, &members, out);
            }
            other => out.push_str(&other.to_string()),
        }
    }

    fn write_members(rng: &mut Rng, members: &[(&String, &Value)], out: &mut String) {
        out.push('{');
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            ws(rng, out);
            write_str(rng, key, out);
            ws(rng, out);
            out.push(':');
            ws(rng, out);
            write_value(rng, value, out);
            ws(rng, out);
        }
        out.push('}');
    }

    fn random_bundle(rng: &mut Rng) -> String {
        let mut members: Vec<(String, Value)> = Vec::new();
        if rng.chance(95) {
            members.push(("resourceType".into(), json!(if rng.chance(97) { "Bundle" } else { "Patient" })));
        }
        members.push(("id".into(), json!(rng.below(100).to_string())));
        members.push(("type".into(), json!(rng.pick(&["searchset", "history", "collection"]))));
        if rng.chance(50) {
            members.push(("meta".into(), json!({"lastUpdated": "2024-01-01T00:00:00Z", "tag": random_value(rng, 2)})));
        }
        if rng.chance(80) {
            let n = rng.below(9);
            members.push(("entry".into(), Value::Array((0..n).map(|_| random_entry(rng)).collect())));
        }
        if rng.chance(60) {
            let links: Vec<Value> = (0..rng.below(4))
                .map(|_| {
                    let relation = *rng.pick(&["self", "next", "previous", "first", "other"]);
                    let base = *rng.pick(&[UP, UP, "http://elsewhere/fhir"]);
                    json!({"relation": relation, "url": format!("{base}?page={}", rng.below(10))})
                })
                .collect();
            members.push(("link".into(), Value::Array(links)));
        }
        if rng.chance(60) {
            members.push(("total".into(), json!(rng.below(100))));
        }
        for _ in 0..rng.below(3) {
            members.push((format!("x{}", rng.below(1000)), random_value(rng, 3)));
        }
        for i in (1..members.len()).rev() {
            members.swap(i, rng.below(i + 1));
        }
        let members: Vec<(&String, &Value)> = members.iter().map(|(k, v)| (k, v)).collect();
        let mut out = String::new();
        ws(rng, &mut out);
        write_members(rng, &members, &mut out);
        ws(rng, &mut out);
        out
    }

    #[test]
    fn differential_against_the_buffered_reference() {
        let mut rng = Rng(0x5eed_f00d_1234_5678);
        let options = Options { max_entry_bytes: 1 << 20, max_other_bytes: 1 << 20, keep_total: false };
        let (mut ok, mut kept, mut dropped) = (0, 0, 0);
        for i in 0..400 {
            let input = random_bundle(&mut rng);
            let options = Options { keep_total: rng.chance(30), ..options };
            let whole = run(input.as_bytes(), options);
            match reference(input.as_bytes(), options) {
                Some((want, want_stats)) => {
                    let (got, stats) = parsed(&whole);
                    assert_eq!(got, want, "bundle {i}: {input}");
                    assert_eq!(stats, want_stats, "bundle {i}");
                    ok += 1;
                    kept += stats.kept;
                    dropped += stats.dropped;
                }
                None => assert!(whole.is_err(), "bundle {i} should fail: {input}"),
            }
            // Random chunkings, and 1-byte chunks now and then.
            let bytes = input.as_bytes();
            let mut chunks = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let n = 1 + rng.below(64).min(bytes.len() - at - 1);
                chunks.push(&bytes[at..at + n]);
                at += n;
            }
            assert!(same(&whole, &run_chunks(chunks, options)), "bundle {i} chunked: {input}");
            if i % 20 == 0 {
                assert!(same(&whole, &run_chunks(bytes.chunks(1), options)), "bundle {i} bytewise");
            }
        }
        // The generator covers what it should.
        assert!(ok > 300 && kept > 150 && dropped > 500, "{ok} {kept} {dropped}");
    }

    /// Writes a synthetic `$everything` Bundle entry by entry, never holding it whole.
    struct Synthetic {
        entries: usize,
        big_every: usize,
        big_len: usize,
        padding: String,
    }

    impl Synthetic {
        fn entry(&self, i: usize, out: &mut Vec<u8>) {
            let code = if i.is_multiple_of(3) { "b" } else { "a" };
            let pad = if self.big_every > 0 && i % self.big_every == self.big_every / 2 {
                &self.padding[..self.big_len]
            } else {
                &self.padding[..200 + i % 1000]
            };
            let entry = format!(
                r#"{{"fullUrl":"{UP}/Observation/{i}","resource":{{"resourceType":"Observation","id":"{i}","meta":{{"tag":[{{"system":"{DATASET}","code":"{code}"}}]}},"status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}]}},"subject":{{"reference":"Patient/1"}},"valueQuantity":{{"value":{}.5,"unit":"/min"}},"note":[{{"text":"{pad}"}}]}},"search":{{"mode":"match"}}}}"#,
                i % 200
            );
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(entry.as_bytes());
        }

        fn head() -> &'static [u8] {
            br#"{"resourceType":"Bundle","type":"searchset","total":123456789,"entry":["#
        }

        fn tail() -> &'static [u8] {
            br#"],"link":[{"relation":"self","url":"http://up/fhir/Patient/1/$everything"}]}"#
        }
    }

    #[derive(Default)]
    struct Meter {
        fed: usize,
        out_bytes: usize,
        max_out: usize,
        max_capacity: usize,
    }

    impl Meter {
        /// Pushes, records the filter's buffers and the output size, and discards the output.
        fn push(&mut self, filter: &mut BundleFilter<TestPolicy>, bytes: &[u8], out: &mut Vec<u8>) {
            filter.push(bytes, out).unwrap();
            self.fed += bytes.len();
            self.max_capacity = self.max_capacity.max(filter.buffered_capacity());
            self.max_out = self.max_out.max(out.len());
            self.out_bytes += out.len();
            out.clear();
        }
    }

    #[test]
    fn memory_stays_flat_on_a_huge_bundle() {
        const CHUNK: usize = 64 << 10;
        // serde_json is unoptimised in debug builds (about 5 MB/s here): a smaller Bundle there.
        const SIZE: usize = if cfg!(debug_assertions) { 48 << 20 } else { 200 << 20 };
        let synthetic =
            Synthetic { entries: usize::MAX, big_every: 5000, big_len: 300_000, padding: "x".repeat(300_000) };
        let options = Options { max_entry_bytes: 1 << 20, max_other_bytes: 64 << 10, keep_total: false };
        let mut filter = BundleFilter::new(policy(), options);
        let mut staged = Synthetic::head().to_vec();
        let mut out = Vec::new();
        let mut meter = Meter::default();
        let (mut entries, mut max_entry) = (0, 0);
        let started = Instant::now();
        while meter.fed < SIZE && entries < synthetic.entries {
            let before = staged.len();
            synthetic.entry(entries, &mut staged);
            max_entry = max_entry.max(staged.len() - before);
            entries += 1;
            while staged.len() >= CHUNK {
                meter.push(&mut filter, &staged[..CHUNK], &mut out);
                staged.drain(..CHUNK);
            }
        }
        staged.extend_from_slice(Synthetic::tail());
        meter.push(&mut filter, &staged, &mut out);
        let stats = filter.finish(&mut out).unwrap();
        let tail = String::from_utf8(out).unwrap();
        eprintln!(
            "{} MB in {:?}: {entries} entries, largest {max_entry} B, buffer capacity {} B, output {} MB",
            meter.fed >> 20,
            started.elapsed(),
            meter.max_capacity,
            meter.out_bytes >> 20,
        );
        let dropped = entries.div_ceil(3);
        assert_eq!(stats, Stats { kept: entries - dropped, dropped, dropped_matches: dropped });
        // Matches were dropped: no total, never the kept count.
        assert_eq!(tail, "}");
        assert!(max_entry > 300_000);
        assert!(meter.max_capacity < 2 * max_entry, "{} vs largest entry {max_entry}", meter.max_capacity);
        assert!(meter.max_out < CHUNK + 2 * max_entry, "{}", meter.max_out);
    }

    /// `cargo test -p fhirgw-dataplane --lib --release policy::stream::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn throughput() {
        const CHUNK: usize = 64 << 10;
        for (name, big_every, big_len, entries) in
            [("typical ~1.3 KB entries", 0, 0, 400_000), ("1 in 50 entries is 256 KB", 50, 256 << 10, 40_000)]
        {
            let synthetic = Synthetic { entries, big_every, big_len, padding: "x".repeat(big_len.max(1200)) };
            let mut body = Synthetic::head().to_vec();
            for i in 0..entries {
                synthetic.entry(i, &mut body);
            }
            body.extend_from_slice(Synthetic::tail());
            let mut best = f64::MAX;
            for _ in 0..3 {
                let started = Instant::now();
                let mut filter = BundleFilter::new(policy(), Options { max_entry_bytes: 1 << 20, ..opts(false) });
                let mut out = Vec::with_capacity(2 * CHUNK);
                for chunk in body.chunks(CHUNK) {
                    filter.push(chunk, &mut out).unwrap();
                    out.clear();
                }
                filter.finish(&mut out).unwrap();
                best = best.min(started.elapsed().as_secs_f64());
            }
            let mb = body.len() as f64 / 1e6;
            eprintln!("{name}: {} MB, streaming filter: {:.0} MB/s", body.len() >> 20, mb / best);
            // For comparison, on the same machine and load: the lexer alone, and the buffered approach.
            let started = Instant::now();
            let mut scan = Scan::default();
            for chunk in body.chunks(CHUNK) {
                let _ = std::hint::black_box(scan.scan(chunk));
            }
            eprintln!("  lexer alone: {:.0} MB/s", mb / started.elapsed().as_secs_f64());
            let started = Instant::now();
            let (filtered, _) = reference(&body, opts(false)).unwrap();
            let bytes = serde_json::to_vec(&filtered).unwrap();
            eprintln!("  buffered (parse, filter, serialise): {:.0} MB/s", mb / started.elapsed().as_secs_f64());
            drop((filtered, bytes));
        }
    }
}
