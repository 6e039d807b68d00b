//! Scenario tests of run-once jobs and job groups.

use super::*;

const STARTED: u64 = 1_700_000_000_000;

impl Check {
    fn begin(&mut self, s: u64, l: u64, job: &str, group: Option<&str>) -> (Tag, Vec<Effect>) {
        self.begin_t(s, l, job, group, None)
    }

    fn begin_t(
        &mut self,
        s: u64,
        l: u64,
        job: &str,
        group: Option<&str>,
        timeout: Option<Duration>,
    ) -> (Tag, Vec<Effect>) {
        self.step(Request::BeginJob {
            session: SessionId(s),
            lease: LeaseId(l),
            job,
            group,
            timeout,
        })
    }

    fn succeed(&mut self, s: u64, l: u64) -> Vec<Effect> {
        self.step(Request::FinishJob {
            session: SessionId(s),
            lease: LeaseId(l),
            outcome: JobOutcome::Succeeded {
                started_unix_ms: STARTED,
                duration: Duration::from_secs(3),
            },
        })
        .1
    }

    fn fail(&mut self, s: u64, l: u64, reason: &str) -> Vec<Effect> {
        self.step(Request::FinishJob {
            session: SessionId(s),
            lease: LeaseId(l),
            outcome: JobOutcome::Failed { reason },
        })
        .1
    }

    fn wait_group(&mut self, s: u64, w: u64, group: &str, jobs: u32, t: Option<Duration>) -> Tag {
        self.step(Request::WaitGroup {
            session: SessionId(s),
            wait: LeaseId(w),
            group,
            jobs,
            timeout: t,
        })
        .0
    }

    fn job(&self, name: &str) -> JobView {
        self.c.job(name, self.now).expect("job exists")
    }

    /// Replays every record so far into a fresh coordinator and checks that it shows the same
    /// jobs and groups.
    fn check_replay(&self) {
        let mut r = Coordinator::new();
        for rec in &self.log {
            r.apply(self.now, rec);
        }
        r.validate().expect("replayed state is valid");
        let strip = |mut v: Vec<JobView>| {
            for j in &mut v {
                if let Some(run) = &mut j.running {
                    run.age = Duration::ZERO;
                }
                j.waiting = 0; // queued attempts are not durable, by design
            }
            v
        };
        assert_eq!(strip(r.jobs(self.now)), strip(self.c.jobs(self.now)));
        assert_eq!(r.groups(), self.c.groups());
        // And so does a snapshot of the replayed state.
        let mut again = Coordinator::new();
        for rec in r.snapshot() {
            again.apply(self.now, &rec);
        }
        again
            .validate()
            .expect("state rebuilt from a snapshot is valid");
        assert_eq!(strip(again.jobs(self.now)), strip(r.jobs(self.now)));
    }
}

fn completed_by(out: &[Effect], tag: Tag) -> Completion {
    match reply_to(out, tag) {
        Some(Ok(Reply::JobCompleted(c))) => c,
        other => panic!("expected JobCompleted, got {other:?}"),
    }
}

#[test]
fn a_completed_job_never_runs_again_until_reset() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    let (tag, out) = t.begin(1, 10, "build", Some("nightly"));
    assert_eq!(reply_to(&out, tag), granted(1));
    // Someone else who will not wait learns who runs it.
    let (tag, out) = t.begin_t(2, 20, "build", None, Some(Duration::ZERO));
    match reply_to(&out, tag) {
        Some(Ok(Reply::JobBusy { client, token, .. })) => {
            assert_eq!(&*client, "test");
            assert_eq!(token, Token(1));
        }
        other => panic!("expected JobBusy, got {other:?}"),
    }
    assert_eq!(reply_of(&t.succeed(1, 10)), Some(Ok(Reply::Done)));
    let (tag, out) = t.begin(2, 21, "build", None);
    let done = completed_by(&out, tag);
    assert_eq!(done.token, Token(1));
    assert_eq!(done.started_unix_ms, STARTED);
    assert_eq!(done.duration, Duration::from_secs(3));
    assert!(
        !out.iter()
            .any(|e| matches!(e, Effect::Persist(Record::Granted { .. }))),
        "an attempt at a completed job takes no lease: {out:?}"
    );
    assert_eq!(t.job("build").group.as_deref(), Some("nightly"));
    t.check_replay();

    let (_, out) = t.step(Request::ResetJob { job: "build" });
    assert_eq!(
        reply_of(&out),
        Some(Ok(Reply::JobReset {
            was_completed: true
        }))
    );
    let (tag, out) = t.begin(2, 22, "build", None);
    assert_eq!(reply_to(&out, tag), granted(2), "tokens go on rising");
    t.check_replay();
}

