//! Run-once jobs and job groups, built on the semaphore machinery.
//!
//! A job's exclusive lease is a lease on the job's *lock*: a semaphore of capacity 1 whose
//! name is the job's name behind [`LOCK_PREFIX`]. The prefix holds a control character, which
//! no client-supplied semaphore name may contain, so clients cannot reach a lock through the
//! semaphore requests, and a job named like a semaphore does not collide with it. Reusing the
//! semaphore machinery gives an attempt at a job everything a lease has: a FIFO queue of
//! attempts waiting to take over, idempotent retries, fencing tokens, expiry with the
//! session, and durability through the same records.
//!
//! On top of the lock, a job has a durable record ([`Record::Job`], the whole state, written
//! at every change so that replay keeps the last one): its group, its completion and its
//! failed attempts. The rules:
//! - an attempt at a completed job is answered [`Reply::JobCompleted`] and takes no lease;
//! - a completion is recorded only by the holder of the lock ([`Request::FinishJob`] checks
//!   the lease), so an attempt whose lease was lost records nothing;
//! - when an attempt completes the job, the attempts queued behind it are answered
//!   [`Reply::JobCompleted`] at once instead of being granted;
//! - any other end of the lock's lease (a failure, a release, the session ending) counts as a
//!   failed attempt and hands the lock to the next queued attempt: the take-over.
//!
//! Group waits are re-checked only for groups whose jobs changed since the last check (the
//! `dirty` list), at the end of every `handle` and `tick`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{validate_label, Coordinator, HashMap, LeaseKey, LeaseState, Timer};
use crate::effect::{Effect, Record, Reply};
use crate::job::{Completion, GroupSummary, JobOutcome, JobView, RunningView};
use crate::{Error, Tag, Time, MAX_NAME_LEN};
use std::cmp::Reverse;

/// What a job's lock name starts with. `\u{1}` is a control character, which
/// [`validate_label`] rejects in every name a client gives.
pub(super) const LOCK_PREFIX: &str = "\u{1}job:";

/// Longest failure reason kept, in bytes; longer ones are cut at a character boundary.
const MAX_REASON_LEN: usize = 1024;

/// Whether `name` is a job's lock.
pub(super) fn is_lock_name(name: &str) -> bool {
    name.as_bytes().first() == Some(&1)
}

/// The lock of job `job`.
pub(super) fn lock_name(job: &str) -> Arc<str> {
    Arc::from(format!("{LOCK_PREFIX}{job}"))
}

pub(super) fn job_of_lock(lock: &str) -> Option<&str> {
    lock.strip_prefix(LOCK_PREFIX)
}

/// The job and group tables.
#[derive(Debug, Default)]
pub(super) struct Jobs {
    jobs: HashMap<Arc<str>, Job>,
    /// Group name to the names of its jobs.
    groups: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    waits: HashMap<LeaseKey, GroupWait>,
    /// Groups whose jobs changed since the waits were last checked.
    dirty: Vec<Arc<str>>,
}

#[derive(Debug)]
struct Job {
    name: Arc<str>,
    lock: Arc<str>,
    group: Option<Arc<str>>,
    completion: Option<Completion>,
    failures: u32,
    last_failure: Option<Arc<str>>,
}

impl Job {
    fn record(&self) -> Record {
        Record::Job {
            name: self.name.clone(),
            group: self.group.clone(),
            completion: self.completion.clone(),
            failures: self.failures,
            last_failure: self.last_failure.clone(),
        }
    }
}

#[derive(Debug)]
struct GroupWait {
    tag: Tag,
    group: Arc<str>,
    jobs: u32,
    deadline: Option<Time>,
}

