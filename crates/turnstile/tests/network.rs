//! A coordinator that is safe to expose: tokens, the refusal to listen beyond loopback without
//! one, and connections that hostile or careless clients cannot use to lock others out (idle
//! sockets, fd exhaustion, slow HTTP clients). Every test runs real processes on loopback.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, wait_until, Harness, Scratch, Server, BIN, SOON};

/// Runs `cmd` to its end, at most [`SOON`] (killed past that, so that a test of a server that
/// does not refuse, or a client that retries, fails instead of hanging): code and stderr.
fn run_bounded(mut cmd: Command) -> (Option<i32>, String) {
    let err = tempfile_path();
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("create the stderr file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    (status.and_then(|s| s.code()), stderr)
}

fn tempfile_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "network-{}-{}.stderr",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A harness whose coordinator wants `token` (and, if given, `admin`), with the token files in
/// its scratch directory.
fn with_tokens(test: &str, token: &str, admin: Option<&str>) -> (Server, Scratch) {
    let dir = Scratch::new(test);
    std::fs::write(dir.join("token"), format!("{token}\n")).expect("write the token");
    std::fs::write(dir.join("wrong"), "not-the-token\n").expect("write a wrong token");
    let token_file = dir.join("token").display().to_string();
    let mut args = vec!["--in-memory", "--auth-token-file", &token_file];
    let admin_file = dir.join("admin").display().to_string();
    if let Some(admin) = admin {
        std::fs::write(dir.join("admin"), admin).expect("write the admin token");
        args.extend(["--admin-token-file", &admin_file]);
    }
    (Server::start_with(&args), dir)
}

fn harness(server: Server, dir: Scratch) -> Harness {
    Harness { server, dir }
}

#[test]
fn a_missing_or_wrong_token_fails_at_once_with_exit_1() {
    let (server, dir) = with_tokens("token", "s3cret", None);
    let h = harness(server, dir);
    // `run` retries the first connection for --connect-timeout (10 s): a refusal must not be
    // retried, so it has to come back well before that.
    for (label, token_file) in [("missing", None), ("wrong", Some("wrong"))] {
        let mut cmd = h.command(&["run", "--limit", "1", "job", "--", "true"]);
        cmd.env_remove("TURNSTILE_TOKEN_FILE");
        if let Some(f) = token_file {
            cmd.env("TURNSTILE_TOKEN_FILE", h.dir.join(f));
        }
        let started = Instant::now();
        let out = h.spawn_command(label, cmd).wait(SOON);
        let took = started.elapsed();
        assert_eq!(out.code(), 1, "{label}: {out:?}");
        out.assert_one_line_error(&["token"]);
        assert!(
            took < Duration::from_secs(3),
            "{label}: a refused token took {took:?}: retried?"
        );
    }
    // The right token, from the flag or the environment, works.
    let token = h.dir.join("token").display().to_string();
    let out = h.run(&[
        "--token-file",
        &token,
        "run",
        "--limit",
        "1",
        "job",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    let mut cmd = h.command(&["status"]);
    cmd.env("TURNSTILE_TOKEN_FILE", &token);
    let out = h.spawn_command("env-token", cmd).wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn the_admin_token_guards_what_changes_other_clients_state() {
    let (server, dir) = with_tokens("admin", "member", Some("boss"));
    let h = harness(server, dir);
    let member = h.dir.join("token").display().to_string();
    let admin = h.dir.join("admin").display().to_string();
    let out = h.run(&[
        "--token-file",
        &member,
        "run",
        "--limit",
        "2",
        "db",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    let out = h.run(&["--token-file", &member, "close", "db"]);
    assert_eq!(out.code(), 1, "{out:?}");
    out.assert_one_line_error(&["admin token"]);
    // The admin token also admits a client on its own.
    let out = h.run(&["--token-file", &admin, "close", "db"]);
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn serve_refuses_a_public_address_without_a_token() {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--in-memory",
        "--listen",
        "0.0.0.0:0",
        "--http",
        "off",
    ]);
    let (code, stderr) = run_bounded(cmd);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without a token")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The same for the HTTP port.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--in-memory", "--listen", "127.0.0.1:0"])
        .args(["--http", "0.0.0.0:0"]);
    let (code, stderr) = run_bounded(cmd);
    assert_eq!(code, Some(1), "{stderr}");
    // Loopback needs no token, and --insecure allows the rest (the server starts).
    let _ok = Server::start_with(&["--in-memory", "--http", "0.0.0.0:0", "--insecure"]);
}

/// The HTTP port on an address beyond loopback asks a server with a token for it.
#[test]
fn the_http_port_wants_the_bearer_token_off_loopback() {
    let dir = Scratch::new("bearer");
    std::fs::write(dir.join("token"), "s3cret\n").expect("write the token");
    let token_file = dir.join("token").display().to_string();
    let server = Server::start_with(&[
        "--in-memory",
        "--http",
        "0.0.0.0:0",
        "--auth-token-file",
        &token_file,
    ]);
    let port = server
        .http_addr()
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let addr = format!("127.0.0.1:{port}");
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 401, "{body}");
    let (code, _) = http_get(&addr, "/v1/status");
    assert_eq!(code, 401);
    let get = |auth: &str| {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(SOON)).expect("timeout");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        raw
    };
    assert!(get("Bearer s3cret").starts_with("HTTP/1.1 200"));
    assert!(get("bearer s3cret").starts_with("HTTP/1.1 200"));
    assert!(get("Bearer s3cre").starts_with("HTTP/1.1 401"));
    // The dashboard page is static: it is served, its data is not.
    assert_eq!(http_get(&addr, "/").0, 200);
}

/// Connections that never say hello are dropped after the handshake timeout, and while they
/// are open they do not keep a real client out, even past the connection cap.
#[test]
fn silent_sockets_neither_linger_nor_lock_clients_out() {
    let server = Server::start_with(&["--in-memory", "--max-connections", "200"]);
    let addr = server.url().trim_start_matches("tcp://").to_owned();
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect an idle socket"))
        .collect();
    let h = Harness {
        server,
        dir: Scratch::new("idle"),
    };
    let started = Instant::now();
    let out = h.run(&["status"]);
    let took = started.elapsed();
    assert_eq!(out.code(), 0, "{out:?}");
    eprintln!("status with 300 idle sockets open (cap 200): {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "a client behind 300 silent sockets took {took:?}"
    );
    // Every idle socket is closed by the server by the end of the handshake timeout (5 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &mut idle {
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .expect("timeout");
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a silent socket was not closed: {r:?}"
        );
    }
}

