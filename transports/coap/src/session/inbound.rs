//! What the peer sends: acknowledgements and resets of our confirmable messages, and requests,
//! which are deduplicated, validated, reassembled from Block1 blocks or served from a kept
//! Block2 body, and forwarded to the gateway (or kept until the session is open).

use std::borrow::Cow;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fleetgate_kp::{KpRequest, KpTopic};

use super::{
    Credentials, Diagnostic, Event, Exchange, Extra, Kp, OTHER_CREDENTIALS, Observation,
    PeerSession, Reply, Reservation, Seen, Transfer, Waiting, after,
};
use crate::codec::{BlockOption, Code, Message, MessageType};

/// Why a request is answered by the session itself.
pub(super) struct Refusal {
    pub(super) code: Code,
    pub(super) reason: Cow<'static, str>,
    pub(super) extra: Extra,
}

impl Refusal {
    fn new(code: Code, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { code, reason: reason.into(), extra: Extra::default() }
    }
}

fn too_large(max: usize) -> Refusal {
    let mut refusal =
        Refusal::new(Code::REQUEST_ENTITY_TOO_LARGE, format!("payload larger than {max} bytes"));
    refusal.extra.size1 = Some(u32::try_from(max).unwrap_or(u32::MAX));
    refusal
}

impl PeerSession {
    pub(super) fn on_ack(&mut self, msg: &Message) {
        let mid = msg.message_id();
        let reset = msg.mtype() == MessageType::Reset;
        if reset {
            self.stats.resets_received += 1;
        }
        if let Some(out) = self.outgoing.remove(&mid) {
            if let Some(token) = out.observation {
                if let Some(obs) = self.observations.iter_mut().find(|o| o.token == token)
                    && obs.outstanding == Some(mid)
                {
                    obs.outstanding = None;
                }
                if reset {
                    // RFC 7641 §3.6: a RST to a notification cancels the observation.
                    self.remove_observation(&token);
                }
            }
            return;
        }
        if reset
            && let Some(i) = self.recent_non.iter().position(|(m, _)| *m == mid)
            && let Some((_, token)) = self.recent_non.remove(i)
        {
            self.remove_observation(&token);
        }
    }

    pub(super) fn on_request(&mut self, msg: Message, now: Instant) {
        let reply = Reply {
            con: msg.mtype() == MessageType::Confirmable,
            mid: msg.message_id(),
            token: msg.token(),
            len: msg.datagram().len(),
        };
        if let Some(entry) = self.dedup.get(&reply.mid) {
            self.stats.duplicates += 1;
            match &entry.seen {
                // To an unproven peer, never more than it sent (a short duplicate of a long
                // request would otherwise reflect the long answer).
                Seen::Answered(bytes) if self.proven || bytes.len() <= reply.len => {
                    let bytes = bytes.clone();
                    self.transmits.push_back(bytes);
                }
                Seen::Pending(tag) if reply.con => {
                    // The client retransmits while the backend works: acknowledge now, answer
                    // separately later.
                    let tag = *tag;
                    if let Some(mid) = self.exchanges.get_mut(&tag).and_then(|e| e.ack.take()) {
                        self.acknowledge_empty(mid);
                    }
                }
                _ => {}
            }
            return;
        }
        self.remember(reply.mid, Seen::Ignore, now);
        if let Err(mut refusal) = self.serve(&msg, reply, now) {
            refusal.extra.limit = self.limit(reply.len);
            self.reply(reply, refusal.code, refusal.extra, refusal.reason.as_bytes());
            let Refusal { code, reason, .. } = refusal;
            self.diagnostic(Diagnostic::Refused { code, reason });
        }
    }

