//! The read side of the link, shared by the driver and the callers.
//!
//! A caller that wrote its own request (see `writer`) also reads its own answer. Through the
//! driver, every answer cost two task polls (the driver woken by the socket, then the caller
//! woken by the driver's channel) and the driver's turn around them. Read by its caller, an
//! answer costs one task woken by the socket, as for a bare socket client (64 clients: the
//! bench's CPU per pair 7.75 µs before, 7.5 µs after, 7.0 µs for bare frames). What needs
//! the driver (events, answers to its own requests) is still handled by the driver, in order.
//!
//! # Rules
//! - Frames are taken from the front of the link's buffer, in order, under the inbox lock,
//!   by the driver or by one caller at a time. Callers only try the lock, so a caller never
//!   waits for the driver's turn; it then waits for its answer on its channel, as any
//!   caller whose request went through the driver does.
//! - A caller settles only answers to requests whose records are still in the book (that
//!   the driver has not taken), and of those not a grant nobody waits for (the driver gives
//!   it back) nor a "session not found" (the driver opens a new session). At the first other
//!   frame (an event, a bad frame, any other answer) it stops, marks the buffer unread and
//!   wakes the driver, which handles the rest in order. What it settled that the
//!   driver must know (leases granted, leases released) goes in the book, which the driver
//!   takes before it handles any frame or deadline; the contact mark and the time last heard
//!   go in `Health`.
//! - A caller that settles its own answer closes the channel it also waited on before the
//!   channel's sender (kept in the record) is dropped: the drop would otherwise wake the
//!   caller once more, for a poll that finds nothing.
//! - The link's read readiness wakes one task: the last one that polled it and found
//!   nothing. A caller that does so becomes the reader (`Shared::reading`). When it stops
//!   waiting (answered, gave up, or dropped), it gives the readiness back: it polls once more
//!   with the driver's waker, and wakes the driver if that finds bytes. The driver leaves
//!   the readiness to a reading caller while it has no request of its own in flight (a
//!   dropped permit's release wakes it on every pair, and taking the readiness each time
//!   sent every answer back through it); otherwise, and on every turn of its timer, it takes
//!   the readiness back. So at every moment the readiness wakes the reader, or wakes the
//!   driver, or the driver is already woken; a reader whose task stops polling its wait
//!   without dropping it holds up the driver's reads until the next keep-alive at most.

use std::future::Future;
use std::sync::{MutexGuard, PoisonError, TryLockError};
use std::task::{Context, Poll, Waker};

use super::wire::{owned, result_of};
use super::writer::{Book, Shared};
use super::*;

/// The read side of the link, under [`Shared::inbox`].
pub(super) struct Inbox {
    /// `None` while there is no link.
    pub(super) link: Option<Link>,
    /// The buffer may hold whole frames that a caller left to the driver: its next read
    /// handles them before it waits for more.
    unread: bool,
    /// The driver's waker, to give the readiness back to.
    driver: Option<Waker>,
}

impl Inbox {
    pub(super) fn new(link: Link) -> Inbox {
        Inbox {
            // Events that came with the handshake.
            unread: !link.buf.is_empty(),
            link: Some(link),
            driver: None,
        }
    }
}

/// Reads what the socket has into the link's buffer. Cancel-safe: the read future either
/// reads or does nothing.
fn poll_read(link: &mut Link, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    // Room for many replies, so that one read takes every frame that has arrived.
    link.buf.reserve(READ_CHUNK);
    std::pin::pin!(link.rd.read_buf(&mut link.buf)).poll(cx)
}

/// How a caller's read ended.
enum Stop {
    /// Its answer is settled.
    Answered,
    /// Nothing more to read: its waker waits for the socket.
    Reading,
    /// A frame or an end of the link that is the driver's to handle.
    Driver,
}

