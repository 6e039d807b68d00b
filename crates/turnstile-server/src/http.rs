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
//! A deliberately small HTTP/1.1 server: `GET` and `HEAD` only, one request per connection
//! (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes that must arrive whole
//! within [`READ_TIMEOUT`] (one deadline for the head, not per read, so a client that sends a
//! byte a second gains nothing), at most [`MAX_READING`] connections still sending their head
//! — a new one past that makes the oldest of them go, so the accept loop never waits and slow
//! clients cannot starve a scraper — and at most [`MAX_CONNECTIONS`] in all. That is all that
//! a scraper, `curl` and a polling page need, and it keeps a heavy HTTP stack out of the build
//! (see ARCHITECTURE.md, "Why a hand-written HTTP port").
//!
//! With TLS on (`Config::tls`) the port serves HTTPS only, with the protocol port's
//! certificate; the TLS handshake and the request head share the one deadline.
//!
//! On an address that is not loopback, a server with a token (`Config::auth_token`) asks for
//! it as `Authorization: Bearer TOKEN` on every route but the dashboard page itself (which is
//! static and holds no data).
//! The port must never slow the coordinator down: handlers take the state lock only to copy
//! numbers out (O(semaphores + jobs) for `/metrics`, never O(leases); the status routes copy
//! what a `Status` request copies) and serialize outside it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::gate::{same_secret, Gate, Ticket};
use crate::metrics;
use crate::state::Shared;
use crate::status::{status_doc, Ask};
use crate::LogEvery;

/// Longest request head (request line and headers) accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP connections open at once; a new one past this is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// HTTP connections still sending their request head; a new one past this makes the oldest
/// of them go.
pub(crate) const MAX_READING: usize = 256;

const DASHBOARD: &str = include_str!("dashboard.html");

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
                tasks.spawn(async move {
                    // One deadline for the TLS handshake and the request head together.
                    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
                    match shared.config.tls.clone() {
                        None => connection(&shared, stream, ticket, token_needed, deadline).await,
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
                                connection(&shared, tls, ticket, token_needed, deadline).await;
                            }
                        }
                    }
                    drop(permit);
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

/// A response: status code, content type, body, extra headers.
struct Response {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: &'static str,
}

impl Response {
    fn new(code: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            code,
            content_type,
            body: body.into(),
            extra: "",
        }
    }

    fn json(body: Vec<u8>) -> Response {
        Response::new(200, "application/json", body)
    }

    fn error(code: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string();
        Response::new(code, "application/json", body)
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    ticket: Ticket,
    token_needed: bool,
    deadline: tokio::time::Instant,
) {
    let head = tokio::select! {
        h = tokio::time::timeout_at(deadline, read_head(&mut stream)) => h,
        // The oldest of too many clients still sending their heads: make room.
        _ = ticket.evicted.notified() => return,
    };
    ticket.greeted();
    let (route, response, head_only) = match head {
        Err(_) => (
            "other",
            Response::error(408, "request head not received in time"),
            false,
        ),
        Ok(Err(HeadError::Io)) => return,
        // Answered at once, not at the head's deadline: a turnstile client pointed at this
        // port by mistake reads "HTTP/1." and says which port is which.
        Ok(Err(HeadError::NotHttp)) => (
            "other",
            Response::error(
                400,
                "not an HTTP request: this is turnstile's HTTP port; clients use the protocol port",
            ),
            false,
        ),
        Ok(Err(HeadError::TooLarge)) => (
            "other",
            Response::error(431, "request head too large"),
            false,
        ),
        Ok(Ok(head)) => match parse_request_line(&head) {
            Err(why) => ("other", Response::error(400, why), false),
            Ok((method, target)) => {
                let path = target.split('?').next().unwrap_or_default();
                let open = matches!(path, "/" | "/index.html");
                let (route, response) = if token_needed && !open && !authorized(shared, &head) {
                    let mut r = Response::error(401, "a bearer token is required");
                    r.extra = "WWW-Authenticate: Bearer realm=\"turnstile\"\r\n";
                    ("other", r)
                } else if method == "GET" || method == "HEAD" {
                    handle(shared, target)
                } else {
                    let mut r = Response::error(405, "only GET and HEAD are served");
                    r.extra = "Allow: GET, HEAD\r\n";
                    ("other", r)
                };
                (route, response, method == "HEAD")
            }
        },
    };
    shared.metrics.http_request(route, response.code);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n{}\r\n",
        response.code,
        reason(response.code),
        response.content_type,
        response.body.len(),
        response.extra,
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// Whether the request head carries `Authorization: Bearer` with the server's token (or its
/// admin token).
fn authorized(shared: &Shared, head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else {
        return false;
    };
    let config = &shared.config;
    head.split("\r\n").skip(1).any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return false;
        }
        let value = value.trim();
        let Some(token) = value
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim())
        else {
            return false;
        };
        [&config.auth_token, &config.admin_token]
            .into_iter()
            .flatten()
            .any(|t| same_secret(token, t))
    })
}

