use cached_query::cached_query;

#[cached_query(ttl = 60, invalidate = "a", ttl = 30)]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
