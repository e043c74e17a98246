//! Every batch shape `#[cached_query(batch = …)]` supports, compiled.
use cached_query::{Cache, cached_query, timed};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap};

#[derive(Serialize, Deserialize)]
pub struct User {
    id: i64,
}

#[derive(Debug)]
pub struct MyError;
pub type MyResult<T> = std::result::Result<T, MyError>;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    org: i64,
    id: i64,
}

#[cached_query(ttl = 300, batch = ids, invalidate = "user:<ids>")]
pub async fn slice(pool: &PgPool, ids: &[i64]) -> Result<HashMap<i64, User>, sqlx::Error> {
    let _ = pool;
    Ok(ids.iter().map(|&id| (id, User { id })).collect())
}

#[cached_query(batch = ids, cache_none = false)]
pub async fn owned(mut ids: Vec<i64>) -> MyResult<BTreeMap<i64, String>> {
    ids.sort();
    Ok(ids.into_iter().map(|i| (i, i.to_string())).collect())
}

#[cached_query(batch = keys, invalidate = ["org:<keys.org>", "user:<keys.id>", "region:<region>"])]
pub async fn borrowed_vec(
    conn: &mut PgConnection,
    region: &str,
    keys: &Vec<Key>,
) -> sqlx::Result<HashMap<Key, String, std::hash::RandomState>> {
    let _ = (conn, region);
    Ok(keys.iter().map(|k| (k.clone(), k.id.to_string())).collect())
}

#[cached_query(batch = names, name = "by_name", version = 2)]
#[timed(threshold_ms = 10)]
pub async fn stacked_with_timed(names: &[String]) -> Result<HashMap<String, usize>, String> {
    Ok(names.iter().map(|n| (n.clone(), n.len())).collect())
}

cached_query::tags! {
    pub fn profile(id: i64) = "profile:{id}";
}

/// In a tag expression the batch parameter is a reference to one element.
#[cached_query(batch = ids, invalidate = [profile(*ids), "user:<ids>"])]
pub async fn with_a_tag_function(ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    Ok(ids.iter().map(|&id| (id, id)).collect())
}

pub struct Repo {
    cache: Cache,
}

impl Repo {
    #[cached_query(cache = self.cache, batch = ids, invalidate = "user:<ids>")]
    pub async fn users(&self, ids: &[i64]) -> Result<HashMap<i64, User>, String> {
        Ok(ids.iter().map(|&id| (id, User { id })).collect())
    }
}

fn assert_send<T: Send>(_: T) {}

/// Callable from a spawned task: the future is `Send`.
pub fn spawned(pool: PgPool, repo: Repo) {
    assert_send(async move {
        let _ = slice(&pool, &[1, 2]).await;
        let _ = repo.users(&[1]).await;
    });
}

fn main() {}
