//! One client connection: handshake, framing, and turning wire requests into core requests.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use turnstile_core::{JobOutcome, LeaseId, Request, SessionId};
use turnstile_proto::{
    self as proto, decode_request, split_frame, DecodeError, ErrorCode, MAX_REQUEST_FRAME,
    NO_TIMEOUT,
};

use crate::gate::{same_secret, Ticket};
use crate::metrics::{self, Kind};
use crate::outbox::{Outbox, HIGH_WATER};
use crate::state::{ConnId, Shared};
use crate::status::status_doc;

/// Serves one connection until the peer leaves, sends a bad frame, or the server shuts down.
/// Leaving does not end the connection's session: its client may resume it on a new
/// connection before the TTL passes. With TLS on, the TLS handshake comes first, within the
/// same handshake deadline; a connection whose TLS handshake fails is closed unanswered.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    ticket: Ticket,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake_by = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let peer = stream.peer_addr().ok();
    // Replies are small and latency matters more than packet count; batching happens in the
    // outbox instead.
    let _ = stream.set_nodelay(true);
    let outbox = Arc::new(Outbox::default());
    let Some(identity) = &shared.config.tls else {
        let (rd, wr) = stream.into_split();
        // Shared with the writer task: the reader writes its own replies inline when it can.
        let wr = Arc::new(wr);
        let writer = {
            let outbox = outbox.clone();
            let wr = wr.clone();
            tokio::spawn(async move { outbox.write_loop(wr).await })
        };
        let link = Link {
            inline: Some(wr),
            writer,
            outbox,
        };
        return serve_link(shared, rd, link, peer, handshake_by, ticket, shutdown).await;
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(handshake_by, identity.acceptor().accept(stream)) => r,
        _ = ticket.evicted.notified() => return,
        _ = shutdown.changed() => return,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // A client that does not speak TLS (or trusts another CA) learns it from the
            // alert rustls sent; nothing here is worth more than a debug line.
            tracing::debug!(?peer, error = %e, "TLS handshake failed; connection closed");
            return;
        }
        Err(_) => {
            tracing::debug!(?peer, "no TLS handshake in time; connection closed");
            return;
        }
    };
    let (rd, wr) = tokio::io::split(tls);
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.write_loop_tls(wr).await })
    };
    let link = Link {
        inline: None,
        writer,
        outbox,
    };
    serve_link(shared, rd, link, peer, handshake_by, ticket, shutdown).await
}

/// The sending side of a connection.
struct Link {
    /// The socket, when the reader may write its replies into it itself (plain TCP).
    inline: Option<Arc<OwnedWriteHalf>>,
    /// The writer task (`Outbox::write_loop` or `write_loop_tls`).
    writer: tokio::task::JoinHandle<()>,
    outbox: Arc<Outbox>,
}

async fn serve_link<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut rd: R,
    link: Link,
    peer: Option<std::net::SocketAddr>,
    handshake_by: tokio::time::Instant,
    ticket: Ticket,
    mut shutdown: watch::Receiver<bool>,
) {
    let Link {
        inline: wr,
        writer,
        outbox,
    } = link;
    let mut admitted = false;
    let metrics = &shared.metrics;
    metrics.connections.fetch_add(1, Relaxed);
    metrics.connections_total.fetch_add(1, Relaxed);
    let conn = shared.lock().register(outbox.clone());
    let mut conn_state = Conn {
        shared: shared.clone(),
        outbox: outbox.clone(),
        id: conn,
        session: None,
        greeted: false,
        admin: false,
        client: String::new(),
        followed: false,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // Made once, not on every turn: a `sleep_until` built per turn costs a timer handle per
    // request even when its branch is disabled, and a `changed()` per turn registers with the
    // shutdown channel and unregisters again (a lock each way).
    let handshake_timer = tokio::time::sleep_until(handshake_by);
    tokio::pin!(handshake_timer);
    let shutdown_changed = shutdown.changed();
    tokio::pin!(shutdown_changed);
    let reason = 'conn: loop {
        // Handle every whole frame already buffered, then read more.
        let mut start = 0;
        loop {
            match split_frame(&buf[start..], MAX_REQUEST_FRAME) {
                Ok(Some((payload, used))) => {
                    // Another request came in the same read: the answers can share a write.
                    conn_state.followed = start + used < buf.len();
                    if let Err(why) = conn_state.handle_frame(payload) {
                        break 'conn why;
                    }
                    start += used;
                }
                Ok(None) => break,
                Err(e) => {
                    conn_state.protocol_error(0, &e);
                    break 'conn format!("bad frame: {e}");
                }
            }
        }
        buf.drain(..start);
        if conn_state.greeted && !admitted {
            ticket.greeted();
            admitted = true;
        }
        match &wr {
            Some(wr) => outbox.flush(wr),
            None => outbox.wake(),
        }
        if outbox.pending() >= HIGH_WATER {
            outbox.wait_drained().await;
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "peer closed".to_string(),
                Ok(_) => {}
                Err(e) => break format!("read error: {e}"),
            },
            _ = &mut shutdown_changed => {
                outbox.push(0, &proto::Reply::Error {
                    code: ErrorCode::ShuttingDown,
                    message: "server is shutting down",
                });
                break "server shutting down".to_string();
            }
            _ = &mut handshake_timer, if !conn_state.greeted => {
                outbox.push(0, &proto::Reply::Error {
                    code: ErrorCode::Handshake,
                    message: "no Hello in time",
                });
                break "no handshake in time".to_string();
            }
            _ = ticket.evicted.notified(), if !conn_state.greeted => {
                // Not worth a reply: this socket has been silent longer than any other.
                break "dropped to make room: too many connections without a handshake"
                    .to_string();
            }
        }
    };
    tracing::debug!(conn, ?peer, reason, "connection closed");
    shared.lock().unregister(conn);
    drop(wr); // the writer's handle is then the last: the socket shuts down when it ends
    shared.metrics.connections.fetch_sub(1, Relaxed);
    outbox.close();
    // Give the writer a moment to flush a final error reply; a peer that does not read it
    // does not get to hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

