//! Feeds arbitrary query strings and bodies to the ECR REST API's parameter and body checks:
//! none may panic.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let query = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    fleetgate_ecr::api::fuzz_params(&query, body);
});
