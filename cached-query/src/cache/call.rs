//! The read path of one `#[cached_query]` call, top to bottom:
//!
//! 1. **near layer**: an entry held in process and checked against its stamps since the
//!    last stamp change is served at once; otherwise the entry and its stamps, if all held
//!    in process, stand in for a Redis read (no round trip: the breaker never sees it);
//! 2. **Redis round trip**: one read of the entry and its stamps, after delivering pending
//!    invalidations and only while the breaker lets calls through;
//! 3. **freshness**: the entry is served if it was computed under exactly these stamps;
//! 4. **single-flight**: callers that missed the same entry under the same stamps share one
//!    query;
//! 5. **query**: the function body runs;
//! 6. **store**: the result is written with the stamps read in step 1 or 2, so a result
//!    computed before an invalidation is never served after it.
//!
//! **Result tags** (`<ret…>`) are known only after the query, so their stamps cannot be read
//! before it. Their sites also read the namespace's invalidation sequence in step 1–2
//! (`keyspace::Seq`: every invalidation advances it, then writes its tags tokens carrying
//! the new count); after the query, each result tag's token is read (created when missing)
//! and the result is stored only if none carries a count past the one read before the query.
//! The entry keeps each result tag with that token, and a hit checks them too (a second read,
//! or the near cache).

use super::Cache;
use super::digest::KeyBuilder;
use super::envelope::{self, Decoded, ResultStamp};
use super::flights::Role;
use super::lease::{Lease, Leased, Miss};
use super::refresh;
use super::span::{CallSpan, Outcome, backend_of};
use super::stats::Recorder;
use crate::backend::near::NearCache;
use crate::backend::{Read, Settled, StampKey, Store, StoreError};
use crate::keyspace::{Seq, entry_key, tag_hash, tag_key_of_hash};
use crate::timing::calls;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// The static description of one `#[cached_query]` function.
#[derive(Debug)]
pub struct Site {
    /// Stats name and part of the key.
    pub name: &'static str,
    /// `version = …`, part of the key.
    pub version: u32,
    /// `ttl = …` in seconds; 0 means the cache's default.
    pub ttl_secs: u64,
    /// Whether `Ok(None)` is stored.
    pub cache_none: bool,
    /// `stale_if_error = …` in seconds (0: none): how much longer than its TTL an entry is
    /// kept, to be returned if the query fails.
    pub stale_secs: u64,
    /// `lease = false` opts out of the cache's leases.
    pub lease: bool,
    /// `refresh_ahead = …` in seconds (0: none): the end of an entry's life during which a
    /// hit may refresh it.
    pub refresh_secs: u64,
}

impl Site {
    pub(super) fn ttl(&self) -> Option<Duration> {
        (self.ttl_secs > 0).then(|| Duration::from_secs(self.ttl_secs))
    }

    /// How much longer than its TTL an entry is kept (`stale_if_error`).
    fn stale(&self) -> Duration {
        Duration::from_secs(self.stale_secs)
    }
}

/// A new key for a call of `site`.
pub fn key(site: &'static Site) -> KeyBuilder {
    KeyBuilder::new(site.name, site.version)
}

/// Whether a connection argument is inside a transaction (begun through sqlx): then the
/// call must not read or fill the cache, as it may see rows that are never committed.
pub fn in_transaction<C: sqlx::Connection>(conn: &C) -> bool {
    conn.is_in_transaction()
}

/// The tags a call's `Ok` value carries (`<ret…>` templates).
pub type ResultTags<'a, T> = &'a (dyn Fn(&T) -> Vec<String> + Send + Sync);

/// Runs one `#[cached_query]` call on `cache` (uncached, with one warning per process, when
/// there is none; uncached and counted as `bypassed` when `in_transaction`).
pub async fn cached<T, E, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: KeyBuilder,
    tags: Vec<String>,
    in_transaction: bool,
    fut: F,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    F: Future<Output = Result<T, E>>,
{
    run(cache, site, key, tags, None, in_transaction, fut).await
}

