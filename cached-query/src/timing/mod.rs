//! Instrumentation: `#[timed]` support (per-query latency statistics and the slow-query
//! log) and `count_calls`.
//!
//! Each annotated function owns a `static` [`Timer`](crate::__private::Timer) that resolves its
//! named series once; after that a call costs two clock reads and a few relaxed atomics, with
//! no lock. Series of the same name (several functions sharing `name = …`) are merged.

pub(crate) mod calls;
mod histogram;

use histogram::Histogram;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Latency statistics of one query name since start-up (or [`reset_timings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Timing {
    /// `name = …`, by default `module_path::fn_name`.
    pub name: String,
    /// Completed calls.
    pub count: u64,
    /// Calls slower than their threshold.
    pub slow_count: u64,
    /// Median latency (within 0.8 %, clamped to the observed range).
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// The slowest call, exactly.
    pub max: Duration,
}

#[derive(Debug)]
pub(crate) struct Series {
    name: &'static str,
    histogram: Histogram,
    slow: AtomicU64,
}

static REGISTRY: Mutex<Vec<Arc<Series>>> = Mutex::new(Vec::new());

fn series(name: &'static str) -> Arc<Series> {
    let mut all = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = all.iter().find(|s| s.name == name) {
        return s.clone();
    }
    let s = Arc::new(Series {
        name,
        histogram: Histogram::new(),
        slow: AtomicU64::new(0),
    });
    all.push(s.clone());
    s
}

/// Statistics of every `#[timed]` query that has completed at least one call, by name.
pub fn timings() -> Vec<Timing> {
    let all = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out: Vec<Timing> = all
        .iter()
        .filter_map(|s| {
            let [p50, p95, p99] = s.histogram.quantiles([0.50, 0.95, 0.99]);
            let count = s.histogram.count();
            (count > 0).then(|| Timing {
                name: s.name.to_owned(),
                count,
                slow_count: s.slow.load(Relaxed),
                p50: Duration::from_nanos(p50),
                p95: Duration::from_nanos(p95),
                p99: Duration::from_nanos(p99),
                max: Duration::from_nanos(s.histogram.max()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Forgets all statistics (e.g. between test cases or after a deploy warm-up).
pub fn reset_timings() {
    for s in REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        s.histogram.reset();
        s.slow.store(0, Relaxed);
    }
}

const UNSET: u64 = u64::MAX;
static THRESHOLD_NANOS: AtomicU64 = AtomicU64::new(UNSET);

/// Sets the slow-query threshold of every `#[timed]` function without its own `threshold_ms`.
pub fn set_slow_query_threshold(threshold: Duration) {
    let nanos = u64::try_from(threshold.as_nanos()).unwrap_or(UNSET - 1);
    THRESHOLD_NANOS.store(nanos.min(UNSET - 1), Relaxed);
}

/// The default threshold: `SLOW_QUERY_THRESHOLD_MS` (read on first use), else 100 ms.
fn default_threshold_nanos() -> u64 {
    let current = THRESHOLD_NANOS.load(Relaxed);
    if current != UNSET {
        return current;
    }
    let from_env = std::env::var("SLOW_QUERY_THRESHOLD_MS").ok().and_then(|v| {
        match crate::setup::env::parse_u64("SLOW_QUERY_THRESHOLD_MS", &v, 0) {
            Ok(ms) => Some(ms),
            Err(e) => {
                tracing::warn!(error = %e, "cached-query: ignoring SLOW_QUERY_THRESHOLD_MS, using 100 ms");
                None
            }
        }
    });
    let nanos = from_env
        .unwrap_or(100)
        .saturating_mul(1_000_000)
        .min(UNSET - 1);
    // Only the first reader initialises; a concurrent set_slow_query_threshold wins.
    let _ = THRESHOLD_NANOS.compare_exchange(UNSET, nanos, Relaxed, Relaxed);
    THRESHOLD_NANOS.load(Relaxed)
}

/// Level of the slow-query event (`level = "…"`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum SlowLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The per-function state behind `#[timed]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Timer {
    name: &'static str,
    threshold_ms: Option<u64>,
    level: SlowLevel,
    series: OnceLock<Arc<Series>>,
}

impl Timer {
    pub const fn new(name: &'static str, threshold_ms: Option<u64>, level: SlowLevel) -> Self {
        Timer {
            name,
            threshold_ms,
            level,
            series: OnceLock::new(),
        }
    }

    /// Records one call that began at `start`; `is_err` is `Some` for `Result` returns.
    pub fn finish(&self, start: Instant, is_err: Option<bool>) {
        let elapsed = start.elapsed();
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let series = self.series.get_or_init(|| series(self.name));
        series.histogram.record(nanos);
        let threshold = match self.threshold_ms {
            Some(ms) => ms.saturating_mul(1_000_000),
            None => default_threshold_nanos(),
        };
        #[cfg(feature = "metrics")]
        metrics::histogram!("cached_query_duration_seconds", "query" => self.name)
            .record(elapsed.as_secs_f64());
        if nanos > threshold {
            series.slow.fetch_add(1, Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!("cached_query_slow_total", "query" => self.name).increment(1);
            self.log_slow(elapsed, threshold, is_err);
        }
    }

    #[cold]
    fn log_slow(&self, elapsed: Duration, threshold_nanos: u64, is_err: Option<bool>) {
        let query = self.name;
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        let threshold_ms = threshold_nanos / 1_000_000;
        macro_rules! emit {
            ($level:expr) => {
                match is_err {
                    Some(error) => tracing::event!(
                        $level,
                        query,
                        elapsed_ms,
                        threshold_ms,
                        error,
                        "slow query"
                    ),
                    None => tracing::event!($level, query, elapsed_ms, threshold_ms, "slow query"),
                }
            };
        }
        match self.level {
            SlowLevel::Error => emit!(tracing::Level::ERROR),
            SlowLevel::Warn => emit!(tracing::Level::WARN),
            SlowLevel::Info => emit!(tracing::Level::INFO),
            SlowLevel::Debug => emit!(tracing::Level::DEBUG),
            SlowLevel::Trace => emit!(tracing::Level::TRACE),
        }
    }
}

/// Runs the body of an async `#[timed]` function (counted by `count_calls`).
pub async fn timed_body<F: Future>(fut: F) -> F::Output {
    calls::execute(fut).await
}

/// Runs the body of a sync `#[timed]` function (counted by `count_calls`).
pub fn timed_body_sync<T>(f: impl FnOnce() -> T) -> T {
    calls::execute_sync(f)
}
