// A domain type that happens to be named like a pool is not silently left out of the key.
use cached_query::cached_query;

#[derive(serde::Serialize)]
pub struct Pool {
    id: i64,
}

#[cached_query]
async fn members(pool: &Pool) -> Result<i64, String> {
    Ok(pool.id)
}

fn main() {}
