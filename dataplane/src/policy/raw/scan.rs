//! The fast path of the light views: one hand-written pass over the bytes that validates the JSON and picks out the
//! members the decision needs, about five times fewer instructions than serde's visitor machinery over the same
//! entry (`bench/instructions.sh WHAT=search`).
//!
//! It is allowed to be unsure, never wrong: anything it does not fully understand (an escape it would have to
//! decode, a duplicate or mistyped member that matters, nesting deeper than [`MAX_DEPTH`], input that ends early,
//! any syntax error) is [`Unsure`], and the caller asks the serde views, which stay the reference. When it does
//! answer, it is stricter than serde's parse of the same bytes (UTF-8 of the whole value, no `\u` or `\/` escape),
//! and its answer equals theirs: `scan_tests` checks that on generated and mutated entries.

use super::{EntryView, MetaView, ResourceView, SearchView, TagView};

/// Nesting deeper than this is left to serde (whose own limit is 128).
const MAX_DEPTH: usize = 100;

/// The scan does not decide these bytes; serde does.
#[derive(Debug)]
pub(super) struct Unsure;

type Scan<T> = Result<T, Unsure>;

/// The Bundle entry at the start of `input` (more bytes may follow it), as `raw::entry_prefix` answers it.
pub(super) fn entry(input: &[u8]) -> Scan<(usize, EntryView<'_>)> {
    if input.first() != Some(&b'{') {
        return Err(Unsure);
    }
    let mut cursor = Cursor { bytes: input, at: 1 };
    let view = cursor.entry()?;
    let len = cursor.at;
    // serde's stream reader refuses a value glued to what follows it (`{...}x`); so does this.
    match input.get(len) {
        None | Some(b' ' | b'\n' | b'\t' | b'\r' | b'"' | b'[' | b']' | b'{' | b'}' | b',' | b':') => {}
        Some(_) => return Err(Unsure),
    }
    std::str::from_utf8(&input[..len]).map_err(|_| Unsure)?;
    Ok((len, view))
}

/// The resource that `raw` holds whole (whitespace around it allowed), as `raw::resource_view` answers it.
pub(super) fn resource(raw: &[u8]) -> Scan<ResourceView<'_>> {
    let mut cursor = Cursor { bytes: raw, at: 0 };
    cursor.expect(b'{')?;
    let view = cursor.resource(1)?;
    cursor.skip_ws();
    if cursor.at != raw.len() {
        return Err(Unsure);
    }
    std::str::from_utf8(raw).map_err(|_| Unsure)?;
    Ok(view)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// A member that matters, read into `slot`; a second one is left to serde (which refuses it).
fn once<T>(seen: &mut bool, slot: &mut Option<T>, value: Scan<Option<T>>) -> Scan<()> {
    if std::mem::replace(seen, true) {
        return Err(Unsure);
    }
    *slot = value?;
    Ok(())
}

