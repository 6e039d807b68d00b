//! Black-box tests of the `turnstile` command: real coordinator and client processes talking
//! over TCP on 127.0.0.1, each test with a coordinator of its own on a free port.
//!
//! The commands that `turnstile run` runs are small `sh` scripts. They report back through
//! files in a per-test scratch directory (`$DIR`), which the tests poll with generous deadlines
//! rather than sleeping: a test waits for an event (a file appears, `turnstile status --json`
//! shows a holder or a waiter), never for a fixed time. Files that a test waits for are
//! written as `f.tmp` and renamed to `f`, so a file that exists is complete.
//!
//! See `common/mod.rs` for the helpers; every process they start is killed when its test
//! ends, also when it fails.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{assert_no_panic, process_exists, read_holds, wait_until, Harness, HOLD_SCRIPT, SOON};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Number of `turnstile run` processes competing in the concurrency test.
const CLIENTS: u64 = 32;
/// Capacity of the semaphore they compete for.
const LIMIT: usize = 3;

/// 32 concurrent `turnstile run --limit 3`: never more than 3 commands at once, 3 at once at
/// some point, and fencing tokens 1..=32.
#[test]
fn limit_bounds_concurrency_and_tokens_are_dense() {
    let h = Harness::new("concurrency", "10s");
    // Each command logs its hold (see `HOLD_SCRIPT`); the logged intervals bound the real
    // concurrency from below.
    let script = HOLD_SCRIPT;
    let limit = LIMIT.to_string();
    let mut procs: Vec<_> = (0..CLIENTS)
        .map(|i| {
            h.spawn(
                &format!("client{i}"),
                &["run", "db", "--limit", &limit, "--", "sh", "-c", script],
            )
        })
        .collect();
    for p in &mut procs {
        let out = p.wait(Duration::from_secs(45));
        assert_eq!(out.code(), 0, "{out:?}");
    }

    let holds = read_holds(&h.dir.read("events").expect("the commands wrote events"));
    let expected: BTreeSet<u64> = (1..=CLIENTS).collect();
    assert_eq!(
        holds.starts.keys().copied().collect::<BTreeSet<_>>(),
        expected,
        "every grant gets a distinct fencing token, 1..=32 in grant order"
    );
    assert!(
        holds.max_overlap <= LIMIT,
        "{} commands ran at once with --limit {LIMIT}",
        holds.max_overlap
    );
    assert_eq!(
        holds.max_overlap, LIMIT,
        "the limit was never reached: slots were wasted"
    );

    let sem = h.semaphore("db").expect("db exists");
    assert_eq!(sem["acquired_total"], CLIENTS);
    assert_eq!(sem["in_use"], 0, "every slot was released: {sem}");
}

/// A holder killed with SIGKILL keeps its slot until its session expires (one TTL), then the
/// waiter gets it with a greater fencing token.
#[test]
fn killed_holder_frees_its_slot_after_the_session_ttl() {
    let h = Harness::new("kill9", "1s");
    let mut holder = h.spawn(
        "holder",
        &[
            "run", "x", "--limit", "1", "--", "sh", "-c",
            r#"echo "$$ $TURNSTILE_FENCING_TOKEN" > "$DIR/holder.tmp" && mv "$DIR/holder.tmp" "$DIR/holder"; exec sleep 60"#,
        ],
    );
    let holder_info = h.dir.wait_for("holder");
    let [child_pid, holder_token] = holder_info
        .split_whitespace()
        .map(|f| f.parse::<u64>().expect("a number"))
        .collect::<Vec<_>>()[..]
    else {
        panic!("bad holder file {holder_info:?}");
    };
    let mut waiter = h.spawn(
        "waiter",
        &[
            "run", "x", "--limit", "1", "--", "sh", "-c",
            r#"echo "$TURNSTILE_FENCING_TOKEN" > "$DIR/marker.tmp" && mv "$DIR/marker.tmp" "$DIR/marker""#,
        ],
    );
    h.wait_for_semaphore("x", "one holder, one waiter", |s| {
        s["in_use"] == 1 && s["queued"] == 1
    });
    assert!(
        h.dir.read("marker").is_none(),
        "the waiter ran while the holder held"
    );

    let killed_at = Instant::now();
    holder.signal(Signal::SIGKILL);
    let status = holder.wait(SOON).status;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    // `sleep 60` is now an orphan; it does not hold the slot (the session does), but it must
    // not outlive the test.
    let _ = kill(Pid::from_raw(child_pid as i32), Signal::SIGKILL);

    let marker = h.dir.wait_for("marker");
    let waited = killed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the slot was freed {waited:?} after the kill, before the 1s session TTL could pass"
    );
    assert!(
        waited < Duration::from_secs(10),
        "the slot took {waited:?} to free"
    );
    let waiter_token: u64 = marker.trim().parse().expect("a token");
    assert!(
        waiter_token > holder_token,
        "token {waiter_token} after the killed holder's {holder_token}"
    );
    assert_eq!(waiter.wait(SOON).code(), 0);
    let sem = h.semaphore("x").expect("x exists");
    assert_eq!(sem["expired_total"], 1, "the holder's lease expired: {sem}");
    assert_eq!(sem["in_use"], 0, "{sem}");
}

