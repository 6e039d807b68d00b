//! Encoding and decoding of frames and messages.

use std::fmt;

/// A frame that cannot be decoded. The server answers it with an error reply and closes the
/// connection, since after a bad frame it cannot trust where the next one starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is larger than the receiver allows.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is shorter than its kind requires.
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    /// The kind byte is not a known message.
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A string is not UTF-8.
    #[error("string field is not valid UTF-8")]
    BadUtf8,
    /// A field holds a value outside its range.
    #[error("bad value: {0}")]
    BadValue(&'static str),
    /// Bytes are left over after the message.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
}

/// A request from client to server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// The first frame of every connection.
    Hello {
        /// Must be [`crate::MAGIC`].
        magic: [u8; 4],
        /// The protocol version the client speaks.
        version: u16,
        /// A free-form client name for logs and status pages (host, pid, program).
        client: &'a str,
        /// The shared secret of a server that requires one; empty for none. On the wire it is
        /// an optional trailing string, absent when empty, so that a `Hello` from a client
        /// older than this field still decodes (with an empty token).
        token: &'a str,
    },
    /// Opens (or idempotently re-opens) a session and binds it to this connection.
    OpenSession {
        /// The session id the client chose; not zero.
        session: u64,
        /// TTL in milliseconds; 0 asks for the server's default.
        ttl_ms: u32,
    },
    /// Binds an existing session to this connection; fails if the session is gone.
    ResumeSession {
        /// The session.
        session: u64,
    },
    /// Refreshes the bound session.
    KeepAlive,
    /// Ends the bound session cleanly, releasing its leases.
    CloseSession,
    /// Ends any session, as a supervisor does for a dead worker; its leases count as lost.
    EndSession {
        /// The session.
        session: u64,
    },
    /// Creates a semaphore or checks its capacity.
    Ensure {
        /// Capacity, at least 1.
        capacity: u32,
        /// Name.
        name: &'a str,
    },
    /// Acquires permits for a lease of the bound session.
    Acquire {
        /// The lease id the client chose, unique within its session.
        lease: u64,
        /// Permits wanted.
        weight: u32,
        /// Milliseconds to wait in the queue; [`crate::NO_TIMEOUT`] waits until granted, 0
        /// only takes free permits.
        timeout_ms: u32,
        /// The semaphore.
        name: &'a str,
    },
    /// Releases a held lease or withdraws a queued acquire of the bound session.
    Release {
        /// The lease.
        lease: u64,
    },
    /// Closes a semaphore.
    Close {
        /// The semaphore.
        name: &'a str,
    },
    /// Asks for the status document: one semaphore, or a page of them when `name` is
    /// empty. A page holds the semaphores whose names start with `prefix` and sort after
    /// `after`, at most `limit` of them (0: the server's default; the server also caps it), and
    /// the reply's `next` says where the next page starts. The paging fields were added after
    /// version 1 shipped: a request that ends after `name` asks for the first page.
    Status {
        /// The semaphore, or empty.
        name: &'a str,
        /// Only semaphores (and groups and jobs) whose names start with this.
        prefix: &'a str,
        /// The page starts after this name (exclusive); empty: at the beginning.
        after: &'a str,
        /// Most semaphores in the page; 0 leaves it to the server.
        limit: u32,
    },
    /// Asks for a `Pong`: a round trip that touches no state.
    Ping,
    /// Starts an attempt at a run-once job for a lease of the bound session. Answered by
    /// `Granted` (run it), `JobCompleted` (it is done: do not run it), `JobBusy` (with
    /// timeout 0: another attempt runs it) or an error (`TimedOut`).
    BeginJob {
        /// The lease id the client chose for the job's exclusive lease.
        lease: u64,
        /// Milliseconds to wait for a running attempt to end; [`crate::NO_TIMEOUT`] waits as
        /// long as it takes, 0 does not wait.
        timeout_ms: u32,
        /// The job.
        job: &'a str,
        /// The job's group; empty for none (an earlier attempt's group is kept).
        group: &'a str,
    },
    /// Ends the attempt holding the job's lease `lease`: records a completion or a failed
    /// attempt, and releases the lease. Answered by `Done`.
    FinishJob {
        /// The job's lease.
        lease: u64,
        /// Whether the attempt succeeded.
        succeeded: bool,
        /// When the attempt started, milliseconds since the Unix epoch (runner's clock).
        started_unix_ms: u64,
        /// How long it ran, in milliseconds.
        duration_ms: u64,
        /// Why it failed, in words; empty when it succeeded.
        reason: &'a str,
    },
    /// Forgets a job's completion and failed attempts. Answered by `JobReset`.
    ResetJob {
        /// The job.
        job: &'a str,
    },
    /// Waits until no job of a group runs and at least `jobs` have completed. Answered by
    /// `GroupSettled` or an error (`TimedOut`).
    WaitGroup {
        /// An id the client chose for this wait (a retry with the same id replaces it).
        wait: u64,
        /// Completed jobs to wait for; 0 waits only until none is running.
        jobs: u32,
        /// Milliseconds to wait; [`crate::NO_TIMEOUT`] waits as long as it takes.
        timeout_ms: u32,
        /// The group.
        group: &'a str,
    },
    /// Asks which leases the bound session holds: a client sends it after `ResumeSession` and
    /// reports lost every lease it counts as held that the answer lacks (the coordinator may
    /// have lost the record of a grant). Answered by [`Reply::Leases`].
    Leases,
    /// Changes the capacity of a live semaphore (an admin request). Growing grants queued
    /// acquires that now fit at once; shrinking takes nothing from holders, and grants
    /// nothing until what they hold plus the queue's head fits. Queued acquires heavier
    /// than the new capacity fail (`WeightExceedsCapacity`). Answered by `Done`.
    SetCapacity {
        /// The new capacity, at least 1.
        capacity: u32,
        /// The semaphore.
        name: &'a str,
    },
    /// Deletes a semaphore that is closed or idle (no holder, no waiter), so that its name
    /// can be created afresh; its fencing tokens still strictly increase (an admin
    /// request). Answered by `Done`, or `InUse` / `NoSuchSemaphore`.
    Delete {
        /// The semaphore.
        name: &'a str,
    },
    /// Takes a held lease away from its holder, whichever session holds it (an admin
    /// request): the permits go to the next waiters, and the holder hears `LeaseLost` with
    /// reason `Revoked`. Answered by `Done`, or `UnknownLease` if no holder of the
    /// semaphore has that lease id.
    Revoke {
        /// The lease.
        lease: u64,
        /// Its semaphore.
        name: &'a str,
    },
}

