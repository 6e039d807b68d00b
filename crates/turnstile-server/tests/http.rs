//! Tests of the HTTP port: `/metrics` after a scripted workload (exact counters, and a valid
//! text format), the status and events routes, and requests that are wrong in every way.
//!
//! Each test starts an in-process server with both ports on `127.0.0.1:0`. The workload runs
//! through the real client, except for a session that must expire, which a bare socket opens
//! and then abandons. Every wait polls with a deadline.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use turnstile_client::{Client, Error as ClientError};
use turnstile_proto::{
    decode_reply, encode_request, split_frame, Reply, Request, StatusDoc, MAGIC, MAX_REPLY_FRAME,
    NO_TIMEOUT, VERSION,
};
use turnstile_server::{Config, FsyncMode, Server, Storage};

/// How long any awaited event may take: generous, for a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// An in-process coordinator serving both ports; stops when dropped.
struct TestServer {
    addr: SocketAddr,
    http: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    async fn start(storage: Storage) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = listener.local_addr().expect("local addr");
        let http_addr = http.local_addr().expect("local addr");
        let server = Server::open(Config {
            storage,
            ..Config::default()
        })
        .expect("open");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            server
                .run_with_http(listener, Some(http), shutdown)
                .await
                .expect("server runs");
        });
        TestServer {
            addr,
            http: http_addr,
            _stop: stop,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&format!("tcp://{}", self.addr))
            .await
            .expect("client connects")
    }

    async fn get(&self, path: &str) -> Response {
        request(
            self.http,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
        )
        .await
    }

    async fn metrics(&self) -> Metrics {
        let r = self.get("/metrics").await;
        assert_eq!(r.code, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Metrics::parse(&r.body)
    }

    /// Polls `/metrics` until `check` holds; fails naming `what` after [`PATIENCE`].
    async fn metrics_until(&self, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let m = self.metrics().await;
            if check(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An HTTP response.
struct Response {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw bytes to the HTTP port and reads one response (the connection may stay open:
/// HTTP/1.1 keeps it alive).
async fn request(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect http");
    stream.write_all(bytes).await.expect("write");
    timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("the server answers in time")
}

/// Reads one response off `stream`: its head, then as many bytes as its Content-Length says.
async fn read_response(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|l| l.parse().ok())
                .expect("a Content-Length");
            if raw.len() >= end + 4 + length {
                raw.truncate(end + 4 + length);
                return parse_response(&raw);
            }
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the server closed mid-response: {raw:?}");
        raw.extend_from_slice(&chunk[..n]);
    }
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8(raw.to_vec()).expect("responses are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines.next().expect("a status line");
    let code = status
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("header lines are `name: value`");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let response = Response {
        code,
        headers,
        body: body.to_owned(),
    };
    let length: usize = response
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("a Content-Length");
    assert_eq!(length, response.body.len(), "Content-Length is the body's");
    response
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A parsed `/metrics` page, checked against the text format as it is parsed.
struct Metrics {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
}

impl Metrics {
    /// Parses the text format, asserting what a Prometheus server relies on: every family has
    /// one `# HELP` and one `# TYPE`, before its samples, which follow it together; counters
    /// end in `_total`; every histogram's buckets are cumulative and end with `le="+Inf"`
    /// equal to its `_count`.
    fn parse(text: &str) -> Metrics {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        let mut current: Option<String> = None;
        let mut finished: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a text");
                assert!(!help.is_empty());
                assert!(
                    helps.insert(name.to_owned(), help.to_owned()).is_none(),
                    "two HELP lines for {name}"
                );
                if let Some(done) = current.take() {
                    finished.push(done);
                }
                assert!(!finished.contains(&name.to_owned()), "{name} comes twice");
                current = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
                assert_eq!(current.as_deref(), Some(name), "TYPE right after HELP");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} ends in _total");
                }
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "line {line:?}");
                let (name, labels, value) = parse_sample(line);
                let family = current
                    .as_deref()
                    .expect("a sample after its HELP and TYPE");
                let kind = &types[family];
                let belongs = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{family}{s}"))
                } else {
                    name == family
                };
                assert!(belongs, "sample {name} under family {family}");
                assert!(name.starts_with("turnstile_"), "{name} has the prefix");
                samples.push((name, labels, value));
            }
        }
        let m = Metrics { samples, types };
        m.check_histograms();
        m
    }

    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            // Group the buckets by their labels other than `le`.
            type Bounds = Vec<(f64, f64)>;
            let mut series: BTreeMap<Vec<(String, String)>, Bounds> = BTreeMap::new();
            for (name, labels, value) in &self.samples {
                if *name != format!("{family}_bucket") {
                    continue;
                }
                let le = &labels["le"];
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                let rest: Vec<(String, String)> = labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(rest).or_default().push((bound, *value));
            }
            for (labels, buckets) in series {
                for pair in buckets.windows(2) {
                    assert!(pair[0].0 < pair[1].0, "{family}: bounds rise");
                    assert!(pair[0].1 <= pair[1].1, "{family}: buckets are cumulative");
                }
                let last = buckets.last().expect("at least the +Inf bucket");
                assert_eq!(last.0, f64::INFINITY, "{family}: ends with +Inf");
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let count = self.get(&format!("{family}_count"), &labels);
                assert_eq!(Some(last.1), count, "{family}: +Inf bucket = _count");
                assert!(self.get(&format!("{family}_sum"), &labels).is_some());
            }
        }
    }

    /// The value of the sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// A per-semaphore sample.
    fn sem(&self, name: &str, semaphore: &str) -> Option<f64> {
        self.get(name, &[("semaphore", semaphore)])
    }

    /// `turnstile_requests_total` for a kind and outcome; 0 when the series is absent.
    fn requests(&self, kind: &str, outcome: &str) -> f64 {
        self.get(
            "turnstile_requests_total",
            &[("kind", kind), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    }
}

/// `name{k="v",...} value`, with the escapes of the text format in label values.
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let mut labels = BTreeMap::new();
    let (name, rest) = match line.find('{') {
        Some(i) => {
            let name = &line[..i];
            let mut chars = line[i + 1..].char_indices();
            let mut key = String::new();
            let end = loop {
                let (at, c) = chars.next().expect("labels end with }");
                match c {
                    '}' => break i + 1 + at + 1,
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'));
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("a closing quote").1 {
                                '"' => break,
                                '\\' => match chars.next().expect("an escape").1 {
                                    'n' => value.push('\n'),
                                    c => value.push(c),
                                },
                                c => value.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            };
            (name, &line[end..])
        }
        None => line.split_at(line.find(' ').expect("a value")),
    };
    let value = rest.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    (name.to_owned(), labels, value)
}

/// A bare protocol connection for a session the test abandons.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    next_id: u32,
}

impl Raw {
    async fn session(addr: SocketAddr, session: u64, ttl_ms: u32) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
            next_id: 1,
        };
        raw.call(&Request::Hello {
            magic: MAGIC,
            version: VERSION,
            client: "abandoned:1",
            token: "",
        })
        .await;
        raw.call(&Request::OpenSession { session, ttl_ms }).await;
        raw
    }

    /// Sends a request and returns a description of its reply.
    async fn call(&mut self, request: &Request<'_>) -> String {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = Vec::new();
        encode_request(id, request, &mut frame);
        self.stream.write_all(&frame).await.expect("write");
        loop {
            if let Some((payload, used)) =
                split_frame(&self.buf, MAX_REPLY_FRAME).expect("valid frames")
            {
                let (got, reply) = decode_reply(payload).expect("replies decode");
                let text = format!("{reply:?}");
                let failed = matches!(reply, Reply::Error { .. });
                self.buf.drain(..used);
                if got == id {
                    assert!(!failed, "{text}");
                    return text;
                }
                continue;
            }
            let n = timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a reply in time")
                .expect("read");
            assert!(n > 0, "the server closed the connection");
        }
    }
}

