//! Fault injection on real servers the tests start, break and restart themselves.

mod common;

use cached_query::{Cache, cached_query};
use common::{RedisServer, database_url, keys_under, raw, redis_cache};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

#[cached_query(cache = cache, invalidate = "item:<id>")]
async fn item_value(
    pool: &PgPool,
    cache: &Cache,
    table: &str,
    id: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT value FROM {table} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(pool)
    .await
}

/// A table of our own in the shared test database, dropped at the end.
async fn items_table(pool: &PgPool, name: &str, rows: i64) -> String {
    let table = format!("cq_items_{name}_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id BIGINT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO {table} SELECT i, i * 10 FROM generate_series(0, {rows} - 1) i;"
    )))
    .execute(pool)
    .await
    .unwrap();
    table
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_concurrent_reads_then_restarted() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&database_url())
        .await
        .unwrap();
    let table = items_table(&pool, "kill", 64).await;
    let mut server = RedisServer::start();
    let cache = common::fail_fast(&server.url(), "kill")
        .build()
        .await
        .unwrap();
    let done = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let (pool, cache, table, done) =
                (pool.clone(), cache.clone(), table.clone(), done.clone());
            tokio::spawn(async move {
                let mut wrong = 0;
                for i in 0..1000_i64 {
                    let id = (t * 7 + i) % 64;
                    match item_value(&pool, &cache, &table, id).await {
                        Ok(v) if v == id * 10 => {}
                        _ => wrong += 1,
                    }
                    done.fetch_add(1, SeqCst);
                }
                wrong
            })
        })
        .collect();
    while done.load(SeqCst) < 8_000 {
        tokio::task::yield_now().await;
    }
    server.kill();
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            0,
            "every call returned the database's value"
        );
    }
    let stats = cache.stats();
    assert!(stats.hits > 0 && stats.errors > 0, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 32_000);

    server.restart();
    let before = cache.stats().hits;
    let start = Instant::now();
    while cache.stats().hits == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "hits did not come back: {:?}",
            cache.stats()
        );
        assert_eq!(item_value(&pool, &cache, &table, 1).await.unwrap(), 10);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop_table(&pool, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_response_timeout_then_nothing() {
    let pool = PgPool::connect(&database_url()).await.unwrap();
    let table = items_table(&pool, "stall", 8).await;
    let server = RedisServer::start();
    let cooldown = Duration::from_millis(1000);
    let cache = common::fail_fast(&server.url(), "stall")
        .circuit_breaker(3, cooldown)
        .build()
        .await
        .unwrap();
    item_value(&pool, &cache, &table, 1).await.unwrap();
    let mut latencies =
        common::assert_breaker_limits_reads_while_frozen(&server, cooldown, async {
            let mut latencies = Vec::new();
            for i in 0..200 {
                let start = Instant::now();
                assert_eq!(
                    item_value(&pool, &cache, &table, i % 8).await.unwrap(),
                    (i % 8) * 10
                );
                latencies.push(start.elapsed());
            }
            latencies
        })
        .await;
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let paid = latencies
        .iter()
        .filter(|d| **d >= Duration::from_millis(100))
        .count();
    // Reported, not asserted: timings belong in benchmarks.
    println!(
        "stalled Redis: p50 {:?}, p99 {p99:?}, max {:?}; {paid} of 200 calls waited for the 100 ms timeout",
        latencies[100], latencies[199]
    );
    assert_eq!(
        cache.stats().errors,
        200,
        "every call during the stall fell back to the database"
    );
    drop_table(&pool, &table).await;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Row {
    id: i64,
    version: i64,
    padding: String,
}

#[cached_query(cache = cache, invalidate = "row:<id>", skip(versions))]
async fn versioned_row(cache: &Cache, versions: &[AtomicI64], id: i64) -> Result<Row, String> {
    Ok(Row {
        id,
        version: versions[id as usize].load(SeqCst),
        padding: "x".repeat(200),
    })
}

#[tokio::test]
async fn tag_keys_evicted_under_maxmemory_never_cause_stale_reads() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let cache = redis_cache(&server.url(), "lru").await;
    let versions: Vec<AtomicI64> = (0..3000).map(|_| AtomicI64::new(0)).collect();
    let mut stale = 0;
    for round in 0..4 {
        for id in 0..3000_i64 {
            let row = versioned_row(&cache, &versions, id).await.unwrap();
            if row.version != versions[id as usize].load(SeqCst) {
                stale += 1;
            }
            if (id + round) % 3 == 0 {
                // A write: the source changes, then the tag is invalidated.
                versions[id as usize].fetch_add(1, SeqCst);
                cache.invalidate(&format!("row:{id}")).await.unwrap();
            }
        }
    }
    let evicted: u64 = server
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        evicted > 1000,
        "the test must really evict keys (evicted {evicted})"
    );
    assert_eq!(stale, 0);
    assert_eq!(cache.stats().errors, 0);
}