/// A reply or event from server to client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Answers `Hello`.
    HelloOk {
        /// The protocol version the server speaks.
        version: u16,
        /// The server's default session TTL, in milliseconds.
        default_ttl_ms: u32,
        /// A free-form server description.
        server: &'a str,
    },
    /// Answers `OpenSession` and `ResumeSession`.
    SessionOpened {
        /// The TTL in force, in milliseconds.
        ttl_ms: u32,
        /// Whether the session already existed.
        existed: bool,
    },
    /// Answers a request that has nothing to return.
    Done,
    /// Answers `Acquire`.
    Granted {
        /// The fencing token.
        token: u64,
    },
    /// Answers `Status`: a UTF-8 JSON document (see [`crate::StatusDoc`]).
    Status {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// Answers `Ping`.
    Pong,
    /// The request failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A human-readable sentence.
        message: &'a str,
    },
    /// Answers `BeginJob`: the job has completed; do not run it.
    JobCompleted {
        /// The fencing token of the attempt that completed it.
        token: u64,
        /// When that attempt started, milliseconds since the Unix epoch.
        started_unix_ms: u64,
        /// How long it ran, in milliseconds.
        duration_ms: u64,
        /// Who ran it (the client description of its session).
        client: &'a str,
    },
    /// Answers `BeginJob` with timeout 0: another attempt is running the job.
    JobBusy {
        /// That attempt's fencing token.
        token: u64,
        /// How long it has been running, in milliseconds.
        age_ms: u64,
        /// Who runs it.
        client: &'a str,
    },
    /// Answers `ResetJob`.
    JobReset {
        /// Whether there was a completion to forget.
        was_completed: bool,
    },
    /// Answers `WaitGroup`: the group's state when it settled.
    GroupSettled {
        /// Jobs known in the group.
        jobs: u32,
        /// Jobs completed.
        completed: u32,
        /// Jobs running (0 when settled).
        running: u32,
        /// Failed attempts of its jobs.
        failures: u64,
    },
    /// Event (request id 0): a lease of the bound session was taken away.
    LeaseLost {
        /// The lease.
        lease: u64,
        /// Its fencing token.
        token: u64,
        /// Why.
        reason: LostReason,
        /// Its semaphore.
        name: &'a str,
    },
    /// Event (request id 0): the bound session ended without the client asking.
    SessionLost {
        /// The session.
        session: u64,
        /// Why.
        reason: LostReason,
    },
    /// Answers `Leases`: the held (not queued) leases of the bound session.
    Leases {
        /// Their ids, in no particular order.
        leases: LeaseIds<'a>,
    },
}

/// The lease ids of a [`Reply::Leases`]: a slice of ids to encode, or the ids as they lie in a
/// received frame (8 bytes each, big-endian), read without copying.
#[derive(Clone, Copy)]
pub struct LeaseIds<'a>(Ids<'a>);

