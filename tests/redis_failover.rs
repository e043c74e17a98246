//! Redis that comes back with older data than the invalidations that returned: restarted
//! from an RDB dump or an AOF file, or a replica promoted after missing the last writes.
//! Each test first shows the hazard is real (the old tag token and the old entry are back
//! in Redis), then that no cache, old or new, serves the old row.

mod common;

use cached_query::Cache;
use common::users::{self, reads};
use common::{RedisServer, TcpProxy, unique_ns};
use sqlx::PgPool;
use std::path::Path;
use std::time::{Duration, Instant};

fn builder(url: &str, ns: &str) -> cached_query::CacheBuilder {
    Cache::builder()
        .redis(url)
        .namespace(ns)
        .response_timeout(Duration::from_millis(500))
}

/// A plain cache and one with a near cache, on the same namespace.
async fn caches(url: &str, ns: &str) -> [Cache; 2] {
    [
        builder(url, ns).build().await.unwrap(),
        builder(url, ns).near_cache(100).build().await.unwrap(),
    ]
}

/// Both caches hold user 1 as "Ada" (the second read a hit).
async fn warm(pool: &PgPool, caches: &[Cache; 2]) {
    for cache in caches {
        assert!(reads(pool, cache, 1, "Ada").await);
        let hits = cache.stats().hits;
        assert!(reads(pool, cache, 1, "Ada").await);
        assert_eq!(cache.stats().hits, hits + 1, "{:?}", cache.stats());
    }
}

/// Renames user 1 through `caches[0]` (UPDATE, then an invalidation that returns Ok): it
/// reads the new name at once; the near cache, told by Redis's message, within its lease.
async fn rename(pool: &PgPool, caches: &[Cache; 2]) {
    let mut conn = pool.acquire().await.unwrap();
    users::rename(&mut conn, &caches[0], 1, "Ada Lovelace")
        .await
        .unwrap();
    assert!(reads(pool, &caches[0], 1, "Ada Lovelace").await);
    common::within(Duration::from_secs(1), "the near cache's bound", || {
        reads(pool, &caches[1], 1, "Ada Lovelace")
    })
    .await;
}

/// The tag token of user 1 in `ns`, read from `server` directly.
fn token(server: &RedisServer, cache: &Cache) -> String {
    let keys = server.cli(&["--scan", "--pattern", &format!("{}:t:*", cache.namespace())]);
    let key = keys.lines().next().expect("a tag key").to_owned();
    server.cli(&["GET", &key])
}

/// Server changes the caches found so far.
fn changes(caches: &[Cache; 2]) -> u64 {
    caches.iter().map(|c| c.stats().server_changes).sum()
}

