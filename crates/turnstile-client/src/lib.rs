//! Client library for turnstile: named counting semaphores whose permits are leases.
//!
//! ```no_run
//! # async fn example() -> Result<(), turnstile_client::Error> {
//! use turnstile_client::Client;
//!
//! let client = Client::connect("tcp://127.0.0.1:7420").await?;
//! let db = client.semaphore("db", 3).await?;
//! let permit = db.acquire().await?;
//! println!("lease {} with fencing token {}", permit.lease_id(), permit.fencing_token());
//! // ... use the database, passing the token along so that it can fence stale writers ...
//! drop(permit); // released
//! # Ok(()) }
//! ```
//!
//! A background task keeps the client's session alive at a third of its TTL and, when the
//! connection drops, reconnects with backoff, resumes the session and re-sends every request
//! that was not answered. Acquires are retried with the same lease id, which the coordinator
//! treats as the same acquire, so a retry never takes a second permit.
//!
//! Every call has a deadline that holds whatever the network does: a wait with a timeout
//! returns by it (plus at most half a second) with [`Error::TimedOut`] if the coordinator
//! answered, else [`Error::Unavailable`]; a wait without one keeps trying (and logs a calm
//! "still trying" line at a growing interval); a call that does not wait gives up after one
//! session TTL; a release or a job's completion gives up once the lease has surely expired on
//! the coordinator. [`Error::is_unavailable`] tells "cannot be reached" from every other
//! failure. [`Options::connect_timeout`] retries the first connection.
//!
//! If the session is lost (it expired while the client was cut off, or the semaphore was
//! closed), each affected [`Permit`] learns of it through [`Permit::lost`]. A client that has
//! not heard from the coordinator for a whole TTL treats its leases as lost without waiting to
//! be told, since the coordinator will have given them away. [`Permit::lost_signal`] gives the
//! same news as a cloneable [`LostSignal`] for other tasks and threads, without polling.
//!
//! One client may be shared by many tasks and threads: their requests go out on its one
//! connection, several to a write when they come together, and each reply finds its caller by
//! request id.
//!
//! The URL picks the backend: `tcp://HOST:PORT` is the coordinator (`tls://HOST:PORT` over TLS,
//! trusting the CA in [`Options::ca`] or `TURNSTILE_CA`, else the system's roots); `file:///path/to/dir` needs
//! no server: the semaphores live in a directory shared by every process that uses them (on
//! one host, or on many through NFS); `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` keeps them
//! in an etcd cluster, again with no turnstile server. See [`Backend`] for the interface the backends share. [`blocking`] wraps the async API for code without a runtime.
#![deny(missing_docs)]

mod backend;
pub mod blocking;
pub mod driven;
mod etcd;
mod file;
mod job;
pub mod lost;
mod tcp;
mod tls;

/// Raw calls to one etcd member over gRPC, with requests and answers in the JSON shapes of
/// etcd's gRPC JSON gateway: what the etcd backend speaks, for `turnstile bench`'s etcd-lock
/// peer (etcd's own Lock RPC on the same transport) and for tests that read the wire.
pub mod etcd_rpc {
    pub use crate::etcd::grpc::{decode_request, Channel};
}

/// Entry points for the fuzz harness (`fuzz/`), behind the `fuzzing` feature: not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Runs every parser of the shared directory's files on `bytes` and checks what they
    /// accept (see `file/disk.rs`).
    pub fn file_parsers(bytes: &[u8]) {
        crate::file::fuzz_parsers(bytes);
    }

    /// Files as the shared-directory backend writes them (a lease record, a completion, a
    /// capacity file): the seeds of the fuzz corpus.
    pub fn file_samples() -> Vec<Vec<u8>> {
        crate::file::fuzz_samples()
    }

    /// Decodes `bytes` as every etcd message the etcd backend's protobuf codec knows; what
    /// decodes must encode and decode again to the same JSON (panics if not).
    pub fn etcd_messages(bytes: &[u8]) {
        crate::etcd::pb::check_round_trips(bytes);
    }

    /// etcd messages as the codec encodes them: the seeds of the fuzz corpus.
    pub fn etcd_samples() -> Vec<Vec<u8>> {
        crate::etcd::pb::samples()
    }
}

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::lost::LostReceiver;
pub use turnstile_proto::{
    CompletionStatus, ErrorCode, GroupStatus, HolderStatus, JobStatus, RunningStatus,
    SemaphoreStatus, StatusDoc, WaitSummary, WaiterStatus,
};

