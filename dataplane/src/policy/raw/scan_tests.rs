//! The scan against serde: on generated entries and resources, clean and mutated byte by byte, whatever the scan
//! answers must be exactly what the serde views answer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::super::{entry_prefix_serde, resource_view_serde};
use super::*;

const NAMES: &[&str] =
    &["fullUrl", "resource", "search", "mode", "resourceType", "id", "meta", "tag", "system", "code", "status", "text"];

/// String contents: plain, URLs, non-ASCII, every escape (those the scan reads and those it leaves to serde),
/// control characters and bytes that are not UTF-8.
const PIECES: &[&[u8]] = &[
    b"Patient",
    b"p1",
    b"https://fhirgw.dev/dataset",
    b"http://127.0.0.1:8080/fhir/Patient/1",
    b"match",
    b"include",
    b"a b",
    "é漢😀".as_bytes(),
    br#"\""#,
    br"\\",
    br"\n",
    br"\t",
    br"\b\f\r",
    br"\/",
    br"\u0041",
    br"\ud83d\ude00",
    br"\ud800",
    br"\x",
    b"\x01",
    b"\n",
    b"\xff",
    b"\xc3",
];

/// What may follow an entry in its Bundle, and what may not.
const SUFFIXES: &[&[u8]] = &[b"", b",", b"]}", b" ,{", b"x", b"1", b"\"", b"{"];

/// Writes the value of one member, given the generator, the output, the member's name and the nesting.
type Member<'m> = dyn FnMut(&mut Gen, &mut Vec<u8>, &str, usize) + 'm;

struct Gen {
    rng: StdRng,
}

impl Gen {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    fn ws(&mut self, out: &mut Vec<u8>) {
        if self.rng.random_ratio(1, 8) {
            const SPACES: &[&[u8]] = &[b" ", b"\n", b"\t ", b"\r\n  "];
            out.extend_from_slice(self.pick(SPACES));
        }
    }

    fn string(&mut self, out: &mut Vec<u8>) {
        out.push(b'"');
        for _ in 0..self.rng.random_range(0..4) {
            // Mostly clean text, so that whole entries come out clean often enough to be answered by the scan.
            let piece = if self.rng.random_ratio(1, 12) { self.pick(PIECES) } else { self.pick(&PIECES[..7]) };
            out.extend_from_slice(piece);
        }
        out.push(b'"');
    }

    fn name(&mut self, out: &mut Vec<u8>) {
        let name = match self.rng.random_range(0..10) {
            0 => r#"res\"ource"#,
            1 => r"m\u0065ta",
            2 => "Meta",
            _ => self.pick(NAMES),
        };
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.push(b'"');
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) {
        self.ws(out);
        match self.rng.random_range(0..if depth > 4 { 4 } else { 7 }) {
            0 | 1 => self.string(out),
            2 => {
                let number = self.pick(&["0", "-1.5e3", "12", "1E+2", "0.25", "-0", "01", "-", "1.", "1e", "+1", ".5"]);
                out.extend_from_slice(number.as_bytes());
            }
            3 => out.extend_from_slice(self.pick(&["true", "false", "null", "nul", "tru"]).as_bytes()),
            4 | 5 => self.object(out, depth + 1, &mut |g, out, _, depth| g.value(out, depth)),
            _ => {
                out.push(b'[');
                for i in 0..self.rng.random_range(0..4) {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(out, depth + 1);
                }
                self.ws(out);
                out.push(b']');
            }
        }
        self.ws(out);
    }

    /// An object of random members; `member` writes each value, knowing its name.
    fn object(&mut self, out: &mut Vec<u8>, depth: usize, member: &mut Member<'_>) {
        out.push(b'{');
        for i in 0..self.rng.random_range(0..6) {
            if i > 0 {
                out.push(b',');
            }
            self.ws(out);
            let start = out.len();
            self.name(out);
            let name = String::from_utf8_lossy(&out[start + 1..out.len() - 1]).into_owned();
            self.ws(out);
            out.push(b':');
            member(self, out, &name, depth);
        }
        self.ws(out);
        out.push(b'}');
    }

