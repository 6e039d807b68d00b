//! The shared-directory backend (`file:///DIR`): the conformance suite, plus what only this
//! backend has — stale records (seen unchanged for a TTL, whatever their mtimes say), clock
//! steps, garbage files, unusable directories.
//!
//! Every test works in a fresh directory under the system's temporary directory, removed when
//! the test ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::{timeout, Instant};
use turnstile_client::{Client, Error, ErrorCode, JobAttempt, JobStart, LostReason, Options};

mod conformance;
use conformance::{hex, job_status, status_of, wait_for_status, Fixture, PATIENCE, QUIET};

conformance_suite!(file, Scratch::new());

/// A fresh directory under `std::env::temp_dir()`, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "turnstile-file-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        Scratch { path }
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    async fn client_with_ttl(&self, ttl: Duration) -> Client {
        let options = Options {
            session_ttl: Some(ttl),
            ..Options::default()
        };
        Client::connect_with(&self.url(), options)
            .await
            .expect("connect")
    }

    fn sem(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory of a job whose name needs no escaping.
    fn job(&self, name: &str) -> PathBuf {
        self.path.join(".jobs").join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Fixture for Scratch {
    async fn client(&self) -> Client {
        Client::connect(&self.url()).await.expect("connect")
    }

    fn url(&self) -> String {
        Scratch::url(self)
    }

    fn counts_totals(&self) -> bool {
        false
    }
}

/// Writes `content` to `path` and sets its modification time `age` into the past.
fn plant(path: &Path, content: &[u8], age: Duration) {
    plant_at(path, content, SystemTime::now() - age);
}

/// Writes `content` to `path` with the modification time `mtime`.
fn plant_at(path: &Path, content: &[u8], mtime: SystemTime) {
    std::fs::write(path, content).expect("write the planted file");
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open the planted file");
    file.set_modified(mtime)
        .expect("set the planted file's mtime");
}

/// How long a fresh client watches an unreadable record before it reclaims it: the default
/// TTL (10 s), with room for a loaded machine.
const UNREADABLE_PATIENCE: Duration = Duration::from_secs(25);

/// A well-formed lease record of a process on another host (so only its age can make it
/// stale).
fn foreign_record(ttl_ms: u64) -> Vec<u8> {
    format!(
        "turnstile-lease-v1 lease=1 session=00000000000000aa weight=1 token=1 ttl_ms={ttl_ms} \
         start_ms=0 nonce=0000000000000001 host=elsewhere boot=x pidns=x pid=1\n"
    )
    .into_bytes()
}

const HOUR: Duration = Duration::from_secs(3600);

/// A missing directory is created (with its parents).
#[tokio::test]
async fn missing_directory_is_created() {
    let dir = Scratch::new();
    let nested = Scratch {
        path: dir.path.join("a/b/c"),
    };
    assert!(!nested.path.exists());
    let client = nested.client().await;
    assert!(nested.path.is_dir());
    let sem = client.semaphore("x", 1).await.expect("ensure");
    drop(sem.acquire().await.expect("acquire"));
    client.shutdown().await.expect("shutdown");
}

/// A path that cannot be a directory gives one clear error naming it. (Tests run as root on
/// CI, where mode 0555 is not enforced, so the unusable directory is one below a regular
/// file.)
#[tokio::test]
async fn unusable_directory_is_one_clear_error() {
    let dir = Scratch::new();
    std::fs::create_dir_all(&dir.path).expect("mkdir");
    let file = dir.path.join("regular-file");
    std::fs::write(&file, b"x").expect("write");
    let bad = file.join("semaphores");
    let err = Client::connect(&format!("file://{}", bad.display()))
        .await
        .expect_err("a directory under a regular file cannot be used");
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&bad.display().to_string()), "{text}");
    assert!(!text.contains('\n'));
    let cause = std::error::Error::source(&err)
        .expect("the cause")
        .to_string();
    assert!(cause.to_lowercase().contains("not a directory"), "{cause}");

    for url in ["file://relative/path", "file://somehost/x"] {
        let err = Client::connect(url).await.expect_err("bad file URL");
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    }
}

