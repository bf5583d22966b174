//! Feeds arbitrary bytes to the WebSocket upgrade parser: an answer or a refusal, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match fleetgate_websocket::handshake::accept(data, "/mqtt", &["mqtt", "mqttv3.1"]) {
        Ok(Some(upgrade)) => assert!(upgrade.consumed <= data.len()),
        Ok(None) => {}
        Err(e) => {
            let _ = e.response();
        }
    }
});
