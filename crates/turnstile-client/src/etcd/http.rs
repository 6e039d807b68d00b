//! Just enough HTTP/1.1 and base64 to speak to etcd's gRPC JSON gateway (`/v3/...` on the
//! client port): unary POSTs over kept-alive connections from a small [`Pool`] per client
//! (each answer read to the exact end of its body, so that the connection can carry the next
//! request), and for watches a chunked response on a connection of its own
//! (`Connection: close`), read one JSON message (one line) at a time.
//!
//! Why a pool: a fresh TCP connection per request cost a connect, an accept and a new
//! goroutine in etcd for every request, about a third of a lock pair's time (see
//! BENCHMARKS.md, "etcd backend").
//!
//! Why not a gRPC client: see ARCHITECTURE.md ("etcd backend"); in short, no `protoc`, no
//! large dependency tree, and the gateway serves everything the backend needs, watches and
//! keep-alives included.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Responses larger than this are refused: a status of a big prefix is a few MB at most.
const MAX_BODY: usize = 64 << 20;
/// Idle connections kept per member. A client has one request in flight most of the time
/// (a few at once: an acquire, a release in the background, a keep-alive).
const MAX_IDLE: usize = 4;

/// What a request to one member ended with.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The member could not be reached or broke off (try another).
    Io(io::Error),
    /// The gateway answered with an error status: gRPC code and message.
    Status {
        /// HTTP status.
        http: u16,
        /// gRPC code from the error body, if any.
        grpc: u64,
        /// The error message.
        message: String,
    },
}

impl Fault {
    /// Whether another member (or a later attempt) may succeed: transport errors, and the
    /// gRPC codes of a member without a leader or a request that timed out inside etcd.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Fault::Io(_) => true,
            // 4 DeadlineExceeded, 14 Unavailable, 13 Internal ("no leader" on some paths).
            Fault::Status { grpc, http, .. } => {
                matches!(grpc, 4 | 13 | 14) || *http == 503 || *http == 502
            }
        }
    }
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Fault {
        Fault::Io(e)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

async fn connect(addr: &str) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// Writes one POST; `close` asks the server to close the connection after its answer.
async fn write_request(
    stream: &mut BufReader<TcpStream>,
    addr: &str,
    path: &str,
    body: &str,
    close: bool,
) -> io::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body.as_bytes());
    stream.get_mut().write_all(&req).await
}

/// A response's status line and headers.
struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
    /// The server will close the connection after this response.
    close: bool,
}

/// Reads the status line and headers.
async fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Head> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("malformed HTTP status line"))?;
    let (mut chunked, mut length, mut close) = (false, None, line.starts_with("HTTP/1.0"));
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    Ok(Head {
        status,
        chunked,
        length,
        close,
    })
}

/// Reads the next chunk of a chunked body; `None` at its end.
async fn read_chunk(r: &mut BufReader<TcpStream>) -> io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(bad("connection closed inside a chunked body"));
    }
    let size_text = line.trim().split(';').next().unwrap_or("");
    let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
    if size > MAX_BODY {
        return Err(bad("chunk too large"));
    }
    if size == 0 {
        return Ok(None);
    }
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data).await?;
    data.truncate(size);
    Ok(Some(data))
}

fn parse_error(http: u16, body: &[u8]) -> Fault {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v
        .get("error")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Fault::Status {
        http,
        grpc: v.get("code").and_then(Value::as_u64).unwrap_or(0),
        message,
    }
}

/// How one exchange on a connection ended.
enum Exchange {
    /// An answer; the connection, if it can carry another request.
    Answered(Result<Value, Fault>, Option<BufReader<TcpStream>>),
    /// The connection broke before any byte of an answer arrived.
    NoAnswer(io::Error),
}

