//! The harness: drives the core and the model side by side and compares them after every
//! step (the checks are listed in the crate doc).

use super::*;

/// An acquire as it was sent, to be retried or released later.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sent {
    pub(crate) session: SessionId,
    pub(crate) lease: LeaseId,
    pub(crate) name: &'static str,
    pub(crate) weight: u32,
}

pub(crate) struct Harness {
    pub(crate) core: Coordinator,
    pub(crate) model: Model,
    /// Milliseconds.
    pub(crate) now: u64,
    pub(crate) next_tag: u64,
    /// Every `Effect::Persist`, in order.
    pub(crate) records: Vec<Record>,
    /// The log as the server keeps it: the last `Coordinator::snapshot`, then every
    /// `Effect::Persist` since.
    pub(crate) compacted: Vec<Record>,
    /// Whether a snapshot was taken (else `compacted == records`).
    pub(crate) snapshotted: bool,
    pub(crate) sent: Vec<Sent>,
    /// Every tag that got a reply.
    pub(crate) answered: HashSet<Tag>,
    /// Acquire tags still waiting for a reply.
    pub(crate) waiting: BTreeSet<Tag>,
    /// The last token persisted per semaphore.
    pub(crate) last_token: HashMap<Arc<str>, Token>,
    /// The held leases according to the persisted records alone.
    pub(crate) ledger: BTreeMap<Key, (Arc<str>, Token, u32)>,
    /// Whether `Jump` is shortened to pass at most one deadline.
    pub(crate) exact_jumps: bool,
    /// If set, `Advance` sweeps the due deadlines in slices of this many units of work
    /// (`Coordinator::tick_some`), as the server does: the slices together must do exactly
    /// what one whole tick does, so the model comparison holds unchanged.
    pub(crate) slice: Option<usize>,
}

impl Harness {
    pub(crate) fn new() -> Harness {
        Harness {
            core: Coordinator::new(),
            model: Model::default(),
            now: 0,
            next_tag: 1,
            records: Vec::new(),
            compacted: Vec::new(),
            snapshotted: false,
            sent: Vec::new(),
            answered: HashSet::new(),
            waiting: BTreeSet::new(),
            last_token: HashMap::new(),
            ledger: BTreeMap::new(),
            exact_jumps: false,
            slice: None,
        }
    }

    /// Processes the deadlines due at `t`: in one tick, or in slices.
    pub(crate) fn tick(&mut self, t: Time, out: &mut Vec<Effect>) {
        match self.slice {
            None => self.core.tick(t, out),
            Some(budget) => {
                let mut slices = 0;
                while self.core.tick_some(t, budget, out) {
                    slices += 1;
                    assert!(slices < 100_000, "tick_some does not make progress");
                }
            }
        }
    }

    pub(crate) fn run(&mut self, op: &Op) {
        match *op {
            Op::Open { session, ttl_ms } => {
                self.request(Request::OpenSession {
                    session: SessionId(session),
                    ttl: Duration::from_millis(ttl_ms),
                    client: "test",
                });
            }
            Op::Resume { session } => {
                self.request(Request::ResumeSession {
                    session: SessionId(session),
                });
            }
            Op::KeepAlive { session } => {
                self.request(Request::KeepAlive {
                    session: SessionId(session),
                });
            }
            Op::CloseSession { session } => {
                self.request(Request::CloseSession {
                    session: SessionId(session),
                });
            }
            Op::EndSession { session } => {
                self.request(Request::EndSession {
                    session: SessionId(session),
                });
            }
            Op::Ensure { name, capacity } => {
                self.request(Request::Ensure { name, capacity });
            }
            Op::Acquire {
                session,
                lease,
                name,
                weight,
                timeout_ms,
            } => {
                let sent = Sent {
                    session: SessionId(session),
                    lease: LeaseId(lease),
                    name,
                    weight,
                };
                self.sent.push(sent);
                self.acquire(sent, timeout_ms);
            }
            Op::Retry { which, timeout_ms } => {
                if !self.sent.is_empty() {
                    let sent = self.sent[which.index(self.sent.len())];
                    self.retry(sent, timeout_ms);
                }
            }
            Op::ReleaseKnown { which } => {
                if !self.sent.is_empty() {
                    let sent = self.sent[which.index(self.sent.len())];
                    self.request(Request::Release {
                        session: sent.session,
                        lease: sent.lease,
                    });
                }
            }
            Op::Release { session, lease } => {
                self.request(Request::Release {
                    session: SessionId(session),
                    lease: LeaseId(lease),
                });
            }
            Op::Advance { ms } => self.advance(ms),
            Op::Jump { ms } => self.jump(ms),
            Op::Close { name } => {
                self.request(Request::Close { name });
            }
            Op::Snapshot => self.snapshot(),
            Op::SetCapacity { name, capacity } => {
                self.request(Request::SetCapacity { name, capacity });
            }
            Op::Delete { name } => {
                self.request(Request::Delete { name });
            }
            Op::RevokeKnown { which } => {
                if !self.sent.is_empty() {
                    let sent = self.sent[which.index(self.sent.len())];
                    self.request(Request::Revoke {
                        name: sent.name,
                        lease: sent.lease,
                    });
                }
            }
        }
    }

