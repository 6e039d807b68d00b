//! Durable storage for the coordinator: a write-ahead log of core [`Record`]s with a checksum
//! per record, snapshots that bound the log, and recovery.
//!
//! # Layout of a data directory
//!
//! ```text
//! LOCK                          held with an exclusive lock by the one server using the directory
//! snap-<gen>.snap               the state at the start of generation <gen> (16 hex digits)
//! snap-<gen>.snap.tmp           a snapshot being written (removed by the next start)
//! wal-<gen>.log                 the records appended during generation <gen>
//! wal-<gen>.log.torn-<offset>   bytes recovery cut off the end of that log, kept as evidence
//! ```
//!
//! Files of any other name are not ours and are never touched.
//!
//! A log segment is the 8 bytes `TSTLWAL\x02` followed by frames (see [`record`]: each frame's
//! length is covered by a header checksum of its own), then possibly zeros: the writer sizes
//! the file ahead of what it writes ([`SEGMENT_CHUNK`] at a time), because a sync that must
//! also record a new file size costs about half as much again as one that need not (on the
//! ext4 of the machine this was measured on: 175–205 µs against 117–122 µs, BENCHMARKS.md).
//! The written part ends where only zeros are left: a frame's header checksum never holds
//! for zeros, so no frame can be taken for the end, and no end for a frame. A snapshot is `TSTLSNP\x02`, then the
//! frames of the records that rebuild the state, then an end frame that holds their count.
//! Format 1 (`\x01`, whose frames had no header checksum) was written only by pre-release
//! builds; it is refused with a message that says so rather than read, so that no reader of
//! the old, weaker frames remains to be kept safe.
//!
//! Recovery loads the newest snapshot and replays every segment from its generation on.
//! Taking a snapshot ([`Log::rotate`]) writes `snap-<g+1>` to a temporary file, syncs it,
//! renames it into place, starts `wal-<g+1>`, and only then deletes the older files; a crash
//! at any point leaves a directory that recovers to the same state.
//!
//! # Damage
//!
//! A frame is bad when its header checksum, its length or its body checksum is wrong, or when
//! the file ends inside it. A frame **runs past the end** when less than a header is left, or
//! when its header checksum holds (so its length is the real one) and the body is cut short:
//! only a write cut short leaves that. For any other bad frame, what it means is decided
//! without trusting anything in it: recovery looks for a good frame (both checksums hold and
//! the body decodes) at **every byte offset** after the bad one.
//!
//! - If only zeros are left from the bad frame on, in the **last segment**, it is the room the
//!   segment was sized with: the written part ends there. (A write the crash cut off after
//!   bytes that were themselves zeros looks the same, and carried nothing.)
//! - If the bad frame runs past the end, or no good frame follows it, and it is in the **last
//!   segment**, it is a torn tail: a write that the crash interrupted. No reply was sent for
//!   it (replies wait for the sync), so recovery cuts it off — but first copies the cut bytes
//!   (up to the last one that is not zero) to `wal-<gen>.log.torn-<offset>` (synced), and
//!   logs the file, the offset and the copy.
//!   Nothing is ever destroyed.
//! - Otherwise — a good frame follows, or the segment is not the last, or the file is a
//!   snapshot — it is damage to data that was acknowledged. Recovery stops with
//!   [`WalError::Corrupt`], naming the file and offset, and changes no file (only `LOCK`, which
//!   says who holds the directory, is written).
//!
//! A torn tail cannot be told from damage to the very last frames of a log, which may have
//! been acknowledged (a disk that lost a synced write). The coordinator and its clients cover
//! that case: the server moves its fencing counters past the most grants the cut bytes could
//! hold ([`Cut::grants_at_most`]), and a client that resumes its session asks which of its
//! leases the coordinator still has, and reports the others lost.
#![deny(missing_docs)]

pub mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use turnstile_core::Record;

use crate::record::{decode, frame_at, Body, Frame};

