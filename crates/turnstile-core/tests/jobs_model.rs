//! Model-based property tests of run-once jobs and job groups.
//!
//! Random sequences of job requests from a few sessions run against the [`Coordinator`] and,
//! side by side, against [`Model`]: per job a plain holder slot, a `VecDeque` of waiting
//! attempts, a completion and a failure count, written from the rules in
//! `coordinator/jobs.rs` without the semaphore machinery the core reuses. Sessions are ended
//! explicitly (a supervisor, or an expiry: the core treats both alike for jobs), so time does
//! not move.
//!
//! After every step the harness checks:
//! 1. `validate()` is `Ok`;
//! 2. every reply (to the request and to each waiter it affected) equals the model's, and
//!    every tag is answered at most once;
//! 3. the job views (group, completion token, running session and token, waiting attempts,
//!    failed attempts) and the group summaries equal the model's;
//! 4. exactly once: no attempt is ever granted a job whose completion stands (since its last
//!    reset);
//! 5. replaying every persisted record into a fresh coordinator gives the same jobs and
//!    groups (checked at the end of each case, and after a snapshot of the replayed state).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use turnstile_core::{
    Completion, Coordinator, Effect, Error, GroupSummary, JobOutcome, LeaseId, Record, Reply,
    Request, SessionId, Tag, Time, Token,
};

const JOBS: [&str; 3] = ["j1", "j2", "j3"];
const GROUPS: [&str; 2] = ["g1", "g2"];
const SESSIONS: [u64; 3] = [1, 2, 3];
const STARTED: u64 = 1_700_000_000_000;
const RAN: Duration = Duration::from_millis(1500);

#[derive(Clone, Debug)]
enum Op {
    Open(u64),
    Begin {
        s: u64,
        job: usize,
        group: Option<usize>,
        wait: bool,
    },
    Succeed(u64, usize),
    Fail(u64, usize),
    Release(u64, usize),
    End(u64),
    Reset(usize),
    WaitGroup(u64, usize, u32),
}

fn op() -> impl Strategy<Value = Op> {
    let s = proptest::sample::select(SESSIONS.to_vec());
    let job = 0..JOBS.len();
    prop_oneof![
        2 => s.clone().prop_map(Op::Open),
        6 => (s.clone(), job.clone(), proptest::option::of(0..GROUPS.len()), any::<bool>())
            .prop_map(|(s, job, group, wait)| Op::Begin { s, job, group, wait }),
        3 => (s.clone(), job.clone()).prop_map(|(s, j)| Op::Succeed(s, j)),
        2 => (s.clone(), job.clone()).prop_map(|(s, j)| Op::Fail(s, j)),
        1 => (s.clone(), job.clone()).prop_map(|(s, j)| Op::Release(s, j)),
        1 => s.clone().prop_map(Op::End),
        1 => job.prop_map(Op::Reset),
        2 => (s, 0..GROUPS.len(), 0u32..3).prop_map(|(s, g, n)| Op::WaitGroup(s, g, n)),
    ]
}

type Key = (u64, u64);

#[derive(Default, Debug)]
struct MJob {
    group: Option<usize>,
    completed: Option<u64>,
    holder: Option<(Key, u64)>,
    queue: VecDeque<(Key, Tag)>,
    failures: u32,
    next_token: u64,
}

#[derive(Default, Debug)]
struct Model {
    sessions: BTreeSet<u64>,
    jobs: BTreeMap<usize, MJob>,
    /// Group waits: (session, wait id) -> (tag, group, jobs).
    waits: BTreeMap<Key, (Tag, usize, u32)>,
    /// Every lease a session used, with its job: for finishing or releasing "some" lease.
    leases: HashMap<u64, Vec<(u64, usize)>>,
    replies: BTreeMap<Tag, Result<Reply, Error>>,
}

fn completion(token: u64) -> Completion {
    Completion {
        client: "m".into(),
        token: Token(token),
        started_unix_ms: STARTED,
        duration: RAN,
    }
}

impl Model {
    fn reply(&mut self, tag: Tag, r: Result<Reply, Error>) {
        assert!(
            self.replies.insert(tag, r).is_none(),
            "model answered {tag:?} twice"
        );
    }

    /// Hands a free job to the head of its queue.
    fn pump(&mut self, job: usize) {
        let j = self.jobs.get_mut(&job).expect("pumped job exists");
        if j.holder.is_none() {
            if let Some((key, tag)) = j.queue.pop_front() {
                j.next_token += 1;
                j.holder = Some((key, j.next_token));
                let token = j.next_token;
                self.reply(
                    tag,
                    Ok(Reply::Granted {
                        token: Token(token),
                    }),
                );
            }
        }
    }

