//! Time: session expiry and waiters' deadlines (`tick`, and `tick_some` in bounded slices),
//! the deadline the driver sleeps until, and forgetting idle semaphores.

use super::*;

impl Coordinator {
    /// Processes every deadline at or before `now`: expires sessions that missed their TTL and
    /// times out queued acquires. Costs O(log n) per deadline that comes due.
    pub fn tick(&mut self, now: Time, out: &mut Vec<Effect>) {
        while self.tick_some(now, usize::MAX, out) {}
    }

    /// Bounds the deadline work of each [`handle`](Coordinator::handle) to about `budget`
    /// units (a unit is a deadline or a lease freed), or lifts the bound (`None`, the
    /// default). A shell that sets it must call [`tick_some`](Coordinator::tick_some) until it
    /// returns `false` whenever [`next_deadline`](Coordinator::next_deadline) has passed,
    /// releasing its lock between calls: then 100,000 leases expiring at once no longer make
    /// one long step that stalls every other client.
    ///
    /// Lagging behind is safe because a session past its deadline can no longer act, whether
    /// or not its expiry has been processed: its requests fail as for an expired session
    /// ([`Error::SessionNotFound`]), closing or ending it is a no-op, its queued acquires are
    /// never granted (the grant loop drops them as the expiry would have), nor are acquires
    /// whose own timeout has passed. Its held permits stay taken until the sweep reaches it,
    /// in deadline order: others wait a little longer, never the other way round.
    pub fn set_step_budget(&mut self, budget: Option<usize>) {
        self.step_budget = budget.map(|b| b.max(1));
    }

    /// Processes the deadlines at or before `now` in deadline order, stopping once about
    /// `budget` units of work (a deadline, or a lease freed) are done; at least one deadline
    /// is processed, so a session with more leases than the budget still expires whole.
    /// Returns whether due deadlines remain: call again (at the same or a later `now`).
    pub fn tick_some(&mut self, now: Time, budget: usize, out: &mut Vec<Effect>) -> bool {
        self.now = self.now.max(now);
        let mut used = self.forget_due(now, budget, out);
        let more = loop {
            let Some(&Reverse((at, timer))) = self.timers.peek() else {
                break false;
            };
            if at > now {
                break false;
            }
            if used >= budget {
                break true;
            }
            used += 1;
            self.timers.pop();
            self.sweeping = Some((at, timer));
            match timer {
                Timer::Session(id) => {
                    let Some(session) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    if session.scheduled != at {
                        continue; // stale entry of an earlier session with the same id
                    }
                    // Compare with the entry's own time, not `now`: after a late tick the real
                    // deadline may also have passed, but other deadlines may lie between the
                    // two, and they must be processed first.
                    if session.deadline > at {
                        session.scheduled = session.deadline;
                        self.timers
                            .push(Reverse((session.deadline, Timer::Session(id))));
                    } else {
                        used = used.saturating_add(session.leases.len());
                        self.end_session(now, id, Ending::Expired, out);
                    }
                }
                Timer::Waiter(session, lease) => {
                    let key = (session, lease);
                    let due = matches!(
                        self.leases.get(&key),
                        Some(Lease { state: LeaseState::Queued(w), .. }) if w.deadline == Some(at)
                    );
                    if due {
                        if let Some((tag, sem)) = self.dequeue(key) {
                            if let Some(s) = self.semaphores.get_mut(&sem) {
                                s.counters.timed_out_total += 1;
                            }
                            out.push(Effect::Reply {
                                tag,
                                outcome: Err(Error::TimedOut),
                            });
                            self.pump(now, &sem, out);
                        }
                    }
                }
                Timer::GroupWait(session, wait) => self.group_wait_due(at, (session, wait), out),
            }
            self.sweeping = None;
        };
        self.settle_group_waits(out);
        if used > 0 {
            self.shrink_if_sparse();
        }
        more || self
            .forget_heap
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
    }

