//! The etcd backend (`etcd://HOST:PORT,...[/PREFIX]`): the conformance suite on a one-member
//! etcd started for each test, plus what only this backend has (lease loss at 90% of the TTL,
//! fail-over between members).

#[macro_use]
mod conformance;
mod etcd_support;

use std::time::Duration;

use tokio::time::Instant;

use conformance::{status_of, wait_for_status, Fixture, PATIENCE, QUIET};
use etcd_support::Etcd;
use turnstile_client::{Client, ErrorCode, LostReason, Options};

/// A fresh one-member etcd for one test.
struct EtcdFixture {
    etcd: Etcd,
}

impl EtcdFixture {
    fn new() -> EtcdFixture {
        EtcdFixture {
            etcd: Etcd::start(),
        }
    }
}

impl Fixture for EtcdFixture {
    async fn client(&self) -> Client {
        Client::connect(&self.url()).await.expect("connect")
    }

    fn url(&self) -> String {
        self.etcd.url("conformance")
    }

    /// No server counts events on etcd, as on the shared directory.
    fn counts_totals(&self) -> bool {
        false
    }
}

conformance_suite!(etcd, EtcdFixture::new());

/// A client cut off from etcd (SIGSTOP of its only member) treats its leases as lost at 90% of
/// the TTL, before etcd could give them away; calls in progress end in `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_lost_at_ninety_percent_of_the_ttl() {
    let etcd = Etcd::start();
    let options = Options {
        session_ttl: Some(Duration::from_secs(3)),
        ..Options::default()
    };
    let client = Client::connect_with(&etcd.url("lost"), options)
        .await
        .expect("connect");
    let sem = client.semaphore("m", 1).await.expect("ensure");
    let permit = sem.acquire().await.expect("acquire");
    let cut = tokio::time::Instant::now();
    etcd.signal(0, nix::sys::signal::Signal::SIGSTOP);
    let reason = tokio::time::timeout(PATIENCE, permit.lost())
        .await
        .expect("the loss is noticed");
    let after = cut.elapsed();
    etcd.signal(0, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(reason, LostReason::Unreachable);
    assert!(
        after < Duration::from_secs(3),
        "lost only after {after:?}, not before the TTL of 3 s"
    );
    assert!(
        after >= Duration::from_millis(1500),
        "lost too early: {after:?}"
    );
}

/// Calls fail over between members: with the first endpoint of the URL stopped (SIGSTOP, so
/// connections hang rather than fail), a client still acquires and releases through the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_skipped() {
    let etcd = Etcd::cluster(3);
    let client = Client::connect(&etcd.url("hung")).await.expect("connect");
    let sem = client.semaphore("m", 2).await.expect("ensure");
    let held = sem.acquire().await.expect("acquire");
    etcd.signal(0, nix::sys::signal::Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(PATIENCE, sem.acquire())
        .await
        .expect("granted through another member")
        .expect("acquire");
    assert!(second.fencing_token() > held.fencing_token());
    let st = status_of(&client, "m").await;
    assert_eq!(st.in_use, 2);
    drop(second);
    wait_for_status(&client, "m", "the drop processed", |s| s.in_use == 1).await;
    assert_eq!(held.lost_reason(), None, "{:?}", started.elapsed());
    etcd.signal(0, nix::sys::signal::Signal::SIGCONT);
}