pub use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
pub use crate::job::{GroupSummary, JobAttempt, JobCompletion, JobRunner, JobStart};

/// The environment variable that names the URL when none is given.
pub const URL_ENV: &str = "TURNSTILE_URL";

/// The environment variable that gives the session id to use (set by a supervisor so that it
/// can end the session of a worker that dies). 16 hex digits.
pub const SESSION_ENV: &str = "TURNSTILE_SESSION";

/// The environment variable that names the file holding the coordinator's token (see
/// [`Options::token`]).
pub const TOKEN_FILE_ENV: &str = "TURNSTILE_TOKEN_FILE";

/// The environment variable that names the PEM file of the CA certificates a `tls://` client
/// trusts (see [`Options::ca`]).
pub const CA_ENV: &str = "TURNSTILE_CA";

/// The address a coordinator (`turnstile serve`) listens on by default. It is *not* what
/// clients use when no URL is given: see [`default_url`].
pub const DEFAULT_URL: &str = "tcp://127.0.0.1:7420";

/// The URL to use when neither a URL nor `TURNSTILE_URL` is given: the file backend in a
/// per-user local directory, `$XDG_RUNTIME_DIR/turnstile`, else `/tmp/turnstile-$UID`, so that
/// processes of one user on one host share semaphores with no set-up. (The `/tmp` directory
/// is created with mode 0700 if it does not exist yet.)
pub fn default_url() -> String {
    use std::os::unix::fs::DirBuilderExt;
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("turnstile"),
        _ => {
            let dir = std::path::PathBuf::from(format!("/tmp/turnstile-{}", nix::unistd::getuid()));
            let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
            dir
        }
    };
    format!("file://{}", dir.display())
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL cannot be used.
    #[error("invalid URL {url:?}: {why}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The file backend's directory, or a file in it, cannot be used (missing permissions,
    /// not a directory, a damaged file). The cause is the error's `source()`.
    #[error("cannot use {path}")]
    Storage {
        /// The directory or file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator could not be reached. The cause is the error's `source()`, not part of
    /// its message, so that printing the chain (`{:#}` with anyhow) shows it once.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator did not answer in time: a wait's deadline passed while it could not be
    /// reached (disconnected, or connected and silent), a call that does not wait got no
    /// answer within the session TTL, or a release or a job's completion could not be
    /// delivered before the lease expired on its own. Unlike [`Error::TimedOut`], this says
    /// nothing about how busy the semaphore is.
    #[error("the coordinator at {addr} cannot be reached (no answer for {:.1}s)", silent_for.as_secs_f64())]
    Unavailable {
        /// The address.
        addr: String,
        /// How long the coordinator had not answered when the call gave up.
        silent_for: Duration,
    },
    /// The acquire's timeout passed before a permit was free, on a coordinator that answers.
    #[error("timed out waiting for a permit")]
    TimedOut,
    /// The session ended (it expired while the client was cut off, or a supervisor ended it)
    /// while this call was in progress.
    #[error("the session was lost")]
    SessionLost,
    /// The lease this call needed was lost first (for a job: its completion was not
    /// recorded).
    #[error("the lease was lost: {0}")]
    LeaseLost(LostReason),
    /// The coordinator refused the request.
    #[error("{message}")]
    Rejected {
        /// The error code.
        code: ErrorCode,
        /// The coordinator's explanation.
        message: String,
    },
    /// TLS with the coordinator failed in a way that a retry cannot change: its certificate
    /// is not trusted, it does not speak TLS (or a `tcp://` client met a TLS port), or the CA
    /// file cannot be used. Never retried.
    #[error("TLS with {addr}: {why}")]
    Tls {
        /// The address.
        addr: String,
        /// What failed, and what to do about it.
        why: String,
    },
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client was shut down.
    #[error("the client is shut down")]
    Shutdown,
}

