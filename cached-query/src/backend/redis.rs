//! The Redis backend, single node or cluster: one `MGET` per read in the steady state, on a
//! lazily connected connection with connect/response timeouts, every call under a deadline.
//!
//! On a cluster, entry and tag keys live in different slots. `MGET` is split per slot by
//! redis-rs (one request per node involved, sent concurrently); creating missing stamps and
//! invalidating several tags use one small single-key pipeline per key, sent concurrently,
//! because a cross-slot pipeline would be rejected.

use super::{Read, StampKey, StoreError};
use crate::tags::new_token;
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
    Single(ConnectionManager),
    /// Connected on first use; a failed attempt is retried by the next call.
    /// (Boxed: the client is large and lives once per cache.)
    Cluster(Box<(ClusterClient, tokio::sync::OnceCell<ClusterConnection>)>),
}

pub(crate) struct RedisStore {
    target: Target,
    deadline: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub(crate) fn new(conn: ConnectionManager, deadline: Duration) -> Self {
        RedisStore {
            target: Target::Single(conn),
            deadline,
        }
    }

    pub(crate) fn cluster(client: ClusterClient, deadline: Duration) -> Self {
        RedisStore {
            target: Target::Cluster(Box::new((client, tokio::sync::OnceCell::new()))),
            deadline,
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(..))
    }

    async fn conn(&self) -> redis::RedisResult<Conn> {
        match &self.target {
            Target::Single(c) => Ok(Conn::Single(c.clone())),
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
        let work = async { op(self.conn().await?).await };
        match tokio::time::timeout(self.deadline, work).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.deadline)),
        }
    }

    pub(crate) async fn read(&self, entry: &str, stamps: &[StampKey]) -> Result<Read, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(entry);
        for s in stamps {
            mget.arg(&s.key);
        }
        let mut values: Vec<Option<Vec<u8>>> = self
            .run(|mut c| async move { mget.query_async(&mut c).await })
            .await?;
        if values.len() != stamps.len() + 1 {
            return Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "MGET returned an unexpected number of values",
            ))));
        }
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

    async fn create_stamps(
        &self,
        missing: &[&StampKey],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
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
                    let (token,): (Option<Vec<u8>>,) = pipe.query_async(&mut c).await?;
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

    pub(crate) async fn bump(&self, keys: &[StampKey]) -> Result<(), StoreError> {
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
    let invalid = |e: redis::RedisError| crate::Error::InvalidUrl {
        url: crate::redact_url(url),
        reason: e.to_string(),
    };
    let client = client(url, root_cert).map_err(invalid)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(response_timeout);
    ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)
}

#[cfg(feature = "tls")]
fn client(url: &str, root_cert: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    // rustls needs a process-wide crypto provider; keep one the application installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match root_cert {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(url),
    }
}

#[cfg(not(feature = "tls"))]
fn client(url: &str, _root_cert: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    if url.starts_with("rediss://") {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "rediss:// URLs need the `tls` feature of cached-query",
        )));
    }
    redis::Client::open(url)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
