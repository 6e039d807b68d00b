//! Which processes belong to a worker, and how much memory they use, read from `/proc`.
//!
//! A worker is its *leader* (the process the nanny spawned, which leads a process group of
//! its own) and everything it started. Processes can leave the group (`setsid`, `setpgid`)
//! and the tree (when their parent dies they are re-parented), so membership takes the union
//! of three views:
//!
//! - every process in the leader's process group;
//! - every descendant, through parent links, of those;
//! - every process re-parented to the nanny (which is a child subreaper, so every orphan of
//!   its subtree lands there) that the driver *adopts* for this worker — by process group, or
//!   by the worker's session id in its environment — and that process's descendants.
//!
//! [`Table`] is a snapshot of `/proc`; the functions on it are pure, so they are tested on
//! hand-made tables as well as on real processes.

use std::collections::{BTreeSet, HashMap};
use std::io;

/// One process, from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// State letter (`R`, `S`, `D`, `Z` for a zombie, ...).
    pub state: char,
    /// Resident set size, in pages.
    pub rss_pages: u64,
}

impl ProcInfo {
    /// A zombie has exited and waits to be reaped: it uses no memory, but it still exists.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Parses the contents of `/proc/PID/stat`. The command name (field 2) is in parentheses and
/// may itself contain spaces and parentheses, so the fields are counted from the *last* `)`.
pub fn parse_stat(stat: &str) -> Option<ProcInfo> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    // Fields 3 onwards: state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt,
    // majflt, cmajflt, utime, stime, cutime, cstime, priority, nice, num_threads,
    // itrealvalue, starttime, vsize, rss (field 24).
    let fields: Vec<&str> = tail.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// A snapshot of the processes on the machine (or those the caller chose, in tests).
#[derive(Clone, Debug, Default)]
pub struct Table {
    procs: HashMap<i32, ProcInfo>,
    children: HashMap<i32, Vec<i32>>,
}

impl Table {
    /// The process group of `pid`, if it was seen.
    pub fn pgid(&self, pid: i32) -> Option<i32> {
        self.procs.get(&pid).map(|p| p.pgid)
    }

    /// Reads every process from `/proc`. Processes that exit while it reads are skipped.
    pub fn read() -> io::Result<Table> {
        let mut procs = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue; // it exited in between
            };
            if let Some(info) = parse_stat(&stat) {
                procs.push(info);
            }
        }
        Ok(Table::from_procs(procs))
    }

    /// A table of the given processes.
    pub fn from_procs(list: impl IntoIterator<Item = ProcInfo>) -> Table {
        let mut table = Table::default();
        for p in list {
            table.children.entry(p.ppid).or_default().push(p.pid);
            table.procs.insert(p.pid, p);
        }
        table
    }

    /// The children of `pid`.
    pub fn children(&self, pid: i32) -> impl Iterator<Item = &ProcInfo> + '_ {
        self.children
            .get(&pid)
            .into_iter()
            .flatten()
            .filter_map(|c| self.procs.get(c))
    }

    /// `roots` (those in the table) and all their descendants.
    pub fn subtree(&self, roots: impl IntoIterator<Item = i32>) -> BTreeSet<i32> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<i32> = roots
            .into_iter()
            .filter(|p| self.procs.contains_key(p))
            .collect();
        while let Some(pid) = stack.pop() {
            if seen.insert(pid) {
                stack.extend(self.children.get(&pid).into_iter().flatten().copied());
            }
        }
        seen
    }

    /// The processes of the worker whose process group is `group` (the leader's pid): see the
    /// module doc. `leader` is the leader's pid while the nanny has not reaped it (after that
    /// the pid may belong to someone else). `adopt` says whether a child of `nanny` belongs to
    /// this worker; it is asked only about children that are not in the group.
    pub fn worker(
        &self,
        nanny: i32,
        group: i32,
        leader: Option<i32>,
        adopt: impl Fn(&ProcInfo) -> bool,
    ) -> BTreeSet<i32> {
        let in_group = self
            .procs
            .values()
            .filter(|p| p.pgid == group)
            .map(|p| p.pid);
        let adopted = self
            .children(nanny)
            .filter(|p| p.pgid != group && adopt(p))
            .map(|p| p.pid);
        let roots: Vec<i32> = leader.into_iter().chain(in_group).chain(adopted).collect();
        self.subtree(roots)
    }

    /// The summed resident memory of `pids` in bytes (zombies use none). Pages shared between
    /// processes count once per process, as in `ps` and `top`.
    pub fn rss_bytes(&self, pids: &BTreeSet<i32>, page_size: u64) -> u64 {
        pids.iter()
            .filter_map(|p| self.procs.get(p))
            .filter(|p| !p.is_zombie())
            .map(|p| p.rss_pages.saturating_mul(page_size))
            .fold(0, u64::saturating_add)
    }
}

/// Whether this kernel lists a process's children in `/proc/PID/task/TID/children`
/// (`CONFIG_PROC_CHILDREN`, on in the usual distribution kernels).
pub fn has_children_files() -> bool {
    std::path::Path::new("/proc/thread-self/children").exists()
}

/// The children of `pid` (forked by any of its threads), from its `children` files; empty
/// when it is gone.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    out
}