#[cached_query(cache = cache, name = "faults.typed")]
async fn typed(cache: &Cache, id: i64) -> Result<Row, String> {
    Ok(Row {
        id,
        version: 1,
        padding: String::new(),
    })
}

#[tokio::test]
async fn an_entry_of_another_rust_type_is_a_miss_that_heals() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "typed").await;
    let good = typed(&cache, 5).await.unwrap();
    let entry = keys_under(&server.url(), "typed")
        .await
        .into_iter()
        .find(|k| k.contains(":e:"))
        .unwrap();
    let mut conn = raw(&server.url()).await;
    let bytes: Vec<u8> = redis::cmd("GET")
        .arg(&entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Keep the envelope (valid stamps), swap the JSON for another type's: what an old
    // deployment with a different `Row` would have written under the same key. The header is
    // magic, version, stamp count, then length-prefixed stamps; the stamps are random bytes,
    // so the payload is found by walking the header, not by looking for `{`.
    let mut payload_at = 3;
    for _ in 0..bytes[2] {
        payload_at += 1 + usize::from(bytes[payload_at]);
    }
    assert_eq!(bytes[payload_at], b'{');
    let mut other = bytes[..payload_at].to_vec();
    other.extend_from_slice(br#"{"id":"five","renamed_field":true}"#);
    let _: () = redis::cmd("SET")
        .arg(&entry)
        .arg(other)
        .query_async(&mut conn)
        .await
        .unwrap();

    assert_eq!(typed(&cache, 5).await.unwrap(), good);
    assert_eq!(cache.stats().decode_errors, 1);
    assert_eq!(typed(&cache, 5).await.unwrap(), good);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.errors), (1, 2, 0));
}

#[cached_query(cache = cache, skip(secs))]
async fn sleepy_value(
    pool: &PgPool,
    cache: &Cache,
    marker: &str,
    secs: f64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT 42::BIGINT FROM pg_sleep($1) -- {marker}"
    )))
    .bind(secs)
    .fetch_one(pool)
    .await
}

/// Terminates the backend running the query tagged `marker` once it shows up.
async fn kill_backend_running(marker: &str) {
    let admin = PgPool::connect(&database_url()).await.unwrap();
    let start = Instant::now();
    loop {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE query LIKE '%' || $1 AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
        )
        .bind(marker)
        .fetch_all(&admin)
        .await
        .unwrap();
        if killed.contains(&true) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "query {marker} never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postgres_connection_fails_the_call_caches_nothing_and_the_pool_recovers() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .unwrap();
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "pgkill").await;
    let marker = format!("cq_marker_{}", std::process::id());

    // Cached call: the database error reaches the caller, nothing is cached.
    let (result, ()) = tokio::join!(
        sleepy_value(&pool, &cache, &marker, 30.0),
        kill_backend_running(&marker)
    );
    let err = result.unwrap_err();
    assert!(!matches!(err, sqlx::Error::RowNotFound), "{err}");
    assert_eq!(sleepy_value(&pool, &cache, &marker, 0.0).await.unwrap(), 42);
    assert_eq!(
        (cache.stats().misses, cache.stats().hits),
        (2, 0),
        "the failed call cached nothing"
    );
    assert_eq!(
        sleepy_value(&pool, &cache, &marker, 30.0).await.unwrap(),
        42,
        "now a hit"
    );

    // Uncached call on the same pool: same story.
    let uncached = format!("{marker}_plain");
    let sql = format!("SELECT 7::BIGINT FROM pg_sleep(30) -- {uncached}");
    let (result, ()) = tokio::join!(
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).fetch_one(&pool),
        kill_backend_running(&uncached)
    );
    assert!(result.is_err());
    for _ in 0..4 {
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1, "the pool recovered");
    }
}

