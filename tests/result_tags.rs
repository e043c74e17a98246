//! Tags from the result (`<ret…>`): an article fetched by slug is tagged by its id and its
//! author's id, which only the row knows. The guarantee is the one argument tags give: a
//! result computed before an invalidation is never served after that invalidation returned.

mod common;

use cached_query::{Cache, cached_query};
use common::{keys_under, raw, redis_cache, redis_url, unique_ns};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct Article {
    id: i64,
    slug: String,
    author_id: i64,
    section: String,
}

async fn schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE articles (id BIGINT PRIMARY KEY, slug TEXT UNIQUE NOT NULL,
                                author_id BIGINT NOT NULL, section TEXT NOT NULL);
         CREATE TABLE counters (id INT PRIMARY KEY, name TEXT UNIQUE NOT NULL, value BIGINT NOT NULL);
         INSERT INTO articles VALUES (1, 'hello', 7, 'news'), (2, 'again', 7, 'news'),
                                     (3, 'other', 8, 'sport');
         INSERT INTO counters VALUES (1, 'hits', 0);",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[cached_query(cache = cache, invalidate = ["article:<ret.id>", "user:<ret.author_id>"])]
async fn by_slug(pool: &PgPool, cache: &Cache, slug: &str) -> sqlx::Result<Option<Article>> {
    sqlx::query_as("SELECT * FROM articles WHERE slug = $1")
        .bind(slug)
        .fetch_optional(pool)
        .await
}

#[cached_query(cache = cache, invalidate = "article:<ret.id>")]
async fn by_author(pool: &PgPool, cache: &Cache, author: i64) -> sqlx::Result<Vec<Article>> {
    sqlx::query_as("SELECT * FROM articles WHERE author_id = $1 ORDER BY id")
        .bind(author)
        .fetch_all(pool)
        .await
}

/// A template mixing a parameter the body consumes with the result.
#[cached_query(cache = cache, invalidate = "in:<section>:<ret.id>")]
async fn first_in(pool: &PgPool, cache: &Cache, section: String) -> sqlx::Result<Article> {
    sqlx::query_as("SELECT * FROM articles WHERE section = $1 ORDER BY id LIMIT 1")
        .bind(section)
        .fetch_one(pool)
        .await
}

/// (hits, misses)
fn counts(cache: &Cache) -> (u64, u64) {
    let s = cache.stats();
    (s.hits, s.misses)
}

async fn result_tags_follow_the_data(pool: &PgPool, cache: &Cache) {
    let hello = by_slug(pool, cache, "hello").await.unwrap().unwrap();
    assert_eq!((hello.id, hello.author_id), (1, 7));
    by_slug(pool, cache, "hello").await.unwrap();
    assert_eq!(
        counts(cache),
        (1, 1),
        "a hit that checked its result tags is one hit"
    );
    cache.invalidate("user:8").await.unwrap();
    by_slug(pool, cache, "hello").await.unwrap();
    assert_eq!(
        counts(cache),
        (2, 1),
        "another author's tag does not reach it"
    );
    cache.invalidate("user:7").await.unwrap();
    by_slug(pool, cache, "hello").await.unwrap();
    assert_eq!(
        counts(cache),
        (2, 2),
        "its author's tag does (a failed check is a miss)"
    );
    cache.invalidate("article:1").await.unwrap();
    by_slug(pool, cache, "hello").await.unwrap();
    assert_eq!(counts(cache), (2, 3), "so does its id's");
    assert_eq!(cache.stats().errors, 0);

    // `None` is cached, with no result tag.
    assert_eq!(by_slug(pool, cache, "nope").await.unwrap(), None);
    assert_eq!(by_slug(pool, cache, "nope").await.unwrap(), None);
    assert_eq!(counts(cache), (3, 4));

    // A `Vec`: one tag per element; an empty one is cached untagged.
    assert_eq!(by_author(pool, cache, 7).await.unwrap().len(), 2);
    assert_eq!(by_author(pool, cache, 9).await.unwrap().len(), 0);
    cache.invalidate("article:3").await.unwrap();
    by_author(pool, cache, 7).await.unwrap();
    by_author(pool, cache, 9).await.unwrap();
    assert_eq!(counts(cache), (5, 6), "article:3 is not among author 7's");
    cache.invalidate("article:2").await.unwrap();
    by_author(pool, cache, 7).await.unwrap();
    assert_eq!(counts(cache), (5, 7), "article:2 is");

    // Parameters in a result template are rendered before the body consumes them.
    first_in(pool, cache, "news".into()).await.unwrap();
    first_in(pool, cache, "news".into()).await.unwrap();
    assert_eq!(counts(cache), (6, 8));
    cache.invalidate("in:news:1").await.unwrap();
    first_in(pool, cache, "news".into()).await.unwrap();
    assert_eq!(counts(cache), (6, 9));
    assert_eq!(cache.stats().errors, 0);
}

