use super::*;

/// An in-process coordinator on a free port: its address.
async fn coordinator() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = turnstile_server::run(
            listener,
            turnstile_server::Config::default(),
            std::future::pending::<()>(),
        )
        .await;
    });
    addr.to_string()
}

/// A client of the coordinator at `addr`, with its `Health`.
async fn client_of(addr: &str) -> (crate::Client, Arc<Health>) {
    let backend = TcpBackend::connect(addr.to_owned(), None, Options::default())
        .await
        .expect("connect");
    let health = backend.health.clone();
    (crate::Client::from_backend(Arc::new(backend)), health)
}

/// An in-process coordinator on a free port, and a client of it with its `Health`.
async fn client() -> (crate::Client, Arc<Health>) {
    client_of(&coordinator().await).await
}

/// A fake coordinator on `listener`, for tests that need answers the real one never gives
/// (or none at all): it reads whole frames, calls `answer` with each request (its id, the
/// request, and the buffer of replies to write), and writes what that buffer holds after
/// each read. It stops when the client goes.
async fn fake_coordinator(
    listener: tokio::net::TcpListener,
    answer: impl FnMut(u32, proto::Request<'_>, &mut Vec<u8>) + Send + 'static,
) {
    let (_push, pushes) = mpsc::unbounded_channel();
    fake_coordinator_pushing(listener, answer, pushes).await;
}

/// [`fake_coordinator`], which also writes the bytes the test sends on `pushes` when they
/// come: an event, or an answer it held back.
async fn fake_coordinator_pushing(
    listener: tokio::net::TcpListener,
    mut answer: impl FnMut(u32, proto::Request<'_>, &mut Vec<u8>) + Send + 'static,
    mut pushes: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let (mut s, _) = listener.accept().await.expect("accept");
    let mut buf = Vec::new();
    let mut pushing = true;
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            bytes = pushes.recv(), if pushing => {
                match bytes {
                    Some(bytes) if s.write_all(&bytes).await.is_err() => return,
                    Some(_) => {}
                    None => pushing = false,
                }
                continue;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        while let Some((payload, used)) = split_frame(&buf, MAX_REPLY_FRAME).expect("a frame") {
            let (id, req) = proto::decode_request(payload).expect("a request");
            answer(id, req, &mut out);
            buf.drain(..used);
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The answers a fake coordinator gives to a client's handshake (`Hello`, then the
/// session's request), or `None` for another request.
fn handshake_answer(id: u32, req: &proto::Request<'_>, out: &mut Vec<u8>) -> Option<()> {
    let reply = match req {
        proto::Request::Hello { .. } => proto::Reply::HelloOk {
            version: proto::VERSION,
            default_ttl_ms: 10_000,
            server: "fake",
        },
        proto::Request::OpenSession { .. } => proto::Reply::SessionOpened {
            ttl_ms: 60_000,
            existed: false,
        },
        _ => return None,
    };
    proto::encode_reply(id, &reply, out);
    Some(())
}

/// A fake coordinator that grants every acquire (token 7) and answers every other request
/// but releases, which it only reports: its address, and the leases released.
async fn coordinator_deaf_to_releases() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<u64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (released_tx, released_rx) = mpsc::unbounded_channel();
    tokio::spawn(fake_coordinator(listener, move |id, req, out| {
        if handshake_answer(id, &req, out).is_some() {
            return;
        }
        match req {
            proto::Request::Acquire { .. } => {
                proto::encode_reply(id, &proto::Reply::Granted { token: 7 }, out)
            }
            proto::Request::Release { lease } => {
                let _ = released_tx.send(lease); // and no answer, ever
            }
            _ => proto::encode_reply(id, &proto::Reply::Done, out),
        }
    }));
    (addr, released_rx)
}

/// `send_release` returns once the release is written, without its answer: against a
/// coordinator that never answers releases, it still returns, and the release arrives.
#[tokio::test]
async fn send_release_returns_without_waiting_for_the_answer() {
    let (addr, mut released_rx) = coordinator_deaf_to_releases().await;
    let backend = TcpBackend::connect(addr.to_string(), None, Options::default())
        .await
        .expect("connect");
    let client = crate::Client::from_backend(Arc::new(backend));
    let sem = client.semaphore("unanswered", 1).await.expect("ensure");
    let permit = sem.acquire().await.expect("acquire");
    let lease = permit.lease_id();
    tokio::time::timeout(Duration::from_secs(10), permit.send_release())
        .await
        .expect("send_release does not wait for an answer")
        .expect("sent");
    let seen = tokio::time::timeout(Duration::from_secs(10), released_rx.recv())
        .await
        .expect("the release reached the coordinator");
    assert_eq!(seen, Some(lease));
}

/// Against the real coordinator: a loop of acquire and `send_release` on a capacity-1
/// semaphore is granted every time (each release is handled before the next acquire,
/// which follows it on the connection), another client queued behind gets the slot, and
/// once a later request is answered the coordinator holds none of the released leases.
#[tokio::test]
async fn send_release_frees_the_slot_before_the_next_request() {
    let addr = coordinator().await;
    let (a, _) = client_of(&addr).await;
    let sem = a.semaphore("pipelined", 1).await.expect("ensure");
    for _ in 0..50 {
        let permit = tokio::time::timeout(Duration::from_secs(10), sem.acquire())
            .await
            .expect("granted, not queued behind its own released lease")
            .expect("acquire");
        permit.send_release().await.expect("sent");
    }
    // Another client waits behind a held permit, which is then released unconfirmed.
    let held = sem.acquire().await.expect("acquire");
    let (b, _) = client_of(&addr).await;
    let b_sem = b.semaphore("pipelined", 1).await.expect("ensure b");
    let waiting = tokio::spawn(async move { b_sem.acquire().await.map(drop) });
    while a
        .status(Some("pipelined"))
        .await
        .expect("status")
        .semaphores[0]
        .queued
        == 0
    {
        tokio::task::yield_now().await;
    }
    held.send_release().await.expect("sent");
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter got the slot")
        .expect("join")
        .expect("acquire b");
    b.shutdown().await.expect("shutdown b");
    let status = a.status(Some("pipelined")).await.expect("status");
    let sem = &status.semaphores[0];
    assert_eq!(
        (sem.in_use, sem.holders.len()),
        (0, 0),
        "a released lease is still held"
    );
    a.shutdown().await.expect("shutdown");
}

/// Callers that loop on one client keep sharing writes, on tokio's multi-thread scheduler
/// too: there a task woken by the running one runs next (its "LIFO slot"), so without the
/// driver's yield each caller's request woke the driver and went out alone as soon as the
/// caller paused; now the driver lets the callers its answers woke queue theirs first.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn looping_callers_share_writes() {
    const CALLERS: usize = 16;
    const PAIRS: usize = 25;
    let (client, health) = client().await;
    let mut sems = Vec::new();
    for i in 0..CALLERS {
        sems.push(
            client
                .semaphore(&format!("l-{i}"), 1)
                .await
                .expect("ensure"),
        );
    }
    let before = health.writes.load(Ordering::Relaxed);
    let own_before = health.own_writes.load(Ordering::Relaxed);
    let loops: Vec<_> = sems
        .into_iter()
        .map(|sem| {
            tokio::spawn(async move {
                for _ in 0..PAIRS {
                    let permit = sem.acquire().await.expect("acquire");
                    permit.release().await.expect("release");
                }
            })
        })
        .collect();
    for l in loops {
        l.await.expect("join");
    }
    let writes = health.writes.load(Ordering::Relaxed) - before;
    let own = health.own_writes.load(Ordering::Relaxed) - own_before;
    let requests = CALLERS * PAIRS * 2;
    assert!(
        writes * 4 <= requests as u64,
        "{requests} requests of {CALLERS} looping callers took {writes} writes"
    );
    // Callers woken together leave their requests to the driver (`Shared::crowd`): with
    // the first of each crowd writing its own, half the writes (50 of 109) were callers'.
    assert!(
        own * 10 <= writes,
        "{own} of {writes} writes were callers' own, among {CALLERS} looping callers"
    );
    client.shutdown().await.expect("shutdown");
}

/// Requests queued by many callers while the driver was busy go out in one write, and
/// each caller gets its own answer: half of them ask for what their semaphore has
/// (granted), half for more than its capacity (refused at once).
#[tokio::test]
async fn queued_requests_share_one_write() {
    const CALLERS: usize = 64;
    let (client, health) = client().await;
    let mut sems = Vec::new();
    for i in 0..CALLERS {
        sems.push(
            client
                .semaphore(&format!("w-{i}"), 2)
                .await
                .expect("ensure"),
        );
    }
    let before = health.writes.load(Ordering::Relaxed);
    // On this one-thread runtime, every caller queues its request before the driver runs;
    // the first finds the client idle and writes its own.
    let calls: Vec<_> = sems
        .into_iter()
        .enumerate()
        .map(|(i, sem)| {
            let weight = if i % 2 == 0 { 2 } else { 3 };
            tokio::spawn(async move { (i, sem.acquire_many(weight).await) })
        })
        .collect();
    let mut granted = Vec::new();
    for call in calls {
        let (i, answer) = call.await.expect("join");
        match answer {
            Ok(permit) => {
                assert_eq!(i % 2, 0, "caller {i} got another's grant");
                granted.push(permit);
            }
            Err(e) => assert!(
                i % 2 == 1 && e.code().is_some(),
                "caller {i} got another's refusal: {e}"
            ),
        }
    }
    let writes = health.writes.load(Ordering::Relaxed) - before;
    assert_eq!(granted.len(), CALLERS / 2);
    // The first caller's own write, and one for the other 63 (a refused acquire leaves
    // nothing to withdraw).
    assert!(
        writes <= 2,
        "{CALLERS} queued requests took {writes} writes instead of two"
    );
    drop(granted);
    client.shutdown().await.expect("shutdown");
}

/// A coordinator may tell a session's end as an event before its answer to the session
/// request (a client stopped past its TTL re-opens its id just as the sweep catches up).
/// The connection still comes up, and the driver handles the event as on any link: a
/// fresh session is opened. (Before, the handshake failed with "unexpected reply".)
#[tokio::test]
async fn a_session_lost_during_the_handshake_opens_a_fresh_session() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let mut seen_tx = Some(seen_tx);
    let mut sessions: Vec<u64> = Vec::new();
    tokio::spawn(fake_coordinator(listener, move |id, req, out| {
        let proto::Request::OpenSession { session, .. } = req else {
            return; // the Hello is answered with the first session's answer
        };
        sessions.push(session);
        if sessions.len() == 1 {
            let hello = proto::Reply::HelloOk {
                version: proto::VERSION,
                default_ttl_ms: 10_000,
                server: "fake",
            };
            proto::encode_reply(1, &hello, out);
            let lost = proto::Reply::SessionLost {
                session,
                reason: proto::LostReason::Expired,
            };
            proto::encode_reply(0, &lost, out);
            let opened = proto::Reply::SessionOpened {
                ttl_ms: 10_000,
                existed: false,
            };
            proto::encode_reply(id, &opened, out);
        } else if let Some(tx) = seen_tx.take() {
            let _ = tx.send((sessions[0], sessions[1]));
        }
    }));
    let backend = TcpBackend::connect(addr.to_string(), None, Options::default())
        .await
        .expect("the handshake succeeds despite the event");
    let (first, second) = tokio::time::timeout(Duration::from_secs(10), seen_rx)
        .await
        .expect("a fresh session is opened")
        .expect("the fake server saw it");
    assert_ne!(first, second, "the fresh session has a new id");
    assert_eq!(backend.session.load(Ordering::Relaxed), second);
}

/// A permit released with `release()` leaves the driver's map of leases to watch: it
/// would otherwise grow by one with every pair for the life of the client.
#[tokio::test]
async fn released_leases_are_not_watched() {
    let backend = TcpBackend::connect(coordinator().await, None, Options::default())
        .await
        .expect("connect");
    let tx = backend.tx.clone();
    let client = crate::Client::from_backend(Arc::new(backend));
    let sem = client.semaphore("watched", 1).await.expect("ensure");
    for _ in 0..20 {
        sem.acquire()
            .await
            .expect("acquire")
            .release()
            .await
            .expect("release");
    }
    let watched = || async {
        let (reply, watched) = oneshot::channel();
        tx.send(Cmd::Watched { reply }).expect("the driver runs");
        watched.await.expect("the driver answers")
    };
    let held = sem.acquire().await.expect("acquire");
    assert_eq!(watched().await, 1);
    // Watched by the driver now; its release, answered to (and read by) its caller, takes
    // it off the driver's list too (see `Book::released`).
    held.release().await.expect("release");
    assert_eq!(watched().await, 0);
    client.shutdown().await.expect("shutdown");
}

/// Requests are re-sent after a reconnect in the order they were first sent, also when the
/// ids wrapped around in between (id 0 is never given: it marks events).
#[test]
fn resends_keep_the_order_of_first_sending() {
    use super::driver::resend_order;
    assert_eq!(resend_order(vec![9, 3, 7, 5], 10), vec![3, 5, 7, 9]);
    // Given in the order u32::MAX - 1, u32::MAX, 1, 2; the next id is 3.
    assert_eq!(
        resend_order(vec![2, u32::MAX, 1, u32::MAX - 1], 3),
        vec![u32::MAX - 1, u32::MAX, 1, 2]
    );
    assert_eq!(resend_order(Vec::new(), 1), Vec::<u32>::new());
}

/// `PAIRS` acquire-release pairs of one caller alone on its client, on semaphore `name`: of
/// their requests, how many the caller wrote itself, and of their answers, how many it read
/// itself.
async fn lone_pairs(name: &str) -> (u64, u64) {
    let (client, health) = client().await;
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let writes = health.own_writes.load(Ordering::Relaxed);
    let reads = health.own_reads.load(Ordering::Relaxed);
    for _ in 0..PAIRS {
        let permit = sem.acquire().await.expect("acquire");
        permit.release().await.expect("release");
    }
    client.shutdown().await.expect("shutdown");
    (
        health.own_writes.load(Ordering::Relaxed) - writes,
        health.own_reads.load(Ordering::Relaxed) - reads,
    )
}

const PAIRS: u64 = 200;

/// A caller alone on its client writes its own requests (no hand-off to the driver), and
/// a loop of pairs still gets every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_alone_writes_its_own_requests() {
    let (own, _) = lone_pairs("alone").await;
    // Every request but those that found the driver's keep-alive in flight.
    assert!(
        own >= PAIRS * 2 - 4,
        "{} requests of a lone caller, {own} written by the caller",
        PAIRS * 2
    );
}

/// A request its caller wrote on a link that then breaks before the answer is re-sent on
/// the next link, and its answer reaches the caller.
#[tokio::test]
async fn a_request_its_caller_wrote_is_resent_after_a_reconnect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (acquires_tx, mut acquires_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for link in 0u32.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            'link: loop {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let mut out = Vec::new();
                while let Some((payload, used)) =
                    split_frame(&buf, MAX_REPLY_FRAME).expect("a frame")
                {
                    let (id, req) = proto::decode_request(payload).expect("a request");
                    let reply = match req {
                        proto::Request::Hello { .. } => proto::Reply::HelloOk {
                            version: proto::VERSION,
                            default_ttl_ms: 10_000,
                            server: "fake",
                        },
                        proto::Request::OpenSession { .. }
                        | proto::Request::ResumeSession { .. } => proto::Reply::SessionOpened {
                            ttl_ms: 60_000,
                            existed: link > 0,
                        },
                        proto::Request::Acquire { lease, .. } => {
                            let _ = acquires_tx.send((link, lease));
                            if link == 0 {
                                // The first link dies with the acquire unanswered.
                                break 'link;
                            }
                            proto::Reply::Granted { token: 9 }
                        }
                        proto::Request::Leases => proto::Reply::Leases {
                            leases: proto::LeaseIds::new(&[]),
                        },
                        _ => proto::Reply::Done,
                    };
                    proto::encode_reply(id, &reply, &mut out);
                    buf.drain(..used);
                }
                if s.write_all(&out).await.is_err() {
                    break;
                }
            }
        }
    });
    let (client, health) = client_of(&addr.to_string()).await;
    let sem = client.semaphore("resent", 1).await.expect("ensure");
    let before = health.own_writes.load(Ordering::Relaxed);
    let permit = tokio::time::timeout(Duration::from_secs(10), sem.acquire())
        .await
        .expect("the acquire is answered on the second link")
        .expect("granted");
    assert_eq!(permit.fencing_token(), 9);
    assert_eq!(
        health.own_writes.load(Ordering::Relaxed) - before,
        1,
        "the caller wrote its acquire itself"
    );
    let (first, lease) = acquires_rx.recv().await.expect("seen on the first link");
    let (second, again) = acquires_rx.recv().await.expect("seen on the second link");
    assert_eq!((first, second), (0, 1));
    assert_eq!(lease, again, "the same request, re-sent");
    assert_eq!(permit.lease_id(), lease);
}

