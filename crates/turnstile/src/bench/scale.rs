//! The scale scenarios: many semaphores and leases held (memory, a mass expiry timed by a
//! probe), and `/metrics` and status scraped while a probe times pairs.

use super::*;

/// The scale scenario (see [`Scenario::Scale`]).
pub(super) async fn scale(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use turnstile_proto::Request;
    anyhow::ensure!(
        args.url.is_none(),
        "the scale scenario starts its own coordinator; drop --url"
    );
    let sems = args.semaphores as u64;
    anyhow::ensure!(
        args.leases <= sems * u64::from(args.capacity),
        "--leases {} exceeds --semaphores × --capacity",
        args.leases
    );
    let (mut child, url) = spawn_server_with(
        args.storage,
        &["--http", "off", "--forget-idle", &args.forget_idle],
    )
    .await?;
    let pid = child.id().context("the coordinator's pid")?;
    let addr = url.trim_start_matches("tcp://").to_owned();
    let rss_idle = rss_bytes(pid)?;
    let t0 = Instant::now();
    // Semaphores, in pipelined bursts on one connection.
    let names: Vec<String> = (0..sems).map(|i| format!("scale-{i}")).collect();
    let mut admin = RawConn::connect(&addr).await?;
    let mut errors = 0;
    for chunk in names.chunks(2_000) {
        let reqs: Vec<Request<'_>> = chunk
            .iter()
            .map(|n| Request::Ensure {
                capacity: args.capacity,
                name: n,
            })
            .collect();
        errors += pipeline(&mut admin, &reqs).await?;
    }
    // Leases: client c holds leases g = c, c + C, c + 2C, ... on semaphore g % S, so that no
    // semaphore gets more than its capacity.
    let ttl_ms = u32::try_from(args.session_ttl.as_millis()).unwrap_or(u32::MAX);
    let mut holders = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let mut conn = RawConn::connect(&addr).await?;
        conn.call(&Request::OpenSession {
            session: turnstile_client_session(c) ^ 0x5ca1e,
            ttl_ms,
        })
        .await?;
        holders.push(conn);
    }
    let clients = args.clients as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let names = Arc::new(names);
    for (c, mut conn) in holders.into_iter().enumerate() {
        let names = names.clone();
        let total = args.leases;
        tasks.spawn(async move {
            let mut errors = 0;
            let mine: Vec<u64> = (c as u64..total).step_by(clients as usize).collect();
            for chunk in mine.chunks(1_000) {
                let reqs: Vec<Request<'_>> = chunk
                    .iter()
                    .map(|&g| Request::Acquire {
                        lease: g + 1,
                        weight: 1,
                        timeout_ms: 0,
                        name: &names[(g % sems) as usize],
                    })
                    .collect();
                errors += pipeline(&mut conn, &reqs).await?;
            }
            anyhow::Ok((conn, errors))
        });
    }
    let mut holders = Vec::with_capacity(args.clients);
    while let Some(r) = tasks.join_next().await {
        let (conn, e) = r.context("a scale client panicked")??;
        errors += e;
        holders.push(conn);
    }
    let fill = t0.elapsed();
    let rss = rss_bytes(pid)?;
    // Refresh every holder session at once, so that they all expire at the same moment; then
    // let them fall silent.
    for conn in &mut holders {
        conn.id = conn.id.wrapping_add(1).max(1);
        conn.out.clear();
        turnstile_proto::encode_request(conn.id, &Request::KeepAlive, &mut conn.out);
        conn.s.write_all(&conn.out).await?;
    }
    // Then they vanish, as crashed workers do: their sessions live on until the TTL.
    drop(holders);
    let expiry_at = Instant::now() + args.session_ttl;
    // The probe: acquire+release pairs on a semaphore of its own, timed, until the expiry is
    // well past.
    let mut probe = open_probe(&addr, "scale-probe").await?;
    let acquire = Request::Acquire {
        lease: 1,
        weight: 1,
        timeout_ms: turnstile_proto::NO_TIMEOUT,
        name: "scale-probe",
    };
    let mut around: Vec<u32> = Vec::new();
    let mut worst = Duration::ZERO;
    let end = expiry_at + Duration::from_secs(3);
    while Instant::now() < end {
        let t = Instant::now();
        probe.call(&acquire).await?;
        probe.call(&Request::Release { lease: 1 }).await?;
        let took = t.elapsed();
        // The window: from a second before the expiry to the end.
        if t + Duration::from_secs(1) >= expiry_at {
            around.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            worst = worst.max(took);
        }
    }
    around.sort_unstable();
    let pct = |q: f64| {
        around
            .get(((around.len() as f64 * q) as usize).min(around.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let rss_after = rss_bytes(pid)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if args.json {
        outln!(
            "{{\"scenario\":\"scale\",\"semaphores\":{sems},\"leases\":{},\"sessions\":{},\"rss_mib\":{:.1},\"rss_idle_mib\":{:.1},\"fill_secs\":{:.2},\"probe_pairs\":{},\"probe_p50_us\":{},\"probe_p99_us\":{},\"probe_max_us\":{},\"errors\":{errors}}}",
            args.leases,
            args.clients,
            mib(rss),
            mib(rss_idle),
            fill.as_secs_f64(),
            around.len(),
            pct(0.5),
            pct(0.99),
            worst.as_micros()
        )?;
    } else {
        outln!(
            "scale: {sems} semaphores, {} leases held by {} sessions: coordinator RSS {:.1} MiB (idle {:.1} MiB; filled in {:.1}s; {errors} errors)",
            args.leases,
            args.clients,
            mib(rss),
            mib(rss_idle),
            fill.as_secs_f64()
        )?;
        outln!(
            "expiry of all {} leases at once: probe pairs around it p50 {}us, p99 {}us, max {}us ({} pairs); RSS after {:.1} MiB",
            args.leases,
            pct(0.5),
            pct(0.99),
            worst.as_micros(),
            around.len(),
            mib(rss_after)
        )?;
    }
    let _ = child.kill().await;
    Ok(ExitCode::SUCCESS)
}

/// One `GET` on the HTTP port; returns the size of the response.
pub(super) async fn http_get(addr: &str, path: &str) -> anyhow::Result<usize> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    Ok(body.len())
}

/// Pages through the whole status on `c`; returns the semaphores seen and the largest reply.
pub(super) async fn status_all(c: &mut RawConn) -> anyhow::Result<(usize, usize)> {
    let (mut seen, mut largest) = (0, 0);
    let mut after = String::new();
    loop {
        c.id = c.id.wrapping_add(1).max(1);
        c.out.clear();
        let req = turnstile_proto::Request::Status {
            name: "",
            prefix: "",
            after: &after,
            limit: 0,
        };
        turnstile_proto::encode_request(c.id, &req, &mut c.out);
        c.s.write_all(&c.out).await?;
        let json = loop {
            if let Some((payload, used)) =
                turnstile_proto::split_frame(&c.buf, turnstile_proto::MAX_REPLY_FRAME)?
            {
                let (id, reply) = turnstile_proto::decode_reply(payload)?;
                let got = match reply {
                    turnstile_proto::Reply::Status { json } if id == c.id => Some(json.to_vec()),
                    _ => None,
                };
                c.buf.drain(..used);
                if let Some(json) = got {
                    break json;
                }
                continue;
            }
            if c.s.read_buf(&mut c.buf).await? == 0 {
                anyhow::bail!("the coordinator closed the connection");
            }
        };
        largest = largest.max(json.len());
        let doc = turnstile_proto::StatusDoc::from_json(&json)?;
        seen += doc.semaphores.len();
        match doc.next {
            Some(next) => after = next,
            None => return Ok((seen, largest)),
        }
    }
}

/// The scrape scenario (see [`Scenario::Scrape`]).
pub(super) async fn scrape(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use turnstile_proto::Request;
    anyhow::ensure!(
        args.url.is_none(),
        "the scrape scenario starts its own coordinator; drop --url"
    );
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http = format!("127.0.0.1:{http_port}");
    let (mut child, url) = spawn_server_with(
        args.storage,
        &["--http", &http, "--forget-idle", &args.forget_idle],
    )
    .await?;
    let forget = crate::parse_duration(&args.forget_idle).ok();
    let pid = child.id().context("the coordinator's pid")?;
    let addr = url.trim_start_matches("tcp://").to_owned();
    let rss_idle = rss_bytes(pid)?;
    // One-off names: each ensured, acquired and released once, in pipelined bursts.
    let names: Vec<String> = (0..args.semaphores)
        .map(|i| format!("once-{i:07}"))
        .collect();
    let mut admin = RawConn::connect(&addr).await?;
    admin
        .call(&Request::OpenSession {
            session: turnstile_client_session(usize::MAX >> 2),
            ttl_ms: 600_000,
        })
        .await?;
    let mut errors = 0;
    for (c, chunk) in names.chunks(1_000).enumerate() {
        let mut reqs = Vec::with_capacity(chunk.len() * 3);
        for (i, n) in chunk.iter().enumerate() {
            let lease = (c * 1_000 + i) as u64 + 1;
            reqs.push(Request::Ensure {
                capacity: 1,
                name: n,
            });
            reqs.push(Request::Acquire {
                lease,
                weight: 1,
                timeout_ms: 0,
                name: n,
            });
            reqs.push(Request::Release { lease });
        }
        errors += pipeline(&mut admin, &reqs).await?;
    }
    let t_filled = Instant::now();
    let rss_full = rss_bytes(pid)?;
    // The probe, and a scraper that alternates /metrics and a whole paged status.
    let mut probe = open_probe(&addr, "scrape-probe").await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        let http = http.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut c = RawConn::connect(&addr).await?;
            let (mut scrapes, mut metrics_max, mut metrics_worst) = (0u64, 0usize, Duration::ZERO);
            let (mut statuses, mut status_worst, mut largest, mut seen) =
                (0u64, Duration::ZERO, 0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                metrics_max = metrics_max.max(http_get(&http, "/metrics").await?);
                metrics_worst = metrics_worst.max(t.elapsed());
                scrapes += 1;
                let t = Instant::now();
                let (n, big) = status_all(&mut c).await?;
                status_worst = status_worst.max(t.elapsed());
                largest = largest.max(big);
                seen = n;
                statuses += 1;
            }
            anyhow::Ok((
                scrapes,
                metrics_max,
                metrics_worst,
                statuses,
                status_worst,
                largest,
                seen,
            ))
        })
    };
    let acquire = Request::Acquire {
        lease: 1,
        weight: 1,
        timeout_ms: turnstile_proto::NO_TIMEOUT,
        name: "scrape-probe",
    };
    let mut pairs: Vec<u32> = Vec::new();
    let end = Instant::now() + args.duration;
    while Instant::now() < end {
        let t = Instant::now();
        probe.call(&acquire).await?;
        probe.call(&Request::Release { lease: 1 }).await?;
        pairs.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (scrapes, metrics_max, metrics_worst, statuses, status_worst, largest, seen) =
        scraper.await.context("the scraper panicked")??;
    pairs.sort_unstable();
    let pct = |q: f64| {
        pairs
            .get(((pairs.len() as f64 * q) as usize).min(pairs.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let worst = pairs.last().copied().unwrap_or(0);
    // Forgetting: wait until the idle time has passed for every name, and a little more.
    let rss_after = match forget {
        Some(d) if d <= Duration::from_secs(120) => {
            tokio::time::sleep_until((t_filled + d + Duration::from_secs(3)).into()).await;
            // The probe keeps its session; status shows what is left.
            let mut c = RawConn::connect(&addr).await?;
            let (left, _) = status_all(&mut c).await?;
            Some((rss_bytes(pid)?, left))
        }
        _ => None,
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    outln!(
        "scrape: {} one-off names: coordinator RSS {:.1} MiB (idle {:.1} MiB; {errors} errors)",
        args.semaphores,
        mib(rss_full),
        mib(rss_idle)
    )?;
    outln!(
        "during {scrapes} /metrics scrapes (largest {metrics_max} bytes, slowest {}ms) and {statuses} paged statuses ({seen} semaphores, largest reply {largest} bytes, slowest {}ms): probe pairs p50 {}us, p99 {}us, max {worst}us ({} pairs)",
        metrics_worst.as_millis(),
        status_worst.as_millis(),
        pct(0.5),
        pct(0.99),
        pairs.len()
    )?;
    if let Some((rss, left)) = rss_after {
        outln!(
            "after --forget-idle {}: {left} semaphores left, coordinator RSS {:.1} MiB",
            args.forget_idle,
            mib(rss)
        )?;
    }
    let _ = child.kill().await;
    Ok(ExitCode::SUCCESS)
}