impl Jobs {
    /// Creates the job if it is new, and moves it to `group` if one is given. Returns whether
    /// its durable state changed.
    fn upsert(&mut self, name: &str, group: Option<&str>) -> bool {
        let mut changed = false;
        if !self.jobs.contains_key(name) {
            let name: Arc<str> = Arc::from(name);
            self.jobs.insert(
                name.clone(),
                Job {
                    lock: lock_name(&name),
                    name,
                    group: None,
                    completion: None,
                    failures: 0,
                    last_failure: None,
                },
            );
            changed = true;
        }
        if let Some(group) = group {
            let job = self
                .jobs
                .get(name)
                .expect("invariant: the job was inserted above if it was missing");
            if job.group.as_deref() != Some(group) {
                let group: Arc<str> = Arc::from(group);
                let name = job.name.clone();
                self.set_group(&name, Some(group));
                changed = true;
            }
        }
        changed
    }

    /// Moves a job between groups, keeping `groups` in step.
    fn set_group(&mut self, name: &Arc<str>, group: Option<Arc<str>>) {
        let Some(job) = self.jobs.get_mut(name) else {
            return;
        };
        if let Some(old) = job.group.take() {
            if let Some(members) = self.groups.get_mut(&old) {
                members.remove(name);
                if members.is_empty() {
                    self.groups.remove(&old);
                }
            }
            self.dirty.push(old);
        }
        if let Some(new) = &group {
            self.groups
                .entry(new.clone())
                .or_default()
                .insert(name.clone());
            self.dirty.push(new.clone());
        }
        job.group = group;
    }

    /// Replays a job record: its state is the record's.
    pub(super) fn restore(
        &mut self,
        name: &Arc<str>,
        group: Option<Arc<str>>,
        completion: Option<Completion>,
        failures: u32,
        last_failure: Option<Arc<str>>,
    ) {
        self.upsert(name, None);
        self.set_group(name, group);
        if let Some(job) = self.jobs.get_mut(&**name) {
            job.completion = completion;
            job.failures = failures;
            job.last_failure = last_failure;
        }
    }

    /// Appends one record per job, sorted by name.
    pub(super) fn snapshot(&self, out: &mut Vec<Record>) {
        let mut names: Vec<&Arc<str>> = self.jobs.keys().collect();
        names.sort();
        out.extend(names.into_iter().map(|n| self.jobs[n].record()));
    }

    /// Drops the list of groups changed since the last check, when no wait can care.
    pub(super) fn forget_changes(&mut self) {
        if self.waits.is_empty() {
            self.dirty.clear();
        }
    }

    /// Fails the group waits of a session that ended.
    pub(super) fn end_group_waits_of(&mut self, session: crate::SessionId, out: &mut Vec<Effect>) {
        let mut ended: Vec<LeaseKey> = self
            .waits
            .keys()
            .filter(|k| k.0 == session)
            .copied()
            .collect();
        ended.sort_unstable(); // deterministic effect order
        for key in ended {
            if let Some(wait) = self.waits.remove(&key) {
                out.push(Effect::Reply {
                    tag: wait.tag,
                    outcome: Err(Error::SessionEnded),
                });
            }
        }
    }
}

fn settled(summary: &GroupSummary, jobs: u32) -> bool {
    summary.running == 0 && summary.completed >= jobs
}

fn cut(reason: &str) -> Arc<str> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Arc::from(&reason[..end])
}

impl Coordinator {
    #[allow(clippy::too_many_arguments)] // the fields of Request::BeginJob, unpacked
    pub(super) fn begin_job(
        &mut self,
        now: Time,
        tag: Tag,
        key: LeaseKey,
        job: &str,
        group: Option<&str>,
        timeout: Option<Duration>,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_label("job name", job)?;
        if let Some(group) = group {
            validate_label("group name", group)?;
        }
        self.refresh(now, key.0)?;
        if self.jobs.upsert(job, group) {
            out.push(Effect::Persist(self.jobs.jobs[job].record()));
        }
        let entry = &self.jobs.jobs[job];
        if let Some(done) = &entry.completion {
            return Ok(Some(Reply::JobCompleted(done.clone())));
        }
        let lock = entry.lock.clone();
        if !self.semaphores.contains_key(&lock) {
            self.insert_semaphore(lock.clone(), 1);
            out.push(Effect::Persist(Record::SemaphoreCreated {
                name: lock.clone(),
                capacity: 1,
            }));
        }
        match self.acquire(now, tag, key, &lock, 1, timeout, out) {
            Err(Error::TimedOut) if timeout == Some(Duration::ZERO) => {
                Ok(Some(self.busy_reply(now, &lock)?))
            }
            other => other,
        }
    }

