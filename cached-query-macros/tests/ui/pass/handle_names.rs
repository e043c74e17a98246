// Pools and caches are left out of the key; a domain type named like one is keyed once it is
// imported under another name, or left out on purpose with `skip`.
use cached_query::{Cache, cached_query};
use sqlx::PgPool;

mod model {
    #[derive(serde::Serialize)]
    pub struct Pool {
        pub id: i64,
    }
}
use model::Pool as Group;

#[cached_query]
async fn by_pool(db: &PgPool, cache: &Cache, id: i64) -> Result<i64, String> {
    let _ = (db, cache);
    Ok(id)
}

#[cached_query]
async fn keyed(group: &Group) -> Result<i64, String> {
    Ok(group.id)
}

#[cached_query(skip(group))]
async fn skipped(group: &model::Pool) -> Result<i64, String> {
    Ok(group.id)
}

fn main() {}