/// After the bad restart: every cache (and a new one) reads the committed row, the first
/// old cache to reconnect having found the server changed (`changes_before`: before it).
async fn nothing_stale(pool: &PgPool, url: &str, caches: &[Cache; 2], changes_before: u64) {
    for cache in caches {
        for _ in 0..3 {
            assert!(
                reads(pool, cache, 1, "Ada Lovelace").await,
                "stale read: {:?}",
                cache.stats()
            );
        }
    }
    assert!(changes(caches) > changes_before, "{:?}", caches[0].stats());
    let fresh = builder(url, caches[0].namespace()).build().await.unwrap();
    assert!(reads(pool, &fresh, 1, "Ada Lovelace").await);
    // Hits come back on the new server.
    assert!(reads(pool, &caches[0], 1, "Ada Lovelace").await);
    let before = caches[0].stats().hits;
    assert!(reads(pool, &caches[0], 1, "Ada Lovelace").await);
    assert_eq!(caches[0].stats().hits, before + 1);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[sqlx::test]
async fn a_restart_from_an_rdb_dump_serves_nothing_stale(pool: PgPool) {
    users::schema(&pool).await;
    let mut server = RedisServer::start();
    let ns = unique_ns("rdb");
    let caches = caches(&server.url(), &ns).await;
    warm(&pool, &caches).await;
    let saved = token(&server, &caches[0]);
    assert_eq!(server.cli(&["SAVE"]).trim(), "OK");
    rename(&pool, &caches).await;
    assert_ne!(token(&server, &caches[0]), saved);

    let before = changes(&caches);
    server.kill();
    server.restart();
    assert_eq!(
        token(&server, &caches[0]),
        saved,
        "the dump brought the old token back"
    );
    nothing_stale(&pool, &server.url(), &caches, before).await;
}

#[sqlx::test]
async fn a_restart_from_an_aof_file_that_missed_the_invalidation_serves_nothing_stale(
    pool: PgPool,
) {
    users::schema(&pool).await;
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let ns = unique_ns("aof");
    let caches = caches(&server.url(), &ns).await;
    warm(&pool, &caches).await;
    let saved = token(&server, &caches[0]);
    // The AOF as of now: what a crash keeps when the last second was never fsynced
    // (`appendfsync everysec`, the default).
    let aof = server.dir().join("appendonlydir");
    let kept = server.dir().with_extension("kept-aof");
    copy_dir(&aof, &kept);
    rename(&pool, &caches).await;

    let before = changes(&caches);
    server.kill();
    std::fs::remove_dir_all(&aof).unwrap();
    copy_dir(&kept, &aof);
    std::fs::remove_dir_all(&kept).unwrap();
    server.restart();
    assert_eq!(
        token(&server, &caches[0]),
        saved,
        "the AOF brought the old token back"
    );
    nothing_stale(&pool, &server.url(), &caches, before).await;
}

/// The replica's replication link goes through a proxy that the test stalls, so it misses
/// the invalidation; the application reaches Redis through another proxy, switched to the
/// replica when it is promoted (a failover behind a fixed address).
#[sqlx::test]
async fn a_replica_promoted_after_missing_the_invalidation_serves_nothing_stale(pool: PgPool) {
    users::schema(&pool).await;
    let mut master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start();
    let link = TcpProxy::start(&master.addr()).await;
    replica.replicate(&format!("127.0.0.1:{}", link.port)).await;
    let front = TcpProxy::start(&master.addr()).await;
    let url = front.redis_url();
    let ns = unique_ns("promoted");
    let caches = caches(&url, &ns).await;
    warm(&pool, &caches).await;
    replica.caught_up(&master).await;
    let saved = token(&replica, &caches[0]);

    link.stall();
    rename(&pool, &caches).await;
    assert_eq!(token(&replica, &caches[0]), saved, "the replica missed it");

    let before = changes(&caches);
    assert_eq!(replica.cli(&["REPLICAOF", "NO", "ONE"]).trim(), "OK");
    front.switch(&replica.addr());
    front.cut();
    master.kill();
    nothing_stale(&pool, &url, &caches, before).await;
}

/// Every tag token of `cache`'s namespace on `server`.
fn tokens(server: &RedisServer, cache: &Cache) -> std::collections::BTreeMap<String, String> {
    let pattern = format!("{}:t:*", cache.namespace());
    server
        .cli(&["--scan", "--pattern", &pattern])
        .lines()
        .map(|k| (k.to_owned(), server.cli(&["GET", k])))
        .collect()
}

/// With `invalidation_replicas(1, …)`, an invalidation returns Ok only once the replica holds
/// it; while the replica's link is frozen it is pending (never Ok), and once the link is back
/// it is delivered in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_replicas_return_ok_only_once_the_replica_has_it() {
    let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start();
    let link = TcpProxy::start(&master.addr()).await;
    replica.replicate(&format!("127.0.0.1:{}", link.port)).await;
    let ns = unique_ns("replicas");
    let cache = builder(&master.url(), &ns)
        .invalidation_replicas(1, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    cache.invalidate("t").await.unwrap();
    // Ok: the replica already has the new token, with no waiting by the test.
    assert_eq!(tokens(&replica, &cache), tokens(&master, &cache));

    link.stall();
    let err = cache.invalidate("t").await.unwrap_err();
    assert!(
        matches!(err, cached_query::Error::InvalidationPending { .. }),
        "{err}"
    );
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("0 of the 1 replicas"), "{cause}");
    assert_ne!(tokens(&replica, &cache), tokens(&master, &cache));

    link.resume();
    common::within(
        Duration::from_secs(5),
        "the pending invalidation delivered",
        || {
            let cache = cache.clone();
            async move { cache.invalidate("other").await.is_ok() }
        },
    )
    .await;
    assert_eq!(tokens(&replica, &cache), tokens(&master, &cache));
}

