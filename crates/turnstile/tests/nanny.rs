//! Black-box tests of `turnstile nanny` with real processes: small `sh` scripts as workers,
//! which report what they are (index, pid, session) through files in the test's scratch
//! directory (`$DIR`); the tests read those files and the nanny's log on stderr, and wait for
//! events with deadlines, never for a fixed time.
//!
//! Workers run in process groups of their own, out of reach of the harness's clean-up of the
//! nanny's group, so every test holds a [`Nanny`] guard that, when dropped, also kills every
//! process whose environment names the test's scratch directory, and every pid the scripts
//! recorded in `$DIR/pids`.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{assert_no_panic, process_exists, wait_until, Finished, Harness, Proc, BIN, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running `turnstile nanny`, cleaned up with all it started, also when the test fails.
struct Nanny {
    proc: Proc,
    dir: PathBuf,
}

impl Nanny {
    fn start(h: &Harness, label: &str, args: &[&str]) -> Nanny {
        Nanny::start_command(h, label, h.command(args))
    }

    fn start_command(h: &Harness, label: &str, cmd: std::process::Command) -> Nanny {
        Nanny {
            proc: h.spawn_command(label, cmd),
            dir: h.dir.join(""),
        }
    }

    fn log(&self) -> String {
        self.proc.stderr()
    }

    /// Waits until the nanny's log contains `text`.
    fn wait_log(&self, text: &str) -> String {
        wait_until(&format!("the nanny to log {text:?}"), SOON, || {
            let log = self.log();
            log.contains(text).then_some(log)
        })
    }

    fn signal(&self, sig: Signal) {
        self.proc.signal(sig);
    }

    fn wait(&mut self, timeout: Duration) -> Finished {
        let out = self.proc.wait(timeout);
        assert_no_panic(&out.stderr);
        out
    }
}

