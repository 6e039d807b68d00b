//! The coordinator backend (`tcp://HOST:PORT`).
//!
//! One driver task owns the connection. Callers send it commands over a channel and get their
//! answers on oneshot channels; the driver numbers requests, matches replies by request id,
//! keeps the session alive, and survives disconnections: it reconnects with exponential
//! backoff, resumes the session, and re-sends every request still unanswered. Re-sending is
//! safe because every request is idempotent on the coordinator (an acquire is named by its
//! lease id; a repeated release answers "unknown lease", which a re-sent release takes as
//! success).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use turnstile_proto::{
    self as proto, decode_reply, encode_request, split_frame, ErrorCode, StatusDoc,
    MAX_REPLY_FRAME, NO_TIMEOUT,
};

use crate::backend::{Backend, BoxFuture, Grant, JobBegin, JobEnd};
use crate::{random_id, Error, GroupSummary, JobCompletion, JobRunner, LostReason, Options};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Reconnect attempts are also at most `TTL/BACKOFF_TTL_DIVISOR` apart (plus jitter), so that
/// a client whose coordinator is back well within the TTL (a restart) reconnects before it
/// gives its leases up.
const BACKOFF_TTL_DIVISOR: u32 = 10;
/// The client treats its leases as lost after `TTL - TTL/SAFETY_DIVISOR` without an answer
/// to a session-refreshing request, i.e. 10% before the coordinator may expire them.
const SAFETY_DIVISOR: u32 = 10;

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
            | Req::Leases => false,
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
    /// Release without waiting (a dropped permit, a dropped acquire).
    Forget {
        lease: u64,
    },
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
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: Vec<u8>,
}

/// The coordinator backend: a handle on the driver task.
pub(crate) struct TcpBackend {
    tx: mpsc::UnboundedSender<Cmd>,
    session: Arc<AtomicU64>,
    next_lease: AtomicU64,
}

impl TcpBackend {
    /// Connects, opens the session, and starts the driver. Fails if the first connection
    /// fails: a coordinator that was never reachable is a configuration error, not a blip.
    pub(crate) async fn connect(addr: String, options: Options) -> Result<TcpBackend, Error> {
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
        let (link, ttl) = open_link(
            &addr,
            &name,
            proto::Request::OpenSession { session, ttl_ms },
        )
        .await??;
        let (tx, rx) = mpsc::unbounded_channel();
        let session_cell = Arc::new(AtomicU64::new(session));
        let now = Instant::now();
        let driver = Driver {
            addr,
            name,
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
        };
        tokio::spawn(driver.run());
        Ok(TcpBackend {
            tx,
            session: session_cell,
            next_lease: AtomicU64::new(crate::lease_id_base()),
        })
    }

    /// Sends a request that takes a lease (an acquire or a job attempt) and waits for its
    /// answer; the lease is withdrawn if the future is dropped first.
    async fn call_for_lease(
        &self,
        lease: u64,
        req: Req,
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
        let answer = rx.await.map_err(|_| Error::Shutdown)?;
        guard.armed = false;
        Ok((answer?, lost_rx))
    }

    async fn call(&self, req: Req) -> Result<Answer, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Call {
                req,
                reply,
                lost: None,
            })
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
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
            let _ = self.tx.send(Cmd::Forget { lease: self.lease });
        }
    }
}

