use cached_query::cached_query;
use sqlx::{Postgres, Transaction};

#[cached_query]
async fn name(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(&mut **tx).await
}

fn main() {}

#[cached_query]
async fn by_alias(tx: &mut sqlx::PgTransaction<'_>, id: i64) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(&mut **tx).await
}
