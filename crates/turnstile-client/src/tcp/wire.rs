//! From the driver's owned requests to frames, and from frames to owned replies.

use super::*;

pub(super) fn encode(id: u32, req: &Req, out: &mut Vec<u8>) {
    let wire = match req {
        Req::Ensure { name, capacity } => proto::Request::Ensure {
            capacity: *capacity,
            name,
        },
        Req::Acquire {
            lease,
            weight,
            deadline,
            name,
        } => proto::Request::Acquire {
            lease: *lease,
            weight: *weight,
            timeout_ms: timeout_left(*deadline),
            name,
        },
        Req::Release { lease } => proto::Request::Release { lease: *lease },
        Req::Close { name } => proto::Request::Close { name },
        Req::SetCapacity { name, capacity } => proto::Request::SetCapacity {
            capacity: *capacity,
            name,
        },
        Req::Delete { name } => proto::Request::Delete { name },
        Req::Revoke { name, lease } => proto::Request::Revoke {
            lease: *lease,
            name,
        },
        Req::Status {
            name,
            prefix,
            after,
        } => proto::Request::Status {
            name,
            prefix,
            after,
            limit: 0,
        },
        Req::EndSession { session } => proto::Request::EndSession { session: *session },
        Req::OpenSession { session, ttl_ms } => proto::Request::OpenSession {
            session: *session,
            ttl_ms: *ttl_ms,
        },
        Req::KeepAlive => proto::Request::KeepAlive,
        Req::CloseSession => proto::Request::CloseSession,
        Req::BeginJob {
            lease,
            deadline,
            job,
            group,
        } => proto::Request::BeginJob {
            lease: *lease,
            timeout_ms: timeout_left(*deadline),
            job,
            group,
        },
        Req::FinishJob {
            lease,
            succeeded,
            started_unix_ms,
            duration_ms,
            reason,
        } => proto::Request::FinishJob {
            lease: *lease,
            succeeded: *succeeded,
            started_unix_ms: *started_unix_ms,
            duration_ms: *duration_ms,
            reason,
        },
        Req::ResetJob { job } => proto::Request::ResetJob { job },
        Req::WaitGroup {
            wait,
            jobs,
            deadline,
            group,
        } => proto::Request::WaitGroup {
            wait: *wait,
            jobs: *jobs,
            timeout_ms: timeout_left(*deadline),
            group,
        },
        Req::Leases => proto::Request::Leases,
    };
    encode_request(id, &wire, out);
}

/// The wire timeout of a request with `deadline`: a re-sent request waits only for what is
/// left of its timeout.
pub(super) fn timeout_left(deadline: Option<Instant>) -> u32 {
    match deadline {
        None => NO_TIMEOUT,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).as_millis();
            u32::try_from(left)
                .unwrap_or(NO_TIMEOUT - 1)
                .min(NO_TIMEOUT - 1)
        }
    }
}

/// A reply copied out of the receive buffer.
pub(super) enum OwnedReply {
    Done,
    /// A job or group answer, already in its final form.
    Answer(Answer),
    Granted(u64),
    Status(Vec<u8>),
    SessionOpened(Duration),
    Error(ErrorCode, String),
    LeaseLost(u64, LostReason),
    SessionLost(LostReason),
    /// The session's held leases.
    Leases(Vec<u64>),
}

/// What the caller of a request gets for its reply: `None` for the replies that are not
/// answers to a caller (events, and the answers to the driver's own session requests).
pub(super) fn result_of(reply: OwnedReply) -> Option<Result<Answer, Error>> {
    Some(match reply {
        OwnedReply::Done => Ok(Answer::Done),
        OwnedReply::Granted(token) => Ok(Answer::Granted { token }),
        OwnedReply::Status(json) => Ok(Answer::Status(json)),
        OwnedReply::Answer(answer) => Ok(answer),
        OwnedReply::Error(code, message) => Err(match code {
            ErrorCode::TimedOut => Error::TimedOut,
            ErrorCode::SessionEnded => Error::SessionLost,
            _ => Error::Rejected { code, message },
        }),
        OwnedReply::SessionOpened(_)
        | OwnedReply::Leases(_)
        | OwnedReply::LeaseLost(..)
        | OwnedReply::SessionLost(_) => return None,
    })
}

pub(super) fn lost_reason(r: proto::LostReason) -> LostReason {
    match r {
        proto::LostReason::Expired => LostReason::Expired,
        proto::LostReason::Closed => LostReason::Closed,
        proto::LostReason::SessionEnded => LostReason::SessionEnded,
        proto::LostReason::Revoked => LostReason::Revoked,
    }
}

pub(super) fn owned(r: proto::Reply<'_>) -> OwnedReply {
    match r {
        proto::Reply::Done | proto::Reply::Pong | proto::Reply::HelloOk { .. } => OwnedReply::Done,
        proto::Reply::Granted { token } => OwnedReply::Granted(token),
        proto::Reply::Status { json } => OwnedReply::Status(json.to_vec()),
        proto::Reply::SessionOpened { ttl_ms, .. } => {
            OwnedReply::SessionOpened(Duration::from_millis(u64::from(ttl_ms)))
        }
        proto::Reply::Error { code, message } => OwnedReply::Error(code, message.to_owned()),
        proto::Reply::LeaseLost { lease, reason, .. } => {
            OwnedReply::LeaseLost(lease, lost_reason(reason))
        }
        proto::Reply::SessionLost { reason, .. } => OwnedReply::SessionLost(lost_reason(reason)),
        proto::Reply::JobCompleted {
            token,
            started_unix_ms,
            duration_ms,
            client,
        } => OwnedReply::Answer(Answer::JobCompleted(JobCompletion {
            client: client.to_owned(),
            token,
            started: std::time::UNIX_EPOCH + Duration::from_millis(started_unix_ms),
            duration: Duration::from_millis(duration_ms),
        })),
        proto::Reply::JobBusy {
            token,
            age_ms,
            client,
        } => OwnedReply::Answer(Answer::JobBusy(JobRunner {
            client: client.to_owned(),
            token,
            running_for: Duration::from_millis(age_ms),
        })),
        proto::Reply::JobReset { was_completed } => {
            OwnedReply::Answer(Answer::JobReset(was_completed))
        }
        proto::Reply::GroupSettled {
            jobs,
            completed,
            running,
            failures,
        } => OwnedReply::Answer(Answer::GroupSettled(GroupSummary {
            jobs,
            completed,
            running,
            failures,
        })),
        proto::Reply::Leases { leases } => OwnedReply::Leases(leases.iter().collect()),
    }
}
