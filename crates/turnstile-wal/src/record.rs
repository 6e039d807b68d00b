//! The on-disk encoding of core records: the only code that knows how a [`Record`] looks in a
//! file.
//!
//! A frame (format 2) is
//!
//! ```text
//! len: u32 LE | body_crc: u32 LE | header_crc: u32 LE | body (len bytes)
//! ```
//!
//! where `body_crc` is the CRC-32 (IEEE) of the body and `header_crc` the CRC-32 of the eight
//! bytes before it. The header checksum is what makes the length trustworthy: in format 1
//! (`len | crc | body`) a flipped bit in a length was only noticed as a bad body checksum, so
//! recovery could not tell where the next frame started, and took damage in the middle of a
//! log for a torn tail. Now a damaged length fails its own checksum, and recovery looks for a
//! later good frame at every byte offset ([`valid_frame_at`]) instead of trusting it.
//!
//! A body is a one-byte type followed by the fields; strings are a `u16` length and UTF-8
//! bytes. Little-endian, unlike the wire protocol: files are read by this crate only, and every
//! machine it runs on is little-endian.

use std::sync::Arc;
use std::time::Duration;

use turnstile_core::{Completion, LeaseId, Record, SessionId, Token};

/// Bytes of a frame header (length, body checksum, header checksum).
pub const FRAME_HEADER: usize = 12;

/// The smallest frame of a grant (a one-byte semaphore name): a damaged stretch of `n` bytes
/// held at most `n / MIN_GRANT_FRAME` grants.
pub const MIN_GRANT_FRAME: usize = FRAME_HEADER + 1 + 8 + 8 + 8 + 4 + 2 + 1;

/// The largest body a frame may have. Real records are under 300 bytes; a larger length field
/// is damage.
pub const MAX_BODY: usize = 64 * 1024;

const SEMAPHORE_CREATED: u8 = 1;
const SEMAPHORE_CLOSED: u8 = 2;
const SESSION_OPENED: u8 = 3;
const SESSION_ENDED: u8 = 4;
const GRANTED: u8 = 5;
const RELEASED: u8 = 6;
const SEMAPHORE: u8 = 7;
const JOB: u8 = 8;
const FORGOTTEN: u8 = 9;
const TOKEN_FLOOR: u8 = 10;

const JOB_HAS_GROUP: u8 = 1;
const JOB_HAS_COMPLETION: u8 = 2;
const JOB_HAS_FAILURE: u8 = 4;
/// The last frame of a snapshot: its record count. Not a core record.
pub(crate) const SNAPSHOT_END: u8 = 0xFF;

/// Appends the frame of `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    match record {
        Record::SemaphoreCreated { name, capacity } => {
            out.push(SEMAPHORE_CREATED);
            out.extend_from_slice(&capacity.to_le_bytes());
            put_str(out, name);
        }
        Record::SemaphoreClosed { name } => {
            out.push(SEMAPHORE_CLOSED);
            put_str(out, name);
        }
        Record::SessionOpened {
            session,
            ttl,
            client,
        } => {
            out.push(SESSION_OPENED);
            out.extend_from_slice(&session.0.to_le_bytes());
            out.extend_from_slice(&micros(*ttl).to_le_bytes());
            put_str(out, client);
        }
        Record::SessionEnded { session } => {
            out.push(SESSION_ENDED);
            out.extend_from_slice(&session.0.to_le_bytes());
        }
        Record::Granted {
            session,
            lease,
            semaphore,
            weight,
            token,
        } => {
            out.push(GRANTED);
            out.extend_from_slice(&session.0.to_le_bytes());
            out.extend_from_slice(&lease.0.to_le_bytes());
            out.extend_from_slice(&token.0.to_le_bytes());
            out.extend_from_slice(&weight.to_le_bytes());
            put_str(out, semaphore);
        }
        Record::Released { session, lease } => {
            out.push(RELEASED);
            out.extend_from_slice(&session.0.to_le_bytes());
            out.extend_from_slice(&lease.0.to_le_bytes());
        }
        Record::Semaphore {
            name,
            capacity,
            closed,
            next_token,
        } => {
            out.push(SEMAPHORE);
            out.extend_from_slice(&capacity.to_le_bytes());
            out.push(u8::from(*closed));
            out.extend_from_slice(&next_token.to_le_bytes());
            put_str(out, name);
        }
        Record::Forgotten { name, next_token } => {
            out.push(FORGOTTEN);
            out.extend_from_slice(&next_token.to_le_bytes());
            put_str(out, name);
        }
        Record::TokenFloor { next_token } => {
            out.push(TOKEN_FLOOR);
            out.extend_from_slice(&next_token.to_le_bytes());
        }
        Record::Job {
            name,
            group,
            completion,
            failures,
            last_failure,
        } => {
            out.push(JOB);
            let mut flags = 0;
            if group.is_some() {
                flags |= JOB_HAS_GROUP;
            }
            if completion.is_some() {
                flags |= JOB_HAS_COMPLETION;
            }
            if last_failure.is_some() {
                flags |= JOB_HAS_FAILURE;
            }
            out.push(flags);
            out.extend_from_slice(&failures.to_le_bytes());
            put_str(out, name);
            if let Some(group) = group {
                put_str(out, group);
            }
            if let Some(c) = completion {
                out.extend_from_slice(&c.token.0.to_le_bytes());
                out.extend_from_slice(&c.started_unix_ms.to_le_bytes());
                out.extend_from_slice(&micros(c.duration).to_le_bytes());
                put_str(out, &c.client);
            }
            if let Some(why) = last_failure {
                put_str(out, why);
            }
        }
    }
    seal(out, start);
}

