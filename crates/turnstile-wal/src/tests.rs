//! Recovery tests on real files in a scratch directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use turnstile_core::{Coordinator, Effect, LeaseId, Request, SessionId, Tag, Time};

use super::*;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "turnstile-wal-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn rec(i: u64) -> Record {
    Record::Granted {
        session: SessionId(1),
        lease: LeaseId(i),
        semaphore: Arc::from("db"),
        weight: 1,
        token: turnstile_core::Token(i),
    }
}

fn write(log: &mut Log, records: &[Record]) {
    let mut buf = Vec::new();
    for r in records {
        record::encode(r, &mut buf);
    }
    log.append(&buf).expect("append");
    log.sync().expect("sync");
}

fn only_segment(dir: &Path) -> PathBuf {
    let files = list(dir).expect("list");
    assert_eq!(files.segments.len(), 1);
    wal_path(dir, files.segments[0])
}

#[test]
fn missing_directory_is_created_and_empty() {
    let s = Scratch::new("missing");
    let (log, got) = Log::open(&s.0.join("a/b")).expect("opens");
    assert!(got.records.is_empty());
    assert!(got.truncated.is_none());
    assert_eq!(log.generation(), 0);
    drop(log);
    let (_, got) = Log::open(&s.0.join("a/b")).expect("reopens");
    assert!(got.records.is_empty());
}

#[test]
fn records_survive_a_reopen() {
    let s = Scratch::new("reopen");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    let want: Vec<Record> = (1..=5).map(rec).collect();
    write(&mut log, &want[..3]);
    write(&mut log, &want[3..]);
    drop(log);
    let (_, got) = Log::open(&s.0).expect("reopens");
    assert_eq!(got.records, want);
}

#[test]
fn a_second_server_cannot_open_the_directory() {
    let s = Scratch::new("lock");
    let (_log, _) = Log::open(&s.0).expect("opens");
    let err = Log::open(&s.0).expect_err("locked");
    assert!(matches!(err, WalError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
}

#[test]
fn a_torn_tail_is_cut_off_at_every_possible_cut() {
    let s = Scratch::new("torn");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &(1..=3).map(rec).collect::<Vec<_>>());
    let written = log.segment_bytes() as usize;
    drop(log);
    let path = only_segment(&s.0);
    let mut whole = fs::read(&path).expect("read");
    assert!(
        whole.len() > written && whole[written..].iter().all(|&b| b == 0),
        "the segment is sized ahead with zeros"
    );
    whole.truncate(written);
    let mut two = Vec::new();
    two.extend_from_slice(WAL_MAGIC);
    for r in [rec(1), rec(2)] {
        record::encode(&r, &mut two);
    }
    // Every cut inside the third record loses exactly the third record.
    for cut in two.len() + 1..whole.len() {
        fs::write(&path, &whole[..cut]).expect("write");
        let (mut log, got) = Log::open(&s.0).expect("recovers");
        assert_eq!(got.records, vec![rec(1), rec(2)], "cut at {cut}");
        let torn = got.truncated.expect("a cut");
        assert_eq!((&torn.file, torn.offset), (&path, two.len() as u64));
        // The cut bytes are kept beside the log, up to the last one that is not zero (what
        // follows could be the room the segment was sized ahead with).
        assert_eq!(
            fs::read(&torn.saved_to).expect("the side file"),
            trim_zeros(&whole[two.len()..cut])
        );
        fs::remove_file(&torn.saved_to).expect("remove the side file");
        // The log goes on after the cut, and the next recovery sees no damage.
        write(&mut log, &[rec(9)]);
        drop(log);
        let (_, again) = Log::open(&s.0).expect("recovers again");
        assert_eq!(again.records, vec![rec(1), rec(2), rec(9)]);
        assert!(again.truncated.is_none());
    }
}

/// `bytes` without the zeros at its end.
fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &bytes[..end]
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail_and_zeros_are_room() {
    let s = Scratch::new("garbage");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &[rec(1)]);
    let written = log.segment_bytes() as usize;
    drop(log);
    let path = only_segment(&s.0);
    let mut good = fs::read(&path).expect("read");
    good.truncate(written);
    for tail in [
        vec![0xAB; 13],
        b"\x10\x00\x00\x00garbage".to_vec(),
        [vec![0xAB; 13], vec![0; 4096]].concat(),
    ] {
        let mut bytes = good.clone();
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).expect("write");
        let (_, got) = Log::open(&s.0).expect("recovers");
        assert_eq!(got.records, vec![rec(1)]);
        let cut = got.truncated.expect("a torn tail");
        assert_eq!(
            fs::read(&cut.saved_to).expect("side file"),
            trim_zeros(&tail)
        );
        fs::remove_file(&cut.saved_to).expect("remove the side file");
        assert_eq!(
            fs::read(&path).expect("read"),
            good,
            "the tail is cut off on disk too"
        );
    }
    // Zeros after the last record are the room a segment is sized ahead with: the end of
    // what was written, not damage. Nothing is cut, and the next record goes after the last.
    let mut bytes = good.clone();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&path, &bytes).expect("write");
    let (mut log, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, vec![rec(1)]);
    assert!(got.truncated.is_none());
    assert_eq!(fs::read(&path).expect("read"), bytes, "nothing changed");
    write(&mut log, &[rec(2)]);
    drop(log);
    let (_, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, vec![rec(1), rec(2)]);
}

