//! The read path of a `#[cached_query(batch = …)]` call: the single read path
//! ([`call`](super::call)) for many entries at once. Each distinct element of the batch is
//! its own entry, keyed by the call's other key arguments plus the element, with its own
//! tags:
//!
//! 1. **near layer**: checked entries are served at once; an entry whose stamps are all held
//!    in process is checked there;
//! 2. **Redis**: one read of the other entries and of the distinct stamps they are checked
//!    against (one `MGET` per [`MAX_KEYS_PER_COMMAND`](crate::backend::MAX_KEYS_PER_COMMAND)
//!    keys, pipelined on one connection; one script for stamps that were missing);
//! 3. **freshness**: per element, exactly as for a single read;
//! 4. **single-flight**: per element. Elements whose query another call is running are
//!    waited for, before this call runs its own (one) query; elements of a batch that is
//!    itself still waiting are queried here too, so waits neither cycle nor chain (see
//!    [`Flights::join_many`](super::flights::Flights::join_many));
//! 5. **query**: once, for the elements still missing, deduplicated, in the caller's order;
//! 6. **store**: one write of their entries under the stamps read in 1–2; an element the
//!    function did not return is stored as absent (unless `cache_none = false`).
//!
//! An entry's payload is the element's value as JSON, or nothing for an absent element.

use super::Cache;
use super::call::{Site, flight_key};
use super::digest::KeyBuilder;
use super::envelope;
use super::flights::{Leader, Role};
use super::span::{CallSpan, Outcome, backend_of};
use super::stats::Recorder;
use crate::backend::{Read, StampKey, Store};
use crate::keyspace::entry_key;
use crate::timing::calls;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The map a batch function returns: `HashMap<K, V>` or `BTreeMap<K, V>`.
#[diagnostic::on_unimplemented(
    message = "`#[cached_query(batch = …)]` returns a `HashMap<K, V>` or `BTreeMap<K, V>`, not `{Self}`"
)]
pub trait BatchMap: Default {
    /// The batch's element type.
    type Key;
    /// What each element maps to.
    type Value;
    /// Adds one element's value.
    fn put(&mut self, key: Self::Key, value: Self::Value);
    /// An empty map for about `n` elements.
    fn with_room(n: usize) -> Self;
    /// One element's value.
    fn value(&self, key: &Self::Key) -> Option<&Self::Value>;
    /// Removes and returns one element's value.
    fn take(&mut self, key: &Self::Key) -> Option<Self::Value>;
}

impl<K: Eq + Hash, V, S: BuildHasher + Default> BatchMap for HashMap<K, V, S> {
    type Key = K;
    type Value = V;
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }
    fn with_room(n: usize) -> Self {
        HashMap::with_capacity_and_hasher(n, S::default())
    }
    fn value(&self, key: &K) -> Option<&V> {
        self.get(key)
    }
    fn take(&mut self, key: &K) -> Option<V> {
        self.remove(key)
    }
}

impl<K: Ord, V> BatchMap for BTreeMap<K, V> {
    type Key = K;
    type Value = V;
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }
    fn with_room(_: usize) -> Self {
        BTreeMap::new()
    }
    fn value(&self, key: &K) -> Option<&V> {
        self.get(key)
    }
    fn take(&mut self, key: &K) -> Option<V> {
        self.remove(key)
    }
}

/// Holds where `Self` must be `B`: the key type of a batch function's map and the element
/// type of its batch parameter. Generated code converts between the two through it (an
/// identity), so a mismatch is this one error, on the map's key type.
#[diagnostic::on_unimplemented(
    message = "the map's key type `{Self}` is not the element type of the batch parameter, `{B}`",
    label = "a batch function returns a map from its batch's elements: `HashMap<{B}, V>` or `BTreeMap<{B}, V>`"
)]
pub trait SameKey<B>: Sized {
    /// The batch's elements as map keys.
    fn keys(elements: &[B]) -> &[Self];
    /// Map keys as the batch's elements.
    fn elements(keys: Vec<Self>) -> Vec<B>;
}

impl<T> SameKey<T> for T {
    fn keys(elements: &[T]) -> &[T] {
        elements
    }
    fn elements(keys: Vec<T>) -> Vec<T> {
        keys
    }
}

/// The batch parameter's elements, typed as the map's keys `A` (see [`SameKey`]).
pub fn as_map_keys<A: SameKey<B>, B>(elements: &[B]) -> &[A] {
    A::keys(elements)
}

