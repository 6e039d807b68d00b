//! A runtime for blocking callers in which the calling thread drives the I/O while it waits.
//!
//! The blocking facade ([`crate::blocking`]) and the Python package used to run the client on a
//! runtime with one worker thread: every request went caller → channel → worker (a futex wake)
//! → reply → caller (another wake), two thread hand-offs per request. Here a lone caller in a
//! tight loop does its own I/O and never hands off, while a background *keeper* thread still
//! drives the client (keep-alives, loss detection, events, reconnects, spawned tasks) whenever
//! no caller is waiting.
//!
//! # How
//!
//! The runtime is tokio's `current_thread` scheduler. Its `Runtime::block_on` may be called from
//! several threads at once: the one that takes the scheduler's *core* runs every task and the
//! I/O and timer drivers until its own future completes, then puts the core back and wakes one
//! other thread waiting in `block_on`; the others poll only their own futures (woken by the
//! holder) while they wait for the core (tokio 1.54, `scheduler/current_thread/mod.rs`:
//! `CurrentThread::block_on`, `take_core`, `CoreGuard::drop`).
//!
//! The keeper is a thread that holds the core only while no caller is inside
//! [`DrivenRuntime::block_on`]: its own `block_on` future completes as soon as a caller
//! arrives (the caller counts itself in, then notifies it), which hands the core over, once,
//! at the start of a burst of calls. It takes the core back only after no caller has entered
//! or left for a whole [`GRACE`]: a tight loop of calls (or of calls with short work between
//! them) finds the core free and takes it at once, with no thread switch.
//!
//! # Spinning before sleeping
//!
//! On this kind of machine (a VM), a thread that sleeps in `epoll_wait` lets its virtual CPU
//! halt, and waking a halted CPU for the answer costs tens of microseconds, more than the
//! round trip itself: one Python thread's acquire+release pair took 65–73 µs with the
//! machine idle, 15–26 µs when both CPUs happened to be awake. So a caller first polls for its
//! answer for up to `SPIN` (20 µs), yielding the CPU to any other runnable thread between polls; if
//! another thread did run (the CPUs are busy, and a sleep costs no wake-up from idle) or the
//! answer did not come in time, it sleeps as before, and the next calls skip the spin for a
//! while (`Spin`: 1, 2, 4... up to `MAX_SKIP` calls), so a wait that spinning does not
//! shorten costs at most a few microseconds of CPU per call on average.
//!
//! # Invariants
//!
//! - **Who drives.** At any moment the core is held by a caller inside `block_on` (which runs
//!   every task and driver while it waits), by the keeper, or by nobody. Nobody holds it only
//!   when no caller is inside `block_on` (or one is just taking it after another left), and then
//!   for at most two [`GRACE`] periods plus the keeper's wake-up: the keeper checks every
//!   `GRACE` whether any caller entered or left since its last check, and takes the core on the
//!   first check that finds none. So no timer fires later than that: keep-alives at a third of
//!   the TTL and the client's loss detection at 90% of it are late by milliseconds.
//! - **No hand-off for a lone caller.** A caller hands off only when the keeper holds the core
//!   as it arrives (after a quiet spell of at least `GRACE`), or when another caller holds it.
//!   Several threads sharing one client: one drives, the others wait for their replies; their
//!   requests are still queued on the one driver task, which writes all that are queued at once.
//! - **Tasks run on callers' threads.** A task may run on any thread that calls `block_on`, so a
//!   task that needs a lock a caller may hold while it calls `block_on` (Python's GIL) could
//!   deadlock: callers must release such locks before they call `block_on` (the Python package
//!   detaches from the interpreter first).
//! - **Drop.** Dropping the runtime stops the keeper and joins it (it leaves its `block_on`, so
//!   the core is back), then shuts the runtime down on the dropping thread (in the background if
//!   that thread is itself inside an async context, where tokio may not block). Owners end their
//!   sessions with `block_on` *before* dropping the runtime (see `blocking::Shared`).
//! - **Fork.** The child of a `fork` has the runtime's memory but neither the keeper nor any
//!   caller thread, and the core may be marked as taken by a thread that does not exist there;
//!   such a runtime must be forgotten (never dropped) in the child, and a new one made (the
//!   Python package remembers the pid that made its runtime).
//! - `block_on` from inside an async context panics, as tokio's does.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the keeper waits after the last call before it drives the runtime again. Short
/// enough that a timer is at most a few milliseconds late (see the module doc), long enough
/// that a caller looping over calls with work between them keeps the core.
pub const GRACE: Duration = Duration::from_millis(5);