impl Error {
    /// The coordinator's error code, when the coordinator refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Rejected { code, .. } => Some(*code),
            Error::TimedOut => Some(ErrorCode::TimedOut),
            _ => None,
        }
    }

    /// Whether the backend could not be reached (EX_UNAVAILABLE, exit 69 in the CLI): the
    /// coordinator did not accept or answer ([`Error::Connect`], [`Error::Unavailable`]), or
    /// the file backend's directory gave an error of a lost mount or network (`ESTALE`,
    /// `EIO`, `ENOTCONN`, `ETIMEDOUT`, `EHOSTDOWN`, `EHOSTUNREACH`, `ENETUNREACH`,
    /// `ENETDOWN`). A refusal, a bad URL or a missing permission is not "unavailable": trying
    /// again later would not help.
    pub fn is_unavailable(&self) -> bool {
        use nix::errno::Errno;
        match self {
            Error::Connect { .. } | Error::Unavailable { .. } => true,
            Error::Storage { source, .. } => source.raw_os_error().is_some_and(|e| {
                [
                    Errno::ESTALE,
                    Errno::EIO,
                    Errno::ENOTCONN,
                    Errno::ETIMEDOUT,
                    Errno::EHOSTDOWN,
                    Errno::EHOSTUNREACH,
                    Errno::ENETUNREACH,
                    Errno::ENETDOWN,
                ]
                .contains(&Errno::from_raw(e))
            }),
            _ => false,
        }
    }
}

/// Why a lease was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The session expired: the coordinator did not hear from the client for a TTL.
    Expired,
    /// The semaphore was closed.
    Closed,
    /// A supervisor ended the session.
    SessionEnded,
    /// The client could not reach the coordinator for a whole TTL, so the coordinator has
    /// presumably expired the session and given the permits away.
    Unreachable,
    /// The client resumed its session after a reconnect, and the coordinator does not list
    /// the lease among the session's (it lost the record of the grant — a damaged end of its
    /// log — or the lease ended while the client was away). It may have been given away.
    Forgotten,
    /// An operator released the lease by force ([`Client::revoke`], `turnstile release`).
    Revoked,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "the session expired",
            LostReason::Closed => "the semaphore was closed",
            LostReason::SessionEnded => "the session was ended by a supervisor",
            LostReason::Unreachable => {
                "the coordinator was unreachable for longer than the session TTL"
            }
            LostReason::Forgotten => {
                "the coordinator no longer has the lease (found on resuming the session)"
            }
            LostReason::Revoked => "an operator released it by force",
        })
    }
}

/// Settings for [`Client::connect_with`].
#[derive(Clone, Default)]
pub struct Options {
    /// The session TTL to ask for; `None` takes the server's default.
    pub session_ttl: Option<Duration>,
    /// The session id to use; `None` takes `TURNSTILE_SESSION` if set, else a random one.
    pub session_id: Option<u64>,
    /// A name for logs and status pages; `None` uses "host:pid".
    pub client_name: Option<String>,
    /// How long to keep trying the first connection to a coordinator (refused, reset, no
    /// answer) with backoff before [`Client::connect_with`] fails with [`Error::Connect`], so
    /// that a coordinator that is restarting is not taken for a missing one. `None`: one
    /// attempt, which fails at once if the connection is refused. Either way one attempt
    /// (connect and handshake) never takes longer than what is left of this, nor 5 s.
    pub connect_timeout: Option<Duration>,
    /// Processes of this host whose life also keeps this client's leases alive: a lease is
    /// not taken from a dead client at once while one of them lives (only the file backend
    /// takes leases of dead local processes at once; the coordinator ignores this). `turnstile
    /// run` names the process that kills its command when it dies, so that the lease is not
    /// handed on before the command is gone.
    pub also_alive_pids: Vec<u32>,
    /// The token to present to a coordinator that requires one (`serve --auth-token-file`);
    /// `None` reads the file named by `TURNSTILE_TOKEN_FILE`, if set. Never put a token on a
    /// command line or in a URL, where `ps` and logs show it.
    pub token: Option<String>,
    /// The PEM file of the CA certificates that a `tls://` client trusts; `None` reads the
    /// file named by `TURNSTILE_CA`, if set, else trusts the system's roots.
    pub ca: Option<std::path::PathBuf>,
}

/// A connection to a turnstile backend. Cheap to clone; the session ends when the last clone
/// and the last [`Permit`] are dropped, or at [`Client::shutdown`].
#[derive(Clone)]
pub struct Client {
    backend: Arc<dyn Backend>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field(
                "session",
                &format_args!("{:016x}", self.backend.session_id()),
            )
            .finish()
    }
}