/// [`cached`] for a function whose tags also come from its result: `result_tags` renders
/// them from the `Ok` value.
pub async fn cached_by_result<T, E, F, R>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: KeyBuilder,
    tags: Vec<String>,
    in_transaction: bool,
    fut: F,
    result_tags: R,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    F: Future<Output = Result<T, E>>,
    R: Fn(&T) -> Vec<String> + Send + Sync,
{
    run(
        cache,
        site,
        key,
        tags,
        Some(&result_tags),
        in_transaction,
        fut,
    )
    .await
}

async fn run<T, E, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: KeyBuilder,
    tags: Vec<String>,
    result_tags: Option<ResultTags<'_, T>>,
    in_transaction: bool,
    fut: F,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    F: Future<Output = Result<T, E>>,
{
    let call = CallSpan::new(site.name, backend_of(cache));
    let call = &call;
    call.run(async move {
        match cache {
            Some(cache) if in_transaction => {
                cache
                    .inner
                    .stats
                    .recorder(site.name)
                    .reporting_to(call)
                    .bypassed();
                calls::execute(fut).await
            }
            Some(cache) => {
                cache
                    .get_or_run(site, key, tags, result_tags, call, fut)
                    .await
            }
            None => {
                call.report(Outcome::Bypassed);
                super::global::warn_no_cache(site.name);
                calls::execute(fut).await
            }
        }
    })
    .await
}