/// Once the driver has stopped, a call fails at once: nobody would read its answer.
#[tokio::test]
async fn a_call_after_shutdown_fails_rather_than_waits() {
    let (client, _) = client().await;
    let sem = client.semaphore("after", 1).await.expect("ensure");
    client.shutdown().await.expect("shutdown");
    let r = tokio::time::timeout(Duration::from_secs(5), sem.acquire())
        .await
        .expect("the acquire does not wait for an answer that cannot come");
    assert!(r.is_err(), "an acquire after shutdown was granted");
}

/// An acquire the coordinator refused or timed out is settled: the client sends no release
/// after it (before, every `try_acquire` on a full semaphore cost two requests).
#[tokio::test]
async fn a_settled_acquire_is_not_withdrawn() {
    const TRIES: u64 = 50;
    let (client, health) = client().await;
    let sem = client.semaphore("full", 1).await.expect("ensure");
    let held = sem.acquire().await.expect("acquire");
    let before = health.writes.load(Ordering::Relaxed);
    for _ in 0..TRIES {
        assert!(sem.try_acquire().await.expect("try").is_none());
    }
    // A refusal, for good measure: more than the capacity.
    assert!(sem.acquire_many(2).await.is_err());
    let writes = health.writes.load(Ordering::Relaxed) - before;
    assert!(
        writes <= TRIES + 1 + 2,
        "{} settled acquires took {writes} writes",
        TRIES + 1
    );
    drop(held);
    client.shutdown().await.expect("shutdown");
}

