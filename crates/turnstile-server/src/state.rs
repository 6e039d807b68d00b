//! The state every task shares: the core, the connections' outboxes, and which connection each
//! session is bound to. One mutex guards it all; a step of the core is microseconds, so the
//! lock is held briefly, and holding one lock for "step, then route the effects" is what keeps
//! replies in the order the core produced them.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use turnstile_core::{
    Coordinator, Effect, EndReason, Error, Event, LostReason, Record, Reply, Request, SessionId,
    Tag, Time,
};
use turnstile_proto::{self as proto, ErrorCode};

use crate::durable::WalQueue;
use crate::events::EventLog;
use crate::metrics::{self, Kind, Metrics};
use crate::outbox::Outbox;

/// Hash maps with foldhash (see the core's coordinator): looked up for every reply.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use crate::Config;

/// A connection's number. With the request id it forms the core's reply [`Tag`].
pub(crate) type ConnId = u32;

pub(crate) fn tag(conn: ConnId, request: u32) -> Tag {
    Tag((u64::from(conn) << 32) | u64::from(request))
}

/// Units of deadline work (a deadline, or a lease freed) the core does per turn of the state
/// lock, in a tick and in front of a request: about a millisecond of work (measured: 2048 units took 7 to 15 ms with the effects routed, on a loaded machine), so that 100,000
/// leases expiring at once delay another client's request by a slice, not by the whole
/// sweep. The core keeps lagging safe (see `Coordinator::set_step_budget`).
pub(crate) const TICK_SLICE: usize = 256;

fn untag(tag: Tag) -> (ConnId, u32) {
    ((tag.0 >> 32) as u32, tag.0 as u32)
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the timer task when a deadline earlier than the one it sleeps for appears.
    pub(crate) timer: Notify,
    /// Wakes the log writer thread when records are queued (paired with `state`).
    wal_ready: Condvar,
    /// Completes when the log writer failed and the server must stop.
    pub(crate) fatal: Notify,
    fatal_error: Mutex<Option<String>>,
    epoch: Instant,
    pub(crate) config: Config,
    /// Counters of the shell, bumped without the state lock.
    pub(crate) metrics: Metrics,
}

pub(crate) struct State {
    pub(crate) core: Coordinator,
    conns: HashMap<ConnId, Arc<Outbox>>,
    /// Where to push a session's events: the connection that last opened or resumed it.
    /// (Several clients may share a session: every client of a supervised worker uses the
    /// worker's session; each of their connections hears the session's events.)
    bound: HashMap<SessionId, Vec<ConnId>>,
    next_conn: ConnId,
    /// Reused for every step, so the hot path does not allocate an effect list.
    effects: Vec<Effect>,
    /// The deadline the timer task sleeps until, if any.
    pub(crate) timer_at: Option<Time>,
    /// Records on their way to disk; `None` for a server that keeps its state in memory.
    pub(crate) wal: Option<WalQueue>,
    /// The connection whose request is being handled, if any: its replies are left for its
    /// reader to flush, without waking its writer task.
    local: Option<ConnId>,
    /// The feed of notable events.
    pub(crate) events: EventLog,
    /// The kind of each request the core has not answered yet (a queued acquire, job attempt
    /// or group wait), so that its answer, which a later step produces, is counted under the
    /// right kind. Every such request is answered exactly once (granted, timed out, withdrawn,
    /// superseded, or failed when its session ends), which removes it.
    pending: HashMap<Tag, Kind>,
}

/// The request a step handles, for counting its reply and naming its events.
#[derive(Clone, Copy)]
struct Current {
    tag: Tag,
    kind: Kind,
    /// Its answer may leave before the log is synced (see `route`).
    early: bool,
}

/// What routing a step's effects did.
struct Routed {
    /// Records were queued for the log.
    logged: bool,
    /// The step's own request was answered.
    answered: bool,
}

