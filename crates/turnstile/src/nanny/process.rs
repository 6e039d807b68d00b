//! Starting a worker in a process group of its own, and signalling and finding its
//! processes.

use super::*;

/// Why a worker could not be started: the exit code and the message, as `turnstile run`
/// gives them (127 for a command not found, 126 for one that cannot be run).
pub(super) struct StartFailure {
    pub(super) code: u8,
    pub(super) message: String,
}

/// Starts worker `index`'s command under a guard, in a process group of its own (the
/// guard's). The `Child` handle is dropped: [`Nanny::reap`] waits for every child. Returns
/// the guard's pid, the command's and the link that keeps the guard's worker alive.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    listener: &Listener,
    cgroups: Option<&Cgroups>,
    command: &[String],
    env: &[(String, String)],
    url: &str,
    index: usize,
    session: u64,
) -> Result<(i32, i32, Link), StartFailure> {
    use std::os::unix::process::CommandExt;
    // The nanny kills and reports what a dead worker left behind itself.
    let child = listener
        .command(command, true)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(WORKER_ENV, index.to_string())
        .env(URL_ENV, url)
        .env(SESSION_ENV, format!("{session:016x}"))
        // A worker in a background process group that read the terminal would be stopped by
        // SIGTTIN; workers do not share the nanny's input.
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| StartFailure {
            code: 1,
            message: format!("cannot start a guard process: {e}"),
        })?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let broken = |e: std::io::Error| {
        // Reaped by `Nanny::reap` like any child.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        StartFailure {
            code: 1,
            message: format!("the guard process failed: {e}"),
        }
    };
    let mut link = listener.accept(child.id()).map_err(broken)?;
    // In its group before the command starts, so that everything it forks is too.
    if let Some(groups) = cgroups {
        if let Err(e) = groups.enter(index, pid) {
            warn!("worker {index}: cannot put it in a cgroup of its own ({e}): its memory is not limited this run");
        }
    }
    match link.start(&[]).map_err(broken)? {
        Started::Running(cmd) => Ok((pid, cmd, link)),
        Started::Failed { code, message } => Err(StartFailure { code, message }),
    }
}

/// The leader pid of a worker whose leader has not been reaped yet.
pub(super) fn leader(w: &Worker) -> Option<i32> {
    match w.state {
        State::Running(run) => Some(run.pid),
        State::Stopping(stop) if stop.run.exit.is_none() => Some(stop.run.pid),
        _ => None,
    }
}

/// Sends `sig` to the worker's process group and to each of `members` (those that left the
/// group, or all of them for SIGKILL, which cannot be seen twice). A pid read from `/proc` a moment ago could in principle have been reused since;
/// that window is the same as for `kill $(pgrep ...)`, and pids cycle slowly.
pub(super) fn signal_all(group: i32, members: &BTreeSet<i32>, sig: Signal) {
    let _ = killpg(Pid::from_raw(group), sig);
    for &pid in members {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// `/proc` now; on a system without it, an empty table: then only the process group is
/// signalled, and a worker counts as gone once its leader is reaped.
pub(super) fn read_table() -> Table {
    Table::read().unwrap_or_else(|e| {
        debug!("cannot read /proc: {e}");
        Table::default()
    })
}
