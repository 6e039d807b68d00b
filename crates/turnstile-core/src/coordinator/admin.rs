//! Changing a semaphore from outside its holders: close, set-capacity, delete, and the
//! forced release of one lease (revoke). Each may grant queued waiters or end leases, through
//! the same machinery as a release.

use super::*;

impl Coordinator {
    pub(super) fn close(&mut self, name: &str, out: &mut Vec<Effect>) {
        let Some(sem) = self.semaphores.get_mut(name) else {
            return;
        };
        if sem.closed {
            return;
        }
        sem.closed = true;
        let sem_name = sem.name.clone();
        let queued: Vec<LeaseKey> = sem.queue.values().copied().collect();
        let held: Vec<LeaseKey> = sem.holders.values().copied().collect();
        out.push(Effect::Persist(Record::SemaphoreClosed {
            name: sem_name.clone(),
        }));
        for key in queued {
            if let Some((tag, _)) = self.dequeue(key) {
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(Error::Closed(sem_name.to_string())),
                });
            }
        }
        for key in held {
            if let Some((_, token)) = self.unhold(key) {
                let client = self
                    .sessions
                    .get(&key.0)
                    .map(|s| s.client.clone())
                    .unwrap_or_else(|| Arc::from(""));
                out.push(Effect::Event(Event::LeaseLost {
                    session: key.0,
                    lease: key.1,
                    semaphore: sem_name.clone(),
                    token,
                    client,
                    reason: LostReason::Closed,
                }));
                if let Some(s) = self.semaphores.get_mut(&sem_name) {
                    s.counters.lost_total += 1;
                }
            }
        }
    }

    pub(super) fn set_capacity(
        &mut self,
        now: Time,
        name: &str,
        capacity: u32,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument("capacity must be at least 1".into()));
        }
        let sem = self
            .semaphores
            .get_mut(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        if sem.closed {
            return Err(Error::Closed(name.to_owned()));
        }
        if sem.capacity == capacity {
            return Ok(Some(Reply::Done));
        }
        sem.capacity = capacity;
        let sem_name = sem.name.clone();
        // The whole semaphore record: replay (and old readers of the log) set the capacity
        // from it, and its counter only ever raises `next_token`.
        out.push(Effect::Persist(Record::Semaphore {
            name: sem_name.clone(),
            capacity,
            closed: false,
            next_token: sem.next_token,
        }));
        // Waiters too heavy for the new capacity could never be granted, and at the head
        // they would hold back everyone behind them: fail them as a new acquire would fail.
        let too_heavy: Vec<LeaseKey> = sem
            .queue
            .values()
            .copied()
            .filter(|key| self.leases.get(key).is_some_and(|l| l.weight > capacity))
            .collect();
        for key in too_heavy {
            let weight = self.leases.get(&key).map_or(0, |l| l.weight);
            if let Some((tag, _)) = self.dequeue(key) {
                out.push(Effect::Reply {
                    tag,
                    outcome: Err(Error::WeightExceedsCapacity {
                        name: name.to_owned(),
                        weight,
                        capacity,
                    }),
                });
            }
        }
        self.pump(now, &sem_name, out);
        Ok(Some(Reply::Done))
    }

    pub(super) fn delete(
        &mut self,
        name: &str,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        let sem = self
            .semaphores
            .get(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        if !sem.holders.is_empty() || !sem.queue.is_empty() {
            return Err(Error::InUse {
                name: name.to_owned(),
                holders: sem.holders.len(),
                waiters: sem.queue.len(),
            });
        }
        let (sem_name, next_token) = (sem.name.clone(), sem.next_token);
        self.remove_semaphore(name);
        self.token_floor = self.token_floor.max(next_token);
        // The record of forgetting: it says the same (name gone, floor raised), and replay
        // removes any semaphore without holders by it, closed or not.
        out.push(Effect::Persist(Record::Forgotten {
            name: sem_name,
            next_token,
        }));
        Ok(Some(Reply::Done))
    }

    pub(super) fn revoke(
        &mut self,
        now: Time,
        name: &str,
        lease: LeaseId,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_name(name)?;
        let sem = self
            .semaphores
            .get(name)
            .ok_or_else(|| Error::NoSuchSemaphore(name.to_owned()))?;
        // Lease ids are chosen per session, so two sessions could hold the same id: take
        // every one (O(holders); an operator's request, not the hot path).
        let keys: Vec<LeaseKey> = sem
            .holders
            .values()
            .copied()
            .filter(|key| key.1 == lease)
            .collect();
        if keys.is_empty() {
            return Err(Error::UnknownLease(lease));
        }
        let sem_name = sem.name.clone();
        for key in keys {
            let Some((_, token)) = self.unhold(key) else {
                continue;
            };
            // Replayed as a release by the holder: the lease is gone either way.
            out.push(Effect::Persist(Record::Released {
                session: key.0,
                lease: key.1,
            }));
            if let Some(s) = self.semaphores.get_mut(&sem_name) {
                s.counters.lost_total += 1;
            }
            out.push(Effect::Event(Event::LeaseLost {
                session: key.0,
                lease: key.1,
                semaphore: sem_name.clone(),
                token,
                client: self.client_of(key.0),
                reason: LostReason::Revoked,
            }));
        }
        self.pump(now, &sem_name, out);
        Ok(Some(Reply::Done))
    }
}
