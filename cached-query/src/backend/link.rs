//! One self-replacing connection to a single Redis node.
//!
//! - Connecting runs in a background task bounded by the connect timeout: a caller waits
//!   for it only as long as its own deadline, and a slow connect is not restarted by every
//!   caller that gives up on it.
//! - A connection is published only once its setup finished (for the cache: the server
//!   identity check of [`identity`](super::identity)), so no request reaches a server that
//!   was not checked.
//! - Any error that may leave the connection broken or pointed at the wrong server (I/O,
//!   timeout, `READONLY`, …) discards it: the next request makes and checks a new one.

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Makes and sets up one connection; gets the connection's id (for push handlers).
pub(crate) type Connect =
    Box<dyn Fn(u64) -> BoxFuture<'static, RedisResult<MultiplexedConnection>> + Send + Sync>;

type Attempt = Shared<BoxFuture<'static, RedisResult<Ready>>>;

#[derive(Clone)]
struct Ready {
    id: u64,
    conn: MultiplexedConnection,
}

enum State {
    Idle,
    /// An attempt, and when it started.
    Connecting(u64, Attempt, std::time::Instant),
    Ready(Ready),
}

/// Told the id of a connection the link gives up on (its owner may hold state that only
/// that connection kept current, such as client-side caching).
pub(crate) type OnDiscard = Box<dyn Fn(u64) + Send + Sync>;

/// Checks that a connection still talks to the right server (e.g. still a master): `Ok(false)`
/// discards it.
pub(crate) type Recheck =
    Box<dyn Fn(MultiplexedConnection) -> BoxFuture<'static, RedisResult<bool>> + Send + Sync>;

/// How often a connection in use is checked again (with [`Recheck`]): a server demoted
/// while its clients stay connected is noticed within this, and a connection unchecked
/// for twice this is checked before it is used.
pub(crate) const RECHECK_EVERY: Duration = Duration::from_secs(1);

struct Inner {
    connect: Connect,
    on_discard: Option<OnDiscard>,
    recheck: Option<Recheck>,
    connect_timeout: Duration,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Origin of `checked`.
    origin: std::time::Instant,
    /// When (ms after `origin`) the current connection was last checked.
    checked: AtomicU64,
    /// A background recheck is in flight.
    rechecking: AtomicBool,
}

/// A connection made on demand by `connect` and replaced after errors. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Link(Arc<Inner>);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

impl Link {
    /// A link whose connections `connect` makes; with `recheck`, the connection in use is
    /// checked again every [`RECHECK_EVERY`]; `on_discard` is told when the link gives up on
    /// its current connection.
    pub(crate) fn new(
        connect: Connect,
        connect_timeout: Duration,
        recheck: Option<Recheck>,
        on_discard: Option<OnDiscard>,
    ) -> Self {
        Link(Arc::new(Inner {
            connect,
            on_discard,
            recheck,
            origin: std::time::Instant::now(),
            checked: AtomicU64::new(0),
            rechecking: AtomicBool::new(false),
            connect_timeout,
            state: Mutex::new(State::Idle),
            next_id: AtomicU64::new(0),
        }))
    }

    /// The current connection, or the one being made (starting an attempt if none is).
    /// `fresh`: it was made for this call, so an error on it is not a stale connection's.
    pub(crate) async fn get(&self) -> RedisResult<(LinkConn, bool)> {
        loop {
            let (conn, fresh) = self.current().await?;
            if self.still_good(&conn).await? {
                return Ok((conn, fresh));
            }
        }
    }

    /// Whether `conn` may be used: checked within [`RECHECK_EVERY`] (else checked again in
    /// the background), or, unchecked for twice that, checked now. A failed check
    /// discards it.
    async fn still_good(&self, conn: &LinkConn) -> RedisResult<bool> {
        if self.0.recheck.is_none() {
            return Ok(true);
        }
        let inner = &self.0;
        let age = inner.millis().saturating_sub(inner.checked.load(Relaxed));
        let every = u64::try_from(RECHECK_EVERY.as_millis()).unwrap_or(u64::MAX);
        if age <= every {
            return Ok(true);
        }
        if age <= 2 * every {
            let (link, conn) = (self.clone(), conn.clone());
            spawn_unless_running(&self.0, |inner| &inner.rechecking, async move {
                let _ = link.recheck(&conn).await;
            });
            return Ok(true);
        }
        self.recheck(conn).await
    }

    /// Runs the recheck on `conn`: discards it unless it passes.
    async fn recheck(&self, conn: &LinkConn) -> RedisResult<bool> {
        let Some(recheck) = &self.0.recheck else {
            return Ok(true);
        };
        let started = self.0.millis();
        match recheck(conn.conn.clone()).await {
            Ok(true) => {
                self.0.checked.fetch_max(started, Relaxed);
                Ok(true)
            }
            Ok(false) => {
                self.discard(conn.id);
                Ok(false)
            }
            Err(e) => {
                self.discard(conn.id);
                Err(e)
            }
        }
    }

