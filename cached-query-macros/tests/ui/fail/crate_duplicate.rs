use cached_query::{cached_query, invalidates, timed};

#[cached_query(crate = cached_query, ttl = 5, crate = cached_query)]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[invalidates("user:<id>", crate = cached_query, crate = cached_query)]
async fn touch(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

#[timed(crate = ::cached_query, crate = ::cached_query)]
fn sync() {}

fn main() {}
