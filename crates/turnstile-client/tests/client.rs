//! Integration tests of the client library against an in-process coordinator.
//!
//! Every test starts its own server with [`turnstile_server::run`] on a listener bound to
//! `127.0.0.1:0` and talks to it through the real TCP backend. The tests that need the network
//! to fail put a [`Proxy`] between the client and the server: a task that forwards bytes and
//! can be "cut" (every connection dropped, new ones refused) and restored.
//!
//! Reconnects and restarts are in `client/resume.rs`, many callers sharing a client in
//! `client/shared.rs`; this file has the fixtures, the conformance suite and the rest.
//!
//! Synchronisation is by events (replies, status conditions polled with a deadline), never by
//! sleeping and hoping; the only sleeps are outages of a chosen length and, in one place, time
//! that must pass so that a keep-alive is *not* sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout, Instant};
use turnstile_client::{blocking, Client, Error, ErrorCode, LostReason, Options};
use turnstile_server::Config;

mod conformance;
use conformance::{hex, status_of, wait_for_status, Fixture, PATIENCE};

conformance_suite!(tcp, TestServer::default().await);

// The cases, by what they put the client through (see each module's doc).
#[path = "client/resume.rs"]
mod resume;
#[path = "client/shared.rs"]
mod shared;

/// An in-process coordinator; stops when dropped.
struct TestServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    async fn start(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            turnstile_server::run(listener, config, shutdown)
                .await
                .expect("server runs");
        });
        TestServer { addr, _stop: stop }
    }

    async fn default() -> TestServer {
        TestServer::start(Config::default()).await
    }

    /// A server whose default session TTL is `ttl`.
    async fn with_ttl(ttl: Duration) -> TestServer {
        TestServer::start(Config {
            session_ttl: ttl,
            min_session_ttl: Duration::from_millis(100),
            ..Default::default()
        })
        .await
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    async fn client(&self) -> Client {
        Client::connect(&self.url()).await.expect("connect")
    }
}

impl Fixture for TestServer {
    async fn client(&self) -> Client {
        TestServer::client(self).await
    }

    fn url(&self) -> String {
        TestServer::url(self)
    }
}

/// A server whose sessions live `ttl`, a [`Proxy`] in front of it, and a client with that
/// TTL connected through the proxy.
async fn proxied(ttl: Duration) -> (TestServer, Proxy, Client) {
    let server = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(server.addr).await;
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options)
        .await
        .expect("connect through the proxy");
    (server, proxy, client)
}