/// The scripted workload, then `/metrics` must count exactly what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_workload() {
    let server = TestServer::start(Storage::InMemory).await;
    let a = server.client().await;
    let b = server.client().await;

    // 5 acquire + release pairs, none waits.
    let db = a.semaphore("db", 2).await.expect("ensure");
    for _ in 0..5 {
        db.acquire()
            .await
            .expect("acquire")
            .release()
            .await
            .expect("release");
    }
    // Both permits held: b's acquire with a timeout times out in the queue.
    let p1 = db.acquire().await.expect("acquire");
    let p2 = db.acquire().await.expect("acquire");
    let db_b = b.semaphore("db", 2).await.expect("ensure");
    match db_b.acquire_timeout(Duration::from_millis(50)).await {
        Err(ClientError::TimedOut) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // b queues; the status shows it as the only waiter; a release grants it.
    let queued = tokio::spawn(async move { db_b.acquire().await });
    let deadline = Instant::now() + PATIENCE;
    let b_session = format!("{:016x}", b.session_id());
    loop {
        let r = server.get("/v1/semaphores/db").await;
        assert_eq!(r.code, 200);
        let s: turnstile_proto::SemaphoreStatus =
            serde_json::from_str(&r.body).expect("a semaphore entry");
        if let [w] = &s.waiters[..] {
            assert_eq!(w.session, b_session);
            assert_eq!(w.weight, 1);
            assert_eq!(s.queued, 1);
            break;
        }
        assert!(Instant::now() < deadline, "b never showed up in the queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p1.release().await.expect("release");
    let p3 = timeout(PATIENCE, queued)
        .await
        .expect("granted in time")
        .expect("task")
        .expect("granted");

    // A session that is abandoned with a lease: it expires after its 300 ms TTL.
    let mut raw = Raw::session(server.addr, 0xdead, 300).await;
    raw.call(&Request::Ensure {
        capacity: 1,
        name: "exp",
    })
    .await;
    let granted = raw
        .call(&Request::Acquire {
            lease: 1,
            weight: 1,
            timeout_ms: NO_TIMEOUT,
            name: "exp",
        })
        .await;
    assert!(granted.starts_with("Granted"), "{granted}");
    drop(raw);
    server
        .metrics_until("the abandoned session to expire", |m| {
            m.sem("turnstile_semaphore_expired_total", "exp") == Some(1.0)
        })
        .await;

    // Closing db takes both leases still held (a's p2, b's p3).
    a.close("db").await.expect("close");
    for permit in [&p2, &p3] {
        timeout(PATIENCE, permit.lost())
            .await
            .expect("told in time");
    }

    let m = server.metrics().await;
    let db = |name: &str| m.sem(name, "db");
    assert_eq!(db("turnstile_semaphore_capacity"), Some(2.0));
    assert_eq!(db("turnstile_semaphore_in_use"), Some(0.0));
    assert_eq!(db("turnstile_semaphore_queued"), Some(0.0));
    assert_eq!(db("turnstile_semaphore_closed"), Some(1.0));
    assert_eq!(db("turnstile_semaphore_acquired_total"), Some(8.0));
    assert_eq!(db("turnstile_semaphore_released_total"), Some(6.0));
    assert_eq!(db("turnstile_semaphore_expired_total"), Some(0.0));
    assert_eq!(db("turnstile_semaphore_timed_out_total"), Some(1.0));
    assert_eq!(db("turnstile_semaphore_lost_total"), Some(2.0));
    assert_eq!(db("turnstile_semaphore_wait_seconds_count"), Some(8.0));
    // Seven grants came at once; only b's waited, for at least the time of one round trip.
    let fast = m.get(
        "turnstile_semaphore_wait_seconds_bucket",
        &[("semaphore", "db"), ("le", "0.0001")],
    );
    assert!(fast >= Some(5.0), "{fast:?}");
    assert!(db("turnstile_semaphore_wait_seconds_sum") > Some(0.0));

    let exp = |name: &str| m.sem(name, "exp");
    assert_eq!(exp("turnstile_semaphore_acquired_total"), Some(1.0));
    assert_eq!(exp("turnstile_semaphore_released_total"), Some(0.0));
    assert_eq!(exp("turnstile_semaphore_expired_total"), Some(1.0));
    assert_eq!(exp("turnstile_semaphore_in_use"), Some(0.0));
    assert_eq!(exp("turnstile_semaphore_closed"), Some(0.0));

    // Requests, counted when answered: the queued acquire as ok, once.
    assert_eq!(m.requests("acquire", "ok"), 9.0);
    assert_eq!(m.requests("acquire", "timed_out"), 1.0);
    assert_eq!(m.requests("release", "ok"), 6.0);
    assert_eq!(m.requests("ensure", "ok"), 3.0);
    assert_eq!(m.requests("close", "ok"), 1.0);
    assert_eq!(m.requests("hello", "ok"), 3.0);
    assert_eq!(m.requests("open_session", "ok"), 3.0);
    assert_eq!(m.requests("acquire", "cancelled"), 0.0);
    // a and b are connected and their sessions open; the abandoned one is gone.
    assert_eq!(m.get("turnstile_sessions", &[]), Some(2.0));
    assert_eq!(m.get("turnstile_connections", &[]), Some(2.0));
    assert_eq!(m.get("turnstile_connections_total", &[]), Some(3.0));
    // In memory: no log metrics.
    assert!(!m.types.contains_key("turnstile_fsync_duration_seconds"));
    assert!(
        m.get(
            "turnstile_http_requests_total",
            &[("route", "/metrics"), ("code", "200")]
        ) >= Some(2.0)
    );

    // The event feed: the expiry (lease, then session), then the close and its two losses.
    let r = server.get("/v1/events").await;
    assert_eq!(r.code, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let page: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let events = page["events"].as_array().expect("events");
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("lease_lost", "expired"),
        ("session_expired", ""),
        ("semaphore_closed", ""),
        ("lease_lost", "closed"),
        ("lease_lost", "closed"),
    ];
    assert_eq!(
        seen,
        expected.map(|(k, r)| (k.to_owned(), r.to_owned())),
        "{}",
        r.body
    );
    assert_eq!(events[0]["semaphore"], "exp");
    assert_eq!(events[0]["lease"], "1", "a string, exact past 2^53");
    assert_eq!(events[0]["session"], "000000000000dead");
    assert_eq!(page["last"], 5);
    let later = server.get("/v1/events?after=4").await;
    let later: serde_json::Value = serde_json::from_str(&later.body).expect("JSON");
    assert_eq!(later["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(later["events"][0]["seq"], 5);
}

/// With a data directory, the log's syncs are timed and its bytes counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_time_the_log_syncs() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("http-fsync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = TestServer::start(Storage::Dir {
        path: dir.clone(),
        fsync: FsyncMode::Always,
        snapshot_bytes: 64 << 20,
    })
    .await;
    let client = server.client().await;
    let sem = client.semaphore("disk", 1).await.expect("ensure");
    for _ in 0..3 {
        sem.acquire()
            .await
            .expect("acquire")
            .release()
            .await
            .expect("release");
    }
    let m = server.metrics().await;
    // Each step whose reply waits for its record was synced before that reply: the open, the
    // ensure and the three grants. A release is answered before its sync (PROTOCOL.md,
    // Release), so its record may share the next grant's sync and is not counted apart.
    let syncs = m
        .get("turnstile_fsync_duration_seconds_count", &[])
        .expect("the fsync histogram");
    assert!(syncs >= 5.0, "{syncs}");
    assert!(m.get("turnstile_fsync_duration_seconds_sum", &[]) > Some(0.0));
    assert!(m.get("turnstile_log_written_bytes_total", &[]) > Some(100.0));
    assert_eq!(m.get("turnstile_snapshots_total", &[]), Some(0.0));
    assert_eq!(m.types["turnstile_fsync_duration_seconds"], "histogram");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/v1/status` is the status document; `/v1/semaphores/NAME` one entry of it; the dashboard
/// is one self-contained page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_routes_and_dashboard() {
    let server = TestServer::start(Storage::InMemory).await;
    let client = server.client().await;
    let odd = client.semaphore("a b/ç\"", 3).await.expect("ensure");
    let _held = odd.acquire_many(2).await.expect("acquire");
    client.semaphore("other", 1).await.expect("ensure");

    let r = server.get("/v1/status").await;
    assert_eq!(r.code, 200);
    let mut over_http = StatusDoc::from_json(r.body.as_bytes()).expect("a status document");
    let mut over_tcp = client.status(None).await.expect("status");
    for doc in [&mut over_http, &mut over_tcp] {
        for s in &mut doc.semaphores {
            for h in &mut s.holders {
                h.age_ms = 0; // the one thing that changes between the two reads
            }
        }
    }
    assert_eq!(over_http, over_tcp);
    assert_eq!(over_http.semaphores.len(), 2);

    let r = server.get("/v1/semaphores/a%20b%2F%C3%A7%22").await;
    assert_eq!(r.code, 200, "{}", r.body);
    let one: turnstile_proto::SemaphoreStatus = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(one.name, "a b/ç\"");
    assert_eq!((one.capacity, one.in_use), (3, 2));
    assert_eq!(
        one.holders[0].session,
        format!("{:016x}", client.session_id())
    );

    for (path, code) in [
        ("/v1/semaphores/nope", 404),
        ("/v1/semaphores/", 404),
        ("/v1/semaphores/%zz", 400),
        ("/v1/events?after=x", 400),
        ("/nope", 404),
        ("/metrics/", 404),
    ] {
        let r = server.get(path).await;
        assert_eq!(r.code, code, "{path}: {}", r.body);
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("errors are JSON");
        assert!(body["error"].is_string());
    }

    let page = server.get("/").await;
    assert_eq!(page.code, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains("<title>turnstile</title>"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|p| p.contains("default-src 'self'")));
    // Nothing from elsewhere: the machine this runs on may have no network at all.
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
}

/// Wrong requests get an error status, never a panic, and never hold up other requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused() {
    let server = TestServer::start(Storage::InMemory).await;
    // A client that connects and says nothing holds no one up; it gets 408 in the end.
    let mut idle = TcpStream::connect(server.http).await.expect("connect");
    assert_eq!(server.get("/metrics").await.code, 200);

    let cases: [(&[u8], u16); 6] = [
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2\r\n\r\n", 400),
        (b"\xff\xfe\xfd /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 200),
    ];
    for (bytes, code) in cases {
        let r = request(server.http, bytes).await;
        assert_eq!(r.code, code, "{:?}", String::from_utf8_lossy(bytes));
    }
    let post = request(server.http, b"DELETE / HTTP/1.1\r\n\r\n").await;
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // HEAD: the headers of GET, no body.
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    stream
        .write_all(b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8(raw).expect("UTF-8");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");

    // A head that never ends is cut off at its limit.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 9000));
    let r = request(server.http, &huge).await;
    assert_eq!(r.code, 431);

    // Garbage, and a peer that leaves mid-request.
    for len in [1usize, 7, 100, 5000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        let mut s = TcpStream::connect(server.http).await.expect("connect");
        let _ = s.write_all(&bytes).await;
        drop(s);
    }
    assert_eq!(server.get("/v1/status").await.code, 200);

    let mut raw = Vec::new();
    timeout(PATIENCE, idle.read_to_end(&mut raw))
        .await
        .expect("the idle connection is answered after the read timeout")
        .expect("read");
    assert_eq!(parse_response(&raw).code, 408);
}

/// The HTTP port's constants (`crates/turnstile-server/src/http.rs`), as these tests rely on
/// them.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_READING: usize = 256;

/// `turnstile_http_connections`, the HTTP connections open now (the scrape's own included).
fn open_connections(m: &Metrics) -> f64 {
    m.get("turnstile_http_connections", &[])
        .expect("turnstile_http_connections")
}

/// HTTP/1.1 keeps the connection alive: several requests, pipelined or one after the other,
/// on one connection, until the client asks for a close or leaves it idle too long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_pipelining() {
    let server = TestServer::start(Storage::InMemory).await;
    let mut s = TcpStream::connect(server.http).await.expect("connect");
    for path in ["/metrics", "/v1/status", "/nope"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let r = timeout(PATIENCE, read_response(&mut s))
            .await
            .expect("an answer in time");
        assert_eq!(r.code, if path == "/nope" { 404 } else { 200 }, "{path}");
        assert_eq!(r.header("connection"), None, "kept alive");
    }
    // Three at once, answered in order.
    s.write_all(
        b"GET /v1/events HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("answered and closed after `Connection: close`")
        .expect("read");
    let raw = String::from_utf8(raw).expect("UTF-8");
    // The events page (with a body), the HEAD (a Content-Length, no body), the 404 (closing).
    let (events, rest) = raw.split_once("\r\n\r\n").expect("a first head");
    assert!(events.starts_with("HTTP/1.1 200 OK\r\n"), "{events}");
    let length: usize = events
        .to_ascii_lowercase()
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: ")?.parse().ok())
        .expect("a Content-Length");
    let (body, rest) = rest.split_at(length);
    assert!(body.contains("events"), "{body}");
    let (head, rest) = rest.split_once("\r\n\r\n").expect("the HEAD's head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(rest.starts_with("HTTP/1.1 404 Not Found\r\n"), "{rest}");
    let last = parse_response(rest.as_bytes());
    assert_eq!(last.header("connection"), Some("close"));

    // A kept-alive connection left idle is closed after the head timeout.
    let mut idle = TcpStream::connect(server.http).await.expect("connect");
    idle.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let r = timeout(PATIENCE, read_response(&mut idle))
        .await
        .expect("in time");
    assert_eq!(r.code, 200);
    let since = Instant::now();
    let mut rest = Vec::new();
    let closed = timeout(PATIENCE, idle.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    assert!(
        since.elapsed() < READ_TIMEOUT * 2,
        "an idle connection lasted {:?}",
        since.elapsed()
    );
}

/// A client that sends its head a byte at a time is cut off after the head timeout, however
/// steadily it sends (hyper's `header_read_timeout`; hyper's own default is 30 s, and without
/// it the connection would last as long as the client goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_off() {
    let server = TestServer::start(Storage::InMemory).await;
    let (mut read, mut write) = TcpStream::connect(server.http)
        .await
        .expect("connect")
        .into_split();
    let started = Instant::now();
    let dribble = tokio::spawn(async move {
        let head = b"GET /metrics HTTP/1.1\r\n"
            .iter()
            .chain(std::iter::repeat(&b'x'));
        for &b in head.take(400) {
            if write.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        write
    });
    let mut got = Vec::new();
    let closed = timeout(PATIENCE, read.read_to_end(&mut got)).await;
    let took = started.elapsed();
    dribble.abort();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "still open after {took:?}: {closed:?}"
    );
    assert!(got.is_empty(), "nothing is answered: {got:?}");
    assert!(
        took < READ_TIMEOUT * 2,
        "closed only after {took:?} (the head timeout is {READ_TIMEOUT:?})"
    );
    assert_eq!(server.get("/metrics").await.code, 200);
}

/// Past [`MAX_READING`] connections still sending their first head, each new one makes the
/// oldest go at once (before its head timeout), so a flood of them cannot fill the port's
/// connection cap; a scrape beside them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_heads_makes_the_oldest_go() {
    let server = TestServer::start(Storage::InMemory).await;
    let flood = MAX_READING + 40;
    let mut slow = Vec::new();
    for _ in 0..flood {
        let mut s = TcpStream::connect(server.http).await.expect("connect");
        s.write_all(b"G").await.expect("write");
        slow.push((Instant::now(), s));
    }
    let (opened, mut oldest) = slow.remove(0);
    let mut got = Vec::new();
    let closed = timeout(PATIENCE, oldest.read_to_end(&mut got)).await;
    let took = opened.elapsed();
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(
        took < READ_TIMEOUT - Duration::from_millis(500),
        "the oldest went after {took:?}: by its head timeout, not to make room"
    );
    let started = Instant::now();
    let m = server.metrics().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        // The evicted go as their tasks next run: a few may still count.
        open_connections(&m) <= (MAX_READING + 8) as f64,
        "{} open",
        open_connections(&m)
    );
    drop(slow);
}

/// A client that asks for responses and does not take them is dropped once a response has
/// waited [`WRITE_TIMEOUT`] to be taken (hyper has no write timeout: ours wraps the stream).
///
/// [`WRITE_TIMEOUT`]: the 10 s of `http.rs`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped() {
    let server = TestServer::start(Storage::InMemory).await;
    let mut s = TcpStream::connect(server.http).await.expect("connect");
    // 2,000 dashboards (16 KB each): far more than the socket buffers hold.
    let requests = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let started = Instant::now();
    let hog = tokio::spawn(async move {
        let _ = s.write_all(&requests).await;
        // Never read; hold the connection until aborted.
        std::future::pending::<()>().await;
        drop(s);
    });
    server
        .metrics_until("the client's connection", |m| open_connections(m) >= 2.0)
        .await;
    let deadline = Instant::now() + PATIENCE + Duration::from_secs(10);
    loop {
        let m = server.metrics().await;
        if open_connections(&m) <= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a client that does not read still holds its connection after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("dropped after {:?}", started.elapsed());
    hog.abort();
}
