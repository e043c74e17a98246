//! The crate's one public error type.

/// The underlying cause of an [`Error`], reachable through [`std::error::Error::source`]
/// (and `downcast_ref`, e.g. to `redis::RedisError` or `sqlx::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in `cached-query`.
///
/// Cache *reads* never return this type to a query's caller: a Redis failure while
/// reading or filling the cache is counted in [`CacheStats::errors`](crate::CacheStats)
/// and the query runs against the database (fail-open). `Error` comes back from
/// set-up (bad configuration, malformed URLs) and from explicit invalidation, where
/// the caller has to know that the invalidation is still pending. Variants that wrap a
/// failure keep it as their [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value (environment variable or builder argument) is invalid.
    #[error("{name}={value:?}: expected {expected}")]
    Config {
        /// The variable or builder setting, e.g. `CACHE_DEFAULT_TTL`.
        name: String,
        /// The offending value (URLs are shown with their password redacted).
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A Redis URL could not be parsed.
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// Why it was rejected (a `redis::RedisError` when redis-rs rejected it).
        #[source]
        source: BoxError,
    },
    /// Redis did not accept an invalidation (or `clear`). The invalidation stays pending:
    /// this process serves no entry it covers and delivers it before reading Redis again.
    #[error("invalidation not delivered to Redis ({source}); it is pending and will be retried")]
    InvalidationPending {
        /// The Redis error, a timeout, or `circuit open` while Redis is being skipped.
        #[source]
        source: BoxError,
    },
    /// A database could not be reached (or not within `DB_CONNECT_TIMEOUT`).
    #[error("could not connect to the database at {target}: {source}")]
    Connect {
        /// `host:port` (PostgreSQL) or the database file URL (SQLite).
        target: String,
        /// What went wrong, with any password removed from its message.
        #[source]
        source: BoxError,
    },
    /// Redis did not answer a health check.
    #[error("Redis is unavailable: {source}")]
    Unavailable {
        /// The Redis error or timeout.
        #[source]
        source: BoxError,
    },
    /// `cached_query::invalidate` was called but no default cache was installed.
    #[error("no default cache installed: call `cached_query::install(cache)` at start-up")]
    NoDefaultCache,
    /// `commit_and_invalidate` could not commit. The commit's outcome is unknown (it may
    /// have landed before the connection failed), so the tags were invalidated anyway.
    #[error("transaction commit failed (the tags were invalidated anyway): {0}")]
    Commit(#[source] sqlx::Error),
    /// An operation that works through PostgreSQL was called on a cache built without
    /// [`CacheBuilder::outbox`](crate::CacheBuilder::outbox).
    #[error("`{operation}` needs a cache built with `CacheBuilder::outbox(pool)`")]
    NoOutbox {
        /// The method called, e.g. `invalidate_on_commit`.
        operation: &'static str,
    },
    /// The outbox database failed: creating its table, recording an invalidation, or
    /// installing a table trigger.
    #[error("outbox: {what}: {source}")]
    Outbox {
        /// What was being done.
        what: &'static str,
        /// The `sqlx::Error`.
        #[source]
        source: BoxError,
    },
    /// `watch_table`: a tag template names something the table does not have.
    #[error("watch_table({table}): {problem}")]
    Watch {
        /// The table as given.
        table: String,
        /// What is wrong, naming the column or template (and the table's columns).
        problem: String,
    },
}

impl Error {
    pub(crate) fn config(name: &str, value: &str, expected: &str) -> Self {
        Error::Config {
            name: name.to_owned(),
            value: value.to_owned(),
            expected: expected.to_owned(),
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn outbox(what: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Outbox {
            what,
            source: source.into(),
        }
    }

    pub(crate) fn invalid_url(url: &str, source: impl Into<BoxError>) -> Self {
        Error::InvalidUrl {
            url: crate::redact_url(url),
            source: source.into(),
        }
    }
}

/// `?` on [`Cache::commit_and_invalidate`](crate::Cache::commit_and_invalidate),
/// [`invalidate`](crate::Cache::invalidate) and friends in a function returning
/// `Result<_, sqlx::Error>`. A database failure comes back as the `sqlx::Error` it was
/// (`Commit`, and `Connect`/`Outbox` when sqlx caused them), keeping its SQLSTATE; a Redis
/// failure (`InvalidationPending`, `Unavailable`) becomes `sqlx::Error::Io`; everything else
/// (set-up mistakes) `sqlx::Error::Configuration`. The original is the wrapped error.
///
/// `InvalidationPending` after a write means the write happened and its invalidation is
/// delivered later: code that retries on `Io` must not write again for it. Match on
/// [`Error`] before converting when that matters.
impl From<Error> for sqlx::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Commit(e) => e,
            Error::Connect { source, .. } | Error::Outbox { source, .. }
                if source.is::<sqlx::Error>() =>
            {
                *source.downcast::<sqlx::Error>().expect("checked by is()")
            }
            e @ (Error::InvalidationPending { .. } | Error::Unavailable { .. }) => {
                sqlx::Error::Io(std::io::Error::other(e))
            }
            e => sqlx::Error::Configuration(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_sqlx_keeps_the_database_error_and_wraps_the_rest() {
        let e: sqlx::Error = Error::Commit(sqlx::Error::RowNotFound).into();
        assert!(matches!(e, sqlx::Error::RowNotFound));
        let e: sqlx::Error = Error::outbox("recording", sqlx::Error::PoolTimedOut).into();
        assert!(matches!(e, sqlx::Error::PoolTimedOut));

        let pending = Error::InvalidationPending {
            source: "timed out".into(),
        };
        let sqlx::Error::Io(io) = sqlx::Error::from(pending) else {
            panic!("a Redis failure is I/O");
        };
        let inner = io.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(matches!(inner, Some(Error::InvalidationPending { .. })));

        let e: sqlx::Error = Error::config("CACHE_TTL", "x", "seconds").into();
        let sqlx::Error::Configuration(inner) = e else {
            panic!("a set-up mistake is configuration");
        };
        assert!(inner.to_string().contains("CACHE_TTL"), "{inner}");
    }
}
