//! Feeds arbitrary resource paths and bodies to CMX's 7/CMP request parsing: none may panic.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let path = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    fleetgate_cmx::request::fuzz(&path, body);
});
