//! The coordinator backend (`tcp://HOST:PORT`).
//!
//! One driver task owns the connection. Callers send it commands over a channel and get their
//! answers on oneshot channels; the driver numbers requests, matches replies by request id,
//! keeps the session alive, and survives disconnections: it reconnects with exponential
//! backoff, resumes the session, and re-sends every request still unanswered. Re-sending is
//! safe because every request is idempotent on the coordinator (an acquire is named by its
//! lease id; a repeated release answers "unknown lease", which a re-sent release takes as
//! success).
//!
//! # Deadlines
//!
//! Every call has a deadline that holds whatever the network does, because it is kept on the
//! caller's side of the channel, not by the driver: a wait with a timeout gives up at its
//! deadline plus [`ANSWER_GRACE`] (the time the coordinator's own "timed out" answer needs to
//! arrive) — with [`Error::TimedOut`] if the coordinator answers, else
//! [`Error::Unavailable`]; a call that does not wait gives up after one session TTL without
//! an answer (a coordinator restart within the TTL stays invisible); a release or a job's
//! completion gives up once the lease has surely expired on the coordinator (the last contact
//! plus the TTL). The driver itself never blocks on the network for long: connection attempts
//! run beside its loop, each bounded, and a link on which even keep-alives go unanswered is
//! dropped and re-made. While the coordinator is away it says so calmly, at a growing interval
//! ([`Notice`]), never once per retry.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use turnstile_proto::{
    self as proto, decode_reply, encode_request, split_frame, ErrorCode, StatusDoc,
    MAX_REPLY_FRAME, NO_TIMEOUT,
};

use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
use crate::tls::{self, LinkRead, LinkWrite};
use crate::{random_id, Error, GroupSummary, JobCompletion, JobRunner, LostReason, Options};

/// The longest one connection attempt (connect and handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a wait's deadline the coordinator's "timed out" answer may still arrive
/// before the wait gives up on its own (the deadline then holds within half a second).
pub(crate) const ANSWER_GRACE: Duration = Duration::from_millis(400);
/// How long shutting down waits for the coordinator to confirm the end of the session; after
/// that the session's leases expire by its TTL.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);
/// A write that cannot go out within this is taken for a dead link.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long before the end of `connect_timeout` the last attempt of the first connection
/// starts.
const LAST_TRY: Duration = Duration::from_millis(50);
/// Longest wait between two attempts of the first connection.
const MAX_FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// When the first "still trying" line is shown, and the first interval between two.
const NOTICE_FIRST: Duration = Duration::from_secs(5);
/// The interval between "still trying" lines doubles up to this.
const NOTICE_MAX: Duration = Duration::from_secs(600);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Reconnect attempts are also at most `TTL/BACKOFF_TTL_DIVISOR` apart (plus jitter), so that
/// a client whose coordinator is back well within the TTL (a restart) reconnects before it
/// gives its leases up.
const BACKOFF_TTL_DIVISOR: u32 = 10;
/// The client treats its leases as lost after `TTL - TTL/SAFETY_DIVISOR` without an answer
/// to a session-refreshing request, i.e. 10% before the coordinator may expire them.
const SAFETY_DIVISOR: u32 = 10;

/// Beyond this, the write buffer gives its memory back after a write.
const OUT_KEEP: usize = 64 * 1024;
/// The least free room in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Far enough in the future to stand for "never" in the driver's timer.
const FAR: Duration = Duration::from_secs(24 * 3600);

/// Writes what a non-blocking write left, bounded by [`WRITE_TIMEOUT`].
async fn write_rest(wr: &mut LinkWrite, rest: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(rest)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("a write did not go out".into()),
    }
}

/// A request as the driver keeps it until answered: owned, so it can be re-sent.
#[derive(Clone, Debug)]
enum Req {
    Ensure {
        name: String,
        capacity: u32,
    },
    Acquire {
        lease: u64,
        weight: u32,
        deadline: Option<Instant>,
        name: String,
    },
    Release {
        lease: u64,
    },
    Close {
        name: String,
    },
    Status {
        name: String,
        prefix: String,
        after: String,
    },
    EndSession {
        session: u64,
    },
    OpenSession {
        session: u64,
        ttl_ms: u32,
    },
    KeepAlive,
    CloseSession,
    BeginJob {
        lease: u64,
        deadline: Option<Instant>,
        job: String,
        group: String,
    },
    FinishJob {
        lease: u64,
        succeeded: bool,
        started_unix_ms: u64,
        duration_ms: u64,
        reason: String,
    },
    ResetJob {
        job: String,
    },
    WaitGroup {
        wait: u64,
        jobs: u32,
        deadline: Option<Instant>,
        group: String,
    },
    /// Which leases the session holds: sent after every resume (see `Driver::reconcile`).
    Leases,
    SetCapacity {
        name: String,
        capacity: u32,
    },
    Delete {
        name: String,
    },
    Revoke {
        name: String,
        lease: u64,
    },
}

impl Req {
    /// Whether the coordinator pushes the session's expiry when it handles this request. Only
    /// the answer to such a request proves that the session lives until its send time plus the
    /// TTL: `Status`, `Ensure`, `Close` and `EndSession` are answered without touching the
    /// session, and counting them would let the client believe in leases that the coordinator
    /// has already expired and given away.
    fn refreshes_session(&self) -> bool {
        match self {
            Req::KeepAlive | Req::Release { .. } | Req::OpenSession { .. } => true,
            // A zero weight is refused before the session is looked at.
            Req::Acquire { weight, .. } => *weight > 0,
            // The job requests refresh the session only once their names pass the checks; an
            // answer does not prove which happened, so they do not count (the keep-alives do).
            Req::Ensure { .. }
            | Req::Close { .. }
            | Req::Status { .. }
            | Req::EndSession { .. }
            | Req::CloseSession
            | Req::BeginJob { .. }
            | Req::FinishJob { .. }
            | Req::ResetJob { .. }
            | Req::WaitGroup { .. }
            | Req::Leases
            | Req::SetCapacity { .. }
            | Req::Delete { .. }
            | Req::Revoke { .. } => false,
        }
    }
}

/// What a successful request returns to its caller.
#[derive(Debug)]
enum Answer {
    Done,
    Granted { token: u64 },
    Status(Vec<u8>),
    JobCompleted(JobCompletion),
    JobBusy(JobRunner),
    JobReset(bool),
    GroupSettled(GroupSummary),
}

type Reply = oneshot::Sender<Result<Answer, Error>>;

