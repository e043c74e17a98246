//! The one `tracing` span of a `#[cached_query]` call: `cached_query` at `INFO` (target
//! `cached_query`), with fields `query`, `cache.backend` and `cache.hit`. None is made when no
//! subscriber is installed or none enables `INFO` (so no `log` fallback either). The call, its query
//! included, runs inside it; `cache.hit` is recorded once, when the call ends (or is dropped),
//! from the strongest outcome its steps reported: `"error"` over `"bypassed"` (inside a
//! transaction, no cache, a disabled cache) over `false` (the query ran: a miss, a refresh, a
//! failure served by `stale_if_error`) over `true`.

use futures_util::future::Either;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
use tracing::{Instrument, Level, Span};

/// The `cache.backend` of a call on `cache`: its store's kind, `"none"` without one.
pub(crate) fn backend_of(cache: Option<&super::Cache>) -> &'static str {
    cache
        .and_then(|c| c.inner.store.as_ref())
        .map_or("none", crate::backend::Store::kind)
}

/// What a call's steps reported, strongest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Outcome {
    None = 0,
    Hit = 1,
    Miss = 2,
    Bypassed = 3,
    Error = 4,
}

/// The span of one call and the outcome to record on it.
#[derive(Debug)]
pub struct CallSpan {
    span: Span,
    outcome: AtomicU8,
}

impl CallSpan {
    /// A new span for a call of `query` on `backend` (`"redis"`, `"memory"`, `"none"`).
    #[inline]
    pub fn new(query: &'static str, backend: &'static str) -> Self {
        // No subscriber at all, or none that wants `INFO`: no span, at the cost of one load.
        // (`info_span!` alone would still build a disabled span for the `log` fallback.)
        let span = if Level::INFO <= STATIC_MAX_LEVEL && Level::INFO <= LevelFilter::current() {
            tracing::info_span!(
                target: "cached_query",
                "cached_query",
                query,
                cache.backend = backend,
                cache.hit = tracing::field::Empty,
            )
        } else {
            Span::none()
        };
        CallSpan {
            span,
            outcome: AtomicU8::new(Outcome::None as u8),
        }
    }

    /// Runs `fut` inside the span (as is when there is none: no enter and exit per poll).
    #[inline]
    pub fn run<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        // Disabled: no subscriber wants it (a filter on the target), though it has metadata.
        if self.span.is_disabled() {
            Either::Right(fut)
        } else {
            Either::Left(fut.instrument(self.span.clone()))
        }
    }

    /// Reports one step's outcome; the strongest one is recorded. A call's steps run one
    /// after another (in its own future), so a load and a store suffice: no read-modify-write
    /// on every hit.
    #[inline]
    pub(crate) fn report(&self, outcome: Outcome) {
        if outcome as u8 > self.outcome.load(Relaxed) {
            self.outcome.store(outcome as u8, Relaxed);
        }
    }

    /// Reports a hit (for the benchmark, which has no other way to reach `report`).
    pub fn hit(&self) {
        self.report(Outcome::Hit);
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if self.span.is_disabled() {
            return;
        }
        const FIELD: &str = "cache.hit";
        match self.outcome.load(Relaxed) {
            1 => self.span.record(FIELD, true),
            2 => self.span.record(FIELD, false),
            3 => self.span.record(FIELD, "bypassed"),
            4 => self.span.record(FIELD, "error"),
            _ => &self.span,
        };
    }
}
