//! `turnstile once` (run a job once and only once) and `turnstile wait` (wait for a group).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use turnstile_client::{Client, Error, GroupSummary, JobCompletion, JobStart, Options};

use crate::guard::Guarded;
use crate::reach::{self, ConnectArg};
use crate::run::{
    client_options, describe, exit_code, interruptible, supervise, Interrupted, OnLost, Signals,
    StatusLine, Supervised, PROGRESS_EVERY,
};
use crate::{parse_duration, UrlArg, EXIT_LOST, EXIT_TIMEOUT, EXIT_UNAVAILABLE};

/// Arguments of `turnstile once`.
#[derive(clap::Args, Debug)]
pub struct OnceArgs {
    /// The job: its completion is recorded under this name.
    job: String,
    /// Put the job in this group (for `turnstile wait` and `turnstile status`).
    #[arg(long)]
    group: Option<String>,
    /// If another runner is running the job, wait for it: skip if it succeeds, take over if
    /// it fails or dies. Without it, skip at once.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up waiting after this long, connecting included (exit 75 if the job
    /// still runs elsewhere; 69 if the coordinator cannot be reached).
    #[arg(long, requires = "wait", allow_hyphen_values = true, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    connect: ConnectArg,
    /// Forget the job's completion (and failed attempts) instead of running it, so that its
    /// next `once` runs it again.
    #[arg(long, conflicts_with_all = ["group", "wait", "timeout", "command"])]
    reset: bool,
    /// What to do if the job's lease is lost while the command runs.
    #[arg(long, value_enum, default_value = "kill")]
    on_lost: OnLost,
    /// After SIGTERM, how long the command has before SIGKILL (lease lost).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    kill_grace: Duration,
    #[command(flatten)]
    url: UrlArg,
    /// The command and its arguments.
    #[arg(last = true, num_args = 1.., required_unless_present = "reset")]
    command: Vec<String>,
}

