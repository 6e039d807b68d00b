//! The semantics of turnstile, with no I/O and no clock.
//!
//! A [`Coordinator`] holds named counting semaphores whose permits are *leases* held by client
//! *sessions*. Sessions live by a TTL that keep-alives renew; a session that misses it expires
//! and its leases are released. Waiters are served first come, first served, with weighted
//! acquires; every grant carries a fencing [`Token`] that strictly increases per semaphore.
//!
//! The core is a pure state machine in the style of raft-rs: the caller passes the current
//! [`Time`] into every call and gets back, as a list of [`Effect`]s, what must happen next
//! (records to make durable, replies to send, events to push). It never blocks, never reads a
//! clock and never touches a file or socket, so the server, the tests and a simulation can all
//! drive it the same way.
//!
//! ```
//! use std::time::Duration;
//! use turnstile_core::{Coordinator, Effect, LeaseId, Reply, Request, SessionId, Tag, Time, Token};
//!
//! let mut c = Coordinator::new();
//! let mut out = Vec::new();
//! let now = Time::from_millis(0);
//! let s = SessionId(7);
//! c.handle(now, Tag(1), Request::OpenSession { session: s, ttl: Duration::from_secs(10), client: "doc" }, &mut out);
//! c.handle(now, Tag(2), Request::Ensure { name: "db", capacity: 3 }, &mut out);
//! out.clear();
//! let acquire = Request::Acquire {
//!     session: s, lease: LeaseId(1), name: "db", weight: 1, timeout: None,
//! };
//! c.handle(now, Tag(3), acquire, &mut out);
//! assert!(out.contains(&Effect::Reply { tag: Tag(3), outcome: Ok(Reply::Granted { token: Token(1) }) }));
//! ```
#![deny(missing_docs)]

mod coordinator;
mod dense_map;
mod effect;
mod error;
mod ids;
mod job;
mod stats;
mod time;
mod view;

pub use coordinator::{job_of_lock, Coordinator, Request, MAX_NAME_LEN};
pub use effect::{Effect, EndReason, Event, LostReason, Record, Reply};
pub use error::Error;
pub use ids::{LeaseId, SessionId, Tag, Token};
pub use job::{Completion, GroupSummary, JobOutcome, JobView, RunningView};
pub use stats::{WaitStats, WAIT_BUCKET_BOUNDS_US};
pub use time::Time;
pub use view::{Counters, HolderView, SemaphoreView, WaiterView};

#[cfg(test)]
mod tests;
