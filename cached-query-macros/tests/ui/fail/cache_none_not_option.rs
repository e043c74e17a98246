use cached_query::cached_query;

#[cached_query(cache_none = false)]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
