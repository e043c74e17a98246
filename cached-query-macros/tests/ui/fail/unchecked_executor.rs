use cached_query::{cached_query, invalidates};
use sqlx::{Executor, PgExecutor, PgPool, Postgres};

#[cached_query]
async fn name<'c>(exec: impl PgExecutor<'c>, id: i64) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(exec).await
}

#[cached_query(ttl = 5)]
async fn generic<'c, E>(exec: E, id: i64) -> Result<String, sqlx::Error>
where
    E: Executor<'c, Database = Postgres>,
{
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(exec).await
}

#[invalidates("user:<id>")]
async fn rename<'c>(exec: impl PgExecutor<'c>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(exec).await?;
    Ok(())
}

#[cached_query(assume_no_transaction = true)]
async fn nothing_to_assume(pool: &PgPool, id: i64) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(pool).await
}

fn main() {}
