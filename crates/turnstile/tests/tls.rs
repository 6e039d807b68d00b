//! TLS with real processes: `serve --tls-cert --tls-key`, clients on `tls://` trusting the test
//! CA (`tests/certs/`, see its README), refusals that are one line and immediate (an untrusted
//! certificate, TLS against a plaintext port and the reverse), HTTPS on the HTTP port with the
//! bearer token off loopback and keep-alive over TLS, and the connection gate's flags.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Finished, Harness, Scratch, Server, BIN, SOON};

fn cert(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/certs")
        .join(name)
        .display()
        .to_string()
}

/// A coordinator serving TLS with the test certificate, with more `serve` arguments.
fn tls_server(more: &[&str]) -> Server {
    let (c, k) = (cert("server.pem"), cert("server.key"));
    let mut args = vec!["--in-memory", "--tls-cert", &c, "--tls-key", &k];
    args.extend_from_slice(more);
    Server::start_with(&args)
}

/// `tls://HOST:PORT` of a server started by [`Server::start_with`].
fn tls_url(server: &Server, host: &str) -> String {
    let port = server.url().rsplit(':').next().expect("a port");
    format!("tls://{host}:{port}")
}

/// A harness on `url` (its commands get it as `TURNSTILE_URL`).
fn run_on(h: &Harness, url: &str, args: &[&str]) -> (Finished, Duration) {
    let started = Instant::now();
    let mut cmd = h.command(args);
    cmd.env("TURNSTILE_URL", url).env_remove("TURNSTILE_CA");
    let out = h
        .spawn_command(&format!("run-{}", args.len()), cmd)
        .wait(SOON);
    (out, started.elapsed())
}

/// Longest a refusal may take. `run` retries a first connection that fails to connect for 10
/// s: a refusal that came back before that was not retried.
const AT_ONCE: Duration = Duration::from_secs(5);

