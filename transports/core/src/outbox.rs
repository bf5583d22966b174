//! The per-session queue of responses and pushes, from the gateway to a transport.
//!
//! A bounded single-consumer queue that costs next to nothing while empty: a session that is
//! idle (most of a large fleet, most of the time) holds one small allocation and no buffer. A
//! `tokio::sync::mpsc` channel allocates a block of 32 slots up front, about 3 KiB per session,
//! which was the largest part of an idle MQTT connection's memory.
//!
//! Answers to a session's own requests never find it full: the gateway reserves a slot when it
//! takes a request that will be answered ([`Outbox::try_reserve`]) and the answer uses it
//! ([`Outbox::send_reserved`]). So a burst of answers after a backend stall cannot overflow the
//! queue; only pushes and copies the session does not read in time can, and those are the
//! session's own fault.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::KpResponse;

/// A queue that kept more than this many slots while it held fewer than a quarter of them gives
/// the memory back once drained.
const KEEP_SLOTS: usize = 16;

/// Creates a session's queue holding at most `capacity` responses (at least one).
pub fn outbox(capacity: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            reserved: 0,
            waker: None,
            senders: 1,
            receiver_alive: true,
        }),
        capacity: capacity.max(1),
    });
    (Outbox { shared: shared.clone() }, OutboxReceiver { shared })
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
}

struct State {
    queue: VecDeque<KpResponse>,
    /// Slots promised to answers still to come; they count against the capacity.
    reserved: usize,
    waker: Option<Waker>,
    senders: usize,
    receiver_alive: bool,
}

impl Shared {
    /// Every update leaves the state consistent, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where the gateway sends responses and pushes for a session. Bounded: a session that does not
/// read its responses fast enough is disconnected by the gateway rather than buffered without
/// limit. Cloning adds a sender; the receiver sees the end once every sender is dropped.
pub struct Outbox {
    shared: Arc<Shared>,
}

/// Why [`Outbox::try_send`] did not queue a response; the response comes back.
#[derive(Debug)]
pub enum TrySendError {
    /// The queue holds its capacity: the session does not read.
    Full(KpResponse),
    /// The transport has dropped the session's receiver.
    Closed(KpResponse),
}

/// Why [`OutboxReceiver::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued and every sender is gone.
    Disconnected,
}

