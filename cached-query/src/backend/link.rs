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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    Connecting(u64, Attempt),
    Ready(Ready),
}

/// Told the id of a connection the link gives up on (its owner may hold state that only
/// that connection kept current, such as client-side caching).
pub(crate) type OnDiscard = Box<dyn Fn(u64) + Send + Sync>;

struct Inner {
    connect: Connect,
    on_discard: Option<OnDiscard>,
    connect_timeout: Duration,
    state: Mutex<State>,
    next_id: AtomicU64,
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
    pub(crate) fn new(connect: Connect, connect_timeout: Duration) -> Self {
        Self::with_on_discard(connect, connect_timeout, None)
    }

    /// A link that calls `on_discard` when it gives up on its current connection.
    pub(crate) fn with_on_discard(
        connect: Connect,
        connect_timeout: Duration,
        on_discard: Option<OnDiscard>,
    ) -> Self {
        Link(Arc::new(Inner {
            connect,
            on_discard,
            connect_timeout,
            state: Mutex::new(State::Idle),
            next_id: AtomicU64::new(0),
        }))
    }

    /// The current connection, or the one being made (starting an attempt if none is).
    /// `fresh`: it was made for this call, so an error on it is not a stale connection's.
    pub(crate) async fn get(&self) -> RedisResult<(LinkConn, bool)> {
        let attempt = {
            let mut state = self.0.lock();
            match &*state {
                State::Ready(ready) => return Ok((self.wrap(ready.clone()), false)),
                State::Connecting(_, attempt) => attempt.clone(),
                State::Idle => {
                    let (id, attempt) = self.start();
                    *state = State::Connecting(id, attempt.clone());
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
            let made = match tokio::time::timeout(inner.connect_timeout, (inner.connect)(id)).await
            {
                Ok(made) => made,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to Redis took over {:?}", inner.connect_timeout),
                ))),
            };
            let mut state = inner.lock();
            let current = matches!(&*state, State::Connecting(at, _) if *at == id);
            match made {
                Ok(conn) => {
                    let ready = Ready { id, conn };
                    if current {
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

impl Inner {
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

    fn observe<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r
            && breaks_connection(e)
        {
            self.link.discard(self.id);
        }
    }
}

impl ConnectionLike for LinkConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn.req_packed_command(cmd).await;
            self.observe(&r);
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
            self.observe(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