    pub(crate) fn acquire(&mut self, sent: Sent, timeout_ms: Option<u64>) -> (Tag, Vec<Effect>) {
        let tag = Tag(self.next_tag);
        self.waiting.insert(tag);
        self.request(Request::Acquire {
            session: sent.session,
            lease: sent.lease,
            name: sent.name,
            weight: sent.weight,
            timeout: timeout_ms.map(Duration::from_millis),
        })
    }

    /// Sends one request to both and compares.
    pub(crate) fn request(&mut self, request: Request<'_>) -> (Tag, Vec<Effect>) {
        let tag = Tag(self.next_tag);
        self.next_tag += 1;
        let mut exp = Expected::default();
        self.model.handle(self.now, tag, request, &mut exp);
        let mut out = Vec::new();
        self.core.handle(at(self.now), tag, request, &mut out);
        let what = format!("{request:?} as {tag:?} at {}ms", self.now);
        self.check(&what, &out, exp);
        (tag, out)
    }

    /// Moves the clock by `ms`, ticking at every deadline the core reports on the way (as the
    /// server does), then at the target.
    pub(crate) fn advance(&mut self, ms: u64) {
        let target = self.now + ms;
        let mut out = Vec::new();
        let mut ticks = 0;
        while let Some(deadline) = self.core.next_deadline() {
            if deadline > at(target) {
                break;
            }
            ticks += 1;
            assert!(ticks < 10_000, "next_deadline does not make progress");
            self.tick(deadline.max(at(self.now)), &mut out);
        }
        self.tick(at(target), &mut out);
        let mut exp = Expected::default();
        self.model.run_deadlines(target, &mut exp);
        self.now = target;
        self.check(&format!("advance by {ms}ms to {target}ms"), &out, exp);
    }

    /// Moves the clock by `ms` without ticking: the next call must process the deadlines.
    pub(crate) fn jump(&mut self, ms: u64) {
        let mut target = self.now + ms;
        if self.exact_jumps {
            // Pass at most one pending deadline: see the file header.
            if let Some(&second) = self.model.deadlines().get(1) {
                if second <= target {
                    target = second.saturating_sub(1).max(self.now);
                }
            }
        }
        self.now = target;
    }

