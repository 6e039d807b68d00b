//! Raw-socket tests of the coordinator's connection handling.
//!
//! Each test starts an in-process server with [`turnstile_server::run`] on `127.0.0.1:0` and
//! talks to it with [`Raw`], a bare TCP connection that sends whatever bytes the test wants
//! (well-formed frames come from the `turnstile-proto` encoder) and decodes what comes back.
//! Misbehaving connections must get the error PROTOCOL.md names and be closed, without
//! disturbing anyone else; the well-behaved party is usually the real `turnstile-client`.
//!
//! Every wait is for an event (a reply, EOF) bounded by a generous timeout; a short quiet
//! period is used only to show that something does *not* arrive.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use turnstile_proto::{
    decode_reply, encode_request, split_frame, ErrorCode, Reply, Request, SemaphoreStatus,
    StatusDoc, MAGIC, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, NO_TIMEOUT, VERSION,
};
use turnstile_server::Config;

/// How long any awaited event may take: generous, for a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long to listen to show that a reply does *not* come.
const QUIET: Duration = Duration::from_millis(300);

/// An in-process coordinator; stops when dropped.
struct TestServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    async fn start() -> TestServer {
        TestServer::with_config(Config::default()).await
    }

    async fn with_config(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            turnstile_server::run(listener, config, shutdown)
                .await
                .expect("server runs");
        });
        TestServer { addr, _stop: stop }
    }

    async fn client(&self) -> turnstile_client::Client {
        turnstile_client::Client::connect(&format!("tcp://{}", self.addr))
            .await
            .expect("client connects")
    }
}

/// A reply copied out of the receive buffer.
#[derive(Debug, PartialEq)]
enum Msg {
    HelloOk {
        version: u16,
    },
    SessionOpened {
        ttl_ms: u32,
    },
    Done,
    Granted(u64),
    Status(StatusDoc),
    Pong,
    Error(ErrorCode, String),
    LeaseLost(u64),
    SessionLost(u64),
    /// A job or group answer: these tests look only at its kind.
    Job(String),
    /// The held leases of the session, sorted.
    Leases(Vec<u64>),
}

fn owned(reply: Reply<'_>) -> Msg {
    match reply {
        Reply::HelloOk { version, .. } => Msg::HelloOk { version },
        Reply::SessionOpened { ttl_ms, .. } => Msg::SessionOpened { ttl_ms },
        Reply::Done => Msg::Done,
        Reply::Granted { token } => Msg::Granted(token),
        Reply::Status { json } => Msg::Status(StatusDoc::from_json(json).expect("status JSON")),
        Reply::Pong => Msg::Pong,
        Reply::Error { code, message } => Msg::Error(code, message.to_owned()),
        Reply::LeaseLost { lease, .. } => Msg::LeaseLost(lease),
        Reply::SessionLost { session, .. } => Msg::SessionLost(session),
        Reply::Leases { leases } => {
            let mut ids: Vec<u64> = leases.iter().collect();
            ids.sort_unstable();
            Msg::Leases(ids)
        }
        other @ (Reply::JobCompleted { .. }
        | Reply::JobBusy { .. }
        | Reply::JobReset { .. }
        | Reply::GroupSettled { .. }) => Msg::Job(format!("{other:?}")),
    }
}

/// How a read ended when no frame came.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The server closed the connection (EOF, or a reset after it closed with unread input).
    Closed,
    /// Nothing arrived in time.
    Quiet,
}

