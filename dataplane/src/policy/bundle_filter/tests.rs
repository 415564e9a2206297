//! The Bundle filter's tests: the output rules table, errors, every split point, a huge Bundle in flat memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use fhirgw_config::tenant::Tag;
use serde_json::json;

use super::lexer::find_quote_or_backslash;
use super::*;
use crate::policy::verify::Grants;

const UP: &str = "http://up/fhir";
const PUB: &str = "https://gw/fhir";
const DATASET: &str = "https://fhirgw.dev/dataset";

/// What the proxy does: `verify::filter_bundle`'s entry rule, `rewrite_full_urls`, and links kept only when on
/// the upstream (moved to the public base).
/// With `fast`, it also decides entries from their bytes (`entry_raw`): dropped, or kept byte for byte when the
/// parsed path would not change them; `run_chunks` checks both ways agree on every input of every test.
struct TestPolicy {
    grants: Grants,
    fast: bool,
}

fn policy() -> TestPolicy {
    let tag = Tag { system: DATASET.into(), code: "a".into() };
    TestPolicy { grants: Grants::new([&tag]), fast: false }
}

impl EntryPolicy for TestPolicy {
    fn entry_raw(&mut self, input: &[u8]) -> Option<(usize, RawVerdict)> {
        if !self.fast {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(input).into_iter::<Value>();
        let value = values.next()?.ok()?;
        let len = values.byte_offset();
        let mode = EntryMode::of(&value);
        let verdict = match self.entry(value.clone()) {
            None => RawVerdict::Drop(mode),
            Some(kept) if kept == value => RawVerdict::Keep(None),
            Some(_) => RawVerdict::Undecided,
        };
        Some((len, verdict))
    }

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

/// The filter without the fast path; the same input through the fast path must give the same document (kept
/// entries are then sent as they came, so the bytes may differ in spacing) and the same stats, or the same error.
fn run_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]> + Clone, options: Options) -> Outcome {
    let chunks_text: Vec<String> =
        chunks.clone().into_iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let slow = run_with(policy(), chunks.clone(), options);
    let fast = run_with(TestPolicy { fast: true, ..policy() }, chunks, options);
    match (&slow, &fast) {
        (Ok((a, sa)), Ok((b, sb))) => {
            let parse = |out: &[u8]| serde_json::from_slice::<Value>(out).expect("the output is JSON");
            assert_eq!((parse(a), sa), (parse(b), sb), "the fast path disagrees");
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "the fast path fails otherwise"),
        _ => panic!("the fast path disagrees: {slow:?} vs {fast:?} on {:?}", chunks_text),
    }
    slow
}

fn run_with<'a>(policy: TestPolicy, chunks: impl IntoIterator<Item = &'a [u8]>, options: Options) -> Outcome {
    let mut filter = BundleFilter::new(policy, options);
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
        (br#"{"resourceType":"Bundle","entry":[{"a":1},]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
        (br#"{"resourceType":"Bundle","entry":[,]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
        (br#"{"resourceType":"Bundle","entry":[{"a":}]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
        (br#"{"resourceType":"Bundle","entry":[1 2]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
        (br#"{"resourceType":"Bundle","entry":[{"a":[}]}]}"#.to_vec(), |e| matches!(e, StreamError::Malformed { .. })),
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
    let synthetic = Synthetic { entries: usize::MAX, big_every: 5000, big_len: 300_000, padding: "x".repeat(300_000) };
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

/// `cargo test -p fhirgw-dataplane --lib --release policy::bundle_filter::tests::throughput -- --ignored --nocapture`
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
