//! Read-only snapshots of the state, for status pages and metrics.

use std::sync::Arc;
use std::time::Duration;

use crate::{LeaseId, SessionId, Token, WaitStats};

/// One semaphore as seen at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SemaphoreView {
    /// Its name.
    pub name: Arc<str>,
    /// Its capacity.
    pub capacity: u32,
    /// Permits held.
    pub in_use: u32,
    /// Acquires waiting in the queue.
    pub queued: usize,
    /// Permits the queued acquires ask for, together.
    pub queued_weight: u64,
    /// Whether it was closed.
    pub closed: bool,
    /// The holders, in grant order (oldest first).
    pub holders: Vec<HolderView>,
    /// The queued acquires, in queue order: the first is the next to be granted.
    pub waiters: Vec<WaiterView>,
    /// Lifetime counters.
    pub counters: Counters,
    /// How long grants waited.
    pub wait: WaitStats,
}

/// One held lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderView {
    /// The lease.
    pub lease: LeaseId,
    /// The session holding it.
    pub session: SessionId,
    /// That session's client description ("host:pid").
    pub client: Arc<str>,
    /// Its weight.
    pub weight: u32,
    /// Its fencing token.
    pub token: Token,
    /// How long it has been held.
    pub age: Duration,
}

/// One queued acquire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiterView {
    /// The lease it will be granted as.
    pub lease: LeaseId,
    /// The session waiting.
    pub session: SessionId,
    /// That session's client description ("host:pid").
    pub client: Arc<str>,
    /// Permits it asks for.
    pub weight: u32,
    /// How long it has waited.
    pub age: Duration,
}

/// Lifetime counters of one semaphore. They only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Grants.
    pub acquired_total: u64,
    /// Leases released by their holder (or by a clean session close).
    pub released_total: u64,
    /// Leases released because their session expired or was ended by someone else.
    pub expired_total: u64,
    /// Queued acquires that timed out.
    pub timed_out_total: u64,
    /// Leases taken away because the semaphore was closed.
    pub lost_total: u64,
}
