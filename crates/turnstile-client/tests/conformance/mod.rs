//! The semantics suite: every rule a user can observe through [`Client`], written once and
//! run against every backend. A backend's test file implements [`Fixture`] (how to get a
//! client connected to a fresh backend) and instantiates the suite with
//! [`conformance_suite!`](crate::conformance_suite).
//!
//! Synchronisation is by events (replies, status conditions polled with a deadline), never by
//! sleeping and hoping.
#![allow(dead_code)] // each test binary uses the part of the helpers it needs

use std::time::Duration;

use tokio::time::{timeout, Instant};
use turnstile_client::{
    Client, Error, ErrorCode, JobAttempt, JobStart, JobStatus, LostReason, Options, SemaphoreStatus,
};

/// A backend under test: hands out clients connected to the same fresh backend.
pub trait Fixture: Sync {
    /// A new client (its own session) of this backend.
    fn client(&self) -> impl std::future::Future<Output = Client> + Send;

    /// The backend's URL, for clients with options of their own.
    fn url(&self) -> String;

    /// Whether the status document carries the event counters (`released_total`,
    /// `timed_out_total`, `lost_total`...). A coordinator counts events as it handles them;
    /// a backend without a server (the shared directory) has nobody to count them, and
    /// reports them as 0.
    fn counts_totals(&self) -> bool {
        true
    }
}

/// Instantiates every test of the suite for one backend, as `#[tokio::test]`s in a module.
/// `$fixture` is an expression (it may `.await`) that builds a fresh [`Fixture`].
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $fixture:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_suite!(@tests $fixture;
                acquire_release_basics,
                fifo_with_weights,
                dropping_a_permit_releases_it,
                dropped_acquire_does_not_leak,
                close_reports_lost_lease_and_fails_waiters,
                shutdown_releases_every_lease,
                job_runs_once_until_reset,
                job_waiters_take_over_or_learn_of_the_completion,
                job_of_a_dead_session_is_taken_over,
                group_wait_settles,
                many_runners_run_each_job_once,
                clients_sharing_a_session_stay_apart,
                capacity_changes_grant_at_once_and_hold_back_after_a_shrink,
                delete_frees_the_name_and_tokens_still_increase,
                revoke_tells_the_holder_and_grants_the_next,
            );
        }
    };
    (@tests $fixture:expr; $($test:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let fixture = $fixture;
                $crate::conformance::$test(&fixture).await;
            }
        )*
    };
}

/// How long any single awaited event may take before the test fails: generous, for a loaded
/// two-core machine.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A short wait that proves something does *not* happen (an acquire stays pending).
pub const QUIET: Duration = Duration::from_millis(300);

/// The status of one semaphore.
pub async fn status_of(client: &Client, name: &str) -> SemaphoreStatus {
    let doc = client.status(Some(name)).await.expect("status");
    doc.semaphores
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("semaphore {name:?} missing from the status"))
}

/// Polls the status of `name` until `pred` holds; fails after [`PATIENCE`].
pub async fn wait_for_status(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&SemaphoreStatus) -> bool,
) -> SemaphoreStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = status_of(client, name).await;
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A session id as the status document prints it.
pub fn hex(session: u64) -> String {
    format!("{session:016x}")
}

