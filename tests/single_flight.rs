//! Single-flight on both backends: one query per stampede, followers freed when the leader
//! fails, and no caller joins a query that started before an invalidation it has seen.

mod common;

use cached_query::{Cache, cached_query};
use common::{redis_cache, redis_url, unique_ns};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::SeqCst};
use std::time::Duration;
use tokio::sync::Notify;

async fn backends(test: &str) -> Vec<Cache> {
    vec![
        redis_cache(&redis_url(), &unique_ns(test)).await,
        Cache::builder().memory().build().await.unwrap(),
    ]
}

/// Waits (without sleeping) until `n` callers wait on a shared query; bounded so a
/// regression fails instead of hanging.
async fn until_waiting(cache: &Cache, n: usize) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while cache.shared_waiters() < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "expected {n} waiting callers, saw {}",
            cache.shared_waiters()
        )
    });
}

#[cached_query(cache = cache, invalidate = "hot", skip(calls, followers))]
async fn hot(
    cache: &Cache,
    calls: &AtomicU32,
    followers: usize,
    id: u32,
) -> Result<String, String> {
    calls.fetch_add(1, SeqCst);
    until_waiting(cache, followers).await;
    Ok(format!("value {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_runs_one_query() {
    for cache in backends("stampede").await {
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { hot(&cache, &calls, 63, 7).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "value 7");
        }
        assert_eq!(calls.load(SeqCst), 1, "{cache:?}");
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (63, 1), "{cache:?}");
    }
}

#[cached_query(cache = cache, skip(calls))]
async fn leader_fails(cache: &Cache, calls: &AtomicU32) -> Result<u32, String> {
    let n = calls.fetch_add(1, SeqCst);
    if n == 0 {
        until_waiting(cache, 3).await;
        return Err("the first execution fails".into());
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_failed_leader_run_their_own_query() {
    for cache in backends("leader-fails").await {
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { leader_fails(&cache, &calls).await })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(
            results.iter().filter(|r| r.is_err()).count(),
            1,
            "{results:?}"
        );
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            3,
            "{results:?}"
        );
        assert_eq!(calls.load(SeqCst), 4);
    }
}

/// A stand-in data source whose first read can be held in flight.
struct Source {
    value: AtomicI64,
    started: Notify,
    release: Notify,
    hold_first: AtomicU32,
}

#[cached_query(cache = cache, invalidate = "row", skip(source))]
async fn read_row(cache: &Cache, source: &Source) -> Result<i64, String> {
    let seen = source.value.load(SeqCst); // the "query" reads the row…
    if source.hold_first.swap(0, SeqCst) == 1 {
        source.started.notify_one();
        source.release.notified().await; // …and is slow to return it
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_invalidation_never_joins_or_sees_an_older_query() {
    for cache in backends("no-join").await {
        let source = Arc::new(Source {
            value: AtomicI64::new(1),
            started: Notify::new(),
            release: Notify::new(),
            hold_first: AtomicU32::new(1),
        });
        let old = {
            let (cache, source) = (cache.clone(), source.clone());
            tokio::spawn(async move { read_row(&cache, &source).await })
        };
        source.started.notified().await; // the old query has read value 1 and is in flight

        source.value.store(2, SeqCst); // a writer commits…
        cache.invalidate("row").await.unwrap(); // …and invalidates

        // Started after the invalidation: must not wait for (or get) the old query's result.
        let fresh = tokio::time::timeout(Duration::from_secs(20), read_row(&cache, &source))
            .await
            .expect("a read after the invalidation must not wait for the older query");
        assert_eq!(fresh.unwrap(), 2, "{cache:?}");

        source.release.notify_one();
        assert_eq!(
            old.await.unwrap().unwrap(),
            1,
            "the old caller gets what it read"
        );
        // The old result was written under the old tag version: never served again.
        assert_eq!(read_row(&cache, &source).await.unwrap(), 2, "{cache:?}");
        assert_eq!(read_row(&cache, &source).await.unwrap(), 2, "{cache:?}");
        assert_eq!(cache.stats().misses, 3, "{cache:?}");
    }
}

/// A query whose first execution waits to be released; every execution returns the
/// database's version at its start.
#[derive(Default)]
struct SlowDb {
    version: AtomicI64,
    runs: AtomicU32,
    entered: Notify,
    release: Notify,
}

#[cached_query(cache = cache, invalidate = "slow", skip(db))]
async fn slow(cache: &Cache, db: &SlowDb) -> Result<i64, String> {
    let v = db.version.load(SeqCst);
    if db.runs.fetch_add(1, SeqCst) == 0 {
        db.entered.notify_one();
        db.release.notified().await;
    }
    Ok(v)
}

/// While Redis is unreadable there are no stamps to key a flight by: a caller that arrives
/// after a commit (and another process's invalidation, which it cannot see) must not join a
/// query that started before it. It runs its own and gets the new row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_unreadable_a_caller_never_joins_an_older_query() {
    let mut server = common::RedisServer::start();
    let url = server.url();
    server.kill();
    let cache = common::fail_fast(&url, "unreadable").build().await.unwrap();
    let db = Arc::new(SlowDb::default());
    let older = {
        let (cache, db) = (cache.clone(), db.clone());
        tokio::spawn(async move { slow(&cache, &db).await })
    };
    db.entered.notified().await;
    db.version.store(1, SeqCst); // committed while the older query runs
    let newer = {
        let (cache, db) = (cache.clone(), db.clone());
        tokio::spawn(async move { slow(&cache, &db).await })
    };
    // It either finishes on its own or waits on the older query (the bug).
    tokio::time::timeout(Duration::from_secs(20), async {
        while !newer.is_finished() && cache.shared_waiters() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    db.release.notify_one();
    assert_eq!(
        newer.await.unwrap().unwrap(),
        1,
        "joined a query older than it"
    );
    assert_eq!(older.await.unwrap().unwrap(), 0);
    assert_eq!(db.runs.load(SeqCst), 2);
}
