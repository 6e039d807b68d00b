//! Crash test: a real `turnstile serve` process with a data directory is killed with SIGKILL
//! at random moments while clients hold and exchange leases, and restarted on the same port
//! and data directory each time. The clients run in this process (tokio, `turnstile-client`).
//!
//! # Scenario
//!
//! - Two semaphores: `crash` with capacity 3 and `crash-mutex` with capacity 1.
//! - [`CLIENTS`] client tasks, each with a `Client` of its own (session TTL [`SESSION_TTL`]),
//!   loop: pick a semaphore, acquire with a timeout, hold for a short random time while
//!   watching that the permit is not lost, release, repeat. Two of the clients sometimes hold
//!   a permit of `crash` for longer than the TTL, across several kills.
//! - Meanwhile the test lets them run for 50–400 ms (seeded xorshift), kills the server with
//!   SIGKILL, restarts it, and then makes a *quiet point*: it pauses the clients, waits until
//!   every operation in flight has completed and every client has talked to the new server
//!   (so it has resumed its session), and compares what the server says with what the clients
//!   believe. Then the clients run again. One kill in four is a *quiet kill*: the clients are
//!   paused (and checked) before the kill, so the state after the restart must be exactly the
//!   state before it, tokens included. One kill in six is followed by an *outage*: the server
//!   stays down for 0.5–0.9 s (up to 0.3 of the TTL) before it restarts.
//!
//! # Invariants checked
//!
//! 1. No acknowledged grant is lost while its holder keeps it alive: no permit ever reports
//!    itself lost (the server is always back well within the TTL), and at every quiet point the
//!    server's holders, as (session, lease, token), are exactly the permits the clients hold.
//! 2. No released lease comes back: a (session, lease) whose `release()` returned `Ok` never
//!    appears among the holders at a later quiet point. Half of the clients release with
//!    `send_release` (returns once written, without the answer), so this also holds for a
//!    release the killed server never read, which the client sends again after the restart.
//! 3. Fencing tokens: the acknowledged tokens of a semaphore are distinct, and a grant whose
//!    acquire started after the server of restart k died has a greater token than every grant
//!    acknowledged before that death (a grant answered by the old server and re-sent to the new
//!    one keeps its old token, so "acknowledged after the restart" is not the right
//!    criterion; "started after the death" is).
//! 4. Capacity: at quiet points `in_use <= capacity`, nothing is left queued, and the clients
//!    hold at most `capacity` permits; at all times a per-semaphore counter of permits the
//!    clients hold (incremented after `acquire` returns, decremented *before* `release`) stays
//!    within the capacity.
//! 5. Progress: a minimum number of acquire/release pairs, and grants after the last restart.
//!
//! After the last round the clients shut down (closing their sessions) and the server is
//! killed once more: the restarted server must show no holder at all.
//!
//! The scenario runs with `--fsync batch` and snapshots every 4 KiB (so that kills also hit
//! snapshots, and recovery starts from them), and with `--fsync always` and no snapshot.
//! A third test pins down the worst case for a holder: killed just before its keep-alive
//! would be answered, the server down for a third of the TTL; the lease must survive. A fourth
//! kills the server every 30–120 ms while clients work through 400 run-once jobs: every
//! acknowledged completion survives with its token, and no job is granted after its
//! completion.
//!
//! Invariant 1 also checks, at every restart, that a resuming client's reconciliation of its
//! leases (it asks the coordinator which it still holds) never reports a lease lost that the
//! coordinator has. The opposite case has a test of its own: a holder whose grant the log
//! lost (its last frame cut short after the kill) is told its lease is lost, and
//! `turnstile run` stops its command and exits 76.
//!
//! # Longer soaks
//!
//! `TURNSTILE_CRASH_ROUNDS` sets the number of kills of the `--fsync batch` test (default
//! [`DEFAULT_ROUNDS`]); the `--fsync always` test runs a third of it (at least
//! [`MIN_ALWAYS_ROUNDS`]). `TURNSTILE_CRASH_SEED` fixes the seed (printed by every run). For
//! example, 500 rounds (about 6 minutes; 200 rounds take about 2.5):
//!
//! ```text
//! TURNSTILE_CRASH_ROUNDS=500 cargo test -p turnstile --test crash -- --nocapture
//! ```
//!
//! The server's log (all incarnations) is in the scratch directory, which is kept when the
//! test fails.