impl Client {
    /// Connects to the backend at `url` with default options.
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Client::connect_with(url, Options::default()).await
    }

    /// Connects to the URL in `TURNSTILE_URL`, or to [`default_url`] (the file backend in a
    /// per-user local directory).
    pub async fn from_env() -> Result<Client, Error> {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| default_url());
        Client::connect(&url).await
    }

    /// Connects to the backend at `url`.
    pub async fn connect_with(url: &str, options: Options) -> Result<Client, Error> {
        let options = options.resolve()?;
        let backend: Arc<dyn Backend> = match parse_url(url)? {
            Target::Tcp(addr) => Arc::new(tcp::TcpBackend::connect(addr, None, options).await?),
            Target::Tls(addr) => {
                let tls = tls::Connector::new(&addr, options.ca.as_deref())?;
                Arc::new(tcp::TcpBackend::connect(addr, Some(tls), options).await?)
            }
            Target::File(dir) => Arc::new(file::FileBackend::open(dir, options).await?),
            Target::Etcd(url) => Arc::new(etcd::EtcdBackend::connect(url, options).await?),
        };
        Ok(Client { backend })
    }

    /// Wraps a backend of your own (tests, simulations).
    pub fn from_backend(backend: Arc<dyn Backend>) -> Client {
        Client { backend }
    }

    /// A handle on the semaphore `name`, created with `capacity` if it does not exist. Fails if
    /// it exists with another capacity, or was closed.
    pub async fn semaphore(&self, name: &str, capacity: u32) -> Result<Semaphore, Error> {
        self.backend.ensure(name, capacity).await?;
        Ok(self.existing_semaphore(name))
    }

    /// A handle on a semaphore that is expected to exist; acquires fail if it does not.
    pub fn existing_semaphore(&self, name: &str) -> Semaphore {
        Semaphore {
            client: self.clone(),
            name: Arc::from(name),
        }
    }

    /// The status of every semaphore, or of one. A coordinator answers a large status in
    /// pages, each below the frame limit; this follows them all.
    pub async fn status(&self, name: Option<&str>) -> Result<StatusDoc, Error> {
        self.backend.status(name).await
    }

    /// The status of the semaphores, job groups and jobs whose names start with `prefix`
    /// (every page of it).
    pub async fn status_prefix(&self, prefix: &str) -> Result<StatusDoc, Error> {
        self.backend.status_prefix(prefix).await
    }

    /// Closes a semaphore: waiters fail, holders lose their leases, later acquires fail.
    /// Closing a name that is not known, or already closed, succeeds and changes nothing, on
    /// every backend (as Dask's `Semaphore.close`, which only reports it).
    pub async fn close(&self, name: &str) -> Result<(), Error> {
        match self.backend.close(name).await {
            Err(e) if e.code() == Some(ErrorCode::NoSuchSemaphore) => Ok(()),
            r => r,
        }
    }

    /// Changes the capacity of an existing semaphore, on every backend. Growing grants the
    /// queued acquires that now fit at once, in queue order; shrinking takes nothing from
    /// holders, and nothing is granted until what they hold plus the next waiter's weight fits
    /// the new capacity. Waiters heavier than the new capacity fail with
    /// `WeightExceedsCapacity`. Fails with `NoSuchSemaphore` or `Closed`. An acquire that
    /// names another capacity still fails with `CapacityMismatch`: this is the one way to
    /// change it.
    pub async fn set_capacity(&self, name: &str, capacity: u32) -> Result<(), Error> {
        self.backend.set_capacity(name, capacity).await
    }

    /// Deletes a semaphore that is closed or idle (no holder, no waiter), so that its name can
    /// be created afresh, with any capacity; the fencing tokens of the name still strictly
    /// increase. Fails with `InUse` while it is held or waited for (close it first to take the
    /// leases away), and with `NoSuchSemaphore` for an unknown name.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.backend.delete(name).await
    }

    /// Releases the lease `lease` of semaphore `name` by force, whoever holds it (an
    /// operator's tool for a stuck holder): its permits go to the next waiters, and its
    /// holder's [`Permit::lost`] reports [`LostReason::Revoked`] (`turnstile run` stops its
    /// command). Fails with `UnknownLease` if no holder of the semaphore has that lease id.
    pub async fn revoke(&self, name: &str, lease: u64) -> Result<(), Error> {
        self.backend.revoke(name, lease).await
    }

    /// Ends another session at once, freeing its leases (for supervisors).
    pub async fn end_session(&self, session: u64) -> Result<(), Error> {
        self.backend.end_session(session).await
    }

    /// This client's session id.
    pub fn session_id(&self) -> u64 {
        self.backend.session_id()
    }

    /// How long the backend has not answered, while it cannot be reached: `None` while it
    /// answers (or for backends that cannot tell, such as `file://`). A supervisor uses it to
    /// give up on a coordinator that stays away (`turnstile nanny --death-timeout`).
    pub fn unreachable_for(&self) -> Option<Duration> {
        self.backend.unreachable_for()
    }

    /// Ends the session cleanly: every lease it holds is released at once.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.backend.shutdown().await
    }
}

