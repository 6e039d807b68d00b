//! The turnstile coordinator: a tokio TCP server around the sans-IO core.
//!
//! The server owns no semantics. For each request it takes the state lock, hands the request
//! to [`turnstile_core::Coordinator`], and routes the effects that come back: replies to the
//! connection that asked (or that waits, for a queued acquire), lease-lost events to the
//! connection a session is bound to. A timer task sleeps until the core's next deadline and
//! ticks it. Connections are served by a reader task that decodes frames and a writer task
//! that sends everything buffered for the connection in one write.
//!
//! Entry point: [`run`], which takes a bound listener and a shutdown future so that tests can
//! bind port 0 and stop the server when they are done.
#![deny(missing_docs)]

mod conn;
mod durable;
mod events;
mod gate;
mod http;
mod metrics;
mod outbox;
mod state;
mod status;
mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use turnstile_core::{Coordinator, Effect, Time};

pub use crate::durable::FsyncMode;
use crate::durable::WalQueue;
use crate::state::Shared;
pub use crate::tls::{TlsError, TlsIdentity};

/// Where the coordinator keeps its state.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Nowhere: a restart forgets everything.
    InMemory,
    /// A write-ahead log and snapshots in a directory.
    Dir {
        /// The data directory.
        path: PathBuf,
        /// When to sync.
        fsync: FsyncMode,
        /// Take a snapshot (and drop the log before it) after this many bytes of log.
        snapshot_bytes: u64,
    },
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// TTL of a session whose client does not ask for one.
    pub session_ttl: Duration,
    /// Shortest TTL a client may ask for.
    pub min_session_ttl: Duration,
    /// Longest TTL a client may ask for.
    pub max_session_ttl: Duration,
    /// Connections served at once. At the cap, the oldest connection that has not completed
    /// its handshake is dropped to make room; if every one has, further ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// Where the state lives.
    pub storage: Storage,
    /// The token every client must present in its `Hello`; `None` admits every client.
    pub auth_token: Option<String>,
    /// The token that also allows what changes other clients' state (closing a semaphore,
    /// resetting a job, ending another session). `None`: every admitted client may. It is
    /// also accepted where `auth_token` is asked for.
    pub admin_token: Option<String>,
    /// How long a new connection has to complete its handshake before it is dropped.
    pub handshake_timeout: Duration,
    /// Connections that have not completed their handshake, at most; past this the oldest of
    /// them is dropped to make room, so that idle sockets cannot lock real clients out.
    pub max_handshaking: usize,
    /// Connections from one IP address at once; further ones from it are closed at once.
    pub max_per_address: usize,
    /// How long a semaphore stays idle (no holders, no waiters, not closed) before it is
    /// forgotten; `None` keeps every semaphore for good.
    pub forget_idle: Option<Duration>,
    /// The certificate and key both ports serve TLS with; `None` serves them in the clear.
    /// With it, neither port ever answers in the clear.
    pub tls: Option<TlsIdentity>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            session_ttl: Duration::from_secs(10),
            min_session_ttl: Duration::from_millis(100),
            max_session_ttl: Duration::from_secs(24 * 3600),
            max_connections: 16_384,
            storage: Storage::InMemory,
            auth_token: None,
            admin_token: None,
            handshake_timeout: Duration::from_secs(5),
            max_handshaking: 256,
            max_per_address: 1024,
            forget_idle: Some(Duration::from_secs(600)),
            tls: None,
        }
    }
}

/// Why the server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Accepting connections failed in a way that will not pass.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The data directory could not be opened or recovered.
    #[error(transparent)]
    Storage(#[from] turnstile_wal::WalError),
    /// Writing the log failed while serving; the server stopped rather than grant what it
    /// cannot make durable.
    #[error("the log cannot be written: {0}")]
    LogFailed(String),
    /// The log writer thread could not be started.
    #[error("cannot start the log writer: {0}")]
    Thread(#[source] std::io::Error),
}

/// What recovery found, for the operator's log.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Records replayed (snapshot and log).
    pub records: usize,
    /// Of which from the snapshot.
    pub from_snapshot: usize,
    /// Semaphores, sessions and leases after recovery.
    pub semaphores: usize,
    /// Sessions after recovery; each has a grace period of one TTL to reconnect.
    pub sessions: usize,
    /// Held leases after recovery.
    pub leases: usize,
    /// The torn tail cut off the log, if there was one: where, and the side file that keeps
    /// the cut bytes.
    pub truncated: Option<turnstile_wal::Cut>,
}

/// A coordinator with its state loaded, ready to serve.
pub struct Server {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    report: RecoveryReport,
}