enum Cmd {
    Call {
        req: Req,
        reply: Reply,
        /// For an acquire: fires when the lease is lost.
        lost: Option<watch::Sender<Option<LostReason>>>,
    },
    /// Release without waiting for the answer (a dropped permit, a dropped acquire, a
    /// `send_release`).
    Forget {
        lease: u64,
        /// Fired once the turn that queued the release has written it (or found no link, in
        /// which case it goes out with the other pending requests after the reconnect).
        sent: Option<oneshot::Sender<()>>,
    },
    /// Send a keep-alive now: a caller whose deadline passed wants to know whether the
    /// coordinator answers.
    Probe,
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Pending {
    req: Req,
    reply: Option<Reply>,
    lost: Option<watch::Sender<Option<LostReason>>>,
    sent_at: Instant,
    resent: bool,
}

struct Link {
    rd: LinkRead,
    wr: LinkWrite,
    buf: Vec<u8>,
}

/// The coordinator backend: a handle on the driver task.
pub(crate) struct TcpBackend {
    tx: mpsc::UnboundedSender<Cmd>,
    session: Arc<AtomicU64>,
    next_lease: AtomicU64,
    health: Arc<Health>,
    addr: String,
}

/// What callers know of the driver's link, to judge a deadline that passed: whether the
/// coordinator answers, and until when the session's leases surely live. Times are
/// milliseconds since `epoch`, so that they fit in atomics.
struct Health {
    epoch: Instant,
    connected: AtomicBool,
    /// When the coordinator last sent anything.
    last_heard: AtomicU64,
    /// The driver's `last_contact`: the session lives on the coordinator until this plus
    /// the TTL at the latest.
    last_contact: AtomicU64,
    ttl_ms: AtomicU64,
    /// Since when the coordinator has not answered, while it cannot be reached; `NEVER`
    /// while it answers.
    away_since: AtomicU64,
    /// Writes to the socket, for the tests of coalescing.
    #[cfg(test)]
    writes: AtomicU64,
    /// Leases the driver watches for loss, as of the end of its last turn.
    #[cfg(test)]
    watched: AtomicU64,
}

const NEVER: u64 = u64::MAX;

impl Health {
    fn new(now: Instant, ttl: Duration) -> Health {
        Health {
            epoch: now,
            connected: AtomicBool::new(true),
            last_heard: AtomicU64::new(0),
            last_contact: AtomicU64::new(0),
            ttl_ms: AtomicU64::new(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            away_since: AtomicU64::new(NEVER),
            #[cfg(test)]
            writes: AtomicU64::new(0),
            #[cfg(test)]
            watched: AtomicU64::new(0),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Whether the coordinator answers: connected, and heard from since `probe` (when a
    /// keep-alive was asked for).
    fn heard_since(&self, probe: Instant) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self.last_heard.load(Ordering::Relaxed) >= self.ms(probe)
    }

    /// When the session's leases have surely expired on the coordinator, unless it hears
    /// from us before.
    fn lease_gone_at(&self) -> Instant {
        self.at(self.last_contact.load(Ordering::Relaxed)) + self.ttl()
    }

    fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.at(self.last_heard.load(Ordering::Relaxed)))
    }

    fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        match self.away_since.load(Ordering::Relaxed) {
            NEVER => None,
            since => Some(now.saturating_duration_since(self.at(since))),
        }
    }
}

/// How long a caller waits for the answer to its request.
#[derive(Clone, Copy, Debug)]
enum Until {
    /// As long as it takes (a wait without a timeout): the driver keeps trying.
    Answered,
    /// A wait with this deadline: the coordinator answers "timed out" by then if it can.
    Wait(Instant),
    /// A call that does not wait: one session TTL.
    Call,
    /// A release or a job's end: until the lease has surely expired on the coordinator.
    LeaseGone,
}

impl TcpBackend {
    /// Connects, opens the session, and starts the driver. Fails if the first connection
    /// fails (after `options.connect_timeout` of retries, if given): a coordinator that was
    /// never reachable is a configuration error or an outage, not a blip.
    /// Over TLS when `tls` is given.
    pub(crate) async fn connect(
        addr: String,
        tls: Option<tls::Connector>,
        options: Options,
    ) -> Result<TcpBackend, Error> {
        // A session given to us (by a supervisor, through TURNSTILE_SESSION) may be shared with
        // other clients of the same worker: on shutdown, release our own leases and leave the
        // session to its owner, instead of closing it under the others' feet.
        let borrowed = options.session_id.is_some();
        let session = options.session_id.unwrap_or_else(random_id);
        let ttl_ms = options
            .session_ttl
            .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1))
            .unwrap_or(0);
        let name = options.client_name.clone().unwrap_or_else(default_name);
        let token = options.token.clone().unwrap_or_default();
        let (link, ttl) = first_link(
            &addr,
            tls.as_ref(),
            &name,
            &token,
            Hello::Open { session, ttl_ms },
            options.connect_timeout,
        )
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session_cell = Arc::new(AtomicU64::new(session));
        let now = Instant::now();
        let health = Arc::new(Health::new(now, ttl));
        let driver = Driver {
            health: health.clone(),
            connecting: None,
            awaiting_since: None,
            notice: None,
            addr,
            tls,
            name,
            token,
            refused: None,
            ttl_ms,
            session: session_cell.clone(),
            ttl,
            rx,
            link: Some(link),
            next_id: 1,
            pending: BTreeMap::new(),
            leases: HashMap::new(),
            abandoned: Vec::new(),
            last_contact: now,
            last_keepalive: now,
            backoff: MIN_BACKOFF,
            next_attempt: now,
            borrowed,
            out: Vec::with_capacity(4096),
            now,
            sent: Vec::new(),
        };
        let addr = driver.addr.clone();
        tokio::spawn(driver.run());
        Ok(TcpBackend {
            tx,
            session: session_cell,
            next_lease: AtomicU64::new(crate::lease_id_base()),
            health,
            addr,
        })
    }

    fn unavailable(&self) -> Error {
        Error::Unavailable {
            addr: self.addr.clone(),
            silent_for: self.health.silent_for(Instant::now()),
        }
    }

    /// Waits for the answer to a request, at most as `until` says (see the module doc).
    async fn answer(
        &self,
        mut rx: oneshot::Receiver<Result<Answer, Error>>,
        until: Until,
    ) -> Result<Answer, Error> {
        let closed = |r: Result<Result<Answer, Error>, oneshot::error::RecvError>| {
            r.map_err(|_| Error::Shutdown)?
        };
        match until {
            Until::Answered => closed(rx.await),
            Until::Wait(deadline) => {
                if let Ok(r) = tokio::time::timeout_at(deadline, &mut rx).await {
                    return closed(r);
                }
                // The coordinator's "timed out" is on its way if it answers at all; a ping
                // tells a coordinator that answers late from one that does not answer.
                if !self.health.connected.load(Ordering::Relaxed) {
                    return Err(self.unavailable());
                }
                let probe = Instant::now();
                let _ = self.tx.send(Cmd::Probe);
                match tokio::time::timeout_at(deadline + ANSWER_GRACE, &mut rx).await {
                    Ok(r) => closed(r),
                    Err(_) if self.health.heard_since(probe) => Err(Error::TimedOut),
                    Err(_) => Err(self.unavailable()),
                }
            }
            Until::Call => {
                let deadline = Instant::now() + self.health.ttl().max(Duration::from_secs(1));
                match tokio::time::timeout_at(deadline, &mut rx).await {
                    Ok(r) => closed(r),
                    Err(_) => Err(self.unavailable()),
                }
            }
            Until::LeaseGone => loop {
                // The mark moves on as keep-alives are answered: look again when it passes.
                let gone = self.health.lease_gone_at();
                match tokio::time::timeout_at(gone, &mut rx).await {
                    Ok(r) => return closed(r),
                    Err(_) if Instant::now() >= self.health.lease_gone_at() => {
                        return Err(self.unavailable())
                    }
                    Err(_) => {}
                }
            },
        }
    }

    /// Sends a request that takes a lease (an acquire or a job attempt) and waits for its
    /// answer; the lease is withdrawn if the future is dropped first.
    async fn call_for_lease(
        &self,
        lease: u64,
        req: Req,
        until: Until,
    ) -> Result<(Answer, watch::Receiver<Option<LostReason>>), Error> {
        let (lost_tx, lost_rx) = watch::channel(None);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Call {
                req,
                reply,
                lost: Some(lost_tx),
            })
            .map_err(|_| Error::Shutdown)?;
        let mut guard = AcquireGuard {
            tx: &self.tx,
            lease,
            armed: true,
        };
        // On an early return (a deadline), the guard withdraws the acquire.
        let answer = self.answer(rx, until).await?;
        guard.armed = false;
        Ok((answer, lost_rx))
    }

    /// One `Status` request: one semaphore, or one page.
    async fn status_call(&self, name: &str, prefix: &str, after: &str) -> Result<StatusDoc, Error> {
        let req = Req::Status {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            after: after.to_owned(),
        };
        let answer = self.call(req, Until::Call).await?;
        let Answer::Status(json) = answer else {
            return Err(Error::Protocol(format!(
                "unexpected answer to status: {answer:?}"
            )));
        };
        StatusDoc::from_json(&json).map_err(|e| Error::Protocol(format!("status document: {e}")))
    }

    async fn call(&self, req: Req, until: Until) -> Result<Answer, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Call {
                req,
                reply,
                lost: None,
            })
            .map_err(|_| Error::Shutdown)?;
        self.answer(rx, until).await
    }
}

/// Withdraws an acquire whose future was dropped before it finished.
struct AcquireGuard<'a> {
    tx: &'a mpsc::UnboundedSender<Cmd>,
    lease: u64,
    armed: bool,
}

impl Drop for AcquireGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Cmd::Forget {
                lease: self.lease,
                sent: None,
            });
        }
    }
}

