//! The cache in front of real sqlx queries on PostgreSQL: read-your-writes after
//! `commit_and_invalidate`, `#[invalidates]`, and the stale-set race under concurrency.

mod common;

use cached_query::{Cache, Error, cached_query, invalidates};
use common::{redis_cache, redis_url, unique_ns};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct User {
    id: i64,
    email: String,
    name: String,
}

async fn schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL);
         CREATE TABLE counters (id INT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO users VALUES (1, 'ada@example.com', 'Ada'), (2, 'alan@example.com', 'Alan');
         INSERT INTO counters VALUES (1, 0);",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[cached_query(cache = cache, ttl = 300, invalidate = "user:<id>")]
async fn get_user(pool: &PgPool, cache: &Cache, id: i64) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as("SELECT id, email, name FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[invalidates("user:<id>", cache = cache)]
async fn rename_user(
    pool: &PgPool,
    cache: &Cache,
    id: i64,
    name: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("UPDATE users SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

#[sqlx::test]
async fn reads_reflect_writes_immediately(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("pg-users")).await;
    let ada = get_user(&pool, &cache, 1).await.unwrap().unwrap();
    assert_eq!(ada.name, "Ada");
    assert_eq!(get_user(&pool, &cache, 1).await.unwrap().unwrap(), ada);
    assert_eq!(get_user(&pool, &cache, 99).await.unwrap(), None);
    assert_eq!(get_user(&pool, &cache, 99).await.unwrap(), None);
    assert_eq!((cache.stats().hits, cache.stats().misses), (2, 2));

    assert_eq!(
        rename_user(&pool, &cache, 1, "Ada Lovelace").await.unwrap(),
        1
    );
    assert_eq!(
        get_user(&pool, &cache, 1).await.unwrap().unwrap().name,
        "Ada Lovelace"
    );

    // A transaction: commit, then invalidate.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Alan Turing' WHERE id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    get_user(&pool, &cache, 2).await.unwrap(); // cached before the commit: old name
    cache.commit_and_invalidate(tx, ["user:2"]).await.unwrap();
    assert_eq!(
        get_user(&pool, &cache, 2).await.unwrap().unwrap().name,
        "Alan Turing"
    );
}

#[invalidates("user:<id>", cache = cache)]
async fn rename_checked(
    pool: &PgPool,
    cache: &Cache,
    id: i64,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET email = $2 WHERE id = $1")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// A failed write may still have landed (an autocommitted statement before the error, a
/// COMMIT whose reply was lost), so it invalidates anyway: a spurious invalidation costs a
/// miss, a missing one serves stale data.
#[sqlx::test]
async fn failed_writes_invalidate_anyway(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("pg-fail")).await;
    get_user(&pool, &cache, 1).await.unwrap();
    get_user(&pool, &cache, 1).await.unwrap();
    assert_eq!(cache.stats().hits, 1);

    // #[invalidates] on Err (a unique violation): the entry is invalidated.
    assert!(
        rename_checked(&pool, &cache, 1, "alan@example.com")
            .await
            .is_err()
    );
    get_user(&pool, &cache, 1).await.unwrap();
    assert_eq!((cache.stats().hits, cache.stats().misses), (1, 2));

    // commit_and_invalidate whose commit fails (deferred constraint): Err, and invalidated.
    sqlx::raw_sql(
        "CREATE TABLE parent (id INT PRIMARY KEY);
         CREATE TABLE child (parent INT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO child VALUES (42)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = cache
        .commit_and_invalidate(tx, ["user:1"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Commit(_)), "{err}");
    // `?` in a function returning sqlx's error gives back the database's own error.
    async fn commit(cache: &Cache, tx: sqlx::Transaction<'_, sqlx::Postgres>) -> sqlx::Result<()> {
        cache.commit_and_invalidate(tx, ["user:1"]).await?;
        Ok(())
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO child VALUES (43)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = commit(&cache, tx).await.unwrap_err();
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("23503"), "{err}");
    get_user(&pool, &cache, 1).await.unwrap();
    assert_eq!(
        (cache.stats().hits, cache.stats().misses),
        (1, 3),
        "the entry was invalidated (twice, with no read in between)"
    );
}

#[cached_query(cache = cache, invalidate = "counter:<id>")]
async fn counter(pool: &PgPool, cache: &Cache, id: i32) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT value FROM counters WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// Writers commit then invalidate while readers read through the cache: no reader may see
/// a value older than the last invalidation that completed before its read began.
async fn no_stale_reads(pool: PgPool, cache: Cache) {
    common::no_stale_reads(pool, cache, |pool, cache| async move {
        counter(&pool, &cache, 1).await.unwrap()
    })
    .await;
}

#[sqlx::test]
async fn no_stale_reads_under_concurrent_writes_redis(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Redis, "pg-race").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_under_concurrent_writes_memory(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Memory, "pg-race-mem").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_under_concurrent_writes_redis_cluster(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Cluster, "pg-race-cluster").await;
    no_stale_reads(pool, cache).await;
}

#[cached_query(cache = cache, ttl = 300, invalidate = "user:<id>")]
async fn user_name(
    conn: &mut sqlx::PgConnection,
    cache: &Cache,
    id: i64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// A cached function taking a connection, called with a transaction (`&mut *tx`): it reads
/// the uncommitted row but neither serves nor stores cache entries, so a rollback leaves
/// nothing behind; called with a plain connection it is cached as usual.
#[sqlx::test]
async fn reads_inside_a_transaction_bypass_the_cache(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("in_tx")).await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        user_name(&mut conn, &cache, 1).await.unwrap().as_deref(),
        Some("Ada")
    );

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Uncommitted' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            user_name(&mut tx, &cache, 1).await.unwrap().as_deref(),
            Some("Uncommitted"),
            "inside the transaction: its own writes, never the cached row"
        );
    }
    tx.rollback().await.unwrap();

    // Nothing leaked: the cached row is still the committed one, and still a hit.
    assert_eq!(
        user_name(&mut conn, &cache, 1).await.unwrap().as_deref(),
        Some("Ada")
    );
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.bypassed),
        (1, 1, 2),
        "{stats:?}"
    );
    assert_eq!(stats.queries["postgres::user_name"].bypassed, 2);
}