/// Runs `turnstile once`. Exit codes: 0 when the job ran and succeeded or was skipped (done
/// or running elsewhere), the command's own code when it failed, 75 when `--timeout` passed,
/// 76 when the job's lease was lost (its completion is then not recorded), 69 when the
/// coordinator could not be reached (also when the job succeeded but its completion could
/// not be recorded: it may run again).
pub async fn once(args: OnceArgs) -> anyhow::Result<ExitCode> {
    let url = args.url.get();
    let deadline = reach::deadline(args.timeout);
    if args.reset {
        let client = reach::connect(
            &url,
            args.connect.options(Options::default()),
            args.connect.connect_timeout,
            deadline,
        )
        .await?;
        let was = client.reset_job(&args.job).await;
        let _ = client.shutdown().await;
        if was? {
            errln!("turnstile: forgot the completion of job {:?}", args.job);
        } else {
            errln!("turnstile: job {:?} had no completion to forget", args.job);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The guard first, idle: its pid goes into the lease (see `client_options`).
    let mut guard = Guarded::spawn(&args.command)?;
    let client = reach::connect(
        &url,
        args.connect.options(client_options(&guard)),
        args.connect.connect_timeout,
        deadline,
    )
    .await?;
    let mut sigs = Signals::new()?;
    let group = args.group.as_deref();
    let begin = async {
        match (args.wait, args.timeout) {
            (false, _) => client.try_begin_job(&args.job, group).await,
            (true, None) => client.begin_job(&args.job, group).await,
            (true, Some(_)) => {
                let left = deadline.map(reach::left).unwrap_or_default();
                client.begin_job_timeout(&args.job, group, left).await
            }
        }
    };
    let mut line = StatusLine::new(args.wait && std::io::stderr().is_terminal());
    let progress = show_job_progress(&client, &args.job, &mut line);
    let start = interruptible(begin, progress, &mut sigs).await;
    line.clear();
    let start = match start {
        Interrupted::Done(r) => r,
        Interrupted::By(code) => {
            let _ = client.shutdown().await;
            return Ok(code);
        }
    };
    let attempt = match start {
        Ok(JobStart::Run(attempt)) => attempt,
        Ok(JobStart::Completed(done)) => {
            errln!(
                "turnstile: job {:?} {}; skipping",
                args.job,
                completed(&done)
            );
            let _ = client.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
        Ok(JobStart::Running(r)) => {
            errln!(
                "turnstile: job {:?} is running on {} (for {}); skipping",
                args.job,
                r.client,
                round(r.running_for)
            );
            let _ = client.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
        Err(Error::TimedOut) => {
            errln!(
                "turnstile: timed out after {} waiting for job {:?} to finish elsewhere",
                round(args.timeout.unwrap_or_default()),
                args.job
            );
            let _ = client.shutdown().await;
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        Err(e) => {
            // Ended, not left to expire: a refused job name is a clean ending.
            let _ = client.shutdown().await;
            return Err(e.into());
        }
    };
    let envs = [
        ("TURNSTILE_JOB", args.job.clone()),
        (
            "TURNSTILE_LEASE_ID",
            attempt.permit().lease_id().to_string(),
        ),
        (
            "TURNSTILE_FENCING_TOKEN",
            attempt.fencing_token().to_string(),
        ),
        ("TURNSTILE_URL", url.clone()),
    ];
    if let Err(code) = guard.start(&envs).await {
        let _ = attempt
            .fail(&format!("could not start {:?}", args.command[0]))
            .await;
        let _ = client.shutdown().await;
        return Ok(ExitCode::from(code));
    }
    let what = format!("the lease on job {:?}", args.job);
    let outcome = supervise(
        &mut guard,
        &mut sigs,
        attempt.permit(),
        args.on_lost,
        args.kill_grace,
        &what,
    )
    .await?;
    let code = match outcome {
        Supervised::Lost => {
            drop(attempt);
            EXIT_LOST
        }
        Supervised::Exited(status) if status.success() => {
            match finish(&mut sigs, attempt.succeed()).await {
                Some(Ok(())) => 0,
                Some(Err(e)) if e.is_unavailable() => {
                    errln!(
                    "turnstile: job {:?} succeeded, but its completion could not be recorded: {e}; the job may run again",
                    args.job
                );
                    EXIT_UNAVAILABLE
                }
                None => {
                    errln!(
                    "turnstile: job {:?} succeeded, but turnstile was stopped before its completion was recorded; the job may run again",
                    args.job
                );
                    EXIT_UNAVAILABLE
                }
                Some(Err(Error::LeaseLost(reason))) => {
                    errln!(
                    "turnstile: job {:?} succeeded, but its lease was lost ({reason}) first: its completion is not recorded and another runner may run it",
                    args.job
                );
                    EXIT_LOST
                }
                Some(Err(e)) => {
                    let _ = client.shutdown().await;
                    return Err(anyhow::Error::new(e)
                        .context(format!("recording the completion of job {:?}", args.job)));
                }
            }
        }
        Supervised::Exited(status) => {
            let how = describe(status);
            match finish(&mut sigs, attempt.fail(&how)).await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    errln!("turnstile: warning: could not record the failed attempt: {e}")
                }
                None => errln!(
                    "turnstile: warning: stopped before the failed attempt was recorded; its lease expires on its own"
                ),
            }
            exit_code(status)
        }
    };
    let _ = client.shutdown().await;
    Ok(ExitCode::from(code))
}

/// How long recording a job's end may take once a stop signal was passed on to the command.
const FINISH_ON_STOP: Duration = Duration::from_millis(500);

/// Records a job's end (`step`): the library gives up once the lease has surely expired on
/// the coordinator; a stop signal cuts that short (`None`).
async fn finish<T>(sigs: &mut Signals, step: impl std::future::Future<Output = T>) -> Option<T> {
    if sigs.stop_requested() {
        return tokio::time::timeout(FINISH_ON_STOP, step).await.ok();
    }
    tokio::select! {
        r = step => Some(r),
        _ = sigs.recv() => None,
    }
}

/// While `once --wait` waits for a job that runs elsewhere, shows on a terminal who runs it
/// and for how long this attempt has waited. Never returns: the caller drops it.
async fn show_job_progress(
    client: &Client,
    job: &str,
    line: &mut StatusLine,
) -> std::convert::Infallible {
    if !line.enabled {
        return std::future::pending().await;
    }
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let doc = client.status(Some(job)).await.ok();
        let runner = doc
            .as_ref()
            .and_then(|d| d.jobs.iter().find(|j| j.name == job))
            .and_then(|j| j.running.as_ref())
            .map(|r| {
                format!(
                    " (running on {} for {})",
                    r.client,
                    round(Duration::from_millis(r.age_ms))
                )
            })
            .unwrap_or_default();
        let waited = humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()));
        line.show(&format!(
            "turnstile: waiting for job {job:?}{runner}: {waited}"
        ));
    }
}