#[sqlx::test]
async fn result_tags_follow_the_data_redis(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("ret-redis")).await;
    result_tags_follow_the_data(&pool, &cache).await;
}

#[sqlx::test]
async fn result_tags_follow_the_data_memory(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    result_tags_follow_the_data(&pool, &cache).await;
}

#[sqlx::test]
async fn result_tags_follow_the_data_near_cache(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("ret-near"))
        .near_cache(100)
        .build()
        .await
        .unwrap();
    result_tags_follow_the_data(&pool, &cache).await;
    // Near hits check result tags too: an invalidation by another process reaches them.
    by_slug(&pool, &cache, "other").await.unwrap();
    by_slug(&pool, &cache, "other").await.unwrap();
    by_slug(&pool, &cache, "other").await.unwrap();
    assert!(cache.stats().near_hits >= 1, "{:?}", cache.stats());
    let other = redis_cache(&redis_url(), cache.namespace()).await;
    other.invalidate("user:8").await.unwrap();
    let before = cache.stats().misses;
    common::within(
        std::time::Duration::from_secs(5),
        "the near cache to drop it",
        || {
            let (pool, cache) = (pool.clone(), cache.clone());
            async move {
                by_slug(&pool, &cache, "other").await.unwrap();
                cache.stats().misses > before
            }
        },
    )
    .await;
}

#[sqlx::test]
async fn result_tags_follow_the_data_cluster(pool: PgPool) {
    schema(&pool).await;
    let cluster = common::Cluster::start();
    let cache = || async {
        Cache::builder()
            .redis_cluster(cluster.urls())
            .namespace("ret-cluster")
            .build()
            .await
            .unwrap()
    };
    // Each master new to the namespace clears it once when first connected (see the README's
    // Redis Cluster section): done by another process first, so the counts below are exact.
    let first = cache().await;
    let tags: Vec<String> = (0..60).map(|n| format!("warm:{n}")).collect();
    first.invalidate_many(&tags).await.unwrap();
    result_tags_follow_the_data(&pool, &cache().await).await;
}

/// Holds a query between its read and its return.
#[derive(Default)]
struct Gate {
    reached: Notify,
    release: Notify,
}

#[cached_query(cache = cache, invalidate = "counter:<ret.0>", skip(gate))]
async fn gated(pool: &PgPool, cache: &Cache, name: &str, gate: &Gate) -> sqlx::Result<(i32, i64)> {
    let row = sqlx::query_as("SELECT id, value FROM counters WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await?;
    gate.reached.notify_one();
    gate.release.notified().await;
    Ok(row)
}

/// The race result tags exist to win: a query reads the old row, the row changes and its
/// tag is invalidated while the query is still running, then the query returns. The old
/// value goes to that caller, but is not stored: the next call reads the new row.
async fn a_result_read_before_an_invalidation_is_not_stored(pool: &PgPool, cache: &Cache) {
    let gate = Arc::new(Gate::default());
    let slow = {
        let (pool, cache, gate) = (pool.clone(), cache.clone(), gate.clone());
        tokio::spawn(async move { gated(&pool, &cache, "hits", &gate).await.unwrap() })
    };
    gate.reached.notified().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE counters SET value = 1 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    cache
        .commit_and_invalidate(tx, ["counter:1"])
        .await
        .unwrap();
    gate.release.notify_one();
    assert_eq!(slow.await.unwrap(), (1, 0), "its caller gets what it read");

    // A permit lets a miss through the gate; a hit does not use it.
    gate.release.notify_one();
    assert_eq!(
        gated(pool, cache, "hits", &gate).await.unwrap(),
        (1, 1),
        "the next call reads the new row"
    );
    gate.release.notify_one();
    assert_eq!(gated(pool, cache, "hits", &gate).await.unwrap(), (1, 1));
    assert_eq!(
        counts(cache),
        (1, 2),
        "stored after the second query, served by the third call"
    );
}

#[sqlx::test]
async fn a_result_read_before_an_invalidation_is_not_stored_redis(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("ret-race")).await;
    a_result_read_before_an_invalidation_is_not_stored(&pool, &cache).await;
}

#[sqlx::test]
async fn a_result_read_before_an_invalidation_is_not_stored_memory(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    a_result_read_before_an_invalidation_is_not_stored(&pool, &cache).await;
}

