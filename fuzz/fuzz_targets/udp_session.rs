//! A gateway-side FGU/1 session fed authentic packets whose plaintexts are arbitrary (the
//! fuzzer cannot forge the AEAD, so the harness seals what it chose with the device's keys),
//! interleaved with replays, responses, pushes and time. Never a panic; every packet the
//! session seals opens on the device side.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetgate_kp::{KpError, KpOutcome, KpResponse};
use fleetgate_transport_udp::client::Connecting;
use fleetgate_transport_udp::handshake::{self, Hello, KeyPair, Welcome};
use fleetgate_transport_udp::session::{Limits, NewSession, Session};
use fleetgate_transport_udp::wire::{self, Packet};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let keys = KeyPair::from_private([7; 32]);
    let hello = Hello { app_version: "a", token: Some("t"), username: None, password: None };
    let Ok(mut device) = Connecting::new(&keys.public, 5, &hello, Some(&[3; 32])) else { return };
    let Ok(init) = device.init_packet(None) else { return };
    let Ok(Packet::Init { noise, .. }) = Packet::parse(&init) else { return };
    let Ok(mut hs) = handshake::responder(&keys, Some(&[9; 32])) else { return };
    let mut buf = vec![0; noise.len()];
    if handshake::read_init(&mut hs, noise, &mut buf).is_err() {
        return;
    }
    let mut header = Vec::new();
    wire::put_resp_header(&mut header, 5, 6);
    let welcome = Welcome::Accepted {
        lifetime_secs: 60,
        keepalive_secs: 25,
        max_datagram: 300,
        server_time_ms: 0,
        aliases: vec!["dcx"],
    };
    let Ok((resp, server_keys)) = handshake::write_resp(hs, header, &welcome) else { return };
    let Ok((mut client, _)) = device.finish(&resp) else { return };
    let mut now = Instant::now();
    let limits = Limits { max_datagram: 300, response_cache: 4, max_in_flight: 4, max_pending_pushes: 4, ..Limits::default() };
    let mut session = Session::new(
        NewSession {
            id: 6,
            device: 5,
            peer: "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!()),
            app_version: "a".into(),
            token: "t".into(),
            keys: server_keys,
            aliases: vec!["dcx".to_owned()].into(),
            limits,
        },
        now,
    );
    let mut last = Vec::new();
    // Records: op byte, length byte, that many bytes.
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        match op % 5 {
            0 | 1 => {
                let packet = if op % 5 == 0 { client.seal(body) } else { last.clone() };
                if let Ok(Packet::Data { number, sealed, .. }) = Packet::parse(&packet) {
                    let from = if op & 0x80 != 0 { "127.0.0.1:2" } else { "127.0.0.1:1" };
                    let _ = session.receive(number, sealed, packet.len(), from.parse().unwrap_or_else(|_| unreachable!()), now);
                }
                last = packet;
            }
            2 => {
                let path = String::from_utf8_lossy(body);
                let outcome = match body.first() {
                    Some(b) if b % 2 == 0 => KpOutcome::Error(KpError::not_found("x")),
                    _ => KpOutcome::Success(Bytes::copy_from_slice(body)),
                };
                let response = KpResponse {
                    base: Bytes::from(format!("kp1/a/dcx/t/{path}")),
                    request_id: body.get(1).map(|&b| u32::from(b)),
                    tag: u64::from(op >> 5),
                    outcome,
                };
                session.respond(&response, now);
            }
            3 => now += Duration::from_millis(u64::from(*len) * 100),
            _ => {}
        }
        while let Some(packet) = session.poll_transmit(now) {
            assert!(client.open(&packet).is_ok(), "the device opens what the session sealed");
        }
        let _ = session.expired(now);
    }
});
