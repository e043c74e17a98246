//! The benchmark suite: `cargo bench --bench suite` (`-- --smoke` for a short run,
//! `-- --multi-thread` for a 2-worker runtime instead of one thread, `-- --only batch` for
//! one group of cases: reads, batch, batch-hits, protocol, stale, invalidation, write,
//! stampede, fleet, timed, hit-cost).

//!
//! One process, real local Redis (`REDIS_URL`) and PostgreSQL (`DATABASE_URL`). Every read
//! case fetches the same 100 rows (a ~170-byte JSON user), warmed first, and reports the
//! latency of one caller (p50/p99) and the throughput of 64 concurrent tasks, each relative
//! to the floor: a raw redis-rs `GET` plus `serde_json` decode of the same value.
//! Then: a miss, invalidation of a tag over 1 vs 100 000 entries, a 1 000-caller stampede
//! and the cost of `#[timed]`. The results go to stdout as Markdown; nothing fails on timing.

#[path = "suite/fleet.rs"]
mod fleet;

use cached::AsyncRedisCache;
use cached::macros::concurrent_cached;
use cached_query::{Cache, cached_query, timed};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

const ROWS: i64 = 100;
const TASKS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct User {
    id: i64,
    name: String,
    email: String,
    bio: String,
    karma: i64,
}

/// The error type `cached` needs; only ever shown through `Debug` by `unwrap`.
#[derive(Debug, Clone)]
struct BenchError(#[allow(dead_code)] String);

impl From<sqlx::Error> for BenchError {
    fn from(e: sqlx::Error) -> Self {
        BenchError(e.to_string())
    }
}

struct Settings {
    smoke: bool,
    redis_url: String,
    database_url: String,
    /// Prefix of every Redis key this run writes (deleted at the end).
    prefix: String,
}

static SETTINGS: LazyLock<Settings> = LazyLock::new(|| Settings {
    smoke: std::env::args().any(|a| a == "--smoke") || std::env::var_os("CQ_BENCH_SMOKE").is_some(),
    redis_url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    database_url: std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
    prefix: format!("cqbench{}", std::process::id()),
});
static POOL: OnceLock<PgPool> = OnceLock::new();
static DB_EXECUTIONS: AtomicU64 = AtomicU64::new(0);

fn pool() -> &'static PgPool {
    POOL.get().expect("pool is set up first")
}

async fn select_user(pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    DB_EXECUTIONS.fetch_add(1, Relaxed);
    sqlx::query_as("SELECT id, name, email, bio, karma FROM cq_bench_users WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

#[cached_query(cache = cache, ttl = 600, invalidate = "user:<id>", skip(pool))]
async fn cq_user(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    select_user(pool, id).await
}

/// The same read tagged by the result (`<ret.id>`): a hit also checks the tag's stamp.
#[cached_query(cache = cache, ttl = 600, invalidate = "user:<ret.id>", skip(pool))]
async fn cq_user_by_result(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    select_user(pool, id).await
}

/// A fresh key on every call (`nonce`), tagged by the result: always a miss, then the result
/// tags' script and a fill.
#[cached_query(cache = cache, ttl = 60, invalidate = "user:<ret.id>", skip(pool))]
async fn cq_user_miss_by_result(
    cache: &Cache,
    pool: &PgPool,
    id: i64,
    nonce: u64,
) -> Result<User, sqlx::Error> {
    let _ = nonce;
    select_user(pool, id).await
}

/// A fresh key on every call (`nonce`): always a miss, then a fill.
#[cached_query(cache = cache, ttl = 60, invalidate = "user:<id>", skip(pool))]
async fn cq_user_miss(
    cache: &Cache,
    pool: &PgPool,
    id: i64,
    nonce: u64,
) -> Result<User, sqlx::Error> {
    let _ = nonce;
    select_user(pool, id).await
}

/// The same rows read as one batch: one entry per id.
#[cached_query(cache = cache, ttl = 600, batch = ids, invalidate = "user:<ids>", skip(pool))]
async fn cq_users(
    cache: &Cache,
    pool: &PgPool,
    ids: &[i64],
) -> Result<HashMap<i64, User>, sqlx::Error> {
    select_users(pool, ids).await
}

async fn select_users(pool: &PgPool, ids: &[i64]) -> Result<HashMap<i64, User>, sqlx::Error> {
    DB_EXECUTIONS.fetch_add(1, Relaxed);
    let rows: Vec<User> =
        sqlx::query_as("SELECT id, name, email, bio, karma FROM cq_bench_users WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|u| (u.id, u)).collect())
}

/// The same read kept an hour past its TTL, returned when the query fails.
#[cached_query(cache = cache, stale_if_error = 3600, invalidate = "user:<id>", skip(pool))]
async fn cq_stale_user(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    select_user(pool, id).await
}

/// Entries that all carry one tag, for the invalidation cost.
#[cached_query(cache = cache, ttl = 600, invalidate = "<tag>")]
async fn tagged(cache: &Cache, tag: &str, n: u64) -> Result<u64, std::convert::Infallible> {
    let _ = tag;
    Ok(n)
}

/// The peer's Redis store under `suffix`, with redis-rs client-side caching when `csc`.
async fn peer_cache(suffix: &str, csc: bool) -> AsyncRedisCache<i64, User> {
    AsyncRedisCache::builder(format!("{}:{suffix}", SETTINGS.prefix))
        .ttl(Duration::from_secs(600))
        .connection_string(&SETTINGS.redis_url)
        .client_side_caching(csc)
        .build()
        .await
        .expect("cached's redis cache builds")
}

#[concurrent_cached(
    map_error = r##"|e| BenchError(format!("{e:?}"))"##,
    ty = "cached::AsyncRedisCache<i64, User>",
    create = r##"{ peer_cache("cached", false).await }"##
)]
async fn peer_user(id: i64) -> Result<User, BenchError> {
    Ok(select_user(pool(), id).await?)
}

#[concurrent_cached(
    map_error = r##"|e| BenchError(format!("{e:?}"))"##,
    ty = "cached::AsyncRedisCache<i64, User>",
    create = r##"{ peer_cache("cachedcsc", true).await }"##
)]
async fn peer_user_csc(id: i64) -> Result<User, BenchError> {
    Ok(select_user(pool(), id).await?)
}