/// A caller alone on its client reads its own answers too: the driver task is not woken
/// for them (see `reader`). On one thread, so that the driver cannot race the caller to an
/// answer that comes before the caller waits (the caller then gets it from the driver).
#[tokio::test]
async fn a_caller_alone_reads_its_own_answers() {
    let (_, own) = lone_pairs("reads").await;
    // Every answer but those that met a turn of the driver (its keep-alive).
    assert!(
        own >= PAIRS * 2 - 4,
        "{} answers to a lone caller, {own} read by the caller",
        PAIRS * 2
    );
}

/// An event that comes while a caller reads for its own answer (here, in the same read as
/// that answer) is left to the driver, which tells the holder at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_read_by_a_caller_reaches_the_holder() {
    let addr = coordinator().await;
    let (a, _) = client_of(&addr).await;
    let (b, _) = client_of(&addr).await;
    let sem = a.semaphore("event", 1).await.expect("ensure");
    let held = sem.acquire().await.expect("acquire");
    let lost = held.lost_signal();
    // The second acquire waits, its caller reading for the answer; the revoke frees the slot
    // and grants it, right behind the event of the loss.
    let next = tokio::spawn({
        let sem = sem.clone();
        async move { sem.acquire().await }
    });
    // Queued on the coordinator before the revoke; asked through the other client, so that
    // nothing wakes this client's driver meanwhile.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let doc = b.status(Some("event")).await.expect("status");
            if doc.semaphores.iter().any(|s| s.queued == 1) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the acquire is queued");
    eprintln!("queued {:?}", std::time::Instant::now());
    b.revoke("event", held.lease_id()).await.expect("revoke");
    eprintln!("revoked {:?}", std::time::Instant::now());
    let reason = tokio::time::timeout(Duration::from_secs(2), lost.wait())
        .await
        .expect("the holder learns of the loss at once, not at the next keep-alive");
    assert_eq!(reason, Some(LostReason::Revoked));
    eprintln!("lost {:?}", std::time::Instant::now());
    let granted = tokio::time::timeout(Duration::from_secs(2), next)
        .await
        .expect("the waiting acquire is granted")
        .expect("the task")
        .expect("granted");
    assert!(granted.fencing_token() > held.fencing_token());
}

