//! Batch reads (`#[cached_query(batch = ids)]`): each element its own entry, one read for
//! all of them, one query for the misses, one write; coherence, single-flight and fail-open
//! per element, as for single reads.

mod common;

use cached_query::{Cache, cached_query, count_calls, invalidates};
use common::{RedisServer, keys_under, raw, redis_cache, redis_url, unique_ns};
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// What a batch function's executions saw; optionally each one stops at a gate: it reports
/// its keys on `reached` and waits for a permit of `release`.
#[derive(Default)]
struct Probe {
    runs: Mutex<Vec<Vec<i64>>>,
    gate: Option<(mpsc::UnboundedSender<Vec<i64>>, Semaphore)>,
}

impl Probe {
    fn gated() -> (Arc<Probe>, mpsc::UnboundedReceiver<Vec<i64>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let probe = Probe {
            runs: Mutex::default(),
            gate: Some((tx, Semaphore::new(0))),
        };
        (Arc::new(probe), rx)
    }

    fn runs(&self) -> Vec<Vec<i64>> {
        self.runs.lock().unwrap().clone()
    }

    fn release(&self, n: usize) {
        self.gate.as_ref().unwrap().1.add_permits(n);
    }

    async fn enter(&self, ids: &[i64]) {
        self.runs.lock().unwrap().push(ids.to_vec());
        if let Some((reached, release)) = &self.gate {
            reached.send(ids.to_vec()).unwrap();
            release.acquire().await.unwrap().forget();
        }
    }
}

/// The keys of the next execution to reach the gate (10 s at most: a caller that never
/// gets there waits for something it should not).
async fn next(reached: &mut mpsc::UnboundedReceiver<Vec<i64>>) -> Vec<i64> {
    tokio::time::timeout(Duration::from_secs(10), reached.recv())
        .await
        .expect("an execution reaches the gate")
        .unwrap()
}

/// 100 people, ids 1 to 100, in org `id % 3`.
async fn schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE people (id BIGINT PRIMARY KEY, org BIGINT NOT NULL, name TEXT NOT NULL);
         INSERT INTO people SELECT i, i % 3, 'p' || i FROM generate_series(1, 100) i;
         CREATE TABLE counters (id INT PRIMARY KEY, name TEXT UNIQUE NOT NULL, value BIGINT NOT NULL);
         INSERT INTO counters VALUES (1, 'hits', 0);",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[cached_query(cache = cache, ttl = 300, batch = ids, invalidate = "person:<ids>", skip(probe))]
async fn people(
    pool: &PgPool,
    cache: &Cache,
    probe: &Probe,
    ids: &[i64],
) -> Result<HashMap<i64, String>, sqlx::Error> {
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM people WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    // After the read: a gated execution holds rows that a write may change meanwhile.
    probe.enter(ids).await;
    Ok(rows.into_iter().collect())
}

#[invalidates("person:<id>", cache = cache)]
async fn rename(
    conn: &mut PgConnection,
    cache: &Cache,
    id: i64,
    to: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE people SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(to)
        .execute(conn)
        .await?;
    Ok(())
}

fn names(ids: impl IntoIterator<Item = i64>) -> HashMap<i64, String> {
    ids.into_iter().map(|i| (i, format!("p{i}"))).collect()
}

/// (hits, misses)
fn counts(cache: &Cache) -> (u64, u64) {
    let s = cache.stats();
    (s.hits, s.misses)
}