impl Backend for TcpBackend {
    fn ensure<'a>(&'a self, name: &'a str, capacity: u32) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.call(
                Req::Ensure {
                    name: name.to_owned(),
                    capacity,
                },
                Until::Call,
            )
            .await
            .map(drop)
        })
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Grant, Error>> {
        Box::pin(async move {
            let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let deadline = timeout.map(|t| Instant::now() + t);
            let req = Req::Acquire {
                lease,
                weight,
                deadline,
                name: name.to_owned(),
            };
            let until = deadline.map_or(Until::Answered, Until::Wait);
            let (answer, lost_rx) = self.call_for_lease(lease, req, until).await?;
            match answer {
                Answer::Granted { token } => Ok(Grant {
                    lease,
                    token,
                    lost: lost_rx,
                }),
                other => Err(Error::Protocol(format!(
                    "unexpected answer to acquire: {other:?}"
                ))),
            }
        })
    }

    fn release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.call(Req::Release { lease }, Until::LeaseGone)
                .await
                .map(drop)
        })
    }

    fn release_in_background(&self, lease: u64) {
        let _ = self.tx.send(Cmd::Forget { lease, sent: None });
    }

    fn send_release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (sent, written) = oneshot::channel();
            self.tx
                .send(Cmd::Forget {
                    lease,
                    sent: Some(sent),
                })
                .map_err(|_| self.unavailable())?;
            // A dropped sender means the driver ended (shut down, or every handle gone), and
            // ending the session releases the lease anyway.
            let _ = written.await;
            Ok(())
        })
    }

    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.call(
                Req::Close {
                    name: name.to_owned(),
                },
                Until::Call,
            )
            .await
            .map(drop)
        })
    }

    fn set_capacity<'a>(
        &'a self,
        name: &'a str,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let name = name.to_owned();
            self.call(Req::SetCapacity { name, capacity }, Until::Call)
                .await
                .map(drop)
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let name = name.to_owned();
            self.call(Req::Delete { name }, Until::Call).await.map(drop)
        })
    }

    fn revoke<'a>(&'a self, name: &'a str, lease: u64) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let name = name.to_owned();
            self.call(Req::Revoke { name, lease }, Until::Call)
                .await
                .map(drop)
        })
    }

    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(async move {
            match name {
                Some(name) => self.status_call(name, "", "").await,
                None => self.status_prefix("").await,
            }
        })
    }

    fn status_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(async move {
            // The coordinator answers in pages, each well below the frame limit; the first
            // carries the groups and jobs.
            let mut doc = self.status_call("", prefix, "").await?;
            let mut next = doc.next.take();
            while let Some(after) = next {
                let mut page = self.status_call("", prefix, &after).await?;
                next = page.next.take();
                if next.as_deref().is_some_and(|n| n <= after.as_str()) {
                    // Names only go up: a cursor that does not would loop for ever.
                    return Err(Error::Protocol(format!(
                        "status page after {after:?} does not move on"
                    )));
                }
                doc.semaphores.append(&mut page.semaphores);
            }
            Ok(doc)
        })
    }

    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.call(Req::EndSession { session }, Until::Call)
                .await
                .map(drop)
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Cmd::Shutdown { reply }).is_err() {
                return Ok(()); // already shut down
            }
            // The driver bounds its own wait; this bounds a driver stuck in a write.
            let _ = tokio::time::timeout(SHUTDOWN_WAIT + WRITE_TIMEOUT, rx).await;
            Ok(())
        })
    }

    fn session_id(&self) -> u64 {
        self.session.load(Ordering::Relaxed)
    }

    fn unreachable_for(&self) -> Option<Duration> {
        self.health.unreachable_for(Instant::now())
    }

    fn begin_job<'a>(
        &'a self,
        job: &'a str,
        group: Option<&'a str>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<JobBegin, Error>> {
        Box::pin(async move {
            let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let deadline = timeout.map(|t| Instant::now() + t);
            let req = Req::BeginJob {
                lease,
                deadline,
                job: job.to_owned(),
                group: group.unwrap_or("").to_owned(),
            };
            let until = deadline.map_or(Until::Answered, Until::Wait);
            let (answer, lost) = self.call_for_lease(lease, req, until).await?;
            match answer {
                Answer::Granted { token } => Ok(JobBegin::Run(Grant { lease, token, lost })),
                Answer::JobCompleted(done) => Ok(JobBegin::Completed(done)),
                Answer::JobBusy(runner) => Ok(JobBegin::Running(runner)),
                other => Err(Error::Protocol(format!(
                    "unexpected answer to a job attempt: {other:?}"
                ))),
            }
        })
    }

    fn finish_job<'a>(
        &'a self,
        _job: &'a str,
        lease: u64,
        end: JobEnd<'a>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let req = match end {
                JobEnd::Succeeded { started, duration } => Req::FinishJob {
                    lease,
                    succeeded: true,
                    started_unix_ms: started
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .unwrap_or(0),
                    duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                    reason: String::new(),
                },
                JobEnd::Failed { reason } => Req::FinishJob {
                    lease,
                    succeeded: false,
                    started_unix_ms: 0,
                    duration_ms: 0,
                    reason: reason.to_owned(),
                },
            };
            self.call(req, Until::LeaseGone).await.map(drop)
        })
    }

    fn reset_job<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            match self
                .call(
                    Req::ResetJob {
                        job: job.to_owned(),
                    },
                    Until::Call,
                )
                .await?
            {
                Answer::JobReset(was) => Ok(was),
                other => Err(Error::Protocol(format!(
                    "unexpected answer to a job reset: {other:?}"
                ))),
            }
        })
    }

    fn wait_group<'a>(
        &'a self,
        group: &'a str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<GroupSummary, Error>> {
        Box::pin(async move {
            // Wait ids share the lease id space, so they never collide with a lease.
            let wait = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let deadline = timeout.map(|t| Instant::now() + t);
            let req = Req::WaitGroup {
                wait,
                jobs,
                deadline,
                group: group.to_owned(),
            };
            match self
                .call(req, deadline.map_or(Until::Answered, Until::Wait))
                .await?
            {
                Answer::GroupSettled(summary) => Ok(summary),
                other => Err(Error::Protocol(format!(
                    "unexpected answer to a group wait: {other:?}"
                ))),
            }
        })
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}:{}", std::process::id())
}

/// The session request that follows the hello on a new link.
#[derive(Clone, Copy, Debug)]
enum Hello {
    Open { session: u64, ttl_ms: u32 },
    Resume { session: u64 },
}

/// The outcome of one connection attempt: see [`open_link`].
type Opened = Result<Result<(Link, Duration), Error>, Error>;

/// The first connection: retried with backoff while it fails to connect (refused, reset, no
/// answer) and `retry_for` (from the first attempt) is not over; one attempt without it. A
/// refusal by the coordinator (such as a protocol version it does not speak) is not retried.
async fn first_link(
    addr: &str,
    tls: Option<&tls::Connector>,
    name: &str,
    token: &str,
    hello: Hello,
    retry_for: Option<Duration>,
) -> Result<(Link, Duration), Error> {
    let started = Instant::now();
    let end = retry_for.map(|t| started + t);
    let mut backoff = MIN_BACKOFF;
    let mut notice = Notice::new(started);
    loop {
        let attempt_end = match end {
            Some(end) => end.min(Instant::now() + CONNECT_TIMEOUT),
            None => Instant::now() + CONNECT_TIMEOUT,
        };
        let e = match open_link(
            addr.to_owned(),
            tls.cloned(),
            name.to_owned(),
            token.to_owned(),
            hello,
            attempt_end,
        )
        .await
        {
            Ok(opened) => return opened,
            // Only a failure to talk at all may pass; a refusal (bad token, unsupported
            // version) or a peer that is not a coordinator will say the same again.
            Err(e @ Error::Connect { .. }) => e,
            Err(e) => return Err(e),
        };
        let Some(end) = end else { return Err(e) };
        // The last attempt comes just before the end, so that the whole time is tried.
        let last = end.checked_sub(LAST_TRY).unwrap_or(end);
        let now = Instant::now();
        if now >= last {
            return Err(e);
        }
        let jitter = Duration::from_millis(random_id() % (backoff.as_millis() as u64 / 2 + 1));
        let next = (now + backoff + jitter).min(last);
        tracing::debug!(error = ?e, "first connection failed; trying again");
        loop {
            let due = notice.due();
            if due >= next {
                break;
            }
            tokio::time::sleep_until(due).await;
            notice.show(addr, Instant::now());
        }
        tokio::time::sleep_until(next).await;
        backoff = (backoff * 2).min(MAX_FIRST_BACKOFF);
    }
}

/// The calm "still trying" line while the coordinator is away: first after
/// [`NOTICE_FIRST`] without an answer, then at doubling intervals up to [`NOTICE_MAX`].
#[derive(Debug)]
struct Notice {
    since: Instant,
    next: Instant,
    every: Duration,
    shown: bool,
    /// At info rather than warn: the session is established and its leases stay valid while
    /// the client retries (their loss is reported on its own), so the retries are no news to
    /// a command such as `turnstile run`, whose stderr is its command's.
    quiet: bool,
}

impl Notice {
    fn new(since: Instant) -> Notice {
        Notice {
            since,
            next: since + NOTICE_FIRST,
            every: NOTICE_FIRST,
            shown: false,
            quiet: false,
        }
    }

    /// The notice of an established session that lost its link.
    fn resuming(since: Instant) -> Notice {
        Notice {
            quiet: true,
            ..Notice::new(since)
        }
    }

    fn due(&self) -> Instant {
        self.next
    }

    fn show(&mut self, addr: &str, now: Instant) {
        let secs = now.saturating_duration_since(self.since).as_secs();
        if self.quiet {
            tracing::info!("the coordinator at {addr} has not answered for {secs}s; still trying");
        } else {
            tracing::warn!("the coordinator at {addr} has not answered for {secs}s; still trying");
        }
        self.shown = true;
        self.every = (self.every * 2).min(NOTICE_MAX);
        self.next = now + self.every;
    }
}

