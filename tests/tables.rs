//! Tags derived from the SQL: `tables = auto` tags an entry with `table:<name>` for every table
//! its query reads, `#[invalidates(tables = auto)]` bumps the tables its body writes, and
//! `Cache::watch_tables` makes any client's write bump them too.

mod common;

use cached_query::{Cache, CacheBuilder, cached_query, invalidates};
use common::{AFTER_COMMIT, Commits, check_lags, redis_url, unique_ns, within};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

fn redis(pool: &PgPool, ns: &str) -> CacheBuilder {
    Cache::builder()
        .redis(&redis_url())
        .namespace(ns)
        .outbox(pool.clone())
}

async fn schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
         CREATE TABLE articles (id BIGINT PRIMARY KEY, slug TEXT UNIQUE NOT NULL,
                                author_id BIGINT NOT NULL, title TEXT NOT NULL);
         CREATE TABLE \"Audit\" (id BIGSERIAL PRIMARY KEY, what TEXT NOT NULL);
         CREATE TABLE counters (id INT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO users VALUES (7, 'Ada'), (8, 'Alan');
         INSERT INTO articles VALUES (1, 'hello', 7, 'Hello');
         INSERT INTO counters VALUES (1, 0);",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[cached_query(cache = cache, tables = auto)]
async fn byline(pool: &PgPool, cache: &Cache, slug: &str) -> sqlx::Result<(String, String)> {
    sqlx::query_as(
        "SELECT a.title, u.name FROM articles a JOIN public.Users u ON u.id = a.author_id
         WHERE a.slug = $1",
    )
    .bind(slug)
    .fetch_one(pool)
    .await
}

#[invalidates(tables = auto, cache = cache)]
async fn rename(pool: &PgPool, cache: &Cache, id: i64, name: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE users SET name = $1 WHERE id = $2")
        .bind(name)
        .bind(id)
        .execute(pool)
        .await
        .map(drop)
}

#[invalidates(tables = auto, cache = cache)]
async fn audit(pool: &PgPool, cache: &Cache, what: &str) -> sqlx::Result<()> {
    sqlx::query(r#"INSERT INTO "Audit" (what) VALUES ($1)"#)
        .bind(what)
        .execute(pool)
        .await
        .map(drop)
}

#[cached_query(cache = cache, tables(r#""Audit""#, "users"), invalidate = "audit:<what>")]
async fn audit_count(pool: &PgPool, cache: &Cache, what: &str) -> sqlx::Result<i64> {
    let n = sqlx::query_scalar(r#"SELECT count(*) FROM "Audit" WHERE what = $1"#)
        .bind(what)
        .fetch_one(pool)
        .await?;
    Ok(n)
}

fn counts(cache: &Cache) -> (u64, u64) {
    let s = cache.stats();
    (s.hits, s.misses)
}

#[sqlx::test]
async fn table_tags_follow_the_sql(pool: PgPool) {
    schema(&pool).await;
    let cache = redis(&pool, &unique_ns("tables")).build().await.unwrap();
    assert_eq!(byline(&pool, &cache, "hello").await.unwrap().1, "Ada");
    byline(&pool, &cache, "hello").await.unwrap();
    assert_eq!(counts(&cache), (1, 1));
    // A write to a table the query does not read leaves it alone.
    audit(&pool, &cache, "x").await.unwrap();
    byline(&pool, &cache, "hello").await.unwrap();
    assert_eq!(counts(&cache), (2, 1));
    // `public.Users` in the query and `users` in the write are one table.
    rename(&pool, &cache, 8, "Turing").await.unwrap();
    assert_eq!(byline(&pool, &cache, "hello").await.unwrap().1, "Ada");
    assert_eq!(counts(&cache), (2, 2));

    // Named tables (a quoted name keeps its case), alongside templates.
    assert_eq!(audit_count(&pool, &cache, "x").await.unwrap(), 1);
    audit(&pool, &cache, "x").await.unwrap();
    assert_eq!(
        audit_count(&pool, &cache, "x").await.unwrap(),
        2,
        "table:Audit"
    );
    cache.invalidate("audit:x").await.unwrap();
    audit_count(&pool, &cache, "x").await.unwrap();
    cache.invalidate("table:users").await.unwrap();
    audit_count(&pool, &cache, "x").await.unwrap();
    audit_count(&pool, &cache, "x").await.unwrap();
    assert_eq!(counts(&cache), (3, 6));
}

/// Writes from any client, with any `search_path`, reach `table:<name>` once watched.
#[sqlx::test]
async fn watched_tables_catch_writes_from_any_client(pool: PgPool) {
    schema(&pool).await;
    let cache = redis(&pool, &unique_ns("watch-tables"))
        .build()
        .await
        .unwrap();
    cache.watch_tables(&["Users", "articles"]).await.unwrap();
    cache.watch_tables(&["users"]).await.unwrap(); // again: harmless
    assert!(matches!(
        cache.watch_tables(&["nope"]).await,
        Err(cached_query::Error::Watch { table, .. }) if table == "nope"
    ));
    byline(&pool, &cache, "hello").await.unwrap();
    let mut other = pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "SET search_path = pg_catalog; UPDATE public.users SET name = 'Lovelace' WHERE id = 7",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    within(AFTER_COMMIT, "the watched write", || {
        let (pool, cache) = (pool.clone(), cache.clone());
        async move { byline(&pool, &cache, "hello").await.unwrap().1 == "Lovelace" }
    })
    .await;
    sqlx::raw_sql("TRUNCATE public.articles CASCADE; RESET search_path")
        .execute(&mut *other)
        .await
        .unwrap();
    within(AFTER_COMMIT, "the truncate", || {
        let (pool, cache) = (pool.clone(), cache.clone());
        async move { byline(&pool, &cache, "hello").await.is_err() }
    })
    .await;
    // Removed by unwatch_table: writes no longer reach the tag.
    cache.unwatch_table("users").await.unwrap();
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cached_query_table_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, 1, "only articles' trigger is left");
    let no_outbox = Cache::builder().memory().build().await.unwrap();
    assert!(matches!(
        no_outbox.watch_tables(&["users"]).await,
        Err(cached_query::Error::NoOutbox { .. })
    ));
}

#[cached_query(cache = cache, tables = auto)]
async fn counter(pool: &PgPool, cache: &Cache) -> sqlx::Result<i64> {
    sqlx::query_scalar::<_, i64>("SELECT value FROM counters WHERE id = 1")
        .fetch_one(pool)
        .await
}

/// The stale-set stress with `tables = auto` only: writers update the table with raw SQL on
/// plain connections (no invalidation code), readers read through two caches. No read may
/// return a value older than one whose commit returned more than the bound before it began.
async fn no_stale_reads_under_raw_writes(pool: PgPool, a: Cache, b: Cache) {
    a.watch_tables(&["counters"]).await.unwrap();
    let commits = Arc::new(Commits::default());
    let writing = Arc::new(AtomicBool::new(true));
    let run_for = Duration::from_millis(2000);
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, commits) = (pool.clone(), commits.clone());
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                let mut n = 0;
                while start.elapsed() < run_for {
                    let v: i64 = sqlx::query_scalar(
                        "UPDATE counters SET value = value + 1 WHERE id = 1 RETURNING value",
                    )
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    commits.record(v);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let cache = if r % 2 == 0 { a.clone() } else { b.clone() };
            let (pool, commits, writing) = (pool.clone(), commits.clone(), writing.clone());
            tokio::spawn(async move {
                let mut lags = Vec::new();
                while writing.load(SeqCst) {
                    let start = std::time::Instant::now();
                    let seen = counter(&pool, &cache).await.unwrap();
                    lags.push(commits.lag(seen, start));
                    tokio::task::yield_now().await;
                }
                lags
            })
        })
        .collect();
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    writing.store(false, SeqCst);
    let mut lags = Vec::new();
    for r in readers {
        lags.extend(r.await.unwrap());
    }
    check_lags("tables = auto", writes, lags);
    let (sa, sb) = (a.stats(), b.stats());
    assert!(
        sa.hits + sb.hits > 0,
        "the caches served reads: {sa:?} {sb:?}"
    );
    assert_eq!(sa.errors + sb.errors, 0);
}

