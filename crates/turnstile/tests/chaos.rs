//! Random fault injection with real processes, and a checker of the history they leave.
//!
//! Six `turnstile run` clients loop acquire/act/release on a semaphore of capacity 2 through
//! a proxy that delays every chunk at random and drops connections at random, while a seeded
//! generator also cuts and blackholes the proxy, SIGSTOPs a client's whole process group for
//! longer than the TTL (then SIGCONTs it) and SIGKILLs the coordinator (restarted on the same
//! data directory, so leases, sessions and fencing counters survive).
//!
//! Each client's command acts on a simulated fenced resource (`act.sh`): under a file lock it
//! compares its fencing token with the highest one the resource has seen, accepts the action
//! if it is not lower (and records it as the highest) or refuses it, and appends the verdict
//! to the history. Lines are appended under the lock, so the history is in real time order.
//! What a stale holder (SIGSTOPped past its TTL, or cut off until its lease expired) can do
//! is exactly what a real one could: act when it wakes up, before its `turnstile run` hears
//! of the loss. The resource must refuse it whenever a newer holder has acted.
//!
//! The checker ([`check`]) asserts:
//! - every fencing token is issued once (no two holds start with the same token);
//! - the resource's verdicts follow its rule (the history is not garbled);
//! - live holders never exceed the capacity: a hold that ended cleanly (its `run` exited 0 and
//!   its client was never stopped while it held) is live from its first line to its last; any
//!   other is live only up to its last accepted action (after that the resource refuses it,
//!   whatever it believes);
//! - a stale holder's token is below the current one: a hold granted after another hold's
//!   lease must have expired (its client stopped for longer than the TTL, counting from the
//!   stop or from a coordinator restart, which gives every session a new TTL) has the higher
//!   token; and a hold that started well after another ended has the higher token (tokens
//!   never go back, across restarts too).
//!
//! The seed is printed; `TURNSTILE_CHAOS_SEED=N` replays the same fault schedule (the
//! machine's timing still varies).

#[allow(dead_code)] // the helpers serve several test binaries
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Harness, Proc, Scratch, Server};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use proxy::{Chaos, FaultProxy, Rng};

/// Clients looping on the semaphore.
const CLIENTS: usize = 6;
/// Its capacity.
const CAPACITY: usize = 2;
/// The coordinator's session TTL.
const TTL: Duration = Duration::from_secs(2);
/// How long the faults go on.
const RUN_FOR: Duration = Duration::from_secs(40);
/// Slack for "surely expired by now": keep-alives delayed by the proxy, the expiry sweep, and
/// a loaded machine.
const SLACK: Duration = Duration::from_millis(2500);

/// The fenced resource: `act.sh KIND` checks the caller's token against the highest one it
/// accepted, under a lock, and appends `KIND CLIENT RUN TOKEN LEASE NANOS ok|refused` to the
/// history. The history is the resource's only state (the highest accepted token is read back
/// from it) and each action is one short append, so an action cut short by a SIGKILL (a
/// guard stopping a command whose lease was lost) either happened whole or not at all: a
/// separate "highest" file, truncated and rewritten, could be left empty by a kill between
/// the two, and the resource would then refuse everyone (seen in CI, seed
/// 1796187085061490491).
const ACT_SH: &str = r#"exec 9>>"$DIR/resource.lock"
flock 9
high=$(awk '$7 == "ok" && $4 + 0 > h { h = $4 + 0 } END { print h + 0 }' "$DIR/history" 2>/dev/null)
if [ "$TURNSTILE_FENCING_TOKEN" -ge "${high:-0}" ]; then
  verdict=ok
else
  verdict=refused
fi
echo "$1 $CLIENT $RUN $TURNSTILE_FENCING_TOKEN $TURNSTILE_LEASE_ID $(date +%s%N) $verdict" >> "$DIR/history"
"#;