impl Drop for Nanny {
    fn drop(&mut self) {
        let _ = kill(self.proc.pid(), Signal::SIGKILL);
        let marker = format!("DIR={}", self.dir.display());
        for pid in processes_with_env(marker.trim_end_matches('/')) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for pid in read_pids(&self.dir.join("pids")) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Processes whose environment contains the entry `entry`.
fn processes_with_env(entry: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// The pids in a file of one pid per line (or first word per line).
fn read_pids(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The lines of `$DIR/name` once there are at least `n` of them.
fn wait_lines(h: &Harness, name: &str, n: usize) -> Vec<String> {
    wait_until(&format!("{n} lines in {name}"), SOON, || {
        let text = h.dir.read(name)?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= n).then_some(lines)
    })
}

/// Waits until none of `pids` exists any more (a zombie still counts).
fn assert_all_gone(pids: &[i32]) {
    wait_until(&format!("processes {pids:?} to be gone"), SOON, || {
        pids.iter().all(|&p| !process_exists(p)).then_some(())
    });
}

fn field(line: &str, n: usize) -> &str {
    line.split_whitespace()
        .nth(n)
        .unwrap_or_else(|| panic!("no field {n} in {line:?}"))
}

/// A worker that exits with status 3 is reported in words and restarted; one killed by
/// SIGKILL too. Each run gets its index, the URL, the --env pairs and a fresh session id.
#[test]
fn dead_workers_are_reported_in_words_and_restarted() {
    let h = Harness::new("nanny-crash", "10s");
    let script = r#"echo "$TURNSTILE_WORKER $$ $TURNSTILE_SESSION $TURNSTILE_URL $GREETING" >> "$DIR/starts"
        n=$(grep -c "^$TURNSTILE_WORKER " "$DIR/starts")
        if [ "$TURNSTILE_WORKER" = 0 ] && [ "$n" = 1 ]; then exit 3; fi
        exec sleep 1000"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--workers",
            "2",
            "--env",
            "GREETING=hello",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let starts = wait_lines(&h, "starts", 3);
    let first0 = starts
        .iter()
        .find(|l| l.starts_with("0 "))
        .expect("worker 0 started");
    nanny.wait_log(&format!(
        "worker 0 (pid {}) exited with status 3",
        field(first0, 1)
    ));
    nanny.wait_log("worker 0: restarting in 100ms");
    for line in &starts {
        assert_eq!(field(line, 2).len(), 16, "a 16-hex-digit session: {line}");
        assert!(u64::from_str_radix(field(line, 2), 16).is_ok(), "{line}");
        assert_eq!(field(line, 3), h.server.url(), "{line}");
        assert_eq!(field(line, 4), "hello", "{line}");
    }
    let workers: BTreeSet<&str> = starts.iter().map(|l| field(l, 0)).collect();
    assert_eq!(workers, BTreeSet::from(["0", "1"]));

    // SIGKILL worker 1 from outside, as the OOM killer would.
    let w1 = starts
        .iter()
        .find(|l| l.starts_with("1 "))
        .expect("worker 1 started");
    let pid1: i32 = field(w1, 1).parse().expect("a pid");
    kill(Pid::from_raw(pid1), Signal::SIGKILL).expect("kill worker 1");
    nanny.wait_log(&format!(
        "worker 1 (pid {pid1}) was killed by signal 9 (SIGKILL)"
    ));
    let starts = wait_lines(&h, "starts", 4);
    let sessions: BTreeSet<&str> = starts.iter().map(|l| field(l, 2)).collect();
    assert_eq!(sessions.len(), 4, "every run has a session of its own");

    nanny.signal(Signal::SIGTERM);
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    let pids: Vec<i32> = starts
        .iter()
        .filter_map(|l| field(l, 1).parse().ok())
        .collect();
    assert_all_gone(&pids);
}

/// Consecutive crashes wait MIN, 2*MIN, 4*MIN, ... between restarts.
#[test]
fn backoff_doubles_between_restarts() {
    let h = Harness::new("nanny-backoff", "10s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--backoff",
            "200ms..5s",
            "--",
            "sh",
            "-c",
            r#"date +%s%N >> "$DIR/starts"; exit 1"#,
        ],
    );
    let starts: Vec<u128> = wait_lines(&h, "starts", 5)
        .iter()
        .map(|l| l.trim().parse().expect("nanoseconds"))
        .collect();
    nanny.signal(Signal::SIGTERM);
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    for delay in ["200ms", "400ms", "800ms", "1s 600ms"] {
        assert!(
            out.stderr
                .contains(&format!("worker 0: restarting in {delay}")),
            "no restart after {delay}: {}",
            out.stderr
        );
    }
    // Each gap is the delay plus the time to die, be noticed and start: never less than the
    // delay, and (on any machine these tests run on) well under the next delay's growth.
    let nominal = [200u128, 400, 800, 1600];
    for (i, pair) in starts.windows(2).take(4).enumerate() {
        let gap = (pair[1] - pair[0]) / 1_000_000;
        assert!(
            gap >= nominal[i] && gap < nominal[i] + 1500,
            "gap {i} was {gap} ms, expected {} ms plus a little: {starts:?}",
            nominal[i]
        );
    }
}

/// `--max-restarts 3 --within 1m`: the third crash within a minute gives up on the worker,
/// and with no worker left the nanny exits 1.
#[test]
fn gives_up_after_r_crashes_within_the_window() {
    let h = Harness::new("nanny-giveup", "10s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--max-restarts",
            "3",
            "--within",
            "1m",
            "--backoff",
            "20ms..100ms",
            "--",
            "sh",
            "-c",
            r#"echo $$ >> "$DIR/starts"; exit 7"#,
        ],
    );
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 1, "{out:?}");
    let starts = h.dir.read("starts").unwrap_or_default();
    assert_eq!(starts.lines().count(), 3, "started 3 times: {out:?}");
    assert_eq!(
        out.stderr.matches("exited with status 7").count(),
        3,
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("worker 0: giving up after 3 crashes within 1m"),
        "{out:?}"
    );
}

