//! Black-box tests of `turnstile once` and `turnstile wait` with real processes, each written
//! once and run against both backends: the coordinator and the shared directory.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;
#[path = "../../turnstile-client/tests/etcd_support/mod.rs"]
mod etcd_support;

use std::process::Command;
use std::time::Duration;

use common::{Harness, Proc, Scratch, Server, BIN, SOON};
use nix::sys::signal::{killpg, Signal};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Tcp,
    File,
    Etcd,
}

/// A harness whose commands use `backend`.
struct World {
    h: Harness,
    backend: Backend,
    /// The etcd member of [`Backend::Etcd`] (its sessions keep the default TTL of 10 s).
    etcd: Option<etcd_support::Etcd>,
}

impl World {
    fn new(test: &str, backend: Backend, session_ttl: &str) -> World {
        World {
            h: Harness::new(&format!("{test}-{backend:?}"), session_ttl),
            backend,
            etcd: matches!(backend, Backend::Etcd).then(etcd_support::Etcd::start),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.h.command(args);
        if let Backend::File = self.backend {
            cmd.env(
                "TURNSTILE_URL",
                format!("file://{}", self.h.dir.join("sems").display()),
            );
        }
        if let Some(etcd) = &self.etcd {
            cmd.env("TURNSTILE_URL", etcd.url("once"));
        }
        cmd.env("TURNSTILE_BIN", BIN);
        cmd
    }

    /// `sh -c SCRIPT` with the environment `turnstile` commands get (and `$TURNSTILE_BIN`).
    fn sh(&self, script: &str) -> Command {
        let turnstile = self.command(&[]);
        let mut sh = Command::new("sh");
        sh.args(["-c", script]);
        for (k, v) in turnstile.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh
    }

    fn spawn(&self, label: &str, args: &[&str]) -> Proc {
        self.h.spawn_command(label, self.command(args))
    }

    fn run(&self, label: &str, args: &[&str]) -> common::Finished {
        self.spawn(label, args).wait(SOON)
    }

    fn status(&self) -> Value {
        let out = self.run("status", &["status", "--json"]);
        assert_eq!(out.code(), 0, "{out:?}");
        serde_json::from_str(&out.stdout).expect("status --json is JSON")
    }

    fn job(&self, name: &str) -> Value {
        self.status()["jobs"]
            .as_array()
            .expect("a jobs array")
            .iter()
            .find(|j| j["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("job {name:?} missing from the status"))
    }
}

/// Runner `r` of [`runners_run_each_job_once`]: goes through the 40 jobs starting at job
/// `10r`; even runners wait for a job that runs elsewhere, odd ones skip it.
const RUNNER: &str = r#"
i=0
while [ $i -lt 40 ]; do
    j=$(( (i + OFF) % 40 ))
    "$TURNSTILE_BIN" once "job-$j" --group batch $WAIT -- sh -c 'echo "$TURNSTILE_JOB $TURNSTILE_FENCING_TOKEN" >> "$DIR/runs"' || exit 9
    i=$((i + 1))
done
"#;

/// The acceptance test: 4 concurrent runners over the same 40 jobs of one group; every job
/// runs exactly once, and `turnstile wait` then sees the group complete.
fn runners_run_each_job_once(backend: Backend) {
    let w = World::new("once-runners", backend, "10s");
    let mut runners: Vec<Proc> = (0..4)
        .map(|r| {
            let mut sh = w.sh(RUNNER);
            sh.env("OFF", (r * 10).to_string())
                .env("WAIT", if r % 2 == 0 { "--wait" } else { "" });
            w.h.spawn_command(&format!("runner{r}"), sh)
        })
        .collect();
    for r in &mut runners {
        let out = r.wait(Duration::from_secs(120));
        assert_eq!(out.code(), 0, "{out:?}");
        common::assert_no_panic(&out.stderr);
    }
    let runs = w.h.dir.read("runs").expect("jobs ran");
    let mut jobs: Vec<&str> = runs.lines().filter_map(|l| l.split(' ').next()).collect();
    jobs.sort_unstable();
    let mut want: Vec<String> = (0..40).map(|j| format!("job-{j}")).collect();
    want.sort_unstable();
    assert_eq!(jobs, want, "every job ran exactly once");

    let out = w.run(
        "wait",
        &["wait", "batch", "--jobs", "40", "--timeout", "5s"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("40 of 40 jobs completed, 0 running"),
        "{out:?}"
    );
    let doc = w.status();
    let group = &doc["groups"][0];
    assert_eq!(
        (group["name"].as_str(), group["completed"].as_u64()),
        (Some("batch"), Some(40))
    );
    let text = w.run("status-text", &["status"]);
    assert!(text.stdout.contains("GROUP"), "{text:?}");
}

#[test]
fn runners_run_each_job_once_on_the_coordinator() {
    runners_run_each_job_once(Backend::Tcp);
}

#[test]
fn runners_run_each_job_once_on_a_shared_directory() {
    runners_run_each_job_once(Backend::File);
}

#[test]
fn runners_run_each_job_once_on_etcd() {
    runners_run_each_job_once(Backend::Etcd);
}

/// A runner killed with SIGKILL mid-job (with its command): another runner, waiting, takes
/// the job over and completes it; later runners skip it; the kill counts as a failed attempt.
fn killed_runner_is_taken_over(backend: Backend) {
    // A short TTL: on the coordinator, a dead runner's lease lasts until its session expires.
    let w = World::new("once-killed", backend, "1s");
    let a = w.spawn(
        "a",
        &[
            "once",
            "slow",
            "--group",
            "g",
            "--",
            "sh",
            "-c",
            r#"echo "$TURNSTILE_FENCING_TOKEN" > "$DIR/a.tmp" && mv "$DIR/a.tmp" "$DIR/a-started"; exec sleep 1000"#,
        ],
    );
    let a_token: u64 = w.h.dir.wait_for("a-started").trim().parse().expect("token");
    // The whole group: turnstile and its command, as when a node dies.
    killpg(a.pid(), Signal::SIGKILL).expect("kill runner a");
    let b = w.run(
        "b",
        &[
            "once",
            "slow",
            "--wait",
            "--",
            "sh",
            "-c",
            r#"echo "$TURNSTILE_FENCING_TOKEN" > "$DIR/b-ran""#,
        ],
    );
    assert_eq!(b.code(), 0, "{b:?}");
    let b_token: u64 =
        w.h.dir
            .read("b-ran")
            .expect("b ran the job")
            .trim()
            .parse()
            .expect("token");
    assert!(b_token > a_token, "the take-over has a newer fencing token");
    let c = w.run(
        "c",
        &[
            "once",
            "slow",
            "--",
            "sh",
            "-c",
            r#"echo ran > "$DIR/c-ran""#,
        ],
    );
    assert_eq!(c.code(), 0, "{c:?}");
    assert!(c.stderr.contains("was completed by"), "{c:?}");
    assert!(
        w.h.dir.read("c-ran").is_none(),
        "a completed job does not run again"
    );
    let job = w.job("slow");
    assert_eq!(job["failures"], 1, "{job}");
    assert_eq!(job["completed"]["token"], b_token, "{job}");
    assert_eq!(job["group"], "g");
}

#[test]
fn killed_runner_is_taken_over_on_the_coordinator() {
    killed_runner_is_taken_over(Backend::Tcp);
}

#[test]
fn killed_runner_is_taken_over_on_a_shared_directory() {
    killed_runner_is_taken_over(Backend::File);
}

#[test]
fn killed_runner_is_taken_over_on_etcd() {
    killed_runner_is_taken_over(Backend::Etcd);
}

/// Skipping a job that runs elsewhere, a failure that is retried, `--reset`, a command that
/// does not exist, and `wait --timeout`.
fn skips_failures_and_resets(backend: Backend) {
    let w = World::new("once-cases", backend, "10s");
    let mut a = w.spawn(
        "a",
        &[
            "once",
            "j",
            "--",
            "sh",
            "-c",
            r#"touch "$DIR/a-started"; while [ ! -e "$DIR/a-go" ]; do sleep 0.02; done"#,
        ],
    );
    w.h.dir.wait_for("a-started");
    let b = w.run(
        "b",
        &["once", "j", "--", "sh", "-c", r#"touch "$DIR/b-ran""#],
    );
    assert_eq!(b.code(), 0, "{b:?}");
    assert!(b.stderr.contains("is running on"), "{b:?}");
    assert_eq!(b.stderr.lines().count(), 1, "{b:?}");
    assert!(w.h.dir.read("b-ran").is_none());
    let timed = w.run(
        "t",
        &["once", "j", "--wait", "--timeout", "200ms", "--", "true"],
    );
    assert_eq!(timed.code(), 75, "{timed:?}");
    std::fs::write(w.h.dir.join("a-go"), "").expect("let a finish");
    assert_eq!(a.wait(SOON).code(), 0);

    let failed = w.run(
        "k1",
        &["once", "k", "--group", "g", "--", "sh", "-c", "exit 3"],
    );
    assert_eq!(failed.code(), 3, "the command's own code: {failed:?}");
    let job = w.job("k");
    assert_eq!(job["failures"], 1, "{job}");
    assert_eq!(job["last_failure"], "exited with status 3", "{job}");
    assert!(job["completed"].is_null());
    let text = w.run("status-text", &["status"]);
    assert!(
        text.stdout
            .contains("failed   k: 1 failed attempt, last: exited with status 3"),
        "{text:?}"
    );
    let retry = w.run(
        "k2",
        &["once", "k", "--", "sh", "-c", r#"echo 1 >> "$DIR/k""#],
    );
    assert_eq!(retry.code(), 0, "a failed job is retried: {retry:?}");
    let skip = w.run(
        "k3",
        &["once", "k", "--", "sh", "-c", r#"echo 2 >> "$DIR/k""#],
    );
    assert_eq!(skip.code(), 0, "{skip:?}");
    assert_eq!(w.h.dir.read("k").as_deref(), Some("1\n"));
    // `status NAME` shows the job of that name (a completion clears the last failure's
    // reason; the count of failed attempts stays until a reset).
    let one = w.run("status-k", &["status", "k"]);
    assert_eq!(one.code(), 0, "{one:?}");
    assert!(
        one.stdout.starts_with("job k (group g): completed by ")
            && one.stdout.ends_with("; 1 failed attempt\n"),
        "{one:?}"
    );

    let reset = w.run("reset", &["once", "--reset", "k"]);
    assert_eq!(reset.code(), 0, "{reset:?}");
    assert!(reset.stderr.contains("forgot the completion"), "{reset:?}");
    let again = w.run(
        "k4",
        &["once", "k", "--", "sh", "-c", r#"echo 3 >> "$DIR/k""#],
    );
    assert_eq!(again.code(), 0, "{again:?}");
    assert_eq!(w.h.dir.read("k").as_deref(), Some("1\n3\n"));

    let missing = w.run("missing", &["once", "m", "--", "/nonexistent/command"]);
    assert_eq!(missing.code(), 127, "{missing:?}");
    assert_eq!(w.job("m")["failures"], 1);

    let waited = w.run(
        "wait",
        &["wait", "nothing-here", "--jobs", "1", "--timeout", "200ms"],
    );
    assert_eq!(waited.code(), 75, "{waited:?}");
    assert!(waited.stderr.contains("timed out"), "{waited:?}");
    let idle = w.run("wait-idle", &["wait", "g"]);
    assert_eq!(idle.code(), 0, "nothing runs in g: {idle:?}");

    let bad = w.run("bad", &["once", "", "--", "true"]);
    bad.assert_one_line_error(&["job name"]);
}

#[test]
fn skips_failures_and_resets_on_the_coordinator() {
    skips_failures_and_resets(Backend::Tcp);
}

#[test]
fn skips_failures_and_resets_on_a_shared_directory() {
    skips_failures_and_resets(Backend::File);
}

#[test]
fn skips_failures_and_resets_on_etcd() {
    skips_failures_and_resets(Backend::Etcd);
}

/// On the coordinator, completions are durable: they survive a crash (SIGKILL) and restart.
#[test]
fn completions_survive_a_coordinator_restart() {
    let data = Scratch::new("once-durable-data");
    let data_dir = data.join("state");
    let data_dir = data_dir.to_str().expect("UTF-8 path");
    let start = || Server::start_with(&["--data-dir", data_dir, "--session-ttl", "10s"]);
    let mut h = Harness {
        server: start(),
        dir: Scratch::new("once-durable"),
    };
    let out = h.run(&["once", "import", "--group", "nightly", "--", "true"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let failed = h.run(&["once", "export", "--group", "nightly", "--", "false"]);
    assert_eq!(failed.code(), 1, "{failed:?}");
    // A crash, then a new server that recovers from the same directory.
    h.server.kill();
    h.server = start();
    let again = h.run(&[
        "once",
        "import",
        "--",
        "sh",
        "-c",
        r#"touch "$DIR/ran-again""#,
    ]);
    assert_eq!(again.code(), 0, "{again:?}");
    assert!(again.stderr.contains("was completed by"), "{again:?}");
    assert!(h.dir.read("ran-again").is_none());
    let doc = h.status();
    let export = doc["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["name"] == "export")
        .cloned()
        .expect("export listed");
    assert_eq!(export["failures"], 1, "failed attempts are durable too");
    assert_eq!(export["group"], "nightly");
}

/// Issue 11 for `turnstile once`: `kill -9` of the runner takes its command's whole tree
/// along at once, and the runner that takes the job over never overlaps it.
fn killed_once_takes_its_command_along(backend: Backend) {
    let w = World::new("once-kill9-tree", backend, "1s");
    let granted = common::killed_wrapper_takes_its_command_along(
        &w.h,
        |a| w.command(a),
        &["once", "k9", "--", "sh", "-c"],
        &["once", "k9", "--wait", "--", "sh", "-c"],
    );
    if let Backend::File = backend {
        assert!(
            granted < Duration::from_secs(5),
            "the dead runner's lock was not reclaimed at once: {granted:?}"
        );
    }
}

#[test]
fn killed_once_takes_its_command_along_on_the_coordinator() {
    killed_once_takes_its_command_along(Backend::Tcp);
}

#[test]
fn killed_once_takes_its_command_along_on_a_shared_directory() {
    killed_once_takes_its_command_along(Backend::File);
}

#[test]
fn killed_once_takes_its_command_along_on_etcd() {
    killed_once_takes_its_command_along(Backend::Etcd);
}