const WAL_MAGIC: &[u8; 8] = b"TSTLWAL\x02";
/// How far ahead of its written part a segment's file is sized (see the module doc). The
/// file is sparse: the room costs no disk until written.
pub const SEGMENT_CHUNK: u64 = 8 << 20;
const SNAP_MAGIC: &[u8; 8] = b"TSTLSNP\x02";
/// The magics of format 1, recognised only to name them in the refusal.
const WAL_MAGIC_V1: &[u8; 8] = b"TSTLWAL\x01";
const SNAP_MAGIC_V1: &[u8; 8] = b"TSTLSNP\x01";
const V1_REFUSED: &str = "written in log format 1 by a pre-release turnstile, which this \
                          version does not read (start it on an empty data directory)";

/// What can go wrong with a data directory.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Another process holds the directory's lock.
    #[error("data directory {dir} is in use by another turnstile server{}", holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// What the lock file says about its holder.
        holder: Option<String>,
    },
    /// A file holds damaged data that was already acknowledged.
    #[error("{file}: corrupt record at offset {offset}: {why}; refusing to start (move the file away to discard it and everything after it)")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The records to replay, in order: the snapshot's, then the log's.
    pub records: Vec<Record>,
    /// Records that came from the snapshot (the first ones of `records`).
    pub from_snapshot: usize,
    /// The torn tail that was cut off, if one was.
    pub truncated: Option<Cut>,
    /// Bytes of log after the snapshot, to decide when the next snapshot is due.
    pub log_bytes: u64,
}

/// A torn tail that recovery cut off the end of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The log segment.
    pub file: PathBuf,
    /// Where the torn frame started: the segment's length now.
    pub offset: u64,
    /// How many bytes were cut.
    pub bytes: u64,
    /// The file that holds the cut bytes, written and synced before the cut.
    pub saved_to: PathBuf,
}

impl Cut {
    /// The most grants the cut bytes can have held. They are normally a write the crash
    /// interrupted, never acknowledged; but damage to the very end of a log looks the same,
    /// so a coordinator moves its fencing counters on by this much, and no token of a lost
    /// grant is handed out twice.
    pub fn grants_at_most(&self) -> u64 {
        self.bytes / record::MIN_GRANT_FRAME as u64 + 1
    }
}

/// An open data directory: holds the lock and appends to the current segment.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    _lock: File,
    generation: u64,
    segment: File,
    /// The written part of the segment: where the next frames go.
    segment_bytes: u64,
    /// The segment file's size (the written part and the zeros after it).
    segment_size: u64,
}

