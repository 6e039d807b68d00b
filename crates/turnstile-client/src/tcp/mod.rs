//! The coordinator backend (`tcp://HOST:PORT`).
//!
//! One driver task owns the connection. Callers send it commands over a channel and get their
//! answers on oneshot channels — except that a caller whose call is the only one awaited on
//! the client writes its frame itself, and reads its answer itself, which spares the
//! hand-offs (see `writer` and `reader`). The driver
//! matches replies by request id, keeps the session alive, and survives disconnections: it
//! reconnects with exponential
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use turnstile_proto::{
    self as proto, decode_reply, encode_request, split_frame, ErrorCode, StatusDoc,
    MAX_REPLY_FRAME, NO_TIMEOUT,
};

use self::driver::Driver;
use self::link::{first_link, Hello};
use self::writer::{Own, Sent, Shared};
use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
use crate::lost::{self, LostReceiver, LostSender};
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

/// The driver's maps, keyed by our own request and lease ids: a fast hash, since no peer
/// chooses the keys.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

enum Cmd {
    /// A caller's call, counted in [`Shared::waiting`].
    Call(Own),
    /// Release without waiting for the answer: a dropped acquire, and a dropped permit or a
    /// `send_release` that found no link its caller may write on (see `writer`).
    Forget {
        lease: u64,
        /// Fired once the turn that queued the release has written it (or found no link, in
        /// which case it goes out with the other pending requests after the reconnect).
        sent: Option<oneshot::Sender<()>>,
    },
    /// Write what callers left in the shared buffer (see `writer`).
    Flush {
        /// Fired once the turn has written it, as for `Forget`.
        sent: Option<oneshot::Sender<()>>,
    },
    /// Send a keep-alive now: a caller whose deadline passed wants to know whether the
    /// coordinator answers.
    Probe,
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// How many leases the driver watches for loss, once it has taken the book.
    #[cfg(test)]
    Watched {
        reply: oneshot::Sender<usize>,
    },
}

struct Pending {
    req: Req,
    reply: Option<Reply>,
    lost: Option<LostSender>,
    sent_at: Instant,
    resent: bool,
    /// See [`Own::until_gone`].
    until_gone: bool,
    /// Counted in [`Shared::waiting`] (a caller's call), until the driver takes it out.
    counted: bool,
}

/// The read side of a link, in [`Shared::inbox`] (see `reader`); the write half is in the
/// writer.
struct Link {
    rd: LinkRead,
    buf: Vec<u8>,
}