/// A caller that stops waiting while it holds the link's read readiness gives it back: the
/// driver, not woken otherwise, still reads what comes next (here an event, pushed later by
/// a fake coordinator).
#[tokio::test]
async fn a_caller_that_gives_up_leaves_the_link_to_the_driver() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (push, pushes) = mpsc::unbounded_channel();
    let mut granted = 0;
    let answer = move |id, req: proto::Request<'_>, out: &mut Vec<u8>| {
        if handshake_answer(id, &req, out).is_some() {
            return;
        }
        match req {
            proto::Request::Acquire { lease, .. } => {
                granted = lease;
                proto::encode_reply(id, &proto::Reply::Granted { token: 1 }, out);
            }
            // Never answered; the loss of the lease is pushed a little later.
            proto::Request::Ensure { .. } => {
                let push = push.clone();
                let lease = granted;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut event = Vec::new();
                    let lost = proto::Reply::LeaseLost {
                        lease,
                        token: 1,
                        reason: proto::LostReason::Revoked,
                        name: "held",
                    };
                    proto::encode_reply(0, &lost, &mut event);
                    let _ = push.send(event);
                });
            }
            _ => proto::encode_reply(id, &proto::Reply::Done, out),
        }
    };
    tokio::spawn(fake_coordinator_pushing(listener, answer, pushes));
    let (client, _) = client_of(&addr.to_string()).await;
    let sem = client.existing_semaphore("held");
    let held = sem.acquire().await.expect("granted");
    // The caller writes the ensure itself and waits reading; it gives up before any answer.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), client.semaphore("never", 1));
    assert!(gave_up.await.is_err(), "never answered");
    let reason = tokio::time::timeout(Duration::from_secs(3), held.lost())
        .await
        .expect("the driver reads the event (the keep-alive is 20 s away)");
    assert_eq!(reason, LostReason::Revoked);
}

