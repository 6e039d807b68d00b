//! What the core asks its caller to do, handed back as data.
//!
//! The caller must carry out the effects of one call in order, with one rule: an
//! [`Effect::Persist`] must be durable before any [`Effect::Reply`] or [`Effect::Event`] that
//! follows it is sent, so that no client is ever told of a state change a crash could undo.
//! The caller may make one exception: the answer to a [`Request::Release`](crate::Request)
//! itself. A crash that undoes a release leaves the lease held by its session, which lets
//! no holder too many in, and a client that resumes its session releases again what it
//! released (the coordinator server does this, halving the syncs a pair waits for).

use std::sync::Arc;
use std::time::Duration;

use crate::{Completion, Error, GroupSummary, LeaseId, SessionId, Tag, Token};

/// One thing the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Append this record to the durable log before sending what follows.
    Persist(Record),
    /// Answer the request that was given `tag`.
    Reply {
        /// The tag the request was handled with.
        tag: Tag,
        /// Its outcome.
        outcome: Result<Reply, Error>,
    },
    /// Something happened that a session's client (and the operator's log) should hear of.
    Event(Event),
}

/// A successful answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The session is open (new, refreshed or resumed) with this TTL.
    SessionOpened {
        /// The TTL the session lives by.
        ttl: Duration,
        /// Whether the session already existed.
        existed: bool,
    },
    /// The request took effect (or was a no-op where that is documented).
    Done,
    /// The acquire was granted (for a job: the attempt may run it).
    Granted {
        /// The grant's fencing token.
        token: Token,
    },
    /// A job attempt must not run: the job has completed (before, or while the attempt
    /// waited).
    JobCompleted(Completion),
    /// A job attempt that would not wait found the job running elsewhere.
    JobBusy {
        /// The running attempt's client description.
        client: Arc<str>,
        /// The running attempt's fencing token.
        token: Token,
        /// How long it has been running.
        age: Duration,
    },
    /// A job's completion was forgotten.
    JobReset {
        /// Whether there was a completion to forget.
        was_completed: bool,
    },
    /// The group has settled: none of its jobs is running, and enough have completed.
    GroupSettled(GroupSummary),
}

/// A notable change, for the session it concerns and for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A held lease was taken away from its session.
    LeaseLost {
        /// The session that held it.
        session: SessionId,
        /// The lease.
        lease: LeaseId,
        /// Its semaphore.
        semaphore: Arc<str>,
        /// The fencing token the lease carried.
        token: Token,
        /// The session's client description ("host:pid"), for the operator.
        client: Arc<str>,
        /// Why.
        reason: LostReason,
    },
    /// A session ended; its leases were released (each loss reported first, as a
    /// [`Event::LeaseLost`]). Comes after every other effect of the ending.
    SessionEnded {
        /// The session.
        session: SessionId,
        /// Its client description ("host:pid"), for the operator.
        client: Arc<str>,
        /// How it ended.
        reason: EndReason,
    },
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Its client closed it.
    Closed,
    /// It missed its TTL.
    Expired,
    /// Someone else ended it (a supervisor whose worker died).
    EndedByOther,
}

/// Why a lease was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The session missed its TTL.
    Expired,
    /// The semaphore was closed.
    Closed,
    /// Someone else ended the session (a supervisor whose worker died).
    SessionEnded,
    /// An operator released the lease by force ([`Request::Revoke`](crate::Request::Revoke)).
    Revoked,
}

impl LostReason {
    /// A short lowercase word for messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::Closed => "closed",
            LostReason::SessionEnded => "session-ended",
            LostReason::Revoked => "revoked",
        }
    }
}

/// A state change to make durable. Replaying records through
/// [`Coordinator::apply`](crate::Coordinator::apply) rebuilds every semaphore, session and held
/// lease, and the fencing counters. Queued acquires are not recorded: no client has been told
/// anything about them, and a client that reconnects retries its acquire with the same lease id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A semaphore was created.
    SemaphoreCreated {
        /// Its name.
        name: Arc<str>,
        /// Its capacity.
        capacity: u32,
    },
    /// A semaphore was closed. Its fencing counter lives on.
    SemaphoreClosed {
        /// Its name.
        name: Arc<str>,
    },
    /// A session was opened (or its TTL or client description changed).
    SessionOpened {
        /// The session.
        session: SessionId,
        /// Its TTL.
        ttl: Duration,
        /// Its client's description ("host:pid"), shown as the holder of its leases.
        client: Arc<str>,
    },
    /// A session ended (closed, expired or ended by a supervisor); its leases are released.
    SessionEnded {
        /// The session.
        session: SessionId,
    },
    /// A lease was granted.
    Granted {
        /// The session holding it.
        session: SessionId,
        /// The lease.
        lease: LeaseId,
        /// Its semaphore.
        semaphore: Arc<str>,
        /// Its weight.
        weight: u32,
        /// Its fencing token.
        token: Token,
    },
    /// The whole state of a semaphore, as a snapshot writes it: unlike
    /// [`Record::SemaphoreCreated`], it carries the fencing counter, so that tokens never go
    /// back after the log before the snapshot is deleted.
    Semaphore {
        /// Its name.
        name: Arc<str>,
        /// Its capacity.
        capacity: u32,
        /// Whether it is closed.
        closed: bool,
        /// The next token it will issue.
        next_token: u64,
    },
    /// An idle semaphore (no holders, no waiters, not closed) was forgotten: its name may be
    /// created again, and then starts counting tokens at `next_token` or later, so that its
    /// tokens still strictly increase.
    Forgotten {
        /// Its name.
        name: Arc<str>,
        /// The next token it would have issued: the coordinator's token floor rises to it.
        next_token: u64,
    },
    /// The coordinator's token floor, as a snapshot writes it: every semaphore created from now
    /// on starts counting at `next_token` or later. It outlives the semaphores whose
    /// [`Record::Forgotten`] raised it, so tokens never go back after their records are gone.
    TokenFloor {
        /// The lowest token a new semaphore may issue.
        next_token: u64,
    },
    /// A held lease was released.
    Released {
        /// The session that held it.
        session: SessionId,
        /// The lease.
        lease: LeaseId,
    },
    /// The whole durable state of a job: written whenever it changes (group, completion,
    /// failures), so that replay keeps the last one. Whether the job is running is not part
    /// of it: that is its lock's lease, recorded by [`Record::Granted`].
    Job {
        /// Its name.
        name: Arc<str>,
        /// Its group.
        group: Option<Arc<str>>,
        /// Its completion.
        completion: Option<Completion>,
        /// Failed attempts since the last reset.
        failures: u32,
        /// Why the last attempt failed.
        last_failure: Option<Arc<str>>,
    },
}
