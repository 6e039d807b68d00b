//! The release-to-next-waiter hand-off on the etcd backend, beside one etcd write round trip.
//!
//! `cargo run --release --example etcd_handoff -- etcd://HOST:PORT[/PREFIX] [ROUNDS]`
//! (`bench/etcd-handoff.sh` starts an etcd and runs it). Each round, client A holds a
//! capacity-1 semaphore and client B waits for it; A releases. Printed (medians and p90 over
//! the rounds, in microseconds):
//! - `release`: A's release call, one etcd write (a delete) through the same connection pool;
//! - `put`: a bare put on a kept-alive connection of its own, the etcd round trip to compare;
//! - `handoff_from_call`: from A calling release to B holding the permit;
//! - `handoff_from_return`: from A's release returning to B holding (negative: B was told
//!   before A's answer arrived).

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use turnstile_client::{Client, Error};

fn pct(v: &mut [i64], q: f64) -> i64 {
    v.sort_unstable();
    let i = ((v.len() as f64) * q).ceil() as usize;
    v.get(i.clamp(1, v.len().max(1)) - 1).copied().unwrap_or(0)
}

/// A put on a kept-alive HTTP/1.1 connection to etcd's JSON gateway.
fn put(conn: &mut BufReader<std::net::TcpStream>, addr: &str) -> std::io::Result<()> {
    let body = r#"{"key":"aGFuZG9mZi1wdXQ=","value":"eA=="}"#;
    let req = format!(
        "POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.get_mut().write_all(req.as_bytes())?;
    let mut length = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "etcd://127.0.0.1:2379/handoff".into());
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(200);
    let a = Client::connect(&url).await?;
    let b = Client::connect(&url).await?;
    let sem_a = a.semaphore("handoff", 1).await?;
    let sem_b = b.semaphore("handoff", 1).await?;
    let (mut release, mut from_call, mut from_return) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let held = sem_a.acquire().await?;
        let sem = sem_b.clone();
        let waiter = tokio::spawn(async move {
            let p = sem.acquire().await;
            (Instant::now(), p)
        });
        // The waiter must be queued (and watching) before the release.
        loop {
            let doc = a.status(Some("handoff")).await?;
            if doc.semaphores.first().is_some_and(|s| s.queued == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Let its watch open: the status shows the key, not the watch.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let called = Instant::now();
        held.release().await?;
        let returned = Instant::now();
        let (granted, permit) = waiter
            .await
            .map_err(|e| Error::Protocol(format!("waiter task: {e}")))?;
        permit?.release().await?;
        release.push((returned - called).as_micros() as i64);
        from_call.push((granted - called).as_micros() as i64);
        from_return.push(if granted >= returned {
            (granted - returned).as_micros() as i64
        } else {
            -((returned - granted).as_micros() as i64)
        });
    }
    let addr = url
        .trim_start_matches("etcd://")
        .split(['/', ','])
        .next()
        .unwrap_or("")
        .to_owned();
    let puts = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<i64>> {
        let mut conn = BufReader::new(std::net::TcpStream::connect(&addr)?);
        conn.get_ref().set_nodelay(true)?;
        let mut out = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            put(&mut conn, &addr)?;
            out.push(t.elapsed().as_micros() as i64);
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Protocol(format!("put task: {e}")))?
    .map_err(|e| Error::Protocol(format!("put: {e}")))?;
    let mut puts = puts;
    for (name, v) in [
        ("put", &mut puts),
        ("release", &mut release),
        ("handoff_from_call", &mut from_call),
        ("handoff_from_return", &mut from_return),
    ] {
        let (p50, p90) = (pct(v, 0.5), pct(v, 0.9));
        println!("{name:<20} p50 {p50:>7} us   p90 {p90:>7} us   ({rounds} rounds)");
    }
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}