    /// Gives memory back after a mass expiry or mass forgetting: the maps and heaps keep
    /// their largest size otherwise, and 200,000 names used once would cost their table for
    /// good. Shrinks a table to twice its length once it is a quarter full, so the rehash
    /// (O(length)) is paid at most once per halving: amortized O(1) per entry removed.
    pub(super) fn shrink_if_sparse(&mut self) {
        fn sparse(len: usize, capacity: usize) -> bool {
            capacity > 1024 && len.saturating_mul(4) < capacity
        }
        if sparse(self.semaphores.len(), self.semaphores.capacity()) {
            self.semaphores.shrink_to(self.semaphores.len() * 2);
        }
        if sparse(self.sessions.len(), self.sessions.capacity()) {
            self.sessions.shrink_to(self.sessions.len() * 2);
        }
        if sparse(self.leases.len(), self.leases.capacity()) {
            self.leases.shrink_to(self.leases.len() * 2);
        }
        if sparse(self.timers.len(), self.timers.capacity()) {
            self.timers.shrink_to(self.timers.len() * 2);
        }
        if sparse(self.forget_heap.len(), self.forget_heap.capacity()) {
            self.forget_heap.shrink_to(self.forget_heap.len() * 2);
        }
    }

    /// Whether `session` exists and has missed its deadline, expired though perhaps not yet
    /// swept (see [`set_step_budget`](Coordinator::set_step_budget)).
    pub(super) fn overdue(&self, now: Time, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.deadline <= now)
    }

    /// The earliest time at which [`tick`](Coordinator::tick) has work to do. It may be early
    /// (a deadline that has since moved), never late.
    pub fn next_deadline(&self) -> Option<Time> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let forget = self.forget_heap.peek().map(|Reverse((at, _))| *at);
        match (timer, forget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets semaphores that have been idle for `after` (`None`: never, the default). A
    /// semaphore already idle counts from when it became idle.
    pub fn set_forget_idle(&mut self, after: Option<Duration>) {
        self.forget_after = after;
        if after.is_some() {
            let mut names: Vec<Arc<str>> = self.semaphores.keys().cloned().collect();
            names.sort();
            for name in names {
                self.schedule_forget(&name);
            }
        }
    }

    /// Gives the semaphore `name` its entry in the forget heap if it is idle, forgettable and
    /// has none. Called wherever a semaphore may have become idle.
    pub(super) fn schedule_forget(&mut self, name: &str) {
        let Some(after) = self.forget_after else {
            return;
        };
        let now = self.now;
        let Some(sem) = self.semaphores.get_mut(name) else {
            return;
        };
        if !is_idle(sem) {
            return;
        }
        if sem.forget_scheduled.is_none() {
            let at = now + after;
            sem.idle_since = now;
            sem.forget_scheduled = Some(at);
            self.forget_heap.push(Reverse((at, sem.name.clone())));
        } else {
            // Its entry is due earlier; when it comes, it is pushed again for this time.
            sem.idle_since = sem.idle_since.max(now);
        }
    }

    /// Forgets the semaphores whose idle time is up at `now`, at most `budget` of them.
    /// O(log n) per entry due. Returns the entries it processed.
    pub(super) fn forget_due(&mut self, now: Time, budget: usize, out: &mut Vec<Effect>) -> usize {
        let Some(after) = self.forget_after else {
            return 0;
        };
        let mut used = 0;
        while let Some(Reverse((at, _))) = self.forget_heap.peek() {
            if *at > now || used >= budget {
                break;
            }
            used += 1;
            let Some(Reverse((at, name))) = self.forget_heap.pop() else {
                break;
            };
            let Some(sem) = self.semaphores.get_mut(&name) else {
                continue;
            };
            if sem.forget_scheduled != Some(at) {
                continue; // an entry of an earlier semaphore of that name
            }
            if !is_idle(sem) {
                // Busy again: it gets a new entry when it next becomes idle.
                sem.forget_scheduled = None;
                continue;
            }
            let due = sem.idle_since + after;
            if due > at {
                sem.forget_scheduled = Some(due);
                self.forget_heap.push(Reverse((due, name)));
                continue;
            }
            let next_token = sem.next_token;
            self.remove_semaphore(&name);
            self.token_floor = self.token_floor.max(next_token);
            out.push(Effect::Persist(Record::Forgotten { name, next_token }));
        }
        used
    }
}
