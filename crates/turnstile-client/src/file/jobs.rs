//! Run-once jobs and job groups on the shared directory. The layout and the argument for
//! "runs once" are in the parent module's doc; the rules are the coordinator's (see
//! `turnstile-core`'s `coordinator/jobs.rs`): an attempt at a completed job is answered with
//! the completion, a completion is recorded only by the holder of the job's lock, attempts
//! waiting for a runner that completes learn of it instead of running, and any other end of
//! the lock's lease is a failed attempt.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use turnstile_proto::{CompletionStatus, ErrorCode, GroupStatus, JobStatus, RunningStatus};

use super::disk::{self, Completion, Record};
use super::notify::{self, Kind};
use super::{lock, numbered, rejected, storage, FsClock, Inner, Target, MAX_POLL, MIN_POLL};
use crate::backend::{Grant, JobBegin, JobEnd};
use crate::{random_id, Error, GroupSummary, JobCompletion, JobRunner, LostReason};

/// Where the jobs live: `DIR/.jobs/<escaped job name>/`.
const JOBS: &str = ".jobs";
/// Where the groups' membership markers live: `DIR/.groups/<escaped group name>/`.
const GROUPS: &str = ".groups";
/// A job's lock: a semaphore directory of capacity 1.
const LOCK: &str = "lock";
/// A job's completion record.
const DONE: &str = "done";
/// A job's group.
const GROUP: &str = "group";
/// A job's failed attempts, one file each.
const FAILED: &str = "failed";
/// Why the last failed attempt failed.
const LAST_FAILURE: &str = "last-failure";
/// The one slot of a lock.
const SLOT: &str = "slot-0";

/// Longest failure reason kept, in bytes (as on the coordinator); longer ones are cut at a
/// character boundary.
const MAX_REASON_LEN: usize = 1024;

/// Shown as the runner of a completion whose record cannot be read.
const DAMAGED_COMPLETION: &str = "unknown (damaged completion record)";
/// Shown as the runner of a job whose lock holds a fresh record that cannot be read.
const UNREADABLE_HOLDER: &str = "unknown (unreadable lock record)";

/// What a job's `done` file says.
#[derive(Debug)]
enum Done {
    No,
    Yes(Completion),
    /// It exists but cannot be parsed: the job has completed (only a completion is ever
    /// linked there), but by whom and when is lost.
    Damaged,
}

impl Done {
    fn exists(&self) -> bool {
        !matches!(self, Done::No)
    }
}

/// The live holder of a job's lock.
enum Holder {
    Known(Record),
    /// A fresh record that cannot be parsed: respected as a holder until it goes stale.
    Unreadable,
}

fn invalid(message: String) -> Error {
    rejected(ErrorCode::InvalidArgument, message)
}

fn is_hidden(name: &OsString) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The names in `dir` that are not hidden (temporary and reclaimed files are), sorted; none
/// if `dir` does not exist.
fn visible_names(dir: &Path) -> Result<Vec<OsString>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if disk::missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(storage(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| storage(dir, e))?.file_name();
        if !is_hidden(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn cut(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, ms)
}

fn client_of(host: &str, pid: u32) -> String {
    format!("{host}:{pid}")
}

/// The one-line name in a `group` file; `None` if it is empty or not text.
fn parse_line(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    (!text.is_empty() && !text.contains('\n')).then(|| text.to_owned())
}

impl Completion {
    fn to_job_completion(&self) -> JobCompletion {
        JobCompletion {
            client: client_of(&self.host, self.pid),
            token: self.token,
            started: UNIX_EPOCH
                .checked_add(Duration::from_millis(self.started_ms))
                .unwrap_or(UNIX_EPOCH),
            duration: Duration::from_millis(self.duration_ms),
        }
    }
}

/// Reads a job's completion. With `confirm`, a missing file is confirmed by listing the
/// job's directory: on NFS a lookup may answer from a cached "no such file" for a while,
/// whereas opening the directory revalidates it (close-to-open consistency), so the check
/// that decides whether an attempt runs sees a completion that another host recorded before
/// it released the lock.
fn read_done(job_dir: &Path, confirm: bool) -> Result<Done, Error> {
    let path = job_dir.join(DONE);
    let mut bytes = disk::read_opt(&path).map_err(|e| storage(&path, e))?;
    if bytes.is_none() && confirm {
        let listed = visible_names(job_dir)?.iter().any(|n| n == DONE);
        if listed {
            bytes = disk::read_opt(&path).map_err(|e| storage(&path, e))?;
        }
    }
    Ok(match bytes {
        None => Done::No,
        Some(b) => Completion::decode(&b).map_or(Done::Damaged, Done::Yes),
    })
}

/// A job's completion, for an attempt deciding whether to run: a damaged record is an
/// error, since the job has completed but what to answer is lost.
fn completion(job_dir: &Path, confirm: bool) -> Result<Option<JobCompletion>, Error> {
    match read_done(job_dir, confirm)? {
        Done::No => Ok(None),
        Done::Yes(c) => Ok(Some(c.to_job_completion())),
        Done::Damaged => Err(storage(
            &job_dir.join(DONE),
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the job's completion record is damaged; reset the job to run it again",
            ),
        )),
    }
}

