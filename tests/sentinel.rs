//! Redis Sentinel: a real master, a replica and three Sentinels started by the test; the
//! cache follows the master the Sentinels name, and a failover under load serves no stale
//! read and brings hits back without restarting the application.

mod common;

use cached_query::Cache;
use common::users::{self, name};
use common::{RedisServer, Sentinel, unique_ns};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const MASTER: &str = "cq-master";
/// The near cache's default lease: its staleness bound for other caches' invalidations.
const NEAR_LEASE: Duration = Duration::from_secs(1);

#[sqlx::test]
async fn a_failover_under_load_serves_no_stale_read(pool: PgPool) {
    users::schema(&pool).await;
    let mut master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_with(&["--replica-announce-ip", "127.0.0.1"]);
    replica.replicate(&master.addr()).await;
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(MASTER, &master.addr()))
        .collect();
    let urls: Vec<String> = sentinels.iter().map(Sentinel::url).collect();
    let ns = unique_ns("sentinel");
    let build = |near: bool| {
        let builder = Cache::builder()
            .redis_sentinel(&urls, MASTER)
            .namespace(&ns)
            .response_timeout(Duration::from_millis(200))
            .circuit_breaker(3, Duration::from_millis(100));
        let builder = if near {
            builder.near_cache(100)
        } else {
            builder
        };
        builder.build()
    };
    let caches = [build(false).await.unwrap(), build(true).await.unwrap()];
    for cache in &caches {
        assert_eq!(name(&pool, cache, 1).await.unwrap().as_deref(), Some("Ada"));
    }
    // The same from the environment.
    let joined = urls.join(",");
    let vars = [
        ("REDIS_SENTINEL_URLS", joined.as_str()),
        ("REDIS_SENTINEL_MASTER", MASTER),
        ("CACHE_NAMESPACE", ns.as_str()),
    ];
    let from_env = Cache::from_lookup(common::lookup(&vars)).await.unwrap();
    assert_eq!(
        name(&pool, &from_env, 1).await.unwrap().as_deref(),
        Some("Ada")
    );
    assert_eq!(from_env.stats().hits, 1, "{:?}", from_env.stats());

    // Load: one writer renames user 1 to "v1", "v2", … and invalidates; readers check that
    // a read which started after the invalidation of rename n returned Ok sees n or later
    // (while one cannot be delivered it is pending, and it has not returned Ok). The near
    // cache learns of another cache's invalidation by a message: its documented bound is
    // the lease (default 1 s), so its reads are held to renames older than that.
    let renamed = Arc::new(AtomicU64::new(0));
    let returned: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, cache, renamed, stop, returned) = (
            pool.clone(),
            caches[0].clone(),
            renamed.clone(),
            stop.clone(),
            returned.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(SeqCst) {
                n += 1;
                sqlx::query("UPDATE users SET name = $1 WHERE id = 1")
                    .bind(format!("v{n}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                if cache.invalidate("user:1").await.is_ok() {
                    renamed.store(n, SeqCst);
                    returned.lock().unwrap().push((n, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let readers: Vec<_> = caches
        .iter()
        .flat_map(|c| [c.clone(), c.clone()])
        .map(|cache| {
            let (pool, renamed, stop) = (pool.clone(), renamed.clone(), stop.clone());
            let returned = returned.clone();
            let near = format!("{cache:?}").contains("near_cache: true");
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !stop.load(SeqCst) {
                    let floor = if near {
                        let bound = Instant::now() - NEAR_LEASE;
                        let returned = returned.lock().unwrap();
                        returned
                            .iter()
                            .rev()
                            .find(|(_, at)| *at <= bound)
                            .map_or(0, |r| r.0)
                    } else {
                        renamed.load(SeqCst)
                    };
                    let got = name(&pool, &cache, 1).await.unwrap().unwrap();
                    let seen: u64 = got.strip_prefix('v').map_or(0, |n| n.parse().unwrap());
                    assert!(
                        seen >= floor,
                        "stale read: {got} after v{floor} was invalidated"
                    );
                    reads += 1;
                    // Requests arrive, they do not spin: two cores also run PostgreSQL,
                    // Redis and the Sentinels.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                reads
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    master.kill();
    // The Sentinels promote the replica (down-after 1 s, then an election). Asked off the
    // runtime: `redis-cli` blocks, and the readers and the cache's timeouts run on it.
    let ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
    common::within(Duration::from_secs(30), "a Sentinel failover", || {
        let ports = ports.clone();
        async move {
            let named = tokio::task::spawn_blocking(move || {
                ports
                    .iter()
                    .map(|p| Sentinel::master_port_at(*p, MASTER))
                    .collect::<Vec<_>>()
            });
            named
                .await
                .unwrap()
                .iter()
                .all(|p| *p == Some(replica.port))
        }
    })
    .await;
    // Hits come back on the new master, in both caches, without a restart.
    for cache in &caches {
        let before = cache.stats().hits;
        common::within(Duration::from_secs(10), "hits after the failover", || {
            let hits = cache.stats().hits;
            async move { hits > before + 10 }
        })
        .await;
    }
    stop.store(true, SeqCst);
    writer.await.unwrap();
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    let changes: u64 = caches.iter().map(|c| c.stats().server_changes).sum();
    assert!(
        changes >= 2,
        "first use, then the promoted replica: {changes}"
    );
    println!("sentinel failover: {:?}", caches[0].stats());
}

/// Sentinels that disagree: one names another server under the same master name (cut off
/// from the others, or restarted with an old configuration). The cache takes the address
/// the majority names, whichever Sentinel answers first or is listed first.
#[tokio::test]
async fn the_master_a_majority_of_sentinels_names_is_used() {
    let master = RedisServer::start();
    let other = RedisServer::start();
    let odd = Sentinel::start(MASTER, &other.addr());
    let agreeing: Vec<Sentinel> = (0..2)
        .map(|_| Sentinel::start(MASTER, &master.addr()))
        .collect();
    let urls: Vec<String> = std::iter::once(&odd)
        .chain(&agreeing)
        .map(Sentinel::url)
        .collect();
    for _ in 0..5 {
        let ns = unique_ns("majority");
        let cache = Cache::builder()
            .redis_sentinel(&urls, MASTER)
            .namespace(&ns)
            .build()
            .await
            .unwrap();
        cache.invalidate("t").await.unwrap();
        assert!(!common::keys_under(&master.url(), &ns).await.is_empty());
        assert!(common::keys_under(&other.url(), &ns).await.is_empty());
    }
}
