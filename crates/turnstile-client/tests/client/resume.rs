//! A connection that drops and a coordinator that restarts: the client resumes its session,
//! keeps what it holds for as long as the coordinator does, re-sends what was in flight,
//! reports what the coordinator no longer has, and releases again what a crash made it
//! forget. Each test puts a [`Proxy`] between the client and the server and cuts it (or
//! points it at a second server standing for the restarted one).

use super::*;

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
