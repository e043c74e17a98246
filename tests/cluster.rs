//! The cache on a real 3-master Redis Cluster: core semantics, cost per read, fail-open,
//! and a node restart. Every test starts (and tears down) its own cluster.

mod common;

use cached_query::{Cache, cached_query};
use common::Cluster;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// A cache on `cluster` that gives up on a node quickly.
fn cluster_builder(cluster: &Cluster, ns: &str) -> cached_query::CacheBuilder {
    Cache::builder()
        .redis_cluster(cluster.urls())
        .namespace(ns)
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .circuit_breaker(3, Duration::from_millis(50))
}

async fn cluster_cache(cluster: &Cluster, ns: &str) -> Cache {
    cluster_builder(cluster, ns).build().await.unwrap()
}

#[derive(Default)]
struct Source {
    version: AtomicI64,
    queries: AtomicU32,
}

#[cached_query(cache = cache, invalidate = ["item:<id>", "items"], skip(source, wait_for))]
async fn item(cache: &Cache, source: &Source, wait_for: usize, id: i64) -> Result<i64, String> {
    source.queries.fetch_add(1, SeqCst);
    while cache.shared_waiters() < wait_for {
        tokio::task::yield_now().await;
    }
    Ok(id * 100 + source.version.load(SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_semantics_hold_across_slots() {
    let cluster = Cluster::start();
    let cache = cluster_cache(&cluster, "cl").await;
    let src = Source::default();

    for id in 0..20 {
        assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
    }
    // Entry, tag and generation keys are spread over the nodes.
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["DBSIZE"]).trim() != "0")
        .count();
    assert!(holding >= 2, "keys on {holding} node(s)");

    cluster.reset_stats();
    for id in 0..20 {
        assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
    }
    assert_eq!(src.queries.load(SeqCst), 20, "all hits");
    // redis-rs splits a cross-slot MGET into one MGET per slot, sent concurrently: at most
    // one per key read (entry, generation, two tags), one network wait.
    let mgets = cluster.command_calls("mget");
    assert!(
        (20..=80).contains(&mgets),
        "at most one MGET per key per hit: {mgets}"
    );
    assert_eq!(
        cluster.command_calls("set") + cluster.command_calls("get"),
        0
    );

    src.version.store(1, SeqCst);
    cache.invalidate("item:3").await.unwrap();
    assert_eq!(item(&cache, &src, 0, 3).await.unwrap(), 301);
    assert_eq!(
        item(&cache, &src, 0, 4).await.unwrap(),
        400,
        "other entries stay cached"
    );
    cache
        .invalidate_many(["item:1", "item:2", "nothing"])
        .await
        .unwrap();
    assert_eq!(item(&cache, &src, 0, 1).await.unwrap(), 101);
    cache.invalidate("items").await.unwrap();
    assert_eq!(item(&cache, &src, 0, 4).await.unwrap(), 401);
    src.version.store(2, SeqCst);
    cache.clear().await.unwrap();
    assert_eq!(item(&cache, &src, 0, 5).await.unwrap(), 502);
    let stats = cache.stats();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.misses, u64::from(src.queries.load(SeqCst)));

    // Single-flight: 32 concurrent misses, one query.
    let src = Arc::new(Source::default());
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (cache, src) = (cache.clone(), src.clone());
            tokio::spawn(async move { item(&cache, &src, 31, 77).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 7700);
    }
    assert_eq!(src.queries.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_open_and_a_restarted_node_serves_again() {
    let mut cluster = Cluster::start();
    let cache = cluster_cache(&cluster, "clkill").await;
    let src = Source::default();
    for id in 0..30 {
        item(&cache, &src, 0, id).await.unwrap();
    }
    cluster.nodes[1].kill();
    for round in 0..3 {
        for id in 0..30 {
            assert_eq!(
                item(&cache, &src, 0, id).await.unwrap(),
                id * 100,
                "round {round}"
            );
        }
    }
    assert!(cache.stats().errors > 0, "{:?}", cache.stats());

    cluster.nodes[1].restart();
    cluster.wait_ok();
    let before = cache.stats().hits;
    let start = Instant::now();
    loop {
        for id in 0..30 {
            assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
        }
        let stats = cache.stats();
        if stats.hits >= before + 30 {
            break; // a full pass of hits: every node serves again
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hits did not come back: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn from_env_reads_redis_cluster_urls() {
    let cluster = Cluster::start();
    let vars: HashMap<&str, String> = HashMap::from([
        ("REDIS_CLUSTER_URLS", cluster.urls().join(",")),
        ("CACHE_NAMESPACE", "clenv".to_owned()),
    ]);
    let cache = Cache::from_lookup(|k| vars.get(k).cloned()).await.unwrap();
    assert!(format!("{cache:?}").contains("redis"));
    let src = Source::default();
    item(&cache, &src, 0, 1).await.unwrap();
    item(&cache, &src, 0, 1).await.unwrap();
    assert_eq!((cache.stats().hits, cache.stats().errors), (1, 0));
    let keys: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap())
        .sum();
    assert!(keys >= 4, "entry, generation and two tags: {keys}");
}

/// Sessions are configured like the cache: `REDIS_CLUSTER_URLS` puts them on the cluster.
#[cfg(feature = "sessions")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_use_redis_cluster_urls() {
    let cluster = Cluster::start();
    let urls = cluster.urls().join(",");
    let config =
        cached_query::RedisConfig::from_lookup(common::lookup(&[("REDIS_CLUSTER_URLS", &urls)]))
            .unwrap();
    let store = cached_query::RedisSessionStore::new(&config, "cluster-sessions").unwrap();
    let sets = cluster.command_calls("set");
    common::session_round_trip(&store).await;
    assert_eq!(
        cluster.command_calls("set") - sets,
        1,
        "stored on the cluster"
    );
}

/// A master killed (`kill -9`) and restarted from its RDB file, saved before an
/// invalidation that returned Ok: the tag's older token comes back on it, next to entries
/// (on every node) computed under that token. The first connection to the restarted node
/// sees a `run_id` its server key does not hold and replaces the generation before any
/// request reads from it: every entry is recomputed, none is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_from_disk_serves_no_stale_entry() {
    let mut cluster = Cluster::start();
    let ns = "clrdb";
    let cache = cluster_cache(&cluster, ns).await;
    // Another process's cache: it never saw the invalidation.
    let reading = cluster_cache(&cluster, ns).await;
    let src = Arc::new(Source::default());
    for id in 0..30 {
        assert_eq!(item(&reading, &src, 0, id).await.unwrap(), id * 100);
    }
    for node in &cluster.nodes {
        assert_eq!(node.cli(&["SAVE"]).trim(), "OK");
    }
    src.version.store(1, SeqCst);
    let victim = cluster
        .master_changed_by(&format!("{ns}:t:*"), async {
            cache.invalidate("items").await.unwrap();
        })
        .await;
    let changes = reading.stats().server_changes;
    cluster.nodes[victim].restart();
    // Kept to the end: dropping it stops the nodes.
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_ok();
        cluster
    })
    .await
    .unwrap();
    // All at once: each read's parts on the other nodes are answered while the restarted
    // node is being connected to and checked. Those parts are read again after the check.
    let reads: Vec<_> = (0..30)
        .map(|id| {
            let (reading, src) = (reading.clone(), src.clone());
            tokio::spawn(async move { item(&reading, &src, 0, id).await.unwrap() })
        })
        .collect();
    for (id, read) in (0..).zip(reads) {
        let got = read.await.unwrap();
        assert_eq!(
            got,
            id * 100 + 1,
            "entry {id} computed before the invalidation"
        );
    }
    let stats = reading.stats();
    assert!(stats.server_changes > changes, "{stats:?}");
    assert_eq!(
        stats.errors, 0,
        "the node was back before the reads: {stats:?}"
    );
}

