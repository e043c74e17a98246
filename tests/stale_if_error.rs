//! `stale_if_error`: an entry is kept past its TTL and returned when the query fails, never
//! once invalidated, never for a key that was never cached; and `ttl_jitter`, which shortens
//! lifetimes within `[ttl × (1 − fraction), ttl]`.

mod common;

use cached_query::{Cache, cached_query};
use common::{RedisServer, redis_cache_with, redis_url, unique_ns};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::SeqCst};
use std::time::Duration;
use tokio::time::Instant;

/// A database stand-in whose value and availability the test sets: the function under test
/// returns its value, or its error while it is down.
#[derive(Default)]
struct Source {
    value: AtomicI64,
    down: AtomicBool,
    calls: AtomicU32,
}

/// No `ttl`: the cache's default TTL (short in these tests) applies.
#[cached_query(cache = cache, stale_if_error = 60, invalidate = "item:<id>", skip(src))]
async fn item(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.calls.fetch_add(1, SeqCst);
    if src.down.load(SeqCst) {
        return Err(format!("database down (item {id})"));
    }
    Ok(src.value.load(SeqCst) + id)
}

/// The entries' TTL in these tests. Tag tokens are given a shorter one (`tag_ttl`): they
/// must still outlive the entries kept for `stale_if_error`.
const TTL: Duration = Duration::from_secs(1);
const TAG_TTL: Duration = Duration::from_millis(500);

/// Waits out the TTL of an entry stored before `stored`: the only thing that ends freshness.
async fn past_ttl(stored: Instant) {
    tokio::time::sleep_until(stored + TTL + Duration::from_millis(50)).await;
}

async fn served_after_errors(cache: Cache) {
    let src = Source::default();
    src.value.store(10, SeqCst);
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    let written = Instant::now();
    // Down while fresh: a hit, the query does not run.
    src.down.store(true, SeqCst);
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    assert_eq!(src.calls.load(SeqCst), 1);
    // Never cached: the query's own error.
    assert_eq!(
        item(&cache, &src, 2).await,
        Err("database down (item 2)".to_owned())
    );

    past_ttl(written).await;
    // Expired and down: the query runs, fails, and the expired value is returned.
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    assert_eq!(src.calls.load(SeqCst), 3);
    let stats = cache.stats();
    assert_eq!(stats.stale_served, 1, "{stats:?}");
    assert_eq!(stats.queries["stale_if_error::item"].stale_served, 1);

    // Expired and up: not served, the query runs.
    src.down.store(false, SeqCst);
    src.value.store(20, SeqCst);
    assert_eq!(item(&cache, &src, 1).await, Ok(21));
    let written = Instant::now();
    assert_eq!(src.calls.load(SeqCst), 4);

    // Invalidated, then down: the error, never the invalidated value.
    past_ttl(written).await;
    cache.invalidate("item:1").await.unwrap();
    src.down.store(true, SeqCst);
    assert_eq!(
        item(&cache, &src, 1).await,
        Err("database down (item 1)".to_owned())
    );
    assert_eq!(cache.stats().stale_served, 1);
    assert_eq!(cache.stats().errors, 0);
}

#[tokio::test]
async fn an_expired_value_stands_in_for_a_failed_query_redis() {
    let builder = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("stale"))
        .default_ttl(TTL)
        .tag_ttl(TAG_TTL);
    served_after_errors(redis_cache_with(builder).await).await;
}

#[tokio::test]
async fn an_expired_value_stands_in_for_a_failed_query_near_cache() {
    let builder = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("stale-near"))
        .near_cache(100)
        .default_ttl(TTL)
        .tag_ttl(TAG_TTL);
    served_after_errors(redis_cache_with(builder).await).await;
}