/// Every command a server ran since its start, except those of `INFO` itself and of the
/// connections' once-a-second identity recheck (`INFO`, `GET` of the server key, `ROLE`),
/// which runs in the background whatever the calls do.
fn commands(server: &RedisServer) -> u64 {
    let background = ["cmdstat_info:", "cmdstat_get:", "cmdstat_role:"];
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_") && !background.iter().any(|b| l.starts_with(b)))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[sqlx::test]
async fn all_hits_take_one_command_and_misses_one_query(pool: PgPool) {
    schema(&pool).await;
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "batch").await;
    let probe = Probe::default();
    let ids: Vec<i64> = (1..=100).collect();

    assert_eq!(
        people(&pool, &cache, &probe, &ids).await.unwrap(),
        names(1..=100)
    );
    assert_eq!(probe.runs(), std::slice::from_ref(&ids));
    assert_eq!(counts(&cache), (0, 100));

    let before = commands(&server);
    let mget = server.command_calls("mget");
    assert_eq!(
        people(&pool, &cache, &probe, &ids).await.unwrap(),
        names(1..=100)
    );
    assert_eq!(probe.runs().len(), 1, "all hits: no query");
    assert_eq!(counts(&cache), (100, 100));
    assert_eq!(commands(&server) - before, 1, "one command for 100 hits");
    assert_eq!(server.command_calls("mget") - mget, 1, "and it is an MGET");

    // 10 invalidated: one read, one query for those 10 (in the caller's order), one write.
    let stale: Vec<i64> = (1..=100).filter(|i| i % 10 == 3).collect();
    let tags: Vec<String> = stale.iter().map(|i| format!("person:{i}")).collect();
    cache.invalidate_many(&tags).await.unwrap();
    let (before, mget, set) = (
        commands(&server),
        server.command_calls("mget"),
        server.command_calls("set"),
    );
    assert_eq!(
        people(&pool, &cache, &probe, &ids).await.unwrap(),
        names(1..=100)
    );
    assert_eq!(probe.runs().last().unwrap(), &stale);
    assert_eq!(counts(&cache), (190, 110));
    assert_eq!(server.command_calls("mget") - mget, 1);
    assert_eq!(
        server.command_calls("set") - set,
        10,
        "one entry per element"
    );
    assert_eq!(commands(&server) - before, 11, "the read and the 10 writes");
    assert_eq!(cache.stats().errors, 0);
}

#[sqlx::test]
async fn larger_batches_are_split_into_commands_of_at_most_2048_keys(pool: PgPool) {
    schema(&pool).await;
    sqlx::query("INSERT INTO people SELECT i, i % 3, 'p' || i FROM generate_series(101, 3000) i")
        .execute(&pool)
        .await
        .unwrap();
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "batch").await;
    let probe = Probe::default();
    let ids: Vec<i64> = (1..=3000).collect();
    assert_eq!(
        people(&pool, &cache, &probe, &ids).await.unwrap().len(),
        3000
    );
    let mget = server.command_calls("mget");
    assert_eq!(
        people(&pool, &cache, &probe, &ids).await.unwrap(),
        names(1..=3000)
    );
    assert_eq!(probe.runs().len(), 1);
    // 3000 entries, 3000 tags and the generation: 6001 keys.
    assert_eq!(server.command_calls("mget") - mget, 3);
    assert_eq!(counts(&cache), (3000, 3000));
}

/// Duplicates, the caller's order, absent keys, empty input.
async fn elements_are_deduplicated_and_absences_cached(pool: &PgPool, cache: &Cache) {
    let probe = Probe::default();
    let got = people(pool, cache, &probe, &[5, 3, 5, 1000, 3, 7])
        .await
        .unwrap();
    assert_eq!(got, names([5, 3, 7]), "absent keys are left out");
    assert_eq!(
        probe.runs(),
        [vec![5, 3, 1000, 7]],
        "first occurrences, in order"
    );
    assert_eq!(counts(cache), (0, 4), "misses are distinct keys");

    let got = people(pool, cache, &probe, &[1000, 5, 1000]).await.unwrap();
    assert_eq!(got, names([5]));
    assert_eq!(probe.runs().len(), 1, "a cached absence is a hit");
    assert_eq!(counts(cache), (2, 4));

    // A cached absence carries its element's tag.
    cache.invalidate("person:1000").await.unwrap();
    assert!(
        people(pool, cache, &probe, &[1000])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(probe.runs().last().unwrap(), &vec![1000]);
    assert_eq!(counts(cache), (2, 5));

    assert!(people(pool, cache, &probe, &[]).await.unwrap().is_empty());
    assert_eq!(probe.runs().len(), 2, "empty input runs no query");
    assert_eq!(counts(cache), (2, 5));
    assert_eq!(cache.stats().errors, 0);
}

#[sqlx::test]
async fn elements_are_deduplicated_and_absences_cached_redis(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-dedup")).await;
    elements_are_deduplicated_and_absences_cached(&pool, &cache).await;
}

#[sqlx::test]
async fn elements_are_deduplicated_and_absences_cached_memory(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    elements_are_deduplicated_and_absences_cached(&pool, &cache).await;
}

/// `Vec<K>`, `&Vec<K>`, `BTreeMap`, a field of the element in a tag, a tag from another
/// parameter, `cache_none = false`, and keys the function returns unasked.
#[cached_query(cache = cache, batch = keys, invalidate = ["org:<keys.0>", "region:<region>"],
               cache_none = false, skip(probe))]