fn read_group(job_dir: &Path) -> Result<Option<String>, Error> {
    let path = job_dir.join(GROUP);
    let bytes = disk::read_opt(&path).map_err(|e| storage(&path, e))?;
    Ok(bytes.as_deref().and_then(parse_line))
}

/// Failed attempts recorded (since the last reset).
fn failures(job_dir: &Path) -> Result<u32, Error> {
    let n = visible_names(&job_dir.join(FAILED))?.len();
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

fn last_failure(job_dir: &Path) -> Result<Option<String>, Error> {
    let path = job_dir.join(LAST_FAILURE);
    let bytes = disk::read_opt(&path).map_err(|e| storage(&path, e))?;
    Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Creates the membership marker `group_dir/marker` (it may exist already).
fn add_marker(group_dir: &Path, marker: &str, job: &str) -> Result<(), Error> {
    fs::create_dir_all(group_dir).map_err(|e| storage(group_dir, e))?;
    let path = group_dir.join(marker);
    disk::create_exclusive(group_dir, &path, format!("{job}\n").as_bytes())
        .map_err(|e| storage(&path, e))?;
    Ok(())
}

fn remove_file_if_present(path: &Path) -> Result<bool, Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if disk::missing(&e) => Ok(false),
        Err(e) => Err(storage(path, e)),
    }
}

impl Inner {
    fn job_dir(&self, job: &str) -> Result<PathBuf, Error> {
        disk::validate_label("job name", job).map_err(invalid)?;
        Ok(self.root.join(JOBS).join(disk::dir_name(job)))
    }

    /// A group's directory of markers (the name is not checked: it may come from a file).
    fn group_dir(&self, group: &str) -> PathBuf {
        self.root.join(GROUPS).join(disk::dir_name(group))
    }

    /// Puts a job in `group`. The job's `group` file is the truth; the markers in
    /// `.groups/` are an index for group waits, which check every marker against the
    /// `group` file. So a marker is created before the file names the group (a member is
    /// never missed) and removed after it names another (a stale marker is ignored).
    fn set_group(&self, job: &str, job_dir: &Path, group: &str) -> Result<(), Error> {
        let marker = disk::dir_name(job);
        let current = read_group(job_dir)?;
        let new_dir = self.group_dir(group);
        if current.as_deref() == Some(group) {
            if !new_dir.join(&marker).exists() {
                add_marker(&new_dir, &marker, job)?; // lost to a race of two moves (below)
            }
            return Ok(());
        }
        add_marker(&new_dir, &marker, job)?;
        let path = job_dir.join(GROUP);
        disk::replace(job_dir, &path, format!("{group}\n").as_bytes())
            .map_err(|e| storage(&path, e))?;
        if let Some(old) = current {
            let old_dir = self.group_dir(&old);
            remove_file_if_present(&old_dir.join(&marker))?;
            // A concurrent move back to `old` may have found that marker in place just
            // before we removed it.
            if read_group(job_dir)?.as_deref() == Some(old.as_str()) {
                add_marker(&old_dir, &marker, job)?;
            }
        }
        Ok(())
    }

    /// Counts a failed attempt of a job, logging (not returning) an error: it runs where a
    /// lease ends anyway, and the end must not fail for the bookkeeping.
    pub(super) fn count_failure(&self, job_dir: &Path, why: &str) {
        if let Err(e) = self.record_failure(job_dir, why) {
            tracing::warn!(job = %job_dir.display(), error = %e, "cannot record a failed attempt");
        }
    }

