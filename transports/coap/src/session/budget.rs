//! The transport-wide budget of Block1 bytes that peers without a proven token may buffer.
//!
//! A Block1 transfer from a peer whose token the gateway has not yet accepted grows only while
//! the budget, shared by every such peer of the transport, has room; past it the block is
//! refused with 5.03 and a Max-Age. Once the peer proves itself its transfers leave the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes that unproven peers may hold in Block1 buffers, shared by every peer of a transport.
#[derive(Debug)]
pub struct Block1Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Block1Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The bytes one transfer holds of a [`Block1Budget`]; given back when dropped.
pub(super) struct Reservation {
    budget: Arc<Block1Budget>,
    bytes: usize,
}

impl Reservation {
    pub(super) fn new(budget: Arc<Block1Budget>) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Takes `n` more bytes; false (and nothing taken) when the budget has no room.
    pub(super) fn grow(&mut self, n: usize) -> bool {
        let before = self.budget.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.budget.limit {
            self.budget.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