impl Backend for TcpBackend {
    fn ensure<'a>(&'a self, name: &'a str, capacity: u32) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.call(Req::Ensure {
                name: name.to_owned(),
                capacity,
            })
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
            let req = Req::Acquire {
                lease,
                weight,
                deadline: timeout.map(|t| Instant::now() + t),
                name: name.to_owned(),
            };
            let (answer, lost_rx) = self.call_for_lease(lease, req).await?;
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
        Box::pin(async move { self.call(Req::Release { lease }).await.map(drop) })
    }

    fn release_in_background(&self, lease: u64) {
        let _ = self.tx.send(Cmd::Forget { lease });
    }

    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.call(Req::Close {
                name: name.to_owned(),
            })
            .await
            .map(drop)
        })
    }

    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(async move {
            let answer = self
                .call(Req::Status {
                    name: name.unwrap_or("").to_owned(),
                })
                .await?;
            let Answer::Status(json) = answer else {
                return Err(Error::Protocol(format!(
                    "unexpected answer to status: {answer:?}"
                )));
            };
            StatusDoc::from_json(&json)
                .map_err(|e| Error::Protocol(format!("status document: {e}")))
        })
    }

    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.call(Req::EndSession { session }).await.map(drop) })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Cmd::Shutdown { reply }).is_err() {
                return Ok(()); // already shut down
            }
            let _ = rx.await;
            Ok(())
        })
    }

    fn session_id(&self) -> u64 {
        self.session.load(Ordering::Relaxed)
    }

    fn begin_job<'a>(
        &'a self,
        job: &'a str,
        group: Option<&'a str>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<JobBegin, Error>> {
        Box::pin(async move {
            let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let req = Req::BeginJob {
                lease,
                deadline: timeout.map(|t| Instant::now() + t),
                job: job.to_owned(),
                group: group.unwrap_or("").to_owned(),
            };
            let (answer, lost) = self.call_for_lease(lease, req).await?;
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
            self.call(req).await.map(drop)
        })
    }

    fn reset_job<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            match self
                .call(Req::ResetJob {
                    job: job.to_owned(),
                })
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
            let req = Req::WaitGroup {
                wait,
                jobs,
                deadline: timeout.map(|t| Instant::now() + t),
                group: group.to_owned(),
            };
            match self.call(req).await? {
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

/// Connects, says hello and sends the session request; waits for both answers. The outer
/// error is a failure to talk at all; the inner one is the coordinator's answer to the
/// session request.
async fn open_link(
    addr: &str,
    name: &str,
    session_req: proto::Request<'_>,
) -> Result<Result<(Link, Duration), Error>, Error> {
    let connect_err = |source| Error::Connect {
        addr: addr.to_owned(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect_err)?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut out = Vec::new();
    let hello = proto::Request::Hello {
        magic: proto::MAGIC,
        version: proto::VERSION,
        client: name,
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
    let read = async {
        while answers < 2 {
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
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))??;
    Ok(session_result.map(|()| (link, ttl)))
}

struct Driver {
    addr: String,
    name: String,
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
}

impl Driver {
    async fn run(mut self) {
        loop {
            let keepalive_at = self.last_keepalive + self.ttl / 3;
            // Give up a little before the coordinator may: clocks on two machines run at
            // slightly different rates, and our timer fires a little late under load.
            let presumed_lost_at = self.last_contact + self.ttl - self.ttl / SAFETY_DIVISOR;
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Shutdown { reply }) => {
                        self.close_session().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => {
                        // Every handle is gone: end the session so its leases free at once.
                        self.close_session().await;
                        return;
                    }
                },
                r = read_more(&mut self.link) => match r {
                    Ok(()) => self.on_frames().await,
                    Err(why) => self.disconnected(&why),
                },
                _ = tokio::time::sleep_until(keepalive_at), if self.link.is_some() => {
                    self.last_keepalive = Instant::now();
                    self.submit(Req::KeepAlive, None, None).await;
                }
                _ = tokio::time::sleep_until(self.next_attempt), if self.link.is_none() => {
                    self.reconnect().await;
                }
                _ = tokio::time::sleep_until(presumed_lost_at), if !self.leases.is_empty() => {
                    tracing::warn!("no answer from the coordinator for a whole TTL; leases presumed lost");
                    self.abandoned.extend(self.leases.keys().copied());
                    self.lose_all(LostReason::Unreachable);
                    // Push the contact mark forward so this arm does not spin.
                    self.last_contact = Instant::now();
                }
            }
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Call { req, reply, lost } => {
                if let Req::FinishJob { lease, .. } = req {
                    // The coordinator releases the lease as it records the end; from here no
                    // loss is to be reported for it.
                    self.leases.remove(&lease);
                }
                self.submit(req, Some(reply), lost).await
            }
            Cmd::Forget { lease } => {
                self.leases.remove(&lease);
                self.submit(Req::Release { lease }, None, None).await;
            }
            Cmd::Shutdown { .. } => {}
        }
    }

    /// Records a request as pending and sends it if connected; otherwise it goes out after
    /// the next reconnect.
    async fn submit(
        &mut self,
        req: Req,
        reply: Option<Reply>,
        lost: Option<watch::Sender<Option<LostReason>>>,
    ) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut frame = Vec::new();
        encode(id, &req, &mut frame);
        self.pending.insert(
            id,
            Pending {
                req,
                reply,
                lost,
                sent_at: Instant::now(),
                resent: false,
            },
        );
        self.write(&frame).await;
    }

    async fn write(&mut self, frame: &[u8]) {
        if let Some(link) = &mut self.link {
            if let Err(e) = link.wr.write_all(frame).await {
                self.disconnected(&format!("write failed: {e}"));
            }
        }
    }

    fn disconnected(&mut self, why: &str) {
        if self.link.take().is_some() {
            tracing::warn!(addr = %self.addr, why, "lost the connection to the coordinator; reconnecting");
            self.backoff = MIN_BACKOFF;
            self.next_attempt = Instant::now();
        }
    }

    async fn reconnect(&mut self) {
        // The coordinator refreshes the session when the resume arrives, which is after this.
        let attempt_started = Instant::now();
        let session = self.session.load(Ordering::Relaxed);
        let opened = match open_link(
            &self.addr,
            &self.name,
            proto::Request::ResumeSession { session },
        )
        .await
        {
            Ok(Ok(ok)) => Some(ok),
            Ok(Err(e)) if e.code() == Some(ErrorCode::SessionNotFound) => {
                // The session expired while we were away: its leases are gone. Carry on with
                // a new session, so that waiting and future acquires still work.
                tracing::warn!(
                    session = format_args!("{session:016x}"),
                    "session expired while disconnected"
                );
                self.lose_all(LostReason::Expired);
                self.abandoned.clear();
                let fresh = random_id();
                match open_link(
                    &self.addr,
                    &self.name,
                    proto::Request::OpenSession {
                        session: fresh,
                        ttl_ms: self.ttl_ms,
                    },
                )
                .await
                {
                    Ok(Ok(ok)) => {
                        self.session.store(fresh, Ordering::Relaxed);
                        self.borrowed = false;
                        Some(ok)
                    }
                    _ => None,
                }
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
        tracing::info!(addr = %self.addr, "reconnected to the coordinator");
        self.ttl = ttl;
        self.link = Some(link);
        let now = Instant::now();
        self.last_contact = attempt_started;
        self.last_keepalive = now;
        let mut frames = Vec::new();
        for (id, p) in &mut self.pending {
            p.resent = true;
            p.sent_at = now;
            encode(*id, &p.req, &mut frames);
        }
        self.write(&frames).await;
        for lease in std::mem::take(&mut self.abandoned) {
            self.submit(Req::Release { lease }, None, None).await;
        }
        if !self.leases.is_empty() {
            self.submit(Req::Leases, None, None).await;
        }
    }

    async fn on_frames(&mut self) {
        loop {
            let Some(link) = &mut self.link else { return };
            let (id, reply) = match split_frame(&link.buf, MAX_REPLY_FRAME) {
                Ok(Some((payload, used))) => {
                    let decoded = decode_reply(payload).map(|(id, r)| (id, owned(r)));
                    link.buf.drain(..used);
                    match decoded {
                        Ok(x) => x,
                        Err(e) => return self.disconnected(&format!("bad frame from server: {e}")),
                    }
                }
                Ok(None) => return,
                Err(e) => return self.disconnected(&format!("bad frame from server: {e}")),
            };
            self.on_reply(id, reply).await;
        }
    }

    async fn on_reply(&mut self, id: u32, reply: OwnedReply) {
        if id == 0
            || matches!(
                reply,
                OwnedReply::LeaseLost(..) | OwnedReply::SessionLost(_)
            )
        {
            return self.on_event(reply).await;
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
            self.last_contact = p.sent_at;
        }
        if !session_alive {
            self.session_gone(LostReason::Expired).await;
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
                    return self.submit(Req::Release { lease }, None, None).await;
                }
            }
        }
        if let Some(reply) = p.reply {
            let _ = reply.send(result);
        }
    }

    async fn on_event(&mut self, event: OwnedReply) {
        match event {
            OwnedReply::LeaseLost(lease, reason) => {
                if let Some(tx) = self.leases.remove(&lease) {
                    let _ = tx.send(Some(reason));
                }
            }
            OwnedReply::SessionLost(reason) => self.session_gone(reason).await,
            OwnedReply::Error(code, message) => {
                // Unsolicited errors: the server is shutting down, or we broke the protocol.
                tracing::warn!(?code, message, "the coordinator reports an error");
            }
            _ => {}
        }
    }

    /// The session ended on the coordinator: every lease is lost; open a new session so the
    /// client stays usable.
    async fn session_gone(&mut self, reason: LostReason) {
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
        )
        .await;
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
                    lease,
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
        if self.link.is_none() {
            return;
        }
        if self.borrowed {
            // Our own leases, held or still queued for; the session stays.
            let mut mine: Vec<u64> = self.leases.keys().copied().collect();
            mine.extend(self.pending.values().filter_map(|p| match p.req {
                Req::Acquire { lease, .. } | Req::BeginJob { lease, .. } => Some(lease),
                _ => None,
            }));
            self.leases.clear();
            for lease in mine {
                self.submit(Req::Release { lease }, None, None).await;
            }
        } else {
            self.submit(Req::CloseSession, None, None).await;
        }
        // Wait briefly for the answers, so that the leases are free when we return.
        let wait = async {
            while self
                .pending
                .values()
                .any(|p| matches!(p.req, Req::CloseSession | Req::Release { .. }))
            {
                match read_more(&mut self.link).await {
                    Ok(()) => self.on_frames().await,
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }
}

/// Reads more bytes into the link's buffer. Pending forever when there is no link, so that it
/// can sit in a `select!` arm. Cancel-safe: `read_buf` either reads or does nothing.
async fn read_more(link: &mut Option<Link>) -> Result<(), String> {
    let Some(link) = link else {
        return std::future::pending().await;
    };
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
        Req::Status { name } => proto::Request::Status { name },
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