#[test]
fn queued_attempts_learn_of_the_completion_instead_of_running() {
    let mut t = Check::new();
    for s in 1..=3 {
        t.open(s);
    }
    t.begin(1, 10, "etl", None);
    let (w2, out) = t.begin(2, 20, "etl", None);
    assert_eq!(reply_to(&out, w2), None, "queued");
    let (w3, _) = t.begin(3, 30, "etl", None);
    assert_eq!(t.job("etl").waiting, 2);
    let out = t.succeed(1, 10);
    assert_eq!(completed_by(&out, w2).token, Token(1));
    assert_eq!(completed_by(&out, w3).token, Token(1));
    assert_eq!(t.job("etl").waiting, 0);
    assert_eq!(t.c.lease_count(), 0);
    t.check_replay();
}

#[test]
fn a_failed_attempt_hands_the_job_to_the_next_in_line() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    t.begin(1, 10, "etl", Some("g"));
    let (w, _) = t.begin(2, 20, "etl", None);
    let out = t.fail(1, 10, "exited with status 3");
    assert_eq!(reply_to(&out, w), granted(2));
    let job = t.job("etl");
    assert_eq!(job.failures, 1);
    assert_eq!(job.last_failure.as_deref(), Some("exited with status 3"));
    assert_eq!(job.running.map(|r| r.session), Some(SessionId(2)));
    assert_eq!(t.c.group("g").failures, 1);
    t.check_replay();
    t.succeed(2, 20);
    let job = t.job("etl");
    assert!(job.completion.is_some());
    assert_eq!(
        job.last_failure, None,
        "a completion clears the last failure"
    );
    t.check_replay();
}

#[test]
fn a_dead_runner_is_taken_over_after_its_session_expires() {
    let mut t = Check::new();
    t.open(1);
    t.begin(1, 10, "etl", None);
    t.advance(Duration::from_secs(5));
    t.open(2);
    let (w, _) = t.begin(2, 20, "etl", None);
    // Session 1 falls silent; at its deadline (10 s) it expires and session 2 takes over.
    let out = t.advance(Duration::from_millis(4_999));
    assert_eq!(
        reply_to(&out, w),
        None,
        "session 1 lives until its deadline"
    );
    let out = t.advance(Duration::from_millis(1));
    assert_eq!(reply_to(&out, w), granted(2));
    let job = t.job("etl");
    assert_eq!(job.running.map(|r| r.session), Some(SessionId(2)));
    assert_eq!(job.failures, 1);
    assert!(job
        .last_failure
        .as_deref()
        .is_some_and(|r| r.contains("expired")));
    // The dead runner's late report is fenced off.
    t.open(1);
    assert_eq!(
        reply_of(&t.succeed(1, 10)),
        Some(Err(Error::UnknownLease(LeaseId(10))))
    );
    assert_eq!(t.job("etl").completion, None);
    t.check_replay();
}

#[test]
fn only_the_holder_finishes_a_job_and_locks_are_not_semaphores() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    t.begin(1, 10, "etl", None);
    let (w, _) = t.begin(2, 20, "etl", None);
    // A queued attempt cannot finish the job.
    assert_eq!(
        reply_of(&t.fail(2, 20, "nope")),
        Some(Err(Error::UnknownLease(LeaseId(20))))
    );
    // A plain lease cannot either.
    assert_eq!(t.ensure("db", 1), Ok(Reply::Done));
    t.acquire(1, 11, "db", 1);
    assert_eq!(
        reply_of(&t.succeed(1, 11)),
        Some(Err(Error::UnknownLease(LeaseId(11))))
    );
    // The lock is out of reach of the semaphore requests and views.
    let lock = "\u{1}job:etl";
    let (_, out) = t.acquire(2, 21, lock, 1);
    assert!(matches!(
        reply_of(&out),
        Some(Err(Error::NoSuchSemaphore(_)))
    ));
    t.step(Request::Close { name: lock });
    assert!(
        t.job("etl").running.is_some(),
        "a close of a lock is a no-op"
    );
    assert_eq!(t.c.semaphores(t.now).len(), 1);
    assert!(t.c.semaphore(lock, t.now).is_none());
    // A release of the job's lease counts as a failed attempt and hands it on.
    let out = t.release(1, 10);
    assert_eq!(reply_to(&out, w), granted(2));
    assert_eq!(t.job("etl").failures, 1);
    t.check_replay();
}