/// A holder's command: its first action, two more, and its last.
const HOLD: &str = r#"sh "$DIR/act.sh" start; sleep 0.1; sh "$DIR/act.sh" act; sleep 0.1
sh "$DIR/act.sh" act; sleep 0.1; sh "$DIR/act.sh" end"#;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One line of the history.
#[derive(Clone, Debug)]
struct Line {
    kind: String,
    client: usize,
    run: u64,
    token: u64,
    ns: u128,
    ok: bool,
}

fn parse(history: &str) -> Vec<Line> {
    history
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let [kind, client, run, token, _lease, ns, verdict] = f[..] else {
                panic!("malformed history line {line:?}");
            };
            let num = |s: &str| -> u128 {
                s.parse()
                    .unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}"))
            };
            Line {
                kind: kind.to_owned(),
                client: num(client) as usize,
                run: num(run) as u64,
                token: num(token) as u64,
                ns: num(ns),
                ok: match verdict {
                    "ok" => true,
                    "refused" => false,
                    _ => panic!("bad verdict in {line:?}"),
                },
            }
        })
        .collect()
}

/// What the test knows besides the history.
#[derive(Default)]
struct Record {
    /// `(client, stopped at, continued at)`, in ns since the epoch.
    stops: Vec<(usize, u128, u128)>,
    /// When the coordinator came back after each SIGKILL.
    restarts: Vec<u128>,
    /// Exit code of each `(client, run)` (None: killed by a signal).
    exits: HashMap<(usize, u64), Option<i32>>,
}

/// One hold: the lines of one run's command.
#[derive(Debug)]
struct Hold {
    client: usize,
    run: u64,
    token: u64,
    /// Indexes into the history.
    lines: Vec<usize>,
}

