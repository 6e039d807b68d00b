//! `turnstile serve`: its settings, from four layers, and the coordinator's start.
//!
//! Every setting has a flag (`--session-ttl`), an environment variable
//! (`TURNSTILE_SESSION_TTL`) and a key in the TOML file given with `--config`
//! (`session_ttl`). The first of these that is set wins: **flag > environment > file >
//! default**. Clap tells a value typed or taken from the environment from its default
//! (`ArgMatches::value_source`), so the file only fills in what the first two left at the
//! default. The file is checked whole before anything starts: an unknown key or a bad value is
//! one line that names the key.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::ArgMatches;

pub use crate::config_file::{
    parse_forget, parse_handshake_timeout, parse_http, parse_positive, FileConfig, ForgetIdle,
    Fsync, HttpAddr,
};
use crate::{parse_duration, parse_size, LogFormat};

/// The default address of the coordinator's protocol port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// The default address of the HTTP port.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7421";

/// Arguments of `turnstile serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Read settings from this TOML file. Keys are the flags' names with `_` for `-`
    /// (`session_ttl = "30s"`). Precedence: flag > environment (TURNSTILE_LISTEN...) > file >
    /// default.
    #[arg(long, env = "TURNSTILE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the settings in effect, as a config file that says where each came from, and
    /// exit.
    #[arg(long)]
    print_config: bool,
    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(long, env = "TURNSTILE_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address of the HTTP port (metrics, status API, dashboard), or `off`.
    #[arg(long, env = "TURNSTILE_HTTP", default_value = DEFAULT_HTTP, value_parser = parse_http)]
    http: HttpAddr,
    /// Session TTL for clients that do not ask for one (e.g. 500ms, 10s, 2m).
    #[arg(long, env = "TURNSTILE_SESSION_TTL", default_value = "10s", value_parser = parse_duration)]
    session_ttl: Duration,
    /// Most connections served at once.
    #[arg(long, env = "TURNSTILE_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = parse_max_connections)]
    max_connections: usize,
    /// Directory for the write-ahead log and snapshots (created if missing; one server per
    /// directory).
    #[arg(long, env = "TURNSTILE_DATA_DIR", default_value = "turnstile-data")]
    data_dir: PathBuf,
    /// Keep the state in memory only: a restart forgets every semaphore and lease. (Wins over
    /// a data directory.)
    #[arg(
        long,
        env = "TURNSTILE_IN_MEMORY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    in_memory: bool,
    /// When to sync the log: `always` (each request on its own) or `batch` (group commit: one
    /// sync for the requests that arrive together). Replies always wait for the sync.
    #[arg(long, env = "TURNSTILE_FSYNC", value_enum, default_value = "batch")]
    fsync: Fsync,
    /// Snapshot the state and drop the older log after this much log (e.g. 64MiB).
    #[arg(long, env = "TURNSTILE_SNAPSHOT_EVERY", default_value = "64MiB", value_parser = parse_size)]
    snapshot_every: u64,
    /// Require clients to present the token in this file (clients: --token-file or
    /// TURNSTILE_TOKEN_FILE). On an address that is not loopback, the HTTP port asks for it
    /// too, as a bearer token.
    #[arg(long, env = "TURNSTILE_AUTH_TOKEN_FILE", value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// Only clients that present the token in this file may change other clients' state:
    /// close a semaphore, reset a job, end another session (as a nanny does).
    #[arg(long, env = "TURNSTILE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Listen on an address that is not loopback without a token: anyone who can reach the
    /// port may then close any semaphore.
    #[arg(
        long,
        env = "TURNSTILE_INSECURE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure: bool,
    /// Forget a semaphore that has had no holder and no waiter for this long (e.g. 10m), or
    /// `never`. Fencing tokens of a name created again still go up.
    #[arg(long, env = "TURNSTILE_FORGET_IDLE", default_value = "10m", value_parser = parse_forget)]
    forget_idle: ForgetIdle,
    /// Serve TLS with this PEM certificate chain (with --tls-key): the protocol port then
    /// speaks TLS only (clients use tls://HOST:PORT) and the HTTP port serves HTTPS only.
    #[arg(long, env = "TURNSTILE_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TURNSTILE_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// How long a new connection has to complete its handshake (TLS and Hello) before it is
    /// closed (e.g. 5s).
    #[arg(long, env = "TURNSTILE_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_handshake_timeout)]
    handshake_timeout: Duration,
    /// Most connections still in their handshake at once; past this, the oldest of them is
    /// closed to make room (so that silent sockets cannot lock real clients out).
    #[arg(long, env = "TURNSTILE_MAX_HANDSHAKING", default_value_t = 256, value_parser = parse_positive)]
    max_handshaking: usize,
    /// Most connections from one IP address at once; further ones are closed at once.
    #[arg(long, env = "TURNSTILE_MAX_PER_ADDRESS", default_value_t = 1024, value_parser = parse_positive)]
    max_per_address: usize,
}

