//! The one interface every backend implements. [`crate::Client`] picks a backend by URL scheme
//! and puts the user-facing API (semaphores, permits, blocking facade) on top of it, so that a
//! rule such as "a dropped permit is released" is written once for all backends.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use turnstile_proto::StatusDoc;

use crate::{Error, LostReason};

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
    pub lost: watch::Receiver<Option<LostReason>>,
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

    /// Closes a semaphore.
    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// The status document: one semaphore, or all of them.
    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>>;

    /// Ends another session at once (a supervisor whose worker died), freeing its leases.
    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>>;

    /// Ends this client's session cleanly, releasing every lease it holds.
    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>>;

    /// This client's session id.
    fn session_id(&self) -> u64;
}
