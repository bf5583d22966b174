//! The test vectors of SPEC.md §8: a handshake and a data packet each way, made from fixed keys
//! by the device side ([`client`]) and the gateway side ([`session`]), checked against each
//! other and against the text in SPEC.md. `FGU_WRITE_VECTORS=1` rewrites that text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use fleetgate_kp::{KpOutcome, KpResponse};
use fleetgate_transport_udp::client::Connecting;
use fleetgate_transport_udp::handshake::{self, Hello, KeyPair, MIN_INIT, Welcome, hex};
use fleetgate_transport_udp::session::{Limits, NewSession, REQUEST_TAG, Session};
use fleetgate_transport_udp::wire::{self, Ext, Frame, Packet};

fn key(first: u8) -> [u8; 32] {
    std::array::from_fn(|i| first.wrapping_add(i as u8))
}

fn wrapped(out: &mut String, label: &str, bytes: &[u8]) {
    let _ = writeln!(out, "{label} ({} bytes):", bytes.len());
    for chunk in hex(bytes).as_bytes().chunks(64) {
        let _ = writeln!(out, "    {}", std::str::from_utf8(chunk).unwrap());
    }
}

fn vectors() -> String {
    let gateway = KeyPair::from_private(key(0x40));
    let device_e = key(0x80);
    let gateway_e = key(0xc0);
    let (device_id, gateway_id) = (0x0a0b_0c0d_u32, 0x0102_0304_u32);
    let hello =
        Hello { app_version: "demo-v1", token: Some("tok-1"), username: None, password: None };
    let welcome = Welcome::Accepted {
        lifetime_secs: 86_400,
        keepalive_secs: 25,
        max_datagram: 1200,
        server_time_ms: 1_767_225_600_000,
        aliases: vec!["dcx", "cmx", "epts"],
    };
    let sample = br#"[{"temperature":21}]"#;

    // Device: INIT.
    let mut device = Connecting::new(&gateway.public, device_id, &hello, Some(&device_e)).unwrap();
    let init = device.init_packet(None).unwrap();
    assert_eq!(init.len(), MIN_INIT, "the hello is padded to the minimum INIT");

    // Gateway: reads the INIT, answers.
    let Packet::Init { sender, cookie: None, noise } = Packet::parse(&init).unwrap() else {
        panic!("an INIT")
    };
    assert_eq!(sender, device_id);
    let mut hs = handshake::responder(&gateway, Some(&gateway_e)).unwrap();
    let mut hello_plain = vec![0; noise.len()];
    let n = handshake::read_init(&mut hs, noise, &mut hello_plain).unwrap();
    hello_plain.truncate(n);
    assert_eq!(Hello::parse(&hello_plain).unwrap(), hello);
    let mut header = Vec::new();
    wire::put_resp_header(&mut header, device_id, gateway_id);
    let (resp, keys) = handshake::write_resp(hs, header, &welcome).unwrap();
    let mut welcome_plain = Vec::new();
    welcome.put(&mut welcome_plain);
    assert!(resp.len() <= init.len(), "no amplification");

    // Device: reads the RESP, sends a sample.
    let (mut established, accepted) = device.finish(&resp).unwrap();
    assert_eq!(accepted.aliases, ["dcx", "cmx", "epts"]);
    let mut up_frames = Vec::new();
    Frame::Request { ext: Ext::Alias(0), path: "/json", id: Some(1), payload: sample }
        .put(&mut up_frames);
    let up = established.seal(&up_frames);
    assert_eq!(up.len(), up_frames.len() + 29);

    // Gateway: opens it, answers.
    let now = Instant::now();
    let mut session = Session::new(
        NewSession {
            id: gateway_id,
            device: device_id,
            peer: "192.0.2.1:40000".parse().unwrap(),
            app_version: "demo-v1".into(),
            token: "tok-1".into(),
            keys,
            aliases: vec!["dcx".to_owned(), "cmx".to_owned(), "epts".to_owned()].into(),
            limits: Limits::default(),
        },
        now,
    );
    let Packet::Data { receiver, number, sealed } = Packet::parse(&up).unwrap() else {
        panic!("DATA")
    };
    assert_eq!((receiver, number), (gateway_id, 0));
    let got =
        session.receive(number, sealed, up.len(), "192.0.2.1:40000".parse().unwrap(), now).unwrap();
    assert_eq!(got.requests.len(), 1);
    assert_eq!(got.requests[0].topic.as_str(), "kp1/demo-v1/dcx/tok-1/json/1");
    assert_eq!(&got.requests[0].payload[..], sample);
    session.respond(
        &KpResponse {
            base: Bytes::from_static(b"kp1/demo-v1/dcx/tok-1/json"),
            request_id: Some(1),
            tag: REQUEST_TAG,
            outcome: KpOutcome::Success(Bytes::new()),
        },
        now,
    );
    let down = session.poll_transmit(now).expect("the answer");
    let down_frames = established.open(&down).unwrap();
    let mut expected = Vec::new();
    Frame::Response { id: Some(1), target: None, status: 200, payload: b"" }.put(&mut expected);
    assert_eq!(down_frames, expected);

    let mut out = String::new();
    wrapped(&mut out, "gateway static private key", &gateway.private);
    wrapped(&mut out, "gateway static public key", &gateway.public);
    wrapped(&mut out, "device ephemeral private key", &device_e);
    wrapped(&mut out, "gateway ephemeral private key", &gateway_e);
    let _ = writeln!(out, "device session id: {device_id:08x}");
    let _ = writeln!(out, "gateway session id: {gateway_id:08x}");
    let _ = writeln!(out, "hello: app version \"demo-v1\", token \"tok-1\"");
    wrapped(&mut out, "hello payload, padded", &hello_plain);
    wrapped(&mut out, "INIT datagram", &init);
    let _ = writeln!(
        out,
        "welcome: 200, lifetime 86400 s, keepalive 25 s, max datagram 1200, server time 1767225600000, aliases dcx cmx epts"
    );
    wrapped(&mut out, "welcome payload", &welcome_plain);
    wrapped(&mut out, "RESP datagram", &resp);
    let _ = writeln!(
        out,
        "device -> gateway: REQUEST alias 0 (dcx) /json id 1 payload [{{\"temperature\":21}}]"
    );
    wrapped(&mut out, "frames", &up_frames);
    wrapped(&mut out, "DATA datagram, packet number 0", &up);
    let _ = writeln!(out, "gateway -> device: RESPONSE id 1 status 200, empty payload");
    wrapped(&mut out, "frames", &down_frames);
    wrapped(&mut out, "DATA datagram, packet number 0", &down);
    out
}