struct Conn {
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    id: ConnId,
    session: Option<SessionId>,
    greeted: bool,
    /// The client presented the admin token, or the server has none: it may change other
    /// clients' state.
    admin: bool,
    /// The client description from the handshake, given to the sessions opened here.
    client: String,
    /// The request being handled is followed by another read with it (see `Shared::step`).
    followed: bool,
}

impl Conn {
    /// Answers a request of `kind` with an error, without the core.
    fn reply_error(&self, kind: Kind, id: u32, code: ErrorCode, message: &str) {
        self.shared
            .metrics
            .request(kind, metrics::outcome(Some(code)));
        self.outbox
            .push_local(id, &proto::Reply::Error { code, message });
    }

    /// Answers a request of `kind` without the core.
    fn reply_ok(&self, kind: Kind, id: u32, reply: &proto::Reply<'_>) {
        self.shared.metrics.request(kind, metrics::outcome(None));
        self.outbox.push_local(id, reply);
    }

    fn forbidden(&self, kind: Kind, id: u32, what: &str) {
        let message = format!("{what} needs the admin token (the server has --admin-token-file)");
        self.reply_error(kind, id, ErrorCode::Forbidden, &message);
    }

    fn protocol_error(&self, id: u32, e: &DecodeError) {
        let code = match e {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        };
        self.reply_error(Kind::Invalid, id, code, &e.to_string());
    }

