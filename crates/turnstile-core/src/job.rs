//! The data of run-once jobs and job groups: what a request carries in, what a reply, a record
//! and a view carry out. The rules live in the coordinator (`coordinator/jobs.rs`).

use std::sync::Arc;
use std::time::Duration;

use crate::{SessionId, Token};

/// How an attempt at a job ended, as its runner reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome<'a> {
    /// The job succeeded: its completion is recorded and no later attempt runs it.
    Succeeded {
        /// When the attempt started, in milliseconds since the Unix epoch, by the runner's
        /// clock (the core reads no clock; this is only shown to people).
        started_unix_ms: u64,
        /// How long it ran, by the runner's clock.
        duration: Duration,
    },
    /// The job failed: nothing is recorded but a failed attempt, so a later attempt retries.
    Failed {
        /// Why, in words ("exited with status 3").
        reason: &'a str,
    },
}

/// A job's recorded completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The client that ran it (its session's client description, such as "host:pid").
    pub client: Arc<str>,
    /// The fencing token of the attempt that completed it.
    pub token: Token,
    /// When that attempt started, in milliseconds since the Unix epoch (runner's clock).
    pub started_unix_ms: u64,
    /// How long it ran.
    pub duration: Duration,
}

/// A job group's state at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupSummary {
    /// Jobs known in the group.
    pub jobs: u32,
    /// Jobs completed.
    pub completed: u32,
    /// Jobs running now.
    pub running: u32,
    /// Failed attempts of the group's jobs, together (since their last reset).
    pub failures: u64,
}

/// One job as seen at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    /// Its name.
    pub name: Arc<str>,
    /// Its group, if it has one.
    pub group: Option<Arc<str>>,
    /// Its completion, if it completed.
    pub completion: Option<Completion>,
    /// The attempt running now, if any.
    pub running: Option<RunningView>,
    /// Attempts waiting to take over if the running one fails.
    pub waiting: usize,
    /// Failed attempts since the last reset (a runner that failed, released or died).
    pub failures: u32,
    /// Why the last attempt failed.
    pub last_failure: Option<Arc<str>>,
}

/// The attempt that is running a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningView {
    /// Its session.
    pub session: SessionId,
    /// Its session's client description ("host:pid").
    pub client: Arc<str>,
    /// Its fencing token.
    pub token: Token,
    /// How long it has been running.
    pub age: Duration,
}
