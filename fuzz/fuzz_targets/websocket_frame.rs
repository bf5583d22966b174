//! Feeds arbitrary client bytes to the WebSocket frame decoder, frame after frame: it may refuse
//! them, never panic, and never hands out more than the limit.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(frame)) = fleetgate_websocket::frame::decode(&mut buf, 4096) {
        assert!(frame.payload.len() <= 4096);
    }
});
