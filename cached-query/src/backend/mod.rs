//! Storage behind the cache. Every backend offers the same primitives (read an entry with
//! its stamps, write an entry, bump stamps), so the read path in `cache::call` is written
//! once; backend differences stay behind [`Store`]'s methods.

pub(crate) mod cluster;
pub(crate) mod connect;
pub(crate) mod identity;
pub(crate) mod link;
pub(crate) mod memory;
pub(crate) mod near;
pub(crate) mod redis;

use bytes::Bytes;
use near::NearCache;
use std::time::Duration;
use tokio::time::Instant;

/// A stamp key (namespace generation or tag) and the expiry it gets when (re)created.
#[derive(Debug, Clone)]
pub(crate) struct StampKey {
    pub(crate) key: String,
    pub(crate) ttl: Option<Duration>,
}

/// What one read returns: the entry's bytes, if any, and the current token of every stamp
/// key (created on the spot when missing).
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) entry: Option<Bytes>,
    pub(crate) stamps: Vec<Bytes>,
    /// Answered by the near cache, without a round trip: its stamp sequence before the
    /// lookup (to mark the entry checked if its stamps match).
    pub(crate) near: Option<u64>,
}

/// What [`Store::read_many`] returns: each entry's bytes in the order asked, the current
/// token of every stamp key, and which of those this read created (an entry whose stamps
/// include one cannot have been stored under it: a miss).
#[derive(Debug)]
pub(crate) struct ReadMany {
    pub(crate) entries: Vec<Option<Bytes>>,
    pub(crate) stamps: Vec<Bytes>,
    pub(crate) created: Vec<bool>,
}

/// Most keys one Redis command carries in a batch read or write: a batch of 500 elements
/// with up to three tags each (plus the namespace generation) is one `MGET`; larger ones
/// are split into commands of at most this many keys.
pub(crate) const MAX_KEYS_PER_COMMAND: usize = 2048;

/// What [`Store::settle`] found: the namespace's invalidation sequence, and the tokens of the
/// keys asked for.
#[derive(Debug)]
pub(crate) struct Settled {
    pub(crate) seq: Bytes,
    pub(crate) tokens: Vec<Bytes>,
}

/// Why a store operation failed. Crosses the public API as an [`Error`](crate::Error)'s
/// source via [`into_source`](Self::into_source).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("{0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("circuit open: Redis is skipped after repeated failures")]
    CircuitOpen,
    #[error("pending invalidations are being delivered by another call")]
    PendingBusy,
    #[error("{acked} of the {wanted} replicas asked for acknowledged the invalidation in time")]
    NotReplicated { acked: i64, wanted: usize },
}

