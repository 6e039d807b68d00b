//! Black-box tests of `turnstile run` on the shared-directory backend (`file://DIR`): real
//! processes and no coordinator in the loop. (The harness of `common/mod.rs` starts a
//! coordinator anyway; these tests point every command at a directory instead, with
//! `TURNSTILE_URL` or `--url`.)

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{read_holds, Harness, HOLD_SCRIPT, SOON};
use nix::sys::signal::Signal;

/// Number of `turnstile run` processes competing in the concurrency test.
const CLIENTS: u64 = 32;
/// Capacity of the semaphore they compete for.
const LIMIT: usize = 3;

/// `turnstile ARGS` with `TURNSTILE_URL=file://<scratch>/sems`.
fn file_command(h: &Harness, args: &[&str]) -> Command {
    let mut cmd = h.command(args);
    cmd.env("TURNSTILE_URL", file_url(h));
    cmd
}

fn file_url(h: &Harness) -> String {
    format!("file://{}", h.dir.join("sems").display())
}

/// 32 concurrent `turnstile run --limit 3` on one directory: never more than 3 commands at
/// once, 3 at once at some point, and a distinct fencing token for every grant.
#[test]
fn limit_bounds_concurrency_across_processes() {
    let h = Harness::new("file-concurrency", "10s");
    // As in cli.rs: the logged holds (see `HOLD_SCRIPT`) bound the real concurrency from below.
    let script = HOLD_SCRIPT;
    let limit = LIMIT.to_string();
    let mut procs: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let cmd = file_command(
                &h,
                &["run", "db", "--limit", &limit, "--", "sh", "-c", script],
            );
            h.spawn_command(&format!("client{i}"), cmd)
        })
        .collect();
    for p in &mut procs {
        let out = p.wait(Duration::from_secs(90));
        assert_eq!(out.code(), 0, "{out:?}");
    }

    let holds = read_holds(&h.dir.read("events").expect("the commands wrote events"));
    assert_eq!(
        holds.starts.len() as u64,
        CLIENTS,
        "one distinct token per grant"
    );
    assert!(holds.starts.keys().all(|&t| t >= 1));
    assert!(
        holds.max_overlap <= LIMIT,
        "{} commands ran at once with --limit {LIMIT}",
        holds.max_overlap
    );
    assert_eq!(
        holds.max_overlap, LIMIT,
        "the limit was never reached: slots were wasted"
    );

    let out = h
        .spawn_command("status", file_command(&h, &["status", "db", "--json"]))
        .wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(
        doc["semaphores"][0]["in_use"], 0,
        "every slot released: {doc}"
    );
    assert_eq!(doc["semaphores"][0]["queued"], 0, "no ticket left: {doc}");
}