/// Map keys `A` typed as the batch parameter's elements (see [`SameKey`]).
pub fn as_elements<A: SameKey<B>, B>(keys: Vec<A>) -> Vec<B> {
    A::elements(keys)
}

/// Hands the elements that missed to the function's body, which generated code runs as a
/// future that takes them from here when first polled.
#[derive(Debug)]
pub struct BatchKeys<K>(Mutex<Option<Vec<K>>>);

impl<K> BatchKeys<K> {
    /// An empty slot for elements of the type of `requested`'s.
    pub fn for_keys(_requested: &[K]) -> Self {
        BatchKeys(Mutex::new(None))
    }

    /// The elements the body is to query.
    pub fn take(&self) -> Vec<K> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }

    fn set(&self, keys: Vec<K>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(keys);
    }
}

/// Runs one batch call on `cache`: `requested` are the batch's elements, `tags` their tags
/// (one list per element, in the same order), `fut` the body, which queries the elements
/// put in `missing`. Uncached (with one warning per process) when there is no cache;
/// uncached and counted as `bypassed` when `in_transaction`.
#[allow(clippy::too_many_arguments)]
pub async fn cached_batch<K, M, E, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: KeyBuilder,
    requested: &[K],
    tags: Vec<Vec<String>>,
    in_transaction: bool,
    missing: &BatchKeys<K>,
    fut: F,
) -> Result<M, E>
where
    K: Serialize + Clone,
    M: BatchMap<Key = K>,
    M::Value: Serialize + DeserializeOwned,
    F: Future<Output = Result<M, E>>,
{
    let backend = backend_of(cache);
    let span = CallSpan::new(site.name, backend);
    let span = &span;
    span.run(async move {
        if requested.is_empty() {
            // Nothing to read: every (no) key was served without the database, unless the
            // cache would have been skipped anyway.
            let skipped = in_transaction || backend == "none";
            span.report(if skipped {
                Outcome::Bypassed
            } else {
                Outcome::Hit
            });
            return Ok(M::default());
        }
        match cache {
            Some(cache) if !in_transaction => {
                let call = Call {
                    site,
                    requested,
                    tags,
                    missing,
                    span,
                };
                cache.get_or_run_batch(call, key, fut).await
            }
            Some(cache) => {
                cache
                    .inner
                    .stats
                    .recorder(site.name)
                    .reporting_to(span)
                    .bypassed();
                uncached(requested, key.element_digests(requested).ok(), missing, fut).await
            }
            None => {
                span.report(Outcome::Bypassed);
                super::global::warn_no_cache(site.name);
                uncached(requested, key.element_digests(requested).ok(), missing, fut).await
            }
        }
    })
    .await
}

/// One batch call's inputs.
struct Call<'a, K> {
    site: &'static Site,
    requested: &'a [K],
    tags: Vec<Vec<String>>,
    /// The call's span, which takes the outcome.
    span: &'a CallSpan,
    missing: &'a BatchKeys<K>,
}

/// The positions in `requested` of each element's first occurrence (the caller's order),
/// elements told apart by their key digests; every position without them.
fn first_occurrences(len: usize, digests: Option<&[[u8; 32]]>) -> Vec<usize> {
    let Some(digests) = digests else {
        return (0..len).collect();
    };
    let mut seen = std::collections::HashSet::with_capacity(digests.len());
    (0..len).filter(|&i| seen.insert(digests[i])).collect()
}

/// Runs the body for every distinct element and keeps the requested ones.
async fn uncached<K, M, E, F>(
    requested: &[K],
    digests: Option<Vec<[u8; 32]>>,
    missing: &BatchKeys<K>,
    fut: F,
) -> Result<M, E>
where
    K: Clone,
    M: BatchMap<Key = K>,
    F: Future<Output = Result<M, E>>,
{
    let order = first_occurrences(requested.len(), digests.as_deref());
    missing.set(order.iter().map(|&i| requested[i].clone()).collect());
    let mut map = calls::execute(fut).await?;
    let mut out = M::with_room(order.len());
    for &i in &order {
        if let Some(v) = map.take(&requested[i]) {
            out.put(requested[i].clone(), v);
        }
    }
    Ok(out)
}

