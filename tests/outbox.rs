//! Invalidation through PostgreSQL (`CacheBuilder::outbox`): invalidations recorded inside
//! transactions take effect in every process after the commit and never on rollback;
//! writes by other clients reach the cache through `watch_table`; nothing is lost when the
//! writer is cancelled, the listener's connection dies, or the outbox must not grow.
//!
//! Two `Cache`s on one database stand for two processes (each has its own listener
//! connection and, for the memory backend, its own store).

mod common;

use common::users::{name, reads, rename, schema};

use cached_query::{Cache, CacheBuilder, Error, cached_query, invalidates};
use common::{AFTER_COMMIT, Commits, check_lags, percentiles, redis_url, unique_ns, within};
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

fn memory(pool: &PgPool) -> CacheBuilder {
    Cache::builder().memory().outbox(pool.clone())
}

fn redis(pool: &PgPool, ns: &str) -> CacheBuilder {
    Cache::builder()
        .redis(&redis_url())
        .namespace(ns)
        .outbox(pool.clone())
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cached_query_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows `namespace` has not delivered to its Redis.
async fn undelivered(pool: &PgPool, namespace: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cached_query_outbox WHERE NOT ($1 = ANY(delivered))")
        .bind(namespace)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `#[invalidates]` on `&mut PgConnection` inside a transaction: nothing happens before the
/// commit (a concurrent read still hits and cannot re-cache the old row under a new token),
/// nothing on rollback, and every process reads the new row within the bound after commit.
async fn invalidation_travels_with_the_transaction(pool: PgPool, a: Cache, b: Cache) {
    schema(&pool).await;
    for cache in [&a, &b] {
        assert!(reads(&pool, cache, 1, "Ada").await);
        assert!(reads(&pool, cache, 1, "Ada").await);
    }

    // Rolled back: nothing invalidated, both still hit.
    let mut tx = pool.begin().await.unwrap();
    rename(&mut tx, &a, 1, "Never").await.unwrap();
    tx.rollback().await.unwrap();
    // A later committed write's notice proves every earlier one was handled.
    let mut tx = pool.begin().await.unwrap();
    rename(&mut tx, &a, 2, "Alan T").await.unwrap();
    tx.commit().await.unwrap();
    for cache in [&a, &b] {
        within(AFTER_COMMIT, "commit of user 2", || {
            reads(&pool, cache, 2, "Alan T")
        })
        .await;
    }
    for cache in [&a, &b] {
        let hits = cache.stats().hits;
        assert!(reads(&pool, cache, 1, "Ada").await);
        assert_eq!(
            cache.stats().hits,
            hits + 1,
            "user 1 still cached after the rollback"
        );
    }

    // Committed: before the commit both still serve the old row, then both the new one.
    let mut delays = Vec::new();
    for round in 0..20 {
        let to = format!("Ada {round}");
        let mut tx = pool.begin().await.unwrap();
        rename(&mut tx, &a, 1, &to).await.unwrap();
        for cache in [&a, &b] {
            let hits = cache.stats().hits;
            assert!(reads(&pool, cache, 1, &format!("Ada{}", prev(round))).await);
            assert_eq!(cache.stats().hits, hits + 1, "before the commit: a hit");
        }
        tx.commit().await.unwrap();
        for cache in [&a, &b] {
            delays.push(within(AFTER_COMMIT, "commit", || reads(&pool, cache, 1, &to)).await);
        }
    }
    let (p50, p99) = percentiles(&mut delays);
    println!(
        "delivery delay after commit: p50 {p50:?}, p99 {p99:?} ({} reads)",
        delays.len()
    );
    assert_eq!(a.stats().invalidations_before_commit, 0);
}

fn prev(round: usize) -> String {
    if round == 0 {
        String::new()
    } else {
        format!(" {}", round - 1)
    }
}

#[sqlx::test]
async fn invalidation_travels_with_the_transaction_memory(pool: PgPool) {
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    invalidation_travels_with_the_transaction(pool, a, b).await;
}

#[sqlx::test]
async fn invalidation_travels_with_the_transaction_redis(pool: PgPool) {
    let ns = unique_ns("outbox-tx");
    let a = redis(&pool, &ns).build().await.unwrap();
    let b = redis(&pool, &ns).near_cache(1000).build().await.unwrap();
    invalidation_travels_with_the_transaction(pool.clone(), a, b).await;
    within(AFTER_COMMIT, "every row delivered", || async {
        undelivered(&pool, &ns).await == 0
    })
    .await;
}

/// Memory caches in several processes see each other's `invalidate()`/`clear()`.
#[sqlx::test]
async fn memory_caches_share_invalidations_and_clears(pool: PgPool) {
    schema(&pool).await;
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    for cache in [&a, &b] {
        assert!(reads(&pool, cache, 1, "Ada").await);
        assert!(reads(&pool, cache, 3, "Grace").await);
    }
    sqlx::query("UPDATE users SET name = 'Ada L' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    a.invalidate("user:1").await.unwrap();
    assert!(
        reads(&pool, &a, 1, "Ada L").await,
        "in effect here when it returns"
    );
    within(AFTER_COMMIT, "invalidate in b", || {
        reads(&pool, &b, 1, "Ada L")
    })
    .await;

    sqlx::query("UPDATE users SET name = 'Grace H' WHERE id = 3")
        .execute(&pool)
        .await
        .unwrap();
    b.clear().await.unwrap();
    within(AFTER_COMMIT, "clear in a", || {
        reads(&pool, &a, 3, "Grace H")
    })
    .await;
}

/// Without an outbox: `invalidate_on_commit` and `watch_table` say what they need, and
/// `#[invalidates]` inside a transaction invalidates at once, counted and logged.
#[sqlx::test]
async fn without_an_outbox_the_transaction_rules_are_loud(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let err = cache
        .invalidate_on_commit(&mut conn, ["user:1"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NoOutbox { .. }) && err.to_string().contains("outbox"),
        "{err}"
    );
    let err = cache
        .watch_table("users", &["user:<id>"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CacheBuilder::outbox"), "{err}");

    assert!(reads(&pool, &cache, 1, "Ada").await);
    let mut tx = pool.begin().await.unwrap();
    rename(&mut tx, &cache, 1, "Early").await.unwrap();
    assert_eq!(cache.stats().invalidations_before_commit, 1);
    // Invalidated before the commit: this read re-caches the old row (what the outbox fixes).
    assert!(reads(&pool, &cache, 1, "Ada").await);
    tx.commit().await.unwrap();
    assert!(
        reads(&pool, &cache, 1, "Ada").await,
        "stale: the documented hazard"
    );

    // Outside a transaction #[invalidates] is unaffected and not counted.
    rename(&mut conn, &cache, 1, "Ada").await.unwrap();
    assert_eq!(cache.stats().invalidations_before_commit, 1);
}

/// `invalidate_on_commit` by hand, on a transaction and on a plain connection.
#[sqlx::test]
async fn invalidate_on_commit_by_hand(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("outbox-hand");
    let a = redis(&pool, &ns).build().await.unwrap();
    assert!(reads(&pool, &a, 1, "Ada").await);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Ada B' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    a.invalidate_on_commit(&mut tx, ["user:1"]).await.unwrap();
    assert_eq!(outbox_rows(&pool).await, 0, "invisible before the commit");
    tx.commit().await.unwrap();
    within(AFTER_COMMIT, "after commit", || {
        reads(&pool, &a, 1, "Ada B")
    })
    .await;

    // Outside a transaction: in effect when it returns.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Ada C' WHERE id = 1")
        .execute(&mut *conn)
        .await
        .unwrap();
    a.invalidate_on_commit(&mut conn, ["user:1"]).await.unwrap();
    assert!(reads(&pool, &a, 1, "Ada C").await);
}

/// Writes by any client (raw SQL on another connection) reach every process through the
/// table's triggers: tags from the old and the new row, none for NULL columns.
async fn watched_table(pool: PgPool, a: Cache, b: Cache) {
    schema(&pool).await;
    a.watch_table("users", &["user:<id>", "org:<org_id>"])
        .await
        .unwrap();
    // Idempotent: a second call (another process starting) replaces the triggers.
    b.watch_table("users", &["user:<id>", "org:<org_id>"])
        .await
        .unwrap();
    for cache in [&a, &b] {
        assert!(reads(&pool, cache, 1, "Ada").await);
        assert!(reads(&pool, cache, 2, "Alan").await);
    }
    let mut delays = Vec::new();
    for round in 0..20 {
        let to = format!("Ada {round}");
        sqlx::query("UPDATE users SET name = $1 WHERE id = 1")
            .bind(&to)
            .execute(&pool)
            .await
            .unwrap();
        for cache in [&a, &b] {
            delays.push(
                within(AFTER_COMMIT, "watched update", || {
                    reads(&pool, cache, 1, &to)
                })
                .await,
            );
        }
    }
    let (p50, p99) = percentiles(&mut delays);
    println!(
        "delivery delay after a watched write: p50 {p50:?}, p99 {p99:?} ({} reads)",
        delays.len()
    );

    // One statement touching many rows: one outbox row, every tag.
    sqlx::query("UPDATE users SET name = name || '!' WHERE org_id = 10")
        .execute(&pool)
        .await
        .unwrap();
    for cache in [&a, &b] {
        within(AFTER_COMMIT, "multi-row update", || {
            reads(&pool, cache, 2, "Alan!")
        })
        .await;
    }
    // DELETE: the old row's tags.
    assert!(reads(&pool, &b, 3, "Grace").await);
    sqlx::query("DELETE FROM users WHERE id = 3")
        .execute(&pool)
        .await
        .unwrap();
    within(AFTER_COMMIT, "delete", || async {
        name(&pool, &b, 3).await.unwrap().is_none()
    })
    .await;

    // Unwatched: writes are invisible again (the entry stays cached).
    a.unwatch_table("users").await.unwrap();
    assert!(reads(&pool, &a, 2, "Alan!").await);
    sqlx::query("UPDATE users SET name = 'Unseen' WHERE id = 2")
        .execute(&pool)
        .await
        .unwrap();
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass AND tgname LIKE 'cached_query%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0);
}

#[sqlx::test]
async fn watched_tables_invalidate_on_any_write_memory(pool: PgPool) {
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    watched_table(pool, a, b).await;
}

#[sqlx::test]
async fn watched_tables_invalidate_on_any_write_redis(pool: PgPool) {
    let ns = unique_ns("outbox-watch");
    let a = redis(&pool, &ns).build().await.unwrap();
    let b = redis(&pool, &ns).near_cache(1000).build().await.unwrap();
    watched_table(pool, a, b).await;
}

#[sqlx::test]
async fn watch_table_names_what_is_wrong(pool: PgPool) {
    schema(&pool).await;
    let a = memory(&pool).build().await.unwrap();
    let err = a.watch_table("users", &["user:<nme>"]).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`nme`") && msg.contains("id, org_id, name"),
        "{msg}"
    );
    let err = a
        .watch_table("no_such_table", &["x:<id>"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");
}

/// Caches of several namespaces on one outbox database (two services, or a `users` and an
/// `orders` cache): each namespace's Redis gets every invalidation, whoever claims first.
#[sqlx::test]
async fn every_namespace_sharing_an_outbox_gets_every_invalidation(pool: PgPool) {
    schema(&pool).await;
    let a = redis(&pool, &unique_ns("ns-a")).build().await.unwrap();
    let b = redis(&pool, &unique_ns("ns-b")).build().await.unwrap();
    for cache in [&a, &b] {
        assert!(reads(&pool, cache, 1, "Ada").await);
    }
    for round in 0..20 {
        let to = format!("Ada {round}");
        let mut tx = pool.begin().await.unwrap();
        rename(&mut tx, &a, 1, &to).await.unwrap();
        tx.commit().await.unwrap();
        for cache in [&a, &b] {
            within(AFTER_COMMIT, "each namespace", || {
                reads(&pool, cache, 1, &to)
            })
            .await;
        }
    }

    // Namespace a has no process running while b delivers a row: a's next process still
    // delivers it to a's Redis before serving.
    let ns_a = a.namespace().to_owned();
    assert!(reads(&pool, &a, 2, "Alan").await);
    drop(a);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Alan T' WHERE id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    b.invalidate_on_commit(&mut tx, ["user:2"]).await.unwrap();
    tx.commit().await.unwrap();
    let ns_b = b.namespace().to_owned();
    within(AFTER_COMMIT, "b delivered", || async {
        undelivered(&pool, &ns_b).await == 0
    })
    .await;
    let a = redis(&pool, &ns_a).build().await.unwrap();
    assert!(reads(&pool, &a, 2, "Alan T").await);
}

/// Rows are removed once every registered namespace delivered them and the retention period
/// passed (in-memory fleets register none); the sweeper removes them.
#[sqlx::test]
async fn the_outbox_does_not_grow(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("outbox-grow");
    let r = redis(&pool, &ns)
        .outbox_sweep_interval(Duration::from_millis(50))
        .outbox_retention(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    for i in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        r.invalidate_on_commit(&mut tx, [format!("user:{i}")])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let a = memory(&pool)
        .outbox_sweep_interval(Duration::from_millis(50))
        .outbox_retention(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    for i in 0..50 {
        a.invalidate(&format!("user:{i}")).await.unwrap();
    }
    assert!(outbox_rows(&pool).await > 0);
    within(Duration::from_secs(2), "expired rows removed", || async {
        outbox_rows(&pool).await == 0
    })
    .await;
}

#[cached_query(cache = cache, ttl = 300, invalidate = "tx_counter:1")]
async fn tx_counter(pool: &PgPool, cache: &Cache) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT value FROM tx_counter WHERE id = 1")
        .fetch_one(pool)
        .await
}

#[cached_query(cache = cache, ttl = 300, invalidate = "raw_counter:<id>")]
async fn raw_counter(pool: &PgPool, cache: &Cache, id: i32) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT value FROM raw_counter WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

#[invalidates("tx_counter:1", cache = cache)]
async fn bump_tx_counter(conn: &mut PgConnection, cache: &Cache) -> sqlx::Result<i64> {
    sqlx::query_scalar("UPDATE tx_counter SET value = value + 1 WHERE id = 1 RETURNING value")
        .fetch_one(conn)
        .await
}

/// Two counters: one written in transactions through `#[invalidates]`, one written with raw
/// SQL (watched by the stress tests).
async fn create_counters(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE tx_counter (id INT PRIMARY KEY, value BIGINT NOT NULL);
         CREATE TABLE raw_counter (id INT PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO tx_counter VALUES (1, 0); INSERT INTO raw_counter VALUES (1, 0);",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// The stale-set stress across processes: writers update inside transactions through an
/// `#[invalidates]` function taking `&mut PgConnection`, and with raw SQL on a watched table,
/// while readers read through two caches. No read may return a value older than one whose
/// commit returned more than the bound before the read began; the worst lag is printed.
async fn no_stale_reads_across_processes(pool: PgPool, a: Cache, b: Cache) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    create_counters(&pool).await;
    a.watch_table("raw_counter", &["raw_counter:<id>"])
        .await
        .unwrap();
    let (tx_commits, raw_commits) = (Arc::new(Commits::default()), Arc::new(Commits::default()));
    let writing = Arc::new(AtomicBool::new(true));
    let run_for = Duration::from_millis(2500);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, a, tx_commits, raw_commits) = (
            pool.clone(),
            a.clone(),
            tx_commits.clone(),
            raw_commits.clone(),
        );
        writers.push(tokio::spawn(async move {
            let start = std::time::Instant::now();
            let mut n = 0;
            while start.elapsed() < run_for {
                if w % 2 == 0 {
                    let mut tx = pool.begin().await.unwrap();
                    let v = bump_tx_counter(&mut tx, &a).await.unwrap();
                    tx.commit().await.unwrap();
                    tx_commits.record(v);
                } else {
                    let v: i64 = sqlx::query_scalar(
                        "UPDATE raw_counter SET value = value + 1 WHERE id = 1 RETURNING value",
                    )
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    raw_commits.record(v);
                }
                n += 1;
            }
            n
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4 {
        let cache = if r % 2 == 0 { a.clone() } else { b.clone() };
        let (pool, tx_commits, raw_commits, writing) = (
            pool.clone(),
            tx_commits.clone(),
            raw_commits.clone(),
            writing.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut lags = Vec::new();
            while writing.load(SeqCst) {
                let start = std::time::Instant::now();
                let seen = tx_counter(&pool, &cache).await.unwrap();
                lags.push(tx_commits.lag(seen, start));
                let start = std::time::Instant::now();
                let seen = raw_counter(&pool, &cache, 1).await.unwrap();
                lags.push(raw_commits.lag(seen, start));
                tokio::task::yield_now().await;
            }
            lags
        }));
    }
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    writing.store(false, SeqCst);
    let mut lags = Vec::new();
    for r in readers {
        lags.extend(r.await.unwrap());
    }
    check_lags("two caches", writes, lags);
    let (sa, sb) = (a.stats(), b.stats());
    assert!(
        sa.hits > 0 && sb.hits > 0,
        "the caches served reads: {sa:?} {sb:?}"
    );
    assert_eq!(sa.errors + sb.errors, 0);
}

#[sqlx::test]
async fn no_stale_reads_across_processes_memory(pool: PgPool) {
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    no_stale_reads_across_processes(pool, a, b).await;
}

#[sqlx::test]
async fn no_stale_reads_across_processes_redis(pool: PgPool) {
    let ns = unique_ns("outbox-stress");
    let a = redis(&pool, &ns).build().await.unwrap();
    let b = redis(&pool, &ns).near_cache(1000).build().await.unwrap();
    no_stale_reads_across_processes(pool, a, b).await;
}

/// The outbox's objects are checked at every build: a table dropped under a surviving
/// function (a restore, a cleanup script) is created again instead of failing every record.
#[sqlx::test]
async fn a_dropped_outbox_table_is_created_again(pool: PgPool) {
    schema(&pool).await;
    drop(memory(&pool).build().await.unwrap());
    sqlx::raw_sql("DROP TABLE cached_query_outbox")
        .execute(&pool)
        .await
        .unwrap();
    let a = memory(&pool).build().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    a.invalidate_on_commit(&mut tx, ["user:1"]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox_rows(&pool).await, 1);
}

/// The stale-set stress with two real processes: a child process writes (through
/// `#[invalidates]` in transactions, and raw SQL on a watched table) with its own in-memory
/// cache, printing when each commit returned; this process reads through its own in-memory
/// cache. No read may lag more than the bound behind a commit that returned before it began.
#[sqlx::test]
async fn no_stale_reads_across_two_real_processes(pool: PgPool) {
    use std::io::BufRead;
    use std::time::SystemTime;
    create_counters(&pool).await;
    let reader = memory(&pool).build().await.unwrap();
    reader
        .watch_table("raw_counter", &["raw_counter:<id>"])
        .await
        .unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "stress_writer_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CQ_STRESS_DATABASE", common::url_of(&pool, None))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // (counter, value, when its commit returned), as the child prints them.
    let commits = tokio::task::spawn_blocking(move || {
        let mut commits = Vec::new();
        for line in stdout.lines().map_while(Result::ok) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["commit", which, v, nanos] = parts[..] {
                let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos.parse().unwrap());
                commits.push((which.to_owned(), v.parse::<i64>().unwrap(), at));
            }
        }
        commits
    });
    let mut reads = Vec::new();
    while !commits.is_finished() {
        for which in ["tx", "raw"] {
            let start = SystemTime::now();
            let seen = match which {
                "tx" => tx_counter(&pool, &reader).await.unwrap(),
                _ => raw_counter(&pool, &reader, 1).await.unwrap(),
            };
            reads.push((which, seen, start));
        }
        tokio::task::yield_now().await;
    }
    let commits = commits.await.unwrap();
    assert!(
        child.wait().unwrap().success(),
        "the writer process succeeded"
    );
    assert!(
        commits.len() > 100,
        "the writer committed: {}",
        commits.len()
    );
    let lags: Vec<Duration> = reads
        .iter()
        .map(|(which, seen, start)| {
            commits
                .iter()
                .filter(|(w, v, at)| w == which && v > seen && at <= start)
                .map(|(_, _, at)| start.duration_since(*at).unwrap())
                .max()
                .unwrap_or_default()
        })
        .collect();
    check_lags("two processes", commits.len(), lags);
    assert!(reader.stats().hits > 0);
}

/// The writer of [`no_stale_reads_across_two_real_processes`], run as a child process.
#[tokio::test]
#[ignore = "run as a child process by no_stale_reads_across_two_real_processes"]
async fn stress_writer_process() {
    let Ok(db) = std::env::var("CQ_STRESS_DATABASE") else {
        return;
    };
    let pool = PgPool::connect(&db).await.unwrap();
    let cache = memory(&pool).build().await.unwrap();
    let nanos = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(2000) {
        let mut tx = pool.begin().await.unwrap();
        let v = bump_tx_counter(&mut tx, &cache).await.unwrap();
        tx.commit().await.unwrap();
        println!("commit tx {v} {}", nanos());
        let v: i64 = sqlx::query_scalar(
            "UPDATE raw_counter SET value = value + 1 WHERE id = 1 RETURNING value",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        println!("commit raw {v} {}", nanos());
    }
    println!("writer: done");
}

/// A clear published by a cache of another namespace changes nothing here: it is marked
/// delivered without a Redis round trip, and leaves nothing pending (the near cache keeps
/// serving).
#[sqlx::test]
async fn another_namespaces_clear_is_delivered_as_nothing(pool: PgPool) {
    schema(&pool).await;
    let y = redis(&pool, &unique_ns("y"))
        .near_cache(100)
        .build()
        .await
        .unwrap();
    let x = memory(&pool)
        .namespace(&unique_ns("x"))
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &y, 1, "Ada").await);
    x.clear().await.unwrap();
    let ns = y.namespace().to_owned();
    within(AFTER_COMMIT, "y marks x's clear delivered", || async {
        undelivered(&pool, &ns).await == 0
    })
    .await;
    assert!(reads(&pool, &y, 1, "Ada").await);
    assert!(reads(&pool, &y, 1, "Ada").await);
    assert!(y.stats().near_hits > 0, "{:?}", y.stats());
    assert_eq!(y.stats().errors, 0);
}

/// Rows written by hand with NULL tags or odd arrays are normalised, never a batch failure.
#[sqlx::test]
async fn malformed_rows_do_not_block_delivery(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("malformed");
    let a = redis(&pool, &ns).build().await.unwrap();
    assert!(reads(&pool, &a, 1, "Ada").await);
    sqlx::raw_sql(
        "SELECT cached_query_record(ARRAY['x', NULL], NULL);
         SELECT cached_query_record('[0:1]={a,b}'::text[], NULL);
         SELECT cached_query_record(ARRAY[['a','b'],['c','d']], NULL);
         INSERT INTO cached_query_outbox (tags) VALUES (ARRAY['y', NULL]);
         UPDATE users SET name = 'Ada N' WHERE id = 1;
         SELECT cached_query_record(ARRAY['user:1'], NULL);",
    )
    .execute(&pool)
    .await
    .unwrap();
    within(AFTER_COMMIT, "delivered past the odd rows", || {
        reads(&pool, &a, 1, "Ada N")
    })
    .await;
    within(AFTER_COMMIT, "every row delivered", || async {
        undelivered(&pool, &ns).await == 0
    })
    .await;
}

/// The first process of a namespace new to the outbox (or one forgotten after an hour away)
/// cannot know which rows it missed: it clears its Redis entries once before serving.
#[sqlx::test]
async fn a_namespace_new_to_the_outbox_starts_clean(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("new-ns");
    let before = Cache::builder()
        .redis(&redis_url())
        .namespace(&ns)
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &before, 1, "Ada").await);
    sqlx::query("UPDATE users SET name = 'Ada X' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let joined = redis(&pool, &ns).build().await.unwrap();
    assert!(reads(&pool, &joined, 1, "Ada X").await);
    // Registered now: a second process of it does not clear again.
    assert!(reads(&pool, &joined, 1, "Ada X").await);
    let second = redis(&pool, &ns).build().await.unwrap();
    assert!(reads(&pool, &second, 1, "Ada X").await);
    assert_eq!(
        second.stats().hits,
        1,
        "still cached after the second process started"
    );
}

/// An invalidation too large for its notice (over PostgreSQL's 8000-byte payload) travels as
/// the row's id: the other process reads the row and applies it.
#[sqlx::test]
async fn an_invalidation_too_large_for_its_notice_is_read_from_the_table(pool: PgPool) {
    schema(&pool).await;
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    assert!(reads(&pool, &b, 1, "Ada").await);
    sqlx::query("UPDATE users SET name = 'Ada Big' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let mut tags: Vec<String> = (0..400).map(|i| format!("padding:{i:030}")).collect();
    tags.push("user:1".to_owned());
    a.invalidate_many(&tags).await.unwrap();
    within(AFTER_COMMIT, "b applied the row", || {
        reads(&pool, &b, 1, "Ada Big")
    })
    .await;
}

/// An in-memory cache's invalidation is published to the other processes even when its caller
/// is dropped at the first await (a request timeout): the publishing runs in a task of its own.
#[sqlx::test]
async fn a_cancelled_in_memory_invalidation_is_still_published(pool: PgPool) {
    schema(&pool).await;
    let a = memory(&pool).build().await.unwrap();
    let b = memory(&pool).build().await.unwrap();
    assert!(reads(&pool, &b, 1, "Ada").await);
    sqlx::query("UPDATE users SET name = 'Ada C' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(Duration::ZERO, a.invalidate("user:1")).await;
    assert!(cancelled.is_err(), "dropped before it finished");
    assert!(reads(&pool, &a, 1, "Ada C").await, "applied here at once");
    within(AFTER_COMMIT, "b", || reads(&pool, &b, 1, "Ada C")).await;
}
