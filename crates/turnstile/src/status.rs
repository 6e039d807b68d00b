//! `turnstile status`: a table for people, JSON for programs; `--watch` redraws either.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use turnstile_client::{Client, JobStatus, StatusDoc};

use crate::once::round;

/// What `turnstile status` shows.
#[derive(Clone, Copy, Debug)]
pub enum What<'a> {
    /// Everything.
    All,
    /// The semaphore and the job of this name.
    Name(&'a str),
    /// The semaphores, groups and jobs whose names start with this.
    Prefix(&'a str),
}

impl What<'_> {
    fn name(self) -> Option<String> {
        match self {
            What::Name(name) => Some(name.to_owned()),
            _ => None,
        }
    }
}

/// Fetches the status (every page of it).
async fn fetch(client: &Client, what: What<'_>) -> Result<StatusDoc, turnstile_client::Error> {
    match what {
        What::All => client.status(None).await,
        What::Name(name) => client.status(Some(name)).await,
        What::Prefix(prefix) => client.status_prefix(prefix).await,
    }
}

pub async fn status(url: &str, what: What<'_>, json: bool) -> anyhow::Result<ExitCode> {
    let name = what.name();
    let name = name.as_deref();
    let client = Client::connect(url).await?;
    let doc = fetch(&client, what).await;
    // Ended on every way out: a session left to expire is logged as expired.
    let _ = client.shutdown().await;
    let doc = doc?;
    let missing = name.is_some() && doc.semaphores.is_empty() && doc.jobs.is_empty();
    if json {
        outln!("{}", String::from_utf8_lossy(&doc.to_json()))?;
    } else if name.is_some() {
        // One name: the semaphore and/or the job of that name, in full.
        let now = SystemTime::now();
        if !doc.semaphores.is_empty() {
            out!("{}", render(&doc, now))?;
        }
        for j in &doc.jobs {
            outln!("{}", render_job(j, now))?;
        }
    } else {
        // Which backend this is: without --url or TURNSTILE_URL it is the per-user
        // directory, not a coordinator the user may have started.
        outln!("backend: {url}\n")?;
        out!("{}", render(&doc, SystemTime::now()))?;
    }
    if let (Some(name), true) = (name, missing) {
        errln!("turnstile: no semaphore or job named {name:?}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The width of a lease id in the table: lease ids are random 64-bit numbers, up to 20
/// digits, and a column as wide as the widest keeps every line of a table aligned.
const LEASE_WIDTH: usize = 20;

/// A counter for the table: `-` on a backend that keeps none (file, etcd), not a false 0.
fn counter(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// How many waiters of a semaphore the table lists; the rest are counted.
const WAITERS_SHOWN: usize = 10;

/// `turnstile status --watch`: fetches the status every `interval` and redraws it until
/// Ctrl-C. On a terminal the screen is cleared before each table; elsewhere tables follow
/// each other; with `json`, one document per line. A failed fetch shows the error and the
/// next tick tries again (the client reconnects on its own).
pub async fn watch(
    url: &str,
    what: What<'_>,
    json: bool,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(url).await?;
    let tty = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Ctrl-C or SIGTERM ends the watch and, with it, the session: a watch stopped by a
    // service manager is not a session that expired.
    let ctrl_c = stop_signal();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticker.tick() => {}
        }
        let fetched = tokio::select! {
            _ = &mut ctrl_c => break,
            r = fetch(&client, what) => r,
        };
        let mut frame = String::new();
        match (&fetched, json) {
            (Ok(doc), true) => {
                frame.push_str(&String::from_utf8_lossy(&doc.to_json()));
                frame.push('\n');
            }
            (fetched, false) => {
                if tty {
                    frame.push_str("\x1b[H\x1b[2J"); // home, clear screen
                }
                let now = SystemTime::now();
                let _ = writeln!(
                    frame,
                    "{url}  {}  (every {}; Ctrl-C to stop)\n",
                    humantime::format_rfc3339_seconds(now),
                    humantime::format_duration(interval)
                );
                match fetched {
                    Ok(doc) => frame.push_str(&render(doc, now)),
                    Err(e) => {
                        let _ = writeln!(frame, "status unavailable: {e}");
                    }
                }
                if !tty {
                    frame.push('\n');
                }
            }
            (Err(e), true) => errln!("turnstile: status unavailable: {e}"),
        }
        // One write per frame, so that the terminal never shows half a table. A closed
        // stdout (`| head`) ends the watch.
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
    }
    let _ = client.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM (on SIGINT only, if SIGTERM cannot be caught).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The human-readable tables: one line per semaphore, one indented line per holder and per
/// waiter (the first [`WAITERS_SHOWN`], in queue order); then one
/// line per job group, with an indented line per running job and per job that failed and has
/// not completed since. `now` turns ages into times of day.
pub fn render(doc: &StatusDoc, now: SystemTime) -> String {
    let mut out = String::new();
    if doc.semaphores.is_empty() {
        if doc.jobs.is_empty() {
            out.push_str("no semaphores\n");
        }
    } else {
        render_semaphores(doc, &mut out);
    }
    if !doc.jobs.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        render_groups(doc, now, &mut out);
    }
    out
}

fn render_semaphores(doc: &StatusDoc, out: &mut String) {
    let width = doc
        .semaphores
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max("SEMAPHORE".len());
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>6}  {:>6}  {:>9}  {:>9}",
        "SEMAPHORE", "CAPACITY", "IN USE", "QUEUED", "ACQUIRED", "EXPIRED"
    );
    for s in &doc.semaphores {
        let closed = if s.closed { "  (closed)" } else { "" };
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>6}  {:>6}  {:>9}  {:>9}{closed}",
            s.name,
            s.capacity,
            s.in_use,
            s.queued,
            counter(s.acquired_total),
            counter(s.expired_total)
        );
        for h in &s.holders {
            let age = humantime::format_duration(Duration::from_millis(h.age_ms - h.age_ms % 100));
            let client = if h.client.is_empty() {
                String::new()
            } else {
                format!(" ({})", h.client)
            };
            let _ = writeln!(
                out,
                "  lease {:<LEASE_WIDTH$} session {}{client}  weight {:<3} token {:<8} age {age}",
                h.lease_id, h.session, h.weight, h.token
            );
        }
        for (i, w) in s.waiters.iter().take(WAITERS_SHOWN).enumerate() {
            let age = humantime::format_duration(Duration::from_millis(w.age_ms - w.age_ms % 100));
            let client = if w.client.is_empty() {
                String::new()
            } else {
                format!(" ({})", w.client)
            };
            let _ = writeln!(
                out,
                "  queue #{:<4} lease {:<LEASE_WIDTH$} session {}{client}  weight {:<3} waited {age}",
                i + 1,
                w.lease_id,
                w.session,
                w.weight
            );
        }
        // The count, not the list, decides: a file-backend document may list fewer.
        let listed = s.waiters.len().min(WAITERS_SHOWN) as u64;
        if s.queued > listed {
            let more = s.queued - listed;
            let _ = writeln!(out, "  ... and {more} more waiting");
        }
    }
}