    /// Handles one frame. An `Err` closes the connection with that reason.
    fn handle_frame(&mut self, payload: &[u8]) -> Result<(), String> {
        let (id, request) = match decode_request(payload) {
            Ok(r) => r,
            Err(e) => {
                // Echo the request id when the header at least was readable.
                let id = payload
                    .get(1..5)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                self.protocol_error(id, &e);
                return Err(format!("malformed request: {e}"));
            }
        };
        let kind = wire_kind(&request);
        if !self.greeted {
            return self.handshake(kind, id, request);
        }
        let core_request = match request {
            proto::Request::Hello { .. } => {
                self.reply_error(kind, id, ErrorCode::Handshake, "handshake already done");
                return Err("second hello".into());
            }
            proto::Request::Ping => {
                self.reply_ok(kind, id, &proto::Reply::Pong);
                return Ok(());
            }
            proto::Request::Status {
                name,
                prefix,
                after,
                limit,
            } => {
                let ask = crate::status::Ask {
                    name,
                    prefix,
                    after,
                    limit,
                };
                let json =
                    crate::status::off_the_runtime(|| status_doc(&self.shared, ask).to_json());
                self.reply_ok(kind, id, &proto::Reply::Status { json: &json });
                return Ok(());
            }
            proto::Request::Leases => {
                self.reply_leases(kind, id);
                return Ok(());
            }
            proto::Request::OpenSession { session, ttl_ms } => {
                let ttl = match self.ttl(ttl_ms) {
                    Ok(ttl) => ttl,
                    Err(message) => {
                        self.reply_error(kind, id, ErrorCode::InvalidArgument, &message);
                        return Ok(());
                    }
                };
                if session == 0 {
                    let message = "session id 0 is reserved";
                    self.reply_error(kind, id, ErrorCode::InvalidArgument, message);
                    return Ok(());
                }
                let session = SessionId(session);
                self.bind(session);
                Request::OpenSession {
                    session,
                    ttl,
                    client: &self.client,
                }
            }
            proto::Request::ResumeSession { session } => {
                let session = SessionId(session);
                self.bind(session);
                Request::ResumeSession { session }
            }
            proto::Request::EndSession { session } => {
                if !self.admin && self.session != Some(SessionId(session)) {
                    self.forbidden(kind, id, "ending another client's session");
                    return Ok(());
                }
                Request::EndSession {
                    session: SessionId(session),
                }
            }
            proto::Request::Ensure { capacity, name } => Request::Ensure { name, capacity },
            proto::Request::Close { name } => {
                if !self.admin {
                    self.forbidden(kind, id, "closing a semaphore");
                    return Ok(());
                }
                Request::Close { name }
            }
            proto::Request::SetCapacity { capacity, name } => {
                if !self.admin {
                    self.forbidden(kind, id, "changing a semaphore's capacity");
                    return Ok(());
                }
                Request::SetCapacity { name, capacity }
            }
            proto::Request::Delete { name } => {
                if !self.admin {
                    self.forbidden(kind, id, "deleting a semaphore");
                    return Ok(());
                }
                Request::Delete { name }
            }
            proto::Request::Revoke { lease, name } => {
                if !self.admin {
                    self.forbidden(kind, id, "releasing another client's lease");
                    return Ok(());
                }
                Request::Revoke {
                    name,
                    lease: LeaseId(lease),
                }
            }
            proto::Request::ResetJob { job } => {
                if !self.admin {
                    self.forbidden(kind, id, "resetting a job");
                    return Ok(());
                }
                Request::ResetJob { job }
            }
            proto::Request::KeepAlive
            | proto::Request::CloseSession
            | proto::Request::Acquire { .. }
            | proto::Request::Release { .. }
            | proto::Request::BeginJob { .. }
            | proto::Request::FinishJob { .. }
            | proto::Request::WaitGroup { .. } => {
                let Some(session) = self.session else {
                    self.reply_error(
                        kind,
                        id,
                        ErrorCode::NoSession,
                        "open or resume a session on this connection first",
                    );
                    return Ok(());
                };
                match request {
                    proto::Request::KeepAlive => Request::KeepAlive { session },
                    proto::Request::CloseSession => Request::CloseSession { session },
                    proto::Request::Acquire {
                        lease,
                        weight,
                        timeout_ms,
                        name,
                    } => Request::Acquire {
                        session,
                        lease: LeaseId(lease),
                        name,
                        weight,
                        timeout: timeout(timeout_ms),
                    },
                    proto::Request::Release { lease } => Request::Release {
                        session,
                        lease: LeaseId(lease),
                    },
                    proto::Request::BeginJob {
                        lease,
                        timeout_ms,
                        job,
                        group,
                    } => Request::BeginJob {
                        session,
                        lease: LeaseId(lease),
                        job,
                        group: (!group.is_empty()).then_some(group),
                        timeout: timeout(timeout_ms),
                    },
                    proto::Request::FinishJob {
                        lease,
                        succeeded,
                        started_unix_ms,
                        duration_ms,
                        reason,
                    } => Request::FinishJob {
                        session,
                        lease: LeaseId(lease),
                        outcome: if succeeded {
                            JobOutcome::Succeeded {
                                started_unix_ms,
                                duration: Duration::from_millis(duration_ms),
                            }
                        } else {
                            JobOutcome::Failed { reason }
                        },
                    },
                    proto::Request::WaitGroup {
                        wait,
                        jobs,
                        timeout_ms,
                        group,
                    } => Request::WaitGroup {
                        session,
                        wait: LeaseId(wait),
                        group,
                        jobs,
                        timeout: timeout(timeout_ms),
                    },
                    _ => unreachable!("invariant: the outer match admits only the kinds above"),
                }
            }
        };
        self.shared.step(self.id, id, core_request, self.followed);
        Ok(())
    }

