//! `Cache`: the read-through logic shared by every backend.

use crate::__private::Site;
use crate::backend::near::NearCache;
use crate::backend::{Read, StampKey, Store, StoreError};
use crate::breaker::{Breaker, WarnLimiter};
use crate::calls;
use crate::envelope::{self, Decoded};
use crate::key::KeyBuilder;
use crate::singleflight::{Flights, Role};
use crate::stats::{CacheStats, Recorder, Stats};
use crate::tags::{entry_key, generation_key, tag_key};
use crate::{CacheBuilder, Error};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Beyond this many undelivered tags, recovery bumps the whole namespace instead.
const MAX_PENDING_TAGS: usize = 10_000;

/// A query-result cache: Redis, in-memory, or pass-through. Cheap to clone (one `Arc`);
/// clones share their connection, counters and in-flight queries.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

pub(crate) struct Settings {
    pub(crate) namespace: String,
    pub(crate) default_ttl: Duration,
    pub(crate) tag_ttl: Duration,
    pub(crate) max_value_size: usize,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
}

struct Inner {
    store: Option<Store>,
    settings: Settings,
    generation_key: String,
    stats: Stats,
    flights: Flights,
    breaker: Breaker,
    warnings: WarnLimiter,
    pending: Pending,
    /// Bumped by every invalidation of this process; part of the single-flight key so a
    /// caller never joins a query that started before an invalidation it has seen.
    epoch: AtomicU64,
}

/// Invalidations that did not reach Redis. While any are pending this process reads
/// nothing from Redis: it first delivers them, or runs queries uncached.
#[derive(Default)]
struct Pending {
    any: AtomicBool,
    state: Mutex<PendingState>,
    delivering: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct PendingState {
    tags: HashSet<String>,
    generation: bool,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.inner.store {
            None => "disabled",
            Some(Store::Memory(_)) => "memory",
            Some(Store::Redis(_)) => "redis",
        };
        f.debug_struct("Cache")
            .field("backend", &backend)
            .field("namespace", &self.inner.settings.namespace)
            .field("default_ttl", &self.inner.settings.default_ttl)
            .finish_non_exhaustive()
    }
}

impl AsRef<Cache> for Cache {
    fn as_ref(&self) -> &Cache {
        self
    }
}

