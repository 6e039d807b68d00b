//! The config file of `turnstile serve` and the parsers of its values: pure functions of text.
//!
//! Self-contained on purpose (std, `toml`, `humantime` and clap's derives, nothing from this
//! crate): the fuzz harness (`fuzz/`, target `config`) compiles this very file, so what it
//! fuzzes is what `serve --config` runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `--log-format` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event, its fields at the top level.
    Json,
}

impl LogFormat {
    /// Parses a config file's value.
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format (text or json)")),
        }
    }

    /// The value's name.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
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
    if s.trim_start().starts_with('-') {
        return Err("a duration cannot be negative (expected e.g. 0, 500ms, 30s, 2m)".into());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 2m)"))
}

/// The longest `--handshake-timeout`: a handshake takes milliseconds; longer only lets idle
/// sockets stay.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);

/// Parses `--handshake-timeout`: a duration above zero, at most [`MAX_HANDSHAKE_TIMEOUT`].
pub fn parse_handshake_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be positive".into()),
        d if d > MAX_HANDSHAKE_TIMEOUT => Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_HANDSHAKE_TIMEOUT)
        )),
        d => Ok(d),
    }
}

/// Parses a count that must be at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a positive integer")),
    }
}

/// `--forget-idle`: how long an idle semaphore is kept, or never forgotten (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForgetIdle(pub Option<Duration>);

/// Parses `--forget-idle`: a positive duration, or `never`.
pub fn parse_forget(s: &str) -> Result<ForgetIdle, String> {
    if s == "never" {
        return Ok(ForgetIdle(None));
    }
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be positive, or never".into()),
        d => Ok(ForgetIdle(Some(d))),
    }
}

/// `--fsync` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Sync each request's records on their own.
    Always,
    /// Group commit.
    Batch,
}

impl Fsync {
    /// Parses a config file's value.
    pub fn parse(s: &str) -> Result<Fsync, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "batch" => Ok(Fsync::Batch),
            _ => Err(format!("{s:?} is not a sync mode (always or batch)")),
        }
    }

    /// The value's name.
    pub fn name(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Batch => "batch",
        }
    }
}

/// The HTTP port's address, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpAddr(pub Option<SocketAddr>);

/// Parses `--http`: an address, or `off`.
pub fn parse_http(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not an address (e.g. 127.0.0.1:7421) or off"))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address (e.g. 127.0.0.1:7420)"))
}

/// The config file, parsed and checked: each key that is present, with its value.
#[derive(Debug, Default, PartialEq)]
pub struct FileConfig {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) http: Option<Option<SocketAddr>>,
    pub(crate) session_ttl: Option<Duration>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) in_memory: Option<bool>,
    pub(crate) fsync: Option<Fsync>,
    pub(crate) snapshot_every: Option<u64>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) auth_token_file: Option<PathBuf>,
    pub(crate) admin_token_file: Option<PathBuf>,
    pub(crate) insecure: Option<bool>,
    pub(crate) forget_idle: Option<Option<Duration>>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) handshake_timeout: Option<Duration>,
    pub(crate) max_handshaking: Option<usize>,
    pub(crate) max_per_address: Option<usize>,
}

/// Every key of the config file.
const KEYS: [&str; 18] = [
    "listen",
    "http",
    "session_ttl",
    "max_connections",
    "data_dir",
    "in_memory",
    "fsync",
    "snapshot_every",
    "log_format",
    "auth_token_file",
    "admin_token_file",
    "insecure",
    "forget_idle",
    "tls_cert",
    "tls_key",
    "handshake_timeout",
    "max_handshaking",
    "max_per_address",
];