impl Cache {
    /// Serves `fut`'s result from the cache or runs it (see the module documentation).
    pub(crate) async fn get_or_run<T, E, F>(
        &self,
        site: &'static Site,
        key: KeyBuilder,
        tags: Vec<String>,
        result_tags: Option<ResultTags<'_, T>>,
        call: &CallSpan,
        fut: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        let inner = &*self.inner;
        let rec = inner.stats.recorder(site.name).reporting_to(call);
        let Some(store) = &inner.store else {
            // A disabled cache: skipped.
            call.report(Outcome::Bypassed);
            rec.miss();
            return calls::execute(fut).await;
        };
        let digest = match key.digest() {
            Ok(d) => d,
            Err(e) => {
                rec.error();
                self.warn("an argument could not be serialised into the cache key", &e);
                rec.miss();
                return calls::execute(fut).await;
            }
        };
        let entry = entry_key(&inner.settings.namespace, &digest);

        let ttl = site.ttl().unwrap_or(inner.settings.default_ttl);
        // 1. Near layer, checked entry: nothing to compare. A hit chosen to refresh its
        // entry goes on to read its stamps (not while the breaker is open), keeping its value
        // in case that read fails.
        let near = self.near_layer();
        let mut near_hit = None;
        if let Some(bytes) = near.and_then(|n| n.checked(&entry))
            && let Some(Ok(value)) = envelope::payload(&bytes).map(serde_json::from_slice::<T>)
        {
            let chosen = (!inner.breaker.is_open())
                .then(|| refresh::due(self, (site, ttl), &rec, &entry, &bytes))
                .flatten();
            let Some(version) = chosen else {
                record_hit(&rec, true);
                return Ok(value);
            };
            near_hit = Some((value, version));
        }
        // How long the entry is kept: its tags' tokens live at least as long, or an entry
        // kept for `stale_if_error` would lose them (and be a miss) before it is needed.
        let kept = ttl.saturating_add(site.stale());
        let mut stamp_keys = Vec::with_capacity(tags.len() + 2);
        stamp_keys.push(self.generation_stamp());
        stamp_keys.extend(tags.iter().map(|t| self.tag_stamp(t, Some(kept))));
        // The entry's own stamps come first; a result-tagged site reads the sequence last.
        let own = stamp_keys.len();
        if result_tags.is_some() {
            stamp_keys.push(self.sequence_stamp());
        }
        // Where a result is stored (after a miss, or by a refresh).
        let target = Target {
            site,
            entry: &entry,
            own,
            kept,
            ttl,
            result_tags,
        };
        let epoch = inner.epoch.load(Ordering::SeqCst);
        // Before the read: a result stored after this point must be visible to it.
        let ticket = inner.flights.ticket();
        let arrival = inner.flights.arrival();

        // 1–2. Entry and stamps from the near layer (not while the breaker is open: held
        // stamps are only as current as a connection Redis may no longer answer on), else one
        // Redis round trip, which fills the near cache.
        let local = near
            .filter(|_| !inner.breaker.is_open())
            .and_then(|n| n.lookup(&entry, &stamp_keys));
        // One budget for everything before the query: the response timeout.
        let until = store.until();
        let read = match local {
            Some(local) => Ok(local),
            None => {
                let fill = inner.near.as_ref();
                self.round_trip(store, &entry, kept, &stamp_keys, fill, until)
                    .await
            }
        };
        // An entry past its freshness that `stale_if_error` keeps: returned if the query fails.
        let mut expired = None;
        // 3. Freshness.
        let by_result = result_tags.is_some();
        let stamps = match read {
            Ok(read) => {
                let check = Check {
                    own,
                    by_result,
                    until,
                };
                let decode = |p: &[u8]| serde_json::from_slice::<T>(p).ok();
                if let Some((value, remote)) =
                    self.fresh(store, &rec, &entry, &read, check, decode).await
                {
                    record_hit(&rec, read.near.is_some() && !remote);
                    // The version to refresh, if chosen: in step 1 if the read found that
                    // version, else now (the read may find a newer one, just refreshed).
                    let version = read.entry.as_ref().and_then(|b| match &near_hit {
                        Some((_, v)) if envelope::fresh_until(b) == Some(*v) => Some(*v),
                        _ => refresh::due(self, (site, ttl), &rec, &entry, b),
                    });
                    let Some(version) = version else {
                        return Ok(value);
                    };
                    return self
                        .refresh(store, &rec, &target, value, read.stamps, version, fut)
                        .await;
                }
                if site.stale_secs > 0 {
                    expired.clone_from(&read.entry);
                }
                Some(read.stamps)
            }
            Err(e) => {
                rec.error();
                self.warn("Redis read failed", &e);
                // A near-cache hit chosen to refresh: served as it would have been.
                if let Some((value, _)) = near_hit {
                    record_hit(&rec, true);
                    return Ok(value);
                }
                None
            }
        };

        // 4. Single-flight.
        // Without stamps, only a query that started after this caller arrived is shared.
        let started_after = stamps.is_none().then_some(arrival);
        let key = flight_key(&entry, epoch, stamps.as_deref());
        let leader = match inner.flights.join(key, ticket, started_after) {
            Role::Leader(leader) => Some(leader),
            Role::Follower(rx) => {
                if let Some(payload) = inner.flights.follow(rx).await
                    && let Ok(value) = serde_json::from_slice::<T>(&payload)
                {
                    record_hit(&rec, false);
                    return Ok(value);
                }
                None
            }
            // Only batches are told to query apart.
            Role::Alone => None,
        };

        // 4b. Fleet-wide single-flight: a lease, or another process's result.
        let mut stamps = stamps;
        let mut lease = None;
        if leader.is_some()
            && self.leasing(site.lease)
            && let Some(read) = stamps.take()
        {
            let miss = Miss {
                entry: &entry,
                stamp_keys: &stamp_keys,
                kept,
                own,
                by_result,
                until,
            };
            let decode = |p: &[u8]| serde_json::from_slice::<T>(p).ok();
            match self.lease_or_wait(store, &rec, miss, read, decode).await {
                Leased::Hit(value, payload) => {
                    record_hit(&rec, false);
                    // Stored by the holder, possibly under stamps newer than this flight's
                    // key: still fresh for every caller that joins it.
                    if let Some(leader) = leader {
                        leader.share(payload);
                        leader.landed(true);
                    }
                    return Ok(value);
                }
                Leased::Query(read, taken) => {
                    stamps = Some(read);
                    lease = taken;
                }
            }
        }

        // 5. Query (timed for `refresh_ahead`, which weighs by it).
        let started = (site.refresh_secs > 0).then(std::time::Instant::now);
        rec.querying();
        let result = calls::execute(fut).await;
        if let Some(started) = started {
            rec.query_took(started.elapsed());
        }
        rec.miss();
        let Ok(value) = &result else {
            if let (Some(bytes), Some(stamps)) = (&expired, &stamps)
                && let Some(value) = self
                    .stale_value(store, &rec, bytes, &stamps[..own], by_result)
                    .await
            {
                rec.stale_served();
                if let Some(suppressed) = inner.warnings.permit() {
                    tracing::warn!(
                        query = site.name,
                        suppressed,
                        "cached-query: the query failed; its expired value is returned \
                         (stale_if_error)"
                    );
                }
                return Ok(value);
            }
            return result;
        };

        // 6. Store.
        let payload = match serde_json::to_vec(value) {
            Ok(p) => p,
            Err(e) => {
                rec.error();
                self.warn("the result could not be serialised", &e);
                return result;
            }
        };
        // Followers get the result before it is stored: none waits for that write.
        let payload: std::sync::Arc<[u8]> = payload.into();
        if let Some(leader) = &leader {
            leader.share(payload.clone());
        }
        let stored = match &stamps {
            Some(stamps) => {
                self.store_result(store, &rec, &target, stamps, value, &payload, lease)
                    .await
            }
            None => false,
        };
        if let Some(leader) = leader {
            leader.landed(stored);
        }
        // A newer result that was not stored (`None` with `cache_none = false`, oversized,
        // refused): the expired entry must not stand in for a later failure.
        if !stored && expired.is_some() {
            self.delete_entry(store, &rec, &entry).await;
        }
        result
    }

