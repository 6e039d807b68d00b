//! The bare protocol client: frames written and read directly, several callers pipelined on a
//! connection (`--client raw`), and the probes of the scale scenarios.

use super::*;

/// A bare protocol connection: frames written and read on the socket, one request at a time.
pub(super) struct RawConn {
    pub(super) s: tokio::net::TcpStream,
    pub(super) out: Vec<u8>,
    pub(super) buf: Vec<u8>,
    pub(super) id: u32,
}

impl RawConn {
    pub(super) async fn connect(addr: &str) -> anyhow::Result<RawConn> {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let mut c = RawConn {
            s,
            out: Vec::with_capacity(256),
            buf: Vec::with_capacity(4096),
            id: 0,
        };
        c.call(&turnstile_proto::Request::Hello {
            magic: turnstile_proto::MAGIC,
            version: turnstile_proto::VERSION,
            client: "bench",
            token: "",
        })
        .await?;
        Ok(c)
    }

    /// Sends a request and waits for its answer; `Ok(true)` unless it was an `Error`.
    pub(super) async fn call(
        &mut self,
        req: &turnstile_proto::Request<'_>,
    ) -> anyhow::Result<bool> {
        self.id = self.id.wrapping_add(1).max(1);
        self.out.clear();
        turnstile_proto::encode_request(self.id, req, &mut self.out);
        self.s.write_all(&self.out).await?;
        loop {
            if let Some((payload, used)) =
                turnstile_proto::split_frame(&self.buf, turnstile_proto::MAX_REPLY_FRAME)?
            {
                let (id, reply) = turnstile_proto::decode_reply(payload)?;
                let ok = !matches!(reply, turnstile_proto::Reply::Error { .. });
                self.buf.drain(..used);
                if id == self.id {
                    return Ok(ok);
                }
                continue; // an event (id 0): not ours to wait for
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("the coordinator closed the connection");
            }
        }
    }
}

/// The coordinator scenarios with [`RawConn`]s: `--connections` connections, each with a
/// session (60 s TTL, kept alive by its own acquires and releases) and its share of the
/// callers; each caller ensures its semaphore, then loops Acquire and Release of a lease id of
/// its own. The callers of one connection pipeline: every reply read may start the caller's
/// next request, and all the requests one read starts leave in one write.
pub(super) async fn load_raw(args: &BenchArgs, url: &str, start: Start) -> anyhow::Result<Outcome> {
    use turnstile_proto::Request;
    let addr = url
        .strip_prefix("tcp://")
        .context("--client raw needs a tcp:// coordinator")?
        .to_owned();
    let errors = Arc::new(AtomicU64::new(0));
    let k = connections(args);
    let mut conns = Vec::with_capacity(k);
    for conn in 0..k {
        let mut c = RawConn::connect(&addr).await?;
        c.call(&Request::OpenSession {
            session: turnstile_client_session(conn),
            ttl_ms: 60_000,
        })
        .await?;
        let callers: Vec<RawCaller> = (conn..args.clients)
            .step_by(k)
            .map(|i| {
                let (name, capacity, weight) = workload(args, i);
                RawCaller {
                    name,
                    capacity,
                    weight,
                    lease: 0,
                    started: Instant::now(),
                }
            })
            .collect();
        let ensures: Vec<Request<'_>> = callers
            .iter()
            .map(|c| Request::Ensure {
                capacity: c.capacity,
                name: &c.name,
            })
            .collect();
        anyhow::ensure!(
            pipeline(&mut c, &ensures).await? == 0,
            "the coordinator refused an ensure"
        );
        conns.push((c, callers));
    }
    let window = start.window();
    let mut tasks = tokio::task::JoinSet::new();
    let pipelined = args.release != BenchRelease::Wait;
    for (c, callers) in conns {
        let errors = errors.clone();
        tasks.spawn(async move {
            let (mut c, pairs, lat) = raw_callers(c, callers, window, &errors, pipelined).await;
            let _ = c.call(&Request::CloseSession).await;
            (pairs, lat)
        });
    }
    let mut outcome = collect(tasks, args.duration).await?;
    outcome.errors = errors.load(Ordering::Relaxed);
    Ok(outcome)
}

/// One caller of [`raw_callers`]: its semaphore and its latest lease (see [`raw_callers`] for
/// its request ids).
pub(super) struct RawCaller {
    pub(super) name: String,
    pub(super) capacity: u32,
    pub(super) weight: u32,
    /// The lease id of its latest acquire.
    pub(super) lease: u64,
    /// When its current pair started.
    pub(super) started: Instant,
}