/// Sends one request on `conn` and reads its whole answer.
async fn exchange(mut conn: BufReader<TcpStream>, addr: &str, path: &str, body: &str) -> Exchange {
    if let Err(e) = write_request(&mut conn, addr, path, body, false).await {
        return Exchange::NoAnswer(e);
    }
    // Only the first byte tells a connection the server had already closed (a kept-alive
    // one it dropped while idle) from one that broke in the middle of an answer.
    match conn.fill_buf().await {
        Ok([]) => {
            return Exchange::NoAnswer(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response",
            ))
        }
        Ok(_) => {}
        Err(e) => return Exchange::NoAnswer(e),
    }
    match read_answer(&mut conn).await {
        Ok((answer, reusable)) => Exchange::Answered(answer, reusable.then_some(conn)),
        Err(e) => Exchange::Answered(Err(e.into()), None),
    }
}

/// Reads one answer to its exact end; whether the connection may carry another request.
async fn read_answer(r: &mut BufReader<TcpStream>) -> io::Result<(Result<Value, Fault>, bool)> {
    let head = read_head(r).await?;
    let mut data = Vec::new();
    let mut reusable = !head.close;
    if head.chunked {
        while let Some(c) = read_chunk(r).await? {
            data.extend_from_slice(&c);
            if data.len() > MAX_BODY {
                return Err(bad("response too large"));
            }
        }
        // No trailers from the gateway; a trailer line would be read as the next status
        // line and refused, so do not risk it: the blank line ends the chunked body.
        let mut end = String::new();
        r.read_line(&mut end).await?;
        reusable &= end.trim().is_empty();
    } else if let Some(n) = head.length {
        if n > MAX_BODY {
            return Err(bad("response too large"));
        }
        data.resize(n, 0);
        r.read_exact(&mut data).await?;
    } else {
        // Delimited by the end of the connection.
        reusable = false;
        r.take(MAX_BODY as u64).read_to_end(&mut data).await?;
    }
    Ok((parse_answer(head.status, &data), reusable))
}

fn parse_answer(status: u16, data: &[u8]) -> Result<Value, Fault> {
    if status != 200 {
        return Err(parse_error(status, data));
    }
    // A streamed answer is one JSON message per line; a unary one is a single document.
    let first = data
        .split(|&b| b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or(&[]);
    let v: Value = serde_json::from_slice(first).map_err(|e| bad(&format!("bad JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(parse_error(500, err.to_string().as_bytes()));
    }
    Ok(v.get("result").cloned().unwrap_or(v))
}

/// Kept-alive connections to the members, for unary requests.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<BufReader<TcpStream>>>>,
}

impl Pool {
    /// An empty pool.
    pub(crate) fn new() -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, addr: &str) -> Option<BufReader<TcpStream>> {
        self.idle.lock().ok()?.get_mut(addr)?.pop()
    }

    fn give_back(&self, addr: &str, conn: BufReader<TcpStream>) {
        // Bytes already buffered would be taken for the next answer: such a connection is
        // out of step, so it is dropped.
        if !conn.buffer().is_empty() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let conns = idle.entry(addr.to_owned()).or_default();
            if conns.len() < MAX_IDLE {
                conns.push(conn);
            }
        }
    }

    /// Drops the idle connections to `addr` (a member given up on: they may hang).
    pub(crate) fn forget(&self, addr: &str) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.remove(addr);
        }
    }

    /// One unary request: POST `body` to `path` on `addr`, the answer as JSON. Streaming
    /// endpoints answered with one message (`lease/keepalive`) are unwrapped from `result`.
    ///
    /// An idle connection is used if there is one; if it turns out to be closed before any
    /// answer came (the server dropped it while idle), the request is sent again on a fresh
    /// connection. That resend is as safe as the fail-over to another member that a broken
    /// connection leads to anyway: every request of the backend is idempotent or guarded by
    /// a compare (see the module docs of `etcd`).
    pub(crate) async fn post(&self, addr: &str, path: &str, body: &Value) -> Result<Value, Fault> {
        let body = body.to_string();
        while let Some(conn) = self.take(addr) {
            match exchange(conn, addr, path, &body).await {
                Exchange::Answered(answer, conn) => {
                    if let Some(conn) = conn {
                        self.give_back(addr, conn);
                    }
                    return answer;
                }
                Exchange::NoAnswer(e) => {
                    tracing::trace!(addr, %e, "a kept-alive connection to etcd was closed");
                }
            }
        }
        let conn = connect(addr).await?;
        match exchange(conn, addr, path, &body).await {
            Exchange::Answered(answer, conn) => {
                if let Some(conn) = conn {
                    self.give_back(addr, conn);
                }
                answer
            }
            Exchange::NoAnswer(e) => Err(e.into()),
        }
    }
}

