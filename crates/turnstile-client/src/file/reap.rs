//! Staleness: what this client has seen of the records it judges, and reclaiming a record
//! whose owner is gone (see "Liveness" in the module doc of `file`).

use super::*;

/// The records this client has looked at: by path, the bytes and modification time of its
/// last look, and since when (on this client's monotonic clock) they have been the same.
pub(super) struct Observations {
    records: HashMap<PathBuf, Seen>,
    pruned: Instant,
}

pub(super) struct Seen {
    bytes: Vec<u8>,
    mtime: Option<SystemTime>,
    /// The end of the first look that found these bytes and this mtime.
    since: Instant,
    /// The end of the latest look.
    last: Instant,
}

impl Observations {
    /// None yet.
    pub(super) fn new() -> Observations {
        Observations {
            records: HashMap::new(),
            pruned: Instant::now(),
        }
    }

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

/// Why a record is stale.
#[derive(Debug)]
pub(super) enum Stale {
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
pub(super) enum Reap {
    /// It is alive: left alone.
    Alive,
    /// It is gone (removed by its owner or another reclaimer meanwhile).
    Gone,
    /// It was stale and this call removed it.
    Reclaimed(Stale),
}

impl Reap {
    pub(super) fn gone(&self) -> bool {
        !matches!(self, Reap::Alive)
    }
}

impl Inner {
    /// The TTL a record's owner keeps it alive by, and what it is if it goes stale; `Err`:
    /// it names a dead process of this host, so it is stale at once.
    pub(super) fn judge(&self, bytes: &[u8]) -> Result<(Duration, Stale), Stale> {
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
    pub(super) fn staleness(
        &self,
        path: &Path,
        bytes: &[u8],
        mtime: Option<SystemTime>,
    ) -> Option<Stale> {
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
    pub(super) fn looks_stale(
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
    pub(super) fn reap(&self, sem_dir: &Path, path: &Path) -> Result<Reap, Error> {
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
    pub(super) fn reap_slot(
        &self,
        sem_dir: &Path,
        job: Option<&Path>,
        path: &Path,
    ) -> Result<bool, Error> {
        let reap = self.reap(sem_dir, path)?;
        if let (Reap::Reclaimed(stale), Some(job_dir)) = (&reap, job) {
            self.count_failure(job_dir, &stale.as_failure());
        }
        Ok(reap.gone())
    }
}
