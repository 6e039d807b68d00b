//! The fuzz targets' bodies, shared by the libFuzzer binaries (`fuzz_targets/`) and the seed
//! writer (`src/seed.rs`). Each function must not panic on any input unless the code under
//! test broke a promise: what it checks beyond "no panic" is written next to each assert.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use turnstile_core::{Coordinator, Record, Time};
use turnstile_proto::{
    decode_reply, decode_request, encode_reply, encode_request, split_frame, MAX_REPLY_FRAME,
    MAX_REQUEST_FRAME,
};
use turnstile_wal::record::FRAME_HEADER;
use turnstile_wal::Log;

/// The config file's parser, compiled from the binary crate's own source file.
#[path = "../../crates/turnstile/src/config_file.rs"]
#[allow(dead_code)]
mod config_file;

/// The first bytes of a log segment and of a snapshot (format 2).
pub const WAL_MAGIC: &[u8; 8] = b"TSTLWAL\x02";
/// See [`WAL_MAGIC`].
pub const SNAP_MAGIC: &[u8; 8] = b"TSTLSNP\x02";
/// The body type of a snapshot's end frame (the record count follows).
pub const SNAPSHOT_END: u8 = 0xFF;

/// `frame`: the first byte picks the reader's limit (a server reading requests, a client
/// reading replies); the rest is the byte stream, cut into frames as the connection does.
/// Every payload is decoded both as a request and as a reply; what decodes must encode back
/// to a frame that decodes to the same value.
pub fn frame(data: &[u8]) {
    let Some((&side, mut stream)) = data.split_first() else {
        return;
    };
    let max = if side & 1 == 0 {
        MAX_REQUEST_FRAME
    } else {
        MAX_REPLY_FRAME
    };
    while let Ok(Some((payload, used))) = split_frame(stream, max) {
        assert_eq!(
            used,
            payload.len() + 4,
            "a frame is its length prefix and payload"
        );
        assert!(used <= stream.len());
        if let Ok((id, request)) = decode_request(payload) {
            let mut out = Vec::new();
            encode_request(id, &request, &mut out);
            let again = split_frame(&out, usize::MAX).map(|f| f.map(|(p, _)| decode_request(p)));
            assert_eq!(again, Ok(Some(Ok((id, request)))), "request round trip");
        }
        if let Ok((id, reply)) = decode_reply(payload) {
            let mut out = Vec::new();
            encode_reply(id, &reply, &mut out);
            let again = split_frame(&out, usize::MAX).map(|f| f.map(|(p, _)| decode_reply(p)));
            assert_eq!(again, Ok(Some(Ok((id, reply)))), "reply round trip");
        }
        stream = &stream[used..];
    }
}

/// `config`: a config file's text. Errors must be one line (the parser promises it: they
/// are printed as one line naming the key).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config_file::FileConfig::parse(text) {
        assert!(
            !e.contains('\n') && !e.contains('\r'),
            "a multi-line error: {e:?}"
        );
    }
}

/// Appends a frame holding `body` with good checksums, as the log writer seals one.
pub fn seal(body: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    let header_crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
}

/// A reader of the fuzzer's bytes: length-prefixed pieces, then the rest.
struct Pieces<'a>(&'a [u8]);

impl<'a> Pieces<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    /// A piece of at most `mask` bytes (a two-byte length, masked).
    fn piece(&mut self, mask: u16) -> Option<&'a [u8]> {
        if self.0.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([self.0[0], self.0[1]]) & mask);
        let rest = &self.0[2..];
        let len = len.min(rest.len());
        self.0 = &rest[len..];
        Some(&rest[..len])
    }
}

/// `wal_records`: record bodies, sealed into frames with good checksums, laid out as a data
/// directory (byte 0: bit 0 a snapshot holds the first `byte 1` bodies, bit 1 its end frame
/// counts them right, bit 2 two log segments, bit 3 the bytes left over are a raw tail of the
/// last segment). Then [`recover_and_check`].
pub fn wal_records(data: &[u8]) {
    let mut p = Pieces(data);
    let flags = p.byte();
    let in_snapshot = usize::from(p.byte());
    let mut bodies = Vec::new();
    while bodies.len() < 64 {
        match p.piece(0x1FF) {
            Some(body) if !body.is_empty() => bodies.push(body),
            _ => break,
        }
    }
    let tail = p.0;
    let dir = scratch();
    let mut files = Vec::new();
    let mut rest = &bodies[..];
    let mut gen = 0u64;
    if flags & 1 != 0 {
        let k = in_snapshot.min(bodies.len());
        let mut snap = SNAP_MAGIC.to_vec();
        for body in &bodies[..k] {
            seal(body, &mut snap);
        }
        let count = if flags & 2 != 0 {
            k as u64
        } else {
            in_snapshot as u64
        };
        let mut end = vec![SNAPSHOT_END];
        end.extend_from_slice(&count.to_le_bytes());
        seal(&end, &mut snap);
        gen = 1;
        files.push((format!("snap-{gen:016x}.snap"), snap));
        rest = &bodies[k..];
    }
    let segments: Vec<&[&[u8]]> = if flags & 4 != 0 {
        let (a, b) = rest.split_at(rest.len() / 2);
        vec![a, b]
    } else {
        vec![rest]
    };
    let n = segments.len();
    for (i, bodies) in segments.into_iter().enumerate() {
        let mut seg = WAL_MAGIC.to_vec();
        for body in bodies {
            seal(body, &mut seg);
        }
        if i + 1 == n && flags & 8 != 0 {
            seg.extend_from_slice(tail);
        }
        files.push((format!("wal-{:016x}.log", gen + i as u64), seg));
    }
    lay_out(&dir, &files);
    recover_and_check(&dir);
}