/// The coordinator backend: a handle on the driver task.
pub(crate) struct TcpBackend {
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    session: Arc<AtomicU64>,
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
    /// Of those, the writes callers made themselves (see `writer`).
    #[cfg(test)]
    own_writes: AtomicU64,
    /// Answers callers read themselves (see `reader`).
    #[cfg(test)]
    own_reads: AtomicU64,
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
            own_writes: AtomicU64::new(0),
            #[cfg(test)]
            own_reads: AtomicU64::new(0),
        }
    }

    /// Bytes came from the coordinator at `at`. Never moves back: the driver and a reading
    /// caller may both tell.
    fn heard(&self, at: Instant) {
        self.last_heard.fetch_max(self.ms(at), Ordering::Relaxed);
    }

    /// The coordinator answered a session-refreshing request sent at `at`: the session lives
    /// until at least `at` plus the TTL. Never moves back, as for `heard`.
    fn contact(&self, at: Instant) {
        self.last_contact.fetch_max(self.ms(at), Ordering::Relaxed);
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
        let (link, wr, ttl) = first_link(
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
        let shared = Arc::new(Shared::new(wr, link, crate::lease_id_base()));
        let driver = Driver {
            shared: shared.clone(),
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
            linked: true,
            pending: Map::default(),
            leases: Map::default(),
            abandoned: Vec::new(),
            last_contact: now,
            last_keepalive: now,
            backoff: MIN_BACKOFF,
            next_attempt: now,
            borrowed,
            out: Vec::with_capacity(4096),
            now,
            sent: Vec::new(),
            book: Default::default(),
            flush_shared: false,
            answered: 0,
            gone_pending: false,
        };
        let addr = driver.addr.clone();
        tokio::spawn(driver.run());
        Ok(TcpBackend {
            tx,
            shared,
            session: session_cell,
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
    async fn answer(&self, wait: AnswerWait<'_>, until: Until) -> Result<Answer, Error> {
        self.settled(wait, until).await?
    }

    /// The wait for the answer to a request sent with [`TcpBackend::send_call`].
    fn wait_for(
        &self,
        rx: oneshot::Receiver<Result<Answer, Error>>,
        own: Option<u32>,
    ) -> AnswerWait<'_> {
        AnswerWait {
            shared: &self.shared,
            health: &self.health,
            rx,
            own,
        }
    }

    /// [`TcpBackend::answer`], telling apart how it ended: the outer error is the caller's
    /// side giving up (a deadline, the driver gone), after which the request may still be
    /// alive on the coordinator; the inner result is the request's settled outcome (the
    /// coordinator's answer, or the driver's verdict on a request it never sent).
    async fn settled(
        &self,
        mut wait: AnswerWait<'_>,
        until: Until,
    ) -> Result<Result<Answer, Error>, Error> {
        let closed = |r: Result<Result<Answer, Error>, oneshot::error::RecvError>| {
            r.map_err(|_| Error::Shutdown)
        };
        match until {
            Until::Answered => closed(wait.await),
            Until::Wait(deadline) => {
                if let Ok(r) = tokio::time::timeout_at(deadline, &mut wait).await {
                    return closed(r);
                }
                // The coordinator's "timed out" is on its way if it answers at all; a ping
                // tells a coordinator that answers late from one that does not answer.
                if !self.health.connected.load(Ordering::Relaxed) {
                    return Err(self.unavailable());
                }
                let probe = Instant::now();
                let _ = self.tx.send(Cmd::Probe);
                match tokio::time::timeout_at(deadline + ANSWER_GRACE, &mut wait).await {
                    Ok(r) => closed(r),
                    Err(_) if self.health.heard_since(probe) => Err(Error::TimedOut),
                    Err(_) => Err(self.unavailable()),
                }
            }
            Until::Call => {
                let deadline = Instant::now() + self.health.ttl().max(Duration::from_secs(1));
                match tokio::time::timeout_at(deadline, &mut wait).await {
                    Ok(r) => closed(r),
                    Err(_) => Err(self.unavailable()),
                }
            }
            // The driver fails the call when the lease is gone (`Driver::fail_gone`): its
            // one timer serves every such call, where a timer per call would cost one
            // registration per release on the hot path.
            Until::LeaseGone => closed(wait.await),
        }
    }

    /// Sends a request that takes a lease (an acquire or a job attempt) and waits for its
    /// answer; the lease is withdrawn if the future is dropped first.
    async fn call_for_lease(
        &self,
        lease: u64,
        req: Req,
        until: Until,
    ) -> Result<(Answer, LostReceiver), Error> {
        let (lost_tx, lost_rx) = lost::channel();
        let (reply, rx) = oneshot::channel();
        let own = self.send_call(req, reply, Some(lost_tx), false)?;
        let mut guard = AcquireGuard {
            tx: &self.tx,
            lease,
            armed: true,
        };
        // On an early return (a deadline, or the future dropped), the guard withdraws the
        // acquire. A settled one has nothing to withdraw: a refusal or the coordinator's "timed
        // out" left no lease behind (withdrawing it anyway doubled the requests of a loop of
        // `try_acquire` on a full semaphore).
        let settled = self.settled(self.wait_for(rx, own), until).await?;
        guard.armed = false;
        Ok((settled?, lost_rx))
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
        let own = self.send_call(req, reply, None, matches!(until, Until::LeaseGone))?;
        self.answer(self.wait_for(rx, own), until).await
    }

    /// Sends a call: written by the caller itself when no other caller's request is in
    /// flight on this client, else through the driver (see `writer`). The request's id if
    /// the caller wrote it, so that it may read its answer too (see `reader`).
    fn send_call(
        &self,
        req: Req,
        reply: Reply,
        lost: Option<LostSender>,
        until_gone: bool,
    ) -> Result<Option<u32>, Error> {
        let alone = self.shared.waiting.fetch_add(1, Ordering::Relaxed) == 0
            && !self.shared.crowd.load(Ordering::Relaxed);
        let own = Own {
            req,
            reply: Some(reply),
            lost,
            until_gone,
        };
        let own = if alone {
            match self.shared.send(own, true, &self.health) {
                Sent::Written(id) => return Ok(Some(id)),
                Sent::Queued(id) => return self.wake(None).map(|()| Some(id)),
                Sent::Refused(own) => own,
            }
        } else {
            own
        };
        match self.tx.send(Cmd::Call(own)) {
            Ok(()) => Ok(None),
            Err(_) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(Error::Shutdown)
            }
        }
    }

    /// Asks the driver to write what callers left in the shared buffer.
    fn wake(&self, sent: Option<oneshot::Sender<()>>) -> Result<(), Error> {
        self.tx
            .send(Cmd::Flush { sent })
            .map_err(|_| Error::Shutdown)
    }
}

/// The wait for the answer to one request: on its channel, and for a request its caller wrote
/// itself, also by reading the link (see `reader`). Dropped or done, it gives the link's
/// read readiness back to the driver if it held it.
struct AnswerWait<'a> {
    shared: &'a Shared,
    health: &'a Health,
    rx: oneshot::Receiver<Result<Answer, Error>>,
    /// The request's id, while its caller may read the answer itself.
    own: Option<u32>,
}

