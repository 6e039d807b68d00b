//! The shared-directory backend (`file:///path/to/dir`): semaphores with no server, among
//! processes on any hosts that share the directory (a local disk, or NFS).
//!
//! # On-disk layout
//!
//! ```text
//! DIR/.clock                   probe file: rewritten to learn the file system's "now" (for
//!                              status's guess and pruning `.ended`; never for reclaiming)
//! DIR/<name>/                  one semaphore; <name> percent-escaped (see `disk::dir_name`)
//!     capacity                 "<capacity>\n<full name>\n", created by link; replaced by
//!                              rename (`set_capacity`); renamed away by `delete`, which
//!                              keeps the directory and its `tokens/` for a fresh start
//!     closed                   exists once the semaphore is closed (never removed)
//!     slot-<i>                 a held permit, 0 <= i < capacity; a lease of weight k holds k
//!                              slot files (hard links of one file); content: a lease record
//!     queue/<ticket:020>       a waiting acquire (FIFO by ticket number); a lease record
//!     tokens/<token:020>       fencing tokens handed out (the newest 1000 are kept)
//!     .tmp-*, .reclaim-*       private names of files being created or removed
//! DIR/.jobs/<job>/             one run-once job; <job> escaped like a semaphore name
//!     lock/                    the job's lock: a semaphore directory of capacity 1, as above
//!                              (its `capacity` file names the job); its lease is an attempt
//!     group                    "<group name>\n", replaced by rename; absent: ungrouped
//!     done                     the completion record, created by link: exactly one exists
//!     failed/<ms>-<random>     one file per failed attempt (its reason), created by link
//!     last-failure             the reason of the last failed attempt, replaced by rename
//! DIR/.groups/<group>/<job>    membership markers (an index; the job's `group` file rules)
//! DIR/.revoked/<session:016x>-<lease:016x>   left by `revoke` for the lease's owner
//! DIR/.ended/<session:016x>    left by `end_session`, so that the session's owner can tell
//!                              why its records are gone (pruned after a day)
//! ```
//!
//! Escaped names never start with `.`, so the hidden directories cannot clash with a
//! semaphore, and job locks never appear among the semaphores.
//!
//! A lease record is one line of `key=value` words: lease id, session, weight, token, TTL,
//! grant time, a random nonce (so that equal bytes mean the same acquire), host, boot id, pid
//! namespace and pid of the holder, and last a heartbeat counter (`beat=` and 16 hex digits)
//! that the holder bumps at every heartbeat; everything before the counter is the record's
//! identity (`disk::same_acquire`). A completion record (`done`) is one line too: the token
//! of the attempt that completed the job, its start (Unix ms, its runner's clock), its
//! duration, and the runner's session, host and pid.
//!
//! Only operations that are atomic on POSIX file systems and on NFS are relied on: `link`
//! (of a fully written temporary file; it fails if the name exists), `rename`, `mkdir` and
//! `unlink`. A record is modified in place only by its owner's heartbeat, which writes the
//! record with its next counter value over the old one (same length) through a descriptor
//! opened without `O_CREAT` (see `disk::touch`).
//!
//! # Acquiring
//!
//! A waiter takes a ticket: the next number after the highest in `queue/`, claimed by link
//! (on a clash it tries the next number). Only the waiter whose ticket is the oldest live one
//! (the head) may claim slots: it takes the next fencing token, then links its record to `k`
//! free slot names, then removes its ticket so that the next waiter becomes the head. A
//! heavy head is therefore never overtaken by lighter waiters, and claimers never deadlock on
//! partial claims (there is one claimer; if a claim still fails half-way, it is rolled back).
//! Waiting polls with exponential backoff up to 200 ms, and on Linux an inotify watch on the
//! semaphore's directory wakes the waiter at once when a slot or ticket is removed or the
//! semaphore is closed on this host (changes made by other NFS clients raise no local event,
//! so the poll stays as the bound); an immediate acquire goes through the queue too, and gives
//! up after one look.
//!
//! # Liveness
//!
//! A background task rewrites the client's slot files every TTL/3, and a waiter rewrites its
//! ticket as often; each rewrite bumps the record's counter, so the bytes of a live owner's
//! record never stay the same for long. A record is *stale*, for a client looking at it, when
//! that client has itself seen it unchanged (the same bytes and the same mtime, every look a
//! fresh open) for its owner's whole TTL (written in the record), measured on the client's
//! own monotonic clock from the end of the first look that found those bytes — or at once
//! when it names a process of this host, boot and pid namespace that no longer exists (a
//! zombie counts as gone) and every process in its optional `also_pids` is gone too. An
//! unparsable record is judged the same way with the default TTL (10 s), or the client's TTL
//! if longer. Queue tickets, job locks (which are semaphores) and held slots all follow this
//! one rule (`Inner::staleness`); each client keeps its observations in memory, by path.
//!
//! No timestamp is ever compared with another. The mtime is only one more thing that can
//! change: a step of any clock, either way, changes an mtime at most, which restarts the wait
//! (a delay, never a reclaim); and a holder of an older version, whose heartbeat rewrites the
//! same bytes, still shows that it is alive by moving its mtime.
//!
//! What it costs: a client cannot know how long a record was unchanged before its first look,
//! so it reclaims a dead holder of another host one whole TTL after that first look. A waiter
//! already watching when the holder dies reclaims about one TTL after the holder's last
//! heartbeat (plus up to 500 ms between the head's looks at held slots), as it did when mtimes
//! were compared; a fresh process (a new waiter, a group wait) waits a full TTL from its
//! arrival, where it used to wait only what was left of the TTL by the mtime. A dead remote
//! ticket ahead of it costs a TTL of its own first (the slots are looked at only from the
//! head). A dead process of this host is still reclaimed at once. `status` answers at once and
//! so cannot observe: it shows a *guess* (a holder whose mtime is older than its TTL by the
//! file system's clock, read from `DIR/.clock`, is shown as not running), and nothing else
//! uses that guess.
//!
//! `also_pids` comes from `Options::also_alive_pids`: processes that may still act for the
//! holder after it died. `turnstile run` names its guard, which kills the command's tree when
//! `run` dies and exits only once that tree is gone; so the immediate reclaim of a dead
//! holder's lease waits for its command to be gone, not only for `run`.
//!
//! # Why it is safe
//!
//! - **Capacity is never exceeded by a grant:** a permit *is* a `slot-<i>` file, and `link`
//!   creates a name only if it does not exist, so each has one owner. The head claims only
//!   indices below the capacity it read, only while every slot file (whatever its index) plus
//!   its weight fits that capacity, and re-reads the capacity after its links, undoing the
//!   claim if it changed; so a grant never takes the count above the capacity in force when
//!   it completed. After a shrink (`set_capacity`), holders keep their slots, the count stays
//!   above the capacity until they release, and nothing is granted meanwhile. A slot file is removed only by its owner (release), by a closer
//!   or a supervisor (`close`, `end_session`, after which the owner learns that its lease is
//!   lost at its next heartbeat), or by a reclaimer once it is stale. A record taken at once
//!   because its holder died is taken only once every process named in it (holder and
//!   `also_pids`) is gone, so nothing that acted under it can still run.
//! - **A reclaimed owner has already given up:** an owner counts its lease alive only until
//!   90% of the TTL after the start `s` of its last *successful* heartbeat — one that wrote a
//!   new counter value into its record, closed the file without error (on NFS the data is then
//!   on the server) and read the new bytes back by the slot's name. A reclaimer removes a
//!   record only if it read the same bytes `B` at a look that ended at `t0` and at a look at
//!   `t1 >= t0 + TTL` (its own monotonic clock), and read `B` once more after renaming the file
//!   to its private name. Take a heartbeat that began after `t0`: it wrote bytes other than
//!   `B` (the counter only grows). If its read-back came before the rename, the file held the
//!   new bytes before the rename, so the re-read under the private name does not find `B`,
//!   and the file is put back. If it came after the rename, it found the name gone or
//!   somebody else's, and the heartbeat failed. So when a record is removed, its owner's last
//!   successful heartbeat began at `s <= t0`, and the owner gave the lease up at
//!   `s + 0.9 TTL <= t0 + 0.9 TTL` by its clock, while the reclaimer acts at `t0 + TTL` or
//!   later by its own: in time, unless the owner's clock runs more than 10% slower than the
//!   reclaimer's (real clock rates differ by far less; the rest of the margin absorbs late
//!   timers). Neither a wall clock nor the file server's clock appears in this, so no step of
//!   either can break it.
//! - **Two equal reads mean nobody wrote in between:** every look opens the file afresh. On
//!   NFS the open revalidates the file's attributes with the server and drops cached data if
//!   they changed (close-to-open consistency), and the owner's close pushed its write there
//!   first. A heartbeat keeps the length (the counter has a fixed width), so a read torn by a
//!   concurrent heartbeat returns bytes unlike the last look's: a change, hence alive.
//! - **A heartbeat never resurrects a name:** it opens the slot without `O_CREAT` and writes
//!   through the descriptor it checked the bytes on, so it only ever writes its own inode,
//!   and a name a reclaimer removed (somebody else's slot by then) is never created again.
//!   The `k` slot files of a weighted lease are links of one file; every name is checked.
//! - **Exactly one reclaimer wins:** a reclaimer renames the stale file to a private name; of
//!   several renames of the same name only one succeeds (the others find it gone). The winner
//!   re-reads the file under its private name and deletes it only if it still holds the bytes
//!   (and mtime: a rename keeps it) it saw unchanged; if the owner rewrote it in between, it
//!   is linked back.
//! - **Tokens strictly increase:** a grant takes `tokens/<max+1>` by link, trying upward on a
//!   clash, so no number is handed out twice; the highest token file is never pruned, so
//!   `max` never goes down. Grants take their token while at the head of the queue, before
//!   claiming, and the next head exists only once this one has claimed and left the queue, so
//!   tokens increase in grant order. The client also remembers the last token it saw per
//!   semaphore, against stale directory listings.
//!
//! # Run-once jobs
//!
//! An attempt at a job (`jobs.rs`) reads `done`: if it exists, the job has completed and the
//! attempt is answered with it. Otherwise it acquires the job's lock with the code that
//! acquires a semaphore, so it gets the queue, the tokens, the heartbeats and the reclaims.
//! While it waits, every look reads `done` again, and an attempt that finds it withdraws and
//! answers with it; one that will not wait is told who holds the lock. Once granted, it reads
//! `done` a last time (a completion recorded between its last look and its grant wins: it
//! gives the lock back and answers with the completion), and runs. It ends by recording
//! either its completion (`done`, by link) or a failed attempt, then freeing the lock. Every
//! other end of the lock's lease is a failed attempt, counted by whoever ends it: the client
//! that releases it unfinished (a dropped attempt, a shutdown), the supervisor that ends its
//! session, or the one reclaimer that removes it once stale or owned by a dead local process.
//! A failed attempt is a file of its own in `failed/`, created by link under a unique name,
//! so concurrent counts never lose one; none is counted once `done` exists.
//!
//! A job's group is its `group` file; the markers in `.groups/` let a group wait list the
//! members of one group without reading every job. A move creates the new marker before it
//! replaces `group` and removes the old marker after, and a wait checks each marker against
//! the job's `group` file, so a member is never missed and a left-over marker is ignored. A
//! group wait looks at its members' locks (a live, non-stale holder is running; a stale one
//! is reclaimed and counted) and `done` files, and sleeps between looks like a waiting
//! acquire: inotify on the group's directory and its members' directories and locks, with
//! the poll as the bound.
//!
//! # Why a job runs once
//!
//! "Once" means: after a completion is recorded, no attempt runs the job until a reset, and
//! at most one completion is recorded.
//!
//! - **One completion:** `done` is created by `link`, which fails if the name exists.
//! - **Only the holder records it:** `finish_job` first checks that the attempt still holds
//!   the lock, by the local rule of the heartbeat (its last refresh began less than 90% of
//!   the TTL ago) and by refreshing the slot file, which succeeds only on our own record.
//!   The refresh restarts the TTL that a reclaimer must wait out, and `done` is linked right
//!   after; so when it is linked, the lock is still ours and no other attempt runs. An
//!   attempt whose lease was lost records nothing.
//! - **No attempt starts after a completion:** the holder links `done` *before* it frees
//!   the lock, and a new holder reads `done` *after* it has claimed the lock. Either the new
//!   claim follows the free, and then it sees `done`; or the old holder's lease was taken
//!   from it (stale, ended), and then by the rule above it recorded nothing. On NFS the read
//!   that decides lists the job's directory when `done` seems missing, since opening a
//!   directory revalidates it while a lookup may answer from a cached miss.
//!
//! As for any lease, a runner paused for longer than its TTL between its refresh and its
//! link (a stopped process, a hung mount) could still link `done` after another attempt
//! took over; that attempt then fails to record its own completion. Fencing tokens are the
//! defence for what the two attempts wrote. `end_session` takes a lease without waiting
//! out a TTL, so it is meant for sessions whose process is gone: ended while its live runner
//! is between that refresh and that link (a few file operations), an attempt could still
//! record its completion.
//!
//! Known limits: file operations run on the calling task (they are short metadata
//! operations, but a hung NFS mount blocks the caller); there are no counters
//! (`acquired_total` and friends are `None`) and no wait statistics; a reclaim that races with a
//! heartbeat at the very edge of the TTL, while a second process wrongly believes it is the
//! head, can cost the owner its lease (the heartbeat's read-back tells it). The owner's rule
//! runs on the monotonic clock, which stops while its host is suspended: like a stopped
//! process, a host that resumes after more than a TTL may act on its lease until its next
//! heartbeat (at most TTL/3 later) tells it otherwise; fencing tokens are the defence there.
//! Old `.ended` markers are pruned by their age on the file system's clock, so a clock step
//! can prune a fresh one: its owner then reports its lease as expired rather than ended (the
//! reason only). A runner that dies
//! while nobody attempts its job or waits for its group stays counted as not running but not
//! yet failed (status does not reclaim) until someone does. A job's runner is named by
//! `host:pid` (the `client_name` option is not recorded on disk).

