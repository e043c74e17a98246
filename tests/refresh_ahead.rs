//! `refresh_ahead`: a hit in the last seconds of an entry's life may run the query and store a
//! fresh entry while every other caller keeps getting hits; never a value older than a
//! completed invalidation; with leases, one refresh per entry across processes.

mod common;

use cached_query::{Cache, CacheBuilder, cached_query};
use common::source::Source;
use common::{RedisServer, redis_url, unique_ns};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

/// Fresh for 3 s; hits in the last 2 s may refresh.
#[cached_query(cache = cache, ttl = 3, refresh_ahead = 2, invalidate = "item:<id>", skip(src))]
async fn item(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.query(id).await
}

const TTL: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(2);

/// Reads item 1 every 10 ms from `stored` + (TTL − WINDOW) until a refresh ran or the entry
/// expired; every read must be a hit. Returns when the refresh ran, after `stored`.
async fn read_until_refreshed(cache: &Cache, src: &Source, stored: std::time::Instant) -> Duration {
    tokio::time::sleep_until((stored + (TTL - WINDOW)).into()).await;
    while cache.stats().refreshes == 0 {
        assert!(
            stored.elapsed() < TTL,
            "no refresh before the entry expired"
        );
        item(cache, src, 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stored.elapsed()
}

async fn refreshes_before_expiry(cache: Cache) {
    let src = Source::new(10, 0);
    assert_eq!(item(&cache, &src, 1).await, Ok(11));
    let stored = std::time::Instant::now();
    src.value.store(20, SeqCst);
    let at = read_until_refreshed(&cache, &src, stored).await;
    assert_eq!(item(&cache, &src, 1).await, Ok(21), "the refreshed entry");
    let stats = cache.stats();
    assert_eq!(stats.misses, 1, "only the first call missed: {stats:?}");
    assert_eq!((stats.refreshes, src.calls.load(SeqCst)), (1, 2));
    // The refreshed entry lives a full TTL from its refresh: still a hit past the first one's
    // expiry.
    tokio::time::sleep_until((stored + TTL + Duration::from_millis(100)).into()).await;
    if stored.elapsed() < at + TTL - WINDOW {
        assert_eq!(item(&cache, &src, 1).await, Ok(21));
        assert_eq!(cache.stats().misses, 1);
    }
    println!("refreshed {at:?} after the store, TTL {TTL:?}");
}

#[tokio::test]
async fn a_hit_in_the_window_refreshes_the_entry_redis() {
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("refresh"))
        .build()
        .await
        .unwrap();
    refreshes_before_expiry(cache).await;
}

#[tokio::test]
async fn a_hit_in_the_window_refreshes_the_entry_near_cache() {
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("refresh-near"))
        .near_cache(100)
        .build()
        .await
        .unwrap();
    refreshes_before_expiry(cache).await;
}

#[tokio::test]
async fn a_hit_in_the_window_refreshes_the_entry_cluster() {
    let (cache, _cluster) = common::cache_on(common::Backend::Cluster, "refresh-cluster").await;
    refreshes_before_expiry(cache).await;
}

#[tokio::test]
async fn a_hit_in_the_window_refreshes_the_entry_memory() {
    let cache = Cache::builder().memory().build().await.unwrap();
    refreshes_before_expiry(cache).await;
}

