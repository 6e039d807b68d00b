//! Starts etcd members for tests: Debian's `etcd` binary on free loopback ports, with its data
//! in a fresh directory, stopped by PID when dropped. A missing `etcd` is installed once
//! (`apt-get install etcd-server`, as `.ci/run` also does), and fails the test loudly if that
//! is not possible: the etcd tests never pass by skipping.
#![allow(dead_code)] // each test binary uses the part it needs

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The etcd binary: `$ETCD_BIN`, else `etcd` on the PATH (Debian: `/usr/bin/etcd`). When it
/// is missing, installs Debian's `etcd-server` once (as root, or with `sudo -n`), so that the
/// README's test command needs no set-up; if that fails too, the test fails loudly.
pub fn etcd_binary() -> PathBuf {
    static INSTALL: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = on_path("etcd") {
        return p;
    }
    let mut tried = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !*tried {
        *tried = true;
        eprintln!("etcd is missing: installing Debian's etcd-server for the etcd backend's tests");
        let root = nix::unistd::geteuid().is_root();
        let apt = |args: &[&str]| {
            let mut cmd = if root {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.args(["-n", "apt-get"]);
                c
            };
            cmd.args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ =
            apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "etcd-server", "etcd-client"]);
    }
    if let Some(p) = on_path("etcd") {
        return p;
    }
    panic!(
        "\n\n*** etcd is not installed, and installing it failed: the etcd backend's tests need it. ***\n\
         Install it with `apt-get install -y etcd-server` (the test command .ci/run does this),\n\
         or point ETCD_BIN at an etcd 3.4+ binary.\n\n"
    );
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One member.
pub struct Member {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of its client port.
    pub client: String,
    name: String,
    peer: String,
}

/// An etcd cluster of one or more members on loopback.
pub struct Etcd {
    /// The members, in start order.
    pub members: Vec<Member>,
    dir: PathBuf,
}

impl Etcd {
    /// A one-member cluster.
    pub fn start() -> Etcd {
        Etcd::cluster(1)
    }

    /// A cluster of `n` members, each ready (answering `/health`) when this returns.
    pub fn cluster(n: usize) -> Etcd {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let bin = etcd_binary();
        let dir = std::env::temp_dir().join(format!(
            "turnstile-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd data directory");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                child: None,
                client: format!("127.0.0.1:{}", free_port()),
                name: format!("m{i}"),
                peer: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let initial = initial.join(",");
        let token = format!(
            "t{}-{}",
            std::process::id(),
            dir.display().to_string().len()
        );
        for m in &mut members {
            let log = std::fs::File::create(dir.join(format!("{}.log", m.name)))
                .expect("create the etcd log");
            let child = Command::new(&bin)
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(dir.join(&m.name))
                .arg("--listen-client-urls")
                .arg(format!("http://{}", m.client))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}", m.client))
                .arg("--listen-peer-urls")
                .arg(format!("http://{}", m.peer))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}", m.peer))
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            m.child = Some(child);
        }
        let etcd = Etcd { members, dir };
        for m in &etcd.members {
            etcd.wait_healthy(&m.client);
        }
        etcd
    }

    fn wait_healthy(&self, client: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(body) = http_get(client, "/health") {
                if body.contains("\"true\"") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {client} did not become healthy; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `etcd://` URL with every member and `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<&str> = self.members.iter().map(|m| m.client.as_str()).collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// The PID of member `i`.
    pub fn pid(&self, i: usize) -> Pid {
        let child = self.members[i].child.as_ref().expect("the member runs");
        Pid::from_raw(child.id() as i32)
    }

    /// Sends `signal` to member `i`.
    pub fn signal(&self, i: usize, signal: Signal) {
        kill(self.pid(i), signal).expect("signal the etcd member");
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// The index of the member that is the leader now, if the members agree on one.
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let body = http_post(&m.client, "/v3/maintenance/status", "{}")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let leader = v.get("leader")?.as_str()?.to_owned();
            let me = v.get("header")?.get("member_id")?.as_str()?.to_owned();
            if leader == me {
                return self.members.iter().position(|x| x.client == m.client);
            }
        }
        None
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                let _ = kill(self.pid(i), Signal::SIGCONT);
            }
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

/// The value of metric `name` (a line `name VALUE` of `/metrics`) on member `addr`.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let text = http_get(addr, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A POST with a JSON body; the response body.
pub fn http_post(addr: &str, path: &str, body: &str) -> Option<String> {
    request(
        addr,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn request(addr: &str, req: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// Standard base64, as etcd's JSON gateway takes `bytes`.
pub fn b64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= c.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// A JSON gateway call on member `addr`, its answer as JSON (`Null` if it failed).
pub fn call(addr: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    http_post(addr, path, &body.to_string())
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Writes a key outside every test prefix and compacts the history up to that write: a watch
/// that starts at any earlier revision is refused (`compact_revision`). Returns the revision.
pub fn compact_now(addr: &str) -> u64 {
    // Two writes: a watch may start at the compaction's own revision, so the revision just
    // after the caller's last write must fall strictly before it.
    let marker = serde_json::json!({"key": b64(b"compaction-marker"), "value": b64(b"x")});
    call(addr, "/v3/kv/put", &marker);
    let put = call(addr, "/v3/kv/put", &marker);
    let rev: u64 = put["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("the put's revision");
    let done = call(
        addr,
        "/v3/kv/compaction",
        &serde_json::json!({"revision": rev.to_string(), "physical": true}),
    );
    assert!(done.get("header").is_some(), "compaction failed: {done}");
    rev
}