/// A bare connection to the server.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Frames received while waiting for another request's reply.
    stash: VecDeque<(u32, Msg)>,
    next_id: u32,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: Vec::new(),
            stash: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Hello, then a session with `ttl_ms` (0: the server's default).
    async fn with_session(addr: SocketAddr, session: u64, ttl_ms: u32) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.hello().await;
        let reply = raw.call(&Request::OpenSession { session, ttl_ms }).await;
        assert!(matches!(reply, Msg::SessionOpened { .. }), "{reply:?}");
        raw
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a request with the next request id and returns that id.
    async fn send(&mut self, request: &Request<'_>) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = Vec::new();
        encode_request(id, request, &mut frame);
        self.send_bytes(&frame).await;
        id
    }

    async fn hello(&mut self) {
        let reply = self
            .call(&Request::Hello {
                magic: MAGIC,
                version: VERSION,
                client: "robustness test",
                token: "",
            })
            .await;
        assert_eq!(reply, Msg::HelloOk { version: VERSION });
    }

    /// The next frame, or how the connection ended if none comes within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Result<(u32, Msg), Ended> {
        if let Some(frame) = self.stash.pop_front() {
            return Ok(frame);
        }
        let deadline = Instant::now() + wait;
        loop {
            if let Some((payload, used)) =
                split_frame(&self.buf, MAX_REPLY_FRAME).expect("server frames are valid")
            {
                let (id, reply) = decode_reply(payload).expect("server replies decode");
                let msg = owned(reply);
                self.buf.drain(..used);
                return Ok((id, msg));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Ended::Quiet),
                Ok(Ok(0)) => {
                    assert!(self.buf.is_empty(), "EOF inside a frame: {:?}", self.buf);
                    return Err(Ended::Closed);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Ended::Closed)
                }
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
    }

    /// The next frame; fails if none comes within [`PATIENCE`].
    async fn next(&mut self) -> (u32, Msg) {
        match self.next_within(PATIENCE).await {
            Ok(frame) => frame,
            Err(ended) => panic!("expected a frame, got {ended:?}"),
        }
    }

    /// The reply to request `id`; other frames that arrive first are kept for later.
    async fn reply_to(&mut self, id: u32) -> Msg {
        if let Some(i) = self.stash.iter().position(|(i, _)| *i == id) {
            return self.stash.remove(i).expect("index is valid").1;
        }
        let mut others = Vec::new();
        let msg = loop {
            let (got, msg) = match self.next_within(PATIENCE).await {
                Ok(frame) => frame,
                Err(ended) => panic!("expected the reply to request {id}, got {ended:?}"),
            };
            if got == id {
                break msg;
            }
            others.push((got, msg));
        };
        self.stash.extend(others);
        msg
    }

    /// Sends a request and waits for its reply.
    async fn call(&mut self, request: &Request<'_>) -> Msg {
        let id = self.send(request).await;
        self.reply_to(id).await
    }

    /// Expects one error frame with request id `id` and a code among `codes`, then the end of
    /// the connection. Returns the code and message.
    async fn expect_error_and_close(
        &mut self,
        id: u32,
        codes: &[ErrorCode],
    ) -> (ErrorCode, String) {
        let (got, msg) = self.next().await;
        let Msg::Error(code, message) = msg else {
            panic!("expected an error reply, got {msg:?}");
        };
        assert_eq!(got, id, "the error carries request id {id}");
        assert!(
            codes.contains(&code),
            "code {code:?} not among {codes:?}: {message}"
        );
        self.expect_closed().await;
        (code, message)
    }

    /// Expects the server to close the connection with nothing more sent.
    async fn expect_closed(&mut self) {
        match self.next_within(PATIENCE).await {
            Err(Ended::Closed) => {}
            other => panic!("expected the connection to be closed, got {other:?}"),
        }
    }

    async fn status(&mut self, name: &str) -> SemaphoreStatus {
        let Msg::Status(doc) = self
            .call(&Request::Status {
                name,
                prefix: "",
                after: "",
                limit: 0,
            })
            .await
        else {
            panic!("status reply expected");
        };
        doc.semaphores
            .into_iter()
            .find(|s| s.name == name)
            .expect("semaphore in status")
    }
}

/// A frame holding `request` with request id `id`.
fn frame(id: u32, request: &Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(id, request, &mut out);
    out
}

/// Deterministic pseudo-random bytes (xorshift), so that a failure can be replayed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Acquires and releases through the real client: proves the server still serves it.
async fn round_trip(client: &turnstile_client::Client, name: &str) {
    let sem = client.semaphore(name, 1).await.expect("ensure");
    let permit = timeout(PATIENCE, sem.acquire())
        .await
        .expect("acquire in time")
        .expect("acquire");
    permit.release().await.expect("release");
}

