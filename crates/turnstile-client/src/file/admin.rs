//! The file backend's administrative calls: ensure, status, close, end_session. They read
//! and remove records but never claim slots, so the safety argument of the parent module
//! does not depend on them (except that close and end_session take leases away, which
//! their holders learn at their next heartbeat, and end_session counts the failed attempts
//! of the jobs whose locks it frees).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use turnstile_proto::{ErrorCode, HolderStatus, SemaphoreStatus, StatusDoc, WaiterStatus};

use super::disk::{self, Record};
use super::{closed_err, lock, numbered, rejected, slots, storage, Inner};
use crate::{Error, LostReason};

impl Inner {
    /// The semaphore directories to report: one, or every one.
    pub(super) fn status(&self, name: Option<&str>) -> Result<StatusDoc, Error> {
        let mut dirs = Vec::new();
        match name {
            Some(name) => dirs.push((self.sem_dir(name)?, Some(name))),
            None => {
                for entry in fs::read_dir(&self.root).map_err(|e| storage(&self.root, e))? {
                    let entry = entry.map_err(|e| storage(&self.root, e))?;
                    if !entry.file_name().to_string_lossy().starts_with('.') {
                        dirs.push((entry.path(), None));
                    }
                }
            }
        }
        let now_ms = disk::unix_ms();
        let mut semaphores = Vec::new();
        for (dir, asked) in dirs {
            let Ok(bytes) = disk::read_small(&dir.join("capacity")) else {
                continue;
            };
            let Some((capacity, name)) = disk::parse_capacity(&bytes) else {
                continue;
            };
            if asked.is_some_and(|a| a != name) {
                continue;
            }
            let mut holders: BTreeMap<(u64, u64, u64), HolderStatus> = BTreeMap::new();
            let present = slots(&dir).map_err(|e| storage(&dir, e))?;
            // Every slot file, also those above a shrunk capacity until their holders go.
            let in_use = u32::try_from(present.len()).unwrap_or(u32::MAX);
            for path in present.values() {
                let Some(r) = disk::read_small(path).ok().and_then(|b| Record::decode(&b)) else {
                    continue;
                };
                holders
                    .entry((r.session, r.lease, r.nonce))
                    .or_insert_with(|| HolderStatus {
                        lease_id: r.lease,
                        session: format!("{:016x}", r.session),
                        client: format!("{}:{}", r.who.host, r.who.pid),
                        weight: 0,
                        token: r.token,
                        age_ms: now_ms.saturating_sub(r.start_ms),
                    })
                    .weight += 1;
            }
            let mut holders: Vec<HolderStatus> = holders.into_values().collect();
            holders.sort_by_key(|h| h.token);
            // Tickets are numbered in arrival order, which is the queue order.
            let mut waiters = Vec::new();
            if let Ok(tickets) = numbered(&dir.join("queue")) {
                for path in tickets.values() {
                    if let Some(r) = disk::read_small(path).ok().and_then(|b| Record::decode(&b)) {
                        waiters.push(WaiterStatus {
                            lease_id: r.lease,
                            session: format!("{:016x}", r.session),
                            client: format!("{}:{}", r.who.host, r.who.pid),
                            weight: r.weight,
                            age_ms: now_ms.saturating_sub(r.start_ms),
                        });
                    }
                }
            }
            let queued = waiters.len() as u64;
            let queued_weight = waiters.iter().map(|w| u64::from(w.weight)).sum();
            semaphores.push(SemaphoreStatus {
                name,
                capacity,
                in_use,
                queued,
                queued_weight,
                closed: Inner::is_closed(&dir),
                holders,
                waiters,
                acquired_total: None,
                released_total: None,
                expired_total: None,
                timed_out_total: None,
                lost_total: None,
                wait: Default::default(),
            });
        }
        semaphores.sort_by(|a, b| a.name.cmp(&b.name));
        // With a name: the semaphore and the job of that name, and no groups.
        let (groups, jobs) = match name {
            Some(name) => (Vec::new(), self.job_status(Some(name))?.1),
            None => self.job_status(None)?,
        };
        Ok(StatusDoc {
            semaphores,
            groups,
            jobs,
            next: None,
        })
    }

    pub(super) fn ensure(&self, name: &str, capacity: u32) -> Result<(), Error> {
        let sem_dir = self.sem_dir(name)?;
        self.ensure_dir(&sem_dir, name, capacity)
    }

