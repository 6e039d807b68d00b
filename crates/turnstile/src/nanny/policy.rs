//! When to restart a worker: the `--restart` rule, exponential backoff and the start limit.
//!
//! Pure: no clock, no processes. The driver passes the time a worker started and the time it
//! ended into [`History::on_end`] and carries out the [`Decision`] it gets back, so every rule
//! here is tested without sleeping.
//!
//! The rules:
//!
//! - A *crash* is an exit with a non-zero status, a death by signal, or a stop by the nanny
//!   because the worker went over its memory limit. A rolling restart (SIGHUP) is not a crash.
//! - `--restart always` restarts after any end, `on-failure` after a crash, `never` after
//!   none — except that a worker stopped for its memory use is always restarted, since
//!   `--memory-limit` asks for exactly that.
//! - Consecutive crashes wait `MIN`, `2*MIN`, `4*MIN`, ... up to `MAX` before the restart. A
//!   worker that ran for at least [`Policy::stable_after`] (the longer of `MAX` and 10 s)
//!   before it crashed starts over at `MIN`; so does one that exits cleanly, which is restarted
//!   after `MIN` (a pause, so that a worker that exits at once cannot spin).
//! - With a start limit of `R` within `DUR`, the `R`-th crash within any `DUR` gives up on the
//!   worker (systemd's `StartLimitBurst=R`, `StartLimitIntervalSec=DUR`).

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// A run shorter than this is never "stable", however small `--backoff`'s maximum: a worker
/// that crashes every few seconds must not restart at the minimum delay forever.
const STABLE_FLOOR: Duration = Duration::from_secs(10);

/// Which ends of a worker lead to a restart (`--restart`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// After every exit, clean or not.
    Always,
    /// After a non-zero exit status or a death by signal.
    OnFailure,
    /// Never (but see `--memory-limit`).
    Never,
}

/// The delay before a restart (`--backoff MIN..MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after a first crash.
    pub min: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `streak` earlier consecutive crashes: `min * 2^streak`, at most `max`.
    pub fn delay(&self, streak: u32) -> Duration {
        let factor = 1u32 << streak.min(31);
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// Give up on a worker that crashes `burst` times within `within`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartLimit {
    /// Crashes that make the nanny give up (at least 1).
    pub burst: u32,
    /// The window they must fall in.
    pub within: Duration,
}

/// The restart rules of a nanny, shared by all its workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `--restart`.
    pub restart: Restart,
    /// `--backoff`.
    pub backoff: Backoff,
    /// `--max-restarts` and `--within`.
    pub limit: Option<StartLimit>,
}

impl Policy {
    /// How long a worker must have run for its crash not to count as consecutive with the
    /// ones before it.
    pub fn stable_after(&self) -> Duration {
        self.backoff.max.max(STABLE_FLOOR)
    }
}

/// How a process ended, as `waitpid` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
    /// It is gone, but its status was lost (`waitpid` reported a signal number that the
    /// signal library does not know, after reaping the process).
    Unknown,
}

impl Exit {
    /// Whether this is a clean exit (status 0).
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

/// In words, completing "worker 2 (pid 1234) ...".
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal(sig) => match Signal::try_from(sig) {
                Ok(s) => write!(f, "was killed by signal {sig} ({})", s.as_str()),
                Err(_) => write!(f, "was killed by signal {sig}"),
            },
            Exit::Unknown => f.write_str("ended (its exit status was lost)"),
        }
    }
}

/// How one run of a worker ended, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// It ended on its own, or someone other than the nanny killed it.
    Exited(Exit),
    /// The nanny stopped it because it used more memory than `--memory-limit`.
    OverMemory,
    /// The nanny stopped it for a rolling restart (SIGHUP).
    Rolling,
}

/// What to do after a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this delay.
    Restart {
        /// The delay.
        after: Duration,
    },
    /// Leave it down: it crashed too often.
    GiveUp {
        /// Crashes within the window (the limit's `burst`).
        crashes: u32,
        /// The window.
        within: Duration,
    },
    /// Leave it down: `--restart` does not ask for a restart after this end.
    Done,
}

