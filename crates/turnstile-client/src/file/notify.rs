//! Wakes a waiter when a directory it depends on changes in a way that can let it through:
//! for an acquire, a slot or a queue ticket removed (released, withdrawn, reclaimed) or the
//! semaphore closed; for a group wait, also a job's completion recorded or the group's
//! members changed. Only changes made on this host raise an event (inotify does not see
//! other NFS clients), so this shortens waits; the poll of the waiting loop still bounds
//! them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// What a watched directory is, which decides the events that matter in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A semaphore's (or a job lock's) directory or its `queue/`: slots and tickets removed,
    /// `closed` created.
    Semaphore,
    /// A job's directory: its `done` file created.
    Job,
    /// A group's directory of membership markers: any marker created or removed.
    Group,
}

impl Kind {
    fn flags(self) -> AddWatchFlags {
        match self {
            Kind::Semaphore => {
                AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_CREATE
            }
            Kind::Job => AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            Kind::Group => {
                AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
            }
        }
    }
}

/// An inotify watch on some directories.
pub(super) struct Watch {
    /// `None` only while dropping.
    fd: Option<AsyncFd<Owned>>,
    kinds: HashMap<WatchDescriptor, Kind>,
}

/// Closing an inotify instance waits for an RCU grace period in the kernel
/// (`fsnotify_destroy_group` calls `synchronize_srcu`): 10–20 ms on this VM, measured with
/// `strace -tt`. A waiter that was just granted must not wait for that, so the descriptor is
/// closed on tokio's blocking pool (inline when there is no runtime).
impl Drop for Watch {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else {
            return;
        };
        // Deregistered from the reactor here, on the runtime's thread; only the close moves.
        let owned = fd.into_inner();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn_blocking(move || drop(owned)));
        }
    }
}

/// The inotify instance, which owns its file descriptor from creation to drop.
struct Owned(Inotify);

impl AsRawFd for Owned {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watch {
    /// A watch on a semaphore's directory and its `queue/`, or `None` where inotify is
    /// unavailable (then the waiter only polls).
    pub(super) fn new(sem_dir: &Path) -> Option<Watch> {
        Watch::on(&[
            (sem_dir.to_owned(), Kind::Semaphore),
            (sem_dir.join("queue"), Kind::Semaphore),
        ])
    }

    /// A watch on every directory of `dirs`, or `None` if one of them cannot be watched
    /// (missing, or out of inotify watches): then the waiter only polls.
    pub(super) fn on(dirs: &[(PathBuf, Kind)]) -> Option<Watch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let mut kinds = HashMap::with_capacity(dirs.len());
        for (dir, kind) in dirs {
            let wd = inotify.add_watch(dir, kind.flags()).ok()?;
            kinds.insert(wd, *kind);
        }
        // `AsyncFd::new` is deprecated because it cannot check that an arbitrary `T` keeps
        // returning the same open descriptor while registered; `Owned` does (the `Inotify`
        // owns its descriptor and closes it only when dropped, after the `AsyncFd` deregisters
        // it). The unsafe `register` that replaces it is not open to this crate
        // (`unsafe_code = "forbid"`).
        #[allow(deprecated)]
        let fd = AsyncFd::new(Owned(inotify)).ok()?;
        Some(Watch {
            fd: Some(fd),
            kinds,
        })
    }

    /// Completes at the next relevant change. Pending forever if the watch breaks (the poll
    /// takes over).
    pub(super) async fn changed(&self) {
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return std::future::pending().await;
            };
            match ready.get_inner().0.read_events() {
                Ok(events) => {
                    let hit = events
                        .iter()
                        .any(|e| self.kinds.get(&e.wd).is_some_and(|k| relevant(*k, e)));
                    if hit {
                        return;
                    }
                }
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => return std::future::pending().await,
            }
        }
    }
}

/// Sleeps for `nap`, or less if `watch` reports a relevant change first. Returns whether
/// it was woken by a change (the waiter then looks again at once and polls fast).
pub(super) async fn nap(watch: Option<&Watch>, nap: std::time::Duration) -> bool {
    match watch {
        Some(w) => tokio::select! {
            _ = tokio::time::sleep(nap) => false,
            _ = w.changed() => true,
        },
        None => {
            tokio::time::sleep(nap).await;
            false
        }
    }
}