/// `ensure!(cond, fmt...)`: returns the message as an error unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// The checks of the module doc. Returns (holds, accepted actions, refused actions).
fn check(history: &[Line], rec: &Record) -> Result<(usize, usize, usize), String> {
    // The resource's rule, replayed.
    let mut high = 0;
    for (i, l) in history.iter().enumerate() {
        let ok = l.token >= high;
        ensure!(
            ok == l.ok,
            "line {i} {l:?}: the resource broke its own rule"
        );
        if ok {
            high = l.token;
        }
    }
    let mut holds: BTreeMap<(usize, u64), Hold> = BTreeMap::new();
    for (i, l) in history.iter().enumerate() {
        let hold = holds.entry((l.client, l.run)).or_insert_with(|| Hold {
            client: l.client,
            run: l.run,
            token: l.token,
            lines: Vec::new(),
        });
        ensure!(hold.token == l.token, "one run, one token: {l:?}");
        ensure!(
            (l.kind == "start") == hold.lines.is_empty(),
            "a hold's first line, and only it, is its start: {l:?}"
        );
        hold.lines.push(i);
    }
    // Every token issued once.
    let mut by_token = HashMap::new();
    for h in holds.values() {
        if let Some(other) = by_token.insert(h.token, (h.client, h.run)) {
            return Err(format!(
                "token {} issued twice: to client {} run {} and client {} run {}",
                h.token, other.0, other.1, h.client, h.run
            ));
        }
    }
    let stopped_during = |h: &Hold, from: u128, to: u128| {
        rec.stops
            .iter()
            .any(|&(c, stop, cont)| c == h.client && stop <= to && cont >= from)
    };
    // Live intervals, in history positions.
    let mut events = Vec::new(); // (position, +1 / -1)
    for h in holds.values() {
        let first = h.lines[0];
        let last = *h.lines.last().expect("a hold has lines");
        let clean = rec.exits.get(&(h.client, h.run)) == Some(&Some(0))
            && history[last].kind == "end"
            && !stopped_during(h, history[first].ns, history[last].ns);
        let end = if clean {
            Some(last)
        } else {
            h.lines.iter().copied().filter(|&i| history[i].ok).max()
        };
        if let Some(end) = end {
            if history[first].ok || clean {
                events.push((first, 1i64));
                events.push((end, -1));
            }
        }
    }
    // At one position, the start (+1) counts before the end (-1) of the same hold only if
    // it is the same line; sort ends after starts at equal positions (a one-line hold).
    events.sort_by_key(|&(pos, d)| (pos, -d));
    let mut live = 0;
    for (pos, d) in &events {
        live += d;
        ensure!(
            live <= CAPACITY as i64,
            "{live} live holders at history line {pos}: {:?}",
            history[*pos]
        );
    }
    // A stale holder's token is below the current one.
    let ttl = TTL.as_nanos() + SLACK.as_nanos();
    for h in holds.values() {
        let start = history[h.lines[0]].ns;
        let end = history[*h.lines.last().expect("lines")].ns;
        let ended_cleanly = history[*h.lines.last().expect("lines")].kind == "end";
        for &(c, stop, cont) in &rec.stops {
            // Stops of this client while this hold was (or may still have been) held.
            if c != h.client || stop < start || (ended_cleanly && end < stop) {
                continue;
            }
            // The lease expired by this time at the latest.
            let renewed = rec
                .restarts
                .iter()
                .copied()
                .filter(|&r| r <= cont)
                .fold(stop, u128::max);
            let expired = renewed + ttl;
            for g in holds.values() {
                let g_start = history[g.lines[0]].ns;
                if g.client != h.client && g_start > expired {
                    ensure!(
                        g.token > h.token,
                        "client {} run {} (token {}) started after the lease of client {} \
                         run {} (token {}) expired, with a lower token",
                        g.client,
                        g.run,
                        g.token,
                        h.client,
                        h.run,
                        h.token
                    );
                }
            }
        }
    }
    // Tokens never go back: a hold that starts well after another ended (and whose client
    // was not stopped before it started, which could hold back a granted command) has the
    // higher token.
    let gap = Duration::from_secs(5).as_nanos();
    for a in holds.values() {
        let a_end = history[*a.lines.last().expect("lines")].ns;
        for b in holds.values() {
            let b_start = history[b.lines[0]].ns;
            if b_start > a_end + gap && !stopped_during(b, b_start - 2 * gap, b_start) {
                ensure!(
                    b.token > a.token,
                    "token {} (client {} run {}) started 5 s after token {} (client {} run {}) ended",
                    b.token,
                    b.client,
                    b.run,
                    a.token,
                    a.client,
                    a.run
                );
            }
        }
    }
    let accepted = history.iter().filter(|l| l.ok).count();
    Ok((holds.len(), accepted, history.len() - accepted))
}

fn seed() -> u64 {
    match std::env::var("TURNSTILE_CHAOS_SEED") {
        Ok(s) => s.parse().expect("TURNSTILE_CHAOS_SEED is a number"),
        Err(_) => (now_ns() as u64) ^ u64::from(std::process::id()),
    }
}

fn exit_code(status: ExitStatus) -> Option<i32> {
    status.code()
}

