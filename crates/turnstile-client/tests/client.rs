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
use turnstile_client::{blocking, Client, Error, ErrorCode, LostReason, Options, SemaphoreStatus};
use turnstile_server::Config;

/// How long any single awaited event may take before the test fails: generous, for a loaded
/// two-core machine.
const PATIENCE: Duration = Duration::from_secs(10);

/// A short wait that proves something does *not* happen (an acquire stays pending).
const QUIET: Duration = Duration::from_millis(300);

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

/// A TCP proxy in front of the server that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    /// Connections forwarded to the server (refused ones not counted).
    forwarded: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (cut, cut_rx) = watch::channel(false);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let count = forwarded.clone();
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
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut_rx.wait_for(|&cut| cut) => {}
                    }
                    // Both sockets are dropped here: the client and the server each see the
                    // connection end.
                });
            }
        });
        Proxy {
            addr,
            cut,
            forwarded,
        }
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

/// The status of one semaphore.
async fn status_of(client: &Client, name: &str) -> SemaphoreStatus {
    let doc = client.status(Some(name)).await.expect("status");
    doc.semaphores
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("semaphore {name:?} missing from the status"))
}

/// Polls the status of `name` until `pred` holds; fails after [`PATIENCE`].
async fn wait_for_status(
    client: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&SemaphoreStatus) -> bool,
) -> SemaphoreStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = status_of(client, name).await;
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A session id as the status document prints it.
fn hex(session: u64) -> String {
    format!("{session:016x}")
}

/// Every decimal number in a message.
fn numbers_in(message: &str) -> Vec<u64> {
    message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Acquire and release, increasing tokens, try-acquire, acquire timeout, capacity mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_basics() {
    let server = TestServer::default().await;
    let client = server.client().await;
    let sem = client.semaphore("basics", 2).await.expect("ensure");
    assert_eq!(sem.name(), "basics");

    let p1 = sem.acquire().await.expect("first permit");
    let p2 = sem.acquire().await.expect("second permit");
    assert!(p1.fencing_token() >= 1);
    assert!(p2.fencing_token() > p1.fencing_token());
    assert_ne!(p1.lease_id(), p2.lease_id());
    assert_eq!((p1.weight(), p1.semaphore()), (1, "basics"));
    assert_eq!(p1.session_id(), client.session_id());

    // Full: try_acquire declines at once, acquire_timeout waits out its timeout.
    assert!(sem.try_acquire().await.expect("try_acquire").is_none());
    let started = Instant::now();
    let err = sem
        .acquire_timeout(Duration::from_millis(200))
        .await
        .expect_err("full semaphore");
    assert!(matches!(err, Error::TimedOut), "{err:?}");
    assert_eq!(err.code(), Some(ErrorCode::TimedOut));
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "timed out after only {:?}",
        started.elapsed()
    );

    let st = status_of(&client, "basics").await;
    assert_eq!((st.capacity, st.in_use, st.queued), (2, 2, 0));
    assert_eq!(st.timed_out_total, 1);
    let mut leases: Vec<u64> = st.holders.iter().map(|h| h.lease_id).collect();
    leases.sort_unstable();
    let mut expected = vec![p1.lease_id(), p2.lease_id()];
    expected.sort_unstable();
    assert_eq!(leases, expected);
    assert!(st
        .holders
        .iter()
        .all(|h| h.session == hex(client.session_id())));

    // A release frees a permit; the next grant gets a larger token still.
    let t2 = p2.fencing_token();
    p1.release().await.expect("release");
    let p3 = sem
        .try_acquire()
        .await
        .expect("try_acquire")
        .expect("a permit is free after the release");
    assert!(p3.fencing_token() > t2);
    drop(p2);
    drop(p3);
    wait_for_status(&client, "basics", "both drops processed", |s| s.in_use == 0).await;

    // The same name with another capacity is refused, naming both capacities.
    let err = client
        .semaphore("basics", 5)
        .await
        .expect_err("capacity mismatch");
    assert_eq!(err.code(), Some(ErrorCode::CapacityMismatch), "{err:?}");
    let numbers = numbers_in(&err.to_string());
    assert!(
        numbers.contains(&2) && numbers.contains(&5),
        "the message should name both capacities: {err}"
    );

    // A weight above the capacity can never be granted and is refused.
    let err = sem
        .acquire_many(3)
        .await
        .expect_err("weight 3 > capacity 2");
    assert_eq!(
        err.code(),
        Some(ErrorCode::WeightExceedsCapacity),
        "{err:?}"
    );
}

