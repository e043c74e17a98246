use cached_query::cached_query;

#[cached_query(tll = 60)]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

fn main() {}