/// A three-member cluster loses its leader (SIGKILL) while 16 clients loop acquire/release on
/// a capacity-3 semaphore, each client starting on a different member: from the history of
/// grants and releases, never more than 3 holders at once; every client finishes; tokens
/// stay unique and grants keep FIFO order (by token) after the new leader takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load() {
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 12;
    let mut etcd = Etcd::cluster(3);
    let hosts: Vec<String> = etcd.members.iter().map(|m| m.client.clone()).collect();
    // (token, granted, released) as each client saw them.
    let history: Arc<Mutex<Vec<(u64, Instant, Instant)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        // Each client lists the members starting at a different one.
        let mut order = hosts.clone();
        order.rotate_left(c % hosts.len());
        let url = format!("etcd://{}/leader", order.join(","));
        let client = Client::connect(&url).await.expect("connect");
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let sem = client.semaphore("db", 3).await.expect("ensure");
            for _ in 0..ROUNDS {
                let permit = sem.acquire().await.expect("acquire");
                let granted = Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let token = permit.fencing_token();
                assert_eq!(permit.lost_reason(), None);
                let released = Instant::now();
                permit.release().await.expect("release");
                history
                    .lock()
                    .expect("lock")
                    .push((token, granted, released));
            }
            client.shutdown().await.expect("shutdown");
        }));
    }
    // Kill the leader once the load is under way.
    while history.lock().expect("lock").len() < CLIENTS * ROUNDS / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = etcd.leader().expect("a leader");
    etcd.kill(leader);
    let killed = Instant::now();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("every client finishes")
            .expect("client task");
    }
    let history = history.lock().expect("lock").clone();
    assert_eq!(history.len(), CLIENTS * ROUNDS);
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for &(_, g, r) in &history {
        events.push((g, 1));
        events.push((r, -1));
    }
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut max) = (0, 0);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    assert!(max <= 3, "{max} holders at once on a capacity-3 semaphore");
    let mut tokens: Vec<u64> = history.iter().map(|h| h.0).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), CLIENTS * ROUNDS, "a distinct token per grant");
    // FIFO after the take-over: a grant seen well after another has a larger token (grants in
    // the same moment may be observed in either order by different clients).
    let mut after: Vec<(Instant, u64)> = history
        .iter()
        .filter(|h| h.1 > killed)
        .map(|h| (h.1, h.0))
        .collect();
    after.sort_unstable();
    assert!(!after.is_empty(), "grants continued after the leader died");
    for (i, &(t, tok)) in after.iter().enumerate() {
        for &(t2, tok2) in &after[i + 1..] {
            if t2 > t + Duration::from_millis(250) {
                assert!(
                    tok2 > tok,
                    "grant {tok2} came well after {tok} with a smaller token"
                );
            }
        }
    }
    eprintln!(
        "{} grants in {:?}; {} after the leader was killed",
        history.len(),
        started.elapsed(),
        after.len()
    );
}

/// A timed acquire whose deadline passes while etcd is unreachable (SIGSTOP) ends in
/// `Unavailable` within half a second of its deadline, and its queued key is still withdrawn
/// once etcd is back: it does not block the queue for as long as its client lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_acquire_is_withdrawn_after_etcd_comes_back() {
    let etcd = Etcd::start();
    let (a, b) = (
        Client::connect(&etcd.url("withdraw"))
            .await
            .expect("connect"),
        Client::connect(&etcd.url("withdraw"))
            .await
            .expect("connect"),
    );
    let sem_a = a.semaphore("m", 1).await.expect("ensure");
    let sem_b = b.semaphore("m", 1).await.expect("ensure");
    let held = sem_a.acquire().await.expect("a holds");
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = sem_b.acquire_timeout(Duration::from_secs(1)).await;
        (r.map(drop), started.elapsed(), sem_b)
    });
    wait_for_status(&a, "m", "b queued", |s| s.queued == 1).await;
    etcd.signal(0, nix::sys::signal::Signal::SIGSTOP);
    let (result, took, _sem_b) = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the timed acquire returns")
        .expect("task");
    etcd.signal(0, nix::sys::signal::Signal::SIGCONT);
    let err = result.expect_err("etcd was stopped");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        took < Duration::from_millis(2500),
        "returned after {took:?}"
    );
    held.release().await.expect("release");
    wait_for_status(&a, "m", "b's key withdrawn", |s| {
        s.in_use == 0 && s.queued == 0
    })
    .await;
    assert!(sem_a.try_acquire().await.expect("try").is_some());
}

