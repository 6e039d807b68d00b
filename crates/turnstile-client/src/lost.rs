//! The loss signal of one lease: the backend's side ([`LostSender`]) says that the lease was
//! lost, the permit's side ([`LostReceiver`], any number of clones) reads or waits for it.
//!
//! Made for the shape of this one job rather than taken from `tokio::sync::watch`: every
//! grant makes one and every release drops one, so on a loop of acquire and release it is on
//! the hot path. A watch channel allocates eight `Notify`s per channel and locks all eight
//! when its sender goes; this is one allocation of a few words, and a sender that goes with
//! nobody waiting (the common case: the lease was released, not lost) touches no lock.
//!
//! # Invariants
//! - The state only gains information: a reason, once set, is never cleared, and the closed
//!   mark (the sender is gone, so no loss can come any more) is never taken back.
//! - No wake-up is missed: a waiter counts itself in `waiting` and registers with `notify`
//!   *before* it reads the state; the sender writes the state *before* it reads `waiting`.
//!   Both sides use sequentially consistent operations, so at least one of them sees the
//!   other's write: either the waiter sees the new state, or the sender sees the waiter and
//!   wakes it.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::LostReason;

/// Set once the sender is gone.
const CLOSED: u8 = 0x80;
/// The low bits: 0 while the lease is held, else the code of the reason.
const REASON: u8 = 0x7f;

#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    /// Tasks inside [`LostReceiver::wait`].
    waiting: AtomicU32,
    notify: Notify,
}

/// A new loss signal: the sender for the backend, the receiver for the permit.
pub fn channel() -> (LostSender, LostReceiver) {
    let shared = Arc::new(Shared::default());
    (
        LostSender {
            shared: shared.clone(),
        },
        LostReceiver { shared },
    )
}

/// The backend's side of a lease's loss signal. Dropping it tells the receivers that no loss
/// can come any more (the lease ended, or the backend is gone).
#[derive(Debug)]
pub struct LostSender {
    shared: Arc<Shared>,
}

impl LostSender {
    /// The lease was lost, for this reason (a later reason replaces an earlier one).
    pub fn send(&self, reason: LostReason) {
        let code = code(reason);
        // Keeps the closed mark; only the sender writes, so no update is lost.
        let _ = self
            .shared
            .state
            .fetch_update(SeqCst, SeqCst, |s| Some((s & CLOSED) | code));
        self.wake();
    }

    /// Whether every receiver is gone (nobody would hear of a loss).
    pub fn is_closed(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }

    fn wake(&self) {
        if self.shared.waiting.load(SeqCst) > 0 {
            self.shared.notify.notify_waiters();
        }
    }
}

impl Drop for LostSender {
    fn drop(&mut self) {
        self.shared.state.fetch_or(CLOSED, SeqCst);
        self.wake();
    }
}

/// The permit's side of a lease's loss signal; clones share it.
#[derive(Clone, Debug)]
pub struct LostReceiver {
    shared: Arc<Shared>,
}

impl LostReceiver {
    /// Why the lease was lost, if it was.
    pub fn reason(&self) -> Option<LostReason> {
        reason(self.shared.state.load(SeqCst))
    }

    /// Waits until the lease is lost: `Some(reason)`; `None` once the sender is gone without
    /// a loss (a loss sent just before it went is still returned).
    pub async fn wait(&self) -> Option<LostReason> {
        let shared = &*self.shared;
        shared.waiting.fetch_add(1, SeqCst);
        // Counted out again however this future ends, cancelled included.
        let _out = WaitingGuard(shared);
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            // Registered before the state is read: see the module's invariants.
            notified.as_mut().enable();
            let s = shared.state.load(SeqCst);
            if let Some(r) = reason(s) {
                return Some(r);
            }
            if s & CLOSED != 0 {
                return None;
            }
            notified.await;
        }
    }
}

struct WaitingGuard<'a>(&'a Shared);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, SeqCst);
    }
}

fn code(reason: LostReason) -> u8 {
    match reason {
        LostReason::Expired => 1,
        LostReason::Closed => 2,
        LostReason::SessionEnded => 3,
        LostReason::Unreachable => 4,
        LostReason::Forgotten => 5,
        LostReason::Revoked => 6,
    }
}

fn reason(state: u8) -> Option<LostReason> {
    Some(match state & REASON {
        1 => LostReason::Expired,
        2 => LostReason::Closed,
        3 => LostReason::SessionEnded,
        4 => LostReason::Unreachable,
        5 => LostReason::Forgotten,
        6 => LostReason::Revoked,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ALL: [LostReason; 6] = [
        LostReason::Expired,
        LostReason::Closed,
        LostReason::SessionEnded,
        LostReason::Unreachable,
        LostReason::Forgotten,
        LostReason::Revoked,
    ];

    #[test]
    fn every_reason_round_trips() {
        for r in ALL {
            assert_eq!(reason(code(r)), Some(r));
            assert_eq!(reason(code(r) | CLOSED), Some(r));
        }
        assert_eq!(reason(0), None);
        assert_eq!(reason(CLOSED), None);
    }

    /// A task waiting on `rx`, returned once it is counted in: what is sent after this goes
    /// through the wake-up path, not the first look.
    async fn waiting(rx: &LostReceiver) -> tokio::task::JoinHandle<Option<LostReason>> {
        let waiter = tokio::spawn({
            let rx = rx.clone();
            async move { rx.wait().await }
        });
        while rx.shared.waiting.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[tokio::test]
    async fn a_waiter_hears_a_loss_sent_while_it_waits() {
        let (tx, rx) = channel();
        let waiter = waiting(&rx).await;
        tx.send(LostReason::Revoked);
        assert_eq!(
            waiter.await.expect("the waiter ran"),
            Some(LostReason::Revoked)
        );
        assert_eq!(rx.reason(), Some(LostReason::Revoked));
        // A waiter that comes later sees it at once, and the sender's end keeps it.
        drop(tx);
        assert_eq!(rx.wait().await, Some(LostReason::Revoked));
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_wait_without_a_loss() {
        let (tx, rx) = channel();
        let waiter = waiting(&rx).await;
        drop(tx);
        assert_eq!(waiter.await.expect("the waiter ran"), None);
        assert_eq!(rx.reason(), None);
    }

    #[tokio::test]
    async fn a_cancelled_wait_is_counted_out() {
        let (tx, rx) = channel();
        let r = tokio::time::timeout(Duration::from_millis(1), rx.wait()).await;
        assert!(r.is_err(), "nothing was sent");
        assert_eq!(rx.shared.waiting.load(SeqCst), 0);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed(), "the last receiver went");
    }

    #[test]
    fn many_threads_never_miss_the_loss() {
        // Races the sender against waiters entering `wait` on other threads: a missed
        // wake-up would hang a waiter (the test's timeout catches it).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("a test runtime");
        rt.block_on(async {
            for i in 0..500 {
                let (tx, rx) = channel();
                let waiters: Vec<_> = (0..4)
                    .map(|_| {
                        let rx = rx.clone();
                        tokio::spawn(async move { rx.wait().await })
                    })
                    .collect();
                if i % 2 == 0 {
                    tx.send(LostReason::Expired);
                } else {
                    drop(tx);
                }
                for w in waiters {
                    let got = tokio::time::timeout(Duration::from_secs(10), w)
                        .await
                        .expect("a waiter missed its wake-up")
                        .expect("the waiter ran");
                    assert_eq!(got, (i % 2 == 0).then_some(LostReason::Expired));
                }
            }
        });
    }
}
