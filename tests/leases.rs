//! Leases (`CacheBuilder::leases`): a miss in one process waits for another process's query of
//! the same entry under the same stamps instead of running it too; never for a query that
//! began before an invalidation it has seen, never past `lease_ttl`, never when Redis is down
//! or slow. Two caches on one namespace are two processes as far as leases go (each has its
//! own connections and in-process flights); the SIGKILL test uses a real second process.

mod common;

use cached_query::{Cache, CacheBuilder, cached_query};
use common::source::Source;
use common::{Backend, RedisServer, TcpProxy, redis_url, unique_ns, within};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

#[cached_query(cache = cache, ttl = 60, invalidate = "item:<id>", skip(src))]
async fn item(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.query(id).await
}

#[cached_query(cache = cache, ttl = 60, invalidate = "item:<id>", skip(src), lease = false)]
async fn item_unleased(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.query(id).await
}

/// `item(cache, src, id)` in a task of its own.
fn call(cache: &Cache, src: &Arc<Source>, id: i64) -> tokio::task::JoinHandle<Result<i64, String>> {
    let (cache, src) = (cache.clone(), src.clone());
    tokio::spawn(async move { item(&cache, &src, id).await })
}

fn leased(builder: CacheBuilder, lease_ttl: Duration) -> CacheBuilder {
    builder.leases(true).lease_ttl(lease_ttl)
}

/// Two caches ("processes") on one namespace (returned with them) of `backend`.
async fn two_caches(
    backend: Backend,
    name: &str,
) -> (Cache, Cache, String, Option<common::Cluster>) {
    let ns = unique_ns(name);
    let lease_ttl = Duration::from_secs(60);
    match backend {
        Backend::Cluster => {
            let cluster = common::Cluster::start();
            let b = || leased(Cache::builder().redis_cluster(cluster.urls()), lease_ttl);
            let a = b().namespace(name).build().await.unwrap();
            let other = b().namespace(name).build().await.unwrap();
            // Each master's first connection clears the namespace once: done before the test.
            let warm: Vec<String> = (0..64).map(|i| format!("warm:{i}")).collect();
            for cache in [&a, &other] {
                cache.invalidate_many(&warm).await.unwrap();
            }
            (a, other, name.to_owned(), Some(cluster))
        }
        Backend::NearCache => {
            let b = || {
                leased(
                    Cache::builder().redis(&redis_url()).near_cache(100),
                    lease_ttl,
                )
            };
            let a = b().namespace(&ns).build().await.unwrap();
            let other = b().namespace(&ns).build().await.unwrap();
            (a, other, ns, None)
        }
        _ => {
            let b = || leased(Cache::builder().redis(&redis_url()), lease_ttl);
            let a = b().namespace(&ns).build().await.unwrap();
            let other = b().namespace(&ns).build().await.unwrap();
            (a, other, ns, None)
        }
    }
}

/// Waits until `cache` has a caller waiting on a lease (`lease_waits` reached `n`).
async fn waiting(cache: &Cache, n: u64) {
    within(
        Duration::from_secs(10),
        "a caller waits on the lease",
        || {
            let waits = cache.stats().lease_waits;
            async move { waits >= n }
        },
    )
    .await;
}

/// Guards against a hang: a caller that should not wait for a lease's expiry (60 s in these
/// tests) must be done long before it.
async fn soon<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("no caller waits for the lease's expiry")
}

