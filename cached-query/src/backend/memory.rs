//! The in-process backend (moka): the same stamps-and-envelopes scheme as Redis, so TTLs,
//! tags, `clear`, single-flight and stats behave identically, with a bounded entry count.

use super::{Read, ReadMany, Settled, StampKey};
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
    /// sequence key reads as the sequence itself). Creation holds the sequence's lock, as
    /// [`bump`](Self::bump) does for its writes: moka's insert-if-absent is not atomic
    /// against a concurrent insert, and a token created at an older count must not replace
    /// a newer one.
    fn stamp(&self, key: &StampKey) -> Bytes {
        if key.key == self.sequence_key {
            return Bytes::copy_from_slice(&self.sequence().bytes());
        }
        if let Some(held) = self.stamps.get(&key.key) {
            return held.bytes;
        }
        let sequence = self.sequence();
        self.stamps
            .entry_by_ref(&key.key)
            .or_insert_with(|| Stored {
                bytes: sequence.token().into(),
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

    /// `entries` and the tokens of `stamps` (created when missing: never reported as
    /// created, as a token made here cannot equal one an entry holds).
    pub(crate) fn read_many(&self, entries: &[&str], stamps: &[StampKey]) -> ReadMany {
        ReadMany {
            entries: entries
                .iter()
                .map(|e| self.entries.get(*e).map(|s| s.bytes))
                .collect(),
            stamps: stamps.iter().map(|s| self.stamp(s)).collect(),
            created: vec![false; stamps.len()],
        }
    }

    /// The current tokens of `keys`, without creating missing ones.
    pub(crate) fn stamps(&self, keys: &[StampKey]) -> Vec<Option<Bytes>> {
        keys.iter()
            .map(|k| self.stamps.get(&k.key).map(|s| s.bytes))
            .collect()
    }

    /// The sequence now and the tokens of `keys` (created at it when missing).
    pub(crate) fn settle(&self, keys: &[StampKey]) -> Settled {
        let tokens = keys.iter().map(|k| self.stamp(k)).collect();
        Settled {
            seq: Bytes::copy_from_slice(&self.sequence().bytes()),
            tokens,
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

    pub(crate) fn delete(&self, entry: &str) {
        self.entries.invalidate(entry);
    }

    /// Advances the sequence, then gives every key a token written at the new point, under
    /// the sequence's lock: two bumps write in the order of their counts.
    pub(crate) fn bump(&self, keys: &[StampKey]) {
        let mut sequence = self.sequence();
        *sequence = sequence.next();
        for k in keys {
            self.stamps.insert(
                k.key.clone(),
                Stored {
                    bytes: sequence.token().into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// Runs `a` and `b` on two threads released together, `rounds` times over fresh keys,
    /// and checks that each key ends with a token at the latest sequence: no write of an
    /// older count lands after a newer one.
    fn race(rounds: usize, a: fn(&MemoryStore, &StampKey), b: fn(&MemoryStore, &StampKey)) {
        let store = Arc::new(MemoryStore::new(1 << 20, "ns:q".to_owned()));
        let mut older = 0;
        for i in 0..rounds {
            let key = StampKey {
                key: format!("ns:t:{i}"),
                ttl: None,
            };
            let barrier = Arc::new(Barrier::new(2));
            let other = {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    a(&store, &key);
                })
            };
            barrier.wait();
            b(&store, &key);
            other.join().unwrap();
            let now = Seq::parse(&store.settle(&[]).seq).unwrap();
            let token = store.stamps(std::slice::from_ref(&key))[0].clone().unwrap();
            if Seq::of_token(&token) != Some(now) {
                older += 1;
            }
        }
        assert_eq!(older, 0, "keys left at an older count, of {rounds}");
    }

    #[test]
    fn creating_a_stamp_never_overwrites_a_concurrent_bump() {
        race(
            5_000,
            |s, k| drop(s.settle(std::slice::from_ref(k))),
            |s, k| s.bump(std::slice::from_ref(k)),
        );
    }

    #[test]
    fn concurrent_bumps_leave_the_later_count() {
        race(
            5_000,
            |s, k| s.bump(std::slice::from_ref(k)),
            |s, k| s.bump(std::slice::from_ref(k)),
        );
    }
}
