//! The HTTP port: metrics, the status API and the dashboard, for operators and scrapers.
//!
//! | route | body |
//! |---|---|
//! | `GET /` | the dashboard: one self-contained page that polls the two JSON routes below |
//! | `GET /metrics` | the Prometheus text format (see `metrics.rs`) |
//! | `GET /v1/status` | the status document, as `turnstile status --json` prints it |
//! | `GET /v1/semaphores/NAME` | one semaphore's entry of it (NAME percent-encoded); 404 if none |
//! | `GET /v1/events?after=N` | the feed of notable events numbered above N (see `events.rs`) |
//!
//! HTTP/1.1 on hyper (server and `http1` only): `GET` and `HEAD`, keep-alive, pipelining.
//! What keeps slow or hostile clients from starving the port is ours, around hyper:
//!
//! - a connection must send its first byte within [`READ_TIMEOUT`] (with TLS, the TLS
//!   handshake shares that deadline) or it is answered 408; after that, hyper's
//!   `header_read_timeout` gives every request head, the first and each one a kept-alive
//!   connection sends later, [`READ_TIMEOUT`] from when hyper starts waiting for it (so an
//!   idle kept-alive connection goes after [`READ_TIMEOUT`] too);
//! - a head is at most [`MAX_HEAD`] bytes (431 past it);
//! - a response must be taken whole within [`WRITE_TIMEOUT`] of its first write, or the
//!   connection is dropped (`Guarded`: hyper has no write timeout);
//! - at most [`MAX_READING`] connections may be still sending their first request head — a
//!   new one past that makes the oldest of them go, so the accept loop never waits and slow
//!   clients cannot crowd a scraper out — and at most [`MAX_CONNECTIONS`] may be open in all;
//! - a request with a body (nothing here takes one) is answered and the connection closed, so
//!   that no one can hold it by trickling a body nobody reads.
//!
//! The first byte is read by us, not hyper, so that a binary client (a turnstile client
//! pointed at this port by mistake) is told which port is which in one 400 at once, with a
//! sentence in the body; hyper's own parse errors (400, 431) have an empty body.
//!
//! With TLS on (`Config::tls`) the port serves HTTPS only, with the protocol port's
//! certificate; a connection whose TLS handshake fails is never answered in the clear.
//!
//! On an address that is not loopback, a server with a token (`Config::auth_token`) asks for
//! it as `Authorization: Bearer TOKEN` on every route but the dashboard page itself (which is
//! static and holds no data).
//! The port must never slow the coordinator down: handlers take the state lock only to copy
//! numbers out (O(semaphores + jobs) for `/metrics`, never O(leases); the status routes copy
//! what a `Status` request copies) and serialize outside it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use crate::gate::{same_secret, Gate, Ticket};
use crate::metrics;
use crate::state::Shared;
use crate::status::{status_doc, Ask};
use crate::LogEvery;

/// Longest request head (request line and headers) accepted; hyper's smallest read buffer.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its first byte (and its TLS handshake), and then each
/// request head.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take a response, from its first byte written.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP connections open at once; a new one past this is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// HTTP connections still sending their first request head; a new one past this makes the
/// oldest of them go.
pub(crate) const MAX_READING: usize = 256;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The body of the 400 a client gets when its first byte cannot start an HTTP request.
const NOT_HTTP: &str =
    "not an HTTP request: this is turnstile's HTTP port; clients use the protocol port";

