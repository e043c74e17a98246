//! The near cache against a real Redis: hits without round trips, and coherence with
//! invalidations from this process, other processes, raw writes, flushes and lost connections.

mod common;

use cached_query::{Cache, CacheStats, cached_query};
use common::{RedisServer, raw, redis_url, unique_ns};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Every execution returns a new number, so a value tells which execution produced it.
#[cached_query(cache = cache, ttl = 300, invalidate = ["item:<id>", "items"], skip(runs))]
async fn item(cache: &Cache, runs: &AtomicU32, id: i64) -> Result<u32, Infallible> {
    let _ = id;
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

async fn near(url: &str, ns: &str, capacity: u64) -> Cache {
    Cache::builder()
        .redis(url)
        .namespace(ns)
        .near_cache(capacity)
        .build()
        .await
        .expect("cache builds")
}

/// Another process: same Redis and namespace, its own connections, no near cache.
async fn other(url: &str, ns: &str) -> Cache {
    common::redis_cache(url, ns).await
}

/// Loads `id` until it is a near hit and returns that value. Usually the first call fills
/// Redis, the second the near cache, the third is a near hit; a fill that raced with a
/// message is skipped, and after a cut connection a call may run uncached, so allow a few.
async fn warm(cache: &Cache, runs: &AtomicU32, id: i64) -> u32 {
    let before = cache.stats().near_hits;
    for _ in 0..10 {
        let value = item(cache, runs, id).await.unwrap();
        if cache.stats().near_hits > before {
            return value;
        }
    }
    panic!("no near hit after ten loads");
}

/// Waits (yielding, not sleeping) until `cache`'s stats satisfy `done`, for at most 5 s.
async fn wait_for(cache: &Cache, what: &str, done: impl Fn(&CacheStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&cache.stats()) {
        assert!(Instant::now() < deadline, "{what} not seen within 5 s");
        tokio::task::yield_now().await;
    }
}

/// Waits until `cache` has received more than `seen` invalidation messages.
async fn await_invalidation(cache: &Cache, seen: u64) {
    wait_for(cache, "an invalidation message", |s| {
        s.near_invalidations > seen
    })
    .await;
}

#[tokio::test]
async fn near_hits_make_no_round_trip_and_are_counted() {
    let server = RedisServer::start();
    let cache = near(&server.url(), "near", 100).await;
    let runs = AtomicU32::new(0);
    let value = warm(&cache, &runs, 1).await;
    let (mgets, warmed) = (server.command_calls("MGET"), cache.stats());
    for _ in 0..50 {
        assert_eq!(item(&cache, &runs, 1).await.unwrap(), value);
    }
    assert_eq!(
        server.command_calls("MGET"),
        mgets,
        "near hits reached Redis"
    );
    assert_eq!(runs.load(SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.near_hits, warmed.near_hits + 50);
    assert_eq!(stats.hits, warmed.hits + 50, "near hits are also hits");
    let per = &stats.queries[concat!(module_path!(), "::item")];
    assert_eq!(per.near_hits, stats.near_hits);
    assert_eq!(cache.entry_count(), Some(1));
    assert_eq!(stats.near_resets, 0);
}

/// On loopback Redis's own message usually arrives before the next call, so this would also
/// pass without dropping the tag locally; the unit test
/// `an_accepted_bump_drops_the_stamps_from_the_near_cache` covers that part with no push
/// connection at all.
#[tokio::test]
async fn own_invalidation_is_visible_at_once() {
    let ns = unique_ns("near_own");
    let cache = near(&redis_url(), &ns, 100).await;
    let runs = AtomicU32::new(0);
    for round in 0..50 {
        let before = warm(&cache, &runs, 7).await;
        let tag = if round % 2 == 0 { "item:7" } else { "items" };
        cache.invalidate(tag).await.unwrap();
        // No waiting for Redis's message: this process's own invalidation applies at once.
        let after = item(&cache, &runs, 7).await.unwrap();
        assert!(
            after > before,
            "round {round}: served {before} after invalidating"
        );
    }
    cache.clear().await.unwrap();
    let last = runs.load(SeqCst);
    assert_eq!(item(&cache, &runs, 7).await.unwrap(), last + 1);
}

#[tokio::test]
async fn other_process_invalidation_arrives_and_its_delay_is_measured() {
    let ns = unique_ns("near_other");
    let a = near(&redis_url(), &ns, 100).await;
    let b = other(&redis_url(), &ns).await;
    let runs = AtomicU32::new(0);
    let (mut delays, mut after_ack) = (Vec::new(), Vec::new());
    for round in 0..200 {
        let before = warm(&a, &runs, 3).await;
        let seen = a.stats().near_invalidations;
        let start = Instant::now();
        b.invalidate("item:3").await.unwrap();
        let acked = Instant::now();
        await_invalidation(&a, seen).await;
        delays.push(start.elapsed());
        after_ack.push(acked.elapsed());
        let after = item(&a, &runs, 3).await.unwrap();
        assert!(
            after > before,
            "round {round}: served {before} after the message"
        );
    }
    for (what, mut d) in [
        ("from the start of invalidate()", delays),
        ("after invalidate() returned", after_ack),
    ] {
        d.sort();
        let pct = |p: usize| d[(d.len() * p / 100).min(d.len() - 1)];
        println!(
            "near cache dropped another process's invalidation {what} (loopback, {} rounds): \
             p50 {:?}, p99 {:?}, max {:?}",
            d.len(),
            pct(50),
            pct(99),
            d[d.len() - 1]
        );
    }
}

#[tokio::test]
async fn raw_writes_and_clear_by_others_reach_the_near_cache() {
    let ns = unique_ns("near_raw");
    let a = near(&redis_url(), &ns, 100).await;
    let b = other(&redis_url(), &ns).await;
    let runs = AtomicU32::new(0);

    // Someone deletes the entry itself: the near cache must not keep serving it.
    warm(&a, &runs, 5).await;
    let entry: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:e:*"))
        .query_async(&mut raw(&redis_url()).await)
        .await
        .unwrap();
    assert_eq!(entry.len(), 1);
    let seen = a.stats().near_invalidations;
    let _: () = redis::cmd("DEL")
        .arg(&entry[0])
        .query_async(&mut raw(&redis_url()).await)
        .await
        .unwrap();
    await_invalidation(&a, seen).await;
    let near_hits = a.stats().near_hits;
    item(&a, &runs, 5).await.unwrap();
    assert_eq!(a.stats().near_hits, near_hits, "served the deleted entry");

    // Another process clears the namespace.
    let before = warm(&a, &runs, 5).await;
    let seen = a.stats().near_invalidations;
    b.clear().await.unwrap();
    await_invalidation(&a, seen).await;
    assert!(item(&a, &runs, 5).await.unwrap() > before);
}

#[tokio::test]
async fn flush_and_connection_loss_drop_the_whole_layer() {
    let mut server = RedisServer::start();
    let a = near(&server.url(), "near", 100).await;
    let runs = AtomicU32::new(0);

    let before = warm(&a, &runs, 1).await;
    warm(&a, &runs, 2).await;
    let seen = a.stats().near_invalidations;
    let resets = a.stats().near_resets;
    server.cli(&["FLUSHALL"]);
    await_invalidation(&a, seen).await;
    assert_eq!(a.stats().near_resets, resets + 1);
    assert_eq!(a.entry_count(), Some(0));
    assert!(item(&a, &runs, 1).await.unwrap() > before);

    // The tracking connection is cut: whatever changes meanwhile is never announced, so
    // nothing held before may be served after.
    let before = warm(&a, &runs, 1).await;
    let resets = a.stats().near_resets;
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    wait_for(&a, "the connection loss", |s| s.near_resets > resets).await;
    assert_eq!(a.entry_count(), Some(0));
    other(&server.url(), "near")
        .await
        .invalidate("item:1")
        .await
        .unwrap();
    assert!(item(&a, &runs, 1).await.unwrap() > before);

    // Redis dies: the layer is dropped and calls fall back to the database.
    let before = warm(&a, &runs, 1).await;
    let resets = a.stats().near_resets;
    server.kill();
    wait_for(&a, "the server's death", |s| s.near_resets > resets).await;
    assert!(item(&a, &runs, 1).await.unwrap() > before);
    // Back up: once the main connection has reconnected (calls before that run their query
    // uncached), hits come from the near cache again.
    server.restart();
    let near_hits = a.stats().near_hits;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut value = item(&a, &runs, 1).await.unwrap();
    while a.stats().near_hits == near_hits {
        assert!(Instant::now() < deadline, "no near hit after the restart");
        let next = item(&a, &runs, 1).await.unwrap();
        assert!(next >= value);
        value = next;
    }
}

#[tokio::test]
async fn capacity_bounds_the_near_cache() {
    let ns = unique_ns("near_cap");
    let cache = near(&redis_url(), &ns, 20).await;
    let runs = AtomicU32::new(0);
    for id in 0..200 {
        item(&cache, &runs, id).await.unwrap();
        item(&cache, &runs, id).await.unwrap();
    }
    let held = cache.entry_count().unwrap();
    assert!(held <= 20, "{held} entries held with capacity 20");
    assert!(held > 0);
}

#[tokio::test]
async fn near_cache_settings_are_checked() {
    let err = Cache::builder()
        .redis_cluster(["redis://127.0.0.1:7000"])
        .near_cache(10)
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("near_cache") && err.contains("cluster"),
        "{err}"
    );
    let err = Cache::builder()
        .redis(&redis_url())
        .near_cache(0)
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("near_cache") && err.contains('0'), "{err}");
    let from_env = Cache::from_lookup(common::lookup(&[
        ("REDIS_URL", &redis_url()),
        ("CACHE_NEAR_CAPACITY", "500"),
    ]))
    .await
    .unwrap();
    assert_eq!(from_env.entry_count(), Some(0));
    // In process already: the memory backend has no near layer.
    let memory = Cache::builder()
        .memory()
        .near_cache(10)
        .build()
        .await
        .unwrap();
    assert!(
        format!("{memory:?}").contains("near_cache: false"),
        "{memory:?}"
    );
}

