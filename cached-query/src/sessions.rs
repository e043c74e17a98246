//! `RedisSessionStore`: a tower-sessions store on redis-rs, configured like the cache.
//!
//! Unlike the cache, sessions are state, not copies: a Redis error is an error here (the
//! session middleware turns it into a failed request), never a silent fallback.

use crate::Error;
use crate::backend::redis::connection_manager;
use crate::config::RedisConfig;
use crate::key::sha256_hex;
use redis::aio::ConnectionManager;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, SessionStore};

/// Stores tower-sessions records under `{namespace}:session:{sha256(id)}` (the session id
/// itself, a bearer secret, never appears in a key name), expiring with the session.
#[derive(Clone)]
pub struct RedisSessionStore {
    conn: ConnectionManager,
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
    /// A store on `config`'s Redis (`REDIS_URL`, with its password and timeouts). Connects
    /// lazily; fails only when the URL is malformed or absent.
    pub fn new(config: &RedisConfig, namespace: &str) -> Result<Self, Error> {
        let url = config.url.as_deref().ok_or_else(|| {
            Error::config(
                "REDIS_URL",
                "",
                "a Redis URL: sessions need Redis (it is not set)",
            )
        })?;
        let conn = connection_manager(url, None, config.connect_timeout, config.response_timeout)?;
        Ok(RedisSessionStore {
            conn,
            namespace: namespace.to_owned(),
        })
    }

    fn key(&self, id: &Id) -> String {
        format!(
            "{}:session:{}",
            self.namespace,
            sha256_hex(id.to_string().as_bytes())
        )
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
            .query_async(&mut self.conn.clone())
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
            .query_async(&mut self.conn.clone())
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
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(backend)
    }
}
