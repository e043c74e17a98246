//! Which database errors are worth running again: the connection or the pool failed, or the
//! server refused the statement for a reason that a new attempt can clear (a serialization
//! failure, a deadlock, a shutdown).

/// Whether `error` is *transient*: running the same statement again may succeed.
///
/// - I/O errors on the connection and `PoolTimedOut`;
/// - database errors whose SQLSTATE says so: `40001` serialization failure (also MySQL's
///   deadlock, 1213), `40P01` deadlock, `57P01`/`57P02`/`57P03` (the server is shutting down,
///   crashed, or not accepting connections yet), and class `08` (connection exceptions);
/// - with the `mysql` feature, MySQL/MariaDB errors 1213 (deadlock), 1205 (lock wait
///   timeout) and 1927 (connection killed), told by their error number, and others by their
///   SQLSTATE as above (class `08`: 1040 too many connections, 1053 server shutdown).
///
/// Everything else is not: constraint violations (`23505`, MySQL 1062), syntax errors
/// (`42601`, MySQL 1064), `RowNotFound`, decoding and configuration errors. A statement that
/// failed inside a transaction cannot be retried alone (the transaction is aborted): retry the
/// whole transaction.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => transient_database_error(db.as_ref()),
        _ => false,
    }
}

fn transient_database_error(db: &dyn sqlx::error::DatabaseError) -> bool {
    // MySQL and MariaDB: lock wait timeout, deadlock, connection killed (`KILL`); then
    // their SQLSTATE like any other (class 08: 1040 too many connections, 1053 shutdown…).
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        && matches!(my.number(), 1205 | 1213 | 1927)
    {
        return true;
    }
    match db.code().as_deref() {
        Some("40001" | "40P01" | "57P01" | "57P02" | "57P03") => true,
        Some(code) => code.starts_with("08"),
        None => false,
    }
}

use std::ops::ControlFlow;

/// The error type `#[retry]` accepts: `sqlx::Error`, whose kind tells what is transient.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "#[retry] needs the function to return `Result<T, sqlx::Error>`, not an error of type `{Self}`",
    label = "the error type of this function",
    note = "only sqlx errors tell whether running the statement again may succeed (`cached_query::is_transient`)"
)]
pub trait SqlxError {
    /// The error itself.
    fn as_sqlx(&self) -> &sqlx::Error;
}

impl SqlxError for sqlx::Error {
    fn as_sqlx(&self) -> &sqlx::Error {
        self
    }
}

/// The state of one `#[retry]` call: the attempt number and the backoff policy. Generated code
/// awaits the body, then hands its result to [`Retry::after`] and awaits the backoff it returns,
/// until it returns the result.
#[doc(hidden)]
#[derive(Debug)]
pub struct Retry {
    query: &'static str,
    attempt: u32,
    attempts: u32,
    backoff_ms: u64,
    max_backoff_ms: u64,
}

impl Retry {
    /// A call of `query` run at most `attempts` times, waiting a random time in
    /// `0..=min(max_backoff_ms, backoff_ms · 2^(retry − 1))` before each retry.
    pub fn new(query: &'static str, attempts: u32, backoff_ms: u64, max_backoff_ms: u64) -> Self {
        Retry {
            query,
            attempt: 1,
            attempts: attempts.max(1),
            backoff_ms,
            max_backoff_ms,
        }
    }

    /// `Break(result)` when the call is over (success, an error that is not transient, or the
    /// last attempt); otherwise logs and counts the retry and returns its backoff to await.
    pub fn after<T, E: SqlxError>(
        &mut self,
        result: Result<T, E>,
    ) -> ControlFlow<Result<T, E>, tokio::time::Sleep> {
        let error = match result {
            Err(e) if self.attempt < self.attempts && is_transient(e.as_sqlx()) => e,
            done => return ControlFlow::Break(done),
        };
        let error = error.as_sqlx();
        let delay = self.delay();
        tracing::warn!(
            query = self.query,
            attempt = self.attempt,
            attempts = self.attempts,
            delay_ms = delay.as_millis() as u64,
            error = %error,
            "cached-query: transient database error, retrying"
        );
        #[cfg(feature = "metrics")]
        metrics::counter!("cached_query_retries_total", "query" => self.query).increment(1);
        self.attempt += 1;
        ControlFlow::Continue(tokio::time::sleep(delay))
    }

    /// Full jitter: uniform in `0..=cap`, `cap` doubling from `backoff_ms` per retry up to
    /// `max_backoff_ms`.
    fn delay(&self) -> std::time::Duration {
        let doublings = (self.attempt - 1).min(63);
        let cap = self
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms);
        let ms = (crate::cache::uniform() * (cap as f64 + 1.0)).floor() as u64;
        std::time::Duration::from_millis(ms.min(cap))
    }
}

#[cfg(test)]
mod tests {
    use super::Retry;
    use std::time::Duration;

    #[test]
    fn delays_are_full_jitter_under_a_doubling_cap() {
        let mut retry = Retry::new("q", 10, 50, 300);
        for (attempt, cap) in [(1, 50), (2, 100), (3, 200), (4, 300), (9, 300)] {
            retry.attempt = attempt;
            let delays: Vec<Duration> = (0..2000).map(|_| retry.delay()).collect();
            let max = delays.iter().max().unwrap();
            let min = delays.iter().min().unwrap();
            assert!(*max <= Duration::from_millis(cap), "{attempt}: {max:?}");
            assert!(
                *max >= Duration::from_millis(cap * 9 / 10),
                "{attempt}: {max:?}"
            );
            assert!(
                *min <= Duration::from_millis(cap / 10),
                "{attempt}: {min:?}"
            );
        }
        let none = Retry::new("q", 3, 0, 0);
        assert_eq!(none.delay(), Duration::ZERO);
    }
}