fn render_groups(doc: &StatusDoc, now: SystemTime, out: &mut String) {
    let width = doc
        .groups
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(0)
        .max("GROUP".len());
    if !doc.groups.is_empty() {
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>9}  {:>7}  {:>15}",
            "GROUP", "JOBS", "COMPLETED", "RUNNING", "FAILED ATTEMPTS"
        );
    }
    for g in &doc.groups {
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>9}  {:>7}  {:>15}",
            g.name, g.jobs, g.completed, g.running, g.failures
        );
        job_lines(
            doc.jobs
                .iter()
                .filter(|j| j.group.as_deref() == Some(&*g.name)),
            now,
            out,
        );
    }
    let loose: Vec<&JobStatus> = doc.jobs.iter().filter(|j| j.group.is_none()).collect();
    if !loose.is_empty() {
        let done = loose.iter().filter(|j| j.completed.is_some()).count();
        let running = loose.iter().filter(|j| j.running.is_some()).count();
        let _ = writeln!(
            out,
            "jobs without a group: {} ({done} completed, {running} running)",
            loose.len()
        );
        job_lines(loose.into_iter(), now, out);
    }
}

/// One job in one line: its group, and whether it completed (by whom, when, how long),
/// runs (where, since when), or neither, with its failed attempts.
pub fn render_job(j: &JobStatus, now: SystemTime) -> String {
    let group = j
        .group
        .as_deref()
        .map(|g| format!(" (group {g})"))
        .unwrap_or_default();
    let mut line = format!("job {}{group}: ", j.name);
    if let Some(c) = &j.completed {
        let ended = SystemTime::UNIX_EPOCH
            + Duration::from_millis(c.started_unix_ms.saturating_add(c.duration_ms));
        let _ = write!(
            line,
            "completed by {} at {} (took {}, token {})",
            c.client,
            humantime::format_rfc3339_seconds(ended),
            round(Duration::from_millis(c.duration_ms)),
            c.token
        );
    } else if let Some(r) = &j.running {
        let age = Duration::from_millis(r.age_ms);
        let since = now.checked_sub(age).unwrap_or(now);
        let _ = write!(
            line,
            "running on {} since {} ({}, token {})",
            r.client,
            humantime::format_rfc3339_seconds(since),
            round(age),
            r.token
        );
        if j.waiting > 0 {
            let _ = write!(line, ", {} waiting to take over", j.waiting);
        }
    } else {
        line.push_str("not completed");
    }
    if j.failures > 0 {
        let last = j
            .last_failure
            .as_deref()
            .map(|f| format!(", last: {f}"))
            .unwrap_or_default();
        let _ = write!(
            line,
            "; {} failed attempt{}{last}",
            j.failures,
            if j.failures == 1 { "" } else { "s" }
        );
    }
    line
}

