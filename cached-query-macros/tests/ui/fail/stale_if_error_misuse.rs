use cached_query::cached_query;
use std::collections::HashMap;

#[cached_query(ttl = 60, stale_if_error = 0)]
async fn nothing_kept(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[cached_query(batch = ids, stale_if_error = 3600)]
async fn with_a_batch(ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    Ok(ids.iter().map(|&id| (id, id)).collect())
}

fn main() {}