/// A coordinator started under `ulimit -n LIMIT`, its log in `log`.
fn spawn_limited(limit: u32, log: &std::path::Path) -> (Child, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {limit} && exec \"$0\" serve --in-memory --listen 127.0.0.1:0 --http off"
        ))
        .arg(BIN)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("create the log"))
        .spawn()
        .expect("spawn the server");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    out.read_line(&mut line).expect("the listening line");
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned();
    (child, addr)
}

/// Out of file descriptors, the accept loop neither spins nor floods the log, and the server
/// serves a real client again (it drops silent sockets to get descriptors back).
#[test]
fn running_out_of_file_descriptors_is_survived_and_logged_sparingly() {
    let dir = Scratch::new("emfile");
    let log = dir.join("server.log");
    let (child, addr) = spawn_limited(64, &log);
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    // Bounded connects: a full listen backlog drops SYNs, and connect would retry for minutes.
    let sock: std::net::SocketAddr = addr.parse().expect("an address");
    let connect = || TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok();
    let flood: Vec<TcpStream> = (0..200).filter_map(|_| connect()).collect();
    wait_until("the server to run out of descriptors", SOON, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("accept failed").then_some(())
    });
    // Keep the pressure on for a while: this is the measuring window, not a synchronisation.
    let window = Instant::now();
    let mut more: Vec<TcpStream> = Vec::new();
    while window.elapsed() < Duration::from_secs(3) {
        if let Some(s) = connect() {
            more.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines = text.matches("accept failed").count();
    eprintln!("'accept failed' logged {lines} times in 3+ s of fd exhaustion");
    assert!(lines <= 2, "the log is flooded ({lines} lines):\n{text}");
    // A real client is served while the flood is still open.
    let mut cmd = Command::new(BIN);
    cmd.args(["status", "--url", &format!("tcp://{addr}")])
        .env_remove("TURNSTILE_TOKEN_FILE");
    let (code, stderr) = run_bounded(cmd);
    assert_eq!(code, Some(0), "{stderr}");
    drop((flood, more, child));
}

/// More clients sending their request a byte a second than the HTTP port takes connections
/// (1,024) do not keep `/metrics` from answering within a second: past 256 still sending
/// their head, each new connection makes the oldest go. (Connections are tasks, so a few
/// hundred slow ones alone would not slow a scrape; it is the cap they would fill.)
#[test]
fn slow_http_clients_do_not_starve_the_port() {
    let server = Server::start_with(&["--in-memory", "--http", "127.0.0.1:0"]);
    let addr = server.http_addr();
    let mut slow: Vec<TcpStream> = (0..1100)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(
        slow.len() >= 1050,
        "only {} slow clients connected",
        slow.len()
    );
    let stop = Instant::now() + Duration::from_secs(4);
    let dripper = std::thread::spawn(move || {
        // One byte a second on each, as a slowloris does.
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
        let mut i = 0;
        while Instant::now() < stop {
            for s in &mut slow {
                let _ = s.write_all(&request[i % request.len()..][..1]);
            }
            i += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        slow
    });
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let started = Instant::now();
        let (code, body) = http_get(&addr, "/metrics");
        let took = started.elapsed();
        assert_eq!(code, 200, "{body}");
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("/metrics beside 1,100 slow clients: worst {worst:?}");
    assert!(worst < Duration::from_secs(1), "/metrics took {worst:?}");
    drop(dripper.join());
}

/// A request that can never fit in a frame fails at once instead of being re-sent forever.
#[test]
fn a_request_too_large_for_a_frame_is_not_retried() {
    let h = Harness::new("too-large", "10s");
    let name = "n".repeat(70_000);
    let started = Instant::now();
    let out = h.run(&["status", &name]);
    let took = started.elapsed();
    assert_eq!(out.code(), 1, "{out:?}");
    out.assert_one_line_error(&["over the coordinator's limit"]);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
