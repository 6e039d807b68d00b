//! `turnstile nanny`: run N copies of a command, restart them when they die, and free a dead
//! worker's leases at once.
//!
//! One task drives everything. It wakes on SIGCHLD, on SIGTERM/SIGINT/SIGQUIT/SIGHUP, and at
//! the next deadline (a restart that is due, a stop that must escalate to SIGKILL, a check for
//! leftover processes, a memory sample), then brings every worker's state up to date:
//!
//! ```text
//!          ┌──────────────── restart, after the backoff ────────────────┐
//!          ▼                                                             │
//!      Waiting ──spawn──▶ Running ──its process exits───────▶ Stopping ──┴─▶ Ended (no restart)
//!                            │      (leftovers: SIGKILL now)     ▲    once no process is left:
//!                            └─over memory, SIGHUP, SIGTERM──────┘    end its session
//!                              (SIGTERM; SIGKILL after --stop-timeout)
//! ```
//!
//! SIGHUP also starts Ended workers again.
//!
//! The nanny reaps every child itself with `waitpid(-1)`, so it never uses tokio's child
//! handling, which would race it for exit statuses. It is a child subreaper, so every
//! process that a worker leaves behind is re-parented to it rather than to init, and can be
//! found, killed and reaped (see `procfs` for how processes are assigned to workers).
//!
//! Sessions: each run of a worker gets a fresh random session id in `TURNSTILE_SESSION`, which
//! the client library uses. When the run is over *and none of its processes is left*, the
//! nanny ends that session through its own client (`Client::end_session`), so the
//! coordinator hands the leases on at once instead of after the session TTL; on the file
//! backend the lease files are removed. Waiting for the leftovers first means no process of a
//! dead worker can still be acting under a lease that was handed on. If the backend cannot
//! be reached, the nanny logs one line and the session TTL frees the leases as before.
//!
//! A coordinator that goes away does not stop the nanny: its client says so calmly at a
//! growing interval while the workers go on. With `--death-timeout DUR` (after Dask's
//! Nanny), the nanny stops its workers as on SIGTERM once the coordinator has been
//! unreachable for DUR, and exits 69. Once its workers are reaped, the nanny waits at most
//! [`FLUSH_TIMEOUT`] for the coordinator.

mod cgroup;
mod ender;
mod policy;
mod process;
pub(crate) mod procfs;

use self::ender::SessionEnder;
use self::process::{leader, read_table, signal_all, spawn, StartFailure};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use turnstile_client::{Client, Options, SESSION_ENV, URL_ENV};

use self::cgroup::Cgroups;
use self::policy::Restart;
use self::policy::{Backoff, Decision, End, Exit, History, Policy, StartLimit};
use self::procfs::{format_size, Table};
use crate::guard::{Link, Listener, Started};
use crate::run::Signals;
use crate::{parse_duration, parse_size, UrlArg};

/// The environment variable that tells a worker its index, 0 to N-1.
pub const WORKER_ENV: &str = "TURNSTILE_WORKER";

/// Exit code when every worker has ended without a restart and one was given up on or ended
/// with a failure.
const EXIT_WORKERS_FAILED: u8 = 1;

