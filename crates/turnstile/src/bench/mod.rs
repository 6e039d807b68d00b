//! `turnstile bench`: a load generator. Each client has its own connection and session and
//! loops acquire → release, timing the pair. Besides the coordinator scenarios it measures
//! peers in the same run, so that figures can be read as ratios: a bare loopback TCP
//! ping-pong (`--scenario echo`), the floor that no request/reply protocol on this machine can
//! beat, and a Redis server doing the equivalent lock pair (`--scenario redis`: `SET k v NX PX
//! 10000`, then `DEL k`, over the same kind of connection, one per client).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod peers;
mod raw;
mod scale;

use self::peers::{echo, etcd_lock, redis};
use self::raw::{load_raw, open_probe, pipeline, RawConn};
use self::scale::{scale, scrape};

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
    /// The lock pair on a Redis server (`--redis`): `SET bench-r-I 1 NX PX 10000`, `DEL`.
    Redis,
    /// etcd's own lock on the etcd of `--url etcd://HOST:PORT`: the v3 Lock RPC (what
    /// `etcdctl lock` uses), `Lock` then `Unlock` on a name per client (`bench-l-I`), over
    /// gRPC with the etcd backend's own client (one HTTP/2 connection per bench client, as
    /// the backend has), under a lease granted once per client.
    EtcdLock,
    /// `--clients` idle sessions that only keep alive (no acquires) for `--duration`; reports
    /// the coordinator's CPU time over that time (it must be a child of the bench, no --url).
    Keepalive,
    /// Scale: `--semaphores` semaphores of `--capacity`, `--leases` leases held by `--clients`
    /// sessions; reports the coordinator's resident memory, then lets every one of those
    /// sessions expire at the same moment while a probe client times acquire+release pairs,
    /// and reports the probe's latency around the expiry.
    Scale,
    /// Status and metrics at scale (issue 14): `--semaphores` names used once each (ensure,
    /// acquire, release); reports the coordinator's resident memory, then scrapes `/metrics`
    /// and pages through the whole status in a loop for `--duration` while a probe client
    /// times acquire+release pairs (its worst pair), then waits `--forget-idle` and reports
    /// the memory after the names are forgotten.
    Scrape,
}

/// Arguments of `turnstile bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Coordinator to load; without it, a coordinator is started as a child process.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent clients (callers), each looping acquire → release on a semaphore of its own
    /// (or a shared one: contended); each with its own connection unless `--connections`.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Spread the `--clients` callers over this many connections (coordinator scenarios):
    /// with the library, K shared `Client`s whose callers run concurrently as tasks, each
    /// with its own semaphore and leases; with `--client raw`, K connections, each with one
    /// session, on which its callers' requests are pipelined (several in flight, replies
    /// matched by request id). Default: one per caller.
    #[arg(long)]
    connections: Option<usize>,
    /// The server process whose CPU time per pair to report:
    /// a coordinator given with `--url`, or the Redis server of `--scenario redis`. A
    /// coordinator the bench starts itself is measured without it.
    #[arg(long)]
    server_pid: Option<u32>,
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
    /// The Redis server of `--scenario redis`.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// How the coordinator scenarios talk to the coordinator: through the client library
    /// (`library`: sessions kept alive, reconnection, a driver task per client — what an
    /// application gets), or with bare protocol frames on the socket (`raw`: what the Redis
    /// peer does too, so that the two servers are compared with equal clients).
    #[arg(long, value_enum, default_value = "library")]
    client: BenchClient,
    /// How the library client releases: `wait` (`Permit::release`: waits for the answer),
    /// `send` (`Permit::send_release`: returns once the release is written; what the Python
    /// package's `release()` does) or `drop` (the permit is dropped, which queues the release
    /// without waiting: what Rust code that lets a permit go out of scope does). With
    /// `--client raw`, `send` and `drop` both write the release together with the next
    /// acquire as soon as the grant comes, without waiting for the release's answer.
    #[arg(long, value_enum, default_value = "wait")]
    release: BenchRelease,
    /// Leases to hold in the scale scenario (at most semaphores × capacity).
    #[arg(long, default_value_t = 1_000_000)]
    leases: u64,
    /// Session TTL of the keepalive scenario's clients (they keep alive every TTL/3), and of
    /// the scale scenario's lease holders.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    session_ttl: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// `serve --forget-idle` of the coordinator the scale and scrape scenarios start.
    #[arg(long, default_value = "10m")]
    forget_idle: String,
    /// Storage of the coordinator the bench starts (without --url): in memory, or a
    /// write-ahead log in a fresh temporary directory synced in batches or on every request.
    #[arg(long, value_enum, default_value = "in-memory")]
    storage: BenchStorage,
}