/// Serves the HTTP port until `stop` changes; then drops the connections in flight.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let gate = Arc::new(Gate::new(MAX_READING, MAX_CONNECTIONS));
    // A token is asked for only where others can reach the port: on loopback, whoever can
    // connect can read the token file anyway.
    let token_needed = shared.config.auth_token.is_some()
        && listener
            .local_addr()
            .map_or(true, |a| !a.ip().is_loopback());
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    let mut accept_log = LogEvery::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    continue; // full of connections taking their responses: close this one
                };
                let Some(ticket) = gate.admit(peer.ip()) else {
                    continue;
                };
                let shared = shared.clone();
                let open = Open::new(&shared);
                tasks.spawn(async move {
                    // One deadline for the TLS handshake and the first byte together.
                    let deadline = Instant::now() + READ_TIMEOUT;
                    match shared.config.tls.clone() {
                        None => connection(shared, stream, ticket, token_needed, deadline).await,
                        Some(identity) => {
                            let accepted = tokio::select! {
                                r = tokio::time::timeout_at(
                                    deadline,
                                    identity.acceptor().accept(stream),
                                ) => r,
                                _ = ticket.evicted.notified() => return,
                            };
                            // A failed TLS handshake is answered by rustls's alert, never in
                            // the clear.
                            if let Ok(Ok(tls)) = accepted {
                                connection(shared, tls, ticket, token_needed, deadline).await;
                            }
                        }
                    }
                    drop((permit, open));
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: give back a descriptor held by a
                // client that has not even sent its request, back off rather than spin, and
                // log once per interval.
                gate.evict_oldest();
                accept_log.note(&e);
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

/// One open connection, as `turnstile_http_connections` counts it.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Open {
        shared.metrics.http_connections.fetch_add(1, Relaxed);
        Open(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.http_connections.fetch_sub(1, Relaxed);
    }
}

/// Serves one connection (after its TLS handshake, if any): its first byte, then hyper.
async fn connection<S>(
    shared: Arc<Shared>,
    mut stream: S,
    ticket: Ticket,
    token_needed: bool,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut first = vec![0u8; 1024];
    let read = tokio::select! {
        r = tokio::time::timeout_at(deadline, stream.read(&mut first)) => r,
        // The oldest of too many clients still sending their heads: make room.
        _ = ticket.evicted.notified() => return,
    };
    let n = match read {
        Err(_) => {
            drop(ticket);
            return refuse(&shared, stream, 408, "no request received in time").await;
        }
        Ok(Ok(0) | Err(_)) => return,
        Ok(Ok(n)) => n,
    };
    // A request line starts with a method, upper-case letters. Anything else is a binary
    // protocol (a turnstile client's `Hello`): answered at once, not at the head's deadline,
    // so that the client reads "HTTP/1." and says which port is which.
    if !first[0].is_ascii_uppercase() {
        drop(ticket);
        return refuse(&shared, stream, 400, NOT_HTTP).await;
    }
    first.truncate(n);
    let evicted = ticket.evicted.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        ticket.greeted();
        let reply = respond(&shared, token_needed, &request);
        std::future::ready(Ok::<_, Infallible>(reply))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let served = builder.serve_connection(TokioIo::new(Guarded::new(stream, first)), service);
    tokio::select! {
        // hyper's errors are the client's (a bad head, a timeout, a reset): nobody to tell.
        _ = served => {}
        // Still sending its first head, and the oldest of too many doing so.
        _ = evicted.notified() => {}
    }
}

/// Answers a connection hyper never sees (nothing in time, or not HTTP), and closes it.
async fn refuse<S: AsyncWrite + Unpin>(shared: &Shared, mut stream: S, code: u16, why: &str) {
    shared.metrics.http_request("other", code);
    let body = serde_json::json!({ "error": why }).to_string();
    let reason = StatusCode::from_u16(code)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or("Error");
    let out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{body}",
        body.len(),
    );
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// The connection's stream as hyper sees it: first the bytes we read to tell HTTP from
/// other protocols, then the stream; and a write deadline, which hyper does not have.
///
/// The deadline is armed by the first write of a response and disarmed when hyper's flush of
/// it completes: a response (ours are whole bodies, written and flushed as one) must be taken
/// within [`WRITE_TIMEOUT`], however slowly the client reads, or the connection fails.
struct Guarded<S> {
    inner: S,
    prefix: Vec<u8>,
    prefix_at: usize,
    /// The write deadline, when armed.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Guarded<S> {
    fn new(inner: S, prefix: Vec<u8>) -> Guarded<S> {
        Guarded {
            inner,
            prefix,
            prefix_at: 0,
            deadline: None,
        }
    }

    /// Arms the write deadline if it is not armed.
    fn arm(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        }
    }

    /// A write that cannot go on now: fails it if the deadline has passed (and arms the
    /// deadline's wake-up otherwise).
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        self.arm();
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take its response in time",
            ))),
            _ => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.prefix_at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.prefix_at += n;
            if this.prefix_at == this.prefix.len() {
                this.prefix = Vec::new();
                this.prefix_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.arm();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.stalled(cx),
            done => done,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.stalled(cx),
            Poll::Ready(r) => {
                // All hyper had to send is out: the next response gets a deadline of its own.
                this.deadline = None;
                Poll::Ready(r)
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.stalled(cx),
            done => done,
        }
    }
}

/// A response: status code, content type, body, one extra header, whether to close after it.
struct Reply {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Option<(HeaderName, &'static str)>,
    close: bool,
}

impl Reply {
    fn new(code: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            code,
            content_type,
            body: body.into(),
            extra: None,
            close: false,
        }
    }

    fn json(body: Vec<u8>) -> Reply {
        Reply::new(200, "application/json", body)
    }

    fn error(code: u16, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string();
        Reply::new(code, "application/json", body)
    }

