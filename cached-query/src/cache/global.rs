//! The process-wide default cache used by attributes without `cache = …`, and how an
//! attribute finds its cache.

use crate::{Cache, Error};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

static DEFAULT: RwLock<Option<Cache>> = RwLock::new(None);

/// The process-wide default cache, if one is installed.
pub fn default_cache() -> Option<Cache> {
    DEFAULT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Accepts `Cache`, `&Cache`, `Arc<Cache>`… for `cache = <expr>`.
pub fn as_cache<C: AsRef<Cache> + ?Sized>(cache: &C) -> &Cache {
    cache.as_ref()
}

/// Logs once per process that an attribute found no cache.
pub(crate) fn warn_no_cache(site_name: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            query = site_name,
            "cached-query: no cache given and none installed (cached_query::install); queries run uncached"
        );
    }
}

/// Sets (or replaces) the process-wide default cache used by `#[cached_query]` and
/// `#[invalidates]` when they have no `cache = …` argument.
pub fn install(cache: Cache) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = Some(cache);
}

/// The cache [`install`] installed, if any: a clone that shares its state (entries, stats,
/// connections) with every other clone. A later `install` replaces what this returns, not the
/// clone already taken.
pub fn installed() -> Option<Cache> {
    default_cache()
}

/// Invalidates `tag` in the installed default cache; `Err` when none is installed or the
/// invalidation is pending (see [`Cache::invalidate_many`]).
pub async fn invalidate(tag: &str) -> Result<(), Error> {
    default_cache()
        .ok_or(Error::NoDefaultCache)?
        .invalidate(tag)
        .await
}
