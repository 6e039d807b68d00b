//! Identifiers and the fencing token.

use std::fmt;

/// A client session. Chosen by the client (a random 64-bit value), so that a supervisor can
/// name a worker's session before the worker connects and end it when the worker dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// A lease, chosen by the client and unique within its session. Reusing a lease id is how a
/// client retries an acquire idempotently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

/// A fencing token: strictly increasing per semaphore, never reused, carried by every grant.
/// A protected resource that remembers the highest token it has seen can reject a holder
/// whose lease was lost while it was paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// An opaque address for a reply, chosen by the caller of
/// [`Coordinator::handle`](crate::Coordinator::handle) and echoed back in
/// [`Effect::Reply`](crate::Effect::Reply). The server packs a connection and request id in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
