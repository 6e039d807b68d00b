//! Durability: the queue of records waiting to be written, and the writer thread that writes
//! and syncs them, then releases the replies that waited for them.
//!
//! The rule (from the core's `Effect` docs): no reply or event leaves before every record
//! appended before it is durable, except a release's own answer (`State::route`). Each step that produces records appends one [`Chunk`] and
//! advances `appended`; every reply or event routed while `durable < appended` waits in
//! `deferred` with the `appended` of its step. The writer takes all chunks that piled up while
//! it was syncing the previous ones, writes them with one `write` and one `fdatasync` (a group
//! commit; with `--fsync always` one sync per chunk instead), sets `durable`, and delivers what
//! waited. So under load one sync serves many requests, and an idle server adds one sync of
//! latency to a request and nothing else.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use turnstile_core::{Effect, Record};
use turnstile_wal::{record, Log};

use crate::state::Shared;

/// When to sync the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncMode {
    /// Sync each request's records on their own before replying.
    Always,
    /// Group commit: one sync for every request that arrived while the last sync ran.
    Batch,
}

pub(crate) enum Chunk {
    /// Encoded records of one step, and that step's sequence number.
    Frames { bytes: Vec<u8>, lsn: u64 },
    /// Take a snapshot here: everything before is in it, everything after goes to the next
    /// generation.
    Rotate(Vec<Record>),
}

/// Records on their way to disk and the replies waiting for them. Lives in the state, under
/// the state lock.
pub(crate) struct WalQueue {
    pub(crate) chunks: VecDeque<Chunk>,
    /// Sequence number of the last step that appended records.
    pub(crate) appended: u64,
    /// Sequence number up to which records are durable.
    pub(crate) durable: u64,
    /// Replies and events waiting for `durable` to reach their sequence number.
    pub(crate) deferred: VecDeque<(u64, Effect)>,
    /// Log bytes written since the last snapshot.
    pub(crate) bytes_since_snapshot: u64,
    /// Take a snapshot when `bytes_since_snapshot` passes this.
    pub(crate) snapshot_bytes: u64,
    pub(crate) rotation_pending: bool,
    pub(crate) stop: bool,
    /// The writer waits on the condition variable and no step has woken it since. Only the
    /// step that finds it set wakes the writer: a notify is a system call even with nobody
    /// waiting (measured: one `futex` per request at 64 durable clients, while the writer
    /// was busy syncing most of the time).
    pub(crate) writer_asleep: bool,
}

impl WalQueue {
    pub(crate) fn new(snapshot_bytes: u64, log_bytes: u64) -> WalQueue {
        WalQueue {
            chunks: VecDeque::new(),
            appended: 0,
            durable: 0,
            deferred: VecDeque::new(),
            bytes_since_snapshot: log_bytes,
            snapshot_bytes,
            rotation_pending: false,
            stop: false,
            writer_asleep: false,
        }
    }

    /// Appends one step's records. Returns whether a snapshot is now due.
    pub(crate) fn append(&mut self, records: &[&Record]) -> bool {
        let mut bytes = Vec::with_capacity(records.len() * 48);
        for r in records {
            record::encode(r, &mut bytes);
        }
        self.bytes_since_snapshot += bytes.len() as u64;
        self.appended += 1;
        self.chunks.push_back(Chunk::Frames {
            bytes,
            lsn: self.appended,
        });
        !self.rotation_pending && self.bytes_since_snapshot >= self.snapshot_bytes
    }

    pub(crate) fn schedule_snapshot(&mut self, snapshot: Vec<Record>) {
        self.rotation_pending = true;
        self.bytes_since_snapshot = 0;
        self.chunks.push_back(Chunk::Rotate(snapshot));
    }

    /// Whether a reply routed now has to wait.
    pub(crate) fn must_defer(&self) -> bool {
        self.durable < self.appended
    }
}

/// The writer thread. Returns when asked to stop (after writing everything queued) or when
/// the disk fails; then it reports the failure so the server stops (fail-stop: a coordinator
/// that cannot make grants durable must not make grants).
pub(crate) fn writer_loop(shared: Arc<Shared>, mut log: Log, mode: FsyncMode) {
    let mut batch: Vec<Chunk> = Vec::new();
    loop {
        {
            let mut st = shared.lock();
            loop {
                let Some(wal) = st.wal.as_mut() else { return };
                if !wal.chunks.is_empty() {
                    break;
                }
                if wal.stop {
                    return;
                }
                st = shared.wait_for_wal(st);
            }
            let Some(wal) = st.wal.as_mut() else { return };
            match mode {
                FsyncMode::Batch => batch.extend(wal.chunks.drain(..)),
                FsyncMode::Always => batch.extend(wal.chunks.pop_front()),
            }
        }
        if let Err(e) = write_batch(&shared, &mut log, &mut batch) {
            tracing::error!(error = %e, "cannot write the log; stopping the server");
            shared.fail(e.to_string());
            return;
        }
    }
}

/// Writes the batch, syncing before every snapshot and at the end, and releases the replies
/// that waited for each sync.
fn write_batch(
    shared: &Shared,
    log: &mut Log,
    batch: &mut Vec<Chunk>,
) -> Result<(), turnstile_wal::WalError> {
    let mut pending: Option<u64> = None;
    let mut buf: Vec<u8> = Vec::new();
    for chunk in batch.drain(..) {
        match chunk {
            Chunk::Frames { bytes, lsn } => {
                if buf.is_empty() {
                    buf = bytes;
                } else {
                    buf.extend_from_slice(&bytes);
                }
                pending = Some(lsn);
            }
            Chunk::Rotate(snapshot) => {
                if let Some(lsn) = pending.take() {
                    append_and_sync(shared, log, &buf)?;
                    buf.clear();
                    shared.durable(lsn);
                }
                let started = std::time::Instant::now();
                log.rotate(&snapshot)?;
                tracing::info!(
                    generation = log.generation(),
                    records = snapshot.len(),
                    took = ?started.elapsed(),
                    "snapshot written; older log segments removed"
                );
                shared.metrics.snapshots.fetch_add(1, Relaxed);
                shared.rotated();
            }
        }
    }
    if let Some(lsn) = pending {
        append_and_sync(shared, log, &buf)?;
        shared.durable(lsn);
    }
    Ok(())
}

/// Appends `bytes` to the log and syncs it, timing the sync for the metrics.
fn append_and_sync(
    shared: &Shared,
    log: &mut Log,
    bytes: &[u8],
) -> Result<(), turnstile_wal::WalError> {
    log.append(bytes)?;
    shared
        .metrics
        .log_bytes
        .fetch_add(bytes.len() as u64, Relaxed);
    let started = std::time::Instant::now();
    log.sync()?;
    shared.metrics.fsync.observe(started.elapsed());
    Ok(())
}
