//! The cache: its public API ([`Cache`], [`CacheBuilder`]), the read path of a cached call
//! (`call`), the write side (`invalidate`, `pending`), and what they use: single-flight,
//! the circuit breaker, stats, the stored envelope and the argument digest.

pub(crate) mod batch;
pub(crate) mod breaker;
pub(crate) mod builder;
pub(crate) mod call;
pub(crate) mod delivery;
pub(crate) mod digest;
pub(crate) mod envelope;
pub(crate) mod flights;
pub(crate) mod global;
pub(crate) mod invalidate;
pub(crate) mod lease;
pub(crate) mod pending;
pub(crate) mod refresh;
pub(crate) mod span;
pub(crate) mod stats;

use crate::backend::near::NearCache;
use crate::backend::{StampKey, Store, StoreError};
use crate::keyspace::{generation_key, sequence_key, tag_key};
use crate::{CacheBuilder, Error};
use breaker::{Breaker, WarnLimiter};
use flights::Flights;
use pending::Pending;
use stats::{CacheStats, Stats};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A query-result cache: Redis, in-memory, or pass-through. Cheap to clone (one `Arc`);
/// clones share their connection, counters and in-flight queries.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

pub(crate) struct Settings {
    pub(crate) namespace: String,
    pub(crate) default_ttl: Duration,
    /// See [`CacheBuilder::ttl_jitter`].
    pub(crate) ttl_jitter: f64,
    /// See [`CacheBuilder::leases`] (only a Redis backend takes leases).
    pub(crate) leases: bool,
    /// See [`CacheBuilder::lease_ttl`].
    pub(crate) lease_ttl: Duration,
    pub(crate) tag_ttl: Duration,
    pub(crate) max_value_size: usize,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    /// Counted by the Redis connections' identity checks (`backend::identity`).
    pub(crate) server_changes: Arc<AtomicU64>,
}

struct Inner {
    /// `None`: pass-through.
    store: Option<Store>,
    /// In front of a single-node Redis, when asked for.
    near: Option<NearCache>,
    settings: Settings,
    generation_key: String,
    /// The namespace's invalidation sequence (`keyspace::Seq`).
    sequence_key: String,
    stats: Stats,
    flights: Flights,
    /// Entries this process is refreshing (`refresh_ahead`).
    refreshing: refresh::Refreshing,
    breaker: Breaker,
    warnings: WarnLimiter,
    pending: Pending,
    /// Bumped by every invalidation of this process; part of the single-flight key so a
    /// caller never joins a query that started before an invalidation it has seen.
    epoch: AtomicU64,
    /// Invalidation through PostgreSQL, when built with `CacheBuilder::outbox`.
    #[cfg(feature = "postgres")]
    outbox: Option<crate::outbox::Outbox>,
    /// Dropped with the cache: background tasks watch it and end.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    stop: tokio::sync::watch::Sender<()>,
    /// Rate-limits the error logged when `#[invalidates]` runs inside a transaction without
    /// an outbox.
    before_commit_errors: WarnLimiter,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = self.inner.store.as_ref().map_or("disabled", Store::kind);
        f.debug_struct("Cache")
            .field("backend", &backend)
            .field("near_cache", &self.inner.near.is_some())
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
    /// [`RedisConfig`](crate::RedisConfig)'s variables (`REDIS_URL`, `REDIS_CLUSTER_URLS`,
    /// `REDIS_PASSWORD`, timeouts, `REDIS_CA_CERT`), `CACHE_NAMESPACE`, `CACHE_DEFAULT_TTL`
    /// (whole seconds), `CACHE_NEAR_CAPACITY`, `CACHE_LEASES` and `CACHE_ENABLED` (`false` gives a
    /// pass-through cache). Without a Redis URL the in-memory backend is used.
    pub async fn from_lookup<F>(lookup: F) -> Result<Cache, Error>
    where
        F: Fn(&str) -> Option<String>,
    {
        CacheBuilder::from_lookup(lookup)?.build().await
    }

    pub(crate) fn new(store: Option<Store>, near: Option<NearCache>, settings: Settings) -> Self {
        Self::with_outbox(store, near, settings, None)
    }

    pub(crate) fn with_outbox(
        store: Option<Store>,
        near: Option<NearCache>,
        settings: Settings,
        #[cfg(feature = "postgres")] outbox: Option<crate::outbox::Outbox>,
        #[cfg(not(feature = "postgres"))] _outbox: Option<std::convert::Infallible>,
    ) -> Self {
        Cache {
            inner: Arc::new(Inner {
                store,
                near,
                generation_key: generation_key(&settings.namespace),
                sequence_key: sequence_key(&settings.namespace),
                breaker: Breaker::new(settings.breaker_failures, settings.breaker_cooldown),
                settings,
                stats: Stats::default(),
                flights: Flights::default(),
                refreshing: refresh::Refreshing::default(),
                warnings: WarnLimiter::new(Duration::from_secs(10)),
                pending: Pending::default(),
                epoch: AtomicU64::new(0),
                #[cfg(feature = "postgres")]
                outbox,
                stop: tokio::sync::watch::Sender::new(()),
                before_commit_errors: WarnLimiter::new(Duration::from_secs(10)),
            }),
        }
    }

