//! What goes to the peer: answers (piggybacked, separate or non-confirmable), notifications,
//! empty ACKs and resets, encoded into the session's buffer and queued as transmits;
//! confirmable ones are tracked for retransmission.

use std::cmp::Reverse;
use std::time::Instant;

use bytes::Bytes;
use fleetgate_kp::{KpOutcome, KpResponse};

use super::{
    Body, CONFIRM_EVERY, Diagnostic, Exchange, Extra, Outgoing, PeerSession, RECENT_NON, Reply,
    Seen, after, outcome_parts,
};
use crate::codec::{
    BlockOption, Code, EncodeError, MessageType, MessageWriter, Token, option, write_empty,
};

impl PeerSession {
    /// Answers an exchange: piggybacked on the ACK while the request is not yet acknowledged,
    /// else a separate response (confirmable for a confirmable request).
    pub(super) fn answer(&mut self, exchange: Exchange, outcome: &KpOutcome, now: Instant) {
        let (code, payload) = outcome_parts(outcome, exchange.success);
        let mut extra = Extra {
            block1: exchange.block1,
            limit: self.limit(exchange.request_len),
            ..Extra::default()
        };
        let payload =
            self.first_block(&exchange.uri, code, payload, exchange.block2_szx, &mut extra, now);
        if exchange.observe {
            let active =
                code.class() == 2 && self.observations.iter().any(|o| o.token == exchange.token);
            if active {
                extra.observe = Some(self.next_observe());
                extra.max_age = Some(self.settings.observe_max_age_secs);
                if let Some(obs) = self.observations.iter_mut().find(|o| o.token == exchange.token)
                {
                    obs.active = true;
                }
            } else {
                self.remove_observation(&exchange.token);
            }
        }
        let observation = exchange.observe.then_some(exchange.token);
        match (exchange.ack, exchange.con) {
            (Some(mid), _) => {
                let token = exchange.token;
                let Some(bytes) =
                    self.encode(MessageType::Acknowledgement, code, mid, &token, extra, &payload)
                else {
                    return;
                };
                if let Some(entry) = self.dedup.get_mut(&mid)
                    && matches!(entry.seen, Seen::Pending(_))
                {
                    entry.seen = Seen::Answered(bytes.clone());
                }
                self.send_counted(bytes);
            }
            (None, confirmable) => {
                // A separate response: CON for a CON request (tracked until ACKed), else NON.
                let kind = if confirmable {
                    MessageType::Confirmable
                } else {
                    MessageType::NonConfirmable
                };
                let mid = self.new_mid();
                let Some(bytes) = self.encode(kind, code, mid, &exchange.token, extra, &payload)
                else {
                    return;
                };
                if confirmable {
                    self.track(mid, bytes.clone(), observation, None, now);
                }
                self.send_counted(bytes);
            }
        }
    }

    /// Sends a push to the observers of its path (RFC 7641 §4.2).
    pub(super) fn notify(&mut self, push: KpResponse, now: Instant) {
        let (code, payload) = outcome_parts(&push.outcome, Code::CONTENT);
        // A notification with an error code ends the observation (RFC 7641 §4.2).
        let ends = code.class() != 2;
        let mut notified = false;
        let mut i = 0;
        while let Some(obs) = self.observations.get(i) {
            if !(obs.active && obs.path == push.base) {
                i += 1;
                continue;
            }
            let token = obs.token;
            notified = true;
            self.notify_one(token, code, &payload, ends, now);
            // An ended observation was swap-removed: slot `i` now holds one not yet visited.
            if self.observations.get(i).is_some_and(|o| o.token == token) {
                i += 1;
            }
        }
        if !notified {
            self.stats.pushes_unobserved += 1;
            self.diagnostic(Diagnostic::PushUnobserved { base: push.base });
        }
    }

    fn notify_one(&mut self, token: Token, code: Code, payload: &Bytes, ends: bool, now: Instant) {
        let seq = self.next_observe();
        let mid = self.new_mid();
        let Some(obs) = self.observations.iter_mut().find(|o| o.token == token) else {
            return;
        };
        let con = obs.con || now.duration_since(obs.last_con) >= CONFIRM_EVERY;
        let (uri, szx) = (obs.uri.clone(), obs.block2_szx);
        let previous = obs.outstanding.take();
        if con {
            obs.outstanding = Some(mid);
            obs.last_con = now;
        }
        let mut extra = Extra {
            observe: (!ends).then_some(seq),
            max_age: Some(self.settings.observe_max_age_secs),
            ..Extra::default()
        };
        let block = self.first_block(&uri, code, payload.clone(), szx, &mut extra, now);
        let mtype = if con { MessageType::Confirmable } else { MessageType::NonConfirmable };
        let Some(bytes) = self.encode(mtype, code, mid, &token, extra, &block) else {
            return;
        };
        if con {
            // RFC 7641 §4.5.2: a newer notification takes over the one in flight, with its
            // retransmission state.
            let inherited = previous.and_then(|old| self.outgoing.remove(&old));
            self.track(mid, bytes.clone(), Some(token), inherited, now);
        } else {
            if self.recent_non.len() >= RECENT_NON {
                self.recent_non.pop_front();
            }
            self.recent_non.push_back((mid, token));
        }
        self.stats.notifications += 1;
        self.send_counted(bytes);
        if ends {
            self.remove_observation(&token);
        }
    }