    fn handshake(
        &mut self,
        kind: Kind,
        id: u32,
        request: proto::Request<'_>,
    ) -> Result<(), String> {
        let proto::Request::Hello {
            magic,
            version,
            client,
            token,
        } = request
        else {
            self.reply_error(
                kind,
                id,
                ErrorCode::Handshake,
                "the first frame must be Hello",
            );
            return Err("no hello".into());
        };
        if magic != proto::MAGIC {
            self.reply_error(
                kind,
                id,
                ErrorCode::Handshake,
                "bad magic: not a turnstile client",
            );
            return Err("bad magic".into());
        }
        if version != proto::VERSION {
            let message = format!(
                "protocol version {version} is not supported; this server speaks {}",
                proto::VERSION
            );
            self.reply_error(kind, id, ErrorCode::Handshake, &message);
            return Err("unsupported version".into());
        }
        let config = &self.shared.config;
        let is_admin = config
            .admin_token
            .as_deref()
            .is_some_and(|admin| same_secret(token, admin));
        let admitted = match &config.auth_token {
            None => true,
            Some(t) => is_admin || same_secret(token, t),
        };
        if !admitted {
            let message = if token.is_empty() {
                "this server requires a token: give the client --token-file FILE or set \
                 TURNSTILE_TOKEN_FILE"
            } else {
                "the token is not valid for this server"
            };
            self.reply_error(kind, id, ErrorCode::Unauthorized, message);
            return Err("bad token".into());
        }
        self.admin = is_admin || config.admin_token.is_none();
        self.greeted = true;
        // The core refuses longer descriptions; cut rather than fail every later open.
        let mut end = client.len().min(turnstile_core::MAX_NAME_LEN);
        while !client.is_char_boundary(end) {
            end -= 1;
        }
        self.client = client[..end].to_owned();
        tracing::debug!(conn = self.id, client, "handshake");
        let server = concat!("turnstile ", env!("CARGO_PKG_VERSION"));
        self.reply_ok(
            kind,
            id,
            &proto::Reply::HelloOk {
                version: proto::VERSION,
                default_ttl_ms: millis(self.shared.config.session_ttl),
                server,
            },
        );
        Ok(())
    }

    fn ttl(&self, ttl_ms: u32) -> Result<Duration, String> {
        let config = &self.shared.config;
        if ttl_ms == 0 {
            return Ok(config.session_ttl);
        }
        let ttl = Duration::from_millis(u64::from(ttl_ms));
        if ttl < config.min_session_ttl || ttl > config.max_session_ttl {
            return Err(format!(
                "session TTL {ttl:?} is outside the allowed range {:?}..={:?}",
                config.min_session_ttl, config.max_session_ttl
            ));
        }
        Ok(ttl)
    }

    /// Answers `Leases` with the bound session's held leases. The reply is queued while the
    /// state lock is held, so that it leaves before the reply of any grant decided after it:
    /// a client that heard of a grant before this answer finds the lease in it.
    fn reply_leases(&self, kind: Kind, id: u32) {
        let Some(session) = self.session else {
            let message = "open or resume a session on this connection first";
            self.reply_error(kind, id, ErrorCode::NoSession, message);
            return;
        };
        let st = self.shared.lock();
        match st.core.held_leases(session) {
            Some(held) => {
                let held: Vec<u64> = held.into_iter().map(|l| l.0).collect();
                let leases = proto::LeaseIds::new(&held);
                self.reply_ok(kind, id, &proto::Reply::Leases { leases });
            }
            None => {
                let message = format!("session {:016x} not found", session.0);
                self.reply_error(kind, id, ErrorCode::SessionNotFound, &message);
            }
        }
    }

    fn bind(&mut self, session: SessionId) {
        self.session = Some(session);
        self.shared.lock().bind(session, self.id);
    }
}

/// The metrics kind of a wire request.
fn wire_kind(request: &proto::Request<'_>) -> Kind {
    match request {
        proto::Request::Hello { .. } => Kind::Hello,
        proto::Request::OpenSession { .. } => Kind::OpenSession,
        proto::Request::ResumeSession { .. } => Kind::ResumeSession,
        proto::Request::KeepAlive => Kind::KeepAlive,
        proto::Request::CloseSession => Kind::CloseSession,
        proto::Request::EndSession { .. } => Kind::EndSession,
        proto::Request::Ensure { .. } => Kind::Ensure,
        proto::Request::Acquire { .. } => Kind::Acquire,
        proto::Request::Release { .. } => Kind::Release,
        proto::Request::Close { .. } => Kind::Close,
        proto::Request::Status { .. } => Kind::Status,
        proto::Request::Ping => Kind::Ping,
        proto::Request::BeginJob { .. } => Kind::BeginJob,
        proto::Request::FinishJob { .. } => Kind::FinishJob,
        proto::Request::ResetJob { .. } => Kind::ResetJob,
        proto::Request::WaitGroup { .. } => Kind::WaitGroup,
        proto::Request::Leases => Kind::Leases,
        proto::Request::SetCapacity { .. } => Kind::SetCapacity,
        proto::Request::Delete { .. } => Kind::Delete,
        proto::Request::Revoke { .. } => Kind::Revoke,
    }
}

/// A wire timeout: [`NO_TIMEOUT`] waits as long as it takes.
fn timeout(ms: u32) -> Option<Duration> {
    (ms != NO_TIMEOUT).then(|| Duration::from_millis(u64::from(ms)))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