    /// A value for a member that matters: mostly the type the views expect, sometimes not.
    fn typed(&mut self, out: &mut Vec<u8>, name: &str, depth: usize) {
        if self.rng.random_ratio(1, 10) {
            return self.value(out, depth);
        }
        self.ws(out);
        match name {
            "resource" => self.object(out, depth + 1, &mut |g, out, name, depth| g.typed(out, name, depth)),
            "meta" | "search" => self.object(out, depth + 1, &mut |g, out, name, depth| g.typed(out, name, depth)),
            "tag" => {
                out.push(b'[');
                for i in 0..self.rng.random_range(0..3) {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.object(out, depth + 2, &mut |g, out, name, depth| g.typed(out, name, depth));
                }
                out.push(b']');
            }
            "fullUrl" | "mode" | "resourceType" | "id" | "system" | "code" => self.string(out),
            _ => self.value(out, depth),
        }
        self.ws(out);
    }

    fn mutate(&mut self, bytes: &mut Vec<u8>) {
        const SIGNIFICANT: &[u8] = b"{}[],:\"\\ 019aeu\x01\xff";
        for _ in 0..self.rng.random_range(1..4) {
            if bytes.is_empty() {
                return;
            }
            let at = self.rng.random_range(0..bytes.len());
            match self.rng.random_range(0..4) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, self.pick(SIGNIFICANT)),
                2 => bytes[at] = self.pick(SIGNIFICANT),
                _ => bytes.truncate(at),
            }
        }
    }
}

#[test]
fn the_scan_agrees_with_serde_on_entries() {
    let mut g = Gen { rng: StdRng::seed_from_u64(20261204) };
    let (mut answered, mut answered_mutated, cases) = (0, 0, 40_000);
    for case in 0..cases {
        let mut input = Vec::new();
        g.object(&mut input, 1, &mut |g, out, name, depth| g.typed(out, name, depth));
        let mutated = case % 2 == 1;
        if mutated {
            g.mutate(&mut input);
        }
        input.extend_from_slice(g.pick(SUFFIXES));
        if input.first() != Some(&b'{') {
            continue;
        }
        if let Ok((len, view)) = entry(&input) {
            let text = String::from_utf8_lossy(&input);
            assert_eq!(entry_prefix_serde(&input), Some((len, Some(view))), "{text}");
            answered += 1;
            answered_mutated += usize::from(mutated);
        }
    }
    eprintln!("entries: the scan answered {answered} of {cases}, {answered_mutated} mutated");
    // Not vacuous: the scan answers for a good share of the clean entries, and for some mutated ones.
    assert!(answered > cases / 8, "the scan answered only {answered} of {cases}");
    assert!(answered_mutated > cases / 50, "the scan answered only {answered_mutated} mutated entries");
}

#[test]
fn the_scan_agrees_with_serde_on_resources() {
    let mut g = Gen { rng: StdRng::seed_from_u64(4) };
    let (mut answered, cases) = (0, 20_000);
    for case in 0..cases {
        let mut raw = Vec::new();
        g.ws(&mut raw);
        g.object(&mut raw, 1, &mut |g, out, name, depth| g.typed(out, name, depth));
        g.ws(&mut raw);
        if case % 2 == 1 {
            g.mutate(&mut raw);
        }
        if let Ok(view) = resource(&raw) {
            assert_eq!(resource_view_serde(&raw), Some(view), "{}", String::from_utf8_lossy(&raw));
            answered += 1;
        }
    }
    eprintln!("resources: the scan answered {answered} of {cases}");
    assert!(answered > cases / 8, "the scan answered only {answered} of {cases}");
}

