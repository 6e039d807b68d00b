//! The server's own counters, and the Prometheus text rendering of `GET /metrics`.
//!
//! Two kinds of numbers end up on the page. Per-semaphore numbers (capacity, permits in use,
//! queue length, the lifetime counters and the wait-time histogram), the job groups' summaries
//! and the session count are the core's: the HTTP handler copies them out under the state lock
//! with `Coordinator::semaphore_stats` and `groups`, which cost O(semaphores + jobs), never
//! O(leases). Everything about
//! the shell — connections, requests by kind and outcome, log syncs — is counted here, in
//! relaxed atomics that the hot path bumps without taking any lock.
//!
//! Rendering happens outside every lock, on the HTTP task.
//!
//! At scale: the first [`SERIES_CAP`] semaphores (by name) get series of their own and the
//! rest are summed into one series labelled `semaphore="_other"`, so that a scrape stays
//! bounded however many semaphores there are; and [`collect`] copies the numbers in slices of
//! [`STATS_SLICE`] semaphores, one turn of the state lock each, so that the scrape of a large
//! coordinator never holds the lock for long.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile_core::{GroupSummary, Request, SemaphoreView, WaitStats, WAIT_BUCKET_BOUNDS_US};
use turnstile_proto::ErrorCode;

/// The kinds of request a client can send, as the `kind` label of
/// `turnstile_requests_total`. `Invalid` counts frames that could not be decoded at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Hello,
    OpenSession,
    ResumeSession,
    KeepAlive,
    CloseSession,
    EndSession,
    Ensure,
    Acquire,
    Release,
    Close,
    Status,
    Ping,
    BeginJob,
    FinishJob,
    ResetJob,
    WaitGroup,
    Leases,
    SetCapacity,
    Delete,
    Revoke,
    Invalid,
}

const KINDS: usize = Kind::Invalid as usize + 1;

const KIND_NAMES: [&str; KINDS] = [
    "hello",
    "open_session",
    "resume_session",
    "keep_alive",
    "close_session",
    "end_session",
    "ensure",
    "acquire",
    "release",
    "close",
    "status",
    "ping",
    "begin_job",
    "finish_job",
    "reset_job",
    "wait_group",
    "leases",
    "set_capacity",
    "delete",
    "revoke",
    "invalid",
];

impl Kind {
    /// The kind of a request that reaches the core.
    pub(crate) fn of(request: &Request<'_>) -> Kind {
        match request {
            Request::OpenSession { .. } => Kind::OpenSession,
            Request::ResumeSession { .. } => Kind::ResumeSession,
            Request::KeepAlive { .. } => Kind::KeepAlive,
            Request::CloseSession { .. } => Kind::CloseSession,
            Request::EndSession { .. } => Kind::EndSession,
            Request::Ensure { .. } => Kind::Ensure,
            Request::Acquire { .. } => Kind::Acquire,
            Request::Release { .. } => Kind::Release,
            Request::Close { .. } => Kind::Close,
            Request::BeginJob { .. } => Kind::BeginJob,
            Request::FinishJob { .. } => Kind::FinishJob,
            Request::ResetJob { .. } => Kind::ResetJob,
            Request::WaitGroup { .. } => Kind::WaitGroup,
            Request::SetCapacity { .. } => Kind::SetCapacity,
            Request::Delete { .. } => Kind::Delete,
            Request::Revoke { .. } => Kind::Revoke,
        }
    }

    /// Whether the core may answer a request of this kind later than the step that handled
    /// it (a queued acquire, a queued job attempt, a group wait).
    pub(crate) fn may_wait(self) -> bool {
        matches!(self, Kind::Acquire | Kind::BeginJob | Kind::WaitGroup)
    }
}

/// How a request ended: `Ok`, or the error code of its reply. The `outcome` label.
const OUTCOME_NAMES: [&str; 20] = [
    "ok",
    "malformed",
    "too_large",
    "handshake",
    "no_session",
    "shutting_down",
    "invalid_argument",
    "capacity_mismatch",
    "no_such_semaphore",
    "closed",
    "weight_exceeds_capacity",
    "session_not_found",
    "unknown_lease",
    "lease_conflict",
    "timed_out",
    "cancelled",
    "superseded",
    "session_ended",
    "in_use",
    "other_error",
];

