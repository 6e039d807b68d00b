//! The dashboard in a real browser: headless Chromium loads `GET /` from a live coordinator;
//! a lease acquired after the page has loaded must appear in the page without a reload. The
//! test saves a screenshot as an artifact (`target/tmp/dashboard.png`; with
//! `TURNSTILE_UPDATE_SCREENSHOT=1` also `docs/dashboard.png`, the README's picture).
//!
//! Chromium is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`:
//! commands on its fd 3, answers on its fd 4, NUL-separated JSON), so the test needs no
//! WebDriver and no network, and it waits for what it checks — the page's first poll, the new
//! lease in the DOM — instead of sleeping. Outside CI, a machine without Chromium skips the
//! test with a message; in CI (`CI` set) Chromium must be there (`.ci/run` installs it).

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{wait_until, Harness, Proc, Scratch, Server, SOON};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Where Chromium is, if anywhere.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(move |dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .find(|p| p.is_file())
}

/// A headless Chromium driven over the DevTools pipe; killed on drop.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    /// The session of the page target, once attached.
    session: Option<String>,
}

impl Browser {
    fn launch(binary: &std::path::Path, profile: &std::path::Path, log: std::fs::File) -> Browser {
        // fd 3 and fd 4 are the pipe's ends in Chromium; a shell moves our stdin and stdout
        // there, so that no unsafe pre-exec code is needed.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                "--window-size=1440,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().expect("piped stdin");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Browser {
            child,
            commands,
            answers,
            next_id: 1,
            session: None,
        }
    }

    /// Sends a command (to the page, once attached) and waits for its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("serialize");
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .and_then(|_| self.commands.flush())
            .unwrap_or_else(|e| panic!("chromium stopped taking commands ({e})"));
        let deadline = Instant::now() + SOON;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method} ({e})"));
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method} failed: {answer}");
                return answer["result"].clone();
            }
            // Events, and answers to nobody: not what we wait for.
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true`.
    fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + SOON;
        while self.eval(expression) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the page: {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes standard base64 (the screenshot's encoding).
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | value(*c) << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes() {
    assert_eq!(base64("aGVsbG8="), b"hello");
    assert_eq!(base64("aGVsbG8hIQ=="), b"hello!!");
    assert_eq!(base64("YWJj"), b"abc");
}

/// A `turnstile run` that holds a slot of `name` until `$DIR/go` exists.
fn hold(h: &Harness, label: &str, name: &str, limit: &str) -> Proc {
    h.spawn(
        label,
        &[
            "run",
            name,
            "--limit",
            limit,
            "--on-lost",
            "ignore",
            "--",
            "sh",
            "-c",
            r#"while [ ! -e "$DIR/go" ]; do sleep 0.1; done"#,
        ],
    )
}

#[test]
fn dashboard_shows_a_new_lease_without_a_reload() {
    let Some(binary) = chromium() else {
        let required = std::env::var_os("CI").is_some()
            || std::env::var_os("TURNSTILE_REQUIRE_CHROMIUM").is_some_and(|v| v == "1");
        assert!(
            !required,
            "Chromium is required in CI and with TURNSTILE_REQUIRE_CHROMIUM=1 (.ci/run installs \
             Debian's chromium package)"
        );
        // Written to the process's stderr, not through eprintln!, which the test harness
        // captures and hides for a test that passes: a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED dashboard_shows_a_new_lease_without_a_reload: no chromium on PATH \
             (apt-get install chromium, or set CHROMIUM); it runs in CI ***\n"
        );
        return;
    };
    let dir = Scratch::new("dashboard");
    let server = Server::start_with(&[
        "--in-memory",
        "--session-ttl",
        "1s",
        "--http",
        "127.0.0.1:0",
    ]);
    let h = Harness { server, dir };

    // Something to look at: semaphores with holders and a queue, a job group, and events (an
    // expiry, a close).
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(hold(&h, &format!("db{i}"), "db", "4"));
    }
    held.push(hold(&h, "gpu0", "gpu", "1"));
    h.wait_for_semaphore("gpu", "held", |s| s["in_use"] == 1);
    for i in 1..3 {
        held.push(hold(&h, &format!("gpu{i}"), "gpu", "1"));
    }
    let doomed = hold(&h, "doomed", "db", "4");
    h.wait_for_semaphore("db", "four holders", |s| s["in_use"] == 4);
    doomed.signal(Signal::SIGKILL);
    held.push(hold(&h, "old", "legacy-import", "2"));
    h.wait_for_semaphore("legacy-import", "held", |s| s["in_use"] == 1);
    assert_eq!(h.run(&["close", "legacy-import"]).code(), 0);
    for day in 1..=3 {
        let job = format!("import-2026-11-0{day}");
        let out = h.run(&["once", &job, "--group", "nightly", "--", "true"]);
        assert_eq!(out.code(), 0, "{out:?}");
    }
    held.push(h.spawn(
        "job",
        &[
            "once",
            "import-2026-11-04",
            "--group",
            "nightly",
            "--",
            "sh",
            "-c",
            r#"while [ ! -e "$DIR/go" ]; do sleep 0.1; done"#,
        ],
    ));
    h.wait_for_semaphore("db", "the killed holder expired", |s| {
        s["expired_total"] == 1 && s["in_use"] == 3
    });
    h.wait_for_semaphore("gpu", "two waiters", |s| s["queued"] == 2);

    let profile = h.dir.join("chromium-profile");
    let log = std::fs::File::create(h.dir.join("chromium.log")).expect("chromium log");
    let mut browser = Browser::launch(&binary, &profile, log);
    let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
    let attached = browser.call(
        "Target.attachToTarget",
        json!({ "targetId": target["targetId"], "flatten": true }),
    );
    browser.session = Some(
        attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned(),
    );
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1440, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
    );
    let url = format!("http://{}/", h.server.http_addr());
    browser.call("Page.navigate", json!({ "url": url }));
    browser.wait_for(
        "the first status drawn",
        r#"Number(document.body.dataset.polls) >= 1 &&
           document.querySelector('[data-semaphore="gpu"] tr.waiter') !== null"#,
    );
    // A mark on this page's window: a reload would wipe it.
    browser.eval("window.loadedOnce = true");
    assert_eq!(
        browser.eval("document.querySelector('[data-semaphore=\"fresh\"]') === null"),
        json!(true)
    );

    // Now, with the page loaded, a new semaphore and a lease on it.
    held.push(hold(&h, "fresh", "fresh", "2"));
    let fresh = h.wait_for_semaphore("fresh", "held", |s| s["in_use"] == 1);
    let session = fresh["holders"][0]["session"]
        .as_str()
        .expect("a session")
        .to_owned();
    // The lease id is a 64-bit number: the page shows it exactly (it is a string in the
    // JSON; as a number it would be rounded past 2^53).
    let lease = fresh["holders"][0]["lease_id"]
        .as_str()
        .expect("a lease id, as a string")
        .to_owned();
    browser.wait_for(
        "the new lease in the page",
        &format!(
            r#"document.querySelector('[data-semaphore="fresh"] tr.holder[data-session="{session}"][data-lease="{lease}"]') !== null"#
        ),
    );
    assert_eq!(
        browser.eval(&format!(
            r#"document.querySelector('[data-semaphore="fresh"] tr.holder[data-lease="{lease}"] td:nth-child(2)').textContent"#
        )),
        json!(lease),
        "the lease id as shown"
    );
    assert_eq!(browser.eval("window.loadedOnce === true"), json!(true));
    assert_eq!(
        browser.eval("performance.getEntriesByType('navigation').length"),
        json!(1)
    );
    // The feed shows the expiry and the close.
    browser.wait_for(
        "the events in the feed",
        r#"document.querySelector('#feed li.k-session_expired') !== null &&
           document.querySelector('#feed li.k-semaphore_closed') !== null"#,
    );
    let text = browser.eval("document.body.innerText");
    // innerText applies CSS text-transform: compare in lower case.
    let text = text.as_str().unwrap_or_default().to_lowercase();
    for expected in [
        "fresh",
        "gpu",
        "nightly",
        "lease lost",
        "semaphore closed",
        "queue",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not in the page: {text}"
        );
    }

    let shot = browser.call(
        "Page.captureScreenshot",
        json!({ "format": "png", "captureBeyondViewport": false }),
    );
    let png = base64(shot["data"].as_str().expect("PNG data"));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &png).expect("save the screenshot");
    eprintln!("screenshot saved to {}", artifact.display());
    if std::env::var_os("TURNSTILE_UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png");
        std::fs::write(&docs, &png).expect("update docs/dashboard.png");
        eprintln!("and to {}", docs.display());
    }

    // A coordinator whose HTTP port is beyond loopback asks for its token on the data routes
    // (the page itself is open): the page says so, then takes the token from the fragment,
    // sends it as a bearer token, and wipes it from the address bar.
    std::fs::write(h.dir.join("token"), "s3cret\n").expect("write the token");
    let token_file = h.dir.join("token").display().to_string();
    let guarded = Server::start_with(&[
        "--in-memory",
        "--auth-token-file",
        &token_file,
        "--http",
        "0.0.0.0:0",
    ]);
    let port = guarded
        .http_addr()
        .rsplit_once(':')
        .map(|(_, p)| p.to_owned())
        .expect("a port");
    let base = format!("http://127.0.0.1:{port}/");
    browser.call("Page.navigate", json!({ "url": base }));
    browser.wait_for(
        "the page to ask for the token",
        r#"document.getElementById('live-text').textContent.includes('asks for its token')"#,
    );
    assert_eq!(browser.eval("document.body.dataset.polls"), json!("0"));
    browser.call(
        "Page.navigate",
        json!({ "url": format!("{base}#token=s3cret") }),
    );
    browser.wait_for(
        "the status drawn with the token",
        r#"Number(document.body.dataset.polls) >= 1 && location.hash === ''"#,
    );
    assert_eq!(
        browser.eval("sessionStorage.getItem('turnstile-token')"),
        json!("s3cret")
    );
    drop(guarded);

    std::fs::write(h.dir.join("go"), "").expect("release the holders");
    browser.session = None; // a command for the browser, not the page
    let _ = browser.call("Browser.close", json!({}));
    wait_until("chromium to exit", SOON, || {
        browser.child.try_wait().ok().flatten()
    });
    drop(doomed);
    drop(held);
}