mod admin;
mod disk;
#[cfg(feature = "fuzzing")]
pub(crate) use disk::{fuzz_parsers, fuzz_samples};
mod jobs;
mod notify;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use turnstile_proto::{ErrorCode, StatusDoc};

use self::disk::{Ident, Record, Touch};
use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
use crate::{random_id, Error, GroupSummary, LostReason, Options};

/// The session TTL when the options do not name one.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Shortest wait between two looks at the queue.
const MIN_POLL: Duration = Duration::from_millis(5);
/// Longest wait between two looks at the queue.
const MAX_POLL: Duration = Duration::from_millis(200);
/// How often the head of the queue examines held slots for staleness when it cannot claim.
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// Observations of records not looked at for this long are forgotten (only to bound memory:
/// forgetting one merely restarts its TTL of observation).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Token files kept below the newest.
const KEEP_TOKENS: u64 = 1000;

/// The file backend.
pub(crate) struct FileBackend {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    session: u64,
    ttl: Duration,
    who: Ident,
    /// Local processes whose life also keeps our records alive (`Options::also_alive_pids`).
    also_pids: Vec<u32>,
    next_lease: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    /// The highest token seen per semaphore directory.
    tokens: Mutex<HashMap<PathBuf, u64>>,
    /// What this client last saw in the records it judges, and since when (see "Liveness").
    seen: Mutex<Observations>,
    shut: AtomicBool,
}

