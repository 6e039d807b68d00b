//! A semaphore's lifecycle from the command line, with real processes, on a coordinator, on
//! a shared directory and on etcd: `set-capacity`, `delete`, and `release` (by force) of
//! another holder's lease, which stops that holder's `run` with exit 76.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;
#[path = "../../turnstile-client/tests/etcd_support/mod.rs"]
mod etcd_support;

use common::{assert_no_panic, process_exists, wait_until, Finished, Harness, Proc, SOON};
use serde_json::Value;

/// The backends: the harness's coordinator, or a directory in its scratch space.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Tcp,
    File,
    Etcd,
}

/// A harness whose commands all use `backend`.
struct On {
    h: Harness,
    url: String,
    /// The etcd serving `url`, for [`Backend::Etcd`] (stopped on drop).
    _etcd: Option<etcd_support::Etcd>,
}

impl On {
    fn new(test: &str, backend: Backend) -> On {
        let h = Harness::new(&format!("{test}-{backend:?}"), "10s");
        let mut etcd = None;
        let url = match backend {
            Backend::Tcp => h.server.url().to_owned(),
            Backend::File => format!("file://{}", h.dir.join("sems").display()),
            Backend::Etcd => etcd.insert(etcd_support::Etcd::start()).url("lifecycle"),
        };
        On {
            h,
            url,
            _etcd: etcd,
        }
    }

    fn spawn(&self, label: &str, args: &[&str]) -> Proc {
        let mut cmd = self.h.command(args);
        cmd.env("TURNSTILE_URL", &self.url);
        self.h.spawn_command(label, cmd)
    }

    fn run(&self, label: &str, args: &[&str]) -> Finished {
        self.spawn(label, args).wait(SOON)
    }

    fn semaphore(&self, name: &str) -> Option<Value> {
        let out = self.run("status", &["status", "--json"]);
        assert_eq!(out.code(), 0, "{out:?}");
        let doc: Value = serde_json::from_str(&out.stdout).expect("status --json is JSON");
        doc["semaphores"]
            .as_array()
            .expect("semaphores")
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    fn wait_for(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_until(&format!("{name}: {what}"), SOON, || {
            self.semaphore(name).filter(|s| pred(s))
        })
    }
}

/// A lease id as the status document shows it (a number, or a string of digits).
fn lease_of(holder: &Value) -> String {
    match &holder["lease_id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn release_stops_the_holder_with_76(backend: Backend) {
    let on = On::new("release", backend);
    let mut holder = on.spawn(
        "holder",
        &[
            "run",
            "r",
            "--limit",
            "1",
            "--kill-grace",
            "1s",
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"; exec sleep 60"#,
        ],
    );
    let child: i32 = on.h.dir.wait_for("pid").trim().parse().expect("a pid");
    let mut waiter = on.spawn("waiter", &["run", "r", "--limit", "1", "--", "true"]);
    let st = on.wait_for("r", "one holder, one waiter", |s| {
        s["in_use"] == 1 && s["queued"] == 1
    });
    let lease = lease_of(&st["holders"][0]);

    let out = on.run("release", &["release", "r", &lease]);
    assert_eq!(out.code(), 0, "{out:?}");

    let out = holder.wait(SOON);
    assert_eq!(out.code(), 76, "the lease was lost: {out:?}");
    assert!(out.stderr.contains("by force"), "{out:?}");
    assert_no_panic(&out.stderr);
    assert!(!process_exists(child), "the holder's command was stopped");
    assert_eq!(waiter.wait(SOON).code(), 0, "the waiter got the permit");

    // A lease that holds nothing: one line, exit 1.
    let out = on.run("again", &["release", "r", &lease]);
    assert_eq!(out.code(), 1, "{out:?}");
    out.assert_one_line_error(&[&lease]);
}

#[test]
fn release_stops_the_holder_with_76_on_a_coordinator() {
    release_stops_the_holder_with_76(Backend::Tcp);
}

#[test]
fn release_stops_the_holder_with_76_on_a_directory() {
    release_stops_the_holder_with_76(Backend::File);
}

#[test]
fn release_stops_the_holder_with_76_on_etcd() {
    release_stops_the_holder_with_76(Backend::Etcd);
}

fn set_capacity_and_delete(backend: Backend) {
    let on = On::new("resize", backend);
    assert_eq!(
        on.run("create", &["run", "s", "--limit", "1", "--", "true"])
            .code(),
        0
    );
    let out = on.run("grow", &["set-capacity", "s", "3"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(on.semaphore("s").expect("s")["capacity"], 3);
    // The old capacity is a mismatch now, and says so.
    let out = on.run("old", &["run", "s", "--limit", "1", "--", "true"]);
    out.assert_one_line_error(&["capacity"]);
    assert_eq!(
        on.run("new", &["run", "s", "--limit", "3", "--", "true"])
            .code(),
        0
    );
    let out = on.run("zero", &["set-capacity", "s", "0"]);
    assert_eq!(out.code(), 2, "a bad argument: {out:?}");

    // Delete: refused while held, then the name is free for any capacity.
    let mut holder = on.spawn(
        "holder",
        &[
            "run",
            "s",
            "--limit",
            "3",
            "--",
            "sh",
            "-c",
            r#"touch "$DIR/held"; exec sleep 60"#,
        ],
    );
    on.h.dir.wait_for("held");
    let out = on.run("busy", &["delete", "s"]);
    out.assert_one_line_error(&["\"s\"", "in use"]);
    holder.signal(nix::sys::signal::Signal::SIGTERM);
    holder.wait(SOON);
    on.wait_for("s", "idle", |s| s["in_use"] == 0);
    let out = on.run("delete", &["delete", "s"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(on.semaphore("s").is_none(), "deleted");
    let out = on.run("unknown", &["delete", "s"]);
    out.assert_one_line_error(&["\"s\"", "does not exist"]);
    assert_eq!(
        on.run("afresh", &["run", "s", "--limit", "7", "--", "true"])
            .code(),
        0
    );
    assert_eq!(on.semaphore("s").expect("s")["capacity"], 7);
}

#[test]
fn set_capacity_and_delete_on_a_coordinator() {
    set_capacity_and_delete(Backend::Tcp);
}

#[test]
fn set_capacity_and_delete_on_a_directory() {
    set_capacity_and_delete(Backend::File);
}

#[test]
fn set_capacity_and_delete_on_etcd() {
    set_capacity_and_delete(Backend::Etcd);
}
