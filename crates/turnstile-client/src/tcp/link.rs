//! Making a link: connecting (over TLS if asked), the handshake (`Hello`, then the
//! session's open or resume), and the reads and writes of a link once made.

use super::*;

/// Writes what a non-blocking write left, bounded by [`WRITE_TIMEOUT`].
pub(super) async fn write_rest(wr: &mut LinkWrite, rest: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(rest)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("a write did not go out".into()),
    }
}

/// The session request that follows the hello on a new link.
#[derive(Clone, Copy, Debug)]
pub(super) enum Hello {
    Open { session: u64, ttl_ms: u32 },
    Resume { session: u64 },
}

/// The outcome of one connection attempt: see [`open_link`].
pub(super) type Opened = Result<Result<(Link, LinkWrite, Duration), Error>, Error>;

/// The first connection: retried with backoff while it fails to connect (refused, reset, no
/// answer) and `retry_for` (from the first attempt) is not over; one attempt without it. A
/// refusal by the coordinator (such as a protocol version it does not speak) is not retried.
pub(super) async fn first_link(
    addr: &str,
    tls: Option<&tls::Connector>,
    name: &str,
    token: &str,
    hello: Hello,
    retry_for: Option<Duration>,
) -> Result<(Link, LinkWrite, Duration), Error> {
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

/// Connects, says hello and sends the session request; waits for both answers, all by
/// `deadline`. The outer error is a failure to talk at all; the inner one is the
/// coordinator's answer to the session request. Owns its arguments, so that the driver can
/// run it beside its loop.
pub(super) async fn open_link(
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
    Ok(session_result.map(|()| (link, wr, ttl)))
}
