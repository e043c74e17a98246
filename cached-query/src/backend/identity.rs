//! Restart and failover detection. Redis restarted from an RDB or AOF file, or a replica
//! promoted after missing the last writes of asynchronous replication, serves *older* tag
//! tokens than the ones invalidations already returned for: entries computed before those
//! invalidations would be fresh again. Every new connection therefore checks the server's
//! `run_id` (random, new on every start) against the one recorded under the namespace's
//! server key before any request uses it:
//!
//! - the same: this server process has held the namespace's data since it was last made
//!   safe (the key is part of that data: a dataset restored from disk, or replicated from
//!   another server, carries the `run_id` of the server it was made safe on);
//! - anything else (restart, promotion, another server, a namespace this server never
//!   saw): the namespace generation is replaced and the `run_id` recorded, in one
//!   `MULTI`/`EXEC` under `WATCH` (so connections checking at once clear only once), and
//!   every entry written before is stale.
//!
//! (`master_replid` is not part of it: a master changes it when its first replica attaches,
//! which loses nothing.)
//!
//! Requests on a connection only reach the server checked when it was made, so nothing
//! read from a restarted or promoted server is used before the namespace is safe; a
//! connection in use is rechecked every second ([`still_current`]).
//! A replica (`role:slave`) is refused: it cannot take invalidations.
//! Cost: one pipelined round trip (`INFO server`, `INFO replication`, `GET`) per new
//! connection, plus one `MULTI`/`EXEC` and a namespace-wide miss when the server changed.
//! When `INFO` is not allowed (an ACL without `@dangerous`), the identity is unknown and
//! every new connection clears the namespace, which stays safe and costs misses.

use super::link::breaks_connection as breaks;
use crate::keyspace::new_token;
use futures_util::FutureExt;
use redis::Value;
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What a connection to a cache's Redis checks before use: the keys of its namespace.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    pub(crate) server_key: String,
    pub(crate) generation_key: String,
    /// Times a check replaced the generation (shared by every connection of the cache).
    pub(crate) clears: Arc<AtomicU64>,
}

/// The identity as recorded (the `run_id`), or `None` when `INFO` was refused; an error for
/// a replica.
fn identity(server: &Value, replication: &Value) -> redis::RedisResult<Option<String>> {
    let (Some(server), Some(replication)) = (text(server), text(replication)) else {
        return Ok(None);
    };
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    if field(&replication, "role").is_some_and(|r| r != "master") {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "the Redis server is a replica",
            "the cache needs the master: invalidations are writes".to_owned(),
        )));
    }
    Ok(field(&server, "run_id"))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Checks the server behind `conn` and makes the namespace safe on it (module docs).
/// Returns whether the generation was replaced.
pub(crate) async fn check(
    conn: &mut MultiplexedConnection,
    guard: &Guard,
) -> redis::RedisResult<bool> {
    let (identity, held) = probe(conn, &guard.server_key).await?;
    if current(&identity, held.as_deref()) {
        return Ok(false);
    }
    // Clear once, not once per connection checking at the same time: under `WATCH`, look
    // again, and replace the generation only if nobody recorded this server in between.
    // (The connection is not shared yet, so `WATCH` applies to this check alone.) An
    // aborted `EXEC` proves nothing by itself (the key may have been evicted, not written):
    // look again until this server is recorded, by us or by another connection.
    let mut tries = 0;
    loop {
        let (_, held): ((), Option<Vec<u8>>) = redis::pipe()
            .cmd("WATCH")
            .arg(&guard.server_key)
            .cmd("GET")
            .arg(&guard.server_key)
            .query_async(conn)
            .await?;
        if current(&identity, held.as_deref()) {
            redis::cmd("UNWATCH").query_async::<()>(conn).await?;
            return Ok(false);
        }
        let mut clear = redis::pipe();
        clear
            .atomic()
            .cmd("SET")
            .arg(&guard.generation_key)
            .arg(new_token())
            .ignore();
        match &identity {
            Some(id) => clear.cmd("SET").arg(&guard.server_key).arg(id).ignore(),
            None => clear.cmd("DEL").arg(&guard.server_key).ignore(),
        };
        let done: Option<()> = clear.query_async(conn).await?;
        if done.is_some() {
            break;
        }
        tries += 1;
        if tries == 8 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
                "the namespace's server key kept changing during the identity check",
            )));
        }
    }
    cleared(guard, &guard.server_key, identity.as_deref());
    Ok(true)
}

