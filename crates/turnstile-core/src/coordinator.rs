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

mod admin;
mod expiry;
mod jobs;
mod replay;
mod validate;
mod views;

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

    /// The coordinator's token floor: every semaphore created now counts tokens from here on.
    pub fn token_floor(&self) -> u64 {
        self.token_floor.max(1)
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
