//! Many callers on one client (tasks of one runtime, or threads through the blocking
//! facade): every reply reaches the caller whose request it answers, also across a
//! reconnect with requests in flight, and a caller that gives up leaves the connection
//! usable for the others.

use super::*;

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