/// `turnstile run` exits with its command's code, or 128 + the signal that killed it.
#[test]
fn exit_code_is_the_commands() {
    let h = Harness::new("exit-codes", "10s");
    let cases = [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -9 $$", 137),
        ("kill -TERM $$", 143),
        ("kill -SEGV $$", 139),
        ("kill -PIPE $$", 141),
    ];
    for (script, code) in cases {
        let out = h.run(&["run", "e", "--limit", "1", "--", "sh", "-c", script]);
        assert_eq!(out.code(), code, "sh -c {script:?}: {out:?}");
        assert_no_panic(&out.stderr);
    }
}

/// `--timeout` while another process holds the only slot: exit 75 after the timeout.
#[test]
fn acquire_timeout_exits_75() {
    let h = Harness::new("timeout", "10s");
    let _holder = h.spawn("holder", &["run", "t", "--limit", "1", "--", "sleep", "60"]);
    h.wait_for_semaphore("t", "a holder", |s| s["in_use"] == 1);
    let started = Instant::now();
    let out = h.run(&[
        "run",
        "t",
        "--limit",
        "1",
        "--timeout",
        "300ms",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), 75, "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up early"
    );
    out.assert_one_line_error(&["timed out", "\"t\""]);
    let sem = h.semaphore("t").expect("t exists");
    assert_eq!(sem["timed_out_total"], 1, "{sem}");
    assert_eq!(
        sem["queued"], 0,
        "the timed-out acquire left the queue: {sem}"
    );
}

/// A command that does not exist: exit 127 with one line on stderr, and the slot is released.
#[test]
fn missing_command_exits_127() {
    let h = Harness::new("missing", "10s");
    let out = h.run(&[
        "run",
        "m",
        "--limit",
        "1",
        "--",
        "/nonexistent/turnstile-test-cmd",
    ]);
    assert_eq!(out.code(), 127, "{out:?}");
    out.assert_one_line_error(&["cannot run", "/nonexistent/turnstile-test-cmd"]);
    let sem = h.semaphore("m").expect("m exists");
    assert_eq!(sem["in_use"], 0, "the slot was released: {sem}");
    let out = h.run(&["run", "m", "--limit", "1", "--", "/etc/passwd"]);
    assert_eq!(out.code(), 126, "{out:?}");
    out.assert_one_line_error(&["cannot run", "/etc/passwd", "Permission denied"]);
}

/// Usage and connection errors: non-zero exit, one line on stderr, no panic.
#[test]
fn errors_are_one_line() {
    let h = Harness::new("errors", "10s");
    assert_eq!(
        h.run(&["run", "cap", "--limit", "1", "--", "true"]).code(),
        0
    );

    let out = h.run(&["run", "cap", "--limit", "2", "--", "true"]);
    out.assert_one_line_error(&["\"cap\"", "capacity 1", "not 2"]);

    let out = h.run(&["run", "nosuch", "--", "true"]);
    out.assert_one_line_error(&["\"nosuch\"", "does not exist", "--limit"]);

    let out = h.run(&[
        "run",
        "a",
        "--limit",
        "1",
        "--url",
        "tcp://127.0.0.1:1",
        // Retried this long (a restarting coordinator refuses for a moment), then exit 69.
        "--connect-timeout",
        "1s",
        "--",
        "true",
    ]);
    out.assert_one_line_error(&["cannot connect", "127.0.0.1:1"]);
    assert_eq!(out.code(), 69, "EX_UNAVAILABLE: {out:?}");
    assert_eq!(
        out.stderr.matches("refused").count(),
        1,
        "the cause is printed once: {out:?}"
    );

    // Argument errors come from clap: an `error: ...` line, then its usual hint
    // "For more information, try '--help'." The error itself must be one line.
    let out = h.run(&[
        "run",
        "a",
        "--limit",
        "1",
        "--timeout",
        "soon",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), 2, "a usage error: {out:?}");
    assert_no_panic(&out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains("--timeout"),
        "{out:?}"
    );
    assert!(lines[0].contains("soon"), "{out:?}");
}