impl StoreError {
    /// The cause as a public error source: the `redis::RedisError` itself (so callers can
    /// downcast to it), or this error for timeouts and an open breaker.
    pub(crate) fn into_source(self) -> crate::BoxError {
        match self {
            StoreError::Redis(e) => Box::new(e),
            other => Box::new(other),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Store {
    Redis(redis::RedisStore),
    Memory(memory::MemoryStore),
}

impl Store {
    /// When a remote operation starting now must be over (the response timeout).
    pub(crate) fn until(&self) -> Instant {
        match self {
            Store::Redis(r) => r.until(),
            Store::Memory(_) => Instant::now(),
        }
    }

    /// The response timeout of a remote backend.
    pub(crate) fn deadline(&self) -> Option<Duration> {
        match self {
            Store::Redis(r) => Some(r.deadline()),
            Store::Memory(_) => None,
        }
    }

    /// Reads an entry and its stamps by `until` (over `near`'s tracking connection when
    /// given, which keeps the entry at most `entry_ttl`).
    pub(crate) async fn read(
        &self,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Read, StoreError> {
        match self {
            Store::Redis(r) => r.read(entry, entry_ttl, stamps, near, until).await,
            Store::Memory(m) => Ok(m.read(entry, stamps)),
        }
    }

    /// Reads `entries` and the `stamps` they are checked against, by `until` (over `near`'s
    /// tracking connection when given, which keeps each entry at most `entry_ttl`); missing
    /// stamps are created.
    pub(crate) async fn read_many(
        &self,
        entries: &[&str],
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<ReadMany, StoreError> {
        match self {
            Store::Redis(r) => r.read_many(entries, entry_ttl, stamps, near, until).await,
            Store::Memory(m) => Ok(m.read_many(entries, stamps)),
        }
    }

    /// Stores entries, each `(key, bytes)`, by `until`.
    pub(crate) async fn write_many(
        &self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Duration,
        until: Instant,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.write_many(entries, ttl, until).await,
            Store::Memory(m) => {
                for (entry, bytes) in entries {
                    m.write(&entry, bytes, ttl);
                }
                Ok(())
            }
        }
    }

    /// The current tokens of `keys` by `until`, none created (`None`: missing); over
    /// `near`'s tracking connection when given.
    pub(crate) async fn stamps(
        &self,
        keys: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        match self {
            Store::Redis(r) => r.stamps(keys, near, until).await,
            Store::Memory(m) => Ok(m.stamps(keys)),
        }
    }

    /// The namespace's invalidation sequence now and the tokens of `keys`, created at it
    /// when missing, by `until`: what a result's tags are checked with after its query.
    pub(crate) async fn settle(
        &self,
        keys: &[StampKey],
        until: Instant,
    ) -> Result<Settled, StoreError> {
        match self {
            Store::Redis(r) => r.settle(keys, until).await,
            Store::Memory(m) => Ok(m.settle(keys)),
        }
    }

    /// Stores an entry, by `until`.
    pub(crate) async fn write(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        until: Instant,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.write(entry, bytes, ttl, until).await,
            Store::Memory(m) => {
                m.write(entry, bytes, ttl);
                Ok(())
            }
        }
    }

    /// [`write`](Self::write), releasing the lease `(key, token)` in the same round trip.
    pub(crate) async fn write_released(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        lease: (&str, &[u8]),
        until: Instant,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.write_released(entry, bytes, ttl, lease, until).await,
            Store::Memory(m) => {
                m.write(entry, bytes, ttl);
                Ok(())
            }
        }
    }

    /// Takes the lease `key` with `token` for `ttl` unless another caller holds it, by
    /// `until`: whether it was taken. Only a Redis backend has leases (in process, flights
    /// do the same): the in-memory one always grants them.
    pub(crate) async fn lease(
        &self,
        key: &str,
        token: &[u8],
        ttl: Duration,
        until: Instant,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(r) => r.lease(key, token, ttl, until).await,
            Store::Memory(_) => Ok(true),
        }
    }

    /// Releases the lease `key` if it still holds `token`, by `until`.
    pub(crate) async fn release(
        &self,
        key: &str,
        token: &[u8],
        until: Instant,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.release(key, token, until).await,
            Store::Memory(_) => Ok(()),
        }
    }

    /// Removes an entry, by `until`.
    pub(crate) async fn delete(&self, entry: &str, until: Instant) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.delete(entry, until).await,
            Store::Memory(m) => {
                m.delete(entry);
                Ok(())
            }
        }
    }

    /// Gives every key a fresh random token (invalidation, `clear`), by `until`.
    pub(crate) async fn bump(&self, keys: &[StampKey], until: Instant) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.bump(keys, until).await,
            Store::Memory(m) => {
                m.bump(keys);
                Ok(())
            }
        }
    }

    /// A health check: `PING` for Redis; the in-memory backend is always up.
    /// Bumps `keys` in this process only: the in-memory backend's stamps (Redis is changed
    /// only by [`bump`](Self::bump)).
    pub(crate) fn bump_local(&self, keys: &[StampKey]) {
        if let Store::Memory(m) = self {
            m.bump(keys);
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ping().await,
            Store::Memory(_) => Ok(()),
        }
    }

    /// Whether operations can fail (and so need the breaker and pending invalidations).
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self, Store::Redis(_))
    }

    /// Entries held in this process, when the backend holds them here.
    pub(crate) fn local_entry_count(&self) -> Option<u64> {
        match self {
            Store::Memory(m) => Some(m.entry_count()),
            Store::Redis(_) => None,
        }
    }

    /// The backend's name, for `Debug`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Store::Redis(_) => "redis",
            Store::Memory(_) => "memory",
        }
    }
}