    /// The answer to an attempt that will not wait for the running one.
    fn busy_reply(&self, now: Time, lock: &str) -> Result<Reply, Error> {
        let running = self.running(now, lock).ok_or(Error::TimedOut)?;
        Ok(Reply::JobBusy {
            client: running.client,
            token: running.token,
            age: running.age,
        })
    }

    fn running(&self, now: Time, lock: &str) -> Option<RunningView> {
        let sem = self.semaphores.get(lock)?;
        let (token, key) = sem.holders.iter().next()?;
        let lease = self.leases.get(key)?;
        let LeaseState::Held { since, .. } = lease.state else {
            return None;
        };
        Some(RunningView {
            session: key.0,
            client: self
                .sessions
                .get(&key.0)
                .map(|s| s.client.clone())
                .unwrap_or_else(|| Arc::from("")),
            token: *token,
            age: now.saturating_since(since),
        })
    }

    pub(super) fn finish_job(
        &mut self,
        now: Time,
        key: LeaseKey,
        outcome: JobOutcome<'_>,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        self.refresh(now, key.0)?;
        let (lock, token) = match self.leases.get(&key) {
            Some(lease) if is_lock_name(&lease.semaphore) => match lease.state {
                LeaseState::Held { token, .. } => (lease.semaphore.clone(), token),
                LeaseState::Queued(_) => return Err(Error::UnknownLease(key.1)),
            },
            _ => return Err(Error::UnknownLease(key.1)),
        };
        let job_name = job_of_lock(&lock)
            .expect("invariant: a lock name is the lock prefix and a job name")
            .to_owned();
        match outcome {
            JobOutcome::Succeeded {
                started_unix_ms,
                duration,
            } => {
                let client = self
                    .sessions
                    .get(&key.0)
                    .map(|s| s.client.clone())
                    .unwrap_or_else(|| Arc::from(""));
                let done = Completion {
                    client,
                    token,
                    started_unix_ms,
                    duration,
                };
                if let Some(job) = self.jobs.jobs.get_mut(job_name.as_str()) {
                    job.completion = Some(done.clone());
                    job.last_failure = None;
                    if let Some(g) = &job.group {
                        self.jobs.dirty.push(g.clone());
                    }
                    out.push(Effect::Persist(job.record()));
                }
                self.release_job_lock(key, &lock, out);
                // Everyone queued to take over learns that there is nothing left to do.
                let queued: Vec<LeaseKey> = self
                    .semaphores
                    .get(&lock)
                    .map(|s| s.queue.values().copied().collect())
                    .unwrap_or_default();
                for waiter in queued {
                    if let Some((tag, _)) = self.dequeue(waiter) {
                        out.push(Effect::Reply {
                            tag,
                            outcome: Ok(Reply::JobCompleted(done.clone())),
                        });
                    }
                }
            }
            JobOutcome::Failed { reason } => {
                self.release_job_lock(key, &lock, out);
                self.job_lock_freed(&lock, reason, out);
                self.pump(now, &lock, out);
            }
        }
        Ok(Some(Reply::Done))
    }

    fn release_job_lock(&mut self, key: LeaseKey, lock: &Arc<str>, out: &mut Vec<Effect>) {
        if self.unhold(key).is_some() {
            if let Some(s) = self.semaphores.get_mut(lock) {
                s.counters.released_total += 1;
            }
            out.push(Effect::Persist(Record::Released {
                session: key.0,
                lease: key.1,
            }));
        }
    }