/// Every descendant of `pid` (not `pid` itself), found by walking `children` files: the cost
/// is that of the tree, not of every process on the machine. `None` if the kernel has no
/// `children` files (then use [`Table::read`]).
pub fn descendants(pid: i32) -> Option<BTreeSet<i32>> {
    if !has_children_files() {
        return None;
    }
    let mut seen = BTreeSet::new();
    let mut stack = children_of(pid);
    while let Some(p) = stack.pop() {
        if seen.insert(p) {
            stack.extend(children_of(p));
        }
    }
    Some(seen)
}

/// The resident memory of `pid` in pages, from `/proc/PID/statm` (the cheapest file that has
/// it); `None` when it is gone.
pub fn resident_pages(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the environment `pid` started with contains the entry `entry` (`KEY=VALUE`).
/// `false` when it cannot be read (the process is gone, or belongs to another user).
pub fn environ_contains(pid: i32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
        .unwrap_or(false)
}

/// The size of a memory page in bytes (4096 when the system will not say).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

/// A size in the largest binary unit that keeps it at least 1: `812 KiB`, `612 MiB`,
/// `1.5 GiB` (one decimal when the number is below 10).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut scaled = bytes as f64;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if scaled < 10.0 && scaled.fract() >= 0.05 {
        format!("{scaled:.1} {}", UNITS[unit])
    } else {
        format!("{scaled:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, pgid: i32, state: char, rss_pages: u64) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            pgid,
            state,
            rss_pages,
        }
    }

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (my (odd) cmd) S 17 4200 4200 34816 4200 4194304 320 0 0 0 1 2 0 0 20 0 \
                    1 0 123456 9162752 618 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(parse_stat(line), Some(p(4242, 17, 4200, 'S', 618)));
        let zombie = "7 (sh) Z 1 7 7 0 -1 4227148 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0 0";
        assert_eq!(parse_stat(zombie), Some(p(7, 1, 7, 'Z', 0)));
        for bad in [
            "",
            "12 (x",
            "12 (x) S 1 2",
            "x (y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    /// The nanny is 100; workers lead groups 200 and 300.
    fn table() -> Table {
        Table::from_procs([
            p(1, 0, 1, 'S', 10),
            p(100, 1, 100, 'S', 10),
            // Worker 200: a child in its group, a grandchild that moved to its own group.
            p(200, 100, 200, 'S', 100),
            p(201, 200, 200, 'S', 50),
            p(202, 201, 202, 'S', 25),
            // Worker 300, with a zombie child.
            p(300, 100, 300, 'S', 7),
            p(301, 300, 300, 'Z', 0),
            // Orphans re-parented to the nanny: one still in group 200, one in a session of
            // its own with a child, one nobody claims.
            p(400, 100, 200, 'S', 1),
            p(500, 100, 500, 'S', 2),
            p(501, 500, 500, 'S', 3),
            p(600, 100, 600, 'S', 4),
            // Unrelated.
            p(700, 1, 700, 'S', 1000),
        ])
    }

    fn set(pids: &[i32]) -> BTreeSet<i32> {
        pids.iter().copied().collect()
    }

    #[test]
    fn a_worker_is_its_group_its_tree_and_the_orphans_it_adopts() {
        let t = table();
        let adopt_500 = |q: &ProcInfo| q.pid == 500;
        assert_eq!(
            t.worker(100, 200, Some(200), adopt_500),
            set(&[200, 201, 202, 400, 500, 501])
        );
        assert_eq!(t.worker(100, 300, Some(300), |_| false), set(&[300, 301]));
        assert_eq!(t.rss_bytes(&t.worker(100, 200, None, |_| false), 10), 1760);
        assert_eq!(t.rss_bytes(&set(&[300, 301]), 4096), 7 * 4096);
        // Once everything is gone, nothing is left of the worker.
        assert!(t.worker(100, 900, None, |_| false).is_empty());
        // A leader that left its group is still found while it lives.
        let moved = Table::from_procs([
            p(100, 1, 100, 'S', 0),
            p(200, 100, 250, 'S', 0),
            p(201, 200, 250, 'S', 0),
        ]);
        assert_eq!(
            moved.worker(100, 200, Some(200), |_| false),
            set(&[200, 201])
        );
        assert!(moved.worker(100, 200, None, |_| false).is_empty());
        assert_eq!(t.subtree([100]).len(), 10);
    }

    #[test]
    fn real_processes_and_their_children_are_found() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let leader = i32::try_from(child.id()).expect("pid fits in i32");
        let me = i32::try_from(std::process::id()).expect("pid fits in i32");
        let mut found = BTreeSet::new();
        for _ in 0..400 {
            found = Table::read()
                .expect("read /proc")
                .worker(me, leader, Some(leader), |_| false);
            if found.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(leader),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        assert_eq!(found.len(), 3, "sh and two sleeps: {found:?}");
        assert!(found.contains(&leader));
        let t = Table::read().expect("read /proc");
        assert!(t.rss_bytes(&set(&[me]), page_size()) > 0);
        assert!(environ_contains(
            me,
            &format!("PATH={}", std::env::var("PATH").unwrap_or_default())
        ));
        assert!(!environ_contains(me, "NO_SUCH_VARIABLE_HERE=1"));
    }

    #[test]
    fn sizes_in_words() {
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(812 * 1024), "812 KiB");
        assert_eq!(format_size(612 << 20), "612 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(2 << 30), "2 GiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
    }
}
