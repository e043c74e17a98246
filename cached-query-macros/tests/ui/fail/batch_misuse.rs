use cached_query::cached_query;
use std::collections::HashMap;

#[cached_query(batch = idz)]
async fn missing_parameter(ids: &[i64]) -> Result<HashMap<i64, String>, String> {
    Ok(ids.iter().map(|i| (*i, i.to_string())).collect())
}

#[cached_query(batch = id)]
async fn not_a_collection(id: i64) -> Result<HashMap<i64, String>, String> {
    Ok(HashMap::from([(id, id.to_string())]))
}

#[cached_query(batch = ids)]
async fn not_a_map(ids: &[i64]) -> Result<Vec<String>, String> {
    Ok(ids.iter().map(|i| i.to_string()).collect())
}

#[cached_query(batch = ids, key = ids.len())]
async fn with_a_key(ids: &[i64]) -> Result<HashMap<i64, String>, String> {
    Ok(ids.iter().map(|i| (*i, i.to_string())).collect())
}

#[cached_query(batch = ids, skip(ids))]
async fn skipped(ids: &[i64]) -> Result<HashMap<i64, String>, String> {
    Ok(ids.iter().map(|i| (*i, i.to_string())).collect())
}

#[cached_query(batch = ids, invalidate = "user:<ret>")]
async fn result_tags(ids: &[i64]) -> Result<HashMap<i64, String>, String> {
    Ok(ids.iter().map(|i| (*i, i.to_string())).collect())
}

fn main() {}
