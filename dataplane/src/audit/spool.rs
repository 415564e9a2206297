//! The audit spool: append-only segment files in `--audit-dir`, where every event is made durable before it is
//! shipped, and from which it is shipped at least once to each sink.
//!
//! A segment `NNNNNNNNNNNNNNNNNNNN.seg` starts with an 8-byte magic, then holds records: a 16-byte header (payload
//! length, CRC-32C of the rest, the append time in Unix milliseconds) and the payload (one AuditEvent as JSON, its
//! `id` already assigned, so a retry sends the same event). Records never span segments; the writer rolls to a new
//! segment once the current one has `segment_bytes`. Each sink's progress is a cursor file (`cursor-<sink>`:
//! segment, offset and a CRC), replaced atomically (write, fsync, rename, fsync the directory) after a delivery;
//! segments every sink has passed are deleted.
//!
//! Recovery on open: each segment is read record by record; the first record that is cut short or fails its CRC
//! ends the segment's valid part. What follows is copied aside (`<segment>.damaged-<offset>`, for inspection) and the
//! segment truncated there: after a `kill -9` or a power loss this is the torn tail of the last segment, whose events
//! were never acknowledged. Writing continues in a new segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::watch;

pub const MAGIC: &[u8; 8] = b"FGWAUD01";
const HEADER: u64 = MAGIC.len() as u64;
const RECORD_HEADER: usize = 16;
/// Largest record payload: an event is a few KiB; anything near this is a bug, refused rather than written.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// CRC-32C (Castagnoli) of the parts, as of their concatenation: the CPU's own instruction where it has one (SSE 4.2,
/// ARMv8 CRC), about 8 bytes per instruction; slice-by-16 tables cost ~19k instructions per event written and read.
fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

/// A place in the spool: a segment and a byte offset in it (always on a record boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When it was appended (Unix milliseconds).
    pub at_ms: u64,
    /// The event (a slice of the buffer the batch was read into).
    pub payload: Bytes,
    /// The position just after it.
    pub next: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit spool is full ({bytes} of {max} bytes)")]
    Full { bytes: u64, max: u64 },
    #[error("an audit event of {0} bytes is larger than a record may be")]
    TooLarge(usize),
    #[error("another process holds the audit spool {0} (one data plane per spool directory)")]
    Locked(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.display().to_string(), source }
}

/// Frames one payload as a record (done by the caller, off the writer's thread).
pub fn frame(payload: &[u8], at_ms: u64, out: &mut Vec<u8>) -> Result<(), SpoolError> {
    frame_with(out, at_ms, |out| out.extend_from_slice(payload))
}

/// Appends one record to `out` whose payload `write` appends in place (no copy of it); a payload larger than a
/// record may be is taken back out and refused.
pub fn frame_with(out: &mut Vec<u8>, at_ms: u64, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), SpoolError> {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER]);
    write(out);
    let len = out.len() - start - RECORD_HEADER;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(SpoolError::TooLarge(len));
    }
    let at = at_ms.to_le_bytes();
    let crc = crc32c(&[&at, out.get(start + RECORD_HEADER..).unwrap_or_default()]);
    if let Some(header) = out.get_mut(start..start + RECORD_HEADER) {
        // The length fits: MAX_PAYLOAD is far below u32::MAX.
        header[..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..8].copy_from_slice(&crc.to_le_bytes());
        header[8..].copy_from_slice(&at);
    }
    Ok(())
}

/// Size limits of a spool.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Segment files in all, at most.
    pub max_bytes: u64,
    /// A segment is closed once it holds this much.
    pub segment_bytes: u64,
}

struct State {
    /// Segment number → bytes in it.
    segments: BTreeMap<u64, u64>,
    cursors: HashMap<String, Position>,
}

