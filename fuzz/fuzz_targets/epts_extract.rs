//! Feeds arbitrary data samples to EPTS extraction (auto-extraction, named series, every
//! timestamp format) and arbitrary text to its ISO-8601 parser: none may panic.

#![no_main]

use fleetgate_epts::extract::Extractor;
use fleetgate_epts::time::{format_iso8601, parse_iso8601};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let configs = [
        "auto_extract: true",
        "auto_extract: true\nnames: {loc: {values: [{path: a.b, name: x}, {path: s, type: string}]}}\ntimestamp: {path: ts, format: iso8601, fallback: reject}",
        "names: {v: {values: [{path: \"$.v\"}]}}\ntimestamp: {path: ts, format: unix-seconds}",
        "auto_extract: true\ntimestamp: {path: t.s, format: millis-unix-epoch}",
    ];
    for yaml in configs {
        let config = serde_yaml::from_str(yaml).expect("a valid configuration");
        let mut out = Vec::new();
        let _ = Extractor::new(&config).extract(data, 1_700_000_000_000, &mut out);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(ms) = parse_iso8601(text) {
            let _ = format_iso8601(ms);
        }
    }
});