/// How long the backend leaves a silent watch open before it re-opens it (`WATCH_QUIET`, 3 s),
/// plus a margin: the compaction tests wait this long so that the re-open, from a revision
/// compacted meanwhile, has surely happened (there is no event to wait for: the point is that
/// the watch hears nothing).
const PAST_A_REOPEN: Duration = Duration::from_secs(4);

/// A waiter whose watch is re-opened from a revision that a compaction removed meanwhile
/// (etcd cancels such a watch with `compact_revision`) reads the queue again and watches on
/// from there: it is granted when the holder releases, rather than failing or hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_recovers_from_a_compacted_watch() {
    let etcd = Etcd::start();
    let url = etcd.url("compact");
    let a = Client::connect(&url).await.expect("connect");
    let b = Client::connect(&url).await.expect("connect");
    let sem_a = a.semaphore("m", 1).await.expect("ensure");
    let sem_b = b.semaphore("m", 1).await.expect("ensure");
    let held = sem_a.acquire().await.expect("a holds");
    let waiter = tokio::spawn(async move { sem_b.acquire().await.map(|p| p.fencing_token()) });
    wait_for_status(&a, "m", "b queued", |s| s.queued == 1).await;
    etcd_support::compact_now(&etcd.members[0].client);
    tokio::time::sleep(PAST_A_REOPEN).await;
    assert!(
        !waiter.is_finished(),
        "the waiter ended: {:?}",
        waiter.await
    );
    let token = held.fencing_token();
    held.release().await.expect("release");
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter is granted after the release")
        .expect("task")
        .expect("the waiter's acquire succeeds");
    assert!(granted > token);
}

/// A holder's watch of its own key (which tells it of a close) that starts, or re-starts,
/// from a compacted revision reads its key again and watches on: a close after the compaction
/// still reaches the holder as `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_hears_of_a_close_after_a_compaction() {
    let etcd = Etcd::start();
    let url = etcd.url("compact-holder");
    let a = Client::connect(&url).await.expect("connect");
    let sem = a.semaphore("m", 1).await.expect("ensure");
    let held = sem.acquire().await.expect("a holds");
    etcd_support::compact_now(&etcd.members[0].client);
    tokio::time::sleep(PAST_A_REOPEN).await;
    let closer = Client::connect(&url).await.expect("connect");
    closer.close("m").await.expect("close");
    let reason = tokio::time::timeout(PATIENCE, held.lost())
        .await
        .expect("the holder hears of the close");
    assert_eq!(reason, LostReason::Closed);
}