    /// Called whenever a lease of semaphore `sem` ends: if `sem` is a job's lock and the job
    /// has not completed, that was a failed attempt.
    pub(super) fn job_lock_freed(&mut self, sem: &str, why: &str, out: &mut Vec<Effect>) {
        let Some(job) = job_of_lock(sem).and_then(|name| self.jobs.jobs.get_mut(name)) else {
            return;
        };
        if let Some(g) = &job.group {
            self.jobs.dirty.push(g.clone());
        }
        if job.completion.is_none() {
            job.failures = job.failures.saturating_add(1);
            job.last_failure = Some(cut(why));
            out.push(Effect::Persist(job.record()));
        }
    }

    pub(super) fn reset_job(
        &mut self,
        job: &str,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_label("job name", job)?;
        let Some(entry) = self.jobs.jobs.get_mut(job) else {
            return Ok(Some(Reply::JobReset {
                was_completed: false,
            }));
        };
        let was_completed = entry.completion.take().is_some();
        if was_completed || entry.failures != 0 || entry.last_failure.is_some() {
            entry.failures = 0;
            entry.last_failure = None;
            out.push(Effect::Persist(entry.record()));
        }
        Ok(Some(Reply::JobReset { was_completed }))
    }

    #[allow(clippy::too_many_arguments)] // the fields of Request::WaitGroup, unpacked
    pub(super) fn wait_group(
        &mut self,
        now: Time,
        tag: Tag,
        key: LeaseKey,
        group: &str,
        jobs: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Reply>, Error> {
        validate_label("group name", group)?;
        self.refresh(now, key.0)?;
        if let Some(old) = self.jobs.waits.remove(&key) {
            out.push(Effect::Reply {
                tag: old.tag,
                outcome: Err(Error::Superseded),
            });
        }
        let summary = self.group(group);
        if settled(&summary, jobs) {
            return Ok(Some(Reply::GroupSettled(summary)));
        }
        if timeout == Some(Duration::ZERO) {
            return Err(Error::TimedOut);
        }
        let deadline = timeout.map(|t| now + t);
        self.jobs.waits.insert(
            key,
            GroupWait {
                tag,
                group: Arc::from(group),
                jobs,
                deadline,
            },
        );
        if let Some(d) = deadline {
            self.timers
                .push(Reverse((d, Timer::GroupWait(key.0, key.1))));
        }
        Ok(None)
    }

    /// A group wait's timer came due at `at`.
    pub(super) fn group_wait_due(&mut self, at: Time, key: LeaseKey, out: &mut Vec<Effect>) {
        let due = matches!(self.jobs.waits.get(&key), Some(w) if w.deadline == Some(at));
        if due {
            if let Some(wait) = self.jobs.waits.remove(&key) {
                out.push(Effect::Reply {
                    tag: wait.tag,
                    outcome: Err(Error::TimedOut),
                });
            }
        }
    }

    /// Answers the group waits that the changes since the last call have satisfied.
    pub(super) fn settle_group_waits(&mut self, out: &mut Vec<Effect>) {
        if self.jobs.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.jobs.dirty);
        if self.jobs.waits.is_empty() {
            return;
        }
        dirty.sort_unstable();
        dirty.dedup();
        let mut done: Vec<(LeaseKey, GroupSummary)> = Vec::new();
        for group in &dirty {
            let summary = self.group(group);
            for (key, wait) in &self.jobs.waits {
                if wait.group == *group && settled(&summary, wait.jobs) {
                    done.push((*key, summary));
                }
            }
        }
        done.sort_unstable_by_key(|(key, _)| *key); // deterministic effect order
        for (key, summary) in done {
            if let Some(wait) = self.jobs.waits.remove(&key) {
                out.push(Effect::Reply {
                    tag: wait.tag,
                    outcome: Ok(Reply::GroupSettled(summary)),
                });
            }
        }
    }