/// The server's identity (`None` when `INFO` is refused; an error for a replica) and what
/// `server_key` holds on it, in one round trip.
pub(crate) async fn probe(
    conn: &mut MultiplexedConnection,
    server_key: &str,
) -> redis::RedisResult<(Option<String>, Option<Vec<u8>>)> {
    let replies: Vec<Value> = redis::pipe()
        .ignore_errors()
        .cmd("INFO")
        .arg("server")
        .cmd("INFO")
        .arg("replication")
        .cmd("GET")
        .arg(server_key)
        .query_async(conn)
        .await?;
    let [server, replication, held] = &replies[..] else {
        return Err(unexpected());
    };
    let identity = identity(server, replication)?;
    let held = match held {
        Value::BulkString(b) => Some(b.clone()),
        Value::Nil => None,
        Value::ServerError(e) => return Err(e.clone().into()),
        _ => return Err(unexpected()),
    };
    Ok((identity, held))
}

/// Whether the server key holds this server's identity (never when it is unknown).
pub(crate) fn current(identity: &Option<String>, held: Option<&[u8]>) -> bool {
    identity.is_some() && held == identity.as_deref().map(str::as_bytes)
}

/// Counts and logs a generation replaced because the server under `server_key` was new.
pub(crate) fn cleared(guard: &Guard, server_key: &str, identity: Option<&str>) {
    guard.clears.fetch_add(1, Relaxed);
    tracing::warn!(
        server_key,
        identity = identity.unwrap_or("unknown (INFO refused)"),
        "cached-query: the Redis server is new to this namespace (first use, restart, failover \
         or another server): its generation was replaced, so every entry stored before is a miss"
    );
}

/// The recheck of a checked connection (see [`Link`](super::link::Link)) whose server key is
/// `server_key`: see [`still_current`].
pub(crate) fn still_master(server_key: String) -> super::link::Recheck {
    Box::new(move |conn| still_current(conn, Some(server_key.clone())).boxed())
}

/// Whether the server behind `conn` is still the master the namespace was made safe on: its
/// `run_id` still in `server_key`. A master demoted with `REPLICAOF` may keep its clients
/// connected and serve them its new master's data, which may have lost writes; demoted,
/// resynchronised and promoted again, it still holds the `run_id` of the master it copied.
/// When that cannot be known (`INFO` refused, no `server_key`, or the key's cluster slot
/// moving), whether it is still a master (`ROLE`); when neither can, the connection stays
/// (it was checked when made).
pub(crate) async fn still_current(
    mut conn: MultiplexedConnection,
    server_key: Option<String>,
) -> redis::RedisResult<bool> {
    if let Some(key) = &server_key {
        match probe(&mut conn, key).await {
            Ok((Some(id), held)) => return Ok(held.as_deref() == Some(id.as_bytes())),
            Ok((None, _)) => {}
            Err(e) if is_replica(&e) => return Ok(false),
            Err(e) if redirected(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let role: Vec<Value> = match redis::cmd("ROLE").query_async(&mut conn).await {
        Ok(role) => role,
        // Answered, but not allowed (an ACL) or renamed.
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) && !breaks(&e) => {
            return Ok(true);
        }
        Err(e) => return Err(e),
    };
    Ok(match role.first() {
        Some(Value::BulkString(b)) => b == b"master",
        Some(Value::SimpleString(s)) => s == "master",
        _ => false,
    })
}

/// The error [`probe`] gives for a replica.
fn is_replica(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// A cluster node answered that the key is served elsewhere (`MOVED`, `ASK`).
pub(crate) fn redirected(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
    )
}

fn unexpected() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply to the server identity check",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn identity_is_the_run_id_of_a_master() {
        let server = bulk("# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n");
        let repl = bulk("# Replication\r\nrole:master\r\nmaster_replid:def\r\n");
        assert_eq!(identity(&server, &repl).unwrap().as_deref(), Some("abc"));
        let replica = bulk("role:slave\r\nmaster_replid:def\r\n");
        assert!(identity(&server, &replica).is_err());
        // `INFO` refused: an error reply, not text.
        assert_eq!(identity(&Value::Nil, &repl).unwrap(), None);
    }
}
