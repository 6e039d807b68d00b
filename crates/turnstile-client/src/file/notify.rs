//! Wakes a waiting acquire when its semaphore's directory changes in a way that can let it
//! through: a slot or a queue ticket removed (released, withdrawn, reclaimed), or the
//! semaphore closed. Only changes made on this host raise an event (inotify does not see
//! other NFS clients), so this shortens waits; the poll in the acquire loop still bounds them.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;

/// An inotify watch on one semaphore directory and its `queue/`.
pub(super) struct Watch {
    fd: AsyncFd<Owned>,
}

/// The inotify instance, which owns its file descriptor from creation to drop.
struct Owned(Inotify);

impl AsRawFd for Owned {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watch {
    /// A watch, or `None` where inotify is unavailable (then the waiter only polls).
    pub(super) fn new(sem_dir: &Path) -> Option<Watch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let flags =
            AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_CREATE;
        inotify.add_watch(sem_dir, flags).ok()?;
        inotify.add_watch(&sem_dir.join("queue"), flags).ok()?;
        // `AsyncFd::new` is deprecated because it cannot check that an arbitrary `T` keeps
        // returning the same open descriptor while registered; `Owned` does (the `Inotify`
        // owns its descriptor and closes it only when dropped, after the `AsyncFd` deregisters
        // it). The unsafe `register` that replaces it is not open to this crate
        // (`unsafe_code = "forbid"`).
        #[allow(deprecated)]
        let fd = AsyncFd::new(Owned(inotify)).ok()?;
        Some(Watch { fd })
    }

    /// Completes at the next relevant change. Pending forever if the watch breaks (the poll
    /// takes over).
    pub(super) async fn changed(&self) {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            match ready.get_inner().0.read_events() {
                Ok(events) => {
                    if events.iter().any(relevant) {
                        return;
                    }
                }
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => return std::future::pending().await,
            }
        }
    }
}

/// Whether an event can unblock a waiter. Temporary and reclaim files (`.tmp-*`,
/// `.reclaim-*`) come and go during every claim, the waiter's own included; waking on them
/// would make waiters spin.
fn relevant(e: &InotifyEvent) -> bool {
    let Some(name) = e.name.as_ref().and_then(|n| n.to_str()) else {
        return false;
    };
    let removed = e
        .mask
        .intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM);
    let is_ticket = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
    (removed && (name.starts_with("slot-") || is_ticket))
        || (e.mask.contains(AddWatchFlags::IN_CREATE) && name == "closed")
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

    #[test]
    fn no_watch_without_the_directory() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        assert!(Watch::new(Path::new("/nonexistent/turnstile/sem")).is_none());
    }
}