#[test]
fn job_and_group_names_are_checked() {
    let mut t = Check::new();
    t.open(1);
    let (_, out) = t.begin(1, 10, "", None);
    assert!(
        matches!(reply_of(&out), Some(Err(Error::InvalidArgument(m))) if m.contains("job name"))
    );
    let (_, out) = t.begin(1, 10, "x", Some("a\nb"));
    assert!(
        matches!(reply_of(&out), Some(Err(Error::InvalidArgument(m))) if m.contains("group name"))
    );
    let long = "j".repeat(MAX_NAME_LEN + 1);
    let (_, out) = t.begin(1, 10, &long, None);
    assert!(matches!(
        reply_of(&out),
        Some(Err(Error::InvalidArgument(_)))
    ));
    let (_, out) = t.step(Request::ResetJob { job: "unknown" });
    assert_eq!(
        reply_of(&out),
        Some(Ok(Reply::JobReset {
            was_completed: false
        }))
    );
}

#[test]
fn group_waits_end_when_nothing_runs_and_enough_completed() {
    let mut t = Check::new();
    t.open(1);
    t.open(9);
    // An unknown group with no job count is settled at once.
    let tag = t.wait_group(9, 1, "g", 0, None);
    let _ = tag;
    t.begin(1, 10, "a", Some("g"));
    t.begin(1, 11, "b", Some("g"));
    let idle = t.wait_group(9, 2, "g", 0, None);
    let two = t.wait_group(9, 3, "g", 2, None);
    let timed = t.wait_group(9, 4, "g", 3, Some(Duration::from_secs(1)));
    let out = t.succeed(1, 10);
    assert_eq!(reply_to(&out, idle), None, "b still runs");
    let out = t.fail(1, 11, "boom");
    match reply_to(&out, idle) {
        Some(Ok(Reply::GroupSettled(s))) => {
            assert_eq!(
                s,
                GroupSummary {
                    jobs: 2,
                    completed: 1,
                    running: 0,
                    failures: 1
                }
            );
        }
        other => panic!("expected GroupSettled, got {other:?}"),
    }
    assert_eq!(reply_to(&out, two), None, "only one completed");
    t.begin(1, 12, "b", None);
    let out = t.succeed(1, 12);
    assert!(matches!(
        reply_to(&out, two),
        Some(Ok(Reply::GroupSettled(GroupSummary { completed: 2, .. })))
    ));
    let out = t.advance(Duration::from_secs(1));
    assert_eq!(reply_to(&out, timed), Some(Err(Error::TimedOut)));
    // A wait ends with its session.
    let last = t.wait_group(9, 5, "g", 5, None);
    let (_, out) = t.step(Request::CloseSession {
        session: SessionId(9),
    });
    assert_eq!(reply_to(&out, last), Some(Err(Error::SessionEnded)));
    t.check_replay();
}

#[test]
fn a_retried_group_wait_supersedes_the_first() {
    let mut t = Check::new();
    t.open(1);
    t.begin(1, 10, "a", Some("g"));
    let first = t.wait_group(1, 2, "g", 0, None);
    let (second, out) = t.step(Request::WaitGroup {
        session: SessionId(1),
        wait: LeaseId(2),
        group: "g",
        jobs: 0,
        timeout: None,
    });
    assert_eq!(reply_to(&out, first), Some(Err(Error::Superseded)));
    let out = t.succeed(1, 10);
    assert!(matches!(
        reply_to(&out, second),
        Some(Ok(Reply::GroupSettled(_)))
    ));
    // Zero timeout only looks.
    t.begin(1, 11, "b", Some("g"));
    let (tag, out) = t.step(Request::WaitGroup {
        session: SessionId(1),
        wait: LeaseId(3),
        group: "g",
        jobs: 0,
        timeout: Some(Duration::ZERO),
    });
    assert_eq!(reply_to(&out, tag), Some(Err(Error::TimedOut)));
}

#[test]
fn moving_a_running_job_to_another_group_settles_the_old_one() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    t.begin(1, 10, "a", Some("old"));
    let w = t.wait_group(2, 1, "old", 0, None);
    let (_, out) = t.begin(2, 20, "a", Some("new"));
    assert!(matches!(
        reply_to(&out, w),
        Some(Ok(Reply::GroupSettled(GroupSummary { jobs: 0, .. })))
    ));
    assert_eq!(t.c.group("new").running, 1);
    t.check_replay();
}
