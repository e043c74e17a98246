//! Every signature shape the attributes support, compiled.
use cached_query::{Cache, cached_query, invalidates};
use serde::{Deserialize, Serialize};
use sqlx::pool::PoolConnection;
use sqlx::{Acquire, Executor, PgConnection, PgPool, Pool, Postgres};
use std::sync::Arc;

#[derive(Serialize, Deserialize)]
pub struct User {
    id: i64,
}

#[derive(Serialize)]
pub struct Filter {
    name: String,
    org: Org,
}

#[derive(Serialize)]
pub struct Org {
    id: i64,
}

#[derive(Debug)]
pub struct MyError;
pub type MyResult<T> = std::result::Result<T, MyError>;

/// Doc comments and attributes are kept.
#[cached_query(ttl = 300, invalidate = "user:<id>")]
#[allow(clippy::needless_question_mark)]
pub async fn get_user(pool: &PgPool, id: i64) -> Result<Option<User>, sqlx::Error> {
    Ok(sqlx::query_scalar("SELECT $1").bind(id).fetch_optional(pool).await?.map(|id| User { id }))
}

#[cached_query(invalidate = ["org:<filter.org.id>", "name:<filter.name>"], name = "users.search", version = 2)]
pub(crate) async fn search(pool: &Pool<Postgres>, filter: &Filter) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar("SELECT 1::BIGINT WHERE $1 <> ''").bind(&filter.name).fetch_all(pool).await
}

#[cached_query(assume_no_transaction = true)]
async fn with_executor<'c>(exec: impl Executor<'c, Database = Postgres>, id: i64) -> MyResult<i64> {
    let _ = (exec, id);
    Ok(id)
}

#[cached_query(skip(label), assume_no_transaction = true)]
async fn generic_executor<'c, E>(exec: E, id: i64, label: &str) -> Result<i64, MyError>
where
    E: Executor<'c, Database = Postgres>,
{
    let _ = (exec, label);
    Ok(id)
}

#[cached_query(cache_none = false, assume_no_transaction = true)]
async fn on_connection<'a, A: Acquire<'a, Database = Postgres>>(acquire: A, conn: &mut PgConnection, id: i64) -> Result<Option<i64>, sqlx::Error> {
    let _ = acquire;
    Ok(sqlx::query_scalar("SELECT $1").bind(id).fetch_optional(conn).await?)
}

#[invalidates("user:<id>")]
async fn rename_in_transaction(tx: &mut sqlx::Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

#[invalidates("user:<id>")]
async fn rename_by_alias(tx: &mut sqlx::PgTransaction<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

#[invalidates("user:<id>")]
async fn rename_on_connection(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(conn).await?;
    Ok(())
}

#[invalidates("user:<id>", assume_no_transaction = true)]
async fn rename_with_executor<'c>(exec: impl sqlx::PgExecutor<'c>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = 'x' WHERE id = $1").bind(id).execute(exec).await?;
    Ok(())
}

#[cached_query]
async fn on_pool_connection(mut conn: PoolConnection<Postgres>, other: &mut PoolConnection<Postgres>, id: i64) -> Result<i64, sqlx::Error> {
    let _ = (&mut conn, other);
    Ok(id)
}

#[cached_query]
async fn with_impl_trait(value: impl Serialize + Send, n: u8) -> Result<u8, String> {
    let _ = value;
    if n > 10 {
        return Err("too big".into());
    }
    let parsed: u8 = "1".parse().map_err(|_| "parse".to_string())?;
    Ok(n + parsed)
}

pub struct Service {
    cache: Cache,
    shared: Arc<Cache>,
    tenant: String,
}

impl Service {
    #[cached_query(cache = self.cache, key = (&self.tenant, id))]
    pub async fn get(&self, id: i64) -> Result<String, String> {
        Ok(format!("{}:{id}", self.tenant))
    }

    #[cached_query(cache = self.shared, invalidate = "t:<self.tenant>")]
    async fn get_mut(&mut self, id: i64) -> Result<i64, String> {
        self.tenant.push('!');
        Ok(id)
    }

    #[invalidates("user:<id>", "tenant:<self.tenant>", cache = &self.cache)]
    pub async fn rename(&self, id: i64) -> Result<(), String> {
        let _ = id;
        Ok(())
    }

    fn uses(&self) -> (&Arc<Cache>, &Cache) {
        (&self.shared, &self.cache)
    }
}

fn assert_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn impl_executor_accepts_a_pool(pool: &PgPool) {
    assert_send(with_executor(pool, 1));
}

#[allow(dead_code)]
fn futures_stay_send(pool: PgPool, s: Service, filter: Filter) {
    assert_send(get_user(&pool, 1));
    assert_send(search(&pool, &filter));
    assert_send(async move { s.get(1).await });
    assert_send(with_impl_trait(1u8, 2));
}

fn assert_handle<T: Clone + Send + Sync + 'static>() {}
fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

fn main() {
    timed_shapes::run();
    assert_handle::<Cache>();
    assert_error::<cached_query::Error>();
    let _ = (generic_executor::<&PgPool>, on_connection::<&PgPool>, on_pool_connection);
    let _ = (rename_in_transaction, rename_by_alias, rename_on_connection);
    let _ = async |pool: &PgPool| rename_with_executor(pool, 1).await;
    let _ = Service::uses;
}

mod timed_shapes {
    use cached_query::{Cache, cached_query, timed};

    #[timed]
    pub async fn plain(pool: &sqlx::PgPool) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT 1::BIGINT").fetch_one(pool).await
    }

    #[timed(threshold_ms = 50, name = "shapes.sync", level = "info")]
    pub fn sync_unit() {}

    #[timed]
    pub fn returns_impl() -> impl Iterator<Item = u8> {
        [1u8, 2].into_iter()
    }

    #[timed]
    pub fn borrows<'a>(items: &'a [String], fallback: &'a String) -> &'a String {
        items.first().unwrap_or(fallback)
    }

    #[timed(level = "debug")]
    #[cached_query(cache = cache, ttl = 5)]
    pub async fn outside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(id)
    }

    #[cached_query(cache = cache)]
    #[cached_query::timed]
    pub async fn inside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(id)
    }

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code)]
    fn timed_futures_stay_send(pool: sqlx::PgPool, cache: Cache) {
        assert_send(async move { plain(&pool).await });
        assert_send(async move {
            outside(&cache, 1).await.ok();
            inside(&cache, 1).await.ok();
        });
    }

    pub fn run() {
        sync_unit();
        assert_eq!(returns_impl().count(), 2);
        let items = vec![String::from("a")];
        let fallback = String::from("b");
        assert_eq!(borrows(&items, &fallback), "a");
    }
}
