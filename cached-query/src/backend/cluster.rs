//! Redis Cluster, routed by the crate itself: the slot map from `CLUSTER SLOTS`, two
//! [`Link`]s per master (one for requests that block), `MOVED` and `ASK` followed.
//!
//! Each node connection is checked like a single node's before any request uses it
//! ([`identity`]): a master restarted from disk, or a replica promoted after missing the
//! last writes, replaces the namespace generation first. The cluster client of redis-rs
//! reconnects to a restarted node by itself, with no hook to check it, hence this module.
//!
//! - A node's server key is [`node_server_key`] in a slot the node serves, so a node's own
//!   data says which server it was last made safe on; the generation it replaces may live on
//!   another node, and is replaced before the node's key is recorded.
//! - A read spans nodes (its `MGET` is split per slot), so it is not atomic: it could take
//!   the generation from one node before another node's restart was dealt with and that
//!   node's tags after. A request during which any node connection was made is therefore not
//!   trusted: see [`ClusterConn::consistent`].

use super::connect::{Timeouts, node_client};
use super::identity::{self, Guard};
use super::link::{Connect, Link, LinkConn, Recheck, breaks_connection};
use crate::keyspace::{new_token, node_server_key};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, try_join_all};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// No node serves the slot.
const UNSERVED: u16 = u16::MAX;

/// How many redirections (`MOVED`, `ASK`) one request follows.
const REDIRECTS: usize = 5;

