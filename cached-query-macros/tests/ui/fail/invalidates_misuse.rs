use cached_query::invalidates;

#[invalidates()]
async fn none(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

#[invalidates("user:<id>")]
fn not_async(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

fn main() {}