    /// Validates, reassembles and forwards one request. `Ok` when it was forwarded, or waits
    /// for the session, or was already answered (2.31 Continue, a later Block2 block); a
    /// refusal is answered by the caller.
    fn serve(&mut self, msg: &Message, reply: Reply, now: Instant) -> Result<(), Refusal> {
        let known = *msg.known();
        let success = match msg.code() {
            Code::GET => Code::CONTENT,
            Code::POST | Code::PUT => Code::CHANGED,
            other => {
                return Err(Refusal::new(
                    Code::METHOD_NOT_ALLOWED,
                    format!("method {other} is not served; use POST, PUT or GET"),
                ));
            }
        };
        if known.proxy {
            return Err(Refusal::new(Code::PROXYING_NOT_SUPPORTED, "this is not a proxy"));
        }
        if let Some(number) = known.unrecognized_critical {
            return Err(Refusal::new(
                Code::BAD_OPTION,
                format!("critical option {number} is not supported or malformed"),
            ));
        }
        if known.conditional {
            return Err(Refusal::new(
                Code::BAD_OPTION,
                "If-Match and If-None-Match are not supported",
            ));
        }
        let max = self.settings.max_payload_bytes;
        if known.block1.is_none() && msg.payload().len() > max {
            return Err(too_large(max));
        }
        if msg.uri_path().any(|segment| segment.contains(&b'/')) {
            return Err(Refusal::new(Code::NOT_FOUND, "a Uri-Path segment contains `/`"));
        }
        let mut path = BytesMut::new();
        msg.write_uri_path(&mut path);
        let path = path.freeze();
        let topic = KpTopic::parse(path.clone())
            .map_err(|e| Refusal::new(Code::NOT_FOUND, e.to_string()))?;
        let mut block2_szx = self.block_szx;
        if let Some(block) = known.block2 {
            if block.szx == 7 {
                return Err(Refusal::new(Code::BAD_REQUEST, "BERT blocks are not used over UDP"));
            }
            if block.num > 0 {
                return self.later_block(&path, block, reply, now);
            }
            block2_szx = block2_szx.min(block.szx);
        }
        let mut payload = msg.payload().clone();
        let mut block1 = None;
        if let Some(block) = known.block1 {
            match self.block1(block, path.clone(), payload, known.size1, now)? {
                Some(whole) => {
                    payload = whole;
                    block1 = Some(BlockOption { more: false, ..block });
                }
                None => {
                    let ours = BlockOption { szx: block.szx.min(self.block_szx), ..block };
                    let extra = Extra { block1: Some(ours), ..Extra::default() };
                    let extra = Extra { limit: self.limit(reply.len), ..extra };
                    self.reply(reply, Code::CONTINUE, extra, b"");
                    return Ok(());
                }
            }
        }
        let (username, password) = credentials(msg)?;
        if let Kp::Open { credentials, .. } = &self.kp
            && !credentials.admits(username, password)
        {
            return Err(Refusal::new(Code::UNAUTHORIZED, OTHER_CREDENTIALS));
        }
        let mut observe = false;
        if msg.code() == Code::GET {
            match known.observe {
                Some(0) => {
                    observe = self.register(topic.base(), path.clone(), block2_szx, reply, now)
                }
                Some(1) => self.remove_observation(&reply.token),
                _ => {}
            }
        }
        if self.exchanges.len() >= self.settings.max_exchanges {
            let lifetime = self.settings.exchange_lifetime;
            self.exchanges.retain(|_, e| after(e.created, lifetime) > now);
            if self.exchanges.len() >= self.settings.max_exchanges {
                if observe {
                    self.remove_observation(&reply.token);
                }
                let mut refusal =
                    Refusal::new(Code::SERVICE_UNAVAILABLE, "too many requests in flight");
                refusal.extra.max_age = Some(1);
                return Err(refusal);
            }
        }
        self.next_tag += 1;
        let tag = self.next_tag;
        self.set_seen(reply.mid, Seen::Pending(tag));
        let request = KpRequest { topic, payload, tag, wants_answer: true };
        let waiting = match &self.kp {
            Kp::Open { id, .. } => {
                self.events.push_back(Event::Request { session: *id, request });
                None
            }
            Kp::Opening(_) => {
                let credentials = Credentials::new(username, password);
                Some(Box::new(Waiting { request, credentials }))
            }
            Kp::None => {
                let credentials = Credentials::new(username, password);
                self.kp = Kp::Opening(credentials.clone());
                let Credentials { username, password } = credentials.clone();
                self.events.push_back(Event::OpenSession { username, password });
                Some(Box::new(Waiting { request, credentials }))
            }
        };
        if waiting.is_some() {
            self.waiting.push_back(tag);
        }
        let exchange = Exchange {
            token: reply.token,
            ack: reply.con.then_some(reply.mid),
            con: reply.con,
            success,
            block1,
            observe,
            created: now,
            uri: path,
            block2_szx,
            request_len: reply.len,
            waiting,
        };
        self.exchanges.insert(tag, exchange);
        if reply.con {
            self.piggyback.push_back((after(now, self.settings.ack_timeout), tag));
        }
        Ok(())
    }