#[inline(never)]
async fn plain_noop(x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31).rotate_left(7))
}

#[timed(name = "bench.noop")]
async fn timed_noop(x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31).rotate_left(7))
}

/// A hit on the in-memory backend: the library's own cost per call, no network.
#[cached_query(cache = cache, ttl = 3600, name = "bench.memory_hit")]
async fn memory_hit(cache: &Cache, x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31))
}

/// One row of the results table.
struct Row {
    case: &'static str,
    p50: Duration,
    p99: Duration,
    ops_per_sec: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Single-caller latency over `n` calls (ids rotate over the warmed rows), then the
/// throughput of 64 tasks calling concurrently for `window`.
async fn measure<F, Fut>(case: &'static str, f: F) -> Row
where
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_calls(case, 1, f).await
}

/// [`measure`] for calls that each cost about `weight` plain ones: `n / weight` calls.
async fn measure_calls<F, Fut>(case: &'static str, weight: usize, f: F) -> Row
where
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let s = &*SETTINGS;
    let (n, window) = if s.smoke {
        (300, Duration::from_millis(200))
    } else {
        (20_000, Duration::from_secs(3))
    };
    let n = (n / weight).max(20);
    let f = Arc::new(f);
    // On a worker thread, like a request handler (not on the thread blocked in `block_on`).
    let single = f.clone();
    let lat = tokio::spawn(async move {
        for id in 1..=ROWS {
            single(id).await;
        }
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let id = i as i64 % ROWS + 1;
            let start = Instant::now();
            single(id).await;
            lat.push(start.elapsed());
        }
        lat.sort();
        lat
    })
    .await
    .unwrap();

    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (f, done) = (f.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = t as i64;
                while Instant::now() < deadline {
                    f(i % ROWS + 1).await;
                    i += 1;
                    done.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let ops = done.load(Relaxed) as f64 / start.elapsed().as_secs_f64();
    Row {
        case,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        ops_per_sec: ops,
    }
}

fn print_table(rows: &[Row]) {
    let floor = &rows[0];
    println!("| case | p50 | p99 | p50 vs floor | throughput (64 tasks) | vs floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.2}× | {:.0} ops/s | {:.2}× |",
            r.case,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.p50.as_secs_f64() / floor.p50.as_secs_f64(),
            r.ops_per_sec,
            r.ops_per_sec / floor.ops_per_sec,
        );
    }
}

async fn setup_database() -> PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&SETTINGS.database_url)
        .await
        .expect("PostgreSQL is reachable at DATABASE_URL");
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS cq_bench_users (
            id BIGINT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
            bio TEXT NOT NULL, karma BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO cq_bench_users
         SELECT i, 'user ' || i, 'user' || i || '@example.com',
                repeat('likes postgres and redis; ', 3), i * 7
         FROM generate_series(1, $1) AS i
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ROWS)
    .execute(&pool)
    .await
    .unwrap();
    pool
}