    /// The current connection, or the one being made (starting an attempt if none is).
    async fn current(&self) -> RedisResult<(LinkConn, bool)> {
        let attempt = {
            let mut state = self.0.lock();
            match &*state {
                State::Ready(ready) => return Ok((self.wrap(ready.clone()), false)),
                // An attempt overdue by a second was lost with the runtime it ran on (one
                // that stopped being driven): make a new one.
                State::Connecting(_, attempt, started)
                    if started.elapsed() < self.0.connect_timeout + Duration::from_secs(1) =>
                {
                    attempt.clone()
                }
                State::Connecting(..) | State::Idle => {
                    let (id, attempt) = self.start();
                    *state = State::Connecting(id, attempt.clone(), std::time::Instant::now());
                    attempt
                }
            }
        };
        let ready = attempt.await?;
        Ok((self.wrap(ready), true))
    }

    /// Spawns a connection attempt; the task publishes its outcome itself, so it lands even
    /// when every caller waiting for it gave up.
    fn start(&self) -> (u64, Attempt) {
        let id = self.0.next_id.fetch_add(1, Relaxed);
        let inner = self.0.clone();
        let task = tokio::spawn(async move {
            // Dropped unfinished (its runtime shut down): the link must not wait for it.
            let abandoned = Abandoned(&inner, id);
            let made = match tokio::time::timeout(inner.connect_timeout, (inner.connect)(id)).await
            {
                Ok(made) => made,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to Redis took over {:?}", inner.connect_timeout),
                ))),
            };
            std::mem::forget(abandoned);
            let mut state = inner.lock();
            let current = matches!(&*state, State::Connecting(at, ..) if *at == id);
            match made {
                Ok(conn) => {
                    let ready = Ready { id, conn };
                    if current {
                        // Checked when made.
                        inner.checked.store(inner.millis(), Relaxed);
                        *state = State::Ready(ready.clone());
                    }
                    Ok(ready)
                }
                Err(e) => {
                    if current {
                        *state = State::Idle;
                    }
                    Err(e)
                }
            }
        });
        let attempt = async move {
            task.await.unwrap_or_else(|e| {
                Err(RedisError::from(std::io::Error::other(format!(
                    "the Redis connect task ended: {e}"
                ))))
            })
        };
        (id, attempt.boxed().shared())
    }

    fn wrap(&self, ready: Ready) -> LinkConn {
        LinkConn {
            conn: ready.conn,
            id: ready.id,
            link: self.clone(),
        }
    }

    /// Drops connection `id` if it is the current one: the next request makes a new one.
    pub(crate) fn discard(&self, id: u64) {
        let mut state = self.0.lock();
        if matches!(&*state, State::Ready(r) if r.id == id) {
            *state = State::Idle;
            drop(state);
            if let Some(on_discard) = &self.0.on_discard {
                on_discard(id);
            }
        }
    }
}

/// Spawns `task` unless the one started under `owner`'s `flag` is still running. The flag
/// is cleared however the task ends, also when its runtime drops it unfinished (else no
/// task would ever start again).
pub(crate) fn spawn_unless_running<O: Send + Sync + 'static>(
    owner: &Arc<O>,
    flag: fn(&O) -> &AtomicBool,
    task: impl Future<Output = ()> + Send + 'static,
) {
    struct Running<O>(Arc<O>, fn(&O) -> &AtomicBool);
    impl<O> Drop for Running<O> {
        fn drop(&mut self) {
            (self.1)(&self.0).store(false, SeqCst);
        }
    }
    if flag(owner).swap(true, SeqCst) {
        return;
    }
    let running = Running(owner.clone(), flag);
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _running = running;
            task.await;
        });
    }
}

/// Puts a link whose attempt `.1` never finished back to idle.
struct Abandoned<'a>(&'a Inner, u64);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if matches!(&*state, State::Connecting(at, ..) if *at == self.1) {
            *state = State::Idle;
        }
    }
}

impl Inner {
    fn millis(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `e` may mean the connection is broken or no longer talks to the right server.
/// Ordinary error replies (`WRONGTYPE`, …) leave it in place.
pub(crate) fn breaks_connection(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading
        ),
        _ => true,
    }
}

/// A connection of a [`Link`] for one operation: errors that break it discard it.
#[derive(Clone)]
pub(crate) struct LinkConn {
    conn: MultiplexedConnection,
    id: u64,
    link: Link,
}

impl LinkConn {
    /// The connection's id within its link (as passed to its `Connect`).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Discards this connection (see [`Link::discard`]).
    pub(crate) fn discard(&self) {
        self.link.discard(self.id);
    }

    /// Discards the connection after an error that breaks it, returned as an error or as
    /// an error reply (which is how replies come back from a connection).
    fn observe(&self, r: Result<&[Value], &RedisError>) {
        let broken = match r {
            Err(e) => breaks_connection(e),
            Ok(values) => values.iter().any(
                |v| matches!(v, Value::ServerError(e) if breaks_connection(&e.clone().into())),
            ),
        };
        if broken {
            self.link.discard(self.id);
        }
    }
}

impl ConnectionLike for LinkConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn.req_packed_command(cmd).await;
            self.observe(r.as_ref().map(std::slice::from_ref));
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.conn.req_packed_commands(cmd, offset, count).await;
            self.observe(r.as_ref().map(Vec::as_slice));
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