async fn by_org(
    pool: &PgPool,
    cache: &Cache,
    probe: &Probe,
    region: &str,
    keys: Vec<(i64, i64)>,
) -> Result<BTreeMap<(i64, i64), String>, sqlx::Error> {
    probe
        .enter(&keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .await;
    let ids: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let rows: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT org, id, name || $2 FROM people WHERE id = ANY($1)")
            .bind(&ids)
            .bind(region)
            .fetch_all(pool)
            .await?;
    // Rows whose org does not match their key are not asked for: left out by the cache.
    Ok(rows.into_iter().map(|(o, i, n)| ((o, i), n)).collect())
}

#[cached_query(cache = cache, batch = ids, skip(probe))]
#[allow(clippy::ptr_arg)] // `&Vec<K>` is a shape batches support
async fn doubled(
    cache: &Cache,
    probe: &Probe,
    ids: &Vec<i64>,
) -> Result<HashMap<i64, i64>, String> {
    probe.enter(ids).await;
    // One more key than asked for: never returned to the caller, never cached.
    Ok(ids.iter().map(|i| (*i, i * 2)).chain([(0, 0)]).collect())
}

#[sqlx::test]
async fn collections_maps_and_tags_of_elements(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-kinds")).await;
    let probe = Probe::default();
    let keys = vec![(1, 4), (1, 7), (2, 5), (0, 4)];
    let got = by_org(&pool, &cache, &probe, "@eu", keys.clone())
        .await
        .unwrap();
    let want: BTreeMap<(i64, i64), String> =
        [((1, 4), "p4@eu"), ((1, 7), "p7@eu"), ((2, 5), "p5@eu")]
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect();
    assert_eq!(got, want, "(0, 4) does not exist: person 4 is in org 1");
    by_org(&pool, &cache, &probe, "@eu", keys.clone())
        .await
        .unwrap();
    assert_eq!(
        probe.runs(),
        [vec![4, 7, 5, 4], vec![4]],
        "cache_none = false: the absent key is asked again"
    );

    cache.invalidate("org:1").await.unwrap();
    assert_eq!(
        by_org(&pool, &cache, &probe, "@eu", keys.clone())
            .await
            .unwrap(),
        want
    );
    assert_eq!(
        probe.runs().last().unwrap(),
        &vec![4, 7, 4],
        "org 1's elements and the absent one"
    );
    by_org(&pool, &cache, &probe, "@us", keys.clone())
        .await
        .unwrap();
    assert_eq!(probe.runs().len(), 4, "another region is another key");
    cache.invalidate("region:@eu").await.unwrap();
    by_org(&pool, &cache, &probe, "@eu", keys).await.unwrap();
    assert_eq!(probe.runs().last().unwrap(), &vec![4, 7, 5, 4]);

    let got = doubled(&cache, &probe, &vec![3, 1, 3]).await.unwrap();
    assert_eq!(got, HashMap::from([(3, 6), (1, 2)]));
    let got = doubled(&cache, &probe, &vec![0, 1]).await.unwrap();
    assert_eq!(got, HashMap::from([(0, 0), (1, 2)]));
    assert_eq!(
        probe.runs()[5..],
        [vec![3, 1], vec![0]],
        "key 0 was not cached unasked"
    );
    assert_eq!(cache.stats().errors, 0);
}

#[sqlx::test]
async fn an_element_invalidated_by_a_write_is_queried_again_alone(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-write")).await;
    let probe = Probe::default();
    people(&pool, &cache, &probe, &[1, 2, 3]).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    rename(&mut conn, &cache, 2, "Bea").await.unwrap();
    let got = people(&pool, &cache, &probe, &[1, 2, 3]).await.unwrap();
    assert_eq!(got[&2], "Bea");
    assert_eq!(probe.runs(), [vec![1, 2, 3], vec![2]]);
}

/// An element invalidated while the batch's query runs (after its rows were read): the value
/// read before is returned to that caller, but not stored for the next one.
async fn invalidated_during_the_query_is_not_served_after(pool: &PgPool, cache: &Cache) {
    let (probe, mut reached) = Probe::gated();
    let first = tokio::spawn({
        let (pool, cache, probe) = (pool.clone(), cache.clone(), probe.clone());
        async move { people(&pool, &cache, &probe, &[1, 2, 3]).await.unwrap() }
    });
    assert_eq!(next(&mut reached).await, [1, 2, 3]);
    let mut conn = pool.acquire().await.unwrap();
    rename(&mut conn, cache, 2, "Bea").await.unwrap();
    probe.release(1);
    assert_eq!(first.await.unwrap()[&2], "p2", "read before the write");
    probe.release(1);
    let got = people(pool, cache, &probe, &[1, 2, 3]).await.unwrap();
    assert_eq!(got[&2], "Bea");
    assert_eq!(
        probe.runs()[1],
        [2],
        "1 and 3 were stored, 2 is queried again"
    );
}

#[sqlx::test]
async fn invalidated_during_the_query_is_not_served_after_redis(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-race")).await;
    invalidated_during_the_query_is_not_served_after(&pool, &cache).await;
}

#[sqlx::test]
async fn invalidated_during_the_query_is_not_served_after_memory(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    invalidated_during_the_query_is_not_served_after(&pool, &cache).await;
}

/// Concurrent batches whose keys overlap: a batch waits for the keys whose query another
/// call is running and queries only the rest, once; it does not wait for a batch that is
/// itself waiting (no chains); when the call it waited for is cancelled it queries those
/// keys with its own, still in one execution.
#[sqlx::test]
async fn overlapping_batches_wait_only_for_queries_under_way(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-flight")).await;
    let (probe, mut reached) = Probe::gated();
    let call = |ids: Vec<i64>| {
        let (pool, cache, probe) = (pool.clone(), cache.clone(), probe.clone());
        tokio::spawn(async move { people(&pool, &cache, &probe, &ids).await.unwrap() })
    };
    let waiters = |n: usize| {
        let cache = cache.clone();
        common::within(Duration::from_secs(5), "callers wait", move || {
            let waiting = cache.shared_waiters();
            async move { waiting == n }
        })
    };
    let a = call(vec![1, 2, 3]);
    assert_eq!(next(&mut reached).await, [1, 2, 3]);
    // Everything a is querying: d runs no query (it waits for two keys).
    let d = call(vec![2, 1]);
    waiters(2).await;
    // 3 is a's: b waits for it, then queries 4.
    let b = call(vec![3, 4]);
    waiters(3).await;
    // 4 belongs to b, which is waiting: e queries it itself, at once, with 6.
    let e = call(vec![4, 6]);
    assert_eq!(next(&mut reached).await, [4, 6]);
    assert_eq!(probe.runs(), [vec![1, 2, 3], vec![4, 6]]);
    probe.release(1); // a (first in line)
    assert_eq!(a.await.unwrap(), names([1, 2, 3]));
    assert_eq!(d.await.unwrap(), names([1, 2]));
    assert_eq!(next(&mut reached).await, [4]);
    probe.release(2);
    assert_eq!(b.await.unwrap(), names([3, 4]));
    assert_eq!(e.await.unwrap(), names([4, 6]));
    assert_eq!(probe.runs(), [vec![1, 2, 3], vec![4, 6], vec![4]]);
    assert_eq!(counts(&cache), (3, 6), "d's 2 and b's 3 from a's query");

    // The call being waited for is cancelled: the waiting batch queries its keys with its
    // own, in one execution.
    let a = call(vec![10, 11]);
    assert_eq!(next(&mut reached).await, [10, 11]);
    let b = call(vec![11, 12]);
    waiters(1).await;
    a.abort();
    assert_eq!(next(&mut reached).await, [11, 12]);
    probe.release(1);
    assert_eq!(b.await.unwrap(), names([11, 12]));
    assert_eq!(probe.runs().len(), 5);
}

/// An absent element is shared like any other: a batch waiting for it gets the absence.
#[sqlx::test]
async fn single_flight_covers_absent_keys(pool: PgPool) {
    schema(&pool).await;
    let cache = redis_cache(&redis_url(), &unique_ns("batch-absent")).await;
    let (probe, mut reached) = Probe::gated();
    let call = |ids: Vec<i64>| {
        let (pool, cache, probe) = (pool.clone(), cache.clone(), probe.clone());
        tokio::spawn(async move { people(&pool, &cache, &probe, &ids).await.unwrap() })
    };
    let a = call(vec![1, 1000]);
    assert_eq!(next(&mut reached).await, [1, 1000]);
    let b = call(vec![1000]);
    common::within(Duration::from_secs(5), "b waits", || {
        let waiting = cache.shared_waiters();
        async move { waiting == 1 }
    })
    .await;
    probe.release(1);
    assert_eq!(a.await.unwrap(), names([1]));
    assert!(b.await.unwrap().is_empty());
    assert_eq!(probe.runs(), [vec![1, 1000]]);
    assert_eq!(counts(&cache), (1, 2));
}

/// An invalidation that could not reach Redis is pending: no batch element is served from
/// process memory (the near cache) until it is delivered, and a read delivers it first.
#[sqlx::test]
async fn a_pending_invalidation_is_never_skipped_by_a_batch(pool: PgPool) {
    schema(&pool).await;
    let server = RedisServer::start();
    let proxy = common::TcpProxy::start(&server.addr()).await;
    let cache = common::fail_fast(&proxy.redis_url(), "batch")
        .near_cache(100)
        .build()
        .await
        .unwrap();
    let probe = Probe::default();
    // Until both are served from process memory (a fill is dropped when a tracking message,
    // such as the one for the entries just written, arrives during its read).
    for _ in 0..20 {
        people(&pool, &cache, &probe, &[1, 2]).await.unwrap();
        if cache.stats().near_hits >= 2 {
            break;
        }
    }
    assert!(cache.stats().near_hits >= 2, "{:?}", cache.stats());
    sqlx::query("UPDATE people SET name = 'Ann' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    proxy.stall();
    let pending = cache.invalidate("person:1").await;
    assert!(
        matches!(
            pending,
            Err(cached_query::Error::InvalidationPending { .. })
        ),
        "{pending:?}"
    );
    // Redis silent: the near cache holds both elements, but serves neither.
    assert_eq!(
        people(&pool, &cache, &probe, &[1, 2]).await.unwrap()[&1],
        "Ann"
    );
    assert_eq!(probe.runs().last().unwrap(), &vec![1, 2]);
    proxy.resume();
    assert_eq!(
        people(&pool, &cache, &probe, &[1, 2]).await.unwrap()[&1],
        "Ann"
    );
}

/// A batch over 2 048 keys is read in several `MGET`s: all on one connection, so a server
/// restarted from disk between two of them (its generation replaced on the new connection)
/// cannot pair an entry read before with a tag read after.
#[sqlx::test]
async fn a_restart_between_the_chunks_of_a_read_serves_nothing_stale(pool: PgPool) {
    schema(&pool).await;
    sqlx::query("INSERT INTO people SELECT i, i % 3, 'p' || i FROM generate_series(101, 1100) i")
        .execute(&pool)
        .await
        .unwrap();
    let mut server = RedisServer::start();
    let proxy = common::TcpProxy::start(&server.addr()).await;
    let cache = redis_cache(&proxy.redis_url(), "batch").await;
    let probe = Arc::new(Probe::default());
    people(&pool, &cache, &probe, &[1100]).await.unwrap();
    assert_eq!(server.cli(&["SAVE"]).trim(), "OK");
    let mut conn = pool.acquire().await.unwrap();
    rename(&mut conn, &cache, 1100, "renamed").await.unwrap();

    // 1100 entries, the generation and 1100 tags: 2201 keys, two MGETs, the tag of 1100 in
    // the second. The first is answered by the server as it was, the second (read on a new
    // connection, if it were sent apart) by the server restarted from the dump.
    let mget = server.command_calls("mget");
    proxy.hold_replies();
    let read = tokio::spawn({
        let (pool, cache, probe) = (pool.clone(), cache.clone(), probe.clone());
        async move {
            let ids: Vec<i64> = (1..=1100).collect();
            people(&pool, &cache, &probe, &ids).await.unwrap()
        }
    });
    common::within(Duration::from_secs(10), "the read reached Redis", || {
        let sent = server.command_calls("mget") > mget;
        async move { sent }
    })
    .await;
    server.restart();
    proxy.release_replies();
    let got = read.await.unwrap();
    assert_eq!(got[&1100], "renamed");
    assert_eq!(got.len(), 1100);
}

/// A key type whose `Eq` is wider than its serialised form: "P1" and "p1" are two entries
/// but one map key. Both entries get the value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Ci(String);

impl PartialEq for Ci {
    fn eq(&self, other: &Ci) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}
impl Eq for Ci {}
impl std::hash::Hash for Ci {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_ascii_lowercase().hash(state);
    }
}

#[cached_query(cache = cache, batch = names)]
async fn by_name(cache: &Cache, names: &[Ci]) -> Result<HashMap<Ci, usize>, String> {
    Ok(names.iter().map(|n| (n.clone(), n.0.len())).collect())
}

#[tokio::test]
async fn keys_equal_by_eq_but_not_by_value_each_get_the_value() {
    let cache = redis_cache(&redis_url(), &unique_ns("batch-eq")).await;
    let ci = |s: &str| Ci(s.to_owned());
    let got = by_name(&cache, &[ci("P1"), ci("p1")]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got.get(&ci("p1")), Some(&2));
    let got = by_name(&cache, &[ci("p1")]).await.unwrap();
    assert_eq!(got.get(&ci("p1")), Some(&2), "not cached as absent");
    assert_eq!(counts(&cache), (1, 2));
}

#[sqlx::test]
async fn per_element_corruption_and_size_limits(pool: PgPool) {
    schema(&pool).await;
    let (url, ns) = (redis_url(), unique_ns("batch-corrupt"));
    let cache = redis_cache(&url, &ns).await;
    let probe = Probe::default();
    people(&pool, &cache, &probe, &[1]).await.unwrap();
    let entries: Vec<String> = keys_under(&url, &ns)
        .await
        .into_iter()
        .filter(|k| k.contains(":e:"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mut conn = raw(&url).await;
    let _: () = redis::cmd("SET")
        .arg(&entries[0])
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        people(&pool, &cache, &probe, &[1, 2]).await.unwrap(),
        names([1, 2])
    );
    assert_eq!(probe.runs().last().unwrap(), &vec![1, 2]);
    assert_eq!(cache.stats().decode_errors, 1);

    // A value over the size limit is returned, not stored; the others are.
    let small = Cache::builder()
        .redis(&url)
        .namespace(&unique_ns("batch-size"))
        .max_value_size(4)
        .build()
        .await
        .unwrap();
    sqlx::query("UPDATE people SET name = 'a long name' WHERE id = 9")
        .execute(&pool)
        .await
        .unwrap();
    let got = people(&pool, &small, &probe, &[8, 9]).await.unwrap();
    assert_eq!(got[&9], "a long name");
    people(&pool, &small, &probe, &[8, 9]).await.unwrap();
    assert_eq!(probe.runs().last().unwrap(), &vec![9]);
    assert_eq!(small.stats().oversized, 2);
}

/// Redis unreachable: every call still answers, from the database, with the errors counted.
#[sqlx::test]
async fn fails_open_per_call(pool: PgPool) {
    schema(&pool).await;
    let mut server = RedisServer::start();
    let cache = common::fail_fast(&server.url(), "batch")
        .build()
        .await
        .unwrap();
    let probe = Probe::default();
    people(&pool, &cache, &probe, &[1, 2]).await.unwrap();
    server.kill();
    for _ in 0..3 {
        assert_eq!(
            people(&pool, &cache, &probe, &[1, 2, 2]).await.unwrap(),
            names([1, 2])
        );
    }
    assert_eq!(probe.runs().len(), 4);
    assert_eq!(probe.runs()[3], [1, 2]);
    assert!(cache.stats().errors >= 3, "{:?}", cache.stats());
}

#[sqlx::test]
async fn near_cache_and_cluster_serve_batches(pool: PgPool) {
    schema(&pool).await;
    let near = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("batch-near"))
        .near_cache(1000)
        .build()
        .await
        .unwrap();
    let cluster = common::Cluster::start();
    let clustered = Cache::builder()
        .redis_cluster(cluster.urls())
        .namespace("batch-cluster")
        .build()
        .await
        .unwrap();
    // Each master's first connection clears the namespace once: done before counting.
    let warm: Vec<String> = (0..64).map(|i| format!("warm:{i}")).collect();
    clustered.invalidate_many(&warm).await.unwrap();
    for cache in [&near, &clustered] {
        let probe = Probe::default();
        let ids: Vec<i64> = (1..=50).collect();
        people(&pool, cache, &probe, &ids).await.unwrap();
        people(&pool, cache, &probe, &ids).await.unwrap();
        cache.invalidate("person:7").await.unwrap();
        assert_eq!(
            people(&pool, cache, &probe, &ids).await.unwrap(),
            names(1..=50)
        );
        assert_eq!(probe.runs(), [ids.clone(), vec![7]]);
        assert_eq!(cache.stats().errors, 0);
    }
    // Served from process memory once a fill is kept (one is dropped when a tracking message,
    // such as one for the entries just written, arrives during its read).
    let probe = Probe::default();
    let ids: Vec<i64> = (1..=50).collect();
    for _ in 0..20 {
        people(&pool, &near, &probe, &ids).await.unwrap();
        if near.stats().near_hits >= 50 {
            break;
        }
    }
    assert!(near.stats().near_hits >= 50, "{:?}", near.stats());
    assert!(probe.runs().is_empty(), "all hits");
}

#[sqlx::test]
async fn counted_as_one_query_and_bypassed_inside_a_transaction(pool: PgPool) {
    schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();
    let probe = Probe::default();
    people(&pool, &cache, &probe, &[1, 2]).await.unwrap();
    let (got, calls) = count_calls(people(&pool, &cache, &probe, &[1, 2, 3, 4])).await;
    assert_eq!(got.unwrap(), names(1..=4));
    assert_eq!((calls.queries, calls.cache_hits), (1, 2));

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE people SET name = 'uncommitted' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    let got = in_transaction(&mut tx, &cache, &[1, 1, 2]).await.unwrap();
    assert_eq!(got[&1], "uncommitted");
    tx.rollback().await.unwrap();
    assert_eq!(cache.stats().bypassed, 1);
    let got = in_transaction(&mut pool.acquire().await.unwrap(), &cache, &[1, 2])
        .await
        .unwrap();
    assert_eq!(got[&1], "p1");
}

#[cached_query(cache = cache, batch = ids)]
#[cached_query::timed(name = "batch.timed_squares")]
async fn timed_squares(cache: &Cache, ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    Ok(ids.iter().map(|i| (*i, i * i)).collect())
}

/// `#[timed]` inside `#[cached_query(batch)]` times each execution: one per call that queried.
#[tokio::test]
async fn timed_counts_one_execution_per_call_that_queried() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let count = || {
        cached_query::timings()
            .into_iter()
            .find(|t| t.name == "batch.timed_squares")
            .map_or(0, |t| t.count)
    };
    timed_squares(&cache, &[1, 2, 3]).await.unwrap();
    timed_squares(&cache, &[1, 2, 3]).await.unwrap();
    timed_squares(&cache, &[3, 4, 5, 4]).await.unwrap();
    assert_eq!(count(), 2);
    assert_eq!(counts(&cache), (4, 5));
}

