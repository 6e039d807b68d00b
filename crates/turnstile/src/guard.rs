//! The guard: a small process of our own binary (`turnstile __guard`, hidden) that sits
//! between a wrapper (`turnstile run`, `turnstile once`, each worker of `turnstile nanny`) and
//! its command, so that the command never outlives the wrapper, however the wrapper dies.
//!
//! ```text
//!   wrapper ──spawn──▶ guard ──spawn──▶ CMD ──▶ CMD's children ...
//!      ▲                 │ child subreaper: every orphan of CMD's tree becomes its child
//!      └── abstract Unix socket: the kernel closes it when the wrapper dies ──┘
//! ```
//!
//! The wrapper binds a Unix socket in the abstract namespace under a random name and starts
//! the guard with that name and its own pid. The guard connects; the wrapper accepts only
//! the connection whose peer (`SO_PEERCRED`, filled in by the kernel) is the child it just
//! spawned, and the guard only a listener whose peer is its parent, which must still be the
//! wrapper it was told of (`getppid`). Then the guard idles until the wrapper sends `go` with
//! the lease's environment; only then does it start the command. Why a connection: when the
//! wrapper dies by any signal, SIGKILL included, the kernel closes its end, and the guard
//! reads end-of-file. It then SIGKILLs every process of the command's tree, reaps them until
//! it has no child left (it is a child subreaper, so nothing of the tree can escape to
//! init), and exits. If the wrapper is gone before `go`, the command never starts.
//!
//! Linux's parent-death signal is not used: it reaches only the direct child, not the
//! command's descendants, and it fires when the *thread* that forked exits, which in a tokio
//! program can happen while the wrapper is alive. Nor can the wrapper do the work in the
//! forked child before `exec` (`unsafe_code` is forbidden); hence a process of our own.
//!
//! The guard is otherwise transparent:
//!
//! - The command keeps the guard's process group and terminal, which are the wrapper's
//!   (`run` and `once`) or the worker's own group (the nanny), and its stdin/stdout/stderr.
//! - Signals: the guard blocks every signal and reads them from a signalfd, so none kills it
//!   while the command lives (std does not reset the mask of what it spawns, so the command
//!   is started through `turnstile __exec`, which clears the mask and `exec`s it). It never
//!   passes on a signal it receives itself: a signal sent to the process group (a terminal's
//!   Ctrl-C, the nanny's `killpg`) reaches the command directly. What the wrapper forwards
//!   comes as a `signal N` message, and the guard passes it on unless the same signal reached
//!   the guard from outside less than a second before: then it was sent to the group and the
//!   command has it already, so a Ctrl-C reaches the command once, not twice.
//! - Status: when the command ends, the guard exits with its code, or dies by the signal
//!   that killed it (without a core dump). A signal that the guard ignores (SIGPIPE, which
//!   Rust's runtime ignores, or one ignored by whoever started turnstile) cannot kill it;
//!   then it exits with 128 + the signal, the shell's code for that death.
//! - A command that cannot be started: the guard reports it (`failed CODE MESSAGE`), and the
//!   wrapper prints the message and exits as it did without a guard (127 or 126).
//! - When the command exits, what it left running (background children, daemons) is killed
//!   too, unless the wrapper asked to have leftovers left to it (the nanny kills and reports
//!   them itself): nothing of a command may act once its lease is released.
//!
//! Messages are lines. Wrapper → guard: `env HEX` (one `KEY=VALUE` of the command's
//! environment, hex-encoded), `go`, `signal N`, `kill`. Guard → wrapper: `started PID` or
//! `failed CODE MESSAGE`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, raise, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, getppid, Pid};

use crate::nanny::procfs;

/// How long a wrapper waits for its guard to connect, and for its answer to `go`. A guard
/// is one `exec` of our own binary away, so this is only a bound against the impossible.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A signal that reached the guard from outside this long before the wrapper forwarded the
/// same signal is taken to have been sent to the whole process group (see the module doc).
const SAME_SIGNAL_WITHIN: Duration = Duration::from_secs(1);

/// Exit code of a guard that failed before it could start the command.
const EXIT_GUARD_FAILED: u8 = 125;

