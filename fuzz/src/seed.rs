//! Writes the seed corpus (`fuzz/seeds/<target>/`) from what the code's own encoders produce:
//! frames of every request and reply, log segments and snapshots written by `turnstile-wal`
//! from core records, the shared directory's files, and etcd messages as the etcd backend's
//! codec encodes them. (The config seeds are printed by
//! `turnstile serve --print-config`; see fuzz/run.sh.) Usage: `seed OUT_DIR`.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use turnstile_core::{Completion, LeaseId, Record, SessionId, Token};
use turnstile_proto::{
    encode_reply, encode_request, ErrorCode, LeaseIds, LostReason, Reply, Request,
};
use turnstile_wal::{record, Log};

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: seed OUT_DIR");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    frames(&out.join("frame"));
    wal(out);
    let dir = out.join("file_record");
    for (i, bytes) in turnstile_client::fuzzing::file_samples().iter().enumerate() {
        write(&dir, &format!("sample-{i}"), bytes);
    }
    let dir = out.join("etcd_message");
    for (i, bytes) in turnstile_client::fuzzing::etcd_samples().iter().enumerate() {
        write(&dir, &format!("sample-{i}"), bytes);
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("the seed directory can be made");
    fs::write(dir.join(name), bytes).expect("the seed directory is writable");
}

fn frames(dir: &Path) {
    let requests = [
        Request::Hello {
            magic: turnstile_proto::MAGIC,
            version: turnstile_proto::VERSION,
            client: "host:123",
            token: "",
        },
        Request::Hello {
            magic: turnstile_proto::MAGIC,
            version: 1,
            client: "h:1",
            token: "s3cret",
        },
        Request::OpenSession {
            session: 0,
            ttl_ms: 10_000,
        },
        Request::ResumeSession { session: 0x1234 },
        Request::KeepAlive,
        Request::CloseSession,
        Request::EndSession { session: 9 },
        Request::Ensure {
            capacity: 3,
            name: "db",
        },
        Request::Acquire {
            lease: 1,
            weight: 2,
            timeout_ms: turnstile_proto::NO_TIMEOUT,
            name: "db",
        },
        Request::Release { lease: 1 },
        Request::Close { name: "db" },
        Request::Status {
            name: "",
            prefix: "jobs/",
            after: "jobs/a",
            limit: 1000,
        },
        Request::Ping,
        Request::BeginJob {
            lease: 5,
            timeout_ms: 0,
            job: "nightly",
            group: "g",
        },
        Request::FinishJob {
            lease: 5,
            succeeded: false,
            started_unix_ms: 1_764_633_600_000,
            duration_ms: 12,
            reason: "exit 3",
        },
        Request::ResetJob { job: "nightly" },
        Request::WaitGroup {
            wait: 2,
            jobs: 4,
            timeout_ms: 1000,
            group: "g",
        },
        Request::Leases,
        Request::SetCapacity {
            capacity: 5,
            name: "db",
        },
        Request::Delete { name: "db" },
        Request::Revoke {
            lease: 1,
            name: "db",
        },
    ];
    // A server's stream: the handshake, then everything in one stream.
    let mut stream = vec![0u8];
    for (i, request) in requests.iter().enumerate() {
        let mut one = vec![0u8];
        encode_request(i as u32, request, &mut one);
        write(dir, &format!("request-{i:02}"), &one);
        encode_request(i as u32, request, &mut stream);
    }
    write(dir, "request-stream", &stream);
    let ids = [1u64, 2, 0xdead_beef];
    let replies = [
        Reply::HelloOk {
            version: 1,
            default_ttl_ms: 10_000,
            server: "turnstile 0.1.0",
        },
        Reply::SessionOpened {
            ttl_ms: 10_000,
            existed: true,
        },
        Reply::Done,
        Reply::Granted { token: 42 },
        Reply::Status {
            json: br#"{"semaphores":[],"jobs":[],"groups":[]}"#,
        },
        Reply::Pong,
        Reply::Error {
            code: ErrorCode::Other(107),
            message: "no such semaphore",
        },
        Reply::JobCompleted {
            token: 3,
            started_unix_ms: 1,
            duration_ms: 2,
            client: "h:1",
        },
        Reply::JobBusy {
            token: 4,
            age_ms: 5,
            client: "h:2",
        },
        Reply::JobReset {
            was_completed: true,
        },
        Reply::GroupSettled {
            jobs: 4,
            completed: 3,
            running: 0,
            failures: 1,
        },
        Reply::LeaseLost {
            lease: 1,
            token: 42,
            reason: LostReason::Expired,
            name: "db",
        },
        Reply::SessionLost {
            session: 9,
            reason: LostReason::SessionEnded,
        },
        Reply::Leases {
            leases: LeaseIds::new(&ids),
        },
    ];
    let mut stream = vec![1u8];
    for (i, reply) in replies.iter().enumerate() {
        let mut one = vec![1u8];
        encode_reply(i as u32, reply, &mut one);
        write(dir, &format!("reply-{i:02}"), &one);
        encode_reply(i as u32, reply, &mut stream);
    }
    write(dir, "reply-stream", &stream);
}

