//! `count_calls`: how many queries a piece of code runs (N+1 detection in tests).
//!
//! Every instrumented call (`#[timed]`, `#[cached_query]`) runs its body in a task-local
//! *frame*; when it finishes it tells the enclosing frame that an instrumented call happened
//! inside it. A call counts as an executed query only when nothing instrumented ran inside
//! it, so `#[timed]` and `#[cached_query]` can be stacked in either order without counting
//! twice, and cache hits are counted separately.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What [`count_calls`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Calls {
    /// Queries that ran: innermost `#[timed]` or `#[cached_query]` executions.
    pub queries: u64,
    /// `#[cached_query]` calls answered without running their query.
    pub cache_hits: u64,
}

#[derive(Debug, Default)]
struct Counts {
    queries: AtomicU64,
    cache_hits: AtomicU64,
}

tokio::task_local! {
    static COUNTS: Arc<Counts>;
    static FRAME: Cell<bool>;
}

/// Runs `fut` and counts the instrumented calls it makes (in its own task, not in tasks it
/// spawns).
///
/// ```
/// # use cached_query::timed;
/// #[timed]
/// async fn one_query(id: i64) -> i64 { id }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (sum, calls) = cached_query::count_calls(async {
///     one_query(1).await + one_query(2).await
/// })
/// .await;
/// assert_eq!((sum, calls.queries), (3, 2));
/// # }
/// ```
pub async fn count_calls<F: Future>(fut: F) -> (F::Output, Calls) {
    let counts = Arc::new(Counts::default());
    let out = COUNTS
        .scope(counts.clone(), FRAME.scope(Cell::new(false), fut))
        .await;
    let calls = Calls {
        queries: counts.queries.load(Relaxed),
        cache_hits: counts.cache_hits.load(Relaxed),
    };
    (out, calls)
}

fn active() -> bool {
    COUNTS.try_with(|_| ()).is_ok()
}

fn mark_parent() {
    let _ = FRAME.try_with(|f| f.set(true));
}

fn finish_frame(inner_reported: bool) {
    if !inner_reported {
        let _ = COUNTS.try_with(|c| c.queries.fetch_add(1, Relaxed));
    }
    mark_parent();
}

/// Runs one instrumented execution (a query body).
pub(crate) async fn execute<F: Future>(fut: F) -> F::Output {
    if !active() {
        return fut.await;
    }
    let (out, inner) = FRAME
        .scope(Cell::new(false), async {
            let out = fut.await;
            (out, FRAME.with(Cell::get))
        })
        .await;
    finish_frame(inner);
    out
}

/// The synchronous form of [`execute`].
pub(crate) fn execute_sync<T>(f: impl FnOnce() -> T) -> T {
    if !active() {
        return f();
    }
    let (out, inner) = FRAME.sync_scope(Cell::new(false), || {
        let out = f();
        (out, FRAME.with(Cell::get))
    });
    finish_frame(inner);
    out
}

/// A `#[cached_query]` call answered from the cache (or a shared flight).
pub(crate) fn cache_hit() {
    cache_hits(1);
}

/// `n` keys of a batch answered from the cache (or shared flights).
pub(crate) fn cache_hits(n: u64) {
    if active() && n > 0 {
        let _ = COUNTS.try_with(|c| c.cache_hits.fetch_add(n, Relaxed));
        mark_parent();
    }
}