/// Every decimal number in a message.
fn numbers_in(message: &str) -> Vec<u64> {
    message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Garbage gets an error and a closed connection, while a well-behaved client keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_without_disturbing_others() {
    let server = TestServer::start().await;
    let good = server.client().await;
    round_trip(&good, "garbage").await;
    // The good client holds a permit across the whole test.
    let held = good
        .semaphore("garbage-held", 1)
        .await
        .expect("ensure")
        .acquire()
        .await
        .expect("acquire");

    // An HTTP request: "GET " read as a length is far over the limit.
    let mut http = Raw::connect(server.addr).await;
    http.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let refused = [
        ErrorCode::TooLarge,
        ErrorCode::Handshake,
        ErrorCode::Malformed,
    ];
    http.expect_error_and_close(0, &refused).await;

    // Random bytes, several seeds.
    for seed in 1..=5u64 {
        let mut random = Raw::connect(server.addr).await;
        random.send_bytes(&noise(64, seed)).await;
        random.expect_error_and_close(0, &refused).await;
    }

    // A frame of an unknown kind as the first frame: undecodable, so Malformed.
    let mut unknown = Raw::connect(server.addr).await;
    unknown.send_bytes(&[0, 0, 0, 5, 0x7F, 0, 0, 0, 9]).await;
    unknown
        .expect_error_and_close(9, &[ErrorCode::Malformed])
        .await;

    // A well-formed Hello with the wrong magic.
    let mut magic = Raw::connect(server.addr).await;
    magic
        .send_bytes(&frame(
            1,
            &Request::Hello {
                magic: *b"HTTP",
                version: VERSION,
                client: "x",
                token: "",
            },
        ))
        .await;
    magic
        .expect_error_and_close(1, &[ErrorCode::Handshake])
        .await;

    // Garbage after a good handshake and session.
    let mut late = Raw::with_session(server.addr, 0x5eed, 0).await;
    late.send_bytes(b"\0\0\0\x06\xEE\0\0\0\x07\x01").await;
    late.expect_error_and_close(7, &[ErrorCode::Malformed])
        .await;

    // The client connected before still works, and so does one connected after.
    round_trip(&good, "garbage").await;
    let st = good.status(Some("garbage-held")).await.expect("status");
    assert_eq!(st.semaphores[0].in_use, 1, "the held permit is untouched");
    held.release().await.expect("release");
    let after = server.client().await;
    round_trip(&after, "garbage").await;
    round_trip(&after, "garbage-held").await;
}

/// An oversized frame gets `TooLarge` and a closed connection; the limit itself is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused() {
    let server = TestServer::start().await;
    let good = server.client().await;

    // Before the handshake: the largest possible length prefix.
    let mut huge = Raw::connect(server.addr).await;
    huge.send_bytes(&[0xFF, 0xFF, 0xFF, 0xFF]).await;
    huge.expect_error_and_close(0, &[ErrorCode::TooLarge]).await;

    // After the handshake: one byte over the limit. Only the prefix is needed to refuse it.
    let mut over = Raw::with_session(server.addr, 0x0b16, 0).await;
    let len = u32::try_from(MAX_REQUEST_FRAME + 1).expect("fits");
    over.send_bytes(&len.to_be_bytes()).await;
    let (_, message) = over.expect_error_and_close(0, &[ErrorCode::TooLarge]).await;
    assert!(
        numbers_in(&message).contains(&(MAX_REQUEST_FRAME as u64)),
        "the message names the limit: {message}"
    );

    // Exactly at the limit the frame is read whole (and refused only for its content: a Ping
    // with trailing bytes).
    let mut at_limit = Raw::with_session(server.addr, 0x0b17, 0).await;
    let mut bytes = u32::try_from(MAX_REQUEST_FRAME)
        .expect("fits")
        .to_be_bytes()
        .to_vec();
    bytes.push(0x0C); // Ping
    bytes.extend_from_slice(&77u32.to_be_bytes());
    bytes.resize(4 + MAX_REQUEST_FRAME, 0);
    at_limit.send_bytes(&bytes).await;
    at_limit
        .expect_error_and_close(77, &[ErrorCode::Malformed])
        .await;

    round_trip(&good, "oversized").await;
    round_trip(&server.client().await, "oversized").await;
}