/// The spool's shared state: read by shippers and metrics, advanced by the [`Writer`].
pub struct Spool {
    dir: PathBuf,
    /// Held for the spool's lifetime: one data plane per spool directory.
    _lock: File,
    limits: Limits,
    state: Mutex<State>,
    /// The end of what is durable (advanced after each fsync).
    end: watch::Sender<Position>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Appends to the current segment; owned by the writer thread.
pub struct Writer {
    file: File,
    position: Position,
}

fn segment_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Spool {
    /// Opens (creating) the spool in `dir`, recovers it, and starts a new segment to write to. `sinks` names every
    /// configured sink: only their cursors hold segments back.
    pub fn open(dir: &Path, limits: Limits, sinks: &[&str]) -> Result<(Spool, Writer), SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.display().to_string())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let mut segments = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let name = entry.map_err(io(dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".seg").filter(|n| n.len() == 20).and_then(|n| n.parse::<u64>().ok()) {
                segments.insert(n, 0);
            }
        }
        for (segment, size) in &mut segments {
            *size = recover(&dir.join(segment_name(*segment)))?;
        }
        // A segment left with not even its magic (cut off as it was created) holds nothing.
        for (segment, _) in segments.clone().iter().filter(|(_, size)| **size < HEADER) {
            let path = dir.join(segment_name(*segment));
            fs::remove_file(&path).map_err(io(&path))?;
            segments.remove(segment);
        }
        let next = segments.keys().next_back().map_or(1, |last| last + 1);
        let first = segments.keys().next().copied().unwrap_or(next);
        let mut cursors = HashMap::new();
        for sink in sinks {
            let stored = read_cursor(&dir.join(format!("cursor-{sink}")));
            let position = match stored {
                Some(p) if p.segment >= next => Position { segment: next, offset: HEADER },
                Some(p) => match segments.get(&p.segment) {
                    Some(size) => Position { segment: p.segment, offset: p.offset.clamp(HEADER, *size) },
                    None => first_at_or_after(&segments, p.segment, next),
                },
                None => Position { segment: first, offset: HEADER },
            };
            cursors.insert((*sink).to_owned(), position);
        }
        let position = Position { segment: next, offset: HEADER };
        let spool = Spool {
            dir: dir.to_owned(),
            _lock: lock,
            limits,
            state: Mutex::new(State { segments, cursors }),
            end: watch::channel(position).0,
        };
        let writer = spool.create_segment(next)?;
        spool.release();
        Ok((spool, writer))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes in segment files now.
    pub fn bytes(&self) -> u64 {
        self.lock().segments.values().sum()
    }

    /// The end of what is durable.
    pub fn end(&self) -> Position {
        *self.end.borrow()
    }

    /// Notified each time more is durable.
    pub fn subscribe(&self) -> watch::Receiver<Position> {
        self.end.subscribe()
    }

    /// The start of the oldest segment.
    pub fn first(&self) -> Position {
        let state = self.lock();
        first_at_or_after(&state.segments, 0, self.end().segment)
    }

    pub fn cursor(&self, sink: &str) -> Option<Position> {
        self.lock().cursors.get(sink).copied()
    }

    /// Where the oldest unshipped record of any sink is (`None`: every sink is at the end).
    pub fn oldest_cursor(&self) -> Option<Position> {
        let end = self.end();
        let state = self.lock();
        state.cursors.values().copied().filter(|c| self.normalise(&state, *c) < end).min()
    }

