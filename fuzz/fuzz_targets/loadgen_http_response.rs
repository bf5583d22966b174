//! Feeds arbitrary bytes to the load generator's HTTP/1.1 response parser, response after
//! response, as a gateway's answers would arrive: none may panic.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = fleetgate_benches::http_device::parse_response(&mut buf) {}
});
