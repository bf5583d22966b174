//! Drives one CoAP peer session with a script read from the input: raw and well-formed
//! datagrams (requests with Observe, Block1, Block2, Size1 and credentials; ACKs and RSTs of
//! what it sent), time advances, the gateway's answers and pushes, and arbitrary results for
//! its session openings and requests. None may panic; everything it sends must decode as CoAP,
//! and after a timeout is handled the next one must lie in the future.

#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fleetgate_transport_coap::codec::{
    BlockOption, Code, EncodeError, Message, MessageType, MessageWriter, option, write_empty,
};
use fleetgate_transport_coap::session::{Event, PeerSession, Settings};
use fleetgate_transport_core::{
    ClientIdentity, KpError, KpOutcome, KpRequest, KpResponse, SessionId,
};

const PATHS: [&str; 5] = [
    "kp1/demo-v1/dcx/tok-1/json/1",
    "kp1/demo-v1/dcx/tok-1/json",
    "kp1/demo-v1/cmx/tok-1/config/json",
    "kp1/demo-v1/cmx/tok-1/config/json/7",
    "kp2/not/kp",
];

/// Reads the script; runs out as zeros.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        taken
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Harness {
    session: PeerSession,
    now: Instant,
    /// Requests forwarded to the "gateway" and not yet answered.
    forwarded: Vec<KpRequest>,
    /// Tags forwarded but not yet accepted or refused.
    undone: Vec<u64>,
    /// Message ids of confirmable messages the session sent.
    sent_con: Vec<u16>,
    next_session: u64,
    next_block1: (u32, u8),
}

impl Harness {
    fn drain(&mut self) {
        while let Some(datagram) = self.session.poll_transmit() {
            let msg = match Message::decode(datagram) {
                Ok(msg) => msg,
                Err(e) => panic!("the session sent a datagram that does not decode: {e}"),
            };
            if msg.mtype() == MessageType::Confirmable && self.sent_con.len() < 64 {
                self.sent_con.push(msg.message_id());
            }
        }
        while let Some(event) = self.session.poll_event() {
            if let Event::Request { request, .. } = event
                && self.forwarded.len() < 256
            {
                self.undone.push(request.tag);
                self.forwarded.push(request);
            }
        }
        let _ = self.session.take_stats();
    }

    fn fire(&mut self) {
        for _ in 0..64 {
            match self.session.poll_timeout() {
                Some(due) if due <= self.now => {
                    self.session.handle_timeout(self.now);
                    self.drain();
                    if let Some(next) = self.session.poll_timeout() {
                        assert!(next > self.now, "a handled timeout is due again at once");
                    }
                }
                _ => return,
            }
        }
    }
}

fn settings(s: &mut Script) -> Settings {
    // Short durations, so that every deadline is reached; 255 for one too long to add to an
    // `Instant`.
    let duration = |s: &mut Script, scale: u64| match s.byte() {
        255 => Duration::MAX,
        b => Duration::from_millis(u64::from(b) * scale),
    };
    Settings {
        ack_timeout: duration(s, 1),
        exchange_lifetime: duration(s, 10),
        max_exchanges: usize::from(s.byte() % 8),
        max_payload_bytes: 16 << (s.byte() % 8),
        block_size_bytes: 8 << (s.byte() % 8),
        max_block_transfers: usize::from(s.byte() % 4),
        block_transfer_timeout: duration(s, 10),
        idle_timeout: duration(s, 100),
        max_observations: usize::from(s.byte() % 4),
        observe_max_age_secs: 60,
    }
}

/// A request (or another message) built from the script: mostly valid, with the options the
/// session acts on. `next_block1` is the Block1 number and size that continue the last
/// transfer, so that whole transfers happen.
fn message(s: &mut Script, next_block1: &mut (u32, u8)) -> Bytes {
    let flags = s.byte();
    let mtype = match flags & 3 {
        0 => MessageType::Confirmable,
        1 => MessageType::NonConfirmable,
        2 => MessageType::Acknowledgement,
        _ => MessageType::Reset,
    };
    let code = match (flags >> 2) & 7 {
        0 | 1 => Code::POST,
        2 | 3 => Code::GET,
        4 => Code::PUT,
        5 => Code::DELETE,
        6 => Code::CONTENT,
        _ => Code(s.byte()),
    };
    // Few message ids and tokens, so that duplicates and re-registrations happen.
    let mid = u16::from(s.byte() % 16);
    let token_len = usize::from(s.byte() % 3);
    let token = [s.byte() % 4; 2];
    let path = PATHS[usize::from(s.byte()) % PATHS.len()];
    let opts = s.byte();
    let mut out = BytesMut::new();
    let written = (|| -> Result<(), EncodeError> {
        let mut w = MessageWriter::new(&mut out, mtype, code, mid, &token[..token_len])?;
        if opts & 1 != 0 {
            w.uint_option(option::OBSERVE, u32::from(s.byte() % 3))?;
        }
        for segment in path.split('/') {
            w.option(option::URI_PATH, segment.as_bytes())?;
        }
        if opts & 2 != 0 {
            let arg: &[u8] = match s.byte() % 4 {
                0 => b"u=device",
                1 => b"u=intruder",
                2 => b"p=secret",
                _ => b"u=\xff",
            };
            w.option(option::URI_QUERY, arg)?;
        }
        let block = |s: &mut Script| BlockOption {
            num: u32::from(s.byte() % 8),
            more: s.byte() & 1 == 1,
            szx: s.byte() % 8,
        };
        if opts & 4 != 0 {
            w.block_option(option::BLOCK2, block(s))?;
        }
        let block1 = (opts & 8 != 0).then(|| {
            let mut b = block(s);
            if opts & 64 != 0 {
                (b.num, b.szx) = match *next_block1 {
                    (0, _) => (0, b.szx),
                    continued => continued,
                };
                *next_block1 = if b.more { (b.num + 1, b.szx) } else { (0, 0) };
            }
            b
        });
        if let Some(b) = block1 {
            w.block_option(option::BLOCK1, b)?;
        }
        if opts & 16 != 0 {
            w.uint_option(option::SIZE1, u32::from(s.u16()))?;
        }
        // A block's payload is usually its exact size.
        let len = match block1 {
            Some(b) if opts & 32 == 0 => b.size(),
            _ => usize::from(s.byte()) * 4,
        };
        w.payload(&vec![b'x'; len]);
        Ok(())
    })();
    match written {
        Ok(()) => out.freeze(),
        Err(_) => Bytes::new(),
    }
}