impl FileConfig {
    /// Parses a config file's text. Errors are one line and name the key at fault.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace(char::is_control, " ");
            let Some(span) = e.span() else {
                return message;
            };
            let start = span.start.min(text.len());
            let line = text[..start].lines().count().max(1);
            // The text at fault, when it is short (a key, a value): "duplicate key (`listen`)".
            match text.get(span) {
                // Not when it holds a control character (a `\r` too would break the line).
                Some(at)
                    if !at.trim().is_empty()
                        && at.len() <= 40
                        && !at.contains(char::is_control) =>
                {
                    format!("line {line}: {message} (`{}`)", at.trim())
                }
                _ => format!("line {line}: {message}"),
            }
        })?;
        let mut config = FileConfig::default();
        for (key, value) in &table {
            // A quoted TOML key may hold any character, a newline too: escaped, so that the
            // error stays one line (found while writing the fuzz target `config`).
            let key = key.escape_debug().to_string();
            let bad = |expected: &str| {
                format!(
                    "key `{key}`: expected {expected}, found {}",
                    value.type_str()
                )
            };
            let text = || value.as_str().ok_or_else(|| bad("a string"));
            let with_key = |e: String| format!("key `{key}`: {e}");
            let positive = || {
                value
                    .as_integer()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("a positive integer"))
            };
            match key.as_str() {
                "listen" => config.listen = Some(parse_addr(text()?).map_err(with_key)?),
                "http" => config.http = Some(parse_http(text()?).map_err(with_key)?.0),
                "session_ttl" => {
                    config.session_ttl = Some(parse_duration(text()?).map_err(with_key)?)
                }
                "max_connections" => config.max_connections = Some(positive()?),
                "max_handshaking" => config.max_handshaking = Some(positive()?),
                "max_per_address" => config.max_per_address = Some(positive()?),
                "handshake_timeout" => {
                    config.handshake_timeout =
                        Some(parse_handshake_timeout(text()?).map_err(with_key)?)
                }
                "tls_cert" => config.tls_cert = Some(PathBuf::from(text()?)),
                "tls_key" => config.tls_key = Some(PathBuf::from(text()?)),
                "data_dir" => config.data_dir = Some(PathBuf::from(text()?)),
                "in_memory" => {
                    config.in_memory = Some(value.as_bool().ok_or_else(|| bad("true or false"))?)
                }
                "fsync" => config.fsync = Some(Fsync::parse(text()?).map_err(with_key)?),
                "snapshot_every" => {
                    let bytes = match value {
                        toml::Value::Integer(n) => {
                            u64::try_from(*n).map_err(|_| bad("a size such as \"64MiB\""))?
                        }
                        toml::Value::String(s) => parse_size(s).map_err(with_key)?,
                        _ => return Err(bad("a size such as \"64MiB\"")),
                    };
                    config.snapshot_every = Some(bytes);
                }
                "log_format" => {
                    config.log_format = Some(LogFormat::parse(text()?).map_err(with_key)?)
                }
                "auth_token_file" => config.auth_token_file = Some(PathBuf::from(text()?)),
                "admin_token_file" => config.admin_token_file = Some(PathBuf::from(text()?)),
                "insecure" => {
                    config.insecure = Some(value.as_bool().ok_or_else(|| bad("true or false"))?)
                }
                "forget_idle" => {
                    config.forget_idle = Some(parse_forget(text()?).map_err(with_key)?.0)
                }
                _ => {
                    return Err(format!(
                        "unknown key `{key}` (known keys: {})",
                        KEYS.join(", ")
                    ))
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::FileConfig;

    #[test]
    fn a_key_with_a_newline_gives_a_one_line_error() {
        for text in ["\"a\\nb\" = 1", "\"x\\r\" = \"10s\""] {
            let e = FileConfig::parse(text).expect_err("an unknown key");
            assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
            assert!(e.starts_with("unknown key `"), "{e}");
        }
        let e = FileConfig::parse("\"a\\nb\" = 1").expect_err("an unknown key");
        assert!(e.contains("`a\\nb`"), "the key is shown escaped: {e}");
    }

    #[test]
    fn a_control_character_in_the_quoted_text_keeps_the_error_one_line() {
        // The fuzz target `config`'s input: the parser's error quotes text with `\r` in it.
        let text = "\"\r\r\r\u{1}\0\0\0\0\0\0\u{1}\r\r\r\u{1d}\r2\r\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\r\r\r\r\r\r\r\r\r\r\r\r\" = l2n";
        let e = FileConfig::parse(text).expect_err("not TOML");
        assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
        assert!(e.starts_with("line 1: "), "{e}");
    }
}
