//! Health thresholds: what a `/health` endpoint or an alert checks, in one call.

use crate::{Cache, PoolStatus, timings};
use std::fmt;
use std::time::Duration;

/// Thresholds for [`check`](Health::check). The defaults are the usual alerting rules: a pool
/// more than 80 % in use, a `#[timed]` query whose p95 is over 500 ms, a cache error rate over
/// 5 %.
///
/// ```
/// use cached_query::{Cache, Health, PoolStatus};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), cached_query::Error> {
/// let cache = Cache::builder().memory().build().await?;
/// let health = Health::default().p95(Duration::from_millis(200));
/// // `cached_query::pool_status(&pool)` gives a pool's status.
/// let breaches = health.check(&cache, &[]);
/// assert!(breaches.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// Connections in use over the pool's maximum.
    pool_utilisation: f64,
    /// A `#[timed]` query's 95th percentile latency.
    p95: Duration,
    /// Cache errors over cache calls (hits + misses).
    error_rate: f64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            pool_utilisation: 0.8,
            p95: Duration::from_millis(500),
            error_rate: 0.05,
        }
    }
}

/// A threshold of [`Health`] that is exceeded.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Breach {
    /// A pool's connections in use over its maximum is above the threshold.
    Pool {
        /// The name the pool was given to [`Health::check`].
        pool: String,
        /// Connections in use over the pool's maximum.
        utilisation: f64,
        /// The threshold it is over.
        threshold: f64,
    },
    /// A `#[timed]` query's p95 (from [`timings`](crate::timings)) is above the threshold.
    P95 {
        /// The query's `#[timed]` name.
        query: String,
        /// Its 95th percentile latency.
        p95: Duration,
        /// The threshold it is over.
        threshold: Duration,
    },
    /// The cache's errors over its hits + misses is above the threshold.
    ErrorRate {
        /// Errors over hits + misses.
        rate: f64,
        /// The threshold it is over.
        threshold: f64,
    },
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Breach::Pool {
                pool,
                utilisation,
                threshold,
            } => write!(
                f,
                "pool {pool}: {:.0} % of its connections in use (threshold {:.0} %)",
                utilisation * 100.0,
                threshold * 100.0
            ),
            Breach::P95 {
                query,
                p95,
                threshold,
            } => write!(f, "query {query}: p95 {p95:?} (threshold {threshold:?})"),
            Breach::ErrorRate { rate, threshold } => write!(
                f,
                "cache error rate {:.1} % (threshold {:.1} %)",
                rate * 100.0,
                threshold * 100.0
            ),
        }
    }
}

impl Health {
    /// Sets the pool utilisation threshold (a fraction: `0.8` is 80 %).
    #[must_use]
    pub fn pool_utilisation(mut self, threshold: f64) -> Self {
        self.pool_utilisation = threshold;
        self
    }

    /// Sets the p95 latency threshold of `#[timed]` queries.
    #[must_use]
    pub fn p95(mut self, threshold: Duration) -> Self {
        self.p95 = threshold;
        self
    }

    /// Sets the cache error rate threshold (a fraction: `0.05` is 5 %).
    #[must_use]
    pub fn error_rate(mut self, threshold: f64) -> Self {
        self.error_rate = threshold;
        self
    }

    /// What is strictly over its threshold now: each of `pools` (named, with
    /// [`pool_status`](crate::pool_status)), every `#[timed]` query of this process, and
    /// `cache`'s error rate since it was built. Empty when healthy. A pool with no maximum and
    /// a cache that served no call are never in breach.
    pub fn check(&self, cache: &Cache, pools: &[(&str, PoolStatus)]) -> Vec<Breach> {
        let mut breaches = Vec::new();
        for (name, status) in pools {
            if status.max == 0 {
                continue;
            }
            let utilisation = f64::from(status.in_use) / f64::from(status.max);
            if utilisation > self.pool_utilisation {
                breaches.push(Breach::Pool {
                    pool: (*name).to_owned(),
                    utilisation,
                    threshold: self.pool_utilisation,
                });
            }
        }
        for timing in timings() {
            if timing.p95 > self.p95 {
                breaches.push(Breach::P95 {
                    query: timing.name,
                    p95: timing.p95,
                    threshold: self.p95,
                });
            }
        }
        let stats = cache.stats();
        let calls = stats.hits + stats.misses;
        if calls > 0 {
            let rate = stats.errors as f64 / calls as f64;
            if rate > self.error_rate {
                breaches.push(Breach::ErrorRate {
                    rate,
                    threshold: self.error_rate,
                });
            }
        }
        breaches
    }
}