/// Readers hammer one key while another process invalidates it. A call that starts after the
/// invalidation message reached this process must get a value computed after the
/// invalidation (the near cache's fills race with the messages; none may resurrect old data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_hit_after_the_message_under_concurrency() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    let ns = unique_ns("near_race");
    let a = near(&redis_url(), &ns, 1000).await;
    let b = other(&redis_url(), &ns).await;
    let runs = Arc::new(AtomicU32::new(0));
    // (round, the run count before that round's invalidation), packed.
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (a, runs, published, stop) =
                (a.clone(), runs.clone(), published.clone(), stop.clone());
            tokio::spawn(async move {
                let mut checked = 0u32;
                while !stop.load(SeqCst) {
                    let floor = (published.load(SeqCst) & 0xFFFF_FFFF) as u32;
                    let value = item(&a, &runs, 1).await.unwrap();
                    assert!(
                        value > floor,
                        "served run {value}, invalidated after run {floor}"
                    );
                    checked += 1;
                    // Near hits never wait, so let the connection tasks run.
                    tokio::task::yield_now().await;
                }
                checked
            })
        })
        .collect();
    for round in 1..=100u64 {
        let floor = runs.load(SeqCst);
        b.invalidate("item:1").await.unwrap();
        // A near miss on `a`'s tracking connection: its reply comes after the message.
        item(&a, &runs, 1_000 + i64::try_from(round).unwrap())
            .await
            .unwrap();
        published.store((round << 32) | u64::from(floor), SeqCst);
        tokio::task::yield_now().await;
    }
    stop.store(true, SeqCst);
    let mut checked = 0;
    for r in readers {
        checked += r.await.unwrap();
    }
    assert!(checked > 100, "readers made only {checked} calls");
    assert!(a.stats().near_hits > 0);
}