/// SIGTERM to `turnstile run` reaches the command; turnstile exits with the command's code
/// and releases the slot at once.
#[test]
fn sigterm_is_forwarded_and_the_slot_released() {
    let h = Harness::new("sigterm", "10s");
    let mut run = h.spawn(
        "run",
        &[
            "run",
            "s",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"trap 'echo got-term > "$DIR/term.tmp" && mv "$DIR/term.tmp" "$DIR/term"; exit 0' TERM
               echo ready > "$DIR/ready"
               while true; do sleep 0.05; done"#,
        ],
    );
    h.dir.wait_for("ready");
    // To turnstile alone: it is in a process group of its own, so the command only gets the
    // signal if turnstile forwards it.
    run.signal(Signal::SIGTERM);
    let out = run.wait(SOON);
    assert_eq!(out.code(), 0, "the command's exit code: {out:?}");
    assert_eq!(h.dir.read("term").as_deref(), Some("got-term\n"));
    // Released before exiting, not left to expire with the session (10 s).
    let sem = h.semaphore("s").expect("s exists");
    assert_eq!(sem["in_use"], 0, "{sem}");
    let next = h.run(&["run", "s", "--limit", "1", "--timeout", "2s", "--", "true"]);
    assert_eq!(next.code(), 0, "{next:?}");
}

/// SIGINT is forwarded too, and a command killed by it gives 130.
#[test]
fn sigint_is_forwarded() {
    let h = Harness::new("sigint", "10s");
    let mut run = h.spawn(
        "run",
        &[
            "run",
            "i",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"echo ready > "$DIR/ready"; exec sleep 60"#,
        ],
    );
    h.dir.wait_for("ready");
    run.signal(Signal::SIGINT);
    assert_eq!(run.wait(SOON).code(), 130);
}

/// `turnstile close`: the waiter fails, the holder's command is stopped and turnstile exits
/// 76, and later runs fail; all saying the semaphore is closed.
#[test]
fn close_fails_waiters_and_stops_holders() {
    let h = Harness::new("close", "10s");
    let mut holder = h.spawn(
        "holder",
        &[
            "run",
            "c",
            "--limit",
            "1",
            "--kill-grace",
            "1s",
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"; exec sleep 30"#,
        ],
    );
    let child_pid: i32 = h.dir.wait_for("pid").trim().parse().expect("a pid");
    let mut waiter = h.spawn("waiter", &["run", "c", "--limit", "1", "--", "true"]);
    h.wait_for_semaphore("c", "one holder, one waiter", |s| {
        s["in_use"] == 1 && s["queued"] == 1
    });

    let closed = h.run(&["close", "c"]);
    assert_eq!(closed.code(), 0, "{closed:?}");

    let out = waiter.wait(SOON);
    out.assert_one_line_error(&["\"c\"", "closed"]);

    let out = holder.wait(SOON);
    assert_eq!(
        out.code(),
        76,
        "the lease was lost and the command stopped: {out:?}"
    );
    assert!(out.stderr.contains("closed"), "{out:?}");
    assert_no_panic(&out.stderr);
    assert!(
        !process_exists(child_pid),
        "the holder's command was stopped"
    );

    for args in [
        &["run", "c", "--", "true"][..],
        &["run", "c", "--limit", "1", "--", "true"][..],
    ] {
        h.run(args).assert_one_line_error(&["\"c\"", "closed"]);
    }
    let sem = h
        .semaphore("c")
        .expect("a closed semaphore is still listed");
    assert_eq!(sem["closed"], true, "{sem}");
    assert_eq!(sem["in_use"], 0, "{sem}");
}

