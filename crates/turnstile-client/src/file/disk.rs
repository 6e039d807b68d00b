//! The on-disk pieces of the file backend: semaphore names as file names, the lease record
//! and its heartbeat counter, and the few file operations it builds on (write-then-link
//! claims, fd-checked in-place heartbeats, and the rename-based reclaim). Nothing here keeps
//! state or knows about tokio.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::random_id;

/// The longest semaphore name, in bytes (as on the coordinator).
pub(crate) const MAX_NAME_LEN: usize = 255;

/// Escaped names longer than this are shortened and suffixed with a hash, so that the
/// directory name stays well within the usual 255-byte limit of a file name.
const MAX_DIR_NAME: usize = 200;

/// Files read by the backend are tiny; anything longer is garbage and read no further.
const MAX_RECORD: u64 = 4096;

/// Checks a semaphore name as the coordinator does: 1..=255 bytes, no control characters.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    validate_label("semaphore name", name)
}

/// Checks a name given by a client (`what`: "job name", "group name"...) as the coordinator
/// does: 1..=255 bytes, no control characters (so a name fits on one line of a file).
pub(crate) fn validate_label(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

/// The directory name of a semaphore: its bytes with everything but `[A-Za-z0-9_.-]` (and a
/// leading `.`) percent-encoded, so that no name can escape the directory, be hidden, or
/// clash with another. An escaped name longer than 200 bytes keeps its first 150 bytes and
/// gets `~` and a 64-bit FNV-1a hash of the name (`~` never appears otherwise, since it is
/// escaped); the `capacity` file records the full name, and a clash is detected there.
pub(crate) fn dir_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() <= MAX_DIR_NAME {
        return out;
    }
    let mut cut = 150;
    // Do not split a %XX escape.
    let b = out.as_bytes();
    while cut >= 2 && (b[cut - 1] == b'%' || b[cut - 2] == b'%') {
        cut -= 1;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}~{hash:016x}", &out[..cut])
}

/// The `capacity` file: the capacity on the first line, the full name on the second.
pub(crate) fn capacity_record(capacity: u32, name: &str) -> Vec<u8> {
    format!("{capacity}\n{name}\n").into_bytes()
}

/// Parses a `capacity` file.
pub(crate) fn parse_capacity(bytes: &[u8]) -> Option<(u32, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (first, rest) = text.split_once('\n')?;
    let capacity: u32 = first.trim().parse().ok().filter(|&c| c > 0)?;
    let name = rest.strip_suffix('\n').unwrap_or(rest);
    Some((capacity, name.to_owned()))
}

/// Who a process is, as far as telling whether a pid on this machine is still alive goes:
/// the host name, the boot id and the pid namespace, so that a pid is only ever looked up in
/// the namespace it came from (containers sharing a host name, a rebooted host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ident {
    pub host: String,
    pub boot: String,
    pub pidns: String,
    pub pid: u32,
}

impl Ident {
    /// This process.
    pub(crate) fn current() -> Ident {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "-".into());
        let pidns = fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "-".into());
        Ident {
            host: word(&host),
            boot: word(&boot),
            pidns: word(&pidns),
            pid: std::process::id(),
        }
    }

    /// Whether the process `other` names is known to be gone: it ran on this very machine
    /// and namespace, and `kill(pid, 0)` says there is no such process.
    pub(crate) fn knows_dead(&self, other: &Ident) -> bool {
        if self.host != other.host || self.boot != other.boot || self.pidns != other.pidns {
            return false;
        }
        // Without a boot id and a pid namespace we cannot tell whose pid it is.
        if other.pid == self.pid || self.boot == "-" || self.pidns == "-" {
            return false;
        }
        let Ok(pid) = i32::try_from(other.pid) else {
            return false;
        };
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::ESRCH) => true,
            // A zombie has exited and only waits for its parent (init may be slow) to reap
            // it: it can no longer act.
            Ok(()) => fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
                .unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// A value as one whitespace-free word of a record.
fn word(s: &str) -> String {
    let w: String = s
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if w.is_empty() {
        "-".into()
    } else {
        w
    }
}

