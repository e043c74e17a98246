//! `#[retry]` on real PostgreSQL errors: a backend terminated mid-query, a serialization
//! failure between two SERIALIZABLE transactions, a syntax error (never retried), the attempt
//! count, the warn event per retry, and the written order when stacked with `#[cached_query]`
//! and `#[timed]`.

mod common;

use async_trait::async_trait;
use cached_query::{Cache, cached_query, invalidates, is_transient, retry, timed};
use common::Logs;
use sqlx::PgPool;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use tokio::sync::mpsc;

/// Sends its backend's pid, then sleeps 30 s on its first attempt and not at all afterwards.
#[retry(attempts = 3, backoff_ms = 1, max_backoff_ms = 5)]
async fn slow_answer(
    pool: &PgPool,
    attempts: &AtomicU32,
    pids: &mpsc::UnboundedSender<i32>,
) -> Result<i32, sqlx::Error> {
    let first = attempts.fetch_add(1, SeqCst) == 0;
    let mut conn = pool.acquire().await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    let _ = pids.send(pid);
    sqlx::query_scalar("SELECT 42 FROM pg_sleep($1)")
        .bind(if first { 30.0 } else { 0.0 })
        .fetch_one(&mut *conn)
        .await
}

#[sqlx::test]
async fn a_backend_terminated_mid_query_succeeds_on_retry(pool: PgPool) {
    let logs = Logs::capture();
    let attempts = AtomicU32::new(0);
    let (pids, mut sent) = mpsc::unbounded_channel();
    let kill = async {
        let pid = sent.recv().await.unwrap();
        common::wait_until_running(&pool, pid).await;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(killed);
    };
    let (answer, ()) = tokio::join!(slow_answer(&pool, &attempts, &pids), kill);
    assert_eq!(answer.unwrap(), 42);
    assert_eq!(attempts.load(SeqCst), 2);

    let lines = logs.mine("retry::slow_answer");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("transient database error, retrying"),
        "{line}"
    );
    assert!(line.contains("attempt=1 "), "{line}");
    assert!(line.contains("error="), "{line}");
}

/// Adds 1 to account 1 in a SERIALIZABLE transaction. On its first attempt another
/// SERIALIZABLE transaction changes the row after this one read it.
#[retry(attempts = 3, backoff_ms = 1, max_backoff_ms = 5)]
async fn add_one(pool: &PgPool, attempts: &AtomicU32) -> Result<i32, sqlx::Error> {
    let first = attempts.fetch_add(1, SeqCst) == 0;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .execute(&mut *tx)
        .await?;
    let balance: i32 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    if first {
        let mut other = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .execute(&mut *other)
            .await?;
        sqlx::query("UPDATE accounts SET balance = balance + 100 WHERE id = 1")
            .execute(&mut *other)
            .await?;
        other.commit().await?;
    }
    let balance: i32 =
        sqlx::query_scalar("UPDATE accounts SET balance = $1 + 1 WHERE id = 1 RETURNING balance")
            .bind(balance)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(balance)
}

#[sqlx::test]
async fn a_serialization_failure_is_retried(pool: PgPool) {
    let logs = Logs::capture();
    sqlx::raw_sql(
        "CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL);
         INSERT INTO accounts VALUES (1, 100);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let attempts = AtomicU32::new(0);
    assert_eq!(add_one(&pool, &attempts).await.unwrap(), 201);
    assert_eq!(attempts.load(SeqCst), 2);
    let lines = logs.mine("retry::add_one");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("could not serialize access"),
        "{}",
        lines[0]
    );
}

#[retry(attempts = 5, backoff_ms = 1, max_backoff_ms = 5)]
async fn bad_syntax(pool: &PgPool, attempts: &AtomicU32) -> Result<i32, sqlx::Error> {
    attempts.fetch_add(1, SeqCst);
    sqlx::query_scalar("SELEC 1").fetch_one(pool).await
}

#[sqlx::test]
async fn a_syntax_error_is_not_retried(pool: PgPool) {
    let logs = Logs::capture();
    let attempts = AtomicU32::new(0);
    let err = bad_syntax(&pool, &attempts).await.unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("42601"), "{err:?}");
    assert_eq!(attempts.load(SeqCst), 1);
    assert!(logs.mine("retry::bad_syntax").is_empty());
}

/// Every attempt terminates its own backend: a real transient error each time.
#[retry(attempts = 4, backoff_ms = 1, max_backoff_ms = 2)]
async fn always_terminated(pool: &PgPool, attempts: &AtomicU32) -> Result<(), sqlx::Error> {
    attempts.fetch_add(1, SeqCst);
    sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(pool)
        .await?;
    Ok(())
}