/// A worker whose process tree grows past `--memory-limit` is stopped (SIGTERM) and
/// restarted, with a log line that gives the figure. The memory is held by a grandchild
/// (`tail`, which buffers a line that never ends), so only a sum over the tree sees it.
#[test]
fn a_worker_over_its_memory_limit_is_restarted() {
    let h = Harness::new("nanny-memory", "10s");
    let script = r#"echo $$ >> "$DIR/starts"
        if [ ! -e "$DIR/allocated" ]; then
            : > "$DIR/allocated"
            { head -c 120000000 /dev/zero; exec sleep 1000; } | tail -n 1
        fi
        exec sleep 1000"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &["nanny", "--memory-limit", "64MiB", "--", "sh", "-c", script],
    );
    let starts = wait_lines(&h, "starts", 2);
    let log = nanny.wait_log("worker 0 started (pid");
    let over = log
        .lines()
        .find(|l| l.contains("over the limit of 64 MiB: restarting"))
        .unwrap_or_else(|| panic!("no memory line: {log}"));
    assert!(
        over.contains(&format!("worker 0 (pid {}) uses ", starts[0])),
        "{over}"
    );
    let mib: u64 = over
        .split(" uses ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {over:?}"));
    assert!((64..1000).contains(&mib), "{over}");
    assert!(
        log.contains(&format!(
            "worker 0 (pid {}) was killed by signal 15 (SIGTERM)",
            starts[0]
        )),
        "{log}"
    );
    nanny.signal(Signal::SIGTERM);
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(
        out.stderr.matches("over the limit").count(),
        1,
        "the second run stays under the limit: {out:?}"
    );
}

/// A worker that ignores SIGTERM (and whose child does too) gets SIGKILL after
/// `--stop-timeout`, not before, and the nanny exits once it is reaped.
#[test]
fn stop_escalates_to_sigkill_after_the_stop_timeout() {
    let h = Harness::new("nanny-stop", "10s");
    let script = r#"trap '' TERM
        sleep 1000 &
        echo $! >> "$DIR/pids"
        echo $$ >> "$DIR/pids"
        exec sleep 1000"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &["nanny", "--stop-timeout", "1s", "--", "sh", "-c", script],
    );
    let pids: Vec<i32> = wait_lines(&h, "pids", 2)
        .iter()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect();
    nanny.wait_log("worker 0 started");
    let asked = Instant::now();
    nanny.signal(Signal::SIGTERM);
    let out = nanny.wait(SOON);
    let took = asked.elapsed();
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        took >= Duration::from_millis(950),
        "SIGKILL came before the stop timeout: {took:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "worker 0 (pid {}) did not stop within 1s: sending SIGKILL",
            pids[1]
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "worker 0 (pid {}) was killed by signal 9 (SIGKILL)",
            pids[1]
        )),
        "{out:?}"
    );
    assert_all_gone(&pids);
}

/// After the nanny is stopped, nothing its workers started is left: children and
/// grandchildren in the worker's process group, processes that moved to sessions of their
/// own (one ignoring SIGTERM), a double-forked daemon re-parented to the nanny, and one that
/// also cleared its environment.
#[test]
fn no_process_is_left_behind_after_the_nanny_stops() {
    let h = Harness::new("nanny-orphans", "10s");
    let script = r#"sleep 1000 &
        echo $! >> "$DIR/pids"
        sh -c 'sleep 1000 & echo $! >> "$DIR/pids"; exec sleep 1000' &
        echo $! >> "$DIR/pids"
        setsid sh -c 'trap "" TERM; echo $$ >> "$DIR/pids"; exec sleep 1000' &
        ( setsid sleep 1000 & echo $! >> "$DIR/pids" ) &
        ( env -i setsid sleep 1000 & echo $! >> "$DIR/pids" ) &
        echo $$ >> "$DIR/pids"
        exec sleep 1000"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--workers",
            "2",
            "--stop-timeout",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let pids: Vec<i32> = wait_lines(&h, "pids", 14)
        .iter()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect();
    assert!(pids.iter().all(|&p| process_exists(p)));
    nanny.signal(Signal::SIGTERM);
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    // The nanny reaped everything before it exited: nothing is left, not even a zombie.
    let left: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| process_exists(p))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{}", out.stderr);
    assert!(out.stderr.contains("every worker has stopped"), "{out:?}");
}

