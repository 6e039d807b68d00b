//! `turnstile bench`: a load generator. Each client has its own connection and session and
//! loops acquire → release, timing the pair. Besides the coordinator scenarios it measures a
//! peer in the same run: a bare loopback TCP ping-pong (`--scenario echo`), the floor that no
//! request/reply protocol on this machine can beat, so that figures can be read as ratios.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile_client::Client;

use crate::parse_duration;

/// What to measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Each client acquires and releases its own semaphore.
    Uncontended,
    /// All clients share `--semaphores` semaphores of `--capacity` slots.
    Contended,
    /// Like uncontended, with weight 2 acquires on capacity-4 semaphores.
    Weighted,
    /// Bare loopback TCP ping-pong of 16-byte messages: the peer baseline.
    Echo,
}

/// Arguments of `turnstile bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Coordinator to load; without it, a coordinator is started as a child process.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent clients, each with its own connection and session.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Semaphores shared by the clients (contended scenario).
    #[arg(long, default_value_t = 1)]
    semaphores: usize,
    /// Capacity of each semaphore (contended scenario).
    #[arg(long, default_value_t = 4)]
    capacity: u32,
    /// How long to measure.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before measuring, not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// What to measure.
    #[arg(long, value_enum, default_value = "uncontended")]
    scenario: Scenario,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Storage of the coordinator the bench starts (without --url): in memory, or a
    /// write-ahead log in a fresh temporary directory synced in batches or on every request.
    #[arg(long, value_enum, default_value = "in-memory")]
    storage: BenchStorage,
}

/// Storage of the coordinator started by the bench.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchStorage {
    /// `--in-memory`.
    InMemory,
    /// `--fsync batch`.
    Batch,
    /// `--fsync always`.
    Always,
}

struct Outcome {
    pairs: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(args.semaphores >= 1, "--semaphores must be at least 1");
    anyhow::ensure!(args.capacity >= 1, "--capacity must be at least 1");
    let outcome = if args.scenario == Scenario::Echo {
        echo(&args).await?
    } else {
        let mut server = None;
        let url = match &args.url {
            Some(u) => u.clone(),
            None => {
                let (child, url) = spawn_server(args.storage).await?;
                server = Some(child);
                url
            }
        };
        let r = load(&args, &url).await;
        if let Some(mut child) = server {
            let _ = child.kill().await;
        }
        r?
    };
    report(&args, &outcome);
    Ok(ExitCode::SUCCESS)
}

fn report(args: &BenchArgs, o: &Outcome) {
    let mut lat = o.latencies_us.clone();
    lat.sort_unstable();
    let pct = |q: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64) * q).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1]
    };
    let rate = o.pairs as f64 / o.elapsed.as_secs_f64();
    let mut scenario = format!("{:?}", args.scenario).to_lowercase();
    if args.scenario != Scenario::Echo && args.url.is_none() {
        scenario = format!("{scenario}/{:?}", args.storage).to_lowercase();
    }
    if args.json {
        println!(
            "{{\"scenario\":\"{scenario}\",\"clients\":{},\"pairs_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}}}",
            args.clients,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            o.errors
        );
    } else {
        let unit = if args.scenario == Scenario::Echo {
            "round trips"
        } else {
            "pairs"
        };
        println!(
            "{scenario}: {} clients, {:.0} {unit}/s, p50 {}us, p99 {}us, p99.9 {}us, {} errors ({} {unit} in {:.1}s)",
            args.clients,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            o.errors,
            o.pairs,
            o.elapsed.as_secs_f64()
        );
    }
}

/// Starts `turnstile serve` on a free loopback port and waits until it accepts connections.
async fn spawn_server(storage: BenchStorage) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe().context("locating the turnstile binary")?;
    let dir = std::env::temp_dir().join(format!("turnstile-bench-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = tokio::process::Command::new(exe);
    // The load is on the protocol port; the HTTP port is not measured here.
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--http",
        "off",
    ]);
    match storage {
        BenchStorage::InMemory => {
            cmd.arg("--in-memory");
        }
        BenchStorage::Batch | BenchStorage::Always => {
            let mode = if storage == BenchStorage::Batch {
                "batch"
            } else {
                "always"
            };
            cmd.arg("--data-dir").arg(&dir).args(["--fsync", mode]);
        }
    }
    let child = cmd
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting a coordinator")?;
    let url = format!("tcp://127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, url));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("the coordinator did not start listening on port {port}")
}

async fn load(args: &BenchArgs, url: &str) -> anyhow::Result<Outcome> {
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let client = Client::connect(url).await?;
        let (name, capacity, weight) = match args.scenario {
            Scenario::Uncontended => (format!("bench-u-{i}"), 1, 1),
            Scenario::Weighted => (format!("bench-w-{i}"), 4, 2),
            Scenario::Contended | Scenario::Echo => {
                (format!("bench-c-{}", i % args.semaphores), args.capacity, 1)
            }
        };
        let sem = client.semaphore(&name, capacity).await?;
        let errors = errors.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut pairs = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = match sem.acquire_many(weight).await {
                    Ok(p) => p.release().await.is_ok(),
                    Err(_) => false,
                };
                if t >= measure_from {
                    if ok {
                        pairs += 1;
                        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = client.shutdown().await;
            (pairs, lat)
        });
    }
    let mut outcome = collect(tasks, args.duration).await?;
    outcome.errors = errors.load(Ordering::Relaxed);
    Ok(outcome)
}

/// Sums what the client tasks counted and measured.
async fn collect(
    mut tasks: tokio::task::JoinSet<(u64, Vec<u32>)>,
    elapsed: Duration,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        pairs: 0,
        errors: 0,
        latencies_us: Vec::new(),
        elapsed,
    };
    while let Some(r) = tasks.join_next().await {
        let (n, lat) = r.context("a bench client panicked")?;
        outcome.pairs += n;
        outcome.latencies_us.extend(lat);
    }
    Ok(outcome)
}

/// The peer: a loopback echo server on its own thread and `clients` connections doing
/// 16-byte ping-pongs.
async fn echo(args: &BenchArgs) -> anyhow::Result<Outcome> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut n = 0u64;
            let mut buf = [7u8; 16];
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                if s.write_all(&buf).await.is_err() || s.read_exact(&mut buf).await.is_err() {
                    break;
                }
                if t >= measure_from {
                    n += 1;
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
            }
            (n, lat)
        });
    }
    collect(tasks, args.duration).await
}
