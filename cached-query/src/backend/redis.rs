//! The Redis protocol of the cache, single node or cluster: one `MGET` per read in the
//! steady state, `SET NX` for missing stamps, `SET PX` for entries, `SET` of fresh tokens to
//! invalidate; every operation by a deadline (the response timeout, or less when the call's
//! budget ends sooner).
//!
//! On a cluster, entry and tag keys live in different slots. `MGET` is split per slot
//! (`backend::cluster`, one request per slot, sent concurrently); creating missing stamps and
//! invalidating several tags use one small single-key pipeline per key, sent concurrently,
//! because a cross-slot pipeline would be rejected.

use super::connect::{Conn, Connections};
use super::near::NearCache;
use super::{Read, StampKey, StoreError, link};
use crate::keyspace::new_token;
use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::{Cmd, Pipeline};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RedisStore {
    conns: Connections,
    deadline: Duration,
    /// After a bump, `WAIT` for this many replicas, at most this long.
    replicas: Option<(usize, Duration)>,
}

impl RedisStore {
    /// A store on `conns` whose operations each get `deadline` (the response timeout) unless
    /// the caller's budget ends sooner; bumps also wait for `replicas`.
    pub(crate) fn new(
        conns: Connections,
        deadline: Duration,
        replicas: Option<(usize, Duration)>,
    ) -> Self {
        RedisStore {
            conns,
            deadline,
            replicas,
        }
    }

    /// When an operation starting now must be over.
    pub(crate) fn until(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// The response timeout: the deadline of one operation.
    pub(crate) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Runs `op` on a connection, all of it (waiting for a connection included) by `until`.
    /// A connection that times out is discarded (a silent link would never fail on its own);
    /// an operation that failed on a connection made before it, because that connection
    /// broke, runs once more on a new one while time remains.
    async fn run<T, F, Fut>(&self, until: Instant, op: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_on(false, until, op).await
    }

    /// [`run`](Self::run) on the connection kept for requests that block theirs when
    /// `blocking`.
    async fn run_on<T, F, Fut>(
        &self,
        blocking: bool,
        until: Instant,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        let mut reread = 0;
        loop {
            let got = self.conns.get(blocking);
            let (conn, fresh) = match tokio::time::timeout_at(until, got).await {
                Ok(got) => got?,
                Err(_) => return Err(StoreError::Timeout(self.deadline)),
            };
            let used = conn.clone();
            match tokio::time::timeout_at(until, op(conn)).await {
                Ok(Ok(v)) if used.consistent() => return Ok(v),
                // A cluster node connection was made meanwhile (see `ClusterConn`): again,
                // a few times (connections are made once per node, then kept).
                Ok(Ok(_)) if reread < CONSISTENT_TRIES => reread += 1,
                Ok(Ok(_)) => {
                    return Err(StoreError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
                        "Redis Cluster connections kept changing during the operation",
                    ))));
                }
                Ok(Err(e)) if !fresh && !retried && link::breaks_connection(&e) => retried = true,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    used.discard();
                    return Err(StoreError::Timeout(self.deadline));
                }
            }
        }
    }

    /// One round trip for the entry and its stamps (two when stamps must be created), all
    /// by `until`. With a near cache the `MGET` goes over its tracking connection and what
    /// it returns is kept there (`entry_ttl` at most).
    pub(crate) async fn read(
        &self,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
        until: Instant,
    ) -> Result<Read, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(entry);
        for s in stamps {
            mget.arg(&s.key);
        }
        let mget = &mget;
        let mut values: Vec<Option<Bytes>> = match near {
            None => {
                self.run(until, |mut c| async move { mget.query_async(&mut c).await })
                    .await?
            }
            Some(near) => {
                let seq = near.seq();
                let values: Vec<Option<Bytes>> = near.read(mget, until, self.deadline).await?;
                if values.len() == stamps.len() + 1 {
                    near.fill(seq, (entry, entry_ttl), stamps, &values);
                }
                values
            }
        };
        if values.len() != stamps.len() + 1 {
            return Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "MGET returned an unexpected number of values",
            ))));
        }
        let mut entry_bytes = values.remove(0);
        let missing: Vec<&StampKey> = stamps
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(s, _)| s)
            .collect();
        if !missing.is_empty() {
            // First use of a tag, or its key expired or was evicted: create it with a random
            // token unless a concurrent caller won the race, and use whichever token is there.
            // The entry cannot have been stored under a token that did not exist: it is a
            // miss whatever the tokens read now (a server restarted from disk in between
            // could hand back one it held before).
            entry_bytes = None;
            let created = self.create_stamps(&missing, until).await?;
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

    async fn create_stamps(
        &self,
        missing: &[&StampKey],
        until: Instant,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        if !self.conns.is_cluster() {
            let mut pipe = redis::pipe();
            missing.iter().for_each(|s| Self::create_pipe(&mut pipe, s));
            let pipe = &pipe;
            return self
                .run(until, |mut c| async move { pipe.query_async(&mut c).await })
                .await;
        }
        self.run(until, |c| async move {
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
        self.run(self.until(), |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
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
        let set = &set;
        self.run(self.until(), |mut c| async move {
            set.query_async::<()>(&mut c).await
        })
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

    /// Replaces the tokens of `keys` with fresh ones, by `until` (plus the replicas' wait),
    /// then, when replicas are asked for, waits for them to acknowledge: fewer in time is
    /// an error (the invalidation stays pending and is sent again).
    pub(crate) async fn bump(&self, keys: &[StampKey], until: Instant) -> Result<(), StoreError> {
        let until = until + self.replicas.map_or(Duration::ZERO, |(_, wait)| wait);
        // One pipeline per node: all keys on a single node, one key each on a cluster (the
        // `WAIT` goes to that key's node, after its `SET`).
        let pipe = |keys: &[StampKey]| {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.add_command(Self::bump_cmd(k)).ignore();
            }
            if let Some((n, wait)) = self.replicas {
                pipe.cmd("WAIT").arg(n).arg(millis(wait));
            }
            pipe
        };
        let pipes: Vec<Pipeline> = if self.conns.is_cluster() {
            keys.chunks(1).map(pipe).collect()
        } else {
            vec![pipe(keys)]
        };
        let pipes = &pipes;
        let acked: Vec<Vec<i64>> = self
            .run_on(self.replicas.is_some(), until, |c| async move {
                try_join_all(pipes.iter().map(|p| {
                    let mut c = c.clone();
                    async move { p.query_async::<Vec<i64>>(&mut c).await }
                }))
                .await
            })
            .await?;
        if let Some((wanted, _)) = self.replicas {
            let least = acked.iter().flatten().copied().min().unwrap_or(0);
            if least < i64::try_from(wanted).unwrap_or(i64::MAX) {
                return Err(StoreError::NotReplicated {
                    acked: least,
                    wanted,
                });
            }
        }
        Ok(())
    }
}

/// How many times an operation that overlapped a new cluster node connection runs again.
const CONSISTENT_TRIES: usize = 3;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
