//! Fuzzes the 2/DCP payload parser for both of its resources.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleetgate_dcx::samples_of("/json", data);
    let _ = fleetgate_dcx::samples_of("/plain/metric", data);
});