    fn into_response(self) -> hyper::Response<Full<Bytes>> {
        let mut r = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() =
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some((name, value)) = self.extra {
            h.insert(name, HeaderValue::from_static(value));
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Answers one request (hyper has parsed its head).
fn respond(
    shared: &Shared,
    token_needed: bool,
    request: &Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let uri = request.uri();
    let path = uri.path();
    let open = matches!(path, "/" | "/index.html");
    let (route, mut reply) = if !path.starts_with('/') {
        ("other", Reply::error(400, "the target must be a path"))
    } else if token_needed && !open && !authorized(shared, request) {
        let mut r = Reply::error(401, "a bearer token is required");
        r.extra = Some((header::WWW_AUTHENTICATE, "Bearer realm=\"turnstile\""));
        ("other", r)
    } else if request.method() == Method::GET || request.method() == Method::HEAD {
        handle(shared, path, uri.query().unwrap_or_default())
    } else {
        let mut r = Reply::error(405, "only GET and HEAD are served");
        r.extra = Some((header::ALLOW, "GET, HEAD"));
        ("other", r)
    };
    // Nothing here reads a body: rather than wait for one to be drained (as slowly as its
    // sender likes), answer and close.
    if !request.body().is_end_stream() {
        reply.close = true;
    }
    shared.metrics.http_request(route, reply.code);
    reply.into_response()
}

/// Whether the request carries `Authorization: Bearer` with the server's token (or its
/// admin token).
fn authorized(shared: &Shared, request: &Request<Incoming>) -> bool {
    let config = &shared.config;
    request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|value| {
            let Ok(value) = value.to_str() else {
                return false;
            };
            let value = value.trim();
            let Some(token) = value
                .get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .and_then(|_| value.get(7..))
                .map(str::trim)
            else {
                return false;
            };
            [&config.auth_token, &config.admin_token]
                .into_iter()
                .flatten()
                .any(|t| same_secret(token, t))
        })
}

/// Routes a `GET`: the route's name for the metrics, and the response.
fn handle(shared: &Shared, path: &str, query: &str) -> (&'static str, Reply) {
    match path {
        "/" | "/index.html" => {
            let mut r = Reply::new(200, "text/html; charset=utf-8", DASHBOARD);
            // The page is self-contained: nothing but itself and this origin's JSON.
            r.extra = Some((
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:",
            ));
            ("/", r)
        }
        "/metrics" => (
            "/metrics",
            crate::status::off_the_runtime(|| metrics_page(shared)),
        ),
        "/v1/status" => (
            "/v1/status",
            crate::status::off_the_runtime(|| status_page(shared, query)),
        ),
        "/v1/events" => ("/v1/events", events(shared, query)),
        _ => match path.strip_prefix("/v1/semaphores/") {
            Some(name) => ("/v1/semaphores", semaphore(shared, name)),
            None => ("other", Reply::error(404, "no such page")),
        },
    }
}

/// `GET /v1/status?prefix=P&after=A&limit=N`: a page of the status, as the protocol's
/// `Status` request gives it (every parameter optional).
fn status_page(shared: &Shared, query: &str) -> Reply {
    let (mut prefix, mut after, mut limit) = (String::new(), String::new(), 0u32);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            return Reply::error(400, "a parameter is not valid percent-encoded UTF-8");
        };
        match key {
            "prefix" => prefix = value,
            "after" => after = value,
            "limit" => match value.parse() {
                Ok(n) => limit = n,
                Err(_) => return Reply::error(400, "limit is not a number"),
            },
            _ => {}
        }
    }
    let ask = Ask {
        name: "",
        prefix: &prefix,
        after: &after,
        limit,
    };
    Reply::json(status_doc(shared, ask).to_json())
}

fn metrics_page(shared: &Shared) -> Reply {
    let core = metrics::collect(shared);
    Reply::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        metrics::render(&core, &shared.metrics),
    )
}

fn semaphore(shared: &Shared, encoded: &str) -> Reply {
    let Some(name) = percent_decode(encoded) else {
        return Reply::error(400, "the semaphore name is not valid percent-encoded UTF-8");
    };
    if name.is_empty() {
        return Reply::error(404, "no semaphore name given");
    }
    let ask = Ask {
        name: &name,
        ..Ask::default()
    };
    match status_doc(shared, ask).semaphores.into_iter().next() {
        Some(s) => match serde_json::to_vec(&s) {
            Ok(body) => Reply::json(body),
            Err(_) => Reply::error(500, "cannot serialize the status"),
        },
        None => Reply::error(404, &format!("no semaphore named {name:?}")),
    }
}

fn events(shared: &Shared, query: &str) -> Reply {
    let mut after = 0;
    // Unknown parameters are ignored, as is usual on the web.
    for pair in query.split('&') {
        if let Some(("after", n)) = pair.split_once('=') {
            match n.parse() {
                Ok(n) => after = n,
                Err(_) => return Reply::error(400, "after must be a number"),
            }
        }
    }
    let page = shared.lock().events.since(after);
    match serde_json::to_vec(&page) {
        Ok(body) => Reply::json(body),
        Err(_) => Reply::error(500, "cannot serialize the events"),
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` stays a plus, as in a path). `None` if an
/// escape is broken or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("db").as_deref(), Some("db"));
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%C3%A9t%C3%A9").as_deref(), Some("été"));
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