/// The queue is FIFO with weights: a heavy head waiter holds back a lighter one that would fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_with_weights() {
    let server = TestServer::default().await;
    let (holder, heavy, light) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "fifo";
    let sem_h = holder.semaphore(name, 3).await.expect("ensure");
    let sem_3 = heavy.semaphore(name, 3).await.expect("ensure");
    let sem_1 = light.semaphore(name, 3).await.expect("ensure");

    let held = sem_h.acquire_many(2).await.expect("holder takes 2 of 3");
    let mut heavy_acq = tokio::spawn(async move { sem_3.acquire_many(3).await });
    wait_for_status(&holder, name, "the heavy waiter queued", |s| s.queued == 1).await;
    let mut light_acq = tokio::spawn(async move { sem_1.acquire().await });
    let st = wait_for_status(&holder, name, "the light waiter queued", |s| s.queued == 2).await;
    // One permit is free, but the light waiter is behind the heavy one.
    assert_eq!((st.in_use, st.queued_weight), (2, 4));
    assert!(
        timeout(QUIET, &mut light_acq).await.is_err(),
        "the light acquire overtook the heavy head of the queue"
    );

    held.release().await.expect("release the holder");
    let heavy_permit = timeout(PATIENCE, &mut heavy_acq)
        .await
        .expect("heavy granted after the holder released")
        .expect("task")
        .expect("heavy acquire");
    assert_eq!(heavy_permit.weight(), 3);
    // The heavy one holds everything: the light one still waits.
    assert!(
        timeout(QUIET, &mut light_acq).await.is_err(),
        "the light acquire was granted while the heavy one held all permits"
    );
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (3, 1));

    let heavy_token = heavy_permit.fencing_token();
    heavy_permit.release().await.expect("release heavy");
    let light_permit = timeout(PATIENCE, &mut light_acq)
        .await
        .expect("light granted after the heavy one released")
        .expect("task")
        .expect("light acquire");
    assert!(light_permit.fencing_token() > heavy_token);
    let st = status_of(&holder, name).await;
    assert_eq!((st.in_use, st.queued), (1, 0));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(light.session_id()));
}

/// Dropping a permit releases it to a waiter; `Permit::release` returns once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_permit_releases_it() {
    let server = TestServer::default().await;
    let (a, b) = (server.client().await, server.client().await);
    let name = "drop";
    let sem_a = a.semaphore(name, 1).await.expect("ensure");
    let sem_b = b.semaphore(name, 1).await.expect("ensure");

    let permit = sem_a.acquire().await.expect("a acquires");
    let waiter = tokio::spawn(async move { sem_b.acquire().await });
    wait_for_status(&a, name, "b queued", |s| s.queued == 1).await;

    drop(permit);
    let permit_b = timeout(PATIENCE, waiter)
        .await
        .expect("the dropped permit went to the waiter")
        .expect("task")
        .expect("b acquires");
    let st = status_of(&a, name).await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(b.session_id()));
    assert_eq!(st.released_total, 1);

    // `release` waits for the coordinator: the very next status shows the permit free.
    permit_b.release().await.expect("release");
    let st = status_of(&b, name).await;
    assert_eq!((st.in_use, st.released_total), (0, 2), "{st:?}");
    assert!(st.holders.is_empty());
}

/// A dropped acquire future, queued or racing with its grant, never leaks a permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_acquire_does_not_leak() {
    let server = TestServer::default().await;
    let (a, b, c) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "cancel";
    let sem_a = a.semaphore(name, 1).await.expect("ensure");
    let sem_b = b.semaphore(name, 1).await.expect("ensure");
    let sem_c = c.semaphore(name, 1).await.expect("ensure");

    // 1. Dropped while queued on the coordinator.
    let held = sem_a.acquire().await.expect("a holds");
    {
        let acquire = sem_b.acquire();
        tokio::pin!(acquire);
        tokio::select! {
            r = &mut acquire => panic!("b was granted a held permit: {r:?}"),
            _ = wait_for_status(&a, name, "b queued", |s| s.queued == 1) => {}
        }
        // `acquire` is dropped here, while queued.
    }
    wait_for_status(&a, name, "the withdrawal processed", |s| s.queued == 0).await;
    held.release().await.expect("a releases");
    let permit_c = timeout(PATIENCE, sem_c.acquire())
        .await
        .expect("c is not blocked by a leaked permit")
        .expect("c acquires");
    let st = status_of(&c, name).await;
    assert_eq!((st.in_use, st.queued), (1, 0));
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session, hex(c.session_id()));
    assert_eq!(st.holders[0].lease_id, permit_c.lease_id());
    permit_c.release().await.expect("c releases");

    // 2. Dropped at every moment around its grant: a releases in the background while b's
    //    acquire is cut short after a varying delay, so some grants land after the drop.
    for i in 0..30u64 {
        let held = timeout(PATIENCE, sem_a.acquire())
            .await
            .unwrap_or_else(|_| panic!("iteration {i}: a blocked by a leaked permit"))
            .expect("a acquires");
        let raced = timeout(Duration::from_micros(i * 150), async {
            drop(held);
            sem_b.acquire().await
        })
        .await;
        if let Ok(result) = raced {
            drop(result.expect("b acquires"));
        }
    }
    let st = wait_for_status(&a, name, "every lease released", |s| {
        s.in_use == 0 && s.queued == 0
    })
    .await;
    assert!(st.holders.is_empty());
    let permit_c = sem_c
        .try_acquire()
        .await
        .expect("try_acquire")
        .expect("nothing leaked: the permit is free");
    drop(permit_c);
}

