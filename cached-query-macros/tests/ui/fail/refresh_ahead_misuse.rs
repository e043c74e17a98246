use cached_query::cached_query;
use std::collections::HashMap;

#[cached_query(ttl = 60, refresh_ahead = 0)]
async fn never(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[cached_query(ttl = 60, refresh_ahead = 60)]
async fn whole_life(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[cached_query(ttl = 60, refresh_ahead = "10")]
async fn not_a_number(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[cached_query(batch = ids, refresh_ahead = 10)]
async fn with_a_batch(ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    Ok(ids.iter().map(|&id| (id, id)).collect())
}

#[cached_query(batch = ids, lease = false)]
async fn lease_with_a_batch(ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    Ok(ids.iter().map(|&id| (id, id)).collect())
}

#[cached_query(lease = "no")]
async fn lease_not_a_bool(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
