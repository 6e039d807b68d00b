//! Integration tests of the client library against an in-process coordinator.
//!
//! Every test starts its own server with [`turnstile_server::run`] on a listener bound to
//! `127.0.0.1:0` and talks to it through the real TCP backend. The tests that need the network
//! to fail put a [`Proxy`] between the client and the server: a task that forwards bytes and
//! can be "cut" (every connection dropped, new ones refused) and restored.
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

/// A cut shorter than the TTL: the client resumes its session and keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_disconnection_keeps_the_lease() {
    let ttl = Duration::from_secs(2);
    let (server, proxy, client) = proxied(ttl).await;
    let observer = server.client().await;
    let name = "short-cut";
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let permit = sem.acquire().await.expect("acquire");
    let session = client.session_id();
    assert_eq!(proxy.forwarded(), 1);

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await; // the outage
    proxy.restore();

    // A request made now waits for the reconnection and goes out on the new connection.
    let st = timeout(PATIENCE, status_of(&client, name))
        .await
        .expect("the client reconnects");
    assert!(proxy.forwarded() >= 2, "the client never reconnected");
    assert_eq!(client.session_id(), session, "the session was resumed");
    assert_eq!(permit.lost_reason(), None, "the lease survived the outage");
    assert_eq!(st.in_use, 1);
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].lease_id, permit.lease_id());
    assert_eq!(st.holders[0].session, hex(session));
    assert_eq!(st.holders[0].token, permit.fencing_token());
    assert_eq!(st.expired_total, Some(0));

    permit.release().await.expect("release after the outage");
    let st = status_of(&observer, name).await;
    assert_eq!(
        (st.in_use, st.released_total, st.expired_total),
        (0, Some(1), Some(0))
    );
}

/// A client comes back to a coordinator that has its session but not its lease — what a
/// restarted coordinator whose log lost the grant's record looks like (the proxy moves the
/// client to a second server that has only the session). The client must learn it on
/// resuming: the permit reports itself lost, instead of being kept while another client is
/// granted the same permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_the_coordinator_forgot_is_reported_lost_on_resume() {
    let ttl = Duration::from_secs(5);
    let first = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(first.addr).await;
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options.clone())
        .await
        .expect("connect through the proxy");
    let name = "forgotten";
    let permit = client
        .semaphore(name, 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    let session = client.session_id();

    // The "restarted" coordinator: it knows the semaphore and the session, not the grant.
    let second = TestServer::with_ttl(ttl).await;
    let same_session = Options {
        session_id: Some(session),
        ..options
    };
    let restored = Client::connect_with(&second.url(), same_session)
        .await
        .expect("open the session on the second server");
    restored.semaphore(name, 1).await.expect("ensure");
    proxy.cut();
    proxy.wait_closed().await;
    proxy.retarget(second.addr);
    proxy.restore();

    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the permit is told it is lost once the client resumes its session");
    assert_eq!(reason, LostReason::Forgotten);
    assert_eq!(
        client.session_id(),
        session,
        "the session itself was resumed"
    );
    // The client goes on working on the new coordinator.
    let other = second.client().await;
    let taken = other.semaphore(name, 1).await.expect("ensure");
    let p2 = timeout(PATIENCE, taken.acquire())
        .await
        .expect("the permit is free")
        .expect("acquire");
    p2.release().await.expect("release");
    let again = timeout(PATIENCE, client.semaphore(name, 1))
        .await
        .expect("the client still works")
        .expect("ensure");
    let p3 = timeout(PATIENCE, again.acquire())
        .await
        .expect("acquire in time")
        .expect("acquire");
    p3.release().await.expect("release");
    drop(permit);
    let _ = restored.shutdown().await;
}

