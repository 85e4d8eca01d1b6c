//! Which live client connections each token and each sandbox opened, so that revoking a token
//! or terminating a sandbox closes them (a WebSocket, an HTTP/2 connection, a long poll).
//!
//! Every client connection owns a [`CancellationToken`]. The first time a request on that
//! connection is admitted with a token, the connection registers under the token's `jti` and its
//! sandbox id. Revocation cancels every registered token; the connection task and any tunnels
//! it spawned select on it and drop their sockets at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

type Entries = Vec<(u64, CancellationToken)>;

/// The registry of connections by token id and by sandbox id.
#[derive(Debug, Default)]
pub struct Tracker {
    next_id: AtomicU64,
    by_jti: DashMap<Box<str>, Entries, foldhash::fast::RandomState>,
    by_sandbox: DashMap<Box<str>, Entries, foldhash::fast::RandomState>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// A handle for a new client connection.
    pub fn connection(self: &Arc<Self>) -> Connection {
        Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cancel: CancellationToken::new(),
            tracker: Arc::clone(self),
            registered: Mutex::new(Vec::new()),
            held: Mutex::new(Held(Vec::new())),
        }
    }

    /// Closes every connection a token opened. Returns how many were closed.
    pub fn close_token(&self, jti: &str) -> usize {
        Self::close(&self.by_jti, jti)
    }

    /// Closes every connection opened into a sandbox.
    pub fn close_sandbox(&self, sandbox: &str) -> usize {
        Self::close(&self.by_sandbox, sandbox)
    }

    /// Client and relay connections open into a sandbox now (an idle sandbox has none).
    pub fn open_in(&self, sandbox: &str) -> usize {
        self.by_sandbox
            .get(sandbox)
            .map_or(0, |entries| entries.len())
    }

    /// Connections currently registered under any token.
    pub fn tracked_tokens(&self) -> usize {
        self.by_jti.len()
    }

    fn close(map: &DashMap<Box<str>, Entries, foldhash::fast::RandomState>, key: &str) -> usize {
        match map.remove(key) {
            Some((_, entries)) => {
                for (_, cancel) in &entries {
                    cancel.cancel();
                }
                entries.len()
            }
            None => 0,
        }
    }

    fn add(
        map: &DashMap<Box<str>, Entries, foldhash::fast::RandomState>,
        key: &str,
        id: u64,
        cancel: &CancellationToken,
    ) {
        map.entry(key.into())
            .or_default()
            .push((id, cancel.clone()));
    }

    fn forget(map: &DashMap<Box<str>, Entries, foldhash::fast::RandomState>, key: &str, id: u64) {
        if let Some(mut entries) = map.get_mut(key) {
            entries.retain(|(i, _)| *i != id);
            if entries.is_empty() {
                drop(entries);
                map.remove_if(key, |_, e| e.is_empty());
            }
        }
    }
}

/// One client connection's membership in the registry; unregisters itself when dropped.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    cancel: CancellationToken,
    tracker: Arc<Tracker>,
    /// (jti, sandbox) pairs this connection registered under; usually one.
    registered: Mutex<Vec<(Box<str>, Box<str>)>>,
    /// What lives exactly as long as the client connection (its connection-limit slot, its
    /// place in the open-connections gauge). Kept here rather than in the task that served
    /// HTTP because a WebSocket outlives that task: the tunnel holds this connection until
    /// it ends.
    held: Mutex<Held>,
}

/// Opaque resources released when the connection is dropped.
struct Held(Vec<Box<dyn Send>>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("count", &self.0.len())
            .finish()
    }
}

impl Connection {
    /// Cancelled when a token or sandbox this connection used is revoked.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Keeps `resource` until the connection ends, including any tunnel it was upgraded to.
    pub fn hold(&self, resource: impl Send + 'static) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(Box::new(resource));
    }

    /// Records that a request on this connection was admitted with token `jti` into `sandbox`.
    /// Cheap when the pair is already registered (the usual keep-alive case). Returns false,
    /// registering nothing, when this connection would be one more than `max_per_sandbox`
    /// connections into that sandbox.
    pub fn admit(&self, jti: &str, sandbox: &str, max_per_sandbox: usize) -> bool {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        if registered
            .iter()
            .any(|(j, s)| &**j == jti && &**s == sandbox)
        {
            return true;
        }
        let in_sandbox = registered.iter().any(|(_, s)| &**s == sandbox);
        if !in_sandbox {
            let open = self
                .tracker
                .by_sandbox
                .get(sandbox)
                .map_or(0, |entries| entries.len());
            if open >= max_per_sandbox {
                return false;
            }
            Tracker::add(&self.tracker.by_sandbox, sandbox, self.id, &self.cancel);
        }
        Tracker::add(&self.tracker.by_jti, jti, self.id, &self.cancel);
        registered.push((jti.into(), sandbox.into()));
        true
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let registered =
            std::mem::take(self.registered.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (jti, sandbox) in registered {
            Tracker::forget(&self.tracker.by_jti, &jti, self.id);
            // Idempotent: a connection is in a sandbox's list once, however many tokens.
            Tracker::forget(&self.tracker.by_sandbox, &sandbox, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_a_token_cancels_only_its_connections() {
        let t = Arc::new(Tracker::new());
        let a = t.connection();
        let b = t.connection();
        assert!(a.admit("j1", "s1", 10));
        assert!(a.admit("j1", "s1", 10));
        assert!(b.admit("j2", "s1", 10));
        assert_eq!(t.open_in("s1"), 2);
        assert_eq!(t.close_token("j1"), 1);
        assert!(a.cancelled().is_cancelled());
        assert!(!b.cancelled().is_cancelled());
        assert_eq!(t.close_sandbox("s1"), 2);
        assert!(b.cancelled().is_cancelled());
    }

    #[test]
    fn held_resources_live_as_long_as_the_connection() {
        let t = Arc::new(Tracker::new());
        let a = t.connection();
        let resource = Arc::new(());
        a.hold(Arc::clone(&resource));
        assert_eq!(Arc::strong_count(&resource), 2);
        drop(a);
        assert_eq!(Arc::strong_count(&resource), 1);
    }

    #[test]
    fn connections_per_sandbox_are_capped() {
        let t = Arc::new(Tracker::new());
        let a = t.connection();
        let b = t.connection();
        assert!(a.admit("j1", "s1", 1));
        assert!(
            a.admit("j2", "s1", 1),
            "the same connection with another token"
        );
        assert!(
            !b.admit("j3", "s1", 1),
            "a second connection into a full sandbox"
        );
        assert!(b.admit("j3", "s2", 1));
        drop(a);
        assert!(
            b.admit("j3", "s1", 1),
            "room again once the first one closed"
        );
    }

    #[test]
    fn dropped_connections_unregister() {
        let t = Arc::new(Tracker::new());
        let a = t.connection();
        assert!(a.admit("j1", "s1", 10));
        assert_eq!(t.tracked_tokens(), 1);
        drop(a);
        assert_eq!(t.tracked_tokens(), 0);
        assert_eq!(t.open_in("s1"), 0);
        assert_eq!(t.close_sandbox("s1"), 0);
    }
}