/// Parses `--max-connections`: at least 1 (0 would refuse every client).
fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would refuse every client)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of connections (1 or more)")),
    }
}

/// Where a setting came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// A `TURNSTILE_*` environment variable.
    Env,
    /// The config file.
    File,
    /// Nobody set it.
    Default,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "environment",
            Source::File => "config file",
            Source::Default => "default",
        }
    }
}

/// A setting's value and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Set<T> {
    /// The value.
    pub value: T,
    /// Its layer.
    pub source: Source,
}

/// The settings in effect.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// See the flags of the same names.
    pub listen: Set<SocketAddr>,
    /// The HTTP port's address (`None`: off).
    pub http: Set<Option<SocketAddr>>,
    /// Default session TTL.
    pub session_ttl: Set<Duration>,
    /// Connection cap.
    pub max_connections: Set<usize>,
    /// Data directory.
    pub data_dir: Set<PathBuf>,
    /// No storage.
    pub in_memory: Set<bool>,
    /// Sync mode.
    pub fsync: Set<Fsync>,
    /// Snapshot threshold in bytes.
    pub snapshot_every: Set<u64>,
    /// Log format.
    pub log_format: Set<LogFormat>,
    /// The clients' token file.
    pub auth_token_file: Set<Option<PathBuf>>,
    /// The admin token file.
    pub admin_token_file: Set<Option<PathBuf>>,
    /// Listening beyond loopback without a token is allowed.
    pub insecure: Set<bool>,
    /// Idle time before a semaphore is forgotten.
    pub forget_idle: Set<Option<Duration>>,
    /// The TLS certificate chain.
    pub tls_cert: Set<Option<PathBuf>>,
    /// The TLS private key.
    pub tls_key: Set<Option<PathBuf>>,
    /// The handshake timeout.
    pub handshake_timeout: Set<Duration>,
    /// Connections in their handshake, at most.
    pub max_handshaking: Set<usize>,
    /// Connections per IP address, at most.
    pub max_per_address: Set<usize>,
}

impl FileConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        FileConfig::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }
}

/// Picks a setting's layer: the value clap has if it came from a flag or the environment,
/// else the file's, else clap's (then its default).
fn pick<T>(matches: &ArgMatches, id: &str, clap_value: T, file: Option<T>) -> Set<T> {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => Set {
            value: clap_value,
            source: Source::Flag,
        },
        Some(ValueSource::EnvVariable) => Set {
            value: clap_value,
            source: Source::Env,
        },
        _ => match file {
            Some(value) => Set {
                value,
                source: Source::File,
            },
            None => Set {
                value: clap_value,
                source: Source::Default,
            },
        },
    }
}

