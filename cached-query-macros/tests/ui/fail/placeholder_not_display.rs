use cached_query::{cached_query, invalidates};

#[derive(serde::Serialize)]
struct Filter {
    org: i64,
}

#[cached_query(invalidate = ["org:<filter>", "org:<owner>"])]
async fn search(filter: Filter, owner: Option<Filter>) -> Result<i64, String> {
    Ok(filter.org + owner.map_or(0, |o| o.org))
}

#[invalidates(Filter { org: 1 })]
async fn touch() -> Result<(), String> {
    Ok(())
}

fn main() {}