/// What a slot file (a held permit), a queue ticket or a token file says: one line of
/// `key=value` words. The nonce makes every record unique, so that "the same content" means
/// "the same acquire". The line ends with the heartbeat counter (` beat=` and 16 hex digits),
/// which its owner bumps at every heartbeat (see [`next_beat`]): everything before it is the
/// record's identity ([`same_acquire`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub lease: u64,
    pub session: u64,
    pub weight: u32,
    pub token: u64,
    pub ttl_ms: u64,
    pub start_ms: u64,
    pub nonce: u64,
    pub who: Ident,
    /// More processes of `who`'s host whose life keeps the record alive (optional
    /// `also_pids=P,Q`; records of older clients lack it).
    pub also_pids: Vec<u32>,
}

impl Record {
    /// Whether the holder and every process in `also_pids` are known to be gone (see
    /// [`Ident::knows_dead`]).
    pub(crate) fn holder_dead(&self, me: &Ident) -> bool {
        me.knows_dead(&self.who)
            && self.also_pids.iter().all(|&pid| {
                me.knows_dead(&Ident {
                    pid,
                    ..self.who.clone()
                })
            })
    }

    /// The bytes of the record.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let also = if self.also_pids.is_empty() {
            String::new()
        } else {
            let pids: Vec<String> = self.also_pids.iter().map(u32::to_string).collect();
            format!(" also_pids={}", pids.join(","))
        };
        // The heartbeat counter stays last: `next_beat` finds it at a fixed distance from the end.
        format!(
            "turnstile-lease-v1 lease={} session={:016x} weight={} token={} ttl_ms={} start_ms={} nonce={:016x} host={} boot={} pidns={} pid={}{also}{BEAT_KEY}{:016x}\n",
            self.lease,
            self.session,
            self.weight,
            self.token,
            self.ttl_ms,
            self.start_ms,
            self.nonce,
            self.who.host,
            self.who.boot,
            self.who.pidns,
            self.who.pid,
            0
        )
        .into_bytes()
    }

    /// Parses a record (the heartbeat counter is not part of it, and may be missing: older
    /// versions wrote none); `None` for anything else (garbage, a truncated file).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(bytes).ok()?;
        let line = text.strip_suffix('\n')?; // a truncated record lacks its newline
        let mut words = line.split(' ');
        if words.next()? != "turnstile-lease-v1" {
            return None;
        }
        let mut r = Record {
            lease: 0,
            session: 0,
            weight: 0,
            token: 0,
            ttl_ms: 0,
            start_ms: 0,
            nonce: 0,
            who: Ident {
                host: String::new(),
                boot: String::new(),
                pidns: String::new(),
                pid: 0,
            },
            also_pids: Vec::new(),
        };
        let mut seen = 0u32;
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "lease" => r.lease = v.parse().ok()?,
                "session" => r.session = u64::from_str_radix(v, 16).ok()?,
                "weight" => r.weight = v.parse().ok()?,
                "token" => r.token = v.parse().ok()?,
                "ttl_ms" => r.ttl_ms = v.parse().ok()?,
                "start_ms" => r.start_ms = v.parse().ok()?,
                "nonce" => r.nonce = u64::from_str_radix(v, 16).ok()?,
                "host" => r.who.host = v.to_owned(),
                "boot" => r.who.boot = v.to_owned(),
                "pidns" => r.who.pidns = v.to_owned(),
                "pid" => r.who.pid = v.parse().ok()?,
                "also_pids" => {
                    r.also_pids = v
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?;
                    continue; // optional: not counted
                }
                _ => continue,
            }
            seen += 1;
        }
        (seen >= 11 && r.ttl_ms > 0).then_some(r)
    }
}

/// The key of the heartbeat counter, the last word of a lease record.
const BEAT_KEY: &str = " beat=";
/// The length of the counter's tail: the key, 16 hex digits and the newline. Fixed, so that
/// a heartbeat rewrites the file in place without changing its length.
const BEAT_TAIL: usize = BEAT_KEY.len() + 16 + 1;