/// Every decimal number in a message.
pub fn numbers_in(message: &str) -> Vec<u64> {
    message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Acquire and release, increasing tokens, try-acquire, acquire timeout, capacity mismatch.
pub async fn acquire_release_basics(server: &impl Fixture) {
    let client = server.client().await;
    let sem = client.semaphore("basics", 2).await.expect("ensure");
    assert_eq!(sem.name(), "basics");

    let p1 = sem.acquire().await.expect("first permit");
    let p2 = sem.acquire().await.expect("second permit");
    assert!(p1.fencing_token() >= 1);
    assert!(p2.fencing_token() > p1.fencing_token());
    assert_ne!(p1.lease_id(), p2.lease_id());
    assert_eq!((p1.weight(), p1.semaphore()), (1, "basics"));
    assert_eq!(p1.session_id(), client.session_id());

    // Full: try_acquire declines at once, acquire_timeout waits out its timeout.
    assert!(sem.try_acquire().await.expect("try_acquire").is_none());
    let started = Instant::now();
    let err = sem
        .acquire_timeout(Duration::from_millis(200))
        .await
        .expect_err("full semaphore");
    assert!(matches!(err, Error::TimedOut), "{err:?}");
    assert_eq!(err.code(), Some(ErrorCode::TimedOut));
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "timed out after only {:?}",
        started.elapsed()
    );

    let st = status_of(&client, "basics").await;
    assert_eq!((st.capacity, st.in_use, st.queued), (2, 2, 0));
    if server.counts_totals() {
        assert_eq!(st.timed_out_total, Some(1));
    }
    let mut leases: Vec<u64> = st.holders.iter().map(|h| h.lease_id).collect();
    leases.sort_unstable();
    let mut expected = vec![p1.lease_id(), p2.lease_id()];
    expected.sort_unstable();
    assert_eq!(leases, expected);
    assert!(st
        .holders
        .iter()
        .all(|h| h.session == hex(client.session_id())));

    // A release frees a permit; the next grant gets a larger token still.
    let t2 = p2.fencing_token();
    p1.release().await.expect("release");
    let p3 = sem
        .try_acquire()
        .await
        .expect("try_acquire")
        .expect("a permit is free after the release");
    assert!(p3.fencing_token() > t2);
    drop(p2);
    drop(p3);
    wait_for_status(&client, "basics", "both drops processed", |s| s.in_use == 0).await;

    // The same name with another capacity is refused, naming both capacities.
    let err = client
        .semaphore("basics", 5)
        .await
        .expect_err("capacity mismatch");
    assert_eq!(err.code(), Some(ErrorCode::CapacityMismatch), "{err:?}");
    let numbers = numbers_in(&err.to_string());
    assert!(
        numbers.contains(&2) && numbers.contains(&5),
        "the message should name both capacities: {err}"
    );

    // A weight above the capacity can never be granted and is refused.
    let err = sem
        .acquire_many(3)
        .await
        .expect_err("weight 3 > capacity 2");
    assert_eq!(
        err.code(),
        Some(ErrorCode::WeightExceedsCapacity),
        "{err:?}"
    );
}

/// The queue is FIFO with weights: a heavy head waiter holds back a lighter one that would fit.
pub async fn fifo_with_weights(server: &impl Fixture) {
    let (holder, heavy, light) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "fifo";
    let sem_h = holder.semaphore(name, 3).await.expect("ensure");
    let sem_3 = heavy.semaphore(name, 3).await.expect("ensure");
    let sem_1 = light.semaphore(name, 3).await.expect("ensure");

    let held = sem_h.acquire_many(2).await.expect("holder takes 2 of 3");
    let mut heavy_acq = tokio::spawn(async move { sem_3.acquire_many(3).await });
    wait_for_status(&holder, name, "the heavy waiter queued", |s| s.queued == 1).await;
    let mut light_acq = tokio::spawn(async move { sem_1.acquire().await });
    let st = wait_for_status(&holder, name, "the light waiter queued", |s| s.queued == 2).await;
    // One permit is free, but the light waiter is behind the heavy one.
    assert_eq!((st.in_use, st.queued_weight), (2, 4));
    assert!(
        timeout(QUIET, &mut light_acq).await.is_err(),
        "the light acquire overtook the heavy head of the queue"
    );

    held.release().await.expect("release the holder");
    let heavy_permit = timeout(PATIENCE, &mut heavy_acq)
        .await
        .expect("heavy granted after the holder released")
        .expect("task")
        .expect("heavy acquire");
    assert_eq!(heavy_permit.weight(), 3);
    // The heavy one holds everything: the light one still waits.
    assert!(
        timeout(QUIET, &mut light_acq).await.is_err(),
        "the light acquire was granted while the heavy one held all permits"
    );
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (3, 1));

    let heavy_token = heavy_permit.fencing_token();
    heavy_permit.release().await.expect("release heavy");
    let light_permit = timeout(PATIENCE, &mut light_acq)
        .await
        .expect("light granted after the heavy one released")
        .expect("task")
        .expect("light acquire");
    assert!(light_permit.fencing_token() > heavy_token);
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (1, 0));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(light.session_id()));
}