#[derive(Clone, Copy)]
enum Ids<'a> {
    Slice(&'a [u64]),
    Wire(&'a [u8]),
}

impl<'a> LeaseIds<'a> {
    /// The ids of `ids`, to encode.
    pub fn new(ids: &'a [u64]) -> LeaseIds<'a> {
        LeaseIds(Ids::Slice(ids))
    }

    /// How many ids there are.
    pub fn len(&self) -> usize {
        match self.0 {
            Ids::Slice(ids) => ids.len(),
            Ids::Wire(bytes) => bytes.len() / 8,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        let (slice, wire): (&'a [u64], &'a [u8]) = match self.0 {
            Ids::Slice(ids) => (ids, &[]),
            Ids::Wire(bytes) => (&[], bytes),
        };
        slice.iter().copied().chain(
            wire.chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        )
    }
}

impl PartialEq for LeaseIds<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for LeaseIds<'_> {}

impl fmt::Debug for LeaseIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Why a lease or session was taken away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The session missed its TTL.
    Expired = 1,
    /// The semaphore was closed.
    Closed = 2,
    /// A supervisor ended the session.
    SessionEnded = 3,
    /// An operator took the lease away (`Revoke`).
    Revoked = 4,
}

impl LostReason {
    fn from_u8(b: u8) -> Result<LostReason, DecodeError> {
        Ok(match b {
            1 => LostReason::Expired,
            2 => LostReason::Closed,
            3 => LostReason::SessionEnded,
            4 => LostReason::Revoked,
            _ => return Err(DecodeError::BadValue("lost reason")),
        })
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "its session expired",
            LostReason::Closed => "the semaphore was closed",
            LostReason::SessionEnded => "its session was ended by a supervisor",
            LostReason::Revoked => "an operator released it by force",
        })
    }
}

macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $name:ident = $code:literal,)*) => {
        /// The error codes of an `Error` reply. Codes below 100 are protocol errors (the
        /// connection is closed after them where PROTOCOL.md says so); codes from 100 are
        /// outcomes of a well-formed request.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $name,)*
            /// A code this version does not know; carries the number.
            Other(u16),
        }

        impl ErrorCode {
            /// The number on the wire.
            pub fn code(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $code,)*
                    ErrorCode::Other(c) => c,
                }
            }

            /// The code for a number.
            pub fn from_code(c: u16) -> ErrorCode {
                match c {
                    $($code => ErrorCode::$name,)*
                    other => ErrorCode::Other(other),
                }
            }
        }
    };
}

error_codes! {
    /// The frame could not be decoded. The server closes the connection.
    Malformed = 1,
    /// The frame exceeds the size limit. The server closes the connection.
    TooLarge = 2,
    /// The handshake was missing, repeated, or had a bad magic or version.
    Handshake = 3,
    /// The request needs a session and none is bound to this connection.
    NoSession = 4,
    /// The server is shutting down.
    ShuttingDown = 5,
    /// The `Hello` carried no token, or a wrong one, for a server that requires one. The
    /// server closes the connection; retrying with the same token cannot succeed.
    Unauthorized = 6,
    /// The request changes other clients' state (close a semaphore, reset a job, end another
    /// session) and the server requires the admin token for that.
    Forbidden = 7,
    /// An argument is out of range.
    InvalidArgument = 100,
    /// The semaphore exists with another capacity.
    CapacityMismatch = 101,
    /// No semaphore has this name.
    NoSuchSemaphore = 102,
    /// The semaphore is closed.
    Closed = 103,
    /// The weight exceeds the capacity.
    WeightExceedsCapacity = 104,
    /// The session does not exist (closed, expired, never opened).
    SessionNotFound = 105,
    /// The lease is neither held nor queued.
    UnknownLease = 106,
    /// The lease id is in use for another semaphore or weight.
    LeaseConflict = 107,
    /// The acquire timed out (or, with timeout 0, found no free permits).
    TimedOut = 108,
    /// The queued acquire was withdrawn by a release of its lease.
    Cancelled = 109,
    /// A retry of the same acquire replaced this request.
    Superseded = 110,
    /// The session ended while the acquire was queued.
    SessionEnded = 111,
    /// The semaphore has holders or waiters and is not closed, so it cannot be deleted.
    InUse = 112,
}

const HELLO: u8 = 0x01;
const OPEN_SESSION: u8 = 0x02;
const RESUME_SESSION: u8 = 0x03;
const KEEP_ALIVE: u8 = 0x04;
const CLOSE_SESSION: u8 = 0x05;
const END_SESSION: u8 = 0x06;
const ENSURE: u8 = 0x07;
const ACQUIRE: u8 = 0x08;
const RELEASE: u8 = 0x09;
const CLOSE: u8 = 0x0A;
const STATUS: u8 = 0x0B;
const PING: u8 = 0x0C;
const BEGIN_JOB: u8 = 0x0D;
const FINISH_JOB: u8 = 0x0E;
const RESET_JOB: u8 = 0x0F;
const WAIT_GROUP: u8 = 0x10;
const LEASES: u8 = 0x11;
const SET_CAPACITY: u8 = 0x12;
const DELETE: u8 = 0x13;
const REVOKE: u8 = 0x14;

