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
mod common;

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
use tokio::sync::{mpsc, watch};
use turnstile_client::{Client, Error, Options, Permit, Semaphore, StatusDoc};

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
    assert_eq!(
        std::fs::read(&side).expect("the side file"),
        &bytes[last..cut]
    );
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
    loop {
        let len = u32::from_le_bytes(log[at..at + 4].try_into().expect("4 bytes")) as usize;
        let next = at + 12 + len;
        if next >= log.len() {
            assert_eq!(next, log.len(), "whole frames");
            return at;
        }
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

struct Scenario {
    name: &'static str,
    fsync: &'static str,
    /// `--snapshot-every`; `None` keeps the default (no snapshot in a test this size).
    snapshot_every: Option<&'static str>,
    rounds: u32,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// A tiny xorshift64 generator: reproducible scenarios without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that close seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..=hi` (near enough).
    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.range((1, n)) == 1
    }
}

/// A `turnstile serve` process on a fixed port and data directory that the test kills and
/// restarts. Killed on drop.
struct CrashServer {
    port: u16,
    args: Vec<String>,
    /// stderr of every incarnation, appended.
    log: PathBuf,
    child: Option<Child>,
}

impl CrashServer {
    fn new(dir: &Scratch, scenario: &Scenario) -> CrashServer {
        // A free port, chosen once: every incarnation listens on it, so clients find it again.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http",
            "off",
            "--data-dir",
            &dir.join("data").display().to_string(),
            "--fsync",
            scenario.fsync,
            "--session-ttl",
            &format!("{}ms", SESSION_TTL.as_millis()),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        if let Some(size) = scenario.snapshot_every {
            args.extend(["--snapshot-every".to_owned(), size.to_owned()]);
        }
        CrashServer {
            port,
            args,
            log: dir.join("server.log"),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it listens. A failed bind (the port not free yet) is
    /// retried for a while; any other failure to start (a data directory that does not
    /// recover, say) fails the test.
    fn start(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let deadline = Instant::now() + SOON;
        loop {
            match self.try_start() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) if why.contains("cannot listen") && Instant::now() < deadline => {
                    // Retry backoff for a port that is not free yet; there is no event to await.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(why) => panic!("turnstile serve did not start: {why}"),
            }
        }
    }

    fn try_start(&mut self) -> Result<Child, String> {
        let mut stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server log");
        let log_start = stderr.seek(SeekFrom::End(0)).expect("seek the server log");
        let mut child = Command::new(BIN)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn turnstile serve");
        let stdout = child.stdout.take().expect("the server's stdout is piped");
        // Read on a thread, so that a server that never prints cannot hang the test; it then
        // drains the pipe until the server exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            let _ = reader.read_to_end(&mut Vec::new());
        });
        let expected = format!("listening on 127.0.0.1:{}", self.port);
        let outcome = rx.recv_timeout(SOON);
        if matches!(&outcome, Ok(Ok(line)) if line.trim_end() == expected) {
            return Ok(child);
        }
        let _ = child.kill();
        let status = child.wait();
        let mut log = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(log_start));
            let _ = f.read_to_string(&mut log);
        }
        Err(format!(
            "first line {outcome:?}, exit {status:?}, stderr:\n{log}"
        ))
    }

    /// Kills the server with SIGKILL and waits until it is gone. Returns the instant it was
    /// known dead: every reply received before it came from a server that is no more.
    fn kill(&mut self) -> Instant {
        let child = self.child.as_mut().expect("the server is running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited on its own ({status:?}); its log:\n{}",
                log_tail(&self.log)
            );
        }
        child.kill().expect("SIGKILL the server");
        let status = child.wait().expect("wait for the killed server");
        self.child = None;
        assert_eq!(status.signal(), Some(9), "the server died of SIGKILL");
        Instant::now()
    }
}

impl Drop for CrashServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A permit a client holds, as the clients and the server describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Held {
    /// Index in [`SEMAPHORES`].
    sem: usize,
    session: u64,
    lease: u64,
    token: u64,
}

