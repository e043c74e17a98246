use cached_query::cached_query;
use std::collections::BTreeMap;

#[cached_query(batch = ids)]
async fn keyed_by_another_type(ids: &[i64]) -> Result<BTreeMap<String, String>, String> {
    Ok(ids.iter().map(|i| (i.to_string(), i.to_string())).collect())
}

fn main() {}
