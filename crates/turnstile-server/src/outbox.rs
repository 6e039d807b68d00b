//! Per-connection output buffer.
//!
//! Replies for a connection come from its own reader task and from other tasks (a release on
//! another connection grants this one's queued acquire; the timer expires its session). They
//! all append encoded frames to the connection's [`Outbox`] without blocking, and one writer
//! task drains it: everything that piled up since the last write goes out in one `write` call,
//! which is how replies get batched under load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use turnstile_proto::{encode_reply, Reply};

/// When this many bytes wait to be written, the connection's reader stops reading requests
/// until the writer catches up: a client that does not read its replies cannot make the
/// server buffer without bound.
pub(crate) const HIGH_WATER: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct Outbox {
    buf: Mutex<Vec<u8>>,
    /// Wakes the writer: there is data, or the connection is closing.
    ready: Notify,
    /// Wakes the reader: the writer drained the buffer.
    drained: Notify,
    closing: AtomicBool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding this lock can only come from an allocation failure in
        // `extend`; the bytes are still a sequence of whole frames, so go on with them.
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one frame and wakes the writer.
    pub(crate) fn push(&self, id: u32, reply: &Reply<'_>) {
        encode_reply(id, reply, &mut self.lock());
        self.ready.notify_one();
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.lock().len()
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

    /// The writer task: drains the buffer into the socket until closed or the peer is gone.
    pub(crate) async fn write_loop(&self, mut sock: OwnedWriteHalf) {
        let mut out = Vec::new();
        loop {
            {
                let mut buf = self.lock();
                std::mem::swap(&mut *buf, &mut out);
            }
            self.drained.notify_waiters();
            if out.is_empty() {
                if self.closing.load(Ordering::Acquire) {
                    break;
                }
                self.ready.notified().await;
                continue;
            }
            if sock.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            if out.capacity() > 4 * HIGH_WATER {
                out = Vec::new(); // do not keep a burst's memory forever
            }
        }
        self.closing.store(true, Ordering::Release);
        self.drained.notify_waiters();
        let _ = sock.shutdown().await;
    }
}