/// An acknowledged grant.
struct GrantRecord {
    held: Held,
    /// When `acquire` was called: its lease id did not exist before.
    started: Instant,
    /// When `acquire` returned it.
    acked: Instant,
}

/// What the clients do: run, wait at a quiet point (numbered), or finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Run,
    Pause(u64),
    Stop,
}

/// A client's report that it is idle at quiet point `pause`, holding `held`.
struct Parked {
    client: usize,
    pause: u64,
    held: Option<Held>,
}

/// What the client tasks share with the test.
struct Shared {
    epoch: Instant,
    /// Per semaphore: permits the clients hold right now.
    holding: [AtomicU32; SEMAPHORES.len()],
    grants: Mutex<Vec<GrantRecord>>,
    /// (session, lease) of every release that returned `Ok`.
    released: Mutex<HashSet<(u64, u64)>>,
    pairs: AtomicU64,
    timeouts: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        let what = format!("[{:>7.3}s] {what}", self.epoch.elapsed().as_secs_f64());
        eprintln!("FAILURE {what}");
        lock(&self.failures).push(what);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client task.
struct Worker {
    id: usize,
    client: Client,
    semaphores: Vec<Semaphore>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    parked: mpsc::UnboundedSender<Parked>,
    rng: Rng,
    /// The last quiet point this worker reported at.
    reported: u64,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if !self.park(None).await {
                break;
            }
            let s = usize::from(self.rng.one_in(4));
            let (name, capacity) = SEMAPHORES[s];
            let started = Instant::now();
            let acquired = tokio::time::timeout(
                OP_DEADLINE,
                self.semaphores[s].acquire_timeout(ACQUIRE_TIMEOUT),
            )
            .await;
            let permit = match acquired {
                Ok(Ok(permit)) => permit,
                // A deadline that passes while the coordinator is down for a restart ends the
                // wait as "unreachable" (issue 19): a timeout all the same.
                Ok(Err(Error::TimedOut | Error::Unavailable { .. })) => {
                    self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Ok(Err(e)) => {
                    self.fail(format!("acquire of {name} failed: {e} ({e:?})"));
                    continue;
                }
                Err(_) => {
                    self.fail(format!("acquire of {name} hung for {OP_DEADLINE:?}"));
                    continue;
                }
            };
            let acked = Instant::now();
            let now_holding = self.shared.holding[s].fetch_add(1, Ordering::SeqCst) + 1;
            if now_holding > capacity {
                self.fail(format!(
                    "{now_holding} permits of {name} (capacity {capacity}) held at once"
                ));
            }
            let held = Held {
                sem: s,
                session: permit.session_id(),
                lease: permit.lease_id(),
                token: permit.fencing_token(),
            };
            lock(&self.shared.grants).push(GrantRecord {
                held,
                started,
                acked,
            });
            let stop = self.hold(&permit, held).await;
            if let Some(reason) = permit.lost_reason() {
                self.fail(format!("lost {held:?}: {reason}"));
                self.shared.holding[s].fetch_sub(1, Ordering::SeqCst);
                // A lost permit is dropped without a release.
                if stop {
                    break;
                }
                continue;
            }
            // Not held any more as far as the count goes, before the server may give it away.
            self.shared.holding[s].fetch_sub(1, Ordering::SeqCst);
            // Odd clients do not wait for the release's answer (as the Python package does):
            // kills then also hit releases that only the client's re-send after the restart
            // can deliver, and invariant 2 must hold for them too.
            let release = async {
                if self.id % 2 == 1 {
                    permit.send_release().await
                } else {
                    permit.release().await
                }
            };
            match tokio::time::timeout(OP_DEADLINE, release).await {
                Ok(Ok(())) => {
                    lock(&self.shared.released).insert((held.session, held.lease));
                    self.shared.pairs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => self.fail(format!("release of {held:?} failed: {e} ({e:?})")),
                Err(_) => self.fail(format!("release of {held:?} hung for {OP_DEADLINE:?}")),
            }
            if stop {
                break;
            }
        }
        if let Err(e) = self.client.shutdown().await {
            self.fail(format!("shutdown failed: {e}"));
        }
    }

