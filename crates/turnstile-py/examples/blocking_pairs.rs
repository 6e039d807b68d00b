//! The Rust blocking client's acquire+release pair latency, the reference the Python
//! package's figures are compared with (`bench/python_bench.py` runs it).
//!
//! `blocking_pairs URL SECONDS`: one thread loops `acquire()` → `send_release()` (what the
//! Python package's `release()` calls: it returns once the release is written, without
//! waiting for the answer) on a semaphore of its own for SECONDS (after a one-second warm-up)
//! and prints one JSON line:
//! `{"pairs": N, "seconds": S, "p50_us": P, "p99_us": Q}`.

use std::time::{Duration, Instant};

use turnstile_client::blocking::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: blocking_pairs URL SECONDS")?;
    let seconds: f64 = args
        .next()
        .ok_or("usage: blocking_pairs URL SECONDS")?
        .parse()?;
    let client = Client::connect(&url)?;
    let name = format!("bench-rust-blocking-{}", std::process::id());
    let sem = client.semaphore(&name, 1)?;
    let warmup = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warmup {
        sem.acquire()?.send_release()?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t = Instant::now();
        sem.acquire()?.send_release()?;
        samples.push(t.elapsed());
    }
    let took = start.elapsed().as_secs_f64();
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(i).map_or(0, |d| d.as_micros())
    };
    println!(
        "{{\"pairs\": {}, \"seconds\": {took:.3}, \"p50_us\": {}, \"p99_us\": {}}}",
        samples.len(),
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