    /// A group's state; all zero for an unknown group. O(jobs in the group).
    pub fn group(&self, group: &str) -> GroupSummary {
        let mut summary = GroupSummary::default();
        for name in self.jobs.groups.get(group).into_iter().flatten() {
            let Some(job) = self.jobs.jobs.get(name) else {
                continue;
            };
            summary.jobs += 1;
            summary.completed += u32::from(job.completion.is_some());
            summary.failures += u64::from(job.failures);
            let running = self.semaphores.get(&job.lock).is_some_and(|s| s.in_use > 0);
            summary.running += u32::from(running);
        }
        summary
    }

    /// Every group with its state, sorted by name.
    pub fn groups(&self) -> Vec<(Arc<str>, GroupSummary)> {
        let mut names: Vec<&Arc<str>> = self.jobs.groups.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|g| (g.clone(), self.group(g)))
            .collect()
    }

    /// Every job, sorted by group (ungrouped first) and name.
    pub fn jobs(&self, now: Time) -> Vec<JobView> {
        let mut all: Vec<JobView> = self
            .jobs
            .jobs
            .values()
            .map(|j| self.job_view(j, now))
            .collect();
        all.sort_by(|a, b| (&a.group, &a.name).cmp(&(&b.group, &b.name)));
        all
    }

    /// One job, if it is known.
    pub fn job(&self, name: &str, now: Time) -> Option<JobView> {
        self.jobs.jobs.get(name).map(|j| self.job_view(j, now))
    }

    fn job_view(&self, job: &Job, now: Time) -> JobView {
        JobView {
            name: job.name.clone(),
            group: job.group.clone(),
            completion: job.completion.clone(),
            running: self.running(now, &job.lock),
            waiting: self.semaphores.get(&job.lock).map_or(0, |s| s.queue.len()),
            failures: job.failures,
            last_failure: job.last_failure.clone(),
        }
    }

    /// The job invariants, for [`Coordinator::validate`].
    pub(super) fn validate_jobs(&self) -> Result<(), String> {
        for (name, job) in &self.jobs.jobs {
            if *job.name != **name || *job.lock != *lock_name(name) {
                return Err(format!(
                    "job keyed {name:?} is {:?}/{:?}",
                    job.name, job.lock
                ));
            }
            if name.len() > MAX_NAME_LEN {
                return Err(format!("job name {name:?} too long"));
            }
            if let Some(group) = &job.group {
                if !self
                    .jobs
                    .groups
                    .get(group)
                    .is_some_and(|m| m.contains(name))
                {
                    return Err(format!("job {name:?} missing from group {group:?}"));
                }
            }
            if let Some(sem) = self.semaphores.get(&job.lock) {
                if sem.capacity != 1 {
                    return Err(format!(
                        "lock of job {name:?} has capacity {}",
                        sem.capacity
                    ));
                }
                if job.completion.is_some() && (!sem.holders.is_empty() || !sem.queue.is_empty()) {
                    return Err(format!("completed job {name:?} is held or awaited"));
                }
            }
        }
        for (group, members) in &self.jobs.groups {
            if members.is_empty() {
                return Err(format!("group {group:?} is empty"));
            }
            for name in members {
                let in_group = self
                    .jobs
                    .jobs
                    .get(name)
                    .is_some_and(|j| j.group.as_ref() == Some(group));
                if !in_group {
                    return Err(format!("group {group:?} lists {name:?}, not its member"));
                }
            }
        }
        for name in self.semaphores.keys() {
            if let Some(job) = job_of_lock(name) {
                if !self.jobs.jobs.contains_key(job) {
                    return Err(format!("lock {name:?} has no job"));
                }
            }
        }
        for (key, wait) in &self.jobs.waits {
            if !self.sessions.contains_key(&key.0) {
                return Err(format!("group wait {key:?} outlives its session"));
            }
            if settled(&self.group(&wait.group), wait.jobs) {
                return Err(format!("group wait {key:?} is settled but unanswered"));
            }
        }
        Ok(())
    }
}
