//! Support for macro-generated code. Not public API: names and signatures may change in
//! any release.

pub use crate::Cache;
pub use crate::key::KeyBuilder;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The static description of one `#[cached_query]` function.
#[derive(Debug)]
pub struct Site {
    /// Stats name and part of the key.
    pub name: &'static str,
    /// `version = …`, part of the key.
    pub version: u32,
    /// `ttl = …` in seconds; 0 means the cache's default.
    pub ttl_secs: u64,
    /// Whether `Ok(None)` is stored.
    pub cache_none: bool,
}

impl Site {
    pub(crate) fn ttl(&self) -> Option<Duration> {
        (self.ttl_secs > 0).then(|| Duration::from_secs(self.ttl_secs))
    }
}

/// A new key for a call of `site`.
pub fn key(site: &'static Site) -> KeyBuilder {
    KeyBuilder::new(site.name, site.version)
}

/// The process-wide default cache, if one is installed.
pub fn default_cache() -> Option<Cache> {
    crate::global::get()
}

/// Accepts `Cache`, `&Cache`, `Arc<Cache>`… for `cache = <expr>`.
pub fn as_cache<C: AsRef<Cache> + ?Sized>(cache: &C) -> &Cache {
    cache.as_ref()
}

fn warn_no_cache(site_name: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            query = site_name,
            "cached-query: no cache given and none installed (cached_query::install); queries run uncached"
        );
    }
}

/// Runs one `#[cached_query]` call.
pub async fn cached<T, E, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: KeyBuilder,
    tags: Vec<String>,
    fut: F,
) -> Result<T, E>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    F: Future<Output = Result<T, E>>,
{
    match cache {
        Some(cache) => cache.get_or_run(site, key, tags, fut).await,
        None => {
            warn_no_cache(site.name);
            crate::calls::execute(fut).await
        }
    }
}

/// Runs one `#[invalidates]` call: the body, then (on `Ok`) the invalidation.
pub async fn invalidating<T, E, F>(cache: Option<&Cache>, tags: Vec<String>, fut: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let result = crate::calls::execute(fut).await;
    if result.is_ok() {
        match cache {
            Some(cache) => {
                if let Err(e) = cache.invalidate_many(&tags).await {
                    tracing::warn!(error = %e, "cached-query: #[invalidates] could not reach Redis");
                }
            }
            None => warn_no_cache("#[invalidates]"),
        }
    }
    result
}

pub use crate::timing::{SlowLevel, Timer};
pub use std::time::Instant;

/// Runs the body of an async `#[timed]` function (counted by `count_calls`).
pub async fn timed_body<F: Future>(fut: F) -> F::Output {
    crate::calls::execute(fut).await
}

/// Runs the body of a sync `#[timed]` function (counted by `count_calls`).
pub fn timed_body_sync<T>(f: impl FnOnce() -> T) -> T {
    crate::calls::execute_sync(f)
}

// --- Re-exports for the attribute macros -----------------------------------------------------
// A stacked `#[cached_query]` or `#[timed]` hands itself over to the attribute written below it
// as `#[<crate>::__private::cached_query(__marker, …)]` or `…::timed(…)`: a path no other crate's
// attribute has, so that attribute, if it is ours, recognises it without guessing by name.
pub use cached_query_macros::{cached_query, timed};