/// A half frame then EOF disturbs nobody; too-short and unknown-kind frames are `Malformed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_unknown_frames() {
    let server = TestServer::start().await;
    let good = server.client().await;
    let mut peer = Raw::with_session(server.addr, 0x9eed, 0).await;
    assert_eq!(
        peer.call(&Request::Ensure {
            capacity: 1,
            name: "trunc"
        })
        .await,
        Msg::Done
    );

    // Half an Acquire, then EOF.
    let mut half = Raw::with_session(server.addr, 0x4a1f, 0).await;
    let acquire = frame(
        5,
        &Request::Acquire {
            lease: 1,
            weight: 1,
            timeout_ms: NO_TIMEOUT,
            name: "trunc",
        },
    );
    half.send_bytes(&acquire[..acquire.len() / 2]).await;
    half.stream.shutdown().await.expect("shutdown write");
    half.expect_closed().await;

    // The half acquire took nothing: the others are served as before.
    let Msg::Granted(token) = peer
        .call(&Request::Acquire {
            lease: 1,
            weight: 1,
            timeout_ms: 0,
            name: "trunc",
        })
        .await
    else {
        panic!("the permit should be free");
    };
    assert_eq!(token, 1, "the first grant of the semaphore");
    assert_eq!(peer.call(&Request::Release { lease: 1 }).await, Msg::Done);
    round_trip(&good, "trunc").await;

    // A length below the 5 bytes of kind and request id.
    let mut short = Raw::with_session(server.addr, 0x5407, 0).await;
    short.send_bytes(&[0, 0, 0, 1, 0x0C]).await;
    short
        .expect_error_and_close(0, &[ErrorCode::Malformed])
        .await;

    // An unknown kind after the handshake: the error echoes the request id.
    let mut unknown = Raw::with_session(server.addr, 0x0dd, 0).await;
    unknown
        .send_bytes(&[0, 0, 0, 7, 0x7F, 0, 0, 0, 42, 1, 2])
        .await;
    unknown
        .expect_error_and_close(42, &[ErrorCode::Malformed])
        .await;

    assert_eq!(peer.call(&Request::Ping).await, Msg::Pong);
    round_trip(&good, "trunc").await;
}

/// Session requests before a session get `NoSession`; handshake mistakes get `Handshake`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_handshake_errors() {
    let server = TestServer::start().await;

    let mut raw = Raw::connect(server.addr).await;
    raw.hello().await;
    assert_eq!(
        raw.call(&Request::Ensure {
            capacity: 1,
            name: "nosession"
        })
        .await,
        Msg::Done,
        "ensure needs no session"
    );
    for request in [
        Request::Acquire {
            lease: 1,
            weight: 1,
            timeout_ms: NO_TIMEOUT,
            name: "nosession",
        },
        Request::Release { lease: 1 },
        Request::KeepAlive,
        Request::CloseSession,
    ] {
        let reply = raw.call(&request).await;
        assert!(
            matches!(reply, Msg::Error(ErrorCode::NoSession, _)),
            "{request:?} without a session: {reply:?}"
        );
    }
    // The connection stays usable, and nothing was acquired.
    assert_eq!(raw.call(&Request::Ping).await, Msg::Pong);
    let st = raw.status("nosession").await;
    assert_eq!((st.in_use, st.queued), (0, 0));
    // A session makes the same acquire work.
    let reply = raw
        .call(&Request::OpenSession {
            session: 0xabc,
            ttl_ms: 0,
        })
        .await;
    assert!(
        matches!(reply, Msg::SessionOpened { ttl_ms: 10_000 }),
        "{reply:?}"
    );
    let reply = raw
        .call(&Request::Acquire {
            lease: 1,
            weight: 1,
            timeout_ms: NO_TIMEOUT,
            name: "nosession",
        })
        .await;
    assert!(matches!(reply, Msg::Granted(_)), "{reply:?}");

    // A second Hello.
    let id = raw
        .send(&Request::Hello {
            magic: MAGIC,
            version: VERSION,
            client: "again",
            token: "",
        })
        .await;
    raw.expect_error_and_close(id, &[ErrorCode::Handshake])
        .await;

    // A first frame that is not Hello.
    let mut rude = Raw::connect(server.addr).await;
    rude.send_bytes(&frame(3, &Request::Ping)).await;
    rude.expect_error_and_close(3, &[ErrorCode::Handshake])
        .await;

    // The wrong protocol version: the message names both.
    let theirs = VERSION + 998;
    let mut old = Raw::connect(server.addr).await;
    old.send_bytes(&frame(
        1,
        &Request::Hello {
            magic: MAGIC,
            version: theirs,
            client: "from the future",
            token: "",
        },
    ))
    .await;
    let (_, message) = old.expect_error_and_close(1, &[ErrorCode::Handshake]).await;
    let numbers = numbers_in(&message);
    assert!(
        numbers.contains(&u64::from(theirs)) && numbers.contains(&u64::from(VERSION)),
        "the message should name versions {theirs} and {VERSION}: {message}"
    );
}

