//! `CacheBuilder`: choose a backend and tune it, by hand or from the environment.

use super::{Cache, Settings};
use crate::backend::connect::{Connections, Source, Timeouts};
use crate::backend::identity::Guard;
use crate::backend::near::NearCache;
use crate::backend::redis::RedisStore;
use crate::backend::{Store, memory::MemoryStore};
use crate::setup::env::{non_empty, parse_bool, parse_secs, parse_u64};
use crate::setup::url::redact_urls;
use crate::{Error, RedisConfig, redact_url};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Whether leases are on unless configured: off, as every miss would pay one more round trip
/// (BENCHMARKS.md, "Fleet").
const DEFAULT_LEASES: bool = false;

#[derive(Debug, Clone)]
enum Backend {
    Memory,
    Redis(String),
    RedisCluster(Vec<String>),
    /// Sentinel URLs and the master's name.
    RedisSentinel(Vec<String>, String),
    Disabled,
}

/// Configures and builds a [`Cache`]. Defaults: in-memory backend with 10 000 entries,
/// namespace `"cq"`, TTL 300 s; for Redis, 1 s connect timeout and 250 ms response timeout.
#[derive(Clone)]
pub struct CacheBuilder {
    backend: Backend,
    capacity: u64,
    near_capacity: Option<u64>,
    near_lease: Duration,
    connections: usize,
    invalidation_replicas: Option<(usize, Duration)>,
    namespace: String,
    default_ttl: Duration,
    ttl_jitter: f64,
    leases: bool,
    lease_ttl: Duration,
    tag_ttl: Duration,
    max_value_size: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    /// PEM of the CA trusted for `rediss://` (used with the `tls` feature).
    root_certificate: Option<Vec<u8>>,
    #[cfg(feature = "postgres")]
    outbox: Option<sqlx::PgPool>,
    outbox_sweep_interval: Duration,
    outbox_retention: Duration,
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Redis(url) => format!("redis({})", redact_url(url)),
            Backend::RedisCluster(urls) => {
                format!("redis_cluster({})", redact_urls(urls).join(","))
            }
            Backend::RedisSentinel(urls, master) => {
                format!("redis_sentinel({}, {master})", redact_urls(urls).join(","))
            }
            other => format!("{other:?}").to_lowercase(),
        };
        f.debug_struct("CacheBuilder")
            .field("backend", &backend)
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("ttl_jitter", &self.ttl_jitter)
            .field("leases", &self.leases)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            backend: Backend::Memory,
            capacity: 10_000,
            near_capacity: None,
            near_lease: Duration::from_secs(1),
            connections: 2,
            invalidation_replicas: None,
            namespace: "cq".to_owned(),
            default_ttl: Duration::from_secs(300),
            ttl_jitter: 0.0,
            leases: DEFAULT_LEASES,
            lease_ttl: Duration::from_secs(5),
            tag_ttl: Duration::from_secs(24 * 3600),
            max_value_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            root_certificate: None,
            #[cfg(feature = "postgres")]
            outbox: None,
            outbox_sweep_interval: Duration::from_secs(1),
            outbox_retention: Duration::from_secs(300),
        }
    }
}

impl CacheBuilder {
    /// Store entries in Redis (`redis://`, `rediss://` or `unix://` URL). The connection
    /// is made lazily: an unreachable Redis does not fail [`build`](Self::build).
    #[must_use]
    pub fn redis(mut self, url: &str) -> Self {
        self.backend = Backend::Redis(url.to_owned());
        self
    }