/// "completed by HOST:PID at TIME (took D)".
fn completed(done: &JobCompletion) -> String {
    format!(
        "was completed by {} at {} (took {})",
        done.client,
        humantime::format_rfc3339_seconds(done.started + done.duration),
        round(done.duration)
    )
}

/// A duration rounded to what a person reads: whole milliseconds under a second, tenths of a
/// second under a minute, whole seconds above.
pub fn round(d: Duration) -> humantime::FormattedDuration {
    let ms = d.as_millis() as u64;
    let rounded = match ms {
        0..=999 => ms,
        1_000..=59_999 => ms - ms % 100,
        _ => ms - ms % 1000,
    };
    humantime::format_duration(Duration::from_millis(rounded))
}

/// Arguments of `turnstile wait`.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// The group.
    group: String,
    /// Also wait until at least this many of its jobs have completed.
    #[arg(long, default_value_t = 0)]
    jobs: u32,
    /// Give up after this long, connecting included (exit 75 if the group is not settled; 69
    /// if the coordinator cannot be reached).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    connect: ConnectArg,
    #[command(flatten)]
    url: UrlArg,
}

/// Runs `turnstile wait`: exit 0 once no job of the group runs and `--jobs` have completed,
/// 75 on timeout, 69 when the coordinator cannot be reached.
pub async fn wait(args: WaitArgs) -> anyhow::Result<ExitCode> {
    let started = SystemTime::now();
    let deadline = reach::deadline(args.timeout);
    let client = reach::connect(
        &args.url.get(),
        args.connect.options(Options::default()),
        args.connect.connect_timeout,
        deadline,
    )
    .await?;
    let mut sigs = Signals::new()?;
    let waited = interruptible(
        client.wait_group(&args.group, args.jobs, deadline.map(reach::left)),
        std::future::pending(),
        &mut sigs,
    )
    .await;
    let _ = client.shutdown().await;
    let r = match waited {
        Interrupted::Done(r) => r,
        Interrupted::By(code) => return Ok(code),
    };
    match r {
        Ok(g) => {
            errln!("turnstile: group {:?}: {}", args.group, summary(&g));
            Ok(ExitCode::SUCCESS)
        }
        Err(Error::TimedOut) => {
            let waited = started.elapsed().unwrap_or_default();
            errln!(
                "turnstile: timed out after {} waiting for group {:?}",
                round(waited),
                args.group
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Err(e) if e.is_unavailable() => {
            Err(anyhow::Error::new(e)
                .context(format!("gave up waiting for group {:?}", args.group)))
        }
        Err(e) => Err(e.into()),
    }
}

/// "38 of 40 jobs completed, 0 running, 2 failed attempts".
pub fn summary(g: &GroupSummary) -> String {
    format!(
        "{} of {} job{} completed, {} running, {} failed attempt{}",
        g.completed,
        g.jobs,
        if g.jobs == 1 { "" } else { "s" },
        g.running,
        g.failures,
        if g.failures == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_well() {
        let g = GroupSummary {
            jobs: 40,
            completed: 38,
            running: 2,
            failures: 1,
        };
        assert_eq!(
            summary(&g),
            "38 of 40 jobs completed, 2 running, 1 failed attempt"
        );
        assert_eq!(round(Duration::from_millis(1_234)).to_string(), "1s 200ms");
        assert_eq!(round(Duration::from_millis(61_234)).to_string(), "1m 1s");
        assert_eq!(round(Duration::from_millis(12)).to_string(), "12ms");
    }
}
