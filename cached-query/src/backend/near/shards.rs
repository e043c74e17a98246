//! A small bounded map for the near cache's hot path: a few mutex-guarded shards, an expiry
//! per value, and random eviction within a shard when it is full. A hit is one short lock
//! and a clock read (a general-purpose cache's admission and recency bookkeeping cost
//! several times that, and the near cache answers its hits in about a microsecond).

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_SHARDS: usize = 16;

/// foldhash (seeded per map): a few cycles per word on these short keys, where std's
/// SipHash is several times slower.
type Map = HashMap<String, Slot, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Slot {
    bytes: Bytes,
    expires: Option<Instant>,
    /// A caller-defined version at which this value was last checked (`u64::MAX`: never).
    checked: u64,
}

#[derive(Debug)]
pub(crate) struct Shards {
    shards: Box<[Mutex<Map>]>,
    per_shard: usize,
}

impl Shards {
    /// Holds at most `capacity` values (at least one).
    pub(crate) fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let n = capacity.min(MAX_SHARDS);
        Shards {
            shards: (0..n).map(|_| Mutex::default()).collect(),
            per_shard: capacity / n,
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Map> {
        // Keys end in hex digits of a hash (or are few, like the namespace generation), so
        // their last bytes spread them evenly.
        let mix = key.bytes().rev().take(8).fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        self.shards[mix % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        self.get_checked(key, u64::MAX).map(|(bytes, _)| bytes)
    }

    /// The value, and whether it was [`mark`](Self::mark)ed as checked at `version`.
    pub(crate) fn get_checked(&self, key: &str, version: u64) -> Option<(Bytes, bool)> {
        let mut shard = self.shard(key);
        let slot = shard.get(key)?;
        if slot.expires.is_some_and(|at| at <= Instant::now()) {
            shard.remove(key);
            return None;
        }
        Some((
            slot.bytes.clone(),
            version != u64::MAX && slot.checked == version,
        ))
    }

    /// Records that `bytes` (if still the value under `key`) was checked at `version`.
    pub(crate) fn mark(&self, key: &str, bytes: &Bytes, version: u64) {
        if let Some(slot) = self.shard(key).get_mut(key)
            && slot.bytes.as_ptr() == bytes.as_ptr()
            && slot.bytes.len() == bytes.len()
        {
            slot.checked = version;
        }
    }

    pub(crate) fn insert(&self, key: &str, bytes: Bytes, ttl: Option<Duration>) {
        let slot = Slot {
            bytes,
            expires: ttl.and_then(|t| Instant::now().checked_add(t)),
            checked: u64::MAX,
        };
        let mut shard = self.shard(key);
        if let Some(existing) = shard.get_mut(key) {
            *existing = slot;
            return;
        }
        if shard.len() >= self.per_shard {
            // Keys hash uniformly, so the first key in the table is an arbitrary one.
            if let Some(victim) = shard.keys().next().cloned() {
                shard.remove(&victim);
            }
        }
        shard.insert(key.to_owned(), slot);
    }

    pub(crate) fn remove(&self, key: &str) {
        self.shard(key).remove(key);
    }

    pub(crate) fn clear(&self) {
        for shard in &*self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_capacity_and_values_expire() {
        let map = Shards::new(50);
        for i in 0..1000 {
            map.insert(&format!("k{i:x}"), Bytes::from_static(b"v"), None);
        }
        assert!(map.len() <= 50 && map.len() >= 40, "{}", map.len());
        map.insert("short", Bytes::from_static(b"x"), Some(Duration::ZERO));
        assert_eq!(map.get("short"), None);
        map.insert(
            "long",
            Bytes::from_static(b"y"),
            Some(Duration::from_secs(60)),
        );
        assert_eq!(map.get("long").as_deref(), Some(&b"y"[..]));
        let (long, checked) = map.get_checked("long", 3).unwrap();
        assert!(!checked);
        map.mark("long", &long, 3);
        assert!(map.get_checked("long", 3).unwrap().1);
        assert!(!map.get_checked("long", 4).unwrap().1);
        map.insert("long", Bytes::from_static(b"z"), None);
        assert!(
            !map.get_checked("long", 3).unwrap().1,
            "a new value is unchecked"
        );
        map.mark("long", &long, 3);
        assert!(
            !map.get_checked("long", 3).unwrap().1,
            "marks only the value it checked"
        );
        map.remove("long");
        assert_eq!(map.get("long"), None);
        map.clear();
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn a_capacity_of_one_holds_one() {
        let map = Shards::new(1);
        map.insert("a", Bytes::from_static(b"1"), None);
        map.insert("b", Bytes::from_static(b"2"), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get("b").as_deref(), Some(&b"2"[..]));
    }
}
