//! Admission of protocol connections: what keeps idle or hostile sockets from locking real
//! clients out.
//!
//! - A connection from an address that already has [`Config::max_per_address`] open is
//!   closed at once.
//! - At most [`Config::max_handshaking`] connections may be waiting for their handshake; a
//!   new one past that makes the *oldest* of them go (it had the longest to say hello), so a
//!   real client that connects while a flood of silent sockets is open is still served at
//!   once. The handshake timeout (in `conn.rs`) drops the rest in due course.
//! - When the process runs out of file descriptors, the accept loop drops the oldest waiting
//!   connection too: a silent socket is the cheapest descriptor to give back.
//!
//! [`Config::max_per_address`]: crate::Config::max_per_address
//! [`Config::max_handshaking`]: crate::Config::max_handshaking

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The admission bookkeeping, shared by the accept loop and the connections.
pub(crate) struct Gate {
    max_handshaking: usize,
    max_per_address: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Connections still waiting for their handshake, oldest first, with the bell that tells
    /// one to go.
    handshaking: BTreeMap<u64, Arc<Notify>>,
    per_address: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; dropping it gives the place back.
pub(crate) struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    addr: IpAddr,
    /// Rung when the connection must go to make room (it has not completed its handshake).
    pub(crate) evicted: Arc<Notify>,
}

impl Gate {
    pub(crate) fn new(max_handshaking: usize, max_per_address: usize) -> Gate {
        Gate {
            max_handshaking: max_handshaking.max(1),
            max_per_address: max_per_address.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The bookkeeping stays consistent at every await-free step; a panic elsewhere while
        // the lock was held cannot leave it half-updated in a way that matters.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `addr`, or `None` if that address has too many open. May ring
    /// the oldest waiting connection out to make room.
    pub(crate) fn admit(self: &Arc<Gate>, addr: IpAddr) -> Option<Ticket> {
        let mut inner = self.lock();
        let count = inner.per_address.entry(addr).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        if inner.handshaking.len() >= self.max_handshaking {
            if let Some((_, bell)) = inner.handshaking.pop_first() {
                bell.notify_one();
            }
        }
        let id = inner.next;
        inner.next += 1;
        let evicted = Arc::new(Notify::new());
        inner.handshaking.insert(id, evicted.clone());
        Some(Ticket {
            gate: self.clone(),
            id,
            addr,
            evicted,
        })
    }

    /// Rings the oldest connection still waiting for its handshake out; false if there is
    /// none.
    pub(crate) fn evict_oldest(&self) -> bool {
        match self.lock().handshaking.pop_first() {
            Some((_, bell)) => {
                bell.notify_one();
                true
            }
            None => false,
        }
    }

    /// Connections waiting for their handshake (for tests and logs).
    #[cfg(test)]
    fn handshaking(&self) -> usize {
        self.lock().handshaking.len()
    }
}

impl Ticket {
    /// The connection completed its handshake: it no longer counts as waiting.
    pub(crate) fn greeted(&self) {
        self.gate.lock().handshaking.remove(&self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.gate.lock();
        inner.handshaking.remove(&self.id);
        if let Some(count) = inner.per_address.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                inner.per_address.remove(&self.addr);
            }
        }
    }
}

/// Compares two secrets in time that depends on their lengths only, not on where they first
/// differ, so that a client cannot guess a token byte by byte by timing its refusals.
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, &e) in b.iter().enumerate() {
        // Read as many bytes as the expected secret has, whatever the given one's length.
        let g = a.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(g ^ e);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cre", "s3cret"));
        assert!(!same_secret("s3cretX", "s3cret"));
        assert!(!same_secret("", "s3cret"));
        assert!(!same_secret("S3cret", "s3cret"));
        assert!(same_secret("", ""));
    }

    #[test]
    fn the_oldest_waiting_connection_makes_room() {
        let gate = Arc::new(Gate::new(2, 10));
        let a: IpAddr = [127, 0, 0, 1].into();
        let first = gate.admit(a).expect("room");
        let second = gate.admit(a).expect("room");
        second.greeted();
        let third = gate.admit(a).expect("room");
        assert_eq!(gate.handshaking(), 2);
        let fourth = gate.admit(a).expect("room");
        // The first was rung out (a stored permit), the greeted second was not.
        assert_eq!(gate.handshaking(), 2);
        drop((first, second, third, fourth));
        assert_eq!(gate.handshaking(), 0);
        assert!(gate.lock().per_address.is_empty());
    }

    #[test]
    fn an_address_has_a_cap() {
        let gate = Arc::new(Gate::new(100, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let one = gate.admit(a).expect("room");
        let _two = gate.admit(a).expect("room");
        assert!(gate.admit(a).is_none());
        assert!(gate.admit(b).is_some());
        drop(one);
        assert!(gate.admit(a).is_some());
    }
}