/// A master demoted with `REPLICAOF` keeps its clients connected and serves them its new
/// master's data, here older than the last invalidation (a snapshot of its own from before
/// it). Connections in use are checked again every second (a server that is no longer a
/// master is given up), so past two seconds and a response timeout no cache serves the old
/// row: the documented bound.
#[sqlx::test]
async fn a_master_demoted_under_open_connections_is_given_up_within_the_bound(pool: PgPool) {
    users::schema(&pool).await;
    let a = RedisServer::start();
    let ns = unique_ns("demoted");
    let caches = caches(&a.url(), &ns).await;
    warm(&pool, &caches).await;
    let saved = token(&a, &caches[0]);
    assert_eq!(a.cli(&["SAVE"]).trim(), "OK");
    let b = RedisServer::start_from_dump(&a.dir().join("dump.rdb"));
    rename(&pool, &caches).await;

    a.replicate(&b.addr()).await;
    let demoted = Instant::now();
    assert_eq!(
        token(&a, &caches[0]),
        saved,
        "the demoted master serves the old token"
    );
    let bound = 2 * Duration::from_secs(1) + Duration::from_millis(500);
    let mut stale = 0;
    while demoted.elapsed() < bound + Duration::from_secs(1) {
        for cache in &caches {
            let started = demoted.elapsed();
            if !reads(&pool, cache, 1, "Ada Lovelace").await {
                assert!(started < bound, "stale read {started:?} after the demotion");
                stale += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("demoted master: {stale} stale reads within the bound of {bound:?}");
}

/// An ACL user without `INFO` and `ROLE` (`-@dangerous` style): the identity is unknown, so
/// the first connection clears the namespace (safe), and the periodic recheck, refused, keeps
/// the connection rather than replacing it (which would clear the namespace every time).
#[sqlx::test]
async fn a_user_without_info_or_role_is_safe_and_not_cleared_again(pool: PgPool) {
    users::schema(&pool).await;
    let server = RedisServer::start();
    let acl = [
        "ACL", "SETUSER", "app", "on", ">secret", "~*", "+@all", "-info", "-role",
    ];
    assert_eq!(server.cli(&acl).trim(), "OK");
    let url = format!("redis://app:secret@127.0.0.1:{}", server.port);
    let cache = builder(&url, &unique_ns("acl")).build().await.unwrap();
    // Each of the cache's connections clears once when it is made: read until all are.
    for _ in 0..4 {
        assert!(reads(&pool, &cache, 1, "Ada").await);
    }
    let before = cache.stats();
    assert!(before.server_changes >= 1, "{before:?}");
    // Past the recheck interval (twice: the check then runs before use).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for _ in 0..5 {
        assert!(reads(&pool, &cache, 1, "Ada").await);
    }
    let after = cache.stats();
    assert_eq!(after.server_changes, before.server_changes, "{after:?}");
    assert_eq!(
        (after.misses, after.errors),
        (before.misses, 0),
        "{after:?}"
    );
    assert_eq!(after.hits, before.hits + 5, "{after:?}");
}

/// With `invalidation_replicas`, the `WAIT` after a bump blocks its connection until the
/// replica acknowledges or the timeout passes. It runs on a connection kept for it, so reads
/// go on meanwhile within their own deadline: here the replica's link is frozen, the `WAIT`
/// blocks (seen in `CLIENT LIST`), and reads on the one shared connection are all hits.
#[sqlx::test]
async fn reads_do_not_queue_behind_an_invalidation_waiting_for_replicas(pool: PgPool) {
    users::schema(&pool).await;
    let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start();
    let link = TcpProxy::start(&master.addr()).await;
    replica.replicate(&format!("127.0.0.1:{}", link.port)).await;
    let cache = builder(&master.url(), &unique_ns("waiting"))
        .redis_connections(1)
        .invalidation_replicas(1, Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &cache, 1, "Ada").await);
    cache.invalidate("other").await.unwrap(); // the blocking connection, made and checked
    replica.caught_up(&master).await;

    link.stall();
    let waiting = tokio::spawn({
        let cache = cache.clone();
        async move { cache.invalidate("other").await }
    });
    common::within(
        Duration::from_secs(5),
        "a WAIT blocked on the master",
        || {
            let blocked = master.cli(&["CLIENT", "LIST"]).contains("cmd=wait");
            async move { blocked }
        },
    )
    .await;
    let before = cache.stats();
    for _ in 0..10 {
        assert!(reads(&pool, &cache, 1, "Ada").await);
    }
    let after = cache.stats();
    assert_eq!(
        (after.hits - before.hits, after.errors),
        (10, 0),
        "reads waited behind the WAIT: {after:?}"
    );
    assert!(!waiting.is_finished(), "the WAIT was still blocking");
    link.resume();
    waiting.await.unwrap().unwrap();
}

/// A connection in use is checked again every second: its server must still hold its own
/// `run_id` in the namespace's server key. Here the key is made to name another server (what a
/// master demoted, resynchronised from another one and promoted again holds) while the
/// cache's connection stays open: past the recheck interval the connection is replaced, and
/// the new one's check replaces the generation.
#[sqlx::test]
async fn a_connection_whose_server_key_names_another_server_is_replaced(pool: PgPool) {
    users::schema(&pool).await;
    let server = RedisServer::start();
    let ns = unique_ns("copied");
    let cache = builder(&server.url(), &ns)
        .redis_connections(1)
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &cache, 1, "Ada").await);
    assert!(reads(&pool, &cache, 1, "Ada").await);
    let before = cache.stats();
    assert_eq!(before.hits, 1, "{before:?}");
    let key = format!("{ns}:s");
    let own = server.cli(&["GET", &key]);
    assert_eq!(server.cli(&["SET", &key, "another-server"]).trim(), "OK");
    // Twice the recheck interval: the next read checks before using the connection.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(reads(&pool, &cache, 1, "Ada").await);
    let after = cache.stats();
    assert_eq!(after.server_changes, before.server_changes + 1, "{after:?}");
    assert_eq!(after.hits, before.hits, "a miss after the clear: {after:?}");
    assert_eq!(
        server.cli(&["GET", &key]),
        own,
        "the server is recorded again"
    );
}