async fn waits_for_the_holder(backend: Backend, name: &str) {
    let (a, b, _, _cluster) = two_caches(backend, name).await;
    let src = Source::new(100, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let waiter = call(&b, &src, 1);
    waiting(&b, 1).await;
    src.go.add_permits(1);
    assert_eq!(holder.await.unwrap(), Ok(101));
    assert_eq!(soon(waiter).await.unwrap(), Ok(101));
    assert_eq!(src.calls.load(SeqCst), 1, "one query for both processes");
    let stats = b.stats();
    assert_eq!((stats.hits, stats.misses, stats.lease_waits), (1, 0, 1));
    assert_eq!(stats.errors + a.stats().errors, 0);
}

#[tokio::test]
async fn a_second_process_waits_for_the_lease_holder() {
    waits_for_the_holder(Backend::Redis, "lease-wait").await;
}

#[tokio::test]
async fn a_second_process_waits_for_the_lease_holder_near_cache() {
    waits_for_the_holder(Backend::NearCache, "lease-wait-near").await;
}

#[tokio::test]
async fn a_second_process_waits_for_the_lease_holder_cluster() {
    waits_for_the_holder(Backend::Cluster, "lease-wait-cluster").await;
}

#[tokio::test]
async fn the_write_releases_the_lease_and_a_miss_costs_one_request_more() {
    let server = RedisServer::start();
    let ns = unique_ns("lease-cost");
    let cache = leased(
        Cache::builder().redis(&server.url()),
        Duration::from_secs(5),
    )
    .namespace(&ns)
    .build()
    .await
    .unwrap();
    let src = Source::new(0, 0);
    // The namespace's stamps and the tag exist: what follows is a steady-state miss.
    assert_eq!(item(&cache, &src, 0).await, Ok(0));
    cache.invalidate("item:1").await.unwrap();
    let count = |c: &str| server.command_calls(c);
    let before = (count("mget"), count("set"), count("eval"));
    assert_eq!(item(&cache, &src, 1).await, Ok(1));
    let after = (count("mget"), count("set"), count("eval"));
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (1, 2, 2),
        "a miss: its read, the lease (an EVAL whose SET NX is counted), the entry's SET and \
         the release (an EVAL)"
    );
    let keys = common::keys_under(&server.url(), &ns).await;
    assert!(
        !keys.iter().any(|k| k.contains(":l:")),
        "the lease is released: {keys:?}"
    );
    // A hit takes no lease.
    assert_eq!(item(&cache, &src, 1).await, Ok(1));
    assert_eq!(count("set"), after.1);
    assert_eq!(count("mget"), after.0 + 1);
    // `lease = false`: no lease.
    cache.invalidate("item:2").await.unwrap();
    let sets = count("set");
    assert_eq!(item_unleased(&cache, &src, 2).await, Ok(2));
    assert_eq!(count("set"), sets + 1, "only the entry's SET");
}

/// The holder's query fails, or its caller is cancelled: the lease is released at once and
/// the waiter runs the query itself, long before the lease's 60 s.
#[tokio::test]
async fn a_failed_holder_releases_its_lease_to_the_waiters() {
    let (a, b, _, _) = two_caches(Backend::Redis, "lease-fail").await;
    let src = Source::new(200, 1);
    src.fail_held.store(true, SeqCst);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let waiter = call(&b, &src, 1);
    waiting(&b, 1).await;
    src.go.add_permits(1);
    assert_eq!(
        holder.await.unwrap(),
        Err("query of item 1 failed".to_owned())
    );
    assert_eq!(soon(waiter).await.unwrap(), Ok(201));
    assert_eq!(src.calls.load(SeqCst), 2);
    let stats = b.stats();
    assert_eq!((stats.hits, stats.misses, stats.lease_waits), (0, 1, 1));
}

