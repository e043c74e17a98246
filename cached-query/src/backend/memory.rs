//! The in-process backend (moka): the same stamps-and-envelopes scheme as Redis, so TTLs,
//! tags, `clear`, single-flight and stats behave identically, with a bounded entry count.

use super::{Read, StampKey};
use crate::keyspace::new_token;
use bytes::Bytes;
use moka::sync::Cache as Moka;
use std::time::{Duration, Instant};

/// A value with its own expiry.
#[derive(Debug, Clone)]
struct Stored {
    bytes: Bytes,
    ttl: Option<Duration>,
}

/// Expires each [`Stored`] value after its own TTL (re-armed on overwrite).
struct PerEntryTtl;

impl moka::Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, value: &Stored, _: Instant) -> Option<Duration> {
        value.ttl
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        value.ttl
    }
}

/// A bounded moka map of [`Stored`] values expiring after their own TTL.
fn bounded_map(capacity: u64) -> moka::sync::Cache<String, Stored> {
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .expire_after(PerEntryTtl)
        .build()
}

#[derive(Debug)]
pub(crate) struct MemoryStore {
    entries: Moka<String, Stored>,
    stamps: Moka<String, Stored>,
}

impl MemoryStore {
    /// `capacity` bounds the number of entries; tag stamps get a separate, larger bound
    /// (an evicted stamp only causes misses).
    pub(crate) fn new(capacity: u64) -> Self {
        MemoryStore {
            entries: bounded_map(capacity),
            stamps: bounded_map(capacity.saturating_mul(4).max(1024)),
        }
    }

    pub(crate) fn read(&self, entry: &str, stamps: &[StampKey]) -> Read {
        let entry = self.entries.get(entry).map(|s| s.bytes);
        let stamps = stamps
            .iter()
            .map(|s| {
                self.stamps
                    .entry_by_ref(&s.key)
                    .or_insert_with(|| Stored {
                        bytes: new_token().into(),
                        ttl: s.ttl,
                    })
                    .into_value()
                    .bytes
            })
            .collect();
        Read {
            entry,
            stamps,
            near: None,
        }
    }

    pub(crate) fn write(&self, entry: &str, bytes: Vec<u8>, ttl: Duration) {
        self.entries.insert(
            entry.to_owned(),
            Stored {
                bytes: bytes.into(),
                ttl: Some(ttl),
            },
        );
    }

    pub(crate) fn bump(&self, keys: &[StampKey]) {
        for k in keys {
            self.stamps.insert(
                k.key.clone(),
                Stored {
                    bytes: new_token().into(),
                    ttl: k.ttl,
                },
            );
        }
    }

    /// Number of entries currently held (after pending evictions ran).
    pub(crate) fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}