async fn raw_redis() -> MultiplexedConnection {
    redis::Client::open(SETTINGS.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is reachable at REDIS_URL")
}

async fn cache(namespace: &str, near: Option<u64>) -> Cache {
    let mut b = Cache::builder()
        .redis(&SETTINGS.redis_url)
        .namespace(&format!("{}:{namespace}", SETTINGS.prefix));
    if let Some(capacity) = near {
        b = b.near_cache(capacity);
    }
    b.build().await.unwrap()
}

/// `#[cached_query]` hits on `cache`.
async fn cq_hits(case: &'static str, cache: Cache) -> Row {
    measure(case, move |id| {
        let c = cache.clone();
        async move {
            black_box(cq_user(&c, pool(), id).await.unwrap());
        }
    })
    .await
}

async fn read_cases() -> Vec<Row> {
    let s = &*SETTINGS;
    let mut conn = raw_redis().await;
    for id in 1..=ROWS {
        let row = select_user(pool(), id).await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("{}:floor:{id}", s.prefix))
            .arg(serde_json::to_vec(&row).unwrap())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut rows = Vec::new();
    let c = conn.clone();
    rows.push(
        measure("floor: redis-rs GET + serde_json", move |id| {
            let mut c = c.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(format!("{}:floor:{id}", SETTINGS.prefix))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                black_box(serde_json::from_slice::<User>(&bytes).unwrap());
            }
        })
        .await,
    );
    // What validating tags costs Redis itself: the same read as a cached_query hit (the
    // entry, the namespace generation and one tag of 16 bytes each) as one raw MGET.
    let _: () = redis::cmd("SET")
        .arg(format!("{}:gen", s.prefix))
        .arg([7u8; 16].as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    for id in 1..=ROWS {
        let _: () = redis::cmd("SET")
            .arg(format!("{}:tag:{id}", s.prefix))
            .arg([9u8; 16].as_slice())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let c = conn.clone();
    rows.push(
        measure(
            "reference: raw MGET entry + 2 tokens + serde_json",
            move |id| {
                let mut c = c.clone();
                async move {
                    let p = &SETTINGS.prefix;
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(format!("{p}:floor:{id}"))
                        .arg(format!("{p}:gen"))
                        .arg(format!("{p}:tag:{id}"))
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    let bytes = values[0].as_ref().unwrap();
                    black_box(serde_json::from_slice::<User>(bytes).unwrap());
                }
            },
        )
        .await,
    );
    rows.push(
        measure("PostgreSQL by primary key (sqlx)", |id| async move {
            black_box(select_user(pool(), id).await.unwrap());
        })
        .await,
    );
    let redis_cache = cache("redis", None).await;
    rows.push(cq_hits("#[cached_query] hit, Redis (1 tag)", redis_cache.clone()).await);
    // Checks that count calls, not time, so a slow machine cannot fail them: after the
    // warm-up's one miss per row, every call is a hit (a Redis error also counts a miss).
    let stats = redis_cache.stats();
    assert!(
        stats.hits > 0 && stats.misses <= ROWS as u64 + stats.errors,
        "Redis case missed after the warm-up: {stats:?}"
    );
    let near_cache = cache("near", Some(10_000)).await;
    rows.push(cq_hits("#[cached_query] hit, near cache", near_cache.clone()).await);
    let stats = near_cache.stats();
    // The single-caller pass alone (its third visit to each row on) gives near hits at
    // least half of its hits; the concurrent pass only adds near hits.
    assert!(
        stats.misses <= ROWS as u64 + stats.errors && stats.near_hits * 3 > stats.hits,
        "near cache mostly missed: {stats:?}"
    );
    let by_result = cache("by-result", None).await;
    rows.push(
        measure("#[cached_query] hit, Redis (1 result tag)", move |id| {
            let c = by_result.clone();
            async move {
                black_box(cq_user_by_result(&c, pool(), id).await.unwrap());
            }
        })
        .await,
    );
    let by_result_near = cache("by-result-near", Some(10_000)).await;
    rows.push(
        measure(
            "#[cached_query] hit, near cache (1 result tag)",
            move |id| {
                let c = by_result_near.clone();
                async move {
                    black_box(cq_user_by_result(&c, pool(), id).await.unwrap());
                }
            },
        )
        .await,
    );
    rows.push(
        measure("cached 4 AsyncRedisCache", |id| async move {
            black_box(peer_user(id).await.unwrap());
        })
        .await,
    );
    rows.push(
        measure(
            "cached 4 AsyncRedisCache + client_side_caching",
            |id| async move {
                black_box(peer_user_csc(id).await.unwrap());
            },
        )
        .await,
    );
    let miss_cache = cache("miss", None).await;
    let nonce = Arc::new(AtomicU64::new(0));
    rows.push(
        measure("#[cached_query] miss: query + fill", move |id| {
            let (c, nonce) = (miss_cache.clone(), nonce.fetch_add(1, Relaxed));
            async move {
                black_box(cq_user_miss(&c, pool(), id, nonce).await.unwrap());
            }
        })
        .await,
    );
    let miss_cache = cache("miss-by-result", None).await;
    let nonce = Arc::new(AtomicU64::new(0));
    rows.push(
        measure(
            "#[cached_query] miss: query + fill (1 result tag)",
            move |id| {
                let (c, nonce) = (miss_cache.clone(), nonce.fetch_add(1, Relaxed));
                async move {
                    black_box(cq_user_miss_by_result(&c, pool(), id, nonce).await.unwrap());
                }
            },
        )
        .await,
    );
    rows
}

/// A Redis cache with an outbox on the bench database (every call: another process).
async fn new_outbox_cache(pool: &PgPool) -> Cache {
    Cache::builder()
        .redis(&SETTINGS.redis_url)
        .namespace(&format!("{}:write-outbox", SETTINGS.prefix))
        .outbox(pool.clone())
        .build()
        .await
        .unwrap()
}

/// A transaction that has updated user `id`'s karma, not yet committed.
async fn begin_update(pool: &PgPool, id: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE cq_bench_users SET karma = karma + 1 WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// What invalidation adds to a single-row UPDATE transaction (BEGIN, UPDATE, COMMIT on one
/// pooled connection): after the commit (`commit_and_invalidate`, no outbox), and inside the
/// transaction through the outbox (`invalidate_on_commit`: one INSERT; the NOTIFY and the
/// delivery happen at commit and in the background), interleaved round by round.
async fn write_case() {
    let rounds = if SETTINGS.smoke { 50 } else { 3_000 };
    let pool = POOL.get().unwrap();
    let plain_cache = cache("write", None).await;
    let outbox_cache = new_outbox_cache(pool).await;
    let mut lat: [Vec<Duration>; 3] = Default::default();
    for round in 0..rounds {
        let id = 1 + (round as i64 % ROWS);
        let tags = [format!("user:{id}")];
        for (case, lat) in lat.iter_mut().enumerate() {
            let start = Instant::now();
            let mut tx = begin_update(pool, id).await;
            match case {
                0 => tx.commit().await.unwrap(),
                1 => plain_cache.commit_and_invalidate(tx, &tags).await.unwrap(),
                _ => {
                    outbox_cache
                        .invalidate_on_commit(&mut tx, &tags)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }
            lat.push(start.elapsed());
        }
    }
    println!("\n### Write path ({rounds} single-row UPDATE transactions per case)\n");
    println!("| case | p50 | p99 | p50 vs plain |\n|---|---:|---:|---:|");
    let names = [
        "BEGIN; UPDATE; COMMIT",
        "… `commit_and_invalidate` (no outbox)",
        "… `invalidate_on_commit` (outbox)",
    ];
    let mut base = 0.0;
    for (name, lat) in names.iter().zip(lat.iter_mut()) {
        lat.sort();
        let (p50, p99) = (percentile(lat, 0.5), percentile(lat, 0.99));
        if base == 0.0 {
            base = p50.as_secs_f64();
        }
        println!(
            "| {name} | {:.1} µs | {:.1} µs | {:.2}× |",
            us(p50),
            us(p99),
            p50.as_secs_f64() / base
        );
    }
    // Delivery delay: another cache (standing for another process) reads through its own
    // connections until it sees the committed value, polling without pause.
    for (label, reader) in [
        ("Redis", new_outbox_cache(pool).await),
        (
            "in-memory",
            Cache::builder()
                .memory()
                .outbox(pool.clone())
                .build()
                .await
                .unwrap(),
        ),
    ] {
        let rounds = if SETTINGS.smoke { 20 } else { 500 };
        let mut delays = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let id = 1 + (round as i64 % ROWS);
            let before = cq_user(&reader, pool, id).await.unwrap().karma;
            let mut tx = begin_update(pool, id).await;
            outbox_cache
                .invalidate_on_commit(&mut tx, [format!("user:{id}")])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let committed = Instant::now();
            while cq_user(&reader, pool, id).await.unwrap().karma == before {
                tokio::task::yield_now().await;
            }
            delays.push(committed.elapsed());
        }
        delays.sort();
        println!(
            "\ndelivery delay after commit, {label} reader ({rounds} commits): p50 {:.1} µs, p99 {:.1} µs",
            us(percentile(&delays, 0.5)),
            us(percentile(&delays, 0.99))
        );
    }
    drop(outbox_cache);
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS cached_query_outbox, cached_query_outbox_consumers;
         DROP FUNCTION IF EXISTS cached_query_outbox_notify(), cached_query_record(text[], text);",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Latency of `invalidate(tag)` when the tag covers 1 and 100 000 entries.
async fn invalidation_case() {
    let s = &*SETTINGS;
    let (entries, rounds) = if s.smoke {
        (2_000, 100)
    } else {
        (100_000, 2_000)
    };
    let cache = cache("inval", None).await;
    let fill = |tag: &'static str, count: u64| {
        let cache = cache.clone();
        async move {
            let per_task = count.div_ceil(TASKS as u64);
            let tasks: Vec<_> = (0..TASKS as u64)
                .map(|t| {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        for n in t * per_task..((t + 1) * per_task).min(count) {
                            tagged(&cache, tag, n).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    let start = Instant::now();
    fill("one", 1).await;
    fill("many", entries).await;
    let filled = start.elapsed();
    // Interleaved, so both see the same background work in Redis (e.g. rehashing after the fill).
    let (mut one, mut many) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        for (tag, lat) in [("one", &mut one), ("many", &mut many)] {
            let start = Instant::now();
            cache.invalidate(tag).await.unwrap();
            lat.push(start.elapsed());
        }
    }
    one.sort();
    many.sort();
    let (one50, one99) = (percentile(&one, 0.5), percentile(&one, 0.99));
    let (many50, many99) = (percentile(&many, 0.5), percentile(&many, 0.99));
    // The invalidation worked: a covered entry is a miss again (its value is recomputed).
    let before = cache.stats().misses;
    tagged(&cache, "many", 7).await.unwrap();
    assert_eq!(cache.stats().misses, before + 1);
    println!(
        "\n### Invalidation ({rounds} × `invalidate(tag)`; {entries} entries filled in {:.1} s)\n",
        filled.as_secs_f64()
    );
    println!("| tag covers | p50 | p99 |\n|---:|---:|---:|");
    println!("| 1 entry | {:.1} µs | {:.1} µs |", us(one50), us(one99));
    println!(
        "| {entries} entries | {:.1} µs | {:.1} µs |",
        us(many50),
        us(many99)
    );
    println!(
        "\nratio p50 {entries} / 1: {:.2}×",
        many50.as_secs_f64() / one50.as_secs_f64()
    );
}

/// Batch reads of the 100 rows against 100 single hits (in sequence, and concurrently), and
/// a batch with 10 misses against the uncached `WHERE id = ANY($1)` query.
async fn batch_case(all_cases: bool) {
    let cache = cache("batch", None).await;
    let ids: Vec<i64> = (1..=ROWS).collect();
    let all: &'static [i64] = Box::leak(ids.clone().into_boxed_slice());
    cq_users(&cache, pool(), &ids).await.unwrap();
    for &id in &ids {
        cq_user(&cache, pool(), id).await.unwrap();
    }
    let single = {
        let cache = cache.clone();
        measure("one single hit", move |id| {
            let c = cache.clone();
            async move {
                black_box(cq_user(&c, pool(), id).await.unwrap());
            }
        })
        .await
    };
    let batch = {
        let cache = cache.clone();
        measure_calls("batch of 100, all hits", 20, move |_| {
            let c = cache.clone();
            async move {
                black_box(cq_users(&c, pool(), all).await.unwrap());
            }
        })
        .await
    };
    if !all_cases {
        println!("\n### Batch hits (100 keys)\n");
        println!("| case | p50 | p99 | keys/s |\n|---|---:|---:|---:|");
        for (row, keys) in [(&single, 1.0), (&batch, 100.0)] {
            println!(
                "| {} | {:.1} µs | {:.1} µs | {:.0} |",
                row.case,
                us(row.p50),
                us(row.p99),
                row.ops_per_sec * keys
            );
        }
        return;
    }
    let sequence = {
        let cache = cache.clone();
        measure_calls("100 single hits in sequence", 20, move |_| {
            let c = cache.clone();
            async move {
                for &id in all {
                    black_box(cq_user(&c, pool(), id).await.unwrap());
                }
            }
        })
        .await
    };
    let joined = {
        let cache = cache.clone();
        measure_calls("100 single hits, `join_all`", 20, move |_| {
            let c = cache.clone();
            async move {
                let calls = all.iter().map(|&id| cq_user(&c, pool(), id));
                black_box(futures_util::future::join_all(calls).await);
            }
        })
        .await
    };
    println!(
        "
### Batch reads (100 keys)
"
    );
    println!(
        "| case | p50 | p99 | p50 vs one single hit | keys/s (64 tasks) | keys/s vs single hits |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let single_keys = single.ops_per_sec;
    for (row, keys) in [
        (&single, 1.0),
        (&batch, 100.0),
        (&sequence, 100.0),
        (&joined, 100.0),
    ] {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.2}× | {:.0} | {:.2}× |",
            row.case,
            us(row.p50),
            us(row.p99),
            row.p50.as_secs_f64() / single.p50.as_secs_f64(),
            row.ops_per_sec * keys,
            row.ops_per_sec * keys / single_keys,
        );
    }

    // 10 of the 100 invalidated before each timed call (the invalidation is not timed).
    let rounds = if SETTINGS.smoke { 30 } else { 2_000 };
    let (mut missing, mut any100, mut any10) = (Vec::new(), Vec::new(), Vec::new());
    let executions = DB_EXECUTIONS.load(Relaxed);
    for round in 0..rounds {
        let stale: Vec<String> = (0..10)
            .map(|k| format!("user:{}", (round * 10 + k) % ROWS as usize + 1))
            .collect();
        cache.invalidate_many(&stale).await.unwrap();
        let start = Instant::now();
        black_box(cq_users(&cache, pool(), all).await.unwrap());
        missing.push(start.elapsed());
        let start = Instant::now();
        black_box(select_users(pool(), all).await.unwrap());
        any100.push(start.elapsed());
        let ten: Vec<i64> = (0..10)
            .map(|k| (round as i64 * 10 + k) % ROWS + 1)
            .collect();
        let start = Instant::now();
        black_box(select_users(pool(), &ten).await.unwrap());
        any10.push(start.elapsed());
    }
    // One query per batch call, plus the two uncached ones per round.
    assert_eq!(DB_EXECUTIONS.load(Relaxed) - executions, 3 * rounds as u64);
    for lat in [&mut missing, &mut any100, &mut any10] {
        lat.sort();
    }
    println!(
        "
### Batch of 100 with 10 misses ({rounds} rounds)
"
    );
    println!(
        "| case | p50 | p99 |
|---|---:|---:|"
    );
    for (case, lat) in [
        (
            "batch of 100, 10 invalidated: read, query of 10, write",
            &missing,
        ),
        ("uncached `WHERE id = ANY($1)`, 100 ids", &any100),
        ("uncached `WHERE id = ANY($1)`, 10 ids", &any10),
    ] {
        println!(
            "| {case} | {:.1} µs | {:.1} µs |",
            us(percentile(lat, 0.5)),
            us(percentile(lat, 0.99))
        );
    }
}

/// Validating the stamps inside Redis: one `EVALSHA` that reads the entries and their
/// stamps, compares them and returns only the fresh payloads, against today's `MGET` of
/// entries and stamps checked on the client.
const CHECK_IN_REDIS: &str = r"
local n = tonumber(ARGV[1])
local vals = redis.call('MGET', unpack(KEYS))
local out, a = {}, 2
for i = 1, n do
  local c = tonumber(ARGV[a]); a = a + 1
  local e = vals[i]
  local ok = e and string.byte(e, 1) == 201 and string.byte(e, 2) == 1 and string.byte(e, 3) == c
  local pos = 4
  for _ = 1, c do
    local s = vals[n + tonumber(ARGV[a])]; a = a + 1
    if ok then
      local len = string.byte(e, pos)
      if not s or not len or len == 0 or string.sub(e, pos + 1, pos + len) ~= s then ok = false end
      pos = pos + 1 + (len or 0)
    end
  end
  out[i] = ok and string.sub(e, pos) or false
end
return out
";

/// The payload of an entry in the library's envelope (format 1) if its stamps are `current`:
/// what a hit does on the client today.
fn checked_payload<'a>(entry: &'a [u8], current: &[&[u8]]) -> Option<&'a [u8]> {
    let [0xC9, 1, n, rest @ ..] = entry else {
        return None;
    };
    if usize::from(*n) != current.len() {
        return None;
    }
    let mut rest = rest;
    for c in current {
        let (&len, tail) = rest.split_first()?;
        let len = usize::from(len);
        if len == 0 || tail.len() < len || &tail[..len] != *c {
            return None;
        }
        rest = &tail[len..];
    }
    Some(rest)
}

async fn protocol_case() {
    let p = format!("{}:proto", SETTINGS.prefix);
    let mut conn = raw_redis().await;
    let generation = b"generation-token".to_vec();
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:g"))
        .arg(&generation)
        .query_async(&mut conn)
        .await
        .unwrap();
    for id in 1..=ROWS {
        let tag = format!("tag-token-{id:06}").into_bytes();
        let json = serde_json::to_vec(&select_user(pool(), id).await.unwrap()).unwrap();
        let mut entry = vec![0xC9, 1, 2, generation.len() as u8];
        entry.extend_from_slice(&generation);
        entry.push(tag.len() as u8);
        entry.extend_from_slice(&tag);
        entry.extend_from_slice(&json);
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(format!("{p}:e:{id}"))
            .arg(entry)
            .ignore()
            .cmd("SET")
            .arg(format!("{p}:t:{id}"))
            .arg(tag)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(CHECK_IN_REDIS)
        .query_async(&mut conn)
        .await
        .unwrap();
    let sha: &'static str = Box::leak(sha.into_boxed_str());
    let p: &'static str = Box::leak(p.into_boxed_str());
    // `ids`' entries, the generation, then each one's tag: the key list of either read.
    let keys = move |ids: &[i64]| -> Vec<String> {
        let entries = ids.iter().map(|id| format!("{p}:e:{id}"));
        let tags = ids.iter().map(|id| format!("{p}:t:{id}"));
        entries.chain([format!("{p}:g")]).chain(tags).collect()
    };
    let mget = move |ids: Vec<i64>, c: MultiplexedConnection| async move {
        let mut c = c;
        let n = ids.len();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(keys(&ids))
            .query_async(&mut c)
            .await
            .unwrap();
        let generation = values[n].as_deref().unwrap();
        for i in 0..n {
            let tag = values[n + 1 + i].as_deref().unwrap();
            let payload = checked_payload(values[i].as_deref().unwrap(), &[generation, tag]);
            black_box(serde_json::from_slice::<User>(payload.unwrap()).unwrap());
        }
    };
    let evalsha = move |ids: Vec<i64>, c: MultiplexedConnection| async move {
        let mut c = c;
        let n = ids.len();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(2 * n + 1).arg(keys(&ids)).arg(n);
        for i in 0..n {
            cmd.arg(2).arg(1).arg(2 + i);
        }
        let payloads: Vec<Option<Vec<u8>>> = cmd.query_async(&mut c).await.unwrap();
        for payload in payloads {
            black_box(serde_json::from_slice::<User>(&payload.unwrap()).unwrap());
        }
    };
    let mut rows = Vec::new();
    for (case, batch, script) in [
        (
            "one hit: `MGET` entry + 2 stamps, checked on the client",
            false,
            false,
        ),
        ("one hit: `EVALSHA`, checked in Redis", false, true),
        (
            "100 hits: `MGET` of 201 keys, checked on the client",
            true,
            false,
        ),
        (
            "100 hits: `EVALSHA` of 201 keys, checked in Redis",
            true,
            true,
        ),
    ] {
        let c = conn.clone();
        rows.push(
            measure_calls(case, if batch { 20 } else { 1 }, move |id| {
                let ids = if batch {
                    (1..=ROWS).collect()
                } else {
                    vec![id]
                };
                let c = c.clone();
                async move {
                    if script {
                        evalsha(ids, c).await
                    } else {
                        mget(ids, c).await
                    }
                }
            })
            .await,
        );
    }
    println!(
        "
### Checking stamps on the client or in Redis (raw protocol, same entries)
"
    );
    println!(
        "| case | p50 | p99 | throughput (64 tasks) |
|---|---:|---:|---:|"
    );
    for r in &rows {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.0} ops/s |",
            r.case,
            us(r.p50),
            us(r.p99),
            r.ops_per_sec
        );
    }
}

/// PostgreSQL unreachable (a pool on a port nothing listens on: connections refused), with
/// `stale_if_error`: how many calls still succeed for keys cached before (their entries
/// expired), and what never-cached keys get.
async fn stale_case() {
    const TTL: Duration = Duration::from_secs(1);
    let keys: i64 = if SETTINGS.smoke { 10 } else { ROWS };
    let cache = Cache::builder()
        .redis(&SETTINGS.redis_url)
        .namespace(&format!("{}:stale", SETTINGS.prefix))
        .default_ttl(TTL)
        .build()
        .await
        .unwrap();
    let mut rows = HashMap::new();
    for id in 1..=keys {
        rows.insert(id, cq_stale_user(&cache, pool(), id).await.unwrap());
    }
    // Past every entry's freshness: each call now runs its query.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let down = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(100))
        .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap();
    let (mut served, mut lat) = (0, Vec::new());
    for id in 1..=keys {
        let start = Instant::now();
        let got = cq_stale_user(&cache, &down, id).await;
        lat.push(start.elapsed());
        if got.as_ref().ok() == rows.get(&id) {
            served += 1;
        }
    }
    lat.sort();
    let (mut never_ok, mut own_errors) = (0, 0);
    for id in 1_001..=1_000 + keys {
        match cq_stale_user(&cache, &down, id).await {
            Ok(_) => never_ok += 1,
            // The pool's own error: the connection is refused until its acquire timeout.
            Err(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => own_errors += 1,
            Err(_) => {}
        }
    }
    let stats = cache.stats();
    assert_eq!(stats.stale_served, served);
    println!("\n### PostgreSQL unreachable, `stale_if_error` ({keys} keys of each kind)\n");
    println!("| keys | calls that succeed | calls that fail with the pool's own error | p50 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| cached before, expired | {served} / {keys} | {} | {:.1} ms |",
        keys as u64 - served,
        us(percentile(&lat, 0.5)) / 1e3
    );
    println!("| never cached | {never_ok} / {keys} | {own_errors} | |");
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// 1 000 concurrent callers on a cold key: how many database executions.
async fn stampede_case() {
    const CALLERS: usize = 1_000;
    println!("\n### Stampede ({CALLERS} concurrent callers on a cold key)\n");
    println!("| backend | round | database executions | wall time |\n|---|---:|---:|---:|");
    for (name, near) in [("Redis", None), ("near cache", Some(10_000))] {
        let cache = cache(&format!("stampede-{}", near.is_some()), near).await;
        for round in 0..3 {
            let id = round % ROWS + 1;
            let before = DB_EXECUTIONS.load(Relaxed);
            let start = Instant::now();
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let cache = cache.clone();
                    tokio::spawn(async move { cq_user(&cache, pool(), id).await.unwrap() })
                })
                .collect();
            for c in callers {
                assert_eq!(c.await.unwrap().id, id);
            }
            let executions = DB_EXECUTIONS.load(Relaxed) - before;
            println!(
                "| {name} | {round} | {executions} | {:.1} ms |",
                start.elapsed().as_secs_f64() * 1e3
            );
            cache.invalidate(&format!("user:{id}")).await.unwrap();
        }
    }
}

/// `#[timed]` below its threshold vs the same async fn without it, awaited in one task.
async fn timed_case() {
    let n: u64 = if SETTINGS.smoke { 20_000 } else { 5_000_000 };
    async fn per_call<F: Future<Output = Result<u64, ()>>>(n: u64, f: impl Fn(u64) -> F) -> f64 {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for i in 0..n {
                black_box(f(black_box(i)).await.unwrap());
            }
            best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    }
    let plain = per_call(n, plain_noop).await;
    let timed = per_call(n, timed_noop).await;
    println!("\n### `#[timed]` below threshold ({n} calls, best of 5)\n");
    println!("| plain async fn | with `#[timed]` | overhead |\n|---:|---:|---:|");
    println!(
        "| {plain:.1} ns | {timed:.1} ns | {:.1} ns |",
        timed - plain
    );
}

/// The cost of one `#[cached_query]` hit on the in-memory backend, no `tracing` subscriber
/// installed: the figure the per-call span must not move by more than 20 ns.
async fn hit_cost_case() {
    let n: u64 = if SETTINGS.smoke { 20_000 } else { 2_000_000 };
    let cache = Cache::builder().memory().build().await.unwrap();
    for key in 0..16 {
        memory_hit(&cache, key).await.unwrap();
    }
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for i in 0..n {
            black_box(memory_hit(&cache, black_box(i & 15)).await.unwrap());
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    let stats = &cache.stats().queries["bench.memory_hit"];
    assert_eq!(stats.misses, 16, "every timed call is a hit");

    // What the call's span adds, measured alone: the span created, the call run inside it,
    // its outcome reported and recorded, against the same call without it.
    use cached_query::__private::CallSpan;
    let spanless = per_iteration(n * 5, |i| async move { black_box(i) }).await;
    let spanned = per_iteration(n * 5, |i| async move {
        let call = CallSpan::new("bench.span", "memory");
        let out = call.run(async { black_box(i) }).await;
        call.hit();
        out
    })
    .await;
    println!("\n### A hit on the in-memory backend, no subscriber ({n} calls, best of 7)\n");
    println!(
        "| per hit | the span alone ({} calls): without | with | added |\n|---:|---:|---:|---:|",
        n * 5
    );
    println!(
        "| {best:.1} ns | {spanless:.1} ns | {spanned:.1} ns | {:.1} ns |",
        spanned - spanless
    );
}

/// The best of 7 runs of `n` sequential awaits of `f(i)`, in ns per await.
async fn per_iteration<F: Future<Output = u64>>(n: u64, f: impl Fn(u64) -> F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for i in 0..n {
            black_box(f(black_box(i)).await);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

async fn cleanup() {
    let mut conn = raw_redis().await;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", SETTINGS.prefix))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

fn main() {
    // One thread by default: the client gets one core and Redis the other, and no latency
    // depends on which thread a wake-up lands on. `--multi-thread`: 2 workers.
    let rt = if std::env::args().any(|a| a == "--multi-thread") {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap();
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--fleet-child") {
        return rt.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&SETTINGS.database_url)
                .await
                .expect("PostgreSQL is reachable at DATABASE_URL");
            POOL.set(pool).unwrap();
            fleet::child(&args[at + 1..]).await;
        });
    }
    rt.block_on(async {
        POOL.set(setup_database().await).unwrap();
        println!(
            "cached-query benchmark suite{} — {} runtime, {} tasks for throughput, {} rows",
            if SETTINGS.smoke {
                " (smoke run: numbers are not meaningful)"
            } else {
                ""
            },
            if std::env::args().any(|a| a == "--multi-thread") {
                "2-worker"
            } else {
                "one-thread"
            },
            TASKS,
            ROWS
        );
        // `--only <case>`: one group of cases (see the module documentation).
        let only = std::env::args().skip_while(|a| a != "--only").nth(1);
        let run = |case: &str| only.as_deref().is_none_or(|o| o == case);
        if run("reads") {
            println!("\n### Reads\n");
            let rows = read_cases().await;
            print_table(&rows);
        }
        if run("batch") {
            batch_case(true).await;
        } else if only.as_deref() == Some("batch-hits") {
            batch_case(false).await;
        }
        if run("protocol") {
            protocol_case().await;
        }
        if run("stale") {
            stale_case().await;
        }
        if run("invalidation") {
            invalidation_case().await;
        }
        if run("write") {
            write_case().await;
        }
        if run("stampede") {
            stampede_case().await;
        }
        if run("fleet") {
            fleet::fleet_case().await;
        }
        if run("timed") {
            timed_case().await;
        }
        if run("hit-cost") {
            hit_cost_case().await;
        }
        cleanup().await;
    });
}
