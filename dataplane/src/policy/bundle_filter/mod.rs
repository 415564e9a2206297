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

mod lexer;
#[cfg(test)]
mod tests;

use lexer::{FeedError, Scan, feed, is_ws};

/// What [`EntryPolicy::entry_raw`] decided about an entry from its bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RawVerdict {
    /// Keep the entry's bytes as they are, or with one range of them replaced.
    Keep(Option<Splice>),
    /// Drop the entry, which had this `search.mode`.
    Drop(EntryMode),
    /// Only the parsed path ([`EntryPolicy::entry`]) can decide.
    Undecided,
}

/// Bytes to write in place of a range of a kept entry's bytes (a `fullUrl` moved to the public base).
#[derive(Debug, PartialEq, Eq)]
pub struct Splice {
    pub range: std::ops::Range<usize>,
    pub with: Vec<u8>,
}

/// Decides the entries and links of one Bundle.
pub trait EntryPolicy {
    /// The fast path: decides the entry that starts at `input[0]` from its bytes. `input` may go on past the entry
    /// (the rest of an upstream chunk). Returns the entry's length and the verdict, or `None` when `input` does not
    /// hold one whole entry that is valid JSON: the filter then buffers the entry up to its end (its own lexer) and
    /// asks again with exactly its bytes, and if the answer is still `None` parses them (which reports what is wrong).
    /// A length must only be returned for bytes the policy has validated as one complete JSON value (they are copied
    /// to the client as they are); `Undecided` hands those bytes to [`EntryPolicy::entry`]. The default has no fast
    /// path.
    fn entry_raw(&mut self, _input: &[u8]) -> Option<(usize, RawVerdict)> {
        None
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
                self.value_start = self.offset;
                // Most entries are whole in the chunk at hand: decided and copied from it, without the lexer's pass
                // or a copy into `buf`. Whole means a byte follows it: a number at the chunk's end may go on in the
                // next one (`-2` of `-2.5`).
                if let Some((n, verdict)) = self.policy.entry_raw(input)
                    && n > 0
                    && n < input.len()
                    && n <= self.options.max_entry_bytes
                {
                    self.write_entry(&input[..n], verdict, out)?;
                    self.state = State::AfterEntry;
                    return Ok(n);
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
                    let buf = std::mem::take(&mut self.buf);
                    let verdict = match self.policy.entry_raw(&buf) {
                        Some((n, verdict)) if n == buf.len() => verdict,
                        _ => RawVerdict::Undecided,
                    };
                    let written = self.write_entry(&buf, verdict, out);
                    self.buf = buf;
                    written?;
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

    /// Writes one complete `entry` element: `raw` as the fast path decided it (and validated it), or parsed here when
    /// `Undecided`.
    fn write_entry(&mut self, raw: &[u8], verdict: RawVerdict, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let splice = match verdict {
            RawVerdict::Drop(mode) => {
                self.count_dropped(mode);
                return Ok(());
            }
            RawVerdict::Keep(splice) => splice,
            RawVerdict::Undecided => {
                let entry: Value = serde_json::from_slice(raw).map_err(|e| self.invalid(&e))?;
                let mode = EntryMode::of(&entry);
                let Some(entry) = self.policy.entry(entry) else {
                    self.count_dropped(mode);
                    return Ok(());
                };
                self.entry_separator(out);
                return serde_json::to_writer(&mut *out, &entry).map_err(StreamError::Encode);
            }
        };
        self.entry_separator(out);
        match splice {
            None => out.extend_from_slice(raw),
            Some(Splice { range, with }) => {
                let (Some(head), Some(tail)) = (raw.get(..range.start), raw.get(range.end..)) else {
                    return Err(self.malformed("a splice outside its entry"));
                };
                out.extend_from_slice(head);
                out.extend_from_slice(&with);
                out.extend_from_slice(tail);
            }
        }
        Ok(())
    }

    /// Opens `entry` before the first kept element, or separates the next one; counts it kept.
    fn entry_separator(&mut self, out: &mut Vec<u8>) {
        if self.stats.kept == 0 {
            self.member_prefix(out, b"\"entry\":[");
        } else {
            out.push(b',');
        }
        self.stats.kept += 1;
    }
}
