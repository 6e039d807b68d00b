//! The `turnstile` command: a thin shell over the library crates. It parses arguments, sets up
//! logging and a runtime, calls into `turnstile-server` or `turnstile-client`, and maps errors
//! to one line on stderr and an exit code. It is the only crate that uses `anyhow`.

#[macro_use]
mod out;

mod bench;
mod config_file;
mod guard;
mod nanny;
mod once;
mod reach;
mod run;
mod serve;
mod status;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the coordinator allocates and frees many small objects
/// (names, leases, tree nodes), and glibc keeps freed memory in the middle of its heaps for
/// good, so a coordinator that forgot 200,000 idle semaphores stayed at ~115 MiB resident
/// (`malloc_trim` brought it back; see BENCHMARKS.md). mimalloc returns freed pages to the
/// system after a short delay, and is one C file to build.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
pub use config_file::{parse_duration, parse_size, LogFormat};

/// Exit code when the backend cannot be reached (EX_UNAVAILABLE); see [`EXIT_CODES`].
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when an acquire timed out on a coordinator that answers (EX_TEMPFAIL: try again
/// later).
pub const EXIT_TIMEOUT: u8 = 75;
/// Exit code when the lease was lost while the command ran and the command was stopped.
pub const EXIT_LOST: u8 = 76;

/// The one table of exit codes, shown by every client command's `--help` (and in README.md).
pub const EXIT_CODES: &str = "\
Exit codes (the same for every command and backend):
  0        done: CMD exited 0, a job was skipped (completed, or running elsewhere),
           a group settled, a nanny was stopped by a signal
  CMD's    run and once exit with CMD's own code, 128+N if CMD was killed by signal N
  1        any other error: a bad URL, a refused request (capacity mismatch, no such
           semaphore), a nanny whose workers ended and one of them failed
  2        bad arguments
  69       the coordinator (or the file:// directory) cannot be reached: at the deadline of
           a wait (--timeout); for run, once and wait, when the first connection still fails
           after --connect-timeout (retried, so that a restart stays invisible); for status
           and close, at once (no retry); once: CMD succeeded but its completion could not be
           recorded, so the job may run again; nanny: unreachable for --death-timeout
  75       still busy at --timeout, on a coordinator that answers; with --timeout 0
           (try once, never wait: like flock -n), busy at once
  76       the lease was lost while CMD ran, and CMD was stopped
  126/127  CMD cannot be run / was not found
  128+N    turnstile itself was stopped by signal N before CMD ran
A release that cannot be delivered does not change run's code: it exits with CMD's code
and says that the lease expired on its own.";

#[derive(Parser, Debug)]
#[command(
    name = "turnstile",
    version,
    about = "Lease-based counting semaphores for batch jobs and worker pools",
    long_about = None,
)]
struct Cli {
    /// Log lines as text for people, or as JSON objects (one per line) for log collectors.
    /// Levels come from RUST_LOG (default: info; warn for run and once, whose stderr is
    /// their command's).
    #[arg(
        long,
        global = true,
        env = "TURNSTILE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// The file holding the coordinator's token, for a coordinator that requires one (`serve
    /// --auth-token-file`). A token is never taken on the command line or in the URL, where
    /// `ps` and logs would show it. Passed on to the commands that run and nanny start.
    #[arg(long, global = true, env = "TURNSTILE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// The PEM file of the CA certificates to trust for a tls:// coordinator (default: the
    /// system's roots). Passed on to the commands that run and nanny start.
    #[arg(long, global = true, env = "TURNSTILE_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the semaphores are.
#[derive(clap::Args, Debug, Clone)]
struct UrlArg {
    /// Backend URL: a coordinator (tcp://127.0.0.1:7420, or tls://HOST:PORT with --ca), a
    /// shared directory
    /// (file:///mnt/shared/turnstile) or an etcd cluster (etcd://h1:2379,h2:2379[/PREFIX])
    /// [default: $TURNSTILE_URL, else the per-user directory
    /// file://$XDG_RUNTIME_DIR/turnstile, or file:///tmp/turnstile-$UID]
    #[arg(long, env = "TURNSTILE_URL", hide_env = true)]
    url: Option<String>,
}

impl UrlArg {
    /// The URL given, else a per-user local directory: with no server and no set-up,
    /// `turnstile run` still limits the processes of this user on this host.
    fn get(&self) -> String {
        match &self.url {
            Some(url) => url.clone(),
            None => {
                let url = turnstile_client::default_url();
                note_default_coordinator(&url);
                url
            }
        }
    }
}

/// How long the probe of the default coordinator port may take: it runs before every command
/// that uses the local default, so it must cost nothing noticeable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);

/// Says, in one line on stderr, that a coordinator answers on the default port while this
/// command uses the per-user directory (no --url, no TURNSTILE_URL): the two backends do not
/// see each other's semaphores, so the user likely forgot to export TURNSTILE_URL. It never
/// switches backends: processes split over two backends would overbook.
fn note_default_coordinator(url: &str) {
    use std::net::{SocketAddr, TcpStream};
    let Ok(addr) = serve::DEFAULT_LISTEN.parse::<SocketAddr>() else {
        return;
    };
    if TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok() {
        errln!(
            "turnstile: note: using {url} (no --url or TURNSTILE_URL), but a coordinator \
             answers on {addr}; to use it: export TURNSTILE_URL=tcp://{addr}"
        );
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator: the protocol port, and an HTTP port with metrics, the status API
    /// and a dashboard.
    Serve(serve::ServeArgs),
    /// Run a command while holding a slot of a semaphore.
    ///
    /// The command never outlives turnstile: if turnstile dies, even by SIGKILL, the command's whole process tree is
    /// killed at once; when the command exits, what it left running is killed too.
    #[command(after_help = EXIT_CODES)]
    Run(run::RunArgs),
    /// Run a job once and only once: skip it if it has completed (or runs elsewhere), record
    /// its completion when the command exits 0.
    #[command(after_help = EXIT_CODES)]
    Once(once::OnceArgs),
    /// Wait until no job of a group is running (and, with --jobs N, N have completed).
    #[command(after_help = EXIT_CODES)]
    Wait(once::WaitArgs),
    /// Show semaphores (holders, queues) and job groups (completed, running, failed).
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Only this semaphore.
        name: Option<String>,
        /// Only the semaphores, groups and jobs whose names start with this.
        #[arg(long, conflicts_with = "name")]
        prefix: Option<String>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every --interval until Ctrl-C (with --json: one document per line).
        #[arg(long)]
        watch: bool,
        /// How often --watch redraws.
        #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "watch")]
        interval: Duration,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Close a semaphore: waiters fail, holders lose their leases, later acquires fail.
    #[command(after_help = EXIT_CODES)]
    Close {
        /// The semaphore.
        name: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Change the capacity of an existing semaphore.
    ///
    /// Growing grants queued acquires that now fit at once, in queue order. Shrinking takes
    /// nothing away: holders keep their permits (in use may stay above the capacity for a
    /// while) and nothing is granted until what they hold plus the next waiter's weight fits;
    /// waiters heavier than the new capacity fail. `run --limit` with the old capacity is
    /// refused from then on (capacity mismatch): this command is the way to change it. Needs
    /// the admin token where the coordinator has one.
    #[command(name = "set-capacity", after_help = EXIT_CODES)]
    SetCapacity {
        /// The semaphore.
        name: String,
        /// The new capacity, at least 1.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        capacity: u32,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Delete a semaphore, so that its name can be used afresh (with any capacity).
    ///
    /// Only a closed semaphore or an idle one (no holder, no waiter) can be deleted; one in
    /// use is refused (close it first to take its leases away). The fencing tokens of the
    /// name still strictly increase when it is created again. Needs the admin token where
    /// the coordinator has one.
    #[command(after_help = EXIT_CODES)]
    Delete {
        /// The semaphore.
        name: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Release another holder's lease by force (a stuck or runaway holder).
    ///
    /// Its permits go to the next waiters at once; its holder is told that its lease is lost
    /// (`turnstile run` stops its command and exits 76). LEASE_ID is the LEASE column of
    /// `turnstile status NAME`. Needs the admin token where the coordinator has one.
    #[command(after_help = EXIT_CODES)]
    Release {
        /// The semaphore.
        name: String,
        /// The lease to release (as `turnstile status` shows it).
        lease_id: u64,
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
    /// lease files are removed). If the nanny itself dies, even by SIGKILL, every worker's
    /// processes are killed at once (each worker runs under a guard process).
    ///
    /// SIGTERM, SIGINT or SIGQUIT: send SIGTERM to every worker's processes, SIGKILL what is
    /// left after --stop-timeout, and exit once every process is reaped; a second signal sends
    /// SIGKILL at once. SIGHUP: restart the workers one at a time.
    ///
    /// Exit status: 0 after SIGTERM, SIGINT or SIGQUIT, or when every worker has ended and
    /// none needed a restart (--restart on-failure or never); 1 when every worker has ended
    /// and one of them was given up on (--max-restarts) or failed, or on any other error;
    /// 69 when the coordinator was unreachable for --death-timeout; 126 or 127 if CMD cannot
    /// be run; 2 for bad arguments.
    #[command(after_help = EXIT_CODES)]
    Nanny(nanny::NannyArgs),
    /// Load generator: acquire+release pairs per second and their latency.
    Bench(bench::BenchArgs),
    /// Internal: the process between a wrapper (run, once, a nanny worker) and its command
    /// that kills the command's whole tree when the wrapper dies (see guard.rs).
    #[command(name = "__guard", hide = true)]
    Guard(guard::GuardArgs),
    /// Internal: how the guard starts the command with the signal mask reset.
    #[command(name = "__exec", hide = true)]
    Exec(guard::ExecArgs),
}

/// Parses a count of slots (`--limit`, `--weight`): a whole number from 1.
pub fn parse_slots(s: &str) -> Result<u32, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => {
            u32::try_from(n).map_err(|_| format!("{n} is too large (at most {})", u32::MAX))
        }
        Ok(n) => Err(format!("{n} is not a number of slots (expected 1 or more)")),
        Err(_) => Err(format!(
            "{s:?} is not a number of slots (expected 1 or more)"
        )),
    }
}

/// Rewrites a clap error about a bad value that came from an environment variable so that it
/// names the variable: clap blames the flag (`--session-ttl`), which the user never typed.
fn name_the_variable(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ValueValidation && e.kind() != ErrorKind::InvalidValue {
        return e;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let Some(flag) = arg.split_whitespace().next() else {
        return e;
    };
    let typed = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if typed {
        return e;
    }
    let cmd = Cli::command();
    let var = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .filter(|a| {
            a.get_long()
                .is_some_and(|l| flag.strip_prefix("--") == Some(l))
        })
        .filter_map(|a| a.get_env())
        .find(|v| std::env::var_os(v).is_some_and(|set| set.to_str() == Some(value.as_str())));
    let Some(var) = var else {
        return e;
    };
    let why = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!(
            "invalid value {value:?} in the environment variable {} (for {flag}){why}\n",
            var.to_string_lossy()
        ),
    )
    .with_cmd(&cmd)
}

fn main() -> ExitCode {
    // Parsed in two steps, so that `serve` can tell typed and environment values from
    // defaults (its config file fills in only the defaults).
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => name_the_variable(e).exit(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(path) = &cli.token_file {
        // The client library reads the token from the file this names; the commands that
        // `run` and `nanny` start inherit it. Set before any thread starts.
        std::env::set_var(turnstile_client::TOKEN_FILE_ENV, path);
    }
    if let Some(path) = &cli.ca {
        // The same for the CA file: the client library reads TURNSTILE_CA.
        std::env::set_var(turnstile_client::CA_ENV, path);
    }
    let result = match cli.command {
        // No logging and no runtime: the guard is a small single-threaded process whose
        // signal mask must hold for its only thread.
        Command::Guard(args) => return guard::guard(args),
        Command::Exec(args) => return guard::exec(args),
        Command::Serve(args) => {
            let sub = matches.subcommand_matches("serve").unwrap_or(&matches);
            serve_command(&args, sub, cli.log_format)
        }
        command => {
            // run and once share stderr with their command: only what went wrong is news
            // there (a lost lease, a bound reached), not that the client reconnects.
            let quiet = matches!(command, Command::Run(_) | Command::Once(_));
            init_logging_at(cli.log_format, if quiet { "warn" } else { "info" });
            dispatch(command)
        }
    };
    match result {
        Ok(code) => code,
        // The reader of stdout went away (`status | head -1`): it has what it wanted.
        Err(e)
            if e.downcast_ref::<out::Closed>()
                .is_some_and(out::Closed::is_broken_pipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("turnstile: {}", one_line(&e));
            exit_code_of(&e)
        }
    }
}

/// The error and its causes on one line, `a: b: c`, leaving out a cause whose text its
/// parent already ends with (a library error that prints its source too would otherwise say
/// it twice: "File exists (os error 17): File exists (os error 17)").
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    let refused_at = e.chain().find_map(|c| match c.downcast_ref() {
        Some(turnstile_client::Error::Connect { addr, source })
            if source.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            Some(addr.clone())
        }
        _ => None,
    });
    if let Some(addr) = refused_at {
        let _ = write!(line, " (is `turnstile serve` running on {addr}?)");
    }
    line
}

/// The exit code of an error (see [`EXIT_CODES`]): 69 when the backend cannot be reached,
/// wherever in the chain that error sits; 1 otherwise.
fn exit_code_of(e: &anyhow::Error) -> ExitCode {
    let unavailable = e.chain().any(|c| {
        c.downcast_ref::<turnstile_client::Error>()
            .is_some_and(turnstile_client::Error::is_unavailable)
    });
    if unavailable {
        ExitCode::from(EXIT_UNAVAILABLE)
    } else {
        ExitCode::FAILURE
    }
}

fn serve_command(
    args: &serve::ServeArgs,
    matches: &clap::ArgMatches,
    log_format: LogFormat,
) -> anyhow::Result<ExitCode> {
    let settings = args.settings(matches, log_format, args.file()?);
    if args.print_config() {
        out!("{}", settings.to_toml())?;
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(settings.log_format.value);
    if settings.in_memory.value && settings.data_dir.source != serve::Source::Default {
        tracing::warn!(
            data_dir = %settings.data_dir.value.display(),
            "in_memory is set: the data directory is not used"
        );
    }
    runtime()?.block_on(serve::serve(settings))?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// Logging to stderr, at RUST_LOG's levels or else at `default`.
fn init_logging_at(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its report of a failed write is an `eprintln!`, which panics when stderr is a
        // closed pipe: a coordinator whose log reader went away would die of its next line.
        .log_internal_errors(false)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(_) | Command::Guard(_) | Command::Exec(_) => {
            unreachable!("invariant: main handles serve and __guard before dispatch")
        }
        Command::Run(args) => runtime()?.block_on(run::run(args)),
        Command::Once(args) => runtime()?.block_on(once::once(args)),
        Command::Wait(args) => runtime()?.block_on(once::wait(args)),
        Command::Status {
            name,
            prefix,
            json,
            watch,
            interval,
            url,
        } => {
            let url = url.get();
            let rt = runtime()?;
            let what = match (&name, &prefix) {
                (Some(name), _) => status::What::Name(name),
                (None, Some(prefix)) => status::What::Prefix(prefix),
                (None, None) => status::What::All,
            };
            if watch {
                rt.block_on(status::watch(&url, what, json, interval))
            } else {
                rt.block_on(status::status(&url, what, json))
            }
        }
        Command::Close { name, url } => runtime()?.block_on(async {
            // A call that does not wait: one attempt, so an absent coordinator is 69 at once.
            // Closing a name that is not known, or already closed, succeeds on every backend.
            let client = turnstile_client::Client::connect(&url.get()).await?;
            let closed = client.close(&name).await;
            let _ = client.shutdown().await;
            closed?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::SetCapacity {
            name,
            capacity,
            url,
        } => runtime()?.block_on(async {
            let client = turnstile_client::Client::connect(&url.get()).await?;
            client.set_capacity(&name, capacity).await?;
            client.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Delete { name, url } => runtime()?.block_on(async {
            let client = turnstile_client::Client::connect(&url.get()).await?;
            client.delete(&name).await?;
            client.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Release {
            name,
            lease_id,
            url,
        } => runtime()?.block_on(async {
            let client = turnstile_client::Client::connect(&url.get()).await?;
            client.revoke(&name, lease_id).await?;
            client.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Nanny(args) => runtime()?.block_on(nanny::nanny(args)),
        Command::Bench(args) => runtime()?.block_on(bench::bench(args)),
    }
}
