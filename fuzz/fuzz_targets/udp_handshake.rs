//! Arbitrary bytes as FGU/1 handshake input: the hello and welcome payload parsers, message 1
//! read by a gateway, and message 2 read by a device that sent a real message 1. They may
//! refuse, never panic.
#![no_main]

use fleetgate_transport_udp::client::Connecting;
use fleetgate_transport_udp::handshake::{self, Hello, KeyPair, Welcome};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Hello::parse(data);
    let _ = Welcome::parse(data);
    let keys = KeyPair::from_private([7; 32]);
    if let Ok(mut hs) = handshake::responder(&keys, Some(&[9; 32])) {
        let mut payload = vec![0; data.len()];
        if let Ok(n) = handshake::read_init(&mut hs, data, &mut payload) {
            let _ = Hello::parse(&payload[..n]);
        }
    }
    let hello = Hello { app_version: "a", token: Some("t"), username: None, password: None };
    if let Ok(mut device) = Connecting::new(&keys.public, 5, &hello, Some(&[3; 32])) {
        let _ = device.init_packet(None);
        let _ = device.finish(data);
    }
});
