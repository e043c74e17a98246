//! The in-process backend (moka): the same stamps-and-envelopes scheme as Redis, so TTLs,
//! tags, `clear`, single-flight and stats behave identically, with a bounded entry count.

use super::{Read, StampKey};
use crate::keyspace::Seq;
use bytes::Bytes;
use moka::sync::Cache as Moka;
use std::sync::Mutex;
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
    /// The namespace's invalidation sequence (see [`Seq`]), kept here rather than in a map
    /// that could evict it; `sequence_key` names it in stamp lists.
    sequence: Mutex<Seq>,
    sequence_key: String,
}

impl MemoryStore {
    /// `capacity` bounds the number of entries; tag stamps get a separate, larger bound
    /// (an evicted stamp only causes misses).
    pub(crate) fn new(capacity: u64, sequence_key: String) -> Self {
        MemoryStore {
            entries: bounded_map(capacity),
            stamps: bounded_map(capacity.saturating_mul(4).max(1024)),
            sequence: Mutex::new(Seq::fresh()),
            sequence_key,
        }
    }

    fn sequence(&self) -> std::sync::MutexGuard<'_, Seq> {
        self.sequence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current token of `key`, created at the current sequence when missing (the
    /// sequence key reads as the sequence itself).
    fn stamp(&self, key: &StampKey) -> Bytes {
        if key.key == self.sequence_key {
            return Bytes::copy_from_slice(&self.sequence().bytes());
        }
        self.stamps
            .entry_by_ref(&key.key)
            .or_insert_with(|| Stored {
                bytes: self.sequence().token().into(),
                ttl: key.ttl,
            })
            .into_value()
            .bytes
    }

    pub(crate) fn read(&self, entry: &str, stamps: &[StampKey]) -> Read {
        let entry = self.entries.get(entry).map(|s| s.bytes);
        let stamps = stamps.iter().map(|s| self.stamp(s)).collect();
        Read {
            entry,
            stamps,
            near: None,
        }
    }

    /// The current tokens of `keys`, without creating missing ones.
    pub(crate) fn stamps(&self, keys: &[StampKey]) -> Vec<Option<Bytes>> {
        keys.iter()
            .map(|k| self.stamps.get(&k.key).map(|s| s.bytes))
            .collect()
    }

    /// The sequence now and the tokens of `keys` (created at it when missing).
    pub(crate) fn settle(&self, keys: &[StampKey]) -> (Bytes, Vec<Bytes>) {
        let tokens = keys.iter().map(|k| self.stamp(k)).collect();
        (Bytes::copy_from_slice(&self.sequence().bytes()), tokens)
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

    /// Advances the sequence, then gives every key a token written at the new point.
    pub(crate) fn bump(&self, keys: &[StampKey]) {
        let seq = {
            let mut sequence = self.sequence();
            *sequence = sequence.next();
            *sequence
        };
        for k in keys {
            self.stamps.insert(
                k.key.clone(),
                Stored {
                    bytes: seq.token().into(),
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