impl Cache {
    /// Starts configuring a cache (in-memory by default).
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }

    /// Builds a cache from the process environment; see [`Cache::from_lookup`].
    pub async fn from_env() -> Result<Cache, Error> {
        Self::from_lookup(|name| std::env::var(name).ok()).await
    }

    /// Builds a cache from any variable source, with the rules of [`Cache::from_env`]:
    /// `REDIS_URL` (+ `REDIS_PASSWORD`, put into the URL when it has none),
    /// `REDIS_CONNECT_TIMEOUT_MS`, `REDIS_RESPONSE_TIMEOUT_MS`, `CACHE_NAMESPACE`,
    /// `CACHE_DEFAULT_TTL` (whole seconds) and `CACHE_ENABLED` (`false` gives a pass-through
    /// cache). Without `REDIS_URL` the in-memory backend is used.
    pub async fn from_lookup<F>(lookup: F) -> Result<Cache, Error>
    where
        F: Fn(&str) -> Option<String>,
    {
        crate::config::builder_from_lookup(lookup)?.build().await
    }

    pub(crate) fn new(store: Option<Store>, settings: Settings) -> Self {
        Cache {
            inner: Arc::new(Inner {
                store,
                generation_key: generation_key(&settings.namespace),
                breaker: Breaker::new(settings.breaker_failures, settings.breaker_cooldown),
                settings,
                stats: Stats::default(),
                flights: Flights::default(),
                warnings: WarnLimiter::new(Duration::from_secs(10)),
                pending: Pending::default(),
                epoch: AtomicU64::new(0),
            }),
        }
    }

    /// The namespace prefixing every key of this cache.
    pub fn namespace(&self) -> &str {
        &self.inner.settings.namespace
    }

    /// Counters since the cache was built, in total and per query name.
    pub fn stats(&self) -> CacheStats {
        let near = self.near().map(NearCache::counters).unwrap_or_default();
        self.inner.stats.snapshot(near)
    }

    fn near(&self) -> Option<&NearCache> {
        match &self.inner.store {
            Some(Store::Redis(r)) => r.near(),
            _ => None,
        }
    }

    /// Number of entries held by the near cache (`None` without one); at most its capacity.
    pub fn near_entry_count(&self) -> Option<u64> {
        self.near().map(NearCache::entry_count)
    }

    /// Checks the backend for a health endpoint: a Redis `PING` under the response timeout
    /// (it does not go through the circuit breaker); always `Ok` in memory or pass-through.
    pub async fn ping(&self) -> Result<(), Error> {
        match &self.inner.store {
            Some(Store::Redis(r)) => r.ping().await.map_err(|e| Error::Unavailable {
                reason: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Callers currently waiting for another caller's identical query (single-flight);
    /// useful on a health page, and to observe a stampede being absorbed.
    pub fn shared_waiters(&self) -> usize {
        self.inner.flights.waiting()
    }

    /// Number of entries held by the in-memory backend (`None` for Redis or pass-through).
    pub fn memory_entry_count(&self) -> Option<u64> {
        match &self.inner.store {
            Some(Store::Memory(m)) => Some(m.entry_count()),
            _ => None,
        }
    }

    /// Invalidates every entry tagged `tag`, in O(1) whatever their number. See
    /// [`invalidate_many`](Self::invalidate_many) for what an `Err` means.
    pub async fn invalidate(&self, tag: &str) -> Result<(), Error> {
        self.invalidate_many([tag]).await
    }

    /// Invalidates every entry carrying any of `tags`, in one round trip.
    ///
    /// `Err` means Redis could not be told. The invalidation then stays **pending**: from
    /// this moment this process serves no cached entry at all until it has delivered every
    /// pending invalidation to Redis (it tries before each read), so it cannot serve what
    /// the invalidation covered. Other processes see it once it is delivered.
    pub async fn invalidate_many<I, S>(&self, tags: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        if tags.is_empty() {
            return Ok(());
        }
        let keys: Vec<StampKey> = tags.iter().map(|t| self.tag_stamp(t, None)).collect();
        self.bump_or_defer(store, &keys, |p| p.tags.extend(tags.iter().cloned()))
            .await
    }

    /// Invalidates everything in this cache's namespace in O(1), by replacing the
    /// namespace generation that every entry is stamped with. `Err` is pending as for
    /// [`invalidate_many`](Self::invalidate_many).
    pub async fn clear(&self) -> Result<(), Error> {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        let keys = [self.generation_stamp()];
        self.bump_or_defer(store, &keys, |p| p.generation = true)
            .await
    }

    /// Commits `tx`, then invalidates `tags`. Returns `Err` only when the commit fails, in
    /// which case nothing is invalidated. An invalidation Redis does not accept is kept
    /// pending (see [`invalidate_many`](Self::invalidate_many)) and logged.
    pub async fn commit_and_invalidate<DB, I, S>(
        &self,
        tx: sqlx::Transaction<'_, DB>,
        tags: I,
    ) -> Result<(), Error>
    where
        DB: sqlx::Database,
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        tx.commit().await.map_err(Error::Commit)?;
        if let Err(e) = self.invalidate_many(tags).await {
            tracing::warn!(error = %e, "cached-query: invalidation after commit is pending");
        }
        Ok(())
    }

    fn tag_stamp(&self, tag: &str, entry_ttl: Option<Duration>) -> StampKey {
        let s = &self.inner.settings;
        StampKey {
            key: tag_key(&s.namespace, tag),
            ttl: Some(entry_ttl.map_or(s.tag_ttl, |t| t.max(s.tag_ttl))),
        }
    }

    fn generation_stamp(&self) -> StampKey {
        StampKey {
            key: self.inner.generation_key.clone(),
            ttl: None,
        }
    }

    /// Sends `keys` fresh tokens; on failure records them as pending (via `defer`).
    async fn bump_or_defer(
        &self,
        store: &Store,
        keys: &[StampKey],
        defer: impl FnOnce(&mut PendingState),
    ) -> Result<(), Error> {
        let inner = &*self.inner;
        let result = if !store.is_remote() {
            store.bump(keys).await
        } else if inner.pending.any.load(Ordering::SeqCst) {
            // Older invalidations are undelivered: queue behind them and deliver everything.
            self.defer(defer);
            self.deliver_pending(store, true).await
        } else {
            let r = if inner.breaker.allow() {
                let r = store.bump(keys).await;
                self.observe(&r);
                r
            } else {
                Err(StoreError::CircuitOpen)
            };
            if r.is_err() {
                self.defer(defer);
            }
            r
        };
        result.map_err(|e| Error::InvalidationPending {
            reason: e.to_string(),
        })
    }

    fn defer(&self, f: impl FnOnce(&mut PendingState)) {
        let mut state = self
            .inner
            .pending
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(&mut state);
        if state.tags.len() > MAX_PENDING_TAGS {
            state.tags.clear();
            state.generation = true;
        }
        self.inner.pending.any.store(true, Ordering::SeqCst);
    }

    /// Delivers every pending invalidation. `wait` makes an invalidating caller queue behind
    /// another delivery instead of giving up.
    async fn deliver_pending(&self, store: &Store, wait: bool) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let _guard = if wait {
            inner.pending.delivering.lock().await
        } else {
            inner
                .pending
                .delivering
                .try_lock()
                .map_err(|_| StoreError::PendingBusy)?
        };
        let (tags, generation) = {
            let state = inner
                .pending
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (
                state.tags.iter().cloned().collect::<Vec<_>>(),
                state.generation,
            )
        };
        if tags.is_empty() && !generation {
            return Ok(());
        }
        if !inner.breaker.allow() {
            return Err(StoreError::CircuitOpen);
        }
        let mut keys: Vec<StampKey> = tags.iter().map(|t| self.tag_stamp(t, None)).collect();
        if generation {
            keys.push(self.generation_stamp());
        }
        let result = store.bump(&keys).await;
        self.observe(&result);
        result?;
        let mut state = inner
            .pending
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for t in &tags {
            state.tags.remove(t);
        }
        if generation {
            state.generation = false;
        }
        if state.tags.is_empty() && !state.generation {
            inner.pending.any.store(false, Ordering::SeqCst);
        }
        tracing::info!(
            tags = tags.len(),
            generation,
            "cached-query: delivered pending invalidations"
        );
        Ok(())
    }

    fn observe<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.inner.breaker.success(),
            Err(StoreError::CircuitOpen | StoreError::PendingBusy) => {}
            Err(_) => self.inner.breaker.failure(),
        }
    }

    fn warn(&self, what: &str, error: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.inner.warnings.permit() {
            tracing::warn!(
                error = %error,
                suppressed,
                "cached-query: {what}; the query runs against the database"
            );
        }
    }

    /// A Redis read guarded by pending invalidations and the circuit breaker.
    async fn read(
        &self,
        store: &Store,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
    ) -> Result<Read, StoreError> {
        if store.is_remote() {
            if self.inner.pending.any.load(Ordering::SeqCst) {
                self.deliver_pending(store, false).await?;
            }
            if !self.inner.breaker.allow() {
                return Err(StoreError::CircuitOpen);
            }
        }
        let r = store.read(entry, entry_ttl, stamps).await;
        self.observe(&r);
        r
    }

    /// Serves `fut`'s result from the cache or runs it (once per key and tag versions;
    /// see `singleflight` for callers that arrive just after the result was stored).
    pub(crate) async fn get_or_run<T, E, F>(
        &self,
        site: &'static Site,
        key: KeyBuilder,
        tags: Vec<String>,
        fut: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        let inner = &*self.inner;
        let rec = inner.stats.recorder(site.name);
        let Some(store) = &inner.store else {
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
        // Near cache, entry checked against its stamps with nothing dropped since: no need
        // to look at the stamps again.
        if let Some(near) = self.near()
            && !inner.pending.any.load(Ordering::SeqCst)
            && let Some(bytes) = near.checked(&entry)
            && let Some(Ok(value)) = envelope::payload(&bytes).map(serde_json::from_slice::<T>)
        {
            record_hit(&rec, true);
            return Ok(value);
        }
        let ttl = site.ttl().unwrap_or(inner.settings.default_ttl);
        let mut stamp_keys = Vec::with_capacity(tags.len() + 1);
        stamp_keys.push(self.generation_stamp());
        stamp_keys.extend(tags.iter().map(|t| self.tag_stamp(t, Some(ttl))));
        let epoch = inner.epoch.load(Ordering::SeqCst);
        // Before the read: a result stored after this point must be visible to it.
        let ticket = inner.flights.ticket();

        let stamps = match self.read(store, &entry, ttl, &stamp_keys).await {
            Ok(read) => {
                if let Some(value) = self.fresh(&rec, &entry, &read) {
                    record_hit(&rec, read.near.is_some());
                    return Ok(value);
                }
                Some(read.stamps)
            }
            Err(e) => {
                rec.error();
                self.warn("Redis read failed", &e);
                None
            }
        };

        let mut flight = Vec::with_capacity(entry.len() + 9 + 17 * stamp_keys.len());
        flight.extend_from_slice(entry.as_bytes());
        flight.extend_from_slice(&epoch.to_le_bytes());
        match &stamps {
            Some(stamps) => stamps.iter().for_each(|s| {
                flight.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
                flight.extend_from_slice(s);
            }),
            None => flight.push(0xFF),
        }
        let leader = match inner.flights.join(flight, ticket) {
            Role::Leader(leader) => Some(leader),
            Role::Follower(rx) => {
                if let Some(payload) = inner.flights.follow(rx).await
                    && let Ok(value) = serde_json::from_slice::<T>(&payload)
                {
                    rec.hit();
                    calls::cache_hit();
                    return Ok(value);
                }
                None
            }
        };
        let result = calls::execute(fut).await;
        rec.miss();
        let Ok(value) = &result else {
            return result;
        };
        let payload = match serde_json::to_vec(value) {
            Ok(p) => p,
            Err(e) => {
                rec.error();
                self.warn("the result could not be serialised", &e);
                return result;
            }
        };
        let stored = match stamps {
            Some(stamps) => {
                self.store_payload(store, &rec, site, &entry, &stamps, &payload, ttl)
                    .await
            }
            None => false,
        };
        if let Some(leader) = leader {
            leader.publish(payload.into(), stored);
        }
        result
    }

    /// The value in `read`'s entry if it is fresh and decodes (a corrupt entry or one that
    /// does not decode as `T` is counted); a near-cache entry is then marked checked.
    fn fresh<T: DeserializeOwned>(
        &self,
        rec: &Recorder<'_>,
        entry: &str,
        read: &Read,
    ) -> Option<T> {
        let bytes = read.entry.as_ref()?;
        let payload = match envelope::decode(bytes, &read.stamps) {
            Decoded::Fresh(payload) => payload,
            Decoded::Stale => return None,
            Decoded::Corrupt => {
                rec.decode_error();
                return None;
            }
        };
        let Ok(value) = serde_json::from_slice(payload) else {
            rec.decode_error();
            return None;
        };
        if let (Some(seq), Some(near)) = (read.near, self.near()) {
            near.mark_checked(entry, bytes, seq);
        }
        Some(value)
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_payload(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        site: &Site,
        entry: &str,
        stamps: &[bytes::Bytes],
        payload: &[u8],
        ttl: Duration,
    ) -> bool {
        if !site.cache_none && payload == b"null" {
            return false;
        }
        if payload.len() > self.inner.settings.max_value_size {
            rec.oversized();
            return false;
        }
        if store.is_remote() && !self.inner.breaker.allow() {
            return false;
        }
        let r = store
            .write(entry, envelope::encode(stamps, payload), ttl)
            .await;
        self.observe(&r);
        if let Err(e) = &r {
            rec.error();
            self.warn("Redis write failed", e);
        }
        r.is_ok()
    }
}

/// Counts a call answered from the cache (`near`: without a Redis round trip).
fn record_hit(rec: &Recorder<'_>, near: bool) {
    rec.hit();
    if near {
        rec.near_hit();
    }
    calls::cache_hit();
}