#[test]
fn a_corrupt_record_in_the_middle_stops_recovery_with_file_and_offset() {
    let s = Scratch::new("corrupt");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &(1..=5).map(rec).collect::<Vec<_>>());
    drop(log);
    let path = only_segment(&s.0);
    let mut bytes = fs::read(&path).expect("read");
    let mut upto = Vec::new();
    upto.extend_from_slice(WAL_MAGIC);
    record::encode(&rec(1), &mut upto);
    let second = upto.len();
    bytes[second + 12] ^= 0x01; // inside the second record's body
    fs::write(&path, &bytes).expect("write");
    let err = Log::open(&s.0).expect_err("refuses");
    match &err {
        WalError::Corrupt { file, offset, .. } => {
            assert_eq!(file, &path);
            assert_eq!(*offset, second as u64);
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains(&second.to_string()),
        "{msg}"
    );
    // Nothing was changed on disk.
    assert_eq!(fs::read(&path).expect("read"), bytes);
}

#[test]
fn empty_and_header_only_segments_recover_as_empty() {
    let s = Scratch::new("empty");
    fs::create_dir_all(&s.0).expect("mkdir");
    let path = wal_path(&s.0, 0);
    for content in [&b""[..], &WAL_MAGIC[..3], &WAL_MAGIC[..]] {
        fs::write(&path, content).expect("write");
        let (mut log, got) = Log::open(&s.0).expect("recovers");
        assert!(got.records.is_empty());
        write(&mut log, &[rec(1)]);
        drop(log);
        let (_, got) = Log::open(&s.0).expect("recovers");
        assert_eq!(got.records, vec![rec(1)]);
        let _ = fs::remove_file(&path);
    }
    // A file that is not a log at all is refused.
    fs::write(&path, b"hello world").expect("write");
    assert!(matches!(Log::open(&s.0), Err(WalError::Corrupt { .. })));
}

#[test]
fn snapshot_plus_log_replays_and_old_files_go() {
    let s = Scratch::new("snapshot");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &[rec(1), rec(2)]);
    log.rotate(&[rec(10), rec(11)]).expect("rotates");
    write(&mut log, &[rec(3)]);
    assert_eq!(log.generation(), 1);
    drop(log);
    let files = list(&s.0).expect("list");
    assert_eq!(
        (files.snapshots.as_slice(), files.segments.as_slice()),
        (&[1u64][..], &[1u64][..])
    );
    let (mut log, got) = Log::open(&s.0).expect("reopens");
    assert_eq!(got.records, vec![rec(10), rec(11), rec(3)]);
    assert_eq!(got.from_snapshot, 2);
    // A second rotation replaces the first snapshot.
    log.rotate(&[rec(20)]).expect("rotates");
    drop(log);
    let (_, got) = Log::open(&s.0).expect("reopens");
    assert_eq!(got.records, vec![rec(20)]);
    let files = list(&s.0).expect("list");
    assert_eq!(files.snapshots, vec![2]);
}

#[test]
fn an_interrupted_rotation_recovers() {
    let s = Scratch::new("rotation");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &[rec(1)]);
    drop(log);
    // A temporary snapshot left by a crash before its rename is ignored and removed.
    fs::write(s.0.join("snap-0000000000000001.snap.tmp"), b"partial").expect("write");
    let (_, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, vec![rec(1)]);
    assert!(list(&s.0).expect("list").tmp.is_empty());
    assert!(!s.0.join("snap-0000000000000001.snap.tmp").exists());
}