impl Outbox {
    /// Queues `response` without waiting, and wakes the transport if it waits.
    pub fn try_send(&self, response: KpResponse) -> Result<(), TrySendError> {
        let waker = {
            let mut state = self.shared.lock();
            if !state.receiver_alive {
                return Err(TrySendError::Closed(response));
            }
            if state.queue.len() + state.reserved >= self.shared.capacity {
                return Err(TrySendError::Full(response));
            }
            state.queue.push_back(response);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Reserves a slot for the answer to a request the session sent, so that the answer cannot
    /// find the queue full; false when every slot is queued or promised (the session has more
    /// requests in flight than its queue holds) or the receiver is gone.
    pub fn try_reserve(&self) -> bool {
        let mut state = self.shared.lock();
        if !state.receiver_alive || state.queue.len() + state.reserved >= self.shared.capacity {
            return false;
        }
        state.reserved += 1;
        true
    }

    /// Queues an answer into a slot [`Outbox::try_reserve`] promised; never full. Fails only
    /// when the transport has dropped the receiver.
    pub fn send_reserved(&self, response: KpResponse) -> Result<(), TrySendError> {
        let waker = {
            let mut state = self.shared.lock();
            state.reserved = state.reserved.saturating_sub(1);
            if !state.receiver_alive {
                return Err(TrySendError::Closed(response));
            }
            state.queue.push_back(response);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Gives back a slot [`Outbox::try_reserve`] promised to an answer that will not come.
    pub fn release(&self) {
        let mut state = self.shared.lock();
        state.reserved = state.reserved.saturating_sub(1);
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self { shared: self.shared.clone() }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("capacity", &self.shared.capacity).finish_non_exhaustive()
    }
}

/// The transport's end of a session's [`Outbox`].
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl OutboxReceiver {
    /// The next response, or `None` once the queue is empty and every sender is gone.
    pub async fn recv(&mut self) -> Option<KpResponse> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`OutboxReceiver::recv`] as a poll function.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<KpResponse>> {
        let mut state = self.shared.lock();
        if let Some(response) = Self::pop(&mut state) {
            return Poll::Ready(Some(response));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next response if one is queued.
    pub fn try_recv(&mut self) -> Result<KpResponse, TryRecvError> {
        let mut state = self.shared.lock();
        match Self::pop(&mut state) {
            Some(response) => Ok(response),
            None if state.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    fn pop(state: &mut State) -> Option<KpResponse> {
        let response = state.queue.pop_front()?;
        // A burst grew the queue; an idle session should not keep that memory.
        if state.queue.is_empty() && state.queue.capacity() > KEEP_SLOTS {
            state.queue = VecDeque::new();
        }
        Some(response)
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        // Responses nobody will read are dropped now, not when the last sender goes.
        state.queue = VecDeque::new();
    }
}

impl fmt::Debug for OutboxReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxReceiver").field("queued", &self.shared.lock().queue.len()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::KpOutcome;
    use bytes::Bytes;

    fn response(tag: u64) -> KpResponse {
        KpResponse {
            base: Bytes::from_static(b"kp1/a/dcx/t/json"),
            request_id: None,
            tag,
            outcome: KpOutcome::Success(Bytes::new()),
        }
    }

    #[test]
    fn bounded_in_order_and_closes() {
        let (tx, mut rx) = outbox(2);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        tx.try_send(response(1)).unwrap();
        tx.try_send(response(2)).unwrap();
        assert!(matches!(tx.try_send(response(3)), Err(TrySendError::Full(r)) if r.tag == 3));
        assert_eq!(rx.try_recv().unwrap().tag, 1);
        let tx2 = tx.clone();
        drop(tx);
        tx2.try_send(response(4)).unwrap();
        drop(tx2);
        // Queued responses are still delivered after the senders are gone.
        assert_eq!(rx.try_recv().unwrap().tag, 2);
        assert_eq!(rx.try_recv().unwrap().tag, 4);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
    }

    #[test]
    fn reserved_slots_are_kept_for_answers() {
        let (tx, mut rx) = outbox(3);
        assert!(tx.try_reserve());
        assert!(tx.try_reserve());
        tx.try_send(response(1)).unwrap();
        // Two slots are promised and one is used: a push finds the queue full...
        assert!(matches!(tx.try_send(response(2)), Err(TrySendError::Full(_))));
        assert!(!tx.try_reserve());
        // ...but the answers always fit.
        tx.send_reserved(response(3)).unwrap();
        tx.send_reserved(response(4)).unwrap();
        assert_eq!(
            std::iter::from_fn(|| rx.try_recv().ok()).map(|r| r.tag).collect::<Vec<_>>(),
            [1, 3, 4]
        );
        assert!(tx.try_reserve());
        tx.release();
        for tag in 5..8 {
            tx.try_send(response(tag)).unwrap();
        }
        assert!(!tx.try_reserve());
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails() {
        let (tx, rx) = outbox(4);
        tx.try_send(response(0)).unwrap();
        drop(rx);
        assert!(matches!(tx.try_send(response(1)), Err(TrySendError::Closed(_))));
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = outbox(1000);
        for i in 0..100 {
            tx.try_send(response(i)).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_ends_with_the_senders() {
        let (tx, mut rx) = outbox(4);
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.try_send(response(7)).unwrap();
        });
        assert_eq!(rx.recv().await.map(|r| r.tag), Some(7));
        sender.await.unwrap();
        assert!(rx.recv().await.is_none());
    }
}
