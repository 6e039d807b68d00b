//! `--memory-limit` enforced by the kernel: a cgroup v2 group per worker with `memory.max`.
//!
//! Sampling can only notice a fast allocator after the fact; the kernel refuses it the page
//! that crosses the limit. So where the nanny can create cgroups, each worker's guard is put
//! in a group of its own before the command starts (everything the command forks stays in
//! it), with `memory.max` set to the limit and `memory.swap.max` to 0. When the group runs out,
//! the kernel's OOM killer kills a process in it, and the nanny, which reads the group's
//! `memory.events` at every sample, stops what is left of the worker at once (SIGKILL) and
//! restarts it as for any memory stop.
//!
//! Where: the nanny's own cgroup (from `/proc/self/cgroup`, under the cgroup2 mount found in
//! `/proc/self/mountinfo`). Groups below it can have `memory.max` only if the memory
//! controller is available there and enabled in its `cgroup.subtree_control`; cgroup v2 lets
//! a group enable controllers for its children only while it has no processes of its own (the
//! root excepted). So the nanny moves itself into a leaf `turnstile-nanny-PID` first, then
//! enables the controller; if another process shares its cgroup, that fails, the nanny moves
//! back, and the limit falls back to sampling. Typical places where this works: a systemd
//! service with `Delegate=yes`, a container whose main process is the nanny, a root shell on a
//! host without systemd. The fallback, and why, is logged.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The nanny's cgroup set-up for worker groups.
pub struct Cgroups {
    /// The nanny's cgroup when it started: the parent of the worker groups.
    own: PathBuf,
    /// The leaf the nanny moved itself into, if it did (to enable the controller).
    leaf: Option<PathBuf>,
    limit: u64,
    pid: u32,
}

impl Cgroups {
    /// Sets up worker groups with `memory.max = limit`, or says why it cannot.
    pub fn setup(limit: u64) -> Result<Cgroups, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
        let cgroup = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let rel = unified_path(&cgroup).ok_or("the nanny is in no cgroup v2 group")?;
        let own = match rel.trim_start_matches('/') {
            "" => PathBuf::from(&mount),
            rel => Path::new(&mount).join(rel),
        };
        let has_memory = |file: &str| {
            fs::read_to_string(own.join(file))
                .map(|s| s.split_whitespace().any(|c| c == "memory"))
                .unwrap_or(false)
        };
        if !has_memory("cgroup.controllers") {
            return Err(format!(
                "the memory controller is not available in {}",
                own.display()
            ));
        }
        let pid = std::process::id();
        let mut groups = Cgroups {
            own: own.clone(),
            leaf: None,
            limit,
            pid,
        };
        if !has_memory("cgroup.subtree_control") {
            let leaf = own.join(format!("turnstile-nanny-{pid}"));
            let moved = fs::create_dir(&leaf)
                .and_then(|()| fs::write(leaf.join("cgroup.procs"), pid.to_string()));
            if let Err(e) = moved {
                let _ = fs::remove_dir(&leaf);
                return Err(format!("cannot create a cgroup in {}: {e}", own.display()));
            }
            groups.leaf = Some(leaf);
            if let Err(e) = fs::write(own.join("cgroup.subtree_control"), "+memory") {
                // Dropped here: moves the nanny back and removes the leaf.
                drop(groups);
                return Err(format!(
                    "cannot enable the memory controller in {} (other processes share it?): {e}",
                    own.display()
                ));
            }
        }
        Ok(groups)
    }

    /// Where the groups are.
    pub fn parent(&self) -> &Path {
        &self.own
    }

    fn dir(&self, worker: usize) -> PathBuf {
        self.own
            .join(format!("turnstile-nanny-{}-worker-{worker}", self.pid))
    }

    /// Creates worker `worker`'s group (afresh: its counters start at 0) and puts `pid` (its
    /// guard, before the command starts) in it.
    pub fn enter(&self, worker: usize, pid: i32) -> io::Result<()> {
        let dir = self.dir(worker);
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir)?;
        fs::write(dir.join("memory.max"), self.limit.to_string())?;
        // Absent without swap accounting; then there is no swap to escape to either.
        let _ = fs::write(dir.join("memory.swap.max"), "0");
        fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// How many processes of worker `worker` the kernel killed for going over `memory.max`.
    pub fn oom_kills(&self, worker: usize) -> u64 {
        fs::read_to_string(self.dir(worker).join("memory.events"))
            .ok()
            .and_then(|events| {
                events.lines().find_map(|l| {
                    let (key, n) = l.split_once(' ')?;
                    (key == "oom_kill").then(|| n.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// Removes worker `worker`'s group, once none of its processes is left.
    pub fn remove(&self, worker: usize) {
        let _ = fs::remove_dir(self.dir(worker));
    }
}

impl Drop for Cgroups {
    /// Puts things back as they were: the nanny in its cgroup, the controller off, the leaf
    /// gone (the worker groups are removed as their workers end).
    fn drop(&mut self) {
        if let Some(leaf) = &self.leaf {
            let _ = fs::write(self.own.join("cgroup.subtree_control"), "-memory");
            let _ = fs::write(self.own.join("cgroup.procs"), self.pid.to_string());
            let _ = fs::remove_dir(leaf);
        }
    }
}

/// The mount point of the cgroup2 file system, from `/proc/self/mountinfo` (the file system
/// type follows the ` - ` separator; the mount point is the fifth field).
fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        if tail.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(head.split_whitespace().nth(4)?.to_owned())
    })
}

/// The cgroup v2 path of this process, from `/proc/self/cgroup` (the `0::PATH` line).
fn unified_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_and_path_are_found() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let pure =
            "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/sda1 rw\n"), None);
        assert_eq!(
            unified_path("4:memory:/x\n0::/system.slice/t.service\n").as_deref(),
            Some("/system.slice/t.service")
        );
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    /// Here or in CI, either the set-up works or it says why not; it never panics, and a
    /// failed set-up leaves the nanny where it was.
    #[test]
    fn set_up_works_or_says_why() {
        let before = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match Cgroups::setup(64 << 20) {
            Ok(groups) => drop(groups),
            Err(why) => assert!(!why.is_empty()),
        }
        assert_eq!(
            fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            before
        );
    }
}