/// An element's payload: its value as JSON, or nothing when absent (JSON is never empty).
fn encode_element<V: Serialize>(value: Option<&V>) -> serde_json::Result<Vec<u8>> {
    value.map_or(Ok(Vec::new()), serde_json::to_vec)
}

/// The element a payload holds (`Some(None)`: absent), `None` if it does not decode.
fn decode_element<V: DeserializeOwned>(payload: &[u8]) -> Option<Option<V>> {
    if payload.is_empty() {
        return Some(None);
    }
    serde_json::from_slice(payload).ok().map(Some)
}

/// The distinct stamps a batch is checked against, and which of them each element has.
struct StampSet {
    keys: Vec<StampKey>,
    /// Per element, positions in `keys`: the generation first, then its tags in order.
    of: Vec<Vec<usize>>,
}

impl StampSet {
    fn of<'a>(&'a self, e: usize) -> impl Iterator<Item = &'a StampKey> + 'a {
        self.of[e].iter().map(|&k| &self.keys[k])
    }
}

impl Cache {
    /// Serves a batch from the cache, querying what missed (see the module documentation).
    async fn get_or_run_batch<K, M, E, F>(
        &self,
        call: Call<'_, K>,
        key: KeyBuilder,
        fut: F,
    ) -> Result<M, E>
    where
        K: Serialize + Clone,
        M: BatchMap<Key = K>,
        M::Value: Serialize + DeserializeOwned,
        F: Future<Output = Result<M, E>>,
    {
        let inner = &*self.inner;
        let Call {
            site,
            requested,
            tags,
            missing,
            span,
        } = call;
        let rec = inner.stats.recorder(site.name).reporting_to(span);
        let digests = match key.element_digests(requested) {
            Ok(d) => d,
            Err(e) => {
                rec.error();
                self.warn("an argument could not be serialised into the cache key", &e);
                rec.misses(requested.len() as u64);
                return uncached(requested, None, missing, fut).await;
            }
        };
        let order = first_occurrences(requested.len(), Some(&digests));
        let Some(store) = &inner.store else {
            // A disabled cache: skipped.
            span.report(Outcome::Bypassed);
            rec.misses(order.len() as u64);
            return uncached(requested, Some(digests), missing, fut).await;
        };
        let namespace = &inner.settings.namespace;
        let entries: Vec<String> = order
            .iter()
            .map(|&i| entry_key(namespace, &digests[i]))
            .collect();
        let n = entries.len();
        let mut found: Vec<Option<Option<M::Value>>> = (0..n).map(|_| None).collect();
        let (mut hits, mut near_hits) = (0u64, 0u64);

        // 1. Near layer, checked entries.
        let near = self.near_layer();
        if let Some(near) = near {
            for (slot, entry) in found.iter_mut().zip(&entries) {
                if let Some(bytes) = near.checked(entry)
                    && let Some(value) = envelope::payload(&bytes).and_then(decode_element)
                {
                    *slot = Some(value);
                    near_hits += 1;
                }
            }
        }
        hits += near_hits;
        let ttl = site.ttl().unwrap_or(inner.settings.default_ttl);
        let stamps = self.stamp_set(order.iter().map(|&i| tags.get(i)), ttl);
        let epoch = inner.epoch.load(Ordering::SeqCst);
        // Before the read: a result stored after this point must be visible to it.
        let ticket = inner.flights.ticket();
        let arrival = inner.flights.arrival();

        // 1–2. Entries and stamps from the near layer where all are held, else one read.
        let mut reads: Vec<Option<Read>> = (0..n).map(|_| None).collect();
        let mut remote = Vec::new();
        let local = near.filter(|_| !inner.breaker.is_open());
        for e in (0..n).filter(|&e| found[e].is_none()) {
            match local.and_then(|near| near.lookup(&entries[e], stamps.of(e))) {
                Some(read) => reads[e] = Some(read),
                None => remote.push(e),
            }
        }
        let until = store.until();
        let mut failed = false;
        if !remote.is_empty() {
            match self
                .read_batch(store, &entries, &remote, &stamps, ttl, until)
                .await
            {
                Ok(read) => {
                    for (e, read) in remote.iter().zip(read) {
                        reads[*e] = Some(read);
                    }
                }
                Err(e) => {
                    rec.error();
                    self.warn("Redis read failed", &e);
                    failed = true;
                }
            }
        }

        // 3. Freshness.
        let mut seen: Vec<Option<Vec<Bytes>>> = (0..n).map(|_| None).collect();
        for e in 0..n {
            let Some(read) = reads[e].take() else {
                continue;
            };
            let fresh = read.entry.as_ref().and_then(|bytes| {
                self.fresh_now(
                    &rec,
                    &entries[e],
                    bytes,
                    &read.stamps,
                    read.near,
                    decode_element,
                )
            });
            match fresh {
                Some(value) => {
                    found[e] = Some(value);
                    hits += 1;
                    near_hits += u64::from(read.near.is_some());
                }
                None => seen[e] = Some(read.stamps),
            }
        }

        // 4. Single-flight.
        let pending: Vec<usize> = (0..n).filter(|&e| found[e].is_none()).collect();
        let flight_keys = pending
            .iter()
            .map(|&e| flight_key(&entries[e], epoch, seen[e].as_deref()))
            .collect();
        // Without stamps, only a query that started after this caller arrived is shared.
        let started_after = failed.then_some(arrival);
        // Set while this call waits for others' flights: its own are then not followed by
        // other batches (see `Flights::join_many`).
        let waiting = Arc::new(AtomicBool::new(true));
        let roles = inner
            .flights
            .join_many(flight_keys, ticket, started_after, &waiting);
        let mut leaders: Vec<Option<Leader<'_>>> = (0..n).map(|_| None).collect();
        let mut following = Vec::new();
        let mut query = Vec::new();
        for (&e, role) in pending.iter().zip(roles) {
            match role {
                Role::Leader(leader) => {
                    leaders[e] = Some(leader);
                    query.push(e);
                }
                Role::Follower(rx) => following.push((e, rx)),
                Role::Alone => query.push(e),
            }
        }
        if following.is_empty() {
            waiting.store(false, Ordering::SeqCst);
        }
        let flights = &inner.flights;
        let followed = futures_util::future::join_all(
            following
                .into_iter()
                .map(|(e, rx)| async move { (e, flights.follow(rx).await) }),
        )
        .await;
        for (e, payload) in followed {
            match payload.as_deref().and_then(decode_element) {
                Some(value) => {
                    found[e] = Some(value);
                    hits += 1;
                }
                // Its query failed or was cancelled: this call runs it.
                None => query.push(e),
            }
        }
        waiting.store(false, Ordering::SeqCst);
        rec.hits(hits);
        rec.near_hits(near_hits);
        calls::cache_hits(hits);

        // 5. Query.
        if !query.is_empty() {
            query.sort_unstable();
            missing.set(query.iter().map(|&e| requested[order[e]].clone()).collect());
            rec.misses(query.len() as u64);
            let mut map = calls::execute(fut).await?;

            // 6. Store.
            let until = store.until();
            let mut writes = Vec::with_capacity(query.len());
            let mut written = vec![false; n];
            for &e in &query {
                // Looked up, not taken: two elements the map's `Eq` finds equal (and their
                // keys do not) each get the value.
                let payload = match encode_element(map.value(&requested[order[e]])) {
                    Ok(p) => Arc::<[u8]>::from(p),
                    Err(err) => {
                        rec.error();
                        self.warn("the result could not be serialised", &err);
                        continue;
                    }
                };
                // Followers get the result before it is stored: none waits for that write.
                if let Some(leader) = &leaders[e] {
                    leader.share(payload.clone());
                }
                if let Some(own) = &seen[e]
                    && let Some(bytes) = self.entry_bytes(&rec, site, own, &payload)
                {
                    writes.push((entries[e].clone(), bytes));
                    written[e] = true;
                }
            }
            let stored =
                !writes.is_empty() && self.write_batch(store, &rec, writes, ttl, until).await;
            let landed = leaders
                .into_iter()
                .enumerate()
                .filter_map(|(e, leader)| leader.map(|l| (l, stored && written[e])))
                .collect();
            inner.flights.land_all(landed);
            for &e in &query {
                found[e] = Some(map.take(&requested[order[e]]));
            }
        }

        let mut out = M::with_room(n);
        for (e, value) in found.into_iter().enumerate() {
            if let Some(Some(value)) = value {
                out.put(requested[order[e]].clone(), value);
            }
        }
        Ok(out)
    }

