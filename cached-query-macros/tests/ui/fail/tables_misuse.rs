use cached_query::{cached_query, invalidates};
use sqlx::PgPool;

#[cached_query(tables = auto)]
async fn no_sql(pool: &PgPool, sql: &'static str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(pool).await
}

#[cached_query(tables = auto)]
async fn bad_sql(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELEC value FROM counters").fetch_one(pool).await
}

#[invalidates(tables = auto)]
async fn writes_nothing(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM counters").fetch_one(pool).await
}

#[cached_query(tables = everything)]
async fn not_auto(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM counters").fetch_one(pool).await
}

#[cached_query(tables("users; DROP TABLE users"))]
async fn not_a_name(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

fn main() {}
