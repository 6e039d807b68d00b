//! The write side of the link, shared by the callers and the driver.
//!
//! A caller whose request is the only one awaited on its client writes the frame itself:
//! going through the driver would cost a channel send and a task hand-off per request,
//! about a tenth of the client's CPU with one caller per client. Everything else (requests
//! of a caller among others in flight, or among callers woken by the same read, which the
//! driver coalesces into one write; TLS links; no link at all) still goes through the
//! driver.
//!
//! # Rules
//! - Frames reach the socket whole and in the order they were put in [`Writer::out`]: every
//!   write happens under the lock, from the front of `out`, and a write that leaves bytes
//!   behind leaves them at the front for the next writer. A write that has to wait (a full
//!   send buffer) is the driver's: it takes the write half out of the lock while it waits,
//!   and callers find no write half and go through the driver meanwhile.
//! - A caller records its request (in [`Shared::book`]) before the write that sends it, in
//!   the same critical section, so the driver, which takes the records before it handles
//!   what it read, has the record of every request whose answer it has read. The records
//!   have a lock of their own, taken inside the writer's lock and never the other way
//!   round: the driver takes them without waiting for a caller's write, a system call
//!   during which the answer often arrives already (measured: the driver's wait for the
//!   writer's lock was the client's hottest user-space function at 64 clients).
//! - The driver takes the write half away when the link breaks and when it stops, under the
//!   writer's lock, then takes the records: a request written on a dead link is pending like
//!   any other and goes out again after the reconnect; one recorded after the driver stopped
//!   cannot exist, so no caller waits for an answer nobody will read.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use super::reader::Inbox;
use super::wire::encode;
use super::*;

/// What callers and the driver share to write and to read.
pub(super) struct Shared {
    writer: Mutex<Writer>,
    /// The callers' records, and what callers that read their own answers settled (see
    /// `reader`). Records are pushed only under the writer's lock, with the write half
    /// present.
    book: Mutex<Book>,
    /// The read side of the link (see `reader`).
    pub(super) inbox: Mutex<Inbox>,
    /// The caller whose waker the link's read readiness holds (see `reader`): its request
    /// id, 0 if none. Changed only under the inbox lock; read without it.
    pub(super) reading: AtomicU32,
    /// Request ids, handed out to callers and the driver alike (0 is never used).
    next_id: AtomicU32,
    /// Calls whose callers wait for the answer: counted when sent, uncounted by the driver
    /// when it hands the answer (or an error) over. A caller that finds none writes its
    /// own frame; one that finds others leaves it to the driver, whose one write then
    /// carries the frames of every caller woken by the same read (ARCHITECTURE invariant 25).
    pub(super) waiting: AtomicUsize,
    /// The driver's last read answered several callers' calls: they are about to send their
    /// next ones together, and the first of them to find nothing in flight would otherwise
    /// write alone, ahead of the driver's one write for the rest (measured: 64 callers on one
    /// client lost about 7% so). Cleared by the next read that answers at most one.
    pub(super) crowd: AtomicBool,
    /// The first lease id this client numbers from (random high bits: see `lease_id_base`).
    lease_base: u64,
    /// The next lease id to hand out: `lease_base..next_lease` are the ids this client has
    /// used, which is how the driver tells its own leases from those of other clients of a
    /// shared session.
    next_lease: AtomicU64,
}

pub(super) struct Writer {
    /// The write half of the link: `None` while there is no link, and while the driver
    /// waits on a write (see the module doc).
    pub(super) wr: Option<LinkWrite>,
    /// Frames not yet written, in order.
    pub(super) out: Vec<u8>,
}

/// What callers leave for the driver: the records of the requests they wrote, and what they
/// settled from answers they read themselves (see `reader`). The driver takes it all at once
/// (`Driver::take_written`), so it never sees an answer settled for a record it lacks.
#[derive(Default)]
pub(super) struct Book {
    /// Requests written (or put in `out`) by callers, for the driver to count as pending.
    pub(super) records: Vec<(u32, Pending)>,
    /// Leases granted by answers a caller read: the driver watches them for loss.
    pub(super) granted: Vec<(u64, LostSender)>,
    /// Leases released by answers a caller read, which the driver may be watching.
    pub(super) released: Vec<u64>,
}

impl Book {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.granted.is_empty() && self.released.is_empty()
    }
}

/// A request a caller hands to [`Shared::send`], given back when it must go through the
/// driver instead.
pub(super) struct Own {
    pub(super) req: Req,
    pub(super) reply: Option<Reply>,
    /// For an acquire: fires when the lease is lost.
    pub(super) lost: Option<LostSender>,
    /// Fail the call with `Unavailable` once the session's leases have surely expired on
    /// the coordinator (see [`Until::LeaseGone`]).
    pub(super) until_gone: bool,
}

/// What [`Shared::send`] did.
pub(super) enum Sent {
    /// The frame, of this request id, is on the socket.
    Written(u32),
    /// The frame, of this request id, is queued behind others: the driver must be woken to
    /// write it.
    Queued(u32),
    /// Not taken: send it through the driver.
    Refused(Own),
}