/// A member cut off from the quorum still answers (here: 2 of 3 members stopped with
/// SIGSTOP, the last one up has no leader). The backend's reads are linearizable, so a client
/// that can reach only that member is served nothing stale: its acquire and its status end
/// in `Unavailable` within the session TTL (never a grant beyond the capacity), and it works
/// again once the members are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_quorum_serves_nothing_stale() {
    use nix::sys::signal::Signal;
    let etcd = Etcd::cluster(3);
    let prefix = "minority";
    let holder = Client::connect(&etcd.url(prefix)).await.expect("connect");
    let sem = holder.semaphore("m", 1).await.expect("ensure");
    let held = sem.acquire().await.expect("the holder holds");
    let lone_url = format!("etcd://{}/{prefix}", etcd.members[0].client);
    let options = Options {
        session_ttl: Some(Duration::from_secs(4)),
        ..Options::default()
    };
    let lone = Client::connect_with(&lone_url, options)
        .await
        .expect("connect");
    let lone_sem = lone.semaphore("m", 1).await.expect("ensure");
    assert!(lone_sem.try_acquire().await.expect("try").is_none());
    etcd.signal(1, Signal::SIGSTOP);
    etcd.signal(2, Signal::SIGSTOP);
    let started = Instant::now();
    let err = lone_sem
        .try_acquire()
        .await
        .expect_err("no acquire without a quorum");
    assert!(err.is_unavailable(), "{err:?}");
    let err = lone
        .status(Some("m"))
        .await
        .expect_err("no status without a quorum (a serializable read would answer)");
    assert!(err.is_unavailable(), "{err:?}");
    let timed = tokio::time::timeout(PATIENCE, lone_sem.acquire_timeout(Duration::from_secs(1)))
        .await
        .expect("a timed acquire returns");
    assert!(timed.is_err(), "granted without a quorum: {timed:?}");
    eprintln!("without a quorum for {:?}", started.elapsed());
    etcd.signal(1, Signal::SIGCONT);
    etcd.signal(2, Signal::SIGCONT);
    let token = held.fencing_token();
    tokio::time::timeout(PATIENCE, held.release())
        .await
        .expect("the release returns")
        .expect("release once the quorum is back");
    // The members take a few seconds to elect a leader again (the lone one campaigned
    // meanwhile): until then the lone client's calls may still end in `Unavailable`.
    let back = Instant::now();
    let next = loop {
        match lone_sem.acquire().await {
            Ok(p) => break p,
            Err(e) if back.elapsed() < PATIENCE => eprintln!("not yet: {e}"),
            Err(e) => panic!(
                "not granted {:?} after the quorum came back: {e}",
                back.elapsed()
            ),
        }
    };
    assert!(next.fencing_token() > token);
}

/// The session TTL of the options is the TTL of the client's etcd lease: whole seconds
/// (rounded up), and at least etcd's minimum of 2 s (a shorter one is raised, with a
/// warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_ttl_is_the_etcd_lease_ttl() {
    let etcd = Etcd::start();
    let addr = etcd.members[0].client.clone();
    for (asked, granted) in [(500, 2), (4500, 5), (7000, 7)] {
        let options = Options {
            session_ttl: Some(Duration::from_millis(asked)),
            ..Options::default()
        };
        let client = Client::connect_with(&etcd.url("ttl"), options)
            .await
            .expect("connect");
        // The client's lease carries its session marker `ttl/c/SESSION/LEASE`.
        let dir = format!("ttl/c/{:016x}/", client.session_id());
        let mut end = dir.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let found = etcd_support::call(
            &addr,
            "/v3/kv/range",
            &serde_json::json!({"key": etcd_support::b64(dir.as_bytes()), "range_end": etcd_support::b64(&end)}),
        );
        let lease = found["kvs"][0]["lease"]
            .as_str()
            .expect("a marker on a lease")
            .to_owned();
        let ttl = etcd_support::call(
            &addr,
            "/v3/lease/timetolive",
            &serde_json::json!({"ID": lease}),
        );
        assert_eq!(
            ttl["grantedTTL"].as_str(),
            Some(granted.to_string().as_str()),
            "asked for {asked} ms: {ttl}"
        );
        client.shutdown().await.expect("shutdown");
    }
}

