//! Turns the core's views into the status document of the protocol.

use turnstile_core::{GroupSummary, JobView, SemaphoreView};
use turnstile_proto::{
    CompletionStatus, GroupStatus, HolderStatus, JobStatus, RunningStatus, SemaphoreStatus,
    StatusDoc, WaitSummary, WaiterStatus,
};

use crate::state::Shared;

/// The status document: of every semaphore, group and job (`name` empty), or of one
/// semaphore. The views are copied under the state lock; the document is built outside it,
/// so that a large status does not stall the other requests.
pub(crate) fn status_doc(shared: &Shared, name: &str) -> StatusDoc {
    let now = shared.now();
    let (views, groups, jobs) = {
        let st = shared.lock();
        if name.is_empty() {
            (st.core.semaphores(now), st.core.groups(), st.core.jobs(now))
        } else {
            // The semaphore and the job of that name (names are separate namespaces).
            let one = st.core.semaphore(name, now).into_iter().collect();
            (
                one,
                Vec::new(),
                st.core.job(name, now).into_iter().collect(),
            )
        }
    };
    StatusDoc {
        semaphores: views.iter().map(semaphore_status).collect(),
        groups: groups.iter().map(|(n, g)| group_status(n, g)).collect(),
        jobs: jobs.iter().map(job_status).collect(),
    }
}

fn ms64(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The status entry of one job group.
fn group_status(name: &str, g: &GroupSummary) -> GroupStatus {
    GroupStatus {
        name: name.to_owned(),
        jobs: g.jobs,
        completed: g.completed,
        running: g.running,
        failures: g.failures,
    }
}

/// The status entry of one job.
fn job_status(j: &JobView) -> JobStatus {
    JobStatus {
        name: j.name.to_string(),
        group: j.group.as_deref().map(str::to_owned),
        completed: j.completion.as_ref().map(|c| CompletionStatus {
            client: c.client.to_string(),
            token: c.token.0,
            started_unix_ms: c.started_unix_ms,
            duration_ms: ms64(c.duration),
        }),
        running: j.running.as_ref().map(|r| RunningStatus {
            client: r.client.to_string(),
            session: r.session.to_string(),
            token: r.token.0,
            age_ms: ms64(r.age),
        }),
        waiting: j.waiting as u64,
        failures: j.failures,
        last_failure: j.last_failure.as_deref().map(str::to_owned),
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The status entry of one semaphore.
fn semaphore_status(v: &SemaphoreView) -> SemaphoreStatus {
    SemaphoreStatus {
        name: v.name.to_string(),
        capacity: v.capacity,
        in_use: v.in_use,
        queued: v.queued as u64,
        queued_weight: v.queued_weight,
        closed: v.closed,
        holders: v
            .holders
            .iter()
            .map(|h| HolderStatus {
                lease_id: h.lease.0,
                session: h.session.to_string(),
                client: h.client.to_string(),
                weight: h.weight,
                token: h.token.0,
                age_ms: ms64(h.age),
            })
            .collect(),
        waiters: v
            .waiters
            .iter()
            .map(|w| WaiterStatus {
                lease_id: w.lease.0,
                session: w.session.to_string(),
                client: w.client.to_string(),
                weight: w.weight,
                age_ms: ms64(w.age),
            })
            .collect(),
        acquired_total: v.counters.acquired_total,
        released_total: v.counters.released_total,
        expired_total: v.counters.expired_total,
        timed_out_total: v.counters.timed_out_total,
        lost_total: v.counters.lost_total,
        wait: WaitSummary {
            count: v.wait.count,
            mean_ms: ms(v.wait.mean()),
            p50_ms: ms(v.wait.quantile_upper_bound(0.5)),
            p99_ms: ms(v.wait.quantile_upper_bound(0.99)),
            max_ms: v.wait.max_us as f64 / 1000.0,
        },
    }
}
