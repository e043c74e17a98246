//! Connections to Redis: a few [`Link`]s to one node (each connected in the background,
//! checked with the namespace's [`Guard`] when the cache gives one, replaced after errors),
//! or a cluster; with connect/response timeouts and, for `rediss://`, a chosen CA. Shared by
//! the cache's store and the session store.

use super::cluster::{Cluster, ClusterConn};
use super::identity::{self, Guard};
use super::link::{Connect, Link, LinkConn};
use crate::Error;
use futures_util::FutureExt;
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// How long a connection may take to connect, and each request to be answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) response: Duration,
    /// Added to `response` on the connection kept for requests that block (`WAIT`).
    pub(crate) blocking: Duration,
}

/// One connection to a node or to a cluster, for one operation.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(LinkConn),
    Cluster(ClusterConn),
}

impl Conn {
    /// Gives up on this connection (it timed out): the next operation makes a new one. On a
    /// cluster: on the node connections it still waits for.
    pub(crate) fn discard(&self) {
        match self {
            Conn::Single(c) => c.discard(),
            Conn::Cluster(c) => c.discard(),
        }
    }

    /// Whether what the operation read can be trusted as one view (always on a single
    /// node; see [`ClusterConn::consistent`]).
    pub(crate) fn consistent(&self) -> bool {
        match self {
            Conn::Single(_) => true,
            Conn::Cluster(c) => c.consistent(),
        }
    }
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

/// The connections of one store.
pub(crate) enum Connections {
    /// Requests are spread over these connections in turn: each multiplexed connection
    /// has one task that writes every request and parses every reply, so one connection
    /// caps throughput at what one core can parse. The last one is kept for requests that
    /// block their connection (`WAIT`), so reads never queue behind them.
    Single(Box<[Link]>, AtomicUsize),
    /// Discovered on first use, in the background (a caller waits only within its own
    /// deadline); each master's connections checked like a single node's.
    Cluster(Cluster),
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connections::Single(conns, _) => write!(f, "Single({} connections)", conns.len() - 1),
            Connections::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

impl Connections {
    /// `count` lazily connected connections to the node `source` names, each checked with
    /// `guard` before use when given.
    pub(crate) fn single(
        source: &Source,
        count: usize,
        timeouts: Timeouts,
        guard: Option<Guard>,
    ) -> Result<Self, Error> {
        let count = count.max(1);
        let links = (0..=count)
            .map(|i| {
                // The last one waits longer for its replies: they may be `WAIT`s.
                let timeouts = match i == count {
                    true => timeouts.for_blocking(),
                    false => timeouts,
                };
                Link::new(
                    checked_connect(source.clone(), timeouts, guard.clone()),
                    timeouts.connect,
                    guard
                        .as_ref()
                        .map(|g| identity::still_master(g.server_key.clone())),
                    None,
                )
            })
            .collect();
        Ok(Connections::Single(links, AtomicUsize::new(0)))
    }

    /// A cluster discovered from `urls` (any of its nodes), connected on first use, each
    /// node connection checked with `guard` before use when given.
    pub(crate) fn cluster(
        urls: &[String],
        root_cert: Option<&[u8]>,
        timeouts: Timeouts,
        guard: Option<Guard>,
    ) -> Result<Self, Error> {
        if urls.is_empty() {
            return Err(Error::InvalidUrl {
                url: String::new(),
                source: "a cluster needs at least one node URL".into(),
            });
        }
        let seeds = urls
            .iter()
            .map(|u| client(u, false, root_cert))
            .collect::<Result<_, _>>()?;
        Ok(Connections::Cluster(Cluster::new(
            seeds, root_cert, timeouts, guard,
        )))
    }

    /// The connections described by `config`: its cluster if it names one, else its node.
    #[cfg(feature = "sessions")]
    pub(crate) fn from_config(
        config: &crate::RedisConfig,
        what_needs_it: &str,
    ) -> Result<Self, Error> {
        let root_cert = config.root_certificate.as_deref();
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            response: config.response_timeout,
            blocking: Duration::ZERO,
        };
        if !config.cluster_urls.is_empty() {
            return Self::cluster(&config.cluster_urls, root_cert, timeouts, None);
        }
        if let Some(master) = &config.sentinel_master {
            let source = Source::sentinel(&config.sentinel_urls, master, false, root_cert)?;
            return Self::single(&source, 1, timeouts, None);
        }
        let url = config.url.as_deref().ok_or_else(|| {
            Error::config(
                "REDIS_URL",
                "",
                &format!("a Redis URL: {what_needs_it} needs Redis (neither REDIS_URL nor REDIS_CLUSTER_URLS is set)"),
            )
        })?;
        Self::single(&Source::node(url, false, root_cert)?, 1, timeouts, None)
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connections::Cluster(..))
    }

    /// A connection for one operation, and whether it was made for it (see [`Link::get`]);
    /// `blocking`: for a request that blocks its connection.
    pub(crate) async fn get(&self, blocking: bool) -> redis::RedisResult<(Conn, bool)> {
        match self {
            Connections::Single(links, next) => {
                let (shared, reserved) = links.split_at(links.len() - 1);
                let link = if blocking {
                    &reserved[0]
                } else {
                    &shared[next.fetch_add(1, Relaxed) % shared.len()]
                };
                let (conn, fresh) = link.get().await?;
                Ok((Conn::Single(conn), fresh))
            }
            Connections::Cluster(cluster) => Ok((Conn::Cluster(cluster.conn(blocking)), false)),
        }
    }
}