/// Connects, says hello and sends the session request; waits for both answers, all by
/// `deadline`. The outer error is a failure to talk at all; the inner one is the
/// coordinator's answer to the session request. Owns its arguments, so that the driver can
/// run it beside its loop.
async fn open_link(
    addr: String,
    tls: Option<tls::Connector>,
    name: String,
    token: String,
    hello: Hello,
    deadline: Instant,
) -> Opened {
    let addr = addr.as_str();
    let connect_err = |source| Error::Connect {
        addr: addr.to_owned(),
        source,
    };
    let session_req = match hello {
        Hello::Open { session, ttl_ms } => proto::Request::OpenSession { session, ttl_ms },
        Hello::Resume { session } => proto::Request::ResumeSession { session },
    };
    let plain = tls.is_none();
    let (rd, mut wr) = tls::open(addr, tls.as_ref(), deadline).await?;
    let mut out = Vec::new();
    let hello = proto::Request::Hello {
        magic: proto::MAGIC,
        version: proto::VERSION,
        client: &name,
        token: &token,
    };
    encode_request(1, &hello, &mut out);
    encode_request(2, &session_req, &mut out);
    wr.write_all(&out).await.map_err(connect_err)?;
    let mut link = Link {
        rd,
        wr,
        buf: Vec::with_capacity(4096),
    };
    let mut answers = 0;
    let mut ttl = Duration::ZERO;
    let mut session_result = Ok(());
    // Events pushed before the answers, kept whole for the driver (see below).
    let mut carried: Vec<u8> = Vec::new();
    let read = async {
        while answers < 2 {
            if plain && tls::looks_like_tls(&link.buf) {
                return Err(Error::Tls {
                    addr: addr.to_owned(),
                    why: "the server speaks TLS: use tls:// instead of tcp://".into(),
                });
            }
            const HTTP: &[u8] = b"HTTP/1.";
            let looks_http = !link.buf.is_empty()
                && HTTP.starts_with(&link.buf[..link.buf.len().min(HTTP.len())]);
            if looks_http && link.buf.len() < HTTP.len() {
                // Not enough to tell yet (a frame's length never starts with "H").
                let n = link.rd.read_buf(&mut link.buf).await.map_err(connect_err)?;
                if n == 0 {
                    return Err(connect_err(std::io::ErrorKind::UnexpectedEof.into()));
                }
                continue;
            }
            if looks_http {
                // A coordinator's HTTP port (or another web server) answered our hello.
                return Err(Error::Protocol(format!(
                    "{addr} answered in HTTP: it is an HTTP port, not turnstile's protocol \
                     port (`turnstile serve` prints both: \"listening on\" is the protocol \
                     port, 7420 by default; \"http on\" the HTTP port, 7421)"
                )));
            }
            while let Some((payload, used)) = split_frame(&link.buf, MAX_REPLY_FRAME)
                .map_err(|e| Error::Protocol(e.to_string()))?
            {
                let (id, reply) =
                    decode_reply(payload).map_err(|e| Error::Protocol(e.to_string()))?;
                match (id, reply) {
                    (1, proto::Reply::HelloOk { .. }) => answers += 1,
                    (1 | 0, proto::Reply::Error { code, message }) => {
                        return Err(Error::Rejected {
                            code,
                            message: message.to_owned(),
                        })
                    }
                    (2, proto::Reply::SessionOpened { ttl_ms, .. }) => {
                        ttl = Duration::from_millis(u64::from(ttl_ms));
                        answers += 1;
                    }
                    (2, proto::Reply::Error { code, message }) => {
                        session_result = Err(Error::Rejected {
                            code,
                            message: message.to_owned(),
                        });
                        answers += 1;
                    }
                    (0, proto::Reply::SessionLost { .. } | proto::Reply::LeaseLost { .. }) => {
                        // A session that expired under us (a client stopped past its TTL,
                        // re-opening its session id after the coordinator's sweep caught up)
                        // is told as an event, which can arrive before the session's answer.
                        // It is news for the driver, which handles it as on any link (a
                        // fresh session), not a broken protocol.
                        carried.extend_from_slice(&link.buf[..used]);
                    }
                    (_, other) => {
                        return Err(Error::Protocol(format!(
                            "unexpected reply in handshake: {other:?}"
                        )))
                    }
                }
                link.buf.drain(..used);
            }
            if answers < 2 {
                let n = link.rd.read_buf(&mut link.buf).await.map_err(connect_err)?;
                if n == 0 {
                    return Err(connect_err(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))??;
    if !carried.is_empty() {
        // In front of whatever followed, in the order they came.
        carried.extend_from_slice(&link.buf);
        link.buf = carried;
    }
    Ok(session_result.map(|()| (link, ttl)))
}

struct Driver {
    addr: String,
    /// Over TLS when set.
    tls: Option<tls::Connector>,
    name: String,
    /// The token presented in every `Hello` (empty: none).
    token: String,
    /// The coordinator refused the handshake (a token it does not accept, a version it does
    /// not speak): retrying cannot help, so every call fails with this from then on.
    refused: Option<(ErrorCode, String)>,
    ttl_ms: u32,
    session: Arc<AtomicU64>,
    ttl: Duration,
    rx: mpsc::UnboundedReceiver<Cmd>,
    link: Option<Link>,
    next_id: u32,
    /// Unanswered requests, by request id; ordered so that re-sending keeps their order.
    pending: BTreeMap<u32, Pending>,
    /// Held leases, to tell when they are lost.
    leases: HashMap<u64, watch::Sender<Option<LostReason>>>,
    /// Leases given up because the coordinator was unreachable for a TTL. If the session
    /// turns out to be alive after all, they are released on reconnect, so that they do not
    /// stay held until the session ends.
    abandoned: Vec<u64>,
    /// When the last request that the coordinator answered was *sent*: the session is alive
    /// until at least this plus the TTL, and no longer can the client count on it.
    last_contact: Instant,
    last_keepalive: Instant,
    backoff: Duration,
    next_attempt: Instant,
    /// The session was given to us (and may be shared): shutting down releases our leases
    /// and withdraws our waits, but does not close the session. Cleared when the session is
    /// lost and replaced by one of our own.
    borrowed: bool,
    /// What callers see of the link (see [`Health`]).
    health: Arc<Health>,
    /// A connection attempt under way, beside the loop, so that commands (a shutdown) are
    /// still served while it connects.
    connecting: Option<Connecting>,
    /// When a keep-alive went out with nothing heard from the coordinator since: a link on
    /// which that lasts [`Driver::silence_limit`] is dead (the peer is gone, or a network
    /// drops everything), and is re-made.
    awaiting_since: Option<Instant>,
    /// The "still trying" line, while the coordinator is away.
    notice: Option<Notice>,
    /// The frames queued in this turn of the loop, written together at its end.
    out: Vec<u8>,
    /// When this turn of the loop began: the send time of the requests it queues.
    now: Instant,
    /// Callers of `send_release` whose releases this turn queued: told after its write.
    sent: Vec<oneshot::Sender<()>>,
}

/// A connection attempt that runs beside the driver's loop.
struct Connecting {
    attempt: BoxFuture<'static, Opened>,
    started: Instant,
    /// The new session this attempt opens, if it does not resume the current one.
    fresh: Option<u64>,
}

/// Runs the connection attempt, if there is one; pending forever otherwise, so that it can
/// sit in a `select!` arm. The caller takes the attempt out once it has finished.
async fn attempt_done(c: &mut Option<Connecting>) -> (Opened, Instant, Option<u64>) {
    match c {
        Some(c) => ((&mut c.attempt).await, c.started, c.fresh),
        None => std::future::pending().await,
    }
}

impl Driver {
    async fn run(mut self) {
        // Events the handshake carried (see `open_link`) are handled before anything is read.
        self.on_frames();
        // One timer for every deadline of the loop (keep-alive, silence, reconnect, notice,
        // presumed loss), armed at the earliest and re-armed only when that moves earlier or
        // it fires: a turn that handles requests touches no timer. Firing early is harmless,
        // because `on_timer` looks at what is actually due.
        let mut armed = self.next_wake();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        loop {
            let mut fired = false;
            tokio::select! {
                cmd = self.rx.recv() => {
                    self.now = Instant::now();
                    let mut next = cmd;
                    // Every command already queued goes out in the same write.
                    loop {
                        match next {
                            Some(Cmd::Shutdown { reply }) => {
                                self.flush().await;
                                self.close_session().await;
                                let _ = reply.send(());
                                return;
                            }
                            Some(cmd) => self.on_cmd(cmd),
                            None => {
                                // Every handle is gone: end the session so its leases free
                                // at once.
                                self.flush().await;
                                self.close_session().await;
                                return;
                            }
                        }
                        next = match self.rx.try_recv() {
                            Ok(cmd) => Some(cmd),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                        };
                    }
                }
                r = read_more(&mut self.link) => {
                    self.now = Instant::now();
                    match r {
                        Ok(()) => {
                            self.heard();
                            self.on_frames();
                        }
                        Err(why) => self.disconnected(&why),
                    }
                }
                (opened, started, fresh) = attempt_done(&mut self.connecting) => {
                    self.now = Instant::now();
                    self.connecting = None;
                    self.on_attempt(opened, started, fresh);
                }
                () = &mut timer => {
                    self.now = Instant::now();
                    fired = true;
                    self.on_timer();
                }
            }
            self.flush().await;
            for sent in self.sent.drain(..) {
                let _ = sent.send(());
            }
            #[cfg(test)]
            self.health
                .watched
                .store(self.leases.len() as u64, Ordering::Relaxed);
            let at = self.next_wake();
            if at < armed || fired {
                armed = at;
                timer.as_mut().reset(at);
            }
        }
    }

    /// The earliest deadline the loop has to act on (see `on_timer`).
    fn next_wake(&self) -> Instant {
        let mut at = self.last_keepalive + FAR;
        if self.link.is_some() {
            at = at.min(self.last_keepalive + self.ttl / 3);
            if let Some(since) = self.awaiting_since {
                at = at.min(since + self.silence_limit());
            }
        } else if self.connecting.is_none() && self.refused.is_none() {
            at = at.min(self.next_attempt);
        }
        if let Some(notice) = &self.notice {
            at = at.min(notice.due());
        }
        if !self.leases.is_empty() {
            at = at.min(self.presumed_lost_at());
        }
        at
    }

    /// Give up a little before the coordinator may: clocks on two machines run at slightly
    /// different rates, and our timer fires a little late under load.
    fn presumed_lost_at(&self) -> Instant {
        self.last_contact + self.ttl - self.ttl / SAFETY_DIVISOR
    }

    /// The loop's timer fired: does what is due.
    fn on_timer(&mut self) {
        let now = self.now;
        if self.link.is_some() {
            if let Some(since) = self.awaiting_since {
                let limit = self.silence_limit();
                if now >= since + limit {
                    self.disconnected(&format!("no answer for {limit:?}"));
                }
            }
        }
        if self.link.is_some() && now >= self.last_keepalive + self.ttl / 3 {
            self.last_keepalive = now;
            self.awaiting_since.get_or_insert(now);
            self.submit(Req::KeepAlive, None, None);
        }
        if self.link.is_none()
            && self.connecting.is_none()
            && self.refused.is_none()
            && now >= self.next_attempt
        {
            self.reconnect(None);
        }
        if let Some(notice) = &mut self.notice {
            if now >= notice.due() {
                notice.show(&self.addr, now);
            }
        }
        if !self.leases.is_empty() && now >= self.presumed_lost_at() {
            // Each permit's `lost` says so; `turnstile run` prints it in its own words.
            tracing::debug!("no answer from the coordinator for a whole TTL; leases presumed lost");
            self.abandoned.extend(self.leases.keys().copied());
            self.lose_all(LostReason::Unreachable);
            // Push the contact mark forward so this does not fire again at once.
            self.last_contact = now;
        }
    }

    /// The error every call gets once the coordinator refused the handshake.
    fn refusal(&self) -> Error {
        let (code, message) = self.refused.clone().unwrap_or((
            ErrorCode::Handshake,
            "the coordinator refused the handshake".into(),
        ));
        Error::Rejected { code, message }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Call { reply, .. } if self.refused.is_some() => {
                let _ = reply.send(Err(self.refusal()));
            }
            Cmd::Call { req, reply, lost } => {
                if let Req::FinishJob { lease, .. } | Req::Release { lease } = req {
                    // The coordinator releases the lease as it records the end or handles the
                    // release; from here no loss is to be reported for it (and a released
                    // lease must not stay in the map, which would grow with every pair).
                    self.leases.remove(&lease);
                }
                self.submit(req, Some(reply), lost)
            }
            Cmd::Forget { lease, sent } => {
                self.leases.remove(&lease);
                self.submit(Req::Release { lease }, None, None);
                if let Some(sent) = sent {
                    self.sent.push(sent);
                }
            }
            Cmd::Probe => {
                if self.link.is_some() {
                    self.awaiting_since.get_or_insert(self.now);
                    self.submit(Req::KeepAlive, None, None);
                }
            }
            Cmd::Shutdown { .. } => {}
        }
    }

    /// Records a request as pending and queues it for the turn's write if connected;
    /// otherwise it goes out after the next reconnect.
    fn submit(
        &mut self,
        req: Req,
        reply: Option<Reply>,
        lost: Option<watch::Sender<Option<LostReason>>>,
    ) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        // Encoded straight into the write buffer: no buffer of its own per request.
        let mark = self.out.len();
        encode(id, &req, &mut self.out);
        let size = (self.out.len() - mark).saturating_sub(4);
        if self.link.is_none() {
            // Sent with every other pending request once a link is made.
            self.out.truncate(mark);
        }
        if size > proto::MAX_REQUEST_FRAME {
            // The coordinator would refuse it and close the connection, and every reconnect
            // would send it again: fail the call here instead.
            self.out.truncate(mark);
            let message = format!(
                "the request is {size} bytes, over the coordinator's limit of {} (a name or \
                 reason too long?)",
                proto::MAX_REQUEST_FRAME
            );
            if let Some(reply) = reply {
                let _ = reply.send(Err(Error::Rejected {
                    code: ErrorCode::TooLarge,
                    message,
                }));
            }
            return;
        }
        self.pending.insert(
            id,
            Pending {
                req,
                reply,
                lost,
                // The start of the turn: no later than the send, as the contact mark needs.
                sent_at: self.now,
                resent: false,
            },
        );
    }

    /// Writes what the turn queued, in one go.
    async fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let Some(link) = &mut self.link else {
            self.out.clear();
            return;
        };
        #[cfg(test)]
        self.health.writes.fetch_add(1, Ordering::Relaxed);
        // The socket almost always takes it all at once; only a full send buffer waits, bounded
        // so that a peer that stopped reading cannot stall the loop.
        let result = match link.wr.try_write(&self.out) {
            Ok(n) if n == self.out.len() => Ok(()),
            Ok(n) => write_rest(&mut link.wr, &self.out[n..]).await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                write_rest(&mut link.wr, &self.out).await
            }
            Err(e) => Err(format!("write failed: {e}")),
        };
        self.out.clear();
        if self.out.capacity() > OUT_KEEP {
            // A large re-send after a reconnect: do not keep its memory for ever.
            self.out.shrink_to(OUT_KEEP);
        }
        if let Err(why) = result {
            self.disconnected(&why);
        }
    }

    /// How long a keep-alive may go unanswered before the link counts as dead: long enough
    /// for a loaded coordinator, short enough to re-make the link well within the TTL.
    fn silence_limit(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(10))
    }

    /// Bytes came from the coordinator.
    fn heard(&mut self) {
        self.awaiting_since = None;
        let now = self.health.ms(self.now);
        self.health.last_heard.store(now, Ordering::Relaxed);
    }

    /// Moves the contact mark (see `last_contact`), for callers too.
    fn contact(&mut self, at: Instant) {
        self.last_contact = at;
        let at = self.health.ms(at);
        self.health.last_contact.store(at, Ordering::Relaxed);
    }

    fn disconnected(&mut self, why: &str) {
        // Whatever was queued for the dead link goes out again with the other pending
        // requests after the reconnect.
        self.out.clear();
        if self.link.take().is_some() {
            // Quiet: a restart of the coordinator must stay invisible. The notice says so if
            // the coordinator stays away.
            tracing::debug!(addr = %self.addr, why, "lost the connection to the coordinator; reconnecting");
            self.backoff = MIN_BACKOFF;
            self.next_attempt = Instant::now();
            self.awaiting_since = None;
            self.health.connected.store(false, Ordering::Relaxed);
            let heard = self.health.last_heard.load(Ordering::Relaxed);
            let _ = self.health.away_since.compare_exchange(
                NEVER,
                heard,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if self.notice.is_none() {
                self.notice = Some(Notice::resuming(self.health.at(heard)));
            }
        }
    }

    /// Starts a connection attempt beside the loop: resuming the session, or opening the
    /// `fresh` one.
    fn reconnect(&mut self, fresh: Option<u64>) {
        // The coordinator refreshes the session when the resume arrives, which is after this.
        let started = Instant::now();
        let hello = match fresh {
            Some(session) => Hello::Open {
                session,
                ttl_ms: self.ttl_ms,
            },
            None => Hello::Resume {
                session: self.session.load(Ordering::Relaxed),
            },
        };
        let limit = (self.ttl / 2).clamp(Duration::from_millis(500), CONNECT_TIMEOUT);
        self.connecting = Some(Connecting {
            attempt: Box::pin(open_link(
                self.addr.clone(),
                self.tls.clone(),
                self.name.clone(),
                self.token.clone(),
                hello,
                started + limit,
            )),
            started,
            fresh,
        });
    }

    /// A connection attempt finished.
    fn on_attempt(&mut self, opened: Opened, attempt_started: Instant, fresh: Option<u64>) {
        let opened = match opened {
            Ok(Ok(ok)) => {
                if let Some(fresh) = fresh {
                    self.session.store(fresh, Ordering::Relaxed);
                    self.borrowed = false;
                }
                Some(ok)
            }
            Ok(Err(e)) if fresh.is_none() && e.code() == Some(ErrorCode::SessionNotFound) => {
                // The session expired while we were away: its leases are gone. Carry on with
                // a new session, so that waiting and future acquires still work.
                let session = self.session.load(Ordering::Relaxed);
                tracing::warn!(
                    session = format_args!("{session:016x}"),
                    "session expired while disconnected"
                );
                self.lose_all(LostReason::Expired);
                self.abandoned.clear();
                self.reconnect(Some(random_id()));
                return;
            }
            Err(Error::Rejected { code, message }) => {
                // The handshake itself was refused: no retry can fix that. Fail what waits,
                // and every later call, with the coordinator's reason.
                tracing::warn!(?code, "the coordinator refused the handshake: {message}");
                self.refused = Some((code, message));
                for (_, p) in std::mem::take(&mut self.pending) {
                    if let Some(reply) = p.reply {
                        let _ = reply.send(Err(self.refusal()));
                    }
                }
                return;
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(error = ?e, "reconnect failed");
                None
            }
        };
        let Some((link, ttl)) = opened else {
            // Back off with jitter, so that many clients do not reconnect in lockstep.
            let jitter =
                Duration::from_millis(random_id() % (self.backoff.as_millis() as u64 / 2 + 1));
            self.next_attempt = Instant::now() + self.backoff + jitter;
            let max = (self.ttl / BACKOFF_TTL_DIVISOR).clamp(MIN_BACKOFF, MAX_BACKOFF);
            self.backoff = (self.backoff * 2).min(max);
            return;
        };
        tracing::debug!(addr = %self.addr, "reconnected to the coordinator");
        if self.notice.take().is_some_and(|n| n.shown) {
            tracing::info!("the coordinator at {} answers again", self.addr);
        }
        self.ttl = ttl;
        self.link = Some(link);
        let now = Instant::now();
        self.health.ttl_ms.store(
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.heard();
        self.health.connected.store(true, Ordering::Relaxed);
        self.health.away_since.store(NEVER, Ordering::Relaxed);
        self.contact(attempt_started);
        self.last_keepalive = now;
        // The write buffer is empty between turns, so the re-sent requests go first.
        for (id, p) in &mut self.pending {
            p.resent = true;
            p.sent_at = now;
            encode(*id, &p.req, &mut self.out);
        }
        for lease in std::mem::take(&mut self.abandoned) {
            self.submit(Req::Release { lease }, None, None);
        }
        if !self.leases.is_empty() {
            self.submit(Req::Leases, None, None);
        }
        // Events the handshake carried (see `open_link`).
        self.on_frames();
    }

    /// Handles every whole frame the link's buffer holds.
    fn on_frames(&mut self) {
        let Some(link) = &mut self.link else { return };
        // Taken out so that the replies can be handled while it is read; the frames handled
        // are dropped from its front once, at the end, not one by one.
        let mut buf = std::mem::take(&mut link.buf);
        let mut pos = 0;
        loop {
            let (id, reply) = match split_frame(&buf[pos..], MAX_REPLY_FRAME) {
                Ok(Some((payload, used))) => {
                    let decoded = decode_reply(payload).map(|(id, r)| (id, owned(r)));
                    pos += used;
                    match decoded {
                        Ok(x) => x,
                        Err(e) => return self.disconnected(&format!("bad frame from server: {e}")),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if let proto::DecodeError::TooLarge { .. } = e {
                        // The reply cannot be taken, and asking again would bring the same:
                        // fail its request (named in the frame's header) rather than re-send
                        // it after the reconnect.
                        let id = buf
                            .get(pos + 5..pos + 9)
                            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                        if let Some(p) = id.and_then(|id| self.pending.remove(&id)) {
                            if let Some(reply) = p.reply {
                                let _ = reply.send(Err(Error::Rejected {
                                    code: ErrorCode::TooLarge,
                                    message: format!("the coordinator's reply is too large: {e}"),
                                }));
                            }
                        }
                    }
                    return self.disconnected(&format!("bad frame from server: {e}"));
                }
            };
            self.on_reply(id, reply);
        }
        if let Some(link) = &mut self.link {
            buf.drain(..pos);
            link.buf = buf;
        }
    }

    fn on_reply(&mut self, id: u32, reply: OwnedReply) {
        if id == 0
            || matches!(
                reply,
                OwnedReply::LeaseLost(..) | OwnedReply::SessionLost(_)
            )
        {
            return self.on_event(reply);
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let result = match reply {
            OwnedReply::Done => Ok(Answer::Done),
            OwnedReply::Granted(token) => Ok(Answer::Granted { token }),
            OwnedReply::Status(json) => Ok(Answer::Status(json)),
            OwnedReply::Answer(answer) => Ok(answer),
            OwnedReply::SessionOpened(ttl) => {
                self.ttl = ttl;
                Ok(Answer::Done)
            }
            OwnedReply::Leases(held) => {
                self.reconcile(&held);
                Ok(Answer::Done)
            }
            OwnedReply::Error(code, message) => Err(match code {
                ErrorCode::TimedOut => Error::TimedOut,
                ErrorCode::SessionEnded => Error::SessionLost,
                _ => Error::Rejected { code, message },
            }),
            OwnedReply::LeaseLost(..) | OwnedReply::SessionLost(_) => return, // handled above
        };
        let session_alive =
            !matches!(&result, Err(e) if e.code() == Some(ErrorCode::SessionNotFound));
        if session_alive && p.req.refreshes_session() && p.sent_at > self.last_contact {
            self.contact(p.sent_at);
        }
        if !session_alive {
            self.session_gone(LostReason::Expired);
        }
        let result = match (&p.req, result) {
            // A re-sent release whose first copy got through finds nothing to release.
            (Req::Release { .. }, Err(e))
                if p.resent && e.code() == Some(ErrorCode::UnknownLease) =>
            {
                Ok(Answer::Done)
            }
            (_, r) => r,
        };
        if let (
            Req::Acquire { lease, .. } | Req::BeginJob { lease, .. },
            Ok(Answer::Granted { .. }),
        ) = (&p.req, &result)
        {
            let caller_waits = p.reply.as_ref().is_some_and(|r| !r.is_closed());
            match p.lost {
                Some(lost) if caller_waits => {
                    self.leases.insert(*lease, lost);
                }
                _ => {
                    // Nobody wants this grant any more (the acquire was dropped): give it back.
                    let lease = *lease;
                    return self.submit(Req::Release { lease }, None, None);
                }
            }
        }
        if let Some(reply) = p.reply {
            let _ = reply.send(result);
        }
    }

    fn on_event(&mut self, event: OwnedReply) {
        match event {
            OwnedReply::LeaseLost(lease, reason) => {
                if let Some(tx) = self.leases.remove(&lease) {
                    let _ = tx.send(Some(reason));
                }
            }
            OwnedReply::SessionLost(reason) => self.session_gone(reason),
            OwnedReply::Error(code, message) => {
                // Unsolicited errors: the server is shutting down, or we broke the protocol.
                tracing::warn!(?code, message, "the coordinator reports an error");
            }
            _ => {}
        }
    }

    /// The session ended on the coordinator: every lease is lost; open a new session so the
    /// client stays usable.
    fn session_gone(&mut self, reason: LostReason) {
        self.lose_all(reason);
        self.abandoned.clear();
        let fresh = random_id();
        self.session.store(fresh, Ordering::Relaxed);
        self.borrowed = false;
        let ttl_ms = self.ttl_ms;
        self.submit(
            Req::OpenSession {
                session: fresh,
                ttl_ms,
            },
            None,
            None,
        );
    }

    /// The answer to the `Leases` sent after a resume: every lease we count as held that the
    /// coordinator does not list is lost. A restarted coordinator may have lost the record of
    /// a grant (a damaged end of its log), and a lease may have ended while we were away
    /// without its event reaching us; either way the holder must stop, never silently keep
    /// it. The answer cannot miss a lease we heard granted: the coordinator sends it ahead of
    /// the reply of any grant decided after it, and a lease granted before it is listed.
    fn reconcile(&mut self, held: &[u64]) {
        let held: std::collections::HashSet<u64> = held.iter().copied().collect();
        self.leases.retain(|lease, lost| {
            let keep = held.contains(lease);
            // A closed channel is a permit already released or dropped: nothing to tell.
            if !keep && !lost.is_closed() {
                tracing::warn!(
                    lease = %lease,
                    "the coordinator no longer has this lease (found on resuming the session)"
                );
                let _ = lost.send(Some(LostReason::Forgotten));
            }
            keep
        });
    }

    fn lose_all(&mut self, reason: LostReason) {
        for (_, tx) in self.leases.drain() {
            let _ = tx.send(Some(reason));
        }
    }

    async fn close_session(&mut self) {
        // Nobody is connected to tell: the TTL ends the session on the coordinator.
        self.connecting = None;
        if self.link.is_none() {
            return;
        }
        self.now = Instant::now();
        if self.borrowed {
            // Our own leases, held or still queued for; the session stays.
            let mut mine: Vec<u64> = self.leases.keys().copied().collect();
            mine.extend(self.pending.values().filter_map(|p| match p.req {
                Req::Acquire { lease, .. } | Req::BeginJob { lease, .. } => Some(lease),
                _ => None,
            }));
            self.leases.clear();
            for lease in mine {
                self.submit(Req::Release { lease }, None, None);
            }
        } else {
            self.submit(Req::CloseSession, None, None);
        }
        self.flush().await;
        // Wait briefly for the answers, so that the leases are free when we return.
        let wait = async {
            while self
                .pending
                .values()
                .any(|p| matches!(p.req, Req::CloseSession | Req::Release { .. }))
            {
                match read_more(&mut self.link).await {
                    Ok(()) => {
                        self.now = Instant::now();
                        self.on_frames();
                        self.flush().await;
                    }
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, wait).await;
    }
}

/// Reads more bytes into the link's buffer. Pending forever when there is no link, so that it
/// can sit in a `select!` arm. Cancel-safe: `read_buf` either reads or does nothing.
async fn read_more(link: &mut Option<Link>) -> Result<(), String> {
    let Some(link) = link else {
        return std::future::pending().await;
    };
    // Room for many replies, so that one read takes every frame that has arrived.
    link.buf.reserve(READ_CHUNK);
    match link.rd.read_buf(&mut link.buf).await {
        Ok(0) => Err("the coordinator closed the connection".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read failed: {e}")),
    }
}

fn encode(id: u32, req: &Req, out: &mut Vec<u8>) {
    let wire = match req {
        Req::Ensure { name, capacity } => proto::Request::Ensure {
            capacity: *capacity,
            name,
        },
        Req::Acquire {
            lease,
            weight,
            deadline,
            name,
        } => proto::Request::Acquire {
            lease: *lease,
            weight: *weight,
            timeout_ms: timeout_left(*deadline),
            name,
        },
        Req::Release { lease } => proto::Request::Release { lease: *lease },
        Req::Close { name } => proto::Request::Close { name },
        Req::SetCapacity { name, capacity } => proto::Request::SetCapacity {
            capacity: *capacity,
            name,
        },
        Req::Delete { name } => proto::Request::Delete { name },
        Req::Revoke { name, lease } => proto::Request::Revoke {
            lease: *lease,
            name,
        },
        Req::Status {
            name,
            prefix,
            after,
        } => proto::Request::Status {
            name,
            prefix,
            after,
            limit: 0,
        },
        Req::EndSession { session } => proto::Request::EndSession { session: *session },
        Req::OpenSession { session, ttl_ms } => proto::Request::OpenSession {
            session: *session,
            ttl_ms: *ttl_ms,
        },
        Req::KeepAlive => proto::Request::KeepAlive,
        Req::CloseSession => proto::Request::CloseSession,
        Req::BeginJob {
            lease,
            deadline,
            job,
            group,
        } => proto::Request::BeginJob {
            lease: *lease,
            timeout_ms: timeout_left(*deadline),
            job,
            group,
        },
        Req::FinishJob {
            lease,
            succeeded,
            started_unix_ms,
            duration_ms,
            reason,
        } => proto::Request::FinishJob {
            lease: *lease,
            succeeded: *succeeded,
            started_unix_ms: *started_unix_ms,
            duration_ms: *duration_ms,
            reason,
        },
        Req::ResetJob { job } => proto::Request::ResetJob { job },
        Req::WaitGroup {
            wait,
            jobs,
            deadline,
            group,
        } => proto::Request::WaitGroup {
            wait: *wait,
            jobs: *jobs,
            timeout_ms: timeout_left(*deadline),
            group,
        },
        Req::Leases => proto::Request::Leases,
    };
    encode_request(id, &wire, out);
}

/// The wire timeout of a request with `deadline`: a re-sent request waits only for what is
/// left of its timeout.
fn timeout_left(deadline: Option<Instant>) -> u32 {
    match deadline {
        None => NO_TIMEOUT,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).as_millis();
            u32::try_from(left)
                .unwrap_or(NO_TIMEOUT - 1)
                .min(NO_TIMEOUT - 1)
        }
    }
}

/// A reply copied out of the receive buffer.
enum OwnedReply {
    Done,
    /// A job or group answer, already in its final form.
    Answer(Answer),
    Granted(u64),
    Status(Vec<u8>),
    SessionOpened(Duration),
    Error(ErrorCode, String),
    LeaseLost(u64, LostReason),
    SessionLost(LostReason),
    /// The session's held leases.
    Leases(Vec<u64>),
}

fn lost_reason(r: proto::LostReason) -> LostReason {
    match r {
        proto::LostReason::Expired => LostReason::Expired,
        proto::LostReason::Closed => LostReason::Closed,
        proto::LostReason::SessionEnded => LostReason::SessionEnded,
        proto::LostReason::Revoked => LostReason::Revoked,
    }
}

fn owned(r: proto::Reply<'_>) -> OwnedReply {
    match r {
        proto::Reply::Done | proto::Reply::Pong | proto::Reply::HelloOk { .. } => OwnedReply::Done,
        proto::Reply::Granted { token } => OwnedReply::Granted(token),
        proto::Reply::Status { json } => OwnedReply::Status(json.to_vec()),
        proto::Reply::SessionOpened { ttl_ms, .. } => {
            OwnedReply::SessionOpened(Duration::from_millis(u64::from(ttl_ms)))
        }
        proto::Reply::Error { code, message } => OwnedReply::Error(code, message.to_owned()),
        proto::Reply::LeaseLost { lease, reason, .. } => {
            OwnedReply::LeaseLost(lease, lost_reason(reason))
        }
        proto::Reply::SessionLost { reason, .. } => OwnedReply::SessionLost(lost_reason(reason)),
        proto::Reply::JobCompleted {
            token,
            started_unix_ms,
            duration_ms,
            client,
        } => OwnedReply::Answer(Answer::JobCompleted(JobCompletion {
            client: client.to_owned(),
            token,
            started: std::time::UNIX_EPOCH + Duration::from_millis(started_unix_ms),
            duration: Duration::from_millis(duration_ms),
        })),
        proto::Reply::JobBusy {
            token,
            age_ms,
            client,
        } => OwnedReply::Answer(Answer::JobBusy(JobRunner {
            client: client.to_owned(),
            token,
            running_for: Duration::from_millis(age_ms),
        })),
        proto::Reply::JobReset { was_completed } => {
            OwnedReply::Answer(Answer::JobReset(was_completed))
        }
        proto::Reply::GroupSettled {
            jobs,
            completed,
            running,
            failures,
        } => OwnedReply::Answer(Answer::GroupSettled(GroupSummary {
            jobs,
            completed,
            running,
            failures,
        })),
        proto::Reply::Leases { leases } => OwnedReply::Leases(leases.iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-process coordinator on a free port: its address.
    async fn coordinator() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = turnstile_server::run(
                listener,
                turnstile_server::Config::default(),
                std::future::pending::<()>(),
            )
            .await;
        });
        addr.to_string()
    }

    /// A client of the coordinator at `addr`, with its `Health`.
    async fn client_of(addr: &str) -> (crate::Client, Arc<Health>) {
        let backend = TcpBackend::connect(addr.to_owned(), None, Options::default())
            .await
            .expect("connect");
        let health = backend.health.clone();
        (crate::Client::from_backend(Arc::new(backend)), health)
    }

    /// An in-process coordinator on a free port, and a client of it with its `Health`.
    async fn client() -> (crate::Client, Arc<Health>) {
        client_of(&coordinator().await).await
    }

    /// A fake coordinator on `listener`, for tests that need answers the real one never gives
    /// (or none at all): it reads whole frames, calls `answer` with each request (its id, the
    /// request, and the buffer of replies to write), and writes what that buffer holds after
    /// each read. It stops when the client goes.
    async fn fake_coordinator(
        listener: tokio::net::TcpListener,
        mut answer: impl FnMut(u32, proto::Request<'_>, &mut Vec<u8>) + Send + 'static,
    ) {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.expect("read");
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut out = Vec::new();
            while let Some((payload, used)) = split_frame(&buf, MAX_REPLY_FRAME).expect("a frame") {
                let (id, req) = proto::decode_request(payload).expect("a request");
                answer(id, req, &mut out);
                buf.drain(..used);
            }
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// The answers a fake coordinator gives to a client's handshake (`Hello`, then the
    /// session's request), or `None` for another request.
    fn handshake_answer(id: u32, req: &proto::Request<'_>, out: &mut Vec<u8>) -> Option<()> {
        let reply = match req {
            proto::Request::Hello { .. } => proto::Reply::HelloOk {
                version: proto::VERSION,
                default_ttl_ms: 10_000,
                server: "fake",
            },
            proto::Request::OpenSession { .. } => proto::Reply::SessionOpened {
                ttl_ms: 60_000,
                existed: false,
            },
            _ => return None,
        };
        proto::encode_reply(id, &reply, out);
        Some(())
    }

    /// `send_release` returns once the release is written, without its answer: against a
    /// coordinator that never answers releases, it still returns, and the release arrives.
    #[tokio::test]
    async fn send_release_returns_without_waiting_for_the_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (released_tx, mut released_rx) = mpsc::unbounded_channel();
        tokio::spawn(fake_coordinator(listener, move |id, req, out| {
            if handshake_answer(id, &req, out).is_some() {
                return;
            }
            match req {
                proto::Request::Ensure { .. } => proto::encode_reply(id, &proto::Reply::Done, out),
                proto::Request::Acquire { .. } => {
                    proto::encode_reply(id, &proto::Reply::Granted { token: 7 }, out)
                }
                proto::Request::Release { lease } => {
                    let _ = released_tx.send(lease); // and no answer, ever
                }
                _ => {}
            }
        }));
        let backend = TcpBackend::connect(addr.to_string(), None, Options::default())
            .await
            .expect("connect");
        let client = crate::Client::from_backend(Arc::new(backend));
        let sem = client.semaphore("unanswered", 1).await.expect("ensure");
        let permit = sem.acquire().await.expect("acquire");
        let lease = permit.lease_id();
        tokio::time::timeout(Duration::from_secs(10), permit.send_release())
            .await
            .expect("send_release does not wait for an answer")
            .expect("sent");
        let seen = tokio::time::timeout(Duration::from_secs(10), released_rx.recv())
            .await
            .expect("the release reached the coordinator");
        assert_eq!(seen, Some(lease));
    }

    /// Against the real coordinator: a loop of acquire and `send_release` on a capacity-1
    /// semaphore is granted every time (each release is handled before the next acquire,
    /// which follows it on the connection), another client queued behind gets the slot, and
    /// once a later request is answered the coordinator holds none of the released leases.
    #[tokio::test]
    async fn send_release_frees_the_slot_before_the_next_request() {
        let addr = coordinator().await;
        let (a, _) = client_of(&addr).await;
        let sem = a.semaphore("pipelined", 1).await.expect("ensure");
        for _ in 0..50 {
            let permit = tokio::time::timeout(Duration::from_secs(10), sem.acquire())
                .await
                .expect("granted, not queued behind its own released lease")
                .expect("acquire");
            permit.send_release().await.expect("sent");
        }
        // Another client waits behind a held permit, which is then released unconfirmed.
        let held = sem.acquire().await.expect("acquire");
        let (b, _) = client_of(&addr).await;
        let b_sem = b.semaphore("pipelined", 1).await.expect("ensure b");
        let waiting = tokio::spawn(async move { b_sem.acquire().await.map(drop) });
        while a
            .status(Some("pipelined"))
            .await
            .expect("status")
            .semaphores[0]
            .queued
            == 0
        {
            tokio::task::yield_now().await;
        }
        held.send_release().await.expect("sent");
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter got the slot")
            .expect("join")
            .expect("acquire b");
        b.shutdown().await.expect("shutdown b");
        let status = a.status(Some("pipelined")).await.expect("status");
        let sem = &status.semaphores[0];
        assert_eq!(
            (sem.in_use, sem.holders.len()),
            (0, 0),
            "a released lease is still held"
        );
        a.shutdown().await.expect("shutdown");
    }

    /// Requests queued by many callers while the driver was busy go out in one write, and
    /// each caller gets its own answer: half of them ask for what their semaphore has
    /// (granted), half for more than its capacity (refused at once).
    #[tokio::test]
    async fn queued_requests_share_one_write() {
        const CALLERS: usize = 64;
        let (client, health) = client().await;
        let mut sems = Vec::new();
        for i in 0..CALLERS {
            sems.push(
                client
                    .semaphore(&format!("w-{i}"), 2)
                    .await
                    .expect("ensure"),
            );
        }
        let before = health.writes.load(Ordering::Relaxed);
        // On this one-thread runtime, every caller queues its request before the driver runs.
        let calls: Vec<_> = sems
            .into_iter()
            .enumerate()
            .map(|(i, sem)| {
                let weight = if i % 2 == 0 { 2 } else { 3 };
                tokio::spawn(async move { (i, sem.acquire_many(weight).await) })
            })
            .collect();
        let mut granted = Vec::new();
        for call in calls {
            let (i, answer) = call.await.expect("join");
            match answer {
                Ok(permit) => {
                    assert_eq!(i % 2, 0, "caller {i} got another's grant");
                    granted.push(permit);
                }
                Err(e) => assert!(
                    i % 2 == 1 && e.code().is_some(),
                    "caller {i} got another's refusal: {e}"
                ),
            }
        }
        let writes = health.writes.load(Ordering::Relaxed) - before;
        assert_eq!(granted.len(), CALLERS / 2);
        assert!(
            writes <= 2,
            "{CALLERS} queued requests took {writes} writes instead of one"
        );
        drop(granted);
        client.shutdown().await.expect("shutdown");
    }

    /// A coordinator may tell a session's end as an event before its answer to the session
    /// request (a client stopped past its TTL re-opens its id just as the sweep catches up).
    /// The connection still comes up, and the driver handles the event as on any link: a
    /// fresh session is opened. (Before, the handshake failed with "unexpected reply".)
    #[tokio::test]
    async fn a_session_lost_during_the_handshake_opens_a_fresh_session() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let mut seen_tx = Some(seen_tx);
        let mut sessions: Vec<u64> = Vec::new();
        tokio::spawn(fake_coordinator(listener, move |id, req, out| {
            let proto::Request::OpenSession { session, .. } = req else {
                return; // the Hello is answered with the first session's answer
            };
            sessions.push(session);
            if sessions.len() == 1 {
                let hello = proto::Reply::HelloOk {
                    version: proto::VERSION,
                    default_ttl_ms: 10_000,
                    server: "fake",
                };
                proto::encode_reply(1, &hello, out);
                let lost = proto::Reply::SessionLost {
                    session,
                    reason: proto::LostReason::Expired,
                };
                proto::encode_reply(0, &lost, out);
                let opened = proto::Reply::SessionOpened {
                    ttl_ms: 10_000,
                    existed: false,
                };
                proto::encode_reply(id, &opened, out);
            } else if let Some(tx) = seen_tx.take() {
                let _ = tx.send((sessions[0], sessions[1]));
            }
        }));
        let backend = TcpBackend::connect(addr.to_string(), None, Options::default())
            .await
            .expect("the handshake succeeds despite the event");
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), seen_rx)
            .await
            .expect("a fresh session is opened")
            .expect("the fake server saw it");
        assert_ne!(first, second, "the fresh session has a new id");
        assert_eq!(backend.session.load(Ordering::Relaxed), second);
    }

    /// A permit released with `release()` leaves the driver's map of leases to watch: it
    /// would otherwise grow by one with every pair for the life of the client.
    #[tokio::test]
    async fn released_leases_are_not_watched() {
        let (client, health) = client().await;
        let sem = client.semaphore("watched", 1).await.expect("ensure");
        for _ in 0..20 {
            sem.acquire()
                .await
                .expect("acquire")
                .release()
                .await
                .expect("release");
        }
        let held = sem.acquire().await.expect("acquire");
        // A round trip after the grant, so that the driver has ended the turn that saw it.
        client.status(Some("watched")).await.expect("status");
        assert_eq!(health.watched.load(Ordering::Relaxed), 1);
        drop(held);
        client.shutdown().await.expect("shutdown");
    }
}
