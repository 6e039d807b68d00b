//! The blocking client against a real coordinator process: the thread that waits drives the
//! client's I/O, and the runtime's keeper thread drives it while no thread waits (see
//! `turnstile_client::driven`). A holder that makes no call keeps its lease and still learns
//! of its loss; many threads share one client.

#[allow(dead_code)] // the helpers serve several test binaries
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, Server, SOON};
use nix::sys::signal::{kill, Signal};
use turnstile_client::blocking::Client;
use turnstile_client::LostReason;

const TTL: Duration = Duration::from_secs(1);

/// A permit held by a thread that makes no call for three TTLs keeps its lease: the keeper
/// sent the keep-alives. Then the coordinator is stopped (SIGSTOP): with still no call, the
/// client notices it has not heard back for a TTL and marks the permit lost.
#[test]
fn a_quiet_holder_keeps_its_lease_and_learns_when_the_coordinator_stops() {
    let server = Server::start("1s");
    let client = Client::connect(server.url()).expect("connect");
    let sem = client.semaphore("quiet", 1).expect("ensure");
    let permit = sem.acquire().expect("acquire");
    // Time must pass with no call from this thread: that is what is tested.
    std::thread::sleep(TTL * 3);
    assert_eq!(permit.lost_reason(), None);
    let st = client.status(Some("quiet")).expect("status");
    let holders = &st.semaphores[0].holders;
    assert_eq!(holders.len(), 1, "{st:?}");
    assert_eq!(holders[0].lease_id, permit.lease_id(), "the lease expired");

    kill(server.pid(), Signal::SIGSTOP).expect("SIGSTOP the coordinator");
    let stopped = Instant::now();
    let reason = wait_until("the permit is lost", SOON, || permit.lost_reason());
    let _ = kill(server.pid(), Signal::SIGCONT);
    assert_eq!(reason, LostReason::Unreachable);
    assert!(
        stopped.elapsed() >= TTL / 2,
        "lost after {:?}, before the client could have missed a keep-alive",
        stopped.elapsed()
    );
}

/// Same with the coordinator killed: the quiet holder learns of the loss with no call.
#[test]
fn a_quiet_holder_learns_when_the_coordinator_dies() {
    let mut server = Server::start("1s");
    let client = Client::connect(server.url()).expect("connect");
    let sem = client.semaphore("quiet-kill", 1).expect("ensure");
    let permit = sem.acquire().expect("acquire");
    server.kill();
    let reason = wait_until("the permit is lost", SOON, || permit.lost_reason());
    assert!(
        matches!(reason, LostReason::Unreachable | LostReason::SessionEnded),
        "{reason:?}"
    );
}

/// Sixteen threads share one blocking client, each looping acquire/release on a semaphore of
/// its own, while another thread waits in `acquire` on a semaphore held by this one: each
/// thread gets its own replies, nobody deadlocks, and the waiter gets its grant once this
/// thread releases.
#[test]
fn sixteen_threads_share_one_blocking_client() {
    const THREADS: usize = 16;
    const PAIRS: usize = 150;
    let server = Server::start("5s");
    let client = Arc::new(Client::connect(server.url()).expect("connect"));
    let shared = client.semaphore("held", 1).expect("ensure");
    let held = shared.acquire().expect("acquire");
    let waiter = {
        let client = client.clone();
        std::thread::spawn(move || {
            let sem = client.semaphore("held", 1).expect("ensure");
            let permit = sem.acquire().expect("the waiter's acquire");
            let token = permit.fencing_token();
            permit.release().expect("release");
            token
        })
    };
    let loopers: Vec<_> = (0..THREADS)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || {
                let name = format!("looper-{i}");
                let sem = client.semaphore(&name, 1).expect("ensure");
                let mut last = 0;
                for _ in 0..PAIRS {
                    let permit = sem.acquire().expect("acquire");
                    assert!(permit.fencing_token() > last, "a stale or foreign grant");
                    last = permit.fencing_token();
                    assert!(
                        sem.try_acquire().expect("try_acquire").is_none(),
                        "granted on a full semaphore: a reply went to the wrong thread"
                    );
                    permit.release().expect("release");
                }
            })
        })
        .collect();
    let deadline = Instant::now() + SOON * 6;
    for l in loopers {
        while !l.is_finished() {
            assert!(Instant::now() < deadline, "the loopers never finished");
            std::thread::sleep(Duration::from_millis(20));
        }
        l.join().expect("a looper failed");
    }
    // The waiter is still queued behind this thread's permit (granted in FIFO order).
    wait_until("the waiter is queued", SOON, || {
        let st = client.status(Some("held")).expect("status");
        (st.semaphores[0].queued == 1).then_some(())
    });
    assert!(!waiter.is_finished());
    let token = held.fencing_token();
    held.release().expect("release");
    wait_until("the waiter is granted", SOON, || {
        waiter.is_finished().then_some(())
    });
    assert!(waiter.join().expect("the waiter finished") > token);
}