/// Connects to the node `source` names and, with a guard, checks its identity before the
/// connection is used (see [`identity`]).
pub(crate) fn checked_connect(source: Source, timeouts: Timeouts, guard: Option<Guard>) -> Connect {
    let config = timeouts.config();
    Box::new(move |_id| {
        let (source, config, guard) = (source.clone(), config.clone(), guard.clone());
        async move {
            let mut conn = source.connect(timeouts, &config).await?;
            if let Some(guard) = &guard {
                identity::check(&mut conn, guard).await?;
            }
            Ok(conn)
        }
        .boxed()
    })
}

impl Timeouts {
    /// These timeouts for the connection kept for blocking requests.
    pub(crate) fn for_blocking(self) -> Timeouts {
        Timeouts {
            response: self.response + self.blocking,
            ..self
        }
    }

    /// A connection configuration with these timeouts.
    pub(crate) fn config(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect))
            .set_response_timeout(Some(self.response))
    }
}

/// Where a single-node connection goes: a fixed node, or the master that Redis Sentinel
/// names, asked again for every new connection so a failover is followed. (A Sentinel that
/// still names the old master, now a replica, is caught by the identity check.)
#[derive(Clone)]
pub(crate) enum Source {
    Node(Arc<redis::Client>),
    Sentinel(Arc<SentinelSource>),
}

pub(crate) struct SentinelSource {
    sentinels: Vec<redis::Client>,
    master: String,
    root_cert: Option<Vec<u8>>,
}

impl Source {
    /// The node at `url` (RESP3 when `resp3`: client-side caching needs it).
    pub(crate) fn node(url: &str, resp3: bool, root_cert: Option<&[u8]>) -> Result<Self, Error> {
        Ok(Source::Node(Arc::new(client(url, resp3, root_cert)?)))
    }

    /// The master named `master` by the Sentinels at `urls` (spoken to in RESP3 when
    /// `resp3`). The master is reached with the scheme, credentials, database and protocol
    /// of the Sentinel URL that named it.
    pub(crate) fn sentinel(
        urls: &[String],
        master: &str,
        resp3: bool,
        root_cert: Option<&[u8]>,
    ) -> Result<Self, Error> {
        if urls.is_empty() || master.is_empty() {
            return Err(Error::config(
                "redis_sentinel",
                &format!("{} URLs, master {master:?}", urls.len()),
                "at least one Sentinel URL and a master name",
            ));
        }
        let sentinels = urls
            .iter()
            .map(|u| client(u, resp3, root_cert))
            .collect::<Result<_, _>>()?;
        Ok(Source::Sentinel(Arc::new(SentinelSource {
            sentinels,
            master: master.to_owned(),
            root_cert: root_cert.map(<[u8]>::to_vec),
        })))
    }

    /// A new connection to the node to connect to now, with `config`.
    pub(crate) async fn connect(
        &self,
        timeouts: Timeouts,
        config: &redis::AsyncConnectionConfig,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        self.resolve(timeouts)
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }

    /// A client for the node to connect to now. For Sentinel: every Sentinel is asked at
    /// once, and the address a majority of them name is taken as soon as they agree (a
    /// Sentinel cut off from the others, or just restarted, may still name an old master);
    /// no majority is an error, and the next connection asks again.
    pub(crate) async fn resolve(&self, timeouts: Timeouts) -> redis::RedisResult<redis::Client> {
        let s = match self {
            Source::Node(client) => return Ok((**client).clone()),
            Source::Sentinel(s) => s,
        };
        let majority = s.sentinels.len() / 2 + 1;
        let mut asking: futures_util::stream::FuturesUnordered<_> = s
            .sentinels
            .iter()
            .enumerate()
            .map(|(i, sentinel)| async move {
                let asked = async {
                    let mut conn = sentinel
                        .get_multiplexed_async_connection_with_config(&timeouts.config())
                        .await?;
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(&s.master)
                        .query_async::<Option<(String, u16)>>(&mut conn)
                        .await
                };
                (i, asked.await)
            })
            .collect();
        let mut named: Vec<((String, u16), usize)> = Vec::new();
        let mut last = None;
        while let Some((i, answer)) = futures_util::StreamExt::next(&mut asking).await {
            match answer {
                Ok(Some(addr)) => {
                    let votes = match named.iter_mut().find(|(a, _)| *a == addr) {
                        Some((_, votes)) => {
                            *votes += 1;
                            *votes
                        }
                        None => {
                            named.push((addr.clone(), 1));
                            1
                        }
                    };
                    if votes >= majority {
                        let (host, port) = addr;
                        return s.master_client(&s.sentinels[i], host, port);
                    }
                }
                Ok(None) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "Sentinel does not know the master",
                        s.master.clone(),
                    )));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match (last, named.is_empty()) {
            (Some(e), true) => e,
            _ => redis::RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "no majority of the Sentinels names the same master",
                format!("{} of {} needed: {named:?}", majority, s.sentinels.len()),
            )),
        })
    }
}

impl SentinelSource {
    fn master_client(
        &self,
        sentinel: &redis::Client,
        host: String,
        port: u16,
    ) -> redis::RedisResult<redis::Client> {
        node_client(
            sentinel.get_connection_info(),
            host,
            port,
            self.root_cert.as_deref(),
        )
    }
}

/// A client for the node at `host:port` with the scheme (TLS or not), credentials,
/// database and protocol of `like` (a Sentinel's or a cluster seed's).
pub(crate) fn node_client(
    like: &redis::ConnectionInfo,
    host: String,
    port: u16,
    root_cert: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    let addr = match like.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => redis::ConnectionAddr::Tcp(host, port),
    };
    open(like.clone().set_addr(addr), root_cert)
}

/// A client for `url`, speaking RESP3 when `resp3` (client-side caching needs it).
pub(crate) fn client(
    url: &str,
    resp3: bool,
    root_cert: Option<&[u8]>,
) -> Result<redis::Client, Error> {
    let invalid = |e: redis::RedisError| Error::invalid_url(url, e);
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