/// A waiter queued before a shrink follows it (it watches the cap key): a release that would
/// have let it in under the old capacity does not, since the holders kept over the new
/// capacity still fill it; and a waiter's lease is not a holder's, so it cannot be revoked.
#[tokio::test]
async fn a_waiter_queued_before_a_shrink_follows_it() {
    let server = EtcdFixture::new();
    let (admin, a, b, w) = (
        server.client().await,
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "shrunk";
    let pa = a.semaphore(name, 2).await.expect("ensure");
    let pa = pa.acquire().await.expect("a");
    let pb = b.semaphore(name, 2).await.expect("ensure");
    let pb = pb.acquire().await.expect("b");
    let sem_w = w.semaphore(name, 2).await.expect("ensure");
    let mut wait_w = tokio::spawn(async move { sem_w.acquire().await });
    let st = wait_for_status(&admin, name, "w queued", |s| s.queued == 1).await;
    let err = admin
        .revoke(name, st.waiters[0].lease_id)
        .await
        .expect_err("a waiter holds nothing");
    assert_eq!(err.code(), Some(ErrorCode::UnknownLease), "{err:?}");

    admin.set_capacity(name, 1).await.expect("shrink");
    let st = status_of(&admin, name).await;
    assert_eq!((st.capacity, st.in_use, st.queued), (1, 2, 1), "{st:?}");
    pa.release().await.expect("release a");
    assert!(
        tokio::time::timeout(QUIET * 2, &mut wait_w).await.is_err(),
        "granted while b alone filled the shrunk capacity"
    );
    let st = status_of(&admin, name).await;
    assert_eq!((st.in_use, st.queued), (1, 1), "{st:?}");
    let last = pb.fencing_token();
    pb.release().await.expect("release b");
    let granted = tokio::time::timeout(PATIENCE, &mut wait_w)
        .await
        .expect("w granted once b left")
        .expect("task")
        .expect("w");
    assert!(granted.fencing_token() > last);
}

/// A semaphore made before the capacity-change markers (`s/NAME/cap.a`) existed: a grow still
/// reaches a waiter queued on it (set-capacity makes a marker first, then swaps it).
#[tokio::test]
async fn a_grow_reaches_the_waiters_of_a_semaphore_without_markers() {
    let server = EtcdFixture::new();
    let (admin, a, w) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let name = "old";
    let held = a.semaphore(name, 1).await.expect("ensure");
    let held = held.acquire().await.expect("a");
    // Through etcd's JSON gateway rather than `etcdctl`, which Debian packages apart
    // (etcd-client) from the server the tests install.
    let out = etcd_support::call(
        &server.etcd.members[0].client,
        "/v3/kv/deleterange",
        &serde_json::json!({"key": etcd_support::b64(b"conformance/s/old/cap.a")}),
    );
    assert_eq!(out["deleted"], "1", "{out}");
    let sem_w = w.semaphore(name, 1).await.expect("ensure");
    let wait_w = tokio::spawn(async move { sem_w.acquire().await });
    wait_for_status(&admin, name, "w queued", |s| s.queued == 1).await;
    admin.set_capacity(name, 2).await.expect("grow");
    let _granted = tokio::time::timeout(PATIENCE, wait_w)
        .await
        .expect("w granted by the grow")
        .expect("task")
        .expect("w");
    assert!(held.lost_reason().is_none());
}

/// Standard base64 back to bytes (etcd's JSON gateway writes keys so).
fn unb64(s: &str) -> Vec<u8> {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let Some(v) = ABC.iter().position(|&a| a == c) else {
            continue;
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The keys under `prefix` at revision `rev` (0: the latest) and the revision read at.
fn keys_at(addr: &str, prefix: &str, rev: u64) -> (Vec<(String, u64)>, u64) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    let r = etcd_support::call(
        addr,
        "/v3/kv/range",
        &serde_json::json!({"key": etcd_support::b64(prefix.as_bytes()),
            "range_end": etcd_support::b64(&end), "keys_only": true, "revision": rev.to_string()}),
    );
    let num = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0u64);
    let keys = r["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key =
                String::from_utf8_lossy(&unb64(kv["key"].as_str().unwrap_or(""))).into_owned();
            (key, num(&kv["create_revision"]))
        })
        .collect();
    (keys, num(&r["header"]["revision"]))
}