/// How long a caller polls for its answer before it lets its thread sleep.
const SPIN: Duration = Duration::from_micros(20);
/// A `sched_yield` that takes this long let another thread run.
const YIELDED: Duration = Duration::from_micros(5);
/// After a spin that did not pay, the calls that skip spinning before the next try, at most.
const MAX_SKIP: u32 = 64;

/// Whether spinning pays: after a spin that saw no answer, the next calls skip it (1, 2, 4...
/// up to [`MAX_SKIP`] calls) before one tries again; a spin that saw its answer resets that.
#[derive(Debug, Default)]
struct Spin {
    /// Calls left to skip.
    skip: AtomicU32,
    /// How many the next miss makes skip.
    backoff: AtomicU32,
}

impl Spin {
    fn should_spin(&self) -> bool {
        let left = self.skip.load(Ordering::Relaxed);
        if left == 0 {
            return true;
        }
        self.skip.store(left - 1, Ordering::Relaxed);
        false
    }

    fn paid(&self, paid: bool) {
        if paid {
            self.backoff.store(0, Ordering::Relaxed);
        } else {
            let next = (self.backoff.load(Ordering::Relaxed) * 2).clamp(1, MAX_SKIP);
            self.backoff.store(next, Ordering::Relaxed);
            self.skip.store(next, Ordering::Relaxed);
        }
    }
}

/// What the callers and the keeper share.
#[derive(Debug)]
struct Inner {
    rt: tokio::runtime::Runtime,
    /// Callers inside `block_on`.
    callers: AtomicUsize,
    /// Calls that have ended, so the keeper can tell a quiet spell from a busy one.
    calls: AtomicU64,
    /// Notified by each arriving caller; the keeper gives the core up when woken.
    arrived: tokio::sync::Notify,
    stop: AtomicBool,
    /// The keeper's sleep between checks; notified only to stop it.
    stop_lock: Mutex<()>,
    stop_wake: Condvar,
    /// How many times the keeper took the core (for tests and measurements).
    keeper_turns: AtomicU64,
    /// Whether callers poll for a while before sleeping.
    spin: Spin,
}

/// A `current_thread` runtime driven by whichever thread waits on it, and by a keeper thread
/// while none does. See the module doc.
#[derive(Debug)]
pub struct DrivenRuntime {
    /// `None` only while dropping.
    inner: Option<Arc<Inner>>,
    keeper: Option<JoinHandle<()>>,
}

impl DrivenRuntime {
    /// Builds the runtime (I/O and timers enabled) and starts its keeper thread, named `name`.
    pub fn new(name: &str) -> std::io::Result<DrivenRuntime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .thread_name(name)
            .enable_all()
            .build()?;
        let inner = Arc::new(Inner {
            rt,
            callers: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            arrived: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            stop_lock: Mutex::new(()),
            stop_wake: Condvar::new(),
            keeper_turns: AtomicU64::new(0),
            spin: Spin::default(),
        });
        let for_keeper = inner.clone();
        let keeper = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || keep(&for_keeper))?;
        Ok(DrivenRuntime {
            inner: Some(inner),
            keeper: Some(keeper),
        })
    }

    fn inner(&self) -> &Inner {
        self.inner
            .as_ref()
            .expect("invariant: inner is Some until drop")
    }

    /// Runs `future` to completion on this thread, driving the runtime's tasks and I/O while
    /// it waits (or waiting for the thread that does). Panics inside an async context.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let inner = self.inner();
        inner.callers.fetch_add(1, Ordering::SeqCst);
        // If the keeper holds the core it gives it up; otherwise this leaves a permit that
        // only makes the keeper's next turn check the count once more.
        inner.arrived.notify_one();
        let _leave = Leave(inner);
        let spin = inner.spin.should_spin();
        inner.rt.block_on(async {
            let mut future = std::pin::pin!(future);
            if !spin {
                return future.await;
            }
            let spin_end = std::time::Instant::now() + SPIN;
            loop {
                let polled = std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
                    std::task::Poll::Pending => std::task::Poll::Ready(None),
                })
                .await;
                if let Some(v) = polled {
                    inner.spin.paid(true);
                    return v;
                }
                if std::time::Instant::now() >= spin_end {
                    inner.spin.paid(false);
                    return future.await;
                }
                // Any other runnable thread of this machine (the coordinator, other
                // clients) goes first: the spin only fills time the CPU would idle. If one
                // ran, the CPUs are busy, and sleeping costs no wake-up from idle: stop.
                let before = std::time::Instant::now();
                std::thread::yield_now();
                if before.elapsed() >= YIELDED {
                    inner.spin.paid(false);
                    return future.await;
                }
                tokio::task::yield_now().await;
            }
        })
    }

    /// Spawns a task; it runs on whichever thread drives the runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner().rt.spawn(future)
    }

    /// The runtime's handle.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.inner().rt.handle()
    }

    /// How many times the keeper thread has taken the runtime over since it started: once at
    /// the start, then once after each quiet spell. A measure of hand-offs, for tests.
    pub fn keeper_turns(&self) -> u64 {
        self.inner().keeper_turns.load(Ordering::SeqCst)
    }
}