    fn create_segment(&self, segment: u64) -> Result<Writer, SpoolError> {
        let path = self.dir.join(segment_name(segment));
        let mut file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io(&path))?;
        file.write_all(MAGIC).and_then(|()| file.sync_all()).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        self.lock().segments.insert(segment, HEADER);
        Ok(Writer { file, position: Position { segment, offset: HEADER } })
    }

    /// Appends `records` (framed with [`frame`]); with `sync`, makes them (and everything written before) durable.
    /// Rolls to a new segment first when the current one is full. Nothing is written when they do not fit within
    /// `max_bytes`. Shippers may read what is written before it is synced.
    pub fn append(&self, writer: &mut Writer, records: &[u8], sync: bool) -> Result<Position, SpoolError> {
        if records.is_empty() {
            if sync {
                self.sync(writer)?;
            }
            return Ok(writer.position);
        }
        let len = records.len() as u64;
        let bytes = self.bytes();
        if bytes + len + HEADER > self.limits.max_bytes {
            return Err(SpoolError::Full { bytes, max: self.limits.max_bytes });
        }
        if writer.position.offset >= self.limits.segment_bytes {
            // The closed segment is made durable whole before the next one starts.
            self.sync(writer)?;
            *writer = self.create_segment(writer.position.segment + 1)?;
        }
        let written = writer.file.write_all(records).and_then(|()| if sync { writer.file.sync_data() } else { Ok(()) });
        if let Err(source) = written {
            return Err(self.poisoned(writer, source));
        }
        writer.position.offset += len;
        self.lock().segments.insert(writer.position.segment, writer.position.offset);
        self.end.send_replace(writer.position);
        Ok(writer.position)
    }

    /// Makes everything written so far durable.
    pub fn sync(&self, writer: &mut Writer) -> Result<(), SpoolError> {
        writer.file.sync_data().map_err(|source| self.poisoned(writer, source))
    }

    /// After a failed write or fsync the file's contents are unknown: it is never appended to again.
    fn poisoned(&self, writer: &mut Writer, source: std::io::Error) -> SpoolError {
        let path = self.dir.join(segment_name(writer.position.segment));
        if let Ok(next) = self.create_segment(writer.position.segment + 1) {
            *writer = next;
        }
        SpoolError::Io { path: path.display().to_string(), source }
    }

    /// A position at the end of a closed segment is the start of the next one.
    fn normalise(&self, state: &State, mut p: Position) -> Position {
        while let Some(size) = state.segments.get(&p.segment) {
            if p.offset < *size || p.segment >= self.end().segment {
                break;
            }
            p = first_at_or_after(&state.segments, p.segment + 1, self.end().segment);
        }
        p
    }

    /// Up to `max_records` records (and about `max_bytes`) from `from`, never past the durable end.
    pub fn read(&self, from: Position, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, SpoolError> {
        let end = self.end();
        let mut out = Vec::new();
        let mut at = {
            let state = self.lock();
            self.normalise(&state, from)
        };
        let mut total = 0;
        while at < end && out.len() < max_records && total < max_bytes {
            let size = self.lock().segments.get(&at.segment).copied();
            let Some(size) = size else {
                let state = self.lock();
                at = first_at_or_after(&state.segments, at.segment, end.segment);
                continue;
            };
            let limit = if at.segment == end.segment { end.offset } else { size };
            if at.offset >= limit {
                let state = self.lock();
                at = first_at_or_after(&state.segments, at.segment + 1, end.segment);
                continue;
            }
            let path = self.dir.join(segment_name(at.segment));
            let unreadable = || SpoolError::Io {
                path: path.display().to_string(),
                // Verified on open and written by this process since: only a disk fault gets here.
                source: std::io::Error::other("a record became unreadable"),
            };
            // One read for what the batch may still take (at least one whole record), records handed out as slices
            // of it: no buffer and no allocation per record.
            let room = (max_bytes - total).max(RECORD_HEADER + MAX_PAYLOAD) as u64;
            let want = (limit - at.offset).min(room);
            let mut file = File::open(&path).map_err(io(&path))?;
            file.seek(SeekFrom::Start(at.offset)).map_err(io(&path))?;
            let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(usize::MAX));
            file.take(want).read_to_end(&mut buf).map_err(io(&path))?;
            let buf = Bytes::from(buf);
            let mut pos = 0;
            while at.offset < limit && out.len() < max_records && total < max_bytes {
                match parse_record(&buf[pos..]) {
                    Parsed::Whole { at_ms, len } => {
                        let payload = buf.slice(pos + RECORD_HEADER..pos + RECORD_HEADER + len);
                        pos += RECORD_HEADER + len;
                        at.offset += (RECORD_HEADER + len) as u64;
                        total += len;
                        out.push(Record { at_ms, payload, next: at });
                    }
                    // The rest of this record is beyond what was read: read again from it.
                    Parsed::Short if pos > 0 => break,
                    Parsed::Short | Parsed::Bad => return Err(unreadable()),
                }
            }
        }
        Ok(out)
    }

    /// Records that `sink` has delivered everything before `to`: the cursor is stored durably, then segments every
    /// sink has passed are deleted.
    pub fn commit(&self, sink: &str, to: Position) -> Result<(), SpoolError> {
        let path = self.dir.join(format!("cursor-{sink}"));
        let tmp = self.dir.join(format!("cursor-{sink}.tmp"));
        let mut bytes = Vec::with_capacity(20);
        bytes.extend_from_slice(&to.segment.to_le_bytes());
        bytes.extend_from_slice(&to.offset.to_le_bytes());
        bytes.extend_from_slice(&crc32c(&[&bytes]).to_le_bytes());
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        self.lock().cursors.insert(sink.to_owned(), to);
        self.release();
        Ok(())
    }

    /// Deletes the segments every sink has passed (never the one being written; nothing without a sink, whose
    /// events wait for one).
    fn release(&self) {
        let writing = self.end().segment;
        let doomed: Vec<u64> = {
            let state = self.lock();
            if state.cursors.is_empty() {
                return;
            }
            let oldest = state
                .cursors
                .values()
                .map(|c| self.normalise(&state, *c).segment)
                .min()
                .unwrap_or(writing)
                .min(writing);
            state.segments.keys().copied().filter(|s| *s < oldest).collect()
        };
        for segment in doomed {
            let path = self.dir.join(segment_name(segment));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a shipped audit segment");
                    continue;
                }
            }
            self.lock().segments.remove(&segment);
        }
    }
}

