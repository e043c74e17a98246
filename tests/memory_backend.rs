//! The in-memory backend: bounded, with TTLs, tags and `clear` like Redis.

use cached_query::{Cache, cached_query};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

#[cached_query(cache = cache, invalidate = ["n:<n>", "all"], skip(calls))]
async fn double(cache: &Cache, calls: &AtomicU32, n: u64) -> Result<u64, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok(n * 2)
}

#[cached_query(cache = cache, ttl = 1, skip(calls))]
async fn short_lived(cache: &Cache, calls: &AtomicU32) -> Result<u64, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok(1)
}

#[tokio::test]
async fn capacity_bounds_the_entry_count() {
    let cache = Cache::builder()
        .memory()
        .capacity(100)
        .build()
        .await
        .unwrap();
    let calls = AtomicU32::new(0);
    for n in 0..2_000 {
        double(&cache, &calls, n).await.unwrap();
    }
    let held = cache.entry_count().unwrap();
    assert!(held <= 100 && held > 0, "{held}");
}

#[tokio::test]
async fn tags_and_clear() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let calls = AtomicU32::new(0);
    for n in 0..10 {
        double(&cache, &calls, n).await.unwrap();
        double(&cache, &calls, n).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 10);
    cache.invalidate("n:3").await.unwrap();
    for n in 0..10 {
        double(&cache, &calls, n).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 11);
    cache.invalidate("all").await.unwrap();
    for n in 0..10 {
        double(&cache, &calls, n).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 21);
    cache.clear().await.unwrap();
    double(&cache, &calls, 0).await.unwrap();
    assert_eq!(calls.load(SeqCst), 22);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.errors), (19, 22, 0));
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let calls = AtomicU32::new(0);
    short_lived(&cache, &calls).await.unwrap();
    short_lived(&cache, &calls).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);
    // Expiry is the event under test; poll for it with a generous bound.
    let start = Instant::now();
    while calls.load(SeqCst) == 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "entry never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        short_lived(&cache, &calls).await.unwrap();
    }
}

/// With the `serde` feature, stats serialize with their Rust field names (a JSON endpoint).
#[cfg(feature = "serde")]
#[tokio::test]
async fn stats_serialize() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let calls = AtomicU32::new(0);
    double(&cache, &calls, 1).await.unwrap();
    double(&cache, &calls, 1).await.unwrap();
    let json = serde_json::to_value(cache.stats()).unwrap();
    assert_eq!(
        (json["hits"].as_u64(), json["misses"].as_u64()),
        (Some(1), Some(1))
    );
    let name = concat!(module_path!(), "::double");
    assert_eq!(json["queries"][name]["hits"].as_u64(), Some(1), "{json}");
    #[cached_query::timed(name = "memory.serialized")]
    async fn timed() {}
    timed().await;
    let timing = cached_query::timings()
        .into_iter()
        .find(|t| t.name == "memory.serialized")
        .expect("timed");
    let json = serde_json::to_value(&timing).unwrap();
    assert_eq!(json["count"].as_u64(), Some(1), "{json}");
    assert!(json["p95"]["secs"].is_u64(), "{json}");
}
