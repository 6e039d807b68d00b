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
    /// Grants since the server started. `None` (`null` in JSON) on a backend that keeps
    /// no counters (file, etcd).
    #[serde(default)]
    pub acquired_total: Option<u64>,
    /// Leases released by their holders. `None` (`null` in JSON) on a backend that keeps
    /// no counters (file, etcd).
    #[serde(default)]
    pub released_total: Option<u64>,
    /// Leases released because their session expired or was ended. `None` (`null` in JSON) on a backend that keeps
    /// no counters (file, etcd).
    #[serde(default)]
    pub expired_total: Option<u64>,
    /// Queued acquires that timed out. `None` (`null` in JSON) on a backend that keeps
    /// no counters (file, etcd).
    #[serde(default)]
    pub timed_out_total: Option<u64>,
    /// Leases taken away by a close. `None` (`null` in JSON) on a backend that keeps
    /// no counters (file, etcd).
    #[serde(default)]
    pub lost_total: Option<u64>,
    /// How long grants waited in the queue.
    #[serde(default)]
    pub wait: WaitSummary,
}

/// One held lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HolderStatus {
    /// The lease id (unique within its session). A decimal string in JSON (see [`id_string`]).
    #[serde(with = "id_string")]
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
    /// The lease id it will be granted as. A decimal string in JSON (see [`id_string`]).
    #[serde(with = "id_string")]
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
    /// Estimated median wait, milliseconds: interpolated within its histogram bucket, whose
    /// range is narrowed to the shortest and longest wait seen (exact when every wait fell in
    /// one bucket and were equal; never outside the bucket).
    pub p50_ms: f64,
    /// Estimated 99th percentile wait, milliseconds (the same way).
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

/// Serde for u64 ids as decimal strings: JSON numbers are doubles to most readers (JavaScript,
/// `jq`), which round integers above 2^53, and lease ids are random 64-bit numbers. Reads a
/// string or a number (documents of servers before this change).
pub mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `id` as a decimal string.
    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    /// Reads a decimal string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(n),
            Either::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }

    /// The same for an optional id (`null` or absent stays `None`).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `id` as a decimal string, or `null`.
        pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }

        /// Reads a decimal string, a number or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] u64);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease id above 2^53 survives the document exactly, as a string, and a document with
    /// the id as a number (older servers) still reads.
    #[test]
    fn lease_ids_are_exact_strings() {
        let id = 13_999_718_374_037_258_241_u64;
        let doc = StatusDoc {
            semaphores: vec![SemaphoreStatus {
                name: "db".into(),
                holders: vec![HolderStatus {
                    lease_id: id,
                    ..HolderStatus::default()
                }],
                ..SemaphoreStatus::default()
            }],
            ..StatusDoc::default()
        };
        let json = String::from_utf8(doc.to_json()).expect("utf-8");
        assert!(
            json.contains("\"lease_id\":\"13999718374037258241\""),
            "{json}"
        );
        assert!(json.contains("\"acquired_total\":null"), "{json}");
        assert_eq!(StatusDoc::from_json(json.as_bytes()).expect("parse"), doc);
        let old = json.replace("\"13999718374037258241\"", "13999718374037258241");
        assert_eq!(StatusDoc::from_json(old.as_bytes()).expect("parse"), doc);
    }
}