/// A holder killed with SIGKILL leaves its slot file behind, naming a pid of this host that
/// no longer exists: the next acquire reclaims it at once, long before the 10 s TTL.
#[test]
fn slot_of_a_killed_local_holder_is_reclaimed_at_once() {
    let h = Harness::new("file-killed", "10s");
    let script = r#"echo "$TURNSTILE_FENCING_TOKEN" > "$DIR/held.tmp" && mv "$DIR/held.tmp" "$DIR/held"; sleep 60"#;
    let mut holder = h.spawn_command(
        "holder",
        file_command(
            &h,
            &["run", "one", "--limit", "1", "--", "sh", "-c", script],
        ),
    );
    let first: u64 = h.dir.wait_for("held").trim().parse().expect("token");
    holder.signal(Signal::SIGKILL);
    holder.wait(SOON); // reaped: the pid is gone, not a zombie

    let started = Instant::now();
    let out = h
        .spawn_command(
            "next",
            file_command(
                &h,
                &[
                    "run",
                    "one",
                    "--limit",
                    "1",
                    "--timeout",
                    "5s",
                    "--",
                    "sh",
                    "-c",
                    "echo $TURNSTILE_FENCING_TOKEN",
                ],
            ),
        )
        .wait(SOON);
    assert_eq!(
        out.code(),
        0,
        "the dead holder's slot was not reclaimed: {out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let second: u64 = out.stdout.trim().parse().expect("token");
    assert!(second > first, "tokens increase: {first} then {second}");
}

/// A clock step of the file server, simulated as in the issue (`touch -m -d '-1 hour'` on
/// the live holder's slot file, kept up against its heartbeats; then an hour ahead): the
/// waiting `turnstile run` starts its command only after the holder's command ended.
#[test]
fn clock_step_on_the_holders_slot_does_not_start_the_waiter() {
    let h = Harness::new("file-clock-step", "10s");
    let holder_script = r#"echo "start $TURNSTILE_FENCING_TOKEN $(date +%s%N)" >> "$DIR/events"
        touch "$DIR/held"
        sleep 5
        echo "end $TURNSTILE_FENCING_TOKEN $(date +%s%N)" >> "$DIR/events""#;
    let mut holder = h.spawn_command(
        "holder",
        file_command(
            &h,
            &[
                "run",
                "step",
                "--limit",
                "1",
                "--",
                "sh",
                "-c",
                holder_script,
            ],
        ),
    );
    h.dir.wait_for("held");
    let mut waiter = h.spawn_command(
        "waiter",
        file_command(
            &h,
            &["run", "step", "--limit", "1", "--", "sh", "-c", HOLD_SCRIPT],
        ),
    );
    let slot = h.dir.join("sems").join("step").join("slot-0");
    let stop = Arc::new(AtomicBool::new(false));
    let stepper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // An hour back for 2 s, then an hour ahead.
                let when = if started.elapsed() < Duration::from_secs(2) {
                    SystemTime::now() - Duration::from_secs(3600)
                } else {
                    SystemTime::now() + Duration::from_secs(3600)
                };
                if let Ok(file) = std::fs::File::options().write(true).open(&slot) {
                    let _ = file.set_modified(when);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = holder.wait(SOON);
    stop.store(true, Ordering::Relaxed);
    stepper.join().expect("the stepper thread");
    assert_eq!(
        out.code(),
        0,
        "the holder lost its lease to the waiter: {out:?}"
    );
    let out = waiter.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    let holds = read_holds(&h.dir.read("events").expect("the commands wrote events"));
    assert_eq!(holds.starts.len(), 2);
    assert_eq!(
        holds.max_overlap, 1,
        "the waiter ran while the holder still held the slot"
    );
}

/// With neither --url nor TURNSTILE_URL, `turnstile run` uses the file backend in
/// $XDG_RUNTIME_DIR/turnstile: no server, no set-up.
#[test]
fn no_url_means_a_per_user_directory() {
    let h = Harness::new("file-default", "10s");
    let runtime_dir = h.dir.join("xdg");
    std::fs::create_dir_all(&runtime_dir).expect("mkdir");
    let mut cmd = h.command(&["run", "dflt", "--limit", "4", "--", "true"]);
    cmd.env_remove("TURNSTILE_URL")
        .env("XDG_RUNTIME_DIR", &runtime_dir);
    let out = h.spawn_command("default", cmd).wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    let capacity = runtime_dir.join("turnstile").join("dflt").join("capacity");
    let text = std::fs::read_to_string(&capacity).expect("the semaphore is in the default dir");
    assert_eq!(text, "4\ndflt\n");

    let mut cmd = h.command(&["status", "--json"]);
    cmd.env_remove("TURNSTILE_URL")
        .env("XDG_RUNTIME_DIR", &runtime_dir);
    let out = h.spawn_command("default-status", cmd).wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("\"dflt\""), "{out:?}");
}

/// A directory that cannot be used is one line on stderr naming it.
#[test]
fn unusable_directory_is_one_line() {
    let h = Harness::new("file-unusable", "10s");
    std::fs::write(h.dir.join("plain"), b"x").expect("write");
    let bad = h.dir.join("plain").join("sems");
    let url = format!("file://{}", bad.display());
    let out = h
        .spawn_command(
            "unusable",
            file_command(
                &h,
                &["run", "x", "--limit", "1", "--url", &url, "--", "true"],
            ),
        )
        .wait(SOON);
    out.assert_one_line_error(&["cannot use", &bad.display().to_string()]);
}