    /// Creates the semaphore `name` in `sem_dir` (a semaphore's directory, or a job's lock)
    /// or checks its capacity.
    pub(super) fn ensure_dir(
        &self,
        sem_dir: &Path,
        name: &str,
        capacity: u32,
    ) -> Result<(), Error> {
        if capacity == 0 {
            return Err(rejected(
                ErrorCode::InvalidArgument,
                "capacity must be at least 1".into(),
            ));
        }
        for sub in ["queue", "tokens"] {
            let d = sem_dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| storage(&d, e))?;
        }
        if Inner::is_closed(sem_dir) {
            return Err(closed_err(name));
        }
        let existing = match self.capacity(sem_dir, name)? {
            Some(c) => c,
            None => {
                let path = sem_dir.join("capacity");
                let record = disk::capacity_record(capacity, name);
                let created = disk::create_exclusive(sem_dir, &path, &record)
                    .map_err(|e| storage(&path, e))?;
                if created {
                    return Ok(());
                }
                // Another process created it first.
                self.capacity(sem_dir, name)?.unwrap_or(capacity)
            }
        };
        if existing != capacity {
            return Err(rejected(
                ErrorCode::CapacityMismatch,
                format!(
                    "semaphore {name:?} already exists with capacity {existing}, not {capacity}"
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn close(&self, name: &str) -> Result<(), Error> {
        let sem_dir = self.sem_dir(name)?;
        if self.capacity(&sem_dir, name)?.is_none() {
            return Err(rejected(
                ErrorCode::NoSuchSemaphore,
                format!("semaphore {name:?} does not exist"),
            ));
        }
        let path = sem_dir.join("closed");
        disk::create_exclusive(&sem_dir, &path, b"closed\n").map_err(|e| storage(&path, e))?;
        // Holders learn of it at their next heartbeat; waiters at their next look.
        for slot in slots(&sem_dir).map_err(|e| storage(&sem_dir, e))?.values() {
            let _ = fs::remove_file(slot);
        }
        let queue = sem_dir.join("queue");
        for ticket in numbered(&queue).map_err(|e| storage(&queue, e))?.values() {
            let _ = fs::remove_file(ticket);
        }
        let mut held = lock(&self.held);
        let ours: Vec<u64> = held
            .iter()
            .filter(|(_, h)| h.sem_dir == sem_dir)
            .map(|(l, _)| *l)
            .collect();
        for lease in ours {
            if let Some(h) = held.remove(&lease) {
                h.lost.send(LostReason::Closed);
            }
        }
        Ok(())
    }

    pub(super) fn end_session(&self, session: u64) -> Result<(), Error> {
        // The marker first, so that the session's owner, finding its records gone, can tell
        // why.
        self.mark_ended(session)?;
        // Every semaphore, and every job's lock (with the job's directory).
        let mut dirs: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(|e| storage(&self.root, e))?;
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                dirs.push((entry.path(), None));
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.join(".jobs")) {
            for entry in entries.flatten() {
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    dirs.push((entry.path().join("lock"), Some(entry.path())));
                }
            }
        }
        for (sem_dir, job_dir) in dirs {
            let held: Vec<PathBuf> = slots(&sem_dir)
                .map(|s| s.into_values().collect())
                .unwrap_or_default();
            let queued: Vec<PathBuf> = numbered(&sem_dir.join("queue"))
                .map(|t| t.into_values().collect())
                .unwrap_or_default();
            for (path, is_slot) in held
                .into_iter()
                .map(|p| (p, true))
                .chain(queued.into_iter().map(|p| (p, false)))
            {
                let Ok(bytes) = disk::read_small(&path) else {
                    continue;
                };
                let ours = Record::decode(&bytes).is_some_and(|r| r.session == session);
                if !ours {
                    continue;
                }
                let removed =
                    disk::remove_own(&sem_dir, &path, &bytes).map_err(|e| storage(&path, e))?;
                if let (true, true, Some(job_dir)) = (removed, is_slot, &job_dir) {
                    self.count_failure(job_dir, "its runner's session was ended by a supervisor");
                }
            }
        }
        Ok(())
    }

    /// Leaves the marker of an ended session, and prunes markers older than a day: a
    /// marker only matters to a live owner, which finds its records gone within a TTL.
    fn mark_ended(&self, session: u64) -> Result<(), Error> {
        const KEEP: Duration = Duration::from_secs(24 * 3600);
        let marker = self.ended_marker(session);
        let Some(dir) = marker.parent() else {
            return Ok(());
        };
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        disk::create_exclusive(dir, &marker, b"ended\n").map_err(|e| storage(&marker, e))?;
        let now = disk::fs_now(&self.root).map_err(|e| storage(&self.root, e))?;
        for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))?.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|mtime| disk::age(now, mtime) > KEEP);
            if old {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// The lifecycle calls: set-capacity, delete, revoke. Like close, they never claim slots.
impl Inner {
    /// An existing, open semaphore's directory and capacity, or the error an operator's call
    /// on it gets.
    fn open_semaphore(&self, name: &str) -> Result<(PathBuf, u32), Error> {
        let sem_dir = self.sem_dir(name)?;
        let Some(capacity) = self.capacity(&sem_dir, name)? else {
            return Err(no_such(name));
        };
        Ok((sem_dir, capacity))
    }

    /// Rewrites the `capacity` file (by rename, so that a reader sees the old or the new
    /// one). Waiters read it at every look: the head claims only below the new capacity and
    /// only while the slots held, whatever their index, plus its weight fit; a waiter heavier
    /// than the new capacity fails; a claim that finds the capacity changed under it is
    /// rolled back (see `try_grant`).
    pub(super) fn set_capacity(&self, name: &str, capacity: u32) -> Result<(), Error> {
        if capacity == 0 {
            return Err(rejected(
                ErrorCode::InvalidArgument,
                "capacity must be at least 1".into(),
            ));
        }
        let (sem_dir, old) = self.open_semaphore(name)?;
        if Inner::is_closed(&sem_dir) {
            return Err(closed_err(name));
        }
        if old == capacity {
            return Ok(());
        }
        let path = sem_dir.join("capacity");
        disk::replace(&sem_dir, &path, &disk::capacity_record(capacity, name))
            .map_err(|e| storage(&path, e))
    }

    /// Deletes a closed or idle semaphore: its `capacity` file goes (first, by rename to a
    /// private name, so that no claim can complete against it: a claim checks the capacity
    /// after it links), then its `closed` marker. The directory stays with its `tokens/`, so
    /// that the name, created afresh, goes on counting tokens above the old ones. If a slot
    /// or ticket shows up after the rename (a claim that completed just before it), the
    /// capacity is put back and the delete refused.
    pub(super) fn delete(&self, name: &str) -> Result<(), Error> {
        let (sem_dir, _) = self.open_semaphore(name)?;
        let closed = Inner::is_closed(&sem_dir);
        let in_use = |dir: &Path| -> Result<(usize, usize), Error> {
            let holders = slots(dir).map_err(|e| storage(dir, e))?.len();
            let queue = dir.join("queue");
            let waiters = match numbered(&queue) {
                Ok(t) => t.len(),
                Err(e) if disk::missing(&e) => 0,
                Err(e) => return Err(storage(&queue, e)),
            };
            Ok((holders, waiters))
        };
        let refuse = |(holders, waiters): (usize, usize)| {
            rejected(
                ErrorCode::InUse,
                format!(
                    "semaphore {name:?} is in use ({holders} holders, {waiters} waiters): \
                     close it or wait until it is idle"
                ),
            )
        };
        if !closed {
            let counts = in_use(&sem_dir)?;
            if counts != (0, 0) {
                return Err(refuse(counts));
            }
        }
        let path = sem_dir.join("capacity");
        let private = disk::hidden_name(&sem_dir, "delete");
        match fs::rename(&path, &private) {
            Ok(()) => {}
            Err(e) if disk::missing(&e) => return Err(no_such(name)),
            Err(e) => return Err(storage(&path, e)),
        }
        if !closed {
            let counts = in_use(&sem_dir)?;
            if counts != (0, 0) {
                let _ = fs::hard_link(&private, &path);
                let _ = fs::remove_file(&private);
                return Err(refuse(counts));
            }
        }
        let _ = fs::remove_file(&private);
        // A closed semaphore's waiters have seen the marker or will find no capacity.
        let marker = sem_dir.join("closed");
        match fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(e) if disk::missing(&e) => Ok(()),
            Err(e) => Err(storage(&marker, e)),
        }
    }

    /// Takes the held lease `lease` of `name` away: a marker first (so that its owner, finding
    /// its slot files gone at its next heartbeat, reports [`LostReason::Revoked`]), then its
    /// slot files, which frees them for the head of the queue.
    pub(super) fn revoke(&self, name: &str, lease: u64) -> Result<(), Error> {
        let (sem_dir, _) = self.open_semaphore(name)?;
        let mut found = Vec::new();
        for path in slots(&sem_dir)
            .map_err(|e| storage(&sem_dir, e))?
            .into_values()
        {
            let Ok(bytes) = disk::read_small(&path) else {
                continue;
            };
            if let Some(r) = Record::decode(&bytes).filter(|r| r.lease == lease) {
                found.push((path, bytes, r.session));
            }
        }
        if found.is_empty() {
            return Err(rejected(
                ErrorCode::UnknownLease,
                format!("lease {lease} does not hold semaphore {name:?}"),
            ));
        }
        for (_, _, session) in &found {
            let marker = self.revoked_marker(*session, lease);
            if let Some(dir) = marker.parent() {
                fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
                disk::create_exclusive(dir, &marker, b"revoked\n")
                    .map_err(|e| storage(&marker, e))?;
            }
        }
        for (path, bytes, _) in &found {
            // The holder's heartbeat may rewrite it meanwhile: `remove_own` compares the
            // acquire, not the beat counter.
            disk::remove_own(&sem_dir, path, bytes).map_err(|e| storage(path, e))?;
        }
        // A lease of this very client: tell its permit now.
        if let Some(h) = lock(&self.held).remove(&lease) {
            if h.sem_dir == sem_dir {
                h.lost.send(LostReason::Revoked);
            } else {
                lock(&self.held).insert(lease, h);
            }
        }
        Ok(())
    }
}

fn no_such(name: &str) -> Error {
    rejected(
        ErrorCode::NoSuchSemaphore,
        format!("semaphore {name:?} does not exist"),
    )
}
