//! Support for macro-generated code: re-exports only. Not public API: names and signatures
//! may change in any release.

pub use crate::Cache;
pub use crate::cache::call::{Site, cached, key};
pub use crate::cache::digest::KeyBuilder;
pub use crate::cache::global::{as_cache, default_cache};
pub use crate::cache::invalidate::invalidating;
pub use crate::timing::{SlowLevel, Timer, timed_body, timed_body_sync};
pub use std::time::Instant;
