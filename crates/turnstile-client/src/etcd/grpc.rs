//! etcd's gRPC API over HTTP/2 (the `h2` crate as the client), with the request and answer
//! of every call in the JSON shapes of etcd's gRPC JSON gateway, translated by [`pb`]: the
//! backend names a call by its gateway path (`/v3/kv/txn`) and builds and reads the same
//! JSON as before, while etcd receives protobuf.
//!
//! One HTTP/2 connection per member carries every request of a client at once (unary calls,
//! lease keep-alives and watches, each a stream of its own); it is made on first use and
//! made again after it broke. A member given up on ([`Pool::forget`]) has its connection
//! torn down, so that nothing waits on a member that hangs.
//!
//! Why gRPC and not the JSON gateway (which serves the same API on the same port over
//! HTTP/1.1): etcd decodes the gateway's JSON by reflection, which for the acquire's txn cost
//! etcd about 0.35 ms of CPU per acquire/release pair, against 0.05 ms for its own Lock
//! request (BENCHMARKS.md, "etcd backend vs etcd's own lock"). Why by hand and not with a
//! generated client: no `protoc` at build time and no large dependency tree for the dozen
//! messages the backend uses.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Request};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::pb::{self, CodecError, Method};

/// Messages larger than this are refused: a status of a big prefix is a few MB at most.
const MAX_MESSAGE: usize = 64 << 20;
/// The receive windows: large enough that a big range answer is not held up by
/// flow-control round trips on loopback or a LAN.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// What a request to one member ended with.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The member could not be reached or broke off (try another).
    Io(io::Error),
    /// etcd answered with an error status.
    Status {
        /// HTTP status (200 for a gRPC error; another when something other than etcd
        /// answered, e.g. a proxy).
        http: u16,
        /// The gRPC status code.
        grpc: u64,
        /// The gRPC status message (e.g. `etcdserver: requested lease not found`).
        message: String,
    },
    /// A request this client could not encode, or an answer it could not decode.
    Codec(CodecError),
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
            Fault::Codec(_) => false,
        }
    }

    /// The fault as one line, for an error message.
    pub(crate) fn message(&self) -> String {
        match self {
            Fault::Io(e) => e.to_string(),
            Fault::Status { message, .. } => message.clone(),
            Fault::Codec(e) => e.to_string(),
        }
    }
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Fault {
        Fault::Io(e)
    }
}

impl From<h2::Error> for Fault {
    fn from(e: h2::Error) -> Fault {
        Fault::Io(if e.is_io() {
            e.into_io()
                .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
        } else {
            io::Error::other(e)
        })
    }
}

impl From<CodecError> for Fault {
    fn from(e: CodecError) -> Fault {
        Fault::Codec(e)
    }
}

fn bad(what: String) -> Fault {
    Fault::Io(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// The method behind a gateway path the backend names.
fn method_of(path: &str) -> Result<&'static Method, Fault> {
    pb::method(path).ok_or_else(|| bad(format!("no gRPC method for {path}")))
}

/// The gRPC status of `headers` (trailers, or the headers of a trailers-only answer):
/// `None` if they carry none.
fn status_of(http: u16, headers: &HeaderMap) -> Option<Result<(), Fault>> {
    let code = headers.get("grpc-status")?;
    let code: u64 = code.to_str().ok()?.trim().parse().unwrap_or(2);
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Err(Fault::Status {
        http,
        grpc: code,
        message,
    }))
}

/// gRPC's percent-encoding of `grpc-message`.
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (raw[i], raw.get(i + 1).copied(), raw.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An answer's HTTP status as a gRPC fault, for one that is not 200 (gRPC's mapping of
/// HTTP statuses, for something other than etcd answering).
fn http_fault(http: u16) -> Fault {
    let grpc = match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    Fault::Status {
        http,
        grpc,
        message: format!("HTTP status {http} instead of a gRPC answer"),
    }
}

/// One gRPC message in its length-prefixed frame.
fn frame(message: &[u8]) -> Result<Bytes, Fault> {
    let len = u32::try_from(message.len()).map_err(|_| bad("request too large".into()))?;
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0); // not compressed
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(Bytes::from(out))
}

/// Takes the first whole message off the front of `buf`, if there is one.
fn next_message(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Fault> {
    let Some(head) = buf.get(..5) else {
        return Ok(None);
    };
    if head[0] != 0 {
        // Never asked for (no grpc-accept-encoding is sent).
        return Err(bad("a compressed gRPC message".into()));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(bad(format!("a gRPC message of {len} bytes")));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let message = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some(message))
}

/// One HTTP/2 connection to a member.
struct Conn {
    send: SendRequest<Bytes>,
    /// The task that drives the connection, aborted when the member is given up on.
    driver: AbortHandle,
}

async fn connect(addr: &str) -> Result<Conn, Fault> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await?;
    let addr = addr.to_owned();
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(addr, %e, "HTTP/2 connection to etcd ended");
        }
    })
    .abort_handle();
    Ok(Conn { send, driver })
}