/// The heartbeat counter of a record, and the bytes before it (the record's identity).
fn split_beat(bytes: &[u8]) -> (&[u8], Option<u64>) {
    let Some(cut) = bytes.len().checked_sub(BEAT_TAIL) else {
        return (bytes, None);
    };
    let (head, tail) = bytes.split_at(cut);
    let counter = tail
        .strip_prefix(BEAT_KEY.as_bytes())
        .and_then(|t| t.strip_suffix(b"\n"))
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| u64::from_str_radix(digits, 16).ok());
    match counter {
        Some(n) => (head, Some(n)),
        None => (bytes, None),
    }
}

/// Whether two records are the same acquire: equal but for their heartbeat counters (so a
/// read torn between two heartbeats of one owner is still recognised as that owner's).
pub(crate) fn same_acquire(a: &[u8], b: &[u8]) -> bool {
    split_beat(a).0 == split_beat(b).0
}

/// The record `bytes` with its heartbeat counter increased by one: what the owner writes at
/// its next heartbeat. Records without a counter (not ours to beat) come back unchanged.
pub(crate) fn next_beat(bytes: &[u8]) -> Vec<u8> {
    match split_beat(bytes) {
        (head, Some(n)) => {
            let mut out = head.to_vec();
            out.extend_from_slice(format!("{BEAT_KEY}{:016x}\n", n.wrapping_add(1)).as_bytes());
            out
        }
        (_, None) => bytes.to_vec(),
    }
}

/// A job's completion record (the `done` file): which attempt completed it, and when by its
/// runner's clock. One line of `key=value` words, like a lease record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub token: u64,
    pub started_ms: u64,
    pub duration_ms: u64,
    pub session: u64,
    pub host: String,
    pub pid: u32,
}

impl Completion {
    /// The bytes of the record.
    pub(crate) fn encode(&self) -> Vec<u8> {
        format!(
            "turnstile-job-done-v1 token={} started_ms={} duration_ms={} session={:016x} host={} pid={}\n",
            self.token,
            self.started_ms,
            self.duration_ms,
            self.session,
            word(&self.host),
            self.pid
        )
        .into_bytes()
    }

    /// Parses a record; `None` for anything else (garbage, a truncated file).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Completion> {
        let text = std::str::from_utf8(bytes).ok()?;
        let line = text.strip_suffix('\n')?; // a truncated record lacks its newline
        let mut words = line.split(' ');
        if words.next()? != "turnstile-job-done-v1" {
            return None;
        }
        let mut c = Completion {
            token: 0,
            started_ms: 0,
            duration_ms: 0,
            session: 0,
            host: String::new(),
            pid: 0,
        };
        let mut seen = 0u32;
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "token" => c.token = v.parse().ok()?,
                "started_ms" => c.started_ms = v.parse().ok()?,
                "duration_ms" => c.duration_ms = v.parse().ok()?,
                "session" => c.session = u64::from_str_radix(v, 16).ok()?,
                "host" => c.host = v.to_owned(),
                "pid" => c.pid = v.parse().ok()?,
                _ => continue,
            }
            seen += 1;
        }
        (seen >= 6).then_some(c)
    }
}

/// Milliseconds since the Unix epoch on this machine's clock (only for display: ages, and
/// unique file names).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads a small file: its bytes (at most 4 KiB) and its modification time, both from one
/// open file, so that they belong to the same inode. The file is opened afresh for every
/// read, which on NFS revalidates the cached attributes and drops cached data that changed
/// on the server (close-to-open consistency): a record rewritten by another host and closed
/// there before this open is seen with its new bytes.
pub(crate) fn read_with_mtime(path: &Path) -> io::Result<(Vec<u8>, SystemTime)> {
    let file = File::open(path)?;
    let mtime = file.metadata()?.modified()?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD).read_to_end(&mut bytes)?;
    Ok((bytes, mtime))
}