    /// Retries an earlier acquire and checks, beyond the comparison with the model, that the
    /// retry does not grant a second time.
    pub(crate) fn retry(&mut self, sent: Sent, timeout_ms: Option<u64>) {
        // Process due deadlines first, so that the state seen here is the one the retry meets.
        self.advance(0);
        let key = (sent.session, sent.lease);
        let before = self
            .model
            .leases
            .get(&key)
            .filter(|l| *l.sem == *sent.name && l.weight == sent.weight)
            .map(|l| l.state);
        let view = |h: &Harness| {
            h.core
                .semaphore(sent.name, at(h.now))
                .expect("a semaphore with leases exists")
        };
        let queued_before = before.map(|_| view(self).queued);
        let (tag, out) = self.acquire(sent, timeout_ms);
        let regranted = out.iter().any(|e| {
            matches!(e, Effect::Persist(Record::Granted { session, lease, .. })
                if (*session, *lease) == key)
        });
        let reply_to = |t: Tag| {
            out.iter().find_map(|e| match e {
                Effect::Reply { tag, outcome } if *tag == t => Some(outcome.clone()),
                _ => None,
            })
        };
        match before {
            Some(State::Held(token)) => {
                assert!(!regranted, "retry of held {key:?} granted again");
                assert_eq!(
                    reply_to(tag),
                    Some(Ok(Reply::Granted { token })),
                    "retry of held {key:?} must return its token"
                );
                assert!(
                    view(self)
                        .holders
                        .iter()
                        .any(|h| (h.session, h.lease, h.token) == (key.0, key.1, token)),
                    "retry of held {key:?} must keep the grant"
                );
            }
            Some(State::Queued { tag: old, .. }) => {
                assert!(!regranted, "retry of queued {key:?} granted");
                assert_eq!(reply_to(old), Some(Err(Error::Superseded)));
                assert_eq!(reply_to(tag), None, "retry of queued {key:?} must wait");
                assert_eq!(
                    Some(view(self).queued),
                    queued_before,
                    "retry of queued {key:?} must keep one queue place"
                );
            }
            None => {}
        }
    }

    /// Compares one step's effects with the model's prediction, then the states.
    pub(crate) fn check(&mut self, what: &str, out: &[Effect], exp: Expected) {
        let mut replies = BTreeMap::new();
        let mut grants: BTreeMap<Arc<str>, Vec<(Key, Token)>> = BTreeMap::new();
        let mut events = Vec::new();
        for effect in out {
            match effect {
                Effect::Reply { tag, outcome } => {
                    assert!(
                        self.answered.insert(*tag),
                        "{what}: {tag:?} answered a second time with {outcome:?}"
                    );
                    self.waiting.remove(tag);
                    replies.insert(*tag, outcome.clone());
                }
                Effect::Persist(record) => {
                    self.log(what, record);
                    if let Record::Granted {
                        session,
                        lease,
                        semaphore,
                        token,
                        ..
                    } = record
                    {
                        grants
                            .entry(semaphore.clone())
                            .or_default()
                            .push(((*session, *lease), *token));
                    }
                    self.records.push(record.clone());
                    self.compacted.push(record.clone());
                }
                Effect::Event(event) => events.push(event.clone()),
            }
        }
        assert_eq!(
            replies, exp.replies,
            "{what}: replies differ from the model"
        );
        assert_eq!(
            grants, exp.grants,
            "{what}: grants (per semaphore, in order) differ from the model"
        );
        // Over capacity only after a shrink, and never by a grant: a step may grant (a
        // deadline processed first frees a slot) and then shrink the capacity, as a
        // `SetCapacity` does after the step's tick; then the grants came before the new
        // capacity and are judged by the model's comparison above.
        for name in grants.keys() {
            if let Some(v) = self.core.semaphore(name, at(self.now)) {
                let last = |pick: &dyn Fn(&Record) -> bool| {
                    out.iter()
                        .rposition(|e| matches!(e, Effect::Persist(r) if pick(r)))
                };
                let last_grant =
                    last(&|r| matches!(r, Record::Granted { semaphore, .. } if semaphore == name));
                let last_resize =
                    last(&|r| matches!(r, Record::Semaphore { name: n, .. } if n == name));
                let shrunk_after_grants = last_resize > last_grant;
                assert!(
                    v.in_use <= v.capacity || shrunk_after_grants,
                    "{what}: a grant took {name:?} over its capacity"
                );
            }
        }
        let by_debug = |e: &Event| format!("{e:?}");
        events.sort_by_key(by_debug);
        let mut expected_events = exp.events;
        expected_events.sort_by_key(by_debug);
        assert_eq!(
            events, expected_events,
            "{what}: events differ from the model"
        );
        self.check_state(what);
        self.check_replay(what);
    }