/// etcd keeps the name of every deleted key in its index until a compaction, and the acquire
/// txn's count of the queue walks all of them: with one key name per acquire, each acquire
/// cost more than the one before (the 1-client rate fell by half within seconds). A client's
/// key names are slots reused after release, so over 30 rounds of two acquires at once (two
/// slots) at most two names ever exist under the queue, while every token is a new create
/// revision, strictly increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_key_names_stay_bounded_over_many_acquires() {
    let etcd = Etcd::start();
    let addr = etcd.members[0].client.clone();
    let client = Client::connect(&etcd.url("slots")).await.expect("connect");
    let sem = client.semaphore("m", 2).await.expect("ensure");
    let (_, first) = keys_at(&addr, "slots/s/m/q/", 0);
    let mut last = 0;
    for round in 0..30 {
        let p1 = sem.acquire().await.expect("first slot");
        let p2 = sem.acquire().await.expect("second slot");
        let (t1, t2) = (p1.fencing_token(), p2.fencing_token());
        assert!(
            last < t1 && t1 < t2,
            "round {round}: tokens {last}, {t1}, {t2}"
        );
        last = t2;
        if round % 2 == 0 {
            p1.release().await.expect("release");
            p2.release().await.expect("release");
        } else {
            p2.release().await.expect("release");
            p1.release().await.expect("release");
        }
    }
    let (now, end) = keys_at(&addr, "slots/s/m/q/", 0);
    assert!(now.is_empty(), "keys left in the queue: {now:?}");
    let mut names = std::collections::BTreeSet::new();
    for rev in first..=end {
        names.extend(
            keys_at(&addr, "slots/s/m/q/", rev)
                .0
                .into_iter()
                .map(|(k, _)| k),
        );
    }
    assert!(
        names.len() <= 2,
        "{} key names were written under the queue over 60 acquires: {names:?}",
        names.len()
    );
}