impl Shared {
    /// The inbox lock, for the driver (poisoning ignored, as for the writer's).
    pub(super) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The driver's read: ready when there are bytes in the link's buffer to handle, or the
    /// link failed; pending while there is no link. With `defer`, a caller that is reading
    /// keeps the readiness (it wakes the driver for what is not its to handle); otherwise
    /// the driver takes it back.
    pub(super) fn poll_driver_read(
        &self,
        cx: &mut Context<'_>,
        defer: bool,
    ) -> Poll<Result<(), String>> {
        let mut inbox = self.inbox();
        let inbox = &mut *inbox;
        if !inbox
            .driver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inbox.driver = Some(cx.waker().clone());
        }
        let Some(link) = inbox.link.as_mut() else {
            return Poll::Pending;
        };
        if std::mem::take(&mut inbox.unread) {
            return Poll::Ready(Ok(()));
        }
        if defer && self.reading.load(Ordering::Relaxed) != 0 {
            return Poll::Pending;
        }
        self.reading.store(0, Ordering::Relaxed);
        poll_read(link, cx).map(|r| match r {
            Ok(0) => Err("the coordinator closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read failed: {e}")),
        })
    }

    /// Puts a new link in place (the driver, after connecting).
    pub(super) fn set_link(&self, link: Link) {
        let mut inbox = self.inbox();
        // A reader of the old link is not one of this link.
        self.reading.store(0, Ordering::Relaxed);
        inbox.unread = !link.buf.is_empty();
        inbox.link = Some(link);
    }

    /// Takes the link away (the driver, when it breaks or the driver stops): whether there
    /// was one. A caller that was its reader waits on its channel from here, like any other.
    pub(super) fn drop_link(&self) -> bool {
        let mut inbox = self.inbox();
        self.reading.store(0, Ordering::Relaxed);
        inbox.unread = false;
        inbox.link.take().is_some()
    }

    /// A caller's read for the answer to its request `id`, which it wrote itself: the answer
    /// if this read settled it. Otherwise the caller waits on its channel, and on the socket
    /// too if it became the reader.
    pub(super) fn read_for(
        &self,
        id: u32,
        cx: &mut Context<'_>,
        health: &Health,
        rx: &mut oneshot::Receiver<Result<Answer, Error>>,
    ) -> Option<Result<Answer, Error>> {
        let mut inbox = match self.inbox.try_lock() {
            Ok(inbox) => inbox,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // The driver, or another caller, is reading: it settles our answer if it comes.
            Err(TryLockError::WouldBlock) => return None,
        };
        let inbox = &mut *inbox;
        let link = inbox.link.as_mut()?;
        if !link.rd.is_plain() {
            // A TLS read may need a write of its own: the driver's.
            return None;
        }
        let mut mine = None;
        let mut answered = 0;
        let stop = loop {
            if !self.settle(&mut link.buf, id, &mut mine, &mut answered, health) {
                break Stop::Driver;
            }
            if mine.is_some() {
                break Stop::Answered;
            }
            match poll_read(link, cx) {
                Poll::Pending => break Stop::Reading,
                Poll::Ready(Ok(n)) if n > 0 => health.heard(Instant::now()),
                // Closed or failed: the driver reads it again and reconnects.
                Poll::Ready(_) => break Stop::Driver,
            }
        };
        if answered > 1 {
            // As the driver's reads do; only the driver's clear it.
            self.crowd.store(true, Ordering::Relaxed);
        }
        match stop {
            Stop::Reading => self.reading.store(id, Ordering::Relaxed),
            Stop::Answered => self.give_back(inbox),
            Stop::Driver => {
                self.reading.store(0, Ordering::Relaxed);
                inbox.unread = true;
                if let Some(driver) = &inbox.driver {
                    driver.wake_by_ref();
                }
            }
        }
        let (result, tx) = mine?;
        // The channel the answer did not take is closed before its sender goes: dropping the
        // sender of a channel this task waited on would wake the task, for a poll that finds
        // nothing (measured: 2.8 polls per answer instead of 2).
        rx.close();
        drop(tx);
        Some(result)
    }

    /// A caller that read for request `id` stops waiting: if it is still the reader, the
    /// readiness goes back to the driver.
    pub(super) fn stop_reading(&self, id: u32) {
        // Most waits end with their answer read by the driver after it took the readiness
        // back: nothing to give, and no lock to wait for while the driver handles a read.
        if self.reading.load(Ordering::Relaxed) != id {
            return;
        }
        let mut inbox = self.inbox();
        if self.reading.load(Ordering::Relaxed) == id {
            self.give_back(&mut inbox);
        }
    }

    /// The reader gives the readiness back to the driver: it polls the link with the driver's
    /// waker, and wakes the driver if that finds bytes or the link's end.
    fn give_back(&self, inbox: &mut Inbox) {
        self.reading.store(0, Ordering::Relaxed);
        let (Some(link), Some(driver)) = (inbox.link.as_mut(), inbox.driver.as_ref()) else {
            // No link, or a driver that has not read yet: it polls the link when it does.
            return;
        };
        let mut cx = Context::from_waker(driver);
        if poll_read(link, &mut cx).is_ready() {
            inbox.unread = true;
            driver.wake_by_ref();
        }
    }

    /// Settles the whole frames at the front of `buf` that a caller may (see the module
    /// doc), delivering each answer to its caller, or into `mine` for request `id`. False
    /// if it stopped at a frame the driver must handle.
    fn settle(
        &self,
        buf: &mut Vec<u8>,
        id: u32,
        mine: &mut Option<(Result<Answer, Error>, Option<Reply>)>,
        answered: &mut usize,
        health: &Health,
    ) -> bool {
        let mut pos = 0;
        let mut ours = true;
        let mut book = None;
        loop {
            let (payload, used) = match split_frame(&buf[pos..], MAX_REPLY_FRAME) {
                Ok(Some(frame)) => frame,
                // Not whole yet.
                Ok(None) => break,
                // A bad frame, which the driver reports.
                Err(_) => {
                    ours = false;
                    break;
                }
            };
            let result = match decode_reply(payload) {
                Ok((to, reply)) if to != 0 => result_of(owned(reply)).map(|r| (to, r)),
                _ => None,
            };
            // Events, bad frames, and a session the coordinator no longer knows are the
            // driver's.
            let Some(answer) = result.filter(
                |(_, r)| !matches!(r, Err(e) if e.code() == Some(ErrorCode::SessionNotFound)),
            ) else {
                ours = false;
                break;
            };
            let book = book.get_or_insert_with(|| self.book());
            if !self.settle_one(book, answer, id, mine, health) {
                ours = false;
                break;
            }
            *answered += 1;
            pos += used;
        }
        if pos > 0 {
            buf.drain(..pos);
        }
        ours
    }

    /// Settles one answer, if its request's record is in the book and nothing about it is
    /// the driver's to do: false otherwise.
    fn settle_one(
        &self,
        book: &mut Book,
        (to, result): (u32, Result<Answer, Error>),
        id: u32,
        mine: &mut Option<(Result<Answer, Error>, Option<Reply>)>,
        health: &Health,
    ) -> bool {
        let Some(at) = book.records.iter().position(|(r, _)| *r == to) else {
            // The driver's request, or one whose record the driver took: its to settle.
            return false;
        };
        let p = &book.records[at].1;
        let grant = matches!(result, Ok(Answer::Granted { .. }));
        // A grant nobody waits for any more is given back, which is the driver's to do.
        let fits = !grant
            || (matches!(p.req, Req::Acquire { .. } | Req::BeginJob { .. })
                && p.lost.is_some()
                && (to == id || p.reply.as_ref().is_some_and(|r| !r.is_closed())));
        if !fits {
            return false;
        }
        let (_, mut p) = book.records.swap_remove(at);
        if p.req.refreshes_session() {
            health.contact(p.sent_at);
        }
        match (&p.req, p.lost) {
            (Req::Acquire { lease, .. } | Req::BeginJob { lease, .. }, Some(lost)) if grant => {
                book.granted.push((*lease, lost));
            }
            (Req::Release { lease } | Req::FinishJob { lease, .. }, _) => {
                // Granted since the driver last took the book: it never watched the lease.
                match book.granted.iter().position(|(l, _)| l == lease) {
                    Some(i) => drop(book.granted.swap_remove(i)),
                    None => book.released.push(*lease),
                }
            }
            _ => {}
        }
        if p.counted {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        if to == id {
            *mine = Some((result, p.reply.take()));
        } else if let Some(reply) = p.reply {
            let _ = reply.send(result);
        }
        true
    }
}