/// Garbage and truncated slot files count as held until a client has seen them unchanged
/// for the default TTL (however old their mtimes), are reclaimed then, and never make
/// anything panic; status skips them as holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_slot_files_are_reclaimed_once_seen_unchanged_for_a_ttl() {
    let dir = Scratch::new();
    let client = dir.client().await;
    let sem = client.semaphore("g", 2).await.expect("ensure");
    let good = String::from_utf8(foreign_record(10_000)).expect("utf8");
    plant(
        &dir.sem("g").join("slot-0"),
        b"\xff\xfegarbage",
        Duration::ZERO,
    );
    plant(
        &dir.sem("g").join("slot-1"),
        &good.as_bytes()[..good.len() / 2],
        Duration::ZERO,
    );
    // A garbage ticket at the head of another semaphore's queue, as old as can be.
    let sem2 = client.semaphore("g2", 1).await.expect("ensure");
    plant(
        &dir.sem("g2").join("queue").join("00000000000000000001"),
        b"",
        HOUR,
    );
    // Seen for the first time: they might be a holder we do not understand (or one whose
    // file server's clock jumped), so they are respected.
    assert!(sem.try_acquire().await.expect("try").is_none());
    assert!(sem2.try_acquire().await.expect("try").is_none());
    let st = status_of(&client, "g").await;
    assert_eq!((st.in_use, st.holders.len()), (2, 0), "{st:?}");

    // Unchanged for the default TTL: reclaimed, slots and ticket alike.
    let (slots, ticket) = tokio::join!(
        timeout(UNREADABLE_PATIENCE, sem.acquire_many(2)),
        timeout(UNREADABLE_PATIENCE, sem2.acquire()),
    );
    let permit = slots
        .expect("the garbage slots are reclaimed")
        .expect("acquire");
    let st = status_of(&client, "g").await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].weight, 2);
    assert_eq!(st.holders[0].session, hex(client.session_id()));
    permit.release().await.expect("release");
    drop(
        ticket
            .expect("the garbage ticket is reclaimed")
            .expect("acquire"),
    );
}

/// A damaged capacity file is a clear error, not a panic and not a silent default.
#[tokio::test]
async fn damaged_capacity_file_is_a_clear_error() {
    let dir = Scratch::new();
    let client = dir.client().await;
    client.semaphore("c", 1).await.expect("ensure");
    std::fs::write(dir.sem("c").join("capacity"), b"thr").expect("damage");
    for err in [
        client.semaphore("c", 1).await.expect_err("ensure"),
        client
            .existing_semaphore("c")
            .acquire()
            .await
            .expect_err("acquire"),
    ] {
        assert!(matches!(err, Error::Storage { .. }), "{err:?}");
        assert!(err.to_string().contains("capacity"), "{err}");
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains("damaged"), "{cause}");
    }
    // Status skips it rather than failing as a whole.
    client.status(None).await.expect("status");
}

/// A lease whose owner stopped refreshing it is reclaimed once a waiter has seen it unchanged
/// for the owner's TTL, and not before; a live holder with a short TTL keeps its lease for
/// as long as it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_leases_are_reclaimed_after_their_ttl_and_live_ones_are_not() {
    let dir = Scratch::new();
    let holder = dir.client_with_ttl(Duration::from_secs(2)).await;
    let other = dir.client().await;
    let sem_h = holder.semaphore("s", 1).await.expect("ensure");
    let sem_o = other.semaphore("s", 1).await.expect("ensure");

    // A live holder with a 2 s TTL is refreshed every 667 ms: nobody steals it.
    let permit = sem_h.acquire().await.expect("acquire");
    let err = sem_o
        .acquire_timeout(Duration::from_millis(3000))
        .await
        .expect_err("the lease is alive");
    assert!(matches!(err, Error::TimedOut), "{err:?}");
    assert_eq!(permit.lost_reason(), None);
    let token = permit.fencing_token();
    permit.release().await.expect("release");

    // A record of a process elsewhere that stopped refreshing it: reclaimed after its TTL.
    plant(
        &dir.sem("s").join("slot-0"),
        &foreign_record(700),
        Duration::ZERO,
    );
    let started = Instant::now();
    let p = timeout(PATIENCE, sem_o.acquire())
        .await
        .expect("reclaimed after its TTL")
        .expect("acquire");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "reclaimed too early: {waited:?}"
    );
    assert!(p.fencing_token() > token);
    drop(p);
}

