//! Reaching the backend from the commands that wait (`run`, `once`, `wait`): the first
//! connection, retried for `--connect-timeout` so that a coordinator restart stays invisible,
//! and one deadline (`--timeout`) over every step before and during the wait.
//!
//! The rule, in the exit-code table ([`crate::EXIT_CODES`]): a command that waits retries the
//! first connection (a restarting coordinator refuses connections for a moment); a command
//! that does not wait (`status`, `close`) tries once and exits 69 at once, since whoever runs
//! it is there to read the answer and can run it again.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use turnstile_client::{Client, Error, Options};

use crate::parse_duration;

/// How long the coordinator's "timed out" answer may take after a deadline (the library's own
/// allowance is the same); also the least time the first connection gets with `--timeout 0`.
const GRACE: Duration = Duration::from_millis(400);

/// `--connect-timeout`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArg {
    /// How long to keep trying the first connection to the coordinator (refused, no answer)
    /// before giving up with exit 69, so that a coordinator that is restarting is not taken
    /// for a missing one. Never longer than --timeout. The default is the coordinator's
    /// default session TTL.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// The session TTL of this client (e.g. 2s, 30s): how long its leases outlive it if it
    /// dies without releasing them. Default: the coordinator's (`serve --session-ttl`), 10s
    /// on the file and etcd backends.
    #[arg(long, value_name = "DUR", value_parser = parse_ttl)]
    pub session_ttl: Option<Duration>,
}

/// Parses `--session-ttl`: a positive duration.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("a session TTL must be positive (e.g. 2s, 30s)".into()),
        d => Ok(d),
    }
}

impl ConnectArg {
    /// `options` with this command's session TTL.
    pub fn options(&self, options: Options) -> Options {
        Options {
            session_ttl: self.session_ttl.or(options.session_ttl),
            ..options
        }
    }
}

/// The deadline of `--timeout`, from now.
pub fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// What is left of `deadline`.
pub fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Connects for a command that waits, with `options`: retries the first connection for
/// `retry_for`, and no longer than `deadline` allows.
pub async fn connect(
    url: &str,
    options: Options,
    retry_for: Duration,
    deadline: Option<Instant>,
) -> Result<Client, Error> {
    let retry_for = match deadline {
        Some(d) => retry_for.min(left(d).max(GRACE)),
        None => retry_for,
    };
    let options = Options {
        connect_timeout: Some(retry_for),
        ..options
    };
    Client::connect_with(url, options).await
}

/// Runs a step that comes before the wait (creating the semaphore) within `deadline`: past
/// it, the coordinator did not answer in time, which is [`Error::Unavailable`].
pub async fn by<T>(
    deadline: Option<Instant>,
    client: &Client,
    url: &str,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let Some(d) = deadline else {
        return step.await;
    };
    match tokio::time::timeout_at(d + GRACE, step).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable {
            addr: url.trim_start_matches("tcp://").to_owned(),
            silent_for: client.unreachable_for().unwrap_or_default(),
        }),
    }
}