/// `wal_dir`: a data directory of arbitrary files. Byte 0 picks the layout (low 3 bits) and
/// which files get the right magic in front (bit 3 and up, one per file) so that the fuzzer
/// need not find it; each file but the last is a length-prefixed piece, the last the rest.
pub fn wal_dir(data: &[u8]) {
    let mut p = Pieces(data);
    let flags = p.byte();
    let names: &[&str] = match flags & 7 {
        0 => &["wal-0000000000000000.log"],
        1 => &["wal-0000000000000000.log", "wal-0000000000000001.log"],
        2 => &["snap-0000000000000001.snap", "wal-0000000000000001.log"],
        3 => &[
            "snap-0000000000000001.snap",
            "wal-0000000000000001.log",
            "wal-0000000000000002.log",
        ],
        4 => &[
            "snap-0000000000000001.snap",
            "snap-0000000000000002.snap",
            "wal-0000000000000002.log",
        ],
        5 => &["wal-0000000000000000.log", "wal-0000000000000002.log"],
        6 => &["snap-0000000000000001.snap.tmp", "wal-0000000000000000.log"],
        _ => &[
            "snap-0000000000000002.snap",
            "wal-0000000000000001.log",
            "wal-0000000000000002.log",
        ],
    };
    let mut files = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let bytes = if i + 1 == names.len() {
            std::mem::take(&mut p.0)
        } else {
            p.piece(0xFFFF).unwrap_or_default()
        };
        let mut content = Vec::new();
        if flags & (8 << i) != 0 {
            content.extend_from_slice(if name.starts_with("snap") {
                SNAP_MAGIC
            } else {
                WAL_MAGIC
            });
        }
        content.extend_from_slice(bytes);
        files.push((name.to_string(), content));
    }
    let dir = scratch();
    lay_out(&dir, &files);
    recover_and_check(&dir);
}

/// A directory of this process's own for the current input, emptied: under
/// `$TURNSTILE_FUZZ_DIR` (run.sh points it at tmpfs, where syncs cost nothing, and removes it
/// afterwards), else on tmpfs or in the temporary directory.
fn scratch() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = if let Some(dir) = std::env::var_os("TURNSTILE_FUZZ_DIR") {
            PathBuf::from(dir)
        } else if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("turnstile-fuzz-{}", std::process::id()))
    });
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("the scratch directory can be made (the fuzzer's own)");
    dir.clone()
}

fn lay_out(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).expect("the scratch directory is writable");
    }
}

/// Every file of `dir` but the lock, with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("the scratch directory can be listed") {
        let entry = entry.expect("the scratch directory can be listed");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "LOCK" {
            out.insert(
                name,
                fs::read(entry.path()).expect("our own file can be read"),
            );
        }
    }
    out
}

/// Opens `dir` as the server does and checks what recovery promises:
/// - a refusal changes no file;
/// - a recovery can be opened again, with the same records and nothing more to cut;
/// - replaying the records (and moving the fencing counters past a cut, as the server does)
///   leaves a coordinator whose invariants hold, and still hold once every session expired;
/// - the coordinator's snapshot, written by a rotation and read back, rebuilds the same
///   state.
pub fn recover_and_check(dir: &Path) {
    let before = contents(dir);
    let (log, recovery) = match Log::open(dir) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(contents(dir), before, "a refusal changed files: {e}");
            return;
        }
    };
    drop(log);
    let (mut log, again) = match Log::open(dir) {
        Ok(opened) => opened,
        Err(e) => panic!("a recovered directory is refused when opened again: {e}"),
    };
    assert_eq!(
        again.records, recovery.records,
        "the second recovery differs"
    );
    assert!(again.truncated.is_none(), "the second recovery cut more");
    let mut core = Coordinator::new();
    for record in &recovery.records {
        core.apply(Time::ZERO, record);
    }
    if let Some(cut) = &recovery.truncated {
        core.skip_tokens(cut.grants_at_most(), &mut Vec::new());
    }
    if let Err(e) = core.validate() {
        panic!("replayed state breaks an invariant: {e}");
    }
    let snapshot = core.snapshot();
    if let Err(e) = log.rotate(&snapshot) {
        panic!("rotation failed in a directory that recovered: {e}");
    }
    drop(log);
    let (log, rotated) = match Log::open(dir) {
        Ok(opened) => opened,
        Err(e) => panic!("our own snapshot is refused: {e}"),
    };
    drop(log);
    let mut rebuilt = Coordinator::new();
    for record in &rotated.records {
        rebuilt.apply(Time::ZERO, record);
    }
    // The same records, except that a semaphore's counter may come back higher: a snapshot
    // puts the coordinator-wide token floor first, and a semaphore replayed after it starts
    // at least there (only ever higher tokens: safe, and not worth a second rule).
    let again = rebuilt.snapshot();
    let same = again.len() == snapshot.len()
        && again.iter().zip(&snapshot).all(|pair| match pair {
            (
                Record::Semaphore {
                    name,
                    capacity,
                    closed,
                    next_token,
                },
                Record::Semaphore {
                    name: n2,
                    capacity: c2,
                    closed: x2,
                    next_token: t2,
                },
            ) => name == n2 && capacity == c2 && closed == x2 && next_token >= t2,
            (a, b) => a == b,
        });
    assert!(
        same,
        "the snapshot does not rebuild the state:\n{again:?}\n{snapshot:?}"
    );
    let mut effects = Vec::new();
    core.tick(Time::from_micros(u64::MAX / 4), &mut effects);
    while core.tick_some(Time::from_micros(u64::MAX / 4), 1024, &mut effects) {}
    if let Err(e) = core.validate() {
        panic!("an invariant breaks once every session expired: {e}");
    }
}
