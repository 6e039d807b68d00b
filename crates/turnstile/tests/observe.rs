//! Observability with real processes: the HTTP status routes against `turnstile status
//! --json`, the serve settings' precedence (flag > environment > file > default), JSON logs
//! that name every lost lease once, `status --watch`, and the line `turnstile run` shows
//! while it waits, on a terminal only.
//!
//! Terminals come from util-linux's `script`, which runs a command on a pseudo-terminal and
//! copies what it writes to its own stdout.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::process::Command;

use common::{assert_no_panic, wait_until, Harness, Scratch, Server, BIN, SOON};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Zeroes the ages in a status document: the one thing that changes between two reads.
fn without_ages(mut doc: Value) -> Value {
    if let Some(sems) = doc["semaphores"].as_array_mut() {
        for s in sems {
            zero_ages(s);
        }
    }
    doc
}

/// Zeroes the ages of one semaphore's holders and waiters.
fn zero_ages(semaphore: &mut Value) {
    for list in ["holders", "waiters"] {
        if let Some(entries) = semaphore[list].as_array_mut() {
            for e in entries {
                e["age_ms"] = 0.into();
            }
        }
    }
}

/// A shell command that holds a slot until `$DIR/go` exists, after saying so in `$DIR/held`.
const HOLD_UNTIL_GO: &str = r#"touch "$DIR/held"; while [ ! -e "$DIR/go" ]; do sleep 0.05; done"#;

#[test]
fn http_status_is_the_status_document() {
    let server = Server::start_with(&["--in-memory", "--http", "127.0.0.1:0"]);
    let h = Harness {
        server,
        dir: Scratch::new("http-status"),
    };
    let _holder = h.spawn(
        "holder",
        &["run", "db", "--limit", "1", "--", "sh", "-c", HOLD_UNTIL_GO],
    );
    h.dir.wait_for("held");
    let _waiter = h.spawn("waiter", &["run", "db", "--limit", "1", "--", "true"]);
    h.wait_for_semaphore("db", "one waiter", |s| s["queued"] == 1);

    let cli = without_ages(h.status());
    let (code, body) = h.server.get("/v1/status");
    assert_eq!(code, 200);
    let http = without_ages(serde_json::from_str(&body).expect("JSON"));
    assert_eq!(http, cli);
    let db = &http["semaphores"][0];
    assert_eq!(db["holders"].as_array().map(Vec::len), Some(1));
    assert_eq!(db["waiters"].as_array().map(Vec::len), Some(1));
    assert!(db["waiters"][0]["client"]
        .as_str()
        .is_some_and(|c| c.contains(':')));

    let (code, one) = h.server.get("/v1/semaphores/db");
    assert_eq!(code, 200);
    let mut one: Value = serde_json::from_str(&one).expect("JSON");
    zero_ages(&mut one);
    assert_eq!(&one, db);
    assert_eq!(h.server.get("/v1/semaphores/nope").0, 404);
    assert_eq!(h.server.get("/no/such/page").0, 404);
    std::fs::write(h.dir.join("go"), "").expect("release the holder");
}