/// A streaming response (a watch): JSON messages one at a time.
pub(crate) struct Stream {
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
    ended: bool,
}

impl Stream {
    /// Opens a streaming request.
    pub(crate) async fn open(addr: &str, path: &str, body: &Value) -> Result<Stream, Fault> {
        let mut r = connect(addr).await?;
        write_request(&mut r, addr, path, &body.to_string(), true).await?;
        let head = read_head(&mut r).await?;
        if head.status != 200 {
            let mut data = Vec::new();
            let _ = (&mut r).take(1 << 16).read_to_end(&mut data).await;
            return Err(parse_error(head.status, &data));
        }
        if !head.chunked {
            return Err(bad("expected a chunked stream").into());
        }
        Ok(Stream {
            r,
            buf: Vec::new(),
            ended: false,
        })
    }

    /// The next message's `result`; an error when the stream ends or breaks.
    pub(crate) async fn next(&mut self) -> Result<Value, Fault> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(&line)
                    .map_err(|e| bad(&format!("bad JSON in a stream: {e}")))?;
                if let Some(err) = v.get("error") {
                    return Err(parse_error(500, err.to_string().as_bytes()));
                }
                return Ok(v.get("result").cloned().unwrap_or(v));
            }
            if self.ended {
                return Err(
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended").into(),
                );
            }
            match read_chunk(&mut self.r).await? {
                Some(c) => {
                    self.buf.extend_from_slice(&c);
                    if self.buf.len() > MAX_BODY {
                        return Err(bad("stream message too large").into());
                    }
                }
                None => self.ended = true,
            }
        }
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as protobuf's JSON mapping writes `bytes`.
pub(crate) fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` if malformed.
pub(crate) fn unb64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in text.trim_end_matches('=').as_bytes() {
        let v = B64.iter().position(|&c| c == b)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// A gateway stand-in: answers every request with `{"n":I}` and a Content-Length,
    /// counting connections; closes each connection after `per_connection` answers.
    async fn fake_gateway(per_connection: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    for _ in 0..per_connection {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line.trim().is_empty() {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length];
                        if r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let answer = format!("{{\"n\":{n}}}");
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Sequential requests share one kept-alive connection.
    #[tokio::test]
    async fn requests_reuse_a_connection() {
        let (addr, accepted) = fake_gateway(usize::MAX).await;
        let pool = Pool::new();
        for _ in 0..5 {
            let v = pool
                .post(&addr, "/v3/kv/range", &Value::Null)
                .await
                .expect("answer");
            assert_eq!(v["n"], 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A kept-alive connection that the server closed while it sat idle is replaced by a
    /// fresh one without failing the request.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let (addr, accepted) = fake_gateway(1).await;
        let pool = Pool::new();
        for i in 0..3 {
            let v = pool
                .post(&addr, "/v3/kv/range", &Value::Null)
                .await
                .expect("answer");
            assert_eq!(v["n"], i);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn base64_round_trips() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(plain.as_bytes()), coded);
            assert_eq!(unb64(coded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unb64(&b64(&all)), Some(all));
        assert_eq!(unb64("a$=="), None);
    }
}
