//! The reference model: a deliberately naive coordinator with plain maps, a `Vec` of holders
//! and a `VecDeque` per semaphore, no timer heap and no laziness (see the crate doc for its
//! rules).

use super::*;

/// A lease is held with a token, or waits in its semaphore's queue for the request `tag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Held(Token),
    Queued { tag: Tag, deadline: Option<u64> },
}

#[derive(Debug)]
pub(crate) struct MLease {
    pub(crate) sem: Arc<str>,
    pub(crate) weight: u32,
    pub(crate) state: State,
}

#[derive(Debug)]
pub(crate) struct MSem {
    pub(crate) capacity: u32,
    pub(crate) closed: bool,
    pub(crate) next_token: u64,
    /// In grant order.
    pub(crate) holders: Vec<Key>,
    /// FIFO.
    pub(crate) queue: VecDeque<Key>,
}

#[derive(Debug)]
pub(crate) struct MSession {
    pub(crate) ttl: Duration,
    /// Milliseconds; the session is dead from this instant on.
    pub(crate) deadline: u64,
}

/// The reference model. Times are in milliseconds.
#[derive(Debug, Default)]
pub(crate) struct Model {
    pub(crate) sessions: BTreeMap<SessionId, MSession>,
    pub(crate) leases: BTreeMap<Key, MLease>,
    pub(crate) sems: BTreeMap<Arc<str>, MSem>,
    /// The highest fencing counter of a deleted semaphore: new ones count from here.
    pub(crate) floor: u64,
}

/// What the model predicts for one step.
#[derive(Debug, Default)]
pub(crate) struct Expected {
    pub(crate) replies: BTreeMap<Tag, Outcome>,
    /// New grants per semaphore, in grant order.
    pub(crate) grants: BTreeMap<Arc<str>, Vec<(Key, Token)>>,
    pub(crate) events: Vec<Event>,
}

impl Expected {
    pub(crate) fn reply(&mut self, tag: Tag, outcome: Outcome) {
        let previous = self.replies.insert(tag, outcome);
        assert!(previous.is_none(), "model bug: {tag:?} answered twice");
    }
}

/// A deadline that has come.
pub(crate) enum Due {
    Session(SessionId),
    Waiter(Key),
}

impl Model {
    /// The earliest deadline at or before `now`, ties broken as documented in the file header.
    pub(crate) fn next_due(&self, now: u64) -> Option<Due> {
        let sessions = self
            .sessions
            .iter()
            .map(|(id, s)| ((s.deadline, 0, *id, LeaseId(0)), Due::Session(*id)));
        let waiters = self.leases.iter().filter_map(|(key, l)| match l.state {
            State::Queued {
                deadline: Some(d), ..
            } => Some(((d, 1, key.0, key.1), Due::Waiter(*key))),
            _ => None,
        });
        sessions
            .chain(waiters)
            .filter(|(order, _)| order.0 <= now)
            .min_by_key(|(order, _)| *order)
            .map(|(_, due)| due)
    }

    /// Every pending deadline, sorted.
    pub(crate) fn deadlines(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.sessions.values().map(|s| s.deadline).collect();
        all.extend(self.leases.values().filter_map(|l| match l.state {
            State::Queued { deadline, .. } => deadline,
            State::Held(_) => None,
        }));
        all.sort_unstable();
        all
    }

    pub(crate) fn run_deadlines(&mut self, now: u64, exp: &mut Expected) {
        while let Some(due) = self.next_due(now) {
            match due {
                Due::Session(id) => self.end_session(id, EndReason::Expired, exp),
                Due::Waiter(key) => {
                    let (tag, sem) = self.dequeue(key);
                    exp.reply(tag, Err(Error::TimedOut));
                    self.pump(&sem, exp);
                }
            }
        }
    }