/// A named semaphore on a [`Client`].
#[derive(Clone, Debug)]
pub struct Semaphore {
    client: Client,
    name: Arc<str>,
}

impl Semaphore {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for one permit.
    pub async fn acquire(&self) -> Result<Permit, Error> {
        self.acquire_inner(1, None).await
    }

    /// Waits for `weight` permits at once. Waiters are served in order of arrival, so a large
    /// acquire at the head of the queue holds back smaller ones behind it (and is never
    /// starved by them).
    pub async fn acquire_many(&self, weight: u32) -> Result<Permit, Error> {
        self.acquire_inner(weight, None).await
    }

    /// Waits for one permit for at most `timeout`; fails with [`Error::TimedOut`].
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Permit, Error> {
        self.acquire_inner(1, Some(timeout)).await
    }

    /// Waits for `weight` permits for at most `timeout`; fails with [`Error::TimedOut`].
    pub async fn acquire_many_timeout(
        &self,
        weight: u32,
        timeout: Duration,
    ) -> Result<Permit, Error> {
        self.acquire_inner(weight, Some(timeout)).await
    }

    /// Takes one permit if one is free and nobody is queued; `Ok(None)` otherwise.
    pub async fn try_acquire(&self) -> Result<Option<Permit>, Error> {
        self.try_acquire_many(1).await
    }

    /// Takes `weight` permits if they are free and nobody is queued; `Ok(None)` otherwise.
    pub async fn try_acquire_many(&self, weight: u32) -> Result<Option<Permit>, Error> {
        match self.acquire_inner(weight, Some(Duration::ZERO)).await {
            Ok(p) => Ok(Some(p)),
            Err(Error::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Closes the semaphore.
    pub async fn close(&self) -> Result<(), Error> {
        self.client.close(&self.name).await
    }

    /// # Cancel safety
    /// Dropping the future withdraws the acquire: the backend releases the lease id whether it
    /// was still queued or already granted, so no permit leaks.
    async fn acquire_inner(&self, weight: u32, timeout: Option<Duration>) -> Result<Permit, Error> {
        let grant = self
            .client
            .backend
            .acquire(&self.name, weight, timeout)
            .await?;
        Ok(Permit {
            client: self.client.clone(),
            semaphore: self.name.clone(),
            lease: grant.lease,
            token: grant.token,
            weight,
            lost: grant.lost,
            released: false,
        })
    }
}

/// Permits held on a semaphore. Released when dropped.
#[must_use = "the permit is released as soon as it is dropped"]
#[derive(Debug)]
pub struct Permit {
    client: Client,
    semaphore: Arc<str>,
    lease: u64,
    token: u64,
    weight: u32,
    lost: LostReceiver,
    released: bool,
}

impl Permit {
    /// The lease id.
    pub fn lease_id(&self) -> u64 {
        self.lease
    }

    /// The fencing token: strictly greater than that of every earlier grant of this
    /// semaphore. Hand it to the protected resource so that it can refuse a holder whose lease
    /// was lost while it was paused.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The semaphore's name.
    pub fn semaphore(&self) -> &str {
        &self.semaphore
    }

    /// Permits held.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The session that holds the lease.
    pub fn session_id(&self) -> u64 {
        self.client.session_id()
    }

    /// Why the lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lost.reason()
    }

    /// A handle on this lease's loss that outlives the permit and can be cloned, moved to
    /// other threads and tasks, and waited on: see [`LostSignal`]. Costs one reference count.
    pub fn lost_signal(&self) -> LostSignal {
        LostSignal {
            rx: self.lost.clone(),
        }
    }

    /// Waits until the lease is lost and says why. Pending forever while the lease is held.
    pub async fn lost(&self) -> LostReason {
        // `None`: the backend is gone, and without it nobody keeps the lease alive.
        self.lost.wait().await.unwrap_or(LostReason::Unreachable)
    }

    /// Releases the permit and waits for the backend to confirm. On the coordinator, a release
    /// that cannot be delivered is retried only until the lease has surely expired there
    /// (the last contact plus the session TTL); then it fails with [`Error::Unavailable`], and
    /// the lease is free anyway.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        if self.lost_reason().is_some() {
            return Ok(());
        }
        self.client.backend.release(self.lease).await
    }

