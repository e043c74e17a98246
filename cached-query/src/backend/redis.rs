//! The Redis protocol of the cache, single node or cluster: one `MGET` per read in the
//! steady state, `SET NX` for missing stamps, `SET PX` for entries, `SET` of fresh tokens to
//! invalidate; every call under one deadline.
//!
//! On a cluster, entry and tag keys live in different slots. `MGET` is split per slot by
//! redis-rs (one request per node involved, sent concurrently); creating missing stamps and
//! invalidating several tags use one small single-key pipeline per key, sent concurrently,
//! because a cross-slot pipeline would be rejected.

use super::connect::{Conn, Connections};
use super::near::NearCache;
use super::{Read, StampKey, StoreError};
use crate::keyspace::new_token;
use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::{Cmd, Pipeline};
use std::future::Future;
use std::time::Duration;

#[derive(Debug)]
pub(crate) struct RedisStore {
    conns: Connections,
    deadline: Duration,
}

impl RedisStore {
    /// A store on `conns`; every operation (connecting included) must finish by `deadline`.
    pub(crate) fn new(conns: Connections, deadline: Duration) -> Self {
        RedisStore { conns, deadline }
    }

    /// Runs `op` (which gets a connection) under the deadline.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.deadline(async { op(self.conns.get().await?).await })
            .await
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

    /// One round trip for the entry and its stamps. With a near cache the `MGET` goes over
    /// its tracking connection and what it returns is kept there (`entry_ttl` at most).
    pub(crate) async fn read(
        &self,
        entry: &str,
        entry_ttl: Duration,
        stamps: &[StampKey],
        near: Option<&NearCache>,
    ) -> Result<Read, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(entry);
        for s in stamps {
            mget.arg(&s.key);
        }
        let mut values: Vec<Option<Bytes>> = match near {
            None => {
                self.run(|mut c| async move { mget.query_async(&mut c).await })
                    .await?
            }
            Some(near) => {
                let seq = near.seq();
                let values: Vec<Option<Bytes>> = self
                    .deadline(async { mget.query_async(&mut near.connection().await?).await })
                    .await?;
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
        if !self.conns.is_cluster() {
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

    /// Replaces the tokens of `keys` with fresh ones.
    pub(crate) async fn bump(&self, keys: &[StampKey]) -> Result<(), StoreError> {
        if !self.conns.is_cluster() {
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