    /// The distinct stamps of a batch whose elements have `tags`: the namespace generation
    /// and each distinct tag once.
    fn stamp_set<'t>(
        &self,
        tags: impl Iterator<Item = Option<&'t Vec<String>>>,
        ttl: std::time::Duration,
    ) -> StampSet {
        let mut keys = vec![self.generation_stamp()];
        let mut index: HashMap<&str, usize> = HashMap::new();
        let of = tags
            .map(|tags| {
                let mut own = vec![0];
                for tag in tags.into_iter().flatten() {
                    let at = *index.entry(tag).or_insert_with(|| {
                        keys.push(self.tag_stamp(tag, Some(ttl)));
                        keys.len() - 1
                    });
                    own.push(at);
                }
                own
            })
            .collect();
        StampSet { keys, of }
    }

    /// One read of the entries at positions `remote` and of the stamps they need: a
    /// [`Read`] per position, its entry left out when one of its stamps had to be created.
    async fn read_batch(
        &self,
        store: &Store,
        entries: &[String],
        remote: &[usize],
        stamps: &StampSet,
        ttl: std::time::Duration,
        until: tokio::time::Instant,
    ) -> Result<Vec<Read>, crate::backend::StoreError> {
        // Only the stamps these entries need, each once: usually all of them, in order.
        let mut position = vec![usize::MAX; stamps.keys.len()];
        let mut needed = Vec::with_capacity(stamps.keys.len());
        for &e in remote {
            for &k in &stamps.of[e] {
                if position[k] == usize::MAX {
                    position[k] = needed.len();
                    needed.push(k);
                }
            }
        }
        let needed: std::borrow::Cow<'_, [StampKey]> =
            if needed.iter().copied().eq(0..stamps.keys.len()) {
                std::borrow::Cow::Borrowed(&stamps.keys)
            } else {
                needed.iter().map(|&k| stamps.keys[k].clone()).collect()
            };
        let asked: Vec<&str> = remote.iter().map(|&e| entries[e].as_str()).collect();
        self.may_read(store, until).await?;
        let fill = self.inner.near.as_ref();
        let r = store.read_many(&asked, ttl, &needed, fill, until).await;
        self.observe(&r);
        let read = r?;
        Ok(remote
            .iter()
            .zip(read.entries)
            .map(|(&e, entry)| {
                let own = stamps.of[e].iter().map(|&k| position[k]);
                let created = own.clone().any(|p| read.created[p]);
                Read {
                    entry: entry.filter(|_| !created),
                    stamps: own.map(|p| read.stamps[p].clone()).collect(),
                    near: None,
                }
            })
            .collect())
    }

    /// The bytes to store for an element's `payload` computed under `own` stamps, or `None`
    /// when it is not stored: absent with `cache_none = false`, oversized (counted), or a
    /// stamp that cannot be one (counted as a decode error).
    fn entry_bytes(
        &self,
        rec: &Recorder<'_>,
        site: &Site,
        own: &[Bytes],
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        if !site.cache_none && payload.is_empty() {
            return None;
        }
        if payload.len() > self.inner.settings.max_value_size {
            rec.oversized();
            return None;
        }
        let bytes = envelope::encode(own, None, None, payload);
        if bytes.is_none() {
            rec.decode_error();
        }
        bytes
    }

    /// Writes a batch's entries; whether they were stored.
    async fn write_batch(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        writes: Vec<(String, Vec<u8>)>,
        ttl: std::time::Duration,
        until: tokio::time::Instant,
    ) -> bool {
        if store.is_remote() && !self.inner.breaker.allow() {
            return false;
        }
        // One lifetime for the batch's entries (they were filled together anyway; the next
        // batch that refills them draws another).
        let r = store.write_many(writes, self.lifetime(ttl), until).await;
        self.observe(&r);
        if let Err(e) = &r {
            rec.error();
            self.warn("Redis write failed", e);
        }
        r.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_elements_are_told_from_any_value() {
        for value in [None, Some(None::<u8>), Some(Some(0u8))] {
            let payload = encode_element(value.as_ref()).unwrap();
            assert_eq!(decode_element::<Option<u8>>(&payload), Some(value));
        }
        assert_eq!(decode_element::<u8>(b"x"), None);
    }

    #[test]
    fn duplicates_keep_their_first_position() {
        let d = |b: u8| [b; 32];
        assert_eq!(
            first_occurrences(5, Some(&[d(3), d(1), d(3), d(2), d(1)])),
            [0, 1, 3]
        );
        assert_eq!(first_occurrences(3, None), [0, 1, 2]);
    }
}