/// Holds `leases` of semaphore `name` (capacity `capacity`) on session `session` of the
/// server at `addr`, over a bare connection whose requests choose the lease ids, as a
/// coordinator restarted from a log that has those grants would. The connection is returned
/// (dropping it leaves the session and its leases until the TTL).
async fn hold_leases(
    addr: SocketAddr,
    session: u64,
    name: &str,
    capacity: u32,
    leases: &[u64],
) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use turnstile_proto::{self as proto, Request};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut out = Vec::new();
    let mut requests = vec![
        Request::Hello {
            magic: proto::MAGIC,
            version: proto::VERSION,
            client: "restored holder",
            token: "",
        },
        Request::OpenSession {
            session,
            ttl_ms: 5_000,
        },
        Request::Ensure { name, capacity },
    ];
    requests.extend(leases.iter().map(|&lease| Request::Acquire {
        lease,
        weight: 1,
        timeout_ms: 0,
        name,
    }));
    for (id, request) in requests.iter().enumerate() {
        proto::encode_request(id as u32 + 1, request, &mut out);
    }
    stream.write_all(&out).await.expect("send");
    // Every request is answered (the acquires with `Granted`) before the test goes on.
    let mut buf = Vec::new();
    let mut answered = 0;
    while answered < requests.len() {
        while let Some((payload, used)) =
            proto::split_frame(&buf, proto::MAX_REPLY_FRAME).expect("valid frames")
        {
            let (id, reply) = proto::decode_reply(payload).expect("valid reply");
            if id as usize > 3 {
                assert!(
                    matches!(reply, proto::Reply::Granted { .. }),
                    "acquire {id}: {reply:?}"
                );
            }
            answered += 1;
            buf.drain(..used);
        }
        if answered < requests.len() {
            let n = timeout(PATIENCE, stream.read_buf(&mut buf))
                .await
                .expect("answers in time")
                .expect("read");
            assert!(n > 0, "the server closed the connection");
        }
    }
    stream
}

/// The coordinator answers a release before its record is durable, so a crash can lose a
/// release the client heard answered: the restarted coordinator still counts the lease
/// held by the session. The client, resuming the session, lists its leases and releases
/// again the ones it handed out but no longer holds; a lease of another client of the
/// same session stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_coordinator_lost_is_made_again_on_resume() {
    let ttl = Duration::from_secs(5);
    let (_first, proxy, client) = proxied(ttl).await;
    let name = "lost-release";
    let sem = client.semaphore(name, 2).await.expect("ensure");
    let released = sem.acquire().await.expect("acquire");
    let lease = released.lease_id();
    released.release().await.expect("release");
    let session = client.session_id();

    // The "restarted" coordinator: its log kept the grant but lost the release. Lease 5 is
    // another client's of the same session (a supervised worker's, say).
    let second = TestServer::with_ttl(ttl).await;
    let other_lease = 5;
    let _holder = hold_leases(second.addr, session, name, 2, &[lease, other_lease]).await;
    proxy.cut();
    proxy.wait_closed().await;
    proxy.retarget(second.addr);
    proxy.restore();

    // Once released again, the slot is free for anyone; the other client's lease stays, so
    // exactly one slot of the two is free.
    let other = second.client().await;
    let taken = other.semaphore(name, 2).await.expect("ensure");
    let p = timeout(PATIENCE, taken.acquire())
        .await
        .expect("the lost release is made again once the client resumes")
        .expect("acquire");
    let status = status_of(&other, name).await;
    let holders: Vec<u64> = status.holders.iter().map(|h| h.lease_id).collect();
    assert!(
        holders.contains(&other_lease),
        "another client's lease of the session is left alone: {holders:?}"
    );
    assert!(!holders.contains(&lease), "{holders:?}");
    assert!(
        taken.try_acquire().await.expect("try").is_none(),
        "one slot was freed, not two"
    );
    p.release().await.expect("release");
    let _ = client.shutdown().await;
}

/// A semaphore closed while its holder is disconnected: the `LeaseLost` event went to no
/// connection, so the holder learns of it when it resumes and asks for its leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_while_disconnected_is_reported_on_resume() {
    let server = TestServer::with_ttl(Duration::from_secs(5)).await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(&proxy.url()).await.expect("connect");
    let observer = server.client().await;
    let name = "closed-away";
    let permit = client
        .semaphore(name, 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    // Once cut, nothing the server sends on the old connection reaches the client.
    proxy.cut();
    proxy.wait_closed().await;
    observer.close(name).await.expect("close");
    proxy.restore();
    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the permit is told it is lost once the client resumes its session");
    assert_eq!(reason, LostReason::Forgotten);
}

