//! The coordinator state machine: every semantic rule of turnstile, and nothing else.
//!
//! # Implementation details
//!
//! Each semaphore keeps its holders (ordered by fencing token, which is grant order) and a FIFO
//! queue of waiters (ordered by a global sequence number). A waiter is granted only when it is
//! at the head of its queue and enough permits are free; the grant loop ([`Coordinator::pump`])
//! stops at the first waiter that does not fit. So a heavy acquire at the head holds back the
//! light ones behind it: that is the price of never starving the heavy one, as in tokio's
//! batch semaphore.
//!
//! Time only matters at deadlines (session TTLs, acquire timeouts). They sit in one min-heap
//! with *lazy rescheduling*: a keep-alive only moves the session's deadline field; when the
//! heap entry comes due and the deadline has moved, the entry is pushed again for the new
//! deadline. So a keep-alive is O(1), each session has exactly one heap entry, and a tick costs
//! O(log n) per entry that comes due, never a scan of all leases. Every call first processes
//! the deadlines that are due at its `now`, so a late keep-alive cannot revive a session that
//! has already missed its TTL.
//!
//! # Invariants
//!
//! Checked by [`Coordinator::validate`] after every step in the tests:
//! - per semaphore, `in_use` is the sum of its holders' weights (it exceeds `capacity` only
//!   after a shrink, until holders release: no grant is made while it does);
//! - a queue is never left grantable: if it is not empty, its head does not fit;
//! - every held or queued lease belongs to a live session that lists it, and to exactly one
//!   semaphore's holders or queue;
//! - every token ever issued by a semaphore is below its `next_token`;
//! - a closed semaphore has no holders and no queue;
//! - no semaphore counts tokens below the token floor's last raise before it was created, and
//!   every idle, forgettable semaphore has its one entry in the forget heap.
//!
//! # Forgetting idle semaphores
//!
//! With [`Coordinator::set_forget_idle`], a semaphore that has had no holder and no waiter for
//! that long (and is not closed, and is not a job's lock) is removed, so that names used once
//! do not cost memory for good. Its fencing counter is not lost: it raises the coordinator's
//! *token floor*, where every semaphore created later starts counting, so tokens of a name
//! that is forgotten and created again still strictly increase (invariant 5). The floor is
//! durable ([`Record::Forgotten`], and [`Record::TokenFloor`] in snapshots). Like session
//! deadlines, each idle semaphore has at most one entry in a heap, rescheduled lazily.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

mod jobs;

/// Hash maps with foldhash, seeded at random per process: the maps are hit several times by
/// every request, and SipHash (the standard hasher) cost a fifth of the server's instructions
/// in a profile. The random seed keeps keys chosen by clients (names, session ids) from being
/// aimed at one bucket.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use crate::dense_map::DenseMap;
use crate::effect::{Effect, EndReason, Event, LostReason, Record, Reply};
use crate::job::JobOutcome;
use crate::view::{Counters, HolderView, SemaphoreView, WaiterView};
use crate::{Error, LeaseId, SessionId, Tag, Time, Token, WaitStats};

/// The job whose lock is the semaphore `name`, if it is one. Events name a job's lease by its
/// lock, which holds a control character; shells show the job's name instead.
pub fn job_of_lock(name: &str) -> Option<&str> {
    jobs::job_of_lock(name)
}

/// Longest semaphore name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A request to the coordinator. Names are borrowed so that the caller can hand in a slice of
/// its receive buffer; the core copies a name only when it creates a semaphore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Opens a session, or refreshes it if it exists (an open is idempotent, so a client may
    /// retry it after a lost reply). Replies [`Reply::SessionOpened`].
    OpenSession {
        /// The session id the client chose.
        session: SessionId,
        /// How long the session lives without a keep-alive. Must be positive.
        ttl: Duration,
        /// A description of the client ("host:pid"), shown as the holder of its leases.
        client: &'a str,
    },
    /// Refreshes a session that must already exist: a reconnecting client uses this to learn
    /// whether its leases survived. Replies [`Reply::SessionOpened`] or
    /// [`Error::SessionNotFound`].
    ResumeSession {
        /// The session.
        session: SessionId,
    },
    /// Refreshes every lease of the session. Any other request of the session does too.
    KeepAlive {
        /// The session.
        session: SessionId,
    },
    /// Ends the session cleanly: its leases are released (not "lost") and its queued acquires
    /// fail with [`Error::SessionEnded`]. A no-op for an unknown session.
    CloseSession {
        /// The session.
        session: SessionId,
    },
    /// Ends a session on behalf of someone who knows its client is dead (a supervisor). Like
    /// an expiry: leases are reported lost with [`LostReason::SessionEnded`]. A no-op for an
    /// unknown session.
    EndSession {
        /// The session.
        session: SessionId,
    },
    /// Creates a semaphore, or checks that it exists with this capacity.
    Ensure {
        /// Its name: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
        name: &'a str,
        /// Its capacity, at least 1.
        capacity: u32,
    },
    /// Acquires `weight` permits of a semaphore for the lease `lease` of `session`. Granted at
    /// once when the permits are free and nobody is queued, otherwise queued (FIFO). Retrying
    /// with the same lease id returns the existing grant or keeps the queue place.
    Acquire {
        /// The session.
        session: SessionId,
        /// The lease id the client chose.
        lease: LeaseId,
        /// The semaphore.
        name: &'a str,
        /// Permits wanted, at least 1.
        weight: u32,
        /// How long to wait in the queue; `None` waits until granted or cancelled, zero means
        /// "only if free now" (fails with [`Error::TimedOut`] otherwise).
        timeout: Option<Duration>,
    },
    /// Releases a held lease, or withdraws a queued acquire (which then fails with
    /// [`Error::Cancelled`]).
    Release {
        /// The session.
        session: SessionId,
        /// The lease.
        lease: LeaseId,
    },
    /// Closes a semaphore: queued acquires fail with [`Error::Closed`], holders are told their
    /// lease is gone, later acquires and ensures fail with [`Error::Closed`]. A no-op for an
    /// unknown or already closed name.
    Close {
        /// The semaphore.
        name: &'a str,
    },
    /// Changes a semaphore's capacity. Growing grants the queued acquires that now fit, in
    /// queue order; shrinking takes nothing from holders, so `in_use` may exceed the capacity
    /// until they release, and nothing is granted until `in_use` plus the head's weight fits.
    /// Queued acquires heavier than the new capacity could never be granted: they fail with
    /// [`Error::WeightExceedsCapacity`]. Fails with [`Error::NoSuchSemaphore`] or
    /// [`Error::Closed`]; the same capacity is a no-op.
    SetCapacity {
        /// The semaphore.
        name: &'a str,
        /// The new capacity, at least 1.
        capacity: u32,
    },
    /// Deletes a semaphore that has no holder and no waiter (closed or idle), so that its
    /// name can be created afresh. Its fencing counter raises the token floor, as when an
    /// idle semaphore is forgotten, so the name's tokens still strictly increase. Fails with
    /// [`Error::InUse`] while it is held or queued for, [`Error::NoSuchSemaphore`] if unknown.
    Delete {
        /// The semaphore.
        name: &'a str,
    },
    /// Takes the held lease `lease` of semaphore `name` away from whichever session holds it
    /// (an operator's force-release): its permits go to the next waiters, and its session is
    /// told with [`LostReason::Revoked`]. Fails with [`Error::UnknownLease`] if no holder of
    /// the semaphore has that id (queued acquires are not revoked).
    Revoke {
        /// The semaphore.
        name: &'a str,
        /// The lease.
        lease: LeaseId,
    },
    /// Starts an attempt at a run-once job: replies [`Reply::JobCompleted`] if the job has
    /// completed, else takes the job's exclusive lease `lease` and replies
    /// [`Reply::Granted`] (run it now). If another attempt holds the lease, `timeout` zero
    /// replies [`Reply::JobBusy`]; otherwise the attempt queues (FIFO) and is answered when
    /// the running attempt ends: [`Reply::JobCompleted`] if it succeeded, a grant if it
    /// failed, [`Error::TimedOut`] if `timeout` passes first. Retrying with the same lease id
    /// is idempotent, as for an acquire; [`Request::Release`] withdraws a queued attempt.
    BeginJob {
        /// The session.
        session: SessionId,
        /// The lease id the client chose for the job's lease.
        lease: LeaseId,
        /// The job: 1 to [`MAX_NAME_LEN`] bytes, no control characters. Job names are their
        /// own namespace, apart from semaphore names.
        job: &'a str,
        /// The job's group (kept from an earlier attempt when `None`).
        group: Option<&'a str>,
        /// How long to wait for a running attempt to end; `None` waits as long as it takes.
        timeout: Option<Duration>,
    },
    /// Ends the attempt that holds the job's lease `lease`: records its completion or a
    /// failed attempt, and releases the lease. Fails with [`Error::UnknownLease`] if the lease
    /// is not the held lease of a job (lost, say): a fenced-off attempt records nothing.
    FinishJob {
        /// The session.
        session: SessionId,
        /// The job's lease.
        lease: LeaseId,
        /// How the attempt ended.
        outcome: JobOutcome<'a>,
    },
    /// Forgets a job's completion and failed attempts, so that the next attempt runs it.
    /// Replies [`Reply::JobReset`]; a no-op for an unknown job.
    ResetJob {
        /// The job.
        job: &'a str,
    },
    /// Waits until no job of `group` is running and at least `jobs` of them have completed;
    /// replies [`Reply::GroupSettled`], or [`Error::TimedOut`] when `timeout` passes first.
    /// The wait belongs to the session and ends with it; a retry with the same `wait` id
    /// supersedes the earlier request.
    WaitGroup {
        /// The session.
        session: SessionId,
        /// An id the client chose for this wait, unique among its session's leases and waits.
        wait: LeaseId,
        /// The group.
        group: &'a str,
        /// Completed jobs to wait for (0: only that none is running).
        jobs: u32,
        /// How long to wait; `None` waits as long as it takes, zero only looks.
        timeout: Option<Duration>,
    },
}

