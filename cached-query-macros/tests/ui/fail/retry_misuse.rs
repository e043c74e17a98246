use cached_query::{retry, timed};
use sqlx::{PgConnection, PgExecutor, PgPool, Postgres, Transaction};

#[retry(attempts = 0)]
async fn zero_attempts(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[retry(backoff_ms = 500, max_backoff_ms = 100)]
async fn backoff_over_cap(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[retry(attempt = 3)]
async fn unknown_key(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[retry]
async fn on_a_connection(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(conn).await
}

#[retry]
async fn in_a_transaction(tx: &mut Transaction<'_, Postgres>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(&mut **tx).await
}

#[retry]
async fn on_any_executor(db: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(db).await
}

#[retry]
async fn maybe_on_a_connection(conn: Option<&mut PgConnection>) -> Result<i64, sqlx::Error> {
    let _ = conn;
    Ok(1)
}

#[retry]
async fn a_connection_in_a_tuple(
    (pool, conn): (&PgPool, &mut PgConnection),
) -> Result<i64, sqlx::Error> {
    let _ = (pool, conn);
    Ok(1)
}

#[retry]
async fn on_a_generic_connection<C>(conn: &mut C) -> Result<i64, sqlx::Error>
where
    C: std::ops::DerefMut<Target = PgConnection> + Send,
{
    let _ = conn;
    Ok(1)
}

#[retry]
async fn on_an_associated_connection(
    conn: &mut <sqlx::Postgres as sqlx::Database>::Connection,
) -> Result<i64, sqlx::Error> {
    let _ = conn;
    Ok(1)
}

struct Repo;

impl Repo {
    // The shape `#[async_trait]` gives a method: stacking is refused there.
    #[timed]
    #[retry]
    fn boxed(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, sqlx::Error>> + Send + '_>>
    {
        Box::pin(async move { Ok(1) })
    }
}

#[retry]
async fn on_any_connection(conn: &mut impl sqlx::Connection<Database = Postgres>) -> Result<i64, sqlx::Error> {
    let _ = conn;
    Ok(1)
}

#[retry]
async fn on_a_generic_executor<C>(conn: &mut C) -> Result<i64, sqlx::Error>
where
    for<'c> &'c mut C: sqlx::Executor<'c, Database = Postgres>,
{
    let _ = conn;
    Ok(1)
}

struct Repo2<DB>(std::marker::PhantomData<DB>);

impl<DB: sqlx::Database> Repo2<DB> {
    #[retry]
    async fn on_the_impl_database_connection(&self, conn: &mut DB::Connection) -> Result<i64, sqlx::Error> {
        let _ = conn;
        Ok(1)
    }
}

#[retry(max_backoff_ms = 10)]
async fn cap_under_the_default_backoff(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[retry]
#[retry(attempts = 2)]
async fn twice(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[retry]
fn not_async(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let _ = pool;
    Ok(1)
}

#[retry]
async fn not_a_result(pool: &PgPool) -> i64 {
    let _ = pool;
    1
}

#[derive(Debug)]
struct MyError;

#[retry]
async fn not_an_sqlx_error(pool: &PgPool) -> Result<i64, MyError> {
    let _ = pool;
    Err(MyError)
}

#[retry]
async fn moves_its_argument(pool: &PgPool, name: String) -> Result<i64, sqlx::Error> {
    let owned: String = name;
    sqlx::query_scalar("SELECT length($1)::bigint").bind(owned).fetch_one(pool).await
}

fn main() {}
