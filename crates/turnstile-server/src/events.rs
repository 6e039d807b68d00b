//! The feed of notable events: lost leases, sessions that expired or were ended, closed
//! semaphores, finished jobs. The server keeps the last [`CAPACITY`] in a ring under the state
//! lock, with wall-clock times, for the dashboard and `GET /v1/events`; and each is logged
//! once, where it is recorded.
//!
//! Events are observed where the server routes a step's effects (`State::route`), that is
//! when the core decides them, in the order it decides them. They are *logged* later, by
//! whoever ran the step, once it has let go of the state lock ([`EventLog::take_unlogged`],
//! [`log`]): a mass expiry makes one log line per lost lease, and writing them must not hold
//! up every other client. Clean session closes and plain
//! releases are not events: they are the normal life of a lease, and would push the rare
//! things out of a short feed.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use turnstile_core::{job_of_lock, EndReason, Event, LeaseId, LostReason, SessionId, Token};

/// Logs recorded events, one line each (call it without holding the state lock).
pub(crate) fn log(entries: Vec<Entry>) {
    for e in entries {
        let session = e.session.map(|s| s.to_string()).unwrap_or_default();
        let session = session.as_str();
        // As a string, like every id in a JSON document (PROTOCOL.md): a JSON log reader
        // would round a number past 2^53.
        let lease = e.lease.map(|l| l.to_string()).unwrap_or_default();
        let client = e.client.as_deref().unwrap_or_default();
        let reason = e.reason.as_deref().unwrap_or_default();
        match e.kind {
            "lease_lost" => match (&e.job, &e.semaphore) {
                (Some(job), _) => tracing::info!(
                    job = &**job,
                    lease = %lease,
                    session,
                    client,
                    token = e.token,
                    reason,
                    "job lease lost"
                ),
                (None, semaphore) => tracing::info!(
                    semaphore = semaphore.as_deref().unwrap_or_default(),
                    lease = %lease,
                    session,
                    client,
                    token = e.token,
                    reason,
                    "lease lost"
                ),
            },
            "session_expired" => tracing::info!(session, client, "session expired"),
            // By EndSession: a supervisor ending a dead worker's session, or a client (a
            // nanny) ending its own.
            "session_ended" => tracing::info!(session, client, "session ended"),
            "semaphore_closed" => tracing::info!(
                semaphore = e.semaphore.as_deref().unwrap_or_default(),
                "semaphore closed"
            ),
            "semaphore_deleted" => tracing::info!(
                semaphore = e.semaphore.as_deref().unwrap_or_default(),
                "semaphore deleted"
            ),
            "capacity_changed" => tracing::info!(
                semaphore = e.semaphore.as_deref().unwrap_or_default(),
                capacity = reason,
                "semaphore capacity changed"
            ),
            "job_completed" => {
                tracing::info!(job = e.job.as_deref().unwrap_or_default(), "job completed")
            }
            "job_failed" => tracing::info!(
                job = e.job.as_deref().unwrap_or_default(),
                reason,
                "job attempt failed"
            ),
            other => tracing::info!(kind = other, "event"),
        }
    }
}

/// How many events the feed keeps.
pub(crate) const CAPACITY: usize = 200;

/// One event, as `GET /v1/events` serves it. Fields that do not apply are left out. Names
/// are shared with the core and the session is kept as a number until it is shown: a mass
/// expiry records one event per lease under the state lock, so recording one must not
/// allocate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Entry {
    /// Its number: events are numbered from 1 in the order they happened.
    pub(crate) seq: u64,
    /// When the server saw it, milliseconds since the Unix epoch.
    pub(crate) unix_ms: u64,
    /// What happened: `lease_lost`, `session_expired`, `session_ended`, `semaphore_closed`,
    /// `semaphore_deleted`, `capacity_changed` (the new capacity as its reason),
    /// `job_completed` or `job_failed`.
    pub(crate) kind: &'static str,
    /// The semaphore concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) semaphore: Option<Arc<str>>,
    /// The job concerned (for a lost job lease, instead of a semaphore).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) job: Option<Arc<str>>,
    /// The lease concerned, served as a decimal string (lease ids are random 64-bit numbers,
    /// which JSON readers would round as numbers).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lease_text")]
    pub(crate) lease: Option<u64>,
    /// The session concerned, served as 16 hex digits.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "session_hex"
    )]
    pub(crate) session: Option<SessionId>,
    /// That session's client description ("host:pid"), when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client: Option<Arc<str>>,
    /// The fencing token of the lease concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<u64>,
    /// Why, in a word (`expired`, `closed`, `session-ended`, `revoked`) or, for a failed job, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<Cow<'static, str>>,
}

