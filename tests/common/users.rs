//! The `users` table the outbox tests share, a cached read of a user's name, and an
//! `#[invalidates]` rename on a connection (inside a transaction when the caller has one).

use cached_query::{Cache, cached_query, invalidates};
use sqlx::{PgConnection, PgPool};

/// Three users, two in org 10, one without an org.
pub async fn schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, org_id BIGINT, name TEXT NOT NULL);
         INSERT INTO users VALUES (1, 10, 'Ada'), (2, 10, 'Alan'), (3, NULL, 'Grace');",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[cached_query(cache = cache, ttl = 300, invalidate = "user:<id>")]
pub async fn name(pool: &PgPool, cache: &Cache, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[invalidates("user:<id>", cache = cache)]
pub async fn rename(
    conn: &mut PgConnection,
    cache: &Cache,
    id: i64,
    to: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(to)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether a read through `cache` returns `expected`.
pub async fn reads(pool: &PgPool, cache: &Cache, id: i64, expected: &str) -> bool {
    name(pool, cache, id).await.unwrap().as_deref() == Some(expected)
}

/// Whether the database itself holds `expected` (no cache).
pub async fn committed(pool: &PgPool, id: i64, expected: &str) -> bool {
    let v: String = sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    v == expected
}