    pub(crate) fn handle(&mut self, now: u64, tag: Tag, request: Request<'_>, exp: &mut Expected) {
        self.run_deadlines(now, exp);
        let outcome = match request {
            Request::OpenSession { session, ttl, .. } => Some(self.open(now, session, ttl)),
            Request::ResumeSession { session } => Some(
                self.refresh(now, session)
                    .map(|ttl| Reply::SessionOpened { ttl, existed: true }),
            ),
            Request::KeepAlive { session } => Some(self.refresh(now, session).map(|_| Reply::Done)),
            Request::CloseSession { session } => {
                self.end_session(session, EndReason::Closed, exp);
                Some(Ok(Reply::Done))
            }
            Request::EndSession { session } => {
                self.end_session(session, EndReason::EndedByOther, exp);
                Some(Ok(Reply::Done))
            }
            Request::Ensure { name, capacity } => Some(self.ensure(name, capacity)),
            Request::Acquire {
                session,
                lease,
                name,
                weight,
                timeout,
            } => self.acquire(now, tag, (session, lease), name, weight, timeout, exp),
            Request::Release { session, lease } => Some(self.release(now, (session, lease), exp)),
            Request::Close { name } => {
                self.close(name, exp);
                Some(Ok(Reply::Done))
            }
            Request::SetCapacity { name, capacity } => Some(self.set_capacity(name, capacity, exp)),
            Request::Delete { name } => Some(self.delete(name)),
            Request::Revoke { name, lease } => Some(self.revoke(name, lease, exp)),
            // Jobs have their own model, in tests/jobs.rs; this one never sends them.
            Request::BeginJob { .. }
            | Request::FinishJob { .. }
            | Request::ResetJob { .. }
            | Request::WaitGroup { .. } => {
                unreachable!("the semaphore model sends no job requests")
            }
        };
        if let Some(outcome) = outcome {
            exp.reply(tag, outcome);
        }
    }

    pub(crate) fn open(&mut self, now: u64, id: SessionId, ttl: Duration) -> Outcome {
        let deadline = now + millis(ttl);
        let existed = self
            .sessions
            .insert(id, MSession { ttl, deadline })
            .is_some();
        Ok(Reply::SessionOpened { ttl, existed })
    }

    pub(crate) fn refresh(&mut self, now: u64, id: SessionId) -> Result<Duration, Error> {
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or(Error::SessionNotFound(id))?;
        session.deadline = now + millis(session.ttl);
        Ok(session.ttl)
    }

    pub(crate) fn ensure(&mut self, name: &str, capacity: u32) -> Outcome {
        match self.sems.get(name) {
            Some(sem) if sem.closed => Err(Error::Closed(name.to_owned())),
            Some(sem) if sem.capacity != capacity => Err(Error::CapacityMismatch {
                name: name.to_owned(),
                existing: sem.capacity,
                requested: capacity,
            }),
            Some(_) => Ok(Reply::Done),
            None => {
                self.sems.insert(
                    Arc::from(name),
                    MSem {
                        capacity,
                        closed: false,
                        next_token: self.floor.max(1),
                        holders: Vec::new(),
                        queue: VecDeque::new(),
                    },
                );
                Ok(Reply::Done)
            }
        }
    }