/// Near hits are answered in process: they say nothing about Redis's health, so they must not
/// reset the breaker's failure count while Redis is stalled (nor close it after a probe).
/// Counted by what the frozen server received: once three calls have failed, no other call
/// may send it a read, however many near hits happen in between. Once the breaker is open,
/// entries whose stamps still need comparing are not served from the near cache either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_hits_do_not_feed_the_circuit_breaker() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .redis(&server.url())
        .namespace("breaker")
        .near_cache(100)
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(100))
        .circuit_breaker(3, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let mut warm_values = Vec::new();
    for id in 0..6 {
        warm_values.push(warm(&cache, &runs, id).await);
    }
    // A stamp change (here an unrelated tag) makes every held entry compare its stamps again
    // on its next near hit: the path that used to report a success to the breaker.
    cache.invalidate("unrelated").await.unwrap();
    let near_hits = cache.stats().near_hits;
    // Reads, and the handshakes of the new connections that replace a timed-out one.
    let requests = || server.commands_calls(&["mget", "hello"]);
    let before = requests();
    server.freeze();
    for (id, v) in (0..6).zip(&warm_values) {
        item(&cache, &runs, 1000 + id).await.unwrap(); // Redis unreadable: runs the query
        // The read that timed out gave up on the tracking connection, and with it on
        // everything it vouched for: no near hit from here on, however the breaker stands.
        assert_ne!(item(&cache, &runs, id).await.unwrap(), *v);
    }
    server.thaw();
    let stats = cache.stats();
    assert_eq!(stats.near_hits, near_hits, "{stats:?}");
    assert_eq!(stats.errors, 12, "{stats:?}");
    // Each failure sent at most one request: a timed-out read, or the handshake of the
    // connection replacing it.
    let sent = requests() - before;
    assert!(
        (1..=3).contains(&sent),
        "{sent} requests sent to the frozen Redis: the breaker opens after three failures"
    );
}

