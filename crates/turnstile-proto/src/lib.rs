//! The turnstile wire format. This crate is the only one that knows how bytes are laid out;
//! PROTOCOL.md at the repository root is its specification in prose.
//!
//! A connection carries *frames*. Every frame is a 4-byte big-endian length `n` followed by `n`
//! bytes: a 1-byte message kind, a 4-byte big-endian request id, and a body whose layout the
//! kind decides. Requests flow from client to server, replies and events from server to
//! client. A reply carries the id of its request, so many requests may be in flight on one
//! connection and replies may come back in any order; events carry request id 0.
//!
//! Integers are big-endian. A string is a `u16` byte length and that many bytes of UTF-8.
//!
//! ```
//! use turnstile_proto::{decode_request, encode_request, split_frame, Request, MAX_REQUEST_FRAME};
//!
//! let mut buf = Vec::new();
//! encode_request(7, &Request::Release { lease: 42 }, &mut buf);
//! let (payload, used) = split_frame(&buf, MAX_REQUEST_FRAME).unwrap().unwrap();
//! assert_eq!(used, buf.len());
//! assert_eq!(decode_request(payload).unwrap(), (7, Request::Release { lease: 42 }));
//! ```
#![deny(missing_docs)]

mod codec;
mod status;

pub use codec::{
    decode_reply, decode_request, encode_reply, encode_request, split_frame, DecodeError,
    ErrorCode, LeaseIds, LostReason, Reply, Request,
};
/// Serde helpers for ids written as decimal strings in JSON.
pub use status::id_string;
pub use status::{
    CompletionStatus, GroupStatus, HolderStatus, JobStatus, RunningStatus, SemaphoreStatus,
    StatusDoc, WaitSummary, WaiterStatus,
};

/// The protocol version this crate speaks. A server refuses a handshake with another version.
pub const VERSION: u16 = 1;

/// The four bytes that open a client's `Hello`, so that a server can tell a turnstile client
/// from a stray HTTP request or port scan in the first frame.
pub const MAGIC: [u8; 4] = *b"TSTL";

/// The largest frame a server accepts from a client: length prefix excluded. Requests are
/// small (the longest is an acquire with a 255-byte name); anything bigger is an attack or a
/// bug.
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;

/// The largest frame a client accepts from a server. Only status documents get large.
pub const MAX_REPLY_FRAME: usize = 64 * 1024 * 1024;

/// The timeout value on the wire that means "wait until granted".
pub const NO_TIMEOUT: u32 = u32::MAX;