/// Which way a clock step moves the mtimes of the records.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// An hour into the past, as a forward step of the file server's clock makes every
    /// record look (the issue's `touch -m -d '-1 hour'`).
    Back,
    /// An hour into the future, as a backward step makes it look.
    Ahead,
}

/// Sets the mtime of every slot file and ticket of the semaphore directory `sem_dir` to one
/// time an hour back or ahead, over and over (the holders' heartbeats move them back to
/// "now"), until `stop` is set: the mtimes then hardly ever change between two looks of a
/// waiter, and only the records' bytes show that their owners live. Files that vanish
/// meanwhile are skipped. Returns how many mtimes it set.
fn keep_stepping(sem_dir: &Path, step: Step, stop: &AtomicBool) -> u64 {
    let when = match step {
        Step::Back => SystemTime::now() - HOUR,
        Step::Ahead => SystemTime::now() + HOUR,
    };
    let mut set = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut paths = Vec::new();
        for dir in [sem_dir.to_owned(), sem_dir.join("queue")] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("slot-") || name.bytes().all(|b| b.is_ascii_digit()) {
                    paths.push(entry.path());
                }
            }
        }
        for path in paths {
            // Without O_CREAT or O_TRUNC: the bytes stay as they are.
            if let Ok(file) = std::fs::File::options().write(true).open(&path) {
                if file.set_modified(when).is_ok() {
                    set += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    set
}

/// A clock step on the shared directory, either way, never hands a live lease (or a live
/// waiter's place) to anybody: with the mtimes of the holder's slot file and the waiters'
/// tickets set an hour back, then an hour ahead, again and again for several TTLs, neither
/// waiter is granted while the holder lives and the holder keeps its lease; when it
/// releases, the waiters are served in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_either_way_never_grant_a_live_lease() {
    let dir = Scratch::new();
    let ttl = Duration::from_secs(1);
    let holder = dir.client_with_ttl(ttl).await;
    let first = dir.client_with_ttl(ttl).await;
    let second = dir.client_with_ttl(ttl).await;
    let permit = holder
        .semaphore("c", 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    let sem1 = first.semaphore("c", 1).await.expect("ensure");
    let sem2 = second.semaphore("c", 1).await.expect("ensure");
    let w1 = tokio::spawn(async move { sem1.acquire().await });
    wait_for_status(&holder, "c", "the first waiter", |st| st.queued == 1).await;
    let w2 = tokio::spawn(async move { sem2.acquire().await });
    wait_for_status(&holder, "c", "the second waiter", |st| st.queued == 2).await;

    let sem_dir = dir.sem("c");
    let slot = sem_dir.join("slot-0");
    let record = std::fs::read(&slot).expect("the holder's slot file");
    for step in [Step::Back, Step::Ahead] {
        let stop = Arc::new(AtomicBool::new(false));
        let stepper = {
            let (sem_dir, stop) = (sem_dir.clone(), stop.clone());
            std::thread::spawn(move || keep_stepping(&sem_dir, step, &stop))
        };
        // Well over a TTL for either waiter to (wrongly) take the slot or the head.
        tokio::time::sleep(4 * ttl).await;
        stop.store(true, Ordering::Relaxed);
        let set = stepper.join().expect("the stepper thread");
        assert!(set > 100, "the step was applied only {set} times");
        assert!(
            !w1.is_finished() && !w2.is_finished(),
            "a waiter was granted the live holder's lease after a step {step:?}"
        );
        assert_eq!(permit.lost_reason(), None, "after a step {step:?}");
    }
    // What keeps it alive is its heartbeat changing the bytes (the mtimes were ours).
    let now = std::fs::read(&slot).expect("the holder's slot file");
    assert_ne!(now, record, "the heartbeat rewrites the record's bytes");
    assert_eq!(now.len(), record.len(), "in place, at the same length");
    permit.release().await.expect("release");
    let p1 = timeout(PATIENCE, w1)
        .await
        .expect("the first waiter is served")
        .expect("join")
        .expect("acquire");
    assert!(!w2.is_finished(), "the second waiter kept its place");
    drop(p1);
    let p2 = timeout(PATIENCE, w2)
        .await
        .expect("the second waiter is served")
        .expect("join")
        .expect("acquire");
    drop(p2);
}

/// A holder on another host that died (its record is never rewritten again, and its pid
/// cannot be checked from here) is reclaimed by a fresh client once that client has seen
/// the record unchanged for the holder's TTL — not before, even with an mtime an hour in
/// the past, and not never, with an mtime an hour in the future. A dead waiter's ticket
/// likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_holder_elsewhere_is_reclaimed_after_one_ttl_of_observation() {
    const RECORD_TTL: Duration = Duration::from_millis(1500);
    let dir = Scratch::new();
    let client = dir.client_with_ttl(Duration::from_secs(1)).await;
    let sem = client.semaphore("d", 1).await.expect("ensure");
    let record = foreign_record(1500);
    let cases = [
        (dir.sem("d").join("slot-0"), SystemTime::now() - HOUR),
        (
            dir.sem("d").join("queue").join("00000000000000000001"),
            SystemTime::now() + HOUR,
        ),
    ];
    for (path, mtime) in cases {
        plant_at(&path, &record, mtime);
        let started = Instant::now();
        let p = timeout(PATIENCE, sem.acquire())
            .await
            .unwrap_or_else(|_| panic!("{} never reclaimed", path.display()))
            .expect("acquire");
        let waited = started.elapsed();
        assert!(
            waited >= RECORD_TTL,
            "{} reclaimed after {waited:?}, before a TTL of observation",
            path.display()
        );
        assert!(
            waited < RECORD_TTL + Duration::from_secs(5),
            "{} reclaimed only after {waited:?}",
            path.display()
        );
        assert!(!path.exists() || std::fs::read(&path).ok() != Some(record.clone()));
        p.release().await.expect("release");
    }
}

/// `end_session` takes a session's leases away; the holder hears that its lease is lost
/// (because its session was ended, as on the coordinator) and the slot goes to the next
/// waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_session_frees_the_leases_and_the_holder_hears_of_it() {
    let dir = Scratch::new();
    let holder = dir.client_with_ttl(Duration::from_millis(600)).await;
    let (supervisor, waiter) = (dir.client().await, dir.client().await);
    let sem_h = holder.semaphore("e", 1).await.expect("ensure");
    let sem_w = waiter.semaphore("e", 1).await.expect("ensure");
    let permit = sem_h.acquire().await.expect("acquire");
    let mut queued = tokio::spawn(async move { sem_w.acquire().await });
    assert!(timeout(QUIET, &mut queued).await.is_err());

    supervisor
        .end_session(holder.session_id())
        .await
        .expect("end_session");
    let granted = timeout(PATIENCE, queued)
        .await
        .expect("the waiter gets the slot")
        .expect("task")
        .expect("acquire");
    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the holder hears of it");
    assert_eq!(reason, LostReason::SessionEnded);
    let st = status_of(&supervisor, "e").await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(waiter.session_id()));
    drop(granted);
}

