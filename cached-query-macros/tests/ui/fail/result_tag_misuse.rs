use cached_query::{cached_query, invalidates};

#[derive(serde::Serialize, serde::Deserialize)]
struct Article {
    id: i64,
}

#[invalidates("article:<ret.id>")]
async fn touch(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

#[cached_query(invalidate = "article:<ret.id>")]
async fn shadowed(ret: i64) -> Result<Article, String> {
    Ok(Article { id: ret })
}

#[cached_query(invalidate = "article:<ret.slug>")]
async fn no_such_field(id: i64) -> Result<Option<Article>, String> {
    Ok(Some(Article { id }))
}

fn main() {}

cached_query::tags! {
    fn article(id: i64) = "article:{id}";
}

#[cached_query(invalidate = [article(ret.id)])]
async fn shadowed_in_an_expression(ret: i64) -> Result<Article, String> {
    Ok(Article { id: ret })
}