fn records() -> Vec<Record> {
    let name: Arc<str> = Arc::from("db");
    vec![
        Record::SemaphoreCreated {
            name: name.clone(),
            capacity: 2,
        },
        Record::SessionOpened {
            session: SessionId(1),
            ttl: Duration::from_secs(10),
            client: Arc::from("host:1"),
        },
        Record::SessionOpened {
            session: SessionId(2),
            ttl: Duration::from_secs(3),
            client: Arc::from("host:2"),
        },
        Record::Granted {
            session: SessionId(1),
            lease: LeaseId(1),
            semaphore: name.clone(),
            weight: 1,
            token: Token(1),
        },
        Record::Granted {
            session: SessionId(2),
            lease: LeaseId(1),
            semaphore: name.clone(),
            weight: 1,
            token: Token(2),
        },
        Record::Released {
            session: SessionId(1),
            lease: LeaseId(1),
        },
        Record::Job {
            name: Arc::from("nightly"),
            group: Some(Arc::from("g")),
            completion: Some(Completion {
                client: Arc::from("host:2"),
                token: Token(2),
                started_unix_ms: 1_764_633_600_000,
                duration: Duration::from_millis(1500),
            }),
            failures: 1,
            last_failure: Some(Arc::from("exit 3")),
        },
        Record::Semaphore {
            name: Arc::from("old"),
            capacity: 1,
            closed: false,
            next_token: 9,
        },
        Record::Forgotten {
            name: Arc::from("old"),
            next_token: 9,
        },
        Record::TokenFloor { next_token: 10 },
        Record::SemaphoreClosed { name: name.clone() },
        Record::SessionEnded {
            session: SessionId(2),
        },
    ]
}

/// Real data directories, written through `Log`: their files become `wal_dir` seeds, and the
/// frames' bodies `wal_records` seeds.
fn wal(out: &Path) {
    let records = records();
    let tmp = std::env::temp_dir().join(format!("turnstile-seed-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    // One segment.
    let one = tmp.join("one");
    let (mut log, _) = Log::open(&one).expect("a fresh data directory opens");
    let mut frames = Vec::new();
    for r in &records {
        record::encode(r, &mut frames);
    }
    log.append(&frames).expect("append");
    log.sync().expect("sync");
    drop(log);
    let segment = fs::read(one.join("wal-0000000000000000.log")).expect("the segment was written");
    let mut seed = vec![0u8];
    seed.extend_from_slice(&segment);
    write(&out.join("wal_dir"), "one-segment", &seed);
    // A torn tail: the last frame cut short.
    let mut torn = seed.clone();
    torn.truncate(torn.len() - 5);
    write(&out.join("wal_dir"), "torn-tail", &torn);
    // A snapshot and the segment after it (layout 2).
    let two = tmp.join("two");
    let (mut log, _) = Log::open(&two).expect("a fresh data directory opens");
    log.append(&frames).expect("append");
    log.rotate(&records[..6]).expect("rotate");
    let mut more = Vec::new();
    for r in &records[6..] {
        record::encode(r, &mut more);
    }
    log.append(&more).expect("append");
    log.sync().expect("sync");
    drop(log);
    let snap = fs::read(two.join("snap-0000000000000001.snap")).expect("the snapshot was written");
    let seg = fs::read(two.join("wal-0000000000000001.log")).expect("the segment was written");
    let mut seed = vec![2u8];
    seed.extend_from_slice(
        &u16::try_from(snap.len())
            .expect("a small snapshot")
            .to_le_bytes(),
    );
    seed.extend_from_slice(&snap);
    seed.extend_from_slice(&seg);
    write(&out.join("wal_dir"), "snapshot-and-segment", &seed);
    let _ = fs::remove_dir_all(&tmp);

    // wal_records: the bodies of the same frames (the header is what the harness adds).
    let bodies: Vec<Vec<u8>> = records
        .iter()
        .map(|r| {
            let mut f = Vec::new();
            record::encode(r, &mut f);
            f[record::FRAME_HEADER..].to_vec()
        })
        .collect();
    let pieces = |flags: u8, k: u8, tail: &[u8]| {
        let mut seed = vec![flags, k];
        for b in &bodies {
            seed.extend_from_slice(&u16::try_from(b.len()).expect("a small body").to_le_bytes());
            seed.extend_from_slice(b);
        }
        seed.extend_from_slice(&[0, 0]);
        seed.extend_from_slice(tail);
        seed
    };
    let dir = out.join("wal_records");
    write(&dir, "segment", &pieces(0, 0, &[]));
    write(&dir, "snapshot-and-segment", &pieces(1 | 2, 5, &[]));
    write(&dir, "two-segments-torn", &pieces(4 | 8, 0, &frames[..20]));
}