/// Names that are not file names (slashes, dots, percent signs, long UTF-8) are kept apart
/// and reported under their own names.
#[tokio::test]
async fn any_valid_name_maps_to_its_own_directory() {
    let dir = Scratch::new();
    let client = dir.client().await;
    let long = "ü".repeat(127);
    let names = ["a/b", "a%2Fb", "..", ".", "-x", "with space", long.as_str()];
    for (i, name) in names.iter().enumerate() {
        client
            .semaphore(name, i as u32 + 1)
            .await
            .unwrap_or_else(|e| panic!("ensure {name:?}: {e}"));
    }
    let doc = client.status(None).await.expect("status");
    let mut got: Vec<(String, u32)> = doc
        .semaphores
        .into_iter()
        .map(|s| (s.name, s.capacity))
        .collect();
    got.sort();
    let mut want: Vec<(String, u32)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as u32 + 1))
        .collect();
    want.sort();
    assert_eq!(got, want);
    for bad in ["", "a\nb"] {
        let err = client.semaphore(bad, 1).await.expect_err("invalid name");
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    }
    let err = client
        .semaphore(&"x".repeat(256), 1)
        .await
        .expect_err("too long");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
}

/// The blocking facade drives the file backend as well; dropping the last handle releases.
#[test]
fn blocking_facade_works_on_a_directory() {
    let dir = Scratch::new();
    let client = turnstile_client::blocking::Client::connect(&dir.url()).expect("connect");
    let sem = client.semaphore("b", 1).expect("ensure");
    let permit = sem.acquire().expect("acquire");
    assert!(sem.try_acquire().expect("try").is_none());
    let token = permit.fencing_token();
    drop(permit);
    let again = sem
        .try_acquire()
        .expect("try")
        .expect("free after the drop");
    assert!(again.fencing_token() > token);
    drop((again, sem, client));
    let other = turnstile_client::blocking::Client::connect(&dir.url()).expect("connect");
    let doc = other.status(Some("b")).expect("status");
    assert_eq!(
        doc.semaphores[0].in_use, 0,
        "released when the client went away"
    );
}

