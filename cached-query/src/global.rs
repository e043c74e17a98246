//! The process-wide default cache used by attributes without `cache = …`.

use crate::{Cache, Error};
use std::sync::RwLock;

static DEFAULT: RwLock<Option<Cache>> = RwLock::new(None);

pub(crate) fn get() -> Option<Cache> {
    DEFAULT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Sets (or replaces) the process-wide default cache used by `#[cached_query]` and
/// `#[invalidates]` when they have no `cache = …` argument.
pub fn install(cache: Cache) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = Some(cache);
}

/// Invalidates `tag` in the installed default cache; `Err` when none is installed or the
/// invalidation is pending (see [`Cache::invalidate_many`]).
pub async fn invalidate(tag: &str) -> Result<(), Error> {
    get().ok_or(Error::NoDefaultCache)?.invalidate(tag).await
}
