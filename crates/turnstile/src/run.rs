//! `turnstile run`: hold a slot while a command runs.

use std::io::{IsTerminal, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use turnstile_client::{Client, Error, ErrorCode, Options, Permit, StatusDoc};

use crate::guard::Guarded;
use crate::reach::{self, ConnectArg};
use crate::{parse_duration, parse_slots, UrlArg, EXIT_LOST, EXIT_TIMEOUT};

/// What to do when the lease is lost while the command runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLost {
    /// Stop the command: SIGTERM, then SIGKILL after the grace period.
    Kill,
    /// Let the command finish; only print a warning.
    Ignore,
}

/// Arguments of `turnstile run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The semaphore.
    name: String,
    /// Capacity: create the semaphore with this many slots if it does not exist (it must
    /// match if it does). Without it, the semaphore must already exist.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_slots)]
    limit: Option<u32>,
    /// Slots to hold.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = parse_slots)]
    weight: u32,
    /// Give up waiting after this long, connecting included (exit 75 if the semaphore is
    /// still busy; 69 if the coordinator cannot be reached). `--timeout 0` is a try-lock:
    /// take a free slot or exit 75 at once, never queue (like `flock -n`).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    connect: ConnectArg,
    /// What to do if the lease is lost while the command runs.
    #[arg(long, value_enum, default_value = "kill")]
    on_lost: OnLost,
    /// After SIGTERM, how long the command has before SIGKILL (lease lost).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    kill_grace: Duration,
    #[command(flatten)]
    url: UrlArg,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let url = args.url.get();
    let deadline = reach::deadline(args.timeout);
    // The guard first, idle: its pid goes into the lease (see `client_options`).
    let guard = Guarded::spawn(&args.command)?;
    let client = reach::connect(
        &url,
        args.connect.options(client_options(&guard)),
        args.connect.connect_timeout,
        deadline,
    )
    .await?;
    let result = run_with(&args, &url, &client, guard, deadline).await;
    // Every way out ends the session (a second shutdown does nothing): a session left to
    // expire would be logged and shown as "expired" although nothing went wrong with it.
    let _ = client.shutdown().await;
    result
}