fn run(start: JobStart) -> JobAttempt {
    match start {
        JobStart::Run(attempt) => attempt,
        other => panic!("expected to run the job, got {other:?}"),
    }
}

/// A lease record of a process of this host, boot and pid namespace, as the backend writes
/// it (so that the dead-pid check applies).
fn local_record(pid: u32, token: u64) -> Vec<u8> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let pidns = std::fs::read_link("/proc/self/ns/pid").expect("pid namespace");
    format!(
        "turnstile-lease-v1 lease=1 session=00000000000000bb weight=1 token={token} \
         ttl_ms=3600000 start_ms=0 nonce=0000000000000002 host={} boot={} pidns={} pid={pid}\n",
        host.trim(),
        boot.trim(),
        pidns.to_string_lossy()
    )
    .into_bytes()
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

/// A job's completion is on disk: a client that connects later (a new process, say) skips
/// the job, with who ran it; job locks are not listed as semaphores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completion_survives_the_client() {
    let dir = Scratch::new();
    let first = dir.client().await;
    let attempt = run(first
        .begin_job("nightly-import", Some("nightly"))
        .await
        .expect("begin"));
    let token = attempt.fencing_token();
    attempt.succeed().await.expect("succeed");
    first.shutdown().await.expect("shutdown");
    drop(first);

    let later = dir.client().await;
    match later
        .try_begin_job("nightly-import", None)
        .await
        .expect("begin")
    {
        JobStart::Completed(done) => {
            assert_eq!(done.token, token);
            assert!(
                done.client.ends_with(&format!(":{}", std::process::id())),
                "{}",
                done.client
            );
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    let doc = later.status(None).await.expect("status");
    assert!(doc.semaphores.is_empty(), "{:?}", doc.semaphores);
    assert_eq!(doc.jobs.len(), 1);
    assert_eq!(doc.jobs[0].group.as_deref(), Some("nightly"));
    assert_eq!(doc.groups.len(), 1);
    assert_eq!((doc.groups[0].jobs, doc.groups[0].completed), (1, 1));
    // The group is kept when an attempt names none, and a job moves when one names another.
    assert!(later.reset_job("nightly-import").await.expect("reset"));
    let again = run(later
        .try_begin_job("nightly-import", Some("weekly"))
        .await
        .expect("begin"));
    assert!(again.fencing_token() > token, "tokens live on disk too");
    again.succeed().await.expect("succeed");
    let g = later
        .wait_group("nightly", 0, Some(Duration::ZERO))
        .await
        .expect("look");
    assert_eq!(g.jobs, 0, "moved out of the old group");
    let g = later
        .wait_group("weekly", 1, Some(Duration::ZERO))
        .await
        .expect("look");
    assert_eq!((g.jobs, g.completed), (1, 1));
}

/// A job lock held by a process of this host that has died is taken over at once (no TTL
/// to wait out), and the dead attempt counts as failed; a holder elsewhere that stopped
/// refreshing is reclaimed by a group wait and counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_runner_is_taken_over_at_once_and_counted() {
    let dir = Scratch::new();
    let client = dir.client().await;
    // Create the job (and its lock directory) with a first, failed attempt.
    run(client
        .try_begin_job("dead-1", Some("d"))
        .await
        .expect("begin"))
    .fail("first try")
    .await
    .expect("fail");
    std::fs::write(
        dir.job("dead-1").join("lock").join("slot-0"),
        local_record(dead_pid(), 1),
    )
    .expect("plant");
    let st = job_status(&client, "dead-1").await;
    assert!(st.running.is_none(), "a dead process runs nothing: {st:?}");

    let started = Instant::now();
    let attempt = run(client.try_begin_job("dead-1", None).await.expect("begin"));
    assert!(started.elapsed() < Duration::from_secs(2));
    let st = job_status(&client, "dead-1").await;
    assert_eq!(st.failures, 2, "{st:?}");
    assert!(
        st.last_failure
            .as_deref()
            .is_some_and(|f| f.contains("died")),
        "{st:?}"
    );
    assert_eq!(
        st.running.as_ref().map(|r| r.session.clone()),
        Some(hex(client.session_id()))
    );
    attempt.succeed().await.expect("succeed");
    assert_eq!(job_status(&client, "dead-1").await.last_failure, None);

    // A stale holder on another host, with nobody waiting: a group wait reclaims it, once
    // it has seen it unchanged for its TTL (its old mtime does not hurry it).
    run(client
        .try_begin_job("dead-2", Some("d"))
        .await
        .expect("begin"))
    .fail("first try")
    .await
    .expect("fail");
    plant(
        &dir.job("dead-2").join("lock").join("slot-0"),
        &foreign_record(1000),
        HOUR,
    );
    let started = Instant::now();
    let g = client
        .wait_group("d", 1, Some(PATIENCE))
        .await
        .expect("settled: one completed, none running");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "reclaimed before a TTL of observation: {:?}",
        started.elapsed()
    );
    assert_eq!((g.jobs, g.completed, g.running, g.failures), (2, 1, 0, 4));
    let st = job_status(&client, "dead-2").await;
    assert!(
        st.last_failure
            .as_deref()
            .is_some_and(|f| f.contains("expired")),
        "{st:?}"
    );
}