impl ServeArgs {
    /// The settings in effect, given the matches of the `serve` subcommand (for where each
    /// value came from), the global `--log-format` and its matches, and the config file.
    pub fn settings(
        &self,
        matches: &ArgMatches,
        log_format: LogFormat,
        file: FileConfig,
    ) -> Settings {
        Settings {
            listen: pick(matches, "listen", self.listen, file.listen),
            http: pick(matches, "http", self.http.0, file.http),
            session_ttl: pick(matches, "session_ttl", self.session_ttl, file.session_ttl),
            max_connections: pick(
                matches,
                "max_connections",
                self.max_connections,
                file.max_connections,
            ),
            data_dir: pick(matches, "data_dir", self.data_dir.clone(), file.data_dir),
            in_memory: pick(matches, "in_memory", self.in_memory, file.in_memory),
            fsync: pick(matches, "fsync", self.fsync, file.fsync),
            snapshot_every: pick(
                matches,
                "snapshot_every",
                self.snapshot_every,
                file.snapshot_every,
            ),
            log_format: pick(matches, "log_format", log_format, file.log_format),
            auth_token_file: pick(
                matches,
                "auth_token_file",
                self.auth_token_file.clone(),
                file.auth_token_file.map(Some),
            ),
            admin_token_file: pick(
                matches,
                "admin_token_file",
                self.admin_token_file.clone(),
                file.admin_token_file.map(Some),
            ),
            insecure: pick(matches, "insecure", self.insecure, file.insecure),
            forget_idle: pick(matches, "forget_idle", self.forget_idle.0, file.forget_idle),
            tls_cert: pick(
                matches,
                "tls_cert",
                self.tls_cert.clone(),
                file.tls_cert.map(Some),
            ),
            tls_key: pick(
                matches,
                "tls_key",
                self.tls_key.clone(),
                file.tls_key.map(Some),
            ),
            handshake_timeout: pick(
                matches,
                "handshake_timeout",
                self.handshake_timeout,
                file.handshake_timeout,
            ),
            max_handshaking: pick(
                matches,
                "max_handshaking",
                self.max_handshaking,
                file.max_handshaking,
            ),
            max_per_address: pick(
                matches,
                "max_per_address",
                self.max_per_address,
                file.max_per_address,
            ),
        }
    }

    /// The config file named by `--config` (or `TURNSTILE_CONFIG`), read and checked; empty
    /// if none.
    pub fn file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(path) => FileConfig::load(path),
            None => Ok(FileConfig::default()),
        }
    }

    /// Whether to print the settings instead of serving.
    pub fn print_config(&self) -> bool {
        self.print_config
    }
}

impl Settings {
    /// The settings as a config file, each line saying where its value came from.
    pub fn to_toml(&self) -> String {
        fn quoted(s: &str) -> String {
            // A JSON string is a valid TOML basic string.
            serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
        }
        let mut out = String::new();
        let mut line = |key: &str, value: String, source: Source| {
            let _ = writeln!(out, "{key} = {value}  # {}", source.name());
        };
        line(
            "listen",
            quoted(&self.listen.value.to_string()),
            self.listen.source,
        );
        let http = self.http.value.map_or("off".into(), |a| a.to_string());
        line("http", quoted(&http), self.http.source);
        let ttl = humantime::format_duration(self.session_ttl.value).to_string();
        line("session_ttl", quoted(&ttl), self.session_ttl.source);
        line(
            "max_connections",
            self.max_connections.value.to_string(),
            self.max_connections.source,
        );
        let dir = self.data_dir.value.to_string_lossy();
        line("data_dir", quoted(&dir), self.data_dir.source);
        line(
            "in_memory",
            self.in_memory.value.to_string(),
            self.in_memory.source,
        );
        line("fsync", quoted(self.fsync.value.name()), self.fsync.source);
        line(
            "snapshot_every",
            self.snapshot_every.value.to_string(),
            self.snapshot_every.source,
        );
        line(
            "log_format",
            quoted(self.log_format.value.name()),
            self.log_format.source,
        );
        let mut unset = Vec::new();
        for (key, set) in [
            ("auth_token_file", &self.auth_token_file),
            ("admin_token_file", &self.admin_token_file),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            match &set.value {
                Some(path) => line(key, quoted(&path.to_string_lossy()), set.source),
                // TOML has no "none": leave the key out, and say so.
                None => unset.push(format!("# {key} is not set  # {}", set.source.name())),
            }
        }
        line(
            "insecure",
            self.insecure.value.to_string(),
            self.insecure.source,
        );
        let forget = self.forget_idle.value.map_or("never".into(), |d| {
            humantime::format_duration(d).to_string()
        });
        line("forget_idle", quoted(&forget), self.forget_idle.source);
        let handshake = humantime::format_duration(self.handshake_timeout.value).to_string();
        line(
            "handshake_timeout",
            quoted(&handshake),
            self.handshake_timeout.source,
        );
        for (key, set) in [
            ("max_handshaking", &self.max_handshaking),
            ("max_per_address", &self.max_per_address),
        ] {
            line(key, set.value.to_string(), set.source);
        }
        for l in unset {
            let _ = writeln!(out, "{l}");
        }
        out
    }