/// A command that ignores SIGTERM is killed with SIGKILL once `--kill-grace` has passed.
#[test]
fn lost_lease_escalates_to_sigkill_after_the_grace() {
    let h = Harness::new("grace", "10s");
    let mut holder = h.spawn(
        "holder",
        &[
            "run",
            "g",
            "--limit",
            "1",
            "--kill-grace",
            "1s",
            "--",
            "sh",
            "-c",
            r#"trap '' TERM; echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
               while true; do sleep 0.05; done"#,
        ],
    );
    let child_pid: i32 = h.dir.wait_for("pid").trim().parse().expect("a pid");
    let closing = Instant::now();
    assert_eq!(h.run(&["close", "g"]).code(), 0);
    let out = holder.wait(SOON);
    assert_eq!(out.code(), 76, "{out:?}");
    let took = closing.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "stopped after {took:?}, before the 1s grace: SIGTERM should have been ignored"
    );
    assert!(!process_exists(child_pid), "the command was killed");
}

/// `--on-lost ignore`: after a close the command runs on to the end, and turnstile exits with
/// its code.
#[test]
fn on_lost_ignore_lets_the_command_finish() {
    let h = Harness::new("ignore", "10s");
    let mut holder = h.spawn(
        "holder",
        &[
            "run",
            "d",
            "--limit",
            "1",
            "--on-lost",
            "ignore",
            "--",
            "sh",
            "-c",
            r#"echo ready > "$DIR/ready"
               while [ ! -e "$DIR/go" ]; do sleep 0.05; done
               echo done > "$DIR/done"; exit 7"#,
        ],
    );
    h.dir.wait_for("ready");
    assert_eq!(h.run(&["close", "d"]).code(), 0);
    wait_until("the lost-lease warning", SOON, || {
        Some(()).filter(|_| holder.stderr().contains("keeps running"))
    });
    assert!(
        holder.try_status().is_none(),
        "turnstile waits for the command"
    );
    std::fs::write(h.dir.join("go"), "").expect("write go");
    let out = holder.wait(SOON);
    assert_eq!(out.code(), 7, "the command's code: {out:?}");
    assert_eq!(h.dir.read("done").as_deref(), Some("done\n"));
    assert!(out.stderr.contains("closed"), "{out:?}");
}

