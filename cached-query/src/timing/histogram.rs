//! A fixed-size log-linear histogram (HDR style) of nanosecond durations: 64 sub-buckets per
//! power of two: a percentile is reported as the middle of its bucket, so within 0.8 % (1/128)
//! of the recorded value at that rank (exact below 64 ns), clamped to the observed range, in ~20 KiB
//! per series whatever the number of samples. Recording is one atomic add.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values up to 2^42 ns (about 73 minutes) get their own bucket; longer ones share the last.
const MAX_EXP: u32 = 42;
const BUCKETS: usize = (SUB + (MAX_EXP + 1 - SUB_BITS) as u64 * SUB) as usize;

#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    min: AtomicU64,
    max: AtomicU64,
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The middle of bucket `i` (exact below 64 ns).
fn midpoint(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i - SUB) / SUB;
    let sub = (i - SUB) % SUB;
    let low = (SUB + sub) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    /// One locked add in the steady state: min/max are only written when they change.
    pub(crate) fn record(&self, nanos: u64) {
        self.buckets[index(nanos)].fetch_add(1, Relaxed);
        if nanos < self.min.load(Relaxed) {
            self.min.fetch_min(nanos, Relaxed);
        }
        if nanos > self.max.load(Relaxed) {
            self.max.fetch_max(nanos, Relaxed);
        }
    }

    pub(crate) fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
        self.min.store(u64::MAX, Relaxed);
        self.max.store(0, Relaxed);
    }

    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub(crate) fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// The given quantiles (ascending, in 0..=1), each clamped to the observed min/max, so
    /// they are consistent with each other and with `max`.
    pub(crate) fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [u64; N] {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let mut out = [0u64; N];
        if total == 0 {
            return out;
        }
        let (min, max) = (self.min.load(Relaxed), self.max.load(Relaxed));
        let mut cumulative = 0u64;
        let mut bucket = 0usize;
        for (slot, q) in out.iter_mut().zip(qs) {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            while cumulative + counts[bucket] < rank {
                cumulative += counts[bucket];
                bucket += 1;
            }
            *slot = midpoint(bucket).clamp(min.min(max), max);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..2_000_000u64).step_by(7).chain([u64::MAX / 2, u64::MAX]) {
            let i = index(v);
            assert!(i >= last && i < BUCKETS, "{v}");
            last = i;
            if v < 1 << MAX_EXP {
                let m = midpoint(i) as f64;
                assert!((m - v as f64).abs() <= v as f64 * 0.008 + 0.5, "{v} -> {m}");
            }
        }
    }

    #[test]
    fn percentiles_within_0_8_percent_and_ordered() {
        let h = Histogram::new();
        // 1..=100_000 µs, uniformly: exact pXX is XX% of the max.
        for us in 1..=100_000u64 {
            h.record(us * 1000);
        }
        let [p50, p95, p99] = h.quantiles([0.50, 0.95, 0.99]);
        for (got, want) in [
            (p50, 50_000_000.0),
            (p95, 95_000_000.0),
            (p99, 99_000_000.0),
        ] {
            assert!(
                (got as f64 - want).abs() / want <= 1.0 / 128.0,
                "{got} vs {want}"
            );
        }
        assert!(p50 <= p95 && p95 <= p99 && p99 <= h.max());
        assert_eq!(h.max(), 100_000_000);
    }

    #[test]
    fn single_values_are_reported_exactly_after_clamping() {
        let h = Histogram::new();
        h.record(123_456_789);
        assert_eq!(h.quantiles([0.5, 0.99]), [123_456_789, 123_456_789]);
        h.reset();
        assert_eq!(h.quantiles([0.5]), [0]);
    }
}
