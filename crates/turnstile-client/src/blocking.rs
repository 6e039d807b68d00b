//! A blocking facade over the async client, for programs without a tokio runtime.
//!
//! The facade owns a [`DrivenRuntime`]: a thread that waits for an answer drives the client's
//! I/O itself (no thread hand-off per call), and the runtime's keeper thread drives it while no
//! thread waits, so the session is kept alive while the calling thread is busy doing the
//! guarded work.

use std::future::Future;
use std::time::Duration;

use crate::driven::DrivenRuntime;
use crate::{Error, GroupSummary, JobCompletion, JobRunner, LostReason, Options, StatusDoc};

/// The runtime and the client it drives, shared by every blocking handle.
///
/// When the last handle goes, the session is ended cleanly *before* the runtime stops (the
/// field order then drops the runtime, which stops its keeper thread).
/// Dropping the runtime first would kill the client's driver task mid-flight: a permit dropped
/// just before would never be released (its release was still in the driver's queue), nor
/// would the session be closed, so the coordinator would hold its leases until the TTL.
#[derive(Debug)]
struct Shared {
    rt: DrivenRuntime,
    client: crate::Client,
}

impl Shared {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // `block_on` panics inside an async context; there the session is left to expire.
        if tokio::runtime::Handle::try_current().is_err() {
            // Handles the releases already queued, then closes the session; bounded by the
            // driver's own wait for the coordinator's answer.
            let _ = self.rt.block_on(self.client.shutdown());
        }
    }
}

/// A blocking client. See [`crate::Client`].
#[derive(Debug)]
pub struct Client {
    rt: std::sync::Arc<Shared>,
    inner: crate::Client,
}

impl Client {
    /// Connects to the backend at `url`.
    pub fn connect(url: &str) -> Result<Client, Error> {
        Client::connect_with(url, Options::default())
    }

    /// Connects to the backend at `url` with options.
    pub fn connect_with(url: &str, options: Options) -> Result<Client, Error> {
        let rt = DrivenRuntime::new("turnstile-client").map_err(|source| Error::Connect {
            addr: url.to_owned(),
            source,
        })?;
        let inner = rt.block_on(crate::Client::connect_with(url, options))?;
        Ok(Client {
            rt: std::sync::Arc::new(Shared {
                rt,
                client: inner.clone(),
            }),
            inner,
        })
    }

    /// See [`crate::Client::semaphore`].
    pub fn semaphore(&self, name: &str, capacity: u32) -> Result<Semaphore, Error> {
        let inner = self.rt.block_on(self.inner.semaphore(name, capacity))?;
        Ok(Semaphore {
            rt: self.rt.clone(),
            inner,
        })
    }

    /// See [`crate::Client::status`].
    pub fn status(&self, name: Option<&str>) -> Result<StatusDoc, Error> {
        self.rt.block_on(self.inner.status(name))
    }

    /// See [`crate::Client::close`].
    pub fn close(&self, name: &str) -> Result<(), Error> {
        self.rt.block_on(self.inner.close(name))
    }

    /// See [`crate::Client::shutdown`].
    pub fn shutdown(&self) -> Result<(), Error> {
        self.rt.block_on(self.inner.shutdown())
    }

    fn wrap_job(&self, start: crate::JobStart) -> JobStart {
        match start {
            crate::JobStart::Run(attempt) => JobStart::Run(JobAttempt {
                rt: self.rt.clone(),
                inner: Some(attempt),
            }),
            crate::JobStart::Completed(done) => JobStart::Completed(done),
            crate::JobStart::Running(runner) => JobStart::Running(runner),
        }
    }

    /// See [`crate::Client::try_begin_job`].
    pub fn try_begin_job(&self, job: &str, group: Option<&str>) -> Result<JobStart, Error> {
        let start = self.rt.block_on(self.inner.try_begin_job(job, group))?;
        Ok(self.wrap_job(start))
    }

    /// See [`crate::Client::begin_job`].
    pub fn begin_job(&self, job: &str, group: Option<&str>) -> Result<JobStart, Error> {
        let start = self.rt.block_on(self.inner.begin_job(job, group))?;
        Ok(self.wrap_job(start))
    }

    /// See [`crate::Client::begin_job_timeout`].
    pub fn begin_job_timeout(
        &self,
        job: &str,
        group: Option<&str>,
        timeout: Duration,
    ) -> Result<JobStart, Error> {
        let start = self
            .rt
            .block_on(self.inner.begin_job_timeout(job, group, timeout))?;
        Ok(self.wrap_job(start))
    }

    /// See [`crate::Client::reset_job`].
    pub fn reset_job(&self, job: &str) -> Result<bool, Error> {
        self.rt.block_on(self.inner.reset_job(job))
    }