#[tokio::test]
async fn a_cancelled_holder_releases_its_lease_to_the_waiters() {
    let (a, b, _, _) = two_caches(Backend::Redis, "lease-cancel").await;
    let src = Source::new(300, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let waiter = call(&b, &src, 1);
    waiting(&b, 1).await;
    holder.abort();
    assert!(holder.await.unwrap_err().is_cancelled());
    assert_eq!(soon(waiter).await.unwrap(), Ok(301));
    assert_eq!(src.calls.load(SeqCst), 2);
}

/// A waiter whose poll finds the entry's tag invalidated stops waiting for the holder (whose
/// query began before) and runs its own query: it returns the new value, and the holder's
/// late result is never served.
#[tokio::test]
async fn an_invalidation_ends_the_wait() {
    let (a, b, ns, _) = two_caches(Backend::Redis, "lease-invalidated").await;
    let src = Source::new(400, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let waiter = call(&b, &src, 1);
    waiting(&b, 1).await;
    src.value.store(500, SeqCst);
    a.invalidate("item:1").await.unwrap();
    assert_eq!(soon(waiter).await.unwrap(), Ok(501), "the new value");
    src.go.add_permits(1);
    assert_eq!(
        holder.await.unwrap(),
        Ok(401),
        "began before the invalidation"
    );
    let c = leased(
        Cache::builder().redis(&redis_url()),
        Duration::from_secs(60),
    );
    let c = c.namespace(&ns).build().await.unwrap();
    // The holder's late write replaced the waiter's entry under stamps no longer current:
    // a miss, never its value.
    assert_eq!(item(&c, &src, 1).await, Ok(501));
}

/// A caller that reads after an invalidation never waits for a lease taken before it.
#[tokio::test]
async fn a_caller_after_an_invalidation_does_not_wait_for_an_older_lease() {
    let (a, b, _, _) = two_caches(Backend::Redis, "lease-after").await;
    let src = Source::new(600, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    src.value.store(700, SeqCst);
    b.invalidate("item:1").await.unwrap();
    assert_eq!(soon(item(&b, &src, 1)).await, Ok(701));
    assert_eq!(b.stats().lease_waits, 0);
    src.go.add_permits(1);
    assert_eq!(holder.await.unwrap(), Ok(601));
}

/// Redis slow while a caller waits on a lease: its poll times out and it queries at once
/// (fail-open), long before the lease's 60 s.
#[tokio::test]
async fn a_waiter_queries_when_redis_stalls() {
    let ns = unique_ns("lease-stall");
    let a = leased(
        Cache::builder().redis(&redis_url()),
        Duration::from_secs(60),
    )
    .namespace(&ns)
    .build()
    .await
    .unwrap();
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    let b = leased(
        common::fail_fast(&proxy.redis_url(), &ns),
        Duration::from_secs(60),
    )
    .build()
    .await
    .unwrap();
    let src = Source::new(800, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let waiter = call(&b, &src, 1);
    waiting(&b, 1).await;
    proxy.stall();
    assert_eq!(soon(waiter).await.unwrap(), Ok(801));
    let stats = b.stats();
    assert_eq!((stats.misses, stats.lease_waits), (1, 1));
    assert!(stats.errors >= 1, "the failed poll is counted: {stats:?}");
    src.go.add_permits(1);
    assert_eq!(holder.await.unwrap(), Ok(801));
}

/// Redis down: no lease, the query runs, counted as an error (fail-open as without leases).
#[tokio::test]
async fn leases_are_skipped_while_redis_is_down() {
    let mut server = RedisServer::start();
    let ns = unique_ns("lease-down");
    let cache = leased(
        common::fail_fast(&server.url(), &ns),
        Duration::from_secs(60),
    )
    .build()
    .await
    .unwrap();
    let src = Source::new(900, 0);
    assert_eq!(item(&cache, &src, 1).await, Ok(901));
    server.kill();
    assert_eq!(soon(item(&cache, &src, 2)).await, Ok(902));
    let stats = cache.stats();
    assert_eq!(stats.misses, 2);
    assert!(stats.errors >= 1);
    assert_eq!(stats.lease_waits, 0);
}

/// What a waiter costs: one `SET NX`, then one `MGET` per poll, polls 2 ms apart growing by
/// half up to 50 ms: at most the number of poll times the wait covered.
#[tokio::test]
async fn a_waiter_polls_at_growing_intervals() {
    let server = RedisServer::start();
    let ns = unique_ns("lease-polls");
    let b = |ns: &str| {
        leased(
            Cache::builder().redis(&server.url()),
            Duration::from_secs(60),
        )
        .namespace(ns)
    };
    let (a, w) = (b(&ns).build().await.unwrap(), b(&ns).build().await.unwrap());
    let src = Source::new(0, 0);
    // Connections made and stamps created: only the calls below are counted.
    assert_eq!(item(&a, &src, 0).await, Ok(0));
    assert_eq!(item(&w, &src, 0).await, Ok(0));
    a.invalidate("item:1").await.unwrap();
    src.holds.store(1, SeqCst);
    let mgets = server.command_calls("mget");
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let started = std::time::Instant::now();
    let waiter = call(&w, &src, 1);
    waiting(&w, 1).await;
    // The holder's query takes 300 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    src.go.add_permits(1);
    assert_eq!(holder.await.unwrap(), Ok(1));
    assert_eq!(waiter.await.unwrap(), Ok(1));
    let waited = started.elapsed();
    // The holder's one read and the waiter's; the rest are the waiter's polls.
    let polls = server.command_calls("mget") - mgets - 2;
    let (mut at, mut delay, mut bound) = (Duration::ZERO, Duration::from_millis(2), 0);
    while at <= waited {
        at += delay;
        delay = (delay * 3 / 2).min(Duration::from_millis(50));
        bound += 1;
    }
    assert!(
        (1..=bound).contains(&polls),
        "{polls} polls in {waited:?}, at most {bound}"
    );
    println!("a waiter of {waited:?}: {polls} polls (MGET) and one SET NX");
}

/// The stale-set stress with leases on, readers spread over three caches (three processes as
/// far as leases go) on one namespace: zero stale reads.
#[sqlx::test]
async fn no_stale_reads_with_leases(pool: PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE counters (id INT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO counters VALUES (1, 0);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let ns = unique_ns("lease-stress");
    let b = || leased(Cache::builder().redis(&redis_url()), Duration::from_secs(5)).namespace(&ns);
    let caches = Arc::new([
        b().build().await.unwrap(),
        b().build().await.unwrap(),
        b().build().await.unwrap(),
    ]);
    let turn = Arc::new(AtomicU32::new(0));
    let writer = caches[0].clone();
    let readers = caches.clone();
    common::no_stale_reads(pool, writer, move |pool, cache| {
        let n = turn.fetch_add(1, SeqCst) as usize % 3;
        let cache = if n == 0 { cache } else { readers[n].clone() };
        async move { counter(&pool, &cache).await.unwrap() }
    })
    .await;
    let stats: Vec<_> = caches.iter().map(Cache::stats).collect();
    assert!(
        stats.iter().map(|s| s.lease_waits).sum::<u64>() > 0,
        "leases were waited on: {stats:?}"
    );
    assert!(stats.iter().all(|s| s.errors == 0), "{stats:?}");
}

#[cached_query(cache = cache, ttl = 60, invalidate = "counter:1")]
async fn counter(pool: &PgPool, cache: &Cache) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM counters WHERE id = 1")
        .fetch_one(pool)
        .await
}

/// A holder in another process killed with SIGKILL mid-query: the waiter here queries
/// within the lease's TTL (the documented bound) and does not hang.
#[tokio::test]
async fn a_holder_killed_mid_query_delays_waiters_at_most_the_lease_ttl() {
    use std::io::BufRead;
    let ns = unique_ns("lease-sigkill");
    let lease_ttl = Duration::from_secs(2);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "lease_holder_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CQ_LEASE_NAMESPACE", &ns)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("holding") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the child holds");
    }
    let cache = leased(Cache::builder().redis(&redis_url()), lease_ttl)
        .namespace(&ns)
        .build()
        .await
        .unwrap();
    let src = Source::new(1000, 0);
    let started = std::time::Instant::now();
    let waiter = call(&cache, &src, 1);
    waiting(&cache, 1).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(soon(waiter).await.unwrap(), Ok(1001));
    let waited = started.elapsed();
    assert!(
        waited <= lease_ttl + Duration::from_millis(500),
        "waited {waited:?}, past the lease's {lease_ttl:?}"
    );
    assert_eq!(src.calls.load(SeqCst), 1);
    assert_eq!(cache.stats().lease_waits, 1);
}

/// The other process of the test above: takes the lease on item 1 and hangs in its query.
#[tokio::test]
#[ignore = "run by a_holder_killed_mid_query_delays_waiters_at_most_the_lease_ttl"]
async fn lease_holder_process() {
    let ns = std::env::var("CQ_LEASE_NAMESPACE").unwrap();
    let cache = leased(Cache::builder().redis(&redis_url()), Duration::from_secs(2))
        .namespace(&ns)
        .build()
        .await
        .unwrap();
    let src = Source::new(1000, 1);
    let call = call(&cache, &src, 1);
    src.entered.notified().await;
    println!("holding");
    let _ = call.await;
}

#[tokio::test]
async fn a_zero_lease_ttl_is_refused_by_name() {
    let err = Cache::builder()
        .redis(&redis_url())
        .leases(true)
        .lease_ttl(Duration::ZERO)
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lease_ttl"), "{err}");
    // No longer than one response timeout: no poll could be sent in it.
    let err = Cache::builder()
        .redis(&redis_url())
        .leases(true)
        .lease_ttl(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(250))
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lease_ttl") && err.contains("response_timeout"),
        "{err}"
    );
    // In memory leases do nothing: no such rule.
    Cache::builder()
        .memory()
        .leases(true)
        .lease_ttl(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(250))
        .build()
        .await
        .unwrap();
}

/// A waiter gives up at its own `lease_ttl` (1 s) even when the holder's lease is longer
/// (60 s) and its query still runs: it queries itself.
#[tokio::test]
async fn a_waiter_queries_at_its_own_lease_ttl() {
    let ns = unique_ns("lease-own-ttl");
    let builder = |ttl| leased(Cache::builder().redis(&redis_url()), ttl).namespace(&ns);
    let a = builder(Duration::from_secs(60)).build().await.unwrap();
    let b = builder(Duration::from_secs(1)).build().await.unwrap();
    let src = Source::new(1100, 1);
    let holder = call(&a, &src, 1);
    src.entered.notified().await;
    let started = std::time::Instant::now();
    assert_eq!(soon(item(&b, &src, 1)).await, Ok(1101));
    let waited = started.elapsed();
    // Its last poll goes one response timeout (250 ms) before its lease_ttl.
    assert!(
        waited >= Duration::from_millis(750) && waited <= Duration::from_millis(1500),
        "waited {waited:?}: its lease_ttl, then its own query"
    );
    let stats = b.stats();
    assert_eq!((stats.lease_waits, stats.errors), (1, 0), "{stats:?}");
    assert_eq!(src.calls.load(SeqCst), 2);
    src.go.add_permits(1);
    assert_eq!(holder.await.unwrap(), Ok(1101));
}

#[cached_query(cache = cache, ttl = 60, invalidate = "items", skip(src))]
async fn listed(cache: &Cache, src: &Source, id: i64) -> Result<i64, String> {
    src.query(id).await
}

/// Redis killed after a miss was decided from the near cache alone (entry and stamps held
/// in process): the lease's `SET NX` fails and the query runs at once, counted as an error.
#[tokio::test]
async fn a_lease_that_cannot_be_taken_is_skipped() {
    let mut server = RedisServer::start();
    let ns = unique_ns("lease-near-down");
    let cache = leased(
        common::fail_fast(&server.url(), &ns),
        Duration::from_secs(60),
    )
    .near_cache(100)
    .build()
    .await
    .unwrap();
    let src = Source::new(1200, 0);
    assert_eq!(listed(&cache, &src, 1).await, Ok(1201));
    cache.invalidate("items").await.unwrap();
    // The tag's new token, held by the near cache along with item 1's old entry.
    assert_eq!(listed(&cache, &src, 2).await, Ok(1202));
    server.kill();
    let errors = cache.stats().errors;
    assert_eq!(soon(listed(&cache, &src, 1)).await, Ok(1201));
    let stats = cache.stats();
    assert_eq!(stats.errors, errors + 1, "only the lease failed: {stats:?}");
    assert_eq!((stats.misses, stats.lease_waits), (3, 0));
}