/// A cut longer than the TTL: the permit is lost before it is given away; the client recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_disconnection_loses_the_lease() {
    let ttl = Duration::from_millis(1500);
    let (server, proxy, client) = proxied(ttl).await;
    let other = server.client().await;
    let name = "long-cut";
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let sem_other = other.semaphore(name, 1).await.expect("ensure");
    let old_session = client.session_id();
    let permit = sem.acquire().await.expect("acquire");

    let waiter = tokio::spawn(async move {
        let permit = sem_other.acquire().await;
        (permit, Instant::now())
    });
    wait_for_status(&other, name, "the other client queued", |s| s.queued == 1).await;

    // Talk to the coordinator without refreshing the session (a status request) before the
    // first keep-alive is due at TTL/3. The client must not count that as proof that its
    // session is alive, or it would believe in its lease after the coordinator gave it away.
    tokio::time::sleep(ttl / 4).await;
    status_of(&client, name).await;
    proxy.cut();

    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the permit is reported lost");
    let lost_at = Instant::now();
    assert!(
        matches!(reason, LostReason::Unreachable | LostReason::Expired),
        "{reason:?}"
    );
    let (other_permit, granted_at) = timeout(PATIENCE, waiter)
        .await
        .expect("granted")
        .expect("task");
    let other_permit = other_permit.expect("the other client gets the slot");
    // The holder must give up no later than the coordinator hands the lease on (with slack for
    // scheduling on a loaded machine).
    assert!(
        lost_at <= granted_at + Duration::from_millis(200),
        "the permit was reported lost {:?} after another client was granted it",
        lost_at - granted_at
    );
    let st = status_of(&other, name).await;
    assert_eq!(st.expired_total, Some(1));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(other.session_id()));

    proxy.restore();
    other_permit.release().await.expect("release");
    // The client reconnects, finds its session gone, opens a new one and works again.
    let again = timeout(Duration::from_secs(15), sem.acquire())
        .await
        .expect("the client works again after the outage")
        .expect("acquire with a new session");
    assert_ne!(client.session_id(), old_session);
    assert_eq!(again.session_id(), client.session_id());
    let st = status_of(&other, name).await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(client.session_id()));
    assert!(again.fencing_token() > permit.fencing_token());
    again.release().await.expect("release");
}

/// A queued acquire survives a short cut and is granted exactly once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_acquire_survives_short_disconnection() {
    let ttl = Duration::from_secs(2);
    let (server, proxy, client) = proxied(ttl).await;
    let holder = server.client().await;
    let name = "queued-cut";
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let sem_holder = holder.semaphore(name, 1).await.expect("ensure");
    let held = sem_holder.acquire().await.expect("holder acquires");

    // Watch the semaphore for the whole test: it never holds more than its capacity.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let monitor = {
        let observer = server.client().await;
        tokio::spawn(async move {
            let mut max_in_use = 0;
            let mut max_holders = 0;
            loop {
                let st = status_of(&observer, name).await;
                max_in_use = max_in_use.max(st.in_use);
                max_holders = max_holders.max(st.holders.len());
                tokio::select! {
                    _ = stop_rx.wait_for(|&s| s) => return (max_in_use, max_holders),
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        })
    };

    let waiter = tokio::spawn(async move { sem.acquire().await });
    wait_for_status(&holder, name, "the client queued", |s| s.queued == 1).await;

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await; // the outage
    proxy.restore();
    timeout(PATIENCE, status_of(&client, name))
        .await
        .expect("the client reconnects");
    assert!(proxy.forwarded() >= 2, "the client never reconnected");
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (1, 1), "still queued once: {st:?}");

    held.release().await.expect("holder releases");
    let permit = timeout(PATIENCE, waiter)
        .await
        .expect("the queued acquire is granted")
        .expect("task")
        .expect("acquire");
    assert_eq!(permit.lost_reason(), None);
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (1, 0));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(client.session_id()));
    assert_eq!(st.holders[0].lease_id, permit.lease_id());
    assert_eq!(st.holders[0].token, permit.fencing_token());
    assert_eq!(
        st.acquired_total,
        Some(2),
        "the holder's grant and exactly one more"
    );

    stop_tx.send_replace(true);
    let (max_in_use, max_holders) = timeout(PATIENCE, monitor)
        .await
        .expect("monitor stops")
        .expect("monitor task");
    assert_eq!((max_in_use, max_holders), (1, 1));
    permit.release().await.expect("release");
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