    /// The namespace prefixing every key of this cache.
    pub fn namespace(&self) -> &str {
        &self.inner.settings.namespace
    }

    /// Counters since the cache was built, in total and per query name.
    pub fn stats(&self) -> CacheStats {
        let (invalidations, resets) = self.inner.near.as_ref().map_or((0, 0), NearCache::counters);
        let server_changes = self.inner.settings.server_changes.load(Ordering::Relaxed);
        self.inner
            .stats
            .snapshot(invalidations, resets, server_changes)
    }

    /// Entries held in this process: by the in-memory backend, or by the near cache in front
    /// of Redis (at most its capacity). `None` when entries live only in Redis (counting
    /// them would take a scan of the keyspace) or the cache is a pass-through.
    pub fn entry_count(&self) -> Option<u64> {
        match &self.inner.near {
            Some(near) => Some(near.entry_count()),
            None => self.inner.store.as_ref()?.local_entry_count(),
        }
    }

    /// Checks the backend for a health endpoint: a Redis `PING` under the response timeout
    /// (it does not go through the circuit breaker); always `Ok` in memory or pass-through.
    pub async fn ping(&self) -> Result<(), Error> {
        match &self.inner.store {
            Some(store) => store.ping().await.map_err(|e| Error::Unavailable {
                source: e.into_source(),
            }),
            None => Ok(()),
        }
    }

    /// The longest a cached call can wait on Redis in all, whatever Redis does: one
    /// response timeout for everything before the query (pending invalidations, the read,
    /// creating missing stamps) and one for storing the result. `None` without Redis.
    /// Connecting never adds to it: connections are made in the background.
    pub fn max_redis_wait(&self) -> Option<Duration> {
        Some(2 * self.inner.store.as_ref()?.deadline()?)
    }

    /// Callers currently waiting for another caller's identical query (single-flight);
    /// useful on a health page, and to observe a stampede being absorbed.
    pub fn shared_waiters(&self) -> usize {
        self.inner.flights.waiting()
    }

    fn tag_stamp(&self, tag: &str, entry_ttl: Option<Duration>) -> StampKey {
        let s = &self.inner.settings;
        StampKey {
            key: tag_key(&s.namespace, tag),
            ttl: Some(entry_ttl.map_or(s.tag_ttl, |t| t.max(s.tag_ttl))),
        }
    }

    /// The stamps an invalidation of `tags` (and, with `generation`, of the namespace) changes.
    fn stamp_keys<'t>(
        &self,
        tags: impl IntoIterator<Item = &'t str>,
        generation: bool,
    ) -> Vec<StampKey> {
        let mut keys: Vec<StampKey> = tags.into_iter().map(|t| self.tag_stamp(t, None)).collect();
        if generation {
            keys.push(self.generation_stamp());
        }
        keys
    }

    /// The sequence key, read with a result-tagged entry's stamps (it is not one of them).
    fn sequence_stamp(&self) -> StampKey {
        StampKey {
            key: self.inner.sequence_key.clone(),
            ttl: None,
        }
    }

    fn generation_stamp(&self) -> StampKey {
        StampKey {
            key: self.inner.generation_key.clone(),
            ttl: None,
        }
    }

    /// Runs `op` (a Redis operation) while the breaker lets calls through, and feeds the
    /// breaker its outcome.
    pub(super) async fn guarded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.inner.breaker.allow() {
            return Err(StoreError::CircuitOpen);
        }
        let r = op.await;
        self.observe(&r);
        r
    }

    /// Feeds the breaker the outcome of a real Redis round trip.
    fn observe<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.inner.breaker.success(),
            Err(StoreError::CircuitOpen | StoreError::PendingBusy) => {}
            // Redis answered; its replicas were slow.
            Err(StoreError::NotReplicated { .. }) => self.inner.breaker.success(),
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
}

/// A uniform draw in `[0, 1)` (TTL jitter, `refresh_ahead`'s choice): xorshift64* per thread,
/// seeded once from the operating system, so that a hit in a refresh window costs no system
/// call. Not for anything secret.
pub(crate) fn uniform() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> =
            Cell::new(getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15) | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::near::tests::{fill, key, offline};

    #[test]
    fn draws_are_uniform_in_zero_to_one() {
        let draws: Vec<f64> = (0..20_000).map(|_| uniform()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.48..0.52).contains(&mean), "{mean}");
        let below_tenth = draws.iter().filter(|d| **d < 0.1).count();
        assert!((1_700..2_300).contains(&below_tenth), "{below_tenth}");
    }

    /// Read-your-own-invalidation must not depend on Redis's push message (which usually
    /// arrives first on loopback): this near cache has no tracking connection at all.
    #[tokio::test]
    async fn an_accepted_bump_drops_the_stamps_from_the_near_cache() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let cache = Cache::builder()
            .redis(&url)
            .namespace(&format!("cq-unit-{}", std::process::id()))
            .build_with_near(offline())
            .unwrap();
        let near = cache.inner.near.as_ref().unwrap();
        let tag = key(&cache.tag_stamp("bump", None).key);
        fill(near, near.seq(), "e", &tag);
        assert!(near.lookup("e", std::slice::from_ref(&tag)).is_some());
        cache.invalidate("bump").await.unwrap();
        assert!(near.lookup("e", std::slice::from_ref(&tag)).is_none());
        let mut conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&tag.key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