/// A grant its caller read reaches the driver's watch list through the book, and the
/// record of the lease's release, taken by the driver in the same take, ends the watch: the
/// grants are taken before the records (the other order would watch a released lease for
/// the life of the client).
#[tokio::test]
async fn a_release_taken_with_the_grant_it_releases_ends_the_watch() {
    let (addr, mut released_rx) = coordinator_deaf_to_releases().await;
    let backend = TcpBackend::connect(addr.to_string(), None, Options::default())
        .await
        .expect("connect");
    let tx = backend.tx.clone();
    let health = backend.health.clone();
    let client = crate::Client::from_backend(Arc::new(backend));
    // The ensure's wait lets the new driver run its first turn, which takes the records
    // there are (its start handles events the handshake carried).
    let sem = client.semaphore("ordered", 1).await.expect("ensure");
    let reads = health.own_reads.load(Ordering::Relaxed);
    let permit = sem.acquire().await.expect("granted");
    assert_eq!(
        health.own_reads.load(Ordering::Relaxed) - reads,
        1,
        "the caller read its grant"
    );
    let lease = permit.lease_id();
    permit.send_release().await.expect("sent");
    assert_eq!(released_rx.recv().await, Some(lease));
    let (reply, watched) = oneshot::channel();
    tx.send(Cmd::Watched { reply }).expect("the driver runs");
    assert_eq!(watched.await.expect("the driver answers"), 0);
}

