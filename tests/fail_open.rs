//! Redis trouble never reaches callers: frozen or unreachable servers, and invalidations
//! that could not be delivered. (Killing Redis under concurrent load: `faults.rs`.)

mod common;

use cached_query::{Cache, Error, cached_query};
use common::{RedisServer, keys_under};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::SeqCst};
use std::time::Duration;

async fn fast_failing_cache(url: &str, ns: &str) -> Cache {
    common::fail_fast(url, ns)
        .build()
        .await
        .expect("building never needs a reachable Redis")
}

/// The "database": a value per id, and a count of executed queries.
#[derive(Default)]
struct Db {
    version: AtomicI64,
    queries: AtomicU32,
}

#[cached_query(cache = cache, invalidate = "row:<id>", skip(db))]
async fn row(cache: &Cache, db: &Db, id: i64) -> Result<i64, String> {
    db.queries.fetch_add(1, SeqCst);
    Ok(id * 1000 + db.version.load(SeqCst))
}

/// Calls until one is a cache hit again (Redis back, breaker closed); bounded.
async fn until_hits_return(cache: &Cache, db: &Db, id: i64) {
    let before = cache.stats().hits;
    for _ in 0..400 {
        assert_eq!(
            row(cache, db, id).await.unwrap(),
            id * 1000 + db.version.load(SeqCst)
        );
        if cache.stats().hits > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("hits did not come back: {:?}", cache.stats());
}

#[tokio::test]
async fn an_unreachable_redis_at_start_is_not_an_error() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let cache = fast_failing_cache(&url, "down").await;
    let db = Db::default();
    for _ in 0..10 {
        assert_eq!(row(&cache, &db, 3).await.unwrap(), 3000);
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.errors, stats.hits), (10, 10, 0));
    assert!(cache.invalidate("row:3").await.is_err());

    server.restart();
    until_hits_return(&cache, &db, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_bounded_wait_then_is_skipped() {
    let server = RedisServer::start();
    let cooldown = Duration::from_millis(1000);
    let cache = common::fail_fast(&server.url(), "frozen")
        .circuit_breaker(3, cooldown)
        .build()
        .await
        .unwrap();
    let db = Db::default();
    row(&cache, &db, 1).await.unwrap();
    common::assert_breaker_limits_reads_while_frozen(&server, cooldown, async {
        for _ in 0..20 {
            assert_eq!(row(&cache, &db, 1).await.unwrap(), 1000);
        }
    })
    .await;
    let stats = cache.stats();
    assert_eq!(stats.errors, 20, "{stats:?}");
    assert_eq!(db.queries.load(SeqCst), 21);
    until_hits_return(&cache, &db, 1).await;
}

/// The deadline a user configures is the one they get: with a 30 s connect timeout and a
/// 100 ms response timeout, a call on a frozen Redis waits at most the bound the cache
/// reports (`max_redis_wait`, 2 × 100 ms), never the connect timeout, even while a new
/// connection is being made. Each call's Redis step fails once and is counted.
#[tokio::test]
async fn a_stalled_redis_costs_a_call_at_most_the_reported_bound() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .redis(&server.url())
        .namespace("deadline")
        .connect_timeout(Duration::from_secs(30))
        .response_timeout(Duration::from_millis(100))
        .circuit_breaker(1000, Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    assert_eq!(cache.max_redis_wait(), Some(Duration::from_millis(200)));
    let db = Db::default();
    row(&cache, &db, 1).await.unwrap();
    let reads = server.command_calls("mget");
    server.freeze();
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(row(&cache, &db, 1).await.unwrap(), 1000);
    }
    let waited = started.elapsed();
    server.thaw();
    assert_eq!(cache.stats().errors, 5, "{:?}", cache.stats());
    // One read reached the server and timed out; every later call waited (within its
    // deadline) for the one new connection being made, which sent no read.
    assert_eq!(server.command_calls("mget") - reads, 1);
    // The reported bound per call, with seconds of room for a loaded machine: one call
    // waiting for the connect timeout alone would take 30 s.
    let bound = 5 * cache.max_redis_wait().unwrap() + Duration::from_secs(5);
    assert!(waited < bound, "{waited:?} for 5 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undelivered_invalidation_is_honoured_and_delivered_later() {
    let server = RedisServer::start();
    let cache = fast_failing_cache(&server.url(), "lost").await;
    // Another process on the same Redis and namespace.
    let other = fast_failing_cache(&server.url(), "lost").await;
    let db = Db::default();
    assert_eq!(row(&cache, &db, 5).await.unwrap(), 5000);
    assert_eq!(row(&other, &db, 5).await.unwrap(), 5000);
    assert_eq!(db.queries.load(SeqCst), 1, "shared entry");

    server.freeze();
    db.version.store(1, SeqCst);
    let err = cache.invalidate("row:5").await.unwrap_err();
    assert!(matches!(err, Error::InvalidationPending { .. }), "{err}");
    // While pending, this process never serves the old value.
    for _ in 0..5 {
        assert_eq!(row(&cache, &db, 5).await.unwrap(), 5001);
    }
    server.thaw();
    // Delivered before the first read from Redis: a miss, then a hit, both fresh.
    until_hits_return(&cache, &db, 5).await;
    assert_eq!(row(&cache, &db, 5).await.unwrap(), 5001);
    // And the other process sees the delivered invalidation too.
    assert_eq!(row(&other, &db, 5).await.unwrap(), 5001);
}

#[tokio::test]
async fn a_pending_clear_is_delivered_too() {
    let server = RedisServer::start();
    let cache = fast_failing_cache(&server.url(), "lostclear").await;
    let db = Db::default();
    row(&cache, &db, 1).await.unwrap();
    let generation_before = server.cli(&["GET", "lostclear:g"]);
    server.freeze();
    assert!(cache.clear().await.is_err());
    server.thaw();
    db.version.store(7, SeqCst);
    until_hits_return(&cache, &db, 1).await;
    assert_eq!(row(&cache, &db, 1).await.unwrap(), 1007);
    assert_ne!(server.cli(&["GET", "lostclear:g"]), generation_before);
    assert!(keys_under(&server.url(), "lostclear").await.len() >= 2);
}

#[tokio::test]
async fn malformed_urls_fail_build_without_showing_the_password() {
    for url in [
        "redis://:pa55word@127.0.0.1:notaport",
        "http://:pa55word@127.0.0.1:6379",
    ] {
        let err = Cache::builder().redis(url).build().await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("pa55word"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
}

/// A connection attempt runs in a task of the runtime whose call started it. When that
/// runtime shuts down mid-attempt (a test's runtime ending with a shared cache, an application
/// replacing its runtime), the attempt is gone with it: calls on the next runtime make a new
/// connection at once instead of waiting for the lost one (here stuck in the handshake of a
/// frozen server, with a 30 s connect timeout).
#[test]
fn a_connection_attempt_lost_with_its_runtime_is_replaced() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let server = RedisServer::start();
    let first = runtime();
    let cache = first
        .block_on(
            Cache::builder()
                .redis(&server.url())
                .namespace("lost-runtime")
                .connect_timeout(Duration::from_secs(30))
                .response_timeout(Duration::from_millis(200))
                .circuit_breaker(1000, Duration::from_millis(1))
                .build(),
        )
        .unwrap();
    let db = Db::default();
    server.freeze();
    // The call gives up at its deadline; the attempt goes on in the background until the
    // runtime is dropped.
    assert_eq!(first.block_on(row(&cache, &db, 1)).unwrap(), 1000);
    drop(first);
    server.thaw();
    let before = cache.stats();
    runtime().block_on(async {
        assert_eq!(row(&cache, &db, 1).await.unwrap(), 1000);
        assert_eq!(row(&cache, &db, 1).await.unwrap(), 1000);
    });
    let after = cache.stats();
    assert_eq!(
        (after.errors, after.hits),
        (before.errors, before.hits + 1),
        "{after:?}"
    );
}