#[retry]
async fn defaults(pool: &PgPool, attempts: &AtomicU32) -> Result<(), sqlx::Error> {
    attempts.fetch_add(1, SeqCst);
    sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(pool)
        .await?;
    Ok(())
}

#[sqlx::test]
async fn attempts_count_every_execution_and_the_last_error_comes_back(pool: PgPool) {
    let logs = Logs::capture();
    let attempts = AtomicU32::new(0);
    let err = always_terminated(&pool, &attempts).await.unwrap_err();
    assert!(is_transient(&err), "{err:?}");
    // The error of the last attempt, as sqlx gave it: the backend's own termination.
    let code = err.as_database_error().and_then(|e| e.code());
    assert!(
        code.as_deref() == Some("57P01") || matches!(err, sqlx::Error::Io(_)),
        "{err:?}"
    );
    assert_eq!(attempts.load(SeqCst), 4);
    let lines = logs.mine("retry::always_terminated");
    assert_eq!(lines.len(), 3, "one event per retry: {lines:#?}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.contains(&format!("attempt={} ", i + 1)), "{line}");
        assert!(line.contains("attempts=4 "), "{line}");
    }

    // The documented defaults: 3 attempts.
    let attempts = AtomicU32::new(0);
    defaults(&pool, &attempts).await.unwrap_err();
    assert_eq!(attempts.load(SeqCst), 3);
}

/// Terminates its own backend on the first attempt, then answers `id`.
async fn flaky(pool: &PgPool, attempts: &AtomicU32, id: i64) -> Result<i64, sqlx::Error> {
    if attempts.fetch_add(1, SeqCst) == 0 {
        sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
            .execute(pool)
            .await?;
    }
    sqlx::query_scalar("SELECT $1::bigint")
        .bind(id)
        .fetch_one(pool)
        .await
}

#[cached_query(cache = cache, ttl = 60, skip(attempts), name = "retry.cache_outside")]
#[retry(backoff_ms = 1, max_backoff_ms = 2)]
async fn cache_outside(
    cache: &Cache,
    pool: &PgPool,
    attempts: &AtomicU32,
    id: i64,
) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, id).await
}

#[retry(backoff_ms = 1, max_backoff_ms = 2)]
#[cached_query(cache = cache, ttl = 60, skip(attempts), name = "retry.cache_inside")]
async fn cache_inside(
    cache: &Cache,
    pool: &PgPool,
    attempts: &AtomicU32,
    id: i64,
) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, id).await
}

#[sqlx::test]
async fn stacked_with_cached_query_the_written_order_is_the_run_time_order(pool: PgPool) {
    let cache = Cache::builder().memory().build().await.unwrap();
    let misses = |name: &str| cache.stats().queries.get(name).map(|q| (q.misses, q.hits));

    // `#[cached_query]` above: the retries happen inside one miss.
    let attempts = AtomicU32::new(0);
    assert_eq!(cache_outside(&cache, &pool, &attempts, 7).await.unwrap(), 7);
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(misses("retry.cache_outside"), Some((1, 0)));
    assert_eq!(cache_outside(&cache, &pool, &attempts, 7).await.unwrap(), 7);
    assert_eq!(attempts.load(SeqCst), 2, "a hit runs nothing");
    assert_eq!(misses("retry.cache_outside"), Some((1, 1)));

    // `#[retry]` above: each attempt goes through the cache.
    let attempts = AtomicU32::new(0);
    assert_eq!(cache_inside(&cache, &pool, &attempts, 8).await.unwrap(), 8);
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(misses("retry.cache_inside"), Some((2, 0)));
}

#[timed(name = "retry.timed_outside")]
#[retry(backoff_ms = 1, max_backoff_ms = 2)]
async fn timed_outside(pool: &PgPool, attempts: &AtomicU32) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, 1).await
}

#[retry(backoff_ms = 1, max_backoff_ms = 2)]
#[timed(name = "retry.timed_inside")]
async fn timed_inside(pool: &PgPool, attempts: &AtomicU32) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, 1).await
}

#[timed(name = "retry.all_three.timed")]
#[cached_query(cache = cache, ttl = 60, skip(attempts), name = "retry.all_three")]
#[retry(backoff_ms = 1, max_backoff_ms = 2)]
async fn all_three(
    cache: &Cache,
    pool: &PgPool,
    attempts: &AtomicU32,
    id: i64,
) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, id).await
}