impl Log {
    /// Opens (creating it if needed) and locks the data directory, recovers its records, and
    /// gets ready to append.
    pub fn open(dir: &Path) -> Result<(Log, Recovery), WalError> {
        if dir.exists() && !dir.is_dir() {
            // create_dir_all would say "File exists", which reads as if all were well.
            let source = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(io_err("cannot use data directory", dir)(source));
        }
        fs::create_dir_all(dir).map_err(io_err("cannot create data directory", dir))?;
        let lock = lock_dir(dir)?;
        let mut files = list(dir)?;
        let mut recovery = Recovery::default();
        let base = match files.snapshots.last() {
            Some(&gen) => {
                recovery.records = read_snapshot(&snap_path(dir, gen))?;
                recovery.from_snapshot = recovery.records.len();
                gen
            }
            None => files.segments.first().copied().unwrap_or(0),
        };
        files.segments.retain(|&g| g >= base);
        for pair in files.segments.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(WalError::Corrupt {
                    file: wal_path(dir, pair[0] + 1),
                    offset: 0,
                    why: format!(
                        "log segment missing between generations {:x} and {:x}",
                        pair[0], pair[1]
                    ),
                });
            }
        }
        let last = files.segments.last().copied();
        // Read everything before changing anything: a refusal must leave the files as found.
        let mut torn = None;
        let mut last_written = 0;
        for &gen in &files.segments {
            let path = wal_path(dir, gen);
            let is_last = Some(gen) == last;
            let (bytes, cut) = read_segment(&path, is_last, &mut recovery.records)?;
            recovery.log_bytes += bytes;
            last_written = bytes;
            if let Some((offset, tail)) = cut {
                torn = Some((path, offset, tail));
            }
        }
        if let Some((path, offset, tail)) = torn {
            let saved_to = save_torn_tail(&path, offset, &tail)?;
            truncate(&path, offset)?;
            tracing::warn!(
                file = %path.display(),
                offset,
                bytes = tail.len(),
                saved_to = %saved_to.display(),
                "cut off a torn record at the end of the log (a write the crash interrupted; \
                 no good record follows it); the cut bytes are kept in saved_to"
            );
            recovery.truncated = Some(Cut {
                file: path,
                offset,
                bytes: tail.len() as u64,
                saved_to,
            });
        }
        // A snapshot being written when the last server stopped; never one we recovered from.
        for tmp in &files.tmp {
            let _ = fs::remove_file(tmp);
        }
        // Files older than the snapshot are leftovers of an interrupted rotation.
        remove_older(dir, base);
        let generation = last.unwrap_or(base).max(base);
        // The written part of the segment we go on with, as recovery found it.
        let written = (last == Some(generation)).then_some(last_written);
        let (segment, segment_bytes, segment_size) = open_segment(dir, generation, written)?;
        Ok((
            Log {
                dir: dir.to_owned(),
                _lock: lock,
                generation,
                segment,
                segment_bytes,
                segment_size,
            },
            recovery,
        ))
    }

    /// Appends encoded frames (from [`record::encode`]) to the current segment. Not durable
    /// until [`sync`](Log::sync).
    pub fn append(&mut self, frames: &[u8]) -> Result<(), WalError> {
        let end = self.segment_bytes + frames.len() as u64;
        if end > self.segment_size {
            // Sized a chunk ahead, so that the syncs until then need not record a new size.
            let size = (end / SEGMENT_CHUNK)
                .saturating_add(1)
                .saturating_mul(SEGMENT_CHUNK);
            self.segment.set_len(size).map_err(io_err(
                "cannot extend",
                &wal_path(&self.dir, self.generation),
            ))?;
            self.segment_size = size;
        }
        self.segment
            .write_all_at(frames, self.segment_bytes)
            .map_err(io_err(
                "cannot append to",
                &wal_path(&self.dir, self.generation),
            ))?;
        self.segment_bytes = end;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.segment
            .sync_data()
            .map_err(io_err("cannot sync", &wal_path(&self.dir, self.generation)))
    }

    /// Bytes written in the current segment (not counting the zeros it is sized ahead with).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Ends the current generation with a snapshot of the state as it is *after* every record
    /// appended so far, starts a new segment, and deletes the files the snapshot replaces.
    pub fn rotate(&mut self, snapshot: &[Record]) -> Result<(), WalError> {
        self.sync()?;
        let next = self.generation + 1;
        let path = snap_path(&self.dir, next);
        let tmp = snap_tmp_path(&self.dir, next);
        let mut buf = Vec::with_capacity(64 + snapshot.len() * 48);
        buf.extend_from_slice(SNAP_MAGIC);
        for r in snapshot {
            record::encode(r, &mut buf);
        }
        record::encode_snapshot_end(snapshot.len() as u64, &mut buf);
        {
            let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            f.write_all(&buf).map_err(io_err("cannot write", &tmp))?;
            f.sync_all().map_err(io_err("cannot sync", &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err("cannot rename into place", &path))?;
        let (segment, bytes, size) = open_segment(&self.dir, next, None)?;
        sync_dir(&self.dir)?;
        self.segment = segment;
        self.segment_bytes = bytes;
        self.segment_size = size;
        self.generation = next;
        remove_older(&self.dir, next);
        Ok(())
    }
}

fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(WalError::Locked {
                dir: dir.to_owned(),
                holder: (!holder.is_empty()).then(|| holder.to_owned()),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &path)(e)),
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "pid {}", std::process::id());
    Ok(file)
}

#[derive(Default)]
struct Files {
    snapshots: Vec<u64>,
    segments: Vec<u64>,
    tmp: Vec<PathBuf>,
}