    /// Records a failed attempt: a new file in `failed/` (created by link under a unique
    /// name, so that concurrent failures are all counted) and the reason in `last-failure`.
    /// Nothing is recorded once the job has completed: the end of the lease that completed
    /// it (say, its runner died before releasing) is no failure.
    fn record_failure(&self, job_dir: &Path, why: &str) -> Result<(), Error> {
        if read_done(job_dir, false)?.exists() {
            return Ok(());
        }
        let reason = cut(why).as_bytes();
        let dir = job_dir.join(FAILED);
        fs::create_dir_all(&dir).map_err(|e| storage(&dir, e))?;
        let mut recorded = false;
        for _ in 0..8 {
            let path = dir.join(format!("{:013}-{:016x}", disk::unix_ms(), random_id()));
            if disk::create_exclusive(&dir, &path, reason).map_err(|e| storage(&path, e))? {
                recorded = true;
                break;
            }
        }
        if !recorded {
            return Err(storage(
                &dir,
                io::Error::new(io::ErrorKind::AlreadyExists, "no free name for a failure"),
            ));
        }
        let path = job_dir.join(LAST_FAILURE);
        disk::replace(job_dir, &path, reason).map_err(|e| storage(&path, e))
    }

    /// The live holder of a job's lock, if any. With `clock` (for `status`, which must
    /// answer at once), a holder that looks stale by the display-only guess is shown as not
    /// running, and left alone. Without, a stale holder (by the rule that reclaims: seen
    /// unchanged for a TTL, or a dead local process) is removed, counting the failed
    /// attempt, as the head of the lock's queue would do.
    fn running(
        &self,
        job_dir: &Path,
        clock: Option<&mut FsClock<'_>>,
    ) -> Result<Option<Holder>, Error> {
        let lock_dir = job_dir.join(LOCK);
        let path = lock_dir.join(SLOT);
        let holder =
            |bytes: &[u8]| Some(Record::decode(bytes).map_or(Holder::Unreadable, Holder::Known));
        if let Some(clock) = clock {
            let (bytes, mtime) = match disk::read_with_mtime(&path) {
                Ok(x) => x,
                Err(e) if disk::missing(&e) => return Ok(None),
                Err(e) => return Err(storage(&path, e)),
            };
            if self.looks_stale(&bytes, mtime, clock)? {
                return Ok(None);
            }
            return Ok(holder(&bytes));
        }
        if self.reap_slot(&lock_dir, Some(job_dir), &path)? {
            return Ok(None);
        }
        // Alive: read again for who it is (gone meanwhile: not running).
        match disk::read_opt(&path) {
            Ok(Some(bytes)) => Ok(holder(&bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(storage(&path, e)),
        }
    }

    /// Forgets a grant that will not be used (no failed attempt: it never ran).
    fn forget(&self, lease: u64) {
        let held = lock(&self.held).remove(&lease);
        if let Some(h) = held {
            Inner::free(&h);
        }
    }

    pub(super) async fn begin_job(
        &self,
        job: &str,
        group: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<JobBegin, Error> {
        self.check_live()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let job_dir = self.job_dir(job)?;
        if let Some(g) = group {
            disk::validate_label("group name", g).map_err(invalid)?;
        }
        let lock_dir = job_dir.join(LOCK);
        self.ensure_dir(&lock_dir, job, 1)?;
        if let Some(g) = group {
            self.set_group(job, &job_dir, g)?;
        }
        if let Some(done) = completion(&job_dir, true)? {
            return Ok(JobBegin::Completed(done));
        }
        let target = Target {
            name: job,
            sem_dir: &lock_dir,
            capacity: 1,
            job: Some(&job_dir),
        };
        // While waiting, every look checks for a completion: the runner records it before
        // it frees the lock, so a waiter learns of it instead of running.
        let waited = self
            .wait_for_grant(&target, 1, deadline, || completion(&job_dir, false))
            .await;
        match waited {
            Ok(Ok(grant)) => self.confirm_run(&job_dir, grant),
            Ok(Err(done)) => Ok(JobBegin::Completed(done)),
            Err(Error::TimedOut) if timeout == Some(Duration::ZERO) => {
                self.busy(&job_dir, &lock_dir)
            }
            Err(e) => Err(e),
        }
    }

    /// The last check before an attempt runs, made while it holds the lock: a completion
    /// recorded between the previous look and the grant wins, and the lock goes back.
    fn confirm_run(&self, job_dir: &Path, grant: Grant) -> Result<JobBegin, Error> {
        match completion(job_dir, true) {
            Ok(None) => Ok(JobBegin::Run(grant)),
            Ok(Some(done)) => {
                self.forget(grant.lease);
                Ok(JobBegin::Completed(done))
            }
            Err(e) => {
                self.forget(grant.lease);
                Err(e)
            }
        }
    }

    /// The answer to an attempt that will not wait: who runs the job (or, if it completed
    /// meanwhile, the completion).
    fn busy(&self, job_dir: &Path, lock_dir: &Path) -> Result<JobBegin, Error> {
        let path = lock_dir.join(SLOT);
        let bytes = disk::read_opt(&path).map_err(|e| storage(&path, e))?;
        if let Some(r) = bytes.as_deref().and_then(Record::decode) {
            return Ok(JobBegin::Running(JobRunner {
                client: client_of(&r.who.host, r.who.pid),
                token: r.token,
                running_for: Duration::from_millis(disk::unix_ms().saturating_sub(r.start_ms)),
            }));
        }
        match completion(job_dir, true)? {
            Some(done) => Ok(JobBegin::Completed(done)),
            None => Err(Error::TimedOut),
        }
    }

    pub(super) fn finish_job(&self, job: &str, lease: u64, end: JobEnd<'_>) -> Result<(), Error> {
        let job_dir = self.job_dir(job)?;
        let unknown = || {
            rejected(
                ErrorCode::UnknownLease,
                format!("lease {lease} is not a live attempt at job {job:?}"),
            )
        };
        let mut h = {
            let mut held = lock(&self.held);
            match held.remove(&lease) {
                Some(h) if h.job.as_deref() == Some(job_dir.as_path()) => h,
                Some(h) => {
                    held.insert(lease, h);
                    return Err(unknown());
                }
                None => return Err(unknown()),
            }
        };
        // Refreshed just before the record is written, so that nobody can have taken the
        // lock over when it is (see "Why a job runs once").
        match self.still_held(&mut h) {
            Ok(true) => {}
            Ok(false) => {
                let reason = self.lost_reason(lease, &h);
                Inner::free(&h);
                h.lost.send(reason);
                return Err(Error::LeaseLost(reason));
            }
            Err(e) => {
                let _ = self.let_go(h, "its end could not be recorded");
                return Err(e);
            }
        }
        match end {
            JobEnd::Succeeded { started, duration } => {
                let record = Completion {
                    token: h.token,
                    started_ms: unix_ms_of(started),
                    duration_ms: ms(duration),
                    session: self.session,
                    host: self.who.host.clone(),
                    pid: self.who.pid,
                };
                let path = job_dir.join(DONE);
                match disk::create_exclusive(&job_dir, &path, &record.encode()) {
                    Ok(true) => {
                        if let Err(e) = remove_file_if_present(&job_dir.join(LAST_FAILURE)) {
                            tracing::warn!(error = %e, "cannot clear the last failure");
                        }
                        // The completion is recorded: a lock left behind by an error here
                        // goes stale, and is then no failed attempt since `done` exists.
                        for slot in &h.slots {
                            if let Err(e) = disk::remove_own(&h.sem_dir, slot, &h.content) {
                                tracing::warn!(error = %e, "cannot free a completed job's lock");
                            }
                        }
                        Ok(())
                    }
                    Ok(false) => {
                        // Another attempt's completion is there, which only a pause of more
                        // than a TTL between our refresh and the link can cause: this
                        // attempt's lease was lost, and its success is not recorded.
                        Inner::free(&h);
                        Err(Error::LeaseLost(LostReason::Expired))
                    }
                    Err(e) => {
                        let _ = self.let_go(h, "its completion could not be recorded");
                        Err(storage(&path, e))
                    }
                }
            }
            JobEnd::Failed { reason } => {
                let recorded = self.record_failure(&job_dir, reason);
                for slot in &h.slots {
                    disk::remove_own(&h.sem_dir, slot, &h.content).map_err(|e| storage(slot, e))?;
                }
                recorded
            }
        }
    }

    pub(super) fn reset_job(&self, job: &str) -> Result<bool, Error> {
        let job_dir = self.job_dir(job)?;
        if self.capacity(&job_dir.join(LOCK), job)?.is_none() {
            return Ok(false);
        }
        // The failures first: once `done` is gone a new attempt may start and fail, and its
        // failure must outlive this reset.
        let failed = job_dir.join(FAILED);
        for name in visible_names(&failed)? {
            remove_file_if_present(&failed.join(name))?;
        }
        remove_file_if_present(&job_dir.join(LAST_FAILURE))?;
        // Of concurrent resets, the one whose unlink succeeds reports the completion.
        remove_file_if_present(&job_dir.join(DONE))
    }

    /// A group's state and the directories of its member jobs. Stale holders of its jobs'
    /// locks are reclaimed on the way (counting their failed attempts).
    fn group_summary(
        &self,
        group: &str,
        group_dir: &Path,
    ) -> Result<(GroupSummary, Vec<PathBuf>), Error> {
        let mut summary = GroupSummary::default();
        let mut members = Vec::new();
        for marker in visible_names(group_dir)? {
            let job_dir = self.root.join(JOBS).join(&marker);
            if read_group(&job_dir)?.as_deref() != Some(group) {
                continue; // left behind by a move to another group
            }
            // The holder before the completion: a runner links its completion before it
            // frees the lock, so a job found without a holder after it completed is then
            // found completed.
            let running = self.running(&job_dir, None)?.is_some();
            summary.jobs += 1;
            summary.running += u32::from(running);
            summary.completed += u32::from(read_done(&job_dir, true)?.exists());
            summary.failures += u64::from(failures(&job_dir)?);
            members.push(job_dir);
        }
        Ok((summary, members))
    }

    pub(super) async fn wait_group(
        &self,
        group: &str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> Result<GroupSummary, Error> {
        self.check_live()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        disk::validate_label("group name", group).map_err(invalid)?;
        let group_dir = self.group_dir(group);
        let mut backoff = MIN_POLL;
        // The members the watch covers, and the watch (`None` inside: poll only).
        let mut watched: Option<(Vec<PathBuf>, Option<notify::Watch>)> = None;
        loop {
            self.check_live()?;
            let (summary, members) = self.group_summary(group, &group_dir)?;
            if summary.running == 0 && summary.completed >= jobs {
                return Ok(summary);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::TimedOut);
            }
            if watched.as_ref().is_none_or(|(m, _)| *m != members) {
                let mut dirs = vec![(group_dir.clone(), Kind::Group)];
                for m in &members {
                    dirs.push((m.clone(), Kind::Job));
                    dirs.push((m.join(LOCK), Kind::Semaphore));
                }
                watched = Some((members, notify::Watch::on(&dirs)));
                // A change between the look and the new watch would raise no event: look
                // again, now that the watch is in place.
                continue;
            }
            let mut nap = backoff;
            if let Some(d) = deadline {
                nap = nap.min(d.saturating_duration_since(now));
            }
            let woken = notify::nap(watched.as_ref().and_then(|(_, w)| w.as_ref()), nap).await;
            backoff = if woken {
                MIN_POLL
            } else {
                (backoff * 2).min(MAX_POLL)
            };
        }
    }

    /// The `groups` and `jobs` of the status document. Read-only, and at once: a holder
    /// that looks stale by the display-only guess (`Inner::looks_stale`: an mtime older than
    /// its TTL) is shown as not running, and left for an attempt or a group wait to judge
    /// by the rule that reclaims. A job whose
    /// `lock/capacity` (which names it) is missing or damaged is left out.
    pub(super) fn job_status(
        &self,
        only: Option<&str>,
    ) -> Result<(Vec<GroupStatus>, Vec<JobStatus>), Error> {
        let jobs_dir = self.root.join(JOBS);
        let mut clock = FsClock {
            root: &self.root,
            now: None,
        };
        let now_ms = disk::unix_ms();
        let mut jobs = Vec::new();
        // One job's directory when one name is asked for (its name is checked below, against
        // the `capacity` file, like every other), else all of them.
        let dirs = match only {
            Some(name) => vec![OsString::from(disk::dir_name(name))],
            None => visible_names(&jobs_dir)?,
        };
        for dir_name in dirs {
            let job_dir = jobs_dir.join(dir_name);
            let lock_dir = job_dir.join(LOCK);
            let Some((_, name)) = disk::read_small(&lock_dir.join("capacity"))
                .ok()
                .and_then(|b| disk::parse_capacity(&b))
            else {
                continue;
            };
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let completed = match read_done(&job_dir, false)? {
                Done::No => None,
                Done::Yes(c) => Some(CompletionStatus {
                    client: client_of(&c.host, c.pid),
                    token: c.token,
                    started_unix_ms: c.started_ms,
                    duration_ms: c.duration_ms,
                }),
                Done::Damaged => Some(CompletionStatus {
                    client: DAMAGED_COMPLETION.into(),
                    ..CompletionStatus::default()
                }),
            };
            let running = self
                .running(&job_dir, Some(&mut clock))?
                .map(|holder| match holder {
                    Holder::Known(r) => RunningStatus {
                        client: client_of(&r.who.host, r.who.pid),
                        session: format!("{:016x}", r.session),
                        token: r.token,
                        age_ms: now_ms.saturating_sub(r.start_ms),
                    },
                    Holder::Unreadable => RunningStatus {
                        client: UNREADABLE_HOLDER.into(),
                        ..RunningStatus::default()
                    },
                });
            let queue = lock_dir.join("queue");
            let waiting = numbered(&queue)
                .map(|tickets| {
                    tickets
                        .values()
                        .filter(|p| {
                            disk::read_small(p)
                                .ok()
                                .is_some_and(|b| Record::decode(&b).is_some())
                        })
                        .count() as u64
                })
                .unwrap_or(0);
            jobs.push(JobStatus {
                name,
                group: read_group(&job_dir)?,
                completed,
                running,
                waiting,
                failures: failures(&job_dir)?,
                last_failure: last_failure(&job_dir)?,
            });
        }
        jobs.sort_by(|a, b| (&a.group, &a.name).cmp(&(&b.group, &b.name)));
        let mut groups: Vec<GroupStatus> = Vec::new();
        // Sorted by group already: the members of a group are adjacent.
        for j in &jobs {
            let Some(g) = &j.group else { continue };
            if groups.last().is_none_or(|last| last.name != *g) {
                groups.push(GroupStatus {
                    name: g.clone(),
                    ..GroupStatus::default()
                });
            }
            if let Some(entry) = groups.last_mut() {
                entry.jobs += 1;
                entry.completed += u32::from(j.completed.is_some());
                entry.running += u32::from(j.running.is_some());
                entry.failures += u64::from(j.failures);
            }
        }
        Ok((groups, jobs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        assert_eq!(cut("boom"), "boom");
        let long = "é".repeat(MAX_REASON_LEN);
        let c = cut(&long);
        assert!(c.len() <= MAX_REASON_LEN && c.len() >= MAX_REASON_LEN - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn group_files_hold_one_line() {
        assert_eq!(parse_line(b"nightly\n").as_deref(), Some("nightly"));
        assert_eq!(parse_line(b"nightly").as_deref(), Some("nightly"));
        assert_eq!(parse_line(b""), None);
        assert_eq!(parse_line(b"\n"), None);
        assert_eq!(parse_line(b"a\nb\n"), None);
        assert_eq!(parse_line(b"\xff\n"), None);
    }

    #[test]
    fn completions_far_in_the_future_do_not_panic() {
        let c = Completion {
            token: 1,
            started_ms: u64::MAX,
            duration_ms: u64::MAX,
            session: 1,
            host: "h".into(),
            pid: 1,
        };
        let j = c.to_job_completion();
        assert_eq!(j.client, "h:1");
        assert_eq!(unix_ms_of(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn damaged_and_missing_completions() {
        let dir = std::env::temp_dir().join(format!("turnstile-jobs-done-{}", random_id()));
        fs::create_dir_all(&dir).expect("mkdir");
        assert!(matches!(read_done(&dir, true), Ok(Done::No)));
        assert!(matches!(completion(&dir, true), Ok(None)));
        fs::write(dir.join(DONE), b"turnstile-job-done-v1 token=3 star").expect("write");
        assert!(matches!(read_done(&dir, false), Ok(Done::Damaged)));
        let err = completion(&dir, false).expect_err("damaged");
        assert!(matches!(err, Error::Storage { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some_and(|c| c.to_string().contains("damaged")));
        assert!(matches!(
            read_done(&dir.join("missing"), true),
            Ok(Done::No)
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
