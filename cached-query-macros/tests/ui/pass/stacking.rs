//! `#[timed]` and `#[cached_query]` stacked in both orders, by name and by path: it compiles,
//! and the imports of the attributes count as used.
#![deny(unused_imports)]

mod by_name {
    use cached_query::{Cache, cached_query, timed};

    #[cached_query(cache = cache)]
    #[timed]
    pub async fn inside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(id)
    }

    #[timed(threshold_ms = 5)]
    #[cached_query(cache = cache, ttl = 5)]
    pub async fn outside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(id)
    }
}

mod by_path {
    use cached_query::Cache;

    /// Doc comments and other attributes stay where they were.
    #[cached_query::cached_query(cache = cache)]
    #[allow(clippy::needless_question_mark)]
    #[cached_query::timed(name = "stacking.inside")]
    pub async fn inside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(Ok::<_, String>(id)?)
    }

    #[cached_query::timed]
    #[cached_query::cached_query(cache = cache)]
    pub async fn outside(cache: &Cache, id: i64) -> Result<i64, String> {
        Ok(id)
    }
}

fn assert_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn futures_stay_send(cache: cached_query::Cache) {
    assert_send(async move {
        by_name::inside(&cache, 1).await.ok();
        by_name::outside(&cache, 1).await.ok();
        by_path::inside(&cache, 1).await.ok();
        by_path::outside(&cache, 1).await.ok();
    });
}

fn main() {}