/// Arguments of the hidden `turnstile __guard` subcommand.
#[derive(clap::Args, Debug)]
pub struct GuardArgs {
    /// The wrapper's socket, in the abstract namespace.
    #[arg(long)]
    socket: String,
    /// The wrapper's pid.
    #[arg(long)]
    parent: i32,
    /// When the command exits, leave what it left running to the wrapper (the nanny).
    #[arg(long)]
    leave_rest: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The wrapper's side.
// ---------------------------------------------------------------------------------------

/// The socket guards connect to.
pub(crate) struct Listener {
    sock: UnixListener,
    name: String,
}

impl Listener {
    /// Binds a fresh random name in the abstract namespace (no file, gone with the process).
    pub(crate) fn bind() -> io::Result<Listener> {
        let name = format!(
            "turnstile-guard-{}-{:016x}",
            std::process::id(),
            turnstile_client::new_session_id()
        );
        let sock = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        sock.set_nonblocking(true)?;
        Ok(Listener { sock, name })
    }

    /// The command that starts a guard for `command`. With `leave_rest`, what the command
    /// leaves running when it exits is left to the caller.
    pub(crate) fn command(&self, command: &[String], leave_rest: bool) -> std::process::Command {
        // /proc/self/exe rather than the path we were started by: it is this very binary even
        // if the file was replaced or removed since.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0("turnstile")
            .args(["__guard", "--socket", &self.name, "--parent"])
            .arg(std::process::id().to_string());
        if leave_rest {
            cmd.arg("--leave-rest");
        }
        cmd.arg("--").args(command);
        cmd
    }

