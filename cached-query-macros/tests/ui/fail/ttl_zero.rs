use cached_query::cached_query;

#[cached_query(ttl = 0)]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[cached_query(ttl = "5")]
async fn get2(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