    fn summary(&self, group: usize) -> GroupSummary {
        let mut g = GroupSummary::default();
        for j in self.jobs.values().filter(|j| j.group == Some(group)) {
            g.jobs += 1;
            g.completed += u32::from(j.completed.is_some());
            g.running += u32::from(j.holder.is_some());
            g.failures += u64::from(j.failures);
        }
        g
    }

    fn settle_waits(&mut self) {
        let done: Vec<(Key, Tag, GroupSummary)> = self
            .waits
            .iter()
            .filter_map(|(k, (tag, g, n))| {
                let s = self.summary(*g);
                (s.running == 0 && s.completed >= *n).then_some((*k, *tag, s))
            })
            .collect();
        for (k, tag, s) in done {
            self.waits.remove(&k);
            self.reply(tag, Ok(Reply::GroupSettled(s)));
        }
    }

    /// Ends whatever the holder `key` of `job` held, as a failed attempt.
    fn fail_holder(&mut self, job: usize) {
        let j = self.jobs.get_mut(&job).expect("job exists");
        j.holder = None;
        if j.completed.is_none() {
            j.failures += 1;
        }
    }
}

struct Harness {
    c: Coordinator,
    m: Model,
    log: Vec<Record>,
    next_tag: u64,
    next_lease: u64,
    /// Tags the core has answered, to check "at most once".
    answered: BTreeSet<Tag>,
}

impl Harness {
    fn step(&mut self, req: Request<'_>) -> Tag {
        let tag = Tag(self.next_tag);
        self.next_tag += 1;
        let mut out = Vec::new();
        self.c.handle(Time::ZERO, tag, req, &mut out);
        self.c.validate().expect("invariants hold");
        for e in out {
            match e {
                Effect::Persist(r) => self.log.push(r),
                Effect::Reply { tag, outcome } => {
                    assert!(self.answered.insert(tag), "core answered {tag:?} twice");
                    if let Ok(Reply::Granted { .. }) = &outcome {
                        // Exactly once: the model says whether the job may run.
                        let granted = self
                            .m
                            .replies
                            .get(&tag)
                            .is_some_and(|r| matches!(r, Ok(Reply::Granted { .. })));
                        assert!(granted, "core granted {tag:?}, the model does not");
                    }
                    let want = self.m.replies.get(&tag).cloned();
                    assert_eq!(Some(outcome), want, "reply to {tag:?}");
                }
                Effect::Event(_) => {}
            }
        }
        tag
    }