/// Dropping a permit releases it to a waiter; `Permit::release` returns once it is released.
pub async fn dropping_a_permit_releases_it(server: &impl Fixture) {
    let (a, b) = (server.client().await, server.client().await);
    let name = "drop";
    let sem_a = a.semaphore(name, 1).await.expect("ensure");
    let sem_b = b.semaphore(name, 1).await.expect("ensure");

    let permit = sem_a.acquire().await.expect("a acquires");
    let waiter = tokio::spawn(async move { sem_b.acquire().await });
    wait_for_status(&a, name, "b queued", |s| s.queued == 1).await;

    drop(permit);
    let permit_b = timeout(PATIENCE, waiter)
        .await
        .expect("the dropped permit went to the waiter")
        .expect("task")
        .expect("b acquires");
    let st = status_of(&a, name).await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(b.session_id()));
    if server.counts_totals() {
        assert_eq!(st.released_total, Some(1));
    }

    // `release` waits for the coordinator: the very next status shows the permit free.
    permit_b.release().await.expect("release");
    let st = status_of(&b, name).await;
    assert_eq!(st.in_use, 0, "{st:?}");
    if server.counts_totals() {
        assert_eq!(st.released_total, Some(2), "{st:?}");
    }
    assert!(st.holders.is_empty());
}

/// A dropped acquire future, queued or racing with its grant, never leaks a permit.
pub async fn dropped_acquire_does_not_leak(server: &impl Fixture) {
    let (a, b, c) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "cancel";
    let sem_a = a.semaphore(name, 1).await.expect("ensure");
    let sem_b = b.semaphore(name, 1).await.expect("ensure");
    let sem_c = c.semaphore(name, 1).await.expect("ensure");

    // 1. Dropped while queued on the coordinator.
    let held = sem_a.acquire().await.expect("a holds");
    {
        let acquire = sem_b.acquire();
        tokio::pin!(acquire);
        tokio::select! {
            r = &mut acquire => panic!("b was granted a held permit: {r:?}"),
            _ = wait_for_status(&a, name, "b queued", |s| s.queued == 1) => {}
        }
        // `acquire` is dropped here, while queued.
    }
    wait_for_status(&a, name, "the withdrawal processed", |s| s.queued == 0).await;
    held.release().await.expect("a releases");
    let permit_c = timeout(PATIENCE, sem_c.acquire())
        .await
        .expect("c is not blocked by a leaked permit")
        .expect("c acquires");
    let st = status_of(&c, name).await;
    assert_eq!((st.in_use, st.queued), (1, 0));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(c.session_id()));
    assert_eq!(st.holders[0].lease_id, permit_c.lease_id());
    permit_c.release().await.expect("c releases");

    // 2. Dropped at every moment around its grant: a releases in the background while b's
    //    acquire is cut short after a varying delay, so some grants land after the drop.
    for i in 0..30u64 {
        let held = timeout(PATIENCE, sem_a.acquire())
            .await
            .unwrap_or_else(|_| panic!("iteration {i}: a blocked by a leaked permit"))
            .expect("a acquires");
        let raced = timeout(Duration::from_micros(i * 150), async {
            drop(held);
            sem_b.acquire().await
        })
        .await;
        if let Ok(result) = raced {
            drop(result.expect("b acquires"));
        }
    }
    let st = wait_for_status(&a, name, "every lease released", |s| {
        s.in_use == 0 && s.queued == 0
    })
    .await;
    assert!(st.holders.is_empty());
    let permit_c = sem_c
        .try_acquire()
        .await
        .expect("try_acquire")
        .expect("nothing leaked: the permit is free");
    drop(permit_c);
}

/// Closing a semaphore tells its holders their lease is lost and fails its waiters.
pub async fn close_reports_lost_lease_and_fails_waiters(server: &impl Fixture) {
    let (holder, waiter, closer) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "closing";
    let sem_h = holder.semaphore(name, 1).await.expect("ensure");
    let sem_w = waiter.semaphore(name, 1).await.expect("ensure");

    let permit = sem_h.acquire().await.expect("acquire");
    assert_eq!(permit.lost_reason(), None);
    let queued = tokio::spawn(async move { sem_w.acquire().await });
    wait_for_status(&closer, name, "the waiter queued", |s| s.queued == 1).await;

    closer.close(name).await.expect("close");
    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the holder hears that its lease is gone");
    assert_eq!(reason, LostReason::Closed);
    assert_eq!(permit.lost_reason(), Some(LostReason::Closed));
    let err = timeout(PATIENCE, queued)
        .await
        .expect("the waiter is answered")
        .expect("task")
        .expect_err("the waiter fails");
    assert_eq!(err.code(), Some(ErrorCode::Closed), "{err:?}");

    let st = status_of(&closer, name).await;
    assert!(st.closed);
    assert_eq!((st.in_use, st.queued), (0, 0));
    if server.counts_totals() {
        assert_eq!(st.lost_total, Some(1));
    }
    // Releasing a lost permit is not an error, and later acquires fail the same way.
    permit.release().await.expect("releasing a lost permit");
    let err = sem_h
        .acquire()
        .await
        .expect_err("acquire on a closed semaphore");
    assert_eq!(err.code(), Some(ErrorCode::Closed));
}