/// `turnstile serve --print-config` with a file, variables and flags.
fn print_config(dir: &Scratch, file: &str, env: &[(&str, &str)], flags: &[&str]) -> String {
    let path = dir.join("turnstile.toml");
    std::fs::write(&path, file).expect("write the config file");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--print-config", "--config"])
        .arg(&path)
        .args(flags);
    // A clean slate: the variables of whoever runs the tests must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("TURNSTILE_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run turnstile serve --print-config");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn settings_precedence_flag_env_file_default() {
    let dir = Scratch::new("precedence");
    let file = r#"
        listen = "127.0.0.1:9001"
        http = "127.0.0.1:9002"
        session_ttl = "30s"
        fsync = "always"
        max_connections = 50
        handshake_timeout = "2s"
        max_handshaking = 64
    "#;
    let printed = print_config(
        &dir,
        file,
        &[
            ("TURNSTILE_LISTEN", "127.0.0.1:9101"),
            ("TURNSTILE_SESSION_TTL", "5s"),
            ("TURNSTILE_LOG_FORMAT", "json"),
            ("TURNSTILE_AUTH_TOKEN_FILE", "/etc/turnstile/token"),
            ("TURNSTILE_MAX_PER_ADDRESS", "32"),
            ("TURNSTILE_TLS_CERT", "/etc/turnstile/cert.pem"),
        ],
        &["--listen", "127.0.0.1:9201"],
    );
    let expected = [
        "listen = \"127.0.0.1:9201\"  # flag",
        "http = \"127.0.0.1:9002\"  # config file",
        "session_ttl = \"5s\"  # environment",
        "max_connections = 50  # config file",
        "data_dir = \"turnstile-data\"  # default",
        "in_memory = false  # default",
        "fsync = \"always\"  # config file",
        "snapshot_every = 67108864  # default",
        "log_format = \"json\"  # environment",
        "auth_token_file = \"/etc/turnstile/token\"  # environment",
        "tls_cert = \"/etc/turnstile/cert.pem\"  # environment",
        "insecure = false  # default",
        "forget_idle = \"10m\"  # default",
        "handshake_timeout = \"2s\"  # config file",
        "max_handshaking = 64  # config file",
        "max_per_address = 32  # environment",
        "# admin_token_file is not set  # default",
        "# tls_key is not set  # default",
    ];
    assert_eq!(printed.lines().collect::<Vec<_>>(), expected, "{printed}");

    // The variable beats the file; the flag beats the variable.
    let printed = print_config(
        &dir,
        "fsync = \"always\"",
        &[("TURNSTILE_FSYNC", "batch")],
        &[],
    );
    assert!(
        printed.contains("fsync = \"batch\"  # environment"),
        "{printed}"
    );
    let printed = print_config(
        &dir,
        "fsync = \"always\"",
        &[("TURNSTILE_FSYNC", "batch")],
        &["--fsync", "always"],
    );
    assert!(printed.contains("fsync = \"always\"  # flag"), "{printed}");
    // The file's name can come from the environment too.
    let path = dir.join("other.toml");
    std::fs::write(&path, "http = \"off\"").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--print-config"])
        .env("TURNSTILE_CONFIG", &path)
        .output()
        .expect("run");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("http = \"off\"  # config file"),
        "{printed}"
    );
}

#[test]
fn bad_config_files_fail_with_one_line_naming_the_key() {
    let h = Harness::new("bad-config", "10s");
    for (file, mentions) in [
        ("lisen = \"127.0.0.1:1\"", ["lisen", "unknown key"]),
        (
            "session_ttl = \"ten seconds\"",
            ["session_ttl", "turnstile.toml"],
        ),
        ("max_connections = \"many\"", ["max_connections", "integer"]),
        ("listen = [1, 2]", ["listen", "string"]),
        ("fsync = ", ["line 1", "turnstile.toml"]),
    ] {
        std::fs::write(h.dir.join("turnstile.toml"), file).expect("write");
        let config = h.dir.join("turnstile.toml");
        let config = config.to_str().expect("a UTF-8 path");
        let out = h.run(&["serve", "--config", config]);
        out.assert_one_line_error(&mentions);
    }
    let out = h.run(&["serve", "--config", "/nonexistent/turnstile.toml"]);
    out.assert_one_line_error(&["/nonexistent/turnstile.toml"]);
}