#[cached_query(cache = cache, invalidate = "counter:<ret.0>")]
async fn counter_by_name(pool: &PgPool, cache: &Cache, name: &str) -> sqlx::Result<(i32, i64)> {
    sqlx::query_as("SELECT id, value FROM counters WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
}

/// The stale-set stress test with result tags only: readers look the counter up by name,
/// writers invalidate it by id. No reader may see a value older than the last invalidation
/// that completed before its read began.
async fn no_stale_reads(pool: PgPool, cache: Cache) {
    common::no_stale_reads(pool, cache, |pool, cache| async move {
        counter_by_name(&pool, &cache, "hits").await.unwrap().1
    })
    .await;
}

#[sqlx::test]
async fn no_stale_reads_with_result_tags_redis(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Redis, "ret-stress").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_with_result_tags_near_cache(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::NearCache, "ret-stress-near").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_with_result_tags_memory(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Memory, "ret-stress-mem").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_with_result_tags_cluster(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Cluster, "ret-stress-cluster").await;
    no_stale_reads(pool, cache).await;
}

/// Tag tokens written before sequences existed (16 random bytes), and a sequence key lost
/// (evicted, deleted): a result is not stored against a token it cannot order, the tag is
/// given a sequenced token, and the next call stores.
#[sqlx::test]
async fn tokens_without_a_comparable_sequence_are_renewed(pool: PgPool) {
    schema(&pool).await;
    let (url, ns) = (redis_url(), unique_ns("ret-renew"));
    let cache = redis_cache(&url, &ns).await;
    let mut conn = raw(&url).await;
    by_slug(&pool, &cache, "hello").await.unwrap();
    let tags: Vec<String> = keys_under(&url, &ns)
        .await
        .into_iter()
        .filter(|k| k.contains(":t:"))
        .collect();
    assert_eq!(tags.len(), 2, "article:1 and user:7");
    for tag in &tags {
        let token: Vec<u8> = redis::cmd("GET")
            .arg(tag)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(token.len(), 24, "a sequenced token");
        // As an older version wrote them.
        let _: () = redis::cmd("SET")
            .arg(tag)
            .arg(&[9u8; 16][..])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    by_slug(&pool, &cache, "hello").await.unwrap();
    by_slug(&pool, &cache, "hello").await.unwrap();
    by_slug(&pool, &cache, "hello").await.unwrap();
    assert_eq!(
        counts(&cache),
        (1, 3),
        "one miss not stored (renewing), one stored, one hit"
    );
    for tag in &tags {
        let token: Vec<u8> = redis::cmd("GET")
            .arg(tag)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(token.len(), 24, "renewed");
    }

    // The sequence key lost: a new epoch; at most one extra miss, then hits again.
    let _: () = redis::cmd("DEL")
        .arg(format!("{ns}:q"))
        .query_async(&mut conn)
        .await
        .unwrap();
    cache.invalidate("article:1").await.unwrap();
    for _ in 0..4 {
        by_slug(&pool, &cache, "hello").await.unwrap();
    }
    let (hits, misses) = counts(&cache);
    assert!(hits >= 3 && misses <= 5, "{:?}", cache.stats());
    assert_eq!(cache.stats().errors, 0);
}

#[cached_query(cache = cache, invalidate = "article:<ret.id>")]
async fn article_of(cache: &Cache, id: i64) -> Result<Option<Article>, String> {
    Ok(Some(Article {
        id,
        slug: format!("a{id}"),
        author_id: 1,
        section: "news".into(),
    }))
}

/// What result tags cost in Redis commands (`INFO commandstats` of a private server): a
/// hit reads its result tags' stamps in a second `MGET`; a miss adds one script call (the
/// tags' stamps and the sequence) before its `SET`.
#[tokio::test]
async fn the_cost_of_result_tags_in_round_trips() {
    let server = common::RedisServer::start();
    let cache = redis_cache(&server.url(), "cost").await;
    article_of(&cache, 1).await.unwrap();
    server.cli(&["CONFIG", "RESETSTAT"]);
    article_of(&cache, 2).await.unwrap();
    assert_eq!(
        (
            server.command_calls("mget"),
            server.command_calls("eval"),
            server.command_calls("set")
        ),
        (1, 1, 2),
        "a miss: MGET (entry, stamps, sequence), one script for the result tags (its SET NX \
         creates a missing tag, a no-op otherwise), the entry's SET"
    );
    server.cli(&["CONFIG", "RESETSTAT"]);
    article_of(&cache, 2).await.unwrap();
    assert_eq!(server.command_calls("mget"), 2, "a hit: two MGETs");
    assert_eq!(
        server.command_calls("eval") + server.command_calls("set"),
        0
    );
    assert_eq!(counts(&cache), (1, 2));
}

/// The same query before and after result tags were added to it (same name, same key): an
/// entry stored without result tags was never checked against them and is not served.
#[cached_query(cache = cache, name = "ret.shared")]
async fn shared_before(pool: &PgPool, cache: &Cache, slug: &str) -> sqlx::Result<Option<Article>> {
    sqlx::query_as("SELECT * FROM articles WHERE slug = $1")
        .bind(slug)
        .fetch_optional(pool)
        .await
}

#[cached_query(cache = cache, name = "ret.shared", invalidate = "article:<ret.id>")]
async fn shared_after(pool: &PgPool, cache: &Cache, slug: &str) -> sqlx::Result<Option<Article>> {
    sqlx::query_as("SELECT * FROM articles WHERE slug = $1")
        .bind(slug)
        .fetch_optional(pool)
        .await
}

#[sqlx::test]
async fn entries_stored_without_result_tags_are_not_served_by_a_site_with_them(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("ret-added")).await;
    shared_before(&pool, &cache, "hello").await.unwrap();
    sqlx::query("UPDATE articles SET section = 'sport' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    cache.invalidate("article:1").await.unwrap();
    let now = shared_after(&pool, &cache, "hello").await.unwrap().unwrap();
    assert_eq!(now.section, "sport");
    shared_after(&pool, &cache, "hello").await.unwrap();
    assert_eq!(
        counts(&cache),
        (1, 2),
        "the second read after the deploy is a hit"
    );
    // `None` from a result-tagged site is stored (with no result tag) and served.
    assert_eq!(shared_after(&pool, &cache, "nope").await.unwrap(), None);
    assert_eq!(shared_after(&pool, &cache, "nope").await.unwrap(), None);
    assert_eq!(counts(&cache), (2, 3));
}

#[cached_query(cache = cache, invalidate = "article:<id>")]
async fn by_id(pool: &PgPool, cache: &Cache, id: i64) -> sqlx::Result<Option<Article>> {
    sqlx::query_as("SELECT * FROM articles WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Redis Cluster: the sequence's node comes back with an older count in the same epoch
/// (restarted from an older snapshot, or a replica behind it promoted) while the tags, on
/// other nodes, hold later counts. Invalidations must still take effect: a tag that keeps a
/// count past ours is written again at a fresh count, and if still refused, in a new epoch.
async fn a_sequence_that_goes_back(pool: PgPool, ns: &str, back_to: u64, new_epoch: bool) {
    schema(&pool).await;
    let cluster = common::Cluster::start();
    let cache = Cache::builder()
        .redis_cluster(cluster.urls())
        .namespace(ns)
        .build()
        .await
        .unwrap();
    by_id(&pool, &cache, 1).await.unwrap(); // the tag gets a counted token
    for _ in 0..5 {
        cache.invalidate("article:1").await.unwrap();
    }
    let q = format!("{ns}:q");
    let node = &cluster.nodes[cluster.master_of(&q)];
    let mut conn = raw(&node.url()).await;
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&q)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut older = value[..8].to_vec();
    older.extend_from_slice(&back_to.to_be_bytes());
    let _: () = redis::cmd("SET")
        .arg(&q)
        .arg(older)
        .query_async(&mut conn)
        .await
        .unwrap();

    assert_eq!(
        by_id(&pool, &cache, 1).await.unwrap().unwrap().section,
        "news"
    );
    sqlx::query("UPDATE articles SET section = 'sport' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    cache.invalidate("article:1").await.unwrap();
    assert_eq!(
        by_id(&pool, &cache, 1).await.unwrap().unwrap().section,
        "sport",
        "the invalidation took effect"
    );
    let now: Vec<u8> = redis::cmd("GET")
        .arg(&q)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(now[..8] != value[..8], new_epoch, "a new epoch when needed");
}

#[sqlx::test]
async fn a_sequence_that_goes_back_does_not_swallow_invalidations(pool: PgPool) {
    // The tag holds count 5 (created at 0, then five invalidations): back to 2, the
    // invalidation takes 3 (refused) and a fresh count, 4, is still refused: a new epoch.
    a_sequence_that_goes_back(pool, "ret-back", 2, true).await;
}

#[sqlx::test]
async fn a_sequence_one_step_back_does_not_swallow_invalidations(pool: PgPool) {
    // The usual failover: only the last step lost. The next invalidation takes the tag's own
    // count, which is written again (an equal count is not refused).
    a_sequence_that_goes_back(pool, "ret-back-one", 4, false).await;
}