/// The records this client has looked at: by path, the bytes and modification time of its
/// last look, and since when (on this client's monotonic clock) they have been the same.
struct Observations {
    records: HashMap<PathBuf, Seen>,
    pruned: Instant,
}

struct Seen {
    bytes: Vec<u8>,
    mtime: Option<SystemTime>,
    /// The end of the first look that found these bytes and this mtime.
    since: Instant,
    /// The end of the latest look.
    last: Instant,
}

impl Observations {
    /// Records a look at `path` that ended at `now` and found `bytes` and `mtime`. Returns
    /// for how long the record has been seen unchanged: zero if it changed (or is new to us).
    /// Any difference counts as a change, whatever its cause (a heartbeat, a read torn by
    /// one, an older version's rewrite of the same bytes that moved the mtime, a clock step
    /// applied to the mtime): a change only restarts the wait, so mistaking a change costs a
    /// delay, never a second holder.
    fn look(
        &mut self,
        path: &Path,
        bytes: &[u8],
        mtime: Option<SystemTime>,
        now: Instant,
    ) -> Duration {
        if now.saturating_duration_since(self.pruned) >= FORGET_AFTER {
            self.pruned = now;
            self.records
                .retain(|_, s| now.saturating_duration_since(s.last) < FORGET_AFTER);
        }
        match self.records.get_mut(path) {
            Some(s) if s.bytes == bytes && s.mtime == mtime => {
                s.last = now;
                now.saturating_duration_since(s.since)
            }
            _ => {
                self.records.insert(
                    path.to_owned(),
                    Seen {
                        bytes: bytes.to_vec(),
                        mtime,
                        since: now,
                        last: now,
                    },
                );
                Duration::ZERO
            }
        }
    }