/// A TCP proxy in front of the server that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    /// Where new connections go: [`Proxy::retarget`] stands in for a coordinator restart.
    upstream: Arc<std::sync::Mutex<SocketAddr>>,
    cut: watch::Sender<bool>,
    /// Connections forwarded to the server (refused ones not counted).
    forwarded: Arc<AtomicUsize>,
    /// Forwarded connections still open.
    open: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (cut, cut_rx) = watch::channel(false);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let count = forwarded.clone();
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let target = upstream.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let still_open = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    drop(down); // refused: the client sees EOF during its handshake
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut_rx.clone();
                let upstream = *target.lock().unwrap_or_else(|e| e.into_inner());
                let open = still_open.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = cut_rx.wait_for(|&cut| cut) => {}
                        }
                    }
                    // Both sockets are dropped here: the client and the server each see the
                    // connection end.
                    drop(down);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy {
            addr,
            upstream,
            cut,
            forwarded,
            open,
        }
    }

    /// Waits until every forwarded connection is closed (after a [`Proxy::cut`]: a restore
    /// right after it could otherwise come before a connection's task saw the cut).
    async fn wait_closed(&self) {
        let deadline = Instant::now() + PATIENCE;
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "connections still open after a cut"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends new connections to `upstream` from now on.
    fn retarget(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn restore(&self) {
        self.cut.send_replace(false);
    }

    fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

/// The blocking facade works from a plain thread, and its permits are released when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_facade_from_a_plain_thread() {
    let server = TestServer::default().await;
    let url = server.url();
    let name = "blocking";
    let (to_test, from_thread) = std::sync::mpsc::channel::<u64>();
    let (to_thread, from_test) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let client = blocking::Client::connect(&url).expect("blocking connect");
        let sem = client.semaphore(name, 1).expect("ensure");
        let permit = sem.acquire().expect("acquire");
        let token = permit.fencing_token();
        assert!(token >= 1);
        assert_eq!(permit.lost_reason(), None);
        assert!(sem.try_acquire().expect("try_acquire").is_none());
        let err = sem
            .acquire_timeout(Duration::from_millis(100))
            .expect_err("full");
        assert!(matches!(err, Error::TimedOut), "{err:?}");
        let st = client.status(Some(name)).expect("status");
        assert_eq!(st.semaphores[0].in_use, 1);
        assert_eq!(st.semaphores[0].holders[0].lease_id, permit.lease_id());
        permit.release().expect("release");
        let st = client.status(Some(name)).expect("status");
        assert_eq!(
            st.semaphores[0].in_use, 0,
            "release waited for the coordinator"
        );

        // Jobs, through the same facade.
        let blocking::JobStart::Run(attempt) =
            client.try_begin_job("b-job", Some("bg")).expect("begin")
        else {
            panic!("a new job runs");
        };
        assert!(attempt.fencing_token() >= 1 && attempt.lost_reason().is_none());
        assert!(matches!(
            client.try_begin_job("b-job", None).expect("begin"),
            blocking::JobStart::Running(_)
        ));
        attempt.succeed().expect("succeed");
        assert!(matches!(
            client.begin_job("b-job", None).expect("begin"),
            blocking::JobStart::Completed(_)
        ));
        let g = client.wait_group("bg", 1, None).expect("settled");
        assert_eq!((g.jobs, g.completed), (1, 1));
        assert!(client.reset_job("b-job").expect("reset"));

        let permit = sem
            .try_acquire()
            .expect("try_acquire")
            .expect("free after the release");
        assert!(permit.fencing_token() > token);
        to_test.send(permit.lease_id()).expect("tell the test");
        from_test.recv().expect("wait for the test");
        // Everything is dropped here, the permit first: it must be released promptly.
    });

    let lease = tokio::task::spawn_blocking(move || from_thread.recv())
        .await
        .expect("task")
        .expect("the thread acquired");
    let waiter_client = server.client().await;
    let st = status_of(&waiter_client, name).await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].lease_id, lease);
    let sem = waiter_client.semaphore(name, 1).await.expect("ensure");
    let waiter = tokio::spawn(async move { sem.acquire().await });
    wait_for_status(&waiter_client, name, "the waiter queued", |s| s.queued == 1).await;
    let dropped_at = Instant::now();
    to_thread.send(()).expect("tell the thread");
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("task")
        .expect("the blocking thread succeeded");
    let permit = timeout(PATIENCE, waiter)
        .await
        .expect("the waiter is granted")
        .expect("task")
        .expect("acquire");
    // The server's TTL is 10 s: a grant this early means the drop released the permit.
    assert!(
        dropped_at.elapsed() < Duration::from_secs(3),
        "granted only after {:?}",
        dropped_at.elapsed()
    );
    drop(permit);
}

#[path = "../../turnstile/tests/common/proxy.rs"]
mod fault_proxy;

/// What the coordinator does in a library deadline case.
#[derive(Clone, Copy, Debug)]
enum Away {
    /// Connections close and are refused (killed, host down).
    Gone,
    /// Connections stay open and nothing answers (a partition).
    Blackholed,
    /// Refusing before the call starts: the call is made while the client reconnects.
    Reconnecting,
}

/// How late after its deadline a call may return (issue 19: the deadline plus 0.5 s).
const OVERSHOOT: Duration = Duration::from_millis(500);