const OUTCOMES: usize = OUTCOME_NAMES.len();

/// The index of a reply's outcome in [`OUTCOME_NAMES`].
pub(crate) fn outcome(code: Option<ErrorCode>) -> usize {
    match code {
        None => 0,
        Some(ErrorCode::Malformed) => 1,
        Some(ErrorCode::TooLarge) => 2,
        Some(ErrorCode::Handshake) => 3,
        Some(ErrorCode::NoSession) => 4,
        Some(ErrorCode::ShuttingDown) => 5,
        Some(ErrorCode::InvalidArgument) => 6,
        Some(ErrorCode::CapacityMismatch) => 7,
        Some(ErrorCode::NoSuchSemaphore) => 8,
        Some(ErrorCode::Closed) => 9,
        Some(ErrorCode::WeightExceedsCapacity) => 10,
        Some(ErrorCode::SessionNotFound) => 11,
        Some(ErrorCode::UnknownLease) => 12,
        Some(ErrorCode::LeaseConflict) => 13,
        Some(ErrorCode::TimedOut) => 14,
        Some(ErrorCode::Cancelled) => 15,
        Some(ErrorCode::Superseded) => 16,
        Some(ErrorCode::SessionEnded) => 17,
        Some(ErrorCode::InUse) => 18,
        // `Other` and codes added later.
        Some(_) => 19,
    }
}

/// Upper bounds of the log sync histogram, in seconds: from 50 µs (a sync that found nothing
/// to flush, or battery-backed storage) to 2.5 s (a disk in trouble).
const FSYNC_BOUNDS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// A histogram with fixed bounds that any thread can update without a lock.
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Not cumulative: `buckets[i]` counts observations in `(bounds[i-1], bounds[i]]`; the
    /// last one counts those above every bound.
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
    }
}

/// Counters of the shell: connections, requests, the log, the HTTP port.
pub(crate) struct Metrics {
    /// Client connections open now.
    pub(crate) connections: AtomicU64,
    /// Client connections accepted since the start.
    pub(crate) connections_total: AtomicU64,
    requests: Vec<AtomicU64>,
    /// How long each sync of the log took.
    pub(crate) fsync: Histogram,
    /// Bytes appended to the log.
    pub(crate) log_bytes: AtomicU64,
    /// Snapshots written.
    pub(crate) snapshots: AtomicU64,
    /// Connections open on the HTTP port now.
    pub(crate) http_connections: AtomicU64,
    /// HTTP requests by route and status code. HTTP is not a hot path; a lock is fine.
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
    started: SystemTime,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        Metrics {
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            requests: (0..KINDS * OUTCOMES).map(|_| AtomicU64::new(0)).collect(),
            fsync: Histogram::new(&FSYNC_BOUNDS),
            log_bytes: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            http_connections: AtomicU64::new(0),
            http: Mutex::new(BTreeMap::new()),
            started: SystemTime::now(),
        }
    }

    /// Counts one answered request: `outcome` is an index from [`outcome`].
    pub(crate) fn request(&self, kind: Kind, outcome: usize) {
        if let Some(c) = self.requests.get(kind as usize * OUTCOMES + outcome) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Counts one HTTP request.
    pub(crate) fn http_request(&self, route: &'static str, code: u16) {
        let mut http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *http.entry((route, code)).or_insert(0) += 1;
    }
}

/// What `/metrics` shows of the core, copied out under the state lock.
pub(crate) struct CoreNumbers {
    pub(crate) semaphores: Vec<SemaphoreView>,
    /// The sum of the semaphores past [`SERIES_CAP`], if there are any.
    pub(crate) other: Option<SemaphoreView>,
    pub(crate) groups: Vec<(std::sync::Arc<str>, GroupSummary)>,
    pub(crate) sessions: usize,
    pub(crate) leases: usize,
    /// Whether the server keeps a log (the log metrics are left out otherwise).
    pub(crate) durable: bool,
}

