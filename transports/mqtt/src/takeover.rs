//! Client-id takeover (MQTT 3.1.1 §3.1.4 step 2, MQTT 5 §3.1.4-3): when a client connects with
//! a client id that a connected session already uses, the server closes that session (MQTT 5:
//! DISCONNECT 0x8E Session taken over). One table for the whole process, so that the rule
//! holds across every MQTT transport (TCP, TLS, WebSocket, QUIC) serving one gateway.
//!
//! The scope of a client id is the gateway the transports serve (one tenant): entries are keyed
//! by the handler as well, so that several gateways in one process (tests) do not meet. An
//! empty client id (the server assigns one) takes nothing over.
//!
//! The old session is closed through the gateway ([`KpHandler::close_session`] drops its
//! outbox, which ends its connection); the table remembers it as taken over so that its
//! connection can say why. A connection keeps nothing for this: its session id finds its entry.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use fleetgate_transport_core::{KpHandler, SessionId};

/// The gateway a connection belongs to (its handler's address).
type Scope = usize;

#[derive(Default)]
struct Table {
    /// The session connected with each client id.
    by_client_id: HashMap<(Scope, Box<str>), SessionId>,
    /// The client id of each registered session.
    by_session: HashMap<(Scope, SessionId), Box<str>>,
    /// Sessions closed by a takeover whose connection has not ended yet.
    taken_over: HashSet<(Scope, SessionId)>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(Mutex::default);

fn table() -> std::sync::MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

fn scope(handler: &Arc<dyn KpHandler>) -> Scope {
    Arc::as_ptr(handler).cast::<()>() as usize
}

/// `session` has connected with `client_id`: the session that used it before, if any, is
/// closed (through `handler`) and returned.
pub(crate) fn connected(
    handler: &Arc<dyn KpHandler>,
    client_id: &str,
    session: SessionId,
) -> Option<SessionId> {
    if client_id.is_empty() {
        return None;
    }
    let scope = scope(handler);
    let old = {
        let mut t = table();
        let old = t.by_client_id.insert((scope, client_id.into()), session);
        t.by_session.insert((scope, session), client_id.into());
        let old = old.filter(|old| *old != session)?;
        t.by_session.remove(&(scope, old));
        t.taken_over.insert((scope, old));
        old
    };
    // Outside the lock: the gateway takes its own.
    handler.close_session(old);
    Some(old)
}

/// Whether `session` was closed by a takeover (asked when the gateway drops its outbox).
pub(crate) fn was_taken_over(handler: &Arc<dyn KpHandler>, session: SessionId) -> bool {
    table().taken_over.contains(&(scope(handler), session))
}

/// `session`'s connection has ended: its entries go.
pub(crate) fn ended(handler: &Arc<dyn KpHandler>, session: SessionId) {
    let scope = scope(handler);
    let mut t = table();
    t.taken_over.remove(&(scope, session));
    if let Some(client_id) = t.by_session.remove(&(scope, session)) {
        let key = (scope, client_id);
        if t.by_client_id.get(&key) == Some(&session) {
            t.by_client_id.remove(&key);
        }
    }
}

/// Entries `handler`'s gateway has in the table (for tests of its bound).
#[cfg(test)]
pub(crate) fn entries(handler: &Arc<dyn KpHandler>) -> usize {
    let scope = scope(handler);
    let t = table();
    t.by_client_id.keys().filter(|(s, _)| *s == scope).count()
        + t.by_session.keys().filter(|(s, _)| *s == scope).count()
        + t.taken_over.iter().filter(|(s, _)| *s == scope).count()
}