/// The HTTP/2 connections of one client, one per member.
pub(crate) struct Pool {
    conns: Mutex<HashMap<String, Conn>>,
}

impl Pool {
    /// No connections yet.
    pub(crate) fn new() -> Pool {
        Pool {
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, addr: &str) -> Option<SendRequest<Bytes>> {
        let conns = self.conns.lock().ok()?;
        conns.get(addr).map(|c| c.send.clone())
    }

    /// The connection to `addr`, made if there is none (or `fresh`: a new one in place of
    /// the one there).
    async fn conn(&self, addr: &str, fresh: bool) -> Result<SendRequest<Bytes>, Fault> {
        if !fresh {
            if let Some(send) = self.cached(addr) {
                return Ok(send);
            }
        }
        let conn = connect(addr).await?;
        let send = conn.send.clone();
        if let Ok(mut conns) = self.conns.lock() {
            if let Some(old) = conns.insert(addr.to_owned(), conn) {
                old.driver.abort();
            }
        }
        Ok(send)
    }

    /// Tears down the connection to `addr` (a member given up on: it may hang); what was
    /// in flight on it fails, and the next request makes a new one.
    pub(crate) fn forget(&self, addr: &str) {
        if let Ok(mut conns) = self.conns.lock() {
            if let Some(old) = conns.remove(addr) {
                old.driver.abort();
            }
        }
    }

    /// Opens a stream for `method` on `addr` and sends `message`, ending the request side
    /// if `end`. A cached connection that turns out closed before the request went out is
    /// replaced by a fresh one; nothing was sent on it, so nothing is sent twice.
    async fn start(
        &self,
        addr: &str,
        method: &Method,
        message: Bytes,
        end: bool,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), Fault> {
        let uri = format!("http://{addr}{}", method.path);
        let request = || {
            Request::post(uri.as_str())
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .map_err(|e| bad(format!("a request to {addr}: {e}")))
        };
        request()?;
        let mut fresh = false;
        loop {
            let send = self.conn(addr, fresh).await?;
            let started = match send.ready().await {
                Ok(mut send) => send.send_request(request()?, false),
                Err(e) => Err(e),
            };
            match started {
                Ok((response, mut stream)) => {
                    stream.send_data(message, end)?;
                    return Ok((response, stream));
                }
                Err(e) if !fresh => {
                    tracing::trace!(addr, %e, "the HTTP/2 connection to etcd was closed");
                    fresh = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One unary call: `body` (the gateway's JSON for the request at gateway path `path`)
    /// to `addr`, the answer as the gateway's JSON. A streaming call answered with one
    /// message (`/v3/lease/keepalive`) is made as a stream with one message each way.
    pub(crate) async fn post(&self, addr: &str, path: &str, body: &Value) -> Result<Value, Fault> {
        let method = method_of(path)?;
        let message = frame(&pb::encode(method.request, body)?)?;
        let (response, _stream) = self.start(addr, method, message, true).await?;
        let response = response.await?;
        let http = response.status().as_u16();
        if let Some(status) = status_of(http, response.headers()) {
            // Trailers only: an error (or, oddly, OK with no message).
            status?;
            return Err(bad(format!("no answer to {path}")));
        }
        if http != 200 {
            return Err(http_fault(http));
        }
        let mut body = response.into_body();
        let mut buf = Vec::new();
        while let Some(data) = body.data().await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
            buf.extend_from_slice(data.chunk());
            if buf.len() > MAX_MESSAGE + 5 {
                return Err(bad(format!("an answer to {path} too large")));
            }
        }
        match body.trailers().await? {
            Some(trailers) => match status_of(http, &trailers) {
                Some(status) => status?,
                None => return Err(bad(format!("no gRPC status in the answer to {path}"))),
            },
            None => return Err(bad(format!("no gRPC status in the answer to {path}"))),
        }
        let message = next_message(&mut buf)?
            .ok_or_else(|| bad(format!("no message in the answer to {path}")))?;
        Ok(pb::decode(method.response, &message)?)
    }
}

/// A streaming call (a watch): one request message sent, the answers read one at a time.
/// Dropping it resets the stream, which cancels the watch in etcd.
pub(crate) struct Stream {
    /// Kept open: a finished request side would let etcd end the call.
    _send: SendStream<Bytes>,
    body: RecvStream,
    response: &'static pb::Msg,
    http: u16,
    buf: Vec<u8>,
}

impl Stream {
    /// Opens the streaming call at gateway path `path` on `addr` with the first request
    /// `body`, and waits for etcd's answer headers.
    pub(crate) async fn open(
        pool: &Pool,
        addr: &str,
        path: &str,
        body: &Value,
    ) -> Result<Stream, Fault> {
        let method = method_of(path)?;
        let message = frame(&pb::encode(method.request, body)?)?;
        let (response, send) = pool.start(addr, method, message, false).await?;
        let response = response.await?;
        let http = response.status().as_u16();
        if let Some(status) = status_of(http, response.headers()) {
            status?;
            return Err(bad(format!("{path} ended at once")));
        }
        if http != 200 {
            return Err(http_fault(http));
        }
        Ok(Stream {
            _send: send,
            body: response.into_body(),
            response: method.response,
            http,
            buf: Vec::new(),
        })
    }

    /// The next answer; an error when the stream ends or breaks.
    pub(crate) async fn next(&mut self) -> Result<Value, Fault> {
        loop {
            if let Some(message) = next_message(&mut self.buf)? {
                return Ok(pb::decode(self.response, &message)?);
            }
            match self.body.data().await {
                Some(data) => {
                    let data = data?;
                    let _ = self.body.flow_control().release_capacity(data.len());
                    self.buf.extend_from_slice(data.chunk());
                }
                None => {
                    if let Some(Some(Err(f))) = self
                        .body
                        .trailers()
                        .await?
                        .map(|t| status_of(self.http, &t))
                    {
                        return Err(f);
                    }
                    return Err(
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended").into(),
                    );
                }
            }
        }
    }
}

/// One connection to one etcd member for raw calls, in the gateway's JSON shapes.
pub struct Channel {
    pool: Pool,
    addr: String,
}

impl Channel {
    /// Connects to the member at `addr` (`HOST:PORT`).
    pub async fn connect(addr: &str) -> Result<Channel, crate::Error> {
        let pool = Pool::new();
        pool.conn(addr, false)
            .await
            .map_err(|f| crate::Error::Protocol(format!("etcd at {addr}: {}", f.message())))?;
        Ok(Channel {
            pool,
            addr: addr.to_owned(),
        })
    }

    /// One unary call, named by its gateway path (`/v3/lock/lock`, `/v3/kv/txn`...), with
    /// the request and the answer as the gateway's JSON. A broken connection is made again
    /// by the next call.
    pub async fn call(&self, path: &str, body: &Value) -> Result<Value, crate::Error> {
        self.pool.post(&self.addr, path, body).await.map_err(|f| {
            if matches!(f, Fault::Io(_)) {
                self.pool.forget(&self.addr);
            }
            crate::Error::Protocol(format!("etcd at {}: {}", self.addr, f.message()))
        })
    }
}

/// The gateway JSON of `message`, a request to gRPC path `grpc_path`
/// (`/etcdserverpb.KV/Txn`), for a tool that reads the wire: `None` if this codec does not
/// know the method or the message does not decode.
pub fn decode_request(grpc_path: &str, message: &[u8]) -> Option<Value> {
    let method = pb::METHODS.iter().find(|m| m.path == grpc_path)?;
    pb::decode(method.request, message).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"etcdserver: requested lease not found"),
            "etcdserver: requested lease not found"
        );
        assert_eq!(percent_decode(b"a%20b%25%zz%4"), "a b%%zz%4");
    }

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let mut wire = Vec::new();
        for m in [&b"one"[..], b"", b"three"] {
            wire.extend_from_slice(&frame(m).expect("small"));
        }
        for cut in 0..wire.len() {
            let mut buf = wire[..cut].to_vec();
            let mut got = Vec::new();
            while let Some(m) = next_message(&mut buf).expect("well formed") {
                got.push(m);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(m) = next_message(&mut buf).expect("well formed") {
                got.push(m);
            }
            assert_eq!(got, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        }
        assert!(next_message(&mut vec![1, 0, 0, 0, 0]).is_err());
        assert!(next_message(&mut vec![0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn statuses_map_to_faults() {
        let mut h = HeaderMap::new();
        assert!(status_of(200, &h).is_none());
        h.insert("grpc-status", "0".parse().expect("ASCII"));
        assert!(matches!(status_of(200, &h), Some(Ok(()))));
        h.insert("grpc-status", "5".parse().expect("ASCII"));
        h.insert(
            "grpc-message",
            "etcdserver:%20requested lease not found"
                .parse()
                .expect("ASCII"),
        );
        match status_of(200, &h) {
            Some(Err(f @ Fault::Status { grpc: 5, .. })) => {
                assert!(!f.retryable());
                assert_eq!(f.message(), "etcdserver: requested lease not found");
            }
            other => panic!("{other:?}"),
        }
        h.insert("grpc-status", "14".parse().expect("ASCII"));
        assert!(matches!(status_of(200, &h), Some(Err(f)) if f.retryable()));
        assert!(http_fault(503).retryable());
        assert!(!http_fault(404).retryable());
    }
}