#[cached_query(cache = cache, invalidate = "<tag>", skip(calls))]
async fn tagged(cache: &Cache, calls: &AtomicU32, tag: &str) -> Result<String, String> {
    calls.fetch_add(1, SeqCst);
    Ok(tag.to_owned())
}

#[tokio::test]
async fn hostile_tag_values_only_ever_address_their_own_tag() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "hostile").await;
    let other_ns = redis_cache(&server.url(), "hostile2").await;
    let long = "k".repeat(100_000);
    let tags = [
        "*",
        "user:*",
        "?",
        "[a-z]",
        "a b",
        "line\nbreak",
        "hostile:g",
        "hostile2:t:x",
        long.as_str(),
    ];
    let calls = AtomicU32::new(0);
    for t in tags {
        tagged(&cache, &calls, t).await.unwrap();
        tagged(&other_ns, &calls, t).await.unwrap();
    }
    let n = tags.len() as u32;
    assert_eq!(calls.load(SeqCst), 2 * n);
    for t in tags {
        cache.invalidate(t).await.unwrap();
        // Only that tag's entry in this namespace runs again.
        let before = calls.load(SeqCst);
        for u in tags {
            tagged(&cache, &calls, u).await.unwrap();
            tagged(&other_ns, &calls, u).await.unwrap();
        }
        assert_eq!(
            calls.load(SeqCst),
            before + 1,
            "invalidating {t:.20?} touched other entries"
        );
    }
    for k in keys_under(&server.url(), "hostile").await {
        assert!(
            k.len() < 120 && !k.contains(' ') && !k.contains('\n') && !k.contains('*'),
            "{k:.80}"
        );
    }
}

/// A pending invalidation reaches Redis once it is back, even if this process makes no
/// further call (a process that only writes): a background task retries it. Bound: 5 s
/// after Redis returns (the retry backs off to 1 s).
#[tokio::test]
async fn a_pending_invalidation_is_delivered_without_further_calls() {
    let server = RedisServer::start();
    let cache = common::fail_fast(&server.url(), "bg")
        .build()
        .await
        .unwrap();
    cache.invalidate("t").await.unwrap();
    let keys = keys_under(&server.url(), "bg").await;
    let keys: Vec<String> = keys.into_iter().filter(|k| k.contains(":t:")).collect();
    let [tag_key] = &keys[..] else {
        panic!("one tag key: {keys:?}")
    };
    let mut conn = raw(&server.url()).await;
    let token = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let key = tag_key.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Vec<u8>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let before = token(&mut conn).await;
    server.freeze();
    assert!(cache.invalidate("t").await.is_err(), "pending while frozen");
    server.thaw();
    common::within(
        Duration::from_secs(5),
        "delivered in the background",
        || {
            let next = token(&mut conn);
            let before = before.clone();
            async move { next.await != before }
        },
    )
    .await;
    assert_eq!(
        cache.stats().hits + cache.stats().misses,
        0,
        "no call was made"
    );
}