/// Startup removes only the temporary files it makes itself (`snap-<16 hex>.snap.tmp`), not
/// every `*.tmp` of someone who keeps files in the same directory.
#[test]
fn only_our_own_temporary_files_are_removed() {
    let s = Scratch::new("tmpfiles");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &[rec(1)]);
    drop(log);
    let ours = s.0.join("snap-00000000000000a1.snap.tmp");
    let theirs = [
        "notes.tmp",
        "snap-1.snap.tmp",
        "snap-00000000000000a1.tmp",
        "wal-0000000000000000.log.tmp",
        "snap-00000000000000zz.snap.tmp",
    ];
    fs::write(&ours, b"partial").expect("write");
    for name in theirs {
        fs::write(s.0.join(name), name).expect("write");
    }
    let (_, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, vec![rec(1)]);
    assert!(!ours.exists(), "our temporary snapshot is removed");
    for name in theirs {
        assert_eq!(
            fs::read_to_string(s.0.join(name)).ok().as_deref(),
            Some(name),
            "{name} is not ours and must stay"
        );
    }
}

/// Every file of a directory but `LOCK` (which a start rewrites to name its holder), with
/// contents.
fn snapshot_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != "LOCK")
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).expect("read"))
        })
        .collect()
}

/// A scratch directory on tmpfs where there is one: the exhaustive test below opens the log
/// thousands of times, and recovery syncs every cut.
fn fast_scratch(name: &str) -> Scratch {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = shm.join(format!(
            "turnstile-wal-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        if fs::create_dir_all(&dir).is_ok() {
            return Scratch(dir);
        }
    }
    Scratch::new(name)
}

/// Records in the log of the exhaustive test.
const RECORDS: u64 = 150;

/// The log of the exhaustive test: a few hundred small records of every kind that a log holds,
/// and where each frame starts (plus the end).
fn small_log() -> (Vec<Record>, Vec<u8>, Vec<usize>) {
    let mut records = Vec::new();
    for i in 0..RECORDS {
        records.push(match i % 6 {
            0 => Record::SessionOpened {
                session: SessionId(i),
                ttl: Duration::from_secs(3),
                client: Arc::from(""),
            },
            1 => Record::SemaphoreCreated {
                name: Arc::from("s"),
                capacity: 2,
            },
            2 => rec(i),
            3 => Record::Released {
                session: SessionId(1),
                lease: LeaseId(i),
            },
            4 => Record::SessionEnded {
                session: SessionId(i),
            },
            _ => Record::SemaphoreClosed {
                name: Arc::from("s"),
            },
        });
    }
    let mut bytes = WAL_MAGIC.to_vec();
    let mut starts = Vec::new();
    for r in &records {
        starts.push(bytes.len());
        record::encode(r, &mut bytes);
    }
    starts.push(bytes.len());
    (records, bytes, starts)
}

/// What one damaged log recovered to, checked against the oracle: either a refusal that names
/// the segment and an offset at or before the damage and changed no file, or a recovery of
/// every record whose frame lies wholly before the damage, with the cut bytes kept in the side
/// file named by the result.
fn check_damaged(
    dir: &Path,
    path: &Path,
    records: &[Record],
    starts: &[usize],
    damaged: &[u8],
    damage_at: usize,
    what: &str,
) -> bool {
    // Only the segment (and LOCK) may be there: side files of the last case are gone.
    for e in fs::read_dir(dir).expect("list").map(|e| e.expect("entry")) {
        if e.file_name() != "LOCK" && e.path() != path {
            fs::remove_file(e.path()).expect("remove");
        }
    }
    fs::write(path, damaged).expect("write");
    let before = snapshot_files(dir);
    // Frames wholly before the damage: every record synced before the damage point.
    let intact = starts[1..]
        .iter()
        .take_while(|&&end| end <= damage_at)
        .count();
    match Log::open(dir) {
        Err(WalError::Corrupt { file, offset, .. }) => {
            assert_eq!(file, path, "{what}");
            assert!(offset as usize <= damage_at, "{what}: offset {offset}");
            assert_eq!(
                snapshot_files(dir),
                before,
                "{what}: a refusal changed files"
            );
            false
        }
        Err(e) => panic!("{what}: {e}"),
        Ok((_, got)) => {
            assert!(
                got.records.len() >= intact && got.records[..intact] == records[..intact],
                "{what}: recovered {} records, {intact} were intact before the damage",
                got.records.len()
            );
            let now = fs::read(path).expect("read");
            match &got.truncated {
                Some(cut) => {
                    let saved = fs::read(&cut.saved_to).expect("the side file");
                    // A segment cut to nothing starts again with its header.
                    let kept = if cut.offset == 0 { &[][..] } else { &now[..] };
                    assert_eq!(cut.offset as usize, kept.len(), "{what}");
                    assert_eq!(
                        [kept, &saved[..]].concat(),
                        [kept, trim_zeros(&damaged[kept.len()..])].concat(),
                        "{what}: evidence"
                    );
                }
                // An empty segment gets its header; nothing else changes without a cut.
                None if damaged.is_empty() => assert_eq!(now, WAL_MAGIC, "{what}"),
                None => assert_eq!(now, damaged, "{what}: changed without a cut"),
            }
            true
        }
    }
}