type LeaseKey = (SessionId, LeaseId);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Session(SessionId),
    Waiter(SessionId, LeaseId),
    GroupWait(SessionId, LeaseId),
}

#[derive(Debug)]
struct Semaphore {
    name: Arc<str>,
    capacity: u32,
    in_use: u32,
    closed: bool,
    next_token: u64,
    /// Ordered by token, so in grant order.
    holders: BTreeMap<Token, LeaseKey>,
    /// Ordered by arrival sequence number: the FIFO queue.
    queue: BTreeMap<u64, LeaseKey>,
    queued_weight: u64,
    counters: Counters,
    wait: WaitStats,
    /// When it last became idle (no holders, no waiters); meaningful only while it is idle.
    idle_since: Time,
    /// The time of its one entry in the forget heap, if it has one.
    forget_scheduled: Option<Time>,
}

impl Semaphore {
    fn new(name: Arc<str>, capacity: u32, next_token: u64, now: Time) -> Semaphore {
        Semaphore {
            name,
            capacity,
            in_use: 0,
            closed: false,
            next_token: next_token.max(1),
            idle_since: now,
            forget_scheduled: None,
            holders: BTreeMap::new(),
            queue: BTreeMap::new(),
            queued_weight: 0,
            counters: Counters::default(),
            wait: WaitStats::default(),
        }
    }

    /// Permits free for a grant: none while holders keep more than a shrunk capacity.
    fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.in_use)
    }
}

#[derive(Debug)]
enum LeaseState {
    /// Boxed: most leases are held, and the lease table (one entry per lease, a million at
    /// scale) is sized by its largest variant; boxing the waiter's fields shrinks every entry
    /// from 80 to 64 bytes.
    Queued(Box<Waiting>),
    Held {
        token: Token,
        since: Time,
    },
}

// The lease table's entry (key and lease) stays at 64 bytes: see `LeaseState::Queued`.
const _: () = assert!(std::mem::size_of::<(LeaseKey, Lease)>() <= 64);

/// A queued lease's place and request.
#[derive(Debug)]
struct Waiting {
    seq: u64,
    since: Time,
    deadline: Option<Time>,
    tag: Tag,
}

#[derive(Debug)]
struct Lease {
    semaphore: Arc<str>,
    weight: u32,
    /// Its index in its session's `leases` (it fills the padding after `weight`).
    slot: u32,
    state: LeaseState,
}

#[derive(Debug)]
struct Session {
    ttl: Duration,
    client: Arc<str>,
    deadline: Time,
    /// The time of this session's one entry in the timer heap.
    scheduled: Time,
    /// Its leases, held or queued, in no order; a lease's `slot` is its index here. A list
    /// rather than a set: at a thousand leases a session a hash set took 18 bytes a lease.
    leases: Vec<LeaseId>,
}

/// How a session ended decides what its leases count as.
type Ending = EndReason;

/// The coordinator: named counting semaphores whose permits are leases held by sessions.
///
/// Drive it with [`handle`](Coordinator::handle) for each request and
/// [`tick`](Coordinator::tick) when [`next_deadline`](Coordinator::next_deadline) comes; carry
/// out the [`Effect`]s it appends, in order.
#[derive(Debug, Default)]
pub struct Coordinator {
    /// Semaphores, and the locks of jobs (named by [`jobs::lock_name`], which no client can
    /// name since it holds a control character).
    semaphores: DenseMap<Arc<str>, Semaphore>,
    /// The names of `semaphores`, sorted: status pages and metrics read the semaphores in
    /// bounded slices from a cursor, rather than sorting them all at once under the lock.
    names: BTreeSet<Arc<str>>,
    sessions: HashMap<SessionId, Session>,
    /// Every held or queued lease: a million at scale, so a table that stays compact and
    /// never frees a large old copy as it grows (see `DenseMap`).
    leases: DenseMap<LeaseKey, Lease>,
    timers: BinaryHeap<Reverse<(Time, Timer)>>,
    next_seq: u64,
    jobs: jobs::Jobs,
    /// The lowest token a semaphore created now may issue: the highest counter of any
    /// forgotten semaphore (and of token skips). Never goes down.
    token_floor: u64,
    /// How long a semaphore stays idle before it is forgotten; `None` keeps them all.
    forget_after: Option<Duration>,
    /// Idle semaphores due to be forgotten, one entry each at most (see the module doc).
    forget_heap: BinaryHeap<Reverse<(Time, Arc<str>)>>,
    /// The latest time a call brought: when the semaphores that become idle in it did.
    now: Time,
    /// Most deadline work one call does before it returns, if bounded (see
    /// [`Coordinator::set_step_budget`]).
    step_budget: Option<usize>,
    /// The heap entry being processed, while a tick processes one: the point the sweep has
    /// reached. Deadlines before it have been processed; outside a tick, every deadline up to
    /// `now` counts as passed, processed or not.
    sweeping: Option<(Time, Timer)>,
}

impl Coordinator {
    /// An empty coordinator.
    pub fn new() -> Coordinator {
        Coordinator::default()
    }