    fn forget(&mut self, path: &Path) {
        self.records.remove(path);
    }
}

/// A lease this client holds.
struct Held {
    sem_dir: PathBuf,
    slots: Vec<PathBuf>,
    content: Vec<u8>,
    token: u64,
    /// The job's directory, when this lease is an attempt at a job (`sem_dir` is its lock).
    job: Option<PathBuf>,
    lost: watch::Sender<Option<LostReason>>,
    /// When the last successful heartbeat of every slot began.
    last_ok: Instant,
}

/// Where an acquire waits: a semaphore, or a job's lock.
struct Target<'a> {
    name: &'a str,
    sem_dir: &'a Path,
    capacity: u32,
    /// The job's directory when `sem_dir` is its lock: the grant is then an attempt at the
    /// job, and reclaiming a stale holder counts a failed attempt.
    job: Option<&'a Path>,
}

/// Why a record is stale.
#[derive(Debug)]
enum Stale {
    /// It names a process of this host, boot and pid namespace that no longer exists.
    DeadProcess { host: String, pid: u32 },
    /// This client saw it unchanged for its owner's whole TTL.
    Expired,
    /// It cannot be parsed, and this client saw it unchanged for the default TTL.
    Unreadable,
}

impl Stale {
    /// As the reason of a job's failed attempt (the coordinator's words where it has them).
    fn as_failure(&self) -> String {
        match self {
            Stale::DeadProcess { host, pid } => format!("its runner's process {host}:{pid} died"),
            Stale::Expired => "its runner's session expired (runner dead or cut off)".into(),
            Stale::Unreadable => "its lock record was unreadable and went stale".into(),
        }
    }
}

/// What a look at a record found.
enum Reap {
    /// It is alive: left alone.
    Alive,
    /// It is gone (removed by its owner or another reclaimer meanwhile).
    Gone,
    /// It was stale and this call removed it.
    Reclaimed(Stale),
}

impl Reap {
    fn gone(&self) -> bool {
        !matches!(self, Reap::Alive)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn storage(path: &Path, source: io::Error) -> Error {
    Error::Storage {
        path: path.display().to_string(),
        source,
    }
}

fn rejected(code: ErrorCode, message: String) -> Error {
    Error::Rejected { code, message }
}

fn closed_err(name: &str) -> Error {
    rejected(ErrorCode::Closed, format!("semaphore {name:?} is closed"))
}

impl FileBackend {
    /// Opens (creating it if missing) the shared directory and starts the heartbeat task.
    pub(crate) async fn open(root: PathBuf, options: Options) -> Result<FileBackend, Error> {
        if root.exists() && !root.is_dir() {
            // create_dir_all would say "File exists", which reads as if all were well.
            let e = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(storage(&root, e));
        }
        fs::create_dir_all(&root).map_err(|e| storage(&root, e))?;
        // Proves the directory is writable, once, with a clear error if it is not.
        disk::fs_now(&root).map_err(|e| storage(&root, e))?;
        let ttl = options
            .session_ttl
            .unwrap_or(DEFAULT_TTL)
            .max(Duration::from_millis(100));
        let inner = Arc::new(Inner {
            root,
            session: options.session_id.unwrap_or_else(random_id),
            ttl,
            who: Ident::current(),
            also_pids: options.also_alive_pids,
            next_lease: AtomicU64::new(crate::lease_id_base()),
            held: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            seen: Mutex::new(Observations {
                records: HashMap::new(),
                pruned: Instant::now(),
            }),
            shut: AtomicBool::new(false),
        });
        tokio::spawn(heartbeat(Arc::downgrade(&inner)));
        Ok(FileBackend { inner })
    }
}

/// Rewrites held slot files until the backend is dropped.
async fn heartbeat(inner: Weak<Inner>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) if !inner.shut.load(Ordering::Relaxed) => inner.beat(),
            _ => return,
        };
        tokio::time::sleep(next).await;
    }
}

/// A clock reading of the file system, taken at most once per use. For display only (the
/// guess at staleness that `status` shows): nothing is reclaimed by it.
struct FsClock<'a> {
    root: &'a Path,
    now: Option<SystemTime>,
}

impl FsClock<'_> {
    fn get(&mut self) -> Result<SystemTime, Error> {
        if let Some(t) = self.now {
            return Ok(t);
        }
        let t = disk::fs_now(self.root).map_err(|e| storage(self.root, e))?;
        self.now = Some(t);
        Ok(t)
    }
}

/// Withdraws the ticket of an acquire that ends without a grant (error, timeout, drop).
struct TicketGuard<'a> {
    sem_dir: &'a Path,
    content: Vec<u8>,
    ticket: Option<(u64, PathBuf)>,
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        if let Some((_, path)) = self.ticket.take() {
            let _ = disk::remove_own(self.sem_dir, &path, &self.content);
        }
    }
}

/// The numbered files of a directory (`queue/`, `tokens/`), in order.
fn numbered(dir: &Path) -> io::Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = name.parse::<u64>() {
                out.insert(n, entry.path());
            }
        }
    }
    Ok(out)
}

/// The slot files present in a semaphore directory: index → path.
fn slots(sem_dir: &Path) -> io::Result<BTreeMap<u32, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(sem_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(i) = name.to_str().and_then(|n| n.strip_prefix("slot-")) else {
            continue;
        };
        if let Ok(i) = i.parse::<u32>() {
            out.insert(i, entry.path());
        }
    }
    Ok(out)
}

