//! Issue 15: the CLI as a newcomer meets it. Which backend a command uses, the try-lock and
//! a client's session TTL, exact ids in every JSON document, sessions that end cleanly not
//! shown as expired, `close` of an unknown name, counters a backend does not keep, and the
//! messages for bad values and wrong ports. Real processes, on the coordinator and on the
//! file backend where both apply.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_no_panic, wait_until, Finished, Harness, Scratch, Server, BIN, SOON};
use nix::sys::signal::Signal;
use proxy::FaultProxy;
use serde_json::Value;

/// Holds the slot until `$DIR/go` exists, after writing its lease id to `$DIR/<file>`.
fn hold_until_go(file: &str) -> String {
    format!(
        r#"echo "$TURNSTILE_LEASE_ID" > "$DIR/{file}"; while [ ! -e "$DIR/go" ]; do sleep 0.02; done"#
    )
}

/// `turnstile ARGS` with no backend in the environment and `$DIR` set, to completion.
fn bare(dir: &Scratch, args: &[&str]) -> Finished {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("TURNSTILE_URL")
        .env_remove("RUST_LOG")
        .env("XDG_RUNTIME_DIR", dir.join("runtime"))
        .env("DIR", dir.join(""))
        .stdin(Stdio::null())
        .output()
        .expect("run turnstile");
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The two backends a test runs on: the harness's coordinator, and a shared directory.
fn backends(h: &Harness) -> [(&'static str, String); 2] {
    let dir = h.dir.join("shared");
    [
        ("tcp", h.server.url().to_owned()),
        ("file", format!("file://{}", dir.display())),
    ]
}

/// `serve` prints the line to export with the address it bound; `status` names the backend
/// it read; and a command on the local default says so when something answers on the
/// coordinator's default port.
#[test]
fn which_backend_is_said() {
    let dir = Scratch::new("which");
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    // Read on a thread, so that a server that prints fewer lines fails the test, not hangs it.
    let stdout = serve.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(SOON).expect("the address line");
    let second = rx.recv_timeout(SOON).expect("a second line");
    let _ = serve.kill();
    let _ = serve.wait();
    let port = first
        .strip_prefix("listening on 127.0.0.1:")
        .expect("the address line");
    assert_ne!(port, "0");
    assert_eq!(
        second,
        format!("clients: export TURNSTILE_URL=tcp://127.0.0.1:{port}")
    );

    let h = Harness::new("which-status", "10s");
    for (kind, url) in backends(&h) {
        let out = h.run(&["status", "--url", &url]);
        assert_eq!(out.code(), 0, "{kind}: {out:?}");
        assert!(
            out.stdout.starts_with(&format!("backend: {url}\n")),
            "{kind}: {out:?}"
        );
    }

    // Something answers on the default port: ours, or a coordinator already there.
    let _listener = std::net::TcpListener::bind("127.0.0.1:7420");
    let out = bare(&dir, &["status"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.starts_with("backend: file://"),
        "still the local default, never switched: {out:?}"
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {out:?}");
    assert!(
        lines[0].contains("127.0.0.1:7420")
            && lines[0].contains("export TURNSTILE_URL=tcp://127.0.0.1:7420"),
        "{out:?}"
    );
    // With a URL given, no probe and no note.
    let out = h.run(&["status"]);
    assert_eq!(out.stderr, "", "{out:?}");
}

/// `--timeout 0` is a try-lock: busy is exit 75 at once, free runs the command; on both
/// backends.
#[test]
fn timeout_zero_is_a_try_lock() {
    let h = Harness::new("trylock", "10s");
    for (kind, url) in backends(&h) {
        let name = format!("try-{kind}");
        let held = format!("held-{kind}");
        let _ = std::fs::remove_file(h.dir.join("go"));
        let mut holder = h.spawn(
            &format!("holder-{kind}"),
            &[
                "run",
                &name,
                "--limit",
                "1",
                "--url",
                &url,
                "--",
                "sh",
                "-c",
                &hold_until_go(&held),
            ],
        );
        h.dir.wait_for(&held);
        let started = Instant::now();
        let busy = h.run(&[
            "run",
            &name,
            "--limit",
            "1",
            "--timeout",
            "0",
            "--url",
            &url,
            "--",
            "true",
        ]);
        assert_eq!(busy.code(), 75, "{kind}: {busy:?}");
        assert!(busy.stderr.contains("is busy"), "{kind}: {busy:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{kind}: at once"
        );
        std::fs::write(h.dir.join("go"), "").expect("go");
        assert_eq!(holder.wait(SOON).code(), 0, "{kind}");
        let free = h.run(&[
            "run",
            &name,
            "--limit",
            "1",
            "--timeout",
            "0",
            "--url",
            &url,
            "--",
            "true",
        ]);
        assert_eq!(free.code(), 0, "{kind}: {free:?}");
    }
    let help = h.run(&["run", "--help"]);
    assert!(
        help.stdout.contains("--timeout 0") && help.stdout.contains("flock -n"),
        "{help:?}"
    );
}

/// `run --session-ttl` sets one client's TTL: a holder killed with SIGKILL frees its slot
/// after its own short TTL, not the coordinator's long default. On the file backend the flag
/// is taken too.
#[test]
fn run_takes_a_session_ttl_of_its_own() {
    let h = Harness::new("ttl", "60s");
    let holder = h.spawn(
        "holder",
        &[
            "run",
            "t",
            "--limit",
            "1",
            "--session-ttl",
            "1s",
            "--",
            "sh",
            "-c",
            &hold_until_go("held"),
        ],
    );
    h.dir.wait_for("held");
    holder.signal(Signal::SIGKILL);
    let started = Instant::now();
    let next = h.run(&["run", "t", "--limit", "1", "--timeout", "15s", "--", "true"]);
    assert_eq!(next.code(), 0, "{next:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "freed after the holder's 1s TTL, not the coordinator's 60s"
    );
    let url = backends(&h)[1].1.clone();
    let out = h.run(&[
        "run",
        "t",
        "--limit",
        "1",
        "--session-ttl",
        "2s",
        "--url",
        &url,
        "--",
        "true",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    let bad = h.run(&["run", "t", "--session-ttl", "0s", "--", "true"]);
    assert_eq!(bad.code(), 2, "{bad:?}");
}

/// A lease id survives every JSON document exactly (as a string): `status --json`, the HTTP
/// status and the event feed; compared as text with the id the command was given.
#[test]
fn lease_ids_survive_json_exactly() {
    let dir = Scratch::new("ids");
    let server = Server::spawn(
        &[
            "--in-memory",
            "--session-ttl",
            "10s",
            "--http",
            "127.0.0.1:0",
        ],
        Stdio::null(),
    );
    let h = Harness { server, dir };
    let mut holder = h.spawn(
        "holder",
        &[
            "run",
            "ids",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            &hold_until_go("held"),
        ],
    );
    let lease = h.dir.wait_for("held").trim().to_owned();
    assert!(lease.parse::<u64>().is_ok(), "{lease}");
    let from_cli = h.semaphore("ids").expect("the semaphore");
    assert_eq!(from_cli["holders"][0]["lease_id"].as_str(), Some(&*lease));
    let (code, body) = h.server.get("/v1/status");
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!("\"lease_id\":\"{lease}\"")),
        "{body}"
    );
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        doc["semaphores"][0]["holders"][0]["lease_id"].as_str(),
        Some(&*lease)
    );
    // A close takes the lease: the feed names it, exactly.
    assert_eq!(h.run(&["close", "ids"]).code(), 0);
    let events = wait_until("the lease_lost event", SOON, || {
        let (_, body) = h.server.get("/v1/events");
        body.contains("lease_lost").then_some(body)
    });
    assert!(
        events.contains(&format!("\"lease\":\"{lease}\"")),
        "{events}"
    );
    assert_eq!(holder.wait(SOON).code(), 76);
}

/// Clean endings are not expiries: a `run` on a closed semaphore, a name that is too long, a
/// `status --watch` stopped with SIGTERM, a nanny that exits all end their sessions. The only `session_expired`
/// in the feed is the one of a `run` killed with SIGKILL afterwards, which did miss its TTL.
#[test]
fn only_a_missed_ttl_is_an_expiry() {
    let dir = Scratch::new("ended");
    let server = Server::spawn(
        &[
            "--in-memory",
            "--session-ttl",
            "1s",
            "--http",
            "127.0.0.1:0",
        ],
        Stdio::null(),
    );
    let h = Harness { server, dir };
    assert_eq!(h.run(&["run", "c", "--limit", "1", "--", "true"]).code(), 0);
    assert_eq!(h.run(&["close", "c"]).code(), 0);
    let closed = h.run(&["run", "c", "--", "true"]);
    assert_eq!(closed.code(), 1, "{closed:?}");
    let long = "n".repeat(300);
    let too_long = h.run(&["run", &long, "--limit", "1", "--", "true"]);
    assert_eq!(too_long.code(), 1, "{too_long:?}");
    let mut watch = h.spawn("watch", &["status", "--watch", "--interval", "100ms"]);
    wait_until("a frame of the watch", SOON, || {
        std::fs::read_to_string(h.dir.join("watch.stdout"))
            .ok()
            .filter(|s| s.contains("SEMAPHORE"))
    });
    watch.signal(Signal::SIGTERM);
    assert_eq!(watch.wait(SOON).code(), 0);
    // A nanny whose one worker ended, and which exits: its own session ends with it.
    let nanny = h.run(&[
        "nanny",
        "--workers",
        "1",
        "--restart",
        "never",
        "--",
        "true",
    ]);
    assert_eq!(nanny.code(), 0, "{nanny:?}");
    // The sentinel: its session misses its TTL, one TTL after every session above ended.
    let sentinel = h.spawn(
        "sentinel",
        &[
            "run",
            "s",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            &hold_until_go("held"),
        ],
    );
    h.dir.wait_for("held");
    let pid = sentinel.pid().as_raw();
    sentinel.signal(Signal::SIGKILL);
    let events = wait_until("the sentinel's expiry", SOON, || {
        let (_, body) = h.server.get("/v1/events");
        body.contains("session_expired").then_some(body)
    });
    let doc: Value = serde_json::from_str(&events).expect("JSON");
    let expired: Vec<&Value> = doc["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "session_expired")
        .collect();
    assert_eq!(expired.len(), 1, "only the sentinel expired: {events}");
    assert!(
        expired[0]["client"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!(":{pid}"))),
        "{events}"
    );
}

/// `close` of a name that does not exist succeeds on every backend (as Dask's close of a
/// name "not known or already closed"), and so does closing twice.
#[test]
fn close_of_an_unknown_name_is_the_same_everywhere() {
    let h = Harness::new("close", "10s");
    for (kind, url) in backends(&h) {
        let out = h.run(&["close", "never-made", "--url", &url]);
        assert_eq!(
            (out.code(), out.stderr.as_str()),
            (0, ""),
            "{kind}: {out:?}"
        );
        assert_eq!(
            h.run(&["run", "k", "--limit", "1", "--url", &url, "--", "true"])
                .code(),
            0
        );
        for _ in 0..2 {
            let out = h.run(&["close", "k", "--url", &url]);
            assert_eq!(out.code(), 0, "{kind}: {out:?}");
        }
    }
}

/// The file backend keeps no counters: its table shows `-` and its JSON `null`, where the
/// coordinator shows its numbers.
#[test]
fn counters_a_backend_does_not_keep_are_not_zeros() {
    let h = Harness::new("counters", "10s");
    for (kind, url) in backends(&h) {
        assert_eq!(
            h.run(&["run", "k", "--limit", "1", "--url", &url, "--", "true"])
                .code(),
            0
        );
        let table = h.run(&["status", "--url", &url]);
        let row: Vec<&str> = table
            .stdout
            .lines()
            .find(|l| l.starts_with("k "))
            .expect("a row for k")
            .split_whitespace()
            .collect();
        let json = h.run(&["status", "--json", "--url", &url]);
        let doc: Value = serde_json::from_str(&json.stdout).expect("JSON");
        let sem = &doc["semaphores"][0];
        match kind {
            "file" => {
                assert_eq!(row[4..6], ["-", "-"], "{table:?}");
                assert!(sem["acquired_total"].is_null(), "{sem}");
                assert!(sem["expired_total"].is_null(), "{sem}");
            }
            _ => {
                assert_eq!(row[4..6], ["1", "0"], "{table:?}");
                assert_eq!(sem["acquired_total"], 1, "{sem}");
            }
        }
    }
}

/// Bad values say what a good one is, and name where they came from.
#[test]
fn bad_values_say_what_is_valid() {
    let dir = Scratch::new("values");
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "x", "--limit", "-1", "--", "true"],
            "expected 1 or more",
        ),
        (
            &["run", "x", "--weight", "0", "--", "true"],
            "expected 1 or more",
        ),
        (
            &["run", "x", "--timeout", "-5s", "--", "true"],
            "cannot be negative",
        ),
        (
            &["serve", "--in-memory", "--max-connections", "0"],
            "at least 1",
        ),
    ];
    for (args, says) in cases {
        let out = bare(&dir, args);
        assert_eq!(out.code(), 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
        assert!(!out.stderr.contains("unexpected argument"), "{out:?}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--in-memory", "--http", "off"])
        .env("TURNSTILE_SESSION_TTL", "banana")
        .output()
        .expect("run serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("TURNSTILE_SESSION_TTL") && err.contains("banana"),
        "{err}"
    );

    // A file where a directory should be: one clear line, for serve and for file://.
    let file = dir.join("a-file");
    std::fs::write(&file, "").expect("a file");
    let path = file.to_str().expect("UTF-8");
    let out = bare(
        &dir,
        &[
            "serve",
            "--data-dir",
            path,
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
        ],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    let err = out.stderr.trim_end();
    assert!(
        err.ends_with(&format!("{path}: not a directory")),
        "{out:?}"
    );
    assert_eq!(err.matches("not a directory").count(), 1, "{out:?}");
    let url = format!("file://{path}");
    let out = bare(
        &dir,
        &["run", "x", "--limit", "1", "--url", &url, "--", "true"],
    );
    out.assert_one_line_error(&["not a directory"]);
    assert!(!out.stderr.contains("File exists"), "{out:?}");

    // The startup log keeps the data directory's case.
    let data = dir.join("MixedCase-Data");
    let data = data.to_str().expect("UTF-8");
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut log = BufReader::new(serve.stderr.take().expect("piped")).lines();
    let line = log
        .find_map(|l| l.ok().filter(|l| l.contains("listening")))
        .expect("the startup line");
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(line.contains(data), "{line}");
}

/// A client pointed at the HTTP port says so at once; a refused connection asks whether
/// `turnstile serve` runs there.
#[test]
fn wrong_ports_are_named() {
    let dir = Scratch::new("ports");
    let server = Server::spawn(
        &[
            "--in-memory",
            "--session-ttl",
            "10s",
            "--http",
            "127.0.0.1:0",
        ],
        Stdio::null(),
    );
    let url = format!("tcp://{}", server.http_addr());
    let started = Instant::now();
    let out = bare(&dir, &["status", "--url", &url]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "at once, not after the HTTP port's head timeout: {:?}",
        started.elapsed()
    );
    out.assert_one_line_error(&["HTTP port", "listening on"]);
    // A port nobody listens on: bind one, then let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    let out = bare(&dir, &["status", "--url", &format!("tcp://{addr}")]);
    assert_eq!(out.code(), 69, "{out:?}");
    out.assert_one_line_error(&[&format!("is `turnstile serve` running on {addr}?")]);
}

/// A `run` holding its slot through a coordinator restart within its TTL (an outage longer
/// than the 5 s after which the client's "still trying" notice comes) prints nothing of its
/// own on stderr: that stream is its command's.
#[test]
fn run_stays_quiet_through_a_restart_within_the_ttl() {
    let dir = Scratch::new("quiet");
    let data = dir.join("data");
    let data = data.to_str().expect("UTF-8").to_owned();
    let args = ["--data-dir", data.as_str(), "--session-ttl", "30s"];
    let server = Server::start_with(&args);
    let addr = server
        .url()
        .trim_start_matches("tcp://")
        .parse()
        .expect("addr");
    let mut h = Harness { server, dir };
    let proxy = FaultProxy::start(addr);
    let mut cmd = h.command(&[
        "run",
        "q",
        "--limit",
        "1",
        "--",
        "sh",
        "-c",
        &hold_until_go("held"),
    ]);
    cmd.env("TURNSTILE_URL", proxy.url());
    let mut holder = h.spawn_command("holder", cmd);
    h.dir.wait_for("held");
    let before = proxy.forwarded();
    proxy.refuse();
    h.server.kill();
    // The outage is the fault injected: longer than the client's first notice (5 s).
    std::thread::sleep(Duration::from_millis(6_500));
    h.server = Server::start_with(&args);
    proxy.set_upstream(
        h.server
            .url()
            .trim_start_matches("tcp://")
            .parse()
            .expect("addr"),
    );
    proxy.restore();
    wait_until("the holder to reconnect", SOON, || {
        (proxy.forwarded() > before).then_some(())
    });
    std::fs::write(h.dir.join("go"), "").expect("go");
    let out = holder.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_no_panic(&out.stderr);
    assert_eq!(
        out.stderr, "",
        "run printed on its command's stderr: {out:?}"
    );
}

/// `cmd` with stdout and stderr on pipes whose reading ends are closed before it writes, to
/// completion: a reader that went away (`turnstile status | head -1`, a log pipe gone).
fn with_readers_gone(mut cmd: Command) -> std::process::ExitStatus {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .spawn()
        .expect("spawn turnstile");
    drop(child.stdout.take());
    drop(child.stderr.take());
    // What it would have said is lost with the pipe; a panic exits with 101.
    child.wait().expect("wait for turnstile")
}

/// Rust ignores SIGPIPE, so a write to a closed pipe is an error on which `println!` and
/// `eprintln!` panic. A reader of stdout that stops early ends a command quietly (exit 0, as
/// it has what it wanted); an exit code that says something (75: busy) survives a closed
/// stderr; and a coordinator whose stdout and stderr are gone keeps serving.
#[test]
fn closed_pipes_are_not_panics() {
    let h = Harness::new("closed_pipes", "10s");
    let made = h.run(&["run", "db", "--limit", "2", "--", "true"]);
    assert_eq!(made.code(), 0, "{made:?}");
    for args in [&["status"][..], &["status", "--json"], &["status", "db"]] {
        let status = with_readers_gone(h.command(args));
        assert_eq!(
            status.code(),
            Some(0),
            "turnstile {args:?} into a closed pipe"
        );
    }
    // Busy: the exit code is the message that still arrives.
    let _ = std::fs::remove_file(h.dir.join("go"));
    let mut holder = h.spawn(
        "holder",
        &[
            "run",
            "one",
            "--limit",
            "1",
            "--",
            "sh",
            "-c",
            &hold_until_go("held"),
        ],
    );
    h.dir.wait_for("held");
    let status = with_readers_gone(h.command(&[
        "run",
        "one",
        "--limit",
        "1",
        "--timeout",
        "0",
        "--",
        "true",
    ]));
    assert_eq!(status.code(), Some(75), "busy, with stderr closed");
    std::fs::write(h.dir.join("go"), "").expect("go");
    assert_eq!(holder.wait(SOON).code(), 0);

    // A coordinator started with its output going nowhere: it must not die on its first line.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Command::new(BIN)
        .args(["serve", "--in-memory", "--http", "off", "--listen", &listen])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn turnstile serve");
    drop(serve.stdout.take());
    drop(serve.stderr.take());
    let url = format!("tcp://{listen}");
    wait_until("the coordinator to answer", SOON, || {
        if let Ok(Some(exit)) = serve.try_wait() {
            panic!("the coordinator exited ({exit}) when its stdout was closed");
        }
        let out = Command::new(BIN)
            .args(["status", "--url", &url])
            .stdin(Stdio::null())
            .output()
            .expect("run turnstile status");
        out.status.success().then_some(())
    });
    let _ = serve.kill();
    let _ = serve.wait();
}