    /// Handles one request at `now`, appending its effects to `out`. The reply to the request
    /// is an [`Effect::Reply`] with `tag`; a queued acquire gets it later, from a later call.
    pub fn handle(&mut self, now: Time, tag: Tag, request: Request<'_>, out: &mut Vec<Effect>) {
        match self.step_budget {
            None => self.tick(now, out),
            Some(budget) => {
                self.tick_some(now, budget, out);
            }
        }
        let outcome = match request {
            Request::OpenSession {
                session,
                ttl,
                client,
            } => {
                if self.overdue(now, session) {
                    // Its client counts it dead already: it is a new session now. (The only
                    // expiry processed out of deadline order, for a client that reuses its id.)
                    self.end_session(now, session, Ending::Expired, out);
                }
                self.open_session(now, session, ttl, client, out)
            }
            Request::ResumeSession { session } => self
                .refresh(now, session)
                .map(|ttl| Some(Reply::SessionOpened { ttl, existed: true })),
            Request::KeepAlive { session } => self.refresh(now, session).map(|_| Some(Reply::Done)),
            // A session past its deadline has expired, whether or not the sweep has reached it:
            // ending it is a no-op, as for any unknown session, and the sweep reports it.
            Request::CloseSession { session } => {
                if !self.overdue(now, session) {
                    self.end_session(now, session, Ending::Closed, out);
                }
                Ok(Some(Reply::Done))
            }
            Request::EndSession { session } => {
                if !self.overdue(now, session) {
                    self.end_session(now, session, Ending::EndedByOther, out);
                }
                Ok(Some(Reply::Done))
            }
            Request::Ensure { name, capacity } => self.ensure(name, capacity, out),
            Request::Acquire {
                session,
                lease,
                name,
                weight,
                timeout,
            } => {
                if jobs::is_lock_name(name) {
                    // Only BeginJob takes a job's lock, so that its rules hold.
                    Err(Error::NoSuchSemaphore(name.to_owned()))
                } else {
                    self.acquire(now, tag, (session, lease), name, weight, timeout, out)
                }
            }
            Request::Release { session, lease } => self.release(now, (session, lease), out),
            Request::Close { name } => {
                // Job locks are not the client's to close: their names cannot be valid.
                if validate_name(name).is_ok() {
                    self.close(name, out);
                }
                Ok(Some(Reply::Done))
            }
            Request::SetCapacity { name, capacity } => self.set_capacity(now, name, capacity, out),
            Request::Delete { name } => self.delete(name, out),
            Request::Revoke { name, lease } => self.revoke(now, name, lease, out),
            Request::BeginJob {
                session,
                lease,
                job,
                group,
                timeout,
            } => self.begin_job(now, tag, (session, lease), job, group, timeout, out),
            Request::FinishJob {
                session,
                lease,
                outcome,
            } => self.finish_job(now, (session, lease), outcome, out),
            Request::ResetJob { job } => self.reset_job(job, out),
            Request::WaitGroup {
                session,
                wait,
                group,
                jobs,
                timeout,
            } => self.wait_group(now, tag, (session, wait), group, jobs, timeout, out),
        };
        match outcome {
            Ok(Some(reply)) => out.push(Effect::Reply {
                tag,
                outcome: Ok(reply),
            }),
            Ok(None) => {}
            Err(e) => out.push(Effect::Reply {
                tag,
                outcome: Err(e),
            }),
        }
        self.settle_group_waits(out);
    }

    /// Processes every deadline at or before `now`: expires sessions that missed their TTL and
    /// times out queued acquires. Costs O(log n) per deadline that comes due.
    pub fn tick(&mut self, now: Time, out: &mut Vec<Effect>) {
        while self.tick_some(now, usize::MAX, out) {}
    }

    /// Bounds the deadline work of each [`handle`](Coordinator::handle) to about `budget`
    /// units (a unit is a deadline or a lease freed), or lifts the bound (`None`, the
    /// default). A shell that sets it must call [`tick_some`](Coordinator::tick_some) until it
    /// returns `false` whenever [`next_deadline`](Coordinator::next_deadline) has passed,
    /// releasing its lock between calls: then 100,000 leases expiring at once no longer make
    /// one long step that stalls every other client.
    ///
    /// Lagging behind is safe because a session past its deadline can no longer act, whether
    /// or not its expiry has been processed: its requests fail as for an expired session
    /// ([`Error::SessionNotFound`]), closing or ending it is a no-op, its queued acquires are
    /// never granted (the grant loop drops them as the expiry would have), nor are acquires
    /// whose own timeout has passed. Its held permits stay taken until the sweep reaches it,
    /// in deadline order: others wait a little longer, never the other way round.
    pub fn set_step_budget(&mut self, budget: Option<usize>) {
        self.step_budget = budget.map(|b| b.max(1));
    }

    /// Processes the deadlines at or before `now` in deadline order, stopping once about
    /// `budget` units of work (a deadline, or a lease freed) are done; at least one deadline
    /// is processed, so a session with more leases than the budget still expires whole.
    /// Returns whether due deadlines remain: call again (at the same or a later `now`).
    pub fn tick_some(&mut self, now: Time, budget: usize, out: &mut Vec<Effect>) -> bool {
        self.now = self.now.max(now);
        let mut used = self.forget_due(now, budget, out);
        let more = loop {
            let Some(&Reverse((at, timer))) = self.timers.peek() else {
                break false;
            };
            if at > now {
                break false;
            }
            if used >= budget {
                break true;
            }
            used += 1;
            self.timers.pop();
            self.sweeping = Some((at, timer));
            match timer {
                Timer::Session(id) => {
                    let Some(session) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    if session.scheduled != at {
                        continue; // stale entry of an earlier session with the same id
                    }
                    // Compare with the entry's own time, not `now`: after a late tick the real
                    // deadline may also have passed, but other deadlines may lie between the
                    // two, and they must be processed first.
                    if session.deadline > at {
                        session.scheduled = session.deadline;
                        self.timers
                            .push(Reverse((session.deadline, Timer::Session(id))));
                    } else {
                        used = used.saturating_add(session.leases.len());
                        self.end_session(now, id, Ending::Expired, out);
                    }
                }
                Timer::Waiter(session, lease) => {
                    let key = (session, lease);
                    let due = matches!(
                        self.leases.get(&key),
                        Some(Lease { state: LeaseState::Queued(w), .. }) if w.deadline == Some(at)
                    );
                    if due {
                        if let Some((tag, sem)) = self.dequeue(key) {
                            if let Some(s) = self.semaphores.get_mut(&sem) {
                                s.counters.timed_out_total += 1;
                            }
                            out.push(Effect::Reply {
                                tag,
                                outcome: Err(Error::TimedOut),
                            });
                            self.pump(now, &sem, out);
                        }
                    }
                }
                Timer::GroupWait(session, wait) => self.group_wait_due(at, (session, wait), out),
            }
            self.sweeping = None;
        };
        self.settle_group_waits(out);
        if used > 0 {
            self.shrink_if_sparse();
        }
        more || self
            .forget_heap
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
    }

    /// Gives memory back after a mass expiry or mass forgetting: the maps and heaps keep
    /// their largest size otherwise, and 200,000 names used once would cost their table for
    /// good. Shrinks a table to twice its length once it is a quarter full, so the rehash
    /// (O(length)) is paid at most once per halving: amortized O(1) per entry removed.
    fn shrink_if_sparse(&mut self) {
        fn sparse(len: usize, capacity: usize) -> bool {
            capacity > 1024 && len.saturating_mul(4) < capacity
        }
        if sparse(self.semaphores.len(), self.semaphores.capacity()) {
            self.semaphores.shrink_to(self.semaphores.len() * 2);
        }
        if sparse(self.sessions.len(), self.sessions.capacity()) {
            self.sessions.shrink_to(self.sessions.len() * 2);
        }
        if sparse(self.leases.len(), self.leases.capacity()) {
            self.leases.shrink_to(self.leases.len() * 2);
        }
        if sparse(self.timers.len(), self.timers.capacity()) {
            self.timers.shrink_to(self.timers.len() * 2);
        }
        if sparse(self.forget_heap.len(), self.forget_heap.capacity()) {
            self.forget_heap.shrink_to(self.forget_heap.len() * 2);
        }
    }

