//! `turnstile bench` against real coordinators: callers spread over fewer connections, and the
//! CPU time per pair of the bench and of the server in its report.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::process::Command;

use common::{Server, BIN};
use serde_json::Value;

/// Runs `turnstile bench ARGS --json` (a short run) and returns its JSON report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["bench", "--json", "--duration", "1s", "--warmup", "300ms"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run turnstile bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

/// The report of 8 callers over 2 connections: they all completed pairs without errors, and
/// both processes' costs per pair are there.
fn assert_report(v: &Value, server_measured: bool) {
    assert_eq!(v["clients"], 8, "{v}");
    assert_eq!(v["connections"], 2, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["pairs_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    // A second of load costs the bench more than one clock tick (10 ms) of CPU.
    let bench_cpu = v["bench_cpu_us_per_pair"].as_f64();
    assert!(bench_cpu.is_some_and(|c| c > 0.0), "{v}");
    if server_measured {
        let server_cpu = v["server_cpu_us_per_pair"].as_f64();
        assert!(server_cpu.is_some_and(|c| c > 0.0), "{v}");
    } else {
        assert!(v["server_cpu_us_per_pair"].is_null(), "{v}");
    }
}

#[test]
fn library_callers_share_connections_and_the_server_pid_is_measured() {
    let server = Server::start("10s");
    let pid = server.pid().to_string();
    let v = bench(&[
        "--url",
        server.url(),
        "--server-pid",
        &pid,
        "--connections",
        "2",
        "--clients",
        "8",
    ]);
    assert_report(&v, true);
    assert_eq!(v["scenario"], "uncontended", "{v}");
}

#[test]
fn without_a_server_pid_a_remote_coordinator_is_not_measured() {
    let server = Server::start("10s");
    let v = bench(&[
        "--url",
        server.url(),
        "--client",
        "raw",
        "--connections",
        "2",
        "--clients",
        "8",
    ]);
    assert_report(&v, false);
}

#[test]
fn connections_are_refused_where_they_mean_nothing() {
    let out = Command::new(BIN)
        .args(["bench", "--scenario", "echo", "--connections", "2"])
        .output()
        .expect("run turnstile bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--connections"), "{stderr}");
}

/// Contended: the callers of one connection queue behind each other on 2 semaphores of
/// capacity 1 (on a coordinator the bench starts), so replies come back out of order and must
/// be matched by request id. With `--release drop` and `send` the library drops its permits
/// (or sends releases without waiting) and the bare client writes each release with the next
/// acquire, so a release still in flight must be handled before the acquire behind it: every
/// pair completes with no refusal (a lease id reused too early, or an acquire queued behind
/// its caller's own released lease, would show as errors or a stall).
#[test]
fn pipelined_callers_complete_every_pair() {
    for (client, release, label) in [
        ("raw", "wait", "contended/inmemory/raw"),
        ("library", "drop", "contended/inmemory/release-drop"),
        ("library", "send", "contended/inmemory/release-send"),
        ("raw", "drop", "contended/inmemory/raw/pipelined"),
    ] {
        let v = bench(&[
            "--client",
            client,
            "--release",
            release,
            "--scenario",
            "contended",
            "--semaphores",
            "2",
            "--capacity",
            "1",
            "--connections",
            "2",
            "--clients",
            "8",
        ]);
        assert_report(&v, true);
        assert_eq!(v["scenario"], label, "{v}");
    }
}