/// A waiting acquire does not hold up later requests on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_head_of_line_blocking() {
    let server = TestServer::start().await;
    let mut holder = Raw::with_session(server.addr, 0x401d, 0).await;
    let ensure = Request::Ensure {
        capacity: 1,
        name: "hol",
    };
    assert_eq!(holder.call(&ensure).await, Msg::Done);
    let acquire = Request::Acquire {
        lease: 1,
        weight: 1,
        timeout_ms: NO_TIMEOUT,
        name: "hol",
    };
    let Msg::Granted(held_token) = holder.call(&acquire).await else {
        panic!("the holder gets the free permit");
    };

    let mut waiter = Raw::with_session(server.addr, 0x3a17, 0).await;
    // Four requests in one write: the acquire must wait, the others must not.
    let mut batch = Vec::new();
    encode_request(10, &acquire, &mut batch);
    encode_request(11, &Request::Ping, &mut batch);
    encode_request(12, &Request::KeepAlive, &mut batch);
    encode_request(
        13,
        &Request::Status {
            name: "hol",
            prefix: "",
            after: "",
            limit: 0,
        },
        &mut batch,
    );
    waiter.send_bytes(&batch).await;
    let mut answered = Vec::new();
    for _ in 0..3 {
        let (id, msg) = waiter.next().await;
        match (id, msg) {
            (11, Msg::Pong) | (12, Msg::Done) => answered.push(id),
            (13, Msg::Status(doc)) => {
                let st = &doc.semaphores[0];
                assert_eq!((st.in_use, st.queued), (1, 1), "the acquire is queued");
                answered.push(13);
            }
            other => panic!("unexpected frame while the acquire waits: {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [11, 12, 13]);
    assert_eq!(
        waiter.next_within(QUIET).await,
        Err(Ended::Quiet),
        "the acquire must still be waiting"
    );

    assert_eq!(holder.call(&Request::Release { lease: 1 }).await, Msg::Done);
    let (id, msg) = waiter.next().await;
    assert_eq!(id, 10, "the grant answers the acquire's request id");
    let Msg::Granted(token) = msg else {
        panic!("expected a grant, got {msg:?}");
    };
    assert!(token > held_token);
}

/// A dropped connection keeps its lease until the TTL; `CloseSession` frees it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_outlive_connections_until_the_ttl() {
    let server = TestServer::start().await; // default TTL 10 s
    let ttl = Duration::from_millis(1000);
    let acquire = Request::Acquire {
        lease: 1,
        weight: 1,
        timeout_ms: NO_TIMEOUT,
        name: "ttl",
    };

    // A session with a 1 s TTL takes the permit and its connection drops without a word.
    let mut leaver = Raw::with_session(server.addr, 0x1ea5e, 1000).await;
    let ensure = Request::Ensure {
        capacity: 1,
        name: "ttl",
    };
    assert_eq!(leaver.call(&ensure).await, Msg::Done);
    let acquired_at = Instant::now();
    assert!(matches!(leaver.call(&acquire).await, Msg::Granted(_)));
    drop(leaver);

    let mut waiter = Raw::with_session(server.addr, 0x3a17, 0).await;
    let wait_id = waiter.send(&acquire).await;
    assert_eq!(
        waiter.next_within(QUIET).await,
        Err(Ended::Quiet),
        "the dropped connection's lease is still held"
    );
    let st = waiter.status("ttl").await;
    assert_eq!((st.in_use, st.queued), (1, 1));
    assert_eq!(st.holders[0].session, format!("{:016x}", 0x1ea5e));

    let msg = waiter.reply_to(wait_id).await;
    assert!(matches!(msg, Msg::Granted(_)), "{msg:?}");
    assert!(
        acquired_at.elapsed() >= ttl - Duration::from_millis(20),
        "the lease was released after {:?}, before the TTL of {ttl:?}",
        acquired_at.elapsed()
    );
    let st = waiter.status("ttl").await;
    assert_eq!(st.expired_total, Some(1));
    assert_eq!(st.holders[0].session, format!("{:016x}", 0x3a17));

    // A clean CloseSession releases at once, long before the 10 s default TTL.
    let mut closer = Raw::with_session(server.addr, 0xc105e, 0).await;
    let ensure = Request::Ensure {
        capacity: 1,
        name: "ttl-clean",
    };
    assert_eq!(closer.call(&ensure).await, Msg::Done);
    let clean_acquire = Request::Acquire {
        lease: 2, // lease 1 of the waiter's session holds "ttl"
        weight: 1,
        timeout_ms: NO_TIMEOUT,
        name: "ttl-clean",
    };
    assert!(matches!(closer.call(&clean_acquire).await, Msg::Granted(_)));
    let wait_id = waiter.send(&clean_acquire).await;
    assert_eq!(waiter.next_within(QUIET).await, Err(Ended::Quiet));
    let closed_at = Instant::now();
    assert_eq!(closer.call(&Request::CloseSession).await, Msg::Done);
    let msg = waiter.reply_to(wait_id).await;
    assert!(matches!(msg, Msg::Granted(_)), "{msg:?}");
    assert!(
        closed_at.elapsed() < Duration::from_secs(3),
        "granted only after {:?}",
        closed_at.elapsed()
    );
    let st = waiter.status("ttl-clean").await;
    assert_eq!((st.released_total, st.expired_total), (Some(1), Some(0)));
    // The closed session is gone: its connection can no longer use it.
    let reply = closer.call(&Request::KeepAlive).await;
    assert!(
        matches!(reply, Msg::Error(ErrorCode::SessionNotFound, _)),
        "{reply:?}"
    );
}

/// `Leases` answers with the held (not queued) leases of the bound session, needs a bound
/// session, and tells a session that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lists_the_held_leases_of_the_bound_session() {
    let server = TestServer::start().await;
    let mut unbound = Raw::connect(server.addr).await;
    unbound.hello().await;
    let msg = unbound.call(&Request::Leases).await;
    assert!(
        matches!(msg, Msg::Error(ErrorCode::NoSession, _)),
        "{msg:?}"
    );

    let mut a = Raw::with_session(server.addr, 0xa, 0).await;
    let mut b = Raw::with_session(server.addr, 0xb, 0).await;
    assert_eq!(a.call(&Request::Leases).await, Msg::Leases(vec![]));
    for (name, capacity) in [("one", 1), ("two", 2)] {
        assert_eq!(a.call(&Request::Ensure { capacity, name }).await, Msg::Done);
    }
    let acquire = |lease, name| Request::Acquire {
        lease,
        weight: 1,
        timeout_ms: NO_TIMEOUT,
        name,
    };
    assert!(matches!(b.call(&acquire(1, "one")).await, Msg::Granted(_)));
    assert!(matches!(a.call(&acquire(7, "two")).await, Msg::Granted(_)));
    assert!(matches!(a.call(&acquire(5, "two")).await, Msg::Granted(_)));
    let queued = a.send(&acquire(9, "one")).await; // waits behind b's lease
    assert_eq!(a.call(&Request::Leases).await, Msg::Leases(vec![5, 7]));
    assert_eq!(b.call(&Request::Leases).await, Msg::Leases(vec![1]));
    // A second connection bound to the same session sees the same leases.
    let mut a2 = Raw::connect(server.addr).await;
    a2.hello().await;
    let resumed = a2.call(&Request::ResumeSession { session: 0xa }).await;
    assert!(matches!(resumed, Msg::SessionOpened { .. }), "{resumed:?}");
    assert_eq!(a2.call(&Request::Leases).await, Msg::Leases(vec![5, 7]));
    // Once b lets go, the queued acquire is held and listed.
    assert_eq!(b.call(&Request::CloseSession).await, Msg::Done);
    assert!(matches!(a.reply_to(queued).await, Msg::Granted(_)));
    assert_eq!(a.call(&Request::Leases).await, Msg::Leases(vec![5, 7, 9]));
    // A session that ended is reported gone.
    assert_eq!(
        b.call(&Request::Leases).await,
        Msg::Error(
            ErrorCode::SessionNotFound,
            format!("session {:016x} not found", 0xb)
        )
    );
}

/// A connection that sends nothing gets `Handshake` ("no Hello in time") once the handshake
/// timeout passes, and is closed; one that said Hello may stay quiet for longer than that
/// and is still served (the deadline is for the handshake only, armed once per connection).
#[tokio::test]
async fn the_handshake_deadline_drops_only_silent_connections() {
    let handshake_timeout = Duration::from_millis(300);
    let server = TestServer::with_config(Config {
        handshake_timeout,
        ..Config::default()
    })
    .await;
    let mut greeted = Raw::connect(server.addr).await;
    greeted.hello().await;
    let mut silent = Raw::connect(server.addr).await;
    let opened = Instant::now();
    let (_, message) = silent
        .expect_error_and_close(0, &[ErrorCode::Handshake])
        .await;
    assert!(message.contains("no Hello"), "{message}");
    assert!(
        opened.elapsed() >= handshake_timeout,
        "dropped after {:?}",
        opened.elapsed()
    );
    // The greeted connection, quiet for the whole handshake timeout and more, still answers.
    assert_eq!(
        greeted.next_within(handshake_timeout).await,
        Err(Ended::Quiet)
    );
    assert_eq!(greeted.call(&Request::Ping).await, Msg::Pong);
}