#[sqlx::test]
async fn no_stale_reads_under_raw_writes_redis(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("tables-stress");
    let a = redis(&pool, &ns).build().await.unwrap();
    let b = redis(&pool, &ns).near_cache(100).build().await.unwrap();
    no_stale_reads_under_raw_writes(pool, a, b).await;
}

#[sqlx::test]
async fn no_stale_reads_under_raw_writes_memory(pool: PgPool) {
    schema(&pool).await;
    let a = Cache::builder()
        .memory()
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    let b = Cache::builder()
        .memory()
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    no_stale_reads_under_raw_writes(pool, a, b).await;
}

#[cached_query(cache = cache, tables = auto)]
async fn event_count(pool: &PgPool, cache: &Cache) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
}

/// A partitioned table: a write naming a partition directly does not fire the parent's
/// statement trigger, so `watch_tables` puts it on every partition too (with the parent's
/// name); a view cannot be watched.
#[sqlx::test]
async fn watched_partitions_and_refused_views(pool: PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE events (id INT, kind TEXT NOT NULL) PARTITION BY LIST (kind);
         CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');
         CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b');
         CREATE VIEW recent_events AS SELECT * FROM events;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let cache = redis(&pool, &unique_ns("partitions"))
        .build()
        .await
        .unwrap();
    cache.watch_tables(&["events"]).await.unwrap();
    assert!(matches!(
        cache.watch_tables(&["recent_events"]).await,
        Err(cached_query::Error::Watch { problem, .. }) if problem.contains("not a table")
    ));
    assert_eq!(event_count(&pool, &cache).await.unwrap(), 0);
    for (n, sql) in [
        (1, "INSERT INTO events VALUES (1, 'a')"),
        (2, "INSERT INTO events_b VALUES (2, 'b')"),
        (1, "DELETE FROM events_a"),
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        within(AFTER_COMMIT, sql, || {
            let (pool, cache) = (pool.clone(), cache.clone());
            async move { event_count(&pool, &cache).await.unwrap() == n }
        })
        .await;
    }
    cache.unwatch_table("events").await.unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cached_query_table_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        left, 0,
        "unwatch_table removes the partitions' triggers too"
    );
}