/// Every single-byte damage (two patterns per byte: all bits, and the lowest bit) and every truncation of a log of a few hundred records: startup either refuses with
/// file and offset and changes nothing, or recovers every record before the damage point and
/// keeps what it cut. Damage inside any frame but the last must be refused (a good frame
/// follows it); format 1 recovered some of these by cutting the log short.
#[test]
fn every_flip_and_every_truncation_of_a_small_log() {
    let s = fast_scratch("exhaustive");
    let dir = s.0.join("d");
    fs::create_dir_all(&dir).expect("mkdir");
    let path = wal_path(&dir, 0);
    let (records, whole, starts) = small_log();
    let last_frame = starts[starts.len() - 2];
    let started = std::time::Instant::now();
    let (mut refused, mut recovered) = (0, 0);
    for at in 0..whole.len() {
        for pattern in [0xFF, 0x01] {
            let mut damaged = whole.clone();
            damaged[at] ^= pattern;
            let what = format!("byte {at} ^ {pattern:#04x}");
            let ok = check_damaged(&dir, &path, &records, &starts, &damaged, at, &what);
            // Damage before the last frame has a good frame after it: never a torn tail.
            assert_eq!(ok, at >= last_frame, "{what}");
            if ok {
                recovered += 1;
            } else {
                refused += 1;
            }
        }
    }
    for len in 0..whole.len() {
        let what = format!("cut to {len} bytes");
        let ok = check_damaged(&dir, &path, &records, &starts, &whole[..len], len, &what);
        assert!(ok, "{what}: a cut log must recover");
        let (_, got) = Log::open(&dir).expect("reopens");
        let complete = starts[1..].iter().take_while(|&&end| end <= len).count();
        assert_eq!(got.records, records[..complete], "{what}: after the cut");
        recovered += 1;
    }
    eprintln!(
        "{} bytes, {} records: {refused} refusals, {recovered} recoveries in {:?}",
        whole.len(),
        records.len(),
        started.elapsed()
    );
}

#[test]
fn a_damaged_snapshot_stops_recovery() {
    let s = Scratch::new("badsnap");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    log.rotate(&[rec(1), rec(2)]).expect("rotates");
    drop(log);
    let path = snap_path(&s.0, 1);
    let mut bytes = fs::read(&path).expect("read");
    let n = bytes.len();
    bytes.truncate(n - 3);
    fs::write(&path, &bytes).expect("write");
    let err = Log::open(&s.0).expect_err("refuses");
    assert!(
        matches!(&err, WalError::Corrupt { file, .. } if file == &path),
        "{err}"
    );
}