#[allow(dead_code)] // shared with cli.rs, which uses the parts this test does not
#[path = "../common/mod.rs"]
mod common;
mod server;
mod workload;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Scratch, BIN, SOON};
use server::*;
use tokio::sync::{mpsc, watch};
use turnstile_client::{Client, Error, Options, Permit, Semaphore, StatusDoc};
use workload::*;

/// Client tasks, each with a client (and a session) of its own.
const CLIENTS: usize = 8;
/// The semaphores and their capacities. A client picks the second one time in four.
const SEMAPHORES: [(&str, u32); 2] = [("crash", 3), ("crash-mutex", 1)];
/// The clients' session TTL (and the server's default, for the observer).
const SESSION_TTL: Duration = Duration::from_secs(3);
/// How long an acquire waits for a permit.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(400);
/// How long a client holds a permit, in milliseconds.
const HOLD_MS: (u64, u64) = (5, 60);
/// The first [`LONG_HOLDERS`] clients hold a permit of the first semaphore this long one
/// time in [`LONG_HOLD_ONE_IN`], in milliseconds: longer than the TTL and across several
/// kills, so the lease lives on keep-alives and session resumption alone.
const LONG_HOLD_MS: (u64, u64) = (3200, 4500);
/// See [`LONG_HOLD_MS`]. Fewer than the capacity, so that the others still get through.
const LONG_HOLDERS: usize = 2;
/// See [`LONG_HOLD_MS`].
const LONG_HOLD_ONE_IN: u64 = 3;
/// How long the clients run between a restart's quiet point and the next kill, milliseconds.
const RUN_MS: (u64, u64) = (50, 400);
/// An operation that takes longer than this hangs: a failure.
const OP_DEADLINE: Duration = Duration::from_secs(20);
/// One kill in [`OUTAGE_ONE_IN`] leaves the server down for this long (milliseconds) before
/// it restarts: up to 0.3 of the TTL, an outage that must cost no lease.
const OUTAGE_MS: (u64, u64) = (500, 900);
/// See [`OUTAGE_MS`].
const OUTAGE_ONE_IN: u64 = 6;
/// Longest kill-to-listening time the test can judge (0.4 of the TTL). A client gives its
/// leases up 0.9 TTL after its last answered keep-alive, which may have been sent TTL/3 before
/// the kill; so it must be back in contact within 0.57 TTL of the kill, and a longer outage
/// would make a lost lease legitimate.
const MAX_DOWNTIME: Duration = Duration::from_millis(1200);
/// Kills in the `--fsync batch` test unless `TURNSTILE_CRASH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: u32 = 30;
/// Fewest kills in the `--fsync always` test.
const MIN_ALWAYS_ROUNDS: u32 = 10;
/// Jobs of the job crash test.
const JOBS: usize = 400;
/// Clients working through them at once.
const JOB_RUNNERS: usize = 4;

/// `--fsync batch` (the default), with snapshots every 4 KiB so that kills also land during
/// snapshots and recovery goes through them.
#[test]
fn batch_fsync_with_snapshots_survives_sigkills() {
    let rounds = env_u64("TURNSTILE_CRASH_ROUNDS").map_or(DEFAULT_ROUNDS, |r| r as u32);
    run(Scenario {
        name: "batch",
        fsync: "batch",
        snapshot_every: Some("4KiB"),
        rounds,
    });
}

/// `--fsync always`, recovering from the log alone (default snapshot size), fewer rounds.
#[test]
fn always_fsync_survives_sigkills() {
    let rounds = env_u64("TURNSTILE_CRASH_ROUNDS")
        .map_or(MIN_ALWAYS_ROUNDS, |r| (r as u32 / 3).max(MIN_ALWAYS_ROUNDS));
    run(Scenario {
        name: "always",
        fsync: "always",
        snapshot_every: None,
        rounds,
    });
}

/// Kills in [`outage_of_a_third_of_the_ttl_costs_no_lease`].
const OUTAGE_KILLS: u32 = 4;

