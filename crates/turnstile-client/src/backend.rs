//! The one interface every backend implements. [`crate::Client`] picks a backend by URL scheme
//! and puts the user-facing API (semaphores, permits, blocking facade) on top of it, so that a
//! rule such as "a dropped permit is released" is written once for all backends.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use turnstile_proto::StatusDoc;

use crate::{Error, GroupSummary, JobCompletion, JobRunner};

/// A boxed future, so that the trait can be used as `dyn Backend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A granted lease as a backend hands it to the client layer.
#[derive(Debug)]
pub struct Grant {
    /// The lease id, unique within the backend's session.
    pub lease: u64,
    /// The fencing token.
    pub token: u64,
    /// Becomes `Some(reason)` when the lease is lost.
    pub lost: crate::lost::LostReceiver,
}

/// How an attempt at a run-once job began, as a backend hands it to the client layer.
#[derive(Debug)]
pub enum JobBegin {
    /// Run the job: this is its exclusive lease.
    Run(Grant),
    /// The job has completed (before, or while the attempt waited): do not run it.
    Completed(JobCompletion),
    /// Another attempt runs the job (only when the attempt would not wait).
    Running(JobRunner),
}

/// How an attempt at a job ended, as the client layer reports it to a backend.
#[derive(Clone, Copy, Debug)]
pub enum JobEnd<'a> {
    /// It succeeded: record the completion.
    Succeeded {
        /// When it started (wall clock, shown to people).
        started: std::time::SystemTime,
        /// How long it ran.
        duration: Duration,
    },
    /// It failed: record a failed attempt, so that a later attempt retries.
    Failed {
        /// Why, in words.
        reason: &'a str,
    },
}

/// What a backend must do. Every method must be cancel-safe in this sense: if the future is
/// dropped, the backend is left consistent, and a dropped `acquire` holds no permits once
/// its withdrawal (which the backend starts by itself) has been processed.
pub trait Backend: Send + Sync + 'static {
    /// Creates the semaphore or checks its capacity.
    fn ensure<'a>(&'a self, name: &'a str, capacity: u32) -> BoxFuture<'a, Result<(), Error>>;

    /// Acquires `weight` permits, waiting at most `timeout` (`None`: until granted; zero: only
    /// free permits). Fails with [`Error::TimedOut`] when the time runs out.
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Grant, Error>>;

    /// Releases a lease and waits for the backend to confirm.
    fn release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>>;

    /// Starts releasing a lease without waiting: what a dropped permit does.
    fn release_in_background(&self, lease: u64);

    /// Releases a lease without waiting for the backend's answer: returns once the release
    /// is on its way (see [`crate::Permit::send_release`]). By default, the same as
    /// [`Backend::release`]: a backend whose release is not a request with an answer in
    /// flight (the shared directory) has nothing to save.
    fn send_release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        self.release(lease)
    }

    /// Closes a semaphore.
    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Changes a semaphore's capacity (see [`crate::Client::set_capacity`]).
    fn set_capacity<'a>(&'a self, name: &'a str, capacity: u32)
        -> BoxFuture<'a, Result<(), Error>>;

    /// Deletes a closed or idle semaphore (see [`crate::Client::delete`]).
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Takes a held lease away from its holder (see [`crate::Client::revoke`]).
    fn revoke<'a>(&'a self, name: &'a str, lease: u64) -> BoxFuture<'a, Result<(), Error>>;

    /// The status document: one semaphore, or all of them.
    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>>;

    /// The status document of the semaphores, groups and jobs whose names start with
    /// `prefix`. By default, the whole status, filtered here; a backend that can filter at
    /// the source does so.
    fn status_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(async move {
            let mut doc = self.status(None).await?;
            doc.semaphores.retain(|s| s.name.starts_with(prefix));
            doc.groups.retain(|g| g.name.starts_with(prefix));
            doc.jobs.retain(|j| j.name.starts_with(prefix));
            Ok(doc)
        })
    }

    /// Ends another session at once (a supervisor whose worker died), freeing its leases.
    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>>;

    /// Ends this client's session cleanly, releasing every lease it holds.
    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>>;

    /// This client's session id.
    fn session_id(&self) -> u64;

    /// How long the backend has not answered, while it cannot be reached; `None` while it
    /// answers, and for backends that cannot tell.
    fn unreachable_for(&self) -> Option<Duration> {
        None
    }

    /// Starts an attempt at run-once job `job`: [`JobBegin::Completed`] if it has completed,
    /// else the job's exclusive lease ([`JobBegin::Run`]). If another attempt holds the lease,
    /// `timeout` zero answers [`JobBegin::Running`]; otherwise the attempt waits (at most
    /// `timeout`, failing with [`Error::TimedOut`]; `None`: as long as it takes) until the
    /// running attempt ends, and then either learns of its completion or takes over.
    /// `group` puts the job in a group (`None` keeps its group). Cancel-safe like `acquire`.
    fn begin_job<'a>(
        &'a self,
        job: &'a str,
        group: Option<&'a str>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<JobBegin, Error>>;

    /// Ends the attempt that holds lease `lease` of job `job`: records its completion or a
    /// failed attempt, and releases the lease. Fails if the lease is no longer held (lost),
    /// in which case nothing is recorded.
    fn finish_job<'a>(
        &'a self,
        job: &'a str,
        lease: u64,
        end: JobEnd<'a>,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Forgets a job's completion and failed attempts. Returns whether it had completed.
    fn reset_job<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<bool, Error>>;

    /// Waits until no job of `group` runs and at least `jobs` of them have completed (at most
    /// `timeout`, failing with [`Error::TimedOut`]; zero only looks).
    fn wait_group<'a>(
        &'a self,
        group: &'a str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<GroupSummary, Error>>;
}