#[test]
fn random_faults_never_break_capacity_or_fencing() {
    let seed = seed();
    eprintln!("chaos seed {seed} (replay with TURNSTILE_CHAOS_SEED={seed})");
    let mut rng = Rng::new(seed);
    let data = Scratch::new("chaos-data");
    let data_dir = data.join("coordinator");
    let data_dir = data_dir.to_str().expect("a UTF-8 path").to_owned();
    let ttl = format!("{}s", TTL.as_secs());
    let server_args = [
        "--data-dir",
        data_dir.as_str(),
        "--session-ttl",
        ttl.as_str(),
    ];
    let h = Harness {
        server: Server::start_with(&server_args),
        dir: Scratch::new("chaos"),
    };
    std::fs::write(h.dir.join("act.sh"), ACT_SH).expect("write act.sh");
    let proxy = FaultProxy::start(
        h.server
            .url()
            .trim_start_matches("tcp://")
            .parse()
            .expect("the server's address"),
    );
    proxy.chaos(Some(Chaos {
        seed,
        max_delay: Duration::from_millis(15),
        drop_per_mille: 4,
    }));
    let rec = Arc::new(Mutex::new(Record::default()));
    let pids: Arc<Mutex<Vec<Option<Pid>>>> = Arc::new(Mutex::new(vec![None; CLIENTS]));
    let done = Arc::new(AtomicBool::new(false));
    let h = Arc::new(h);
    let url = proxy.url();
    let mut drivers = Vec::new();
    for client in 0..CLIENTS {
        let (h, rec, pids, done, url) = (
            h.clone(),
            rec.clone(),
            pids.clone(),
            done.clone(),
            url.clone(),
        );
        drivers.push(std::thread::spawn(move || {
            let mut codes = BTreeMap::new();
            for run in 0u64.. {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let mut cmd = h.command(&[
                    "run",
                    "chaos",
                    "--limit",
                    &CAPACITY.to_string(),
                    "--timeout",
                    "20s",
                    "--kill-grace",
                    "1s",
                    "--",
                    "sh",
                    "-c",
                    HOLD,
                ]);
                cmd.env("TURNSTILE_URL", &url)
                    .env("CLIENT", client.to_string())
                    .env("RUN", run.to_string());
                let mut p: Proc = h.spawn_command(&format!("c{client}-r{run}"), cmd);
                pids.lock().expect("pids")[client] = Some(p.pid());
                let finished = p.wait(Duration::from_secs(90));
                pids.lock().expect("pids")[client] = None;
                let code = exit_code(finished.status);
                common::assert_no_panic(&finished.stderr);
                assert!(
                    matches!(code, Some(0 | 69 | 75 | 76)),
                    "client {client} run {run} ended with {:?}: {}",
                    finished.status,
                    finished.stderr
                );
                *codes.entry(code).or_insert(0u32) += 1;
                rec.lock()
                    .expect("record")
                    .exits
                    .insert((client, run), code);
            }
            codes
        }));
    }
    // The fault schedule.
    let start = Instant::now();
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    // The coordinator is owned here from now on, to kill and restart it.
    let mut current: Option<Server> = None;
    while start.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        match rng.below(10) {
            0..=2 => {
                proxy.cut();
                *faults.entry("cut").or_default() += 1;
            }
            3..=4 => {
                let victim = rng.below(CLIENTS as u64) as usize;
                let Some(pid) = pids.lock().expect("pids")[victim] else {
                    continue;
                };
                // The whole group: run, its guard and its command.
                if killpg(pid, Signal::SIGSTOP).is_err() {
                    continue;
                }
                let stopped = now_ns();
                std::thread::sleep(TTL * 2 + Duration::from_millis(rng.below(1000)));
                let _ = killpg(pid, Signal::SIGCONT);
                rec.lock()
                    .expect("record")
                    .stops
                    .push((victim, stopped, now_ns()));
                *faults.entry("sigstop").or_default() += 1;
            }
            5..=6 => {
                // SIGKILL the coordinator; it comes back on the same data directory.
                match current.as_mut() {
                    Some(s) => s.kill(),
                    // The first one is shared with the drivers (for their scratch directory).
                    None => {
                        let _ = kill(h.server.pid(), Signal::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(rng.below(TTL.as_millis() as u64)));
                let s = Server::start_with(&server_args);
                proxy.set_upstream(
                    s.url()
                        .trim_start_matches("tcp://")
                        .parse()
                        .expect("the server's address"),
                );
                rec.lock().expect("record").restarts.push(now_ns());
                current = Some(s);
                *faults.entry("sigkill coordinator").or_default() += 1;
            }
            7 => {
                proxy.blackhole();
                std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
                proxy.restore();
                proxy.cut(); // blackholed connections stay so until an end gives up
                *faults.entry("blackhole").or_default() += 1;
            }
            _ => {}
        }
    }
    done.store(true, Ordering::SeqCst);
    let mut codes: BTreeMap<Option<i32>, u32> = BTreeMap::new();
    for d in drivers {
        for (code, n) in d.join().expect("a client driver panicked") {
            *codes.entry(code).or_default() += n;
        }
    }
    let history = parse(&h.dir.read("history").unwrap_or_default());
    let rec = rec.lock().expect("record");
    let (holds, accepted, refused) = check(&history, &rec).unwrap_or_else(|e| {
        panic!("chaos seed {seed}: {e}\nhistory kept in the scratch directory")
    });
    eprintln!(
        "chaos seed {seed}: {holds} holds, {accepted} actions accepted, {refused} refused; \
         exits {codes:?}; faults {faults:?}, {} random drops",
        proxy.drops()
    );
    assert!(
        holds >= 20,
        "too few holds for the test to mean much: {holds}"
    );
    assert!(
        codes.get(&Some(0)).copied().unwrap_or(0) >= 10,
        "too few clean runs: {codes:?}"
    );
    drop(current);
}

#[test]
fn the_checker_catches_what_it_should() {
    let line = |kind: &str, client: usize, run: u64, token: u64, ns: u128, ok: bool| Line {
        kind: kind.into(),
        client,
        run,
        token,
        ns,
        ok,
    };
    let clean = |runs: &[(usize, u64)]| Record {
        exits: runs.iter().map(|&r| (r, Some(0))).collect(),
        ..Record::default()
    };
    // Three clean holds at once, capacity 2.
    let three = vec![
        line("start", 0, 0, 1, 1, true),
        line("start", 1, 0, 2, 2, true),
        line("start", 2, 0, 3, 3, true),
        line("end", 0, 0, 1, 4, false),
        line("end", 1, 0, 2, 5, false),
        line("end", 2, 0, 3, 6, true),
    ];
    let rec = clean(&[(0, 0), (1, 0), (2, 0)]);
    let e = check(&three, &rec).expect_err("three live holders went unnoticed");
    assert!(e.contains("3 live holders"), "{e}");
    // A token issued twice.
    let twice = vec![
        line("start", 0, 0, 1, 1, true),
        line("end", 0, 0, 1, 2, true),
        line("start", 1, 0, 1, 3, true),
        line("end", 1, 0, 1, 4, true),
    ];
    let rec = clean(&[(0, 0), (1, 0)]);
    let e = check(&twice, &rec).expect_err("a token issued twice went unnoticed");
    assert!(e.contains("issued twice"), "{e}");
    // A holder stopped past its TTL, and a later grant with a lower token.
    let s = 1_000_000_000u128;
    let stale = vec![
        line("start", 0, 0, 5, s, true),
        line("start", 1, 0, 4, 10 * s, false),
        line("end", 1, 0, 4, 11 * s, false),
        line("act", 0, 0, 5, 12 * s, true),
    ];
    let mut rec = clean(&[(1, 0)]);
    rec.exits.insert((0, 0), Some(76));
    rec.stops.push((0, 2 * s, 11 * s));
    let e = check(&stale, &rec).expect_err("a stale token above the current one went unnoticed");
    assert!(e.contains("expired, with a lower token"), "{e}");
    // The same with the later grant's token higher: fine, and the stale action refused.
    let fenced = vec![
        line("start", 0, 0, 5, s, true),
        line("start", 1, 0, 6, 10 * s, true),
        line("end", 1, 0, 6, 11 * s, true),
        line("act", 0, 0, 5, 12 * s, false),
    ];
    assert_eq!(check(&fenced, &rec), Ok((2, 3, 1)));
    // Tokens going back (as after a restart that forgot grants).
    let back = vec![
        line("start", 0, 0, 5, s, true),
        line("end", 0, 0, 5, 2 * s, true),
        line("start", 1, 0, 3, 10 * s, false),
        line("end", 1, 0, 3, 11 * s, false),
    ];
    let rec = clean(&[(0, 0), (1, 0)]);
    let e = check(&back, &rec).expect_err("a token going back went unnoticed");
    assert!(e.contains("started 5 s after"), "{e}");
}