/// A watch is a stream on the client's HTTP/2 connection; one that the client drops (a
/// waiter that timed out, a holder's watch at release) is reset, and etcd ends it: no
/// watcher is left in etcd (`etcd_debugging_mvcc_watcher_total`) once nothing waits or holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_end_in_etcd() {
    let etcd = Etcd::start();
    let addr = etcd.members[0].client.clone();
    let url = etcd.url("watches");
    let watchers = || etcd_support::metric(&addr, "etcd_debugging_mvcc_watcher_total");
    // etcd's metrics are read from outside: poll them, for at most PATIENCE.
    let until = |what: &str, ok: &dyn Fn(f64) -> bool| {
        let give_up = std::time::Instant::now() + PATIENCE;
        loop {
            let n = watchers().expect("etcd's watcher gauge");
            if ok(n) {
                return n;
            }
            assert!(std::time::Instant::now() < give_up, "{what}: {n} watchers");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(watchers(), Some(0.0));
    let a = Client::connect(&url).await.expect("connect");
    let b = Client::connect(&url).await.expect("connect");
    let held = a
        .semaphore("m", 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("a holds");
    // The holder watches its key a little after the grant.
    until("the holder's watch", &|n| n >= 1.0);
    let err = b
        .semaphore("m", 1)
        .await
        .expect("ensure")
        .acquire_timeout(Duration::from_millis(500))
        .await
        .expect_err("held by a");
    assert!(matches!(err, turnstile_client::Error::TimedOut), "{err:?}");
    held.release().await.expect("release");
    until("after the release and the timed-out wait", &|n| n == 0.0);
}

/// A TCP proxy in front of one etcd member that records what its clients send, and can
/// swallow the answer to the next acquire txn (the connection is then closed, as by a member
/// that applied a request and died before answering).
struct Tee {
    addr: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Tee {
    async fn start(target: String) -> Tee {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let swallow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, flag) = (sent.clone(), swallow.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let idx = {
                    let mut log = log.lock().expect("log");
                    log.push(Vec::new());
                    log.len() - 1
                };
                let muted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mute = muted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || muted.load(SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let (log, flag) = (log.clone(), flag.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let acquire = {
                            let mut log = log.lock().expect("log");
                            let before = acquires_in(&log[idx]).len();
                            log[idx].extend_from_slice(&buf[..n]);
                            acquires_in(&log[idx]).len() > before
                        };
                        // Muted before the request is complete at the server, so its
                        // answer cannot slip through.
                        let swallowed = acquire && flag.swap(false, SeqCst);
                        if swallowed {
                            mute.store(true, SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if swallowed {
                            // etcd applies it meanwhile; then the connection goes.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                });
            }
        });
        Tee {
            addr,
            sent,
            swallow,
        }
    }

    /// The acquire txns sent so far (the ones that count the queue), as the gateway's JSON.
    fn acquire_txns(&self) -> Vec<serde_json::Value> {
        let log = self.sent.lock().expect("log");
        log.iter().flat_map(|conn| acquires_in(conn)).collect()
    }
}

/// The acquire txns (the ones that count the queue) among the gRPC messages a client sent on
/// one HTTP/2 connection (`conn`: every byte it sent, from the connection preface on). The
/// headers are HPACK-compressed, so a message is taken for a txn if it decodes as one.
fn acquires_in(conn: &[u8]) -> Vec<serde_json::Value> {
    const PREFACE: usize = 24;
    let mut streams: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut out = Vec::new();
    let mut at = PREFACE;
    // Frames: a 9-byte head (length 3, type, flags, stream id 4), then the payload.
    while let Some(head) = conn.get(at..at + 9) {
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let Some(mut payload) = conn.get(at + 9..at + 9 + len) else {
            break;
        };
        at += 9 + len;
        if kind != 0 {
            continue; // not DATA
        }
        if flags & 0x8 != 0 {
            // Padded: a pad length byte, then the data, then the padding.
            let pad = payload.first().copied().unwrap_or(0) as usize;
            payload = &payload[1.min(payload.len())..payload.len().saturating_sub(pad)];
        }
        let data = streams.entry(stream).or_default();
        data.extend_from_slice(payload);
        // gRPC messages: a compressed flag, a 4-byte length, the message.
        while data.len() >= 5 {
            let n = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            if data.len() < 5 + n {
                break;
            }
            let message: Vec<u8> = data.drain(..5 + n).skip(5).collect();
            if let Some(txn) =
                turnstile_client::etcd_rpc::decode_request("/etcdserverpb.KV/Txn", &message)
            {
                if txn.to_string().contains("count_only") {
                    out.push(txn);
                }
            }
        }
    }
    out
}

/// A copy of an acquire's create txn that etcd applies late (sent to a member that hung, and
/// retried on another; here: replayed by hand) after the acquire was granted and released,
/// and again after the key's name was reused by the next acquire, creates nothing: the txn
/// requires the slot's tombstone at the mod revision it had before, and the create moved it.
/// (With one key name per acquire and no tombstone on release, the replay re-created the
/// released key: a phantom holder for as long as the client lived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_an_acquire_creates_nothing() {
    let etcd = Etcd::start();
    let addr = etcd.members[0].client.clone();
    let tee = Tee::start(addr.clone()).await;
    let client = Client::connect(&format!("etcd://{}/late", tee.addr))
        .await
        .expect("connect");
    let sem = client.semaphore("m", 1).await.expect("ensure");
    let first = sem.acquire().await.expect("acquire");
    let t1 = first.fencing_token();
    first.release().await.expect("release");
    let copies = tee.acquire_txns();
    assert_eq!(copies.len(), 1, "one acquire txn sent");
    let late = etcd_support::call(&addr, "/v3/kv/txn", &copies[0]);
    assert!(late.get("header").is_some(), "the replay failed: {late}");
    assert_ne!(
        late["succeeded"], true,
        "a late copy created the key again: {late}"
    );
    assert!(keys_at(&addr, "late/s/m/q/", 0).0.is_empty());

    // The next acquire reuses the name; the late copy still creates nothing, neither while
    // it holds nor after.
    let second = sem.acquire().await.expect("acquire again");
    let t2 = second.fencing_token();
    assert!(t2 > t1);
    let late = etcd_support::call(&addr, "/v3/kv/txn", &copies[0]);
    assert_ne!(late["succeeded"], true, "{late}");
    second.release().await.expect("release");
    let late = etcd_support::call(&addr, "/v3/kv/txn", &copies[0]);
    assert_ne!(late["succeeded"], true, "{late}");
    assert!(keys_at(&addr, "late/s/m/q/", 0).0.is_empty());
    let other = Client::connect(&etcd.url("late")).await.expect("connect");
    let st = status_of(&other, "m").await;
    assert_eq!((st.in_use, st.queued), (0, 0), "{st:?}");
    let third = other
        .semaphore("m", 1)
        .await
        .expect("ensure")
        .try_acquire()
        .await
        .expect("try")
        .expect("the slot is free");
    assert!(third.fencing_token() > t2);
}

/// An acquire whose txn etcd applied but whose answer was lost (the connection closed
/// before it) is retried by the client; the retry finds the key its first attempt made (the
/// slot's tombstone names its lease) and holds with it: one key, one holder, the token its
/// create revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_acquire_holds_with_the_key_its_first_attempt_made() {
    let etcd = Etcd::start();
    let addr = etcd.members[0].client.clone();
    let tee = Tee::start(addr.clone()).await;
    let client = Client::connect(&format!("etcd://{}/retry", tee.addr))
        .await
        .expect("connect");
    let sem = client.semaphore("m", 1).await.expect("ensure");
    // A first pair, so that the retry happens on a reused name.
    sem.acquire()
        .await
        .expect("acquire")
        .release()
        .await
        .expect("release");
    tee.swallow.store(true, std::sync::atomic::Ordering::SeqCst);
    let held = sem.acquire().await.expect("granted after the retry");
    assert!(
        !tee.swallow.load(std::sync::atomic::Ordering::SeqCst),
        "no answer was swallowed"
    );
    assert_eq!(
        tee.acquire_txns().len(),
        3,
        "the swallowed acquire was retried once"
    );
    let (keys, _) = keys_at(&addr, "retry/s/m/q/", 0);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].1, held.fencing_token());
    let st = status_of(&client, "m").await;
    assert_eq!((st.in_use, st.queued), (1, 0), "{st:?}");
    assert_eq!(st.holders[0].lease_id, held.lease_id());
    held.release().await.expect("release");
    assert!(keys_at(&addr, "retry/s/m/q/", 0).0.is_empty());
}

/// A revoke names a lease; key names are reused, so a revoke of a lease already released
/// must not hit the acquire that reused its key's name: `UnknownLease`, and the new holder
/// keeps its slot until it is revoked by its own lease id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_of_a_released_lease_spares_the_reused_name() {
    let etcd = Etcd::start();
    let url = etcd.url("reuse");
    let (client, admin) = (
        Client::connect(&url).await.expect("connect"),
        Client::connect(&url).await.expect("connect"),
    );
    let sem = client.semaphore("m", 1).await.expect("ensure");
    let first = sem.acquire().await.expect("acquire");
    let old = first.lease_id();
    first.release().await.expect("release");
    let second = sem.acquire().await.expect("acquire again");
    assert_ne!(second.lease_id(), old);
    let err = admin.revoke("m", old).await.expect_err("a released lease");
    assert_eq!(err.code(), Some(ErrorCode::UnknownLease), "{err:?}");
    let st = status_of(&admin, "m").await;
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].lease_id, second.lease_id());
    assert_eq!(st.holders[0].token, second.fencing_token());
    admin.revoke("m", second.lease_id()).await.expect("revoke");
    let reason = tokio::time::timeout(PATIENCE, second.lost())
        .await
        .expect("the holder hears of the revoke");
    assert_eq!(reason, LostReason::Revoked);
    // Its slot is free again: the next acquire takes it.
    let third = sem.acquire().await.expect("acquire after the revoke");
    assert!(third.fencing_token() > second.fencing_token());
}