/// The eight bytes of `word` (little-endian) that are a quote, a backslash or a control character, as the high bit of
/// each. The lowest bit set is exact; bits above it may be false (a borrow), so only the first is used.
fn special(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    zero_byte(word ^ (ONES * u64::from(b'"')))
        | zero_byte(word ^ (ONES * u64::from(b'\\')))
        | (word.wrapping_sub(ONES * 0x20) & !word & HIGH)
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte that is not whitespace, consumed.
    #[inline(always)]
    fn token(&mut self) -> Scan<u8> {
        // Compact JSON has no whitespace: one comparison before the loop.
        if let Some(&byte) = self.bytes.get(self.at).filter(|&&byte| byte > b' ') {
            self.at += 1;
            return Ok(byte);
        }
        self.skip_ws();
        let byte = *self.bytes.get(self.at).ok_or(Unsure)?;
        self.at += 1;
        Ok(byte)
    }

    #[inline(always)]
    fn expect(&mut self, want: u8) -> Scan<()> {
        if self.token()? == want { Ok(()) } else { Err(Unsure) }
    }

    /// The rest of a literal whose first letter was consumed.
    fn literal(&mut self, rest: &[u8]) -> Scan<()> {
        let end = self.at + rest.len();
        if self.bytes.get(self.at..end) != Some(rest) {
            return Err(Unsure);
        }
        self.at = end;
        Ok(())
    }

    /// A string whose opening quote was consumed: its bytes as written, and whether they hold an escape.
    #[inline(always)]
    fn string(&mut self) -> Scan<(&'a [u8], bool)> {
        let start = self.at;
        let mut escaped = false;
        loop {
            // Eight bytes at a time up to the first special one (the tail of the input byte by byte).
            while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
                let mut word = [0; 8];
                word.copy_from_slice(chunk);
                let found = special(u64::from_le_bytes(word));
                if found != 0 {
                    self.at += (found.trailing_zeros() / 8) as usize;
                    break;
                }
                self.at += 8;
            }
            let byte = *self.bytes.get(self.at).ok_or(Unsure)?;
            self.at += 1;
            match byte {
                b'"' => return Ok((&self.bytes[start..self.at - 1], escaped)),
                b'\\' => match self.bytes.get(self.at) {
                    // `\u` and `\/` could spell anything (an upstream URL among others): serde decides those.
                    Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        self.at += 1;
                        escaped = true;
                    }
                    _ => return Err(Unsure),
                },
                0..=0x1f => return Err(Unsure),
                _ => {}
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        self.at - start
    }

    /// A number whose first byte (`-` or a digit) was consumed: JSON's grammar, no range check (as serde skips).
    fn number(&mut self, first: u8) -> Scan<()> {
        let first = if first == b'-' { self.token_raw()? } else { first };
        match first {
            b'0' => {}
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return Err(Unsure),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(Unsure);
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(Unsure);
            }
        }
        Ok(())
    }

    /// The next byte, whitespace or not, consumed.
    fn token_raw(&mut self) -> Scan<u8> {
        let byte = *self.bytes.get(self.at).ok_or(Unsure)?;
        self.at += 1;
        Ok(byte)
    }

    /// Any value, checked and skipped; `depth` is the nesting of the container it is in. One loop with the open
    /// containers as a bit stack (1 = object), not one call per value: most of an entry's bytes pass here.
    fn value(&mut self, depth: usize) -> Scan<()> {
        let mut open: u128 = 0;
        let mut nesting = 0;
        loop {
            // A value.
            match self.token()? {
                b'"' => {
                    self.string()?;
                }
                container @ (b'{' | b'[') => {
                    let close = if container == b'{' { b'}' } else { b']' };
                    self.skip_ws();
                    if self.bytes.get(self.at) == Some(&close) {
                        self.at += 1;
                    } else {
                        nesting += 1;
                        if depth + nesting > MAX_DEPTH {
                            return Err(Unsure);
                        }
                        open = open << 1 | u128::from(container == b'{');
                        if container == b'{' {
                            self.name()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                first @ (b'-' | b'0'..=b'9') => self.number(first)?,
                _ => return Err(Unsure),
            }
            // What follows it: the next member or element, or the end of containers.
            loop {
                if nesting == 0 {
                    return Ok(());
                }
                let in_object = open & 1 == 1;
                match self.token()? {
                    b',' => {
                        if in_object {
                            self.name()?;
                        }
                        break;
                    }
                    b'}' if in_object => {}
                    b']' if !in_object => {}
                    _ => return Err(Unsure),
                }
                open >>= 1;
                nesting -= 1;
            }
        }
    }

    /// A member's name and its colon, skipped.
    #[inline(always)]
    fn name(&mut self) -> Scan<()> {
        self.expect(b'"')?;
        self.string()?;
        self.expect(b':')
    }

    /// The members of an object whose `{` was consumed, each handed to `member` with its name as written (empty
    /// when it holds an escape: no name that matters has one) and the cursor after the colon.
    fn members(&mut self, depth: usize, mut member: impl FnMut(&mut Self, &'a [u8]) -> Scan<()>) -> Scan<()> {
        if depth > MAX_DEPTH {
            return Err(Unsure);
        }
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.expect(b'"')?;
            let (name, escaped) = self.string()?;
            self.expect(b':')?;
            member(self, if escaped { b"" } else { name })?;
            match self.token()? {
                b',' => {}
                b'}' => return Ok(()),
                _ => return Err(Unsure),
            }
        }
    }

    /// The elements of an array whose `[` was consumed, each read by `element`.
    fn elements(&mut self, depth: usize, mut element: impl FnMut(&mut Self) -> Scan<()>) -> Scan<()> {
        if depth > MAX_DEPTH {
            return Err(Unsure);
        }
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&b']') {
            self.at += 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.token()? {
                b',' => {}
                b']' => return Ok(()),
                _ => return Err(Unsure),
            }
        }
    }

    /// A string member that matters: `null` or a string spelled without escapes (serde borrows only those).
    fn opt_str(&mut self) -> Scan<Option<&'a str>> {
        match self.token()? {
            b'n' => self.literal(b"ull").map(|()| None),
            b'"' => match self.string()? {
                (text, false) => std::str::from_utf8(text).map(Some).map_err(|_| Unsure),
                (_, true) => Err(Unsure),
            },
            _ => Err(Unsure),
        }
    }

    /// An object member that matters: `null` or an object (serde's views refuse anything else).
    fn opt_object<T>(&mut self, read: impl FnOnce(&mut Self) -> Scan<T>) -> Scan<Option<T>> {
        match self.token()? {
            b'n' => self.literal(b"ull").map(|()| None),
            b'{' => read(self).map(Some),
            _ => Err(Unsure),
        }
    }

    fn entry(&mut self) -> Scan<EntryView<'a>> {
        let mut view = EntryView::default();
        let (mut full_url, mut resource, mut search) = (false, false, false);
        self.members(1, |cursor, name| match name {
            b"fullUrl" => once(&mut full_url, &mut view.full_url, cursor.opt_str()),
            b"resource" => once(&mut resource, &mut view.resource, cursor.opt_object(|cursor| cursor.resource(2))),
            b"search" => once(&mut search, &mut view.search, cursor.opt_object(Cursor::search)),
            _ => cursor.value(1),
        })?;
        Ok(view)
    }

    /// An entry's `search` whose `{` was consumed.
    fn search(&mut self) -> Scan<SearchView<'a>> {
        let mut view = SearchView::default();
        let mut mode = false;
        self.members(2, |cursor, name| match name {
            b"mode" => once(&mut mode, &mut view.mode, cursor.opt_str()),
            _ => cursor.value(2),
        })?;
        Ok(view)
    }

    /// A resource whose `{` was consumed, at nesting `depth`.
    fn resource(&mut self, depth: usize) -> Scan<ResourceView<'a>> {
        let mut view = ResourceView::default();
        let (mut resource_type, mut id, mut meta) = (false, false, false);
        self.members(depth, |cursor, name| match name {
            b"resourceType" => once(&mut resource_type, &mut view.resource_type, cursor.opt_str()),
            b"id" => once(&mut id, &mut view.id, cursor.opt_str()),
            b"meta" => once(&mut meta, &mut view.meta, cursor.opt_object(|cursor| cursor.meta(depth + 1))),
            _ => cursor.value(depth),
        })?;
        Ok(view)
    }

    fn meta(&mut self, depth: usize) -> Scan<MetaView<'a>> {
        let mut view = MetaView::default();
        let mut tag = false;
        self.members(depth, |cursor, name| match name {
            b"tag" => once(&mut tag, &mut view.tag, cursor.tags(depth + 1)),
            _ => cursor.value(depth),
        })?;
        Ok(view)
    }

    /// `meta.tag`: `null` or an array of codings (objects), at nesting `depth`.
    fn tags(&mut self, depth: usize) -> Scan<Option<Vec<TagView<'a>>>> {
        match self.token()? {
            b'n' => self.literal(b"ull").map(|()| None),
            b'[' => {
                let mut tags = Vec::new();
                self.elements(depth, |cursor| {
                    cursor.expect(b'{')?;
                    tags.push(cursor.coding(depth + 1)?);
                    Ok(())
                })?;
                Ok(Some(tags))
            }
            _ => Err(Unsure),
        }
    }

    fn coding(&mut self, depth: usize) -> Scan<TagView<'a>> {
        let mut view = TagView::default();
        let (mut system, mut code) = (false, false);
        self.members(depth, |cursor, name| match name {
            b"system" => once(&mut system, &mut view.system, cursor.opt_str()),
            b"code" => once(&mut code, &mut view.code, cursor.opt_str()),
            _ => cursor.value(depth),
        })?;
        Ok(view)
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