fn list(dir: &Path) -> Result<Files, WalError> {
    let mut files = Files::default();
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only the temporary files our own naming scheme makes: anything else called *.tmp
        // may be someone else's.
        if parse_gen(name, "snap-", ".snap.tmp").is_some() {
            files.tmp.push(entry.path());
        } else if let Some(gen) = parse_gen(name, "snap-", ".snap") {
            files.snapshots.push(gen);
        } else if let Some(gen) = parse_gen(name, "wal-", ".log") {
            files.segments.push(gen);
        }
    }
    files.snapshots.sort_unstable();
    files.segments.sort_unstable();
    Ok(files)
}

fn parse_gen(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

fn wal_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("wal-{gen:016x}.log"))
}

fn snap_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("snap-{gen:016x}.snap"))
}

fn snap_tmp_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("snap-{gen:016x}.snap.tmp"))
}

/// Copies the bytes about to be cut off `path` at `offset` to a side file of their own
/// (`<segment>.torn-<offset>`, or with `.1`, `.2`... if that exists), synced, and returns its
/// path. Recovery cuts only once this has succeeded.
fn save_torn_tail(path: &Path, offset: u64, tail: &[u8]) -> Result<PathBuf, WalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let base = format!(
        "{}.torn-{offset}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    for n in 0u32.. {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}.{n}")
        };
        let side = dir.join(name);
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&side) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("cannot create", &side)(e)),
        };
        file.write_all(tail)
            .map_err(io_err("cannot write", &side))?;
        file.sync_all().map_err(io_err("cannot sync", &side))?;
        sync_dir(dir)?;
        return Ok(side);
    }
    Err(io_err("cannot find a free name beside", path)(
        io::ErrorKind::AlreadyExists.into(),
    ))
}

