//! The Redis backend, single node or cluster: one `MGET` per read in the steady state, on a
//! lazily connected connection with connect/response timeouts, every call under a deadline.
//!
//! On a cluster, entry and tag keys live in different slots. `MGET` is split per slot by
//! redis-rs (one request per node involved, sent concurrently); creating missing stamps and
//! invalidating several tags use one small single-key pipeline per key, sent concurrently,
//! because a cross-slot pipeline would be rejected.

use super::near::NearCache;
use super::{Read, StampKey, StoreError};
use crate::tags::new_token;
use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::future::Future;
use std::time::Duration;

/// A connection to one node or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Target {
    /// Requests are spread over these connections in turn: each multiplexed connection
    /// has one task that writes every request and parses every reply, so one connection
    /// caps throughput at what one core can parse.
    Single(Box<[ConnectionManager]>, std::sync::atomic::AtomicUsize),
    /// Connected on first use; a failed attempt is retried by the next call.
    /// (Boxed: the client is large and lives once per cache.)
    Cluster(Box<(ClusterClient, tokio::sync::OnceCell<ClusterConnection>)>),
}

pub(crate) struct RedisStore {
    target: Target,
    deadline: Duration,
    /// Boxed: large, and absent unless asked for.
    near: Option<Box<NearCache>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("deadline", &self.deadline)
            .field("near", &self.near)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub(crate) fn new(
        conns: Vec<ConnectionManager>,
        deadline: Duration,
        near: Option<NearCache>,
    ) -> Self {
        RedisStore {
            target: Target::Single(conns.into(), std::sync::atomic::AtomicUsize::new(0)),
            deadline,
            near: near.map(Box::new),
        }
    }

    pub(crate) fn cluster(client: ClusterClient, deadline: Duration) -> Self {
        RedisStore {
            target: Target::Cluster(Box::new((client, tokio::sync::OnceCell::new()))),
            deadline,
            near: None,
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(..))
    }

    async fn conn(&self) -> redis::RedisResult<Conn> {
        match &self.target {
            Target::Single(conns, next) => {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Conn::Single(conns[i % conns.len()].clone()))
            }
            Target::Cluster(cluster) => {
                let (client, cell) = &**cluster;
                let c = cell
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                Ok(Conn::Cluster(c.clone()))
            }
        }
    }

    /// Runs `op` (which gets a connection) under the deadline.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.deadline(async { op(self.conn().await?).await }).await
    }

    async fn deadline<T>(
        &self,
        work: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, work).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.deadline)),
        }
    }

    pub(crate) async fn read(
        &self,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
    ) -> Result<Read, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(entry);
        for s in stamps {
            mget.arg(&s.key);
        }
        let check = |values: Vec<Option<Bytes>>| {
            if values.len() == stamps.len() + 1 {
                Ok(values)
            } else {
                Err(StoreError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "MGET returned an unexpected number of values",
                ))))
            }
        };
        let mut values = match &self.near {
            None => check(
                self.run(|mut c| async move { mget.query_async(&mut c).await })
                    .await?,
            )?,
            Some(near) => {
                if let Some(read) = near.lookup(entry, stamps) {
                    return Ok(read);
                }
                let seq = near.seq();
                let values = check(
                    self.deadline(async { mget.query_async(&mut near.connection().await?).await })
                        .await?,
                )?;
                near.fill(seq, (entry, entry_ttl), stamps, &values);
                values
            }
        };
        let entry_bytes = values.remove(0);
        let missing: Vec<&StampKey> = stamps
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(s, _)| s)
            .collect();
        if !missing.is_empty() {
            // First use of a tag, or its key expired or was evicted: create it with a random
            // token unless a concurrent caller won the race, and use whichever token is there.
            let created = self.create_stamps(&missing).await?;
            let mut created = created.into_iter();
            for v in values.iter_mut().filter(|v| v.is_none()) {
                *v = created.next().flatten();
            }
        }
        Ok(Read {
            entry: entry_bytes,
            stamps: values.into_iter().map(Option::unwrap_or_default).collect(),
            near: None,
        })
    }

    fn create_pipe(pipe: &mut Pipeline, stamp: &StampKey) {
        let mut set = redis::cmd("SET");
        set.arg(&stamp.key).arg(new_token()).arg("NX");
        if let Some(ttl) = stamp.ttl {
            set.arg("EX").arg(ttl.as_secs().max(1));
        }
        pipe.add_command(set).ignore();
        pipe.cmd("GET").arg(&stamp.key);
    }

    async fn create_stamps(&self, missing: &[&StampKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            missing.iter().for_each(|s| Self::create_pipe(&mut pipe, s));
            return self
                .run(|mut c| async move { pipe.query_async(&mut c).await })
                .await;
        }
        self.run(|c| async move {
            try_join_all(missing.iter().map(|s| {
                let mut c = c.clone();
                let mut pipe = redis::pipe();
                Self::create_pipe(&mut pipe, s);
                async move {
                    let (token,): (Option<Bytes>,) = pipe.query_async(&mut c).await?;
                    Ok::<_, redis::RedisError>(token)
                }
            }))
            .await
        })
        .await
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await
    }

    pub(crate) async fn write(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(bytes).arg("PX").arg(millis(ttl));
        self.run(|mut c| async move { set.query_async::<()>(&mut c).await })
            .await
    }

    fn bump_cmd(k: &StampKey) -> Cmd {
        let mut set = redis::cmd("SET");
        set.arg(&k.key).arg(new_token());
        if let Some(ttl) = k.ttl {
            set.arg("EX").arg(ttl.as_secs().max(1));
        }
        set
    }

    /// Replaces the tokens of `keys`, then the near cache drops them (read-your-own-
    /// invalidation, without waiting for the push message). It drops them on failure too: a
    /// timed-out bump may still have landed, and a failed one stays pending in `Cache`.
    pub(crate) async fn bump(&self, keys: &[StampKey]) -> Result<(), StoreError> {
        let result = self.send_bump(keys).await;
        if let Some(near) = &self.near {
            near.forget(keys);
        }
        result
    }

    /// The near cache's entry count and counters, when there is one.
    pub(crate) fn near(&self) -> Option<&NearCache> {
        self.near.as_deref()
    }

    async fn send_bump(&self, keys: &[StampKey]) -> Result<(), StoreError> {
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.add_command(Self::bump_cmd(k)).ignore();
            }
            return self
                .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await;
        }
        self.run(|c| async move {
            try_join_all(keys.iter().map(|k| {
                let mut c = c.clone();
                let set = Self::bump_cmd(k);
                async move { set.query_async::<()>(&mut c).await }
            }))
            .await
            .map(drop)
        })
        .await
    }
}

