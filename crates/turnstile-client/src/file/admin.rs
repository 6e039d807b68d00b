//! The file backend's administrative calls: ensure, status, close, end_session. They read
//! and remove records but never claim slots, so the safety argument of the parent module
//! does not depend on them (except that close and end_session take leases away, which
//! their holders learn at their next heartbeat).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use turnstile_proto::{ErrorCode, HolderStatus, SemaphoreStatus, StatusDoc};

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
            let in_use = present.range(..capacity).count() as u32;
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
            let (mut queued, mut queued_weight) = (0, 0);
            if let Ok(tickets) = numbered(&dir.join("queue")) {
                for path in tickets.values() {
                    if let Some(r) = disk::read_small(path).ok().and_then(|b| Record::decode(&b)) {
                        queued += 1;
                        queued_weight += u64::from(r.weight);
                    }
                }
            }
            semaphores.push(SemaphoreStatus {
                name,
                capacity,
                in_use,
                queued,
                queued_weight,
                closed: Inner::is_closed(&dir),
                holders,
                acquired_total: 0,
                released_total: 0,
                expired_total: 0,
                timed_out_total: 0,
                lost_total: 0,
                wait: Default::default(),
            });
        }
        semaphores.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(StatusDoc {
            semaphores,
            ..StatusDoc::default()
        })
    }

    pub(super) fn ensure(&self, name: &str, capacity: u32) -> Result<(), Error> {
        let sem_dir = self.sem_dir(name)?;
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
        if Inner::is_closed(&sem_dir) {
            return Err(closed_err(name));
        }
        let existing = match self.capacity(&sem_dir, name)? {
            Some(c) => c,
            None => {
                let path = sem_dir.join("capacity");
                let record = disk::capacity_record(capacity, name);
                let created = disk::create_exclusive(&sem_dir, &path, &record)
                    .map_err(|e| storage(&path, e))?;
                if created {
                    return Ok(());
                }
                // Another process created it first.
                self.capacity(&sem_dir, name)?.unwrap_or(capacity)
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
                let _ = h.lost.send(Some(LostReason::Closed));
            }
        }
        Ok(())
    }

    pub(super) fn end_session(&self, session: u64) -> Result<(), Error> {
        let entries = fs::read_dir(&self.root).map_err(|e| storage(&self.root, e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let sem_dir = entry.path();
            let mut files: Vec<PathBuf> = slots(&sem_dir)
                .map(|s| s.into_values().collect())
                .unwrap_or_default();
            if let Ok(tickets) = numbered(&sem_dir.join("queue")) {
                files.extend(tickets.into_values());
            }
            for path in files {
                let Ok(bytes) = disk::read_small(&path) else {
                    continue;
                };
                if Record::decode(&bytes).is_some_and(|r| r.session == session) {
                    disk::remove_own(&sem_dir, &path, &bytes).map_err(|e| storage(&path, e))?;
                }
            }
        }
        Ok(())
    }
}
