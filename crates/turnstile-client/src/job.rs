//! Run-once jobs and job groups: the client-facing API, the same on every backend.
//!
//! A job runs once and only once: an attempt takes the job's exclusive lease, runs, and on
//! success records the job's completion, after which every later attempt skips it. While an
//! attempt runs, others either skip at once or wait to take over if it fails. A runner that
//! dies leaves its lease to expire (or to be freed by a supervisor), and the next attempt
//! takes over: the job is retried, never run twice at the same time.
//!
//! ```no_run
//! # async fn example() -> Result<(), turnstile_client::Error> {
//! use turnstile_client::{Client, JobStart};
//!
//! let client = Client::connect("tcp://127.0.0.1:7420").await?;
//! match client.try_begin_job("import-2026-11-23", Some("nightly")).await? {
//!     JobStart::Run(attempt) => {
//!         // ... do the work, passing attempt.fencing_token() to what it writes ...
//!         attempt.succeed().await?;
//!     }
//!     JobStart::Completed(done) => println!("already done by {}", done.client),
//!     JobStart::Running(r) => println!("{} is running it", r.client),
//! }
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant, SystemTime};

use crate::backend::{JobBegin, JobEnd};
use crate::{Client, Error, ErrorCode, LostReason, Permit};

/// A job's recorded completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCompletion {
    /// Who ran it: the client description of its runner ("host:pid").
    pub client: String,
    /// The fencing token of the attempt that completed it.
    pub token: u64,
    /// When that attempt started, by its runner's clock.
    pub started: SystemTime,
    /// How long it ran.
    pub duration: Duration,
}

/// The attempt that runs a job now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRunner {
    /// Who runs it ("host:pid").
    pub client: String,
    /// Its fencing token.
    pub token: u64,
    /// How long it has been running.
    pub running_for: Duration,
}

/// A job group's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupSummary {
    /// Jobs known in the group.
    pub jobs: u32,
    /// Jobs completed.
    pub completed: u32,
    /// Jobs running.
    pub running: u32,
    /// Failed attempts of its jobs (since their last reset).
    pub failures: u64,
}

/// How an attempt at a job began.
#[derive(Debug)]
pub enum JobStart {
    /// This attempt holds the job's exclusive lease: run the job, then report how it went.
    Run(JobAttempt),
    /// The job has completed: do not run it.
    Completed(JobCompletion),
    /// Another attempt is running the job (only from [`Client::try_begin_job`]).
    Running(JobRunner),
}

/// An attempt that holds a job's exclusive lease. Report its end with
/// [`succeed`](JobAttempt::succeed) or [`fail`](JobAttempt::fail); dropping it counts as a
/// failed attempt (the lease is released and the next attempt may take over).
#[must_use = "dropping the attempt gives the job up as failed"]
#[derive(Debug)]
pub struct JobAttempt {
    permit: Permit,
    job: String,
    started: SystemTime,
    clock: Instant,
}

impl JobAttempt {
    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The attempt's fencing token: strictly greater than that of every earlier attempt at
    /// this job.
    pub fn fencing_token(&self) -> u64 {
        self.permit.fencing_token()
    }

    /// The job's exclusive lease, to watch for its loss ([`Permit::lost`]).
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// When the attempt started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// Records the job's completion (with this attempt's start and duration) and releases the
    /// lease; no later attempt will run the job until it is reset. Fails with
    /// [`Error::LeaseLost`] if the lease was lost first: then nothing is recorded, and
    /// another attempt may already be running the job; with [`Error::Unavailable`] if the
    /// coordinator could not be reached before the lease expired: then the completion may
    /// not be recorded, and the job may run again.
    pub async fn succeed(mut self) -> Result<(), Error> {
        let duration = self.clock.elapsed();
        let end = JobEnd::Succeeded {
            started: self.started,
            duration,
        };
        let token = self.permit.fencing_token();
        match self.finish(end).await {
            Err(Error::Rejected {
                code: ErrorCode::UnknownLease,
                ..
            }) => {}
            other => return other,
        }
        // The record may have gone through with only its answer lost (a reconnect in between
        // re-sends it): the job's status says whether this attempt's completion is there.
        let doc = self.permit.client.status(Some(&self.job)).await?;
        let recorded = doc
            .jobs
            .iter()
            .any(|j| j.name == self.job && j.completed.as_ref().is_some_and(|c| c.token == token));
        if recorded {
            Ok(())
        } else {
            Err(Error::LeaseLost(
                self.permit.lost_reason().unwrap_or(LostReason::Expired),
            ))
        }
    }