/// A caller busy with pairs it writes and reads itself, for three session TTLs, beside a
/// lease it holds: the driver, which sees none of those answers, keeps the session alive
/// and does not presume the held lease lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_lone_caller_keeps_its_session_and_lease() {
    let options = Options {
        session_ttl: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    let backend = TcpBackend::connect(coordinator().await, None, options)
        .await
        .expect("connect");
    let health = backend.health.clone();
    let client = crate::Client::from_backend(Arc::new(backend));
    let held = client
        .semaphore("kept", 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");
    let busy = client.semaphore("busy", 1).await.expect("ensure");
    let reads = health.own_reads.load(Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let permit = busy.acquire().await.expect("acquire");
        permit.release().await.expect("release");
        assert_eq!(held.lost_reason(), None, "the held lease is not given up");
    }
    assert!(
        health.own_reads.load(Ordering::Relaxed) - reads > 100,
        "the caller read its answers"
    );
    held.release().await.expect("the lease is still held");
}

/// Counts the wake-ups of a task polled by hand, and lets the test await the next one.
#[derive(Default)]
struct CountingWaker {
    wakes: AtomicU64,
    woken: tokio::sync::Notify,
}

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.woken.notify_one();
    }
}

/// A caller that reads its own answer is woken once for it: by the socket, not again by
/// its unused answer channel (whose sender, dropped with the request's record, woke the
/// task that had waited on it, for a poll that found nothing: 2.8 polls per answer in the
/// bench instead of 2). Here the answer comes only after the caller's first poll, so that
/// the caller waits on both.
#[tokio::test]
async fn a_caller_that_reads_its_answer_is_woken_once_for_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (asked_tx, mut asked) = mpsc::unbounded_channel::<u32>();
    let (push, pushes) = mpsc::unbounded_channel();
    let mut acquires = 0;
    let answer = move |id, req: proto::Request<'_>, out: &mut Vec<u8>| {
        if handshake_answer(id, &req, out).is_some() {
            return;
        }
        if let proto::Request::Acquire { .. } = req {
            acquires += 1;
            if acquires == 2 {
                // Answered by the test, once it has seen the caller wait.
                let _ = asked_tx.send(id);
                return;
            }
            proto::encode_reply(id, &proto::Reply::Granted { token: 1 }, out);
        } else {
            proto::encode_reply(id, &proto::Reply::Done, out);
        }
    };
    tokio::spawn(fake_coordinator_pushing(listener, answer, pushes));
    let (client, health) = client_of(&addr.to_string()).await;
    let sem = client.existing_semaphore("once");
    // A first pair, so that what the driver sends after connecting is answered: while a
    // request of its own is in flight, the driver reads every answer.
    let first = sem.acquire().await.expect("granted");
    first.release().await.expect("released");
    let reads = health.own_reads.load(Ordering::Relaxed);
    let counter = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(counter.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let mut acquire = Box::pin(sem.acquire());
    assert!(
        std::future::Future::poll(acquire.as_mut(), &mut cx).is_pending(),
        "not answered yet"
    );
    let id = asked
        .recv()
        .await
        .expect("the acquire reached the coordinator");
    let mut granted = Vec::new();
    proto::encode_reply(id, &proto::Reply::Granted { token: 1 }, &mut granted);
    push.send(granted).expect("the fake coordinator runs");
    counter.woken.notified().await;
    let std::task::Poll::Ready(permit) = std::future::Future::poll(acquire.as_mut(), &mut cx)
    else {
        panic!("woken by the answer, the caller reads it");
    };
    let _held = permit.expect("granted");
    assert_eq!(
        health.own_reads.load(Ordering::Relaxed) - reads,
        1,
        "the caller read the answer itself"
    );
    assert_eq!(
        counter.wakes.load(Ordering::SeqCst),
        1,
        "woken by the socket only"
    );
}