    /// The TLS identity, if both the certificate and the key are set (by any layer); one
    /// without the other is an error.
    fn tls(&self) -> anyhow::Result<Option<turnstile_server::TlsIdentity>> {
        match (&self.tls_cert.value, &self.tls_key.value) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => turnstile_server::TlsIdentity::from_pem_files(cert, key)
                .map(Some)
                .map_err(anyhow::Error::new),
            (Some(_), None) => anyhow::bail!(
                "tls_cert ({}) is set without tls_key: give both",
                self.tls_cert.source.name()
            ),
            (None, Some(_)) => anyhow::bail!(
                "tls_key ({}) is set without tls_cert: give both",
                self.tls_key.source.name()
            ),
        }
    }

    /// The server's configuration; fails if a value is out of range.
    pub fn server_config(&self) -> anyhow::Result<turnstile_server::Config> {
        let storage = if self.in_memory.value {
            turnstile_server::Storage::InMemory
        } else {
            turnstile_server::Storage::Dir {
                path: self.data_dir.value.clone(),
                fsync: match self.fsync.value {
                    Fsync::Always => turnstile_server::FsyncMode::Always,
                    Fsync::Batch => turnstile_server::FsyncMode::Batch,
                },
                snapshot_bytes: self.snapshot_every.value.max(4096),
            }
        };
        let token = |set: &Set<Option<PathBuf>>, key: &str| -> anyhow::Result<Option<String>> {
            let Some(path) = &set.value else {
                return Ok(None);
            };
            turnstile_client::read_token_file(path)
                .map(Some)
                .with_context(|| format!("{key} ({})", set.source.name()))
        };
        let config = turnstile_server::Config {
            session_ttl: self.session_ttl.value,
            max_connections: self.max_connections.value.max(1),
            storage,
            auth_token: token(&self.auth_token_file, "auth_token_file")?,
            admin_token: token(&self.admin_token_file, "admin_token_file")?,
            forget_idle: self.forget_idle.value,
            handshake_timeout: self.handshake_timeout.value,
            max_handshaking: self.max_handshaking.value,
            max_per_address: self.max_per_address.value,
            tls: self.tls()?,
            ..turnstile_server::Config::default()
        };
        if config.auth_token.is_none() && !self.insecure.value {
            let exposed = [Some(self.listen.value), self.http.value]
                .into_iter()
                .flatten()
                .find(|a| !a.ip().is_loopback());
            if let Some(addr) = exposed {
                anyhow::bail!(
                    "refusing to listen on {addr} without a token: anyone who can reach it \
                     could close any semaphore; give --auth-token-file FILE, or --insecure to \
                     accept that"
                );
            }
        }
        let ttl = config.session_ttl;
        if ttl < config.min_session_ttl || ttl > config.max_session_ttl {
            anyhow::bail!(
                "session_ttl {} ({}) is outside {}..={}",
                humantime::format_duration(ttl),
                self.session_ttl.source.name(),
                humantime::format_duration(config.min_session_ttl),
                humantime::format_duration(config.max_session_ttl)
            );
        }
        Ok(config)
    }
}