/// A server that is killed and stays down for a third of the TTL costs a client none of its
/// leases. The client gives its leases up 0.9 TTL after its last answered keep-alive, and the
/// kill comes just before a keep-alive would be answered (keep-alives go every TTL/3 from the
/// last reconnect), so its last contact is TTL/3 old: the client must be back within 0.57 TTL
/// of the kill, which leaves it 0.23 TTL (700 ms) after the server is back. Its reconnect
/// attempts must come often enough for that.
#[test]
fn outage_of_a_third_of_the_ttl_costs_no_lease() {
    let scenario = Scenario {
        name: "outage",
        fsync: "batch",
        snapshot_every: None,
        rounds: OUTAGE_KILLS,
    };
    let dir = Scratch::new("crash-outage");
    let mut server = CrashServer::new(&dir, &scenario);
    server.start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let options = Options {
            session_ttl: Some(SESSION_TTL),
            ..Options::default()
        };
        let client = Client::connect_with(&server.url(), options)
            .await
            .expect("connect");
        // Keep-alives go every TTL/3 from here on (and from every reconnect).
        let mut connected = Instant::now();
        let permit = client
            .semaphore("outage", 1)
            .await
            .expect("create the semaphore")
            .acquire()
            .await
            .expect("acquire");
        for kill in 1..=OUTAGE_KILLS {
            // Just before the next keep-alive: the last answered one is a third of a TTL old.
            let before_keepalive = SESSION_TTL / 3 - Duration::from_millis(50);
            tokio::time::sleep_until((connected + before_keepalive).into()).await;
            let killed = Instant::now();
            server.kill();
            tokio::time::sleep(SESSION_TTL / 3).await; // the outage
            server.start();
            // Answered once the client is connected again: it has resumed its session.
            let doc = tokio::time::timeout(OP_DEADLINE, client.status(Some("outage")))
                .await
                .expect("status hung")
                .expect("status");
            connected = Instant::now();
            eprintln!(
                "kill {kill}: the client was back {:?} after the kill",
                killed.elapsed()
            );
            assert_eq!(
                permit.lost_reason(),
                None,
                "kill {kill}: the server was back after {:?} (TTL {SESSION_TTL:?}), the client \
                 after {:?}",
                SESSION_TTL / 3,
                killed.elapsed(),
            );
            let holders: Vec<(String, u64)> = doc.semaphores[0]
                .holders
                .iter()
                .map(|h| (h.session.clone(), h.lease_id))
                .collect();
            assert_eq!(
                holders,
                vec![(format!("{:016x}", permit.session_id()), permit.lease_id())],
                "kill {kill}"
            );
        }
        permit.release().await.expect("release");
        client.shutdown().await.expect("shutdown");
    });
}