/// Whether an event can unblock a waiter. Temporary and reclaim files (`.tmp-*`,
/// `.reclaim-*`) come and go during every claim, the waiter's own included; waking on them
/// would make waiters spin.
fn relevant(kind: Kind, e: &InotifyEvent) -> bool {
    let Some(name) = e.name.as_ref().and_then(|n| n.to_str()) else {
        return false;
    };
    let removed = e
        .mask
        .intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM);
    let created = e
        .mask
        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
    match kind {
        Kind::Semaphore => {
            let is_ticket = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
            (removed && (name.starts_with("slot-") || is_ticket)) || (created && name == "closed")
        }
        Kind::Job => created && name == "done",
        Kind::Group => (created || removed) && !name.starts_with('.'),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(10);
    /// Long enough to show that an event does *not* wake the watcher.
    const QUIET: Duration = Duration::from_millis(200);

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("turnstile-notify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("queue")).expect("mkdir");
        dir
    }

    #[tokio::test]
    async fn wakes_on_release_withdrawal_and_close_only() {
        let dir = scratch("wake");
        std::fs::write(dir.join("slot-0"), "x").expect("write");
        std::fs::write(dir.join("queue").join("00000000000000000001"), "x").expect("write");
        let w = Watch::new(&dir).expect("inotify on Linux");

        // Claims come and go through temporary names: no wake.
        std::fs::write(dir.join(".tmp-abc"), "x").expect("write");
        std::fs::remove_file(dir.join(".tmp-abc")).expect("rm");
        std::fs::write(dir.join("slot-1"), "x").expect("a new claim");
        assert!(
            tokio::time::timeout(QUIET, w.changed()).await.is_err(),
            "woken by a claim"
        );

        // A released slot, a withdrawn ticket, a close: each wakes.
        std::fs::remove_file(dir.join("slot-0")).expect("rm");
        tokio::time::timeout(PATIENCE, w.changed())
            .await
            .expect("woken by a release");
        std::fs::rename(
            dir.join("queue").join("00000000000000000001"),
            dir.join(".reclaim-1"),
        )
        .expect("mv");
        tokio::time::timeout(PATIENCE, w.changed())
            .await
            .expect("woken by a reclaimed ticket");
        std::fs::write(dir.join("closed"), "").expect("write");
        tokio::time::timeout(PATIENCE, w.changed())
            .await
            .expect("woken by a close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn job_and_group_watches_wake_on_completion_and_membership_only() {
        let dir = scratch("job");
        let (job, group) = (dir.join("job"), dir.join("group"));
        std::fs::create_dir_all(&job).expect("mkdir");
        std::fs::create_dir_all(&group).expect("mkdir");
        let w = Watch::on(&[(job.clone(), Kind::Job), (group.clone(), Kind::Group)])
            .expect("inotify on Linux");

        // Failure records, temporary files and the group file do not wake a group wait.
        std::fs::write(job.join(".tmp-1"), "x").expect("write");
        std::fs::rename(job.join(".tmp-1"), job.join("last-failure")).expect("mv");
        std::fs::write(group.join(".tmp-2"), "x").expect("write");
        assert!(
            tokio::time::timeout(QUIET, w.changed()).await.is_err(),
            "woken by bookkeeping"
        );

        std::fs::write(job.join("done"), "x").expect("write");
        tokio::time::timeout(PATIENCE, w.changed())
            .await
            .expect("woken by a completion");
        std::fs::write(group.join("some-job"), "x").expect("write");
        tokio::time::timeout(PATIENCE, w.changed())
            .await
            .expect("woken by a new member");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_watch_without_the_directory() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        assert!(Watch::new(Path::new("/nonexistent/turnstile/sem")).is_none());
    }

    /// Watches closed in the background are closed all the same: no descriptor is leaked
    /// (checked by counting inotify descriptors in `/proc/self/fd`, which other tests of
    /// this binary may open and close meanwhile, hence the margin and the wait).
    #[tokio::test]
    async fn dropped_watches_are_closed() {
        fn inotify_fds() -> usize {
            std::fs::read_dir("/proc/self/fd")
                .expect("/proc/self/fd")
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().contains("inotify"))
                .count()
        }
        let dir = scratch("drop");
        let before = inotify_fds();
        let watches: Vec<Watch> = (0..50)
            .map(|_| Watch::new(&dir).expect("inotify on Linux"))
            .collect();
        assert!(inotify_fds() >= before + 50);
        drop(watches);
        let deadline = std::time::Instant::now() + PATIENCE;
        while inotify_fds() > before + 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "dropped watches were not closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