/// `Client::shutdown` ends the session and frees every lease at once.
pub async fn shutdown_releases_every_lease(server: &impl Fixture) {
    let (leaver, waiter) = (server.client().await, server.client().await);
    let sem_a = leaver.semaphore("shut-a", 1).await.expect("ensure a");
    let sem_b = leaver.semaphore("shut-b", 2).await.expect("ensure b");
    let pa = sem_a.acquire().await.expect("acquire a");
    let pb = sem_b.acquire_many(2).await.expect("acquire b");

    let wa = waiter.semaphore("shut-a", 1).await.expect("ensure a");
    let wb = waiter.semaphore("shut-b", 2).await.expect("ensure b");
    let wait_a = tokio::spawn(async move { wa.acquire().await });
    let wait_b = tokio::spawn(async move { wb.acquire_many(2).await });
    wait_for_status(&waiter, "shut-a", "waiter queued on a", |s| s.queued == 1).await;
    wait_for_status(&waiter, "shut-b", "waiter queued on b", |s| s.queued == 1).await;

    let started = Instant::now();
    leaver.shutdown().await.expect("shutdown");
    let ga = timeout(PATIENCE, wait_a)
        .await
        .expect("a granted")
        .expect("task");
    let gb = timeout(PATIENCE, wait_b)
        .await
        .expect("b granted")
        .expect("task");
    let (ga, gb) = (ga.expect("acquire a"), gb.expect("acquire b"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the leases were freed only after {:?}, as if by expiry",
        started.elapsed()
    );
    for name in ["shut-a", "shut-b"] {
        let st = status_of(&waiter, name).await;
        assert_eq!(st.holders.len(), 1);
        assert_eq!(st.holders[0].session, hex(waiter.session_id()));
        // None on a backend without counters.
        assert_eq!(st.expired_total.unwrap_or(0), 0, "released, not expired");
    }
    // The shut-down client refuses further work; dropping its permits is harmless.
    assert!(matches!(leaver.status(None).await, Err(Error::Shutdown)));
    drop((pa, pb, ga, gb));
}

/// The status entry of a job.
pub async fn job_status(client: &Client, job: &str) -> JobStatus {
    let doc = client.status(None).await.expect("status");
    doc.jobs
        .into_iter()
        .find(|j| j.name == job)
        .unwrap_or_else(|| panic!("job {job:?} missing from the status"))
}

fn run(start: JobStart) -> JobAttempt {
    match start {
        JobStart::Run(attempt) => attempt,
        other => panic!("expected to run the job, got {other:?}"),
    }
}

/// A completed job is skipped by every later attempt, with who ran it, until it is reset;
/// a concurrent attempt that will not wait learns who runs it.
pub async fn job_runs_once_until_reset(server: &impl Fixture) {
    let a = server.client().await;
    let b = server.client().await;
    let first = run(a.try_begin_job("once-1", Some("g1")).await.expect("begin"));
    assert_eq!(first.job(), "once-1");
    match b.try_begin_job("once-1", None).await.expect("begin") {
        JobStart::Running(r) => {
            assert_eq!(r.token, first.fencing_token());
            assert!(!r.client.is_empty(), "the runner is named");
        }
        other => panic!("expected Running, got {other:?}"),
    }
    let st = job_status(&b, "once-1").await;
    assert_eq!(st.group.as_deref(), Some("g1"));
    assert!(st.running.is_some() && st.completed.is_none());
    let token = first.fencing_token();
    first.succeed().await.expect("record the completion");

    match b.try_begin_job("once-1", None).await.expect("begin") {
        JobStart::Completed(done) => {
            assert_eq!(done.token, token);
            assert!(!done.client.is_empty());
            assert!(done.started <= std::time::SystemTime::now());
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    let st = job_status(&b, "once-1").await;
    assert_eq!(st.completed.as_ref().map(|c| c.token), Some(token));
    assert!(st.running.is_none());
    let g = b
        .wait_group("g1", 1, Some(Duration::ZERO))
        .await
        .expect("settled");
    assert_eq!((g.jobs, g.completed, g.running), (1, 1, 0));

    assert!(
        b.reset_job("once-1").await.expect("reset"),
        "it had completed"
    );
    assert!(!b.reset_job("once-1").await.expect("reset again"));
    assert!(!b.reset_job("never-seen").await.expect("reset unknown"));
    let again = run(b.try_begin_job("once-1", None).await.expect("begin"));
    assert!(again.fencing_token() > token, "tokens rise across attempts");
    again
        .fail("exited with status 3")
        .await
        .expect("record the failure");
    let st = job_status(&a, "once-1").await;
    assert_eq!(st.failures, 1);
    assert!(st.completed.is_none());
    assert!(
        st.last_failure
            .as_deref()
            .is_some_and(|f| f.contains("status 3")),
        "{st:?}"
    );
    // Bad names are refused, not mangled.
    assert!(b.try_begin_job("", None).await.is_err());
}

/// Attempts queued behind a running one take over when it fails, and learn of the
/// completion (without running) when it succeeds; dropping an attempt is a failure.
pub async fn job_waiters_take_over_or_learn_of_the_completion(server: &impl Fixture) {
    let a = server.client().await;
    let b = server.client().await;
    let c = server.client().await;
    let first = run(a.try_begin_job("once-2", None).await.expect("begin"));
    let waiter = tokio::spawn(async move {
        let r = b.begin_job("once-2", None).await;
        (b, r)
    });
    assert!(
        timeout(QUIET, async {
            while !waiter.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_err(),
        "the second attempt waits while the first runs"
    );
    first.fail("boom").await.expect("fail");
    let (b, second) = timeout(PATIENCE, waiter)
        .await
        .expect("taken over")
        .expect("task");
    let second = run(second.expect("begin"));
    let later = tokio::spawn(async move { c.begin_job("once-2", None).await });
    tokio::time::sleep(Duration::from_millis(50)).await; // let it queue; either order is valid
    let token = second.fencing_token();
    second.succeed().await.expect("succeed");
    match timeout(PATIENCE, later)
        .await
        .expect("answered")
        .expect("task")
    {
        Ok(JobStart::Completed(done)) => assert_eq!(done.token, token),
        other => panic!("expected Completed, got {other:?}"),
    }
    // A dropped attempt counts as failed, and the job is free again.
    b.reset_job("once-2").await.expect("reset");
    let dropped = run(b.try_begin_job("once-2", None).await.expect("begin"));
    drop(dropped);
    let again = b
        .begin_job_timeout("once-2", None, PATIENCE)
        .await
        .expect("the dropped attempt's lease comes free");
    let again = run(again);
    assert_eq!(job_status(&a, "once-2").await.failures, 1);
    again.succeed().await.expect("succeed");
}

/// A runner whose session ends (its process died and a supervisor or the TTL ended it) loses
/// the job; the next attempt takes over, and the dead runner's late success is refused.
pub async fn job_of_a_dead_session_is_taken_over(server: &impl Fixture) {
    let a = server.client().await;
    let b = server.client().await;
    let first = run(a.try_begin_job("once-3", None).await.expect("begin"));
    b.end_session(a.session_id())
        .await
        .expect("end the session");
    let second = timeout(PATIENCE, b.begin_job("once-3", None))
        .await
        .expect("taken over in time")
        .expect("begin");
    let second = run(second);
    assert!(second.fencing_token() > first.fencing_token());
    let lost = timeout(PATIENCE, first.permit().lost())
        .await
        .expect("loss noticed");
    assert_eq!(lost, LostReason::SessionEnded);
    assert!(matches!(first.succeed().await, Err(Error::LeaseLost(_))));
    second.succeed().await.expect("the live runner records it");
    let st = job_status(&b, "once-3").await;
    assert_eq!(st.failures, 1);
    assert!(st.completed.is_some());
}

/// A group wait returns once nothing in the group runs and enough jobs completed, and times
/// out otherwise.
pub async fn group_wait_settles(server: &impl Fixture) {
    let a = server.client().await;
    let w = server.client().await;
    let g = w
        .wait_group("g4", 0, Some(Duration::ZERO))
        .await
        .expect("unknown group");
    assert_eq!(g.jobs, 0);
    let j1 = run(a.try_begin_job("g4-1", Some("g4")).await.expect("begin"));
    let j2 = run(a.try_begin_job("g4-2", Some("g4")).await.expect("begin"));
    assert!(matches!(
        w.wait_group("g4", 0, Some(Duration::from_millis(100)))
            .await,
        Err(Error::TimedOut)
    ));
    let waiter = tokio::spawn(async move {
        let r = w.wait_group("g4", 2, None).await;
        (w, r)
    });
    j1.succeed().await.expect("succeed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "one job still runs");
    j2.succeed().await.expect("succeed");
    let (w, settled) = timeout(PATIENCE, waiter)
        .await
        .expect("settled")
        .expect("task");
    let g = settled.expect("wait");
    assert_eq!((g.jobs, g.completed, g.running), (2, 2, 0));
    assert!(matches!(
        w.wait_group("g4", 3, Some(Duration::from_millis(100)))
            .await,
        Err(Error::TimedOut)
    ));
    let doc = w.status(None).await.expect("status");
    let gs = doc
        .groups
        .iter()
        .find(|g| g.name == "g4")
        .expect("group listed");
    assert_eq!((gs.jobs, gs.completed, gs.running), (2, 2, 0));
}

/// Four runners working through the same 40 jobs of one group, each in its own order: every
/// job runs exactly once.
pub async fn many_runners_run_each_job_once(server: &impl Fixture) {
    use std::sync::{Arc, Mutex};
    const JOBS: usize = 40;
    let runs: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(vec![0; JOBS]));
    let mut tasks = Vec::new();
    for r in 0..4usize {
        let client = server.client().await;
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..JOBS {
                // Runner r starts at a different place and goes the other way every other time.
                let i = if r % 2 == 0 {
                    (k + r * 10) % JOBS
                } else {
                    (JOBS - 1 - k + r * 10) % JOBS
                };
                let job = format!("many-{i}");
                match client.begin_job(&job, Some("many")).await.expect("begin") {
                    JobStart::Run(attempt) => {
                        runs.lock().expect("lock")[i] += 1;
                        tokio::task::yield_now().await;
                        attempt.succeed().await.expect("succeed");
                    }
                    JobStart::Completed(_) => {}
                    JobStart::Running(r) => panic!("a waiting attempt got Running: {r:?}"),
                }
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(
            timeout(PATIENCE * 6, t)
                .await
                .expect("runners finish")
                .expect("task"),
        );
    }
    assert_eq!(
        *runs.lock().expect("lock"),
        vec![1; JOBS],
        "each job ran exactly once"
    );
    let g = clients[0]
        .wait_group("many", JOBS as u32, Some(Duration::ZERO))
        .await
        .expect("all completed");
    assert_eq!(
        (g.jobs, g.completed, g.running, g.failures),
        (JOBS as u32, JOBS as u32, 0, 0)
    );
}

/// Two clients given the same session (as every client of a nanny's worker is, through
/// `TURNSTILE_SESSION`) still exclude each other, each hears of its own lost leases, and one
/// shutting down releases only its own leases: the session and the other's leases stay.
pub async fn clients_sharing_a_session_stay_apart(server: &impl Fixture) {
    let session = turnstile_client::new_session_id();
    let shared = Options {
        session_id: Some(session),
        ..Options::default()
    };
    let a = Client::connect_with(&server.url(), shared.clone())
        .await
        .expect("connect a");
    let b = Client::connect_with(&server.url(), shared)
        .await
        .expect("connect b");
    assert_eq!(a.session_id(), b.session_id());
    let mutex_a = a.semaphore("shared-mutex", 1).await.expect("ensure");
    let mutex_b = b.semaphore("shared-mutex", 1).await.expect("ensure");
    let held = mutex_a.acquire().await.expect("a acquires");
    assert!(
        mutex_b.try_acquire().await.expect("try").is_none(),
        "b must not get a's permit: same session, different acquires"
    );
    // b holds a permit elsewhere, and the semaphore a holds is closed: only a's lease is lost,
    // and a hears of it whichever connection the session was bound to last.
    let other = b.semaphore("shared-other", 1).await.expect("ensure");
    let b_permit = other.acquire().await.expect("b acquires");
    b.close("shared-mutex").await.expect("close");
    let reason = timeout(PATIENCE, held.lost())
        .await
        .expect("a hears of the close");
    assert_eq!(reason, LostReason::Closed);
    drop(held);
    // a shuts down: b's lease and the session survive.
    let mut a_other = a.semaphore("shared-other-2", 1).await.expect("ensure");
    let a_permit = a_other.acquire().await.expect("a acquires");
    let a_lease = a_permit.lease_id();
    // Released by the shutdown itself (the permit is dropped only afterwards).
    a.shutdown().await.expect("a shuts down");
    wait_for_status(
        &b,
        "shared-other-2",
        "a's lease released by its shutdown",
        |s| s.in_use == 0 && s.holders.iter().all(|h| h.lease_id != a_lease),
    )
    .await;
    assert_eq!(
        b_permit.lost_reason(),
        None,
        "b's lease survives a's shutdown"
    );
    let st = status_of(&b, "shared-other").await;
    assert_eq!(st.in_use, 1, "b still holds its permit");
    a_other = b.existing_semaphore("shared-other-2");
    let again = a_other.try_acquire().await.expect("try");
    assert!(again.is_some(), "a's slot is free for b");
    drop(again);
    drop(a_permit);
    b_permit.release().await.expect("release");
    b.shutdown().await.expect("b shuts down");
}

/// Growing grants the waiters that now fit at once, in queue order; shrinking takes nothing
/// from holders and grants nothing until what they hold plus the next waiter fits; an acquire
/// naming another capacity is still refused; a waiter heavier than a shrunk capacity fails.
pub async fn capacity_changes_grant_at_once_and_hold_back_after_a_shrink(server: &impl Fixture) {
    let admin = server.client().await;
    let name = "resize";
    let (a, b, c) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let held = a
        .semaphore(name, 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("a");
    let sem_b = b.semaphore(name, 1).await.expect("ensure");
    let mut wait_b = tokio::spawn(async move { sem_b.acquire().await });
    wait_for_status(&admin, name, "b queued", |s| s.queued == 1).await;
    // Growing to 3: b is granted at once.
    admin.set_capacity(name, 3).await.expect("grow");
    let permit_b = timeout(PATIENCE, &mut wait_b)
        .await
        .expect("b granted when the capacity grew")
        .expect("task")
        .expect("b");
    let sem_c = c
        .semaphore(name, 3)
        .await
        .expect("ensure with the new capacity");
    let permit_c = sem_c
        .try_acquire()
        .await
        .expect("try")
        .expect("a third permit is free");
    let st = status_of(&admin, name).await;
    assert_eq!((st.capacity, st.in_use), (3, 3));
    // The old capacity is now a mismatch: set-capacity is the way to change it.
    let err = a.semaphore(name, 1).await.expect_err("mismatch");
    assert_eq!(err.code(), Some(ErrorCode::CapacityMismatch), "{err:?}");

    // A heavy waiter queued while full fails when a shrink leaves it too heavy.
    let heavy = server.client().await;
    let sem_heavy = heavy.semaphore(name, 3).await.expect("ensure");
    let mut wait_heavy = tokio::spawn(async move { sem_heavy.acquire_many(2).await });
    wait_for_status(&admin, name, "the heavy waiter queued", |s| s.queued == 1).await;

    // Shrinking to 1 under three holders: nothing is taken, nothing granted.
    admin.set_capacity(name, 1).await.expect("shrink");
    let refused = timeout(PATIENCE, &mut wait_heavy)
        .await
        .expect("the heavy waiter answered")
        .expect("task");
    assert_eq!(
        refused.expect_err("weight 2 > capacity 1").code(),
        Some(ErrorCode::WeightExceedsCapacity)
    );
    wait_for_status(&admin, name, "the heavy waiter gone", |s| s.queued == 0).await;
    let st = status_of(&admin, name).await;
    assert_eq!(
        (st.capacity, st.in_use),
        (1, 3),
        "holders keep their permits"
    );
    assert!(held.lost_reason().is_none() && permit_b.lost_reason().is_none());
    let waiter = server.client().await;
    let sem_w = waiter.semaphore(name, 1).await.expect("ensure");
    let mut wait_w = tokio::spawn(async move { sem_w.acquire().await });
    wait_for_status(&admin, name, "w queued", |s| s.queued == 1).await;
    held.release().await.expect("release a");
    permit_b.release().await.expect("release b");
    assert!(
        timeout(QUIET, &mut wait_w).await.is_err(),
        "granted while the last holder still filled the shrunk capacity"
    );
    let last = permit_c.fencing_token();
    permit_c.release().await.expect("release c");
    let permit_w = timeout(PATIENCE, &mut wait_w)
        .await
        .expect("w granted once in_use fits")
        .expect("task")
        .expect("w");
    assert!(permit_w.fencing_token() > last);
    drop(permit_w);

    // Errors: an unknown name, a zero capacity.
    let err = admin.set_capacity("no-such", 2).await.expect_err("unknown");
    assert_eq!(err.code(), Some(ErrorCode::NoSuchSemaphore), "{err:?}");
    let err = admin.set_capacity(name, 0).await.expect_err("zero");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
}

/// Delete refuses a semaphore in use, frees an idle or closed one's name for a fresh start
/// with any capacity, and the name's tokens still strictly increase.
pub async fn delete_frees_the_name_and_tokens_still_increase(server: &impl Fixture) {
    let client = server.client().await;
    let name = "bench-x";
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let permit = sem.acquire().await.expect("acquire");
    let first = permit.fencing_token();
    let err = client.delete(name).await.expect_err("held");
    assert_eq!(err.code(), Some(ErrorCode::InUse), "{err:?}");
    assert!(err.to_string().contains("in use"), "{err}");
    permit.release().await.expect("release");
    client.delete(name).await.expect("delete an idle semaphore");
    let doc = client.status(None).await.expect("status");
    assert!(doc.semaphores.iter().all(|s| s.name != name), "{doc:?}");
    let err = client.delete(name).await.expect_err("gone");
    assert_eq!(err.code(), Some(ErrorCode::NoSuchSemaphore), "{err:?}");
    let err = sem.acquire().await.expect_err("deleted");
    assert_eq!(err.code(), Some(ErrorCode::NoSuchSemaphore), "{err:?}");

    // Afresh, with another capacity, counting above the old tokens.
    let sem = client.semaphore(name, 4).await.expect("created afresh");
    let permit = sem.acquire_many(4).await.expect("acquire");
    let second = permit.fencing_token();
    assert!(second > first, "token {second} after {first}");
    // Closed with a holder: close takes the lease, then delete may go.
    client.close(name).await.expect("close");
    assert_eq!(
        timeout(PATIENCE, permit.lost()).await.expect("told"),
        LostReason::Closed
    );
    client
        .delete(name)
        .await
        .expect("delete a closed semaphore");
    let sem = client
        .semaphore(name, 1)
        .await
        .expect("open again, not closed");
    let third = sem.acquire().await.expect("acquire").fencing_token();
    assert!(third > second, "token {third} after {second}");
}

/// A lease released by force: its permits go to the next waiter, its holder is told
/// `Revoked`; an id that holds nothing is refused.
pub async fn revoke_tells_the_holder_and_grants_the_next(server: &impl Fixture) {
    let admin = server.client().await;
    let name = "stuck";
    let (holder, waiter) = (server.client().await, server.client().await);
    let permit = holder
        .semaphore(name, 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    let sem_w = waiter.semaphore(name, 1).await.expect("ensure");
    let mut wait_w = tokio::spawn(async move { sem_w.acquire().await });
    wait_for_status(&admin, name, "waiter queued", |s| s.queued == 1).await;
    let st = status_of(&admin, name).await;
    let lease = st.holders[0].lease_id;
    assert_eq!(lease, permit.lease_id());
    admin.revoke(name, lease).await.expect("revoke");
    let granted = timeout(PATIENCE, &mut wait_w)
        .await
        .expect("the waiter granted after the revoke")
        .expect("task")
        .expect("acquire");
    assert!(granted.fencing_token() > permit.fencing_token());
    assert_eq!(
        timeout(PATIENCE, permit.lost())
            .await
            .expect("the holder is told"),
        LostReason::Revoked
    );
    let err = admin.revoke(name, lease).await.expect_err("no longer held");
    assert_eq!(err.code(), Some(ErrorCode::UnknownLease), "{err:?}");
    let err = admin.revoke("no-such", 1).await.expect_err("unknown");
    assert_eq!(err.code(), Some(ErrorCode::NoSuchSemaphore), "{err:?}");
}