    fn fail(&self, what: String) {
        self.shared.fail(format!("client {}: {what}", self.id));
    }

    /// Holds `permit` for a random time, parking at quiet points meanwhile. Returns whether
    /// the test said stop. Returns early if the permit is lost.
    async fn hold(&mut self, permit: &Permit, held: Held) -> bool {
        let ms = if self.id < LONG_HOLDERS && held.sem == 0 && self.rng.one_in(LONG_HOLD_ONE_IN) {
            self.rng.range(LONG_HOLD_MS)
        } else {
            self.rng.range(HOLD_MS)
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            if matches!(
                *self.phase.borrow_and_update(),
                Phase::Pause(_) | Phase::Stop
            ) && !self.park(Some((held, permit))).await
            {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = permit.lost() => return false,
                changed = self.phase.changed() => if changed.is_err() {
                    return true;
                },
            }
        }
    }

    /// Waits while the clients are paused. At each new quiet point it first talks to the
    /// server (so it is connected and its session resumed), then reports what it holds.
    /// Returns false when the test says stop.
    async fn park(&mut self, holding: Option<(Held, &Permit)>) -> bool {
        let mut lost_reported = false;
        loop {
            let phase = *self.phase.borrow_and_update();
            match phase {
                Phase::Run => return true,
                Phase::Stop => return false,
                Phase::Pause(id) if id != self.reported => {
                    self.reported = id;
                    match tokio::time::timeout(OP_DEADLINE, self.client.status(Some("crash"))).await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => self.fail(format!("status at quiet point {id}: {e}")),
                        Err(_) => self.fail(format!("status at quiet point {id} hung")),
                    }
                    let _ = self.parked.send(Parked {
                        client: self.id,
                        pause: id,
                        held: holding.map(|(held, _)| held),
                    });
                }
                Phase::Pause(_) => {}
            }
            let lost = async {
                match holding {
                    Some((held, permit)) if !lost_reported => (held, permit.lost().await),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.phase.changed() => if changed.is_err() {
                    return false;
                },
                (held, reason) = lost => {
                    lost_reported = true;
                    self.fail(format!("lost {held:?} while parked: {reason}"));
                }
            }
        }
    }
}

/// The test's side: the server, the observer client, the clients' controls and the record
/// of what happened.
struct Driver {
    server: CrashServer,
    observer: Client,
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    parked: mpsc::UnboundedReceiver<Parked>,
    pause: u64,
    /// When each killed server was known dead.
    deaths: Vec<Instant>,
    /// Kill-to-listening times.
    downtimes: Vec<Duration>,
    /// Kills, restarts and quiet points, for failure messages.
    timeline: Vec<String>,
}

impl Driver {
    fn note(&mut self, what: String) {
        let line = format!(
            "[{:>7.3}s] {what}",
            self.shared.epoch.elapsed().as_secs_f64()
        );
        self.timeline.push(line);
    }

    /// Panics with the failures the clients recorded, if any, and the timeline.
    fn check_failures(&self, when: &str) {
        let failures = lock(&self.shared.failures);
        if !failures.is_empty() {
            panic!(
                "{} failure(s) by {when}:\n{}\n\ntimeline (last 30):\n{}\n\nserver log (tail):\n{}",
                failures.len(),
                failures.join("\n"),
                self.timeline[self.timeline.len().saturating_sub(30)..].join("\n"),
                log_tail(&self.server.log),
            );
        }
    }