/// Runs the coordinator with these settings until SIGINT or SIGTERM.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let config = settings.server_config()?;
    if config.auth_token.is_none() && settings.insecure.value {
        tracing::warn!("--insecure: clients are not asked for a token");
    }
    let storage = match &config.storage {
        turnstile_server::Storage::InMemory => "in memory".to_owned(),
        turnstile_server::Storage::Dir { path, fsync, .. } => {
            let fsync = format!("{fsync:?}").to_lowercase();
            format!("in {} (fsync {fsync})", path.display())
        }
    };
    let ttl = config.session_ttl;
    let tls = config.tls.is_some();
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
    let listen = settings.listen.value;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let http = match settings.http.value {
        None => None,
        Some(at) => match tokio::net::TcpListener::bind(at).await {
            Ok(l) => Some(l),
            // The default port may be taken (another coordinator on this host): that must not
            // keep the coordinator from starting. An address someone asked for must.
            Err(e) if settings.http.source == Source::Default => {
                tracing::warn!(
                    addr = %at,
                    error = %e,
                    "cannot serve HTTP on the default address; going on without it \
                     (set --http ADDR, or --http off)"
                );
                None
            }
            Err(e) => return Err(e).with_context(|| format!("cannot serve HTTP on {at}")),
        },
    };
    // One line on stdout per port, for scripts and tests that listen on port 0.
    let _ = outln!("listening on {addr}");
    let http_addr = match &http {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let scheme = if tls { "https" } else { "http" };
    if let Some(h) = http_addr {
        let _ = outln!("http on {scheme}://{h}/");
    }
    // Clients do not look for a coordinator: without TURNSTILE_URL they use the per-user
    // directory. The line to copy, with the address actually bound.
    let _ = outln!("clients: export TURNSTILE_URL={}", client_url(addr));
    tracing::info!(
        %addr,
        tls,
        http = %http_addr.map_or("off".to_owned(), |h| format!("{scheme}://{h}/")),
        session_ttl = %humantime::format_duration(ttl),
        "turnstile coordinator listening; state {storage}"
    );
    server
        .run_with_http(listener, http, shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The URL clients use to reach a coordinator bound to `addr`: an unspecified address
/// (0.0.0.0, ::) is reached on loopback from this host.
fn client_url(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("tcp://{addr}")
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// The settings for a command line and a config file, as `main` computes them.
    fn resolve(args: &[&str], file: &str) -> Settings {
        let matches = crate::Cli::command()
            .try_get_matches_from(args)
            .expect("the arguments parse");
        let cli = crate::Cli::from_arg_matches(&matches).expect("the arguments parse");
        let crate::Command::Serve(serve) = cli.command else {
            panic!("a serve command line");
        };
        let sub = matches.subcommand_matches("serve").expect("serve");
        let file = FileConfig::parse(file).expect("the file parses");
        serve.settings(sub, cli.log_format, file)
    }

    // The environment layer sits between these two and is tested with real processes
    // (tests/cli.rs), so that no test here has to change this process's environment.
    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let file = r#"
            listen = "127.0.0.1:9000"
            session_ttl = "30s"
            in_memory = true
            snapshot_every = 1048576
            log_format = "json"
        "#;
        let s = resolve(
            &[
                "turnstile",
                "serve",
                "--listen",
                "127.0.0.1:9100",
                "--log-format",
                "text",
            ],
            file,
        );
        assert_eq!(s.listen.value, "127.0.0.1:9100".parse().expect("addr"));
        assert_eq!(s.listen.source, Source::Flag);
        assert_eq!(s.session_ttl.value, Duration::from_secs(30));
        assert_eq!(s.session_ttl.source, Source::File);
        assert_eq!(
            (s.in_memory.value, s.in_memory.source),
            (true, Source::File)
        );
        assert_eq!(s.snapshot_every.value, 1 << 20);
        assert_eq!(s.log_format.value, LogFormat::Text);
        assert_eq!(s.log_format.source, Source::Flag);
        assert_eq!(s.http.value, Some(DEFAULT_HTTP.parse().expect("addr")));
        assert_eq!(s.http.source, Source::Default);
        assert_eq!(s.fsync.value, Fsync::Batch);
        assert_eq!(s.max_connections.value, 16_384);
        assert_eq!(s.forget_idle.value, Some(Duration::from_secs(600)));
        let s = resolve(&["turnstile", "serve"], "forget_idle = \"never\"");
        assert_eq!(
            (s.forget_idle.value, s.forget_idle.source),
            (None, Source::File)
        );
        let s = resolve(
            &["turnstile", "serve", "--forget-idle", "90s"],
            "forget_idle = \"never\"",
        );
        assert_eq!(s.forget_idle.value, Some(Duration::from_secs(90)));
        assert!(FileConfig::parse("forget_idle = \"0s\"").is_err());

        let s = resolve(
            &["turnstile", "serve", "--http", "off"],
            "http = \"127.0.0.1:1\"",
        );
        assert_eq!((s.http.value, s.http.source), (None, Source::Flag));
        let s = resolve(
            &["turnstile", "serve", "--insecure"],
            "auth_token_file = \"/etc/t\"\ninsecure = false",
        );
        assert_eq!(
            (s.auth_token_file.value, s.auth_token_file.source),
            (Some(PathBuf::from("/etc/t")), Source::File)
        );
        assert_eq!((s.insecure.value, s.insecure.source), (true, Source::Flag));
        assert_eq!(s.admin_token_file.value, None);
        let s = resolve(&["turnstile", "serve"], "http = \"off\"");
        assert_eq!((s.http.value, s.http.source), (None, Source::File));
        let s = resolve(
            &["turnstile", "serve", "--max-per-address", "3"],
            "max_per_address = 9\nmax_handshaking = 7\ntls_key = \"/k\"",
        );
        assert_eq!(
            (s.max_per_address.value, s.max_per_address.source),
            (3, Source::Flag)
        );
        assert_eq!(
            (s.max_handshaking.value, s.max_handshaking.source),
            (7, Source::File)
        );
        assert_eq!(s.tls_key.value, Some(PathBuf::from("/k")));
        assert_eq!(s.handshake_timeout.value, Duration::from_secs(5));
        let config = s.server_config();
        assert!(config.is_err_and(|e| e
            .to_string()
            .contains("tls_key (config file) is set without tls_cert")),);
        let s = resolve(&["turnstile", "serve", "--in-memory"], "in_memory = false");
        assert_eq!(
            (s.in_memory.value, s.in_memory.source),
            (true, Source::Flag)
        );
    }

    #[test]
    fn printed_settings_read_back_as_the_same_file() {
        let s = resolve(
            &["turnstile", "serve", "--data-dir", "/var/lib/a \"b\""],
            "fsync = \"always\"\nhttp = \"off\"",
        );
        let printed = s.to_toml();
        assert!(
            printed.contains("fsync = \"always\"  # config file"),
            "{printed}"
        );
        assert!(
            printed.contains("listen = \"127.0.0.1:7420\"  # default"),
            "{printed}"
        );
        let back = FileConfig::parse(&printed).expect("the printed settings parse");
        assert_eq!(back.data_dir, Some(PathBuf::from("/var/lib/a \"b\"")));
        assert_eq!(back.fsync, Some(Fsync::Always));
        assert_eq!(back.http, Some(None));
        assert_eq!(back.session_ttl, Some(Duration::from_secs(10)));
        assert_eq!(back.handshake_timeout, Some(Duration::from_secs(5)));
        assert_eq!(back.max_handshaking, Some(256));
        assert_eq!(back.max_per_address, Some(1024));
        assert_eq!(back.tls_cert, None);
    }

    #[test]
    fn file_errors_are_one_line_naming_the_key() {
        let cases = [
            ("lisen = \"x\"", "unknown key `lisen`"),
            ("listen = 7420", "key `listen`: expected a string"),
            (
                "listen = \"localhost\"",
                "key `listen`: \"localhost\" is not an address",
            ),
            ("http = \"on\"", "key `http`:"),
            ("session_ttl = \"10 parsecs\"", "key `session_ttl`:"),
            (
                "max_connections = -1",
                "key `max_connections`: expected a positive integer",
            ),
            ("max_connections = \"9\"", "key `max_connections`"),
            (
                "in_memory = \"yes\"",
                "key `in_memory`: expected true or false",
            ),
            ("fsync = \"sometimes\"", "key `fsync`:"),
            ("snapshot_every = \"64 parsecs\"", "key `snapshot_every`:"),
            ("snapshot_every = -5", "key `snapshot_every`"),
            ("log_format = \"xml\"", "key `log_format`:"),
            ("insecure = 1", "key `insecure`: expected true or false"),
            (
                "handshake_timeout = \"0s\"",
                "key `handshake_timeout`: must be positive",
            ),
            (
                "handshake_timeout = \"2h\"",
                "key `handshake_timeout`: must be at most 5m",
            ),
            (
                "max_per_address = 0",
                "key `max_per_address`: expected a positive integer",
            ),
            ("max_handshaking = \"9\"", "key `max_handshaking`"),
            ("tls_cert = 1", "key `tls_cert`: expected a string"),
            (
                "auth_token_file = 5",
                "key `auth_token_file`: expected a string",
            ),
            (
                "listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"",
                "duplicate key (`listen`)",
            ),
            ("[server]\nlisten = \"127.0.0.1:1\"", "unknown key `server`"),
            ("listen = ", "line 1"),
        ];
        for (text, expected) in cases {
            let e = FileConfig::parse(text).expect_err(text);
            assert!(e.contains(expected), "{text:?}: {e:?} lacks {expected:?}");
            assert!(!e.contains('\n'), "{text:?}: {e:?} is one line");
        }
        assert_eq!(FileConfig::parse(""), Ok(FileConfig::default()));
    }
}
