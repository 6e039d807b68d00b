//! The `turnstile` command: a thin shell over the library crates. It parses arguments, sets up
//! logging and a runtime, calls into `turnstile-server` or `turnstile-client`, and maps errors
//! to one line on stderr and an exit code. It is the only crate that uses `anyhow`.

mod bench;
mod nanny;
mod once;
mod run;
mod status;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Exit code when an acquire timed out (EX_TEMPFAIL: try again later).
pub const EXIT_TIMEOUT: u8 = 75;
/// Exit code when the lease was lost while the command ran and the command was stopped.
pub const EXIT_LOST: u8 = 76;

#[derive(Parser, Debug)]
#[command(
    name = "turnstile",
    version,
    about = "Lease-based counting semaphores for batch jobs and worker pools",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the semaphores are.
#[derive(clap::Args, Debug, Clone)]
struct UrlArg {
    /// Backend URL: a coordinator (tcp://127.0.0.1:7420) or a shared directory
    /// (file:///mnt/shared/turnstile) [default: $TURNSTILE_URL, else the per-user directory
    /// file://$XDG_RUNTIME_DIR/turnstile, or file:///tmp/turnstile-$UID]
    #[arg(long, env = "TURNSTILE_URL", hide_env = true)]
    url: Option<String>,
}

impl UrlArg {
    /// The URL given, else a per-user local directory: with no server and no set-up,
    /// `turnstile run` still limits the processes of this user on this host.
    fn get(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(turnstile_client::default_url)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: SocketAddr,
        /// Session TTL for clients that do not ask for one (e.g. 500ms, 10s, 2m).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        session_ttl: Duration,
        /// Most connections served at once.
        #[arg(long, default_value_t = 16_384)]
        max_connections: usize,
        /// Directory for the write-ahead log and snapshots (created if missing; one server
        /// per directory).
        #[arg(long, default_value = "turnstile-data", conflicts_with = "in_memory")]
        data_dir: std::path::PathBuf,
        /// Keep the state in memory only: a restart forgets every semaphore and lease.
        #[arg(long)]
        in_memory: bool,
        /// When to sync the log: `always` (each request on its own) or `batch` (group commit:
        /// one sync for the requests that arrive together). Replies always wait for the sync.
        #[arg(long, value_enum, default_value = "batch")]
        fsync: Fsync,
        /// Snapshot the state and drop the older log after this much log (e.g. 64MiB).
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        snapshot_every: u64,
    },
    /// Run a command while holding a slot of a semaphore.
    Run(run::RunArgs),
    /// Run a job once and only once: skip it if it has completed (or runs elsewhere), record
    /// its completion when the command exits 0.
    Once(once::OnceArgs),
    /// Wait until no job of a group is running (and, with --jobs N, N have completed).
    Wait(once::WaitArgs),
    /// Show semaphores (holders, queues) and job groups (completed, running, failed).
    Status {
        /// Only this semaphore.
        name: Option<String>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Close a semaphore: waiters fail, holders lose their leases, later acquires fail.
    Close {
        /// The semaphore.
        name: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Run N copies of a command, restart them when they die, free a dead worker's leases at
    /// once.
    ///
    /// Each worker runs CMD in a process group of its own, with TURNSTILE_WORKER (its index,
    /// 0 to N-1), TURNSTILE_URL, TURNSTILE_SESSION (the session id its turnstile client uses)
    /// and the --env pairs in its environment, and /dev/null as its input. Every start, death
    /// and restart is logged on stderr in words. When a worker's process exits, whatever it
    /// left running is killed (SIGKILL), and then its session is ended, so its leases go to
    /// the next waiters at once rather than after the session TTL (on the file backend, its
    /// lease files are removed).
    ///
    /// SIGTERM, SIGINT or SIGQUIT: send SIGTERM to every worker's processes, SIGKILL what is
    /// left after --stop-timeout, and exit once every process is reaped; a second signal sends
    /// SIGKILL at once. SIGHUP: restart the workers one at a time.
    ///
    /// Exit status: 0 after SIGTERM, SIGINT or SIGQUIT, or when every worker has ended and
    /// none needed a restart (--restart on-failure or never); 1 when every worker has ended
    /// and one of them was given up on (--max-restarts) or failed, or on any other error;
    /// 126 or 127 if CMD cannot be run; 2 for bad arguments.
    Nanny(nanny::NannyArgs),
    /// Load generator: acquire+release pairs per second and their latency.
    Bench(bench::BenchArgs),
}

/// `--fsync` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Fsync {
    Always,
    Batch,
}

/// Parses a size such as `4096`, `512KiB`, `64MiB`, `2GiB` (also `K`, `M`, `G`, `KB`, `MB`,
/// `GB`, all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (expected e.g. 512MiB, 2GiB, 4096)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (expected KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a human duration such as `500ms`, `30s` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 2m)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnstile: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            listen,
            session_ttl,
            max_connections,
            data_dir,
            in_memory,
            fsync,
            snapshot_every,
        } => {
            let storage = if in_memory {
                turnstile_server::Storage::InMemory
            } else {
                turnstile_server::Storage::Dir {
                    path: data_dir,
                    fsync: match fsync {
                        Fsync::Always => turnstile_server::FsyncMode::Always,
                        Fsync::Batch => turnstile_server::FsyncMode::Batch,
                    },
                    snapshot_bytes: snapshot_every.max(4096),
                }
            };
            let config = turnstile_server::Config {
                session_ttl,
                max_connections,
                storage,
                ..turnstile_server::Config::default()
            };
            if session_ttl < config.min_session_ttl || session_ttl > config.max_session_ttl {
                anyhow::bail!(
                    "--session-ttl {} is outside {}..={}",
                    humantime::format_duration(session_ttl),
                    humantime::format_duration(config.min_session_ttl),
                    humantime::format_duration(config.max_session_ttl)
                );
            }
            runtime()?.block_on(serve(listen, config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => runtime()?.block_on(run::run(args)),
        Command::Once(args) => runtime()?.block_on(once::once(args)),
        Command::Wait(args) => runtime()?.block_on(once::wait(args)),
        Command::Status { name, json, url } => {
            runtime()?.block_on(status::status(&url.get(), name.as_deref(), json))
        }
        Command::Close { name, url } => runtime()?.block_on(async {
            let client = turnstile_client::Client::connect(&url.get()).await?;
            client.close(&name).await?;
            client.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Nanny(args) => runtime()?.block_on(nanny::nanny(args)),
        Command::Bench(args) => runtime()?.block_on(bench::bench(args)),
    }
}

async fn serve(listen: SocketAddr, config: turnstile_server::Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let storage = match &config.storage {
        turnstile_server::Storage::InMemory => "in memory".to_owned(),
        turnstile_server::Storage::Dir { path, fsync, .. } => {
            format!("in {} (fsync {fsync:?})", path.display()).to_lowercase()
        }
    };
    let ttl = config.session_ttl;
    // Open the storage before binding: a locked or damaged data directory is reported at once.
    let server = turnstile_server::Server::open(config)?;
    let r = server.recovery();
    if r.records > 0 {
        tracing::info!(
            records = r.records,
            from_snapshot = r.from_snapshot,
            semaphores = r.semaphores,
            sessions = r.sessions,
            leases = r.leases,
            grace = %humantime::format_duration(ttl),
            "recovered state; sessions have one TTL to reconnect"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    // One line on stdout with the bound address, for scripts and tests that listen on port 0.
    println!("listening on {addr}");
    tracing::info!(
        %addr,
        session_ttl = %humantime::format_duration(ttl),
        "turnstile coordinator listening; state {storage}"
    );
    server.run(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