#[test]
fn a_coordinator_rebuilt_from_its_log_has_the_same_holders() {
    let s = Scratch::new("replay");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    let mut c = Coordinator::new();
    let mut out = Vec::new();
    let now = Time::ZERO;
    let ttl = Duration::from_secs(10);
    let mut tag = 0;
    let mut step = |c: &mut Coordinator, req: Request<'_>, out: &mut Vec<Effect>| {
        tag += 1;
        c.handle(now, Tag(tag), req, out);
    };
    for s in 1..=3 {
        step(
            &mut c,
            Request::OpenSession {
                session: SessionId(s),
                ttl,
                client: "wal-test",
            },
            &mut out,
        );
    }
    step(
        &mut c,
        Request::Ensure {
            name: "db",
            capacity: 2,
        },
        &mut out,
    );
    for (s, l) in [(1, 1), (2, 1), (3, 1)] {
        step(
            &mut c,
            Request::Acquire {
                session: SessionId(s),
                lease: LeaseId(l),
                name: "db",
                weight: 1,
                timeout: None,
            },
            &mut out,
        );
    }
    step(
        &mut c,
        Request::Release {
            session: SessionId(1),
            lease: LeaseId(1),
        },
        &mut out,
    );
    let mut buf = Vec::new();
    for e in &out {
        if let Effect::Persist(r) = e {
            record::encode(r, &mut buf);
        }
    }
    log.append(&buf).expect("append");
    log.sync().expect("sync");
    drop(log);
    let (_, recovery) = Log::open(&s.0).expect("reopens");
    let mut r = Coordinator::new();
    for rec in &recovery.records {
        r.apply(now, rec);
    }
    r.validate().expect("valid");
    let a = c.semaphore("db", now).expect("db");
    let b = r.semaphore("db", now).expect("db");
    assert_eq!(a.holders, b.holders);
    assert_eq!(b.holders.len(), 2);
}

/// The reported case: one byte of a length field in the middle of the log. Format 1 took it
/// for a torn write and cut off every record after it; now startup refuses, naming the file
/// and the frame, and leaves the file as it was.
#[test]
fn a_damaged_length_in_the_middle_is_refused_not_cut() {
    let s = Scratch::new("length");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &(1..=100).map(rec).collect::<Vec<_>>());
    drop(log);
    let path = only_segment(&s.0);
    let mut bytes = fs::read(&path).expect("read");
    let mut upto = WAL_MAGIC.to_vec();
    for i in 1..=40 {
        record::encode(&rec(i), &mut upto);
    }
    let frame = upto.len();
    for flip in [0x01, 0x02, 0x10, 0x80, 0xFF] {
        let mut damaged = bytes.clone();
        damaged[frame] ^= flip;
        fs::write(&path, &damaged).expect("write");
        let err = Log::open(&s.0).expect_err("refuses");
        assert!(
            matches!(&err, WalError::Corrupt { file, offset, .. }
                if file == &path && *offset == frame as u64),
            "{err}"
        );
        assert_eq!(fs::read(&path).expect("read"), damaged, "unchanged");
        assert_eq!(snapshot_files(&s.0).len(), 1, "no other file appeared");
    }
    bytes[frame] ^= 0x01;
    bytes[frame] ^= 0x01;
    fs::write(&path, &bytes).expect("write");
    let (_, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records.len(), 100);
}

/// A segment or snapshot of format 1 is refused with a message that says what it is, and left
/// alone.
#[test]
fn format_one_files_are_refused_by_name() {
    let s = Scratch::new("v1");
    fs::create_dir_all(&s.0).expect("mkdir");
    for (path, magic) in [
        (wal_path(&s.0, 0), WAL_MAGIC_V1),
        (snap_path(&s.0, 0), SNAP_MAGIC_V1),
    ] {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2, 3, 4, 4, 7, 0, 0, 0, 0, 0, 0, 0]);
        fs::write(&path, &bytes).expect("write");
        let err = Log::open(&s.0).expect_err("refuses");
        assert!(err.to_string().contains("format 1"), "{err}");
        assert_eq!(fs::read(&path).expect("read"), bytes);
        fs::remove_file(&path).expect("remove");
    }
}

/// Damage at the end of a segment that is not the last is never a torn tail.
#[test]
fn a_bad_tail_of_an_older_segment_is_refused() {
    let s = Scratch::new("older");
    fs::create_dir_all(&s.0).expect("mkdir");
    let mut old = WAL_MAGIC.to_vec();
    record::encode(&rec(1), &mut old);
    let end = old.len();
    record::encode(&rec(2), &mut old);
    old.truncate(old.len() - 3);
    fs::write(wal_path(&s.0, 0), &old).expect("write");
    let mut new = WAL_MAGIC.to_vec();
    record::encode(&rec(3), &mut new);
    fs::write(wal_path(&s.0, 1), &new).expect("write");
    let err = Log::open(&s.0).expect_err("refuses");
    assert!(
        matches!(&err, WalError::Corrupt { file, offset, .. }
            if file == &wal_path(&s.0, 0) && *offset == end as u64),
        "{err}"
    );
    assert_eq!(fs::read(wal_path(&s.0, 0)).expect("read"), old);
}