/// Builds a page of the Prometheus text exposition format (version 0.0.4), one family at a
/// time: `# HELP` and `# TYPE` once, then its samples.
struct Page {
    out: String,
}

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of one histogram: cumulative `_bucket`s with `le`, then `_sum` and
    /// `_count`. `counts` are per bucket (not cumulative), one more than `bounds`.
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: impl Iterator<Item = f64>,
        counts: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut seen = 0u64;
        for (bound, n) in bounds.zip(counts) {
            seen += n;
            let le = bound.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, seen);
        }
        let total: u64 = counts.iter().sum();
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, total);
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, total);
    }
}

/// Escapes a label value as the text format asks: backslash, double quote and newline.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A per-semaphore family: name, type, help, and the value of one semaphore.
type SemaphoreFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SemaphoreView) -> u64,
);

/// The per-semaphore gauges and counters, in the order of the page.
const SEMAPHORE_FAMILIES: [SemaphoreFamily; 10] = [
    (
        "turnstile_semaphore_capacity",
        "gauge",
        "Permits the semaphore has.",
        |s| s.capacity.into(),
    ),
    (
        "turnstile_semaphore_in_use",
        "gauge",
        "Permits held now.",
        |s| s.in_use.into(),
    ),
    (
        "turnstile_semaphore_queued",
        "gauge",
        "Acquires waiting in the queue now.",
        |s| s.queued as u64,
    ),
    (
        "turnstile_semaphore_queued_permits",
        "gauge",
        "Permits the waiting acquires ask for, together.",
        |s| s.queued_weight,
    ),
    (
        "turnstile_semaphore_closed",
        "gauge",
        "1 if the semaphore was closed, else 0.",
        |s| s.closed.into(),
    ),
    (
        "turnstile_semaphore_acquired_total",
        "counter",
        "Grants since the server started.",
        |s| s.counters.acquired_total,
    ),
    (
        "turnstile_semaphore_released_total",
        "counter",
        "Leases released by their holders or a clean session close.",
        |s| s.counters.released_total,
    ),
    (
        "turnstile_semaphore_expired_total",
        "counter",
        "Leases freed because their session expired or was ended by a supervisor.",
        |s| s.counters.expired_total,
    ),
    (
        "turnstile_semaphore_timed_out_total",
        "counter",
        "Queued acquires whose timeout passed.",
        |s| s.counters.timed_out_total,
    ),
    (
        "turnstile_semaphore_lost_total",
        "counter",
        "Leases taken away because the semaphore was closed.",
        |s| s.counters.lost_total,
    ),
];

fn wait_histogram(page: &mut Page, s: &SemaphoreView) {
    let w: &WaitStats = &s.wait;
    page.histogram(
        "turnstile_semaphore_wait_seconds",
        &[("semaphore", &s.name)],
        WAIT_BUCKET_BOUNDS_US.iter().map(|&us| us as f64 / 1e6),
        &w.buckets,
        w.sum_us as f64 / 1e6,
    );
}

/// Semaphores with series of their own on the metrics page; the rest share `_other`.
pub(crate) const SERIES_CAP: usize = 500;

/// The label of the series that sums the semaphores past [`SERIES_CAP`]. Not a name a
/// client can confuse with it for long: it is only ever one series, at the end.
pub(crate) const OTHER: &str = "_other";

/// Semaphores whose numbers are copied per turn of the state lock.
pub(crate) const STATS_SLICE: usize = 1024;