/// What the policy remembers about one worker.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Crashes in the start-limit window, oldest first.
    crashes: VecDeque<Instant>,
    /// Consecutive crashes since the last stable run or clean exit.
    streak: u32,
}

impl History {
    /// Decides what follows the end of a run that started at `started` and ended at `now`.
    pub fn on_end(
        &mut self,
        policy: &Policy,
        started: Instant,
        now: Instant,
        end: End,
    ) -> Decision {
        let crashed = match end {
            End::Rolling => {
                return Decision::Restart {
                    after: Duration::ZERO,
                }
            }
            End::Exited(exit) => !exit.success(),
            End::OverMemory => true,
        };
        if now.saturating_duration_since(started) >= policy.stable_after() {
            self.streak = 0;
        }
        if !crashed {
            self.streak = 0;
            return match policy.restart {
                Restart::Always => Decision::Restart {
                    after: policy.backoff.min,
                },
                Restart::OnFailure | Restart::Never => Decision::Done,
            };
        }
        if policy.restart == Restart::Never && end != End::OverMemory {
            return Decision::Done;
        }
        if let Some(limit) = policy.limit {
            while self
                .crashes
                .front()
                .is_some_and(|&t| now.saturating_duration_since(t) >= limit.within)
            {
                self.crashes.pop_front();
            }
            self.crashes.push_back(now);
            let crashes = u32::try_from(self.crashes.len()).unwrap_or(u32::MAX);
            if crashes >= limit.burst {
                return Decision::GiveUp {
                    crashes,
                    within: limit.within,
                };
            }
        }
        let after = policy.backoff.delay(self.streak);
        self.streak = self.streak.saturating_add(1);
        Decision::Restart { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(restart: Restart, limit: Option<(u32, u64)>) -> Policy {
        Policy {
            restart,
            backoff: Backoff {
                min: 100 * MS,
                max: 1000 * MS,
            },
            limit: limit.map(|(burst, secs)| StartLimit {
                burst,
                within: Duration::from_secs(secs),
            }),
        }
    }

    /// Feeds a run of `ran` that ended `end`, starting `gap` after the previous end; returns
    /// the decision and advances `now` to the end of the run.
    fn step(h: &mut History, p: &Policy, now: &mut Instant, ran: Duration, end: End) -> Decision {
        let started = *now;
        *now += ran;
        h.on_end(p, started, *now, end)
    }

    fn restart(ms: u32) -> Decision {
        Decision::Restart { after: ms * MS }
    }

    const CRASH: End = End::Exited(Exit::Code(3));

    #[test]
    fn consecutive_crashes_double_the_delay_up_to_the_maximum() {
        let p = policy(Restart::Always, None);
        let (mut h, mut now) = (History::default(), Instant::now());
        let delays: Vec<Decision> = (0..6)
            .map(|_| step(&mut h, &p, &mut now, 10 * MS, CRASH))
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000].map(restart).to_vec()
        );
    }

    #[test]
    fn a_stable_run_or_a_clean_exit_starts_the_delay_over() {
        let p = policy(Restart::Always, None);
        let (mut h, mut now) = (History::default(), Instant::now());
        for _ in 0..3 {
            step(&mut h, &p, &mut now, 10 * MS, CRASH);
        }
        // Ran for 9 s: shorter than the 10 s floor, so still consecutive.
        assert_eq!(
            step(&mut h, &p, &mut now, Duration::from_secs(9), CRASH),
            restart(800)
        );
        assert_eq!(
            step(&mut h, &p, &mut now, Duration::from_secs(10), CRASH),
            restart(100)
        );
        step(&mut h, &p, &mut now, 10 * MS, CRASH);
        assert_eq!(
            step(&mut h, &p, &mut now, 10 * MS, End::Exited(Exit::Code(0))),
            restart(100)
        );
        assert_eq!(step(&mut h, &p, &mut now, 10 * MS, CRASH), restart(100));
    }