/// Runs the callers of one connection until the end of the window, several requests in flight.
/// Returns the connection, the pairs completed in the measured window and their latencies.
///
/// A caller's acquire has request id `2j + 1` and its release `2j + 2`. Without `pipelined`
/// the release waits for the grant and the next acquire for the release's answer: the pair
/// ends with that answer. With it, the release and the next acquire go out together as soon
/// as the grant comes (what the library does when a permit is dropped): the pair ends with
/// the grant, and the release's answer is only checked.
pub(super) async fn raw_callers(
    mut c: RawConn,
    mut callers: Vec<RawCaller>,
    window: Window,
    errors: &AtomicU64,
    pipelined: bool,
) -> (RawConn, u64, Vec<u32>) {
    use turnstile_proto::{Reply, Request};
    pub(super) fn acquire(out: &mut Vec<u8>, j: usize, caller: &mut RawCaller) {
        // A new lease id per acquire (with pipelining, the previous one may not be released
        // yet when this request is written), unique among the connection's callers: a count
        // in the high bits, the caller's index in the low 32.
        caller.lease = ((caller.lease >> 32) + 1) << 32 | j as u64;
        let req = Request::Acquire {
            lease: caller.lease,
            weight: caller.weight,
            timeout_ms: turnstile_proto::NO_TIMEOUT,
            name: &caller.name,
        };
        turnstile_proto::encode_request(2 * j as u32 + 1, &req, out);
    }
    pub(super) fn release(out: &mut Vec<u8>, j: usize, caller: &RawCaller) {
        let req = Request::Release {
            lease: caller.lease,
        };
        turnstile_proto::encode_request(2 * j as u32 + 2, &req, out);
    }
    let mut lat = Vec::with_capacity(1 << 16);
    let mut pairs = 0u64;
    let mut in_flight = 0usize;
    let now = Instant::now();
    c.out.clear();
    if now < window.end {
        for (j, caller) in callers.iter_mut().enumerate() {
            caller.started = now;
            acquire(&mut c.out, j, caller);
            in_flight += 1;
        }
    }
    let RawConn { s, out, buf, .. } = &mut c;
    if s.write_all(out).await.is_err() {
        in_flight = 0;
    }
    'run: while in_flight > 0 {
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        out.clear();
        let mut start = 0;
        loop {
            let (payload, used) =
                match turnstile_proto::split_frame(&buf[start..], turnstile_proto::MAX_REPLY_FRAME)
                {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => break 'run,
                };
            start += used;
            let Ok((id, reply)) = turnstile_proto::decode_reply(payload) else {
                break 'run;
            };
            if id == 0 {
                continue; // an event: not an answer
            }
            let j = (id as usize - 1) / 2;
            let is_release = id % 2 == 0;
            let Some(caller) = callers.get_mut(j) else {
                break 'run; // not a request of ours: the count would be wrong
            };
            in_flight -= 1;
            let ok = !matches!(reply, Reply::Error { .. });
            let measured = caller.started >= window.measure_from;
            if pipelined && is_release {
                if !ok && measured {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if !pipelined && !is_release && ok {
                release(out, j, caller);
                in_flight += 1;
                continue;
            }
            // The pair is over: granted (pipelined), released, or its acquire refused.
            if measured {
                if ok {
                    pairs += 1;
                    let took = caller.started.elapsed().as_micros();
                    lat.push(u32::try_from(took).unwrap_or(u32::MAX));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if pipelined && ok {
                release(out, j, caller);
                in_flight += 1;
            }
            let now = Instant::now();
            if now < window.end {
                caller.started = now;
                acquire(out, j, caller);
                in_flight += 1;
            }
        }
        buf.drain(..start);
        if !out.is_empty() && s.write_all(out).await.is_err() {
            break;
        }
    }
    (c, pairs, lat)
}

/// A raw connection with a session of its own and a semaphore of capacity 1 named `name`: the
/// probe whose acquire+release pairs the scale scenarios time.
pub(super) async fn open_probe(addr: &str, name: &str) -> anyhow::Result<RawConn> {
    use turnstile_proto::Request;
    let mut probe = RawConn::connect(addr).await?;
    probe
        .call(&Request::OpenSession {
            session: turnstile_client_session(usize::MAX >> 1),
            ttl_ms: 60_000,
        })
        .await?;
    probe.call(&Request::Ensure { capacity: 1, name }).await?;
    Ok(probe)
}

/// Sends `reqs` on `c` in one pipelined burst and reads as many replies; returns how many
/// were errors.
pub(super) async fn pipeline(
    c: &mut RawConn,
    reqs: &[turnstile_proto::Request<'_>],
) -> anyhow::Result<u64> {
    c.out.clear();
    for r in reqs {
        c.id = c.id.wrapping_add(1).max(1);
        turnstile_proto::encode_request(c.id, r, &mut c.out);
    }
    c.s.write_all(&c.out).await?;
    let (mut answered, mut errors) = (0, 0);
    while answered < reqs.len() {
        while let Some((payload, used)) =
            turnstile_proto::split_frame(&c.buf, turnstile_proto::MAX_REPLY_FRAME)?
        {
            let (id, reply) = turnstile_proto::decode_reply(payload)?;
            if id != 0 {
                answered += 1;
                errors += u64::from(matches!(reply, turnstile_proto::Reply::Error { .. }));
            }
            c.buf.drain(..used);
        }
        if answered < reqs.len() && c.s.read_buf(&mut c.buf).await? == 0 {
            anyhow::bail!("the coordinator closed the connection");
        }
    }
    Ok(errors)
}