/// Damaged job files never panic: a garbage or truncated completion is a clear error for an
/// attempt (the job did complete, but what to answer is lost) until the job is reset, and
/// status and group waits still work; garbage failure and group files are read safely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_job_files_are_clear_errors_or_harmless() {
    let dir = Scratch::new();
    let client = dir.client().await;
    run(client
        .try_begin_job("broken", Some("b"))
        .await
        .expect("begin"))
    .succeed()
    .await
    .expect("succeed");
    let done = dir.job("broken").join("done");
    let good = std::fs::read(&done).expect("the completion is a file");
    for bad in [&good[..good.len() / 2], b"\xff\xfe garbage\n", b""] {
        std::fs::write(&done, bad).expect("damage");
        for err in [
            client
                .try_begin_job("broken", None)
                .await
                .expect_err("damaged"),
            client.begin_job("broken", None).await.expect_err("damaged"),
        ] {
            assert!(matches!(err, Error::Storage { .. }), "{err:?}");
            assert!(err.to_string().contains("done"), "{err}");
            let cause = std::error::Error::source(&err).expect("cause").to_string();
            assert!(cause.contains("damaged"), "{cause}");
        }
        let st = job_status(&client, "broken").await;
        assert!(st.completed.is_some(), "it did complete: {st:?}");
        let g = client
            .wait_group("b", 1, Some(Duration::ZERO))
            .await
            .expect("counts as completed");
        assert_eq!((g.jobs, g.completed), (1, 1));
    }

    // Garbage failure files count as failed attempts; their text is shown as best it can be.
    let failed = dir.job("broken").join("failed");
    std::fs::create_dir_all(&failed).expect("mkdir");
    std::fs::write(failed.join("junk"), b"\xff\x00").expect("plant");
    std::fs::write(dir.job("broken").join("last-failure"), b"\xffbad").expect("plant");
    let st = job_status(&client, "broken").await;
    assert_eq!(st.failures, 1);
    assert!(st.last_failure.is_some_and(|f| f.ends_with("bad")));

    // A reset clears it all, and the job runs again.
    assert!(client.reset_job("broken").await.expect("reset"));
    let st = job_status(&client, "broken").await;
    assert_eq!(
        (st.failures, st.last_failure, st.completed),
        (0, None, None)
    );
    let attempt = run(client.try_begin_job("broken", None).await.expect("begin"));

    // A garbage group file makes the job ungrouped rather than failing anything.
    std::fs::write(dir.job("broken").join("group"), b"\xff\xfe").expect("damage");
    assert_eq!(job_status(&client, "broken").await.group, None);
    let g = client
        .wait_group("b", 0, Some(Duration::ZERO))
        .await
        .expect("look");
    assert_eq!(g.jobs, 0);
    attempt.succeed().await.expect("succeed");

    // A damaged lock/capacity file (which names the job) is a clear error too, and status
    // leaves the job out rather than failing as a whole.
    std::fs::write(dir.job("broken").join("lock").join("capacity"), b"1").expect("damage");
    let err = client
        .try_begin_job("broken", None)
        .await
        .expect_err("damaged");
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");
    let doc = client.status(None).await.expect("status");
    assert!(doc.jobs.iter().all(|j| j.name != "broken"));
}