/// The client side of the coordinator scenarios.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchClient {
    /// `turnstile_client::Client`.
    Library,
    /// Protocol frames written and read directly.
    Raw,
}

/// How the library client releases (see `--release`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchRelease {
    /// `Permit::release`.
    Wait,
    /// `Permit::send_release`.
    Send,
    /// Dropping the permit.
    Drop,
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

/// What the bench process and the server used over the measured window.
struct Usage {
    bench: UsageDelta,
    /// `None` without a server process to read (`--url` or Redis without `--server-pid`, or
    /// the in-process echo peer, whose CPU is the bench's own).
    server: Option<(u32, UsageDelta)>,
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(args.semaphores >= 1, "--semaphores must be at least 1");
    anyhow::ensure!(args.capacity >= 1, "--capacity must be at least 1");
    let coordinator_load = matches!(
        args.scenario,
        Scenario::Uncontended | Scenario::Contended | Scenario::Weighted
    );
    if let Some(k) = args.connections {
        anyhow::ensure!(k >= 1, "--connections must be at least 1");
        anyhow::ensure!(
            coordinator_load,
            "--connections applies to the uncontended, contended and weighted scenarios"
        );
    }
    if args.scenario == Scenario::Keepalive {
        return keepalive(&args).await;
    }
    if args.scenario == Scenario::Scale {
        return scale(&args).await;
    }
    if args.scenario == Scenario::Scrape {
        return scrape(&args).await;
    }
    let mut server = None;
    let mut server_pid = args.server_pid;
    let url = match (&args.url, coordinator_load) {
        (None, true) => {
            let (child, url) = spawn_server(args.storage).await?;
            server_pid = child.id();
            server = Some(child);
            url
        }
        (Some(u), _) => u.clone(),
        (None, false) => String::new(),
    };
    if args.scenario == Scenario::Echo {
        server_pid = None; // the echo peer is a thread of the bench
    }
    let (tell, told) = tokio::sync::oneshot::channel();
    let start = Start {
        warmup: args.warmup,
        duration: args.duration,
        tell,
    };
    let sampler = tokio::spawn(sample_usage(told, server_pid));
    let r = match args.scenario {
        Scenario::Echo => echo(&args, start).await,
        Scenario::Redis => redis(&args, start).await,
        Scenario::EtcdLock => etcd_lock(&args, start).await,
        _ => load(&args, &url, start).await,
    };
    let usage = sampler.await.ok().and_then(Result::ok);
    if let Some(mut child) = server {
        let _ = child.kill().await;
    }
    report(&args, &r?, usage.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

/// Reads the bench's and the server's usage at the start and at the end of the measured
/// window, once the scenario has started it.
async fn sample_usage(
    window: tokio::sync::oneshot::Receiver<Window>,
    server: Option<u32>,
) -> anyhow::Result<Usage> {
    let window = window.await?;
    let me = std::process::id();
    tokio::time::sleep_until(window.measure_from.into()).await;
    let (bench0, server0) = (ProcUsage::of(me)?, server.map(ProcUsage::of));
    tokio::time::sleep_until(window.end.into()).await;
    let bench1 = ProcUsage::of(me)?;
    let server = match (server, server0) {
        // A server that went away during the run is not measured; the bench still is.
        (Some(pid), Some(Ok(before))) => ProcUsage::of(pid)
            .ok()
            .map(|after| (pid, after.since(&before))),
        _ => None,
    };
    Ok(Usage {
        bench: bench1.since(&bench0),
        server,
    })
}

/// The number of connections the callers are spread over.
fn connections(args: &BenchArgs) -> usize {
    args.connections
        .unwrap_or(args.clients)
        .clamp(1, args.clients)
}

fn report(args: &BenchArgs, o: &Outcome, usage: Option<&Usage>) -> anyhow::Result<()> {
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
    let coordinator = !matches!(
        args.scenario,
        Scenario::Echo | Scenario::Redis | Scenario::EtcdLock
    );
    let mut scenario = format!("{:?}", args.scenario).to_lowercase();
    if coordinator {
        if args.url.is_none() {
            scenario = format!("{scenario}/{:?}", args.storage).to_lowercase();
        }
        if args.client == BenchClient::Raw {
            scenario.push_str("/raw");
            if args.release != BenchRelease::Wait {
                scenario.push_str("/pipelined");
            }
        } else if args.release != BenchRelease::Wait {
            scenario = format!("{scenario}/release-{:?}", args.release).to_lowercase();
        }
    }
    let conns = if coordinator {
        connections(args)
    } else {
        args.clients
    };
    // Without pairs there is nothing to divide by.
    let usage = usage.filter(|_| o.pairs > 0);
    let per_pair = PerPair {
        bench: usage.map(|u| u.bench.per(o.pairs)),
        server: usage.and_then(|u| u.server.map(|(_, d)| d.per(o.pairs))),
    };
    if args.json {
        outln!(
            "{{\"scenario\":\"{scenario}\",\"clients\":{},\"connections\":{conns},\"pairs_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}{}}}",
            args.clients,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            o.errors,
            per_pair.json()
        )?;
    } else {
        let unit = if args.scenario == Scenario::Echo {
            "round trips"
        } else {
            "pairs"
        };
        outln!(
            "{scenario}: {} clients over {conns} connections, {:.0} {unit}/s, p50 {}us, p99 {}us, p99.9 {}us, {} errors ({} {unit} in {:.1}s)",
            args.clients,
            rate,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            o.errors,
            o.pairs,
            o.elapsed.as_secs_f64()
        )?;
        if let Some(line) = per_pair.text(usage.and_then(|u| u.server.map(|(pid, _)| pid))) {
            outln!("{line}")?;
        }
    }
    Ok(())
}

/// CPU time of a process (all its threads), from /proc. (System calls are not counted here:
/// /proc/PID/io counts `read` and `write`, but sockets are driven with `recv` and `send`,
/// which it does not see; use `strace -c -f -p PID` for those.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcUsage {
    /// User plus system time, in clock ticks.
    cpu_ticks: u64,
}

/// The difference of two [`ProcUsage`] samples.
#[derive(Clone, Copy, Debug, PartialEq)]
struct UsageDelta {
    cpu_secs: f64,
}

/// [`UsageDelta`] divided by pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PairCost {
    /// CPU time per pair in microseconds.
    cpu_us: f64,
}

