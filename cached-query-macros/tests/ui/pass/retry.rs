//! `#[retry]` on the shapes it accepts: a pool generic over the database (the `where` clause
//! that names `DB::Connection` is about the pool), a domain type merely named `Transaction`,
//! `#[invalidates]` above it or above `#[timed]`, and all three stacking attributes by path.
#![deny(unused_imports)]

use cached_query::{Cache, invalidates, retry, timed};
use sqlx::{Database, Executor, PgPool, Pool};

#[retry]
pub async fn generic_pool<DB: Database>(pool: &Pool<DB>) -> Result<i64, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let _ = pool;
    Ok(1)
}

/// A payments model: not sqlx's transaction.
#[derive(serde::Serialize)]
pub struct Transaction {
    pub amount: i64,
}

#[retry(attempts = 2)]
pub async fn record(pool: &PgPool, rows: &[Transaction]) -> Result<i64, sqlx::Error> {
    let _ = pool;
    Ok(rows.iter().map(|t| t.amount).sum())
}

/// A domain type with a lifetime, also named `Transaction`.
pub struct Ledger<'a> {
    pub entries: &'a [Transaction],
}

#[retry]
pub async fn post(pool: &PgPool, ledger: &Ledger<'_>) -> Result<i64, sqlx::Error> {
    let _ = pool;
    Ok(ledger.entries.len() as i64)
}

/// `#[invalidates]` stacks like the others: one invalidation after the retried call.
#[invalidates("account:<id>", cache = cache)]
#[retry]
pub async fn rename(cache: &Cache, pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    let _ = (pool, id);
    Ok(())
}

#[invalidates("account:<id>", cache = cache)]
#[timed]
pub async fn touch(cache: &Cache, pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    let _ = (pool, id);
    Ok(())
}

#[cached_query::timed(name = "retry.all")]
#[cached_query::cached_query(cache = cache, ttl = 5)]
#[cached_query::retry(attempts = 4)]
pub async fn all(cache: &Cache, pool: &PgPool, id: i64) -> Result<i64, sqlx::Error> {
    let _ = pool;
    Ok(id)
}

fn main() {}
