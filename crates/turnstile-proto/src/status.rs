//! The status document: the JSON body of a `Status` reply, printed as is by
//! `turnstile status --json` and served by the HTTP status API.

use serde::{Deserialize, Serialize};

/// Every semaphore asked for, and the run-once jobs and their groups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// The semaphores, sorted by name.
    pub semaphores: Vec<SemaphoreStatus>,
    /// The job groups, sorted by name (absent when one semaphore was asked for).
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    /// The jobs, sorted by group (ungrouped first) and name (absent when one semaphore was
    /// asked for).
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
    /// Where the next page starts (pass it as `after`), when the semaphores asked for did not
    /// all fit in this one; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One job group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Its name.
    pub name: String,
    /// Jobs known in the group.
    pub jobs: u32,
    /// Jobs completed.
    pub completed: u32,
    /// Jobs running now.
    pub running: u32,
    /// Failed attempts of its jobs (since their last reset).
    pub failures: u64,
}

/// One run-once job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Its name.
    pub name: String,
    /// Its group.
    #[serde(default)]
    pub group: Option<String>,
    /// Its completion, if it completed.
    #[serde(default)]
    pub completed: Option<CompletionStatus>,
    /// The attempt running it, if any.
    #[serde(default)]
    pub running: Option<RunningStatus>,
    /// Attempts waiting to take over.
    #[serde(default)]
    pub waiting: u64,
    /// Failed attempts since the last reset.
    #[serde(default)]
    pub failures: u32,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// A job's completion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionStatus {
    /// Who ran it ("host:pid").
    pub client: String,
    /// The fencing token of the attempt that completed it.
    pub token: u64,
    /// When that attempt started, milliseconds since the Unix epoch (its runner's clock).
    pub started_unix_ms: u64,
    /// How long it ran, milliseconds.
    pub duration_ms: u64,
}

/// The attempt running a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningStatus {
    /// Who runs it ("host:pid").
    pub client: String,
    /// Its session, as 16 hex digits.
    pub session: String,
    /// Its fencing token.
    pub token: u64,
    /// Milliseconds since it started.
    pub age_ms: u64,
}

/// One semaphore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SemaphoreStatus {
    /// Its name.
    pub name: String,
    /// Its capacity.
    pub capacity: u32,
    /// Permits held.
    pub in_use: u32,
    /// Acquires waiting.
    pub queued: u64,
    /// Permits the waiting acquires ask for, together.
    #[serde(default)]
    pub queued_weight: u64,
    /// Whether it was closed.
    #[serde(default)]
    pub closed: bool,
    /// Holders, oldest grant first.
    pub holders: Vec<HolderStatus>,
    /// Queued acquires, in queue order: the first is granted next. (Absent in documents of
    /// servers before this field; read as empty.)
    #[serde(default)]
    pub waiters: Vec<WaiterStatus>,
    /// Grants since the server started.
    #[serde(default)]
    pub acquired_total: u64,
    /// Leases released by their holders.
    #[serde(default)]
    pub released_total: u64,
    /// Leases released because their session expired or was ended.
    #[serde(default)]
    pub expired_total: u64,
    /// Queued acquires that timed out.
    #[serde(default)]
    pub timed_out_total: u64,
    /// Leases taken away by a close.
    #[serde(default)]
    pub lost_total: u64,
    /// How long grants waited in the queue.
    #[serde(default)]
    pub wait: WaitSummary,
}

/// One held lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HolderStatus {
    /// The lease id (unique within its session).
    pub lease_id: u64,
    /// The session, as 16 hex digits (a string, since JSON numbers lose precision past 2^53).
    pub session: String,
    /// The session's client description ("host:pid"), if known.
    #[serde(default)]
    pub client: String,
    /// Permits held.
    pub weight: u32,
    /// Fencing token.
    pub token: u64,
    /// Milliseconds since the grant.
    pub age_ms: u64,
}

/// One queued acquire.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WaiterStatus {
    /// The lease id it will be granted as.
    pub lease_id: u64,
    /// The session, as 16 hex digits.
    pub session: String,
    /// The session's client description ("host:pid"), if known.
    #[serde(default)]
    pub client: String,
    /// Permits it asks for.
    pub weight: u32,
    /// Milliseconds it has waited.
    pub age_ms: u64,
}

/// Wait-time statistics of a semaphore's grants.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitSummary {
    /// Grants observed.
    pub count: u64,
    /// Mean wait, milliseconds.
    pub mean_ms: f64,
    /// Upper bound of the median wait, milliseconds (from histogram buckets).
    pub p50_ms: f64,
    /// Upper bound of the 99th percentile wait, milliseconds.
    pub p99_ms: f64,
    /// Longest wait, milliseconds.
    pub max_ms: f64,
}

impl StatusDoc {
    /// The document as the JSON bytes of a `Status` reply.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs (strings, numbers, vectors) cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"semaphores\":[]}".to_vec())
    }

    /// Parses the JSON bytes of a `Status` reply.
    pub fn from_json(json: &[u8]) -> Result<StatusDoc, serde_json::Error> {
        serde_json::from_slice(json)
    }
}