impl Server {
    /// Opens the storage (locking and recovering the data directory, if any) and builds the
    /// coordinator. Recovered sessions get a full TTL from now to reconnect.
    pub fn open(config: Config) -> Result<Server, ServerError> {
        let epoch = Instant::now();
        let mut core = Coordinator::new();
        core.set_forget_idle(config.forget_idle);
        core.set_step_budget(Some(state::TICK_SLICE));
        let mut report = RecoveryReport::default();
        let (wal, log) = match &config.storage {
            Storage::InMemory => (None, None),
            Storage::Dir {
                path,
                fsync,
                snapshot_bytes,
            } => {
                let (mut log, mut recovery) = turnstile_wal::Log::open(path)?;
                for record in &recovery.records {
                    core.apply(Time::ZERO, record);
                }
                if let Some(cut) = &recovery.truncated {
                    // The cut bytes may have held acknowledged grants (damage to the very end
                    // of the log looks like a torn write): never hand their tokens out again.
                    let mut effects = Vec::new();
                    core.skip_tokens(cut.grants_at_most(), &mut effects);
                    let mut frames = Vec::new();
                    for effect in &effects {
                        if let Effect::Persist(record) = effect {
                            turnstile_wal::record::encode(record, &mut frames);
                        }
                    }
                    log.append(&frames)?;
                    log.sync()?;
                    recovery.log_bytes += frames.len() as u64;
                }
                report.records = recovery.records.len();
                report.from_snapshot = recovery.from_snapshot;
                report.truncated = recovery.truncated;
                let mut queue = WalQueue::new(*snapshot_bytes, recovery.log_bytes);
                if queue.bytes_since_snapshot >= *snapshot_bytes {
                    // A long log from the last run: compact it now, so the next start is fast.
                    queue.schedule_snapshot(core.snapshot());
                }
                (Some(queue), Some((log, *fsync)))
            }
        };
        let views = core.semaphores(Time::ZERO);
        report.semaphores = views.len();
        report.leases = views.iter().map(|v| v.holders.len()).sum();
        report.sessions = core.session_count();
        let shared = Arc::new(Shared::new(config, core, epoch, wal));
        let writer = match log {
            Some((log, mode)) => {
                let shared = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("turnstile-wal".into())
                        .spawn(move || durable::writer_loop(shared, log, mode))
                        .map_err(ServerError::Thread)?,
                )
            }
            None => None,
        };
        Ok(Server {
            shared,
            writer,
            report,
        })
    }

    /// What recovery found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// Serves `listener` until `shutdown` completes (or the log fails), then closes every
    /// connection (each client is told with a `ShuttingDown` error), finishes writing the log
    /// and returns.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        self.run_with_http(listener, None, shutdown).await
    }

    /// Like [`Server::run`], and also serves the HTTP port on `http`, if given: `/metrics`
    /// (Prometheus), `/v1/status`, `/v1/semaphores/NAME`, `/v1/events` and the dashboard at
    /// `/`. The HTTP port only reads; it never holds the state lock longer than copying the
    /// numbers out.
    pub async fn run_with_http(
        mut self,
        listener: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let shared = self.shared.clone();
        let fatal = async { shared.fatal.notified().await };
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = fatal => {}
            }
        };
        let result = serve(self.shared.clone(), listener, http, stop).await;
        self.shared.stop_wal();
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        match self.shared.failure() {
            Some(e) => Err(ServerError::LogFailed(e)),
            None => result,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop_wal();
    }
}

/// Opens the storage and serves `listener` until `shutdown` completes. See [`Server`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::open(config)?.run(listener, shutdown).await
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let gate = Arc::new(gate::Gate::new(
        shared.config.max_handshaking,
        shared.config.max_per_address,
    ));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut accept_log = LogEvery::new(ACCEPT_LOG_INTERVAL);
    let mut tasks = JoinSet::new();
    tasks.spawn(timer_loop(shared.clone(), stop_rx.clone()));
    if let Some(http) = http {
        tasks.spawn(http::serve(shared.clone(), http, stop_rx.clone()));
    }
    tokio::pin!(shutdown);
    let result = loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: a connection that has not said hello makes room for the next one, so
                // that silent sockets cannot keep a real client waiting in the backlog.
                gate.evict_oldest();
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    p = limit.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break Ok(()), // never closed; treat as shutdown
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let Some(ticket) = gate.admit(peer.ip()) else {
                    tracing::debug!(%peer, "too many connections from this address; closed");
                    continue;
                };
                let shared = shared.clone();
                let stop = stop_rx.clone();
                tasks.spawn(async move {
                    conn::serve(shared, stream, ticket, stop).await;
                    drop(permit);
                });
            }
            Err(e) if is_transient(&e) => {
                // Out of file descriptors and the like. Give back the cheapest descriptor (a
                // connection that has not even said hello), back off instead of spinning, and
                // say so once per interval rather than once per attempt.
                if is_fd_exhaustion(&e) {
                    gate.evict_oldest();
                }
                accept_log.note(&e);
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => break Err(ServerError::Accept(e)),
        }
        // Reap finished connection tasks so the set does not grow with every connection.
        while tasks.try_join_next().is_some() {}
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    result
}

/// The first wait after a failed accept; it doubles while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait between two accepts that fail.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A failing accept is logged at most once per this interval.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A warning that would repeat (a failing accept): logged at most once per interval, with the
/// number of repeats left out since the last line.
pub(crate) struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    pub(crate) fn new(every: Duration) -> LogEvery {
        LogEvery {
            every,
            last: None,
            suppressed: 0,
        }
    }

    pub(crate) fn note(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            error = %e,
            repeats = self.suppressed,
            "accept failed; backing off (logged at most every {}s)",
            self.every.as_secs()
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

/// Sleeps until the core's next deadline (or until woken for an earlier one) and ticks.
async fn timer_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let next = {
            let mut st = shared.lock();
            let next = st.core.next_deadline();
            st.timer_at = next;
            next
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(shared.instant_of(t).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                // A mass expiry is swept in slices; the others get the lock in between.
                while shared.tick() {
                    tokio::task::yield_now().await;
                    std::thread::yield_now();
                }
            }
            _ = shared.timer.notified() => {}
            _ = stop.changed() => return,
        }
    }
}
