use cached_query::cached_query;

#[cached_query(ttl = 60)]
async fn get(id: i64) -> Option<i64> {
    Some(id)
}

#[cached_query]
async fn nothing(id: i64) {
    let _ = id;
}

fn main() {}
