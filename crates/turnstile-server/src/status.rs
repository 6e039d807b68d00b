//! Turns the core's views into the status document of the protocol.

use turnstile_core::{GroupSummary, JobView, SemaphoreView};
use turnstile_proto::{
    CompletionStatus, GroupStatus, HolderStatus, JobStatus, RunningStatus, SemaphoreStatus,
    StatusDoc, WaitSummary, WaiterStatus,
};

use crate::state::Shared;

/// Semaphores in a status page when the client leaves it to the server, and the most it gets.
pub(crate) const MAX_PAGE: usize = 1000;

/// Holders and waiters listed per semaphore in a status (their counts are always whole): a
/// semaphore with a million waiters must not make a reply larger than a frame.
pub(crate) const MAX_LISTED: usize = 1000;

/// Estimated bytes at which a page stops taking semaphores. With [`MAX_LISTED`], one semaphore
/// is at most about 1 MB of JSON, so a page stays far below the 64 MiB a client accepts.
const PAGE_BUDGET: usize = 4 << 20;

/// Semaphores copied per turn of the state lock: the lock is never held for more than this
/// many views, whatever the number of semaphores.
const SLICE: usize = 128;

/// Runs `f`, a long computation (a status page, a metrics page), without holding up the other
/// tasks of this worker thread: on a multi-threaded runtime, tokio first hands them to another
/// worker. (A task stuck behind a 300 ms scrape on its worker's queue waited for all of it,
/// though the state lock was free.)
pub(crate) fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// What a status request asks for.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ask<'a> {
    /// One semaphore (and the job of that name), or empty for a page.
    pub(crate) name: &'a str,
    /// Only names starting with this.
    pub(crate) prefix: &'a str,
    /// The page starts after this name.
    pub(crate) after: &'a str,
    /// Most semaphores in the page (0: [`MAX_PAGE`]).
    pub(crate) limit: u32,
}

/// The status document: of one semaphore (and the job of that name), or a page of the
/// semaphores, with the groups and jobs on the first page. The views are copied under the
/// state lock in slices of [`SLICE`] semaphores, and the document is built outside it, so that
/// a status of any size does not stall the other requests; a page is therefore not one
/// atomic snapshot (nor was the old whole document of semaphores, groups and jobs together
/// anything more than one moment's view).
pub(crate) fn status_doc(shared: &Shared, ask: Ask<'_>) -> StatusDoc {
    let now = shared.now();
    if !ask.name.is_empty() {
        let st = shared.lock();
        let one = st
            .core
            .semaphore_page(ask.name, "", 1, MAX_LISTED, now)
            .0
            .into_iter()
            .filter(|v| *v.name == *ask.name);
        let job = st.core.job(ask.name, now);
        drop(st);
        return StatusDoc {
            semaphores: one.map(|v| semaphore_status(&v)).collect(),
            jobs: job.iter().map(job_status).collect(),
            ..StatusDoc::default()
        };
    }
    let limit = match ask.limit as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    };
    let mut views = Vec::new();
    let mut bytes = 0usize;
    let mut cursor: String = ask.after.to_owned();
    let mut more = true;
    while more && views.len() < limit && bytes < PAGE_BUDGET {
        let n = SLICE.min(limit - views.len());
        let (slice, rest) = shared
            .lock()
            .core
            .semaphore_page(ask.prefix, &cursor, n, MAX_LISTED, now);
        more = rest;
        for v in slice {
            cursor.clear();
            cursor.push_str(&v.name);
            bytes += estimate(&v);
            views.push(v);
            if bytes >= PAGE_BUDGET && views.len() < limit {
                // Stop at this one; the rest of the slice comes with the next page.
                more = true;
                break;
            }
        }
    }
    if views.len() >= limit {
        // Whether anything follows a full page.
        more = !shared
            .lock()
            .core
            .semaphore_page(ask.prefix, &cursor, 1, 0, now)
            .0
            .is_empty();
    }
    let (groups, jobs) = if ask.after.is_empty() {
        let st = shared.lock();
        (st.core.groups(), st.core.jobs(now))
    } else {
        (Vec::new(), Vec::new())
    };
    StatusDoc {
        semaphores: views.iter().map(semaphore_status).collect(),
        groups: groups
            .iter()
            .filter(|(n, _)| n.starts_with(ask.prefix))
            .map(|(n, g)| group_status(n, g))
            .collect(),
        jobs: jobs
            .iter()
            .filter(|j| j.name.starts_with(ask.prefix))
            .map(job_status)
            .collect(),
        next: (more && !views.is_empty()).then_some(cursor),
    }
}

/// An upper estimate of the JSON bytes of a semaphore's entry.
fn estimate(v: &SemaphoreView) -> usize {
    let listed: usize = v
        .holders
        .iter()
        .map(|h| 160 + h.client.len())
        .sum::<usize>()
        + v.waiters
            .iter()
            .map(|w| 140 + w.client.len())
            .sum::<usize>();
    600 + 2 * v.name.len() + listed
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
        acquired_total: Some(v.counters.acquired_total),
        released_total: Some(v.counters.released_total),
        expired_total: Some(v.counters.expired_total),
        timed_out_total: Some(v.counters.timed_out_total),
        lost_total: Some(v.counters.lost_total),
        wait: WaitSummary {
            count: v.wait.count,
            mean_ms: ms(v.wait.mean()),
            p50_ms: ms(v.wait.quantile_estimate(0.5)),
            p99_ms: ms(v.wait.quantile_estimate(0.99)),
            max_ms: v.wait.max_us as f64 / 1000.0,
        },
    }
}