const BEGIN: &str = "<!-- VECTORS-BEGIN -->\n";
const END: &str = "<!-- VECTORS-END -->";

#[test]
fn the_spec_holds_the_vectors_both_sides_compute() {
    let text = vectors();
    let spec_path = concat!(env!("CARGO_MANIFEST_DIR"), "/SPEC.md");
    let spec = std::fs::read_to_string(spec_path).unwrap();
    let (head, rest) = spec.split_once(BEGIN).expect("the vectors' start in SPEC.md");
    let (current, tail) = rest.split_once(END).expect("the vectors' end in SPEC.md");
    let block = format!("```\n{text}```\n");
    if std::env::var_os("FGU_WRITE_VECTORS").is_some() {
        std::fs::write(spec_path, format!("{head}{BEGIN}{block}{END}{tail}")).unwrap();
        return;
    }
    assert_eq!(current, block, "SPEC.md §8 is stale: run with FGU_WRITE_VECTORS=1");
}

/// The independent Python device (`python_device.py`, `noiseprotocol`) recomputes the same
/// vectors from SPEC.md: the spec is implementable by a second party byte for byte.
#[test]
fn the_python_device_reproduces_the_vectors() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{dir}/tests/python_device.py"))
        .args(["--vectors", &format!("{dir}/SPEC.md")])
        .output()
        .expect("python3 runs (with `python3 -m pip install noiseprotocol`)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python device (needs `python3 -m pip install noiseprotocol`):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("\"failed\": []"), "{stdout}");
}
