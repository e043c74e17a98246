//! The 30-second tour: SQLite and the in-memory backend, no services needed.
//!
//! `cargo run --example quickstart` prints misses, then hits, then an invalidation.

use cached_query::{Cache, cached_query, invalidates};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::sqlite::SqlitePoolOptions;

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
struct User {
    id: i64,
    email: String,
    name: String,
}

#[cached_query(ttl = 300, invalidate = "user:<id>")]
async fn get_user(pool: &SqlitePool, id: i64) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as("SELECT id, email, name FROM users WHERE id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[invalidates("user:<id>")]
async fn rename_user(pool: &SqlitePool, id: i64, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = ? WHERE id = ?")
        .bind(name)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Calls `get_user` and says whether the cache answered.
async fn show(pool: &SqlitePool, cache: &Cache, id: i64) -> Result<(), sqlx::Error> {
    let hits_before = cache.stats().hits;
    let user = get_user(pool, id).await?;
    let how = if cache.stats().hits > hits_before {
        "hit "
    } else {
        "miss"
    };
    let name = user.map_or_else(
        || "(no such user)".to_owned(),
        |u| format!("{} <{}>", u.name, u.email),
    );
    println!("  get_user({id}) -> {how}  {name}");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One connection: every connection to `sqlite::memory:` is its own database.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL);
         INSERT INTO users VALUES (1, 'ada@example.com', 'Ada'), (2, 'grace@example.com', 'Grace');",
    )
    .execute(&pool)
    .await?;

    let cache = Cache::builder().memory().build().await?;
    cached_query::install(cache.clone());

    println!("first reads run the query:");
    for id in [1, 2, 3] {
        show(&pool, &cache, id).await?;
    }
    println!("second reads come from the cache (a missing user too):");
    for id in [1, 2, 3] {
        show(&pool, &cache, id).await?;
    }
    println!("rename_user(2, ..) invalidates tag \"user:2\":");
    rename_user(&pool, 2, "Grace Hopper").await?;
    show(&pool, &cache, 2).await?;
    show(&pool, &cache, 2).await?;
    show(&pool, &cache, 1).await?;

    let stats = cache.stats();
    println!(
        "stats: {} hits, {} misses, {} errors",
        stats.hits, stats.misses, stats.errors
    );
    Ok(())
}