    /// Records a failed attempt (with `reason` in words, such as "exited with status 3") and
    /// releases the lease, so that the next attempt runs the job.
    pub async fn fail(mut self, reason: &str) -> Result<(), Error> {
        match self.finish(JobEnd::Failed { reason }).await {
            // A lost lease has already counted as a failed attempt.
            Err(Error::LeaseLost(_))
            | Err(Error::Rejected {
                code: ErrorCode::UnknownLease,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    async fn finish(&mut self, end: JobEnd<'_>) -> Result<(), Error> {
        if let Some(reason) = self.permit.lost_reason() {
            self.permit.released = true;
            return Err(Error::LeaseLost(reason));
        }
        // From here the backend releases the lease itself; the permit must not.
        self.permit.released = true;
        let backend = self.permit.client.backend.clone();
        backend
            .finish_job(&self.job, self.permit.lease_id(), end)
            .await
    }
}

impl Client {
    /// Starts an attempt at run-once job `job` without waiting: [`JobStart::Run`] if this
    /// attempt is to run it, [`JobStart::Completed`] if it has completed, and
    /// [`JobStart::Running`] if another attempt runs it now. `group` puts the job in a group
    /// (`None` keeps the group it has).
    pub async fn try_begin_job(&self, job: &str, group: Option<&str>) -> Result<JobStart, Error> {
        self.begin_job_inner(job, group, Some(Duration::ZERO)).await
    }

    /// Starts an attempt at run-once job `job`, waiting while another attempt runs it: when
    /// that one ends, this one learns of the completion ([`JobStart::Completed`]) or, if it
    /// failed or died, takes over ([`JobStart::Run`]).
    pub async fn begin_job(&self, job: &str, group: Option<&str>) -> Result<JobStart, Error> {
        self.begin_job_inner(job, group, None).await
    }

    /// Like [`begin_job`](Client::begin_job), waiting at most `timeout`; fails with
    /// [`Error::TimedOut`].
    pub async fn begin_job_timeout(
        &self,
        job: &str,
        group: Option<&str>,
        timeout: Duration,
    ) -> Result<JobStart, Error> {
        self.begin_job_inner(job, group, Some(timeout)).await
    }

    async fn begin_job_inner(
        &self,
        job: &str,
        group: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<JobStart, Error> {
        let started = SystemTime::now();
        let clock = Instant::now();
        Ok(match self.backend.begin_job(job, group, timeout).await? {
            JobBegin::Run(grant) => JobStart::Run(JobAttempt {
                permit: Permit {
                    client: self.clone(),
                    semaphore: std::sync::Arc::from(job),
                    lease: grant.lease,
                    token: grant.token,
                    weight: 1,
                    lost: grant.lost,
                    released: false,
                },
                job: job.to_owned(),
                started,
                clock,
            }),
            JobBegin::Completed(done) => JobStart::Completed(done),
            JobBegin::Running(runner) => JobStart::Running(runner),
        })
    }

    /// Forgets job `job`'s completion and failed attempts, so that its next attempt runs it.
    /// Returns whether it had completed.
    pub async fn reset_job(&self, job: &str) -> Result<bool, Error> {
        self.backend.reset_job(job).await
    }

    /// Waits until no job of `group` is running and at least `jobs` of its jobs have
    /// completed (`jobs` 0: only that none runs); at most `timeout`, failing with
    /// [`Error::TimedOut`] (`None`: as long as it takes).
    pub async fn wait_group(
        &self,
        group: &str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> Result<GroupSummary, Error> {
        self.backend.wait_group(group, jobs, timeout).await
    }
}
