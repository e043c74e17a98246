//! Support for macro-generated code: re-exports only. Not public API: names and signatures
//! may change in any release.

pub use crate::Cache;
pub use crate::cache::batch::{
    BatchKeys, BatchMap, SameKey, as_elements, as_map_keys, cached_batch,
};
pub use crate::cache::call::{Site, cached, cached_by_result, in_transaction, key};
pub use crate::cache::digest::{KeyBuilder, skipped_handle};
pub use crate::cache::global::{as_cache, default_cache};
pub use crate::cache::invalidate::{When, invalidating, on_connection};
/// For the benchmark of the per-call span's cost.
pub use crate::cache::span::CallSpan;
pub use crate::retry::Retry;
pub use crate::tag::{
    Each, EachOfOne, EachOfOption, EachOfVec, TagArg, TagDisplay, TagOption, TagValue,
};
pub use crate::timing::{SlowLevel, Timer, timed_body, timed_body_sync};
pub use std::time::Instant;

// A stacked `#[cached_query]`, `#[timed]`, `#[retry]` or `#[invalidates]` hands itself over to the attribute written below it
// as `#[<crate>::__private::cached_query(__marker, …)]` or `…::timed(…)`: a path no other crate's
// attribute has, so that attribute, if it is ours, recognises it without guessing by name.
pub use cached_query_macros::{cached_query, invalidates, retry, timed};