/// A frame cut short whose header holds is a torn write, even if its partial body happens to
/// hold the bytes of a good frame (a failure reason is free text): the scan for a later frame
/// is only for frames whose length cannot be trusted.
#[test]
fn a_cut_short_frame_with_a_good_header_is_torn_whatever_its_body_holds() {
    let s = Scratch::new("embedded");
    fs::create_dir_all(&s.0).expect("mkdir");
    // A frame that is plain ASCII, so that it can be a failure reason.
    let inner = (1..100_000)
        .map(|i| {
            let mut f = Vec::new();
            record::encode(&rec(i), &mut f);
            f
        })
        .find(|f| f.is_ascii())
        .expect("some frame is ASCII");
    let job = Record::Job {
        name: Arc::from("j"),
        group: Some(Arc::from(
            std::str::from_utf8(&inner).expect("ASCII is UTF-8"),
        )),
        completion: None,
        failures: 1,
        last_failure: Some(Arc::from("exited with status 1")),
    };
    let mut bytes = WAL_MAGIC.to_vec();
    record::encode(&rec(1), &mut bytes);
    let start = bytes.len();
    record::encode(&job, &mut bytes);
    bytes.truncate(bytes.len() - 1); // the job frame is cut short after the inner frame
    let at = (start..bytes.len())
        .find(|&i| bytes[i..].starts_with(&inner))
        .expect("the inner frame is in the file");
    assert!(record::valid_frame_at(&bytes, at));
    let path = wal_path(&s.0, 0);
    fs::write(&path, &bytes).expect("write");
    let (_, got) = Log::open(&s.0).expect("a torn tail, not damage");
    assert_eq!(got.records, vec![rec(1)]);
    assert_eq!(got.truncated.map(|c| c.offset), Some(start as u64));
}

/// The writer sizes a segment ahead with zeros (so that its syncs need not record a new
/// size); a frame torn by a crash lies before those zeros, and is cut off like any torn tail.
#[test]
fn a_torn_frame_before_the_room_a_segment_is_sized_with_is_cut() {
    let s = Scratch::new("sized");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &(1..=3).map(rec).collect::<Vec<_>>());
    let written = log.segment_bytes() as usize;
    drop(log);
    let path = only_segment(&s.0);
    let mut bytes = fs::read(&path).expect("read");
    assert_eq!(bytes.len() as u64, SEGMENT_CHUNK, "sized a chunk ahead");
    let mut two = Vec::new();
    two.extend_from_slice(WAL_MAGIC);
    for r in [rec(1), rec(2)] {
        record::encode(&r, &mut two);
    }
    // The crash came in the middle of the third frame's write: its second half never
    // reached the disk, which still holds the zeros there.
    let half = two.len() + (written - two.len()) / 2;
    bytes[half..written].fill(0);
    fs::write(&path, &bytes).expect("write");
    let (mut log, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, vec![rec(1), rec(2)]);
    let cut = got.truncated.expect("a torn tail");
    assert_eq!(cut.offset, two.len() as u64);
    assert_eq!(
        fs::read(&cut.saved_to).expect("side file"),
        trim_zeros(&bytes[two.len()..half])
    );
    assert_eq!(fs::read(&path).expect("read"), two, "cut, room and all");
    write(&mut log, &[rec(9)]);
    drop(log);
    let (_, again) = Log::open(&s.0).expect("recovers again");
    assert_eq!(again.records, vec![rec(1), rec(2), rec(9)]);
    assert!(again.truncated.is_none());
}

/// Appends past the room a segment was sized with size it further; everything reads back.
#[test]
fn appends_past_the_sized_room_extend_the_segment() {
    let s = Scratch::new("extend");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    let mut frames = Vec::new();
    let mut n = 0;
    while (frames.len() as u64) < SEGMENT_CHUNK + SEGMENT_CHUNK / 2 {
        n += 1;
        record::encode(&rec(n), &mut frames);
    }
    log.append(&frames).expect("append");
    write(&mut log, &[rec(n + 1)]);
    let written = log.segment_bytes();
    drop(log);
    let size = fs::metadata(only_segment(&s.0)).expect("stat").len();
    assert!(
        size > written && size.is_multiple_of(SEGMENT_CHUNK),
        "size {size}, written {written}"
    );
    let (_, got) = Log::open(&s.0).expect("recovers");
    assert_eq!(got.records, (1..=n + 1).map(rec).collect::<Vec<_>>());
    assert_eq!(got.log_bytes, written, "log_bytes counts what was written");
    assert!(got.truncated.is_none());
}