    /// Stores `value` (serialised: `payload`) in `target` with the `stamps` read before its
    /// query (for result tags, only if none was bumped since: see `settle_result_tags`),
    /// releasing `lease` with the write; whether it was stored. One budget for it all: the
    /// response timeout.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_result<T>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        target: &Target<'_, T>,
        stamps: &[Bytes],
        value: &T,
        payload: &[u8],
        lease: Option<Lease>,
    ) -> bool {
        let until = store.until();
        let (own_stamps, sequence) = stamps.split_at(target.own.min(stamps.len()));
        let settled = match (target.result_tags, sequence.first()) {
            (Some(render), Some(before)) => {
                let tags = render(value);
                self.settle_result_tags(store, rec, tags, target.kept, before, until)
                    .await
                    .map(Some)
            }
            (Some(_), None) => None,
            (None, _) => Some(None),
        };
        let Some(settled) = settled else {
            return false;
        };
        let result: Option<Vec<ResultStamp<'_>>> = settled.as_ref().map(|r| {
            r.iter()
                .map(|(hash, stamp)| ResultStamp { hash, stamp })
                .collect()
        });
        let stamps = Stamps {
            own: own_stamps,
            result: result.as_deref(),
        };
        let to = (target.entry, until);
        self.store_payload(
            store,
            rec,
            target.site,
            to,
            stamps,
            payload,
            target.ttl,
            lease,
        )
        .await
    }

    /// Deletes `entry` (a newer result was not stored), while the breaker lets calls through.
    pub(super) async fn delete_entry(&self, store: &Store, rec: &Recorder<'_>, entry: &str) {
        match self.guarded(store.delete(entry, store.until())).await {
            Ok(()) | Err(StoreError::CircuitOpen) => {}
            Err(e) => {
                rec.error();
                self.warn("Redis delete failed", &e);
            }
        }
    }

    /// The near cache, unless invalidations are pending: then nothing is served from
    /// process memory until they are delivered. (A round trip delivers them first, so it may
    /// still fill the near cache.)
    pub(super) fn near_layer(&self) -> Option<&NearCache> {
        self.inner
            .near
            .as_ref()
            .filter(|_| !self.inner.pending.any())
    }

    /// A Redis read, after delivering pending invalidations and only while the breaker
    /// allows it; the breaker observes its outcome.
    async fn round_trip(
        &self,
        store: &Store,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Read, StoreError> {
        self.may_read(store, until).await?;
        let r = store.read(entry, entry_ttl, stamps, near, until).await;
        self.observe(&r);
        r
    }

    /// What a read from Redis waits for: pending invalidations delivered, and the breaker
    /// letting calls through.
    pub(super) async fn may_read(&self, store: &Store, until: Instant) -> Result<(), StoreError> {
        if store.is_remote() {
            if self.inner.pending.any() {
                self.deliver_pending(store, false, until).await?;
            }
            if !self.inner.breaker.allow() {
                return Err(StoreError::CircuitOpen);
            }
        }
        Ok(())
    }

    /// The value in `read`'s entry if it is fresh (its own stamps, the first `own` read, and
    /// its result tags' stamps) and its payload `decode`s (a corrupt entry or one that does
    /// not decode is counted), and whether checking its result tags took a Redis read; a
    /// near-cache entry is then marked checked.
    pub(super) async fn fresh<T>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        entry: &str,
        read: &Read,
        check: Check,
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<(T, bool)> {
        let bytes = read.entry.as_ref()?;
        let current = read.stamps.get(..check.own)?;
        if !check.by_result {
            return self
                .fresh_now(rec, entry, bytes, current, read.near, decode)
                .map(|value| (value, false));
        }
        let mut remote = false;
        let payload = match envelope::decode(bytes, current) {
            Decoded::Fresh(payload, result) => {
                match result {
                    // Stored without result tags (before the site had them, or by a process
                    // that does not know them): never checked against them.
                    None => return None,
                    Some(result) if result.is_empty() => {}
                    Some(result) => {
                        let (current, read_redis) = self
                            .result_tags_current(store, rec, &result, check.until)
                            .await;
                        if !current {
                            return None;
                        }
                        remote = read_redis;
                    }
                }
                payload
            }
            Decoded::Expired(..) | Decoded::Stale => return None,
            Decoded::Corrupt => {
                rec.decode_error();
                return None;
            }
        };
        let value = self.accept(rec, (entry, bytes), read.near, payload, decode)?;
        Some((value, remote))
    }

    /// A fresh entry's `payload`, decoded (one that does not decode is counted); a
    /// near-cache entry read at `near_seq` is then marked checked.
    fn accept<T>(
        &self,
        rec: &Recorder<'_>,
        (entry, bytes): (&str, &Bytes),
        near_seq: Option<u64>,
        payload: &[u8],
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let Some(value) = decode(payload) else {
            rec.decode_error();
            return None;
        };
        if let (Some(seq), Some(near)) = (near_seq, &self.inner.near) {
            near.mark_checked(entry, bytes, seq);
        }
        Some(value)
    }

    /// [`fresh`](Self::fresh) for an entry of a site without result tags, done at once (a
    /// batch checks each element with it): the payload decoded if `bytes` was stored under
    /// exactly `current` stamps (a corrupt entry or one that does not decode is counted); a
    /// near-cache entry read at `near_seq` is then marked checked.
    pub(super) fn fresh_now<T, S: AsRef<[u8]>>(
        &self,
        rec: &Recorder<'_>,
        entry: &str,
        bytes: &Bytes,
        current: &[S],
        near_seq: Option<u64>,
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let payload = match envelope::decode(bytes, current) {
            Decoded::Fresh(payload, None) => payload,
            Decoded::Fresh(payload, Some(result)) if result.is_empty() => payload,
            // Result tags this site does not check: never served.
            Decoded::Fresh(..) | Decoded::Expired(..) | Decoded::Stale => return None,
            Decoded::Corrupt => {
                rec.decode_error();
                return None;
            }
        };
        self.accept(rec, (entry, bytes), near_seq, payload, decode)
    }

    /// The value of an entry that `stale_if_error` kept past its freshness, if its stamps are
    /// `own` (read before the query: it was not invalidated) and, for a site with result
    /// tags, its result tags' stamps are still current.
    async fn stale_value<T: DeserializeOwned>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        bytes: &Bytes,
        own: &[Bytes],
        by_result: bool,
    ) -> Option<T> {
        let (payload, result) = match envelope::decode(bytes, own) {
            Decoded::Expired(payload, result) | Decoded::Fresh(payload, result) => {
                (payload, result)
            }
            Decoded::Stale | Decoded::Corrupt => return None,
        };
        match result {
            None if by_result => return None,
            // Result tags this site does not check: never served (as in `fresh_now`).
            Some(result) if !result.is_empty() && !by_result => return None,
            Some(result) if !result.is_empty() => {
                let until = store.until();
                let (current, _) = self.result_tags_current(store, rec, &result, until).await;
                if !current {
                    return None;
                }
            }
            _ => {}
        }
        serde_json::from_slice(payload).ok()
    }

    /// An entry's lifetime in the cache: `ttl`, shortened by up to the cache's `ttl_jitter`
    /// fraction (drawn per write), so that entries written together do not expire together.
    pub(super) fn lifetime(&self, ttl: Duration) -> Duration {
        let jitter = self.inner.settings.ttl_jitter;
        if jitter <= 0.0 {
            return ttl;
        }
        let draw = super::uniform();
        Duration::try_from_secs_f64(ttl.as_secs_f64() * (1.0 - jitter * draw)).unwrap_or(ttl)
    }

    /// Whether every result tag of an entry still has the stamp stored with it, and whether
    /// that took a read: from the near cache when it holds them all, else one read by `until`
    /// (over the near cache's tracking connection, so that their changes end a near hit). A
    /// tag missing in Redis (expired, evicted) fails the check; a failed read is a miss,
    /// counted as an error.
    async fn result_tags_current(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        result: &[ResultStamp<'_>],
        until: Instant,
    ) -> (bool, bool) {
        let namespace = &self.inner.settings.namespace;
        let keys: Vec<StampKey> = result
            .iter()
            .map(|r| StampKey {
                key: tag_key_of_hash(namespace, r.hash),
                ttl: None,
            })
            .collect();
        let held = self
            .near_layer()
            .filter(|_| !self.inner.breaker.is_open())
            .and_then(|n| n.lookup_stamps(&keys));
        let remote = held.is_none() && store.is_remote();
        let current: Vec<Option<Bytes>> = match held {
            Some((tokens, _)) => tokens.into_iter().map(Some).collect(),
            None => {
                if store.is_remote() && !self.inner.breaker.allow() {
                    return (false, true);
                }
                let r = store.stamps(&keys, self.inner.near.as_ref(), until).await;
                self.observe(&r);
                match r {
                    Ok(tokens) => tokens,
                    Err(e) => {
                        rec.error();
                        self.warn("Redis read of result tags failed", &e);
                        return (false, true);
                    }
                }
            }
        };
        let current = result
            .iter()
            .zip(&current)
            .all(|(r, now)| now.as_deref().is_some_and(|now| now == r.stamp));
        (current, remote)
    }

    /// After the query: the stamps of the result's `tags`, to store it with, or `None` when
    /// it must not be stored because a tag was bumped after `before` (the sequence read
    /// before the query) or could not be read. A tag whose token carries no comparable
    /// sequence (written before this version, or in an epoch that ended when the sequence
    /// key was lost) is bumped, so the next call can store.
    async fn settle_result_tags(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        mut tags: Vec<String>,
        ttl: Duration,
        before: &Bytes,
        until: Instant,
    ) -> Option<Vec<([u8; 16], Bytes)>> {
        tags.sort_unstable();
        tags.dedup();
        if tags.is_empty() {
            return Some(Vec::new());
        }
        if tags.len() > MAX_RESULT_TAGS {
            // An entry holds at most this many; the value is returned, not stored.
            rec.oversized();
            return None;
        }
        let before = Seq::parse(before)?;
        let keys: Vec<StampKey> = tags.iter().map(|t| self.tag_stamp(t, Some(ttl))).collect();
        if store.is_remote() && !self.inner.breaker.allow() {
            return None;
        }
        let r = store.settle(&keys, until).await;
        self.observe(&r);
        let Settled { seq, tokens } = match r {
            Ok(settled) => settled,
            Err(e) => {
                rec.error();
                self.warn("Redis read of result tags failed", &e);
                return None;
            }
        };
        let now = Seq::parse(&seq);
        // A sequence in another epoch than the one read before the query (the sequence key
        // was lost meanwhile): counts are not comparable, and a late write of the old epoch
        // may have put an old token back.
        let same_epoch = now.is_some_and(|now| now.same_epoch(&before));
        let (mut storable, mut renew) = (same_epoch, Vec::new());
        for (key, token) in keys.iter().zip(&tokens) {
            match Seq::of_token(token) {
                Some(at) if at.not_after(&before) => {}
                // A count past the sequence itself: the sequence went back (its node restarted
                // from older data, or failed over to a replica behind it). Bumping the tag
                // starts a new epoch (see `RedisStore::bump`).
                Some(at)
                    if now.is_some_and(|now| at.same_epoch(&now) && at.count() > now.count()) =>
                {
                    storable = false;
                    renew.push(key.clone());
                }
                // Bumped (or created) after the query began.
                Some(at) if now.is_some_and(|now| at.same_epoch(&now)) => storable = false,
                _ => {
                    storable = false;
                    renew.push(key.clone());
                }
            }
        }
        if !renew.is_empty() {
            let r = self.bump(store, &renew, until).await;
            self.forget_near(&renew);
            if let Err(e) = r {
                self.warn("giving result tags a sequenced token failed", &e);
            }
        }
        storable.then(|| tags.iter().map(|t| tag_hash(t)).zip(tokens).collect())
    }

    /// Writes `payload` under the stamps it was computed with; whether it was stored.
    #[allow(clippy::too_many_arguments)]
    async fn store_payload(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        site: &Site,
        (entry, until): (&str, Instant),
        stamps: Stamps<'_>,
        payload: &[u8],
        ttl: Duration,
        lease: Option<Lease>,
    ) -> bool {
        if !site.cache_none && payload == b"null" {
            return false;
        }
        if payload.len() > self.inner.settings.max_value_size {
            rec.oversized();
            return false;
        }
        let lifetime = self.lifetime(ttl);
        let ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        let at = envelope::now_ms().saturating_add(ms);
        let fresh_until = if site.stale_secs > 0 {
            Some(envelope::Until::Enforced(at))
        } else if site.refresh_secs > 0 {
            Some(envelope::Until::Advisory(at))
        } else {
            None
        };
        let ttl = lifetime.saturating_add(site.stale());
        let Some(bytes) = envelope::encode(stamps.own, stamps.result, fresh_until, payload) else {
            // A stamp read from Redis that cannot be one (evicted mid-read, or garbage).
            rec.decode_error();
            return false;
        };
        if store.is_remote() && !self.inner.breaker.allow() {
            return false;
        }
        // A held lease is released with the write: waiters find the entry, or, should the
        // write fail, no lease (and query).
        let r = match lease {
            Some(lease) => {
                let r = store
                    .write_released(entry, bytes, ttl, lease.id(), until)
                    .await;
                if r.is_ok() {
                    lease.released();
                }
                r
            }
            None => store.write(entry, bytes, ttl, until).await,
        };
        self.observe(&r);
        if let Err(e) = &r {
            rec.error();
            self.warn("Redis write failed", e);
        }
        r.is_ok()
    }
}