/// How often memory is sampled when `--memory-limit` is set (only the workers' trees are
/// read: a `children` and a `statm` file per process)...
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// ... and how often while a worker uses more than half its limit, so that a fast allocator
/// is caught near the limit.
const SAMPLE_NEAR: Duration = Duration::from_millis(10);
/// The longest a worker over its memory limit has between SIGTERM and SIGKILL; none past
/// twice the limit, and none once it grows further.
const MEMORY_GRACE: Duration = Duration::from_secs(1);
/// Growth after SIGTERM that counts as "still growing" (RSS jitters by a few pages).
const MEMORY_SLACK: u64 = 1 << 20;
/// First and longest wait between two looks for the leftover processes of a stopping worker:
/// after SIGKILL they are gone within milliseconds, so look again soon, then less often.
const FIRST_CHECK: Duration = Duration::from_millis(5);
const MAX_CHECK: Duration = Duration::from_millis(250);
/// The longest sleep with nothing to do: a safety net in case a SIGCHLD is missed.
const IDLE: Duration = Duration::from_secs(5);
/// Bounds on talking to the backend, which must never hold up the workers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const END_SESSION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an exiting nanny waits for the session ends still in flight: its workers are
/// gone by then, and a session not ended expires by its TTL.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How often `--death-timeout` looks at the coordinator's reachability.
const DEATH_CHECK: Duration = Duration::from_millis(200);
/// How often the nanny tries to connect while it has no client, for `--death-timeout` to
/// notice a coordinator that comes (back).
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Arguments of `turnstile nanny`.
#[derive(clap::Args, Debug)]
pub struct NannyArgs {
    /// Number of workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    workers: u32,
    /// Which ends of a worker lead to a restart: always, on-failure (a non-zero status or a
    /// signal), never.
    #[arg(long, value_enum, default_value = "always")]
    restart: Restart,
    /// Delay before a restart: MIN after a first crash, doubled after each consecutive crash,
    /// at most MAX (`1s` alone means a fixed delay). A worker that ran for the longer of MAX
    /// and 10s before it crashed starts over at MIN; a worker that exits with status 0 is
    /// restarted after MIN.
    #[arg(long, value_name = "MIN..MAX", default_value = "100ms..30s", value_parser = parse_backoff)]
    backoff: Backoff,
    /// Give up on a worker that crashes R times within --within (like systemd's
    /// StartLimitBurst). Memory-limit restarts count as crashes.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    max_restarts: Option<u32>,
    /// The window of --max-restarts.
    #[arg(long, value_name = "DUR", default_value = "1m", value_parser = parse_duration, requires = "max_restarts")]
    within: Duration,
    /// Stop and restart a worker whose processes together use more resident memory than this
    /// (e.g. 512MiB, 2GiB), whatever --restart says: SIGTERM, then SIGKILL after 1s, or at
    /// once if it keeps growing or uses twice the limit. Enforced by the kernel (cgroup v2
    /// memory.max) where the nanny can create cgroups, else sampled every 50ms (10ms near
    /// the limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// After SIGTERM, how long a worker's processes have to exit before they get SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    stop_timeout: Duration,
    /// Set K=V in every worker's environment (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Stop the workers (as on SIGTERM) and exit 69 once the coordinator has been
    /// unreachable for this long. Without it the nanny keeps supervising while the
    /// coordinator is away.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    death_timeout: Option<Duration>,
    #[command(flatten)]
    url: UrlArg,
    /// The worker's command and its arguments.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    command: Vec<String>,
}

/// Parses `--backoff`: `MIN..MAX`, or one duration for a fixed delay.
fn parse_backoff(s: &str) -> Result<Backoff, String> {
    let (min, max) = match s.split_once("..") {
        Some((min, max)) => (parse_duration(min)?, parse_duration(max)?),
        None => {
            let d = parse_duration(s)?;
            (d, d)
        }
    };
    if min > max {
        return Err(format!("MIN is longer than MAX in {s:?}"));
    }
    if min.is_zero() && !max.is_zero() {
        return Err(format!(
            "MIN must be above zero in {s:?}, or there is nothing to double"
        ));
    }
    Ok(Backoff { min, max })
}