fn outcome(s: &mut Script) -> KpOutcome {
    match s.byte() % 4 {
        0 => KpOutcome::Error(KpError::new(u16::from(s.byte()) * 3, "refused")),
        // Sometimes larger than a block.
        _ => KpOutcome::Success(Bytes::from(vec![b'y'; usize::from(s.byte()) * 12])),
    }
}

fn run(data: &[u8]) {
    let mut s = Script(data);
    let settings = settings(&mut s);
    let seed = u64::from(s.u16());
    let start = Instant::now();
    let mut h = Harness {
        session: PeerSession::new(Arc::new(settings), seed, start),
        now: start,
        forwarded: Vec::new(),
        undone: Vec::new(),
        sent_con: Vec::new(),
        next_session: 1,
        next_block1: (0, 0),
    };
    while !s.is_empty() {
        match s.byte() % 10 {
            0 => {
                let len = usize::from(s.byte());
                let raw = Bytes::copy_from_slice(s.bytes(len));
                h.session.handle_datagram(raw, h.now);
            }
            1 | 2 => {
                let msg = message(&mut s, &mut h.next_block1);
                h.session.handle_datagram(msg, h.now);
            }
            3 => {
                h.now += Duration::from_millis(u64::from(s.u16()));
                h.fire();
            }
            4 if !h.forwarded.is_empty() => {
                let i = usize::from(s.byte()) % h.forwarded.len();
                let request = h.forwarded.swap_remove(i);
                let response = KpResponse {
                    base: request.topic.base(),
                    request_id: request.topic.request_id(),
                    tag: request.tag,
                    outcome: outcome(&mut s),
                };
                h.session.on_response(response, h.now);
            }
            5 => {
                let base = PATHS[usize::from(s.byte()) % 3];
                let tag = if s.byte() % 4 == 0 { u64::from(s.byte()) } else { 0 };
                let response = KpResponse {
                    base: Bytes::from_static(base.as_bytes()),
                    request_id: None,
                    tag,
                    outcome: outcome(&mut s),
                };
                h.session.on_response(response, h.now);
            }
            6 => {
                let tag = if h.undone.is_empty() {
                    u64::from(s.byte())
                } else {
                    let i = usize::from(s.byte()) % h.undone.len();
                    h.undone.swap_remove(i)
                };
                let result = match s.byte() % 3 {
                    0 => Err(KpError::new(u16::from(s.byte()) * 3, "no")),
                    _ => Ok(()),
                };
                h.session.request_done(tag, result, h.now);
            }
            7 => {
                let result = match s.byte() % 3 {
                    0 => Err(KpError::unauthorized("bad credentials")),
                    _ => {
                        h.next_session += 1;
                        Ok(ClientIdentity { session: SessionId(h.next_session), client_id: None })
                    }
                };
                h.session.session_opened(result, h.now);
            }
            8 if !h.sent_con.is_empty() => {
                let i = usize::from(s.byte()) % h.sent_con.len();
                let mid = h.sent_con.swap_remove(i);
                let mtype = if s.byte() & 1 == 0 {
                    MessageType::Acknowledgement
                } else {
                    MessageType::Reset
                };
                let mut out = BytesMut::new();
                write_empty(&mut out, mtype, mid);
                h.session.handle_datagram(out.freeze(), h.now);
            }
            9 => match s.byte() % 8 {
                0 => {
                    h.session.session_lost();
                    h.forwarded.clear();
                }
                1 => h.session.close(),
                _ => h.fire(),
            },
            _ => h.fire(),
        }
        h.drain();
    }
    h.now += Duration::from_secs(3600);
    h.fire();
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