    /// Releases the permit without waiting for the backend's answer: returns once the
    /// release is on its way. On the coordinator that is when it has been written to the
    /// connection (a release that finds no connection goes out, like every unanswered
    /// request, as soon as one is made again); elsewhere it is the same as
    /// [`Permit::release`].
    ///
    /// What it saves: the round trip of the answer, so that a loop of acquire and release
    /// waits for one round trip per pair instead of two (the next acquire follows the release
    /// on the same connection, and the coordinator handles them in that order). What it
    /// gives up: another client may see the slot free a one-way trip after this returns
    /// rather than before, and a release the coordinator refuses (the lease was lost just
    /// before) is not reported. Safety is unchanged: the coordinator frees the slot no
    /// earlier than it reads the release, and the caller has stopped using the resource by
    /// then.
    pub async fn send_release(mut self) -> Result<(), Error> {
        self.released = true;
        if self.lost_reason().is_some() {
            return Ok(());
        }
        self.client.backend.send_release(self.lease).await
    }
}

/// Whether a permit's lease was lost, seen from anywhere: another task, another thread, or
/// after the permit is gone. From [`Permit::lost_signal`].
///
/// The backend pushes the loss into it as it learns of it (an event from the coordinator, a
/// reconcile after a resume, the client's own presumed loss after a TTL without an answer), so
/// waiting on it costs nothing until then; there is nothing to poll.
#[derive(Clone, Debug)]
pub struct LostSignal {
    rx: LostReceiver,
}

impl LostSignal {
    /// Why the lease was lost, if it was.
    pub fn reason(&self) -> Option<LostReason> {
        self.rx.reason()
    }

    /// Whether the lease was lost.
    pub fn is_lost(&self) -> bool {
        self.reason().is_some()
    }

    /// Waits until the lease is lost: `Some(reason)`. `None` once no loss can come any more:
    /// the lease was released (or its job finished), or the client was shut down or dropped.
    /// Pending while the lease is held.
    pub async fn wait(&self) -> Option<LostReason> {
        // The sender goes with the lease's end; a loss sent just before stays visible.
        self.rx.wait().await
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.released && self.lost_reason().is_none() {
            self.client.backend.release_in_background(self.lease);
        }
    }
}

enum Target {
    Tcp(String),
    Tls(String),
    File(std::path::PathBuf),
    Etcd(etcd::EtcdUrl),
}

fn parse_url(url: &str) -> Result<Target, Error> {
    let bad = |why: &str| Error::InvalidUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad(
            "expected SCHEME://..., for example tcp://127.0.0.1:7420",
        ));
    };
    match scheme {
        "tcp" | "tls" => {
            let addr = rest.trim_end_matches('/');
            if addr.is_empty() || !addr.contains(':') {
                return Err(bad(&format!("expected {scheme}://HOST:PORT")));
            }
            if let Some((_, port)) = addr.rsplit_once(':') {
                if port.parse::<u16>().is_err() {
                    return Err(bad("the port is not a number from 0 to 65535"));
                }
            }
            Ok(match scheme {
                "tls" => Target::Tls(addr.to_owned()),
                _ => Target::Tcp(addr.to_owned()),
            })
        }
        "file" => {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(bad(
                    "expected file:///ABSOLUTE/PATH (an empty or localhost host, then the path)",
                ));
            }
            Ok(Target::File(std::path::PathBuf::from(path)))
        }
        "etcd" => etcd::parse_url(rest)
            .map(Target::Etcd)
            .map_err(|why| bad(&why)),
        other => Err(bad(&format!(
            "unknown scheme {other:?}; this build knows tcp://, tls://, file:// and etcd://"
        ))),
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Everything but the token, which must not end up in a log.
        f.debug_struct("Options")
            .field("session_ttl", &self.session_ttl)
            .field("session_id", &self.session_id)
            .field("client_name", &self.client_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("also_alive_pids", &self.also_alive_pids)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("ca", &self.ca)
            .finish()
    }
}