/// A worker's leftovers are killed as soon as it dies, not when the nanny stops: here a
/// daemon that double-forked out of the worker's process group and tree.
#[test]
fn a_dead_workers_leftovers_are_killed_at_once() {
    let h = Harness::new("nanny-leftovers", "10s");
    let script = r#"if [ -e "$DIR/leader" ]; then exec sleep 1000; fi
        ( setsid sleep 1000 & echo $! > "$DIR/daemon.tmp"; mv "$DIR/daemon.tmp" "$DIR/daemon" ) &
        sleep 1000 &
        echo $! > "$DIR/child.tmp"; mv "$DIR/child.tmp" "$DIR/child"
        echo $$ > "$DIR/leader.tmp"; mv "$DIR/leader.tmp" "$DIR/leader"
        wait"#;
    let mut nanny = Nanny::start(&h, "nanny", &["nanny", "--", "sh", "-c", script]);
    let daemon: i32 = h.dir.wait_for("daemon").trim().parse().expect("a pid");
    let child: i32 = h.dir.wait_for("child").trim().parse().expect("a pid");
    let leader: i32 = h.dir.wait_for("leader").trim().parse().expect("a pid");
    // Wait until the daemon is an orphan (its subshell has exited): it is re-parented to the
    // worker's guard (the leader's parent, a child subreaper), and to the nanny once the
    // guard is gone.
    let ppid = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let guard = ppid(leader).expect("the leader's parent");
    assert_ne!(
        guard,
        nanny.proc.pid().as_raw(),
        "the worker runs under a guard"
    );
    wait_until("the daemon to be re-parented to the guard", SOON, || {
        (ppid(daemon)? == guard).then_some(())
    });
    kill(Pid::from_raw(leader), Signal::SIGKILL).expect("kill the worker");
    nanny.wait_log(&format!(
        "worker 0 (pid {leader}) was killed by signal 9 (SIGKILL)"
    ));
    assert_all_gone(&[daemon, child]);
    nanny.wait_log("killing 2 process(es) it left behind");
    nanny.wait_log("worker 0: restarting");
    nanny.signal(Signal::SIGINT);
    assert_eq!(nanny.wait(SOON).code(), 0);
}

