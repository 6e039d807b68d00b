//! Read-only views for status pages, metrics and the server: semaphores (all, one, or a page
//! from a cursor), a session's held leases, and the table sizes.

use super::*;

impl Coordinator {
    /// Up to `limit` semaphores whose names start with `prefix` and sort after `after`
    /// (exclusive; empty starts at the beginning), in name order, with their holders and
    /// waiters (at most `max_listed` of each: the counts are always whole). Also returns
    /// whether more such semaphores follow the page. Costs O(log n + page), so that callers
    /// can read everything in bounded slices under their lock.
    pub fn semaphore_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
        max_listed: usize,
        now: Time,
    ) -> (Vec<SemaphoreView>, bool) {
        let mut page = Vec::new();
        let mut more = false;
        for name in self.page_names(prefix, after) {
            if page.len() >= limit {
                more = true;
                break;
            }
            if let Some(s) = self.semaphores.get(name) {
                page.push(self.view_capped(s, now, max_listed));
            }
        }
        (page, more)
    }

    /// Like [`semaphore_stats`](Coordinator::semaphore_stats), for up to `limit` semaphores
    /// after `after` (exclusive): a slice of the metrics, O(log n + limit).
    pub fn semaphore_stats_page(&self, after: &str, limit: usize) -> Vec<SemaphoreView> {
        self.page_names("", after)
            .take(limit)
            .filter_map(|name| self.semaphores.get(name))
            .map(|s| summary(s, Vec::new(), Vec::new()))
            .collect()
    }

    /// The names of client semaphores starting with `prefix`, after `after`, in order.
    pub(super) fn page_names<'s>(
        &'s self,
        prefix: &'s str,
        after: &'s str,
    ) -> impl Iterator<Item = &'s Arc<str>> + 's {
        let start: Bound<&str> = if after.is_empty() || after < prefix {
            Bound::Included(prefix)
        } else {
            Bound::Excluded(after)
        };
        self.names
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(move |n| n.starts_with(prefix))
            .filter(|n| !jobs::is_lock_name(n))
    }

    /// Every semaphore, sorted by name.
    pub fn semaphores(&self, now: Time) -> Vec<SemaphoreView> {
        let mut all: Vec<SemaphoreView> = self
            .semaphores
            .values()
            .filter(|s| !jobs::is_lock_name(&s.name))
            .map(|s| self.view(s, now))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// One semaphore, if it exists.
    pub fn semaphore(&self, name: &str, now: Time) -> Option<SemaphoreView> {
        if jobs::is_lock_name(name) {
            return None;
        }
        self.semaphores.get(name).map(|s| self.view(s, now))
    }

    /// Every semaphore, sorted by name, without holders and waiters: O(semaphores) rather
    /// than O(leases), for metrics that only need the numbers.
    pub fn semaphore_stats(&self) -> Vec<SemaphoreView> {
        let mut all: Vec<SemaphoreView> = self
            .semaphores
            .values()
            .filter(|s| !jobs::is_lock_name(&s.name))
            .map(|s| summary(s, Vec::new(), Vec::new()))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub(super) fn view(&self, s: &Semaphore, now: Time) -> SemaphoreView {
        self.view_capped(s, now, usize::MAX)
    }

    pub(super) fn view_capped(&self, s: &Semaphore, now: Time, max_listed: usize) -> SemaphoreView {
        let holders = s
            .holders
            .iter()
            .take(max_listed)
            .filter_map(|(token, key)| {
                let lease = self.leases.get(key)?;
                let LeaseState::Held { since, .. } = lease.state else {
                    return None;
                };
                Some(HolderView {
                    lease: key.1,
                    session: key.0,
                    client: self.client_of(key.0),
                    weight: lease.weight,
                    token: *token,
                    age: now.saturating_since(since),
                })
            })
            .collect();
        let waiters = s
            .queue
            .values()
            .take(max_listed)
            .filter_map(|key| {
                let lease = self.leases.get(key)?;
                let LeaseState::Queued(ref w) = lease.state else {
                    return None;
                };
                let since = w.since;
                Some(WaiterView {
                    lease: key.1,
                    session: key.0,
                    client: self.client_of(key.0),
                    weight: lease.weight,
                    age: now.saturating_since(since),
                })
            })
            .collect();
        summary(s, holders, waiters)
    }

    pub(super) fn client_of(&self, session: SessionId) -> Arc<str> {
        self.sessions
            .get(&session)
            .map(|s| s.client.clone())
            .unwrap_or_else(|| Arc::from(""))
    }

    /// The leases `session` holds (granted, not queued; job leases too), in no particular
    /// order, or `None` if there is no such session. A client that resumes its session after a
    /// restart compares them with the leases it believes it holds: a grant whose record the
    /// restarted coordinator lost (a damaged log tail) is missing here, and its holder must be
    /// told.
    pub fn held_leases(&self, session: SessionId) -> Option<Vec<LeaseId>> {
        let s = self.sessions.get(&session)?;
        Some(
            s.leases
                .iter()
                .copied()
                .filter(|&lease| {
                    matches!(
                        self.leases.get(&(session, lease)),
                        Some(Lease {
                            state: LeaseState::Held { .. },
                            ..
                        })
                    )
                })
                .collect(),
        )
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of leases, held or queued.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Entries in the deadline heap: one per session plus one per queued acquire with a
    /// timeout (and a few stale ones, dropped when they come due).
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Whether a session is open.
    pub fn has_session(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }
}