/// Job and group names are checked like semaphore names.
#[tokio::test]
async fn bad_job_and_group_names_are_refused() {
    let dir = Scratch::new();
    let client = dir.client().await;
    let long = "x".repeat(256);
    for (job, group) in [
        ("", None),
        ("a\nb", None),
        (long.as_str(), None),
        ("ok", Some("")),
        ("ok", Some("tab\there")),
        ("ok", Some(long.as_str())),
    ] {
        let err = client
            .try_begin_job(job, group)
            .await
            .expect_err("invalid name");
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    }
    for bad in ["", "a\u{1}"] {
        let err = client.reset_job(bad).await.expect_err("invalid");
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
        let err = client
            .wait_group(bad, 0, Some(Duration::ZERO))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err:?}");
    }
    // Nothing was created for them.
    let doc = client.status(None).await.expect("status");
    assert!(doc.jobs.is_empty() && doc.groups.is_empty(), "{doc:?}");
}

/// Job and group names that are not file names (slashes, dots, long UTF-8 that gets a hashed
/// directory name) work and are reported under their own names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_valid_job_or_group_name_works() {
    let dir = Scratch::new();
    let client = dir.client().await;
    let long_job = "ü".repeat(127);
    let long_group = "é".repeat(127);
    let cases = [
        ("a/b", "x/y"),
        ("..", "."),
        (long_job.as_str(), long_group.as_str()),
    ];
    for (job, group) in cases {
        run(client.try_begin_job(job, Some(group)).await.expect("begin"))
            .succeed()
            .await
            .expect("succeed");
        assert!(matches!(
            client.try_begin_job(job, None).await.expect("begin"),
            JobStart::Completed(_)
        ));
        let g = client
            .wait_group(group, 1, Some(Duration::ZERO))
            .await
            .expect("settled");
        assert_eq!((g.jobs, g.completed), (1, 1), "{group:?}");
    }
    let doc = client.status(None).await.expect("status");
    let mut got: Vec<(String, Option<String>)> =
        doc.jobs.into_iter().map(|j| (j.name, j.group)).collect();
    got.sort();
    let mut want: Vec<(String, Option<String>)> = cases
        .iter()
        .map(|(j, g)| (j.to_string(), Some(g.to_string())))
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(doc.semaphores.is_empty());
}