    fn apply(&mut self, op: &Op) {
        let tag = Tag(self.next_tag);
        match *op {
            Op::Open(s) => {
                self.m.sessions.insert(s);
                let mut out = Vec::new();
                self.c.handle(
                    Time::ZERO,
                    tag,
                    Request::OpenSession {
                        session: SessionId(s),
                        ttl: Duration::from_secs(3600),
                        client: "m",
                    },
                    &mut out,
                );
                self.next_tag += 1;
                self.log.extend(out.into_iter().filter_map(|e| match e {
                    Effect::Persist(r) => Some(r),
                    _ => None,
                }));
            }
            Op::Begin {
                s,
                job,
                group,
                wait,
            } => {
                let lease = self.next_lease;
                self.next_lease += 1;
                if !self.m.sessions.contains(&s) {
                    self.m.reply(tag, Err(Error::SessionNotFound(SessionId(s))));
                } else {
                    self.m.leases.entry(s).or_default().push((lease, job));
                    let j = self.m.jobs.entry(job).or_default();
                    if let Some(g) = group {
                        j.group = Some(g);
                    }
                    if let Some(t) = j.completed {
                        self.m.reply(tag, Ok(Reply::JobCompleted(completion(t))));
                    } else if j.holder.is_none() {
                        j.next_token += 1;
                        j.holder = Some(((s, lease), j.next_token));
                        let t = j.next_token;
                        self.m.reply(tag, Ok(Reply::Granted { token: Token(t) }));
                    } else if let (false, Some((_, t))) = (wait, j.holder) {
                        self.m.reply(
                            tag,
                            Ok(Reply::JobBusy {
                                client: "m".into(),
                                token: Token(t),
                                age: Duration::ZERO,
                            }),
                        );
                    } else {
                        j.queue.push_back(((s, lease), tag));
                    }
                    // Moving a job between groups can settle a wait on the old group.
                    self.m.settle_waits();
                }
                self.step(Request::BeginJob {
                    session: SessionId(s),
                    lease: LeaseId(lease),
                    job: JOBS[job],
                    group: group.map(|g| GROUPS[g]),
                    timeout: if wait { None } else { Some(Duration::ZERO) },
                });
            }
            Op::Succeed(s, job) | Op::Fail(s, job) => {
                let success = matches!(op, Op::Succeed(..));
                let lease = self.pick_lease(s, job);
                let held = self
                    .m
                    .jobs
                    .get(&job)
                    .and_then(|j| j.holder)
                    .is_some_and(|(k, _)| k == (s, lease));
                if !self.m.sessions.contains(&s) {
                    self.m.reply(tag, Err(Error::SessionNotFound(SessionId(s))));
                } else if !held {
                    self.m.reply(tag, Err(Error::UnknownLease(LeaseId(lease))));
                } else {
                    let j = self.m.jobs.get_mut(&job).expect("held job exists");
                    let (_, token) = j.holder.expect("held");
                    if success {
                        j.completed = Some(token);
                        j.holder = None;
                        let waiters: Vec<Tag> = j.queue.drain(..).map(|(_, t)| t).collect();
                        for w in waiters {
                            self.m.reply(w, Ok(Reply::JobCompleted(completion(token))));
                        }
                    } else {
                        self.m.fail_holder(job);
                        self.m.pump(job);
                    }
                    self.m.reply(tag, Ok(Reply::Done));
                    self.m.settle_waits();
                }
                let outcome = if success {
                    JobOutcome::Succeeded {
                        started_unix_ms: STARTED,
                        duration: RAN,
                    }
                } else {
                    JobOutcome::Failed { reason: "failed" }
                };
                self.step(Request::FinishJob {
                    session: SessionId(s),
                    lease: LeaseId(lease),
                    outcome,
                });
            }
            Op::Release(s, job) => {
                let lease = self.pick_lease(s, job);
                if !self.m.sessions.contains(&s) {
                    self.m.reply(tag, Err(Error::SessionNotFound(SessionId(s))));
                } else if let Some(j) = self.m.jobs.get_mut(&job) {
                    let held = j.holder.is_some_and(|(k, _)| k == (s, lease));
                    let queued = j.queue.iter().position(|(k, _)| *k == (s, lease));
                    if held {
                        self.m.fail_holder(job);
                        self.m.pump(job);
                        self.m.reply(tag, Ok(Reply::Done));
                    } else if let Some(i) = queued {
                        let (_, t) = j.queue.remove(i).expect("position is valid");
                        self.m.reply(t, Err(Error::Cancelled));
                        self.m.reply(tag, Ok(Reply::Done));
                    } else {
                        self.m.reply(tag, Err(Error::UnknownLease(LeaseId(lease))));
                    }
                    self.m.settle_waits();
                } else {
                    self.m.reply(tag, Err(Error::UnknownLease(LeaseId(lease))));
                }
                self.step(Request::Release {
                    session: SessionId(s),
                    lease: LeaseId(lease),
                });
            }
            Op::End(s) => {
                if self.m.sessions.remove(&s) {
                    let jobs: Vec<usize> = self.m.jobs.keys().copied().collect();
                    let mut touched = Vec::new();
                    for &job in &jobs {
                        let j = self.m.jobs.get_mut(&job).expect("listed");
                        let mut ended = Vec::new();
                        j.queue.retain(|(k, t)| {
                            let mine = k.0 == s;
                            if mine {
                                ended.push(*t);
                            }
                            !mine
                        });
                        let held = j.holder.is_some_and(|(k, _)| k.0 == s);
                        for t in ended {
                            self.m.reply(t, Err(Error::SessionEnded));
                        }
                        if held {
                            self.m.fail_holder(job);
                            touched.push(job);
                        }
                    }
                    for job in touched {
                        self.m.pump(job);
                    }
                    let waits: Vec<Key> =
                        self.m.waits.keys().filter(|k| k.0 == s).copied().collect();
                    for k in waits {
                        let (t, ..) = self.m.waits.remove(&k).expect("listed");
                        self.m.reply(t, Err(Error::SessionEnded));
                    }
                    self.m.settle_waits();
                }
                self.m.reply(tag, Ok(Reply::Done));
                self.step(Request::EndSession {
                    session: SessionId(s),
                });
            }
            Op::Reset(job) => {
                let was = match self.m.jobs.get_mut(&job) {
                    Some(j) => {
                        j.failures = 0;
                        j.completed.take().is_some()
                    }
                    None => false,
                };
                self.m
                    .reply(tag, Ok(Reply::JobReset { was_completed: was }));
                self.step(Request::ResetJob { job: JOBS[job] });
            }
            Op::WaitGroup(s, g, n) => {
                let wait = self.next_lease;
                self.next_lease += 1;
                if !self.m.sessions.contains(&s) {
                    self.m.reply(tag, Err(Error::SessionNotFound(SessionId(s))));
                } else {
                    let sum = self.m.summary(g);
                    if sum.running == 0 && sum.completed >= n {
                        self.m.reply(tag, Ok(Reply::GroupSettled(sum)));
                    } else {
                        self.m.waits.insert((s, wait), (tag, g, n));
                    }
                }
                self.step(Request::WaitGroup {
                    session: SessionId(s),
                    wait: LeaseId(wait),
                    group: GROUPS[g],
                    jobs: n,
                    timeout: None,
                });
            }
        }
        self.compare();
    }