/// Calls item 1 until a call is chosen to refresh and holds in its query; returns that call.
async fn hold_a_refresh(
    cache: &Cache,
    src: &Arc<Source>,
) -> tokio::task::JoinHandle<Result<i64, String>> {
    src.holds.store(1, SeqCst);
    loop {
        let mut call = tokio::spawn({
            let (cache, src) = (cache.clone(), src.clone());
            async move { item(&cache, &src, 1).await }
        });
        tokio::select! {
            r = &mut call => {
                r.unwrap().unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            () = src.entered.notified() => return call,
        }
    }
}

/// A refresh held in its query: other callers keep getting hits at once; an invalidation
/// meanwhile is seen by the next read, and the refresh's late entry is never served.
#[tokio::test]
async fn a_refresh_never_serves_a_value_older_than_an_invalidation() {
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("refresh-inval"))
        .build()
        .await
        .unwrap();
    let src = Source::new(100, 0);
    assert_eq!(item(&cache, &src, 1).await, Ok(101));
    let stored = std::time::Instant::now();
    tokio::time::sleep_until((stored + (TTL - WINDOW)).into()).await;
    // What the refresh will read: not yet visible to anyone else.
    src.value.store(150, SeqCst);
    let refreshing = hold_a_refresh(&cache, &src).await;
    assert_eq!(cache.stats().refreshes, 1);
    // Nobody waits on the refresh.
    for _ in 0..20 {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), item(&cache, &src, 1))
                .await
                .expect("a hit, not a wait"),
            Ok(101)
        );
    }
    src.value.store(200, SeqCst);
    cache.invalidate("item:1").await.unwrap();
    assert_eq!(
        item(&cache, &src, 1).await,
        Ok(201),
        "after the invalidation"
    );
    src.go.add_permits(1);
    assert_eq!(
        refreshing.await.unwrap(),
        Ok(151),
        "the refreshing caller returns its own result, which began before the invalidation"
    );
    for _ in 0..3 {
        assert_eq!(item(&cache, &src, 1).await, Ok(201));
    }
    assert_eq!(cache.stats().refreshes, 1);
}

/// With leases, a refresh running in one process keeps the other from refreshing the same
/// entry: chosen there, it finds the lease held (its `SET NX` fails) and returns its hit.
#[tokio::test]
async fn with_leases_one_refresh_runs_per_entry_across_processes() {
    let server = RedisServer::start();
    let ns = unique_ns("refresh-lease");
    let builder = || -> CacheBuilder {
        Cache::builder()
            .redis(&server.url())
            .namespace(&ns)
            .leases(true)
            .lease_ttl(Duration::from_secs(60))
    };
    let (a, b) = (
        builder().build().await.unwrap(),
        builder().build().await.unwrap(),
    );
    let src = Source::new(300, 0);
    assert_eq!(item(&a, &src, 1).await, Ok(301));
    let stored = std::time::Instant::now();
    tokio::time::sleep_until((stored + (TTL - WINDOW)).into()).await;
    let refreshing = hold_a_refresh(&a, &src).await;
    let calls = src.calls.load(SeqCst);
    let sets = server.command_calls("set");
    // b reads until it was chosen (and tried the lease) or the entry expired.
    while server.command_calls("set") == sets {
        assert!(stored.elapsed() < TTL, "b was never chosen");
        assert_eq!(item(&b, &src, 1).await, Ok(301));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(src.calls.load(SeqCst), calls, "b ran no query");
    assert_eq!(b.stats().refreshes, 0);
    src.go.add_permits(1);
    assert_eq!(refreshing.await.unwrap(), Ok(301));
}

/// A refresh whose query fails: the chosen caller gets its hit, and that version of the entry
/// is not refreshed again by this process (one failed query per version, not one per chosen
/// hit).
#[tokio::test]
async fn a_failed_refresh_returns_the_hit_and_is_not_retried() {
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("refresh-fail"))
        .build()
        .await
        .unwrap();
    let src = Source::new(40, 0);
    assert_eq!(item(&cache, &src, 1).await, Ok(41));
    let stored = std::time::Instant::now();
    src.fail.store(true, SeqCst);
    read_until_refreshed(&cache, &src, stored).await;
    assert_eq!(src.calls.load(SeqCst), 2, "the refresh ran, and failed");
    // The rest of the window: hits only.
    while stored.elapsed() < TTL - Duration::from_millis(100) {
        assert_eq!(item(&cache, &src, 1).await, Ok(41));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = cache.stats();
    assert_eq!((stats.refreshes, stats.misses, stats.errors), (1, 1, 0));
    assert_eq!(src.calls.load(SeqCst), 2);
}
