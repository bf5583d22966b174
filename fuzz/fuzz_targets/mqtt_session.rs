//! Fuzzes the MQTT session: the input is a script of steps — bytes from the client in arbitrary
//! chunks (raw, or well-formed packets to get past CONNECT and deep into the session), time
//! passing, the gateway's answers to events (in any order, any result), responses and pushes,
//! partial writes and closes. The session must never panic, must write only valid MQTT, must
//! report `Closed` once and last, and must never ask to be woken in the past.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::{ClientIdentity, KpError, KpOutcome, KpResponse, SessionId};
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Disconnect, MAX_PACKET_SIZE, Packet, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, Unsubscribe, UnsubscribeProperties,
};
use fleetgate_transport_mqtt::session::{Event, RequestId, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

/// The script's bytes, read from the front; zeros once it runs out.
struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn result(b: u8) -> Result<(), KpError> {
    match b % 4 {
        0 | 1 => Ok(()),
        2 => Err(KpError::unauthorized("bad token")),
        _ => Err(KpError::new(u16::from(b) * 3, "\"odd\" \u{1}")),
    }
}

/// A well-formed packet the client may send, chosen and shaped by the script.
fn packet(s: &mut Script, version: ProtocolVersion) -> Packet {
    let id = u16::from(s.byte()).max(1);
    let qos = QoS::from_u8(s.byte() % 3).unwrap_or(QoS::AtMostOnce);
    let topic = match s.byte() % 4 {
        0 => Bytes::from_static(b"kp1/demo-v1/dcx/tok/json/42"),
        1 => Bytes::from_static(b"kp1/demo-v1/dcx/tok/json"),
        2 => Bytes::from_static(b"not/kp1"),
        _ => Bytes::new(),
    };
    match s.byte() % 10 {
        0..=3 => {
            let mut properties = PublishProperties::default();
            if version == ProtocolVersion::V5 && s.byte() % 2 == 0 {
                properties.topic_alias = Some(u16::from(s.byte() % 8));
            }
            let topic = if topic.is_empty() && properties.topic_alias.is_none() {
                Bytes::from_static(b"t")
            } else {
                topic
            };
            let retain = s.byte() % 8 == 0;
            let n = usize::from(s.byte() % 64);
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload: Bytes::copy_from_slice(s.take(n)),
            })
        }
        4 => Packet::PubAck(PubAck::new(id)),
        5 => Packet::PingReq,
        6 => {
            let filter = match s.byte() % 3 {
                0 => "kp1/demo-v1/cmx/tok/#",
                1 => "$share/g/kp1/+/cmx/tok/#",
                _ => "#",
            };
            let mut properties = SubscribeProperties::default();
            if s.byte() % 4 == 0 {
                properties.subscription_identifier = Some(1);
            }
            Packet::Subscribe(Subscribe {
                packet_id: id,
                subscriptions: vec![Subscription {
                    filter: Bytes::from_static(filter.as_bytes()),
                    options: SubscriptionOptions::new(qos),
                }],
                properties,
            })
        }
        7 => Packet::Unsubscribe(Unsubscribe {
            packet_id: id,
            filters: vec![Bytes::from_static(b"a/#"), Bytes::from_static(b"b")],
            properties: UnsubscribeProperties::default(),
        }),
        8 => Packet::PubRec(PubAck::new(id)),
        _ => Packet::Disconnect(Disconnect::normal()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script(data);
    let knobs = s.byte();
    let config = SessionConfig {
        max_packet_size: if knobs & 1 == 0 { 1 << 20 } else { 96 },
        // The first-packet cap, and the rate limits that pause decoding, on for some inputs.
        max_connect_packet_size: if knobs & 16 == 0 { 4096 } else { 80 },
        connect_timeout: Duration::from_secs(10),
        max_keep_alive_secs: u16::from(knobs >> 6),
        receive_maximum: if knobs & 2 == 0 { 1024 } else { 2 },
        topic_alias_maximum: if knobs & 4 == 0 { 64 } else { 2 },
        max_inflight_v311: if knobs & 8 == 0 { 64 } else { 1 },
        max_messages_per_sec: if knobs & 32 == 0 { 0 } else { 3 },
        max_bytes_per_sec: if knobs & 32 == 0 { 0 } else { 200 },
    };
    let mut now = Instant::now();
    let mut session = Session::new(&config, now);

    // The client's view: its codec and the bytes the session wrote it so far.
    let version = match s.byte() % 3 {
        0 => None,
        1 => Some(ProtocolVersion::V311),
        _ => Some(ProtocolVersion::V5),
    };
    let mut client = Codec::new(MAX_PACKET_SIZE);
    let mut to_client = BytesMut::new();
    if let Some(version) = version {
        // Start with a CONNECT, so that most of the script reaches a connected session.
        client.set_version(version);
        let mut connect = Connect {
            protocol_version: version,
            clean_start: true,
            keep_alive_secs: u16::from(s.byte() % 8),
            client_id: Bytes::from_static(b"fuzz"),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        if version == ProtocolVersion::V5 {
            connect.properties.receive_maximum = Some(u16::from(s.byte() % 4).max(1));
            connect.properties.maximum_packet_size = Some(u32::from(s.byte()).max(1) * 4);
        }
        let mut out = BytesMut::new();
        if client.encode(&Packet::Connect(Box::new(connect)), &mut out).is_ok() {
            session.receive(&out, now);
        }
    }

    let mut requests: VecDeque<RequestId> = VecDeque::new();
    let mut closed = false;
    while !s.done() {
        match s.byte() % 12 {
            // Raw bytes from the client.
            0 | 1 => {
                let n = usize::from(s.byte());
                let chunk = s.take(n);
                session.receive(chunk, now);
            }
            // A well-formed packet, in up to two chunks.
            2..=4 => {
                let v = client.version().unwrap_or(ProtocolVersion::V5);
                let p = packet(&mut s, v);
                let mut out = BytesMut::new();
                if client.encode(&p, &mut out).is_ok() {
                    let split = usize::from(s.byte()).min(out.len());
                    session.receive(&out[..split], now);
                    session.receive(&out[split..], now);
                }
            }
            // Time passes; the timer fires if due.
            5 => {
                now += Duration::from_millis(u64::from(s.byte()) * 150);
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(now);
                    if let Some(t) = session.poll_timeout() {
                        assert!(t > now, "woken again in the past: the glue would spin");
                    }
                }
            }
            // The gateway takes the events.
            6 | 7 => {
                while let Some(event) = session.poll_event() {
                    assert!(!closed, "an event after Closed");
                    match event {
                        Event::Connect(request) => {
                            let _ = (request.client_id(), request.username(), request.password());
                            let identity = match s.byte() % 4 {
                                0 => Err(KpError::new(u16::from(s.byte()) * 2, "no")),
                                _ => Ok(ClientIdentity { session: SessionId(1), client_id: None }),
                            };
                            session.connected(identity, now);
                        }
                        Event::Request { id, request } => {
                            let _ = request.topic.base();
                            requests.push_back(id);
                        }
                        Event::Subscribe { id, filters } => {
                            // One answer too few, the right number, or one too many.
                            let n = (filters.len() + usize::from(s.byte() % 3)).saturating_sub(1);
                            let results: Vec<_> = (0..n).map(|_| result(s.byte())).collect();
                            session.subscribed(id, results);
                        }
                        Event::Unsubscribe { id, filters } => {
                            let existed: Vec<bool> =
                                filters.iter().map(|_| s.byte() % 2 == 0).collect();
                            session.unsubscribed(id, existed);
                        }
                        Event::Closed(_) => closed = true,
                    }
                }
            }
            // The gateway answers a request, in any order, maybe twice.
            8 => {
                if !requests.is_empty() {
                    let i = usize::from(s.byte()) % requests.len();
                    let again = s.byte() % 8 == 0;
                    let id = if again { requests.get(i).copied() } else { requests.remove(i) };
                    if let Some(id) = id {
                        session.request_done(id, result(s.byte()));
                    }
                }
            }
            // A response or push from the gateway.
            9 => {
                let tag = u64::from(s.byte() % 4);
                let outcome = match s.byte() % 2 {
                    0 => {
                        let n = usize::from(s.byte());
                        KpOutcome::Success(Bytes::copy_from_slice(s.take(n)))
                    }
                    _ => KpOutcome::Error(KpError::timeout("slow")),
                };
                let request_id = (s.byte() % 2 == 0).then_some(u32::from(s.byte()));
                let response = KpResponse {
                    base: Bytes::from_static(b"kp1/demo-v1/dcx/tok/json"),
                    request_id,
                    tag,
                    outcome,
                };
                let wanted = session.wants_responses();
                let sent = session.send_response(response);
                assert!(!wanted || sent.is_ok(), "refused a response it wanted");
            }
            // The glue writes some of the output.
            10 => {
                let n = usize::from(s.byte()) * 4;
                let n = n.min(session.transmit().len());
                to_client.extend_from_slice(&session.transmit()[..n]);
                session.advance_transmit(n);
            }
            // The glue closes the session.
            _ => session.close(ReasonCode::ServerShuttingDown),
        }
        // Whatever the session wrote decodes as MQTT on the client's side (once the client's
        // version is known: a raw script may name one in its own CONNECT).
        if client.version().is_none() {
            match session.version() {
                Some(v) => client.set_version(v),
                None => continue,
            }
        }
        while let Some(p) = client.decode(&mut to_client).unwrap_or_else(|e| {
            panic!("the session wrote invalid MQTT: {e}");
        }) {
            if let Packet::ConnAck(c) = &p
                && c.reason_code != ReasonCode::Success
            {
                assert!(session.is_closed(), "refused but not closed");
            }
        }
    }
});