    /// Starts retransmitting a confirmable message until it is acknowledged.
    fn track(
        &mut self,
        mid: u16,
        datagram: Bytes,
        observation: Option<Token>,
        inherited: Option<Outgoing>,
        now: Instant,
    ) {
        if !self.proven {
            // To an address that has not proven a token: one retransmission burst at most.
            if self.burst_used {
                return;
            }
            self.burst_used = true;
        }
        let (retransmissions, timeout, due) = match inherited {
            Some(old) => (old.retransmissions, old.timeout, old.due),
            None => {
                let timeout = self.initial_timeout();
                (0, timeout, after(now, timeout))
            }
        };
        self.outgoing
            .insert(mid, Outgoing { datagram, retransmissions, timeout, due, observation });
        self.retransmits.push(Reverse((due, mid)));
    }

    /// Acknowledges a confirmable request whose answer is late; the answer follows separately.
    pub(super) fn acknowledge_empty(&mut self, mid: u16) {
        write_empty(&mut self.out, MessageType::Acknowledgement, mid);
        let bytes = self.out.split().freeze();
        if let Some(entry) = self.dedup.get_mut(&mid) {
            entry.seen = Seen::Answered(bytes.clone());
        }
        self.stats.separate_responses += 1;
        self.transmits.push_back(bytes);
    }

    /// Sends an Empty message (a RST).
    pub(super) fn send_empty(&mut self, mtype: MessageType, mid: u16) {
        write_empty(&mut self.out, mtype, mid);
        let bytes = self.out.split().freeze();
        self.transmits.push_back(bytes);
    }

    /// Answers a request directly: a piggybacked ACK for CON (remembered for duplicates), a NON
    /// response for NON.
    pub(super) fn reply(&mut self, reply: Reply, code: Code, extra: Extra, payload: &[u8]) {
        let (mtype, mid) = match reply.con {
            true => (MessageType::Acknowledgement, reply.mid),
            false => (MessageType::NonConfirmable, self.new_mid()),
        };
        let Some(bytes) = self.encode(mtype, code, mid, &reply.token, extra, payload) else {
            return;
        };
        if reply.con {
            self.set_seen(reply.mid, Seen::Answered(bytes.clone()));
        }
        self.send_counted(bytes);
    }

    fn encode(
        &mut self,
        mtype: MessageType,
        code: Code,
        mid: u16,
        token: &Token,
        extra: Extra,
        payload: &[u8],
    ) -> Option<Bytes> {
        let written = (|| -> Result<(), EncodeError> {
            let mut w = MessageWriter::new(&mut self.out, mtype, code, mid, token.as_slice())?;
            if let Some(seq) = extra.observe {
                w.uint_option(option::OBSERVE, seq)?;
            }
            if let Some(age) = extra.max_age {
                w.uint_option(option::MAX_AGE, age)?;
            }
            if let Some(block) = extra.block2 {
                w.block_option(option::BLOCK2, block)?;
            }
            if let Some(block) = extra.block1 {
                w.block_option(option::BLOCK1, block)?;
            }
            if let Some(size) = extra.size2 {
                w.uint_option(option::SIZE2, size)?;
            }
            if let Some(size) = extra.size1 {
                w.uint_option(option::SIZE1, size)?;
            }
            w.payload(payload);
            Ok(())
        })();
        let mut bytes = self.out.split().freeze();
        if written.is_ok()
            && let Some(limit) = extra.limit
            && bytes.len() > limit
        {
            // No larger than the request (no reflection): the code alone, which a request with
            // the same token is never smaller than.
            self.stats.replies_trimmed += 1;
            let bare = MessageWriter::new(&mut self.out, mtype, code, mid, token.as_slice())
                .map(MessageWriter::finish);
            bytes = self.out.split().freeze();
            if let Err(e) = bare {
                self.diagnostic(Diagnostic::EncodeFailed(e));
                return None;
            }
        }
        match written {
            Ok(()) => Some(bytes),
            Err(e) => {
                self.diagnostic(Diagnostic::EncodeFailed(e));
                None
            }
        }
    }

    fn send_counted(&mut self, bytes: Bytes) {
        self.stats.messages_sent += 1;
        self.transmits.push_back(bytes);
    }

    /// A response payload larger than one block goes out as its first block with Block2 and
    /// Size2 (RFC 7959 §2.4); the whole body is kept for the requests that fetch the rest.
    fn first_block(
        &mut self,
        uri: &Bytes,
        code: Code,
        payload: Bytes,
        szx: u8,
        extra: &mut Extra,
        now: Instant,
    ) -> Bytes {
        let size = 16usize << szx.min(6);
        if payload.len() <= size {
            return payload;
        }
        extra.block2 = Some(BlockOption { num: 0, more: true, szx: szx.min(6) });
        extra.size2 = u32::try_from(payload.len()).ok();
        self.bodies.retain(|b| b.uri != *uri);
        if self.bodies.len() >= self.settings.max_block_transfers.max(1) {
            self.bodies.pop_front();
        }
        let first = payload.slice(..size);
        let expires = after(now, self.settings.block_transfer_timeout);
        self.bodies.push_back(Body { uri: uri.clone(), code, payload, expires });
        first
    }
}