#[sqlx::test]
async fn stacked_with_timed_the_written_order_is_the_run_time_order(pool: PgPool) {
    let count = |name: &str| {
        cached_query::timings()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.count)
    };
    let attempts = AtomicU32::new(0);
    timed_outside(&pool, &attempts).await.unwrap();
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(
        count("retry.timed_outside"),
        Some(1),
        "the whole call, once"
    );

    let attempts = AtomicU32::new(0);
    timed_inside(&pool, &attempts).await.unwrap();
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(count("retry.timed_inside"), Some(2), "each attempt");

    let cache = Cache::builder().memory().build().await.unwrap();
    let attempts = AtomicU32::new(0);
    assert_eq!(all_three(&cache, &pool, &attempts, 3).await.unwrap(), 3);
    assert_eq!(all_three(&cache, &pool, &attempts, 3).await.unwrap(), 3);
    assert_eq!(attempts.load(SeqCst), 2);
    let stats = &cache.stats().queries["retry.all_three"];
    assert_eq!((stats.misses, stats.hits), (1, 1));
    assert_eq!(
        count("retry.all_three.timed"),
        Some(2),
        "both calls, the hit too"
    );
}

#[async_trait]
trait Accounts {
    async fn answer(&self, pool: &PgPool) -> Result<i64, sqlx::Error>;
}

struct Flaky(AtomicU32);

#[async_trait]
impl Accounts for Flaky {
    #[retry(backoff_ms = 1, max_backoff_ms = 2, name = "retry.async_trait")]
    async fn answer(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        flaky(pool, &self.0, 11).await
    }
}

#[sqlx::test]
async fn a_method_of_an_async_trait_is_retried(pool: PgPool) {
    let logs = Logs::capture();
    let accounts: Box<dyn Accounts + Send + Sync> = Box::new(Flaky(AtomicU32::new(0)));
    assert_eq!(accounts.answer(&pool).await.unwrap(), 11);
    let lines = logs.mine("query=\"retry.async_trait\"");
    assert_eq!(lines.len(), 1, "{lines:#?}");
}

#[cached_query(cache = cache, ttl = 60, skip(attempts), name = "retry.named")]
#[retry(backoff_ms = 1, max_backoff_ms = 2)]
async fn named(cache: &Cache, pool: &PgPool, attempts: &AtomicU32) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, 12).await
}

#[sqlx::test]
async fn a_stacked_retry_is_logged_under_the_cached_query_name(pool: PgPool) {
    let logs = Logs::capture();
    let cache = Cache::builder().memory().build().await.unwrap();
    let attempts = AtomicU32::new(0);
    assert_eq!(named(&cache, &pool, &attempts).await.unwrap(), 12);
    // Inside the call's span (whose fields also say `query="retry.named"`), the event's own
    // `query` field is the cached query's name.
    let lines: Vec<String> = logs
        .mine("transient database error")
        .into_iter()
        .filter(|l| l.contains("retrying query=\"retry.named\""))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
}

#[invalidates("account:<id>", cache = cache)]
#[retry(backoff_ms = 1, max_backoff_ms = 2)]
async fn retried_write(
    cache: &Cache,
    pool: &PgPool,
    attempts: &AtomicU32,
    id: i64,
) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, id).await
}

#[retry(backoff_ms = 1, max_backoff_ms = 2)]
#[invalidates("account:<id>", cache = cache)]
async fn write_retried_with_its_invalidation(
    cache: &Cache,
    pool: &PgPool,
    attempts: &AtomicU32,
    id: i64,
) -> Result<i64, sqlx::Error> {
    flaky(pool, attempts, id).await
}

#[sqlx::test]
async fn stacked_with_invalidates_the_written_order_is_the_run_time_order(pool: PgPool) {
    let server = common::RedisServer::start();
    let cache = Cache::builder()
        .redis(&server.url())
        .namespace("retry-invalidates")
        .build()
        .await
        .unwrap();
    // One invalidation is one `EVAL` (the bump script) on a single node.
    let evals = || server.command_calls("eval");
    let before = evals();
    cache.invalidate("account:1").await.unwrap();
    assert_eq!(evals() - before, 1);

    // `#[invalidates]` above: one invalidation after the retried call.
    let attempts = AtomicU32::new(0);
    let before = evals();
    assert_eq!(retried_write(&cache, &pool, &attempts, 1).await.unwrap(), 1);
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(evals() - before, 1);

    // `#[retry]` above: each attempt invalidates (a failed one too: its write may have landed).
    let attempts = AtomicU32::new(0);
    let before = evals();
    assert_eq!(
        write_retried_with_its_invalidation(&cache, &pool, &attempts, 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(attempts.load(SeqCst), 2);
    assert_eq!(evals() - before, 2);
}