/// Counts a caller out of `block_on`, even when its future panicked.
struct Leave<'a>(&'a Inner);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // The end is counted before the caller: a keeper that sees no caller and no new end
        // since its last check knows nobody came or went in between.
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        self.0.callers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The keeper thread: waits for a quiet spell, drives the runtime until a caller arrives,
/// again until told to stop.
fn keep(inner: &Inner) {
    loop {
        // Wait for a whole GRACE with no caller inside and none coming or going.
        let mut seen = inner.calls.load(Ordering::SeqCst);
        loop {
            let guard = inner.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
            if inner.stop.load(Ordering::SeqCst) {
                return;
            }
            let (guard, _) = inner
                .stop_wake
                .wait_timeout(guard, GRACE)
                .unwrap_or_else(|e| e.into_inner());
            drop(guard);
            if inner.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = inner.calls.load(Ordering::SeqCst);
            if now == seen && inner.callers.load(Ordering::SeqCst) == 0 {
                break;
            }
            seen = now;
        }
        inner.keeper_turns.fetch_add(1, Ordering::SeqCst);
        // Drives every task and driver until a caller arrives (or a stop): then the core goes
        // back, and tokio wakes the caller waiting for it.
        inner.rt.block_on(async {
            loop {
                let arrived = inner.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if inner.callers.load(Ordering::SeqCst) > 0 || inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                arrived.await;
            }
        });
    }
}

impl Drop for DrivenRuntime {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        inner.stop.store(true, Ordering::SeqCst);
        {
            let _guard = inner.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
            inner.stop_wake.notify_all();
        }
        inner.arrived.notify_one();
        if let Some(keeper) = self.keeper.take() {
            if keeper.thread().id() == std::thread::current().id() {
                // Dropped by a task the keeper was running: it cannot wait for itself. Its
                // loop sees `stop` when the task ends, and drops the last reference.
                return;
            }
            // The keeper only waits for the core and for its own quick future; it returns.
            let _ = keeper.join();
        }
        if let Ok(inner) = Arc::try_unwrap(inner) {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Tokio may not block here; the tasks are dropped without waiting.
                inner.rt.shutdown_background();
            }
            // Otherwise `inner` (and the runtime) drops here, on this thread.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::mpsc;
    use std::thread::ThreadId;
    use std::time::Instant;
    use tokio::sync::{mpsc as amp, oneshot};