/// One round of a caller sharing a client with many others: every reply it gets must be the
/// answer to its own request. It holds the whole of its own semaphore (capacity `weight`), so
/// its `try_acquire` must be refused and the status must show its lease with its weight; a
/// reply handed to the wrong caller shows as a grant where a refusal was due, a refusal where
/// a grant was, or another caller's lease. Tokens of its semaphore only go up.
async fn shared_round(
    sem: &turnstile_client::Semaphore,
    client: &Client,
    weight: u32,
    last: &mut u64,
) {
    let permit = sem.acquire_many(weight).await.expect("acquire");
    assert_eq!(permit.weight(), weight);
    assert!(permit.fencing_token() > *last, "tokens go up per semaphore");
    *last = permit.fencing_token();
    loop {
        match sem.try_acquire().await {
            Ok(None) => break,
            Ok(Some(p)) => panic!(
                "granted lease {} on a full semaphore: a reply went to the wrong caller",
                p.lease_id()
            ),
            // While the link is cut, a call that does not wait says the coordinator is away.
            Err(e) if e.is_unavailable() => continue,
            Err(e) => panic!("try_acquire: {e}"),
        }
    }
    let st = status_of(client, sem.name()).await;
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].lease_id, permit.lease_id());
    assert_eq!(st.holders[0].weight, weight);
    assert_eq!(st.holders[0].token, permit.fencing_token());
    assert_eq!(permit.lost_reason(), None);
    permit.release().await.expect("release");
}

/// 64 tasks share one client, and the link is cut while their requests are in flight: each
/// still gets exactly the answers to its own requests (re-sent after the reconnect under
/// their ids), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_on_one_client_each_get_their_own_replies_across_a_reconnect() {
    const TASKS: usize = 64;
    const ROUNDS: usize = 12;
    let ttl = Duration::from_secs(5);
    let (_server, proxy, client) = proxied(ttl).await;
    let progress = Arc::new(AtomicUsize::new(0));
    let (go_on, _) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let client = client.clone();
        let progress = progress.clone();
        let mut go_on = go_on.subscribe();
        tasks.spawn(async move {
            let weight = (i % 3) as u32 + 1;
            let sem = client
                .semaphore(&format!("shared-{i}"), weight)
                .await
                .expect("ensure");
            let mut last = 0;
            for round in 0..ROUNDS {
                if round == ROUNDS / 2 {
                    // Half the rounds before the cut; the rest keep going through it.
                    progress.fetch_add(1, Ordering::SeqCst);
                    let _ = go_on.wait_for(|&go| go).await;
                }
                shared_round(&sem, &client, weight, &mut last).await;
            }
        });
    }
    let deadline = Instant::now() + PATIENCE;
    while progress.load(Ordering::SeqCst) < TASKS {
        assert!(
            Instant::now() < deadline,
            "the callers did not get half-way"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let every caller loose and cut the link while their requests are on their way.
    go_on.send_replace(true);
    tokio::task::yield_now().await;
    proxy.cut();
    proxy.wait_closed().await;
    proxy.restore();
    while let Some(r) = timeout(PATIENCE * 3, tasks.join_next())
        .await
        .expect("the callers finish")
    {
        r.expect("a caller failed");
    }
    assert!(proxy.forwarded() >= 2, "the link was never re-made");
    client.shutdown().await.expect("shutdown");
}

/// Threads share one blocking client: each gets the answers to its own requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_sharing_a_blocking_client_each_get_their_own_replies() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 30;
    let server = TestServer::default().await;
    let url = server.url();
    let joined = tokio::task::spawn_blocking(move || {
        let client = Arc::new(blocking::Client::connect(&url).expect("blocking connect"));
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let client = client.clone();
                std::thread::spawn(move || {
                    let weight = (i % 3) as u32 + 1;
                    let name = format!("threads-{i}");
                    let sem = client.semaphore(&name, weight).expect("ensure");
                    let mut last = 0;
                    for _ in 0..ROUNDS {
                        let permit = sem.acquire_many(weight).expect("acquire");
                        assert!(permit.fencing_token() > last);
                        last = permit.fencing_token();
                        assert!(
                            sem.try_acquire().expect("try_acquire").is_none(),
                            "granted on a full semaphore: a reply went to the wrong thread"
                        );
                        let st = client.status(Some(&name)).expect("status");
                        let holders = &st.semaphores[0].holders;
                        assert_eq!(holders.len(), 1);
                        assert_eq!(holders[0].lease_id, permit.lease_id());
                        assert_eq!(holders[0].weight, weight);
                        permit.release().expect("release");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a thread failed");
        }
    });
    timeout(PATIENCE * 3, joined)
        .await
        .expect("the threads finish")
        .expect("the threads succeed");
}

/// Threads share one blocking client (each call writes its own request on its own thread),
/// and the link is cut while their requests are in flight: each thread still gets exactly
/// the answers to its own requests, re-sent after the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_sharing_a_blocking_client_get_their_own_replies_across_a_reconnect() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 40;
    let ttl = Duration::from_secs(5);
    let server = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(server.addr).await;
    let url = proxy.url();
    let (halfway_tx, mut halfway_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let joined = tokio::task::spawn_blocking(move || {
        let options = Options {
            session_ttl: Some(ttl),
            ..Default::default()
        };
        let client =
            Arc::new(blocking::Client::connect_with(&url, options).expect("blocking connect"));
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let client = client.clone();
                let halfway = halfway_tx.clone();
                std::thread::spawn(move || {
                    let weight = (i % 3) as u32 + 1;
                    let name = format!("threads-cut-{i}");
                    let sem = client.semaphore(&name, weight).expect("ensure");
                    let mut last = 0;
                    for round in 0..ROUNDS {
                        if round == ROUNDS / 4 {
                            let _ = halfway.send(());
                        }
                        let permit = sem.acquire_many(weight).expect("acquire");
                        assert!(permit.fencing_token() > last, "tokens go up");
                        last = permit.fencing_token();
                        loop {
                            match sem.try_acquire() {
                                Ok(None) => break,
                                Ok(Some(p)) => panic!(
                                    "granted lease {} on a full semaphore: a reply went to \
                                     the wrong thread",
                                    p.lease_id()
                                ),
                                Err(e) if e.is_unavailable() => continue,
                                Err(e) => panic!("try_acquire: {e}"),
                            }
                        }
                        let st = loop {
                            match client.status(Some(&name)) {
                                Ok(st) => break st,
                                Err(e) if e.is_unavailable() => continue,
                                Err(e) => panic!("status: {e}"),
                            }
                        };
                        let holders = &st.semaphores[0].holders;
                        assert_eq!(holders.len(), 1, "{st:?}");
                        assert_eq!(holders[0].lease_id, permit.lease_id());
                        assert_eq!(holders[0].weight, weight);
                        assert_eq!(permit.lost_reason(), None);
                        permit.release().expect("release");
                    }
                })
            })
            .collect();
        drop(halfway_tx);
        for t in threads {
            t.join().expect("a thread failed");
        }
    });
    // Once every thread is a quarter of the way, cut the link under their feet.
    for _ in 0..THREADS {
        timeout(PATIENCE, halfway_rx.recv())
            .await
            .expect("the threads get going");
    }
    proxy.cut();
    proxy.wait_closed().await;
    proxy.restore();
    timeout(PATIENCE * 3, joined)
        .await
        .expect("the threads finish")
        .expect("the threads succeed");
    assert!(proxy.forwarded() >= 2, "the link was never re-made");
}

