//! The coordinator under test: a `turnstile serve` process on a fixed port and data
//! directory, killed with SIGKILL and started again.

use super::*;

/// A `turnstile serve` process on a fixed port and data directory that the test kills and
/// restarts. Killed on drop.
pub(crate) struct CrashServer {
    pub(crate) port: u16,
    pub(crate) args: Vec<String>,
    /// stderr of every incarnation, appended.
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
}

impl CrashServer {
    pub(crate) fn new(dir: &Scratch, scenario: &Scenario) -> CrashServer {
        // A free port, chosen once: every incarnation listens on it, so clients find it again.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http",
            "off",
            "--data-dir",
            &dir.join("data").display().to_string(),
            "--fsync",
            scenario.fsync,
            "--session-ttl",
            &format!("{}ms", SESSION_TTL.as_millis()),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        if let Some(size) = scenario.snapshot_every {
            args.extend(["--snapshot-every".to_owned(), size.to_owned()]);
        }
        CrashServer {
            port,
            args,
            log: dir.join("server.log"),
            child: None,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it listens. A failed bind (the port not free yet) is
    /// retried for a while; any other failure to start (a data directory that does not
    /// recover, say) fails the test.
    pub(crate) fn start(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let deadline = Instant::now() + SOON;
        loop {
            match self.try_start() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) if why.contains("cannot listen") && Instant::now() < deadline => {
                    // Retry backoff for a port that is not free yet; there is no event to await.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(why) => panic!("turnstile serve did not start: {why}"),
            }
        }
    }

    pub(crate) fn try_start(&mut self) -> Result<Child, String> {
        let mut stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server log");
        let log_start = stderr.seek(SeekFrom::End(0)).expect("seek the server log");
        let mut child = Command::new(BIN)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn turnstile serve");
        let stdout = child.stdout.take().expect("the server's stdout is piped");
        // Read on a thread, so that a server that never prints cannot hang the test; it then
        // drains the pipe until the server exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            let _ = reader.read_to_end(&mut Vec::new());
        });
        let expected = format!("listening on 127.0.0.1:{}", self.port);
        let outcome = rx.recv_timeout(SOON);
        if matches!(&outcome, Ok(Ok(line)) if line.trim_end() == expected) {
            return Ok(child);
        }
        let _ = child.kill();
        let status = child.wait();
        let mut log = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(log_start));
            let _ = f.read_to_string(&mut log);
        }
        Err(format!(
            "first line {outcome:?}, exit {status:?}, stderr:\n{log}"
        ))
    }

    /// Kills the server with SIGKILL and waits until it is gone. Returns the instant it was
    /// known dead: every reply received before it came from a server that is no more.
    pub(crate) fn kill(&mut self) -> Instant {
        let child = self.child.as_mut().expect("the server is running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited on its own ({status:?}); its log:\n{}",
                log_tail(&self.log)
            );
        }
        child.kill().expect("SIGKILL the server");
        let status = child.wait().expect("wait for the killed server");
        self.child = None;
        assert_eq!(status.signal(), Some(9), "the server died of SIGKILL");
        Instant::now()
    }
}

impl Drop for CrashServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
