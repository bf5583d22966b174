//! Fuzzes the HTTP/1.1 framing scanner that refuses huge chunk sizes early: any bytes, fed
//! whole and split at an arbitrary point, give the same verdict and never panic.
#![no_main]

use fleetgate_transport_http::framing::ChunkScanner;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let mut whole = ChunkScanner::new(1 << 16);
    let tripped = whole.feed(rest);
    let mut split = ChunkScanner::new(1 << 16);
    let at = usize::from(cut).min(rest.len());
    split.feed(&rest[..at]);
    assert_eq!(split.feed(&rest[at..]), tripped);
});
