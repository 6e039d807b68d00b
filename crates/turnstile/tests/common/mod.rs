//! Shared helpers for the CLI tests: a coordinator process, `turnstile` processes that cannot
//! outlive their test, per-test scratch directories, and polling with deadlines.
//!
//! Every process is killed on drop, so a failing (panicking) test leaks nothing:
//! - [`Server`] kills the coordinator;
//! - [`Proc`] starts `turnstile` in a process group of its own and kills the whole group, which
//!   also takes out the commands it ran and any orphans they left behind.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_turnstile");

/// Deadline for things that take well under a second on an idle machine. Generous, so that a
/// loaded CI machine does not make the tests flaky; only a failing test ever waits this long.
pub const SOON: Duration = Duration::from_secs(20);

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, for at most `timeout`; panics naming `what` if it
/// never does.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// A directory under cargo's target/tmp for one test's files, removed when the test passes
/// (kept for inspection when it fails).
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A fresh, empty directory whose name starts with `name`.
    pub fn new(name: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "cli-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scratch directory");
        Scratch { path }
    }

    /// The path of `name` in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The contents of `name`, if it exists.
    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.join(name)).ok()
    }

    /// Waits until `name` exists and returns its contents. Scripts write such files with
    /// `echo ... > f.tmp && mv f.tmp f`, so that a file that exists is complete.
    pub fn wait_for(&self, name: &str) -> String {
        wait_until(&format!("file {name}"), SOON, || self.read(name))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A `turnstile serve` process on a free port, killed on drop.
pub struct Server {
    child: Child,
    url: String,
    http: Option<String>,
}

impl Server {
    /// Starts a coordinator on 127.0.0.1 port 0 and waits for the line that says where it
    /// listens. It keeps its state in memory: these tests do not restart it, and servers of
    /// tests running in parallel must not share (and lock) the default data directory.
    pub fn start(session_ttl: &str) -> Server {
        Server::start_with(&["--in-memory", "--session-ttl", session_ttl])
    }

    /// Starts a coordinator on 127.0.0.1 port 0 with more `serve` arguments (`--data-dir`...).
    /// Without an `--http` among them, the HTTP port is off: parallel tests must not compete
    /// for its default port.
    pub fn start_with(args: &[&str]) -> Server {
        Server::spawn(args, Stdio::null())
    }

    /// Like [`Server::start_with`], with the server's stderr (its log) going to `stderr`.
    /// With `--http ADDR` among `args`, waits for the HTTP port's line too.
    pub fn spawn(args: &[&str], stderr: impl Into<Stdio>) -> Server {
        let http_wanted = match args.iter().position(|a| *a == "--http") {
            Some(i) => args.get(i + 1) != Some(&"off"),
            None => false,
        };
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        if !args.contains(&"--http") {
            cmd.args(["--http", "off"]);
        }
        let mut child = cmd
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn turnstile serve");
        let stdout = child.stdout.take().expect("the server's stdout is piped");
        // Construct the guard first, so the server is killed if anything below panics.
        let mut server = Server {
            child,
            url: String::new(),
            http: None,
        };
        // Read on a thread, so that a server that never prints cannot hang the test. The
        // thread then drains the pipe until the server exits, so its stdout never breaks.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            for _ in 0..2 {
                let mut line = String::new();
                if tx.send(reader.read_line(&mut line).map(|_| line)).is_err() {
                    break;
                }
            }
            let _ = reader.read_to_end(&mut Vec::new());
        });
        let line = match rx.recv_timeout(SOON) {
            Ok(Ok(line)) => line,
            other => panic!("turnstile serve did not print its address: {other:?}"),
        };
        let addr = line
            .trim_end()
            .strip_prefix("listening on 127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected first line from turnstile serve: {line:?}"));
        let port: u16 = addr.parse().expect("a port number");
        assert_ne!(port, 0, "the server must report the port it bound");
        server.url = format!("tcp://127.0.0.1:{port}");
        if http_wanted {
            let line = match rx.recv_timeout(SOON) {
                Ok(Ok(line)) => line,
                other => panic!("turnstile serve did not print its HTTP address: {other:?}"),
            };
            let url = line
                .trim_end()
                .strip_prefix("http on ")
                .unwrap_or_else(|| panic!("unexpected second line: {line:?}"));
            server.http = Some(url.to_owned());
        }
        server
    }

    /// The HTTP (or HTTPS) port's `host:port`; panics if the server was started without one.
    pub fn http_addr(&self) -> String {
        let url = self.http.as_deref().expect("the server serves HTTP");
        url.trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned()
    }

    /// `GET path` on the HTTP port: the status code and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http_addr(), path)
    }

    /// The server's process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` from `addr` (`host:port`) with a plain HTTP/1.1 request: the status code and
