#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const LIMITS: Limits = Limits { max_bytes: 1 << 20, segment_bytes: 256 };

fn framed(payloads: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        frame(p.as_bytes(), 1_000 + i as u64, &mut out).unwrap();
    }
    out
}

fn texts(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8(r.payload.to_vec()).unwrap()).collect()
}

fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

fn start(spool: &Spool, sink: &str) -> Position {
    spool.cursor(sink).unwrap()
}

#[test]
fn appended_records_read_back_across_segments_and_shipped_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
    let events: Vec<String> = (0..40).map(|i| format!("{{\"event\":{i},\"pad\":\"{}\"}}", "x".repeat(40))).collect();
    for chunk in events.chunks(3) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        spool.append(&mut writer, &framed(&refs), true).unwrap();
    }
    assert!(segments(dir.path()).len() > 3, "small segments roll: {:?}", segments(dir.path()));
    let all = spool.read(start(&spool, "fhir"), 1000, usize::MAX).unwrap();
    assert_eq!(texts(&all), events);
    // Read in small batches, committing as a shipper does: the same events, and the segments go away.
    let mut at = start(&spool, "fhir");
    let mut seen = Vec::new();
    loop {
        let batch = spool.read(at, 7, usize::MAX).unwrap();
        let Some(last) = batch.last() else { break };
        at = last.next;
        seen.extend(texts(&batch));
        spool.commit("fhir", at).unwrap();
    }
    assert_eq!(seen, events);
    assert_eq!(segments(dir.path()).len(), 1, "only the segment being written is kept");
    assert!(spool.oldest_cursor().is_none());
}

#[test]
fn a_torn_tail_is_cut_and_kept_aside_and_the_cursor_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_bytes: 1 << 20, segment_bytes: 1 << 20 };
    {
        let (spool, mut writer) = Spool::open(dir.path(), limits, &["fhir"]).unwrap();
        spool.append(&mut writer, &framed(&["one", "two", "three"]), true).unwrap();
        let first = spool.read(start(&spool, "fhir"), 1, usize::MAX).unwrap();
        spool.commit("fhir", first[0].next).unwrap();
    }
    // A kill -9 in the middle of a write: half a record at the end.
    let name = segments(dir.path()).pop().unwrap();
    let path = dir.path().join(&name);
    let mut half = framed(&["four"]);
    half.truncate(RECORD_HEADER + 2);
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&half).unwrap();
    drop(file);

    let (spool, mut writer) = Spool::open(dir.path(), limits, &["fhir"]).unwrap();
    assert_eq!(texts(&spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap()), ["two", "three"]);
    let aside: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the torn tail is kept for inspection");
    assert_eq!(fs::read(dir.path().join(&aside[0])).unwrap(), half);
    spool.append(&mut writer, &framed(&["five"]), true).unwrap();
    assert_eq!(texts(&spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap()), ["two", "three", "five"]);
}

#[test]
fn a_corrupt_record_ends_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_bytes: 1 << 20, segment_bytes: 1 << 20 };
    {
        let (spool, mut writer) = Spool::open(dir.path(), limits, &["fhir"]).unwrap();
        spool.append(&mut writer, &framed(&["alpha", "bravo", "charlie"]), true).unwrap();
    }
    let path = dir.path().join(segments(dir.path()).pop().unwrap());
    let mut bytes = fs::read(&path).unwrap();
    // Flip a byte of "bravo"'s payload: its CRC no longer matches.
    let at = bytes.windows(5).position(|w| w == b"bravo").unwrap();
    bytes[at] ^= 0x20;
    fs::write(&path, &bytes).unwrap();
    let (spool, _writer) = Spool::open(dir.path(), limits, &["fhir"]).unwrap();
    assert_eq!(texts(&spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap()), ["alpha"]);
}

#[test]
fn a_full_spool_refuses_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_bytes: 200, segment_bytes: 1 << 20 };
    let (spool, mut writer) = Spool::open(dir.path(), limits, &["fhir"]).unwrap();
    spool.append(&mut writer, &framed(&[&"a".repeat(100)]), true).unwrap();
    let before = spool.bytes();
    assert!(matches!(spool.append(&mut writer, &framed(&[&"b".repeat(100)]), true), Err(SpoolError::Full { .. })));
    assert_eq!(spool.bytes(), before);
    // Shipping frees nothing in the segment being written, but the writer rolls and the old one goes.
    assert_eq!(spool.read(start(&spool, "fhir"), 10, usize::MAX).unwrap().len(), 1);
    assert!(frame(&vec![b'x'; MAX_PAYLOAD + 1], 0, &mut Vec::new()).is_err());
}