/// Reads a small file.
pub(crate) fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_RECORD).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads a small file that may be missing (`Ok(None)`).
pub(crate) fn read_opt(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match read_small(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether an error says that a file (or a directory on its path) does not exist.
pub(crate) fn missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Replaces `target` with a file holding `content`, atomically (a temporary file in `dir`
/// renamed over it): readers see the old bytes or the new ones, never a mix.
pub(crate) fn replace(dir: &Path, target: &Path, content: &[u8]) -> io::Result<()> {
    let tmp = write_temp(dir, content)?;
    fs::rename(&tmp, target).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// A fresh hidden name in `dir` with the given prefix.
pub(crate) fn hidden_name(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!(".{prefix}-{:016x}", random_id()))
}

/// Writes `content` to a new hidden temporary file in `dir`.
pub(crate) fn write_temp(dir: &Path, content: &[u8]) -> io::Result<PathBuf> {
    let path = hidden_name(dir, "tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    // No fsync: `close` flushes to an NFS server before the link that publishes the file, and
    // on a local disk a crash ends every holder anyway.
    if let Err(e) = f.write_all(content) {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Makes `target` a hard link to the temporary file `tmp` (whose content is `content`), the
/// NFS-safe exclusive create: `Ok(true)` if `target` is now ours, `Ok(false)` if it existed.
/// On NFS a retransmitted LINK can fail although the first one succeeded, so an error is
/// double-checked by reading `target`: the content is unique (it carries a nonce).
pub(crate) fn claim(tmp: &Path, target: &Path, content: &[u8]) -> io::Result<bool> {
    match fs::hard_link(tmp, target) {
        Ok(()) => Ok(true),
        Err(e) => match read_small(target) {
            Ok(bytes) if same_acquire(&bytes, content) => Ok(true),
            Ok(_) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // Gone again at once (reclaimed, closed): not ours either.
            Err(_) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            _ => Err(e),
        },
    }
}

/// Creates `target` with `content` exclusively (write a temporary file, link it, remove the
/// temporary name).
pub(crate) fn create_exclusive(dir: &Path, target: &Path, content: &[u8]) -> io::Result<bool> {
    let tmp = write_temp(dir, content)?;
    let r = claim(&tmp, target, content);
    let _ = fs::remove_file(&tmp);
    r
}

/// What a touch found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Touch {
    /// The file held our record and now holds `content`, as a fresh read confirmed.
    Alive,
    /// The file is gone or holds somebody else's record: the lease or ticket was taken away.
    Gone,
}

/// One heartbeat of the record at `path`: if, and only if, it still holds our acquire
/// (`content` is our record with its new counter, see [`next_beat`]), `content` is written
/// over it in place, and then read back through a fresh open.
///
/// - The file is opened without `O_CREAT`: a name that a reclaimer removed is never
///   created again (somebody else may own it by then), and the read, the check and the
///   write go through one descriptor, so the write can only land on our own inode.
/// - The counter is fixed-width, so the length never changes; a reader that sees a torn
///   mix of the old and new bytes sees bytes that differ from both, which counts as "alive".
/// - The descriptor is closed explicitly and its error checked: on NFS, `close` is where
///   the data reaches the server (and where a failed write is reported).
/// - The read-back proves that the name still led to our inode *after* the write landed;
///   a reclaimer that renamed the file away before that would make it fail (`Gone`), and one
///   that renames it later re-reads the new bytes and puts it back. This is what lets the
///   owner count from the start of a successful touch (see the module doc of `file`).
///
/// A file that holds our acquire but not `content` on the read-back is an error (not
/// `Gone`): the caller retries at once, and gives the lease up if that lasts.
pub(crate) fn touch(path: &Path, content: &[u8]) -> io::Result<Touch> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if missing(&e) => return Ok(Touch::Gone),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    (&mut f).take(MAX_RECORD).read_to_end(&mut bytes)?;
    if bytes.len() != content.len() || !same_acquire(&bytes, content) {
        return Ok(Touch::Gone);
    }
    f.seek(SeekFrom::Start(0))?;
    f.write_all(content)?;
    nix::unistd::close(f.into_raw_fd()).map_err(io::Error::from)?;
    match read_opt(path)? {
        Some(back) if back == content => Ok(Touch::Alive),
        Some(back) if same_acquire(&back, content) => {
            Err(io::Error::other("a heartbeat could not be read back"))
        }
        _ => Ok(Touch::Gone),
    }
}

/// The file system's current time: rewrites the probe file `DIR/.clock` and reads back its
/// modification time. Used only where a clock step costs nothing that matters (a guess at
/// staleness shown by `status`, pruning old `.ended` markers), never to reclaim a record.
pub(crate) fn fs_now(root: &Path) -> io::Result<SystemTime> {
    let path = root.join(".clock");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    f.write_all(b"t")?;
    drop(f);
    File::open(&path)?.metadata()?.modified()
}

/// The age of a file with modification time `mtime` at file-system time `now` (zero if the
/// file is from the future).
pub(crate) fn age(now: SystemTime, mtime: SystemTime) -> Duration {
    now.duration_since(mtime).unwrap_or(Duration::ZERO)
}

/// What a [`reclaim`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reclaimed {
    /// This call removed the file: of all the reclaimers of this record, it is the one.
    Removed,
    /// The file was gone already (removed by its owner or another reclaimer).
    AlreadyGone,
    /// The file came alive (or changed) meanwhile and was left in place.
    Kept,
}

/// Removes `path` if `still_dead(bytes, mtime)` holds for what it holds, such that of many
/// processes doing this at once exactly one removes it, and a file that came alive meanwhile
/// is put back: rename it to a private name (only one rename of a name succeeds; it keeps
/// the mtime), re-read it there (a fresh open), then delete it or link it back.
pub(crate) fn reclaim(
    sem_dir: &Path,
    path: &Path,
    still_dead: impl FnOnce(&[u8], SystemTime) -> bool,
) -> io::Result<Reclaimed> {
    let private = hidden_name(sem_dir, "reclaim");
    match fs::rename(path, &private) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Reclaimed::AlreadyGone),
        Err(e) => return Err(e),
    }
    let dead = match read_with_mtime(&private) {
        Ok((bytes, mtime)) => still_dead(&bytes, mtime),
        Err(_) => false,
    };
    if !dead {
        // Alive after all (touched between our look and the rename): put it back. If the
        // name was taken meanwhile, the owner finds its record gone at its next heartbeat.
        let _ = fs::hard_link(&private, path);
    }
    fs::remove_file(&private)?;
    Ok(if dead {
        Reclaimed::Removed
    } else {
        Reclaimed::Kept
    })
}

/// Removes our own record at `path`, checking that it is ours: it is read first (so that
/// somebody else's record under that name is not even moved aside, which would make its
/// owner's heartbeat find it gone), then moved to a private name, checked again, and deleted
/// (or put back if it is not ours). `Ok(true)` if this call removed it.
pub(crate) fn remove_own(sem_dir: &Path, path: &Path, content: &[u8]) -> io::Result<bool> {
    match read_opt(path)? {
        Some(bytes) if same_acquire(&bytes, content) => {}
        _ => return Ok(false),
    }
    Ok(reclaim(sem_dir, path, |bytes, _| same_acquire(bytes, content))? == Reclaimed::Removed)
}

/// The fuzz harness's entry (`fuzz/`, target `file_record`): every parser of a file that
/// another host may have written, on `bytes`, with what must hold of what they accept.
/// Panics (that is how a fuzzer hears of it) only when a parser breaks its own contract.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_parsers(bytes: &[u8]) {
    if let Some(r) = Record::decode(bytes) {
        // What we accept, we write back the same (older records have no counter; it is not
        // part of the record).
        assert_eq!(
            Record::decode(&r.encode()),
            Some(r.clone()),
            "lease record round trip"
        );
        let beaten = next_beat(bytes);
        assert!(
            same_acquire(bytes, &beaten),
            "a heartbeat keeps the record's identity"
        );
        assert_eq!(
            Record::decode(&beaten),
            Some(r),
            "a heartbeat changes no field"
        );
    }
    let beaten = next_beat(bytes);
    assert_eq!(beaten.len(), bytes.len(), "a heartbeat rewrites in place");
    if let Some(c) = Completion::decode(bytes) {
        let again = Completion::decode(&c.encode());
        let host = word(&c.host);
        assert_eq!(
            again,
            Some(Completion { host, ..c }),
            "completion round trip"
        );
    }
    if let Some((capacity, name)) = parse_capacity(bytes) {
        let again = parse_capacity(&capacity_record(capacity, &name));
        assert_eq!(again, Some((capacity, name)), "capacity record round trip");
    }
    if let Ok(name) = std::str::from_utf8(bytes) {
        if validate_name(name).is_ok() {
            let dir = dir_name(name);
            assert!(!dir.is_empty() && dir.len() <= MAX_DIR_NAME, "{dir}");
            assert!(!dir.starts_with('.') && !dir.contains('/'), "{dir}");
        }
    }
}