/// Where and how a call's result is stored: its site, its entry key, how many of the stamps
/// read are its own (a result-tagged site's sequence follows), how long the entry is kept and
/// fresh, and the result tags' renderer.
pub(super) struct Target<'a, T> {
    pub(super) site: &'static Site,
    pub(super) entry: &'a str,
    pub(super) own: usize,
    pub(super) kept: Duration,
    pub(super) ttl: Duration,
    pub(super) result_tags: Option<ResultTags<'a, T>>,
}

/// What an entry is stored with: its own stamps, read before the query, and for a site with
/// result tags their stamps, read after it.
#[derive(Clone, Copy)]
struct Stamps<'a> {
    own: &'a [Bytes],
    result: Option<&'a [ResultStamp<'a>]>,
}

/// How a read entry is checked: its own stamps are the first `own` read; a site with result
/// tags (`by_result`) serves only entries that carry them, checked by `until`.
#[derive(Clone, Copy)]
pub(super) struct Check {
    pub(super) own: usize,
    pub(super) by_result: bool,
    pub(super) until: Instant,
}

/// Most result tags one entry can carry (the envelope's limit).
const MAX_RESULT_TAGS: usize = 255;

/// The single-flight key: the entry, this process's invalidation epoch, and the stamps the
/// caller saw (`None`: Redis was unreadable).
pub(super) fn flight_key(entry: &str, epoch: u64, stamps: Option<&[Bytes]>) -> Vec<u8> {
    let n = stamps.map_or(1, <[Bytes]>::len);
    let mut flight = Vec::with_capacity(entry.len() + 9 + 17 * n);
    flight.extend_from_slice(entry.as_bytes());
    flight.extend_from_slice(&epoch.to_le_bytes());
    match stamps {
        Some(stamps) => stamps.iter().for_each(|s| {
            flight.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
            flight.extend_from_slice(s);
        }),
        None => flight.push(0xFF),
    }
    flight
}

/// Counts a call answered from the cache (`near`: without a Redis round trip).
fn record_hit(rec: &Recorder<'_>, near: bool) {
    rec.hit();
    if near {
        rec.near_hit();
    }
    calls::cache_hit();
}