impl Shared {
    /// Shared state around a core (recovered or new), with a log queue if durable.
    pub(crate) fn new(
        config: Config,
        core: Coordinator,
        epoch: Instant,
        wal: Option<WalQueue>,
    ) -> Shared {
        Shared {
            state: Mutex::new(State {
                core,
                conns: HashMap::default(),
                bound: HashMap::default(),
                next_conn: 1,
                effects: Vec::new(),
                timer_at: None,
                wal,
                local: None,
                events: EventLog::new(),
                pending: HashMap::default(),
            }),
            timer: Notify::new(),
            wal_ready: Condvar::new(),
            fatal: Notify::new(),
            fatal_error: Mutex::new(None),
            epoch,
            config,
            metrics: Metrics::new(),
        }
    }

    /// Blocks the log writer until records are queued or it is told to stop.
    pub(crate) fn wait_for_wal<'a>(
        &self,
        mut guard: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        // Set under the lock that the wait releases: a step that queues records after this
        // sees it and notifies, and a notify between the release and the sleep is not lost
        // (the condition variable's own guarantee).
        if let Some(wal) = guard.wal.as_mut() {
            wal.writer_asleep = true;
        }
        let mut guard = self
            .wal_ready
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner());
        if let Some(wal) = guard.wal.as_mut() {
            wal.writer_asleep = false;
        }
        guard
    }

    /// Whether a step that queued records must wake the writer (see
    /// `WalQueue::writer_asleep`); clears the mark, so that the steps after it do not.
    fn writer_to_wake(st: &mut State, logged: bool) -> bool {
        logged
            && st
                .wal
                .as_mut()
                .is_some_and(|wal| std::mem::take(&mut wal.writer_asleep))
    }

    /// Called by the log writer: records up to step `lsn` are durable; send what waited.
    pub(crate) fn durable(&self, lsn: u64) {
        let mut st = self.lock();
        let mut ready = Vec::new();
        if let Some(wal) = st.wal.as_mut() {
            wal.durable = wal.durable.max(lsn);
            while wal.deferred.front().is_some_and(|(l, _)| *l <= lsn) {
                if let Some((_, e)) = wal.deferred.pop_front() {
                    ready.push(e);
                }
            }
        }
        for e in ready {
            st.deliver(e);
        }
    }

    /// Called by the log writer when a snapshot is done.
    pub(crate) fn rotated(&self) {
        if let Some(wal) = self.lock().wal.as_mut() {
            wal.rotation_pending = false;
        }
    }

    /// Called by the log writer when the disk failed: the server stops.
    pub(crate) fn fail(&self, error: String) {
        *self.fatal_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        self.fatal.notify_one();
    }

    /// Why the log writer failed, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.fatal_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells the log writer to finish what is queued and stop.
    pub(crate) fn stop_wal(&self) {
        if let Some(wal) = self.lock().wal.as_mut() {
            wal.stop = true;
        }
        self.wal_ready.notify_one();
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The core validates its input and never panics on it; if a bug made it panic anyway,
        // the other connections are better served by the state as it stands than by a
        // poisoned server that answers nobody.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The core's clock: microseconds since the server started, from a monotonic clock.
    pub(crate) fn now(&self) -> Time {
        Time::from_micros(u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// The wall-clock instant of a core time, for the timer task.
    pub(crate) fn instant_of(&self, t: Time) -> Instant {
        self.epoch + Duration::from_micros(t.as_micros())
    }

    /// Hands one request to the core and routes its effects. `followed`: the connection
    /// read another request with this one, which it handles next.
    ///
    /// A release's answer leaves before its record is durable (invariant 12's exception)
    /// unless `followed`: a release pipelined ahead of an acquire (a dropped permit's) is
    /// answered with the acquire, in one write that the client reads once; the acquire
    /// waits for the sync anyway, and two answers written apart cost both sides a system
    /// call and the client a wake-up more per pair.
    pub(crate) fn step(&self, conn: ConnId, id: u32, request: Request<'_>, followed: bool) {
        let now = self.now();
        let kind = Kind::of(&request);
        let current = Current {
            tag: tag(conn, id),
            kind,
            early: kind == Kind::Release && !followed,
        };
        let mut st = self.lock();
        let mut effects = std::mem::take(&mut st.effects);
        st.core.handle(now, current.tag, request, &mut effects);
        st.local = Some(conn);
        let routed = st.route(&mut effects, Some(current), &self.metrics);
        st.local = None;
        if !routed.answered && current.kind.may_wait() {
            st.pending.insert(current.tag, current.kind);
        }
        st.effects = effects;
        self.wake_timer_if_needed(&mut st);
        let wake_writer = Self::writer_to_wake(&mut st, routed.logged);
        let unlogged = st.events.take_unlogged();
        drop(st);
        if wake_writer {
            self.wal_ready.notify_one();
        }
        crate::events::log(unlogged);
    }

    /// Processes due deadlines, one slice of [`TICK_SLICE`] units of work, and routes their
    /// effects. Returns whether due deadlines remain: the timer task calls again, after
    /// letting the others have the lock.
    pub(crate) fn tick(&self) -> bool {
        let now = self.now();
        let mut st = self.lock();
        let mut effects = std::mem::take(&mut st.effects);
        let more = st.core.tick_some(now, TICK_SLICE, &mut effects);
        let routed = st.route(&mut effects, None, &self.metrics);
        st.effects = effects;
        let wake_writer = Self::writer_to_wake(&mut st, routed.logged);
        let unlogged = st.events.take_unlogged();
        drop(st);
        if wake_writer {
            self.wal_ready.notify_one();
        }
        crate::events::log(unlogged);
        more
    }

    fn wake_timer_if_needed(&self, st: &mut State) {
        if let Some(next) = st.core.next_deadline() {
            if st.timer_at.is_none_or(|at| next < at) {
                st.timer_at = Some(next);
                self.timer.notify_one();
            }
        }
    }
}

impl State {
    pub(crate) fn register(&mut self, outbox: Arc<Outbox>) -> ConnId {
        // Skip ids still in use after a wrap-around, and 0.
        loop {
            let id = self.next_conn;
            self.next_conn = self.next_conn.wrapping_add(1).max(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.conns.entry(id) {
                slot.insert(outbox);
                return id;
            }
        }
    }

    pub(crate) fn unregister(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.bound.retain(|_, conns| {
            conns.retain(|c| *c != conn);
            !conns.is_empty()
        });
    }

    pub(crate) fn bind(&mut self, session: SessionId, conn: ConnId) {
        let conns = self.bound.entry(session).or_default();
        if !conns.contains(&conn) {
            conns.push(conn);
        }
    }

    /// Carries out a step's effects: its records are queued for the log, and its replies and
    /// events are delivered, or wait until those records (and all before) are durable.
    /// Replies are counted and notable events recorded here, once, as the core decides them.
    fn route(
        &mut self,
        effects: &mut Vec<Effect>,
        current: Option<Current>,
        metrics: &Metrics,
    ) -> Routed {
        let mut routed = Routed {
            logged: false,
            answered: false,
        };
        for effect in effects.iter() {
            match effect {
                Effect::Reply { tag, outcome } => {
                    let kind = match current {
                        Some(c) if c.tag == *tag => {
                            routed.answered = true;
                            c.kind
                        }
                        // A request answered after the step that handled it. Never absent
                        // (the step that queued it recorded it); were a bug to break that, the
                        // answer would still be counted, as an acquire's, the commonest.
                        _ => self.pending.remove(tag).unwrap_or(Kind::Acquire),
                    };
                    let code = outcome.as_ref().err().map(error_code);
                    metrics.request(kind, metrics::outcome(code));
                }
                Effect::Event(event) => self.events.core_event(event),
                Effect::Persist(Record::SemaphoreClosed { name }) => {
                    self.events.semaphore_closed(name)
                }
                // An operator's changes (forgetting an idle semaphore is not an event).
                Effect::Persist(Record::Forgotten { name, .. })
                    if current.is_some_and(|c| c.kind == Kind::Delete) =>
                {
                    self.events.semaphore_deleted(name)
                }
                Effect::Persist(Record::Semaphore { name, capacity, .. })
                    if current.is_some_and(|c| c.kind == Kind::SetCapacity) =>
                {
                    self.events.capacity_changed(name, *capacity)
                }
                Effect::Persist(Record::Job {
                    name,
                    completion,
                    last_failure,
                    ..
                }) if current.is_some_and(|c| c.kind == Kind::FinishJob) => {
                    // A finish writes the job's record once: with the completion, or with the
                    // failure it adds.
                    let failure = match completion {
                        Some(_) => None,
                        None => Some(last_failure.as_deref().unwrap_or("failed")),
                    };
                    self.events.job_finished(name, failure);
                }
                Effect::Persist(_) => {}
            }
        }
        if let Some(wal) = self.wal.as_mut() {
            let records: Vec<&Record> = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Persist(r) => Some(r),
                    _ => None,
                })
                .collect();
            if !records.is_empty() {
                routed.logged = true;
                if wal.append(&records) {
                    wal.schedule_snapshot(self.core.snapshot());
                }
            }
        }
        for effect in effects.drain(..) {
            if matches!(effect, Effect::Persist(_)) {
                continue;
            }
            // A release's own answer need not wait for the log (invariant 12's exception):
            // losing its record in a crash only leaves the slot held, by a session whose
            // client releases it again when it resumes (invariant 19). Waiting would double
            // the syncs an acquire-release pair waits for. What the release lets through
            // (grants to waiters) still waits.
            let early = matches!(&effect, Effect::Reply { tag, .. }
                if current.is_some_and(|c| c.tag == *tag && c.early));
            match self.wal.as_mut() {
                Some(wal) if wal.must_defer() && !early => {
                    wal.deferred.push_back((wal.appended, effect))
                }
                _ => self.deliver(effect),
            }
        }
        routed
    }

    /// Sends a reply to the connection in its tag, or an event to the connection its session
    /// is bound to.
    fn deliver(&mut self, effect: Effect) {
        {
            match effect {
                Effect::Persist(_) => {}
                Effect::Reply { tag, outcome } => {
                    let (conn, id) = untag(tag);
                    if let Some(outbox) = self.conns.get(&conn) {
                        let push = |reply: &proto::Reply<'_>| {
                            if self.local == Some(conn) {
                                outbox.push_local(id, reply);
                            } else {
                                outbox.push(id, reply);
                            }
                        };
                        match outcome {
                            Ok(reply) => push(&reply_to_wire(&reply)),
                            Err(e) => {
                                let message = e.to_string();
                                push(&proto::Reply::Error {
                                    code: error_code(&e),
                                    message: &message,
                                });
                            }
                        }
                    }
                }
                Effect::Event(Event::LeaseLost {
                    session,
                    lease,
                    semaphore,
                    token,
                    reason,
                    ..
                }) => {
                    // Every client of the session hears it; the one that holds the lease acts.
                    for outbox in self.outboxes_of(session) {
                        outbox.push(
                            0,
                            &proto::Reply::LeaseLost {
                                lease: lease.0,
                                token: token.0,
                                reason: lost_reason(reason),
                                name: &semaphore,
                            },
                        );
                    }
                }
                Effect::Event(Event::SessionEnded {
                    session, reason, ..
                }) => {
                    let lost = match reason {
                        EndReason::Closed => None,
                        EndReason::Expired => Some(proto::LostReason::Expired),
                        EndReason::EndedByOther => Some(proto::LostReason::SessionEnded),
                    };
                    if let Some(lost) = lost {
                        for outbox in self.outboxes_of(session) {
                            outbox.push(
                                0,
                                &proto::Reply::SessionLost {
                                    session: session.0,
                                    reason: lost,
                                },
                            );
                        }
                    }
                    self.bound.remove(&session);
                }
            }
        }
    }

    fn outboxes_of(&self, session: SessionId) -> impl Iterator<Item = &Arc<Outbox>> {
        self.bound
            .get(&session)
            .into_iter()
            .flatten()
            .filter_map(|c| self.conns.get(c))
    }
}

