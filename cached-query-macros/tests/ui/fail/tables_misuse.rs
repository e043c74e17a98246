use cached_query::{cached_query, invalidates};
use sqlx::PgPool;

#[cached_query(tables = auto)]
async fn no_sql(pool: &PgPool) -> Result<i64, sqlx::Error> {
    helper(pool).await
}

async fn helper(_: &PgPool) -> Result<i64, sqlx::Error> {
    Ok(1)
}

#[cached_query(tables = auto)]
async fn sql_from_a_variable(pool: &PgPool, sql: &'static str) -> Result<i64, sqlx::Error> {
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

#[cached_query(tables = auto)]
async fn in_another_macro(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let (a,) = futures_like!(sqlx::query_scalar("SELECT 1 FROM a").fetch_one(pool));
    a
}

#[cached_query(tables = auto)]
async fn function_in_from(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM feed_for($1)").bind(1).fetch_one(pool).await
}

macro_rules! futures_like {
    ($e:expr) => {
        ($e.await,)
    };
}
use futures_like;