/// A re-invalidation during a pending delivery. The proxy holds Redis's replies: the tag's
/// invalidation is pending (its caller was cancelled), a delivery of it is in flight (Redis
/// applied it, the reply is held), and after a new commit the same tag is invalidated again,
/// queueing behind that delivery. It must send its own bump once the delivery returns, never
/// return Ok on the strength of a bump sent before it was called.
#[tokio::test]
async fn a_re_invalidation_during_a_pending_delivery_sends_its_own_bump() {
    let server = RedisServer::start();
    let proxy = common::TcpProxy::start(&server.addr()).await;
    let cache = Cache::builder()
        .redis(&proxy.redis_url())
        .namespace("redeliver")
        .response_timeout(Duration::from_secs(5))
        .circuit_breaker(1000, Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    for tag in ["warm-1", "warm-2", "warm-3"] {
        cache.invalidate(tag).await.unwrap(); // every connection made and checked
    }
    let sets = || server.command_calls("set");
    let until_sets = |n: u64| {
        let server = &server;
        common::within(
            Duration::from_secs(10),
            "a bump applied by Redis",
            move || {
                let applied = server.command_calls("set") >= n;
                async move { applied }
            },
        )
    };
    let base = sets();
    proxy.hold_replies();
    // 1. Cancelled once Redis has applied its bump: the invalidation is pending.
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.invalidate("t").await }
    });
    until_sets(base + 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // 2. The background delivery of it: applied, its reply held, the delivery under way.
    until_sets(base + 2).await;
    // 3. A new invalidation of the same tag queues behind that delivery (current-thread
    // runtime: one yield runs it until it waits).
    let second = tokio::spawn({
        let cache = cache.clone();
        async move { cache.invalidate("t").await }
    });
    tokio::task::yield_now().await;
    assert_eq!(sets(), base + 2, "nothing else reached Redis");
    proxy.release_replies();
    second.await.unwrap().unwrap();
    assert!(
        sets() >= base + 3,
        "the second invalidation returned Ok without sending a bump after it was called"
    );
}

/// A tag key missing when an entry is read, and back with the token the entry was stored
/// under before the read creates it: here the test renames it back while the proxy holds the
/// read's reply; in production, a server restarted from disk between the read and the
/// creation (its `run_id` check then replaces the generation, but only after this read took
/// the old one). The entry is a miss: a token found after the read cannot vouch for an entry
/// read before it.
#[tokio::test]
async fn an_entry_read_with_a_missing_stamp_is_a_miss() {
    let server = RedisServer::start();
    let proxy = common::TcpProxy::start(&server.addr()).await;
    let cache = Cache::builder()
        .redis(&proxy.redis_url())
        .namespace("gone")
        .response_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let versions: Vec<AtomicI64> = (0..2).map(|_| AtomicI64::new(0)).collect();
    assert_eq!(
        versioned_row(&cache, &versions, 1).await.unwrap().version,
        0
    );
    versions[1].store(1, SeqCst);
    assert_eq!(
        versioned_row(&cache, &versions, 1).await.unwrap().version,
        0,
        "a hit while the tag is there"
    );
    let tag = server.cli(&["--scan", "--pattern", "gone:t:*"]);
    let tag = tag.trim();
    assert_eq!(server.cli(&["RENAME", tag, "saved"]).trim(), "OK");
    let mgets = server.command_calls("mget");
    proxy.hold_replies();
    let read = tokio::spawn({
        let cache = cache.clone();
        async move {
            let versions: Vec<AtomicI64> = (0..2).map(|_| AtomicI64::new(1)).collect();
            versioned_row(&cache, &versions, 1).await
        }
    });
    common::within(Duration::from_secs(10), "the read reached Redis", || {
        let read = server.command_calls("mget") > mgets;
        async move { read }
    })
    .await;
    // The read saw no tag key; the key comes back with the entry's token.
    assert_eq!(server.cli(&["RENAME", "saved", tag]).trim(), "OK");
    proxy.release_replies();
    assert_eq!(
        read.await.unwrap().unwrap().version,
        1,
        "an entry whose tag key was missing when it was read"
    );
}