/// Parses `--env K=V`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!("{s:?} is not K=V"));
    };
    if key.is_empty() || key.contains('\0') || value.contains('\0') {
        return Err(format!("{s:?} is not K=V"));
    }
    if [WORKER_ENV, SESSION_ENV, URL_ENV].contains(&key) {
        return Err(format!(
            "{key} is set by the nanny (use --url for the backend)"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Runs the nanny until it is stopped by a signal or has no worker left to run.
pub async fn nanny(args: NannyArgs) -> anyhow::Result<ExitCode> {
    let url = args.url.get();
    let policy = Policy {
        restart: args.restart,
        backoff: args.backoff,
        limit: args.max_restarts.map(|burst| StartLimit {
            burst,
            within: args.within,
        }),
    };
    // Without this, orphans of a worker go to init, out of reach. Linux only; elsewhere the
    // process groups still cover what stays in them.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("cannot become a child subreaper ({e}): processes that leave a worker's process group and are orphaned may outlive it");
    }
    // Catch signals before the first worker exists, so none is missed.
    let mut sigs = Signals::new()?;
    let mut sigchld = signal(SignalKind::child())?;
    let command = args.command;
    let env = args.env;
    // Each worker runs under a guard that connects here: if the nanny dies, even by SIGKILL,
    // every guard kills its worker's whole tree.
    let listener = Listener::bind().context("cannot listen for the workers' guards")?;
    let mut links = HashMap::new();
    let cgroups = args.memory_limit.and_then(|limit| match Cgroups::setup(limit) {
        Ok(groups) => {
            info!(
                "memory limit {}: enforced by the kernel (a cgroup v2 group per worker under {}, memory.max)",
                format_size(limit),
                groups.parent().display()
            );
            Some(groups)
        }
        Err(why) => {
            info!(
                "memory limit {}: sampled every {}ms, since the kernel cannot enforce it here ({why})",
                format_size(limit),
                SAMPLE_EVERY.as_millis()
            );
            None
        }
    });
    // A command that cannot be started at all is a usage error, reported like `turnstile
    // run` does, rather than a crash loop.
    let first_session = turnstile_client::new_session_id();
    let first = match spawn(
        &listener,
        cgroups.as_ref(),
        &command,
        &env,
        &url,
        0,
        first_session,
    ) {
        Ok((pid, cmd, link)) => {
            info!("worker 0 started (pid {cmd}): {}", command.join(" "));
            links.insert(pid, link);
            State::Running(Run {
                pid,
                cmd,
                session: first_session,
                started: Instant::now(),
                exit: None,
            })
        }
        Err(f) => {
            errln!("turnstile: {}", f.message);
            return Ok(ExitCode::from(f.code));
        }
    };
    let mut n = Nanny {
        me: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        policy,
        memory_limit: args.memory_limit,
        stop_timeout: args.stop_timeout,
        env,
        command,
        url: url.clone(),
        listener,
        links,
        cgroups,
        page_size: procfs::page_size(),
        workers: (0..args.workers)
            .map(|i| Worker {
                state: if i == 0 {
                    first
                } else {
                    State::Waiting { at: Instant::now() }
                },
                history: History::default(),
            })
            .collect(),
        stopping: false,
        rolling: None,
        sweep_kill_at: None,
        next_sample: Instant::now() + SAMPLE_EVERY,
        sessions: SessionEnder::start(url),
        death_timeout: args.death_timeout,
        lost_coordinator: false,
    };

    let code = loop {
        n.reap();
        let now = Instant::now();
        n.check_coordinator(now);
        n.advance(now);
        if let Some(code) = n.done(now) {
            break code;
        }
        let wake = n.next_wake(now);
        tokio::select! {
            _ = sigchld.recv() => {}
            sig = sigs.recv() => n.on_signal(sig, Instant::now()),
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    n.sessions.finish().await;
    Ok(ExitCode::from(code))
}

/// One run of a worker: its leader process (the worker's guard), which leads the process
/// group, the command's pid (for messages), and its session.
#[derive(Clone, Copy, Debug)]
struct Run {
    pid: i32,
    cmd: i32,
    session: u64,
    started: Instant,
    /// How the leader ended, once it is reaped.
    exit: Option<Exit>,
}

/// Why a worker is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// Its leader died on its own; what is left of it is killed at once.
    Died,
    /// It went over `--memory-limit`.
    Memory,
    /// SIGHUP.
    Rolling,
    /// The nanny is stopping.
    Shutdown,
}

/// A worker on its way down: the run stays here until none of its processes is left.
#[derive(Clone, Copy, Debug)]
struct Stop {
    run: Run,
    cause: Cause,
    /// When what is left gets SIGKILL.
    kill_at: Instant,
    /// Whether SIGKILL was sent.
    killed: bool,
    /// When to look for leftovers again, and the interval after that.
    next_check: Instant,
    check_every: Duration,
    /// For a stop over `--memory-limit`: the memory its processes used at SIGTERM.
    rss: u64,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// To be started at `at`.
    Waiting {
        at: Instant,
    },
    Running(Run),
    Stopping(Stop),
    /// Not restarted; `failed` if it was given up on or its last run failed.
    Ended {
        failed: bool,
    },
}

struct Worker {
    state: State,
    history: History,
}

/// A SIGHUP's restart of every worker, one at a time.
struct Rolling {
    queue: VecDeque<usize>,
    current: Option<usize>,
}

struct Nanny {
    me: i32,
    policy: Policy,
    memory_limit: Option<u64>,
    stop_timeout: Duration,
    env: Vec<(String, String)>,
    command: Vec<String>,
    url: String,
    listener: Listener,
    /// The connection to each live guard, by the guard's pid. Dropping one makes that guard
    /// kill its worker's tree, so a link is dropped only once its guard is reaped.
    links: HashMap<i32, Link>,
    /// Worker cgroups, when the kernel enforces `--memory-limit`.
    cgroups: Option<Cgroups>,
    page_size: u64,
    workers: Vec<Worker>,
    /// Whether a stop signal arrived.
    stopping: bool,
    rolling: Option<Rolling>,
    /// When processes that no worker claims get SIGKILL, once every worker has ended.
    sweep_kill_at: Option<Instant>,
    next_sample: Instant,
    sessions: SessionEnder,
    /// `--death-timeout`.
    death_timeout: Option<Duration>,
    /// Whether the workers were stopped because the coordinator stayed away (exit 69).
    lost_coordinator: bool,
}

impl Nanny {
    fn spawn(&self, index: usize, session: u64) -> Result<(i32, i32, Link), StartFailure> {
        spawn(
            &self.listener,
            self.cgroups.as_ref(),
            &self.command,
            &self.env,
            &self.url,
            index,
            session,
        )
    }

    /// Reaps every child that has exited, and notes the exit of worker leaders.
    fn reap(&mut self) {
        let mut lost = false;
        // Bounded, in case waitpid keeps failing in a way it should not.
        for _ in 0..100_000 {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid.as_raw(), Exit::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => {}
                // nix reaps the child, then fails to name a signal it does not know: the pid
                // is lost, so check below which leader is gone.
                Err(_) => lost = true,
            }
        }
        if lost {
            let gone: Vec<i32> = self
                .workers
                .iter()
                .filter_map(|w| match w.state {
                    State::Running(run) => Some(run),
                    State::Stopping(s) if s.run.exit.is_none() => Some(s.run),
                    _ => None,
                })
                .filter(|run| kill(Pid::from_raw(run.pid), None) == Err(Errno::ESRCH))
                .map(|run| run.pid)
                .collect();
            for pid in gone {
                self.on_exit(pid, Exit::Unknown);
            }
        }
    }

    fn on_exit(&mut self, pid: i32, exit: Exit) {
        self.links.remove(&pid);
        let now = Instant::now();
        let Some(i) = self.workers.iter().position(|w| match w.state {
            State::Running(run) => run.pid == pid,
            State::Stopping(s) => s.run.pid == pid && s.run.exit.is_none(),
            _ => false,
        }) else {
            debug!("reaped pid {pid}, which {exit}");
            return;
        };
        match self.workers[i].state {
            State::Running(run) => {
                // The guard mirrors how the command ended.
                let pid = run.cmd;
                if exit.success() {
                    info!("worker {i} (pid {pid}) {exit}");
                } else {
                    warn!("worker {i} (pid {pid}) {exit}");
                }
                self.workers[i].state = State::Stopping(Stop {
                    run: Run {
                        exit: Some(exit),
                        ..run
                    },
                    cause: Cause::Died,
                    kill_at: now,
                    killed: false,
                    next_check: now,
                    check_every: FIRST_CHECK,
                    rss: 0,
                });
            }
            State::Stopping(mut stop) => {
                info!("worker {i} (pid {}) {exit}", stop.run.cmd);
                stop.run.exit = Some(exit);
                stop.next_check = now;
                stop.check_every = FIRST_CHECK;
                self.workers[i].state = State::Stopping(stop);
            }
            State::Waiting { .. } | State::Ended { .. } => {}
        }
    }

    /// The processes of `run`'s worker in `table`.
    fn members(&self, index: usize, run: &Run, table: &Table) -> BTreeSet<i32> {
        let leaders: BTreeSet<i32> = self.workers.iter().filter_map(leader).collect();
        // Orphans re-parented to the nanny are claimed by the worker index in their
        // environment: `turnstile run` passes it on to its command (unlike the session), and
        // only one run of a worker exists at a time, since the next starts once the last is
        // gone.
        let marker = format!("{WORKER_ENV}={index}");
        let alive = run.exit.is_none().then_some(run.pid);
        table.worker(self.me, run.pid, alive, |p| {
            !leaders.contains(&p.pid) && procfs::environ_contains(p.pid, &marker)
        })
    }

    /// Brings every worker up to date at `now`.
    fn advance(&mut self, now: Instant) {
        let mut table: Option<Table> = None;
        for i in 0..self.workers.len() {
            match self.workers[i].state {
                State::Waiting { at } if at <= now && !self.stopping => self.start(i, now),
                State::Stopping(stop) => self.step_stop(i, stop, now, &mut table),
                _ => {}
            }
        }
        self.step_rolling(now);
        if let Some(limit) = self.memory_limit {
            if now >= self.next_sample {
                let near = self.sample(limit, now, &mut table);
                self.next_sample = now + if near { SAMPLE_NEAR } else { SAMPLE_EVERY };
            }
        }
    }

    fn start(&mut self, i: usize, now: Instant) {
        let session = turnstile_client::new_session_id();
        match self.spawn(i, session) {
            Ok((pid, cmd, link)) => {
                info!("worker {i} started (pid {cmd})");
                self.links.insert(pid, link);
                self.workers[i].state = State::Running(Run {
                    pid,
                    cmd,
                    session,
                    started: now,
                    exit: None,
                });
            }
            Err(f) => {
                warn!("worker {i}: {}", f.message);
                let exit = Exit::Code(i32::from(f.code));
                self.decide(i, now, now, End::Exited(exit), exit);
            }
        }
    }

    fn step_stop(&mut self, i: usize, mut stop: Stop, now: Instant, table: &mut Option<Table>) {
        let due_kill = now >= stop.kill_at && !stop.killed;
        // While the leader lives the worker is not over; its exit arrives with SIGCHLD.
        if stop.run.exit.is_none() && !due_kill {
            return;
        }
        if now < stop.next_check && !due_kill {
            return;
        }
        let table = table.get_or_insert_with(read_table);
        let members = self.members(i, &stop.run, table);
        if members.is_empty() && stop.run.exit.is_some() {
            self.finish(i, stop, now);
            return;
        }
        if now >= stop.kill_at {
            if !stop.killed {
                stop.killed = true;
                // Processes die within milliseconds of SIGKILL: look again soon.
                stop.check_every = FIRST_CHECK;
                match stop.cause {
                    Cause::Died => info!(
                        "worker {i}: killing {} process(es) it left behind",
                        members.len()
                    ),
                    Cause::Memory => warn!(
                        "worker {i} (pid {}) is still over its memory limit: sending SIGKILL to {} process(es)",
                        stop.run.cmd,
                        members.len()
                    ),
                    _ => warn!(
                        "worker {i} (pid {}) did not stop within {}: sending SIGKILL to {} process(es)",
                        stop.run.cmd,
                        humantime::format_duration(self.stop_timeout),
                        members.len()
                    ),
                }
            }
            signal_all(stop.run.pid, &members, Signal::SIGKILL);
        }
        stop.next_check = now + stop.check_every;
        stop.check_every = (stop.check_every * 2).min(MAX_CHECK);
        self.workers[i].state = State::Stopping(stop);
    }

    /// The run is over and none of its processes is left: free its leases, then restart or
    /// not.
    fn finish(&mut self, i: usize, stop: Stop, now: Instant) {
        let run = stop.run;
        // A worker whose process the kernel killed over memory.max ended over its limit,
        // even if its death was noticed before the next sample.
        let oom = self.cgroups.as_ref().is_some_and(|g| g.oom_kills(i) > 0);
        if let Some(groups) = &self.cgroups {
            groups.remove(i);
        }
        self.sessions.end(i, run.cmd, run.session);
        let exit = run.exit.unwrap_or(Exit::Unknown);
        if self.stopping {
            self.workers[i].state = State::Ended { failed: false };
            return;
        }
        let end = match stop.cause {
            _ if oom => End::OverMemory,
            Cause::Died | Cause::Shutdown => End::Exited(exit),
            Cause::Memory => End::OverMemory,
            Cause::Rolling => End::Rolling,
        };
        self.decide(i, run.started, now, end, exit);
    }

    fn decide(&mut self, i: usize, started: Instant, now: Instant, end: End, exit: Exit) {
        let w = &mut self.workers[i];
        let decision = w
            .history
            .on_end(&self.policy, started.into_std(), now.into_std(), end);
        w.state = match decision {
            Decision::Restart { after } => {
                if after.is_zero() {
                    info!("worker {i}: restarting now");
                } else {
                    info!(
                        "worker {i}: restarting in {}",
                        humantime::format_duration(after)
                    );
                }
                State::Waiting { at: now + after }
            }
            Decision::GiveUp { crashes, within } => {
                error!(
                    "worker {i}: giving up after {crashes} crashes within {}",
                    humantime::format_duration(within)
                );
                State::Ended { failed: true }
            }
            Decision::Done => {
                info!(
                    "worker {i}: not restarted (--restart {})",
                    match self.policy.restart {
                        Restart::Always => "always",
                        Restart::OnFailure => "on-failure",
                        Restart::Never => "never",
                    }
                );
                State::Ended {
                    failed: !exit.success(),
                }
            }
        };
    }

    /// Starts stopping a running worker: SIGTERM to all its processes now, SIGKILL at the
    /// deadline (`--stop-timeout`).
    fn begin_stop(&mut self, i: usize, cause: Cause, now: Instant, table: &mut Option<Table>) {
        self.begin_stop_within(i, cause, now, self.stop_timeout, 0, table);
    }

    /// Starts stopping a running worker: SIGTERM to all its processes now, SIGKILL after
    /// `grace` (at once if it is zero). `rss` is its memory use, for a stop over the limit.
    fn begin_stop_within(
        &mut self,
        i: usize,
        cause: Cause,
        now: Instant,
        grace: Duration,
        rss: u64,
        table: &mut Option<Table>,
    ) {
        let State::Running(run) = self.workers[i].state else {
            return;
        };
        let table = table.get_or_insert_with(read_table);
        let members = self.members(i, &run, table);
        // The group signal reaches the group's members; a second, direct copy could land
        // after a handler for the first has run and so be seen twice (a shell's TERM trap).
        let outside: BTreeSet<i32> = members
            .iter()
            .copied()
            .filter(|&pid| table.pgid(pid) != Some(run.pid))
            .collect();
        let at_once = grace.is_zero();
        signal_all(
            run.pid,
            &outside,
            if at_once {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            },
        );
        self.workers[i].state = State::Stopping(Stop {
            run,
            cause,
            kill_at: now + grace,
            killed: at_once,
            next_check: now,
            check_every: FIRST_CHECK,
            rss,
        });
    }

    /// The resident memory of the processes of `run`, a live run of worker `i`. While its
    /// guard lives, every process of the worker is in the guard's tree (it is a child
    /// subreaper), so only that tree is read; without `children` files in `/proc`, the
    /// whole process table is.
    fn rss(&self, i: usize, run: &Run, table: &mut Option<Table>) -> u64 {
        if run.exit.is_none() {
            if let Some(tree) = procfs::descendants(run.pid) {
                let pages = std::iter::once(run.pid)
                    .chain(tree)
                    .filter_map(procfs::resident_pages)
                    .fold(0, u64::saturating_add);
                return pages.saturating_mul(self.page_size);
            }
        }
        let t = table.get_or_insert_with(read_table);
        t.rss_bytes(&self.members(i, run, t), self.page_size)
    }

    /// Checks the memory of every running worker, and of those stopping for their memory
    /// (a worker that still grows after SIGTERM, or passes twice the limit, gets SIGKILL at
    /// once). Returns whether some worker uses more than half the limit.
    fn sample(&mut self, limit: u64, now: Instant, table: &mut Option<Table>) -> bool {
        let mut near = false;
        for i in 0..self.workers.len() {
            match self.workers[i].state {
                State::Running(run) if self.cgroups.is_some() => {
                    let kills = self.cgroups.as_ref().map_or(0, |g| g.oom_kills(i));
                    if kills > 0 {
                        warn!(
                            "worker {i} (pid {}) went over the limit of {}: the kernel killed {kills} of its processes; restarting (SIGKILL to the rest)",
                            run.cmd,
                            format_size(limit)
                        );
                        self.begin_stop_within(i, Cause::Memory, now, Duration::ZERO, 0, table);
                    }
                }
                State::Running(run) => {
                    let rss = self.rss(i, &run, table);
                    near |= rss > limit / 2;
                    if rss <= limit {
                        continue;
                    }
                    let twice = rss > limit.saturating_mul(2);
                    let grace = if twice {
                        Duration::ZERO
                    } else {
                        MEMORY_GRACE.min(self.stop_timeout)
                    };
                    warn!(
                        "worker {i} (pid {}) uses {}, over the limit of {}: restarting ({})",
                        run.cmd,
                        format_size(rss),
                        format_size(limit),
                        if twice {
                            "SIGKILL: over twice the limit".to_owned()
                        } else {
                            format!(
                                "SIGTERM, SIGKILL within {} or as soon as it grows",
                                humantime::format_duration(grace)
                            )
                        }
                    );
                    self.begin_stop_within(i, Cause::Memory, now, grace, rss, table);
                }
                // With cgroups the kernel bounds the memory of a stopping worker too.
                _ if self.cgroups.is_some() => {}
                State::Stopping(mut stop)
                    if stop.cause == Cause::Memory && !stop.killed && stop.run.exit.is_none() =>
                {
                    let rss = self.rss(i, &stop.run, table);
                    near = true;
                    if rss > limit.saturating_mul(2) || rss > stop.rss.saturating_add(MEMORY_SLACK)
                    {
                        warn!(
                            "worker {i} (pid {}) still grows after SIGTERM ({}): SIGKILL now",
                            stop.run.cmd,
                            format_size(rss)
                        );
                        stop.kill_at = now;
                        self.workers[i].state = State::Stopping(stop);
                    }
                }
                // Stopping for another reason (a signal, SIGHUP) with the full stop timeout:
                // over the limit, it gets the memory grace at most.
                State::Stopping(mut stop) if !stop.killed && stop.run.exit.is_none() => {
                    let rss = self.rss(i, &stop.run, table);
                    near |= rss > limit / 2;
                    let by = now + MEMORY_GRACE;
                    if rss > limit && stop.kill_at > by {
                        warn!(
                            "worker {i} (pid {}) uses {}, over the limit of {}, while it stops: SIGKILL within {}",
                            stop.run.cmd,
                            format_size(rss),
                            format_size(limit),
                            humantime::format_duration(MEMORY_GRACE)
                        );
                        stop.kill_at = by;
                        self.workers[i].state = State::Stopping(stop);
                    }
                }
                _ => {}
            }
        }
        near
    }

    fn step_rolling(&mut self, now: Instant) {
        let Some(mut rolling) = self.rolling.take() else {
            return;
        };
        if let Some(i) = rolling.current {
            let back = match self.workers[i].state {
                State::Running(_) | State::Ended { .. } => true,
                State::Waiting { at } => at > now,
                State::Stopping(_) => false,
            };
            if !back {
                self.rolling = Some(rolling);
                return;
            }
            rolling.current = None;
        }
        let Some(i) = rolling.queue.pop_front() else {
            info!("rolling restart done");
            return;
        };
        rolling.current = Some(i);
        self.rolling = Some(rolling);
        match self.workers[i].state {
            State::Running(run) => {
                info!(
                    "worker {i} (pid {}): stopping for a rolling restart",
                    run.cmd
                );
                self.begin_stop(i, Cause::Rolling, now, &mut None);
            }
            State::Waiting { .. } => self.workers[i].state = State::Waiting { at: now },
            State::Ended { .. } => {
                info!("worker {i}: started again by SIGHUP");
                self.workers[i].history = History::default();
                self.workers[i].state = State::Waiting { at: now };
            }
            State::Stopping(_) => {}
        }
    }

    fn on_signal(&mut self, sig: Signal, now: Instant) {
        if sig == Signal::SIGHUP {
            if !self.stopping {
                info!("SIGHUP: restarting the workers one by one");
                self.rolling = Some(Rolling {
                    queue: (0..self.workers.len()).collect(),
                    current: self.rolling.as_ref().and_then(|r| r.current),
                });
            }
            return;
        }
        if self.stopping {
            warn!("{} again: sending SIGKILL now", sig.as_str());
            for w in &mut self.workers {
                if let State::Stopping(stop) = &mut w.state {
                    stop.kill_at = now;
                }
            }
            self.sweep_kill_at = Some(now);
            return;
        }
        info!(
            "{}: stopping the workers (SIGTERM, then SIGKILL after {})",
            sig.as_str(),
            humantime::format_duration(self.stop_timeout)
        );
        self.stop_all(now);
    }

    /// `--death-timeout`: stops the workers once the coordinator has been away that long.
    fn check_coordinator(&mut self, now: Instant) {
        let Some(limit) = self.death_timeout else {
            return;
        };
        if self.stopping {
            return;
        }
        let Some(away) = self.sessions.unreachable_for() else {
            return;
        };
        if away < limit {
            return;
        }
        error!(
            "the coordinator at {} has not answered for {}s (--death-timeout {}): stopping the workers (SIGTERM, then SIGKILL after {})",
            self.url,
            away.as_secs(),
            humantime::format_duration(limit),
            humantime::format_duration(self.stop_timeout)
        );
        self.lost_coordinator = true;
        self.stop_all(now);
    }

    /// Stops every worker: SIGTERM now, SIGKILL after `--stop-timeout`.
    fn stop_all(&mut self, now: Instant) {
        self.stopping = true;
        self.rolling = None;
        let mut table = None;
        for i in 0..self.workers.len() {
            match self.workers[i].state {
                State::Running(_) => self.begin_stop(i, Cause::Shutdown, now, &mut table),
                State::Waiting { .. } => self.workers[i].state = State::Ended { failed: false },
                State::Stopping(_) | State::Ended { .. } => {}
            }
        }
        // Processes that no worker claims are told too, and get the same time to exit.
        let table = table.get_or_insert_with(read_table);
        let strays = self.strays(table);
        for &pid in &strays {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        self.sweep_kill_at = Some(now + self.stop_timeout);
    }

    /// Descendants of the nanny that belong to no worker.
    fn strays(&self, table: &Table) -> BTreeSet<i32> {
        let mut all = table.subtree(table.children(self.me).map(|p| p.pid).collect::<Vec<_>>());
        for (i, w) in self.workers.iter().enumerate() {
            let run = match &w.state {
                State::Running(run) => run,
                State::Stopping(stop) => &stop.run,
                _ => continue,
            };
            for pid in self.members(i, run, table) {
                all.remove(&pid);
            }
        }
        all
    }

    /// The exit code once every worker has ended and no process is left; `None` before.
    fn done(&mut self, now: Instant) -> Option<u8> {
        if !self
            .workers
            .iter()
            .all(|w| matches!(w.state, State::Ended { .. }))
        {
            return None;
        }
        let table = read_table();
        let strays = self.strays(&table);
        if !strays.is_empty() {
            match self.sweep_kill_at {
                // At a requested stop they were sent SIGTERM with the workers.
                None => {
                    info!(
                        "{} process(es) that no worker claims are left: {strays:?}; SIGTERM, then SIGKILL after {}",
                        strays.len(),
                        humantime::format_duration(self.stop_timeout)
                    );
                    for &pid in &strays {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    }
                    self.sweep_kill_at = Some(now + self.stop_timeout);
                }
                Some(at) if now >= at => {
                    debug!("SIGKILL to {strays:?}, which no worker claims");
                    for &pid in &strays {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                Some(_) => {}
            }
            return None;
        }
        if self.stopping {
            info!("every worker has stopped");
            return Some(if self.lost_coordinator {
                crate::EXIT_UNAVAILABLE
            } else {
                0
            });
        }
        let failed = self
            .workers
            .iter()
            .filter(|w| matches!(w.state, State::Ended { failed: true }))
            .count();
        if failed == 0 {
            info!("every worker has ended");
            Some(0)
        } else {
            error!(
                "every worker has ended; {failed} of {} failed or were given up on",
                self.workers.len()
            );
            Some(EXIT_WORKERS_FAILED)
        }
    }

    /// When the loop must look again, at the latest.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + IDLE;
        for w in &self.workers {
            match w.state {
                State::Waiting { at } if !self.stopping => wake = wake.min(at),
                State::Stopping(stop) => {
                    if !stop.killed {
                        wake = wake.min(stop.kill_at);
                        if self.memory_limit.is_some() {
                            wake = wake.min(self.next_sample);
                        }
                    }
                    if stop.run.exit.is_some() {
                        wake = wake.min(stop.next_check);
                    }
                }
                State::Running(_) if self.memory_limit.is_some() => {
                    wake = wake.min(self.next_sample)
                }
                _ => {}
            }
        }
        if self.rolling.is_some() {
            wake = wake.min(now + MAX_CHECK);
        }
        if self.death_timeout.is_some() && !self.stopping {
            wake = wake.min(now + DEATH_CHECK);
        }
        if self
            .workers
            .iter()
            .all(|w| matches!(w.state, State::Ended { .. }))
        {
            wake = wake.min(now + FIRST_CHECK * 4);
        }
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_flags() {
        let ms = Duration::from_millis;
        assert_eq!(
            parse_backoff("100ms..30s"),
            Ok(Backoff {
                min: ms(100),
                max: ms(30_000)
            })
        );
        assert_eq!(
            parse_backoff("1s"),
            Ok(Backoff {
                min: ms(1000),
                max: ms(1000)
            })
        );
        assert_eq!(
            parse_backoff("0s"),
            Ok(Backoff {
                min: ms(0),
                max: ms(0)
            })
        );
        for bad in ["2s..1s", "0s..1s", "..", "1s..", "fast", "1s..2s..3s"] {
            assert!(parse_backoff(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_flags() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".to_owned(), "b=c".to_owned())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".to_owned(), String::new())));
        for bad in [
            "A",
            "=x",
            "TURNSTILE_SESSION=1",
            "TURNSTILE_WORKER=1",
            "TURNSTILE_URL=x",
        ] {
            assert!(parse_env(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_ids_are_fresh() {
        let ids: BTreeSet<u64> = (0..1000)
            .map(|_| turnstile_client::new_session_id())
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}