const HELLO_OK: u8 = 0x81;
const SESSION_OPENED: u8 = 0x82;
const DONE: u8 = 0x83;
const GRANTED: u8 = 0x84;
const STATUS_DOC: u8 = 0x85;
const PONG: u8 = 0x86;
const JOB_COMPLETED: u8 = 0x87;
const JOB_BUSY: u8 = 0x88;
const JOB_RESET: u8 = 0x89;
const GROUP_SETTLED: u8 = 0x8A;
const LEASE_LIST: u8 = 0x8B;
const LEASE_LOST: u8 = 0xC0;
const SESSION_LOST: u8 = 0xC1;
const ERROR: u8 = 0xFF;

/// Finds the first whole frame in `buf`. Returns its payload (kind, request id and body) and
/// how many bytes of `buf` it used, `Ok(None)` when more bytes are needed, or an error when
/// the length prefix exceeds `max`, so that a peer cannot make the receiver buffer without
/// bound.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if len < 5 {
        return Err(DecodeError::Truncated(
            "frame shorter than kind and request id",
        ));
    }
    match buf.get(4..4 + len) {
        Some(payload) => Ok(Some((payload, 4 + len))),
        None => Ok(None),
    }
}

/// Appends a frame holding `request` to `buf`.
pub fn encode_request(id: u32, request: &Request<'_>, buf: &mut Vec<u8>) {
    let start = begin(buf, id, kind_of_request(request));
    match *request {
        Request::Hello {
            magic,
            version,
            client,
            token,
        } => {
            buf.extend_from_slice(&magic);
            buf.extend_from_slice(&version.to_be_bytes());
            put_str(buf, client);
            if !token.is_empty() {
                put_str(buf, token);
            }
        }
        Request::OpenSession { session, ttl_ms } => {
            buf.extend_from_slice(&session.to_be_bytes());
            buf.extend_from_slice(&ttl_ms.to_be_bytes());
        }
        Request::ResumeSession { session } | Request::EndSession { session } => {
            buf.extend_from_slice(&session.to_be_bytes());
        }
        Request::KeepAlive | Request::CloseSession | Request::Ping | Request::Leases => {}
        Request::Ensure { capacity, name } | Request::SetCapacity { capacity, name } => {
            buf.extend_from_slice(&capacity.to_be_bytes());
            put_str(buf, name);
        }
        Request::Delete { name } => put_str(buf, name),
        Request::Revoke { lease, name } => {
            buf.extend_from_slice(&lease.to_be_bytes());
            put_str(buf, name);
        }
        Request::Acquire {
            lease,
            weight,
            timeout_ms,
            name,
        } => {
            buf.extend_from_slice(&lease.to_be_bytes());
            buf.extend_from_slice(&weight.to_be_bytes());
            buf.extend_from_slice(&timeout_ms.to_be_bytes());
            put_str(buf, name);
        }
        Request::Release { lease } => buf.extend_from_slice(&lease.to_be_bytes()),
        Request::Close { name } => put_str(buf, name),
        Request::Status {
            name,
            prefix,
            after,
            limit,
        } => {
            put_str(buf, name);
            put_str(buf, prefix);
            put_str(buf, after);
            buf.extend_from_slice(&limit.to_be_bytes());
        }
        Request::BeginJob {
            lease,
            timeout_ms,
            job,
            group,
        } => {
            buf.extend_from_slice(&lease.to_be_bytes());
            buf.extend_from_slice(&timeout_ms.to_be_bytes());
            put_str(buf, job);
            put_str(buf, group);
        }
        Request::FinishJob {
            lease,
            succeeded,
            started_unix_ms,
            duration_ms,
            reason,
        } => {
            buf.extend_from_slice(&lease.to_be_bytes());
            buf.push(u8::from(succeeded));
            buf.extend_from_slice(&started_unix_ms.to_be_bytes());
            buf.extend_from_slice(&duration_ms.to_be_bytes());
            put_str(buf, reason);
        }
        Request::ResetJob { job } => put_str(buf, job),
        Request::WaitGroup {
            wait,
            jobs,
            timeout_ms,
            group,
        } => {
            buf.extend_from_slice(&wait.to_be_bytes());
            buf.extend_from_slice(&jobs.to_be_bytes());
            buf.extend_from_slice(&timeout_ms.to_be_bytes());
            put_str(buf, group);
        }
    }
    finish(buf, start);
}

fn kind_of_request(r: &Request<'_>) -> u8 {
    match r {
        Request::Hello { .. } => HELLO,
        Request::OpenSession { .. } => OPEN_SESSION,
        Request::ResumeSession { .. } => RESUME_SESSION,
        Request::KeepAlive => KEEP_ALIVE,
        Request::CloseSession => CLOSE_SESSION,
        Request::EndSession { .. } => END_SESSION,
        Request::Ensure { .. } => ENSURE,
        Request::Acquire { .. } => ACQUIRE,
        Request::Release { .. } => RELEASE,
        Request::Close { .. } => CLOSE,
        Request::Status { .. } => STATUS,
        Request::Ping => PING,
        Request::BeginJob { .. } => BEGIN_JOB,
        Request::FinishJob { .. } => FINISH_JOB,
        Request::ResetJob { .. } => RESET_JOB,
        Request::WaitGroup { .. } => WAIT_GROUP,
        Request::Leases => LEASES,
        Request::SetCapacity { .. } => SET_CAPACITY,
        Request::Delete { .. } => DELETE,
        Request::Revoke { .. } => REVOKE,
    }
}