/// The per-pair costs of the bench and of the server.
struct PerPair {
    bench: Option<PairCost>,
    server: Option<PairCost>,
}

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every supported platform.
const TICKS_PER_SEC: f64 = 100.0;

impl ProcUsage {
    fn of(pid: u32) -> anyhow::Result<ProcUsage> {
        Ok(ProcUsage {
            cpu_ticks: cpu_ticks(pid)?,
        })
    }

    fn since(&self, before: &ProcUsage) -> UsageDelta {
        UsageDelta {
            cpu_secs: self.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SEC,
        }
    }
}

impl UsageDelta {
    fn per(&self, pairs: u64) -> PairCost {
        let n = pairs.max(1) as f64;
        PairCost {
            cpu_us: self.cpu_secs * 1e6 / n,
        }
    }
}

impl PerPair {
    /// The JSON fields (each with a leading comma), `null` where unknown.
    fn json(&self) -> String {
        let mut out = String::new();
        for (who, cost) in [("bench", self.bench), ("server", self.server)] {
            let cpu = cost.map_or_else(|| "null".to_owned(), |c| format!("{:.2}", c.cpu_us));
            out.push_str(&format!(",\"{who}_cpu_us_per_pair\":{cpu}"));
        }
        out
    }

    /// One line for the text report, if anything was measured.
    fn text(&self, server_pid: Option<u32>) -> Option<String> {
        let part = |who: String, c: PairCost| format!("{who} {:.1}us", c.cpu_us);
        let mut parts = Vec::new();
        if let Some(c) = self.bench {
            parts.push(part("bench".to_owned(), c));
        }
        if let (Some(c), Some(pid)) = (self.server, server_pid) {
            parts.push(part(format!("server (pid {pid})"), c));
        }
        (!parts.is_empty()).then(|| format!("  CPU per pair: {}", parts.join(", ")))
    }
}