/// A pending invalidation (Redis did not take it) may cover anything: until it is delivered,
/// nothing is served from the near cache, not even entries whose own tags it does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_from_the_near_cache_while_an_invalidation_is_pending() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .redis(&server.url())
        .namespace("pending")
        .near_cache(100)
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(100))
        .circuit_breaker(100, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let held = warm(&cache, &runs, 1).await;
    server.freeze();
    assert!(
        cache.invalidate("elsewhere").await.is_err(),
        "Redis is frozen"
    );
    let near_hits = cache.stats().near_hits;
    let during = item(&cache, &runs, 1).await.unwrap();
    assert_ne!(
        during, held,
        "the query ran instead of the near cache answering"
    );
    assert_eq!(cache.stats().near_hits, near_hits);
    server.thaw();
    // The next read delivers the invalidation; the entry (not covered by it) is served again,
    // from the near cache once refilled.
    assert_eq!(warm(&cache, &runs, 1).await, held);
}

/// A silent partition between the near cache and Redis (a proxy that stops forwarding
/// without closing anything: what a NAT or load-balancer idle timeout does to the idle
/// tracking connection). Another process's invalidation returns; its message never
/// arrives. Held entries may be served only within the lease (the documented staleness
/// bound, measured from when the invalidation returned); after it, reads fall back to
/// the database and return the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_costs_at_most_the_lease_of_staleness() {
    let server = RedisServer::start();
    let proxy = common::TcpProxy::start(&server.addr()).await;
    let lease = Duration::from_millis(300);
    let cache = Cache::builder()
        .redis(&proxy.redis_url())
        .namespace("silent")
        .near_cache(100)
        .near_cache_lease(lease)
        .response_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let writer = other(&server.url(), "silent").await;
    let runs = AtomicU32::new(0);
    let old = warm(&cache, &runs, 1).await;

    proxy.stall();
    writer.invalidate("item:1").await.unwrap();
    let returned = Instant::now();
    let (mut stale, mut last_stale) = (0, Duration::ZERO);
    let fresh = loop {
        let value = item(&cache, &runs, 1).await.unwrap();
        let at = returned.elapsed();
        if value != old {
            break at;
        }
        assert!(
            at <= lease,
            "stale read {at:?} after the invalidation returned"
        );
        (stale, last_stale) = (stale + 1, at);
        tokio::task::yield_now().await;
    };
    println!(
        "silent partition: {stale} stale near hits, the last {last_stale:?} and the first \
         new value {fresh:?} after the invalidation returned (lease {lease:?})"
    );
    assert!(
        cache.stats().errors > 0,
        "the cut-off round trips are counted"
    );
}