#[test]
fn a_segment_is_kept_until_every_sink_has_passed_it() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(dir.path(), LIMITS, &["fhir", "ndjson"]).unwrap();
    for i in 0..20 {
        spool.append(&mut writer, &framed(&[&format!("event {i} {}", "y".repeat(60))]), true).unwrap();
    }
    let before = segments(dir.path()).len();
    let end = spool.end();
    spool.commit("ndjson", end).unwrap();
    assert_eq!(segments(dir.path()).len(), before, "fhir has shipped nothing yet");
    assert!(spool.oldest_cursor().is_some());
    spool.commit("fhir", end).unwrap();
    assert_eq!(segments(dir.path()).len(), 1);
    assert!(spool.oldest_cursor().is_none());
    // A sink added later gets what the spool still holds (the segment that was being written); the others nothing.
    drop((spool, writer));
    let (spool, _writer) = Spool::open(dir.path(), LIMITS, &["fhir", "ndjson", "new"]).unwrap();
    let held = spool.read(start(&spool, "new"), 100, usize::MAX).unwrap();
    assert!(!held.is_empty() && held.len() < 20, "{}", held.len());
    assert_eq!(texts(&held).last().map(String::as_str), Some(format!("event 19 {}", "y".repeat(60)).as_str()));
    assert!(spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap().is_empty());
}

#[test]
fn unshipped_events_are_read_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, mut writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
        for i in 0..10 {
            spool.append(&mut writer, &framed(&[&format!("e{i}")]), true).unwrap();
        }
        let first = spool.read(start(&spool, "fhir"), 4, usize::MAX).unwrap();
        spool.commit("fhir", first[3].next).unwrap();
    }
    let (spool, _writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
    let rest = spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap();
    assert_eq!(texts(&rest), ["e4", "e5", "e6", "e7", "e8", "e9"]);
    assert_eq!(rest[0].at_ms, 1_000);
    // A cursor file that does not check out means shipping everything again (at least once, never lost).
    fs::write(dir.path().join("cursor-fhir"), b"garbage").unwrap();
    drop(spool);
    let (spool, _writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
    assert_eq!(spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap().len(), 10);
}

#[test]
fn without_a_sink_nothing_is_deleted_and_a_sink_added_later_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let (spool, mut writer) = Spool::open(dir.path(), LIMITS, &[]).unwrap();
        spool.append(&mut writer, &framed(&[&format!("run {i}")]), true).unwrap();
    }
    let (spool, _writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
    assert_eq!(texts(&spool.read(start(&spool, "fhir"), 100, usize::MAX).unwrap()), ["run 0", "run 1", "run 2"]);
}

#[test]
fn one_process_per_spool_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer) = Spool::open(dir.path(), LIMITS, &["fhir"]).unwrap();
    assert!(matches!(Spool::open(dir.path(), LIMITS, &["fhir"]), Err(SpoolError::Locked(_))));
    drop((spool, writer));
    assert!(Spool::open(dir.path(), LIMITS, &["fhir"]).is_ok());
}

#[test]
fn a_batch_read_in_pieces_ends_on_a_record_boundary() {
    // Reads take what the batch may still hold (at least one whole record) in one buffer: with a byte budget of
    // 2 MiB over 3 MiB of records, the first buffer ends inside a record, which is read again with the next one.
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_bytes: 64 << 20, segment_bytes: 32 << 20 };
    let (spool, mut writer) = Spool::open(dir.path(), limits, &["s"]).unwrap();
    let events: Vec<String> =
        (0..3000).map(|i| format!("{{\"event\":{i:04},\"pad\":\"{}\"}}", "x".repeat(1000))).collect();
    for chunk in events.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        spool.append(&mut writer, &framed(&refs), false).unwrap();
    }
    let from = start(&spool, "s");
    let batch = spool.read(from, 10_000, 2 << 20).unwrap();
    let payload: usize = events[0].len();
    let expected = (2usize << 20).div_ceil(payload);
    assert_eq!(texts(&batch), events[..expected], "records until the byte budget is used up, each whole");
    let rest = spool.read(batch.last().unwrap().next, 10_000, usize::MAX).unwrap();
    assert_eq!(texts(&rest), events[expected..]);
    assert_eq!(rest.last().unwrap().next, spool.end());
}
