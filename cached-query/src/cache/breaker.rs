//! Circuit breaker and rate-limited warnings: a dead or stalled Redis costs a few timeouts,
//! then nothing, until a single probe call finds it healthy again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    start: Instant,
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// Microseconds since `start` until which Redis is skipped.
    open_until: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            start: Instant::now(),
            threshold: threshold.max(1),
            cooldown,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn cooldown_micros(&self) -> u64 {
        u64::try_from(self.cooldown.as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether to call Redis now. While open, returns `false`; once the cooldown is over,
    /// exactly one caller gets `true` (the probe) and the others keep skipping until it reports.
    pub(crate) fn allow(&self) -> bool {
        self.allow_at(self.now())
    }

    /// [`allow`](Self::allow) at `now` microseconds since `start`.
    fn allow_at(&self, now: u64) -> bool {
        if self.failures.load(Relaxed) < self.threshold {
            return true;
        }
        let until = self.open_until.load(Acquire);
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now.saturating_add(self.cooldown_micros()),
                    AcqRel,
                    Relaxed,
                )
                .is_ok()
    }

    pub(crate) fn success(&self) {
        // Read first: every call reports success, and a store would bounce the cache line
        // between cores.
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    pub(crate) fn failure(&self) {
        self.failure_at(self.now());
    }

    fn failure_at(&self, now: u64) {
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if failures >= self.threshold {
            self.open_until
                .store(now.saturating_add(self.cooldown_micros()), Release);
        }
    }

    /// Whether Redis is being skipped (open or waiting for a probe's outcome); unlike
    /// [`allow`](Self::allow) it never claims the probe.
    pub(crate) fn is_open(&self) -> bool {
        self.failures.load(Relaxed) >= self.threshold
    }
}

/// Logs at most one warning per interval, counting the ones it swallowed.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    start: Instant,
    interval_micros: u64,
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        WarnLimiter {
            start: Instant::now(),
            interval_micros: u64::try_from(interval.as_micros()).unwrap_or(u64::MAX),
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number of warnings suppressed since the last one)` when this one may be logged.
    pub(crate) fn permit(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let next = self.next.load(Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_micros),
                    Relaxed,
                    Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_lets_exactly_one_probe_through() {
        let b = Breaker::new(3, Duration::from_secs(1));
        let t0 = 5_000_000; // µs since start
        assert!(b.allow_at(t0));
        b.failure_at(t0);
        b.failure_at(t0);
        assert!(b.allow_at(t0));
        b.failure_at(t0);
        assert!(b.is_open());
        assert!(!b.allow_at(t0 + 999_999), "still cooling down");
        // Cooldown over: one caller probes, every other one keeps skipping.
        let after = t0 + 1_000_000;
        let probes = (0..10).filter(|i| b.allow_at(after + i)).count();
        assert_eq!(probes, 1);
        // The probe failed: open again for a whole cooldown.
        b.failure_at(after);
        assert!(!b.allow_at(after + 999_999));
        assert!(b.allow_at(after + 1_000_000));
        b.success();
        assert!(!b.is_open());
        assert!(b.allow_at(after) && b.allow_at(after));
    }

    #[test]
    fn open_breaker_skips_during_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.failure();
        assert!(!b.allow());
        assert!(!b.allow());
    }

    #[test]
    fn limiter_counts_suppressed() {
        let w = WarnLimiter::new(Duration::from_secs(3600));
        assert_eq!(w.permit(), Some(0));
        assert_eq!(w.permit(), None);
        assert_eq!(w.permit(), None);
    }
}