/// The command sees TURNSTILE_SEMAPHORE, TURNSTILE_LEASE_ID and TURNSTILE_FENCING_TOKEN, and
/// they match what the coordinator reports for the holder (URL given with --url here).
#[test]
fn command_environment_names_the_lease() {
    let h = Harness::new("env", "10s");
    let mut cmd = h.command(&[
        "run",
        "envsem",
        "--limit",
        "2",
        "--url",
        h.server.url(),
        "--",
        "sh",
        "-c",
        r#"env | grep '^TURNSTILE_' > "$DIR/env.tmp" && mv "$DIR/env.tmp" "$DIR/env"
           while [ ! -e "$DIR/go" ]; do sleep 0.05; done"#,
    ]);
    cmd.env_remove("TURNSTILE_URL");
    let mut run = h.spawn_command("run", cmd);
    let env: BTreeMap<String, String> = h
        .dir
        .wait_for("env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env["TURNSTILE_SEMAPHORE"], "envsem", "{env:?}");
    let lease: u64 = env["TURNSTILE_LEASE_ID"]
        .parse()
        .expect("a numeric lease id");
    let token: u64 = env["TURNSTILE_FENCING_TOKEN"]
        .parse()
        .expect("a numeric token");
    assert_eq!(token, 1, "the first grant of a new semaphore");

    let sem = h.semaphore("envsem").expect("envsem exists");
    let holders = sem["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 1, "{sem}");
    // A string: lease ids are 64-bit, past what a JSON number keeps exactly.
    assert_eq!(holders[0]["lease_id"], lease.to_string(), "{sem}");
    assert_eq!(holders[0]["token"], token, "{sem}");

    std::fs::write(h.dir.join("go"), "").expect("write go");
    assert_eq!(run.wait(SOON).code(), 0);
}

/// `turnstile status --json` has the documented shape with a live holder and a waiter, and
/// the table shows the semaphore line and the holder line.
#[test]
fn status_reports_holders_and_waiters() {
    let h = Harness::new("status", "10s");
    let _holder = h.spawn(
        "holder",
        &[
            "run", "st", "--limit", "3", "--weight", "2", "--", "sleep", "60",
        ],
    );
    h.wait_for_semaphore("st", "a holder", |s| s["in_use"] == 2);
    let _waiter = h.spawn(
        "waiter",
        &["run", "st", "--limit", "3", "--weight", "2", "--", "true"],
    );
    h.wait_for_semaphore("st", "a waiter", |s| s["queued"] == 1);

    let doc = h.status();
    let sems = doc["semaphores"]
        .as_array()
        .expect("semaphores is an array");
    assert_eq!(sems.len(), 1, "{doc}");
    let s = &sems[0];
    assert_eq!(s["name"], "st", "{doc}");
    assert_eq!(s["capacity"], 3, "{doc}");
    assert_eq!(s["in_use"], 2, "{doc}");
    assert_eq!(s["queued"], 1, "{doc}");
    let holders = s["holders"].as_array().expect("holders is an array");
    assert_eq!(holders.len(), 1, "{doc}");
    let holder = &holders[0];
    let lease: u64 = holder["lease_id"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .expect("lease_id is a decimal string");
    let session = holder["session"].as_str().expect("session is a string");
    assert!(
        session.len() == 16 && session.chars().all(|c| c.is_ascii_hexdigit()),
        "session is 16 hex digits: {doc}"
    );
    assert_eq!(holder["weight"], 2, "{doc}");
    assert_eq!(holder["token"], 1, "{doc}");
    assert!(holder["age_ms"].is_u64(), "age_ms is a number: {doc}");

    // The same, filtered by name.
    let filtered = h.run(&["status", "st", "--json"]);
    let filtered: Value = serde_json::from_str(&filtered.stdout).expect("JSON");
    assert_eq!(filtered["semaphores"][0]["name"], "st");

    let table = h.run(&["status"]);
    assert_eq!(table.code(), 0, "{table:?}");
    let rows: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter().any(|r| r[..]
            == [
                "SEMAPHORE",
                "CAPACITY",
                "IN",
                "USE",
                "QUEUED",
                "ACQUIRED",
                "EXPIRED"
            ]),
        "{}",
        table.stdout
    );
    assert!(
        rows.iter()
            .any(|r| r.len() >= 4 && r[..4] == ["st", "3", "2", "1"]),
        "a line for st with capacity 3, 2 in use, 1 queued:\n{}",
        table.stdout
    );
    let (lease, token) = (lease.to_string(), "1".to_owned());
    // The holder's client ("(host:pid)") follows its session.
    assert!(
        rows.iter().any(|r| r.len() >= 9
            && r[..4] == ["lease", &lease, "session", session]
            && r[4].starts_with('(')
            && r[4].ends_with(')')
            && r[5..9] == ["weight", "2", "token", &token]),
        "a holder line:\n{}",
        table.stdout
    );
    assert!(
        rows.iter()
            .any(|r| r.len() >= 7 && r[..3] == ["queue", "#1", "lease"] && r[4] == "session"),
        "a waiter line:\n{}",
        table.stdout
    );

    let out = h.run(&["status", "nosuch"]);
    out.assert_one_line_error(&["no semaphore or job named \"nosuch\""]);
}

/// Issue 11: `kill -9` of `turnstile run` takes its command's whole tree along at once, and
/// the next holder (granted once the dead session's TTL passes) never overlaps it.
#[test]
fn killed_run_takes_its_command_along() {
    let h = Harness::new("kill9-tree", "1s");
    let args = ["run", "k", "--limit", "1", "--", "sh", "-c"];
    common::killed_wrapper_takes_its_command_along(&h, |a| h.command(a), &args, &args);
}

/// The guard between `turnstile run` and its command is transparent for signals: a signal
/// sent to the whole process group (a terminal's Ctrl-C) reaches the command once, although
/// `turnstile` also forwards it; a signal sent to `turnstile` alone reaches it too.
#[test]
fn a_signal_to_the_group_reaches_the_command_once() {
    let h = Harness::new("signal-once", "10s");
    // `wait` returns as soon as a trapped signal arrives, so a second SIGINT arriving later
    // would run the trap again. Traps run in signal-number order, so a duplicate SIGINT sent
    // before the SIGTERM is logged before "term".
    let mut run = h.spawn(
        "run",
        &[
            "run",
            "g",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"trap 'echo int >> "$DIR/log"' INT
               trap 'echo term >> "$DIR/log"; kill $s; exit 0' TERM
               sleep 300 & s=$!
               echo ready > "$DIR/ready"
               while :; do wait $s; done"#,
        ],
    );
    h.dir.wait_for("ready");
    killpg(run.pid(), Signal::SIGINT).expect("SIGINT to the group");
    wait_until("the command to log SIGINT", SOON, || {
        h.dir.read("log").filter(|l| l.contains("int"))
    });
    run.signal(Signal::SIGTERM);
    let out = run.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(h.dir.read("log").as_deref(), Some("int\nterm\n"), "{out:?}");
}

/// The command reads `turnstile run`'s standard input (`echo hi | turnstile run -- cat`).
#[test]
fn the_command_reads_standard_input() {
    use std::io::Write;
    let h = Harness::new("stdin", "10s");
    let mut child = h
        .command(&["run", "in", "--limit", "1", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn turnstile run");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(b"hi\n")
        .expect("write to stdin");
    let out = child.wait_with_output().expect("wait for turnstile run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"hi\n");
}

/// A `turnstile run` killed while it waits for a slot never runs its command: its guard,
/// started before the acquire and idle until the grant, exits as soon as `run` is gone.
#[test]
fn killed_waiter_never_runs_its_command() {
    let h = Harness::new("kill9-waiter", "1s");
    let holder = h.spawn(
        "holder",
        &[
            "run",
            "w",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"echo ready > "$DIR/ready"; exec sleep 300"#,
        ],
    );
    h.dir.wait_for("ready");
    let mut waiter = h.spawn(
        "waiter",
        &[
            "run",
            "w",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            r#"echo ran > "$DIR/ran""#,
        ],
    );
    h.wait_for_semaphore("w", "a waiter", |s| s["queued"] == 1);
    let children = std::fs::read_dir(format!("/proc/{}/task", waiter.pid()))
        .expect("the waiter's tasks")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .collect::<String>();
    let guard: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the waiter has a guard process");
    waiter.signal(Signal::SIGKILL);
    waiter.wait(SOON);
    // Gone, or a zombie waiting for init to reap it.
    wait_until("the idle guard to exit", SOON, || {
        let stat = std::fs::read_to_string(format!("/proc/{guard}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
        (state.is_none() || state.is_some_and(|s| s.starts_with('Z'))).then_some(())
    });
    drop(holder);
    let next = h.run(&["run", "w", "--limit", "1", "--", "true"]);
    assert_eq!(next.code(), 0, "{next:?}");
    assert!(
        h.dir.read("ran").is_none(),
        "the killed waiter's command ran"
    );
}

/// The command starts with no signal blocked, although its guard blocks them all (a child
/// inherits its parent's mask, and std's spawn does not reset it), and with the wrapper's
/// resource limits.
#[test]
fn the_command_starts_with_no_signal_blocked() {
    let h = Harness::new("sigmask", "10s");
    let out = h.run(&[
        "run",
        "m",
        "--limit",
        "1",
        "--",
        "grep",
        "SigBlk",
        "/proc/self/status",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "SigBlk:\t0000000000000000\n", "{out:?}");
}

/// The guard killed on its own (not `turnstile run`): the command gets SIGKILL with it (its
/// parent-death signal), what the command started is re-parented to `turnstile run` and
/// killed there, and only then does `turnstile run` exit (137) and release.
#[test]
fn a_killed_guard_takes_the_command_along() {
    let h = Harness::new("kill9-guard", "10s");
    let mut run = h.spawn(
        "run",
        &[
            "run",
            "kg",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            common::TREE_SCRIPT,
        ],
    );
    h.dir.wait_for("ready");
    let pids: Vec<i32> = h
        .dir
        .read("pids")
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect();
    let children = std::fs::read_dir(format!("/proc/{}/task", run.pid()))
        .expect("turnstile's tasks")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .collect::<String>();
    let guard: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("turnstile run has a guard process");
    kill(Pid::from_raw(guard), Signal::SIGKILL).expect("kill the guard");
    let out = run.wait(SOON);
    assert_eq!(out.code(), 137, "{out:?}");
    // No process of the command is left running (a zombie awaiting its reaper is gone).
    let running = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| Some(!s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    let left: Vec<i32> = pids.iter().copied().filter(|&p| running(p)).collect();
    assert!(
        left.is_empty(),
        "left running after turnstile exited: {left:?}"
    );
    let sem = h.semaphore("kg").expect("kg exists");
    assert_eq!(sem["in_use"], 0, "released: {sem}");
}