/// Starts `turnstile serve` on a free loopback port and waits until it accepts connections.
async fn spawn_server(storage: BenchStorage) -> anyhow::Result<(tokio::process::Child, String)> {
    spawn_server_with(storage, &["--http", "off"]).await
}

/// [`spawn_server`] with more arguments for `serve`.
async fn spawn_server_with(
    storage: BenchStorage,
    extra: &[&str],
) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe().context("locating the turnstile binary")?;
    let dir = std::env::temp_dir().join(format!("turnstile-bench-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = tokio::process::Command::new(exe);
    // The load is on the protocol port; the HTTP port is not measured here.
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    cmd.args(extra);
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
        // The server's log level: `warn` unless TURNSTILE_BENCH_LOG says otherwise (to measure
        // what logging costs; the server logs on the bench's stderr).
        .env(
            "RUST_LOG",
            std::env::var("TURNSTILE_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
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

/// The coordinator scenarios through the client library: `--connections` shared clients,
/// each caller a task of its own with its own semaphore (uncontended, weighted).
async fn load(args: &BenchArgs, url: &str, start: Start) -> anyhow::Result<Outcome> {
    if args.client == BenchClient::Raw {
        return load_raw(args, url, start).await;
    }
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(connections(args));
    for _ in 0..connections(args) {
        clients.push(Client::connect(url).await?);
    }
    let mut callers = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let client = &clients[i % clients.len()];
        let (name, capacity, weight) = workload(args, i);
        callers.push((client.semaphore(&name, capacity).await?, weight));
    }
    let window = start.window();
    let mut tasks = tokio::task::JoinSet::new();
    let release = args.release;
    for (sem, weight) in callers {
        let errors = errors.clone();
        tasks.spawn(async move {
            let (_, pairs, lat) = window
                .drive(sem, &errors, |sem| async move {
                    let ok = match sem.acquire_many(weight).await {
                        Ok(p) => match release {
                            BenchRelease::Wait => p.release().await.is_ok(),
                            BenchRelease::Send => p.send_release().await.is_ok(),
                            BenchRelease::Drop => {
                                drop(p);
                                true
                            }
                        },
                        Err(_) => false,
                    };
                    (sem, Some(ok))
                })
                .await;
            (pairs, lat)
        });
    }
    let mut outcome = collect(tasks, args.duration).await?;
    for client in clients {
        let _ = client.shutdown().await;
    }
    outcome.errors = errors.load(Ordering::Relaxed);
    Ok(outcome)
}

/// When a bench client measures: after the warm-up, until the end of the run.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// Starts the measured window once a scenario has connected its clients (connecting 64
/// sessions to a durable coordinator on a loaded machine may take longer than the warm-up),
/// and tells the CPU sampler.
struct Start {
    warmup: Duration,
    duration: Duration,
    tell: tokio::sync::oneshot::Sender<Window>,
}

impl Start {
    fn window(self) -> Window {
        let measure_from = Instant::now() + self.warmup;
        let window = Window {
            measure_from,
            end: measure_from + self.duration,
        };
        let _ = self.tell.send(window);
        window
    }
}

impl Window {
    /// Repeats `op` until the end of the run. `op` takes the client's state and gives it back
    /// with the operation's outcome: `Some(true)` a success, `Some(false)` a failure (counted
    /// in `errors`), `None` a broken client (it stops). Returns the state, the successes in
    /// the measured window and their latencies in microseconds.
    async fn drive<S, F, Fut>(
        self,
        mut state: S,
        errors: &AtomicU64,
        mut op: F,
    ) -> (S, u64, Vec<u32>)
    where
        F: FnMut(S) -> Fut,
        Fut: std::future::Future<Output = (S, Option<bool>)>,
    {
        let mut lat = Vec::with_capacity(1 << 16);
        let mut n = 0u64;
        loop {
            let t = Instant::now();
            if t >= self.end {
                break;
            }
            let (back, outcome) = op(state).await;
            state = back;
            let Some(ok) = outcome else { break };
            if t >= self.measure_from {
                if ok {
                    n += 1;
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (state, n, lat)
    }
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

/// `--clients` sessions that only keep alive. Prints the coordinator's CPU use over
/// `--duration`, as a share of one core, read from /proc (the bench starts the coordinator).
async fn keepalive(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.url.is_none(),
        "the keepalive scenario measures a coordinator it starts itself; drop --url"
    );
    let (mut child, url) = spawn_server(args.storage).await?;
    let pid = child.id().context("the coordinator's pid")?;
    let options = turnstile_client::Options {
        session_ttl: Some(args.session_ttl),
        ..turnstile_client::Options::default()
    };
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(Client::connect_with(&url, options.clone()).await?);
    }
    tokio::time::sleep(args.warmup).await;
    let before = cpu_ticks(pid)?;
    let t = Instant::now();
    tokio::time::sleep(args.duration).await;
    let ticks = cpu_ticks(pid)? - before;
    let elapsed = t.elapsed().as_secs_f64();
    let share = ticks as f64 / TICKS_PER_SEC / elapsed;
    let keepalives = args.clients as f64 * 3.0 / args.session_ttl.as_secs_f64();
    if args.json {
        outln!(
            "{{\"scenario\":\"keepalive/{:?}\",\"clients\":{},\"session_ttl_ms\":{},\"keepalives_per_sec\":{keepalives:.0},\"server_cpu_share\":{share:.4}}}",
            args.storage,
            args.clients,
            args.session_ttl.as_millis()
        )?;
    } else {
        outln!(
            "keepalive: {} idle sessions (TTL {}, about {keepalives:.0} keep-alives/s): the coordinator used {:.1}% of one core",
            args.clients,
            humantime::format_duration(args.session_ttl),
            share * 100.0
        )?;
    }
    for c in clients {
        let _ = c.shutdown().await;
    }
    let _ = child.kill().await;
    Ok(ExitCode::SUCCESS)
}

/// User plus system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).context("unexpected /proc/PID/stat format")
}

/// utime plus stime (fields 14 and 15) of a /proc/PID/stat text, counted after the
/// parenthesised command name, which may hold spaces and parentheses.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The name, capacity and weight client `i` uses in a coordinator scenario.
fn workload(args: &BenchArgs, i: usize) -> (String, u32, u32) {
    match args.scenario {
        Scenario::Uncontended => (format!("bench-u-{i}"), 1, 1),
        Scenario::Weighted => (format!("bench-w-{i}"), 4, 2),
        _ => (format!("bench-c-{}", i % args.semaphores), args.capacity, 1),
    }
}

/// A session id for raw client `i`: distinct per client and per bench run.
fn turnstile_client_session(i: usize) -> u64 {
    let run = u64::from(std::process::id()) << 32;
    (run | i as u64).max(1)
}

/// Resident memory of a process in bytes (VmRSS of /proc/PID/status).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_this_process() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }

    #[test]
    fn stat_ticks_are_utime_plus_stime_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 99 1 1";
        assert_eq!(parse_stat_ticks(stat), Some(42));
        assert_eq!(parse_stat_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn usage_per_pair_divides_the_window_by_the_pairs() {
        let before = ProcUsage { cpu_ticks: 100 };
        let after = ProcUsage { cpu_ticks: 150 };
        let delta = after.since(&before);
        assert_eq!(delta.cpu_secs, 0.5);
        let cost = delta.per(10_000);
        assert!((cost.cpu_us - 50.0).abs() < 1e-9, "{cost:?}");
        // No pairs: no division by zero.
        assert!(delta.per(0).cpu_us.is_finite());
        // A counter that went backwards (another process with the pid): zero, not a wrap.
        assert_eq!(before.since(&after).cpu_secs, 0.0);
    }

    #[test]
    fn per_pair_json_has_every_field_null_when_unknown() {
        let p = PerPair {
            bench: Some(PairCost { cpu_us: 12.345 }),
            server: None,
        };
        let json = format!("{{\"x\":1{}}}", p.json());
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["bench_cpu_us_per_pair"], 12.35);
        assert!(v["server_cpu_us_per_pair"].is_null());
        assert!(p.text(None).is_some_and(|t| t.contains("bench 12.3us")));
    }

    #[test]
    fn connections_default_to_one_per_caller_and_never_exceed_them() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let args = |extra: &[&str]| {
            let mut argv = vec!["bench"];
            argv.extend_from_slice(extra);
            Cli::parse_from(argv).bench
        };
        assert_eq!(connections(&args(&["--clients", "8"])), 8);
        assert_eq!(
            connections(&args(&["--clients", "8", "--connections", "2"])),
            2
        );
        assert_eq!(
            connections(&args(&["--clients", "2", "--connections", "5"])),
            2
        );
    }
}