/// `run` once connected; the caller shuts the client down, whatever this returns.
async fn run_with(
    args: &RunArgs,
    url: &str,
    client: &Client,
    mut guard: Guarded,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<ExitCode> {
    let sem = match args.limit {
        Some(limit) => {
            let ensure = client.semaphore(&args.name, limit);
            reach::by(deadline, client, url, ensure).await?
        }
        None => client.existing_semaphore(&args.name),
    };
    // Signals are caught from here on, so that a signal while waiting withdraws the acquire
    // cleanly (the session is closed below) instead of killing us with the lease queued.
    let mut sigs = Signals::new()?;
    let acquire = async {
        match deadline {
            Some(d) => sem.acquire_many_timeout(args.weight, reach::left(d)).await,
            None => sem.acquire_many(args.weight).await,
        }
    };
    let mut line = StatusLine::new(std::io::stderr().is_terminal());
    let progress = show_progress(client, &args.name, &mut line);
    let permit = interruptible(acquire, progress, &mut sigs).await;
    line.clear();
    let permit = match permit {
        Interrupted::Done(r) => r,
        Interrupted::By(code) => {
            let _ = client.shutdown().await;
            return Ok(code);
        }
    };
    let permit = match permit {
        Ok(p) => p,
        Err(Error::TimedOut) if args.timeout.is_some_and(|t| t.is_zero()) => {
            errln!(
                "turnstile: {:?} is busy: {} slot(s) not free (--timeout 0 does not wait)",
                args.name,
                args.weight
            );
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        Err(Error::TimedOut) => {
            let waited = args.timeout.map(humantime::format_duration);
            errln!(
                "turnstile: timed out after {} waiting for {} slot(s) of {:?}",
                waited.map(|w| w.to_string()).unwrap_or_default(),
                args.weight,
                args.name
            );
            let _ = client.shutdown().await;
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        Err(e) if e.code() == Some(ErrorCode::NoSuchSemaphore) => {
            anyhow::bail!(
                "semaphore {:?} does not exist; pass --limit N to create it",
                args.name
            )
        }
        Err(e) if e.is_unavailable() => {
            return Err(anyhow::Error::new(e).context(format!(
                "gave up waiting for {} slot(s) of {:?}",
                args.weight, args.name
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let envs = [
        ("TURNSTILE_SEMAPHORE", args.name.clone()),
        ("TURNSTILE_LEASE_ID", permit.lease_id().to_string()),
        (
            "TURNSTILE_FENCING_TOKEN",
            permit.fencing_token().to_string(),
        ),
        ("TURNSTILE_URL", url.to_owned()),
    ];
    if let Err(code) = guard.start(&envs).await {
        drop(permit);
        let _ = client.shutdown().await;
        return Ok(ExitCode::from(code));
    }
    let what = format!("the lease on {:?}", args.name);
    let outcome = supervise(
        &mut guard,
        &mut sigs,
        &permit,
        args.on_lost,
        args.kill_grace,
        &what,
    )
    .await?;
    let status = match outcome {
        Supervised::Exited(status) => status,
        Supervised::Lost => {
            drop(permit);
            let _ = client.shutdown().await;
            return Ok(ExitCode::from(EXIT_LOST));
        }
    };
    // Release before exiting so the next waiter starts at once, not after a TTL.
    let what = format!("the lease on {:?}", args.name);
    release(permit, &mut sigs, &what).await;
    let _ = client.shutdown().await;
    Ok(ExitCode::from(exit_code(status)))
}

/// How long the release may take once a stop signal was passed on to the command: whoever
/// sent it wants us gone, and the lease expires on its own anyway.
const RELEASE_ON_STOP: Duration = Duration::from_millis(500);

/// Releases the lease once the command has ended. The library retries an undeliverable
/// release only until the lease has surely expired on the coordinator; a stop signal cuts
/// that short. Either way the exit code stays the command's, and one line says what became
/// of the lease.
async fn release(permit: Permit, sigs: &mut Signals, what: &str) {
    let released = if sigs.stop_requested() {
        tokio::time::timeout(RELEASE_ON_STOP, permit.release())
            .await
            .ok()
    } else {
        tokio::select! {
            r = permit.release() => Some(r),
            _ = sigs.recv() => None,
        }
    };
    match released {
        Some(Ok(())) => {}
        Some(Err(e)) if e.is_unavailable() => {
            errln!("turnstile: the release of {what} was not delivered: {e}; the lease expired on its own");
        }
        Some(Err(e)) => errln!("turnstile: warning: the release of {what} failed: {e}"),
        None => errln!(
            "turnstile: the release of {what} was not delivered before turnstile was stopped; the lease expires on its own within the session TTL"
        ),
    }
}

/// How a wait that a signal may cut short ended.
pub(crate) enum Interrupted<T> {
    /// The wait ended on its own, with this.
    Done(T),
    /// A signal came first: exit with this code (128 + the signal), once the client is shut
    /// down, which withdraws whatever was queued.
    By(ExitCode),
}

/// Waits for `wait` while `progress` keeps a status line up to date, unless a signal comes
/// first.
pub(crate) async fn interruptible<T>(
    wait: impl std::future::Future<Output = T>,
    progress: impl std::future::Future<Output = std::convert::Infallible>,
    sigs: &mut Signals,
) -> Interrupted<T> {
    tokio::select! {
        r = wait => Interrupted::Done(r),
        sig = sigs.recv() => Interrupted::By(ExitCode::from(128 + sig as u8)),
        never = progress => match never {},
    }
}

/// How often the waiting line is refreshed; also how long an acquire waits before it shows.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The one line `turnstile run` shows on a terminal while it waits for a slot. It is drawn
/// with a carriage return over itself and erased once the wait ends, so that nothing of it
/// stays on the screen; when stderr is not a terminal it draws nothing at all.
pub(crate) struct StatusLine {
    pub(crate) enabled: bool,
    shown: bool,
}

impl StatusLine {
    pub(crate) fn new(enabled: bool) -> StatusLine {
        StatusLine {
            enabled,
            shown: false,
        }
    }

    pub(crate) fn show(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        // \r and "erase line" rather than a newline: the next draw replaces this one.
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
        self.shown = true;
    }

    /// Erases the line, if one is shown.
    pub(crate) fn clear(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.shown = false;
        }
    }
}

/// Polls the status of `name` while the acquire waits, and shows where this session is in
/// the queue. Never returns: the caller drops it when the wait ends. Does nothing when the
/// line is disabled (stderr is not a terminal).
pub(crate) async fn show_progress(
    client: &Client,
    name: &str,
    line: &mut StatusLine,
) -> std::convert::Infallible {
    if !line.enabled {
        return std::future::pending().await;
    }
    let started = Instant::now();
    let session = format!("{:016x}", client.session_id());
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        // A status that cannot be read leaves the position out, not the line.
        let doc = client.status(Some(name)).await.ok();
        line.show(&waiting_text(
            name,
            doc.as_ref(),
            &session,
            started.elapsed(),
        ));
    }
}

/// "waiting for db: position 3 of 7, 12s": the position of `session`'s first queued acquire
/// on `name`, if the document lists it.
pub(crate) fn waiting_text(
    name: &str,
    doc: Option<&StatusDoc>,
    session: &str,
    waited: Duration,
) -> String {
    let waited = humantime::format_duration(Duration::from_secs(waited.as_secs()));
    let position = doc
        .and_then(|d| d.semaphores.iter().find(|s| s.name == name))
        .and_then(|s| {
            let at = s.waiters.iter().position(|w| w.session == session)?;
            let of = (s.waiters.len() as u64).max(s.queued);
            Some(format!("position {} of {of}, ", at + 1))
        })
        .unwrap_or_default();
    format!("turnstile: waiting for {name}: {position}{waited}")
}

/// The client's options for a wrapper whose command runs under `guard`: on the file backend,
/// the lease counts as held while the guard lives, so that the immediate reclaim of a dead
/// holder's lease waits until the guard has killed the command's whole tree.
pub(crate) fn client_options(guard: &Guarded) -> Options {
    Options {
        also_alive_pids: vec![guard.pid()],
        ..Options::default()
    }
}

/// How a supervised command ended.
pub(crate) enum Supervised {
    /// It exited (or was killed by a signal) on its own.
    Exited(ExitStatus),
    /// The lease was lost and, per `--on-lost kill`, the command was stopped.
    Lost,
}

/// Waits for the command while forwarding signals to it and watching the lease: if the lease
/// is lost, either stops the command (`kill`: SIGTERM, SIGKILL after `grace`) or only warns.
/// `what` names the lease in messages.
pub(crate) async fn supervise(
    child: &mut Guarded,
    sigs: &mut Signals,
    permit: &Permit,
    on_lost: OnLost,
    grace: Duration,
    what: &str,
) -> anyhow::Result<Supervised> {
    loop {
        tokio::select! {
            status = child.wait() => {
                return Ok(Supervised::Exited(status.context("waiting for the command")?));
            }
            sig = sigs.recv() => child.signal(sig),
            reason = permit.lost() => match on_lost {
                OnLost::Ignore => {
                    errln!("turnstile: warning: {what} was lost ({reason}); the command keeps running");
                    let status = wait_forwarding(child, sigs).await?;
                    return Ok(Supervised::Exited(status));
                }
                OnLost::Kill => {
                    errln!(
                        "turnstile: {what} was lost ({reason}); stopping the command (SIGTERM, SIGKILL after {})",
                        humantime::format_duration(grace)
                    );
                    stop(child, grace).await?;
                    return Ok(Supervised::Lost);
                }
            },
        }
    }
}

/// Describes how a command ended, for messages and failure records.
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        },
        (None, None) => "ended for an unknown reason".to_owned(),
    }
}

/// The shell convention: the exit code, or 128 plus the signal that killed the process.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    }
}

async fn wait_forwarding(child: &mut Guarded, sigs: &mut Signals) -> anyhow::Result<ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return status.context("waiting for the command"),
            sig = sigs.recv() => child.signal(sig),
        }
    }
}