impl Inner {
    fn check_live(&self) -> Result<(), Error> {
        if self.shut.load(Ordering::Relaxed) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    fn sem_dir(&self, name: &str) -> Result<PathBuf, Error> {
        disk::validate_name(name).map_err(|m| rejected(ErrorCode::InvalidArgument, m))?;
        Ok(self.root.join(disk::dir_name(name)))
    }

    /// The capacity of an existing semaphore; `None` if it was never created.
    fn capacity(&self, sem_dir: &Path, name: &str) -> Result<Option<u32>, Error> {
        let path = sem_dir.join("capacity");
        let bytes = match disk::read_small(&path) {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(storage(&path, e)),
        };
        let Some((capacity, on_disk)) = disk::parse_capacity(&bytes) else {
            return Err(storage(
                &path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the capacity file is damaged (expected a capacity and the name on two lines)",
                ),
            ));
        };
        if on_disk != name {
            return Err(rejected(
                ErrorCode::InvalidArgument,
                format!("semaphore name {name:?} clashes on disk with {on_disk:?}"),
            ));
        }
        Ok(Some(capacity))
    }

    fn is_closed(sem_dir: &Path) -> bool {
        sem_dir.join("closed").exists()
    }

    /// The TTL a record's owner keeps it alive by, and what it is if it goes stale; `Err`:
    /// it names a dead process of this host, so it is stale at once.
    fn judge(&self, bytes: &[u8]) -> Result<(Duration, Stale), Stale> {
        match Record::decode(bytes) {
            Some(r) if r.holder_dead(&self.who) => Err(Stale::DeadProcess {
                host: r.who.host,
                pid: r.who.pid,
            }),
            Some(r) => Ok((Duration::from_millis(r.ttl_ms), Stale::Expired)),
            None => Ok((self.ttl.max(DEFAULT_TTL), Stale::Unreadable)),
        }
    }

    /// Whether (and why) the record at `path`, just read as `bytes` and `mtime` (by a
    /// fresh open), is stale: it names a dead process of this host, or this client has now
    /// seen it unchanged for its owner's whole TTL, on its own monotonic clock. No two
    /// timestamps are compared, so no clock step can make a live record stale.
    fn staleness(&self, path: &Path, bytes: &[u8], mtime: Option<SystemTime>) -> Option<Stale> {
        let (ttl, stale) = match self.judge(bytes) {
            Ok(x) => x,
            Err(dead) => return Some(dead),
        };
        // Taken after the read, so that the wait counts from after it.
        let now = Instant::now();
        let unchanged = lock(&self.seen).look(path, bytes, mtime, now);
        (unchanged >= ttl).then_some(stale)
    }

    /// A guess, for display only, at whether a record is stale: it names a dead process
    /// of this host, or its modification time is older than its TTL by the file system's
    /// clock. A clock step makes the guess wrong; it is never used to reclaim.
    fn looks_stale(
        &self,
        bytes: &[u8],
        mtime: SystemTime,
        clock: &mut FsClock<'_>,
    ) -> Result<bool, Error> {
        Ok(match self.judge(bytes) {
            Err(_) => true,
            Ok((ttl, _)) => disk::age(clock.get()?, mtime) > ttl,
        })
    }

    /// Looks at `path`; if it is stale, reclaims it.
    fn reap(&self, sem_dir: &Path, path: &Path) -> Result<Reap, Error> {
        let (bytes, mtime) = match disk::read_with_mtime(path) {
            Ok(x) => x,
            Err(e) if disk::missing(&e) => {
                lock(&self.seen).forget(path);
                return Ok(Reap::Gone);
            }
            Err(e) => return Err(storage(path, e)),
        };
        let Some(stale) = self.staleness(path, &bytes, Some(mtime)) else {
            return Ok(Reap::Alive);
        };
        // Re-read under the private name: removed only if it still holds exactly the bytes
        // (and mtime) that were seen unchanged; an owner's heartbeat in between puts it back.
        let outcome = disk::reclaim(sem_dir, path, |now, now_mtime| {
            now == bytes.as_slice() && now_mtime == mtime
        })
        .map_err(|e| storage(path, e))?;
        Ok(match outcome {
            disk::Reclaimed::Removed => {
                lock(&self.seen).forget(path);
                tracing::info!(path = %path.display(), why = ?stale, "reclaimed a stale lease or ticket");
                Reap::Reclaimed(stale)
            }
            disk::Reclaimed::AlreadyGone => {
                lock(&self.seen).forget(path);
                Reap::Gone
            }
            disk::Reclaimed::Kept => Reap::Alive,
        })
    }

    /// [`reap`](Inner::reap) for a held slot: reclaiming the holder of a job's lock counts
    /// a failed attempt of the job (by the one reclaimer that removed it).
    fn reap_slot(&self, sem_dir: &Path, job: Option<&Path>, path: &Path) -> Result<bool, Error> {
        let reap = self.reap(sem_dir, path)?;
        if let (Reap::Reclaimed(stale), Some(job_dir)) = (&reap, job) {
            self.count_failure(job_dir, &stale.as_failure());
        }
        Ok(reap.gone())
    }