    /// Follows the persisted records on their own: no double grant, tokens strictly increase.
    pub(crate) fn log(&mut self, what: &str, record: &Record) {
        match record {
            Record::Granted {
                session,
                lease,
                semaphore,
                weight,
                token,
            } => {
                let key = (*session, *lease);
                assert!(
                    !self.ledger.contains_key(&key),
                    "{what}: {key:?} granted while the log shows it held"
                );
                self.ledger
                    .insert(key, (semaphore.clone(), *token, *weight));
                if let Some(last) = self.last_token.get(semaphore) {
                    assert!(
                        token > last,
                        "{what}: token {token:?} of {semaphore:?} after {last:?}"
                    );
                }
                self.last_token.insert(semaphore.clone(), *token);
            }
            Record::Released { session, lease } => {
                assert!(
                    self.ledger.remove(&(*session, *lease)).is_some(),
                    "{what}: released {session:?}/{lease:?}, which the log does not show held"
                );
            }
            Record::SessionEnded { session } => self.ledger.retain(|k, _| k.0 != *session),
            Record::SemaphoreClosed { name } => self.ledger.retain(|_, v| v.0 != *name),
            Record::Semaphore { name, closed, .. } => {
                if *closed {
                    self.ledger.retain(|_, v| v.0 != *name);
                }
            }
            Record::SemaphoreCreated { .. }
            | Record::SessionOpened { .. }
            | Record::Job { .. }
            | Record::TokenFloor { .. } => {}
            Record::Forgotten { name, .. } => assert!(
                !self.ledger.values().any(|v| v.0 == *name),
                "{what}: forgot {name:?}, which the log shows held"
            ),
        }
    }

    pub(crate) fn check_state(&self, what: &str) {
        let now = at(self.now);
        if let Err(e) = self.core.validate() {
            panic!("{what}: validate: {e}");
        }
        let views = self.core.semaphores(now);
        let names: Vec<&str> = views.iter().map(|v| &*v.name).collect();
        let model_names: Vec<&str> = self.model.sems.keys().map(|n| &**n).collect();
        assert_eq!(names, model_names, "{what}: semaphores differ");
        let mut held = BTreeMap::new();
        for v in &views {
            let sum: u32 = v.holders.iter().map(|h| h.weight).sum();
            assert_eq!(v.in_use, sum, "{what}: {:?} in_use", v.name);
            for h in &v.holders {
                assert!(
                    self.core.has_session(h.session),
                    "{what}: {:?} holds {:?} after its session ended",
                    h.session,
                    v.name
                );
                held.insert((h.session, h.lease), (v.name.clone(), h.token, h.weight));
            }
            let m = &self.model.sems[&v.name];
            let queued_weight: u64 = m
                .queue
                .iter()
                .map(|k| u64::from(self.model.leases[k].weight))
                .sum();
            assert_eq!(
                (v.capacity, v.closed, v.queued, v.queued_weight),
                (m.capacity, m.closed, m.queue.len(), queued_weight),
                "{what}: {:?} (capacity, closed, queued, queued weight)",
                v.name
            );
            assert_eq!(
                holder_list(v),
                m.holders
                    .iter()
                    .map(|k| {
                        let l = &self.model.leases[k];
                        let State::Held(token) = l.state else {
                            panic!("model bug: holder {k:?} not held");
                        };
                        (k.0, k.1, token, l.weight)
                    })
                    .collect::<Vec<_>>(),
                "{what}: holders of {:?}",
                v.name
            );
        }
        assert_eq!(held, self.ledger, "{what}: holders differ from the log");
        for s in SESSIONS {
            assert_eq!(
                self.core.has_session(SessionId(s)),
                self.model.sessions.contains_key(&SessionId(s)),
                "{what}: whether session {s} is open"
            );
        }
        assert_eq!(
            self.core.lease_count(),
            self.model.leases.len(),
            "{what}: lease count"
        );
        assert_eq!(
            self.waiting,
            self.model.waiting_tags(),
            "{what}: unanswered acquires differ from the model's waiters"
        );
    }

    /// Replays `log` into a fresh coordinator at the current time.
    pub(crate) fn replay(&self, log: &[Record]) -> Coordinator {
        let mut replica = Coordinator::new();
        for record in log {
            replica.apply(at(self.now), record);
        }
        replica
    }

