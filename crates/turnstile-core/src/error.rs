//! The errors a request can end with.

use crate::{LeaseId, SessionId};

/// Why a request failed. Every variant is a normal outcome of bad or racing input; none of
/// them means the coordinator's state is damaged, and a failed request changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument is out of range (zero capacity, zero weight, an empty name, a zero TTL...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The semaphore exists with another capacity.
    #[error("semaphore {name:?} already exists with capacity {existing}, not {requested}")]
    CapacityMismatch {
        /// The semaphore.
        name: String,
        /// Its capacity.
        existing: u32,
        /// The capacity the request asked for.
        requested: u32,
    },
    /// No semaphore has this name.
    #[error("semaphore {0:?} does not exist")]
    NoSuchSemaphore(String),
    /// The semaphore was closed: queued and later acquires fail with this.
    #[error("semaphore {0:?} is closed")]
    Closed(String),
    /// The weight can never be granted because it exceeds the capacity.
    #[error("weight {weight} exceeds the capacity {capacity} of semaphore {name:?}")]
    WeightExceedsCapacity {
        /// The semaphore.
        name: String,
        /// The requested weight.
        weight: u32,
        /// The semaphore's capacity.
        capacity: u32,
    },
    /// The session does not exist: never opened, closed, or expired (and its leases released).
    #[error("session {0} does not exist (never opened, closed, or expired)")]
    SessionNotFound(SessionId),
    /// The lease is neither held nor queued: never acquired, already released, or lost.
    #[error("lease {0} is not held or queued (never acquired, already released, or lost)")]
    UnknownLease(LeaseId),
    /// The lease id is in use for another semaphore or weight in this session.
    #[error("lease {lease} is already used for semaphore {name:?} with weight {weight}")]
    LeaseConflict {
        /// The lease.
        lease: LeaseId,
        /// The semaphore it is used for.
        name: String,
        /// Its weight.
        weight: u32,
    },
    /// The acquire's timeout passed before enough permits were free.
    #[error("timed out waiting for a permit")]
    TimedOut,
    /// The queued acquire was withdrawn by a release of the same lease id.
    #[error("the queued acquire was cancelled")]
    Cancelled,
    /// A retry of the same acquire (same lease id) replaced this request; the retry gets the
    /// answer.
    #[error("superseded by a retry of the same acquire")]
    Superseded,
    /// The semaphore cannot be deleted: it has holders or waiters and is not closed.
    #[error("semaphore {name:?} is in use ({holders} holders, {waiters} waiters): close it or wait until it is idle")]
    InUse {
        /// The semaphore.
        name: String,
        /// Leases holding it.
        holders: usize,
        /// Acquires queued for it.
        waiters: usize,
    },
    /// The session ended (expired or closed) while the acquire was queued.
    #[error("the session ended while the acquire was queued")]
    SessionEnded,
}
