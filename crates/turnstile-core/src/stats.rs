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
    /// Shortest wait, in microseconds (0 while nothing was observed).
    pub min_us: u64,
    /// Grants per bucket: `buckets[i]` counts waits `<= WAIT_BUCKET_BOUNDS_US[i]` and above the
    /// previous bound; the last entry counts the rest. Not cumulative.
    pub buckets: [u64; WAIT_BUCKET_BOUNDS_US.len() + 1],
}

impl WaitStats {
    /// Records one wait.
    pub fn observe(&mut self, wait: Duration) {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.min_us = if self.count == 0 {
            us
        } else {
            self.min_us.min(us)
        };
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

    /// An estimate of the `q` quantile (0..=1): the bucket that holds it, narrowed to the
    /// shortest and longest wait seen, and a linear interpolation by rank within it. Never
    /// outside that bucket, never below the shortest or above the longest wait; exact when
    /// the waits in the bucket are all equal to one of the narrowed ends (one grant, or a
    /// stream of equal waits).
    pub fn quantile_estimate(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut below = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && below + n >= rank {
                let lower = if i == 0 {
                    0
                } else {
                    WAIT_BUCKET_BOUNDS_US[i - 1]
                };
                let upper = WAIT_BUCKET_BOUNDS_US.get(i).copied().unwrap_or(self.max_us);
                let lo = lower.max(self.min_us).min(self.max_us) as f64;
                let hi = upper.min(self.max_us).max(self.min_us) as f64;
                // The k-th of the bucket's n waits, spread evenly over [lo, hi]: the first at
                // lo, the last at hi. A lone wait is the longest (or shortest) one if its
                // bucket holds that, else taken at the middle.
                let k = (rank - below) as f64;
                let at = if n == 1 {
                    if hi == self.max_us as f64 {
                        hi
                    } else if lo == self.min_us as f64 {
                        lo
                    } else {
                        (lo + hi) / 2.0
                    }
                } else {
                    lo + (hi - lo) * (k - 1.0) / (n as f64 - 1.0)
                };
                return Duration::from_micros(at.round() as u64);
            }
            below += n;
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

    /// The case: waits of about a second in the 409.6..1638.4 ms bucket. The upper
    /// bound says 1638.4 ms; the estimate stays within the waits seen.
    #[test]
    fn estimates_stay_within_the_waits_seen() {
        let mut s = WaitStats::default();
        s.observe(Duration::from_millis(1005));
        assert_eq!(
            s.quantile_upper_bound(0.5),
            Duration::from_micros(1_005_000)
        );
        assert_eq!(s.quantile_estimate(0.5), Duration::from_millis(1005));
        let mut s = WaitStats::default();
        for ms in [1000, 1002, 1005, 1008, 1010] {
            s.observe(Duration::from_millis(ms));
        }
        assert_eq!(
            s.quantile_upper_bound(0.5),
            Duration::from_micros(1_010_000)
        );
        let p50 = s.quantile_estimate(0.5);
        assert_eq!(p50, Duration::from_millis(1005), "{p50:?}");
        // Mixed: 99 quick grants and one long wait; the median is quick, p99 is in the
        // quick bucket too, the maximum is the long one.
        let mut s = WaitStats::default();
        s.observe(Duration::from_millis(1005));
        s.observe(Duration::from_millis(3));
        for _ in 0..98 {
            s.observe(Duration::from_micros(50));
        }
        assert_eq!(s.quantile_upper_bound(0.5), Duration::from_micros(100));
        let p50 = s.quantile_estimate(0.5);
        assert!(p50 >= Duration::from_micros(50) && p50 <= Duration::from_micros(100));
        assert_eq!(s.quantile_estimate(1.0), Duration::from_millis(1005));
        let p99 = s.quantile_estimate(0.99);
        assert!(p99 > Duration::from_micros(1600) && p99 < Duration::from_micros(6400));
        assert_eq!(WaitStats::default().quantile_estimate(0.5), Duration::ZERO);
    }
}