/// the body. It asks the server to close the connection after the response (HTTP/1.1 would
/// keep it alive), so the response ends where the stream does.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP port");
    stream
        .set_read_timeout(Some(SOON))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .expect("read the whole response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (code, body.to_owned())
}

/// What a finished `turnstile` process left behind.
#[derive(Debug)]
pub struct Finished {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it (and its command) wrote on stdout.
    pub stdout: String,
    /// Everything it (and its command) wrote on stderr.
    pub stderr: String,
}

impl Finished {
    /// The exit code; panics (with stderr) if the process was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    /// Asserts the shape of an error exit: a non-zero code and exactly one line on stderr,
    /// mentioning each of `mentions`, and nothing that looks like a panic.
    pub fn assert_one_line_error(&self, mentions: &[&str]) {
        assert_ne!(self.code(), 0, "expected a failure: {self:?}");
        assert_no_panic(&self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:?}");
        assert!(lines[0].starts_with("turnstile: "), "{self:?}");
        for m in mentions {
            assert!(
                lines[0].contains(m),
                "stderr should mention {m:?}: {self:?}"
            );
        }
    }
}

/// Asserts that `stderr` shows no sign of a panic or a backtrace.
pub fn assert_no_panic(stderr: &str) {
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!stderr.contains(bad), "stderr contains {bad:?}: {stderr}");
    }
}