#[test]
fn run_over_tls_trusting_the_ca() {
    let server = tls_server(&[]);
    let url = tls_url(&server, "127.0.0.1");
    let h = Harness {
        server,
        dir: Scratch::new("tls-run"),
    };
    let ca = cert("ca.pem");
    let (out, _) = run_on(
        &h,
        &url,
        &["--ca", &ca, "run", "--limit", "1", "job", "--", "true"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    // The CA from the environment, and the certificate's DNS name.
    let by_name = tls_url(&h.server, "localhost");
    let mut cmd = h.command(&["run", "--limit", "1", "job", "--", "sh", "-c", "echo ok"]);
    cmd.env("TURNSTILE_URL", &by_name).env("TURNSTILE_CA", &ca);
    let out = h.spawn_command("env-ca", cmd).wait(SOON);
    assert_eq!((out.code(), out.stdout.trim()), (0, "ok"), "{out:?}");
    let status = h.run(&["--ca", &ca, "status", "--url", &url, "--json"]);
    assert_eq!(status.code(), 0, "{status:?}");
    assert!(status.stdout.contains("\"job\""), "{status:?}");
}

#[test]
fn an_untrusted_certificate_fails_at_once_with_one_line() {
    let server = tls_server(&[]);
    let url = tls_url(&server, "127.0.0.1");
    let h = Harness {
        server,
        dir: Scratch::new("tls-untrusted"),
    };
    // A CA that did not sign the server's certificate, and the system's roots.
    let other = cert("other-ca.pem");
    for args in [
        vec!["--ca", &other, "run", "--limit", "1", "job", "--", "true"],
        vec!["run", "--limit", "1", "job", "--", "true"],
    ] {
        let (out, took) = run_on(&h, &url, &args);
        assert_eq!(out.code(), 1, "{out:?}");
        out.assert_one_line_error(&["TLS", "not trusted", "--ca"]);
        assert!(took < AT_ONCE, "took {took:?}: retried?");
    }
    // A CA file that is not there is the same kind of error.
    let (out, took) = run_on(
        &h,
        &url,
        &[
            "--ca",
            "/nonexistent/ca.pem",
            "run",
            "--limit",
            "1",
            "j",
            "--",
            "true",
        ],
    );
    out.assert_one_line_error(&["/nonexistent/ca.pem"]);
    assert!(took < AT_ONCE, "took {took:?}");
}

#[test]
fn tls_and_plaintext_do_not_mix_and_say_so_at_once() {
    let tls = tls_server(&[]);
    let plain = Server::start_with(&["--in-memory"]);
    let h = Harness {
        server: tls,
        dir: Scratch::new("tls-mix"),
    };
    let ca = cert("ca.pem");
    // A plaintext client on the TLS port: the server answers with a TLS alert, never a frame.
    let tcp_to_tls = h.server.url().to_owned();
    let (out, took) = run_on(&h, &tcp_to_tls, &["run", "--limit", "1", "j", "--", "true"]);
    assert_eq!(out.code(), 1, "{out:?}");
    out.assert_one_line_error(&["speaks TLS", "tls://"]);
    assert!(took < AT_ONCE, "took {took:?}");
    // A TLS client on a plaintext port.
    let tls_to_tcp = tls_url(&plain, "127.0.0.1");
    let (out, took) = run_on(
        &h,
        &tls_to_tcp,
        &["--ca", &ca, "run", "--limit", "1", "j", "--", "true"],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    out.assert_one_line_error(&["does not speak TLS", "tcp://"]);
    assert!(took < AT_ONCE, "took {took:?}");
    // And a raw plaintext Hello on the TLS port gets no frame back: only TLS bytes, then EOF.
    let mut s = TcpStream::connect(tcp_to_tls.trim_start_matches("tcp://")).expect("connect");
    s.set_read_timeout(Some(SOON)).expect("timeout");
    s.write_all(b"\x00\x00\x00\x10\x01\x00\x00\x00\x01TSTLxxxxxxx")
        .expect("send");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty() || got.starts_with(&[0x15, 0x03]),
        "a TLS port answered in the clear: {got:?}"
    );
}

/// A TLS connection to `addr` trusting `ca`, with a read timeout.
fn https_connect(addr: &str, ca: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read the CA") {
        roots.add(c.expect("a certificate")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").expect("a server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client");
    let sock = TcpStream::connect(addr).expect("connect to the HTTPS port");
    sock.set_read_timeout(Some(SOON)).expect("set a timeout");
    rustls::StreamOwned::new(conn, sock)
}

/// `GET path` over HTTPS, trusting `ca`, with an optional bearer token: status and body.
fn https_get(addr: &str, path: &str, ca: &str, bearer: Option<&str>) -> (u16, String) {
    let mut tls = https_connect(addr, ca);
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = Vec::new();
    if let Err(e) = tls.read_to_end(&mut raw) {
        panic!("reading the HTTPS response: {e} (got {raw:?})");
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    (code, body.to_owned())
}

#[test]
fn https_serves_metrics_and_wants_the_bearer_token_off_loopback() {
    let ca = cert("ca.pem");
    // On loopback: no token needed.
    let local = tls_server(&["--http", "127.0.0.1:0"]);
    let (code, body) = https_get(&local.http_addr(), "/metrics", &ca, None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("turnstile_connections"), "{body}");
    // Keep-alive over TLS: three requests on one connection, pipelined, the last one closing.
    let mut tls = https_connect(&local.http_addr(), &ca);
    tls.write_all(
        b"GET /metrics HTTP/1.1\r\n\r\nGET /v1/status HTTP/1.1\r\n\r\n\
          GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .expect("send the requests");
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).expect("read the responses");
    let raw = String::from_utf8_lossy(&raw);
    assert_eq!(raw.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{raw}");
    assert!(raw.contains("<title>turnstile</title>"), "{raw}");
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut s = TcpStream::connect(local.http_addr()).expect("connect");
    s.set_read_timeout(Some(SOON)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "served in the clear: {got:?}");

    // Beyond loopback, with a token: the token and TLS together, on both ports.
    let dir = Scratch::new("tls-bearer");
    std::fs::write(dir.join("token"), "s3cret\n").expect("write the token");
    let token_file = dir.join("token").display().to_string();
    let exposed = tls_server(&["--http", "0.0.0.0:0", "--auth-token-file", &token_file]);
    let port = exposed
        .http_addr()
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(https_get(&addr, "/metrics", &ca, None).0, 401);
    assert_eq!(https_get(&addr, "/v1/status", &ca, Some("wrong")).0, 401);
    let (code, body) = https_get(&addr, "/metrics", &ca, Some("s3cret"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(https_get(&addr, "/v1/events", &ca, Some("s3cret")).0, 200);
    assert_eq!(https_get(&addr, "/", &ca, None).0, 200);

    let url = tls_url(&exposed, "127.0.0.1");
    let h = Harness {
        server: exposed,
        dir,
    };
    let (out, _) = run_on(
        &h,
        &url,
        &["--ca", &ca, "run", "--limit", "1", "j", "--", "true"],
    );
    out.assert_one_line_error(&["token"]);
    let (out, _) = run_on(
        &h,
        &url,
        &[
            "--ca",
            &ca,
            "--token-file",
            &token_file,
            "run",
            "--limit",
            "1",
            "j",
            "--",
            "true",
        ],
    );
    assert_eq!(out.code(), 0, "{out:?}");
}

/// Reads from `s` until EOF or an error; how long that took.
fn closed_after(mut s: TcpStream) -> Duration {
    let started = Instant::now();
    s.set_read_timeout(Some(SOON)).expect("timeout");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    started.elapsed()
}

#[test]
fn the_gate_flags_bound_silent_connections() {
    // A TLS handshake that never starts counts as a missing hello: closed after the timeout.
    let server = tls_server(&["--handshake-timeout", "1s", "--max-per-address", "2"]);
    let addr = server.url().trim_start_matches("tcp://").to_owned();
    let first = TcpStream::connect(&addr).expect("connect");
    let second = TcpStream::connect(&addr).expect("connect");
    // The third from the same address is over the cap: closed at once.
    let third = TcpStream::connect(&addr).expect("connect");
    let took = closed_after(third);
    assert!(
        took < Duration::from_millis(900),
        "over the cap, closed in {took:?}"
    );
    let took = closed_after(first);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "a silent socket was closed after {took:?} (timeout 1s)"
    );
    drop(second);

    // --max-handshaking 1: a second silent socket rings the first out.
    let server = Server::start_with(&[
        "--in-memory",
        "--max-handshaking",
        "1",
        "--http",
        "127.0.0.1:0",
    ]);
    let addr = server.url().trim_start_matches("tcp://").to_owned();
    let first = TcpStream::connect(&addr).expect("connect");
    // The server has taken the first before the second comes.
    common::wait_until("the first connection served", SOON, || {
        let (_, metrics) = server.get("/metrics");
        metrics
            .lines()
            .any(|l| l == "turnstile_connections 1")
            .then_some(())
    });
    let _second = TcpStream::connect(&addr).expect("connect");
    let took = closed_after(first);
    assert!(
        took < Duration::from_secs(3),
        "the oldest went after {took:?} (timeout 5s)"
    );
}

#[test]
fn bad_gate_and_tls_settings_are_refused_in_one_line() {
    let dir = Scratch::new("tls-flags");
    for (args, mentions) in [
        (vec!["--handshake-timeout", "0s"], "must be positive"),
        (vec!["--handshake-timeout", "1h"], "at most"),
        (vec!["--max-per-address", "0"], "at least 1"),
        (vec!["--max-handshaking", "x"], "not a positive integer"),
    ] {
        let out = std::process::Command::new(BIN)
            .args([
                "serve",
                "--in-memory",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "off",
            ])
            .args(&args)
            .output()
            .expect("run serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    }
    let cert_only = ["--tls-cert", &cert("server.pem")];
    let key_for_cert = [
        "--tls-cert",
        &cert("server.pem"),
        "--tls-key",
        &cert("ca.pem"),
    ];
    let config = dir.join("serve.toml");
    std::fs::write(&config, format!("tls_key = {:?}\n", cert("server.key"))).expect("write");
    let config = config.display().to_string();
    let from_file = ["--config", &config];
    for (args, mentions) in [
        (&cert_only[..], "without tls_key"),
        (&key_for_cert[..], "key file"),
        (&from_file[..], "without tls_cert"),
    ] {
        let out = std::process::Command::new(BIN)
            .args([
                "serve",
                "--in-memory",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "off",
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    }
    // The file's cert and key together, as printed.
    std::fs::write(
        dir.join("both.toml"),
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\nhandshake_timeout = \"2s\"\nmax_per_address = 8\n",
            cert("server.pem"),
            cert("server.key")
        ),
    )
    .expect("write");
    let both = dir.join("both.toml").display().to_string();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", &both, "--print-config"])
        .output()
        .expect("print the config");
    let printed = String::from_utf8_lossy(&out.stdout);
    for line in [
        "handshake_timeout = \"2s\"  # config file",
        "max_per_address = 8  # config file",
        "max_handshaking = 256  # default",
        "server.pem\"  # config file",
    ] {
        assert!(printed.contains(line), "{line:?} not in {printed}");
    }
}