/// One line per running job (where, since when) and per failed job not completed since.
fn job_lines<'a>(jobs: impl Iterator<Item = &'a JobStatus>, now: SystemTime, out: &mut String) {
    for j in jobs {
        if let Some(r) = &j.running {
            let age = Duration::from_millis(r.age_ms);
            let since = now.checked_sub(age).unwrap_or(now);
            let waiting = match j.waiting {
                0 => String::new(),
                n => format!(", {n} waiting to take over"),
            };
            let _ = writeln!(
                out,
                "  running  {} on {} since {} ({}, token {}){waiting}",
                j.name,
                r.client,
                humantime::format_rfc3339_seconds(since),
                round(age),
                r.token
            );
        } else if j.completed.is_none() && j.failures > 0 {
            let last = j
                .last_failure
                .as_deref()
                .map(|f| format!(", last: {f}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  failed   {}: {} failed attempt{}{last}",
                j.name,
                j.failures,
                if j.failures == 1 { "" } else { "s" }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_client::{HolderStatus, SemaphoreStatus, WaitSummary, WaiterStatus};

    #[test]
    fn table_lists_semaphores_and_holders() {
        let doc = StatusDoc {
            semaphores: vec![SemaphoreStatus {
                name: "db".into(),
                capacity: 3,
                in_use: 1,
                queued: 12,
                queued_weight: 2,
                closed: false,
                holders: vec![HolderStatus {
                    lease_id: 7,
                    session: "00000000000000ab".into(),
                    client: "host-a:12".into(),
                    weight: 1,
                    token: 42,
                    age_ms: 1_250,
                }],
                waiters: (1..=12)
                    .map(|i| WaiterStatus {
                        lease_id: i,
                        session: format!("{i:016x}"),
                        client: "host-b:7".into(),
                        weight: 1,
                        age_ms: 3_050,
                    })
                    .collect(),
                acquired_total: Some(5),
                released_total: Some(4),
                expired_total: Some(0),
                timed_out_total: Some(0),
                lost_total: Some(0),
                wait: WaitSummary::default(),
            }],
            ..StatusDoc::default()
        };
        let text = render(&doc, SystemTime::UNIX_EPOCH);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SEMAPHORE"));
        assert!(
            lines[1].starts_with("db") && lines[1].contains(" 3 ") && lines[1].contains(" 12 ")
        );
        assert!(
            lines[2].contains("lease 7")
                && lines[2].contains("token 42")
                && lines[2].contains("age 1s 200ms")
        );
        assert_eq!(
            lines[3],
            "  queue #1    lease 1                    session 0000000000000001 (host-b:7)  weight 1   waited 3s"
        );
        assert!(lines[12].starts_with("  queue #10 "), "{text}");
        assert_eq!(lines[13], "  ... and 2 more waiting");
        assert_eq!(lines.len(), 14, "{text}");
        assert_eq!(
            render(&StatusDoc::default(), SystemTime::UNIX_EPOCH),
            "no semaphores\n"
        );
    }

    /// Issue 15: 20-digit lease ids keep the columns aligned, and a backend without counters
    /// shows `-` rather than a false 0.
    #[test]
    fn long_ids_stay_aligned_and_missing_counters_show_as_dashes() {
        let holder = |lease_id: u64| HolderStatus {
            lease_id,
            session: "00000000000000ab".into(),
            client: "h:1".into(),
            weight: 1,
            token: 3,
            age_ms: 0,
        };
        let doc = StatusDoc {
            semaphores: vec![SemaphoreStatus {
                name: "db".into(),
                capacity: 2,
                in_use: 2,
                holders: vec![holder(u64::MAX), holder(7)],
                ..SemaphoreStatus::default()
            }],
            ..StatusDoc::default()
        };
        let text = render(&doc, SystemTime::UNIX_EPOCH);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["db", "2", "2", "0", "-", "-"],
            "{text}"
        );
        assert!(
            lines[2].contains("lease 18446744073709551615 session"),
            "{text}"
        );
        assert_eq!(
            lines[2].find("session"),
            lines[3].find("session"),
            "aligned:\n{text}"
        );
    }

    #[test]
    fn groups_show_running_and_failed_jobs() {
        use turnstile_client::{CompletionStatus, GroupStatus, RunningStatus};
        let doc = StatusDoc {
            groups: vec![GroupStatus {
                name: "nightly".into(),
                jobs: 3,
                completed: 1,
                running: 1,
                failures: 2,
            }],
            jobs: vec![
                JobStatus {
                    name: "a".into(),
                    group: Some("nightly".into()),
                    completed: Some(CompletionStatus::default()),
                    ..JobStatus::default()
                },
                JobStatus {
                    name: "b".into(),
                    group: Some("nightly".into()),
                    running: Some(RunningStatus {
                        client: "host-a:12".into(),
                        session: "0000000000000001".into(),
                        token: 4,
                        age_ms: 5_000,
                    }),
                    waiting: 1,
                    ..JobStatus::default()
                },
                JobStatus {
                    name: "c".into(),
                    group: Some("nightly".into()),
                    failures: 2,
                    last_failure: Some("exited with status 3".into()),
                    ..JobStatus::default()
                },
                JobStatus {
                    name: "loose".into(),
                    completed: Some(CompletionStatus::default()),
                    ..JobStatus::default()
                },
            ],
            ..StatusDoc::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(3_600);
        let text = render(&doc, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("GROUP"), "{text}");
        assert!(
            lines[1].starts_with("nightly") && lines[1].ends_with(" 2"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            "  running  b on host-a:12 since 1970-01-01T00:59:55Z (5s, token 4), 1 waiting to take over"
        );
        assert_eq!(
            lines[3],
            "  failed   c: 2 failed attempts, last: exited with status 3"
        );
        assert_eq!(lines[4], "jobs without a group: 1 (1 completed, 0 running)");
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(
            render_job(&doc.jobs[1], now),
            "job b (group nightly): running on host-a:12 since 1970-01-01T00:59:55Z (5s, token 4), 1 waiting to take over"
        );
        assert_eq!(
            render_job(&doc.jobs[2], now),
            "job c (group nightly): not completed; 2 failed attempts, last: exited with status 3"
        );
    }
}