/// SIGHUP restarts the workers one at a time: each is stopped, and started again, before the
/// next is stopped.
#[test]
fn sighup_restarts_the_workers_one_at_a_time() {
    let h = Harness::new("nanny-hup", "10s");
    let script = r#"echo "start $TURNSTILE_WORKER $$" >> "$DIR/events"
        trap 'echo "stop $TURNSTILE_WORKER $$" >> "$DIR/events"; exit 0' TERM
        sleep 1000 &
        wait $!"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &["nanny", "--workers", "3", "--", "sh", "-c", script],
    );
    let first = wait_lines(&h, "events", 3);
    nanny.signal(Signal::SIGHUP);
    let log = nanny.wait_log("rolling restart done");
    let events = wait_lines(&h, "events", 9);

    // The nanny's own account, in order: stop 0, start 0, stop 1, start 1, stop 2, start 2.
    let steps: Vec<String> = log
        .lines()
        .skip_while(|l| !l.contains("SIGHUP"))
        .filter_map(|l| {
            let w = l.split("worker ").nth(1)?;
            let i = w.split([' ', ':']).next()?;
            if l.contains("stopping for a rolling restart") {
                Some(format!("stop {i}"))
            } else if l.contains(" started (pid") {
                Some(format!("start {i}"))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        steps,
        ["stop 0", "start 0", "stop 1", "start 1", "stop 2", "start 2"],
        "{log}"
    );
    // The workers saw their SIGTERM in that order too, and each old run was replaced.
    let stops: Vec<&String> = events.iter().filter(|e| e.starts_with("stop")).collect();
    let order: Vec<&str> = stops.iter().map(|e| field(e, 1)).collect();
    assert_eq!(order, ["0", "1", "2"], "{events:?}");
    for old in &first {
        assert!(
            events.contains(&old.replace("start", "stop")),
            "{old} was stopped: {events:?}"
        );
    }
    nanny.signal(Signal::SIGTERM);
    assert_eq!(nanny.wait(SOON).code(), 0);
}

/// The script of a worker that holds slot `x` through `turnstile run` and records the pid of
/// that `turnstile run` (its parent, the worker), its fencing token, and the session it sees
/// (none: the session is `turnstile run`'s own, not passed on).
/// The worker (`turnstile run`) is the parent of the command's parent, its guard.
const HOLDER: &str = r#"worker=$(cut -d' ' -f4 /proc/$PPID/stat)
echo "$worker $TURNSTILE_FENCING_TOKEN ${TURNSTILE_SESSION:-none}" > "$DIR/holder.tmp" && mv "$DIR/holder.tmp" "$DIR/holder"; exec sleep 1000"#;

/// The value of `key` in the environment process `pid` started with.
fn env_of(pid: i32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|e| {
        let e = std::str::from_utf8(e).ok()?;
        Some(e.strip_prefix(key)?.strip_prefix('=')?.to_owned())
    })
}

/// On the coordinator, with a 30 s session TTL: a worker holding a lease is killed with
/// SIGKILL, and the waiter gets the slot at once rather than after the TTL, because the nanny
/// ends the dead worker's session.
#[test]
fn a_killed_workers_lease_goes_to_the_next_waiter_at_once() {
    let h = Harness::new("nanny-lease", "30s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny", "--", BIN, "run", "x", "--limit", "1", "--", "sh", "-c", HOLDER,
        ],
    );
    let holder = h.dir.wait_for("holder");
    let worker: i32 = field(&holder, 0).parse().expect("a pid");
    let token: u64 = field(&holder, 1).parse().expect("a token");
    let waiter = h.spawn(
        "waiter",
        &[
            "run", "x", "--limit", "1", "--", "sh", "-c",
            r#"echo "$TURNSTILE_FENCING_TOKEN" > "$DIR/marker.tmp" && mv "$DIR/marker.tmp" "$DIR/marker""#,
        ],
    );
    let sem = h.wait_for_semaphore("x", "one holder, one waiter", |s| {
        s["in_use"] == 1 && s["queued"] == 1
    });
    // The worker's client took the session the nanny gave it, and kept it to itself.
    let session = env_of(worker, "TURNSTILE_SESSION").expect("the worker has a session");
    assert_eq!(sem["holders"][0]["session"], session.as_str(), "{sem}");
    assert_eq!(
        field(&holder, 2),
        "none",
        "turnstile run passed its session on"
    );

    let killed = Instant::now();
    kill(Pid::from_raw(worker), Signal::SIGKILL).expect("kill the worker");
    let marker = h.dir.wait_for("marker");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the waiter got the slot {took:?} after the kill (session TTL 30s)"
    );
    let next: u64 = marker.trim().parse().expect("a token");
    assert!(next > token, "fencing tokens rise: {token} then {next}");
    nanny.wait_log(&format!(
        "worker 0 (pid {worker}) was killed by signal 9 (SIGKILL)"
    ));
    drop(waiter);
    nanny.signal(Signal::SIGTERM);
    assert_eq!(nanny.wait(SOON).code(), 0);
}