#[cached_query(cache = cache, batch = ids, invalidate = "person:<ids>")]
async fn in_transaction(
    conn: &mut PgConnection,
    cache: &Cache,
    ids: &[i64],
) -> Result<HashMap<i64, String>, sqlx::Error> {
    assert_eq!(
        ids.len(),
        ids.iter().collect::<std::collections::HashSet<_>>().len()
    );
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM people WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().collect())
}

#[cached_query(cache = cache, batch = ids, invalidate = "counter:<ids>")]
async fn counters(
    pool: &PgPool,
    cache: &Cache,
    ids: &[i32],
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT id, value FROM counters WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The stale-set stress of single reads, read through batches that mix the written counter
/// with other keys (hits and misses, present and absent).
async fn no_stale_reads(pool: PgPool, cache: Cache) {
    let turn = Arc::new(std::sync::atomic::AtomicI32::new(0));
    common::no_stale_reads(pool, cache, move |pool, cache| {
        let other = 2 + turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20;
        async move {
            let ids = if other % 2 == 0 {
                vec![other, 1]
            } else {
                vec![1, other, 1]
            };
            counters(&pool, &cache, &ids).await.unwrap()[&1]
        }
    })
    .await;
}

#[sqlx::test]
async fn no_stale_reads_through_batches_redis(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Redis, "batch-stress").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_through_batches_near_cache(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::NearCache, "batch-stress-near").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_through_batches_memory(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) = common::cache_on(common::Backend::Memory, "batch-stress-mem").await;
    no_stale_reads(pool, cache).await;
}

#[sqlx::test]
async fn no_stale_reads_through_batches_cluster(pool: PgPool) {
    schema(&pool).await;
    let (cache, _cluster) =
        common::cache_on(common::Backend::Cluster, "batch-stress-cluster").await;
    no_stale_reads(pool, cache).await;
}
