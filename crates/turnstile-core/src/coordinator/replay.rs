//! Recovery: replaying durable records into a coordinator, and the snapshot, the records
//! that rebuild the present state (in a fixed order, so two cores with the same state write
//! the same snapshot).

use super::*;

impl Coordinator {
    /// Replays one durable record at `now` (the time of recovery). Sessions come back with a
    /// full TTL from `now`: the grace period that lets clients reconnect after a restart.
    /// Records that do not fit the state (a grant for an unknown session, say) are skipped;
    /// the log writer never produces them.
    pub fn apply(&mut self, now: Time, record: &Record) {
        self.now = self.now.max(now);
        self.apply_record(now, record);
        // No group wait is ever replayed (waits are not durable), so the groups a record
        // touched need no checking: forget them rather than pile them up over a long log.
        self.jobs.forget_changes();
    }

    pub(super) fn apply_record(&mut self, now: Time, record: &Record) {
        match record {
            Record::SemaphoreCreated { name, capacity } => {
                if !self.semaphores.contains_key(name) {
                    // Never 0 from our writer; a damaged log's 0 is read as `Semaphore`
                    // records read it (1), so a snapshot of the result rebuilds the same.
                    self.insert_semaphore(name.clone(), (*capacity).max(1));
                }
            }
            Record::Forgotten { name, next_token } => {
                self.token_floor = self.token_floor.max(*next_token);
                // Only a semaphore without holders or waiters was ever forgotten (idle) or
                // deleted (idle or closed); anything else means the record does not fit this
                // state, and is skipped like any such record.
                if self
                    .semaphores
                    .get(name)
                    .is_some_and(|s| s.holders.is_empty() && s.queue.is_empty())
                {
                    self.remove_semaphore(name);
                }
            }
            Record::TokenFloor { next_token } => {
                self.token_floor = self.token_floor.max(*next_token);
            }
            Record::Semaphore {
                name,
                capacity,
                closed,
                next_token,
            } => {
                if !self.semaphores.contains_key(name) {
                    self.insert_semaphore(name.clone(), *capacity);
                }
                let sem = self
                    .semaphores
                    .get_mut(name)
                    .expect("invariant: inserted just above if it was missing");
                sem.next_token = sem.next_token.max(*next_token);
                // A capacity change is logged as this record; in a snapshot it comes before
                // the grants, which may hold more than a shrunk capacity.
                sem.capacity = (*capacity).max(1);
                if *closed {
                    let mut sink = Vec::new();
                    self.close(name, &mut sink);
                }
            }
            Record::SemaphoreClosed { name } => {
                let mut sink = Vec::new();
                self.close(name, &mut sink);
            }
            Record::SessionOpened {
                session,
                ttl,
                client,
            } => match self.sessions.get_mut(session) {
                Some(s) => {
                    s.ttl = *ttl;
                    s.client = client.clone();
                    s.deadline = now + *ttl;
                    self.reschedule_if_earlier(*session);
                }
                None => self.insert_session(now, *session, *ttl, client.clone()),
            },
            Record::Job {
                name,
                group,
                completion,
                failures,
                last_failure,
            } => self.jobs.restore(
                name,
                group.clone(),
                completion.clone(),
                *failures,
                last_failure.clone(),
            ),
            Record::SessionEnded { session } => {
                let mut sink = Vec::new();
                self.end_session(now, *session, Ending::Closed, &mut sink);
            }
            Record::Granted {
                session,
                lease,
                semaphore,
                weight,
                token,
            } => {
                let key = (*session, *lease);
                if !self.sessions.contains_key(session) || self.leases.contains_key(&key) {
                    return;
                }
                let Some(sem) = self.semaphores.get_mut(semaphore) else {
                    return;
                };
                // Not checked against the capacity: after a shrink, holders may keep more
                // than it (a snapshot writes the capacity before the grants). A token already
                // held, or the last one there is, cannot be a grant the log writer made (found
                // by the fuzz target `wal_records`: a damaged log whose checksums hold left
                // `in_use` above the holders).
                if sem.closed || sem.holders.contains_key(token) || token.0 == u64::MAX {
                    return;
                }
                let Some(in_use) = sem.in_use.checked_add(*weight) else {
                    return;
                };
                sem.next_token = sem.next_token.max(token.0.saturating_add(1));
                sem.in_use = in_use;
                sem.holders.insert(*token, key);
                sem.counters.acquired_total += 1;
                let name = sem.name.clone();
                self.add_lease(
                    key,
                    name,
                    *weight,
                    LeaseState::Held {
                        token: *token,
                        since: now,
                    },
                );
            }
            Record::Released { session, lease } => {
                if let Some((sem, _)) = self.unhold((*session, *lease)) {
                    if let Some(s) = self.semaphores.get_mut(&sem) {
                        s.counters.released_total += 1;
                    }
                    // Counts a failed attempt as the live run did, unless the job completed;
                    // either way the job's own record, logged after this one, has the last
                    // word.
                    let mut sink = Vec::new();
                    self.job_lock_freed(&sem, "released before it finished", &mut sink);
                }
            }
        }
    }

    /// The records that rebuild the current state through [`apply`](Coordinator::apply):
    /// every semaphore with its fencing counter, every session, every held lease. Queued
    /// acquires are left out, as in the log. O(state); the caller decides when a snapshot is
    /// worth it.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out =
            Vec::with_capacity(self.semaphores.len() + self.sessions.len() + self.leases.len() + 1);
        // First, so that the semaphores below are created above the floor as they were.
        if self.token_floor > 1 {
            out.push(Record::TokenFloor {
                next_token: self.token_floor,
            });
        }
        // In name order, here and for the grants below: a snapshot is a function of the state
        // alone, never of the hash map's iteration order (which differs between two cores
        // holding the same state, so their snapshots would not compare equal).
        let mut sems: Vec<(&Arc<str>, &Semaphore)> = self.semaphores.iter().collect();
        sems.sort_by(|a, b| a.0.cmp(b.0));
        for (_, s) in &sems {
            out.push(Record::Semaphore {
                name: s.name.clone(),
                capacity: s.capacity,
                closed: s.closed,
                next_token: s.next_token,
            });
        }
        let mut sessions: Vec<(&SessionId, &Session)> = self.sessions.iter().collect();
        sessions.sort_by_key(|(id, _)| **id);
        for (id, s) in sessions {
            out.push(Record::SessionOpened {
                session: *id,
                ttl: s.ttl,
                client: s.client.clone(),
            });
        }
        for (_, s) in &sems {
            for (token, key) in &s.holders {
                if let Some(lease) = self.leases.get(key) {
                    out.push(Record::Granted {
                        session: key.0,
                        lease: key.1,
                        semaphore: s.name.clone(),
                        weight: lease.weight,
                        token: *token,
                    });
                }
            }
        }
        // Last, so that they overwrite what replaying the grants above may have counted.
        self.jobs.snapshot(&mut out);
        out
    }
}