    pub(crate) fn in_use(leases: &BTreeMap<Key, MLease>, sem: &MSem) -> u32 {
        sem.holders.iter().map(|k| leases[k].weight).sum()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn acquire(
        &mut self,
        now: u64,
        tag: Tag,
        key: Key,
        name: &str,
        weight: u32,
        timeout: Option<Duration>,
        exp: &mut Expected,
    ) -> Option<Outcome> {
        if let Err(e) = self.refresh(now, key.0) {
            return Some(Err(e));
        }
        let Some((sem_name, sem)) = self.sems.get_key_value(name) else {
            return Some(Err(Error::NoSuchSemaphore(name.to_owned())));
        };
        if sem.closed {
            return Some(Err(Error::Closed(name.to_owned())));
        }
        // A retry of a held lease gets its grant back even if a shrink made it too heavy.
        let same_lease = self
            .leases
            .get(&key)
            .is_some_and(|l| *l.sem == *name && l.weight == weight);
        if weight > sem.capacity && !same_lease {
            return Some(Err(Error::WeightExceedsCapacity {
                name: name.to_owned(),
                weight,
                capacity: sem.capacity,
            }));
        }
        let sem_name = sem_name.clone();
        let deadline = timeout.map(|t| now + millis(t));
        if let Some(lease) = self.leases.get_mut(&key) {
            if *lease.sem != *name || lease.weight != weight {
                return Some(Err(Error::LeaseConflict {
                    lease: key.1,
                    name: lease.sem.to_string(),
                    weight: lease.weight,
                }));
            }
            return match &mut lease.state {
                State::Held(token) => Some(Ok(Reply::Granted { token: *token })),
                State::Queued {
                    tag: old,
                    deadline: old_deadline,
                } => {
                    exp.reply(*old, Err(Error::Superseded));
                    *old = tag;
                    *old_deadline = deadline;
                    None
                }
            };
        }
        let sem = self.sems.get_mut(name).expect("looked up above");
        let free = sem.capacity.saturating_sub(Self::in_use(&self.leases, sem));
        if sem.queue.is_empty() && weight <= free {
            let token = Token(sem.next_token);
            sem.next_token += 1;
            sem.holders.push(key);
            self.leases.insert(
                key,
                MLease {
                    sem: sem_name.clone(),
                    weight,
                    state: State::Held(token),
                },
            );
            exp.grants.entry(sem_name).or_default().push((key, token));
            return Some(Ok(Reply::Granted { token }));
        }
        if timeout == Some(Duration::ZERO) {
            return Some(Err(Error::TimedOut));
        }
        sem.queue.push_back(key);
        self.leases.insert(
            key,
            MLease {
                sem: sem_name,
                weight,
                state: State::Queued { tag, deadline },
            },
        );
        None
    }

    pub(crate) fn release(&mut self, now: u64, key: Key, exp: &mut Expected) -> Outcome {
        self.refresh(now, key.0)?;
        match self.leases.get(&key).map(|l| l.state) {
            None => Err(Error::UnknownLease(key.1)),
            Some(State::Held(_)) => {
                let (sem, _) = self.unhold(key);
                self.pump(&sem, exp);
                Ok(Reply::Done)
            }
            Some(State::Queued { .. }) => {
                let (tag, sem) = self.dequeue(key);
                exp.reply(tag, Err(Error::Cancelled));
                self.pump(&sem, exp);
                Ok(Reply::Done)
            }
        }
    }

    pub(crate) fn end_session(&mut self, id: SessionId, how: EndReason, exp: &mut Expected) {
        if self.sessions.remove(&id).is_none() {
            return;
        }
        let keys: Vec<Key> = self.leases.keys().filter(|k| k.0 == id).copied().collect();
        let mut touched = BTreeSet::new();
        for key in keys {
            match self.leases[&key].state {
                State::Held(_) => {
                    let (sem, token) = self.unhold(key);
                    let reason = match how {
                        EndReason::Closed => None,
                        EndReason::Expired => Some(LostReason::Expired),
                        EndReason::EndedByOther => Some(LostReason::SessionEnded),
                    };
                    if let Some(reason) = reason {
                        exp.events.push(Event::LeaseLost {
                            session: id,
                            lease: key.1,
                            semaphore: sem.clone(),
                            token,
                            client: Arc::from("test"),
                            reason,
                        });
                    }
                    touched.insert(sem);
                }
                State::Queued { .. } => {
                    let (tag, sem) = self.dequeue(key);
                    exp.reply(tag, Err(Error::SessionEnded));
                    touched.insert(sem);
                }
            }
        }
        // The session ends as a whole: only then are the queues it was in served.
        for sem in touched {
            self.pump(&sem, exp);
        }
        exp.events.push(Event::SessionEnded {
            session: id,
            client: Arc::from("test"),
            reason: how,
        });
    }

    pub(crate) fn close(&mut self, name: &str, exp: &mut Expected) {
        let Some((sem_name, sem)) = self.sems.get_key_value(name) else {
            return;
        };
        if sem.closed {
            return;
        }
        let sem_name = sem_name.clone();
        let sem = self.sems.get_mut(name).expect("looked up above");
        sem.closed = true;
        let queue: Vec<Key> = sem.queue.drain(..).collect();
        let holders = std::mem::take(&mut sem.holders);
        for key in queue {
            let lease = self.leases.remove(&key).expect("a waiter has a lease");
            let State::Queued { tag, .. } = lease.state else {
                panic!("model bug: {key:?} in the queue is not queued");
            };
            exp.reply(tag, Err(Error::Closed(name.to_owned())));
        }
        for key in holders {
            let lease = self.leases.remove(&key).expect("a holder has a lease");
            let State::Held(token) = lease.state else {
                panic!("model bug: holder {key:?} is not held");
            };
            exp.events.push(Event::LeaseLost {
                session: key.0,
                lease: key.1,
                semaphore: sem_name.clone(),
                token,
                client: Arc::from("test"),
                reason: LostReason::Closed,
            });
        }
    }

    pub(crate) fn set_capacity(
        &mut self,
        name: &str,
        capacity: u32,
        exp: &mut Expected,
    ) -> Outcome {
        let Some((sem_name, sem)) = self.sems.get_key_value(name) else {
            return Err(Error::NoSuchSemaphore(name.to_owned()));
        };
        if sem.closed {
            return Err(Error::Closed(name.to_owned()));
        }
        let sem_name = sem_name.clone();
        let too_heavy: Vec<Key> = sem
            .queue
            .iter()
            .filter(|k| self.leases[*k].weight > capacity)
            .copied()
            .collect();
        self.sems.get_mut(name).expect("looked up above").capacity = capacity;
        for key in too_heavy {
            let weight = self.leases[&key].weight;
            let (tag, _) = self.dequeue(key);
            exp.reply(
                tag,
                Err(Error::WeightExceedsCapacity {
                    name: name.to_owned(),
                    weight,
                    capacity,
                }),
            );
        }
        self.pump(&sem_name, exp);
        Ok(Reply::Done)
    }

    pub(crate) fn delete(&mut self, name: &str) -> Outcome {
        let Some(sem) = self.sems.get(name) else {
            return Err(Error::NoSuchSemaphore(name.to_owned()));
        };
        if !sem.holders.is_empty() || !sem.queue.is_empty() {
            return Err(Error::InUse {
                name: name.to_owned(),
                holders: sem.holders.len(),
                waiters: sem.queue.len(),
            });
        }
        self.floor = self.floor.max(sem.next_token);
        self.sems.remove(name);
        Ok(Reply::Done)
    }

    pub(crate) fn revoke(&mut self, name: &str, lease: LeaseId, exp: &mut Expected) -> Outcome {
        let Some((sem_name, sem)) = self.sems.get_key_value(name) else {
            return Err(Error::NoSuchSemaphore(name.to_owned()));
        };
        let sem_name = sem_name.clone();
        let keys: Vec<Key> = sem
            .holders
            .iter()
            .filter(|k| k.1 == lease)
            .copied()
            .collect();
        if keys.is_empty() {
            return Err(Error::UnknownLease(lease));
        }
        for key in keys {
            let (_, token) = self.unhold(key);
            exp.events.push(Event::LeaseLost {
                session: key.0,
                lease: key.1,
                semaphore: sem_name.clone(),
                token,
                client: Arc::from("test"),
                reason: LostReason::Revoked,
            });
        }
        self.pump(&sem_name, exp);
        Ok(Reply::Done)
    }

    /// Grants from the head of the queue while the head fits.
    pub(crate) fn pump(&mut self, name: &Arc<str>, exp: &mut Expected) {
        let sem = self.sems.get_mut(name).expect("pumped semaphore exists");
        while let Some(&key) = sem.queue.front() {
            let free = sem.capacity.saturating_sub(Self::in_use(&self.leases, sem));
            let lease = self.leases.get_mut(&key).expect("a waiter has a lease");
            if lease.weight > free {
                break;
            }
            let State::Queued { tag, .. } = lease.state else {
                panic!("model bug: {key:?} in the queue is not queued");
            };
            sem.queue.pop_front();
            let token = Token(sem.next_token);
            sem.next_token += 1;
            sem.holders.push(key);
            lease.state = State::Held(token);
            exp.reply(tag, Ok(Reply::Granted { token }));
            exp.grants
                .entry(name.clone())
                .or_default()
                .push((key, token));
        }
    }

    pub(crate) fn dequeue(&mut self, key: Key) -> (Tag, Arc<str>) {
        let lease = self.leases.remove(&key).expect("dequeued lease exists");
        let State::Queued { tag, .. } = lease.state else {
            panic!("model bug: dequeued {key:?} is not queued");
        };
        let sem = self.sems.get_mut(&lease.sem).expect("its semaphore exists");
        sem.queue.retain(|k| *k != key);
        (tag, lease.sem)
    }

    pub(crate) fn unhold(&mut self, key: Key) -> (Arc<str>, Token) {
        let lease = self.leases.remove(&key).expect("released lease exists");
        let State::Held(token) = lease.state else {
            panic!("model bug: released {key:?} is not held");
        };
        let sem = self.sems.get_mut(&lease.sem).expect("its semaphore exists");
        sem.holders.retain(|k| *k != key);
        (lease.sem, token)
    }

    /// Tags of every queued acquire.
    pub(crate) fn waiting_tags(&self) -> BTreeSet<Tag> {
        self.leases
            .values()
            .filter_map(|l| match l.state {
                State::Queued { tag, .. } => Some(tag),
                State::Held(_) => None,
            })
            .collect()
    }
}