    /// The logs to check: every record so far and, once a snapshot was taken, the compacted
    /// log.
    pub(crate) fn logs(&self) -> Vec<(&'static str, &[Record])> {
        let mut logs = vec![("replayed log", &self.records[..])];
        if self.snapshotted {
            logs.push(("snapshot and log since", &self.compacted[..]));
        }
        logs
    }

    pub(crate) fn check_replay(&self, what: &str) {
        let now = at(self.now);
        let live = self.core.semaphores(now);
        for (which, log) in self.logs() {
            let replica = self.replay(log);
            if let Err(e) = replica.validate() {
                panic!("{what}: {which}: validate: {e}");
            }
            let replayed = replica.semaphores(now);
            let shape = |vs: &[SemaphoreView]| -> Vec<(Arc<str>, u32, bool)> {
                vs.iter()
                    .map(|v| (v.name.clone(), v.capacity, v.closed))
                    .collect()
            };
            assert_eq!(
                shape(&replayed),
                shape(&live),
                "{what}: {which}: semaphores"
            );
            for (r, l) in replayed.iter().zip(&live) {
                assert_eq!(
                    holder_list(r),
                    holder_list(l),
                    "{what}: {which}: holders of {:?}",
                    l.name
                );
            }
            for s in SESSIONS {
                assert_eq!(
                    replica.has_session(SessionId(s)),
                    self.core.has_session(SessionId(s)),
                    "{what}: {which}: session {s}"
                );
            }
        }
    }

    /// Replaces the compacted log with a snapshot, as the server does when its log grows.
    pub(crate) fn snapshot(&mut self) {
        self.compacted = self.core.snapshot();
        self.snapshotted = true;
        self.check_replay(&format!("snapshot at {}ms", self.now));
    }

    /// Ends a run: the replayed fencing counters must continue where the live ones are.
    pub(crate) fn finish(&self) {
        for (which, log) in self.logs() {
            self.check_fencing_counters(which, self.replay(log));
        }
    }

    /// Frees every permit of `replica` and acquires one of each open semaphore: the token
    /// must be the next one the live coordinator would issue.
    pub(crate) fn check_fencing_counters(&self, which: &str, mut replica: Coordinator) {
        let now = at(self.now);
        let mut out = Vec::new();
        for s in SESSIONS {
            replica.handle(
                now,
                Tag(0),
                Request::CloseSession {
                    session: SessionId(s),
                },
                &mut out,
            );
        }
        let probe = SessionId(1_000);
        replica.handle(
            now,
            Tag(0),
            Request::OpenSession {
                session: probe,
                ttl: Duration::from_secs(1),
                client: "test",
            },
            &mut out,
        );
        for (name, sem) in self.model.sems.iter().filter(|(_, s)| !s.closed) {
            out.clear();
            let tag = Tag(1);
            replica.handle(
                now,
                tag,
                Request::Acquire {
                    session: probe,
                    lease: LeaseId(1_000),
                    name,
                    weight: 1,
                    timeout: None,
                },
                &mut out,
            );
            let reply = out.iter().find_map(|e| match e {
                Effect::Reply { tag: t, outcome } if *t == tag => Some(outcome.clone()),
                _ => None,
            });
            // A snapshot writes the token floor first, so a semaphore created before a delete
            // raised the floor comes back counting from the floor: later, never earlier.
            let highest = if self.snapshotted && which != "replayed log" {
                sem.next_token.max(self.model.floor)
            } else {
                sem.next_token
            };
            match reply {
                Some(Ok(Reply::Granted { token }))
                    if (sem.next_token..=highest).contains(&token.0) => {}
                other => panic!(
                    "{which}: fencing counter of {name:?}: {other:?}, not {}..={highest}",
                    sem.next_token
                ),
            }
            replica.handle(
                now,
                tag,
                Request::Release {
                    session: probe,
                    lease: LeaseId(1_000),
                },
                &mut out,
            );
        }
    }
}

/// (session, lease, token, weight) of every holder, in grant order.
pub(crate) fn holder_list(v: &SemaphoreView) -> Vec<(SessionId, LeaseId, Token, u32)> {
    v.holders
        .iter()
        .map(|h| (h.session, h.lease, h.token, h.weight))
        .collect()
}
