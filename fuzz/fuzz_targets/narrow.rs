//! Query narrowing: whatever the caller's query and whatever tags the control plane would accept, the search the
//! upstream receives is the caller's constraints, unchanged, plus exactly one `_tag` that ORs exactly the tenant's
//! tags, and it survives encoding without gaining or losing a parameter.
//!
//! Input: lines of `system|code` tags (kept only if the control plane's validation accepts them), then a line
//! `--`, then the raw query string.

#![no_main]

use fhirgw_config::names;
use fhirgw_config::route::QueryGuard;
use fhirgw_config::tenant::Tag;
use fhirgw_dataplane::policy::query::{Use, check, encode, narrow, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (head, query) = text.split_once("\n--\n").unwrap_or(("", &text));
    let tags: Vec<Tag> = head
        .lines()
        .filter_map(|line| line.split_once('|'))
        .filter(|(system, code)| names::tag_system(system).is_ok() && names::tag_code(code).is_ok())
        .map(|(system, code)| Tag { system: system.to_owned(), code: code.to_owned() })
        .take(8)
        .collect();
    let tag_refs: Vec<&Tag> = tags.iter().collect();

    let params = parse(Some(query));
    for usage in [Use::Search, Use::Read, Use::History, Use::Everything] {
        let _ = check(usage, &params, &QueryGuard::default());
    }
    let Some(narrowed) = narrow(&params, &tag_refs) else {
        assert!(tags.is_empty(), "a tenant with tags must get a narrowed search");
        return;
    };
    assert!(!tags.is_empty(), "a tenant without tags must never get a search");
    // The caller's own parameters are all kept, unchanged and in order: they constrain, never get replaced.
    assert_eq!(narrowed.len(), params.len() + 1);
    assert_eq!(&narrowed[..params.len()], params.as_slice());
    // The added parameter is one `_tag` whose OR list is exactly the tenant's tags.
    let (name, value) = &narrowed[params.len()];
    assert_eq!(name, "_tag");
    assert!(!value.contains('\\'), "an escape in a tag token changes its meaning: {value}");
    let ored: Vec<(&str, &str)> = value.split(',').map(|t| t.split_once('|').expect("system|code")).collect();
    let wanted: Vec<(&str, &str)> = tags.iter().map(|t| (t.system.as_str(), t.code.as_str())).collect();
    assert_eq!(ored, wanted, "the _tag OR list is not exactly the tenant's tags");
    // What is sent upstream parses back to exactly what was checked and narrowed: no parameter injection.
    assert_eq!(parse(Some(&encode(&narrowed))), narrowed);
});