#[test]
fn a_config_file_configures_a_real_server() {
    let dir = Scratch::new("config-serve");
    let path = dir.join("turnstile.toml");
    let data = dir.join("data");
    let file = format!(
        "in_memory = true\ndata_dir = {:?}\nsession_ttl = \"750ms\"\n",
        data.display()
    );
    std::fs::write(&path, file).expect("write");
    let path = path.to_str().expect("a UTF-8 path").to_owned();
    // The helper turns HTTP off unless told: give it the port on the command line.
    let server = Server::start_with(&["--config", &path, "--http", "127.0.0.1:0"]);
    let (code, body) = server.get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE turnstile_requests_total counter"));
    // The file said in memory: the data directory it also names stays untouched.
    assert!(!data.exists());
    let h = Harness {
        server,
        dir: Scratch::new("config-serve-client"),
    };
    let out = h.run(&["run", "x", "--limit", "1", "--", "true"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (_, metrics) = h.server.get("/metrics");
    assert!(
        metrics.contains("turnstile_semaphore_acquired_total{semaphore=\"x\"} 1"),
        "{metrics}"
    );
}

/// Every lost lease and every close is logged once, as JSON with its semaphore, lease and
/// session.
#[test]
fn json_logs_name_every_loss_once() {
    let dir = Scratch::new("json-logs");
    let log = std::fs::File::create(dir.join("server.log")).expect("create the log file");
    let server = Server::spawn(
        &[
            "--in-memory",
            "--session-ttl",
            "500ms",
            "--log-format",
            "json",
        ],
        log,
    );
    let h = Harness { server, dir };
    // A holder that dies: its lease expires with its session.
    let mut doomed = h.spawn(
        "doomed",
        &["run", "exp", "--limit", "1", "--", "sleep", "60"],
    );
    h.wait_for_semaphore("exp", "held", |s| s["in_use"] == 1);
    doomed.signal(Signal::SIGKILL);
    doomed.wait(SOON);
    // Two holders of a semaphore that is then closed.
    let _a = h.spawn(
        "a",
        &[
            "run",
            "shut",
            "--limit",
            "2",
            "--on-lost",
            "ignore",
            "--",
            "sleep",
            "2",
        ],
    );
    let _b = h.spawn(
        "b",
        &[
            "run",
            "shut",
            "--limit",
            "2",
            "--on-lost",
            "ignore",
            "--",
            "sleep",
            "2",
        ],
    );
    h.wait_for_semaphore("shut", "two holders", |s| s["in_use"] == 2);
    let holders = h.semaphore("shut").expect("exists")["holders"].clone();
    let out = h.run(&["close", "shut"]);
    assert_eq!(out.code(), 0, "{out:?}");
    h.wait_for_semaphore("exp", "expired", |s| s["expired_total"] == 1);

    let lines = || -> Vec<Value> {
        h.dir
            .read("server.log")
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    };
    let logged = wait_until("the log lines of three losses and a close", SOON, || {
        let all = lines();
        let lost = all.iter().filter(|l| l["message"] == "lease lost").count();
        (lost >= 3).then_some(all)
    });
    let lost: Vec<&Value> = logged
        .iter()
        .filter(|l| l["message"] == "lease lost")
        .collect();
    assert_eq!(lost.len(), 3, "{logged:#?}");
    for l in &lost {
        assert_eq!(l["level"], "INFO");
        // Ids are strings, as in every JSON document (a JSON reader rounds past 2^53).
        assert!(
            l["lease"]
                .as_str()
                .is_some_and(|s| s.parse::<u64>().is_ok())
                && l["token"].is_u64(),
            "{l}"
        );
        assert!(l["session"].as_str().is_some_and(|s| s.len() == 16), "{l}");
    }
    let expired: Vec<&&Value> = lost.iter().filter(|l| l["reason"] == "expired").collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["semaphore"], "exp");
    let mut closed: Vec<(String, u64)> = lost
        .iter()
        .filter(|l| l["reason"] == "closed")
        .map(|l| {
            assert_eq!(l["semaphore"], "shut");
            (
                l["session"].as_str().unwrap_or_default().to_owned(),
                l["lease"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let mut expected: Vec<(String, u64)> = holders
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| {
            (
                h["session"].as_str().unwrap_or_default().to_owned(),
                h["lease_id"]
                    .as_str()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or_default(),
            )
        })
        .collect();
    closed.sort();
    expected.sort();
    assert_eq!(closed, expected, "the two holders, each once");
    let count = |m: &str| logged.iter().filter(|l| l["message"] == m).count();
    assert_eq!(count("semaphore closed"), 1);
    assert_eq!(count("session expired"), 1);
    let closes: Vec<&Value> = logged
        .iter()
        .filter(|l| l["message"] == "semaphore closed")
        .collect();
    assert_eq!(closes[0]["semaphore"], "shut");
    let expiry: Vec<&Value> = logged
        .iter()
        .filter(|l| l["message"] == "session expired")
        .collect();
    assert_eq!(expiry[0]["session"], expired[0]["session"]);
}

#[test]
fn status_watch_redraws_until_interrupted() {
    let h = Harness::new("watch", "10s");
    let mut watch = h.spawn("watch", &["status", "--watch", "--interval", "100ms"]);
    let stdout = h.dir.join("watch.stdout");
    let read = || std::fs::read_to_string(&stdout).unwrap_or_default();
    wait_until("two tables", SOON, || {
        (read().matches("Ctrl-C to stop").count() >= 2).then_some(())
    });
    assert!(read().contains("no semaphores"));
    // A semaphore created now shows up in a later table, without a restart.
    assert_eq!(
        h.run(&["run", "fresh", "--limit", "4", "--", "true"])
            .code(),
        0
    );
    wait_until("the new semaphore", SOON, || {
        read().contains("fresh").then_some(())
    });
    // Not a terminal: no escape codes.
    assert!(!read().contains('\x1b'), "{}", read());
    watch.signal(Signal::SIGINT);
    let out = watch.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_no_panic(&out.stderr);
}

/// The path of util-linux's `script`, if it is installed.
fn script() -> Option<&'static str> {
    ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// Quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `turnstile ARGS` on a pseudo-terminal (through `script`); what appears on that
/// terminal, stdout and stderr together, goes to `$DIR/<label>.stdout`.
fn spawn_on_tty(h: &Harness, url: &str, label: &str, args: &[&str]) -> common::Proc {
    let script = script().expect("script is installed");
    let line: Vec<String> = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(sh_quote)
        .collect();
    let mut cmd = Command::new(script);
    cmd.args(["-qfec", &line.join(" ")])
        .arg("/dev/null")
        .env("TURNSTILE_URL", url)
        .env_remove("RUST_LOG")
        .env_remove("TURNSTILE_SESSION");
    h.spawn_command(label, cmd)
}

/// `turnstile run` that waits shows its place in the queue on a terminal, and erases it once
/// granted; with stderr not a terminal, it shows nothing. On both backends.
#[test]
fn run_shows_its_queue_position_only_on_a_terminal() {
    if script().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "util-linux's script is needed for this test in CI"
        );
        eprintln!("skipped: util-linux's `script` is not installed");
        return;
    }
    let h = Harness::new("run-tty", "10s");
    let files = Scratch::new("run-tty-files");
    let file_url = format!("file://{}", files.join("sems").display());
    for (backend, url) in [("tcp", h.server.url().to_owned()), ("file", file_url)] {
        let _ = std::fs::remove_file(h.dir.join("held"));
        let _ = std::fs::remove_file(h.dir.join("go"));
        let mut holder_cmd =
            h.command(&["run", "db", "--limit", "1", "--", "sh", "-c", HOLD_UNTIL_GO]);
        holder_cmd.env("TURNSTILE_URL", &url);
        let _holder = h.spawn_command(&format!("holder-{backend}"), holder_cmd);
        h.dir.wait_for("held");

        let label = format!("tty-{backend}");
        let mut tty_waiter = spawn_on_tty(
            &h,
            &url,
            &label,
            &["run", "db", "--limit", "1", "--", "echo", "granted"],
        );
        let mut plain_cmd = h.command(&["run", "db", "--limit", "1", "--", "echo", "granted"]);
        plain_cmd.env("TURNSTILE_URL", &url);
        let mut plain_waiter = h.spawn_command(&format!("plain-{backend}"), plain_cmd);

        let screen = || h.dir.read(&format!("{label}.stdout")).unwrap_or_default();
        wait_until(&format!("{backend}: the waiting line"), SOON, || {
            let s = screen();
            (s.contains("turnstile: waiting for db: position 1 of 2, ")
                || s.contains("turnstile: waiting for db: position 2 of 2, "))
            .then_some(())
        });
        // Both wait; the line is redrawn (the time goes on), so wait for a second drawing.
        wait_until(&format!("{backend}: a redraw"), SOON, || {
            (screen().matches("waiting for db").count() >= 2).then_some(())
        });
        std::fs::write(h.dir.join("go"), "").expect("release the holder");
        let tty_out = tty_waiter.wait(SOON);
        assert_eq!(tty_out.code(), 0, "{tty_out:?}");
        let plain_out = plain_waiter.wait(SOON);
        assert_eq!(plain_out.code(), 0, "{plain_out:?}");

        // On the terminal: the last drawing is erased before the command's output.
        let s = screen();
        let last = s.rfind("waiting for db").expect("drawn");
        let after = &s[last..];
        let erase = after
            .find("\r\x1b[2K")
            .expect("erased after the last drawing");
        let granted = after.find("granted").expect("the command ran");
        assert!(erase < granted, "{s:?}");
        assert!(!after[erase..].contains("waiting"), "{s:?}");
        // Not a terminal: nothing of it.
        assert_eq!(plain_out.stderr, "", "{backend}");
        assert_eq!(plain_out.stdout, "granted\n", "{backend}");
    }
}

/// `turnstile once --wait` that waits for a job running elsewhere says, on a terminal, who runs
/// it; the line is erased when the wait ends. Nothing of it when stderr is not a terminal.
#[test]
fn once_wait_shows_the_runner_only_on_a_terminal() {
    if script().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "util-linux's script is needed for this test in CI"
        );
        eprintln!("skipped: util-linux's `script` is not installed");
        return;
    }
    let h = Harness::new("once-tty", "10s");
    let url = h.server.url().to_owned();
    let _holder = h.spawn("holder", &["once", "slow", "--", "sh", "-c", HOLD_UNTIL_GO]);
    h.dir.wait_for("held");
    let mut tty_waiter = spawn_on_tty(
        &h,
        &url,
        "tty-once",
        &["once", "slow", "--wait", "--", "echo", "ran"],
    );
    let mut plain = h.spawn(
        "plain-once",
        &["once", "slow", "--wait", "--", "echo", "ran"],
    );
    let screen = || h.dir.read("tty-once.stdout").unwrap_or_default();
    wait_until("the job's waiting line", SOON, || {
        (screen()
            .matches("turnstile: waiting for job \"slow\" (running on ")
            .count()
            >= 2)
            .then_some(())
    });
    std::fs::write(h.dir.join("go"), "").expect("let the holder finish");
    let out = tty_waiter.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    let s = screen();
    let last = s.rfind("waiting for job").expect("drawn");
    let after = &s[last..];
    let erase = after
        .find("\r\x1b[2K")
        .expect("erased after the last drawing");
    let skipped = after
        .find("was completed by")
        .expect("the attempt skipped the done job");
    assert!(erase < skipped, "{s:?}");
    let plain_out = plain.wait(SOON);
    assert_eq!(plain_out.code(), 0, "{plain_out:?}");
    assert!(!plain_out.stderr.contains("waiting"), "{plain_out:?}");
    assert!(!plain_out.stdout.contains("ran"), "{plain_out:?}");
}