/// Reads a token file: its content without surrounding whitespace (a trailing newline), which
/// must not be empty.
pub fn read_token_file(path: &std::path::Path) -> Result<String, Error> {
    let storage = |source| Error::Storage {
        path: path.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(storage)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(storage(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the token file is empty",
        )));
    }
    Ok(token.to_owned())
}

impl Options {
    fn resolve(mut self) -> Result<Options, Error> {
        if self.token.is_none() {
            if let Some(path) = std::env::var_os(TOKEN_FILE_ENV) {
                self.token = Some(read_token_file(std::path::Path::new(&path))?);
            }
        }
        if self.ca.is_none() {
            self.ca = std::env::var_os(CA_ENV).map(std::path::PathBuf::from);
        }
        if self.session_id.is_none() {
            if let Ok(s) = std::env::var(SESSION_ENV) {
                let id = u64::from_str_radix(s.trim(), 16).ok().filter(|&id| id != 0);
                match id {
                    Some(id) => self.session_id = Some(id),
                    None => {
                        return Err(Error::InvalidUrl {
                            url: format!("{SESSION_ENV}={s}"),
                            why: "expected a non-zero session id of up to 16 hex digits".into(),
                        })
                    }
                }
            }
        }
        Ok(self)
    }
}

/// Where a client starts numbering its lease ids: random high bits, so that clients sharing a
/// session (every client of a supervised worker uses the worker's `TURNSTILE_SESSION`) never
/// pick the same lease id (which the coordinator would take for a retry of the same acquire).
/// The low 32 bits count up from 1.
pub(crate) fn lease_id_base() -> u64 {
    (random_id() << 32) | 1
}

/// A fresh random session id, as a client picks one when none is given: for a supervisor
/// that names its workers' sessions (`TURNSTILE_SESSION`, formatted as 16 hex digits).
pub fn new_session_id() -> u64 {
    random_id()
}

/// A random non-zero 64-bit id, from the standard library's randomly keyed hasher (every
/// `RandomState` gets new keys; no extra dependency for eight random bytes), mixed with the
/// time, the pid and a counter, so that ids drawn in the same instant still differ.
pub(crate) fn random_id() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(
            matches!(parse_url("tcp://127.0.0.1:7420"), Ok(Target::Tcp(a)) if a == "127.0.0.1:7420")
        );
        assert!(
            matches!(parse_url("tcp://localhost:1/"), Ok(Target::Tcp(a)) if a == "localhost:1")
        );
        assert!(matches!(parse_url("tls://[::1]:7420"), Ok(Target::Tls(a)) if a == "[::1]:7420"));
        assert!(
            matches!(parse_url("file:///var/run/x"), Ok(Target::File(p)) if p == std::path::Path::new("/var/run/x"))
        );
        assert!(
            matches!(parse_url("file://localhost/a"), Ok(Target::File(p)) if p == std::path::Path::new("/a"))
        );
        assert!(
            matches!(parse_url("etcd://a:1,b:2/team"), Ok(Target::Etcd(u)) if u.endpoints == ["a:1", "b:2"] && u.prefix == "team")
        );
        assert!(default_url().starts_with("file:///"));
        for bad in [
            "file://",
            "file://host/x",
            "file://relative",
            "127.0.0.1:7420",
            "tcp://",
            "tcp://host",
            "tcp://host:99999",
            "tls://host",
            "http://x:1",
            "etcd://",
            "etcd://host",
        ] {
            let e = parse_url(bad).err().expect("rejected");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn unavailable_is_what_retrying_later_could_cure() {
        use nix::errno::Errno;
        let io = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        let storage = |e| Error::Storage {
            path: "/mnt/shared".into(),
            source: io(e),
        };
        // The file backend's directory on a lost mount follows the coordinator's table.
        for e in [Errno::ESTALE, Errno::EIO, Errno::ENOTCONN] {
            assert!(storage(e).is_unavailable(), "{e}");
        }
        assert!(!storage(Errno::EACCES).is_unavailable());
        let gone = Error::Unavailable {
            addr: "h:1".into(),
            silent_for: Duration::from_secs(3),
        };
        assert!(gone.is_unavailable());
        let refused = Error::Connect {
            addr: "h:1".into(),
            source: io(Errno::ECONNREFUSED),
        };
        assert!(refused.is_unavailable());
        assert!(!Error::TimedOut.is_unavailable());
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
    }
}