/// Serializes a session as 16 hex digits, as the status document does.
fn session_hex<S: Serializer>(session: &Option<SessionId>, s: S) -> Result<S::Ok, S::Error> {
    match session {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

/// Serializes a lease id as a decimal string, as the status document does.
fn lease_text<S: Serializer>(lease: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match lease {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

/// The last [`CAPACITY`] events.
pub(crate) struct EventLog {
    entries: VecDeque<Entry>,
    /// The number of the last event recorded (0: none yet).
    last: u64,
    /// Events recorded but not logged yet.
    unlogged: Vec<Entry>,
}

/// The body of `GET /v1/events`.
#[derive(Serialize)]
pub(crate) struct Page {
    /// The number of the newest event; pass it as `after` to get only newer ones next time.
    pub(crate) last: u64,
    /// Events numbered above `after`, oldest first (at most the ring's worth: a client that
    /// polls too rarely sees a gap in `seq`).
    pub(crate) events: Vec<Entry>,
}

/// A client description for an entry: `None` when the session gave none.
fn named(client: &Arc<str>) -> Option<Arc<str>> {
    (!client.is_empty()).then(|| client.clone())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl EventLog {
    pub(crate) fn new() -> EventLog {
        EventLog {
            entries: VecDeque::with_capacity(CAPACITY),
            last: 0,
            unlogged: Vec::new(),
        }
    }

    /// The events recorded since the last call, to [`log`] once the state lock is released;
    /// the newest of them join the ring. (Only the last [`CAPACITY`] of a burst are copied: a
    /// mass expiry records one event per lease, and the ring keeps no more anyway.)
    pub(crate) fn take_unlogged(&mut self) -> Vec<Entry> {
        let fresh = std::mem::take(&mut self.unlogged);
        for e in &fresh[fresh.len().saturating_sub(CAPACITY)..] {
            if self.entries.len() == CAPACITY {
                self.entries.pop_front();
            }
            self.entries.push_back(e.clone());
        }
        fresh
    }

    fn push(&mut self, kind: &'static str, fill: impl FnOnce(&mut Entry)) {
        self.last += 1;
        let mut entry = Entry {
            seq: self.last,
            unix_ms: unix_ms(),
            kind,
            semaphore: None,
            job: None,
            lease: None,
            session: None,
            client: None,
            token: None,
            reason: None,
        };
        fill(&mut entry);
        self.unlogged.push(entry);
    }

    /// Records (and logs) a core event, if it is notable: every lost lease, every session
    /// that expired or was ended by someone else.
    pub(crate) fn core_event(&mut self, event: &Event) {
        match event {
            Event::LeaseLost {
                session,
                lease,
                semaphore,
                token,
                client,
                reason,
            } => self.lease_lost(*session, *lease, semaphore, *token, client, *reason),
            Event::SessionEnded {
                session,
                client,
                reason,
            } => {
                let kind = match reason {
                    EndReason::Closed => {
                        tracing::debug!(session = %session, "session closed");
                        return;
                    }
                    EndReason::Expired => "session_expired",
                    EndReason::EndedByOther => "session_ended",
                };
                self.push(kind, |e| {
                    e.session = Some(*session);
                    e.client = named(client);
                });
            }
        }
    }

    fn lease_lost(
        &mut self,
        session: SessionId,
        lease: LeaseId,
        semaphore: &Arc<str>,
        token: Token,
        client: &Arc<str>,
        reason: LostReason,
    ) {
        let job = job_of_lock(semaphore);
        self.push("lease_lost", |e| {
            match job {
                Some(job) => e.job = Some(Arc::from(job)),
                None => e.semaphore = Some(semaphore.clone()),
            }
            e.lease = Some(lease.0);
            e.session = Some(session);
            e.client = named(client);
            e.token = Some(token.0);
            e.reason = Some(Cow::Borrowed(reason.as_str()));
        });
    }

    /// Records (and logs) that a semaphore was closed.
    pub(crate) fn semaphore_closed(&mut self, semaphore: &str) {
        self.push("semaphore_closed", |e| {
            e.semaphore = Some(Arc::from(semaphore))
        });
    }

    /// Records (and logs) that an operator deleted a semaphore.
    pub(crate) fn semaphore_deleted(&mut self, semaphore: &str) {
        self.push("semaphore_deleted", |e| {
            e.semaphore = Some(Arc::from(semaphore))
        });
    }

    /// Records (and logs) that an operator changed a semaphore's capacity.
    pub(crate) fn capacity_changed(&mut self, semaphore: &str, capacity: u32) {
        self.push("capacity_changed", |e| {
            e.semaphore = Some(Arc::from(semaphore));
            e.reason = Some(Cow::Owned(capacity.to_string()));
        });
    }

    /// Records (and logs) that an attempt at a job ended: completed, or failed with a reason.
    pub(crate) fn job_finished(&mut self, job: &str, failure: Option<&str>) {
        let kind = if failure.is_some() {
            "job_failed"
        } else {
            "job_completed"
        };
        self.push(kind, |e| {
            e.job = Some(Arc::from(job));
            e.reason = failure.map(|f| Cow::Owned(f.to_owned()));
        });
    }

    /// The events numbered above `after`, oldest first.
    pub(crate) fn since(&self, after: u64) -> Page {
        Page {
            last: self.last,
            events: self
                .entries
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn lost(lease: u64, semaphore: &str) -> Event {
        Event::LeaseLost {
            session: SessionId(0xab),
            lease: LeaseId(lease),
            semaphore: Arc::from(semaphore),
            token: Token(9),
            client: Arc::from("node7:41"),
            reason: LostReason::Expired,
        }
    }

    #[test]
    fn keeps_the_last_events_in_order() {
        let mut log = EventLog::new();
        for i in 0..(CAPACITY as u64 + 5) {
            log.core_event(&lost(i, "db"));
        }
        assert!(
            log.since(0).events.is_empty(),
            "the ring fills as the step ends"
        );
        // Every event of the step is handed out to be logged; the ring keeps the newest.
        assert_eq!(log.take_unlogged().len(), CAPACITY + 5);
        assert!(log.take_unlogged().is_empty());
        let page = log.since(0);
        assert_eq!(page.last, CAPACITY as u64 + 5);
        assert_eq!(page.events.len(), CAPACITY);
        assert_eq!(page.events[0].seq, 6);
        assert_eq!(page.events[0].lease, Some(5));
        assert_eq!(log.since(page.last - 2).events.len(), 2);
        assert!(log.since(page.last).events.is_empty());
    }

    #[test]
    fn names_jobs_and_skips_clean_closes() {
        let mut log = EventLog::new();
        log.core_event(&lost(1, "\u{1}job:import-7"));
        log.core_event(&Event::SessionEnded {
            session: SessionId(1),
            client: Arc::from(""),
            reason: EndReason::Closed,
        });
        log.core_event(&Event::SessionEnded {
            session: SessionId(1),
            client: Arc::from(""),
            reason: EndReason::Expired,
        });
        log.semaphore_closed("db");
        log.job_finished("import-8", None);
        log.job_finished("import-9", Some("exited with status 3"));
        assert_eq!(log.take_unlogged().len(), 5);
        let page = log.since(0);
        let kinds: Vec<&str> = page.events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "lease_lost",
                "session_expired",
                "semaphore_closed",
                "job_completed",
                "job_failed"
            ]
        );
        assert_eq!(page.events[0].job.as_deref(), Some("import-7"));
        assert_eq!(page.events[0].semaphore, None);
        assert_eq!(page.events[0].session, Some(SessionId(0xab)));
        let json = serde_json::to_string(&page.events[0]).expect("serializes");
        assert!(json.contains(r#""session":"00000000000000ab""#), "{json}");
        assert_eq!(page.events[0].client.as_deref(), Some("node7:41"));
        assert_eq!(page.events[1].client, None, "no client given, none shown");
        assert_eq!(
            page.events[4].reason.as_deref(),
            Some("exited with status 3")
        );
        let json = serde_json::to_string(&page.events[2]).expect("serializes");
        assert!(
            json.contains("\"semaphore\":\"db\"") && !json.contains("lease"),
            "{json}"
        );
    }
}