/// Copies the core's numbers for the metrics page: the first [`SERIES_CAP`] semaphores, the
/// sum of the others, the groups and the counts. The lock is taken once per
/// [`STATS_SLICE`] semaphores, so a scrape costs other clients at most one slice's wait.
pub(crate) fn collect(shared: &crate::state::Shared) -> CoreNumbers {
    let mut semaphores = Vec::new();
    let mut other: Option<SemaphoreView> = None;
    let mut cursor = String::new();
    loop {
        let slice = shared
            .lock()
            .core
            .semaphore_stats_page(&cursor, STATS_SLICE);
        let Some(last) = slice.last() else {
            break;
        };
        cursor.clear();
        cursor.push_str(&last.name);
        let full = slice.len() == STATS_SLICE;
        for v in slice {
            if semaphores.len() < SERIES_CAP {
                semaphores.push(v);
            } else {
                match &mut other {
                    Some(sum) => add_into(sum, &v),
                    None => {
                        let mut sum = v;
                        sum.name = std::sync::Arc::from(OTHER);
                        other = Some(sum);
                    }
                }
            }
        }
        if !full {
            break;
        }
    }
    let st = shared.lock();
    CoreNumbers {
        semaphores,
        other,
        groups: st.core.groups(),
        sessions: st.core.session_count(),
        leases: st.core.lease_count(),
        durable: st.wal.is_some(),
    }
}

/// Adds the numbers of `v` to `sum`.
fn add_into(sum: &mut SemaphoreView, v: &SemaphoreView) {
    sum.capacity = sum.capacity.saturating_add(v.capacity);
    sum.in_use = sum.in_use.saturating_add(v.in_use);
    sum.queued += v.queued;
    sum.queued_weight += v.queued_weight;
    sum.closed |= v.closed;
    let (c, d) = (&mut sum.counters, &v.counters);
    c.acquired_total += d.acquired_total;
    c.released_total += d.released_total;
    c.expired_total += d.expired_total;
    c.timed_out_total += d.timed_out_total;
    c.lost_total += d.lost_total;
    let (w, x) = (&mut sum.wait, &v.wait);
    w.count += x.count;
    w.sum_us += x.sum_us;
    w.max_us = w.max_us.max(x.max_us);
    for (b, y) in w.buckets.iter_mut().zip(x.buckets.iter()) {
        *b += y;
    }
}