    /// Kills the server and, after `outage`, starts it again on the same port and data
    /// directory.
    async fn crash_and_restart(&mut self, round: u32, quiet: bool, outage: Duration) {
        let killed = Instant::now();
        let dead = self.server.kill();
        self.deaths.push(dead);
        if !outage.is_zero() {
            // Part of the scenario: the server stays down for a while.
            tokio::time::sleep(outage).await;
        }
        self.server.start();
        let downtime = killed.elapsed();
        self.downtimes.push(downtime);
        let kind = if quiet { "quiet" } else { "busy" };
        self.note(format!(
            "kill {round} ({kind}, outage {outage:?}); back after {downtime:?}"
        ));
        assert!(
            downtime < MAX_DOWNTIME,
            "restart {round} took {downtime:?}: too slow to judge lease losses \
             (TTL {SESSION_TTL:?})"
        );
    }

    /// Pauses the clients, waits until they are all idle and connected, and checks the
    /// server's holders against theirs. Returns the holders. The clients stay paused.
    async fn quiet_point(&mut self, label: &str) -> BTreeSet<Held> {
        self.pause += 1;
        let id = self.pause;
        self.phase.send_replace(Phase::Pause(id));
        let deadline = tokio::time::Instant::now() + OP_DEADLINE + SOON;
        let mut reports: BTreeMap<usize, Option<Held>> = BTreeMap::new();
        while reports.len() < CLIENTS {
            match tokio::time::timeout_at(deadline, self.parked.recv()).await {
                Ok(Some(p)) if p.pause == id => {
                    reports.insert(p.client, p.held);
                }
                Ok(Some(_)) => {} // a report for an earlier quiet point
                Ok(None) => {
                    self.check_failures(label);
                    panic!("{label}: the client tasks are gone");
                }
                Err(_) => {
                    self.check_failures(label);
                    panic!(
                        "{label}: only clients {:?} of {CLIENTS} became idle",
                        reports.keys()
                    );
                }
            }
        }
        self.check_failures(label);
        self.note(format!("quiet point {id} ({label})"));

        let doc: StatusDoc =
            match tokio::time::timeout(OP_DEADLINE, self.observer.status(None)).await {
                Ok(Ok(doc)) => doc,
                Ok(Err(e)) => panic!("{label}: status failed: {e}"),
                Err(_) => panic!("{label}: status hung"),
            };
        let clients: BTreeSet<Held> = reports.values().flatten().copied().collect();
        let mut server = BTreeSet::new();
        for (s, (name, capacity)) in SEMAPHORES.iter().enumerate() {
            let sem = doc
                .semaphores
                .iter()
                .find(|x| x.name == *name)
                .unwrap_or_else(|| panic!("{label}: semaphore {name} is gone: {doc:?}"));
            assert_eq!(sem.capacity, *capacity, "{label}: {sem:?}");
            assert!(!sem.closed, "{label}: {sem:?}");
            assert!(
                sem.in_use <= *capacity,
                "{label}: {name} has {} permits in use, capacity {capacity}: {sem:?}",
                sem.in_use
            );
            let weights: u32 = sem.holders.iter().map(|h| h.weight).sum();
            assert_eq!(sem.in_use, weights, "{label}: in_use vs holders: {sem:?}");
            assert_eq!(
                sem.queued, 0,
                "{label}: {name} has queued acquires while no client waits: {sem:?}"
            );
            let believed = clients.iter().filter(|h| h.sem == s).count();
            assert!(
                believed <= *capacity as usize,
                "{label}: clients believe they hold {believed} permits of {name} \
                 (capacity {capacity})"
            );
            for h in &sem.holders {
                let session = u64::from_str_radix(&h.session, 16)
                    .unwrap_or_else(|_| panic!("{label}: bad session {:?}", h.session));
                server.insert(Held {
                    sem: s,
                    session,
                    lease: h.lease_id,
                    token: h.token,
                });
            }
        }
        {
            let released = lock(&self.shared.released);
            let back: Vec<&Held> = server
                .iter()
                .filter(|h| released.contains(&(h.session, h.lease)))
                .collect();
            assert!(
                back.is_empty(),
                "{label}: released leases are held again: {back:?}"
            );
        }
        if server != clients {
            panic!(
                "{label}: the server's holders differ from what the clients hold\n\
                 only on the server: {:?}\nonly in the clients: {:?}\n\ntimeline (last 30):\n{}\n\n\
                 server log (tail):\n{}",
                server.difference(&clients).collect::<Vec<_>>(),
                clients.difference(&server).collect::<Vec<_>>(),
                self.timeline[self.timeline.len().saturating_sub(30)..].join("\n"),
                log_tail(&self.server.log),
            );
        }
        server
    }

