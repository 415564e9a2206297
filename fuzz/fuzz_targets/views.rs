//! The light views' fast path: whenever the hand-written scan (`dataplane/src/policy/raw/scan.rs`) answers for some
//! bytes, as a Bundle entry or as a whole resource, serde's views (the reference) answer exactly the same. The scan
//! may leave anything to serde; it may never decide differently (a kept entry is forwarded byte for byte on its
//! word).

#![no_main]

use fhirgw_dataplane::policy::raw::scan_disagreement;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(disagreement) = scan_disagreement(data) {
        panic!("{disagreement} on {:?}", String::from_utf8_lossy(data));
    }
});