/// A lazily connecting single-node connection with the given timeouts, trusting `root_cert`
/// (PEM) for `rediss://` when given. Shared by the cache and the session store.
pub(crate) fn connection_manager(
    url: &str,
    root_cert: Option<&[u8]>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<ConnectionManager, crate::Error> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(response_timeout);
    ConnectionManager::new_lazy_with_config(client(url, false, root_cert)?, config)
        .map_err(|e| invalid_url(url, &e))
}

/// A near cache over its own RESP3 tracking connection to `url` (connected on first use).
pub(crate) fn near_cache(
    url: &str,
    root_cert: Option<&[u8]>,
    capacity: u64,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<NearCache, crate::Error> {
    Ok(NearCache::new(
        client(url, true, root_cert)?,
        capacity,
        connect_timeout,
        response_timeout,
    ))
}

/// A client for `url`, speaking RESP3 when `resp3` (client-side caching needs it).
fn client(url: &str, resp3: bool, root_cert: Option<&[u8]>) -> Result<redis::Client, crate::Error> {
    let invalid = |e: redis::RedisError| invalid_url(url, &e);
    #[cfg(not(feature = "tls"))]
    if url.starts_with("rediss://") {
        return Err(invalid(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "rediss:// URLs need the `tls` feature of cached-query",
        ))));
    }
    let mut info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
    if resp3 {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        info = info.set_redis_settings(settings);
    }
    open(info, root_cert).map_err(invalid)
}

fn invalid_url(url: &str, e: &redis::RedisError) -> crate::Error {
    crate::Error::InvalidUrl {
        url: crate::redact_url(url),
        reason: e.to_string(),
    }
}

/// Opens a client, trusting `root_cert` (PEM) for `rediss://` when given.
#[cfg(feature = "tls")]
fn open(
    info: redis::ConnectionInfo,
    root_cert: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    // rustls needs a process-wide crypto provider; keep one the application installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match root_cert {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(info),
    }
}

#[cfg(not(feature = "tls"))]
fn open(
    info: redis::ConnectionInfo,
    _root_cert: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    redis::Client::open(info)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::near::tests::{fill, key, offline};

    /// Read-your-own-invalidation must not depend on Redis's push message (which usually
    /// arrives first on loopback): this near cache has no tracking connection at all.
    #[tokio::test]
    async fn an_accepted_bump_drops_the_stamps_from_the_near_cache() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let conn =
            connection_manager(&url, None, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let store = RedisStore::new(vec![conn], Duration::from_secs(2), Some(offline()));
        let tag = key(&format!("cq-unit-{}:t:bump", std::process::id()));
        let near = store.near().unwrap();
        fill(near, near.seq(), "e", &tag);
        assert!(near.lookup("e", std::slice::from_ref(&tag)).is_some());
        store.bump(std::slice::from_ref(&tag)).await.unwrap();
        assert!(near.lookup("e", std::slice::from_ref(&tag)).is_none());
        let _: () = redis::cmd("DEL")
            .arg(&tag.key)
            .query_async(&mut store.conn().await.unwrap())
            .await
            .unwrap();
    }
}