/// On the file backend: when a worker holding a slot is killed, its lease file is removed at
/// once by the nanny (with nobody else around who could reclaim it).
#[test]
fn a_killed_workers_lease_files_are_removed_at_once() {
    let h = Harness::new("nanny-lease-file", "30s");
    let sems = h.dir.join("sems");
    let mut cmd = h.command(&[
        "nanny",
        "--restart",
        "never",
        "--",
        BIN,
        "run",
        "x",
        "--limit",
        "1",
        "--",
        "sh",
        "-c",
        HOLDER,
    ]);
    cmd.env("TURNSTILE_URL", format!("file://{}", sems.display()));
    let mut nanny = Nanny::start_command(&h, "nanny", cmd);
    let holder = h.dir.wait_for("holder");
    let worker: i32 = field(&holder, 0).parse().expect("a pid");
    let slot = sems.join("x").join("slot-0");
    assert!(slot.exists(), "the holder's lease file");

    let killed = Instant::now();
    kill(Pid::from_raw(worker), Signal::SIGKILL).expect("kill the worker");
    wait_until("the lease file to be removed", SOON, || {
        (!slot.exists()).then_some(())
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "removed {took:?} after the kill"
    );
    // --restart never, and the worker died of a signal: nothing left to run, a failure.
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains("worker 0: not restarted (--restart never)"),
        "{out:?}"
    );
}

/// `--restart on-failure`: workers that exit with status 0 are not restarted, and once none
/// is left the nanny exits 0.
#[test]
fn clean_exits_end_the_nanny_with_on_failure() {
    let h = Harness::new("nanny-clean", "10s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--workers",
            "3",
            "--restart",
            "on-failure",
            "--",
            "sh",
            "-c",
            r#"echo $$ >> "$DIR/starts""#,
        ],
    );
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(h.dir.read("starts").unwrap_or_default().lines().count(), 3);
    assert_eq!(
        out.stderr
            .matches("not restarted (--restart on-failure)")
            .count(),
        3,
        "{out:?}"
    );
}

/// A second SIGINT during the stop does not wait for the stop timeout: SIGKILL at once.
#[test]
fn a_second_signal_kills_at_once() {
    let h = Harness::new("nanny-second", "10s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--stop-timeout",
            "1h",
            "--",
            "sh",
            "-c",
            r#"trap '' TERM INT; echo $$ >> "$DIR/pids"; exec sleep 1000"#,
        ],
    );
    let pids = wait_lines(&h, "pids", 1);
    nanny.wait_log("worker 0 started");
    nanny.signal(Signal::SIGINT);
    nanny.wait_log("SIGINT: stopping the workers");
    nanny.signal(Signal::SIGINT);
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("SIGINT again: sending SIGKILL now"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("was killed by signal 9 (SIGKILL)"),
        "{out:?}"
    );
    assert_all_gone(&[pids[0].trim().parse().expect("a pid")]);
}

/// With the backend unreachable the nanny still supervises: one line per dead worker says
/// its session could not be ended, and the worker is restarted as usual.
#[test]
fn an_unreachable_backend_does_not_stop_the_nanny() {
    let h = Harness::new("nanny-unreachable", "10s");
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--url",
            "tcp://127.0.0.1:1",
            "--max-restarts",
            "2",
            "--backoff",
            "10ms",
            "--",
            "sh",
            "-c",
            r#"echo $$ >> "$DIR/starts"; exit 4"#,
        ],
    );
    let out = nanny.wait(SOON);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(h.dir.read("starts").unwrap_or_default().lines().count(), 2);
    assert_eq!(
        out.stderr
            .matches("cannot end its session: cannot connect to 127.0.0.1:1")
            .count(),
        2,
        "{out:?}"
    );
    assert!(
        out.stderr.contains("freed when the session TTL passes"),
        "{out:?}"
    );
}

