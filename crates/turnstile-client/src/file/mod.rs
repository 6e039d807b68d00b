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
mod queue;
mod reap;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use turnstile_proto::{ErrorCode, StatusDoc};

use self::disk::{Ident, Record, Touch};
use self::queue::{numbered, slots};
use self::reap::Observations;
use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
use crate::lost::LostSender;
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

/// A lease this client holds.
struct Held {
    sem_dir: PathBuf,
    slots: Vec<PathBuf>,
    content: Vec<u8>,
    token: u64,
    /// The job's directory, when this lease is an attempt at a job (`sem_dir` is its lock).
    job: Option<PathBuf>,
    lost: LostSender,
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
            seen: Mutex::new(Observations::new()),
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
                h.lost.send(reason);
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