/// One case of [`waits_end_by_their_deadline_when_the_coordinator_is_away`]: a wait of 2 s
/// through a proxy, the proxy failing once the wait has reached the coordinator. Returns how
/// far past the deadline the call returned.
async fn deadline_case(server: &TestServer, i: usize, group: bool, away: Away) -> Duration {
    let limit = Duration::from_secs(2);
    let proxy = fault_proxy::FaultProxy::start(server.addr);
    let options = Options {
        session_ttl: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options)
        .await
        .expect("connect through the proxy");
    // Something to wait behind, held directly on the coordinator.
    let direct = server.client().await;
    let name = format!("deadline-{i}");
    let mut _running = None;
    let mut _holder = None;
    if group {
        match direct.try_begin_job(&format!("job-{i}"), Some(&name)).await {
            Ok(turnstile_client::JobStart::Run(a)) => _running = Some(a),
            other => panic!("the job runs: {other:?}"),
        }
    } else {
        let sem = direct.semaphore(&name, 1).await.expect("ensure");
        _holder = Some(sem.acquire().await.expect("the holder"));
    }
    let sem = client
        .semaphore(&name, 1)
        .await
        .expect("ensure via the proxy");
    if let Away::Reconnecting = away {
        proxy.refuse();
    }
    let sent = proxy.up_bytes();
    let started = Instant::now();
    let call = {
        let client = client.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if group {
                client.wait_group(&name, 1, Some(limit)).await.map(drop)
            } else {
                sem.acquire_timeout(limit).await.map(drop)
            }
        })
    };
    if !matches!(away, Away::Reconnecting) {
        // The wait reached the coordinator (its bytes passed the proxy), then the fault.
        let t = Instant::now();
        while proxy.up_bytes() == sent {
            assert!(t.elapsed() < PATIENCE, "the wait never went out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        match away {
            Away::Gone => proxy.gone(),
            Away::Blackholed => proxy.blackhole(),
            Away::Reconnecting => {}
        }
    }
    let r = timeout(limit + PATIENCE, call)
        .await
        .expect("the call returned at all")
        .expect("task");
    let took = started.elapsed();
    let what = format!(
        "{} with the coordinator {away:?}",
        if group {
            "wait_group"
        } else {
            "acquire_timeout"
        }
    );
    match r {
        Err(e) if e.is_unavailable() => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(
        took <= limit + OVERSHOOT,
        "{what}: returned {took:?} after a {limit:?} timeout"
    );
    eprintln!("{what}: returned after {took:?} (timeout {limit:?})");
    took.saturating_sub(limit)
}

/// Issue 19: `acquire_timeout` and `wait_group` with a timeout return `Error::Unavailable`
/// within the deadline (+0.5 s) when the coordinator is gone, blackholed, or refusing while
/// the client reconnects; all six cases run at once against one coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_end_by_their_deadline_when_the_coordinator_is_away() {
    let server = TestServer::with_ttl(Duration::from_secs(3)).await;
    let mut cases = Vec::new();
    for (i, (group, away)) in [false, true]
        .into_iter()
        .flat_map(|g| [Away::Gone, Away::Blackholed, Away::Reconnecting].map(|a| (g, a)))
        .enumerate()
    {
        cases.push(deadline_case(&server, i, group, away));
    }
    let overshoots = futures_join_all(cases).await;
    let worst = overshoots.iter().max().copied().unwrap_or_default();
    eprintln!("worst overshoot of a library deadline: {worst:?}");
}

/// Runs futures concurrently on this task (no extra dependency for `join_all`).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

/// Issue 19: a release that cannot be delivered is given up once the lease has surely
/// expired on the coordinator (last contact + TTL), with `Error::Unavailable`; and the first
/// connection is retried for `connect_timeout`, bounded, against a refusing and a
/// blackholing address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_and_first_connections_are_bounded() {
    let ttl = Duration::from_secs(3);
    let server = TestServer::with_ttl(ttl).await;
    let proxy = fault_proxy::FaultProxy::start(server.addr);
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options.clone())
        .await
        .expect("connect");
    let permit = client
        .semaphore("release-gone", 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    let gone_at = Instant::now();
    proxy.gone();
    let r = timeout(ttl + PATIENCE, permit.release())
        .await
        .expect("the release returned at all");
    let took = gone_at.elapsed();
    assert!(matches!(&r, Err(e) if e.is_unavailable()), "{r:?}");
    assert!(took <= ttl + OVERSHOOT, "the release took {took:?}");

    // First connections: refused, and accepted but never answered.
    for away in [Away::Gone, Away::Blackholed] {
        let proxy = fault_proxy::FaultProxy::start(server.addr);
        match away {
            Away::Gone => proxy.refuse(),
            _ => proxy.blackhole(),
        }
        let limit = Duration::from_millis(1500);
        let options = Options {
            connect_timeout: Some(limit),
            ..options.clone()
        };
        let started = Instant::now();
        let r = Client::connect_with(&proxy.url(), options).await;
        let took = started.elapsed();
        assert!(
            matches!(&r, Err(e) if e.is_unavailable()),
            "{away:?}: {r:?}"
        );
        assert!(
            took <= limit + OVERSHOOT,
            "{away:?}: connecting took {took:?}"
        );
        // A refused first connection is retried while the time lasts, not given up at once.
        if let Away::Gone = away {
            assert!(took >= limit / 2, "gave up after {took:?}");
        }
    }
}