/// The least time between two slot map refreshes that errors ask for.
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{` and
/// the next `}`, when not empty), else of the whole key.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let len = rest.iter().position(|&b| b == b'}')?;
    (len > 0).then(|| &rest[..len])
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A node's address as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Addr {
    host: String,
    port: u16,
}

impl Addr {
    /// `host:port` (the host may itself hold colons: IPv6).
    fn parse(text: &str) -> Option<Addr> {
        let (host, port) = text.rsplit_once(':')?;
        Some(Addr {
            host: host.trim_matches(['[', ']']).to_owned(),
            port: port.parse().ok()?,
        })
    }
}

/// Which master serves each slot.
#[derive(Debug, Clone)]
struct SlotMap {
    owner: Vec<u16>,
    nodes: Vec<Addr>,
}

impl SlotMap {
    fn node(&self, slot: u16) -> Option<&Addr> {
        let at = *self.owner.get(usize::from(slot))?;
        self.nodes.get(usize::from(at))
    }

    fn served(&self) -> usize {
        self.owner.iter().filter(|&&o| o != UNSERVED).count()
    }

    /// The map after a `MOVED`: `slot` is served by `addr`.
    fn moved(&self, slot: u16, addr: &Addr) -> SlotMap {
        let mut map = self.clone();
        if let (Ok(at), Some(_)) = (map.index_of(addr), map.owner.get(usize::from(slot))) {
            map.owner[usize::from(slot)] = at;
        }
        map
    }

    /// The index of `addr` in `nodes`, added if new.
    fn index_of(&mut self, addr: &Addr) -> RedisResult<u16> {
        let at = match self.nodes.iter().position(|n| n == addr) {
            Some(at) => at,
            None => {
                self.nodes.push(addr.clone());
                self.nodes.len() - 1
            }
        };
        u16::try_from(at).map_err(|_| RedisError::from((ErrorKind::Parse, "too many nodes")))
    }

    /// Parses a `CLUSTER SLOTS` reply from the node at `asked` (an empty host means that
    /// node's own).
    fn parse(reply: &Value, asked: &str) -> RedisResult<SlotMap> {
        let bad = || RedisError::from((ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
        let Value::Array(ranges) = reply else {
            return Err(bad());
        };
        let mut map = SlotMap {
            owner: vec![UNSERVED; usize::from(SLOTS)],
            nodes: Vec::new(),
        };
        for range in ranges {
            let Value::Array(fields) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(bad());
            };
            let host = match host.as_str() {
                "" => asked.to_owned(),
                // Unknown endpoint: nothing to connect to.
                "?" => continue,
                _ => host,
            };
            let addr = Addr {
                host,
                port: u16::try_from(*port).map_err(|_| bad())?,
            };
            let at = map.index_of(&addr)?;
            let (start, end) = (usize::try_from(*start), usize::try_from(*end));
            let (Ok(start), Ok(end)) = (start, end) else {
                return Err(bad());
            };
            for slot in map.owner.iter_mut().take(end + 1).skip(start) {
                *slot = at;
            }
        }
        Ok(map)
    }
}

type Refreshing = Shared<BoxFuture<'static, RedisResult<()>>>;

struct Inner {
    /// The URLs given, to discover the cluster from.
    seeds: Vec<redis::Client>,
    root_cert: Option<Vec<u8>>,
    timeouts: Timeouts,
    guard: Option<Guard>,
    map: RwLock<Option<Arc<SlotMap>>>,
    /// Per master: the link for ordinary requests and the one for requests that block.
    links: Mutex<HashMap<Addr, [Link; 2]>>,
    /// The refresh in flight, and when the last one ended.
    refresh: Mutex<(Option<Refreshing>, Option<Instant>)>,
    /// Node connections made so far (see [`ClusterConn::consistent`]).
    connections: AtomicU64,
    /// Servers (address, `run_id`) this process replaced the generation for whose record
    /// is not written yet.
    unrecorded: Mutex<HashSet<(Addr, String)>>,
}

/// A Redis Cluster: discovered from its seed URLs on first use, its node connections
/// checked with `guard` when given. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Cluster(Arc<Inner>);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cluster")
    }
}

impl Cluster {
    /// A cluster reached through any of `seeds`.
    pub(crate) fn new(
        seeds: Vec<redis::Client>,
        root_cert: Option<&[u8]>,
        timeouts: Timeouts,
        guard: Option<Guard>,
    ) -> Self {
        Cluster(Arc::new(Inner {
            seeds,
            root_cert: root_cert.map(<[u8]>::to_vec),
            timeouts,
            guard,
            map: RwLock::new(None),
            links: Mutex::new(HashMap::new()),
            refresh: Mutex::new((None, None)),
            connections: AtomicU64::new(0),
            unrecorded: Mutex::new(HashSet::new()),
        }))
    }

    /// A connection that routes each request to the node serving its key; `blocking`: for
    /// requests that block their connection.
    pub(crate) fn conn(&self, blocking: bool) -> ClusterConn {
        ClusterConn {
            cluster: self.clone(),
            blocking,
            seen: self.0.connections.load(SeqCst),
            in_flight: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn map(&self) -> Option<Arc<SlotMap>> {
        self.0.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the slot map with `map`, and forgets the links of nodes it no longer names.
    fn set_map(&self, map: SlotMap) {
        self.0
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|addr, _| map.nodes.contains(addr));
        *self.0.map.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(map));
    }

    /// Changes the current slot map (under its lock, so a newer map is not overwritten).
    fn update_map(&self, change: impl FnOnce(&SlotMap) -> SlotMap) {
        let mut map = self.0.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = map.as_ref() {
            *map = Some(Arc::new(change(current)));
        }
    }

    /// The slot map, discovered now if there is none yet.
    async fn current_map(&self) -> RedisResult<Arc<SlotMap>> {
        if let Some(map) = self.map() {
            return Ok(map);
        }
        self.refresh().await?;
        self.map().ok_or_else(|| unserved("no slot map"))
    }

    /// The refresh of the slot map in flight, or a new one. It runs in its own task, so it
    /// lands even when every caller waiting for it gave up.
    fn refresh(&self) -> Refreshing {
        let mut state = self.0.refresh.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = &state.0 {
            return running.clone();
        }
        let cluster = self.clone();
        let task = tokio::spawn(async move {
            // Ends the refresh even when the task is dropped unfinished (its runtime shut
            // down): the next error starts a new one.
            let _ended = RefreshEnded(&cluster);
            let found = cluster.discover().await;
            if let Ok(map) = &found {
                cluster.set_map(map.clone());
            }
            found.map(|_| ())
        });
        let running = async move {
            task.await.unwrap_or_else(|e| {
                Err(RedisError::from(std::io::Error::other(format!(
                    "the Redis Cluster discovery task ended: {e}"
                ))))
            })
        }
        .boxed()
        .shared();
        state.0 = Some(running.clone());
        running
    }

    /// Refreshes the slot map in the background, unless one was just made.
    fn refresh_soon(&self) {
        let recent = {
            let state = self.0.refresh.lock().unwrap_or_else(|e| e.into_inner());
            state.0.is_some() || state.1.is_some_and(|at| at.elapsed() < REFRESH_GAP)
        };
        if !recent {
            drop(self.refresh());
        }
    }

    /// Asks the known masters and the seeds at once for the slot map; takes the first that
    /// covers every slot, else the one covering most.
    async fn discover(&self) -> RedisResult<SlotMap> {
        let mut clients: Vec<(String, redis::Client)> = Vec::new();
        if let Some(map) = self.map() {
            for addr in &map.nodes {
                if let Ok(client) = self.client(addr) {
                    clients.push((addr.host.clone(), client));
                }
            }
        }
        for seed in &self.0.seeds {
            let host = match seed.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(host, _)
                | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
                _ => String::new(),
            };
            clients.push((host, seed.clone()));
        }
        let config = self.0.timeouts.config();
        let mut asking: futures_util::stream::FuturesUnordered<_> = clients
            .into_iter()
            .map(|(host, client)| {
                let config = config.clone();
                async move {
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    let reply: Value = redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async(&mut conn)
                        .await?;
                    SlotMap::parse(&reply, &host)
                }
            })
            .collect();
        let (mut best, mut last): (Option<SlotMap>, Option<RedisError>) = (None, None);
        while let Some(answer) = futures_util::StreamExt::next(&mut asking).await {
            match answer {
                Ok(map) if map.served() == usize::from(SLOTS) => return Ok(map),
                Ok(map) => {
                    if best.as_ref().is_none_or(|b| b.served() < map.served()) {
                        best = Some(map);
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        best.ok_or_else(|| last.unwrap_or_else(|| unserved("no node answered")))
    }

    /// A client for the node at `addr`, with the seeds' scheme, credentials and protocol.
    fn client(&self, addr: &Addr) -> RedisResult<redis::Client> {
        let seed = self.0.seeds.first().ok_or_else(|| unserved("no seed"))?;
        node_client(
            seed.get_connection_info(),
            addr.host.clone(),
            addr.port,
            self.0.root_cert.as_deref(),
        )
    }

    fn link(&self, addr: &Addr, blocking: bool) -> Link {
        let mut links = self.0.links.lock().unwrap_or_else(|e| e.into_inner());
        let pair = links
            .entry(addr.clone())
            .or_insert_with(|| [self.new_link(addr, false), self.new_link(addr, true)]);
        pair[usize::from(blocking)].clone()
    }

    /// A link to the master at `addr`, each of its connections checked before use. (It
    /// holds the cluster weakly: the cluster holds it.)
    fn new_link(&self, addr: &Addr, blocking: bool) -> Link {
        let timeouts = match blocking {
            true => self.0.timeouts.for_blocking(),
            false => self.0.timeouts,
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.0);
        let addr_of_link = addr.clone();
        let addr = addr.clone();
        let config = timeouts.config();
        let connect: Connect = Box::new(move |_id| {
            let (weak, addr, config) = (weak.clone(), addr.clone(), config.clone());
            async move {
                let cluster = Cluster(weak.upgrade().ok_or_else(|| {
                    RedisError::from(std::io::Error::other("the cache was dropped"))
                })?);
                let mut conn = cluster
                    .client(&addr)?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                if let Some(guard) = &cluster.0.guard {
                    cluster.check(&addr, &mut conn, guard).await?;
                }
                cluster.0.connections.fetch_add(1, SeqCst);
                Ok(conn)
            }
            .boxed()
        });
        let recheck = self.0.guard.as_ref().map(|guard| {
            let (weak, addr, server_key) = (
                Arc::downgrade(&self.0),
                addr_of_link.clone(),
                guard.server_key.clone(),
            );
            let recheck: Recheck = Box::new(move |conn| {
                let (weak, addr, server_key) = (weak.clone(), addr.clone(), server_key.clone());
                async move {
                    let key = weak.upgrade().and_then(|inner| {
                        let map = Cluster(inner).map()?;
                        server_key_on(&server_key, &map, &addr)
                    });
                    // No key: the node left the map; `ROLE` still tells a demoted one.
                    identity::still_current(conn, key).await
                }
                .boxed()
            });
            recheck
        });
        Link::new(connect, timeouts.connect, recheck, None)
    }

    /// The identity check of a new connection to the master at `addr` (see the module docs
    /// and [`identity`]). Without `WATCH` across nodes, processes checking at once may each
    /// replace the generation: more misses, never a stale read. A node with no server key
    /// to check (absent from the slot map even after a refresh, or its key's slot moving)
    /// is treated as unknown: the generation is replaced for every such connection.
    async fn check(
        &self,
        addr: &Addr,
        conn: &mut MultiplexedConnection,
        guard: &Guard,
    ) -> RedisResult<()> {
        let mut key = server_key_on(&guard.server_key, &*self.current_map().await?, addr);
        if key.is_none() {
            self.refresh().await?;
            key = server_key_on(&guard.server_key, &*self.current_map().await?, addr);
        }
        let probed: Option<(Option<String>, Option<Vec<u8>>)> = match &key {
            Some(key) => match identity::probe(conn, key).await {
                Err(e) if identity::redirected(&e) => {
                    self.refresh_soon();
                    None
                }
                probed => Some(probed?),
            },
            None => None,
        };
        let recordable = probed.is_some();
        let identity = match probed {
            Some((identity, held)) if identity::current(&identity, held.as_deref()) => {
                return Ok(());
            }
            Some((identity, _)) => identity,
            None => None,
        };
        // The namespace is made safe before this server is recorded: a check cut off in
        // between leaves the old record, and the next one replaces the generation again,
        // unless this process already did for this server and only its record failed
        // (nothing was read from it since: its connections are published after the record).
        let shown = key.as_deref().unwrap_or("(none)");
        let server = identity.clone().map(|id| (addr.clone(), id));
        let done = server
            .as_ref()
            .is_some_and(|s| self.lock_unrecorded().contains(s));
        if !done {
            self.replace_generation(guard).await?;
            identity::cleared(guard, shown, identity.as_deref());
            if let Some(server) = server.clone() {
                self.lock_unrecorded().insert(server);
            }
        }
        if let Some(key) = key.as_ref().filter(|_| recordable) {
            let mut record = redis::cmd(if identity.is_some() { "SET" } else { "DEL" });
            record.arg(key);
            if let Some(id) = &identity {
                record.arg(id);
            }
            record.query_async::<()>(conn).await?;
        }
        if let Some(server) = &server {
            self.lock_unrecorded().remove(server);
        }
        Ok(())
    }

    fn lock_unrecorded(&self) -> std::sync::MutexGuard<'_, HashSet<(Addr, String)>> {
        self.0.unrecorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a fresh generation token, over a connection of its own to the node serving
    /// it (following redirections): not through the links, whose connections may be
    /// waiting for this very check. Any token is safe to write to any server.
    async fn replace_generation(&self, guard: &Guard) -> RedisResult<()> {
        let mut set = redis::cmd("SET");
        set.arg(&guard.generation_key).arg(new_token());
        let slot = key_slot(guard.generation_key.as_bytes());
        let config = self.0.timeouts.config();
        let reply = self
            .follow(Some(slot), |addr, asking| {
                let (set, config) = (&set, &config);
                async move {
                    let client = self.client(&addr)?;
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(config)
                        .await?;
                    Request::Cmd(set).send_on(&mut conn, asking).await
                }
            })
            .await?;
        reply
            .into_iter()
            .next()
            .map_or(Ok(()), |v| v.extract_error().map(drop))
    }

    /// The master serving `slot`; for keyless requests, the one holding the namespace
    /// generation (a node the namespace needs anyway), else any.
    async fn node_for(&self, slot: Option<u16>) -> RedisResult<Addr> {
        let map = self.current_map().await?;
        let slot = slot.or_else(|| {
            let guard = self.0.guard.as_ref()?;
            Some(key_slot(guard.generation_key.as_bytes()))
        });
        let found = match slot {
            Some(slot) => map.node(slot),
            None => map.nodes.first(),
        };
        if let Some(addr) = found {
            return Ok(addr.clone());
        }
        self.refresh_soon();
        Err(unserved("no master serves the slot"))
    }

    /// Sends `req` to the master serving `slot` over `conn`'s links, following redirections.
    async fn send(
        &self,
        conn: &ClusterConn,
        slot: Option<u16>,
        req: Request<'_>,
    ) -> RedisResult<Vec<Value>> {
        self.follow(slot, |addr, asking| async move {
            let link = self.link(&addr, conn.blocking);
            let mut node = link.get().await.inspect_err(|_| self.refresh_soon())?.0;
            let sent = conn.track(node.clone(), req.send_on(&mut node, asking));
            sent.await.inspect_err(|e| {
                if breaks_connection(e) {
                    self.refresh_soon();
                }
            })
        })
        .await
    }

    /// Runs `send_to(node, asking)` on the master serving `slot`, then on the nodes that
    /// `MOVED` and `ASK` replies name (a `MOVED` also updates the slot map).
    async fn follow<F, Fut>(&self, slot: Option<u16>, mut send_to: F) -> RedisResult<Vec<Value>>
    where
        F: FnMut(Addr, bool) -> Fut,
        Fut: Future<Output = RedisResult<Vec<Value>>>,
    {
        let (mut addr, mut asking) = (self.node_for(slot).await?, false);
        for _ in 0..REDIRECTS {
            let reply = send_to(addr.clone(), asking).await?;
            match redirection(&reply, &addr) {
                Some((ServerErrorKind::Moved, to, slot)) => {
                    self.update_map(|map| map.moved(slot, &to));
                    self.refresh_soon();
                    (addr, asking) = (to, false);
                }
                Some((_, to, _)) => (addr, asking) = (to, true),
                None => {
                    if needs_refresh(&reply) {
                        self.refresh_soon();
                    }
                    return Ok(reply);
                }
            }
        }
        Err(RedisError::from((
            ErrorKind::Server(ServerErrorKind::TryAgain),
            "too many Redis Cluster redirections",
        )))
    }
}

/// Marks the refresh in flight as ended when dropped.
struct RefreshEnded<'a>(&'a Cluster);

impl Drop for RefreshEnded<'_> {
    fn drop(&mut self) {
        let mut state = self.0.0.refresh.lock().unwrap_or_else(|e| e.into_inner());
        *state = (None, Some(Instant::now()));
    }
}

/// The server key of the master at `addr`: the first candidate in a slot it serves; none
/// when the namespace's keys all hash to one slot (a hash tag in the namespace) that
/// another node serves.
fn server_key_on(server_key: &str, map: &SlotMap, addr: &Addr) -> Option<String> {
    // A hash tag inside the server key itself: every candidate is in the same slot.
    let tagged = hash_tag(server_key.as_bytes()).is_some();
    // A node serving a single slot is found within this many with odds of 1 - e^-4; past
    // it, the caller treats the node as unknown (safe, see `Cluster::check`).
    let candidates = if tagged { 1 } else { 4 * u32::from(SLOTS) };
    (0..candidates)
        .map(|n| node_server_key(server_key, n))
        .find(|key| map.node(key_slot(key.as_bytes())) == Some(addr))
}

fn unserved(what: &str) -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ClusterDown),
        "the Redis Cluster cannot serve the request",
        what.to_owned(),
    ))
}

/// A `MOVED` or `ASK` among the replies from `from`: its kind, target and slot (an empty
/// host is `from`'s).
fn redirection(reply: &[Value], from: &Addr) -> Option<(ServerErrorKind, Addr, u16)> {
    reply.iter().find_map(|v| {
        let Value::ServerError(e) = v else {
            return None;
        };
        let kind = e.kind()?;
        if !matches!(kind, ServerErrorKind::Moved | ServerErrorKind::Ask) {
            return None;
        }
        let mut parts = e.details()?.split_ascii_whitespace();
        let slot = parts.next()?.parse().ok()?;
        let mut to = Addr::parse(parts.next()?)?;
        if to.host.is_empty() {
            to.host.clone_from(&from.host);
        }
        Some((kind, to, slot))
    })
}

/// Whether a reply says the slot map may be out of date.
fn needs_refresh(reply: &[Value]) -> bool {
    reply.iter().any(|v| {
        matches!(v, Value::ServerError(e) if matches!(
            e.kind(),
            Some(ServerErrorKind::ClusterDown | ServerErrorKind::TryAgain)
        ))
    })
}

/// One request as given to a [`ConnectionLike`].
#[derive(Clone, Copy)]
enum Request<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline, usize, usize),
}

impl Request<'_> {
    /// Sends it on `node`; after an `ASK`, preceded by `ASKING` in the same write.
    async fn send_on(
        self,
        node: &mut impl ConnectionLike,
        asking: bool,
    ) -> RedisResult<Vec<Value>> {
        match (self, asking) {
            (Request::Cmd(cmd), false) => Ok(vec![node.req_packed_command(cmd).await?]),
            (Request::Pipe(pipe, offset, count), false) => {
                node.req_packed_commands(pipe, offset, count).await
            }
            (Request::Cmd(cmd), true) => {
                let mut asked = redis::pipe();
                asked.cmd("ASKING").add_command(cmd.clone());
                node.req_packed_commands(&asked, 1, 1).await
            }
            (Request::Pipe(pipe, offset, count), true) if !pipe.is_transaction() => {
                // `ASKING` holds for the next command only: one before each.
                let mut asked = redis::pipe();
                for cmd in pipe.cmd_iter() {
                    asked.cmd("ASKING").add_command(cmd.clone());
                }
                let all = node.req_packed_commands(&asked, 0, 2 * pipe.len()).await?;
                Ok(all
                    .into_iter()
                    .skip(1)
                    .step_by(2)
                    .skip(offset)
                    .take(count)
                    .collect())
            }
            (Request::Pipe(..), true) => Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::TryAgain),
                "a transaction on a slot being migrated",
            ))),
        }
    }

    /// The slot of its first key (none for keyless commands).
    fn slot(self) -> Option<u16> {
        match self {
            Request::Cmd(cmd) => cmd_slot(cmd),
            Request::Pipe(pipe, ..) => pipe.cmd_iter().find_map(cmd_slot),
        }
    }
}

/// A command's arguments (its name first), without copying them.
fn args(cmd: &Cmd) -> impl Iterator<Item = &[u8]> {
    cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(a) => Some(a),
        _ => None,
    })
}

/// Commands this crate sends that name no key.
const KEYLESS: &[&str] = &[
    "PING", "WAIT", "ECHO", "INFO", "ROLE", "MULTI", "EXEC", "DISCARD", "UNWATCH", "ASKING",
];

fn cmd_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = args(cmd);
    let name = args.next()?;
    if KEYLESS
        .iter()
        .any(|k| k.as_bytes().eq_ignore_ascii_case(name))
    {
        return None;
    }
    // `EVAL script numkeys key…`: the scripts this crate sends name one slot's keys.
    if name.eq_ignore_ascii_case(b"EVAL") || name.eq_ignore_ascii_case(b"EVALSHA") {
        let _script = args.next()?;
        return (args.next()? != b"0").then(|| args.next().map(key_slot))?;
    }
    args.next().map(key_slot)
}

/// One operation's view of a [`Cluster`]: routes every request to its node.
#[derive(Clone)]
pub(crate) struct ClusterConn {
    cluster: Cluster,
    blocking: bool,
    /// The cluster's connection count when the operation began.
    seen: u64,
    /// Node connections with a request of this operation outstanding.
    in_flight: Arc<Mutex<Vec<(u64, LinkConn)>>>,
}

impl ClusterConn {
    /// Whether no node connection was made since this operation began. A read that overlaps
    /// a new connection may have taken one node's data from before a restart was dealt with
    /// and another's from after (the check that made the connection replaced the generation
    /// only then): it must be read again.
    pub(crate) fn consistent(&self) -> bool {
        self.cluster.0.connections.load(SeqCst) == self.seen
    }

    /// Gives up on the node connections this operation still waits for (it timed out: they
    /// may be silent).
    pub(crate) fn discard(&self) {
        let waiting = std::mem::take(&mut *self.lock_in_flight());
        for (_, node) in waiting {
            node.discard();
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, Vec<(u64, LinkConn)>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `sending` on `node`, listed as outstanding meanwhile.
    async fn track<T>(&self, node: LinkConn, sending: impl Future<Output = T>) -> T {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let ticket = NEXT.fetch_add(1, SeqCst);
        self.lock_in_flight().push((ticket, node));
        let out = sending.await;
        self.lock_in_flight().retain(|(t, _)| *t != ticket);
        out
    }

    /// An `MGET` split per slot (the cluster refuses cross-slot ones), sent concurrently,
    /// and its values put back in the order of `keys`.
    async fn mget(&self, keys: &[&[u8]]) -> RedisResult<Value> {
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<u16, usize> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let slot = key_slot(key);
            let g = *group_of.entry(slot).or_insert_with(|| {
                groups.push((slot, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let replies = try_join_all(groups.iter().map(|(slot, at)| {
            let mut mget = redis::cmd("MGET");
            for &i in at {
                mget.arg(keys[i]);
            }
            async move {
                self.cluster
                    .send(self, Some(*slot), Request::Cmd(&mget))
                    .await
            }
        }))
        .await?;
        let mut values = vec![Value::Nil; keys.len()];
        for ((_, at), reply) in groups.iter().zip(replies) {
            match reply.into_iter().next() {
                Some(Value::Array(got)) if got.len() == at.len() => {
                    for (&i, v) in at.iter().zip(got) {
                        values[i] = v;
                    }
                }
                // An error reply stands for the whole `MGET`.
                Some(error @ Value::ServerError(_)) => return Ok(error),
                _ => {
                    return Err(RedisError::from((
                        ErrorKind::Parse,
                        "unexpected reply to a per-slot MGET",
                    )));
                }
            }
        }
        Ok(Value::Array(values))
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            // An `MGET` of keys in several slots is split; anything else goes to one node.
            if args(cmd)
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case(b"MGET"))
            {
                let keys: Vec<&[u8]> = args(cmd).skip(1).collect();
                return self.mget(&keys).await;
            }
            let req = Request::Cmd(cmd);
            let reply = self.cluster.send(self, req.slot(), req).await?;
            reply.into_iter().next().ok_or_else(|| {
                RedisError::from((ErrorKind::Parse, "no reply from the Redis Cluster node"))
            })
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let req = Request::Pipe(pipe, offset, count);
            self.cluster.send(self, req.slot(), req).await
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis() {
        // `CLUSTER KEYSLOT` values.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag: the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn every_master_gets_a_server_key_in_its_slots() {
        let a = Addr::parse("127.0.0.1:7000").unwrap();
        let b = Addr::parse("127.0.0.1:7001").unwrap();
        let mut owner = vec![0; usize::from(SLOTS)];
        owner[9000..9100].fill(1);
        let map = SlotMap {
            owner,
            nodes: vec![a.clone(), b.clone()],
        };
        let key = server_key_on("ns:s", &map, &b).unwrap();
        assert!((9000..9100).contains(&key_slot(key.as_bytes())));
        let key = server_key_on("ns:s", &map, &a).unwrap();
        assert_eq!(map.node(key_slot(key.as_bytes())), Some(&a));
        // A namespace with a hash tag lives in one slot: only its master has a key.
        let tagged = "{x}:s";
        let slot = key_slot(b"x");
        let owner_of_x = map.node(slot).unwrap().clone();
        assert!(server_key_on(tagged, &map, &owner_of_x).is_some());
        let other = if owner_of_x == a { &b } else { &a };
        assert!(server_key_on(tagged, &map, other).is_none());
    }

    #[test]
    fn redirections_are_read_from_replies() {
        assert_eq!(
            Addr::parse("[::1]:7000"),
            Some(Addr {
                host: "::1".into(),
                port: 7000
            })
        );
        assert_eq!(Addr::parse("::1:7000").unwrap().host, "::1");
    }
}
