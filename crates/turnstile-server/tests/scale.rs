//! Tests of the coordinator at scale: status replies in pages below the frame limit (and the
//! client following them), the metrics page's capped series, and idle semaphores forgotten
//! without fencing tokens going back, also across a restart.
//!
//! Each test starts an in-process server on `127.0.0.1:0`; every wait polls with a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use turnstile_client::Client;
use turnstile_proto::{
    decode_reply, encode_request, split_frame, Reply, Request, StatusDoc, MAGIC, MAX_REPLY_FRAME,
    VERSION,
};
use turnstile_server::{Config, FsyncMode, Server, Storage};

/// How long any awaited event may take: generous, for a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// An in-process coordinator serving both ports; stops when dropped.
struct TestServer {
    addr: SocketAddr,
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    async fn start(storage: Storage, forget_idle: Option<Duration>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = listener.local_addr().expect("local addr");
        let http_addr = http.local_addr().expect("local addr");
        let server = Server::open(Config {
            storage,
            forget_idle,
            ..Config::default()
        })
        .expect("open");
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
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
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Stops the server and waits until it has let go of its data directory.
    async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(done) = self.done.take() {
            timeout(PATIENCE, done)
                .await
                .expect("the server stops in time")
                .expect("the server task ends cleanly");
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&format!("tcp://{}", self.addr))
            .await
            .expect("connect")
    }

    async fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.http).await.expect("connect http");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        timeout(PATIENCE, s.read_to_end(&mut raw))
            .await
            .expect("a response in time")
            .expect("read");
        String::from_utf8_lossy(&raw).into_owned()
    }
}

/// Sends one `Status` request over a bare connection and returns the document and the size
/// of its frame.
async fn raw_status(addr: SocketAddr, prefix: &str, after: &str, limit: u32) -> (StatusDoc, usize) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut frame = Vec::new();
    encode_request(
        1,
        &Request::Hello {
            magic: MAGIC,
            version: VERSION,
            client: "scale-test:1",
            token: "",
        },
        &mut frame,
    );
    encode_request(
        2,
        &Request::Status {
            name: "",
            prefix,
            after,
            limit,
        },
        &mut frame,
    );
    stream.write_all(&frame).await.expect("write");
    let mut buf = Vec::new();
    loop {
        if let Some((payload, used)) = split_frame(&buf, MAX_REPLY_FRAME).expect("valid frames") {
            let (id, reply) = decode_reply(payload).expect("replies decode");
            if id == 2 {
                let Reply::Status { json } = reply else {
                    panic!("status answered with {reply:?}");
                };
                return (StatusDoc::from_json(json).expect("a status document"), used);
            }
            buf.drain(..used);
            continue;
        }
        let n = timeout(PATIENCE, stream.read_buf(&mut buf))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(n > 0, "the server closed the connection");
    }
}

fn names(doc: &StatusDoc) -> Vec<String> {
    doc.semaphores.iter().map(|s| s.name.clone()).collect()
}

/// 2,500 semaphores: one status reply holds at most a page of them and says where the next
/// starts; the client follows every page, and filters by prefix at the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_comes_in_pages_and_the_client_follows_them() {
    let server = TestServer::start(Storage::InMemory, None).await;
    let client = server.client().await;
    let mut all = Vec::new();
    for i in 0..2_500 {
        let name = format!("{}/{i:05}", if i % 5 == 0 { "gpu" } else { "db" });
        client.semaphore(&name, 1).await.expect("ensure");
        all.push(name);
    }
    all.sort();

    let (first, bytes) = raw_status(server.addr, "", "", 0).await;
    assert!(
        first.semaphores.len() <= 1000,
        "one reply held {} semaphores ({bytes} bytes)",
        first.semaphores.len()
    );
    let next = first.next.clone().expect("more pages follow");
    assert_eq!(Some(&next), names(&first).last());
    let (second, _) = raw_status(server.addr, "", &next, 0).await;
    assert_eq!(second.semaphores[0].name, all[first.semaphores.len()]);
    // A small limit is honoured, and a prefix filters at the source.
    let (small, _) = raw_status(server.addr, "gpu/", "", 7).await;
    assert_eq!(
        names(&small),
        all.iter()
            .filter(|n| n.starts_with("gpu/"))
            .take(7)
            .cloned()
            .collect::<Vec<_>>()
    );
    assert!(small.next.is_some());

    let doc = client.status(None).await.expect("status");
    assert_eq!(names(&doc), all, "the client follows every page");
    assert_eq!(doc.next, None);
    let gpu = client
        .status_prefix("gpu/")
        .await
        .expect("status by prefix");
    let want: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with("gpu/"))
        .cloned()
        .collect();
    assert_eq!(names(&gpu), want);
    let one = client.status(Some("db/00001")).await.expect("one");
    assert_eq!(names(&one), ["db/00001"]);
    let _ = client.shutdown().await;
}

/// 700 semaphores: the metrics page has series for the first 500 and one `_other` series
/// that sums the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_series_are_capped() {
    let server = TestServer::start(Storage::InMemory, None).await;
    let client = server.client().await;
    for i in 0..700 {
        client
            .semaphore(&format!("s{i:04}"), 2)
            .await
            .expect("ensure");
    }
    let page = server.get("/metrics").await;
    let capacity: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("turnstile_semaphore_capacity{"))
        .collect();
    assert_eq!(capacity.len(), 501, "500 own series and _other");
    assert_eq!(
        capacity.last().copied(),
        Some("turnstile_semaphore_capacity{semaphore=\"_other\"} 400")
    );
    let _ = client.shutdown().await;
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnstile-scale-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Polls the status until `name` is gone.
async fn until_forgotten(client: &Client, name: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let doc = client.status(Some(name)).await.expect("status");
        if doc.semaphores.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{name} was never forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A name used, forgotten, then used again gets higher tokens: live, and after a restart
/// that replays the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_names_keep_their_tokens_going_up_across_restarts() {
    let dir = temp_dir("forget");
    let storage = || Storage::Dir {
        path: dir.clone(),
        fsync: FsyncMode::Batch,
        snapshot_bytes: 64 << 20,
    };
    let forget = Some(Duration::from_millis(300));
    let server = TestServer::start(storage(), forget).await;
    let client = server.client().await;
    let sem = client.semaphore("once", 1).await.expect("ensure");
    let mut last = 0;
    for _ in 0..3 {
        let permit = sem.acquire().await.expect("acquire");
        last = permit.fencing_token();
        permit.release().await.expect("release");
    }
    until_forgotten(&client, "once").await;
    let sem = client.semaphore("once", 1).await.expect("created again");
    let permit = sem.acquire().await.expect("acquire");
    assert!(
        permit.fencing_token() > last,
        "token {} after {last}",
        permit.fencing_token()
    );
    last = permit.fencing_token();
    permit.release().await.expect("release");
    until_forgotten(&client, "once").await;
    let _ = client.shutdown().await;
    server.stop().await;

    // After a restart the name stays forgotten, and its tokens still go up.
    let server = TestServer::start(storage(), forget).await;
    let client = server.client().await;
    let sem = client
        .semaphore("once", 1)
        .await
        .expect("created after the restart");
    let permit = sem.acquire().await.expect("acquire");
    assert!(
        permit.fencing_token() > last,
        "token {} after {last}, across a restart",
        permit.fencing_token()
    );
    permit.release().await.expect("release");
    let _ = client.shutdown().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
