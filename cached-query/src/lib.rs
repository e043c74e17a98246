//! A Redis-backed result cache for sqlx query functions, with versioned-tag invalidation,
//! single-flight and fail-open behaviour, put in front of a query with one attribute.
//!
//! ```
//! use cached_query::{Cache, cached_query, invalidates};
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! static QUERIES: AtomicU32 = AtomicU32::new(0);
//!
//! // Stands in for an sqlx query: counts how often it really runs.
//! #[cached_query(ttl = 60, invalidate = "user:<id>")]
//! async fn user_name(id: i64) -> Result<Option<String>, std::io::Error> {
//!     QUERIES.fetch_add(1, Ordering::SeqCst);
//!     Ok(Some(format!("user {id}")))
//! }
//!
//! #[invalidates("user:<id>")]
//! async fn rename(id: i64) -> Result<(), std::io::Error> {
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! cached_query::install(Cache::builder().memory().build().await?);
//!
//! assert_eq!(user_name(7).await?, Some("user 7".to_owned())); // miss: runs the query
//! assert_eq!(user_name(7).await?, Some("user 7".to_owned())); // hit
//! assert_eq!(QUERIES.load(Ordering::SeqCst), 1);
//!
//! rename(7).await?; // invalidates tag "user:7"
//! user_name(7).await?; // miss again
//! assert_eq!(QUERIES.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```
//!
//! The README covers the attribute reference, how invalidation works and what it
//! guarantees, and the failure modes.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod cache;
mod error;
mod health;
mod keyspace;
#[cfg(feature = "postgres")]
mod outbox;
pub(crate) mod retry;
mod setup;
mod tag;
mod timing;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use cache::Cache;
pub use cache::builder::CacheBuilder;
pub use cache::global::{install, installed, invalidate};
pub use cache::stats::{CacheStats, QueryStats};
pub use error::{BoxError, Error};
pub use health::{Breach, Health};
pub use retry::is_transient;
pub use setup::db::{DbConfig, PoolStatus, pool_status};
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use setup::monitor::{POOL_SAMPLE_PERIOD, PoolMonitor, monitor_pool};
pub use setup::redis_config::RedisConfig;
#[cfg(feature = "sessions")]
#[cfg_attr(docsrs, doc(cfg(feature = "sessions")))]
pub use setup::sessions::RedisSessionStore;
pub use setup::url::redact_url;
pub use timing::calls::{Calls, count_calls};
pub use timing::{Timing, reset_timings, set_slow_query_threshold, timings};

#[doc = include_str!("docs/cached_query.md")]
#[doc(inline)]
pub use cached_query_macros::cached_query;

#[doc = include_str!("docs/invalidates.md")]
#[doc(inline)]
pub use cached_query_macros::invalidates;

#[doc = include_str!("docs/timed.md")]
#[doc(inline)]
pub use cached_query_macros::timed;

#[doc = include_str!("docs/retry.md")]
#[doc(inline)]
pub use cached_query_macros::retry;
