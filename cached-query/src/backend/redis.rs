//! The Redis backend: one `MGET` per read in the steady state, on a lazily connected
//! `ConnectionManager` with connect/response timeouts, every call under a deadline.

use super::{Read, StampKey, StoreError};
use crate::tags::new_token;
use redis::aio::ConnectionManager;
use std::future::Future;
use std::time::Duration;

pub(crate) struct RedisStore {
    conn: ConnectionManager,
    deadline: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub(crate) fn new(conn: ConnectionManager, deadline: Duration) -> Self {
        RedisStore { conn, deadline }
    }

    async fn run<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, op).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.deadline)),
        }
    }

    pub(crate) async fn read(&self, entry: &str, stamps: &[StampKey]) -> Result<Read, StoreError> {
        let mut conn = self.conn.clone();
        let mut mget = redis::cmd("MGET");
        mget.arg(entry);
        for s in stamps {
            mget.arg(&s.key);
        }
        let mut values: Vec<Option<Vec<u8>>> = self.run(mget.query_async(&mut conn)).await?;
        if values.len() != stamps.len() + 1 {
            return Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "MGET returned an unexpected number of values",
            ))));
        }
        let entry_bytes = values.remove(0);
        let missing: Vec<usize> = (0..stamps.len()).filter(|&i| values[i].is_none()).collect();
        if !missing.is_empty() {
            // First use of a tag, or its key expired or was evicted: create it with a random
            // token unless a concurrent caller won the race, and use whichever token is there.
            let mut pipe = redis::pipe();
            for &i in &missing {
                let mut set = redis::cmd("SET");
                set.arg(&stamps[i].key).arg(new_token()).arg("NX");
                if let Some(ttl) = stamps[i].ttl {
                    set.arg("EX").arg(ttl.as_secs().max(1));
                }
                pipe.add_command(set).ignore();
                pipe.cmd("GET").arg(&stamps[i].key);
            }
            let created: Vec<Option<Vec<u8>>> = self.run(pipe.query_async(&mut conn)).await?;
            for (&i, token) in missing.iter().zip(created) {
                values[i] = token;
            }
        }
        let stamps = values.into_iter().map(|v| v.unwrap_or_default()).collect();
        Ok(Read {
            entry: entry_bytes,
            stamps,
        })
    }

    pub(crate) async fn write(
        &self,
        entry: &str,
        bytes: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(bytes).arg("PX").arg(millis(ttl));
        self.run(set.query_async::<()>(&mut conn)).await
    }

    pub(crate) async fn bump(&self, keys: &[StampKey]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for k in keys {
            let set = pipe.cmd("SET").arg(&k.key).arg(new_token());
            if let Some(ttl) = k.ttl {
                set.arg("EX").arg(ttl.as_secs().max(1));
            }
            set.ignore();
        }
        self.run(pipe.query_async::<()>(&mut conn)).await
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