/// See [`fuzz_parsers`]: what this backend writes, for the fuzzer to start from.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_samples() -> Vec<Vec<u8>> {
    let who = Ident::current();
    let mut lease = Record {
        lease: 7,
        session: 0x1234_5678_9abc_def0,
        weight: 2,
        token: 42,
        ttl_ms: 10_000,
        start_ms: 1_764_633_600_000,
        nonce: 0xfeed_f00d_dead_beef,
        who: who.clone(),
        also_pids: Vec::new(),
    };
    let plain = lease.encode();
    lease.also_pids = vec![who.pid + 1, who.pid + 2];
    let with_guard = next_beat(&next_beat(&lease.encode()));
    let done = Completion {
        token: 9,
        started_ms: 1_764_633_600_000,
        duration_ms: 1234,
        session: 0xabc,
        host: who.host.clone(),
        pid: who.pid,
    };
    vec![
        plain,
        with_guard,
        done.encode(),
        capacity_record(3, "db-migrations"),
        capacity_record(1, &"long name ".repeat(20)),
        dir_name("jobs/nightly: ümlaut").into_bytes(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_safe_file_names() {
        assert_eq!(dir_name("db"), "db");
        assert_eq!(dir_name("a/b"), "a%2Fb");
        assert_eq!(dir_name(".."), "%2E.");
        assert_eq!(dir_name("50%"), "50%25");
        assert_eq!(dir_name("x~y z"), "x%7Ey%20z");
        let long = "é".repeat(127);
        let d = dir_name(&long);
        assert!(d.len() <= MAX_DIR_NAME && d.contains('~'), "{d}");
        assert_ne!(d, dir_name(&format!("{}x", "é".repeat(126))));
        for name in ["a/b", "..", ".", "%2F", "ü", &long] {
            let d = dir_name(name);
            assert!(!d.starts_with('.') && !d.contains('/') && !d.is_empty());
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_rejected() {
        let r = Record {
            lease: 7,
            session: 0xabc,
            weight: 2,
            token: 9,
            ttl_ms: 10_000,
            start_ms: 1,
            nonce: 5,
            who: Ident::current(),
            also_pids: Vec::new(),
        };
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes), Some(r.clone()));
        for n in 0..bytes.len() {
            assert_eq!(Record::decode(&bytes[..n]), None, "truncated at {n}");
        }
        // Heartbeats change the bytes, keep the length and the identity, and the record.
        let beat = next_beat(&bytes);
        assert_ne!(beat, bytes);
        assert_eq!(beat.len(), bytes.len());
        assert!(same_acquire(&beat, &bytes));
        assert_eq!(Record::decode(&beat), Some(r.clone()));
        assert_ne!(next_beat(&beat), beat);
        let other = Record {
            nonce: 6,
            ..r.clone()
        }
        .encode();
        assert!(!same_acquire(&other, &bytes));
        // A record of an older version (no counter) is its own identity.
        let old = b"turnstile-lease-v1 lease=1\n";
        assert_eq!(next_beat(old), old.to_vec());
        assert!(same_acquire(old, old) && !same_acquire(old, &bytes));
        assert_eq!(Record::decode(b"\xff\xfe garbage"), None);
        // The optional list of pids that also keep the record alive.
        let with = Record {
            also_pids: vec![12, 34],
            ..r.clone()
        };
        let bytes = with.encode();
        assert!(String::from_utf8_lossy(&bytes).contains(" also_pids=12,34 beat="));
        assert_eq!(Record::decode(&bytes), Some(with.clone()));
        for n in 0..bytes.len() {
            assert_ne!(
                Record::decode(&bytes[..n]).as_ref(),
                Some(&with),
                "truncated at {n}"
            );
        }
        assert_eq!(
            Record::decode(&r.encode()).map(|r| r.also_pids),
            Some(vec![])
        );
        assert_eq!(
            parse_capacity(b"3\nname with spaces\n"),
            Some((3, "name with spaces".into()))
        );
        assert_eq!(parse_capacity(b"x\n"), None);
        assert_eq!(parse_capacity(b"0\nn\n"), None);
        assert_eq!(parse_capacity(b"3"), None);
    }

    #[test]
    fn completions_round_trip_and_garbage_is_rejected() {
        let c = Completion {
            token: 12,
            started_ms: 1_700_000_000_000,
            duration_ms: 1500,
            session: 0xdead_beef,
            host: "build host".into(),
            pid: 4242,
        };
        let bytes = c.encode();
        let back = Completion::decode(&bytes).expect("decodes");
        assert_eq!(back.host, "build_host", "one word on disk");
        assert_eq!(
            (back.token, back.session, back.pid),
            (12, 0xdead_beef, 4242)
        );
        for n in 0..bytes.len() {
            assert_eq!(Completion::decode(&bytes[..n]), None, "truncated at {n}");
        }
        assert_eq!(Completion::decode(b"\xff\xfe garbage\n"), None);
        assert_eq!(Completion::decode(b"turnstile-job-done-v1 token=x\n"), None);
        assert!(validate_label("job name", "").is_err_and(|m| m.contains("job name")));
    }

    #[test]
    fn heartbeats_rewrite_only_our_own_file_in_place() {
        let dir = std::env::temp_dir().join(format!("turnstile-disk-touch-{}", random_id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let r = Record {
            lease: 1,
            session: 2,
            weight: 1,
            token: 3,
            ttl_ms: 1000,
            start_ms: 0,
            nonce: 4,
            who: Ident::current(),
            also_pids: Vec::new(),
        };
        let ours = r.encode();
        // A name a reclaimer removed is never created again.
        let path = dir.join("slot-0");
        assert_eq!(touch(&path, &next_beat(&ours)).expect("touch"), Touch::Gone);
        assert!(!path.exists());
        // Somebody else's record under our name is left alone.
        let theirs = Record { nonce: 5, ..r }.encode();
        fs::write(&path, &theirs).expect("write");
        assert_eq!(touch(&path, &next_beat(&ours)).expect("touch"), Touch::Gone);
        assert_eq!(fs::read(&path).expect("read"), theirs);
        // Ours: every heartbeat leaves new bytes of the same length, on the same inode.
        fs::write(&path, &ours).expect("write");
        let link = dir.join("slot-1");
        fs::hard_link(&path, &link).expect("link");
        let mut content = ours.clone();
        for _ in 0..3 {
            let before = fs::read(&path).expect("read");
            content = next_beat(&content);
            assert_eq!(touch(&path, &content).expect("touch"), Touch::Alive);
            let after = fs::read(&link).expect("read the other link");
            assert_ne!(after, before);
            assert_eq!(after, content);
            assert_eq!(after.len(), ours.len());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn remove_own_leaves_other_records_alone() {
        let dir = std::env::temp_dir().join(format!("turnstile-disk-own-{}", random_id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("slot-0");
        fs::write(&path, b"theirs").expect("write");
        assert!(!remove_own(&dir, &path, b"ours").expect("remove_own"));
        assert_eq!(fs::read(&path).expect("still there"), b"theirs");
        assert!(remove_own(&dir, &path, b"theirs").expect("remove_own"));
        assert!(!path.exists());
        assert!(!remove_own(&dir, &path, b"theirs").expect("gone already"));
        assert_eq!(
            reclaim(&dir, &path, |_, _| true).expect("reclaim"),
            Reclaimed::AlreadyGone
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
