//! The queue of a semaphore: tickets, fencing tokens, and the looks at the queue by which
//! an acquire waits for its turn and claims its slots.

use super::*;

/// Withdraws the ticket of an acquire that ends without a grant (error, timeout, drop).
pub(super) struct TicketGuard<'a> {
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
pub(super) fn numbered(dir: &Path) -> io::Result<BTreeMap<u64, PathBuf>> {
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
pub(super) fn slots(sem_dir: &Path) -> io::Result<BTreeMap<u32, PathBuf>> {
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
    /// Takes the next ticket in the queue.
    pub(super) fn take_ticket(
        &self,
        sem_dir: &Path,
        content: &[u8],
    ) -> Result<(u64, PathBuf), Error> {
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
    pub(super) fn next_token(&self, sem_dir: &Path, content: &[u8]) -> Result<u64, Error> {
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
    pub(super) fn try_grant(
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
        let (tx, rx) = crate::lost::channel();
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
    pub(super) fn live_capacity(&self, target: &Target<'_>) -> Result<u32, Error> {
        self.capacity(target.sem_dir, target.name)?.ok_or_else(|| {
            rejected(
                ErrorCode::NoSuchSemaphore,
                format!("semaphore {:?} does not exist", target.name),
            )
        })
    }

    pub(super) async fn acquire(
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
    pub(super) async fn wait_for_grant<T>(
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
}
