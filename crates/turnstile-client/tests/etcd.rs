//! The etcd backend (`etcd://HOST:PORT,...[/PREFIX]`): the conformance suite on a one-member
//! etcd started for each test, plus what only this backend has (lease loss at 90% of the TTL,
//! fail-over between members).

#[macro_use]
mod conformance;
mod etcd_support;

use std::time::Duration;

use conformance::{status_of, wait_for_status, Fixture, PATIENCE};
use etcd_support::Etcd;
use turnstile_client::{Client, LostReason, Options};

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