/// The `/metrics` page.
pub(crate) fn render(core: &CoreNumbers, m: &Metrics) -> String {
    let mut page = Page {
        out: String::with_capacity(4096 + core.semaphores.len() * 2048),
    };
    let p = &mut page;
    let all = || core.semaphores.iter().chain(core.other.iter());
    for (name, kind, help, value) in SEMAPHORE_FAMILIES {
        p.family(name, kind, help);
        for s in all() {
            p.sample(name, &[("semaphore", &s.name)], value(s));
        }
    }
    p.family(
        "turnstile_semaphore_wait_seconds",
        "histogram",
        "How long granted acquires waited in the queue.",
    );
    for s in all() {
        wait_histogram(p, s);
    }

    type Gauge = (&'static str, &'static str, fn(&GroupSummary) -> u64);
    let groups: [Gauge; 4] = [
        (
            "turnstile_group_jobs",
            "Run-once jobs known in the group.",
            |g| g.jobs.into(),
        ),
        (
            "turnstile_group_jobs_completed",
            "Jobs of the group that completed.",
            |g| g.completed.into(),
        ),
        (
            "turnstile_group_jobs_running",
            "Jobs of the group running now.",
            |g| g.running.into(),
        ),
        (
            "turnstile_group_failed_attempts",
            "Failed attempts of the group's jobs since their last reset.",
            |g| g.failures,
        ),
    ];
    for (name, help, value) in groups {
        p.family(name, "gauge", help);
        for (group, g) in &core.groups {
            p.sample(name, &[("group", group)], value(g));
        }
    }

    p.family("turnstile_sessions", "gauge", "Open client sessions.");
    p.sample("turnstile_sessions", &[], core.sessions);
    p.family(
        "turnstile_leases",
        "gauge",
        "Leases held or queued (jobs' included).",
    );
    p.sample("turnstile_leases", &[], core.leases);
    p.family(
        "turnstile_connections",
        "gauge",
        "Client connections open now.",
    );
    p.sample("turnstile_connections", &[], m.connections.load(Relaxed));
    p.family(
        "turnstile_connections_total",
        "counter",
        "Client connections accepted.",
    );
    p.sample(
        "turnstile_connections_total",
        &[],
        m.connections_total.load(Relaxed),
    );

    p.family(
        "turnstile_requests_total",
        "counter",
        "Requests answered, by kind and outcome (ok or the error code). A queued acquire \
         counts when it is answered.",
    );
    for (k, kind) in KIND_NAMES.iter().enumerate() {
        for (o, outcome) in OUTCOME_NAMES.iter().enumerate() {
            let n = m
                .requests
                .get(k * OUTCOMES + o)
                .map_or(0, |c| c.load(Relaxed));
            // Every kind's `ok` series exists from the start, so that rates over it work;
            // error series appear when they happen.
            if n > 0 || (o == 0 && k != Kind::Invalid as usize) {
                p.sample(
                    "turnstile_requests_total",
                    &[("kind", kind), ("outcome", outcome)],
                    n,
                );
            }
        }
    }

    if core.durable {
        p.family(
            "turnstile_fsync_duration_seconds",
            "histogram",
            "How long each sync of the write-ahead log took.",
        );
        let counts: Vec<u64> = m.fsync.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let sum = m.fsync.sum_ns.load(Relaxed) as f64 / 1e9;
        p.histogram(
            "turnstile_fsync_duration_seconds",
            &[],
            m.fsync.bounds.iter().copied(),
            &counts,
            sum,
        );
        p.family(
            "turnstile_log_written_bytes_total",
            "counter",
            "Bytes appended to the write-ahead log.",
        );
        p.sample(
            "turnstile_log_written_bytes_total",
            &[],
            m.log_bytes.load(Relaxed),
        );
        p.family("turnstile_snapshots_total", "counter", "Snapshots written.");
        p.sample("turnstile_snapshots_total", &[], m.snapshots.load(Relaxed));
    }

    p.family(
        "turnstile_http_connections",
        "gauge",
        "Connections open on the HTTP port.",
    );
    p.sample(
        "turnstile_http_connections",
        &[],
        m.http_connections.load(Relaxed),
    );
    p.family(
        "turnstile_http_requests_total",
        "counter",
        "Requests to the HTTP port, by route and status code.",
    );
    let http = m.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for ((route, code), n) in http {
        let code = code.to_string();
        p.sample(
            "turnstile_http_requests_total",
            &[("route", route), ("code", &code)],
            n,
        );
    }

    p.family(
        "turnstile_start_time_seconds",
        "gauge",
        "When the server started, in seconds since the Unix epoch.",
    );
    let started = m
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    p.sample("turnstile_start_time_seconds", &[], started);
    p.family(
        "turnstile_build_info",
        "gauge",
        "Always 1; the labels say which build runs.",
    );
    p.sample(
        "turnstile_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    page.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label("a\"b\\c\nd", &mut out);
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histograms_are_cumulative_and_end_with_inf() {
        let h = Histogram::new(&FSYNC_BOUNDS);
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let mut page = Page { out: String::new() };
        page.histogram("h", &[], FSYNC_BOUNDS.iter().copied(), &counts, 1.5);
        let lines: Vec<&str> = page.out.lines().collect();
        assert_eq!(lines[0], "h_bucket{le=\"0.00005\"} 2");
        assert!(lines.contains(&"h_bucket{le=\"0.005\"} 3"));
        assert!(lines.contains(&"h_bucket{le=\"2.5\"} 3"));
        assert!(lines.contains(&"h_bucket{le=\"+Inf\"} 4"));
        assert!(lines.contains(&"h_sum 1.5"));
        assert_eq!(lines.last(), Some(&"h_count 4"));
    }

    #[test]
    fn every_outcome_has_a_name() {
        for code in 0..=300u16 {
            let i = outcome(Some(ErrorCode::from_code(code)));
            assert!(i < OUTCOMES);
        }
        assert_eq!(
            OUTCOME_NAMES[outcome(Some(ErrorCode::TimedOut))],
            "timed_out"
        );
        assert_eq!(
            OUTCOME_NAMES[outcome(Some(ErrorCode::SessionEnded))],
            "session_ended"
        );
        assert_eq!(OUTCOME_NAMES[outcome(None)], "ok");
    }
}