#[tokio::test]
async fn an_expired_value_stands_in_for_a_failed_query_memory() {
    let cache = Cache::builder()
        .memory()
        .default_ttl(TTL)
        .tag_ttl(TAG_TTL)
        .build()
        .await;
    served_after_errors(cache.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_value_stands_in_for_a_failed_query_cluster() {
    let cluster = common::Cluster::start();
    let builder = Cache::builder()
        .redis_cluster(cluster.urls())
        .namespace("stale-cluster")
        .default_ttl(TTL)
        .tag_ttl(TAG_TTL);
    let cache = redis_cache_with(builder).await;
    // Each master's first connection clears the namespace once: done before the test.
    let warm: Vec<String> = (0..64).map(|i| format!("warm:{i}")).collect();
    cache.invalidate_many(&warm).await.unwrap();
    served_after_errors(cache).await;
}

#[cached_query(cache = cache, ttl = 10, skip(src))]
async fn plain(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.calls.fetch_add(1, SeqCst);
    Ok(id)
}

/// Lifetimes in Redis: `stale_if_error` keeps the entry its TTL plus the extra time; jitter
/// draws each lifetime in `[ttl × (1 − fraction), ttl]`.
#[tokio::test]
async fn lifetimes_in_redis_follow_the_ttl_the_jitter_and_the_extra_time() {
    let server = RedisServer::start();
    let jittered = redis_cache_with(
        Cache::builder()
            .redis(&server.url())
            .namespace("jitter")
            .ttl_jitter(0.5),
    )
    .await;
    let src = Source::default();
    for id in 0..40 {
        plain(&jittered, &src, id).await.unwrap();
    }
    let entries: Vec<String> = server
        .cli(&["--scan", "--pattern", "jitter:e:*"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(entries.len(), 40);
    let lifetimes: Vec<i64> = entries
        .iter()
        .map(|k| server.cli(&["PTTL", k]).trim().parse().unwrap())
        .collect();
    assert!(
        lifetimes.iter().all(|&ms| (4_000..=10_000).contains(&ms)),
        "{lifetimes:?}"
    );
    let (min, max) = (lifetimes.iter().min(), lifetimes.iter().max());
    assert!(max.unwrap() - min.unwrap() > 1_000, "spread: {lifetimes:?}");

    let kept = redis_cache_with(
        Cache::builder()
            .redis(&server.url())
            .namespace("kept")
            .default_ttl(TTL),
    )
    .await;
    item(&kept, &src, 1).await.unwrap();
    let key = server.cli(&["--scan", "--pattern", "kept:e:*"]);
    let ms: i64 = server.cli(&["PTTL", key.trim()]).trim().parse().unwrap();
    assert!((60_000..=61_000).contains(&ms), "TTL plus 60 s: {ms}");
}

#[tokio::test]
async fn a_jitter_outside_zero_to_one_is_refused_by_name() {
    for bad in [1.0, -0.1, f64::NAN, 2.5] {
        let err = Cache::builder()
            .memory()
            .ttl_jitter(bad)
            .build()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ttl_jitter"), "{err}");
        assert!(err.contains(&bad.to_string()), "{err}");
    }
    Cache::builder()
        .memory()
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    Cache::builder()
        .memory()
        .ttl_jitter(0.99)
        .build()
        .await
        .unwrap();
}

/// A newer result that is not stored (here `None` with `cache_none = false`) ends the
/// fallback: a later failure returns its error, never the older value.
#[cached_query(cache = cache, stale_if_error = 60, cache_none = false, skip(src))]
async fn maybe(cache: &Cache, src: &Source, id: i64) -> Result<Option<i64>, String> {
    src.calls.fetch_add(1, SeqCst);
    if src.down.load(SeqCst) {
        return Err("database down".to_owned());
    }
    Ok((src.value.load(SeqCst) > 0).then_some(id))
}

#[tokio::test]
async fn a_newer_unstored_result_ends_the_fallback() {
    let builder = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("stale-none"))
        .default_ttl(TTL);
    let cache = redis_cache_with(builder).await;
    let src = Source::default();
    src.value.store(1, SeqCst);
    assert_eq!(maybe(&cache, &src, 5).await, Ok(Some(5)));
    let written = Instant::now();
    past_ttl(written).await;
    // The row is gone: `None`, not stored.
    src.value.store(0, SeqCst);
    assert_eq!(maybe(&cache, &src, 5).await, Ok(None));
    src.down.store(true, SeqCst);
    assert_eq!(
        maybe(&cache, &src, 5).await,
        Err("database down".to_owned())
    );
    assert_eq!(cache.stats().stale_served, 0);
}

/// Redis killed: there is no entry to fall back on, so a failing query returns its own error
/// at once (fail-open as always), neither a stale value nor a wait.
#[tokio::test]
async fn with_redis_down_a_failing_query_returns_its_error() {
    let mut server = RedisServer::start();
    let cache = redis_cache_with(common::fail_fast(&server.url(), "stale").default_ttl(TTL)).await;
    let src = Source::default();
    src.value.store(10, SeqCst);
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    let written = Instant::now();
    past_ttl(written).await;
    server.kill();
    src.down.store(true, SeqCst);
    assert_eq!(
        item(&cache, &src, 1).await,
        Err("database down (item 1)".to_owned())
    );
    // The database up again (Redis still down): the query's value; nothing served stale.
    src.down.store(false, SeqCst);
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    let stats = cache.stats();
    assert_eq!(stats.stale_served, 0, "{stats:?}");
    assert!(stats.errors >= 1, "{stats:?}");
}
