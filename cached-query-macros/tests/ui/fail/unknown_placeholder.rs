use cached_query::{cached_query, invalidates};

#[cached_query(invalidate = ["users", "user:<user_id>"])]
async fn get(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[invalidates("user:<id")]
async fn touch(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

fn main() {}
