//! Per-connection output buffer.
//!
//! Replies for a connection come from its own reader task and from other tasks (a release on
//! another connection grants this one's queued acquire; the timer expires its session; the
//! log writer sends replies once their records are durable). They all append encoded frames
//! to the connection's [`Outbox`] without blocking.
//!
//! Two paths take the bytes out, and the flag `writer_busy` keeps them in order:
//! - the reader, once it has handled every request it read, writes what its own requests
//!   produced straight into the socket (`flush`, a non-blocking `try_write`), unless the writer
//!   task holds bytes not yet written: then those go first and the reader leaves it all to the
//!   writer. This saves a task wake-up per request, the common case;
//! - the writer task, woken by pushes from other tasks and by what `flush` could not write,
//!   drains everything that piled up in one write, which is how replies get batched under
//!   load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use turnstile_proto::{encode_reply, Reply};

/// When this many bytes wait to be written, the connection's reader stops reading requests
/// until the writer catches up: a client that does not read its replies cannot make the
/// server buffer without bound.
pub(crate) const HIGH_WATER: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct Outbox {
    pending: Mutex<Pending>,
    /// Wakes the writer: there is data, or the connection is closing.
    ready: Notify,
    /// Wakes the reader: the writer drained the buffer.
    drained: Notify,
    closing: AtomicBool,
}

#[derive(Default)]
struct Pending {
    /// Encoded frames that nobody has started to write.
    buf: Vec<u8>,
    /// The writer task holds bytes taken from `buf` that are not all written yet; until it
    /// comes back for more, nobody else may write (it would overtake them).
    writer_busy: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock can only come from an allocation failure in
        // `extend`; the bytes are still a sequence of whole frames, so go on with them.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one frame and wakes the writer task.
    pub(crate) fn push(&self, id: u32, reply: &Reply<'_>) {
        encode_reply(id, reply, &mut self.lock().buf);
        self.ready.notify_one();
    }

    /// Appends one frame for the connection's own reader to [`flush`](Outbox::flush) once it
    /// has handled what it read: no wake-up.
    pub(crate) fn push_local(&self, id: u32, reply: &Reply<'_>) {
        encode_reply(id, reply, &mut self.lock().buf);
    }

    /// Writes what is buffered straight into the socket, as far as it goes without blocking;
    /// leaves the rest (or everything, if the writer task is mid-write) to the writer task.
    pub(crate) fn flush(&self, sock: &OwnedWriteHalf) {
        let mut p = self.lock();
        if p.buf.is_empty() {
            return;
        }
        if !p.writer_busy {
            let mut written = 0;
            while written < p.buf.len() {
                match sock.try_write(&p.buf[written..]) {
                    Ok(0) | Err(_) => break, // full (WouldBlock) or broken: the writer finds out
                    Ok(n) => written += n,
                }
            }
            p.buf.drain(..written);
            if p.buf.is_empty() {
                return;
            }
        }
        drop(p);
        self.ready.notify_one();
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.lock().buf.len()
    }

    /// Waits until the writer has drained the buffer below [`HIGH_WATER`].
    pub(crate) async fn wait_drained(&self) {
        while self.pending() >= HIGH_WATER && !self.closing.load(Ordering::Acquire) {
            let drained = self.drained.notified();
            if self.pending() < HIGH_WATER {
                break;
            }
            drained.await;
        }
    }

    /// Asks the writer to flush what is buffered and then shut the socket down.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Wakes the writer task if anything waits: what [`flush`](Outbox::flush) does for a
    /// connection whose socket the reader cannot write to itself (TLS: the session's state
    /// belongs to the writer task).
    pub(crate) fn wake(&self) {
        if !self.lock().buf.is_empty() {
            self.ready.notify_one();
        }
    }

    /// Waits for bytes to write and moves them into `out` (empty when called); false once the
    /// outbox is closing and nothing is left.
    async fn next_batch(&self, out: &mut Vec<u8>) -> bool {
        loop {
            {
                let mut p = self.lock();
                std::mem::swap(&mut p.buf, out);
                p.writer_busy = !out.is_empty();
            }
            self.drained.notify_waiters();
            if !out.is_empty() {
                return true;
            }
            if self.closing.load(Ordering::Acquire) {
                return false;
            }
            self.ready.notified().await;
        }
    }

    /// The writer's end: nothing more will be written (the peer is gone or we are closing).
    fn writer_done(&self) {
        self.closing.store(true, Ordering::Release);
        self.drained.notify_waiters();
    }

    /// The writer task: drains the buffer into the socket until closed or the peer is gone.
    /// The socket's write side shuts down when the last handle on it is dropped.
    pub(crate) async fn write_loop(&self, sock: std::sync::Arc<OwnedWriteHalf>) {
        let mut out = Vec::new();
        'run: while self.next_batch(&mut out).await {
            let mut written = 0;
            while written < out.len() {
                if sock.writable().await.is_err() {
                    break 'run;
                }
                match sock.try_write(&out[written..]) {
                    Ok(0) => break 'run,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break 'run,
                }
            }
            shrink(&mut out);
        }
        self.writer_done();
    }

    /// The writer task of a TLS connection: the same, through the TLS session, which it owns.
    /// Each batch is flushed whole (a TLS write may leave encrypted bytes buffered), and the
    /// end sends the TLS close alert.
    pub(crate) async fn write_loop_tls<W: AsyncWrite + Unpin>(&self, mut sock: W) {
        let mut out = Vec::new();
        while self.next_batch(&mut out).await {
            if sock.write_all(&out).await.is_err() || sock.flush().await.is_err() {
                self.writer_done();
                return;
            }
            shrink(&mut out);
        }
        self.writer_done();
        let _ = sock.shutdown().await;
    }
}

/// Empties a written batch, giving back a burst's memory rather than keeping it forever.
fn shrink(out: &mut Vec<u8>) {
    out.clear();
    if out.capacity() > 4 * HIGH_WATER {
        *out = Vec::new();
    }
}