impl Shared {
    pub(super) fn new(wr: LinkWrite, link: Link, lease_base: u64) -> Shared {
        Shared {
            writer: Mutex::new(Writer {
                wr: Some(wr),
                out: Vec::with_capacity(512),
            }),
            book: Mutex::new(Book::default()),
            inbox: Mutex::new(Inbox::new(link)),
            reading: AtomicU32::new(0),
            next_id: AtomicU32::new(1),
            waiting: AtomicUsize::new(0),
            crowd: AtomicBool::new(false),
            lease_base,
            next_lease: AtomicU64::new(lease_base),
        }
    }

    /// A fresh lease id.
    pub(super) fn new_lease(&self) -> u64 {
        self.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether this client handed out `lease` (another client sharing the session did not).
    pub(super) fn is_own_lease(&self, lease: u64) -> bool {
        (self.lease_base..self.next_lease.load(Ordering::Relaxed)).contains(&lease)
    }

    /// The lock. A panic while it was held leaves nothing half-done that matters here (the
    /// worst is a frame cut short, which the coordinator refuses by closing the link, and the
    /// driver then re-sends everything pending), so a poisoned lock is used as it is.
    pub(super) fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock if it is free. A holder other than the driver either writes everything
    /// `out` holds or wakes the driver when it leaves bytes there, so the driver's turn may
    /// skip the shared buffer while a caller holds it, rather than wait through the caller's
    /// write (a futex sleep and wake-up each time, when a dropped permit's release and the
    /// next acquire meet the driver's turn).
    pub(super) fn try_lock(&self) -> Option<MutexGuard<'_, Writer>> {
        match self.writer.try_lock() {
            Ok(w) => Some(w),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The next request id.
    pub(super) fn take_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// The id the next request will get, for ordering re-sends across the wrap of the ids.
    pub(super) fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// A caller's own write: encodes `own` behind whatever `out` holds, writes as much as
    /// the socket takes, and records the request for the driver. `counted`: the request is
    /// counted in [`Shared::waiting`].
    pub(super) fn send(&self, own: Own, counted: bool, health: &Health) -> Sent {
        let mut w = self.lock();
        let w = &mut *w;
        // A TLS link writes only with `write_all`, which waits: that stays with the driver.
        let Some(wr) = w.wr.as_ref().filter(|wr| wr.is_plain()) else {
            return Sent::Refused(own);
        };
        let id = self.take_id();
        let mark = w.out.len();
        encode(id, &own.req, &mut w.out);
        if w.out.len() - mark - 4 > proto::MAX_REQUEST_FRAME {
            // The driver fails it with its reason.
            w.out.truncate(mark);
            return Sent::Refused(own);
        }
        // No later than the send, as the contact mark needs.
        let sent_at = Instant::now();
        // Recorded before it is written: its answer may be read as soon as it is.
        self.record(
            id,
            Pending {
                req: own.req,
                reply: own.reply,
                lost: own.lost,
                sent_at,
                resent: false,
                until_gone: own.until_gone,
                counted,
            },
        );
        #[cfg(test)]
        {
            health.writes.fetch_add(1, Ordering::Relaxed);
            health.own_writes.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(not(test))]
        let _ = health;
        match wr.try_write(&w.out) {
            Ok(n) if n == w.out.len() => w.out.clear(),
            Ok(n) => drop(w.out.drain(..n)),
            // A full send buffer: the driver waits for room. A broken link: its read fails
            // too, and everything pending goes out again on the next one.
            Err(_) => {}
        }
        if w.out.is_empty() {
            Sent::Written(id)
        } else {
            Sent::Queued(id)
        }
    }

    /// Queues a release without writing it, for the next write (a caller's own, or the
    /// driver's, which the caller wakes): a dropped permit's release then shares the write
    /// of the request that usually follows it. Gives the release back if there is no link
    /// a caller may write on.
    pub(super) fn queue_release(&self, lease: u64) -> Result<(), u64> {
        let mut w = self.lock();
        if !w.wr.as_ref().is_some_and(LinkWrite::is_plain) {
            return Err(lease);
        }
        let id = self.take_id();
        let req = Req::Release { lease };
        encode(id, &req, &mut w.out);
        self.record(
            id,
            Pending {
                req,
                reply: None,
                lost: None,
                sent_at: Instant::now(),
                resent: false,
                until_gone: false,
                counted: false,
            },
        );
        Ok(())
    }

    /// Records a caller's request for the driver. Called with the writer's lock held (the
    /// lock order: writer, then records).
    fn record(&self, id: u32, p: Pending) {
        self.book().records.push((id, p));
    }

    /// The book's lock (poisoning ignored, as for the writer's).
    pub(super) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swaps the book with `into` (empty) if it holds anything. Never waits for a caller's
    /// write.
    pub(super) fn take_book(&self, into: &mut Book) -> bool {
        let mut b = self.book();
        if b.is_empty() {
            return false;
        }
        std::mem::swap(&mut *b, into);
        true
    }
}