/// Nesting deeper than [`MAX_DEPTH`] is left to serde (which refuses more than 128), in skipped values as in the
/// members that matter.
#[test]
fn deep_nesting_is_left_to_serde() {
    for depth in [1, 50, 97, 98, 99, 100, 101, 127, 128, 129, 1000] {
        let arrays = format!(r#"{{"resourceType":"Patient","x":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
        let objects = format!(r#"{{"resourceType":"Patient","x":{}1{}}}"#, r#"{"a":"#.repeat(depth), "}".repeat(depth));
        for raw in [arrays, objects] {
            let scanned = resource(raw.as_bytes()).ok();
            // The resource is at nesting 1 and the innermost container at 1 + depth.
            assert_eq!(scanned.is_some(), depth < MAX_DEPTH, "{depth}");
            if let Some(view) = scanned {
                assert_eq!(resource_view_serde(raw.as_bytes()), Some(view), "{depth}");
            }
        }
    }
}

/// Table: what the scan answers itself, and what it leaves to serde.
/// Bytes above 0x7f: the UTF-8 check runs only when the scan saw one, so each must be seen, in names, values and
/// long strings alike (the eight-byte steps), also after a first one.
#[test]
fn non_ascii_strings_are_checked_as_utf8() {
    let cases: &[(&[u8], bool)] = &[
        ("{\"resource\":{\"resourceType\":\"Patient\",\"name\":\"Zoë 日本\"}}".as_bytes(), true),
        ("{\"résumé\":\"a long value, ascii for a while, then ü\"}".as_bytes(), true),
        (b"{\"a\":\"abcdefgh\xffijklmnop\"}", false),
        (b"{\"a\xc3\":1}", false),
        (b"{\"a\":\"\xc3\xa9 then more than eight ascii bytes \xc3\"}", false),
        (b"{\"a\":\"\xed\xa0\x80\"}", false),
        (b"{\"a\":1} \xff", true),
    ];
    for (raw, answered) in cases {
        let scanned = entry(raw);
        assert_eq!(scanned.is_ok(), *answered, "{}", String::from_utf8_lossy(raw));
        if let Ok((len, view)) = scanned {
            assert_eq!(entry_prefix_serde(raw), Some((len, Some(view))), "{}", String::from_utf8_lossy(raw));
        }
        let whole = raw.strip_suffix(b"\xff").unwrap_or(raw);
        assert_eq!(
            resource(whole).is_ok(),
            *answered && std::str::from_utf8(whole).is_ok(),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn what_the_scan_answers() {
    let cases: &[(&str, bool)] = &[
        (r#"{"resource":{"resourceType":"Patient","meta":{"tag":[{"system":"s","code":"a"}]}}}"#, true),
        (r#"{"resource":{"resourceType":"Patient","text":{"div":"<div a=\"1\">\n</div>"}}}"#, true),
        (r#" {"resource":null,"fullUrl":null,"search":null} "#, false),
        (r#"{"resource":{"resourceType":"Pati\u0065nt"}}"#, false),
        (r#"{"fullUrl":"http:\/\/x"}"#, false),
        (r#"{"resource":{"resourceType":"Patient","id":"a\"b"}}"#, false),
        (r#"{"resource":{"resourceType":"Patient","resourceType":"Patient"}}"#, false),
        (r#"{"resource":["Patient"]}"#, false),
        (r#"{"resource":{"meta":{"tag":[null]}}}"#, false),
        (r#"{"resource":{"meta":{"tag":[{"code":1}]}}}"#, false),
        (r#"{"a":01}"#, false),
        (r#"{"a":1,}"#, false),
        ("{\"a\":\"\x01\"}", false),
        (r#"{"a":1}x"#, false),
        (r#"{"a":1"#, false),
    ];
    for (raw, answered) in cases {
        let scanned = entry(raw.as_bytes());
        assert_eq!(scanned.is_ok(), *answered, "{raw}");
        if let Ok((len, view)) = scanned {
            assert_eq!(entry_prefix_serde(raw.as_bytes()), Some((len, Some(view))), "{raw}");
        }
    }
}
