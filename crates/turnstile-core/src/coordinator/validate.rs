//! The core's own consistency check, used by the tests and the property model: every
//! table agrees with every other.

use super::*;

impl Coordinator {
    /// Checks every invariant in the module documentation. O(state); meant for tests and
    /// debugging, not for the hot path.
    pub fn validate(&self) -> Result<(), String> {
        if self.names.len() != self.semaphores.len()
            || self.names.iter().any(|n| !self.semaphores.contains_key(n))
        {
            return Err("the sorted name index differs from the semaphores".into());
        }
        let mut seen: HashSet<LeaseKey> = HashSet::default();
        for (name, s) in &self.semaphores {
            if **name != *s.name {
                return Err(format!("semaphore keyed {name:?} is named {:?}", s.name));
            }
            if self.forget_after.is_some()
                && is_idle(s)
                && !jobs::is_lock_name(&s.name)
                && s.forget_scheduled.is_none()
            {
                return Err(format!("idle semaphore {name:?} is never forgotten"));
            }
            if s.closed && (!s.holders.is_empty() || !s.queue.is_empty() || s.in_use != 0) {
                return Err(format!(
                    "closed semaphore {name:?} still has holders or waiters"
                ));
            }
            let mut sum = 0u64;
            for (token, key) in &s.holders {
                if token.0 >= s.next_token {
                    return Err(format!("{name:?}: token {token} >= next {}", s.next_token));
                }
                let lease = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: holder {key:?} has no lease"))?;
                match lease.state {
                    LeaseState::Held { token: t, .. } if t == *token => {}
                    _ => return Err(format!("{name:?}: holder {key:?} not held with {token}")),
                }
                if lease.semaphore != *name {
                    return Err(format!("{name:?}: holder {key:?} belongs elsewhere"));
                }
                sum += u64::from(lease.weight);
                if !seen.insert(*key) {
                    return Err(format!("lease {key:?} appears twice"));
                }
            }
            if sum != u64::from(s.in_use) {
                return Err(format!("{name:?}: in_use {} != held {sum}", s.in_use));
            }
            // `in_use` may exceed the capacity after a shrink; that no grant is made while
            // it does is the queue check below (a head never fits while nothing is free).
            let mut qsum = 0u64;
            for (seq, key) in &s.queue {
                let lease = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: waiter {key:?} has no lease"))?;
                match lease.state {
                    LeaseState::Queued(ref w) if w.seq == *seq => {}
                    _ => return Err(format!("{name:?}: waiter {key:?} not queued at {seq}")),
                }
                qsum += u64::from(lease.weight);
                if !seen.insert(*key) {
                    return Err(format!("lease {key:?} appears twice"));
                }
            }
            if qsum != s.queued_weight {
                return Err(format!(
                    "{name:?}: queued_weight {} != {qsum}",
                    s.queued_weight
                ));
            }
            if let Some(key) = s.queue.values().next() {
                // Every waiter's lease was checked above.
                let head = self
                    .leases
                    .get(key)
                    .ok_or_else(|| format!("{name:?}: waiter {key:?} has no lease"))?;
                if head.weight <= s.free() {
                    return Err(format!("{name:?}: head {key:?} fits but is still queued"));
                }
            }
        }
        if seen.len() != self.leases.len() {
            return Err(format!(
                "{} leases, {} in semaphores",
                self.leases.len(),
                seen.len()
            ));
        }
        for (key, lease) in &self.leases {
            let session = self
                .sessions
                .get(&key.0)
                .ok_or_else(|| format!("lease {key:?} outlives its session"))?;
            if session.leases.get(lease.slot as usize) != Some(&key.1) {
                return Err(format!(
                    "session does not list lease {key:?} at its slot {}",
                    lease.slot
                ));
            }
        }
        for (id, session) in &self.sessions {
            // With the check above, this also rules out an id listed twice.
            for (slot, lease) in session.leases.iter().enumerate() {
                match self.leases.get(&(*id, *lease)) {
                    None => return Err(format!("session {id} lists missing lease {lease}")),
                    Some(l) if l.slot as usize != slot => {
                        return Err(format!("session {id} lists lease {lease} at {slot} too"))
                    }
                    Some(_) => {}
                }
            }
            if session.scheduled > session.deadline {
                return Err(format!("session {id} scheduled after its deadline"));
            }
        }
        self.validate_jobs()
    }
}