fn reply_to_wire(reply: &Reply) -> proto::Reply<'_> {
    match reply {
        Reply::SessionOpened { ttl, existed } => proto::Reply::SessionOpened {
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            existed: *existed,
        },
        Reply::Done => proto::Reply::Done,
        Reply::Granted { token } => proto::Reply::Granted { token: token.0 },
        Reply::JobCompleted(c) => proto::Reply::JobCompleted {
            token: c.token.0,
            started_unix_ms: c.started_unix_ms,
            duration_ms: millis64(c.duration),
            client: &c.client,
        },
        Reply::JobBusy { client, token, age } => proto::Reply::JobBusy {
            token: token.0,
            age_ms: millis64(*age),
            client,
        },
        Reply::JobReset { was_completed } => proto::Reply::JobReset {
            was_completed: *was_completed,
        },
        Reply::GroupSettled(g) => proto::Reply::GroupSettled {
            jobs: g.jobs,
            completed: g.completed,
            running: g.running,
            failures: g.failures,
        },
    }
}

fn millis64(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lost_reason(r: LostReason) -> proto::LostReason {
    match r {
        LostReason::Expired => proto::LostReason::Expired,
        LostReason::Closed => proto::LostReason::Closed,
        LostReason::SessionEnded => proto::LostReason::SessionEnded,
        LostReason::Revoked => proto::LostReason::Revoked,
    }
}

/// The wire code of a core error.
pub(crate) fn error_code(e: &Error) -> ErrorCode {
    match e {
        Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
        Error::CapacityMismatch { .. } => ErrorCode::CapacityMismatch,
        Error::NoSuchSemaphore(_) => ErrorCode::NoSuchSemaphore,
        Error::Closed(_) => ErrorCode::Closed,
        Error::WeightExceedsCapacity { .. } => ErrorCode::WeightExceedsCapacity,
        Error::SessionNotFound(_) => ErrorCode::SessionNotFound,
        Error::UnknownLease(_) => ErrorCode::UnknownLease,
        Error::LeaseConflict { .. } => ErrorCode::LeaseConflict,
        Error::TimedOut => ErrorCode::TimedOut,
        Error::Cancelled => ErrorCode::Cancelled,
        Error::Superseded => ErrorCode::Superseded,
        Error::SessionEnded => ErrorCode::SessionEnded,
        Error::InUse { .. } => ErrorCode::InUse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_core::{LeaseId, Request};

    /// A durable server's state with no log writer: nothing becomes durable until the test
    /// says so with [`Shared::durable`].
    fn durable_state() -> (Shared, ConnId, Arc<Outbox>) {
        let wal = WalQueue::new(u64::MAX, 0);
        let shared = Shared::new(
            Config::default(),
            Coordinator::new(),
            Instant::now(),
            Some(wal),
        );
        let outbox = Arc::new(Outbox::default());
        let conn = shared.lock().register(outbox.clone());
        (shared, conn, outbox)
    }

    fn appended(shared: &Shared) -> u64 {
        shared.lock().wal.as_ref().map_or(0, |w| w.appended)
    }

    /// Invariant 12 and its one exception: a grant waits for its record to be durable; a
    /// release is answered at once (what a crash can lose of it, the client's reconciliation
    /// after the resume releases again), and the grant it lets through still waits.
    #[test]
    fn a_release_is_answered_before_its_record_is_durable_and_a_grant_is_not() {
        let (shared, conn, outbox) = durable_state();
        let session = SessionId(7);
        shared.step(
            conn,
            1,
            Request::OpenSession {
                session,
                ttl: Duration::from_secs(10),
                client: "test",
            },
            false,
        );
        shared.step(
            conn,
            2,
            Request::Ensure {
                name: "db",
                capacity: 1,
            },
            false,
        );
        let acquire = |lease: u64| Request::Acquire {
            session,
            lease: LeaseId(lease),
            name: "db",
            weight: 1,
            timeout: None,
        };
        shared.step(conn, 3, acquire(1), false);
        assert_eq!(outbox.pending(), 0, "nothing answered before the log syncs");
        shared.durable(appended(&shared));
        let answered = outbox.pending();
        assert!(answered > 0, "the sync lets the answers out");

        // A second acquire queues behind the first.
        shared.step(conn, 4, acquire(2), false);
        shared.durable(appended(&shared));
        let queued = outbox.pending();
        assert_eq!(queued, answered, "a queued acquire is not answered");

        shared.step(
            conn,
            5,
            Request::Release {
                session,
                lease: LeaseId(1),
            },
            false,
        );
        let durable = shared.lock().wal.as_ref().map_or(0, |w| w.durable);
        assert!(
            durable < appended(&shared),
            "the release's record is not durable yet"
        );
        let released = outbox.pending();
        assert!(released > queued, "the release is answered at once");
        assert_eq!(
            shared.lock().wal.as_ref().map_or(0, |w| w.deferred.len()),
            1,
            "the grant of the queued acquire waits for the sync"
        );
        shared.durable(appended(&shared));
        let granted = outbox.pending();
        assert!(granted > released, "then the grant goes out");

        // A release read together with a request after it (a dropped permit's, ahead of
        // the next acquire) is answered with that request, after the sync.
        shared.step(
            conn,
            6,
            Request::Release {
                session,
                lease: LeaseId(2),
            },
            true,
        );
        assert_eq!(outbox.pending(), granted, "answered with what follows it");
        shared.durable(appended(&shared));
        assert!(outbox.pending() > granted);
    }

    /// The log writer asleep on the condition variable is woken by the first step that
    /// queues records, and that step clears the mark, so the steps after it make no system
    /// call to wake a writer that is already awake (or busy syncing).
    #[test]
    fn a_sleeping_log_writer_is_woken_by_the_first_record_only() {
        let (shared, conn, _outbox) = durable_state();
        let shared = Arc::new(shared);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut st = shared.lock();
                // Sent with the lock held: the step below gets the lock only once the wait
                // has let go of it, so it finds the writer asleep.
                let _ = ready_tx.send(());
                while st.wal.as_ref().is_some_and(|w| w.chunks.is_empty()) {
                    st = shared.wait_for_wal(st);
                }
                let _ = done_tx.send(st.wal.as_ref().map_or(0, |w| w.chunks.len()));
            })
        };
        ready_rx.recv().expect("the writer thread runs");
        shared.step(
            conn,
            1,
            Request::OpenSession {
                session: SessionId(9),
                ttl: Duration::from_secs(10),
                client: "test",
            },
            false,
        );
        let chunks = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the step woke the writer");
        assert!(chunks > 0);
        writer.join().expect("the writer thread");
        let mut st = shared.lock();
        assert!(!Shared::writer_to_wake(&mut st, true), "awake: no notify");
        if let Some(wal) = st.wal.as_mut() {
            wal.writer_asleep = true;
        }
        assert!(
            !Shared::writer_to_wake(&mut st, false),
            "no records: no notify"
        );
        assert!(
            Shared::writer_to_wake(&mut st, true),
            "the first record wakes it"
        );
        assert!(
            !Shared::writer_to_wake(&mut st, true),
            "the next ones do not"
        );
    }
}
