//! `RedisSessionStore`: a tower-sessions store on redis-rs, configured like the cache.
//!
//! Unlike the cache, sessions are state, not copies: a Redis error is an error here (the
//! session middleware turns it into a failed request), never a silent fallback.

use crate::backend::connect::Connections;
use crate::keyspace::session_key;
use crate::{Error, RedisConfig};
use std::sync::Arc;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, SessionStore};

/// Stores tower-sessions records under `{namespace}:session:{sha256(id)}` (the session id
/// itself, a bearer secret, never appears in a key name), expiring with the session.
#[derive(Clone)]
pub struct RedisSessionStore {
    conns: Arc<Connections>,
    namespace: String,
}

impl std::fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

impl RedisSessionStore {
    /// A store on `config`'s Redis, set up like the cache: `REDIS_CLUSTER_URLS` when set,
    /// else `REDIS_URL`, with the password, timeouts and `REDIS_CA_CERT`. Connects lazily;
    /// fails only when no URL is set or one is malformed.
    pub fn new(config: &RedisConfig, namespace: &str) -> Result<Self, Error> {
        Ok(RedisSessionStore {
            conns: Arc::new(Connections::from_config(config, "sessions")?),
            namespace: namespace.to_owned(),
        })
    }

    fn key(&self, id: &Id) -> String {
        session_key(&self.namespace, &id.to_string())
    }

    async fn conn(&self) -> session_store::Result<crate::backend::connect::Conn> {
        self.conns.get(false).await.map(|(c, _)| c).map_err(backend)
    }

    /// Writes `record`; `only_new` makes it fail (return `false`) if the id is taken.
    async fn put(&self, record: &Record, only_new: bool) -> session_store::Result<bool> {
        let bytes =
            serde_json::to_vec(record).map_err(|e| session_store::Error::Encode(e.to_string()))?;
        let mut set = redis::cmd("SET");
        set.arg(self.key(&record.id))
            .arg(bytes)
            .arg("EXAT")
            .arg(record.expiry_date.unix_timestamp().max(1));
        if only_new {
            set.arg("NX");
        }
        let reply: Option<String> = set
            .query_async(&mut self.conn().await?)
            .await
            .map_err(backend)?;
        Ok(reply.is_some())
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        while !self.put(record, true).await? {
            record.id = Id::default(); // collision: draw another id
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.put(record, false).await.map(drop)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(id))
            .query_async(&mut self.conn().await?)
            .await
            .map_err(backend)?;
        bytes
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| session_store::Error::Decode(e.to_string()))
            })
            .transpose()
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        redis::cmd("DEL")
            .arg(self.key(id))
            .query_async::<()>(&mut self.conn().await?)
            .await
            .map_err(backend)
    }
}