/// A holder whose grant the restarted coordinator no longer has is told so, and stops.
///
/// `turnstile run` holds the only permit of a semaphore, with `--fsync always`; the server is
/// killed, and the grant's record — the last frame of the log — is cut short, as a torn
/// write or a damaged end of the log would leave it. The restarted server cuts the torn frame
/// off (keeping its bytes in a side file named in its log) and recovers the session without
/// the lease. When the holder resumes its session it must learn that its lease is gone: its
/// command is stopped and it exits 76, rather than running on beside the next holder, whom
/// the coordinator will grant the same permit — with a greater fencing token, since it moved
/// its counters past every grant the cut bytes could have held.
#[test]
fn a_holder_whose_grant_the_log_lost_is_stopped() {
    let scenario = Scenario {
        name: "forgotten",
        fsync: "always",
        snapshot_every: None,
        rounds: 0,
    };
    let dir = Scratch::new("crash-forgotten");
    let mut server = CrashServer::new(&dir, &scenario);
    server.start();
    let url = server.url();
    let run = |label: &str, args: &[&str]| -> Group {
        let out = |ext: &str| File::create(dir.join(&format!("{label}.{ext}"))).expect("create");
        let child = Command::new(BIN)
            .args(args)
            .env("TURNSTILE_URL", &url)
            .env("DIR", dir.join(""))
            .env_remove("RUST_LOG")
            .env_remove("TURNSTILE_SESSION")
            .stdin(Stdio::null())
            .stdout(out("stdout"))
            .stderr(out("stderr"))
            .process_group(0)
            .spawn()
            .expect("spawn turnstile run");
        Group(child)
    };
    let mut holder = run(
        "holder",
        &[
            "run",
            "forgotten",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"echo $TURNSTILE_FENCING_TOKEN > "$DIR/token"
               echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid" && exec sleep 60"#,
        ],
    );
    let command: i32 = dir.wait_for("pid").trim().parse().expect("a pid");
    server.kill();

    // The grant is the last record of the log (keep-alives are not logged): cut it short.
    let wal = std::fs::read_dir(dir.join("data"))
        .expect("list the data directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .expect("a log segment");
    let bytes = std::fs::read(&wal).expect("read the log");
    let last = last_frame(&bytes);
    assert_eq!(bytes[last + 12], 5, "the last record is the grant");
    let cut = last + 7;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .and_then(|f| f.set_len(cut as u64))
        .expect("cut the log");
    server.start();

    let status = common::wait_until("the holder to exit", SOON, || {
        holder.0.try_wait().expect("try_wait")
    });
    let stderr = std::fs::read_to_string(dir.join("holder.stderr")).unwrap_or_default();
    assert_eq!(status.code(), Some(76), "{status:?}: {stderr}");
    assert!(stderr.contains("lost"), "{stderr}");
    common::wait_until("the command to be gone", Duration::from_secs(2), || {
        (!common::process_exists(command)).then_some(())
    });
    // The restarted server said what it cut, and kept the bytes.
    let side = wal.with_file_name(format!(
        "{}.torn-{last}",
        wal.file_name().expect("a file name").to_string_lossy()
    ));
    // Up to the last byte that is not zero: what follows could be the room a segment is
    // sized ahead with.
    let kept = &bytes[last..cut];
    let kept = &kept[..kept.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)];
    assert_eq!(std::fs::read(&side).expect("the side file"), kept);
    let log = std::fs::read_to_string(&server.log).expect("the server log");
    assert!(
        log.contains("torn") && log.contains(&*side.to_string_lossy()),
        "{log}"
    );
    // The permit is free for the next holder, whose token is above the forgotten one: the
    // restarted server moved its fencing counters past every grant the cut bytes could hold.
    let mut next = run(
        "next",
        &[
            "run",
            "forgotten",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"echo $TURNSTILE_FENCING_TOKEN > "$DIR/next-token""#,
        ],
    );
    let status = common::wait_until("the next holder to finish", SOON, || {
        next.0.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(0), "{status:?}");
    let token = |name: &str| -> u64 {
        let text = std::fs::read_to_string(dir.join(name)).expect("a token file");
        text.trim().parse().expect("a token")
    };
    assert!(
        token("next-token") > token("token"),
        "the forgotten holder's token {} was handed out again ({})",
        token("token"),
        token("next-token")
    );
}

/// Where the last frame of a log segment (format 2: an 8-byte header, then frames of
/// `len u32 LE | body crc | header crc | body`) starts.
fn last_frame(log: &[u8]) -> usize {
    assert_eq!(&log[..8], b"TSTLWAL\x02", "a log segment of format 2");
    let mut at = 8;
    let mut last = None;
    loop {
        // Frames run to the end of the file or to the zeros the segment is sized ahead with
        // (no frame's length is 0).
        if at >= log.len() || log[at..at + 4] == [0; 4] {
            return last.expect("a frame in the log");
        }
        let len = u32::from_le_bytes(log[at..at + 4].try_into().expect("4 bytes")) as usize;
        let next = at + 12 + len;
        assert!(next <= log.len(), "whole frames");
        last = Some(at);
        at = next;
    }
}

/// A `turnstile` process leading a process group of its own; the group is killed on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run-once jobs across SIGKILLs: [`JOB_RUNNERS`] clients work through the same [`JOBS`] jobs
/// (each attempt waits for a running one, "runs" for a few milliseconds, and records its
/// completion) while the server is killed and restarted every 30–120 ms, with snapshots every
/// 4 KiB. Checks that every completion `succeed()` acknowledged survives every later restart
/// with its token, that no attempt is ever granted a job after its completion (no grant with a
/// token above the completion's), and that in the end every job has completed.
#[test]
fn job_completions_survive_sigkills() {
    let scenario = Scenario {
        name: "jobs",
        fsync: "batch",
        snapshot_every: Some("4KiB"),
        rounds: 0,
    };
    let seed = env_u64("TURNSTILE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("job crash test: seed {seed} (set TURNSTILE_CRASH_SEED to repeat)");
    let dir = Scratch::new("crash-jobs");
    let mut server = CrashServer::new(&dir, &scenario);
    server.start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Every grant (job, token), and every acknowledged completion (job -> token).
    let grants: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let acked: Arc<Mutex<BTreeMap<usize, u64>>> = Arc::default();
    let url = server.url();
    let mut rng = Rng::new(seed);
    let kills = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for r in 0..JOB_RUNNERS {
            let options = Options {
                session_ttl: Some(SESSION_TTL),
                ..Options::default()
            };
            let client = Client::connect_with(&url, options).await.expect("connect");
            let (grants, acked) = (grants.clone(), acked.clone());
            let mut rng = Rng::new(seed ^ (r as u64 + 1));
            tasks.spawn(async move {
                for k in 0..JOBS {
                    let job = (k + r * JOBS / JOB_RUNNERS) % JOBS;
                    let name = format!("crash-job-{job}");
                    loop {
                        let begun = tokio::time::timeout(
                            OP_DEADLINE,
                            client.begin_job(&name, Some("crash-jobs")),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("begin {name} hung"));
                        let attempt = match begun {
                            Ok(turnstile_client::JobStart::Run(a)) => a,
                            Ok(turnstile_client::JobStart::Completed(_)) => break,
                            Ok(turnstile_client::JobStart::Running(r)) => {
                                panic!("a waiting attempt got Running: {r:?}")
                            }
                            // A call cut by a kill: try the job again.
                            Err(_) => continue,
                        };
                        lock(&grants).push((job, attempt.fencing_token()));
                        let token = attempt.fencing_token();
                        tokio::time::sleep(Duration::from_millis(rng.range((1, 15)))).await;
                        let done = tokio::time::timeout(OP_DEADLINE, attempt.succeed())
                            .await
                            .unwrap_or_else(|_| panic!("succeed {name} hung"));
                        if done.is_ok() {
                            let before = lock(&acked).insert(job, token);
                            assert_eq!(before, None, "{name} acknowledged twice");
                            break;
                        }
                    }
                }
                client
            });
        }
        // Kill and restart the server under them until they are through.
        let mut kills = 0;
        while !tasks.is_empty() {
            let run = Duration::from_millis(rng.range((30, 120)));
            match tokio::time::timeout(run, tasks.join_next()).await {
                Ok(Some(r)) => {
                    let client = r.expect("a runner panicked");
                    let _ = client.shutdown().await;
                }
                Ok(None) => break,
                Err(_) => {
                    server.kill();
                    server.start();
                    kills += 1;
                }
            }
        }
        // One more crash, then the record must hold every acknowledged completion.
        server.kill();
        server.start();
        let observer = Client::connect(&url).await.expect("connect");
        let doc = tokio::time::timeout(OP_DEADLINE, observer.status(None))
            .await
            .expect("status hung")
            .expect("status");
        let _ = observer.shutdown().await;
        let acked = lock(&acked);
        for job in 0..JOBS {
            let name = format!("crash-job-{job}");
            let status = doc
                .jobs
                .iter()
                .find(|j| j.name == name)
                .unwrap_or_else(|| panic!("{name} missing after the last restart"));
            let completed = status
                .completed
                .as_ref()
                .unwrap_or_else(|| panic!("{name} not completed: {status:?}"));
            if let Some(token) = acked.get(&job) {
                assert_eq!(
                    completed.token, *token,
                    "{name}: the acknowledged completion"
                );
            }
            let later: Vec<u64> = lock(&grants)
                .iter()
                .filter(|(j, t)| *j == job && *t > completed.token)
                .map(|(_, t)| *t)
                .collect();
            assert!(
                later.is_empty(),
                "{name} completed with token {} but was granted again: {later:?}",
                completed.token
            );
        }
        kills
    });
    eprintln!("job crash test: {kills} kills while {JOB_RUNNERS} runners did {JOBS} jobs");
    assert!(
        kills >= 3,
        "the kills must land while the jobs run ({kills})"
    );
}
