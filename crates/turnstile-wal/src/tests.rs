//! Recovery tests on real files in a scratch directory.

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
    drop(log);
    let path = only_segment(&s.0);
    let whole = fs::read(&path).expect("read");
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
        assert_eq!(got.truncated, Some((path.clone(), two.len() as u64)));
        // The log goes on after the cut, and the next recovery sees no damage.
        write(&mut log, &[rec(9)]);
        drop(log);
        let (_, again) = Log::open(&s.0).expect("recovers again");
        assert_eq!(again.records, vec![rec(1), rec(2), rec(9)]);
        assert!(again.truncated.is_none());
    }
}

#[test]
fn garbage_or_zeros_after_the_last_record_are_a_torn_tail() {
    let s = Scratch::new("garbage");
    let (mut log, _) = Log::open(&s.0).expect("opens");
    write(&mut log, &[rec(1)]);
    drop(log);
    let path = only_segment(&s.0);
    let good = fs::read(&path).expect("read");
    for tail in [
        vec![0u8; 4096],
        vec![0xAB; 13],
        b"\x10\x00\x00\x00garbage".to_vec(),
    ] {
        let mut bytes = good.clone();
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).expect("write");
        let (_, got) = Log::open(&s.0).expect("recovers");
        assert_eq!(got.records, vec![rec(1)]);
        assert_eq!(
            fs::read(&path).expect("read"),
            good,
            "the tail is cut off on disk too"
        );
    }
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