/// SIGTERM, then SIGKILL (to the command's whole tree) after `grace`.
async fn stop(child: &mut Guarded, grace: Duration) -> anyhow::Result<ExitStatus> {
    child.signal(Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.context("waiting for the command"),
        Err(_) => {
            child.kill();
            child.wait().await.context("waiting for the command")
        }
    }
}

/// The signals `turnstile run` passes on to its command, and that `turnstile nanny` acts on.
pub(crate) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    /// Whether a stop signal (SIGINT, SIGTERM, SIGQUIT) was received.
    stop: bool,
}

impl Signals {
    pub(crate) fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            stop: false,
        })
    }

    pub(crate) async fn recv(&mut self) -> Signal {
        let sig = tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.hup.recv() => Signal::SIGHUP,
            _ = self.quit.recv() => Signal::SIGQUIT,
        };
        self.stop |= sig != Signal::SIGHUP;
        sig
    }

    /// Whether a stop signal has been received (and, while a command ran, passed on to it):
    /// what is left to do must then be quick.
    pub(crate) fn stop_requested(&self) -> bool {
        self.stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_client::{SemaphoreStatus, WaiterStatus};

    #[test]
    fn the_waiting_line_says_where_we_are() {
        let waiter = |session: &str| WaiterStatus {
            session: session.into(),
            ..WaiterStatus::default()
        };
        let doc = StatusDoc {
            semaphores: vec![SemaphoreStatus {
                name: "db".into(),
                queued: 3,
                waiters: vec![waiter("a"), waiter("me"), waiter("b")],
                ..SemaphoreStatus::default()
            }],
            ..StatusDoc::default()
        };
        let waited = Duration::from_millis(12_700);
        assert_eq!(
            waiting_text("db", Some(&doc), "me", waited),
            "turnstile: waiting for db: position 2 of 3, 12s"
        );
        // Not (or no longer) listed, or no status at all: the time only.
        assert_eq!(
            waiting_text("db", Some(&doc), "other", waited),
            "turnstile: waiting for db: 12s"
        );
        assert_eq!(
            waiting_text("db", None, "me", Duration::from_secs(125)),
            "turnstile: waiting for db: 2m 5s"
        );
    }
}