    /// Waits (at most [`HANDSHAKE_TIMEOUT`]) for the guard whose pid is `pid` to connect;
    /// connections from any other process are dropped.
    pub(crate) fn accept(&self, pid: u32) -> io::Result<Link> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            match self.sock.accept() {
                Ok((stream, _)) => {
                    let peer = getsockopt(&stream, PeerCredentials).map_err(io::Error::from)?;
                    if u32::try_from(peer.pid()).ok() == Some(pid) {
                        stream.set_nonblocking(false)?;
                        return Ok(Link {
                            stream,
                            buf: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the guard process did not connect",
                        ));
                    }
                    if exited(pid) {
                        return Err(io::Error::other(
                            "the guard process exited before it connected",
                        ));
                    }
                    // In slices, to notice a guard that failed (it says why on stderr).
                    let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
                    let slice = left.min(Duration::from_millis(50));
                    let timeout = PollTimeout::try_from(slice).unwrap_or(PollTimeout::MAX);
                    match poll(&mut fds, timeout) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether process `pid` (a child not yet reaped) has exited: a zombie, or gone.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// How the start of a command went.
#[derive(Debug)]
pub(crate) enum Started {
    /// It runs, with this pid.
    Running(i32),
    /// It could not be started: exit with `code` (127 not found, 126 cannot run), after
    /// printing `message` ("cannot run ...").
    Failed {
        /// The shell's code for it.
        code: u8,
        /// What went wrong, in words.
        message: String,
    },
}

/// The wrapper's end of the connection to one guard. Dropping it is what the wrapper's death
/// does: the guard kills the command's whole tree.
pub(crate) struct Link {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Link {
    /// Sends the command's extra environment and `go`, and waits for the guard's answer.
    pub(crate) fn start(&mut self, envs: &[(&str, String)]) -> io::Result<Started> {
        let mut msg = String::new();
        for (k, v) in envs {
            msg.push_str("env ");
            msg.push_str(&hex(format!("{k}={v}").as_bytes()));
            msg.push('\n');
        }
        msg.push_str("go\n");
        self.stream.write_all(msg.as_bytes())?;
        self.stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let line = loop {
            if let Some(line) = take_line(&mut self.buf) {
                break line;
            }
            let mut chunk = [0u8; 512];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                // SIGCHLD, in the nanny.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the guard process ended before it started the command",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected answer from the guard",
            )
        };
        if let Some(pid) = line.strip_prefix("started ") {
            return Ok(Started::Running(pid.trim().parse().map_err(|_| bad())?));
        }
        let rest = line.strip_prefix("failed ").ok_or_else(bad)?;
        let (code, message) = rest.split_once(' ').ok_or_else(bad)?;
        Ok(Started::Failed {
            code: code.parse().map_err(|_| bad())?,
            message: message.to_owned(),
        })
    }

    /// Passes `sig` on to the command (once: see the module doc).
    pub(crate) fn signal(&mut self, sig: Signal) {
        let _ = self
            .stream
            .write_all(format!("signal {}\n", sig as i32).as_bytes());
    }

    /// SIGKILL to the command's whole tree.
    pub(crate) fn kill(&mut self) {
        let _ = self.stream.write_all(b"kill\n");
    }
}

/// A command started under a guard, for `run` and `once` (tokio waits for the guard).
pub(crate) struct Guarded {
    child: tokio::process::Child,
    link: Link,
}

impl Guarded {
    /// Starts a guard for `command`, idle until [`Guarded::start`]. The command will not see
    /// `TURNSTILE_SESSION`: the session is the wrapper's.
    pub(crate) fn spawn(command: &[String]) -> anyhow::Result<Guarded> {
        // Should the guard be killed on its own, what is left of the command comes to us
        // rather than to init, and `wait` kills it.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let listener = Listener::bind()
            .map_err(|e| anyhow::anyhow!("cannot listen for the guard process: {e}"))?;
        let mut cmd = listener.command(command, false);
        // The session is the wrapper's: a client in the command that used it too would share
        // lease numbers with it, and end its session when it shut down.
        cmd.env_remove(turnstile_client::SESSION_ENV);
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start the guard process: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let link = listener
            .accept(pid)
            .map_err(|e| anyhow::anyhow!("cannot connect to the guard process: {e}"))?;
        Ok(Guarded { child, link })
    }

    /// The guard's pid: alive as long as anything of the command is.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Starts the command with `envs` added. On failure, says why on stderr and returns the
    /// shell's exit code for it: 127 for a command not found, 126 for one that cannot be run.
    pub(crate) async fn start(&mut self, envs: &[(&str, String)]) -> Result<(), u8> {
        let outcome = self.link.start(envs);
        match outcome {
            Ok(Started::Running(_)) => Ok(()),
            Ok(Started::Failed { code, message }) => {
                errln!("turnstile: {message}");
                let _ = self.child.wait().await;
                Err(code)
            }
            Err(e) => {
                errln!("turnstile: the guard process failed: {e}");
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err(EXIT_GUARD_FAILED)
            }
        }
    }

    /// Waits for the command (its status, as the guard mirrors it). If the guard itself was
    /// killed, what was left of the command's tree was re-parented to the wrapper (a child
    /// subreaper, see [`Guarded::spawn`]) and is killed here, before the wrapper can release.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        kill_strays().await;
        Ok(status)
    }

    /// Passes `sig` on to the command.
    pub(crate) fn signal(&mut self, sig: Signal) {
        self.link.signal(sig);
    }

    /// SIGKILL to the command's whole tree.
    pub(crate) fn kill(&mut self) {
        self.link.kill();
    }
}

/// SIGKILL to every live descendant of this process, until none is left (zombies, which
/// tokio does not reap for us, do not count: they are gone). Nothing to do when the guard
/// did its work, which is always but when the guard itself was killed.
async fn kill_strays() {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    for _ in 0..200 {
        let Some(tree) = procfs::descendants(me) else {
            return;
        };
        let alive: Vec<i32> = tree.into_iter().filter(|&p| !exited_pid(p)).collect();
        if alive.is_empty() {
            return;
        }
        for pid in alive {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn exited_pid(pid: i32) -> bool {
    u32::try_from(pid).map(exited).unwrap_or(true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

/// Removes and returns the first complete line of `buf`, without its newline.
fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let at = buf.iter().position(|&b| b == b'\n')?;
    let line: Vec<u8> = buf.drain(..=at).take(at).collect();
    Some(String::from_utf8_lossy(&line).into_owned())
}

// ---------------------------------------------------------------------------------------
// The guard's side.
// ---------------------------------------------------------------------------------------

/// Runs the guard (`turnstile __guard`). Returns only to exit with a code; a command killed
/// by a signal makes the guard die by the same signal.
pub fn guard(args: GuardArgs) -> ExitCode {
    match Guard::new(&args) {
        Ok(Some(mut g)) => g.run(&args),
        // The wrapper is gone already: nothing was started.
        Ok(None) => ExitCode::from(EXIT_GUARD_FAILED),
        Err(e) => {
            errln!("turnstile: guard: {e}");
            ExitCode::from(EXIT_GUARD_FAILED)
        }
    }
}

struct Guard {
    stream: UnixStream,
    buf: Vec<u8>,
    signals: SignalFd,
    me: i32,
    /// The command, once started, and how it ended, once reaped.
    cmd: Option<i32>,
    status: Option<WaitStatus>,
    /// Signals that reached the guard from outside, and when, not yet matched by a forward.
    outside: VecDeque<(i32, Instant)>,
}

/// What the wrapper said.
enum Said {
    Nothing,
    Go,
    /// The wrapper is gone (or broke the protocol, which only a dying wrapper does).
    Gone,
}

impl Guard {
    /// Blocks signals, becomes a subreaper and connects to the wrapper. `None` if the wrapper
    /// is already gone.
    fn new(args: &GuardArgs) -> anyhow::Result<Option<Guard>> {
        let all = SigSet::all();
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None)?;
        let signals = SignalFd::with_flags(&all, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // Every orphan of the command's tree becomes our child, so it can be found and
        // killed, and reaped: the tree cannot escape to init.
        nix::sys::prctl::set_child_subreaper(true)?;
        if getppid().as_raw() != args.parent {
            return Ok(None);
        }
        let addr = SocketAddr::from_abstract_name(args.socket.as_bytes())?;
        let stream = match UnixStream::connect_addr(&addr) {
            Ok(s) => s,
            Err(_) if getppid().as_raw() != args.parent => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // The listener must be our parent, and our parent still the wrapper: a dead wrapper's
        // name cannot have been taken over by a stranger in between.
        let peer = getsockopt(&stream, PeerCredentials)?;
        if peer.pid() != args.parent || getppid().as_raw() != args.parent {
            return Ok(None);
        }
        stream.set_nonblocking(true)?;
        Ok(Some(Guard {
            stream,
            buf: Vec::new(),
            signals,
            me: getpid().as_raw(),
            cmd: None,
            status: None,
            outside: VecDeque::new(),
        }))
    }

    fn run(&mut self, args: &GuardArgs) -> ExitCode {
        let mut envs: Vec<(String, String)> = Vec::new();
        // Until `go`: idle. A wrapper that goes away (or cancels) never starts the command.
        loop {
            match self.read_wrapper(&mut envs) {
                Said::Go => break,
                Said::Gone => return ExitCode::SUCCESS,
                Said::Nothing => {}
            }
            self.wait_for_events(None);
            self.drain_signals();
        }
        self.outside.clear();
        let (program, rest) = args
            .command
            .split_first()
            .expect("invariant: clap requires at least one word of command");
        match spawn_unmasked(program, rest, envs) {
            Ok(pid) => {
                self.cmd = Some(pid);
                self.tell(&format!("started {pid}\n"));
            }
            Err((code, message)) => {
                self.tell(&format!("failed {code} {message}\n"));
                return ExitCode::from(code);
            }
        }
        loop {
            self.drain_signals();
            if let Some(status) = self.status {
                if !args.leave_rest {
                    self.kill_tree();
                }
                return mirror(status);
            }
            match self.read_wrapper(&mut Vec::new()) {
                Said::Gone => {
                    // The wrapper died: nothing of its command may outlive it.
                    self.kill_tree();
                    return self.status.map(mirror).unwrap_or(ExitCode::FAILURE);
                }
                Said::Go | Said::Nothing => {}
            }
            if self.status.is_none() {
                self.wait_for_events(None);
            }
        }
    }

    fn tell(&mut self, line: &str) {
        // The socket is non-blocking; a line this short always fits in its buffer.
        let _ = self.stream.write_all(line.as_bytes());
    }

    /// Handles what the wrapper sent. Env lines are collected into `envs`.
    fn read_wrapper(&mut self, envs: &mut Vec<(String, String)>) -> Said {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Said::Gone,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Said::Gone,
            }
        }
        while let Some(line) = take_line(&mut self.buf) {
            let (word, arg) = line.split_once(' ').unwrap_or((&line, ""));
            match word {
                "env" if self.cmd.is_none() => {
                    let Some(entry) = unhex(arg).and_then(|b| String::from_utf8(b).ok()) else {
                        return Said::Gone;
                    };
                    let Some((k, v)) = entry.split_once('=') else {
                        return Said::Gone;
                    };
                    envs.push((k.to_owned(), v.to_owned()));
                }
                "go" if self.cmd.is_none() => return Said::Go,
                "signal" => {
                    if let Ok(sig) = arg.parse::<i32>() {
                        self.forward(sig);
                    }
                }
                "kill" if self.cmd.is_some() => self.kill_tree(),
                _ => return Said::Gone,
            }
        }
        Said::Nothing
    }

    /// Passes a forwarded signal on to the command, unless the same signal reached us from
    /// outside just before (sent to the process group: the command has it already).
    fn forward(&mut self, sig: i32) {
        // Whatever the kernel queued for us before the wrapper could react is pending now.
        self.drain_signals();
        let now = Instant::now();
        self.outside
            .retain(|&(_, at)| now.saturating_duration_since(at) < SAME_SIGNAL_WITHIN);
        if let Some(i) = self.outside.iter().position(|&(s, _)| s == sig) {
            self.outside.remove(i);
            return;
        }
        if let (Some(pid), None, Ok(sig)) = (self.cmd, self.status, Signal::try_from(sig)) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// Reads every pending signal: SIGCHLD reaps, anything else is noted (see `forward`).
    fn drain_signals(&mut self) {
        let mut child = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            if signo == Signal::SIGCHLD as i32 {
                child = true;
            } else {
                self.outside.push_back((signo, Instant::now()));
                if self.outside.len() > 64 {
                    self.outside.pop_front();
                }
            }
        }
        if child {
            self.reap();
        }
    }

    /// Reaps every child that has ended; notes the command's status. Whether any child is
    /// left.
    fn reap(&mut self) -> bool {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return true,
                Ok(status) => {
                    if status.pid().map(Pid::as_raw) == self.cmd && self.cmd.is_some() {
                        self.status.get_or_insert(status);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => return false, // ECHILD: no child left
            }
        }
    }

    /// Sleeps until the wrapper writes or a signal arrives (at most `timeout`).
    fn wait_for_events(&self, timeout: Option<Duration>) {
        let mut fds = [
            PollFd::new(self.stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = timeout
            .and_then(|t| PollTimeout::try_from(t).ok())
            .unwrap_or(PollTimeout::NONE);
        let _ = poll(&mut fds, timeout);
    }

    /// SIGKILL to every process of the command's tree, again and again, until the guard
    /// has no child left: then nothing of the tree exists, since every orphan of it becomes
    /// the guard's child.
    fn kill_tree(&mut self) {
        // Without a view of /proc only the command itself can be found: then give up on
        // what it left after a while rather than wait forever.
        let mut blind = 0;
        loop {
            let tree = procfs::descendants(self.me).unwrap_or_else(|| {
                procfs::Table::read()
                    .map(|t| t.subtree(t.children(self.me).map(|p| p.pid).collect::<Vec<_>>()))
                    .unwrap_or_default()
            });
            if tree.is_empty() {
                blind += 1;
                if blind > 100 {
                    return;
                }
            }
            for &pid in &tree {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if let Some(pid) = self.cmd.filter(|_| self.status.is_none()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if !self.reap() {
                return;
            }
            // Wait for the next death (SIGCHLD), or look again shortly.
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(20u8));
            while let Ok(Some(_)) = self.signals.read_signal() {}
        }
    }
}

/// Starts the command through `turnstile __exec`, which unblocks every signal and then
/// `exec`s it: a child inherits its parent's signal mask, std's spawn does not reset it, and
/// the guard must keep its own signals blocked all along. The intermediate reports an `exec`
/// that fails on a pipe that `exec` closes when it succeeds. Returns the command's pid, or
/// the shell's code for the failure and its message.
fn spawn_unmasked(
    program: &str,
    rest: &[String],
    envs: Vec<(String, String)>,
) -> Result<i32, (u8, String)> {
    let internal =
        |e: &dyn std::fmt::Display| (EXIT_GUARD_FAILED, format!("cannot run {program:?}: {e}"));
    let (read, write) = nix::unistd::pipe().map_err(|e| internal(&e))?;
    // The read end stays here; the write end must reach the intermediate, and no further.
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| internal(&e))?;
    let spawned = std::process::Command::new("/proc/self/exe")
        .arg0(program)
        .args(["__exec", "--report-fd"])
        .arg(write.as_raw_fd().to_string())
        .arg("--")
        .arg(program)
        .args(rest)
        .envs(envs)
        .spawn();
    drop(write);
    let child = spawned.map_err(|e| internal(&e))?;
    let mut report = String::new();
    let _ = std::fs::File::from(read).read_to_string(&mut report);
    if report.is_empty() {
        // `exec` succeeded (or the intermediate was killed first: its status tells).
        return Ok(i32::try_from(child.id()).unwrap_or(i32::MAX));
    }
    let (code, message) = report.split_once(' ').unwrap_or(("126", report.as_str()));
    Err((code.parse().unwrap_or(126), message.trim_end().to_owned()))
}

/// Arguments of the hidden `turnstile __exec` subcommand.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Where to report an `exec` that fails: a pipe inherited from the guard.
    #[arg(long)]
    report_fd: i32,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Runs `turnstile __exec`: unblocks every signal (the guard's mask is inherited), then
/// replaces itself with the command. Returns only if that fails, after reporting it.
pub fn exec(args: ExecArgs) -> ExitCode {
    let (program, rest) = args
        .command
        .split_first()
        .expect("invariant: clap requires at least one word of command");
    // The report pipe must not leak into the command: its `exec` closes it, which is the
    // guard's sign of success.
    let _ = fcntl(args.report_fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // A second line of defence, for a guard killed on its own (by `pkill -9 -f turnstile`,
    // say): the command gets SIGKILL when the guard dies. The guard is single-threaded and
    // outlives the command, so this never fires while the command should run. If the guard
    // died already, the parent changed: then run nothing.
    let parent = getppid();
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
        return ExitCode::from(EXIT_GUARD_FAILED);
    }
    // Signals sent to the command before this point are delivered now, as they would have
    // been to the command itself.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let e = std::process::Command::new(program).args(rest).exec();
    let code: u8 = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    let report = format!("{code} cannot run {program:?}: {e}");
    // A new descriptor for the same pipe: the safe way to write to an inherited one.
    match std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", args.report_fd))
    {
        Ok(mut f) => {
            let _ = f.write_all(report.as_bytes());
        }
        Err(_) => errln!("turnstile: {}", &report[4..]),
    }
    ExitCode::from(code)
}

/// Ends the guard the way the command ended: its exit code, or death by its signal.
fn mirror(status: WaitStatus) -> ExitCode {
    match status {
        WaitStatus::Exited(_, code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        WaitStatus::Signaled(_, sig, _) => {
            // A core dump of the guard, mirroring a death by SIGSEGV or SIGQUIT, would only
            // litter the working directory. (Set only now: the command inherits limits.)
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            if sig == Signal::SIGKILL {
                let _ = kill(getpid(), Signal::SIGKILL);
            }
            // The signal is blocked (and may be pending already); raised and then unblocked,
            // it is delivered at once with its default action. A Rust handler (the runtime's
            // SIGSEGV/SIGBUS stack-overflow handler) restores the default and returns, hence
            // the second raise.
            let _ = raise(sig);
            let mut only = SigSet::empty();
            only.add(sig);
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
            let _ = raise(sig);
            // Still alive: the signal is ignored here. The shell's code for that death.
            ExitCode::from(128u8.wrapping_add(sig as i32 as u8))
        }
        _ => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let entry = "TURNSTILE_URL=file:///tmp/a b\nc";
        assert_eq!(
            unhex(&hex(entry.as_bytes())).as_deref(),
            Some(entry.as_bytes())
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        let mut buf = b"started 42\nfailed 127 x".to_vec();
        assert_eq!(take_line(&mut buf).as_deref(), Some("started 42"));
        assert_eq!(take_line(&mut buf), None);
        assert_eq!(buf, b"failed 127 x");
    }
}