impl std::future::Future for AnswerWait<'_> {
    type Output = Result<Result<Answer, Error>, oneshot::error::RecvError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        // Only while no other caller waits: among several, the driver reads once for all of
        // them (a caller reading would stop at their answers and hand them on).
        if let Some(id) = this
            .own
            .filter(|_| this.shared.waiting.load(Ordering::Relaxed) <= 1)
        {
            // Read first: an answer settled here never touches the channel.
            if let Some(result) = this.shared.read_for(id, cx, this.health, &mut this.rx) {
                this.own = None;
                #[cfg(test)]
                this.health.own_reads.fetch_add(1, Ordering::Relaxed);
                return std::task::Poll::Ready(Ok(result));
            }
        }
        let r = std::task::ready!(std::pin::Pin::new(&mut this.rx).poll(cx));
        if let Some(id) = this.own.take() {
            this.shared.stop_reading(id);
        }
        std::task::Poll::Ready(r)
    }
}

impl Drop for AnswerWait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.own {
            self.shared.stop_reading(id);
        }
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
            let lease = self.shared.new_lease();
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
        // Queued for the next write, which is usually the caller's next acquire; the driver
        // is woken in case none comes.
        match self.shared.queue_release(lease) {
            Ok(()) => {
                let _ = self.wake(None);
            }
            Err(lease) => {
                let _ = self.tx.send(Cmd::Forget { lease, sent: None });
            }
        }
    }

    fn send_release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let own = Own {
                req: Req::Release { lease },
                reply: None,
                lost: None,
                until_gone: false,
            };
            let (sent, written) = oneshot::channel();
            match self.shared.send(own, false, &self.health) {
                Sent::Written(_) => return Ok(()),
                Sent::Queued(_) => self.wake(Some(sent)).map_err(|_| self.unavailable())?,
                Sent::Refused(_) => self
                    .tx
                    .send(Cmd::Forget {
                        lease,
                        sent: Some(sent),
                    })
                    .map_err(|_| self.unavailable())?,
            }
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
            let lease = self.shared.new_lease();
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
            let wait = self.shared.new_lease();
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

mod driver;
mod link;
mod reader;
#[cfg(test)]
mod tests;
mod wire;
mod writer;