    /// Handles one Block1 block (RFC 7959 §2.5): `Ok(None)` when more are expected,
    /// `Ok(Some(payload))` with the whole payload after the last.
    fn block1(
        &mut self,
        block: BlockOption,
        path: Bytes,
        payload: Bytes,
        size1: Option<u32>,
        now: Instant,
    ) -> Result<Option<Bytes>, Refusal> {
        let max = self.settings.max_payload_bytes;
        if block.szx == 7 {
            return Err(Refusal::new(Code::BAD_REQUEST, "BERT blocks are not used over UDP"));
        }
        let size = block.size();
        if (block.more && payload.len() != size) || payload.len() > size {
            return Err(Refusal::new(Code::BAD_REQUEST, "block payload does not match its size"));
        }
        if block.num == 0 {
            self.transfers.retain(|t| t.path != path);
            if size1.is_some_and(|s| s as usize > max) {
                return Err(too_large(max));
            }
            if !block.more {
                return Ok(Some(payload));
            }
            if self.transfers.len() >= self.settings.max_block_transfers {
                let mut refusal =
                    Refusal::new(Code::SERVICE_UNAVAILABLE, "too many block-wise transfers");
                refusal.extra.max_age = Some(5);
                return Err(refusal);
            }
            self.transfers.push(Transfer {
                path: path.clone(),
                // Grown as blocks arrive: a declared Size1 reserves nothing.
                buf: BytesMut::new(),
                expires: now,
                reserved: None,
            });
        }
        let Some(i) = self.transfers.iter().position(|t| t.path == path) else {
            return Err(Refusal::new(
                Code::REQUEST_ENTITY_INCOMPLETE,
                "no block-wise transfer in progress for this path",
            ));
        };
        let offset = u64::from(block.num) * size as u64;
        let transfer = &mut self.transfers[i];
        if offset != transfer.buf.len() as u64 {
            self.transfers.remove(i);
            return Err(Refusal::new(Code::REQUEST_ENTITY_INCOMPLETE, "block out of order"));
        }
        if transfer.buf.len() + payload.len() > max {
            self.transfers.remove(i);
            return Err(too_large(max));
        }
        if !self.proven
            && let Some(budget) = &self.budget
        {
            let reserved =
                transfer.reserved.get_or_insert_with(|| Reservation::new(budget.clone()));
            if !reserved.grow(payload.len()) {
                self.transfers.remove(i);
                self.stats.block1_budget_refusals += 1;
                let mut refusal = Refusal::new(
                    Code::SERVICE_UNAVAILABLE,
                    "block-wise transfers of unproven peers are over budget",
                );
                refusal.extra.max_age = Some(5);
                return Err(refusal);
            }
        }
        transfer.buf.extend_from_slice(&payload);
        transfer.expires = after(now, self.settings.block_transfer_timeout);
        if block.more {
            return Ok(None);
        }
        let whole = self.transfers.remove(i).buf.freeze();
        self.stats.block_transfers += 1;
        Ok(Some(whole))
    }

    /// Serves block `block.num` of a kept response body, without asking the gateway again.
    fn later_block(
        &mut self,
        uri: &Bytes,
        block: BlockOption,
        reply: Reply,
        now: Instant,
    ) -> Result<(), Refusal> {
        let Some(body) = self.bodies.iter_mut().find(|b| b.uri == *uri && b.expires > now) else {
            return Err(Refusal::new(
                Code::REQUEST_ENTITY_INCOMPLETE,
                "no response body is kept for this path; ask again from block 0",
            ));
        };
        let size = block.size() as u64;
        let len = body.payload.len() as u64;
        let offset = u64::from(block.num) * size;
        if offset >= len {
            return Err(Refusal::new(Code::BAD_OPTION, "Block2 number past the end of the body"));
        }
        let end = (offset + size).min(len);
        body.expires = after(now, self.settings.block_transfer_timeout);
        let (code, part) = (body.code, body.payload.slice(offset as usize..end as usize));
        let extra = Extra {
            block2: Some(BlockOption { more: end < len, ..block }),
            limit: self.limit(reply.len),
            ..Extra::default()
        };
        self.reply(reply, code, extra, &part);
        Ok(())
    }

    /// Registers (or re-registers, same token) an observation; false when the peer observes too
    /// many resources already and the GET is served plainly.
    fn register(
        &mut self,
        path: Bytes,
        uri: Bytes,
        block2_szx: u8,
        reply: Reply,
        now: Instant,
    ) -> bool {
        let observation = Observation {
            path,
            token: reply.token,
            con: reply.con,
            active: false,
            outstanding: None,
            last_con: now,
            uri,
            block2_szx,
        };
        if let Some(obs) = self.observations.iter_mut().find(|o| o.token == reply.token) {
            if let Some(mid) = obs.outstanding.take() {
                self.outgoing.remove(&mid);
            }
            *obs = observation;
            return true;
        }
        if self.observations.len() >= self.settings.max_observations {
            return false;
        }
        self.observations.push(observation);
        self.stats.observations_registered += 1;
        true
    }
}

/// The Uri-Query credentials `u=` and `p=` of a request (a stand-in until DTLS); the last of
/// each counts.
fn credentials(msg: &Message) -> Result<(Option<&str>, Option<&[u8]>), Refusal> {
    let mut username = None;
    let mut password = None;
    for arg in msg.uri_query() {
        if let Some(u) = arg.strip_prefix(b"u=") {
            let u = std::str::from_utf8(u)
                .map_err(|_| Refusal::new(Code::BAD_REQUEST, "user name is not UTF-8"))?;
            username = Some(u);
        } else if let Some(p) = arg.strip_prefix(b"p=") {
            password = Some(p);
        }
    }
    Ok((username, password))
}