/// Closing a semaphore tells its holders their lease is lost and fails its waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_lost_lease_and_fails_waiters() {
    let server = TestServer::default().await;
    let (holder, waiter, closer) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "closing";
    let sem_h = holder.semaphore(name, 1).await.expect("ensure");
    let sem_w = waiter.semaphore(name, 1).await.expect("ensure");

    let permit = sem_h.acquire().await.expect("acquire");
    assert_eq!(permit.lost_reason(), None);
    let queued = tokio::spawn(async move { sem_w.acquire().await });
    wait_for_status(&closer, name, "the waiter queued", |s| s.queued == 1).await;

    closer.close(name).await.expect("close");
    let reason = timeout(PATIENCE, permit.lost())
        .await
        .expect("the holder hears that its lease is gone");
    assert_eq!(reason, LostReason::Closed);
    assert_eq!(permit.lost_reason(), Some(LostReason::Closed));
    let err = timeout(PATIENCE, queued)
        .await
        .expect("the waiter is answered")
        .expect("task")
        .expect_err("the waiter fails");
    assert_eq!(err.code(), Some(ErrorCode::Closed), "{err:?}");

    let st = status_of(&closer, name).await;
    assert!(st.closed);
    assert_eq!((st.in_use, st.queued, st.lost_total), (0, 0, 1));
    // Releasing a lost permit is not an error, and later acquires fail the same way.
    permit.release().await.expect("releasing a lost permit");
    let err = sem_h
        .acquire()
        .await
        .expect_err("acquire on a closed semaphore");
    assert_eq!(err.code(), Some(ErrorCode::Closed));
}

/// A cut shorter than the TTL: the client resumes its session and keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_disconnection_keeps_the_lease() {
    let ttl = Duration::from_secs(2);
    let server = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(server.addr).await;
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options)
        .await
        .expect("connect through the proxy");
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
    assert_eq!(st.expired_total, 0);

    permit.release().await.expect("release after the outage");
    let st = status_of(&observer, name).await;
    assert_eq!((st.in_use, st.released_total, st.expired_total), (0, 1, 0));
}

/// A cut longer than the TTL: the permit is lost before it is given away; the client recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_disconnection_loses_the_lease() {
    let ttl = Duration::from_millis(1500);
    let server = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(server.addr).await;
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options)
        .await
        .expect("connect through the proxy");
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
    assert_eq!(st.expired_total, 1);
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
    let server = TestServer::with_ttl(ttl).await;
    let proxy = Proxy::start(server.addr).await;
    let options = Options {
        session_ttl: Some(ttl),
        ..Default::default()
    };
    let client = Client::connect_with(&proxy.url(), options)
        .await
        .expect("connect through the proxy");
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
        st.acquired_total, 2,
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

/// `Client::shutdown` ends the session and frees every lease at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_every_lease() {
    let server = TestServer::default().await; // session TTL 10 s
    let (leaver, waiter) = (server.client().await, server.client().await);
    let sem_a = leaver.semaphore("shut-a", 1).await.expect("ensure a");
    let sem_b = leaver.semaphore("shut-b", 2).await.expect("ensure b");
    let pa = sem_a.acquire().await.expect("acquire a");
    let pb = sem_b.acquire_many(2).await.expect("acquire b");

    let wa = waiter.semaphore("shut-a", 1).await.expect("ensure a");
    let wb = waiter.semaphore("shut-b", 2).await.expect("ensure b");
    let wait_a = tokio::spawn(async move { wa.acquire().await });
    let wait_b = tokio::spawn(async move { wb.acquire_many(2).await });
    wait_for_status(&waiter, "shut-a", "waiter queued on a", |s| s.queued == 1).await;
    wait_for_status(&waiter, "shut-b", "waiter queued on b", |s| s.queued == 1).await;

    let started = Instant::now();
    leaver.shutdown().await.expect("shutdown");
    let ga = timeout(PATIENCE, wait_a)
        .await
        .expect("a granted")
        .expect("task");
    let gb = timeout(PATIENCE, wait_b)
        .await
        .expect("b granted")
        .expect("task");
    let (ga, gb) = (ga.expect("acquire a"), gb.expect("acquire b"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the leases were freed only after {:?}, as if by expiry",
        started.elapsed()
    );
    for name in ["shut-a", "shut-b"] {
        let st = status_of(&waiter, name).await;
        assert_eq!(st.holders.len(), 1);
        assert_eq!(st.holders[0].session, hex(waiter.session_id()));
        assert_eq!(st.expired_total, 0, "released, not expired");
    }
    // The shut-down client refuses further work; dropping its permits is harmless.
    assert!(matches!(leaver.status(None).await, Err(Error::Shutdown)));
    drop((pa, pb, ga, gb));
}
