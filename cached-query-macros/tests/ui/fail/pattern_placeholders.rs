use cached_query::cached_query;

struct Path<T>(T);

#[cached_query(invalidate = "article:<id>")]
async fn article(Path(slug): Path<String>) -> Result<String, String> {
    Ok(slug)
}

#[cached_query(invalidate = "article:<slug.>")]
async fn bad_syntax(Path(slug): Path<String>) -> Result<String, String> {
    Ok(slug)
}

#[cached_query(skip(ctx))]
async fn skip_unbound(Path(slug): Path<String>) -> Result<String, String> {
    Ok(slug)
}

fn main() {}