    /// Takes the next ticket in the queue.
    fn take_ticket(&self, sem_dir: &Path, content: &[u8]) -> Result<(u64, PathBuf), Error> {
        let queue = sem_dir.join("queue");
        let mut n = numbered(&queue)
            .map_err(|e| storage(&queue, e))?
            .last_key_value()
            .map_or(1, |(n, _)| n + 1);
        let tmp = disk::write_temp(sem_dir, content).map_err(|e| storage(sem_dir, e))?;
        let result = loop {
            let target = queue.join(format!("{n:020}"));
            match disk::claim(&tmp, &target, content) {
                Ok(true) => break Ok((n, target)),
                Ok(false) => n += 1,
                Err(e) => break Err(storage(&target, e)),
            }
        };
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Hands out the next fencing token of a semaphore.
    fn next_token(&self, sem_dir: &Path, content: &[u8]) -> Result<u64, Error> {
        let dir = sem_dir.join("tokens");
        let listed = numbered(&dir).map_err(|e| storage(&dir, e))?;
        let hint = lock(&self.tokens).get(sem_dir).copied().unwrap_or(0);
        let mut n = listed.last_key_value().map_or(0, |(n, _)| *n).max(hint) + 1;
        let tmp = disk::write_temp(sem_dir, content).map_err(|e| storage(sem_dir, e))?;
        let result = loop {
            let target = dir.join(format!("{n:020}"));
            match disk::claim(&tmp, &target, content) {
                Ok(true) => break Ok(n),
                Ok(false) => n += 1,
                Err(e) => break Err(storage(&target, e)),
            }
        };
        let _ = fs::remove_file(&tmp);
        if let Ok(token) = result {
            lock(&self.tokens).insert(sem_dir.to_owned(), token);
            for path in listed
                .range(..token.saturating_sub(KEEP_TOKENS))
                .map(|(_, p)| p)
            {
                let _ = fs::remove_file(path);
            }
        }
        result
    }

    /// One look at the queue: claims the slots if this acquire is at the head and they are
    /// free. `Ok(None)`: keep waiting.
    fn try_grant(
        &self,
        target: &Target<'_>,
        record: &mut Record,
        guard: &mut TicketGuard<'_>,
        next_scan: &mut Instant,
    ) -> Result<Option<Grant>, Error> {
        let (name, sem_dir) = (target.name, target.sem_dir);
        // A semaphore's capacity can change (`set_capacity`) or go (`delete`): read at every
        // look. A job's lock keeps capacity 1.
        let capacity = match target.job {
            Some(_) => target.capacity,
            None => self.live_capacity(target)?,
        };
        if record.weight > capacity {
            return Err(rejected(
                ErrorCode::WeightExceedsCapacity,
                format!(
                    "weight {} exceeds the capacity {capacity} of semaphore {name:?}",
                    record.weight
                ),
            ));
        }
        let queue = sem_dir.join("queue");
        let tickets = numbered(&queue).map_err(|e| storage(&queue, e))?;
        let Some((mine, _)) = guard.ticket.clone() else {
            return Ok(None);
        };
        if !tickets.contains_key(&mine) {
            // Our ticket was reclaimed (we were paused for a TTL): queue again.
            guard.ticket = Some(self.take_ticket(sem_dir, &guard.content)?);
            return Ok(None);
        }
        for path in tickets.range(..mine).map(|(_, p)| p) {
            if !self.reap(sem_dir, path)?.gone() {
                return Ok(None); // a live waiter is ahead of us
            }
        }
        // At the head of the queue. Every slot file counts as a permit in use, also one at
        // or above a shrunk capacity, so nothing is granted until the holders fit.
        let mut present = slots(sem_dir).map_err(|e| storage(sem_dir, e))?;
        let weight = record.weight as usize;
        let fits = |present: &BTreeMap<u32, PathBuf>| present.len() + weight <= capacity as usize;
        if !fits(&present) && Instant::now() >= *next_scan {
            *next_scan = Instant::now() + SCAN_EVERY;
            let held: Vec<(u32, PathBuf)> = present.iter().map(|(i, p)| (*i, p.clone())).collect();
            for (i, path) in held {
                if fits(&present) {
                    break;
                }
                if self.reap_slot(sem_dir, target.job, &path)? {
                    present.remove(&i);
                }
            }
        }
        if !fits(&present) {
            return Ok(None);
        }
        // Fits implies at least `weight` free indices below the capacity.
        let free: Vec<u32> = (0..capacity).filter(|i| !present.contains_key(i)).collect();
        record.token = self.next_token(sem_dir, &guard.content)?;
        record.start_ms = disk::unix_ms();
        let content = record.encode();
        let tmp = disk::write_temp(sem_dir, &content).map_err(|e| storage(sem_dir, e))?;
        let mut claimed = Vec::with_capacity(weight);
        let mut failure = None;
        for i in &free[..weight] {
            let target = sem_dir.join(format!("slot-{i}"));
            match disk::claim(&tmp, &target, &content) {
                Ok(true) => claimed.push(target),
                Ok(false) => break,
                Err(e) => {
                    failure = Some(storage(&target, e));
                    break;
                }
            }
        }
        let _ = fs::remove_file(&tmp);
        let rollback = |claimed: &[PathBuf]| {
            for path in claimed {
                let _ = disk::remove_own(sem_dir, path, &content);
            }
        };
        if let Some(e) = failure {
            rollback(&claimed);
            return Err(e);
        }
        if claimed.len() < weight {
            // Someone else claimed a slot we saw free: back off and look again.
            rollback(&claimed);
            return Ok(None);
        }
        // The claim counts only if the capacity it was made under still holds after it: a
        // change (or a delete) after this read comes after the grant; one before it is seen
        // here, and the claim is undone and made again under the new capacity.
        if target.job.is_none() && self.live_capacity(target)? != capacity {
            rollback(&claimed);
            return Ok(None);
        }
        // Granted: leave the queue so that the next waiter becomes the head.
        if let Some((_, path)) = guard.ticket.take() {
            let _ = disk::remove_own(sem_dir, &path, &guard.content);
        }
        if Inner::is_closed(sem_dir) {
            rollback(&claimed);
            return Err(closed_err(name));
        }
        let (tx, rx) = watch::channel(None);
        lock(&self.held).insert(
            record.lease,
            Held {
                sem_dir: sem_dir.to_owned(),
                slots: claimed,
                content,
                token: record.token,
                job: target.job.map(Path::to_owned),
                lost: tx,
                last_ok: Instant::now(),
            },
        );
        Ok(Some(Grant {
            lease: record.lease,
            token: record.token,
            lost: rx,
        }))
    }

    /// The capacity of `target` as it is on disk now: a deleted semaphore's waiters fail.
    fn live_capacity(&self, target: &Target<'_>) -> Result<u32, Error> {
        self.capacity(target.sem_dir, target.name)?.ok_or_else(|| {
            rejected(
                ErrorCode::NoSuchSemaphore,
                format!("semaphore {:?} does not exist", target.name),
            )
        })
    }

    async fn acquire(
        &self,
        name: &str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> Result<Grant, Error> {
        self.check_live()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        if weight == 0 {
            return Err(rejected(
                ErrorCode::InvalidArgument,
                "weight must be at least 1".into(),
            ));
        }
        let sem_dir = self.sem_dir(name)?;
        let Some(capacity) = self.capacity(&sem_dir, name)? else {
            return Err(rejected(
                ErrorCode::NoSuchSemaphore,
                format!("semaphore {name:?} does not exist"),
            ));
        };
        if Inner::is_closed(&sem_dir) {
            return Err(closed_err(name));
        }
        if weight > capacity {
            return Err(rejected(
                ErrorCode::WeightExceedsCapacity,
                format!("weight {weight} exceeds the capacity {capacity} of semaphore {name:?}"),
            ));
        }
        let target = Target {
            name,
            sem_dir: &sem_dir,
            capacity,
            job: None,
        };
        let never_settled = || Ok(None::<Infallible>);
        match self
            .wait_for_grant(&target, weight, deadline, never_settled)
            .await?
        {
            Ok(grant) => Ok(grant),
            Err(never) => match never {},
        }
    }

    /// Queues for `weight` slots of `target` and waits until they are granted (`Ok(grant)`),
    /// the `deadline` passes ([`Error::TimedOut`]; a deadline already past makes one look),
    /// or `settled` says at one of the looks that waiting is over (`Err(outcome)`: a job's
    /// completion). The ticket is withdrawn whenever this returns without a grant, or is
    /// dropped.
    async fn wait_for_grant<T>(
        &self,
        target: &Target<'_>,
        weight: u32,
        deadline: Option<Instant>,
        mut settled: impl FnMut() -> Result<Option<T>, Error> + Send,
    ) -> Result<Result<Grant, T>, Error> {
        let (name, sem_dir) = (target.name, target.sem_dir);
        let mut record = Record {
            lease: self.next_lease.fetch_add(1, Ordering::Relaxed),
            session: self.session,
            weight,
            token: 0,
            ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            start_ms: disk::unix_ms(),
            nonce: random_id(),
            who: self.who.clone(),
            also_pids: self.also_pids.clone(),
        };
        let mut guard = TicketGuard {
            sem_dir,
            content: record.encode(),
            ticket: None,
        };
        guard.ticket = Some(self.take_ticket(sem_dir, &guard.content)?);
        let mut last_touch = Instant::now();
        let mut backoff = MIN_POLL;
        // Made only once a look has not granted (an uncontended acquire needs none), after
        // the ticket (so that taking it does not wake us), and followed by another look at
        // once, so that a change between the first look and the watch is not missed.
        let mut watch: Option<Option<notify::Watch>> = None;
        let mut next_scan = Instant::now();
        loop {
            self.check_live()?;
            if Inner::is_closed(sem_dir) {
                return Err(closed_err(name));
            }
            if let Some(outcome) = settled()? {
                return Ok(Err(outcome));
            }
            let granted = self.try_grant(target, &mut record, &mut guard, &mut next_scan)?;
            if let Some(grant) = granted {
                return Ok(Ok(grant));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::TimedOut);
            }
            if now >= last_touch + self.ttl / 3 {
                last_touch = now;
                if let Some((_, path)) = &guard.ticket {
                    // A new counter at every attempt, so a write that landed although it
                    // reported an error is never "refreshed" again with the same bytes.
                    guard.content = disk::next_beat(&guard.content);
                    let touched =
                        disk::touch(path, &guard.content).map_err(|e| storage(path, e))?;
                    if touched == Touch::Gone {
                        guard.ticket = None;
                        guard.ticket = Some(self.take_ticket(sem_dir, &guard.content)?);
                    }
                }
            }
            let Some(watch) = &watch else {
                watch = Some(notify::Watch::new(sem_dir));
                continue;
            };
            // Often enough to keep the ticket fresh, whatever the TTL.
            let mut nap = backoff.min(self.ttl / 3);
            if let Some(d) = deadline {
                nap = nap.min(d.saturating_duration_since(now));
            }
            let woken = notify::nap(watch.as_ref(), nap).await;
            backoff = if woken {
                MIN_POLL
            } else {
                (backoff * 2).min(MAX_POLL)
            };
        }
    }

    /// Removes the slot files of a lease (those that are still ours).
    fn free(held: &Held) {
        for slot in &held.slots {
            let _ = disk::remove_own(&held.sem_dir, slot, &held.content);
        }
    }

    /// How long after the start of its last successful refresh a lease still counts as
    /// ours: 90% of the TTL, so that we give it up before anyone may judge it stale.
    fn give_up(&self) -> Duration {
        self.ttl - self.ttl / 10
    }

    /// Whether a lease is still ours, refreshing it if so: its last refresh began less than
    /// [`give_up`](Inner::give_up) ago, and every slot file still holds our record. The
    /// refresh changes the record's bytes, which restarts the TTL a reclaimer must wait out,
    /// so a step taken right after it (recording a job's end) is taken while nobody else can
    /// hold the lease. A new counter at every attempt, so that a write that landed although
    /// it reported an error is never "refreshed" again with the same bytes.
    fn still_held(&self, h: &mut Held) -> Result<bool, Error> {
        let started = Instant::now();
        if started >= h.last_ok + self.give_up() {
            return Ok(false);
        }
        h.content = disk::next_beat(&h.content);
        for slot in &h.slots {
            if disk::touch(slot, &h.content).map_err(|e| storage(slot, e))? == Touch::Gone {
                return Ok(false);
            }
        }
        h.last_ok = started;
        Ok(true)
    }

    /// The marker that `end_session` leaves for the owner of `session`, so that it can tell
    /// "ended by a supervisor" from "expired" when it finds its records gone.
    fn ended_marker(&self, session: u64) -> PathBuf {
        self.root.join(".ended").join(format!("{session:016x}"))
    }

    /// The marker `revoke` leaves for the owner of lease `lease` of `session`.
    fn revoked_marker(&self, session: u64, lease: u64) -> PathBuf {
        self.root
            .join(".revoked")
            .join(format!("{session:016x}-{lease:016x}"))
    }

    /// Why a lease whose files are gone was lost.
    fn lost_reason(&self, lease: u64, h: &Held) -> LostReason {
        let revoked = self.revoked_marker(self.session, lease);
        if revoked.exists() {
            // Read once: the marker has done its work.
            let _ = fs::remove_file(&revoked);
            LostReason::Revoked
        } else if Inner::is_closed(&h.sem_dir) {
            LostReason::Closed
        } else if self.ended_marker(self.session).exists() {
            LostReason::SessionEnded
        } else {
            LostReason::Expired
        }
    }

    /// Ends a lease this client gives up (released, dropped, shut down). For an attempt at a
    /// job that still holds the job's lock, that is a failed attempt. It is counted before
    /// the lock comes free, so that the attempt that takes over sees it; or, if the lease
    /// was past the local rule (so that a reclaimer may be counting it), only if this call
    /// is the one that removes the record.
    fn let_go(&self, mut h: Held, why: &str) -> Result<(), Error> {
        let job = h.job.clone();
        let mut counted = false;
        if let Some(job_dir) = &job {
            if self.still_held(&mut h).unwrap_or(false) {
                self.count_failure(job_dir, why);
                counted = true;
            }
        }
        let mut removed = false;
        for slot in &h.slots {
            removed |=
                disk::remove_own(&h.sem_dir, slot, &h.content).map_err(|e| storage(slot, e))?;
        }
        if let (Some(job_dir), false, true) = (&job, counted, removed) {
            self.count_failure(job_dir, why);
        }
        Ok(())
    }

    fn release(&self, lease: u64) -> Result<(), Error> {
        let held = lock(&self.held).remove(&lease);
        match held {
            Some(h) => self.let_go(h, "released before it finished"),
            None => Ok(()),
        }
    }

    /// One heartbeat: rewrites every held slot file, and tells permits whose lease is gone.
    /// Returns the time until the next one.
    fn beat(&self) -> Duration {
        let period = self.ttl / 3;
        let give_up = self.give_up();
        let mut next = period;
        let mut held = lock(&self.held);
        let mut lost = Vec::new();
        for (lease, h) in held.iter_mut() {
            let started = Instant::now();
            if Inner::is_closed(&h.sem_dir) {
                lost.push((*lease, LostReason::Closed));
                continue;
            }
            let mut outcome = Ok(Touch::Alive);
            // A new counter at every attempt (see `still_held`); the slots of one lease are
            // links of one file, so one new value serves them all.
            h.content = disk::next_beat(&h.content);
            for slot in &h.slots {
                outcome = disk::touch(slot, &h.content);
                if outcome.as_ref().map_or(true, |t| *t == Touch::Gone) {
                    break;
                }
            }
            match outcome {
                Ok(Touch::Alive) => h.last_ok = started,
                Ok(Touch::Gone) => lost.push((*lease, self.lost_reason(*lease, h))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh a lease file");
                    if started.saturating_duration_since(h.last_ok) >= give_up {
                        lost.push((*lease, LostReason::Unreachable));
                    } else {
                        next = next
                            .min(self.ttl / 10)
                            .min((h.last_ok + give_up).saturating_duration_since(started));
                    }
                }
            }
        }
        for (lease, reason) in lost {
            if let Some(h) = held.remove(&lease) {
                tracing::warn!(lease = %lease, %reason, "lease lost");
                Inner::free(&h);
                let _ = h.lost.send(Some(reason));
            }
        }
        next.max(Duration::from_millis(1))
    }

    /// Releases everything this client holds (waiting acquires see the flag and withdraw).
    fn shutdown(&self) {
        self.shut.store(true, Ordering::Relaxed);
        let held: Vec<Held> = lock(&self.held).drain().map(|(_, h)| h).collect();
        for h in held {
            let _ = self.let_go(h, "its session was closed before it finished");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Backend for FileBackend {
    fn ensure<'a>(&'a self, name: &'a str, capacity: u32) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.ensure(name, capacity)
        })
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Grant, Error>> {
        Box::pin(self.inner.acquire(name, weight, timeout))
    }

    fn release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.inner.release(lease) })
    }

    fn release_in_background(&self, lease: u64) {
        let _ = self.inner.release(lease);
    }

    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.close(name)
        })
    }

    fn set_capacity<'a>(
        &'a self,
        name: &'a str,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.set_capacity(name, capacity)
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.delete(name)
        })
    }

    fn revoke<'a>(&'a self, name: &'a str, lease: u64) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.revoke(name, lease)
        })
    }

    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.status(name)
        })
    }

    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.end_session(session)
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.inner.shutdown();
            Ok(())
        })
    }

    fn session_id(&self) -> u64 {
        self.inner.session
    }

    fn begin_job<'a>(
        &'a self,
        job: &'a str,
        group: Option<&'a str>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<JobBegin, Error>> {
        Box::pin(self.inner.begin_job(job, group, timeout))
    }

    fn finish_job<'a>(
        &'a self,
        job: &'a str,
        lease: u64,
        end: JobEnd<'a>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.finish_job(job, lease, end)
        })
    }

    fn reset_job<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            self.inner.check_live()?;
            self.inner.reset_job(job)
        })
    }

    fn wait_group<'a>(
        &'a self,
        group: &'a str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<GroupSummary, Error>> {
        Box::pin(self.inner.wait_group(group, jobs, timeout))
    }
}