fn remove_older(dir: &Path, gen: u64) {
    let Ok(files) = list(dir) else { return };
    for g in files.segments.iter().filter(|&&g| g < gen) {
        let _ = fs::remove_file(wal_path(dir, *g));
    }
    for g in files.snapshots.iter().filter(|&&g| g < gen) {
        let _ = fs::remove_file(snap_path(dir, *g));
    }
    let _ = sync_dir(dir);
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

/// Opens segment `gen` for writing, creating it (with its header) if it does not exist or is
/// empty. `written`: how much of an existing segment recovery found written (its file may be
/// larger). Returns the file, its written part and its size.
fn open_segment(dir: &Path, gen: u64, written: Option<u64>) -> Result<(File, u64, u64), WalError> {
    let path = wal_path(dir, gen);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    let size = file.metadata().map_err(io_err("cannot stat", &path))?.len();
    let written = written.unwrap_or(size).min(size);
    if written < WAL_MAGIC.len() as u64 {
        // The header is written and synced before the file is ever sized ahead, so a crash
        // in between leaves a segment that reads as empty.
        file.set_len(0).map_err(io_err("cannot truncate", &path))?;
        file.write_all_at(WAL_MAGIC, 0)
            .map_err(io_err("cannot write", &path))?;
        file.sync_all().map_err(io_err("cannot sync", &path))?;
        sync_dir(dir)?;
        let len = WAL_MAGIC.len() as u64;
        return Ok((file, len, len));
    }
    Ok((file, written, size))
}

/// A torn tail found by [`read_segment`]: where it starts, and its bytes.
type TornTail = (u64, Vec<u8>);

/// Reads one segment's records into `out`. Returns the segment's length once a torn tail is
/// cut off, and, if there is one (only in the last segment), where it starts and its bytes.
/// Changes nothing on disk.
fn read_segment(
    path: &Path,
    is_last: bool,
    out: &mut Vec<Record>,
) -> Result<(u64, Option<TornTail>), WalError> {
    let buf = fs::read(path).map_err(io_err("cannot read", path))?;
    let corrupt = |offset: usize, why: String| WalError::Corrupt {
        file: path.to_owned(),
        offset: offset as u64,
        why,
    };
    if buf.len() < WAL_MAGIC.len() || &buf[..WAL_MAGIC.len()] != WAL_MAGIC {
        if is_last && WAL_MAGIC.starts_with(&buf) {
            // Created but its header not (fully) written when the crash came: empty.
            let torn = (!buf.is_empty()).then_some((0, buf));
            return Ok((0, torn));
        }
        if buf.starts_with(WAL_MAGIC_V1) {
            return Err(corrupt(0, V1_REFUSED.into()));
        }
        return Err(corrupt(
            0,
            "not a turnstile log segment (bad header)".into(),
        ));
    }
    let mut offset = WAL_MAGIC.len();
    loop {
        match frame_at(&buf, offset) {
            Frame::End => return Ok((buf.len() as u64, None)),
            Frame::Good { body, next } => match decode(body) {
                Ok(Body::Record(r)) => {
                    out.push(r);
                    offset = next;
                }
                Ok(Body::SnapshotEnd(_)) => {
                    return Err(corrupt(offset, "snapshot end frame inside a log".into()))
                }
                Err(e) => return Err(corrupt(offset, e.0.into())),
            },
            Frame::Bad { why, past_end } => {
                // Only zeros left in the segment being written: the room it was sized ahead
                // with. (An older segment is read only in a directory a rotation did not
                // leave, and there a bad tail stays a refusal.)
                let written_end = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                if is_last && written_end <= offset {
                    return Ok((offset as u64, None));
                }
                // A frame that runs past the end is a write cut short; any other bad frame is
                // a torn tail only if no good frame starts anywhere after it (none can start
                // among the zeros at the end, which hold no header).
                let later = if past_end {
                    None
                } else {
                    next_valid_frame(&buf, offset + 1, written_end)
                };
                if let Some(later) = later {
                    return Err(corrupt(
                        offset,
                        format!("{why}, and a good record follows at offset {later}"),
                    ));
                }
                if !is_last {
                    return Err(corrupt(
                        offset,
                        format!("{why}, in a log that is not the last"),
                    ));
                }
                let tail = buf[offset..written_end].to_vec();
                return Ok((offset as u64, Some((offset as u64, tail))));
            }
        }
    }
}

/// The first offset in `from..before` where a good frame starts, trying every byte: the bad
/// frame before it may have a damaged length, so where it claims to end means nothing. A
/// frame may run on past `before` (its last bytes may be zeros); none starts at or after it
/// when only zeros are left there.
fn next_valid_frame(buf: &[u8], from: usize, before: usize) -> Option<usize> {
    (from..before.min(buf.len())).find(|&at| record::valid_frame_at(buf, at))
}

fn truncate(path: &Path, len: u64) -> Result<(), WalError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("cannot open", path))?;
    f.set_len(len).map_err(io_err("cannot truncate", path))?;
    f.sync_all().map_err(io_err("cannot sync", path))
}

fn read_snapshot(path: &Path) -> Result<Vec<Record>, WalError> {
    let buf = fs::read(path).map_err(io_err("cannot read", path))?;
    let corrupt = |offset: usize, why: &str| WalError::Corrupt {
        file: path.to_owned(),
        offset: offset as u64,
        why: why.to_owned(),
    };
    if buf.len() < SNAP_MAGIC.len() || &buf[..SNAP_MAGIC.len()] != SNAP_MAGIC {
        if buf.starts_with(SNAP_MAGIC_V1) {
            return Err(corrupt(0, V1_REFUSED));
        }
        return Err(corrupt(0, "not a turnstile snapshot (bad header)"));
    }
    let mut records = Vec::new();
    let mut offset = SNAP_MAGIC.len();
    loop {
        match frame_at(&buf, offset) {
            Frame::Good { body, next } => match decode(body) {
                Ok(Body::Record(r)) => {
                    records.push(r);
                    offset = next;
                }
                Ok(Body::SnapshotEnd(count)) => {
                    if count != records.len() as u64 || next != buf.len() {
                        return Err(corrupt(offset, "snapshot end does not match its records"));
                    }
                    return Ok(records);
                }
                Err(e) => return Err(corrupt(offset, e.0)),
            },
            Frame::End => return Err(corrupt(offset, "snapshot has no end frame")),
            Frame::Bad { why, .. } => return Err(corrupt(offset, why)),
        }
    }
}

#[cfg(test)]
mod tests;