/// Three masters with a replica each. Under a writer (invalidating the tag all entries
/// share) and readers of 30 entries, the replica of the master holding that tag is frozen
/// and cut off (it misses what follows), then that master is killed and the replica thawed
/// and promoted (node timeout 1 s), without the invalidations it missed. No read is older
/// than the last invalidation that returned Ok. With invalidations acknowledged by a replica
/// (`invalidation_replicas`), none returned Ok while the replica could not acknowledge it;
/// without, the promoted replica is a server the namespace was not made safe on, and its
/// first connection replaces the generation. Calls fail open only during the failover, and
/// hits come back without restarting the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_over_with_no_stale_read() {
    fails_over_with_no_stale_read("clfail", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_without_acknowledged_invalidations_serves_no_stale_read() {
    fails_over_with_no_stale_read("clfailnowait", false).await;
}

async fn fails_over_with_no_stale_read(ns: &str, acknowledged: bool) {
    let mut cluster = Cluster::start_with_replicas();
    const IDS: i64 = 30;
    let build = || {
        let builder = cluster_builder(&cluster, ns);
        match acknowledged {
            true => builder.invalidation_replicas(1, Duration::from_millis(500)),
            false => builder,
        }
        .build()
    };
    // The writer's process and the readers' (pending invalidations are per process).
    let cache = build().await.unwrap();
    let reading = build().await.unwrap();
    let src = Arc::new(Source::default());
    // Entries of many ids, spread over every node: those on the victim's node come back
    // with its older data, next to the shared tag's older token.
    for id in 0..IDS {
        assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
    }
    let victim = cluster
        .master_changed_by(&format!("{ns}:t:*"), async {
            cache.invalidate("items").await.unwrap();
        })
        .await;
    let replica = cluster.replica_of(victim);

    let renamed = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (cache, src, renamed, stop) =
            (cache.clone(), src.clone(), renamed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let v = src.version.fetch_add(1, SeqCst) + 1;
                if cache.invalidate("items").await.is_ok() {
                    renamed.store(v, SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (cache, src, renamed, stop) =
                (reading.clone(), src.clone(), renamed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut id = 0;
                while !stop.load(SeqCst) {
                    id = (id + 1) % IDS;
                    let floor = renamed.load(SeqCst);
                    let got = item(&cache, &src, 0, id).await.unwrap() - id * 100;
                    assert!(
                        got >= floor,
                        "stale read: {got} after {floor} was invalidated"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    // The replica stops, and the master drops its link (what the kernel had already
    // delivered to the replica stays readable; nothing after reaches it).
    cluster.nodes[replica].freeze();
    cluster.nodes[victim].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Whichever process connects to the promoted replica first replaces the generation.
    let changes = || cache.stats().server_changes + reading.stats().server_changes;
    let changed = changes();
    cluster.nodes[victim].kill();
    cluster.nodes[replica].thaw();
    let errors = reading.stats().errors;
    tokio::task::spawn_blocking({
        let cluster = std::mem::replace(&mut cluster, Cluster { nodes: Vec::new() });
        move || {
            cluster.wait_ok();
            cluster
        }
    })
    .await
    .map(|c| cluster = c)
    .unwrap();
    // Hits come back on the promoted replica.
    let hits = reading.stats().hits;
    common::within(Duration::from_secs(30), "hits after the failover", || {
        let now = reading.stats().hits;
        async move { now > hits + 20 }
    })
    .await;
    stop.store(true, SeqCst);
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let stats = reading.stats();
    assert!(
        stats.errors > errors,
        "the failover window fails open: {stats:?}"
    );
    assert!(
        changes() > changed,
        "the promoted replica replaced the generation: {stats:?}"
    );
    println!("cluster failover (acknowledged: {acknowledged}): {stats:?}");
}

/// A master that refuses writes (`min-replicas-to-write` with no replica: `NOREPLICAS`)
/// cannot take the record of its identity check, so its connections are never published and
/// calls on its keys fall back to the database. The generation is replaced once for that
/// server, not again by every new attempt (which would keep the whole namespace cold), and
/// once the node takes writes again its record lands without another clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_refusing_the_record_clears_the_namespace_once() {
    let cluster = Cluster::start();
    let ns = "clrecord";
    // The node serving the generation answers its key; the others redirect.
    let holds_generation =
        |n: &common::RedisServer| !n.cli(&["GET", &format!("{ns}:g")]).starts_with("MOVED");
    let refusing = cluster
        .nodes
        .iter()
        .position(|n| !holds_generation(n))
        .unwrap();
    let node = &cluster.nodes[refusing];
    assert_eq!(
        node.cli(&["CONFIG", "SET", "min-replicas-to-write", "1"])
            .trim(),
        "OK"
    );
    let cache = cluster_cache(&cluster, ns).await;
    let src = Source::default();
    for round in 0..3 {
        for id in 0..10 {
            assert_eq!(
                item(&cache, &src, 0, id).await.unwrap(),
                id * 100,
                "{round}"
            );
        }
    }
    let stats = cache.stats();
    assert!(
        stats.errors > 0,
        "calls on the refusing node fail open: {stats:?}"
    );
    // First use of each of the three masters, the refusing one included: once each at most
    // (a master whose first connection is still being checked when the refusing node fails
    // the call is counted later; the end of the test checks all three).
    assert!(stats.server_changes <= 3, "{stats:?}");

    assert_eq!(
        node.cli(&["CONFIG", "SET", "min-replicas-to-write", "0"])
            .trim(),
        "OK"
    );
    let start = Instant::now();
    loop {
        let before = cache.stats().hits;
        for id in 0..10 {
            assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
        }
        if cache.stats().hits == before + 10 {
            break; // every entry a hit: the refusing node serves again
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cache.stats().server_changes, 3, "{:?}", cache.stats());
}

/// A slot being migrated (`CLUSTER SETSLOT … MIGRATING/IMPORTING`, then `MIGRATE` of a tag
/// key): requests for that key get `ASK` from the source and are sent to the target after
/// `ASKING`, reads and stamp creation alike (creation is a `SET NX` + `GET` pipeline: each of
/// its commands needs its own `ASKING`). No call falls back to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_being_migrated_is_followed_through_ask() {
    let cluster = Cluster::start();
    let ns = "clask";
    let cache = cluster_cache(&cluster, ns).await;
    let src = Source::default();
    for _ in 0..2 {
        for id in 0..10 {
            assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
        }
    }
    // A tag key, its node, and another master to move its slot to.
    let (from, key) = cluster
        .nodes
        .iter()
        .enumerate()
        .find_map(|(i, n)| {
            let keys = n.cli(&["--scan", "--pattern", &format!("{ns}:t:*")]);
            Some((i, keys.lines().next()?.to_owned()))
        })
        .expect("a tag key");
    let to = (from + 1) % cluster.nodes.len();
    let (source, target) = (&cluster.nodes[from], &cluster.nodes[to]);
    let slot = source.cli(&["CLUSTER", "KEYSLOT", &key]).trim().to_owned();
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source.node_id()];
    assert_eq!(target.cli(&importing).trim(), "OK");
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target.node_id()];
    assert_eq!(source.cli(&migrating).trim(), "OK");
    let port = target.port.to_string();
    let migrate = ["MIGRATE", "127.0.0.1", &port, &key, "0", "5000"];
    assert_eq!(source.cli(&migrate).trim(), "OK");
    assert_eq!(target.cli_asking(&["EXISTS", &key]).trim(), "1");

    let before = cache.stats();
    for id in 0..10 {
        assert_eq!(item(&cache, &src, 0, id).await.unwrap(), id * 100);
    }
    let after = cache.stats();
    assert_eq!(
        (after.hits - before.hits, after.errors),
        (10, 0),
        "reads through ASK: {after:?}"
    );

    // The tag key gone from both nodes: the next reads create it on the target.
    assert_eq!(target.cli_asking(&["DEL", &key]).trim(), "1");
    src.version.store(1, SeqCst);
    let before = cache.stats();
    for id in 0..10 {
        let got = item(&cache, &src, 0, id).await.unwrap();
        assert!(got == id * 100 || got == id * 100 + 1, "{got}");
    }
    let after = cache.stats();
    assert_eq!(after.errors, 0, "stamp creation through ASK: {after:?}");
    assert!(
        after.misses > before.misses,
        "entries under the dropped tag: {after:?}"
    );
    assert_eq!(
        target.cli_asking(&["EXISTS", &key]).trim(),
        "1",
        "created on the target"
    );
    // Not on the source: it redirects.
    assert!(source.cli(&["EXISTS", &key]).starts_with("ASK"));
}