enum HeadError {
    /// The peer went away or the socket failed: nobody to answer.
    Io,
    /// No end of the head within [`MAX_HEAD`] bytes.
    TooLarge,
    /// The first byte cannot start a request line (a method is upper-case letters): a binary
    /// protocol, such as a turnstile client's `Hello`.
    NotHttp,
}

/// Reads until the blank line that ends the request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io);
        }
        if buf.is_empty() && !chunk[0].is_ascii_uppercase() {
            return Err(HeadError::NotHttp);
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf[searched_from..], b"\r\n\r\n") {
            buf.truncate(searched_from + end);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The method and target of the request line (`GET /path?query HTTP/1.1`).
fn parse_request_line(head: &[u8]) -> Result<(&str, &str), &'static str> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| "request line is not UTF-8")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x is served");
    }
    if !target.starts_with('/') {
        return Err("the target must be a path");
    }
    Ok((method, target))
}

/// Routes a `GET`: the route's name for the metrics, and the response.
fn handle(shared: &Shared, target: &str) -> (&'static str, Response) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/" | "/index.html" => {
            let mut r = Response::new(200, "text/html; charset=utf-8", DASHBOARD);
            // The page is self-contained: nothing but itself and this origin's JSON.
            r.extra = "Content-Security-Policy: default-src 'self'; script-src 'unsafe-inline'; \
                       style-src 'unsafe-inline'; img-src 'self' data:\r\n";
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
            None => ("other", Response::error(404, "no such page")),
        },
    }
}

/// `GET /v1/status?prefix=P&after=A&limit=N`: a page of the status, as the protocol's
/// `Status` request gives it (every parameter optional).
fn status_page(shared: &Shared, query: &str) -> Response {
    let (mut prefix, mut after, mut limit) = (String::new(), String::new(), 0u32);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            return Response::error(400, "a parameter is not valid percent-encoded UTF-8");
        };
        match key {
            "prefix" => prefix = value,
            "after" => after = value,
            "limit" => match value.parse() {
                Ok(n) => limit = n,
                Err(_) => return Response::error(400, "limit is not a number"),
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
    Response::json(status_doc(shared, ask).to_json())
}

fn metrics_page(shared: &Shared) -> Response {
    let core = metrics::collect(shared);
    Response::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        metrics::render(&core, &shared.metrics),
    )
}

fn semaphore(shared: &Shared, encoded: &str) -> Response {
    let Some(name) = percent_decode(encoded) else {
        return Response::error(400, "the semaphore name is not valid percent-encoded UTF-8");
    };
    if name.is_empty() {
        return Response::error(404, "no semaphore name given");
    }
    let ask = Ask {
        name: &name,
        ..Ask::default()
    };
    match status_doc(shared, ask).semaphores.into_iter().next() {
        Some(s) => match serde_json::to_vec(&s) {
            Ok(body) => Response::json(body),
            Err(_) => Response::error(500, "cannot serialize the status"),
        },
        None => Response::error(404, &format!("no semaphore named {name:?}")),
    }
}

fn events(shared: &Shared, query: &str) -> Response {
    let mut after = 0;
    // Unknown parameters are ignored, as is usual on the web.
    for pair in query.split('&') {
        if let Some(("after", n)) = pair.split_once('=') {
            match n.parse() {
                Ok(n) => after = n,
                Err(_) => return Response::error(400, "after must be a number"),
            }
        }
    }
    let page = shared.lock().events.since(after);
    match serde_json::to_vec(&page) {
        Ok(body) => Response::json(body),
        Err(_) => Response::error(500, "cannot serialize the events"),
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
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line(b"GET /a HTTP/1.0"), Ok(("GET", "/a")));
        assert!(parse_request_line(b"GET /a").is_err());
        assert!(parse_request_line(b"GET  /a HTTP/1.1").is_err());
        assert!(parse_request_line(b"GET a HTTP/1.1").is_err());
        assert!(parse_request_line(b"GET /a SPDY/3").is_err());
        assert!(parse_request_line(b"\xff\xfe").is_err());
        assert!(parse_request_line(b"").is_err());
    }

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
