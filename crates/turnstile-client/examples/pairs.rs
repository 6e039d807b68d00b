//! One caller's acquire+release pair latency through the client library, async or blocking:
//! the figure that says what the blocking facade costs over the async client (issue 17).
//!
//! `pairs URL SECONDS async|blocking`: loops `acquire()` → `release()` on a semaphore of its
//! own for SECONDS (after a one-second warm-up) and prints one JSON line with the pairs, their
//! p50 and p99 in microseconds, and the process's CPU time per pair (user and system).

use std::time::{Duration, Instant};

fn cpu_ticks() -> (u64, u64) {
    // Fields 14 and 15 of /proc/self/stat, after the parenthesised command name.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (
        f.get(11).copied().unwrap_or(0),
        f.get(12).copied().unwrap_or(0),
    )
}

fn report(mut samples: Vec<Duration>, took: f64, cpu: ((u64, u64), (u64, u64)), mode: &str) {
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(i).map_or(0, |d| d.as_micros())
    };
    let n = samples.len().max(1) as f64;
    // Clock ticks are 10 ms on Linux (USER_HZ 100).
    let us = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * 10_000.0 / n;
    println!(
        "{{\"mode\": \"{mode}\", \"pairs\": {}, \"seconds\": {took:.3}, \"p50_us\": {}, \"p99_us\": {}, \"user_us_per_pair\": {:.2}, \"sys_us_per_pair\": {:.2}}}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        us(cpu.0 .0, cpu.1 .0),
        us(cpu.0 .1, cpu.1 .1),
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: pairs URL SECONDS async|blocking";
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or(usage)?;
    let seconds: f64 = args.next().ok_or(usage)?.parse()?;
    let mode = args.next().ok_or(usage)?;
    let name = format!("pairs-{mode}-{}", std::process::id());
    let mut samples = Vec::with_capacity(1 << 20);
    match mode.as_str() {
        "blocking" => {
            let client = turnstile_client::blocking::Client::connect(&url)?;
            let sem = client.semaphore(&name, 1)?;
            let warmup = Instant::now() + Duration::from_secs(1);
            while Instant::now() < warmup {
                sem.acquire()?.release()?;
            }
            let cpu0 = cpu_ticks();
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(seconds);
            while Instant::now() < end {
                let t = Instant::now();
                sem.acquire()?.release()?;
                samples.push(t.elapsed());
            }
            let took = start.elapsed().as_secs_f64();
            report(samples, took, (cpu0, cpu_ticks()), &mode);
        }
        "async" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = turnstile_client::Client::connect(&url).await?;
                let sem = client.semaphore(&name, 1).await?;
                // In a task, as applications run it (not on the thread that blocks on it).
                let task = tokio::spawn(async move {
                    let warmup = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < warmup {
                        sem.acquire().await?.release().await?;
                    }
                    let cpu0 = cpu_ticks();
                    let start = Instant::now();
                    let end = start + Duration::from_secs_f64(seconds);
                    while Instant::now() < end {
                        let t = Instant::now();
                        sem.acquire().await?.release().await?;
                        samples.push(t.elapsed());
                    }
                    let took = start.elapsed().as_secs_f64();
                    report(samples, took, (cpu0, cpu_ticks()), &mode);
                    Ok::<_, turnstile_client::Error>(())
                });
                task.await??;
                client.shutdown().await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            })?;
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