    /// Store entries in a Redis Cluster, given one or more of its nodes' URLs (the others are
    /// discovered). Connects lazily, like [`redis`](Self::redis).
    #[must_use]
    pub fn redis_cluster<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.backend =
            Backend::RedisCluster(urls.into_iter().map(|u| u.as_ref().to_owned()).collect());
        self
    }

    /// Store entries in the Redis master that Redis Sentinel names `master_name`, given one
    /// or more Sentinels' URLs (e.g. `redis://sentinel-1:26379`). Every new connection asks
    /// the Sentinels again, so a failover is followed; a promoted replica is checked like any
    /// new server (see the README's failure modes), and a Sentinel that still names a demoted
    /// master is caught (a replica is refused). The master is reached with the scheme,
    /// credentials and database of the Sentinel URL that named it. Works with the near cache.
    #[must_use]
    pub fn redis_sentinel<I, S>(mut self, urls: I, master_name: &str) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.backend = Backend::RedisSentinel(urls, master_name.to_owned());
        self
    }

    /// Applies Redis settings (typically [`RedisConfig::from_env`]): Redis when it has a
    /// URL, the in-memory backend otherwise, its timeouts and its root certificate.
    #[must_use]
    pub fn redis_config(mut self, config: RedisConfig) -> Self {
        self.backend = match (config.cluster_urls.is_empty(), config.url) {
            (false, _) => Backend::RedisCluster(config.cluster_urls),
            _ if !config.sentinel_urls.is_empty() => Backend::RedisSentinel(
                config.sentinel_urls,
                config.sentinel_master.unwrap_or_default(),
            ),
            (true, Some(url)) => Backend::Redis(url),
            (true, None) => Backend::Memory,
        };
        self.connect_timeout = config.connect_timeout;
        self.response_timeout = config.response_timeout;
        if config.root_certificate.is_some() {
            self.root_certificate = config.root_certificate;
        }
        self
    }

    /// Store entries in this process (moka), bounded by [`capacity`](Self::capacity).
    #[must_use]
    pub fn memory(mut self) -> Self {
        self.backend = Backend::Memory;
        self
    }

    /// A pass-through cache: every call runs its query and nothing is stored
    /// (`CACHE_ENABLED=false`).
    #[must_use]
    pub fn disabled(mut self) -> Self {
        self.backend = Backend::Disabled;
        self
    }

    /// Maximum number of entries of the in-memory backend (default 10 000).
    #[must_use]
    pub fn capacity(mut self, entries: u64) -> Self {
        self.capacity = entries;
        self
    }

    /// Adds a near cache of at most `capacity` entries in front of single-node Redis: hits
    /// are answered in process, without a round trip, and stay coherent with Redis through
    /// RESP3 client-side caching (`CLIENT TRACKING`, Redis 6 or later) on one extra
    /// connection. Entries and tag versions are dropped as soon as Redis reports a change,
    /// this process's own invalidations at once, everything when that connection is lost.
    /// The tag versions it holds are bounded by the same number. Ignored by the in-memory
    /// and pass-through backends; a Redis Cluster is rejected by [`build`](Self::build).
    /// See the README's "Near cache" section for the delay other processes' changes take.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), cached_query::Error> {
    /// let cache = cached_query::Cache::builder()
    ///     .redis("redis://127.0.0.1:6379")
    ///     .near_cache(10_000)
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.entry_count(), Some(0));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn near_cache(mut self, capacity: u64) -> Self {
        self.near_capacity = Some(capacity);
        self
    }

    /// After every invalidation (and `clear`), wait until `replicas` replicas have
    /// acknowledged it (`WAIT`), at most `timeout`; fewer in time makes it pending (returned
    /// as [`Error::InvalidationPending`], sent again in the background until they do). With
    /// it, a replica promoted after a failover holds every invalidation that returned Ok
    /// (the restart and failover check still runs). Costs the replication round trip on
    /// each invalidation; reads are unchanged. `replicas = 0` turns it off (the default).
    #[must_use]
    pub fn invalidation_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.invalidation_replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// The near cache's staleness bound under a silent network partition (default 1 s):
    /// entries are served from process memory only while a request sent on the tracking
    /// connection at most this long ago has been answered (Redis sends invalidation messages
    /// before later replies, so such an answer proves they arrived). Near hits past half of
    /// it renew it with a background `PING`. A partition that drops nothing (no FIN, no RST)
    /// is otherwise invisible: without this, held entries would be served for their TTL.
    #[must_use]
    pub fn near_cache_lease(mut self, lease: Duration) -> Self {
        self.near_lease = lease;
        self
    }

    /// Number of multiplexed connections to single-node Redis that calls are spread over
    /// (default 2). Each one parses all of its replies on one task, so one connection caps
    /// throughput at what one core parses; more than the number of cores gains nothing.
    #[must_use]
    pub fn redis_connections(mut self, connections: usize) -> Self {
        self.connections = connections;
        self
    }

    /// Prefix of every key this cache writes (default `"cq"`); caches with different
    /// namespaces never see each other's entries or tags.
    #[must_use]
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// TTL of entries whose attribute sets no `ttl` (default 300 s).
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Shortens each stored entry's lifetime by a random part of up to `fraction` of its TTL
    /// (a lifetime drawn from `[ttl × (1 − fraction), ttl]`), so that entries filled together
    /// (after a deploy, a `clear`, a cold start) do not all expire, and miss, together. `ttl`
    /// stays the upper bound. `0.0`, the default, keeps every lifetime exactly the TTL;
    /// `0.1` is a good start for hot keys. A fraction outside `0 ≤ fraction < 1` is an error
    /// at `build()`.
    #[must_use]
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction;
        self
    }

    /// Fleet-wide single-flight (Redis and Redis Cluster backends): a call that misses takes
    /// a lease on computing that entry under the tag versions it read (one `SET NX PX`);
    /// calls in other processes that miss the same entry under the same versions wait for
    /// the holder's result instead of running the query, for at most
    /// [`lease_ttl`](Self::lease_ttl). One more Redis round trip per miss (measured +36 to
    /// +49 % on a local 0.35 ms miss), so off by default; see the README's "Leases" for the
    /// guarantees and figures. `#[cached_query(lease = false)]` opts a query out.
    #[must_use]
    pub fn leases(mut self, on: bool) -> Self {
        self.leases = on;
        self
    }

    /// How long a lease holds (default 5 s): no caller waits for another process's query
    /// longer than this; a holder that dies or hangs delays waiters at most this long. Give
    /// it more than your slow queries take, or their waiters run them too. Zero, more than an
    /// hour, or (with leases on a Redis backend) no longer than the response timeout is an
    /// error at `build()`.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long an untouched tag version lives (default 24 h, and never less than the TTL
    /// of the entry that created it). An expired tag only causes misses.
    #[must_use]
    pub fn tag_ttl(mut self, ttl: Duration) -> Self {
        self.tag_ttl = ttl;
        self
    }

    /// Results whose JSON is larger than this are returned but not stored (default 1 MiB).
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Deadline for establishing a Redis connection, checks included (default 1 s). Connections
    /// are made in the background: a call waits for one only within its response timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline for every Redis operation, waiting for a connection included (default
    /// 250 ms); past it the query runs against the database and the call counts as an error.
    /// A call waits on Redis at most twice this in all: see [`Cache::max_redis_wait`].
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// After `failures` consecutive Redis failures, skip Redis for `cooldown`, then let one
    /// probe call through (defaults: 3 failures, 1 s).
    #[must_use]
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Trusts this CA certificate (PEM) for `rediss://` instead of the system's roots, e.g. a
    /// private CA or a self-signed server certificate. Needs the `tls` feature.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[must_use]
    pub fn redis_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Invalidation through PostgreSQL: every invalidation is also a row in the table
    /// `cached_query_outbox` of `pool`'s database (recorded inside the writer's transaction
    /// by [`Cache::invalidate_on_commit`], `#[invalidates]` and
    /// [`Cache::commit_and_invalidate`], so it takes effect only if and after that transaction
    /// commits), and every process applies every row it is notified of. `build()` creates the
    /// table if missing and starts a listener (`LISTEN`) and a sweeper: see the README's "How
    /// invalidation works". With the in-memory backend this makes several processes' memory
    /// caches coherent with each other without Redis. Needs a Tokio runtime.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn outbox(mut self, pool: sqlx::PgPool) -> Self {
        self.outbox = Some(pool);
        self
    }

    /// How often the outbox sweeper delivers invalidations that no listener delivered (a
    /// writer killed after COMMIT, Redis unreachable when the notice came). Default 1 s.
    pub fn outbox_sweep_interval(mut self, interval: Duration) -> Self {
        self.outbox_sweep_interval = interval;
        self
    }

    /// How long an in-memory fleet keeps applied outbox rows for a process that lags behind
    /// (one that lags more drops its whole cache instead). Default 5 minutes. Redis-backed
    /// caches delete each row once delivered.
    pub fn outbox_retention(mut self, retention: Duration) -> Self {
        self.outbox_retention = retention;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let ns_ok = !self.namespace.is_empty()
            && self.namespace.len() <= 64
            && self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'?');
        if !ns_ok {
            return Err(Error::config(
                "namespace",
                &self.namespace,
                "1 to 64 printable ASCII characters without spaces, `*` or `?`",
            ));
        }
        if !(0.0..1.0).contains(&self.ttl_jitter) {
            return Err(Error::config(
                "ttl_jitter",
                &self.ttl_jitter.to_string(),
                "a fraction from 0 up to, not including, 1",
            ));
        }
        let checks = [
            ("default_ttl", self.default_ttl),
            ("lease_ttl", self.lease_ttl),
            ("tag_ttl", self.tag_ttl),
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("near_cache_lease", self.near_lease),
            (
                "invalidation_replicas",
                self.invalidation_replicas
                    .map_or(Duration::from_secs(1), |(_, timeout)| timeout),
            ),
            ("outbox_sweep_interval", self.outbox_sweep_interval),
            ("outbox_retention", self.outbox_retention),
        ];
        for (name, d) in checks {
            if d.is_zero() {
                return Err(Error::config(name, "0s", "a duration greater than zero"));
            }
        }
        let waits = [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("near_cache_lease", self.near_lease),
            ("lease_ttl", self.lease_ttl),
            (
                "invalidation_replicas",
                self.invalidation_replicas
                    .map_or(Duration::ZERO, |(_, t)| t),
            ),
        ];
        for (name, d) in waits {
            if d > Duration::from_secs(3600) {
                return Err(Error::config(name, &format!("{d:?}"), "at most one hour"));
            }
        }
        // A waiter sends its last poll one response timeout before its lease_ttl, so that
        // none outlives it: a lease_ttl shorter than that would never be waited on.
        let remote = !matches!(self.backend, Backend::Memory | Backend::Disabled);
        if self.leases && remote && self.lease_ttl <= self.response_timeout {
            return Err(Error::config(
                "lease_ttl",
                &format!("{:?}", self.lease_ttl),
                &format!(
                    "longer than response_timeout ({:?}) with leases on",
                    self.response_timeout
                ),
            ));
        }
        if self.outbox_sweep_interval > Duration::from_secs(300) {
            return Err(Error::config(
                "outbox_sweep_interval",
                &format!("{:?}", self.outbox_sweep_interval),
                "at most 5 minutes (sweeps also keep the namespace registered)",
            ));
        }
        if self.capacity == 0 {
            return Err(Error::config("capacity", "0", "at least 1 entry"));
        }
        if self.connections == 0 {
            return Err(Error::config("redis_connections", "0", "at least 1"));
        }
        if self.near_capacity == Some(0) {
            return Err(Error::config("near_cache", "0", "at least 1 entry"));
        }
        if self.near_capacity.is_some() && matches!(self.backend, Backend::RedisCluster(_)) {
            return Err(Error::config(
                "near_cache",
                "redis_cluster",
                "a single-node Redis (client-side caching is not supported on a cluster)",
            ));
        }
        Ok(())
    }

    /// Builds the cache. Fails on invalid settings or a malformed Redis URL, and with an
    /// [`outbox`](Self::outbox) when PostgreSQL cannot be reached or the outbox cannot be set
    /// up (its objects created, its listener connected); an unreachable Redis is not an error
    /// (calls fall back to the database until it is back).
    pub async fn build(self) -> Result<Cache, Error> {
        self.validate()?;
        let timeouts = self.timeouts();
        let root_cert = self.root_certificate.as_deref();
        let server_changes = Arc::new(AtomicU64::new(0));
        let guard = Some(self.guard(&server_changes));
        let (store, near) = match &self.backend {
            Backend::Disabled => (None, None),
            Backend::Memory => {
                let sequence = crate::keyspace::sequence_key(&self.namespace);
                let store = MemoryStore::new(self.capacity, sequence);
                (Some(Store::Memory(store)), None)
            }
            Backend::Redis(_) | Backend::RedisSentinel(..) => {
                let source = |resp3| match &self.backend {
                    Backend::RedisSentinel(urls, master) => {
                        Source::sentinel(urls, master, resp3, root_cert)
                    }
                    Backend::Redis(url) => Source::node(url, resp3, root_cert),
                    _ => unreachable!("a single-node backend"),
                };
                let conns = Connections::single(
                    &source(false)?,
                    self.connections,
                    timeouts,
                    guard.clone(),
                )?;
                let near = match self.near_capacity {
                    Some(capacity) => Some(NearCache::new(
                        source(true)?,
                        capacity,
                        timeouts.connect,
                        timeouts.response,
                        self.near_lease,
                        guard,
                    )),
                    None => None,
                };
                (Some(self.redis_store(conns)), near)
            }
            Backend::RedisCluster(urls) => {
                let conns = Connections::cluster(urls, root_cert, timeouts, guard)?;
                (Some(self.redis_store(conns)), None)
            }
        };
        #[cfg(feature = "postgres")]
        if let Some(pool) = self.outbox.clone() {
            let mut outbox = crate::outbox::Outbox::new(
                &pool,
                self.outbox_sweep_interval,
                self.outbox_retention,
            );
            outbox
                .create_schema()
                .await
                .map_err(|e| Error::outbox("creating the outbox table", e))?;
            let cache =
                Cache::with_outbox(store, near, self.settings(server_changes), Some(outbox));
            super::delivery::start(&cache).await?;
            return Ok(cache);
        }
        Ok(Cache::new(store, near, self.settings(server_changes)))
    }

    /// What every new connection to a single node or cluster master checks (restart and
    /// failover detection).
    fn guard(&self, server_changes: &Arc<AtomicU64>) -> Guard {
        Guard {
            server_key: crate::keyspace::server_key(&self.namespace),
            generation_key: crate::keyspace::generation_key(&self.namespace),
            clears: server_changes.clone(),
        }
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.connect_timeout,
            response: self.response_timeout,
            blocking: self
                .invalidation_replicas
                .map_or(Duration::ZERO, |(_, wait)| wait),
        }
    }

    /// A Redis store on `conns`: every operation by the response timeout, waiting for a
    /// connection included (connecting goes on in the background up to the connect timeout).
    fn redis_store(&self, conns: Connections) -> Store {
        Store::Redis(RedisStore::new(
            conns,
            self.response_timeout,
            self.invalidation_replicas,
            crate::keyspace::sequence_key(&self.namespace),
        ))
    }

    fn settings(self, server_changes: Arc<AtomicU64>) -> Settings {
        Settings {
            namespace: self.namespace,
            default_ttl: self.default_ttl,
            ttl_jitter: self.ttl_jitter,
            leases: self.leases,
            lease_ttl: self.lease_ttl,
            tag_ttl: self.tag_ttl,
            max_value_size: self.max_value_size,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
            server_changes,
        }
    }

    /// A Redis cache with a given near cache (one that never connects, in unit tests).
    #[cfg(test)]
    pub(crate) fn build_with_near(self, near: NearCache) -> Result<Cache, Error> {
        let Backend::Redis(url) = &self.backend else {
            unreachable!("tests pass a Redis URL")
        };
        let server_changes = Arc::new(AtomicU64::new(0));
        let guard = Some(self.guard(&server_changes));
        let conns =
            Connections::single(&Source::node(url, false, None)?, 1, self.timeouts(), guard)?;
        let store = self.redis_store(conns);
        Ok(Cache::new(
            Some(store),
            Some(near),
            self.settings(server_changes),
        ))
    }

    /// A builder configured from the process environment, as [`Cache::from_env`] reads it,
    /// to add what variables cannot say (an [`outbox`](Self::outbox) pool) before building.
    pub fn from_env() -> Result<CacheBuilder, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// A builder from environment variables: [`RedisConfig::from_lookup`]'s, plus
    /// `CACHE_NAMESPACE`, `CACHE_DEFAULT_TTL`, `CACHE_NEAR_CAPACITY`, `CACHE_LEASES` and
    /// `CACHE_ENABLED`.
    pub(crate) fn from_lookup<F>(lookup: F) -> Result<CacheBuilder, Error>
    where
        F: Fn(&str) -> Option<String>,
    {
        let redis = RedisConfig::from_lookup(&lookup)?;
        let get = |name: &str| non_empty(&lookup, name);
        let mut builder = CacheBuilder::default();
        if let Some(ns) = get("CACHE_NAMESPACE") {
            builder = builder.namespace(ns.trim());
        }
        if let Some(v) = get("CACHE_DEFAULT_TTL") {
            builder = builder.default_ttl(parse_secs("CACHE_DEFAULT_TTL", &v)?);
        }
        let enabled = match get("CACHE_ENABLED") {
            Some(v) => parse_bool("CACHE_ENABLED", &v)?,
            None => true,
        };
        if !enabled {
            return Ok(builder.disabled());
        }
        if let Some(v) = get("CACHE_LEASES") {
            builder = builder.leases(parse_bool("CACHE_LEASES", &v)?);
        }
        if redis.url.is_none() && redis.cluster_urls.is_empty() && redis.sentinel_urls.is_empty() {
            tracing::info!("REDIS_URL is not set: cached-query uses its in-process memory backend");
        }
        if let Some(v) = get("CACHE_NEAR_CAPACITY") {
            builder = builder.near_cache(parse_u64("CACHE_NEAR_CAPACITY", &v, 1)?);
        }
        Ok(builder.redis_config(redis))
    }
}