    fn resume(&mut self) {
        self.phase.send_replace(Phase::Run);
    }

    /// Grants whose acquire started after the last kill, overall and per semaphore.
    fn grants_since_last_kill(&self) -> (usize, [usize; SEMAPHORES.len()]) {
        let last = self.deaths.last().copied();
        let grants = lock(&self.shared.grants);
        let mut per = [0; SEMAPHORES.len()];
        for g in grants.iter().filter(|g| last.is_none_or(|d| g.started > d)) {
            per[g.held.sem] += 1;
        }
        (per.iter().sum(), per)
    }
}

/// Checks invariant 3 on every acknowledged grant.
fn check_tokens(grants: &[GrantRecord], deaths: &[Instant]) {
    for (s, (name, _)) in SEMAPHORES.iter().enumerate() {
        let mine: Vec<&GrantRecord> = grants.iter().filter(|g| g.held.sem == s).collect();
        let mut seen = BTreeMap::new();
        for g in &mine {
            if let Some(other) = seen.insert(g.held.token, g.held) {
                panic!(
                    "{name}: token {} acknowledged twice: {other:?} and {:?}",
                    g.held.token, g.held
                );
            }
        }
        for (k, &dead) in deaths.iter().enumerate() {
            let before = mine
                .iter()
                .filter(|g| g.acked < dead)
                .map(|g| g.held.token)
                .max();
            let after = mine
                .iter()
                .filter(|g| g.started > dead)
                .map(|g| g.held.token)
                .min();
            if let (Some(before), Some(after)) = (before, after) {
                assert!(
                    after > before,
                    "{name}: after restart {}, a new grant got token {after}, but token {before} \
                     had been acknowledged before the crash",
                    k + 1
                );
            }
        }
    }
}

fn run(scenario: Scenario) {
    let seed = env_u64("TURNSTILE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "crash test {}: {} rounds, seed {seed} (TURNSTILE_CRASH_SEED={seed} to repeat the choices)",
        scenario.name, scenario.rounds
    );
    let dir = Scratch::new(&format!("crash-{}", scenario.name));
    let mut server = CrashServer::new(&dir, &scenario);
    server.start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // The driver runs on this thread (block_on), so its blocking process handling stalls no
    // client task; the clients run on the runtime's workers.
    runtime.block_on(drive(&scenario, server, &dir, seed));
}

async fn drive(scenario: &Scenario, server: CrashServer, dir: &Scratch, seed: u64) {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let url = server.url();
    let options = || Options {
        session_ttl: Some(SESSION_TTL),
        ..Options::default()
    };
    let observer = Client::connect_with(&url, options())
        .await
        .expect("connect the observer");
    let shared = Arc::new(Shared {
        epoch: started,
        holding: Default::default(),
        grants: Mutex::new(Vec::new()),
        released: Mutex::new(HashSet::new()),
        pairs: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let (parked_tx, parked_rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let client = Client::connect_with(&url, options())
            .await
            .expect("connect a client");
        let mut semaphores = Vec::new();
        for (name, capacity) in SEMAPHORES {
            semaphores.push(
                client
                    .semaphore(name, capacity)
                    .await
                    .expect("create the semaphore"),
            );
        }
        let worker = Worker {
            id,
            client,
            semaphores,
            shared: shared.clone(),
            phase: phase_rx.clone(),
            parked: parked_tx.clone(),
            rng: Rng::new(rng.next()),
            reported: 0,
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    drop(parked_tx);
    let mut d = Driver {
        server,
        observer,
        shared: shared.clone(),
        phase: phase_tx,
        parked: parked_rx,
        pause: 0,
        deaths: Vec::new(),
        downtimes: Vec::new(),
        timeline: Vec::new(),
    };

    let (mut quiet_kills, mut outages) = (0, 0);
    for round in 1..=scenario.rounds {
        // The clients run for a random while; then a kill at whatever moment that is.
        tokio::time::sleep(Duration::from_millis(rng.range(RUN_MS))).await;
        let quiet = rng.one_in(4);
        let before = if quiet {
            quiet_kills += 1;
            Some(d.quiet_point(&format!("before kill {round}")).await)
        } else {
            None
        };
        let outage = if rng.one_in(OUTAGE_ONE_IN) {
            outages += 1;
            Duration::from_millis(rng.range(OUTAGE_MS))
        } else {
            Duration::ZERO
        };
        d.crash_and_restart(round, quiet, outage).await;
        let after = d.quiet_point(&format!("after restart {round}")).await;
        if let Some(before) = before {
            assert_eq!(
                before, after,
                "a kill with nothing in flight changed the holders (round {round})"
            );
        }
        d.resume();
    }

    // Progress after the last restart: wait for grants on every semaphore.
    let deadline = Instant::now() + SOON;
    loop {
        let (total, per) = d.grants_since_last_kill();
        if total >= 2 * CLIENTS && per.iter().all(|&n| n > 0) {
            break;
        }
        d.check_failures("the last run");
        assert!(
            Instant::now() < deadline,
            "only {total} grants ({per:?}) in {SOON:?} after the last restart"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    d.quiet_point("the end").await;

    // The clients release what they hold and close their sessions.
    d.phase.send_replace(Phase::Stop);
    for task in tasks {
        tokio::time::timeout(OP_DEADLINE, task)
            .await
            .expect("a client task finished")
            .expect("a client task did not panic");
    }
    d.check_failures("the clients' shutdown");
    let holders = |doc: &StatusDoc| -> Vec<String> {
        doc.semaphores
            .iter()
            .flat_map(|s| s.holders.iter().map(move |h| format!("{}: {h:?}", s.name)))
            .collect()
    };
    let doc = d.observer.status(None).await.expect("status");
    assert_eq!(holders(&doc), Vec::<String>::new(), "held after shutdown");
    // Closed sessions stay closed across a crash.
    d.crash_and_restart(scenario.rounds + 1, true, Duration::ZERO)
        .await;
    let doc = tokio::time::timeout(OP_DEADLINE, d.observer.status(None))
        .await
        .expect("status after the final restart hung")
        .expect("status after the final restart");
    assert_eq!(
        holders(&doc),
        Vec::<String>::new(),
        "held after the final restart"
    );
    assert_eq!(
        doc.semaphores.iter().map(|s| s.in_use).sum::<u32>(),
        0,
        "{doc:?}"
    );

    let grants = std::mem::take(&mut *lock(&shared.grants));
    check_tokens(&grants, &d.deaths);
    let pairs = shared.pairs.load(Ordering::Relaxed);
    let min_pairs = u64::from(scenario.rounds) * 3;
    assert!(
        pairs >= min_pairs,
        "only {pairs} acquire/release pairs in {} rounds (want {min_pairs})",
        scenario.rounds
    );
    if scenario.snapshot_every.is_some() {
        let snapshots = std::fs::read_dir(dir.join("data"))
            .expect("list the data directory")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            .count();
        assert!(
            snapshots > 0,
            "no snapshot was taken: the test missed a path"
        );
    }
    let max_down = d.downtimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "crash test {}: {} kills ({quiet_kills} quiet, {outages} with an outage), \
         {pairs} acquire/release pairs, {} grants, {} acquire timeouts, longest restart \
         {max_down:?}, {:.1}s",
        scenario.name,
        d.deaths.len(),
        grants.len(),
        shared.timeouts.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    let _ = d.observer.shutdown().await;
}