/// Decodes a frame payload (as returned by [`split_frame`]) into a request id and request.
pub fn decode_request(payload: &[u8]) -> Result<(u32, Request<'_>), DecodeError> {
    let mut r = Reader::new(payload);
    let kind = r.u8()?;
    let id = r.u32()?;
    let request = match kind {
        HELLO => Request::Hello {
            magic: r.array()?,
            version: r.u16()?,
            client: r.str()?,
            token: if r.buf.is_empty() { "" } else { r.str()? },
        },
        OPEN_SESSION => Request::OpenSession {
            session: r.u64()?,
            ttl_ms: r.u32()?,
        },
        RESUME_SESSION => Request::ResumeSession { session: r.u64()? },
        KEEP_ALIVE => Request::KeepAlive,
        CLOSE_SESSION => Request::CloseSession,
        END_SESSION => Request::EndSession { session: r.u64()? },
        ENSURE => Request::Ensure {
            capacity: r.u32()?,
            name: r.str()?,
        },
        ACQUIRE => Request::Acquire {
            lease: r.u64()?,
            weight: r.u32()?,
            timeout_ms: r.u32()?,
            name: r.str()?,
        },
        RELEASE => Request::Release { lease: r.u64()? },
        CLOSE => Request::Close { name: r.str()? },
        STATUS => {
            let name = r.str()?;
            if r.buf.is_empty() {
                // The form of version 1 before paging: the first page.
                Request::Status {
                    name,
                    prefix: "",
                    after: "",
                    limit: 0,
                }
            } else {
                Request::Status {
                    name,
                    prefix: r.str()?,
                    after: r.str()?,
                    limit: r.u32()?,
                }
            }
        }
        PING => Request::Ping,
        BEGIN_JOB => Request::BeginJob {
            lease: r.u64()?,
            timeout_ms: r.u32()?,
            job: r.str()?,
            group: r.str()?,
        },
        FINISH_JOB => Request::FinishJob {
            lease: r.u64()?,
            succeeded: r.flag("succeeded flag")?,
            started_unix_ms: r.u64()?,
            duration_ms: r.u64()?,
            reason: r.str()?,
        },
        RESET_JOB => Request::ResetJob { job: r.str()? },
        WAIT_GROUP => Request::WaitGroup {
            wait: r.u64()?,
            jobs: r.u32()?,
            timeout_ms: r.u32()?,
            group: r.str()?,
        },
        LEASES => Request::Leases,
        SET_CAPACITY => Request::SetCapacity {
            capacity: r.u32()?,
            name: r.str()?,
        },
        DELETE => Request::Delete { name: r.str()? },
        REVOKE => Request::Revoke {
            lease: r.u64()?,
            name: r.str()?,
        },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    r.end()?;
    Ok((id, request))
}

/// Appends a frame holding `reply` to `buf`.
pub fn encode_reply(id: u32, reply: &Reply<'_>, buf: &mut Vec<u8>) {
    let kind = match reply {
        Reply::HelloOk { .. } => HELLO_OK,
        Reply::SessionOpened { .. } => SESSION_OPENED,
        Reply::Done => DONE,
        Reply::Granted { .. } => GRANTED,
        Reply::Status { .. } => STATUS_DOC,
        Reply::Pong => PONG,
        Reply::Error { .. } => ERROR,
        Reply::LeaseLost { .. } => LEASE_LOST,
        Reply::SessionLost { .. } => SESSION_LOST,
        Reply::JobCompleted { .. } => JOB_COMPLETED,
        Reply::JobBusy { .. } => JOB_BUSY,
        Reply::JobReset { .. } => JOB_RESET,
        Reply::GroupSettled { .. } => GROUP_SETTLED,
        Reply::Leases { .. } => LEASE_LIST,
    };
    let start = begin(buf, id, kind);
    match *reply {
        Reply::HelloOk {
            version,
            default_ttl_ms,
            server,
        } => {
            buf.extend_from_slice(&version.to_be_bytes());
            buf.extend_from_slice(&default_ttl_ms.to_be_bytes());
            put_str(buf, server);
        }
        Reply::SessionOpened { ttl_ms, existed } => {
            buf.extend_from_slice(&ttl_ms.to_be_bytes());
            buf.push(u8::from(existed));
        }
        Reply::Done | Reply::Pong => {}
        Reply::Granted { token } => buf.extend_from_slice(&token.to_be_bytes()),
        Reply::Status { json } => {
            // The document is the rest of the frame: it can be larger than a string allows.
            buf.extend_from_slice(json);
        }
        Reply::Error { code, message } => {
            buf.extend_from_slice(&code.code().to_be_bytes());
            put_str(buf, message);
        }
        Reply::LeaseLost {
            lease,
            token,
            reason,
            name,
        } => {
            buf.extend_from_slice(&lease.to_be_bytes());
            buf.extend_from_slice(&token.to_be_bytes());
            buf.push(reason as u8);
            put_str(buf, name);
        }
        Reply::SessionLost { session, reason } => {
            buf.extend_from_slice(&session.to_be_bytes());
            buf.push(reason as u8);
        }
        Reply::JobCompleted {
            token,
            started_unix_ms,
            duration_ms,
            client,
        } => {
            buf.extend_from_slice(&token.to_be_bytes());
            buf.extend_from_slice(&started_unix_ms.to_be_bytes());
            buf.extend_from_slice(&duration_ms.to_be_bytes());
            put_str(buf, client);
        }
        Reply::JobBusy {
            token,
            age_ms,
            client,
        } => {
            buf.extend_from_slice(&token.to_be_bytes());
            buf.extend_from_slice(&age_ms.to_be_bytes());
            put_str(buf, client);
        }
        Reply::JobReset { was_completed } => buf.push(u8::from(was_completed)),
        Reply::GroupSettled {
            jobs,
            completed,
            running,
            failures,
        } => {
            buf.extend_from_slice(&jobs.to_be_bytes());
            buf.extend_from_slice(&completed.to_be_bytes());
            buf.extend_from_slice(&running.to_be_bytes());
            buf.extend_from_slice(&failures.to_be_bytes());
        }
        Reply::Leases { leases } => {
            // The frame limit a client accepts (64 MiB) holds millions of ids.
            let count = u32::try_from(leases.len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(&count.to_be_bytes());
            for lease in leases.iter().take(count as usize) {
                buf.extend_from_slice(&lease.to_be_bytes());
            }
        }
    }
    finish(buf, start);
}

/// Decodes a frame payload (as returned by [`split_frame`]) into a request id and reply.
pub fn decode_reply(payload: &[u8]) -> Result<(u32, Reply<'_>), DecodeError> {
    let mut r = Reader::new(payload);
    let kind = r.u8()?;
    let id = r.u32()?;
    let reply = match kind {
        HELLO_OK => Reply::HelloOk {
            version: r.u16()?,
            default_ttl_ms: r.u32()?,
            server: r.str()?,
        },
        SESSION_OPENED => Reply::SessionOpened {
            ttl_ms: r.u32()?,
            existed: r.flag("existed flag")?,
        },
        DONE => Reply::Done,
        GRANTED => Reply::Granted { token: r.u64()? },
        STATUS_DOC => Reply::Status { json: r.rest() },
        PONG => Reply::Pong,
        ERROR => Reply::Error {
            code: ErrorCode::from_code(r.u16()?),
            message: r.str()?,
        },
        LEASE_LOST => Reply::LeaseLost {
            lease: r.u64()?,
            token: r.u64()?,
            reason: LostReason::from_u8(r.u8()?)?,
            name: r.str()?,
        },
        SESSION_LOST => Reply::SessionLost {
            session: r.u64()?,
            reason: LostReason::from_u8(r.u8()?)?,
        },
        JOB_COMPLETED => Reply::JobCompleted {
            token: r.u64()?,
            started_unix_ms: r.u64()?,
            duration_ms: r.u64()?,
            client: r.str()?,
        },
        JOB_BUSY => Reply::JobBusy {
            token: r.u64()?,
            age_ms: r.u64()?,
            client: r.str()?,
        },
        JOB_RESET => Reply::JobReset {
            was_completed: r.flag("was_completed flag")?,
        },
        GROUP_SETTLED => Reply::GroupSettled {
            jobs: r.u32()?,
            completed: r.u32()?,
            running: r.u32()?,
            failures: r.u64()?,
        },
        LEASE_LIST => {
            let count = r.u32()? as usize;
            let bytes = count
                .checked_mul(8)
                .ok_or(DecodeError::Truncated("lease list"))?;
            Reply::Leases {
                leases: LeaseIds(Ids::Wire(r.take(bytes, "lease list")?)),
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    r.end()?;
    Ok((id, reply))
}

/// Starts a frame: a length placeholder, the kind and the request id. Returns where the
/// length goes.
fn begin(buf: &mut Vec<u8>, id: u32, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    buf.extend_from_slice(&id.to_be_bytes());
    start
}

fn finish(buf: &mut [u8], start: usize) {
    // A frame longer than u32::MAX cannot be built from the message types above: the only
    // unbounded field is the status document, which the server caps far below that.
    let len = u32::try_from(buf.len() - start - 4).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a string, cut at a character boundary to the 65,535 bytes a `u16` length allows.
fn put_str(buf: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.extend_from_slice(&(end as u16).to_be_bytes());
    buf.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N, "fixed-size field")?;
        let mut a = [0; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "u8 field")?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        let bytes = self.take(len, "string")?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::BadUtf8)
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadValue(what)),
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAGIC, MAX_REQUEST_FRAME, VERSION};
    use proptest::prelude::*;

    fn roundtrip_request(id: u32, req: Request<'_>) {
        let mut buf = Vec::new();
        encode_request(id, &req, &mut buf);
        let (payload, used) = split_frame(&buf, MAX_REQUEST_FRAME)
            .expect("valid frame")
            .expect("whole frame");
        assert_eq!(used, buf.len());
        assert_eq!(decode_request(payload).expect("decodes"), (id, req));
    }

    fn roundtrip_reply(id: u32, reply: Reply<'_>) {
        let mut buf = Vec::new();
        encode_reply(id, &reply, &mut buf);
        let (payload, _) = split_frame(&buf, usize::MAX)
            .expect("valid")
            .expect("whole");
        assert_eq!(decode_reply(payload).expect("decodes"), (id, reply));
    }

    /// A `Hello` without a token is laid out exactly as before the token existed, so old
    /// clients' handshakes decode, and reach a server without a token unchanged.
    #[test]
    fn a_hello_without_token_keeps_the_old_layout() {
        let mut buf = Vec::new();
        let hello = Request::Hello {
            magic: MAGIC,
            version: VERSION,
            client: "ab",
            token: "",
        };
        encode_request(1, &hello, &mut buf);
        let old: &[u8] = &[
            0, 0, 0, 15, HELLO, 0, 0, 0, 1, b'T', b'S', b'T', b'L', 0, 1, 0, 2, b'a', b'b',
        ];
        assert_eq!(buf, old);
        let (payload, _) = split_frame(old, MAX_REQUEST_FRAME)
            .expect("valid")
            .expect("whole");
        assert_eq!(decode_request(payload).expect("decodes"), (1, hello));
    }

    #[test]
    fn status_request_of_version_1_before_paging_still_decodes() {
        // kind, id, then only the name: what clients sent before the paging fields.
        let mut payload = vec![STATUS];
        payload.extend_from_slice(&7u32.to_be_bytes());
        put_str(&mut payload, "db");
        assert_eq!(
            decode_request(&payload).expect("decodes"),
            (
                7,
                Request::Status {
                    name: "db",
                    prefix: "",
                    after: "",
                    limit: 0
                }
            )
        );
    }

    #[test]
    fn every_message_roundtrips() {
        for req in [
            Request::Hello {
                magic: MAGIC,
                version: VERSION,
                client: "host:1234",
                token: "",
            },
            Request::Hello {
                magic: MAGIC,
                version: VERSION,
                client: "host:1234",
                token: "s3cret",
            },
            Request::OpenSession {
                session: u64::MAX,
                ttl_ms: 10_000,
            },
            Request::ResumeSession { session: 3 },
            Request::Leases,
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
                timeout_ms: crate::NO_TIMEOUT,
                name: "gpu ☃",
            },
            Request::Release { lease: 77 },
            Request::Close { name: "db" },
            Request::Status {
                name: "",
                prefix: "",
                after: "",
                limit: 0,
            },
            Request::Status {
                name: "",
                prefix: "build/",
                after: "build/7",
                limit: 500,
            },
            Request::Ping,
            Request::BeginJob {
                lease: 4,
                timeout_ms: 0,
                job: "build-7",
                group: "nightly",
            },
            Request::FinishJob {
                lease: 4,
                succeeded: false,
                started_unix_ms: 1_700_000_000_000,
                duration_ms: 1234,
                reason: "exited with status 3",
            },
            Request::ResetJob { job: "build-7" },
            Request::SetCapacity {
                capacity: 5,
                name: "db",
            },
            Request::Delete { name: "bench-1" },
            Request::Revoke {
                lease: u64::MAX,
                name: "db",
            },
            Request::WaitGroup {
                wait: 9,
                jobs: 40,
                timeout_ms: crate::NO_TIMEOUT,
                group: "nightly",
            },
        ] {
            roundtrip_request(5, req);
        }
        for reply in [
            Reply::HelloOk {
                version: 1,
                default_ttl_ms: 10_000,
                server: "turnstile 0.1",
            },
            Reply::SessionOpened {
                ttl_ms: 5,
                existed: true,
            },
            Reply::Done,
            Reply::Granted { token: 42 },
            Reply::Status {
                json: b"{\"semaphores\":[]}",
            },
            Reply::Pong,
            Reply::Error {
                code: ErrorCode::CapacityMismatch,
                message: "nope",
            },
            Reply::Error {
                code: ErrorCode::Other(999),
                message: "",
            },
            Reply::LeaseLost {
                lease: 1,
                token: 2,
                reason: LostReason::Closed,
                name: "db",
            },
            Reply::LeaseLost {
                lease: 3,
                token: 4,
                reason: LostReason::Revoked,
                name: "db",
            },
            Reply::Error {
                code: ErrorCode::InUse,
                message: "held",
            },
            Reply::SessionLost {
                session: 1,
                reason: LostReason::Expired,
            },
            Reply::JobCompleted {
                token: 3,
                started_unix_ms: 1_700_000_000_000,
                duration_ms: 5,
                client: "host-a:12",
            },
            Reply::JobBusy {
                token: 4,
                age_ms: 250,
                client: "host-b:13",
            },
            Reply::JobReset {
                was_completed: true,
            },
            Reply::GroupSettled {
                jobs: 40,
                completed: 39,
                running: 0,
                failures: 2,
            },
            Reply::Leases {
                leases: LeaseIds::new(&[]),
            },
            Reply::Leases {
                leases: LeaseIds::new(&[1, u64::MAX, 0x0102_0304_0506_0708]),
            },
        ] {
            roundtrip_reply(0, reply);
        }
    }

    #[test]
    fn the_leases_reply_is_laid_out_as_documented() {
        let mut buf = Vec::new();
        let leases = LeaseIds::new(&[7, 0x0100]);
        encode_reply(3, &Reply::Leases { leases }, &mut buf);
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 25,   // length
            0x8B,          // kind Leases
            0, 0, 0, 3,    // request id
            0, 0, 0, 2,    // count
            0, 0, 0, 0, 0, 0, 0, 7,
            0, 0, 0, 0, 0, 0, 1, 0,
        ];
        assert_eq!(buf, want);
        // A count that promises more ids than the frame holds is an error, not a panic.
        let short = [
            0x8B, 0, 0, 0, 3, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 7,
        ];
        assert!(decode_reply(&short).is_err());
    }

    #[test]
    fn the_acquire_frame_is_laid_out_as_documented() {
        // PROTOCOL.md shows this exact frame; keep them in step.
        let mut buf = Vec::new();
        encode_request(
            7,
            &Request::Acquire {
                lease: 1,
                weight: 2,
                timeout_ms: 500,
                name: "db",
            },
            &mut buf,
        );
        assert_eq!(
            buf,
            [
                0, 0, 0, 25,   // length
                0x08, // kind: Acquire
                0, 0, 0, 7, // request id
                0, 0, 0, 0, 0, 0, 0, 1, // lease
                0, 0, 0, 2, // weight
                0, 0, 1, 0xF4, // timeout_ms = 500
                0, 2, b'd', b'b', // name
            ]
        );
    }

    #[test]
    fn oversized_and_partial_frames() {
        let buf = [0xFF, 0xFF, 0xFF, 0xFF, 1];
        assert!(matches!(
            split_frame(&buf, MAX_REQUEST_FRAME),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(split_frame(&[0, 0, 0], MAX_REQUEST_FRAME), Ok(None));
        assert_eq!(
            split_frame(&[0, 0, 0, 9, 1, 0], MAX_REQUEST_FRAME),
            Ok(None)
        );
        assert!(split_frame(&[0, 0, 0, 1, 1], MAX_REQUEST_FRAME).is_err());
    }

    #[test]
    fn bad_bodies_are_errors() {
        // Unknown kind.
        assert_eq!(
            decode_request(&[0x7F, 0, 0, 0, 1]),
            Err(DecodeError::UnknownKind(0x7F))
        );
        // Release with a short lease field.
        assert!(matches!(
            decode_request(&[RELEASE, 0, 0, 0, 1, 0, 0]),
            Err(DecodeError::Truncated(_))
        ));
        // Trailing bytes.
        assert_eq!(
            decode_request(&[PING, 0, 0, 0, 1, 9]),
            Err(DecodeError::Trailing(1))
        );
        // Invalid UTF-8 name.
        assert_eq!(
            decode_request(&[CLOSE, 0, 0, 0, 1, 0, 1, 0xFF]),
            Err(DecodeError::BadUtf8)
        );
    }

    #[test]
    fn long_strings_are_cut_at_a_char_boundary() {
        let long = "é".repeat(40_000);
        let mut buf = Vec::new();
        encode_request(1, &Request::Close { name: &long }, &mut buf);
        let (payload, _) = split_frame(&buf, usize::MAX).expect("ok").expect("whole");
        let (_, req) = decode_request(payload).expect("decodes");
        let Request::Close { name } = req else {
            panic!("wrong kind")
        };
        assert_eq!(name.len(), 65_534);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split_frame(&bytes, MAX_REQUEST_FRAME);
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
        }

        #[test]
        fn acquire_roundtrips(id: u32, lease: u64, weight: u32, timeout_ms: u32, name in "\\PC{0,40}") {
            roundtrip_request(id, Request::Acquire { lease, weight, timeout_ms, name: &name });
        }
    }
}