/// A running `turnstile` process with its output going to files. It leads a process group of
/// its own, and the whole group is killed on drop.
pub struct Proc {
    child: Child,
    label: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// The process id of `turnstile` itself.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Sends `sig` to `turnstile` only (not to its command).
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the turnstile process");
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits at most `timeout` for it to exit; panics (with its stderr) if it does not.
    pub fn wait(&mut self, timeout: Duration) -> Finished {
        let what = format!("`turnstile` ({}) to exit", self.label);
        let status = wait_until(&what, timeout, || self.try_status());
        Finished {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group outlives its leader while any member (an orphaned command) is alive, so
        // this reaches the leftovers of a turnstile that was already killed.
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a coordinator and a scratch directory.
pub struct Harness {
    /// The coordinator.
    pub server: Server,
    /// Files shared with the commands (they see its path as `$DIR`).
    pub dir: Scratch,
}

impl Harness {
    /// A coordinator with the given session TTL and an empty scratch directory.
    pub fn new(test: &str, session_ttl: &str) -> Harness {
        Harness {
            server: Server::start(session_ttl),
            dir: Scratch::new(test),
        }
    }

    /// `turnstile ARGS` against this coordinator (through `TURNSTILE_URL`), with `$DIR` set
    /// to the scratch directory and a clean, predictable environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TURNSTILE_URL", self.server.url())
            .env("DIR", &self.dir.path)
            // The default log level, as users see it; a backtrace would show in stderr.
            .env_remove("RUST_LOG")
            .env("RUST_BACKTRACE", "1")
            .env_remove("TURNSTILE_SESSION");
        cmd
    }

    /// Starts `turnstile ARGS`; `label` names its output files and failure messages.
    pub fn spawn(&self, label: &str, args: &[&str]) -> Proc {
        self.spawn_command(label, self.command(args))
    }

    /// Starts `cmd` (from [`Harness::command`]) as a [`Proc`].
    pub fn spawn_command(&self, label: &str, mut cmd: Command) -> Proc {
        let stdout = self.dir.join(&format!("{label}.stdout"));
        let stderr = self.dir.join(&format!("{label}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create stdout file"))
            .stderr(File::create(&stderr).expect("create stderr file"))
            .process_group(0);
        let child = cmd.spawn().expect("spawn turnstile");
        Proc {
            child,
            label: label.to_owned(),
            stdout,
            stderr,
        }
    }

    /// Runs `turnstile ARGS` to completion (at most [`SOON`]).
    pub fn run(&self, args: &[&str]) -> Finished {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let words: String = args
            .join("_")
            .replace(['/', ' '], "_")
            .chars()
            .take(60)
            .collect();
        let label = format!("run{}-{words}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.spawn(&label, args).wait(SOON)
    }

    /// `turnstile status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert_eq!(out.code(), 0, "turnstile status --json failed: {out:?}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout))
    }

    /// The status of semaphore `name`, if it exists.
    pub fn semaphore(&self, name: &str) -> Option<Value> {
        let doc = self.status();
        doc["semaphores"]
            .as_array()
            .expect("a semaphores array")
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Waits until semaphore `name` exists and `pred` holds for its status; returns that
    /// status.
    pub fn wait_for_semaphore(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(&format!("semaphore {name:?}: {what}"), SOON, || {
            self.semaphore(name).filter(|s| pred(s))
        })
    }
}

/// Whether process `pid` exists (it may be a zombie).
pub fn process_exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// The command each process of a concurrency test runs while it holds a slot: it appends
/// "start TOKEN NANOS" and, 0.3 s later, "end TOKEN NANOS" to `$DIR/events`. `echo ... >>` is
/// a single write(2) of a short line to a file opened with O_APPEND, which is atomic, so lines
/// never interleave. The stamps lie inside the time the slot is held (granted before the
/// command starts, released after it exits), so the overlap of the logged intervals is a lower
/// bound of the real concurrency and can only exceed the limit if the semaphore let more
/// holders in.
pub const HOLD_SCRIPT: &str = r#"echo "start $TURNSTILE_FENCING_TOKEN $(date +%s%N)" >> "$DIR/events"
        sleep 0.3
        echo "end $TURNSTILE_FENCING_TOKEN $(date +%s%N)" >> "$DIR/events""#;

/// What the commands of a concurrency test logged.
pub struct Holds {
    /// Start time (ns) by fencing token.
    pub starts: std::collections::BTreeMap<u64, u128>,
    /// The most commands that held a slot at the same time.
    pub max_overlap: usize,
}

/// Parses the `$DIR/events` log of [`HOLD_SCRIPT`]: every token logged once as start and once
/// as end, the end after the start; and sweeps the events to find the largest overlap.
pub fn read_holds(log: &str) -> Holds {
    let mut starts = std::collections::BTreeMap::new();
    let mut ends = std::collections::BTreeMap::new();
    let mut events = Vec::new(); // (nanos, +1 for a start, -1 for an end)
    for line in log.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [kind, token, nanos] = fields[..] else {
            panic!("malformed event line {line:?}");
        };
        let token: u64 = token.parse().expect("a numeric fencing token");
        let nanos: u128 = nanos.parse().expect("date +%s%N gives nanoseconds");
        let (map, delta) = match kind {
            "start" => (&mut starts, 1i64),
            "end" => (&mut ends, -1),
            _ => panic!("malformed event line {line:?}"),
        };
        assert!(
            map.insert(token, nanos).is_none(),
            "token {token} logged {kind} twice"
        );
        events.push((nanos, delta));
    }
    assert_eq!(
        starts.keys().collect::<Vec<_>>(),
        ends.keys().collect::<Vec<_>>(),
        "every command that started also ended"
    );
    for (token, start) in &starts {
        assert!(
            start < &ends[token],
            "token {token} ended before it started"
        );
    }
    // Sweep in time order; on a tie an end goes first (it sorts first as -1).
    events.sort();
    let (mut now, mut max) = (0i64, 0i64);
    for (_, delta) in events {
        now += delta;
        max = max.max(now);
    }
    Holds {
        starts,
        max_overlap: usize::try_from(max).unwrap_or(0),
    }
}

/// The command of a wrapper that a test kills: a tree of processes (a background child, a
/// child shell with a child of its own, an orphan that left the process group with `setsid`,
/// and the shell itself), whose 5 pids it appends to `$DIR/pids`; then `$DIR/ready`.
pub const TREE_SCRIPT: &str = r#"sleep 300 & echo $! >> "$DIR/pids"
    sh -c 'sleep 300 & echo $! >> "$DIR/pids"; wait' &
    echo $! >> "$DIR/pids"
    sh -c 'setsid sleep 300 & echo $! >> "$DIR/pids"'
    echo $$ >> "$DIR/pids"
    until [ "$(wc -l < "$DIR/pids")" -ge 5 ]; do sleep 0.01; done
    echo ready > "$DIR/ready"
    wait"#;

/// The command of the next holder after a killed one: it writes to `$DIR/second` the pids of
/// `$DIR/pids` that are still alive as it starts (nothing, if the slot was never shared).
pub const SECOND_SCRIPT: &str = r#"for p in $(cat "$DIR/pids"); do
        if kill -0 "$p" 2>/dev/null; then echo "alive $p"; fi
    done > "$DIR/second.tmp"
    mv "$DIR/second.tmp" "$DIR/second""#;

/// Issue 11's first repro, for any wrapper (`run`, `once`) and backend: `first` runs
/// [`TREE_SCRIPT`] (its arguments end with `sh -c`), `second` [`SECOND_SCRIPT`]; `command`
/// turns arguments into a `turnstile` command for the backend. After `kill -9` of the first
/// wrapper, every process of its command is gone within 1 s, and the second holder, started
/// right after the kill, never runs while one of them lives. Returns how long after the kill
/// the second holder was granted.
pub fn killed_wrapper_takes_its_command_along(
    h: &Harness,
    command: impl Fn(&[&str]) -> Command,
    first: &[&str],
    second: &[&str],
) -> Duration {
    let mut first_args = first.to_vec();
    first_args.push(TREE_SCRIPT);
    let mut wrapper = h.spawn_command("first", command(&first_args));
    h.dir.wait_for("ready");
    let pids: Vec<i32> = h
        .dir
        .read("pids")
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), 5, "{pids:?}");
    assert!(pids.iter().all(|&p| process_exists(p)), "{pids:?}");

    let killed = Instant::now();
    wrapper.signal(Signal::SIGKILL);
    let mut second_args = second.to_vec();
    second_args.push(SECOND_SCRIPT);
    let mut next = h.spawn_command("second", command(&second_args));
    wait_until("the killed wrapper's command tree to die", SOON, || {
        pids.iter().all(|&p| !process_exists(p)).then_some(())
    });
    let gone = killed.elapsed();
    assert!(
        gone < Duration::from_secs(1),
        "the command outlived its wrapper by {gone:?}"
    );
    let report = h.dir.wait_for("second");
    let granted = killed.elapsed();
    assert_eq!(
        report, "",
        "the next holder ran while the killed holder's command still ran"
    );
    let out = next.wait(SOON);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(
        wrapper.wait(SOON).status.signal(),
        Some(9),
        "the wrapper died by SIGKILL"
    );
    granted
}