/// A coordinator that comes back wanting a token this client does not have: the refusal
/// cannot change, so calls fail with it at once and the client stops reconnecting, instead of
/// hammering the coordinator until each call's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_on_reconnect_fails_calls_and_stops_retrying() {
    let ttl = Duration::from_secs(5);
    let (_open, proxy, client) = proxied(ttl).await;
    let guarded = TestServer::start(Config {
        session_ttl: ttl,
        auth_token: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    client.status(None).await.expect("status");
    proxy.cut();
    proxy.wait_closed().await;
    proxy.retarget(guarded.addr);
    proxy.restore();
    let started = Instant::now();
    let e = loop {
        // The first calls may still be answered "unavailable" while the reconnect is under way.
        match client.status(None).await {
            Err(Error::Rejected { code, message }) => break (code, message),
            Err(_) if started.elapsed() < PATIENCE => {}
            other => panic!("expected the refusal, got {other:?}"),
        }
    };
    assert_eq!(e.0, ErrorCode::Unauthorized, "{e:?}");
    assert!(e.1.contains("token"), "{e:?}");
    let attempts = proxy.forwarded();
    // Later calls fail at once, and no more connections are made.
    let again = Instant::now();
    assert!(matches!(
        client.status(None).await,
        Err(Error::Rejected { .. })
    ));
    assert!(again.elapsed() < Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(500)).await; // a window to count attempts in
    assert_eq!(proxy.forwarded(), attempts, "the client kept reconnecting");
}

/// A request too large for a frame fails at once with `TooLarge`, without costing the
/// connection (the coordinator would close it, and a reconnect would send it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_a_frame_fails_without_reconnecting() {
    let server = TestServer::default().await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(&proxy.url()).await.expect("connect");
    let name = "n".repeat(70_000);
    let started = Instant::now();
    match client.status(Some(&name)).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{e:?}"),
        Ok(doc) => panic!("a status for a 70 kB name answered: {doc:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    client
        .status(None)
        .await
        .expect("the connection is still good");
    assert_eq!(proxy.forwarded(), 1, "the client reconnected");
}

/// The signal from `Permit::lost_signal` outlives the permit, says a loss without polling,
/// and says `None` once the lease was released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_signal_reports_a_loss_and_ends_on_release() {
    let server = TestServer::default().await;
    let client = server.client().await;
    let sem = client.semaphore("signal", 1).await.expect("ensure");
    let permit = sem.acquire().await.expect("acquire");
    let signal = permit.lost_signal();
    assert!(!signal.is_lost());
    let waiter = tokio::spawn({
        let signal = signal.clone();
        async move { signal.wait().await }
    });
    permit.release().await.expect("release");
    let ended = timeout(PATIENCE, waiter)
        .await
        .expect("the wait ends")
        .expect("join");
    assert_eq!(ended, None, "a released lease is not lost");

    let permit = sem.acquire().await.expect("acquire again");
    let signal = permit.lost_signal();
    let waiter = tokio::spawn({
        let signal = signal.clone();
        async move { signal.wait().await }
    });
    client.close("signal").await.expect("close");
    let lost = timeout(PATIENCE, waiter)
        .await
        .expect("the loss arrives")
        .expect("join");
    assert_eq!(lost, Some(LostReason::Closed));
    assert!(signal.is_lost());
    drop(permit);
    assert_eq!(
        signal.reason(),
        Some(LostReason::Closed),
        "kept after the permit is gone"
    );
}
