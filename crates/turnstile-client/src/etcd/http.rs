//! Just enough HTTP/1.1 and base64 to speak to etcd's gRPC JSON gateway (`/v3/...` on the
//! client port): one POST per connection (`Connection: close`), the body read to its end, and
//! for watches a chunked response read one JSON message (one line) at a time.
//!
//! Why not a gRPC client: see ARCHITECTURE.md ("etcd backend"); in short, no `protoc`, no
//! large dependency tree, and the gateway serves everything the backend needs, watches and
//! keep-alives included.

use std::io;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Responses larger than this are refused: a status of a big prefix is a few MB at most.
const MAX_BODY: usize = 64 << 20;

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

async fn send(addr: &str, path: &str, body: &Value) -> io::Result<BufReader<TcpStream>> {
    let body = body.to_string();
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body.as_bytes());
    stream.get_mut().write_all(&req).await?;
    Ok(stream)
}

/// Reads the status line and headers; returns the status and whether the body is chunked,
/// with its length otherwise.
async fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<(u16, bool, Option<usize>)> {
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
    let (mut chunked, mut length) = (false, None);
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
            }
        }
    }
    Ok((status, chunked, length))
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

/// One unary request: POST `body` to `path` on `addr`, the answer as JSON. Streaming
/// endpoints answered with one message (`lease/keepalive`) are unwrapped from `result`.
pub(crate) async fn post(addr: &str, path: &str, body: &Value) -> Result<Value, Fault> {
    let mut r = send(addr, path, body).await?;
    let (status, chunked, length) = read_head(&mut r).await?;
    let mut data = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r).await? {
            data.extend_from_slice(&c);
            if data.len() > MAX_BODY {
                return Err(bad("response too large").into());
            }
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(bad("response too large").into());
        }
        data.resize(n, 0);
        r.read_exact(&mut data).await?;
    } else {
        (&mut r)
            .take(MAX_BODY as u64)
            .read_to_end(&mut data)
            .await?;
    }
    if status != 200 {
        return Err(parse_error(status, &data));
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

/// A streaming response (a watch): JSON messages one at a time.
pub(crate) struct Stream {
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
    ended: bool,
}

impl Stream {
    /// Opens a streaming request.
    pub(crate) async fn open(addr: &str, path: &str, body: &Value) -> Result<Stream, Fault> {
        let mut r = send(addr, path, body).await?;
        let (status, chunked, _) = read_head(&mut r).await?;
        if status != 200 {
            let mut data = Vec::new();
            let _ = (&mut r).take(1 << 16).read_to_end(&mut data).await;
            return Err(parse_error(status, &data));
        }
        if !chunked {
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
