//! Path normalisation: a path either is refused or normalises to segments that hold no separator or dot-segment,
//! and encoding those segments for the upstream gives a path that normalises to the very same segments, so the
//! upstream receives exactly the form that was matched.

#![no_main]

use fhirgw_config::path::{NormalPath, join_encoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let Ok(path) = NormalPath::parse(&raw) else { return };
    for segment in path.segments() {
        assert!(!segment.is_empty(), "empty segment from {raw:?}");
        assert!(segment != "." && segment != "..", "dot-segment {segment:?} from {raw:?}");
        assert!(!segment.contains('/'), "separator inside {segment:?} from {raw:?}");
    }
    let encoded = join_encoded("", path.segments());
    let again = NormalPath::parse(&encoded).unwrap_or_else(|e| panic!("{encoded:?} (from {raw:?}) refused: {e}"));
    assert_eq!(again.segments(), path.segments(), "{raw:?} -> {encoded:?}");
});