/// Appends the end frame of a snapshot holding `count` records.
pub(crate) fn encode_snapshot_end(count: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(SNAPSHOT_END);
    out.extend_from_slice(&count.to_le_bytes());
    seal(out, start);
}

/// Fills in the length and checksums of the frame that starts at `start`.
fn seal(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER..];
    // Bodies are bounded by a 255-byte name plus fixed fields, far below u32::MAX.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..start + 8]);
    out[start + 8..start + 12].copy_from_slice(&header_crc.to_le_bytes());
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are at most 255 bytes and failure reasons 1 KiB (the core cuts or refuses longer
    // ones), far below the u16 limit.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// What is found at an offset of a file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// A whole frame with a good checksum: its body and the offset after it.
    Good { body: &'a [u8], next: usize },
    /// The file ends exactly here.
    End,
    /// Not a good frame: cut short, bad length, or bad checksum.
    Bad {
        why: &'static str,
        /// The file ends inside the frame: less than a header is left, or the header holds
        /// (so its length is the real one) and the body runs past the end. Only a write cut
        /// short leaves that; nothing after it can be a frame of its own.
        past_end: bool,
    },
}

/// Reads the frame at `offset` of `buf`. The length is believed only once the header's own
/// checksum holds.
pub(crate) fn frame_at(buf: &[u8], offset: usize) -> Frame<'_> {
    let rest = &buf[offset.min(buf.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    let Some(header) = rest.get(..FRAME_HEADER) else {
        return Frame::Bad {
            why: "frame header cut short",
            past_end: true,
        };
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if crc32fast::hash(&header[..8]) != word(8) {
        return Frame::Bad {
            why: "frame header checksum mismatch (damaged length or checksum)",
            past_end: false,
        };
    }
    let len = word(0) as usize;
    if len == 0 || len > MAX_BODY {
        return Frame::Bad {
            why: "frame length out of range",
            past_end: false,
        };
    }
    let Some(body) = rest.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Bad {
            why: "frame body cut short",
            past_end: true,
        };
    };
    if crc32fast::hash(body) != word(4) {
        return Frame::Bad {
            why: "checksum mismatch",
            past_end: false,
        };
    }
    Frame::Good {
        body,
        next: offset + FRAME_HEADER + len,
    }
}

/// Whether a whole frame that decodes starts at `offset`: both checksums hold and the body is
/// a record or a snapshot end. Recovery asks this at every offset after a bad frame, so that
/// what it decides never rests on a length that may be the damaged part.
pub(crate) fn valid_frame_at(buf: &[u8], offset: usize) -> bool {
    match frame_at(buf, offset) {
        Frame::Good { body, .. } => decode(body).is_ok(),
        Frame::End | Frame::Bad { .. } => false,
    }
}

/// A body that has a good checksum but cannot be a record: written by a newer version, or
/// damage that happened to keep the checksum (vanishingly rare).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadBody(pub &'static str);

/// What a good frame holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    Record(Record),
    SnapshotEnd(u64),
}

/// Decodes a frame body.
pub(crate) fn decode(body: &[u8]) -> Result<Body, BadBody> {
    let mut r = Reader(body);
    let kind = r.u8()?;
    let record = match kind {
        SEMAPHORE_CREATED => {
            let capacity = r.u32()?;
            Record::SemaphoreCreated {
                capacity,
                name: r.name()?,
            }
        }
        SEMAPHORE_CLOSED => Record::SemaphoreClosed { name: r.name()? },
        SESSION_OPENED => Record::SessionOpened {
            session: SessionId(r.u64()?),
            ttl: Duration::from_micros(r.u64()?),
            // Logs written before sessions had a client description end here.
            client: if r.0.is_empty() {
                Arc::from("")
            } else {
                r.name()?
            },
        },
        SESSION_ENDED => Record::SessionEnded {
            session: SessionId(r.u64()?),
        },
        GRANTED => {
            let session = SessionId(r.u64()?);
            let lease = LeaseId(r.u64()?);
            let token = Token(r.u64()?);
            let weight = r.u32()?;
            Record::Granted {
                session,
                lease,
                token,
                weight,
                semaphore: r.name()?,
            }
        }
        RELEASED => Record::Released {
            session: SessionId(r.u64()?),
            lease: LeaseId(r.u64()?),
        },
        SEMAPHORE => {
            let capacity = r.u32()?;
            let closed = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(BadBody("closed flag is neither 0 nor 1")),
            };
            let next_token = r.u64()?;
            Record::Semaphore {
                capacity,
                closed,
                next_token,
                name: r.name()?,
            }
        }
        FORGOTTEN => {
            let next_token = r.u64()?;
            Record::Forgotten {
                next_token,
                name: r.name()?,
            }
        }
        TOKEN_FLOOR => Record::TokenFloor {
            next_token: r.u64()?,
        },
        JOB => {
            let flags = r.u8()?;
            if flags & !(JOB_HAS_GROUP | JOB_HAS_COMPLETION | JOB_HAS_FAILURE) != 0 {
                return Err(BadBody("unknown job record flags"));
            }
            let failures = r.u32()?;
            let name = r.name()?;
            let group = if flags & JOB_HAS_GROUP != 0 {
                Some(r.name()?)
            } else {
                None
            };
            let completion = if flags & JOB_HAS_COMPLETION != 0 {
                let token = Token(r.u64()?);
                let started_unix_ms = r.u64()?;
                let duration = Duration::from_micros(r.u64()?);
                Some(Completion {
                    token,
                    started_unix_ms,
                    duration,
                    client: r.name()?,
                })
            } else {
                None
            };
            let last_failure = if flags & JOB_HAS_FAILURE != 0 {
                Some(r.name()?)
            } else {
                None
            };
            Record::Job {
                name,
                group,
                completion,
                failures,
                last_failure,
            }
        }
        SNAPSHOT_END => {
            let count = r.u64()?;
            r.end()?;
            return Ok(Body::SnapshotEnd(count));
        }
        _ => return Err(BadBody("unknown record type")),
    };
    r.end()?;
    Ok(Body::Record(record))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], BadBody> {
        if self.0.len() < N {
            return Err(BadBody("record body cut short"));
        }
        let mut a = [0; N];
        a.copy_from_slice(&self.0[..N]);
        self.0 = &self.0[N..];
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, BadBody> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, BadBody> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, BadBody> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn name(&mut self) -> Result<Arc<str>, BadBody> {
        let len = usize::from(u16::from_le_bytes(self.take()?));
        if self.0.len() < len {
            return Err(BadBody("name cut short"));
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s)
            .map(Arc::from)
            .map_err(|_| BadBody("name is not UTF-8"))
    }

    fn end(&self) -> Result<(), BadBody> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(BadBody("bytes left over after the record"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::SemaphoreCreated {
                name: Arc::from("db"),
                capacity: 3,
            },
            Record::SemaphoreClosed {
                name: Arc::from("db ☃"),
            },
            Record::Forgotten {
                name: Arc::from("once-only"),
                next_token: 42,
            },
            Record::TokenFloor {
                next_token: u64::MAX,
            },
            Record::SessionOpened {
                session: SessionId(u64::MAX),
                ttl: Duration::from_millis(1500),
                client: Arc::from("host-a:1234"),
            },
            Record::SessionEnded {
                session: SessionId(7),
            },
            Record::Granted {
                session: SessionId(1),
                lease: LeaseId(2),
                semaphore: Arc::from("gpu"),
                weight: 4,
                token: Token(99),
            },
            Record::Released {
                session: SessionId(1),
                lease: LeaseId(2),
            },
            Record::Semaphore {
                name: Arc::from("x"),
                capacity: 1,
                closed: true,
                next_token: 12,
            },
            Record::Job {
                name: Arc::from("build"),
                group: None,
                completion: None,
                failures: 0,
                last_failure: None,
            },
            Record::Job {
                name: Arc::from("etl-7"),
                group: Some(Arc::from("nightly")),
                completion: Some(Completion {
                    client: Arc::from("host-b:99"),
                    token: Token(3),
                    started_unix_ms: 1_700_000_000_123,
                    duration: Duration::from_millis(4321),
                }),
                failures: 2,
                last_failure: Some(Arc::from("exited with status 3")),
            },
        ]
    }

    #[test]
    fn a_session_record_of_the_first_format_reads_with_no_client() {
        let mut buf = Vec::new();
        encode(
            &Record::SessionOpened {
                session: SessionId(5),
                ttl: Duration::from_secs(2),
                client: Arc::from(""),
            },
            &mut buf,
        );
        // The first format had no client field: drop its (empty) string and re-seal.
        buf.truncate(buf.len() - 2);
        seal(&mut buf, 0);
        let Frame::Good { body, .. } = frame_at(&buf, 0) else {
            panic!("frame is good");
        };
        assert!(matches!(
            decode(body),
            Ok(Body::Record(Record::SessionOpened { client, .. })) if client.is_empty()
        ));
    }

    #[test]
    fn the_smallest_grant_frame_is_min_grant_frame() {
        let mut buf = Vec::new();
        encode(
            &Record::Granted {
                session: SessionId(1),
                lease: LeaseId(1),
                semaphore: Arc::from("x"),
                weight: 1,
                token: Token(1),
            },
            &mut buf,
        );
        assert_eq!(buf.len(), MIN_GRANT_FRAME);
    }

    #[test]
    fn every_record_roundtrips() {
        let mut buf = Vec::new();
        for r in samples() {
            encode(&r, &mut buf);
        }
        let mut offset = 0;
        for want in samples() {
            let Frame::Good { body, next } = frame_at(&buf, offset) else {
                panic!("frame at {offset} is not good");
            };
            assert_eq!(decode(body), Ok(Body::Record(want)));
            offset = next;
        }
        assert_eq!(frame_at(&buf, offset), Frame::End);
    }

    #[test]
    fn damage_is_detected() {
        let mut buf = Vec::new();
        encode(&samples()[4], &mut buf);
        for cut in 1..buf.len() {
            assert!(
                matches!(frame_at(&buf[..cut], 0), Frame::Bad { .. }),
                "cut at {cut}"
            );
        }
        for (i, bit) in (0..buf.len()).flat_map(|i| (0..8).map(move |b| (i, 1u8 << b))) {
            let mut damaged = buf.clone();
            damaged[i] ^= bit;
            assert!(
                !matches!(frame_at(&damaged, 0), Frame::Good { .. })
                    || decode(match frame_at(&damaged, 0) {
                        Frame::Good { body, .. } => body,
                        _ => unreachable!(),
                    })
                    .is_err(),
                "flip of bit {bit:#04x} at byte {i} went unnoticed"
            );
        }
    }

    /// The format-1 hole: a flipped bit in a length field made the reader skip to the wrong
    /// place. Now every such flip fails the header checksum, whatever the body.
    #[test]
    fn a_flipped_length_bit_fails_the_header_checksum() {
        let mut buf = Vec::new();
        for r in samples() {
            encode(&r, &mut buf);
        }
        let mut offset = 0;
        while let Frame::Good { next, .. } = frame_at(&buf, offset) {
            for (i, bit) in (0..4).flat_map(|i| (0..8).map(move |b| (i, 1u8 << b))) {
                let mut damaged = buf.clone();
                damaged[offset + i] ^= bit;
                assert!(
                    matches!(frame_at(&damaged, offset), Frame::Bad { why, .. } if why.contains("header")),
                    "frame at {offset}: flip {bit:#04x} of length byte {i}"
                );
                // The next frame is still found by its own checksums.
                assert!(next == buf.len() || valid_frame_at(&damaged, next));
            }
            offset = next;
        }
        assert_eq!(offset, buf.len());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Frame::Good { body, .. } = frame_at(&bytes, 0) {
                let _ = decode(body);
            }
            let _ = decode(&bytes);
        }
    }
}