fn first_at_or_after(segments: &BTreeMap<u64, u64>, segment: u64, writing: u64) -> Position {
    let segment = segments.range(segment..).next().map_or(writing, |(s, _)| *s);
    Position { segment, offset: HEADER }
}

/// A record at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// Whole and intact: its append time and payload length (the payload follows the header).
    Whole { at_ms: u64, len: usize },
    /// The buffer ends inside it.
    Short,
    /// Its header is impossible or its CRC does not match.
    Bad,
}

fn parse_record(buf: &[u8]) -> Parsed {
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER>() else { return Parsed::Short };
    let [l0, l1, l2, l3, c0, c1, c2, c3, at @ ..] = *header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_PAYLOAD {
        return Parsed::Bad;
    }
    let Some(payload) = rest.get(..len) else { return Parsed::Short };
    if crc32c(&[&at, payload]) != u32::from_le_bytes([c0, c1, c2, c3]) {
        return Parsed::Bad;
    }
    Parsed::Whole { at_ms: u64::from_le_bytes(at), len }
}

/// One record from a reader (recovery), `None` if it is cut short or fails its CRC.
fn read_record(reader: &mut impl Read) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut record = vec![0u8; RECORD_HEADER];
    if let Err(e) = reader.read_exact(&mut record) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e) };
    }
    let len = u32::from_le_bytes([record[0], record[1], record[2], record[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Ok(None);
    }
    record.resize(RECORD_HEADER + len, 0);
    if let Err(e) = reader.read_exact(&mut record[RECORD_HEADER..]) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e) };
    }
    match parse_record(&record) {
        Parsed::Whole { at_ms, .. } => Ok(Some((at_ms, record.split_off(RECORD_HEADER)))),
        Parsed::Short | Parsed::Bad => Ok(None),
    }
}

/// Checks a segment record by record; keeps what follows the last good record aside and truncates it there.
/// Returns the valid length (0 when even the magic is missing).
fn recover(path: &Path) -> Result<u64, SpoolError> {
    let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut reader = std::io::BufReader::new(&mut file);
    let mut magic = [0u8; 8];
    let valid = if reader.read_exact(&mut magic).is_ok() && &magic == MAGIC {
        let mut valid = HEADER;
        while let Some((_, payload)) = read_record(&mut reader).map_err(io(path))? {
            valid += (RECORD_HEADER + payload.len()) as u64;
        }
        valid
    } else {
        0
    };
    drop(reader);
    if valid < len {
        let aside = path.with_extension(format!("seg.damaged-{valid}"));
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(valid)).and_then(|_| file.read_to_end(&mut tail)).map_err(io(path))?;
        fs::write(&aside, &tail).map_err(io(&aside))?;
        file.set_len(valid).and_then(|()| file.sync_all()).map_err(io(path))?;
        tracing::warn!(
            segment = %path.display(),
            kept_bytes = valid,
            cut_bytes = len - valid,
            aside = %aside.display(),
            "audit spool: a segment ends in an incomplete or corrupt record (a torn write); cut there, the rest kept aside"
        );
    }
    Ok(valid)
}

fn read_cursor(path: &Path) -> Option<Position> {
    let bytes = fs::read(path).ok()?;
    let (body, crc) = bytes.split_at_checked(16)?;
    if crc.len() != 4 || crc32c(&[body]).to_le_bytes() != crc {
        tracing::warn!(path = %path.display(), "audit spool: unreadable cursor; shipping again from the oldest segment");
        return None;
    }
    let (segment, offset) = body.split_at(8);
    Some(Position {
        segment: u64::from_le_bytes(segment.try_into().ok()?),
        offset: u64::from_le_bytes(offset.try_into().ok()?),
    })
}

#[cfg(test)]
#[path = "spool_tests.rs"]
mod tests;