    /// The lease session `s` holds on `job` if any, else its newest lease on `job` (queued
    /// or gone), else an unused id.
    fn pick_lease(&mut self, s: u64, job: usize) -> u64 {
        if let Some(((hs, lease), _)) = self.m.jobs.get(&job).and_then(|j| j.holder) {
            if hs == s {
                return lease;
            }
        }
        let mut mine = self.m.leases.get(&s).into_iter().flatten();
        match mine.rfind(|(_, j)| *j == job) {
            Some((lease, _)) => *lease,
            None => {
                self.next_lease += 1;
                self.next_lease - 1
            }
        }
    }

    fn compare(&self) {
        let views = self.c.jobs(Time::ZERO);
        assert_eq!(views.len(), self.m.jobs.len(), "known jobs");
        for v in &views {
            let idx = JOBS
                .iter()
                .position(|n| **n == *v.name)
                .expect("a model job");
            let j = &self.m.jobs[&idx];
            assert_eq!(
                v.group.as_deref(),
                j.group.map(|g| GROUPS[g]),
                "group of {idx}"
            );
            assert_eq!(
                v.completion.as_ref().map(|c| c.token.0),
                j.completed,
                "completion of {idx}"
            );
            assert_eq!(
                v.running.as_ref().map(|r| (r.session.0, r.token.0)),
                j.holder.map(|((s, _), t)| (s, t)),
                "runner of {idx}"
            );
            assert_eq!(v.waiting, j.queue.len(), "waiting on {idx}");
            assert_eq!(v.failures, j.failures, "failures of {idx}");
        }
        for (g, name) in GROUPS.iter().enumerate() {
            assert_eq!(self.c.group(name), self.m.summary(g), "group {g}");
        }
    }

    fn check_replay(&self) {
        let mut r = Coordinator::new();
        for rec in &self.log {
            r.apply(Time::ZERO, rec);
        }
        r.validate().expect("replayed state is valid");
        let strip = |c: &Coordinator| {
            c.jobs(Time::ZERO)
                .into_iter()
                .map(|mut v| {
                    v.waiting = 0; // queued attempts are not durable, by design
                    v.last_failure = None;
                    v
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&r), strip(&self.c), "jobs after replay");
        assert_eq!(r.groups(), self.c.groups(), "groups after replay");
        let mut again = Coordinator::new();
        for rec in r.snapshot() {
            again.apply(Time::ZERO, &rec);
        }
        assert_eq!(strip(&again), strip(&r), "jobs after a snapshot");
    }
}

fn run_case(ops: &[Op]) {
    let mut h = Harness {
        c: Coordinator::new(),
        m: Model::default(),
        log: Vec::new(),
        next_tag: 1,
        next_lease: 1,
        answered: BTreeSet::new(),
    };
    for s in SESSIONS {
        h.apply(&Op::Open(s));
    }
    for op in ops {
        h.apply(op);
    }
    h.check_replay();
    // Ending every session answers every attempt and wait still pending.
    for s in SESSIONS {
        h.apply(&Op::End(s));
    }
    let unanswered: Vec<&Tag> =
        h.m.replies
            .keys()
            .filter(|t| !h.answered.contains(t))
            .collect();
    assert!(unanswered.is_empty(), "never answered: {unanswered:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Sessions begin, finish, fail, release and die while others wait on the same few jobs
    /// and groups; every step is checked against the model.
    #[test]
    fn jobs_match_model(ops in proptest::collection::vec(op(), 1..80)) {
        run_case(&ops);
    }
}