    /// A spin that did not pay makes the next calls skip spinning, twice as many after each
    /// further miss up to `MAX_SKIP`; one that paid makes the next call spin again.
    #[test]
    fn spinning_backs_off_while_it_does_not_pay() {
        let spin = Spin::default();
        assert!(spin.should_spin());
        let mut skipped = Vec::new();
        for _ in 0..8 {
            spin.paid(false);
            let mut n = 0;
            while !spin.should_spin() {
                n += 1;
            }
            skipped.push(n);
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16, 32, 64, 64]);
        spin.paid(true);
        assert!(spin.should_spin());
        spin.paid(false);
        assert!(
            !spin.should_spin(),
            "a miss after a paid spin skips one call"
        );
        assert!(spin.should_spin());
    }

    type Request = (u64, oneshot::Sender<u64>);

    /// A stand-in for the client's driver task: answers each request with its number plus
    /// one, and counts the threads that polled it.
    fn echo(
        rt: &DrivenRuntime,
    ) -> (
        amp::UnboundedSender<Request>,
        Arc<Mutex<HashMap<ThreadId, u64>>>,
    ) {
        let (tx, mut rx) = amp::unbounded_channel::<Request>();
        let polls = Arc::new(Mutex::new(HashMap::new()));
        let p = polls.clone();
        rt.spawn(async move {
            while let Some((n, reply)) = rx.recv().await {
                *p.lock()
                    .expect("invariant: no test thread panics holding the count")
                    .entry(std::thread::current().id())
                    .or_insert(0) += 1;
                let _ = reply.send(n + 1);
            }
        });
        (tx, polls)
    }

    fn call(rt: &DrivenRuntime, tx: &amp::UnboundedSender<Request>, n: u64) -> u64 {
        rt.block_on(async {
            let (reply, answer) = oneshot::channel();
            tx.send((n, reply)).expect("the echo task runs");
            answer.await.expect("the echo task answers")
        })
    }

    /// A lone caller looping over calls serves its requests on its own thread: the "driver"
    /// is polled by the caller, not by the keeper or any other thread. (On a one-worker
    /// multi-thread runtime every poll was on the worker.)
    #[test]
    fn a_lone_caller_drives_its_own_requests() {
        let rt = DrivenRuntime::new("driven-test").expect("runtime");
        let (tx, polls) = echo(&rt);
        const CALLS: u64 = 5000;
        for n in 0..CALLS {
            assert_eq!(call(&rt, &tx, n), n + 1);
        }
        let polls = polls
            .lock()
            .expect("invariant: no test thread panics holding the count");
        let mine = polls
            .get(&std::thread::current().id())
            .copied()
            .unwrap_or(0);
        // The keeper may serve the first request, and again after this thread was descheduled
        // for longer than GRACE on a loaded machine; nearly all are served here.
        assert!(
            mine >= CALLS * 9 / 10,
            "only {mine} of {CALLS} requests were served by the calling thread: {polls:?}"
        );
    }

    /// With no caller inside `block_on`, the keeper drives the tasks (timers included).
    #[test]
    fn the_keeper_drives_while_nobody_calls() {
        let rt = DrivenRuntime::new("driven-test").expect("runtime");
        let (done, finished) = mpsc::channel();
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = done.send(std::thread::current().id());
        });
        let by = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("the keeper ran the task's timer");
        assert_ne!(by, std::thread::current().id());
        // And a caller arriving afterwards takes the runtime over.
        let (tx, _) = echo(&rt);
        assert_eq!(call(&rt, &tx, 1), 2);
    }

    /// Many threads calling at once: each gets its own answers, nobody is stuck, and a thread
    /// that waits long (for a reply that only comes later) does not block the others.
    #[test]
    fn many_callers_share_the_runtime() {
        let rt = Arc::new(DrivenRuntime::new("driven-test").expect("runtime"));
        let (tx, _) = echo(&rt);
        let (late_tx, late_rx) = oneshot::channel::<u64>();
        let waiter = {
            let rt = rt.clone();
            std::thread::spawn(move || rt.block_on(late_rx).expect("answered"))
        };
        let workers: Vec<_> = (0..16u64)
            .map(|t| {
                let (rt, tx) = (rt.clone(), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let n = t * 1_000_000 + i;
                        assert_eq!(call(&rt, &tx, n), n + 1, "thread {t} got another's reply");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a worker finished");
        }
        late_tx.send(7).expect("the waiter waits");
        assert_eq!(waiter.join().expect("the waiter finished"), 7);
    }

    /// Dropping the runtime while the keeper drives it, and from inside an async context,
    /// neither hangs nor panics.
    #[test]
    fn drop_stops_the_keeper() {
        let rt = DrivenRuntime::new("driven-test").expect("runtime");
        let start = Instant::now();
        while rt.keeper_turns() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the keeper never took over"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        rt.spawn(std::future::pending::<()>());
        drop(rt);

        let rt = DrivenRuntime::new("driven-test").expect("runtime");
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("outer runtime");
        outer.block_on(async move { drop(rt) });
    }
}