/// A command that cannot run is a usage error: one line, exit 127, nothing restarted.
#[test]
fn a_missing_command_exits_127() {
    let h = Harness::new("nanny-missing", "10s");
    let out = h.run(&[
        "nanny",
        "--workers",
        "3",
        "--",
        "/nonexistent/turnstile-test-cmd",
    ]);
    assert_eq!(out.code(), 127, "{out:?}");
    out.assert_one_line_error(&["cannot run", "/nonexistent/turnstile-test-cmd"]);
}

/// Bad flags: exit 2 and one error line from clap (then its usual hint), no panic.
#[test]
fn bad_flags_are_one_line_errors() {
    let h = Harness::new("nanny-flags", "10s");
    let cases: [(&[&str], &str); 7] = [
        (&["--backoff", "2s..1s"], "--backoff"),
        (&["--backoff", "soon"], "--backoff"),
        (&["--workers", "0"], "--workers"),
        (&["--memory-limit", "lots"], "--memory-limit"),
        (&["--env", "NOEQUALS"], "--env"),
        (&["--env", "TURNSTILE_SESSION=1"], "--env"),
        (&["--within", "1m"], "--max-restarts"),
    ];
    for (flags, mention) in cases {
        let mut args = vec!["nanny"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "true"]);
        let out = h.run(&args);
        assert_eq!(out.code(), 2, "{flags:?}: {out:?}");
        assert_no_panic(&out.stderr);
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{flags:?}: {out:?}");
        assert!(out.stderr.starts_with("error:"), "{flags:?}: {out:?}");
        assert!(out.stderr.contains(mention), "{flags:?}: {out:?}");
    }
}

/// Issue 11: `kill -9` of the nanny takes every worker's whole process tree along at once
/// (each worker runs under a guard that kills it when the nanny's connection closes).
#[test]
fn killed_nanny_takes_its_workers_along() {
    let h = Harness::new("nanny-kill9", "10s");
    let nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--workers",
            "2",
            "--",
            "sh",
            "-c",
            common::TREE_SCRIPT,
        ],
    );
    let pids: Vec<i32> = wait_lines(&h, "pids", 10)
        .iter()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect();
    assert!(pids.iter().all(|&p| process_exists(p)));
    let killed = Instant::now();
    nanny.signal(Signal::SIGKILL);
    assert_all_gone(&pids);
    let gone = killed.elapsed();
    assert!(
        gone < Duration::from_secs(1),
        "the workers outlived the nanny by {gone:?}"
    );
}

/// Issue 11 section 4: a worker that ignores SIGTERM and allocates as fast as it can is
/// killed near its memory limit (well under twice the limit), not after --stop-timeout.
#[test]
fn a_fast_allocator_that_ignores_sigterm_is_killed_near_the_limit() {
    if std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        eprintln!("skipped: no python3");
        return;
    }
    let h = Harness::new("nanny-hog", "10s");
    let script = r#"
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
chunks = []
while True:
    chunks.append(b"x" * (4 << 20))
    print(len(chunks) * 4, flush=True)
"#;
    let mut nanny = Nanny::start(
        &h,
        "nanny",
        &[
            "nanny",
            "--memory-limit",
            "256MiB",
            "--max-restarts",
            "1",
            "--stop-timeout",
            "30s",
            "--",
            "python3",
            "-c",
            script,
        ],
    );
    let started = Instant::now();
    let out = nanny.wait(SOON);
    let took = started.elapsed();
    assert_eq!(out.code(), 1, "given up after the memory kill: {out:?}");
    assert!(out.stderr.contains("over the limit of 256 MiB"), "{out:?}");
    assert!(
        out.stderr.contains("was killed by signal 9 (SIGKILL)"),
        "{out:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "not the 30s stop timeout: {took:?}"
    );
    let peak: u64 = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap_or(0);
    assert!(peak >= 200, "the worker allocated: {peak} MiB\n{out:?}");
    assert!(
        peak < 512,
        "the worker reached {peak} MiB over a 256 MiB limit\n{}",
        out.stderr
    );
}
