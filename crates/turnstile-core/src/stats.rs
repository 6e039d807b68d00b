//! Wait-time statistics: a fixed-bucket histogram, cheap to update on every grant.

use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds. The last bucket is unbounded.
/// Powers of four from 100us to ~27 minutes: wide enough for queue waits of batch jobs, fine
/// enough near zero to tell an uncontended grant from a short wait.
pub const WAIT_BUCKET_BOUNDS_US: [u64; 12] = [
    100,
    400,
    1_600,
    6_400,
    25_600,
    102_400,
    409_600,
    1_638_400,
    6_553_600,
    26_214_400,
    104_857_600,
    419_430_400,
];

/// How long grants waited in the queue, per semaphore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitStats {
    /// Number of grants observed.
    pub count: u64,
    /// Sum of waits, in microseconds.
    pub sum_us: u64,
    /// Longest wait, in microseconds.
    pub max_us: u64,
    /// Grants per bucket: `buckets[i]` counts waits `<= WAIT_BUCKET_BOUNDS_US[i]` and above the
    /// previous bound; the last entry counts the rest. Not cumulative.
    pub buckets: [u64; WAIT_BUCKET_BOUNDS_US.len() + 1],
}

impl WaitStats {
    /// Records one wait.
    pub fn observe(&mut self, wait: Duration) {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
        let i = WAIT_BUCKET_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i] += 1;
    }

    /// The mean wait, zero when nothing was observed.
    pub fn mean(&self) -> Duration {
        Duration::from_micros(self.sum_us.checked_div(self.count).unwrap_or(0))
    }

    /// An upper bound for the `q` quantile (0..=1), from the bucket bounds; the maximum when it
    /// falls in the last bucket.
    pub fn quantile_upper_bound(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let bound = WAIT_BUCKET_BOUNDS_US.get(i).copied().unwrap_or(self.max_us);
                return Duration::from_micros(bound.min(self.max_us));
            }
        }
        Duration::from_micros(self.max_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut s = WaitStats::default();
        s.observe(Duration::ZERO);
        s.observe(Duration::from_micros(100));
        s.observe(Duration::from_micros(101));
        s.observe(Duration::from_secs(3600));
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[WAIT_BUCKET_BOUNDS_US.len()], 1);
        assert_eq!(s.count, 4);
        assert_eq!(s.max_us, 3_600_000_000);
        assert_eq!(s.quantile_upper_bound(0.5), Duration::from_micros(100));
        assert_eq!(s.quantile_upper_bound(0.75), Duration::from_micros(400));
        assert_eq!(s.quantile_upper_bound(1.0), Duration::from_secs(3600));
        assert_eq!(
            WaitStats::default().quantile_upper_bound(0.5),
            Duration::ZERO
        );
    }
}
