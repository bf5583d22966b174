//! Fuzzes the 1/KP path parser with arbitrary topic bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(t) = fleetgate_transport_core::KpTopic::parse(bytes::Bytes::copy_from_slice(data)) {
        let _ = (t.token(), t.resource_path(), t.base(), t.request_id());
    }
});