/// Callers whose futures are dropped at every stage of a request (before, during and after
/// its write, while it waits) leave the shared connection usable: the callers that follow
/// get their own answers, and the withdrawn acquires leave no lease behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_leave_the_connection_usable() {
    const TASKS: usize = 32;
    let server = TestServer::default().await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(&proxy.url()).await.expect("connect");
    let busy = client.semaphore("cancel-busy", 1).await.expect("ensure");
    let blocker = busy.acquire().await.expect("the blocker acquires");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let client = client.clone();
        tasks.spawn(async move {
            let busy = client.semaphore("cancel-busy", 1).await.expect("ensure");
            let own = client
                .semaphore(&format!("cancel-{i}"), 1)
                .await
                .expect("ensure");
            for k in 0..20u64 {
                // Dropped at a point that moves through the request's life.
                let cut_after = Duration::from_micros((i as u64 * 7 + k * 37) % 400);
                let _ = timeout(cut_after, busy.acquire()).await;
                let _ = timeout(cut_after, own.acquire()).await;
                let _ = timeout(cut_after, client.status(None)).await;
            }
            let mut last = 0;
            shared_round(&own, &client, 1, &mut last).await;
        });
    }
    while let Some(r) = timeout(PATIENCE * 3, tasks.join_next())
        .await
        .expect("the callers finish")
    {
        r.expect("a caller failed");
    }
    assert_eq!(proxy.forwarded(), 1, "a cancelled caller broke the link");
    blocker.release().await.expect("release");
    // Every withdrawn acquire was taken back: the semaphores end empty, with no waiter.
    let holder = server.client().await;
    wait_for_status(&holder, "cancel-busy", "withdrawn waits gone", |s| {
        s.in_use == 0 && s.queued == 0
    })
    .await;
    for i in 0..TASKS {
        wait_for_status(
            &holder,
            &format!("cancel-{i}"),
            "withdrawn grants gone",
            |s| s.in_use == 0,
        )
        .await;
    }
    client.shutdown().await.expect("shutdown");
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