    #[test]
    fn the_stable_time_is_the_backoff_maximum_when_that_is_longer() {
        let mut p = policy(Restart::Always, None);
        p.backoff.max = Duration::from_secs(30);
        assert_eq!(p.stable_after(), Duration::from_secs(30));
        assert_eq!(policy(Restart::Always, None).stable_after(), STABLE_FLOOR);
    }

    #[test]
    fn the_restart_rule_decides_which_ends_restart() {
        let now = Instant::now();
        let later = now + MS;
        let kill = End::Exited(Exit::Signal(9));
        let clean = End::Exited(Exit::Code(0));
        let cases = [
            (Restart::Always, clean, restart(100)),
            (Restart::Always, kill, restart(100)),
            (Restart::OnFailure, clean, Decision::Done),
            (Restart::OnFailure, CRASH, restart(100)),
            (Restart::OnFailure, kill, restart(100)),
            (Restart::Never, clean, Decision::Done),
            (Restart::Never, CRASH, Decision::Done),
            (Restart::Never, kill, Decision::Done),
            // --memory-limit promises a restart whatever --restart says.
            (Restart::Never, End::OverMemory, restart(100)),
            (Restart::OnFailure, End::OverMemory, restart(100)),
            (Restart::Never, End::Rolling, restart(0)),
        ];
        for (rule, end, expected) in cases {
            let got = History::default().on_end(&policy(rule, None), now, later, end);
            assert_eq!(got, expected, "--restart {rule:?}, {end:?}");
        }
    }

    #[test]
    fn the_burst_th_crash_within_the_window_gives_up() {
        let p = policy(Restart::Always, Some((3, 60)));
        let (mut h, mut now) = (History::default(), Instant::now());
        assert_eq!(step(&mut h, &p, &mut now, 10 * MS, CRASH), restart(100));
        assert_eq!(
            step(&mut h, &p, &mut now, 10 * MS, End::OverMemory),
            restart(200)
        );
        assert_eq!(
            step(&mut h, &p, &mut now, 10 * MS, CRASH),
            Decision::GiveUp {
                crashes: 3,
                within: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn crashes_outside_the_window_do_not_count() {
        let p = policy(Restart::Always, Some((3, 60)));
        let (mut h, mut now) = (History::default(), Instant::now());
        // Two crashes 40 s apart, forever: never 3 within 60 s.
        for _ in 0..10 {
            let d = step(&mut h, &p, &mut now, Duration::from_secs(40), CRASH);
            assert!(matches!(d, Decision::Restart { .. }), "{d:?}");
        }
        // Clean exits and rolling restarts are not crashes.
        let p = policy(Restart::Always, Some((2, 60)));
        let (mut h, mut now) = (History::default(), Instant::now());
        step(&mut h, &p, &mut now, MS, CRASH);
        step(&mut h, &p, &mut now, MS, End::Exited(Exit::Code(0)));
        step(&mut h, &p, &mut now, MS, End::Rolling);
        assert!(matches!(
            step(&mut h, &p, &mut now, MS, CRASH),
            Decision::GiveUp { crashes: 2, .. }
        ));
    }

    #[test]
    fn a_limit_of_one_gives_up_at_the_first_crash() {
        let p = policy(Restart::OnFailure, Some((1, 1)));
        let now = Instant::now();
        assert!(matches!(
            History::default().on_end(&p, now, now, CRASH),
            Decision::GiveUp { crashes: 1, .. }
        ));
    }

    #[test]
    fn delays_never_overflow() {
        let b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::MAX,
        };
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(3), Duration::from_secs(8));
        assert!(b.delay(u32::MAX) >= Duration::from_secs(1 << 31));
    }

    #[test]
    fn exits_in_words() {
        assert_eq!(Exit::Code(3).to_string(), "exited with status 3");
        assert_eq!(
            Exit::Signal(9).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            Exit::Signal(15).to_string(),
            "was killed by signal 15 (SIGTERM)"
        );
        assert_eq!(Exit::Signal(40).to_string(), "was killed by signal 40");
        assert!(Exit::Code(0).success());
        assert!(!Exit::Signal(0).success());
    }
}