    /// See [`crate::Client::wait_group`].
    pub fn wait_group(
        &self,
        group: &str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> Result<GroupSummary, Error> {
        self.rt
            .block_on(self.inner.wait_group(group, jobs, timeout))
    }
}

/// How an attempt at a job began. See [`crate::JobStart`].
#[derive(Debug)]
pub enum JobStart {
    /// Run the job, then report how it went.
    Run(JobAttempt),
    /// The job has completed: do not run it.
    Completed(JobCompletion),
    /// Another attempt runs it (only from `try_begin_job`).
    Running(JobRunner),
}

/// A blocking job attempt; dropping it counts as a failed attempt. See [`crate::JobAttempt`].
#[must_use = "dropping the attempt gives the job up as failed"]
#[derive(Debug)]
pub struct JobAttempt {
    rt: std::sync::Arc<Shared>,
    inner: Option<crate::JobAttempt>,
}

impl JobAttempt {
    fn get(&self) -> &crate::JobAttempt {
        self.inner
            .as_ref()
            .expect("invariant: inner is Some until succeed or fail consumes self")
    }

    /// See [`crate::JobAttempt::fencing_token`].
    pub fn fencing_token(&self) -> u64 {
        self.get().fencing_token()
    }

    /// Why the job's lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.get().permit().lost_reason()
    }

    /// See [`crate::JobAttempt::succeed`].
    pub fn succeed(mut self) -> Result<(), Error> {
        match self.inner.take() {
            Some(a) => self.rt.block_on(a.succeed()),
            None => Ok(()),
        }
    }

    /// See [`crate::JobAttempt::fail`].
    pub fn fail(mut self, reason: &str) -> Result<(), Error> {
        match self.inner.take() {
            Some(a) => self.rt.block_on(a.fail(reason)),
            None => Ok(()),
        }
    }
}

/// A blocking semaphore handle. See [`crate::Semaphore`].
#[derive(Debug)]
pub struct Semaphore {
    rt: std::sync::Arc<Shared>,
    inner: crate::Semaphore,
}

impl Semaphore {
    fn wrap(&self, p: crate::Permit) -> Permit {
        Permit {
            rt: self.rt.clone(),
            inner: Some(p),
        }
    }

    /// See [`crate::Semaphore::acquire`].
    pub fn acquire(&self) -> Result<Permit, Error> {
        self.rt.block_on(self.inner.acquire()).map(|p| self.wrap(p))
    }

    /// See [`crate::Semaphore::acquire_many`].
    pub fn acquire_many(&self, weight: u32) -> Result<Permit, Error> {
        self.rt
            .block_on(self.inner.acquire_many(weight))
            .map(|p| self.wrap(p))
    }

    /// See [`crate::Semaphore::acquire_timeout`].
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Permit, Error> {
        self.rt
            .block_on(self.inner.acquire_timeout(timeout))
            .map(|p| self.wrap(p))
    }

    /// See [`crate::Semaphore::try_acquire`].
    pub fn try_acquire(&self) -> Result<Option<Permit>, Error> {
        Ok(self
            .rt
            .block_on(self.inner.try_acquire())?
            .map(|p| self.wrap(p)))
    }
}

/// A blocking permit, released on drop. See [`crate::Permit`].
#[must_use = "the permit is released as soon as it is dropped"]
#[derive(Debug)]
pub struct Permit {
    rt: std::sync::Arc<Shared>,
    inner: Option<crate::Permit>,
}

impl Permit {
    fn get(&self) -> &crate::Permit {
        self.inner
            .as_ref()
            .expect("invariant: inner is Some until release consumes self")
    }

    /// See [`crate::Permit::lease_id`].
    pub fn lease_id(&self) -> u64 {
        self.get().lease_id()
    }

    /// See [`crate::Permit::fencing_token`].
    pub fn fencing_token(&self) -> u64 {
        self.get().fencing_token()
    }

    /// Why the lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.get().lost_reason()
    }

    /// Blocks until the lease is lost.
    pub fn wait_lost(&self) -> LostReason {
        self.rt.block_on(self.get().lost())
    }

    /// Releases the permit and waits for the backend to confirm.
    pub fn release(mut self) -> Result<(), Error> {
        match self.inner.take() {
            Some(p) => self.rt.block_on(p.release()),
            None => Ok(()),
        }
    }

    /// Releases the permit without waiting for the backend's answer. See
    /// [`crate::Permit::send_release`].
    pub fn send_release(mut self) -> Result<(), Error> {
        match self.inner.take() {
            Some(p) => self.rt.block_on(p.send_release()),
            None => Ok(()),
        }
    }
}