    /// Whether `session` exists and has missed its deadline, expired though perhaps not yet
    /// swept (see [`set_step_budget`](Coordinator::set_step_budget)).
    fn overdue(&self, now: Time, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.deadline <= now)
    }

    /// The earliest time at which [`tick`](Coordinator::tick) has work to do. It may be early
    /// (a deadline that has since moved), never late.
    pub fn next_deadline(&self) -> Option<Time> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let forget = self.forget_heap.peek().map(|Reverse((at, _))| *at);
        match (timer, forget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets semaphores that have been idle for `after` (`None`: never, the default). A
    /// semaphore already idle counts from when it became idle.
    pub fn set_forget_idle(&mut self, after: Option<Duration>) {
        self.forget_after = after;
        if after.is_some() {
            let mut names: Vec<Arc<str>> = self.semaphores.keys().cloned().collect();
            names.sort();
            for name in names {
                self.schedule_forget(&name);
            }
        }
    }

    /// The coordinator's token floor: every semaphore created now counts tokens from here on.
    pub fn token_floor(&self) -> u64 {
        self.token_floor.max(1)
    }

    /// Gives the semaphore `name` its entry in the forget heap if it is idle, forgettable and
    /// has none. Called wherever a semaphore may have become idle.
    fn schedule_forget(&mut self, name: &str) {
        let Some(after) = self.forget_after else {
            return;
        };
        let now = self.now;
        let Some(sem) = self.semaphores.get_mut(name) else {
            return;
        };
        if !is_idle(sem) {
            return;
        }
        if sem.forget_scheduled.is_none() {
            let at = now + after;
            sem.idle_since = now;
            sem.forget_scheduled = Some(at);
            self.forget_heap.push(Reverse((at, sem.name.clone())));
        } else {
            // Its entry is due earlier; when it comes, it is pushed again for this time.
            sem.idle_since = sem.idle_since.max(now);
        }
    }

    /// Forgets the semaphores whose idle time is up at `now`, at most `budget` of them.
    /// O(log n) per entry due. Returns the entries it processed.
    fn forget_due(&mut self, now: Time, budget: usize, out: &mut Vec<Effect>) -> usize {
        let Some(after) = self.forget_after else {
            return 0;
        };
        let mut used = 0;
        while let Some(Reverse((at, _))) = self.forget_heap.peek() {
            if *at > now || used >= budget {
                break;
            }
            used += 1;
            let Some(Reverse((at, name))) = self.forget_heap.pop() else {
                break;
            };
            let Some(sem) = self.semaphores.get_mut(&name) else {
                continue;
            };
            if sem.forget_scheduled != Some(at) {
                continue; // an entry of an earlier semaphore of that name
            }
            if !is_idle(sem) {
                // Busy again: it gets a new entry when it next becomes idle.
                sem.forget_scheduled = None;
                continue;
            }
            let due = sem.idle_since + after;
            if due > at {
                sem.forget_scheduled = Some(due);
                self.forget_heap.push(Reverse((due, name)));
                continue;
            }
            let next_token = sem.next_token;
            self.remove_semaphore(&name);
            self.token_floor = self.token_floor.max(next_token);
            out.push(Effect::Persist(Record::Forgotten { name, next_token }));
        }
        used
    }

    /// Creates a semaphore, counting tokens from the floor.
    fn insert_semaphore(&mut self, name: Arc<str>, capacity: u32) {
        let sem = Semaphore::new(name.clone(), capacity, self.token_floor, self.now);
        self.semaphores.insert(name.clone(), sem);
        self.names.insert(name.clone());
        self.schedule_forget(&name);
    }

    fn remove_semaphore(&mut self, name: &str) {
        self.semaphores.remove(name);
        self.names.remove(name);
    }

    /// Up to `limit` semaphores whose names start with `prefix` and sort after `after`
    /// (exclusive; empty starts at the beginning), in name order, with their holders and
    /// waiters (at most `max_listed` of each: the counts are always whole). Also returns
    /// whether more such semaphores follow the page. Costs O(log n + page), so that callers
    /// can read everything in bounded slices under their lock.
    pub fn semaphore_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
        max_listed: usize,
        now: Time,
    ) -> (Vec<SemaphoreView>, bool) {
        let mut page = Vec::new();
        let mut more = false;
        for name in self.page_names(prefix, after) {
            if page.len() >= limit {
                more = true;
                break;
            }
            if let Some(s) = self.semaphores.get(name) {
                page.push(self.view_capped(s, now, max_listed));
            }
        }
        (page, more)
    }

    /// Like [`semaphore_stats`](Coordinator::semaphore_stats), for up to `limit` semaphores
    /// after `after` (exclusive): a slice of the metrics, O(log n + limit).
    pub fn semaphore_stats_page(&self, after: &str, limit: usize) -> Vec<SemaphoreView> {
        self.page_names("", after)
            .take(limit)
            .filter_map(|name| self.semaphores.get(name))
            .map(|s| summary(s, Vec::new(), Vec::new()))
            .collect()
    }

    /// The names of client semaphores starting with `prefix`, after `after`, in order.
    fn page_names<'s>(
        &'s self,
        prefix: &'s str,
        after: &'s str,
    ) -> impl Iterator<Item = &'s Arc<str>> + 's {
        let start: Bound<&str> = if after.is_empty() || after < prefix {
            Bound::Included(prefix)
        } else {
            Bound::Excluded(after)
        };
        self.names
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(move |n| n.starts_with(prefix))
            .filter(|n| !jobs::is_lock_name(n))
    }

    fn open_session(
        &mut self,
        now: Time,
        id: SessionId,
        ttl: Duration,
        client: &str,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        if ttl.is_zero() {
            return Err(Error::InvalidArgument(
                "session TTL must be positive".into(),
            ));
        }
        if client.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "client description is {} bytes long; the limit is {MAX_NAME_LEN}",
                client.len()
            )));
        }
        if let Some(session) = self.sessions.get_mut(&id) {
            if session.ttl != ttl || *session.client != *client {
                session.ttl = ttl;
                session.client = Arc::from(client);
                out.push(Effect::Persist(Record::SessionOpened {
                    session: id,
                    ttl,
                    client: session.client.clone(),
                }));
            }
            session.deadline = now + ttl;
            self.reschedule_if_earlier(id);
            return Ok(Some(Reply::SessionOpened { ttl, existed: true }));
        }
        let client: Arc<str> = Arc::from(client);
        self.insert_session(now, id, ttl, client.clone());
        out.push(Effect::Persist(Record::SessionOpened {
            session: id,
            ttl,
            client,
        }));
        Ok(Some(Reply::SessionOpened {
            ttl,
            existed: false,
        }))
    }

    fn insert_session(&mut self, now: Time, id: SessionId, ttl: Duration, client: Arc<str>) {
        let deadline = now + ttl;
        self.sessions.insert(
            id,
            Session {
                ttl,
                client,
                deadline,
                scheduled: deadline,
                leases: Vec::new(),
            },
        );
        self.timers.push(Reverse((deadline, Timer::Session(id))));
    }

    /// A shorter TTL can move a deadline earlier than the heap entry; push a new entry then.
    fn reschedule_if_earlier(&mut self, id: SessionId) {
        if let Some(session) = self.sessions.get_mut(&id) {
            if session.deadline < session.scheduled {
                session.scheduled = session.deadline;
                self.timers
                    .push(Reverse((session.deadline, Timer::Session(id))));
            }
        }
    }

    fn refresh(&mut self, now: Time, id: SessionId) -> Result<Duration, Error> {
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or(Error::SessionNotFound(id))?;
        if session.deadline <= now {
            // Expired, though the sweep may not have reached it yet: it cannot act, nor come
            // back to life.
            return Err(Error::SessionNotFound(id));
        }
        session.deadline = now + session.ttl;
        Ok(session.ttl)
    }

    fn ensure(
        &mut self,
        name: &str,
        capacity: u32,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument("capacity must be at least 1".into()));
        }
        if let Some(sem) = self.semaphores.get(name) {
            if sem.closed {
                return Err(Error::Closed(name.to_owned()));
            }
            if sem.capacity != capacity {
                return Err(Error::CapacityMismatch {
                    name: name.to_owned(),
                    existing: sem.capacity,
                    requested: capacity,
                });
            }
            return Ok(Some(Reply::Done));
        }
        let name: Arc<str> = Arc::from(name);
        self.insert_semaphore(name.clone(), capacity);
        out.push(Effect::Persist(Record::SemaphoreCreated { name, capacity }));
        Ok(Some(Reply::Done))
    }

    #[allow(clippy::too_many_arguments)] // the fields of Request::Acquire, unpacked
    fn acquire(
        &mut self,
        now: Time,
        tag: Tag,
        key: LeaseKey,
        name: &str,
        weight: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        if weight == 0 {
            return Err(Error::InvalidArgument("weight must be at least 1".into()));
        }
        self.refresh(now, key.0)?;
        let sem = self
            .semaphores
            .get(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        if sem.closed {
            return Err(Error::Closed(name.to_owned()));
        }
        let deadline = timeout.map(|t| now + t);
        // A retry of a held lease returns its grant before the weight is checked: after a
        // shrink the lease may weigh more than the capacity, and it is still held.
        let same_lease = self
            .leases
            .get(&key)
            .is_some_and(|l| &*l.semaphore == name && l.weight == weight);
        if weight > sem.capacity && !same_lease {
            return Err(Error::WeightExceedsCapacity {
                name: name.to_owned(),
                weight,
                capacity: sem.capacity,
            });
        }
        if let Some(lease) = self.leases.get_mut(&key) {
            if &*lease.semaphore != name || lease.weight != weight {
                return Err(Error::LeaseConflict {
                    lease: key.1,
                    name: lease.semaphore.to_string(),
                    weight: lease.weight,
                });
            }
            return match &mut lease.state {
                LeaseState::Held { token, .. } => Ok(Some(Reply::Granted { token: *token })),
                LeaseState::Queued(w) => {
                    // The retry takes over the queue place; the request it replaces is answered
                    // so that nobody waits forever on it.
                    let superseded = std::mem::replace(&mut w.tag, tag);
                    w.deadline = deadline;
                    out.push(Effect::Reply {
                        tag: superseded,
                        outcome: Err(Error::Superseded),
                    });
                    if let Some(d) = deadline {
                        self.timers.push(Reverse((d, Timer::Waiter(key.0, key.1))));
                    }
                    Ok(None)
                }
            };
        }
        let sem_name = sem.name.clone();
        if sem.queue.is_empty() && sem.free() >= weight {
            let token = self.grant_new(now, key, &sem_name, weight, out);
            return Ok(Some(Reply::Granted { token }));
        }
        if timeout == Some(Duration::ZERO) {
            return Err(Error::TimedOut);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let sem = self
            .semaphores
            .get_mut(name)
            .expect("invariant: the semaphore was looked up above and nothing removed it");
        sem.queue.insert(seq, key);
        sem.queued_weight += u64::from(weight);
        self.add_lease(
            key,
            sem_name,
            weight,
            LeaseState::Queued(Box::new(Waiting {
                seq,
                since: now,
                deadline,
                tag,
            })),
        );
        if let Some(d) = deadline {
            self.timers.push(Reverse((d, Timer::Waiter(key.0, key.1))));
        }
        Ok(None)
    }

    /// Files a new lease in the lease table and at the end of its session's list.
    fn add_lease(&mut self, key: LeaseKey, semaphore: Arc<str>, weight: u32, state: LeaseState) {
        let slot = match self.sessions.get_mut(&key.0) {
            Some(session) => {
                session.leases.push(key.1);
                u32::try_from(session.leases.len() - 1).expect(
                    "invariant: a session has fewer than 2^32 leases (they would take \
                     hundreds of GiB: the allocation fails long before)",
                )
            }
            // Every caller checked that the session lives; `validate` reports a lease
            // without one.
            None => u32::MAX,
        };
        self.leases.insert(
            key,
            Lease {
                semaphore,
                weight,
                slot,
                state,
            },
        );
    }

    /// Takes a removed lease out of its session's list: the session's last lease moves into
    /// its slot, and that lease's `slot` follows.
    fn remove_from_session(&mut self, key: LeaseKey, slot: u32) {
        let Some(session) = self.sessions.get_mut(&key.0) else {
            return;
        };
        let slot = slot as usize;
        // Always true while the invariants hold (`validate` checks it); never remove
        // another lease's id.
        if session.leases.get(slot) != Some(&key.1) {
            return;
        }
        session.leases.swap_remove(slot);
        if let Some(&moved) = session.leases.get(slot) {
            if let Some(lease) = self.leases.get_mut(&(key.0, moved)) {
                lease.slot = slot as u32;
            }
        }
    }

    /// Grants a lease that was not queued (an immediate grant).
    fn grant_new(
        &mut self,
        now: Time,
        key: LeaseKey,
        sem_name: &Arc<str>,
        weight: u32,
        out: &mut Vec<Effect>,
    ) -> Token {
        let sem = self
            .semaphores
            .get_mut(sem_name)
            .expect("invariant: grant_new is called with an existing semaphore");
        let token = issue(sem, now, now, key, weight, out);
        self.add_lease(
            key,
            sem_name.clone(),
            weight,
            LeaseState::Held { token, since: now },
        );
        token
    }

    /// Grants queued acquires of `name` from the head of its queue while they fit.
    fn pump(&mut self, now: Time, name: &Arc<str>, out: &mut Vec<Effect>) {
        while let Some(stale) = self.pump_fresh(now, name, out) {
            // Drop the stale head (see below), then go on with the queue behind it.
            let (session_over, key) = stale;
            if let Some((tag, sem_name)) = self.dequeue(key) {
                if !session_over {
                    if let Some(s) = self.semaphores.get_mut(&sem_name) {
                        s.counters.timed_out_total += 1;
                    }
                }
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(if session_over {
                        Error::SessionEnded
                    } else {
                        Error::TimedOut
                    }),
                });
            }
        }
    }

    /// Grants from the head of the queue while the head fits; stops at a head that is past
    /// its deadline and returns it (whether its session is over, and its key), for
    /// [`pump`](Coordinator::pump) to drop.
    fn pump_fresh(
        &mut self,
        now: Time,
        name: &Arc<str>,
        out: &mut Vec<Effect>,
    ) -> Option<(bool, LeaseKey)> {
        let sem = self.semaphores.get_mut(name)?;
        while let Some((&seq, &key)) = sem.queue.first_key_value() {
            let lease = self
                .leases
                .get_mut(&key)
                .expect("invariant: every queued key has a lease");
            // A waiter whose session or own timeout is past its deadline, not yet swept, is
            // never granted: it is dropped as its deadline would have dropped it.
            // Past means before the sweep's position (in a tick: at one instant, expiries come
            // before timeouts, as in the heap), or up to `now` (in front of a request).
            let sweeping = self.sweeping;
            let passed = |deadline: Time, timer: Timer| match sweeping {
                Some(position) => (deadline, timer) < position,
                None => deadline <= now,
            };
            let session_over = self
                .sessions
                .get(&key.0)
                .is_none_or(|s| passed(s.deadline, Timer::Session(key.0)));
            let timed_out = matches!(
                lease.state,
                LeaseState::Queued(ref w) if w.deadline.is_some_and(|d| passed(d, Timer::Waiter(key.0, key.1)))
            );
            if session_over || timed_out {
                return Some((session_over, key));
            }
            if lease.weight > sem.free() {
                break;
            }
            let LeaseState::Queued(ref w) = lease.state else {
                unreachable!("invariant: a lease in a queue is in the Queued state");
            };
            let (since, tag) = (w.since, w.tag);
            sem.queue.remove(&seq);
            sem.queued_weight -= u64::from(lease.weight);
            let token = issue(sem, now, since, key, lease.weight, out);
            lease.state = LeaseState::Held { token, since: now };
            out.push(Effect::Reply {
                tag,
                outcome: Ok(Reply::Granted { token }),
            });
        }
        None
    }

    /// Takes a queued lease out of its queue and forgets it. Returns the waiter's tag and
    /// semaphore, or `None` if the lease is not queued.
    fn dequeue(&mut self, key: LeaseKey) -> Option<(Tag, Arc<str>)> {
        let lease = self.leases.get(&key)?;
        let LeaseState::Queued(ref w) = lease.state else {
            return None;
        };
        let (seq, tag) = (w.seq, w.tag);
        let lease = self.leases.remove(&key)?;
        if let Some(sem) = self.semaphores.get_mut(&lease.semaphore) {
            sem.queue.remove(&seq);
            sem.queued_weight -= u64::from(lease.weight);
        }
        self.remove_from_session(key, lease.slot);
        self.schedule_forget(&lease.semaphore);
        Some((tag, lease.semaphore))
    }

    /// Takes a held lease away from its semaphore and session. Returns its semaphore, token
    /// and weight, or `None` if the lease is not held.
    fn unhold(&mut self, key: LeaseKey) -> Option<(Arc<str>, Token)> {
        let lease = self.leases.get(&key)?;
        let LeaseState::Held { token, .. } = lease.state else {
            return None;
        };
        let lease = self.leases.remove(&key)?;
        if let Some(sem) = self.semaphores.get_mut(&lease.semaphore) {
            sem.holders.remove(&token);
            sem.in_use -= lease.weight;
        }
        self.remove_from_session(key, lease.slot);
        self.schedule_forget(&lease.semaphore);
        Some((lease.semaphore, token))
    }

    fn release(
        &mut self,
        now: Time,
        key: LeaseKey,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        self.refresh(now, key.0)?;
        if let Some((sem, _)) = self.unhold(key) {
            if let Some(s) = self.semaphores.get_mut(&sem) {
                s.counters.released_total += 1;
            }
            out.push(Effect::Persist(Record::Released {
                session: key.0,
                lease: key.1,
            }));
            self.job_lock_freed(&sem, "released before it finished", out);
            self.pump(now, &sem, out);
            return Ok(Some(Reply::Done));
        }
        if let Some((tag, sem)) = self.dequeue(key) {
            out.push(Effect::Reply {
                tag,
                outcome: Err(Error::Cancelled),
            });
            // A withdrawn head may have been what held the others back.
            self.pump(now, &sem, out);
            return Ok(Some(Reply::Done));
        }
        Err(Error::UnknownLease(key.1))
    }

    fn end_session(&mut self, now: Time, id: SessionId, how: Ending, out: &mut Vec<Effect>) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        out.push(Effect::Persist(Record::SessionEnded { session: id }));
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut leases = session.leases;
        leases.sort_unstable(); // effects in lease id order, not the list's (removals shuffle it)
        for lease in leases {
            let key = (id, lease);
            if let Some((sem, token)) = self.unhold(key) {
                if let Some(s) = self.semaphores.get_mut(&sem) {
                    match how {
                        Ending::Closed => s.counters.released_total += 1,
                        Ending::Expired | Ending::EndedByOther => s.counters.expired_total += 1,
                    }
                }
                let reason = match how {
                    Ending::Closed => None,
                    Ending::Expired => Some(LostReason::Expired),
                    Ending::EndedByOther => Some(LostReason::SessionEnded),
                };
                if let Some(reason) = reason {
                    out.push(Effect::Event(Event::LeaseLost {
                        session: id,
                        lease,
                        semaphore: sem.clone(),
                        token,
                        client: session.client.clone(),
                        reason,
                    }));
                }
                let why = match how {
                    Ending::Closed => "its session was closed before it finished",
                    Ending::Expired => "its runner's session expired (runner dead or cut off)",
                    Ending::EndedByOther => "its runner's session was ended by a supervisor",
                };
                self.job_lock_freed(&sem, why, out);
                touched.push(sem);
            } else if let Some((tag, sem)) = self.dequeue(key) {
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(Error::SessionEnded),
                });
                touched.push(sem);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for sem in &touched {
            self.pump(now, sem, out);
        }
        self.jobs.end_group_waits_of(id, out);
        out.push(Effect::Event(Event::SessionEnded {
            session: id,
            client: session.client,
            reason: how,
        }));
    }

    fn close(&mut self, name: &str, out: &mut Vec<Effect>) {
        let Some(sem) = self.semaphores.get_mut(name) else {
            return;
        };
        if sem.closed {
            return;
        }
        sem.closed = true;
        let sem_name = sem.name.clone();
        let queued: Vec<LeaseKey> = sem.queue.values().copied().collect();
        let held: Vec<LeaseKey> = sem.holders.values().copied().collect();
        out.push(Effect::Persist(Record::SemaphoreClosed {
            name: sem_name.clone(),
        }));
        for key in queued {
            if let Some((tag, _)) = self.dequeue(key) {
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(Error::Closed(sem_name.to_string())),
                });
            }
        }
        for key in held {
            if let Some((_, token)) = self.unhold(key) {
                let client = self
                    .sessions
                    .get(&key.0)
                    .map(|s| s.client.clone())
                    .unwrap_or_else(|| Arc::from(""));
                out.push(Effect::Event(Event::LeaseLost {
                    session: key.0,
                    lease: key.1,
                    semaphore: sem_name.clone(),
                    token,
                    client,
                    reason: LostReason::Closed,
                }));
                if let Some(s) = self.semaphores.get_mut(&sem_name) {
                    s.counters.lost_total += 1;
                }
            }
        }
    }

    fn set_capacity(
        &mut self,
        now: Time,
        name: &str,
        capacity: u32,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument("capacity must be at least 1".into()));
        }
        let sem = self
            .semaphores
            .get_mut(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        if sem.closed {
            return Err(Error::Closed(name.to_owned()));
        }
        if sem.capacity == capacity {
            return Ok(Some(Reply::Done));
        }
        sem.capacity = capacity;
        let sem_name = sem.name.clone();
        // The whole semaphore record: replay (and old readers of the log) set the capacity
        // from it, and its counter only ever raises `next_token`.
        out.push(Effect::Persist(Record::Semaphore {
            name: sem_name.clone(),
            capacity,
            closed: false,
            next_token: sem.next_token,
        }));
        // Waiters too heavy for the new capacity could never be granted, and at the head
        // they would hold back everyone behind them: fail them as a new acquire would fail.
        let too_heavy: Vec<LeaseKey> = sem
            .queue
            .values()
            .copied()
            .filter(|key| self.leases.get(key).is_some_and(|l| l.weight > capacity))
            .collect();
        for key in too_heavy {
            let weight = self.leases.get(&key).map_or(0, |l| l.weight);
            if let Some((tag, _)) = self.dequeue(key) {
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(Error::WeightExceedsCapacity {
                        name: name.to_owned(),
                        weight,
                        capacity,
                    }),
                });
            }
        }
        self.pump(now, &sem_name, out);
        Ok(Some(Reply::Done))
    }

    fn delete(&mut self, name: &str, out: &mut Vec<Effect>) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        let sem = self
            .semaphores
            .get(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        if !sem.holders.is_empty() || !sem.queue.is_empty() {
            return Err(Error::InUse {
                name: name.to_owned(),
                holders: sem.holders.len(),
                waiters: sem.queue.len(),
            });
        }
        let (sem_name, next_token) = (sem.name.clone(), sem.next_token);
        self.remove_semaphore(name);
        self.token_floor = self.token_floor.max(next_token);
        // The record of forgetting: it says the same (name gone, floor raised), and replay
        // removes any semaphore without holders by it, closed or not.
        out.push(Effect::Persist(Record::Forgotten {
            name: sem_name,
            next_token,
        }));
        Ok(Some(Reply::Done))
    }

    fn revoke(
        &mut self,
        now: Time,
        name: &str,
        lease: LeaseId,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        let sem = self
            .semaphores
            .get(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        // Lease ids are chosen per session, so two sessions could hold the same id: take
        // every one (O(holders); an operator's request, not the hot path).
        let keys: Vec<LeaseKey> = sem
            .holders
            .values()
            .copied()
            .filter(|key| key.1 == lease)
            .collect();
        if keys.is_empty() {
            return Err(Error::UnknownLease(lease));
        }
        let sem_name = sem.name.clone();
        for key in keys {
            let Some((_, token)) = self.unhold(key) else {
                continue;
            };
            // Replayed as a release by the holder: the lease is gone either way.
            out.push(Effect::Persist(Record::Released {
                session: key.0,
                lease: key.1,
            }));
            if let Some(s) = self.semaphores.get_mut(&sem_name) {
                s.counters.lost_total += 1;
            }
            out.push(Effect::Event(Event::LeaseLost {
                session: key.0,
                lease: key.1,
                semaphore: sem_name.clone(),
                token,
                client: self.client_of(key.0),
                reason: LostReason::Revoked,
            }));
        }
        self.pump(now, &sem_name, out);
        Ok(Some(Reply::Done))
    }

    /// Replays one durable record at `now` (the time of recovery). Sessions come back with a
    /// full TTL from `now`: the grace period that lets clients reconnect after a restart.
    /// Records that do not fit the state (a grant for an unknown session, say) are skipped;
    /// the log writer never produces them.
    pub fn apply(&mut self, now: Time, record: &Record) {
        self.now = self.now.max(now);
        self.apply_record(now, record);
        // No group wait is ever replayed (waits are not durable), so the groups a record
        // touched need no checking: forget them rather than pile them up over a long log.
        self.jobs.forget_changes();
    }

    fn apply_record(&mut self, now: Time, record: &Record) {
        match record {
            Record::SemaphoreCreated { name, capacity } => {
                if !self.semaphores.contains_key(name) {
                    // Never 0 from our writer; a damaged log's 0 is read as `Semaphore`
                    // records read it (1), so a snapshot of the result rebuilds the same.
                    self.insert_semaphore(name.clone(), (*capacity).max(1));
                }
            }
            Record::Forgotten { name, next_token } => {
                self.token_floor = self.token_floor.max(*next_token);
                // Only a semaphore without holders or waiters was ever forgotten (idle) or
                // deleted (idle or closed); anything else means the record does not fit this
                // state, and is skipped like any such record.
                if self
                    .semaphores
                    .get(name)
                    .is_some_and(|s| s.holders.is_empty() && s.queue.is_empty())
                {
                    self.remove_semaphore(name);
                }
            }
            Record::TokenFloor { next_token } => {
                self.token_floor = self.token_floor.max(*next_token);
            }
            Record::Semaphore {
                name,
                capacity,
                closed,
                next_token,
            } => {
                if !self.semaphores.contains_key(name) {
                    self.insert_semaphore(name.clone(), *capacity);
                }
                let sem = self
                    .semaphores
                    .get_mut(name)
                    .expect("invariant: inserted just above if it was missing");
                sem.next_token = sem.next_token.max(*next_token);
                // A capacity change is logged as this record; in a snapshot it comes before
                // the grants, which may hold more than a shrunk capacity.
                sem.capacity = (*capacity).max(1);
                if *closed {
                    let mut sink = Vec::new();
                    self.close(name, &mut sink);
                }
            }
            Record::SemaphoreClosed { name } => {
                let mut sink = Vec::new();
                self.close(name, &mut sink);
            }
            Record::SessionOpened {
                session,
                ttl,
                client,
            } => match self.sessions.get_mut(session) {
                Some(s) => {
                    s.ttl = *ttl;
                    s.client = client.clone();
                    s.deadline = now + *ttl;
                    self.reschedule_if_earlier(*session);
                }
                None => self.insert_session(now, *session, *ttl, client.clone()),
            },
            Record::Job {
                name,
                group,
                completion,
                failures,
                last_failure,
            } => self.jobs.restore(
                name,
                group.clone(),
                completion.clone(),
                *failures,
                last_failure.clone(),
            ),
            Record::SessionEnded { session } => {
                let mut sink = Vec::new();
                self.end_session(now, *session, Ending::Closed, &mut sink);
            }
            Record::Granted {
                session,
                lease,
                semaphore,
                weight,
                token,
            } => {
                let key = (*session, *lease);
                if !self.sessions.contains_key(session) || self.leases.contains_key(&key) {
                    return;
                }
                let Some(sem) = self.semaphores.get_mut(semaphore) else {
                    return;
                };
                // Not checked against the capacity: after a shrink, holders may keep more
                // than it (a snapshot writes the capacity before the grants). A token already
                // held, or the last one there is, cannot be a grant the log writer made (found
                // by the fuzz target `wal_records`: a damaged log whose checksums hold left
                // `in_use` above the holders).
                if sem.closed || sem.holders.contains_key(token) || token.0 == u64::MAX {
                    return;
                }
                let Some(in_use) = sem.in_use.checked_add(*weight) else {
                    return;
                };
                sem.next_token = sem.next_token.max(token.0.saturating_add(1));
                sem.in_use = in_use;
                sem.holders.insert(*token, key);
                sem.counters.acquired_total += 1;
                let name = sem.name.clone();
                self.add_lease(
                    key,
                    name,
                    *weight,
                    LeaseState::Held {
                        token: *token,
                        since: now,
                    },
                );
            }
            Record::Released { session, lease } => {
                if let Some((sem, _)) = self.unhold((*session, *lease)) {
                    if let Some(s) = self.semaphores.get_mut(&sem) {
                        s.counters.released_total += 1;
                    }
                    // Counts a failed attempt as the live run did, unless the job completed;
                    // either way the job's own record, logged after this one, has the last
                    // word.
                    let mut sink = Vec::new();
                    self.job_lock_freed(&sem, "released before it finished", &mut sink);
                }
            }
        }
    }

    /// The records that rebuild the current state through [`apply`](Coordinator::apply):
    /// every semaphore with its fencing counter, every session, every held lease. Queued
    /// acquires are left out, as in the log. O(state); the caller decides when a snapshot is
    /// worth it.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out =
            Vec::with_capacity(self.semaphores.len() + self.sessions.len() + self.leases.len() + 1);
        // First, so that the semaphores below are created above the floor as they were.
        if self.token_floor > 1 {
            out.push(Record::TokenFloor {
                next_token: self.token_floor,
            });
        }
        // In name order, here and for the grants below: a snapshot is a function of the state
        // alone, never of the hash map's iteration order (which differs between two cores
        // holding the same state, so their snapshots would not compare equal).
        let mut sems: Vec<(&Arc<str>, &Semaphore)> = self.semaphores.iter().collect();
        sems.sort_by(|a, b| a.0.cmp(b.0));
        for (_, s) in &sems {
            out.push(Record::Semaphore {
                name: s.name.clone(),
                capacity: s.capacity,
                closed: s.closed,
                next_token: s.next_token,
            });
        }
        let mut sessions: Vec<(&SessionId, &Session)> = self.sessions.iter().collect();
        sessions.sort_by_key(|(id, _)| **id);
        for (id, s) in sessions {
            out.push(Record::SessionOpened {
                session: *id,
                ttl: s.ttl,
                client: s.client.clone(),
            });
        }
        for (_, s) in &sems {
            for (token, key) in &s.holders {
                if let Some(lease) = self.leases.get(key) {
                    out.push(Record::Granted {
                        session: key.0,
                        lease: key.1,
                        semaphore: s.name.clone(),
                        weight: lease.weight,
                        token: *token,
                    });
                }
            }
        }
        // Last, so that they overwrite what replaying the grants above may have counted.
        self.jobs.snapshot(&mut out);
        out
    }

    /// Every semaphore, sorted by name.
    pub fn semaphores(&self, now: Time) -> Vec<SemaphoreView> {
        let mut all: Vec<SemaphoreView> = self
            .semaphores
            .values()
            .filter(|s| !jobs::is_lock_name(&s.name))
            .map(|s| self.view(s, now))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// One semaphore, if it exists.
    pub fn semaphore(&self, name: &str, now: Time) -> Option<SemaphoreView> {
        if jobs::is_lock_name(name) {
            return None;
        }
        self.semaphores.get(name).map(|s| self.view(s, now))
    }

    /// Every semaphore, sorted by name, without holders and waiters: O(semaphores) rather
    /// than O(leases), for metrics that only need the numbers.
    pub fn semaphore_stats(&self) -> Vec<SemaphoreView> {
        let mut all: Vec<SemaphoreView> = self
            .semaphores
            .values()
            .filter(|s| !jobs::is_lock_name(&s.name))
            .map(|s| summary(s, Vec::new(), Vec::new()))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn view(&self, s: &Semaphore, now: Time) -> SemaphoreView {
        self.view_capped(s, now, usize::MAX)
    }

    fn view_capped(&self, s: &Semaphore, now: Time, max_listed: usize) -> SemaphoreView {
        let holders = s
            .holders
            .iter()
            .take(max_listed)
            .filter_map(|(token, key)| {
                let lease = self.leases.get(key)?;
                let LeaseState::Held { since, .. } = lease.state else {
                    return None;
                };
                Some(HolderView {
                    lease: key.1,
                    session: key.0,
                    client: self.client_of(key.0),
                    weight: lease.weight,
                    token: *token,
                    age: now.saturating_since(since),
                })
            })
            .collect();
        let waiters = s
            .queue
            .values()
            .take(max_listed)
            .filter_map(|key| {
                let lease = self.leases.get(key)?;
                let LeaseState::Queued(ref w) = lease.state else {
                    return None;
                };
                let since = w.since;
                Some(WaiterView {
                    lease: key.1,
                    session: key.0,
                    client: self.client_of(key.0),
                    weight: lease.weight,
                    age: now.saturating_since(since),
                })
            })
            .collect();
        summary(s, holders, waiters)
    }

    fn client_of(&self, session: SessionId) -> Arc<str> {
        self.sessions
            .get(&session)
            .map(|s| s.client.clone())
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Moves the fencing counter of every semaphore (and job lock) `n` tokens on, each with a
    /// durable record. For a shell whose recovery cut a damaged end off the log: grants
    /// recorded there may have been acknowledged, and their tokens must not be handed out
    /// again — a resource that checks tokens then refuses the forgotten holder once the next
    /// one has used it. (A semaphore whose creation was in the cut part is not known, and
    /// starts again from token 1.)
    pub fn skip_tokens(&mut self, n: u64, out: &mut Vec<Effect>) {
        // Forgotten semaphores whose forgetting was in the cut part are created anew from the
        // floor: it moves on too.
        self.token_floor = self.token_floor.max(1).saturating_add(n);
        out.push(Effect::Persist(Record::TokenFloor {
            next_token: self.token_floor,
        }));
        let mut names: Vec<Arc<str>> = self.semaphores.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(s) = self.semaphores.get_mut(&name) else {
                continue;
            };
            s.next_token = s.next_token.saturating_add(n);
            out.push(Effect::Persist(Record::Semaphore {
                name: s.name.clone(),
                capacity: s.capacity,
                closed: s.closed,
                next_token: s.next_token,
            }));
        }
    }

    /// The leases `session` holds (granted, not queued; job leases too), in no particular
    /// order, or `None` if there is no such session. A client that resumes its session after a
    /// restart compares them with the leases it believes it holds: a grant whose record the
    /// restarted coordinator lost (a damaged log tail) is missing here, and its holder must be
    /// told.
    pub fn held_leases(&self, session: SessionId) -> Option<Vec<LeaseId>> {
        let s = self.sessions.get(&session)?;
        Some(
            s.leases
                .iter()
                .copied()
                .filter(|&lease| {
                    matches!(
                        self.leases.get(&(session, lease)),
                        Some(Lease {
                            state: LeaseState::Held { .. },
                            ..
                        })
                    )
                })
                .collect(),
        )
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of leases, held or queued.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Entries in the deadline heap: one per session plus one per queued acquire with a
    /// timeout (and a few stale ones, dropped when they come due).
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Whether a session is open.
    pub fn has_session(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Checks every invariant in the module documentation. O(state); meant for tests and
    /// debugging, not for the hot path.
    pub fn validate(&self) -> Result<(), String> {
        if self.names.len() != self.semaphores.len()
            || self.names.iter().any(|n| !self.semaphores.contains_key(n))
        {
            return Err("the sorted name index differs from the semaphores".into());
        }
        let mut seen: HashSet<LeaseKey> = HashSet::default();
        for (name, s) in &self.semaphores {
            if **name != *s.name {
                return Err(format!("semaphore keyed {name:?} is named {:?}", s.name));
            }
            if self.forget_after.is_some()
                && is_idle(s)
                && !jobs::is_lock_name(&s.name)
                && s.forget_scheduled.is_none()
            {
                return Err(format!("idle semaphore {name:?} is never forgotten"));
            }
            if s.closed && (!s.holders.is_empty() || !s.queue.is_empty() || s.in_use != 0) {
                return Err(format!(
                    "closed semaphore {name:?} still has holders or waiters"
                ));
            }
            let mut sum = 0u64;
            for (token, key) in &s.holders {
                if token.0 >= s.next_token {
                    return Err(format!("{name:?}: token {token} >= next {}", s.next_token));
                }
                let lease = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: holder {key:?} has no lease"))?;
                match lease.state {
                    LeaseState::Held { token: t, .. } if t == *token => {}
                    _ => return Err(format!("{name:?}: holder {key:?} not held with {token}")),
                }
                if lease.semaphore != *name {
                    return Err(format!("{name:?}: holder {key:?} belongs elsewhere"));
                }
                sum += u64::from(lease.weight);
                if !seen.insert(*key) {
                    return Err(format!("lease {key:?} appears twice"));
                }
            }
            if sum != u64::from(s.in_use) {
                return Err(format!("{name:?}: in_use {} != held {sum}", s.in_use));
            }
            // `in_use` may exceed the capacity after a shrink; that no grant is made while
            // it does is the queue check below (a head never fits while nothing is free).
            let mut qsum = 0u64;
            for (seq, key) in &s.queue {
                let lease = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: waiter {key:?} has no lease"))?;
                match lease.state {
                    LeaseState::Queued(ref w) if w.seq == *seq => {}
                    _ => return Err(format!("{name:?}: waiter {key:?} not queued at {seq}")),
                }
                qsum += u64::from(lease.weight);
                if !seen.insert(*key) {
                    return Err(format!("lease {key:?} appears twice"));
                }
            }
            if qsum != s.queued_weight {
                return Err(format!(
                    "{name:?}: queued_weight {} != {qsum}",
                    s.queued_weight
                ));
            }
            if let Some(key) = s.queue.values().next() {
                // Every waiter's lease was checked above.
                let head = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: waiter {key:?} has no lease"))?;
                if head.weight <= s.free() {
                    return Err(format!("{name:?}: head {key:?} fits but is still queued"));
                }
            }
        }
        if seen.len() != self.leases.len() {
            return Err(format!(
                "{} leases, {} in semaphores",
                self.leases.len(),
                seen.len()
            ));
        }
        for (key, lease) in &self.leases {
            let session = self
                .sessions
                .get(&key.0)
                .ok_or_else(|| format!("lease {key:?} outlives its session"))?;
            if session.leases.get(lease.slot as usize) != Some(&key.1) {
                return Err(format!(
                    "session does not list lease {key:?} at its slot {}",
                    lease.slot
                ));
            }
        }
        for (id, session) in &self.sessions {
            // With the check above, this also rules out an id listed twice.
            for (slot, lease) in session.leases.iter().enumerate() {
                match self.leases.get(&(*id, *lease)) {
                    None => return Err(format!("session {id} lists missing lease {lease}")),
                    Some(l) if l.slot as usize != slot => {
                        return Err(format!("session {id} lists lease {lease} at {slot} too"))
                    }
                    Some(_) => {}
                }
            }
            if session.scheduled > session.deadline {
                return Err(format!("session {id} scheduled after its deadline"));
            }
        }
        self.validate_jobs()
    }
}

/// Whether `s` may be forgotten: no holders, no waiters, not closed, not a job's lock (whose
/// job state lives on).
fn is_idle(s: &Semaphore) -> bool {
    s.holders.is_empty() && s.queue.is_empty() && !s.closed && !jobs::is_lock_name(&s.name)
}

/// The view of a semaphore with the given holder and waiter lists.
fn summary(s: &Semaphore, holders: Vec<HolderView>, waiters: Vec<WaiterView>) -> SemaphoreView {
    SemaphoreView {
        name: s.name.clone(),
        capacity: s.capacity,
        in_use: s.in_use,
        queued: s.queue.len(),
        queued_weight: s.queued_weight,
        closed: s.closed,
        holders,
        waiters,
        counters: s.counters,
        wait: s.wait.clone(),
    }
}

/// Issues the next token of `sem` to `key` and records the grant. `since` is when the acquire
/// arrived, for the wait statistics.
fn issue(
    sem: &mut Semaphore,
    now: Time,
    since: Time,
    key: LeaseKey,
    weight: u32,
    out: &mut Vec<Effect>,
) -> Token {
    let token = Token(sem.next_token);
    sem.next_token += 1;
    sem.in_use += weight;
    sem.holders.insert(token, key);
    sem.counters.acquired_total += 1;
    sem.wait.observe(now.saturating_since(since));
    out.push(Effect::Persist(Record::Granted {
        session: key.0,
        lease: key.1,
        semaphore: sem.name.clone(),
        weight,
        token,
    }));
    token
}

fn validate_name(name: &str) -> Result<(), Error> {
    validate_label("semaphore name", name)
}

/// Checks a name a client gives (of a semaphore, job or group): 1 to [`MAX_NAME_LEN`] bytes,
/// no control characters (which keeps job locks out of clients' reach).
fn validate_label(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{what} contains a control character"
        )));
    }
    Ok(())
}
