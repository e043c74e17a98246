//! Keys, tags, TTLs, decoding and round trips, against a real Redis.

mod common;

use cached_query::{Cache, cached_query};
use common::{RedisServer, keys_under, raw, redis_cache, redis_url, unique_ns};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: i64,
    name: String,
}

#[cached_query(cache = cache, ttl = 120, invalidate = ["user:<id>", "users"], skip(calls))]
async fn load_user(
    cache: &Cache,
    calls: &AtomicU32,
    id: i64,
    token: &str,
) -> Result<User, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok(User {
        id,
        name: format!("user {id} ({} chars of token)", token.len()),
    })
}

const SECRET: &str = "hunter2-SUPER-SECRET-TOKEN";

#[tokio::test]
async fn miss_then_hit_with_namespaced_opaque_keys() {
    let ns = unique_ns("basic");
    let cache = redis_cache(&redis_url(), &ns).await;
    let calls = AtomicU32::new(0);
    let first = load_user(&cache, &calls, 4242, SECRET).await.unwrap();
    let second = load_user(&cache, &calls, 4242, SECRET).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(calls.load(SeqCst), 1);

    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.errors), (1, 1, 0));
    let per = &stats.queries[concat!(module_path!(), "::load_user")];
    assert_eq!((per.hits, per.misses), (1, 1));

    let keys = keys_under(&redis_url(), &ns).await;
    // one entry, the generation, the invalidation sequence, the server identity and two tags
    assert_eq!(keys.len(), 6, "{keys:?}");
    for k in &keys {
        assert!(k.starts_with(&format!("{ns}:")), "{k}");
        let rest = &k[ns.len()..];
        assert!(
            !rest.contains("4242") && !rest.contains("hunter2") && !rest.contains("user"),
            "{k}"
        );
    }
    let entry = keys.iter().find(|k| k.contains(":e:")).unwrap();
    let mut conn = raw(&redis_url()).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 120_000, "entry TTL {pttl} ms");
}

#[tokio::test]
async fn invalidating_a_tag_drops_only_its_entries() {
    let ns = unique_ns("tags");
    let cache = redis_cache(&redis_url(), &ns).await;
    let calls = AtomicU32::new(0);
    for id in [1, 2] {
        load_user(&cache, &calls, id, "t").await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 2);

    cache.invalidate("user:1").await.unwrap();
    load_user(&cache, &calls, 1, "t").await.unwrap();
    load_user(&cache, &calls, 2, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 3, "only user 1 ran again");

    cache.invalidate_many(["users"]).await.unwrap();
    load_user(&cache, &calls, 1, "t").await.unwrap();
    load_user(&cache, &calls, 2, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 5, "the shared tag covered both");

    cache.clear().await.unwrap();
    load_user(&cache, &calls, 2, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 6, "clear() covers everything");
    load_user(&cache, &calls, 2, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 6);
}

#[tokio::test]
async fn a_hit_is_one_mget_and_an_invalidation_one_script_whatever_the_entry_count() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "rt").await;
    let calls = AtomicU32::new(0);
    for id in 0..500 {
        load_user(&cache, &calls, id, "t").await.unwrap();
    }
    server.cli(&["CONFIG", "RESETSTAT"]);
    for id in 0..20 {
        load_user(&cache, &calls, id, "t").await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 500, "all hits");
    assert_eq!(server.command_calls("mget"), 20, "one round trip per hit");
    assert_eq!(server.command_calls("get") + server.command_calls("set"), 0);

    // One script call: it reads and advances the invalidation sequence (GET, SET) and writes
    // the tag's new token (SET).
    server.cli(&["CONFIG", "RESETSTAT"]);
    cache.invalidate("users").await.unwrap(); // covers 500 entries
    assert_eq!(server.command_calls("eval"), 1, "one round trip");
    assert_eq!(server.command_calls("set"), 2);
    let info = server.cli(&["INFO", "commandstats"]);
    let mut commands: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_config|"))
        .map(|l| l.split(':').next().unwrap_or_default())
        .collect();
    commands.sort_unstable();
    assert_eq!(
        commands,
        ["cmdstat_eval", "cmdstat_get", "cmdstat_set"],
        "nothing per entry"
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    cache.clear().await.unwrap();
    assert_eq!(server.command_calls("eval"), 1);
    assert_eq!(server.command_calls("set"), 2);
    load_user(&cache, &calls, 3, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 501, "cleared");
}

#[tokio::test]
async fn evicted_tag_or_generation_keys_cause_misses_never_stale_hits() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "ev").await;
    let calls = AtomicU32::new(0);
    load_user(&cache, &calls, 1, "t").await.unwrap();
    load_user(&cache, &calls, 1, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);

    // Delete every tag key, as allkeys-lru eviction could.
    for k in keys_under(&server.url(), "ev")
        .await
        .iter()
        .filter(|k| k.starts_with("ev:t:"))
    {
        server.cli(&["DEL", k]);
    }
    load_user(&cache, &calls, 1, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 2, "a vanished tag is a miss");
    load_user(&cache, &calls, 1, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 2, "and the recreated tag is stable");

    server.cli(&["DEL", "ev:g"]);
    load_user(&cache, &calls, 1, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 3, "a vanished generation is a miss");
}

#[tokio::test]
async fn undecodable_entries_are_counted_misses_that_heal() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "bad").await;
    let calls = AtomicU32::new(0);
    let good = load_user(&cache, &calls, 9, "t").await.unwrap();
    let entry = keys_under(&server.url(), "bad")
        .await
        .into_iter()
        .find(|k| k.contains(":e:"))
        .unwrap();
    let mut conn = raw(&server.url()).await;
    let garbage: [&[u8]; 3] = [
        b"\x00\xffnot an envelope",
        b"\xc9\x00\x00{}",
        b"\xc9\x01\x07\x10",
    ];
    for (i, bytes) in garbage.into_iter().enumerate() {
        let _: () = redis::cmd("SET")
            .arg(&entry)
            .arg(bytes)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(load_user(&cache, &calls, 9, "t").await.unwrap(), good);
        assert_eq!(cache.stats().decode_errors, i as u64 + 1);
        // overwritten: the next call is a hit
        assert_eq!(load_user(&cache, &calls, 9, "t").await.unwrap(), good);
    }
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!(cache.stats().errors, 0);
}

#[cached_query(cache = cache, skip(calls))]
async fn find(cache: &Cache, calls: &AtomicU32, id: i64) -> Result<Option<String>, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok((id > 0).then(|| format!("row {id}")))
}

#[cached_query(cache = cache, skip(calls), cache_none = false)]
async fn find_positive(
    cache: &Cache,
    calls: &AtomicU32,
    id: i64,
) -> Result<Option<String>, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok((id > 0).then(|| format!("row {id}")))
}

#[tokio::test]
async fn none_is_cached_unless_cache_none_is_false() {
    let cache = redis_cache(&redis_url(), &unique_ns("none")).await;
    let calls = AtomicU32::new(0);
    assert_eq!(find(&cache, &calls, -1).await.unwrap(), None);
    assert_eq!(find(&cache, &calls, -1).await.unwrap(), None);
    assert_eq!(calls.load(SeqCst), 1, "negative caching by default");

    let calls = AtomicU32::new(0);
    assert_eq!(find_positive(&cache, &calls, -1).await.unwrap(), None);
    assert_eq!(find_positive(&cache, &calls, -1).await.unwrap(), None);
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(
        find_positive(&cache, &calls, 5).await.unwrap().as_deref(),
        Some("row 5")
    );
    assert_eq!(
        find_positive(&cache, &calls, 5).await.unwrap().as_deref(),
        Some("row 5")
    );
    assert_eq!(calls.load(SeqCst), 3, "Some is still cached");
}

#[cached_query(cache = cache, skip(calls))]
async fn flaky(cache: &Cache, calls: &AtomicU32, fail: bool) -> Result<u32, String> {
    let n = calls.fetch_add(1, SeqCst);
    if fail {
        Err(format!("failure {n}"))
    } else {
        Ok(n)
    }
}

#[tokio::test]
async fn errors_are_never_cached() {
    let cache = redis_cache(&redis_url(), &unique_ns("err")).await;
    let calls = AtomicU32::new(0);
    assert_eq!(flaky(&cache, &calls, true).await, Err("failure 0".into()));
    assert_eq!(flaky(&cache, &calls, true).await, Err("failure 1".into()));
    assert_eq!(cache.stats().misses, 2);
}

#[cached_query(cache = cache, skip(calls))]
async fn parse<T>(cache: &Cache, calls: &AtomicU32, text: &str) -> Result<T, String>
where
    T: std::str::FromStr + Serialize + serde::de::DeserializeOwned,
{
    calls.fetch_add(1, SeqCst);
    text.parse::<T>().map_err(|_| "parse".to_owned())
}

#[tokio::test]
async fn generic_type_parameters_are_part_of_the_key() {
    let cache = redis_cache(&redis_url(), &unique_ns("gen")).await;
    let calls = AtomicU32::new(0);
    assert_eq!(parse::<i64>(&cache, &calls, "42").await.unwrap(), 42);
    assert_eq!(parse::<f64>(&cache, &calls, "42").await.unwrap(), 42.0);
    assert_eq!(parse::<i64>(&cache, &calls, "42").await.unwrap(), 42);
    assert_eq!(calls.load(SeqCst), 2);
}

struct Repo {
    cache: Cache,
    tenant: String,
    calls: AtomicU32,
}

impl Repo {
    /// Depends on `self.tenant`, so it is in the key.
    #[cached_query(cache = self.cache, key = (&self.tenant, id), invalidate = "tenant:<self.tenant>:<id>")]
    async fn item(&self, id: i64) -> Result<String, Infallible> {
        self.calls.fetch_add(1, SeqCst);
        Ok(format!("{}/{id}", self.tenant))
    }
}

#[tokio::test]
async fn methods_use_their_own_cache_and_key() {
    let cache = redis_cache(&redis_url(), &unique_ns("repo")).await;
    let a = Repo {
        cache: cache.clone(),
        tenant: "a".into(),
        calls: AtomicU32::new(0),
    };
    let b = Repo {
        cache: cache.clone(),
        tenant: "b".into(),
        calls: AtomicU32::new(0),
    };
    assert_eq!(a.item(1).await.unwrap(), "a/1");
    assert_eq!(b.item(1).await.unwrap(), "b/1", "tenant is part of the key");
    assert_eq!(a.item(1).await.unwrap(), "a/1");
    assert_eq!(a.calls.load(SeqCst), 1);
    cache.invalidate("tenant:a:1").await.unwrap();
    a.item(1).await.unwrap();
    b.item(1).await.unwrap();
    assert_eq!((a.calls.load(SeqCst), b.calls.load(SeqCst)), (2, 1));
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let url = redis_url();
    let one = redis_cache(&url, &unique_ns("iso-a")).await;
    let two = redis_cache(&url, &unique_ns("iso-b")).await;
    let calls = AtomicU32::new(0);
    load_user(&one, &calls, 1, "t").await.unwrap();
    load_user(&two, &calls, 1, "t").await.unwrap();
    assert_eq!(calls.load(SeqCst), 2, "no sharing across namespaces");
    two.clear().await.unwrap();
    two.invalidate("user:1").await.unwrap();
    load_user(&one, &calls, 1, "t").await.unwrap();
    assert_eq!(
        calls.load(SeqCst),
        2,
        "clearing one namespace leaves the other"
    );
}

#[cached_query(cache = cache, skip(calls))]
async fn big(cache: &Cache, calls: &AtomicU32, len: usize) -> Result<String, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok("x".repeat(len))
}

#[tokio::test]
async fn oversized_values_are_returned_but_not_stored() {
    let cache = Cache::builder()
        .redis(&redis_url())
        .namespace(&unique_ns("big"))
        .max_value_size(1000)
        .build()
        .await
        .unwrap();
    let calls = AtomicU32::new(0);
    assert_eq!(big(&cache, &calls, 5000).await.unwrap().len(), 5000);
    assert_eq!(big(&cache, &calls, 5000).await.unwrap().len(), 5000);
    big(&cache, &calls, 10).await.unwrap();
    big(&cache, &calls, 10).await.unwrap();
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(cache.stats().oversized, 2);
}

#[tokio::test]
async fn calls_are_spread_over_the_configured_connections() {
    let server = RedisServer::start();
    let connected = |server: &RedisServer| -> u32 {
        let info = server.cli(&["INFO", "clients"]);
        let line = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .unwrap();
        line.trim().parse::<u32>().unwrap() - 1 // redis-cli itself
    };
    let cache = Cache::builder()
        .redis(&server.url())
        .namespace("spread")
        .redis_connections(3)
        .build()
        .await
        .unwrap();
    assert_eq!(connected(&server), 0, "connections are made lazily");
    let calls = AtomicU32::new(0);
    for _ in 0..12 {
        load_user(&cache, &calls, 1, SECRET).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(connected(&server), 3);
    let err = Cache::builder()
        .redis(&server.url())
        .redis_connections(0)
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("redis_connections"), "{err}");
}

/// Stamps are read from Redis, so anything may be there: tag and generation keys holding
/// values of every length. A value that can be a stamp (1 to 255 bytes) acts as one; an empty
/// or longer one makes every call a miss, counted, never a panic and never a hit under it.
#[tokio::test]
async fn stamp_keys_holding_garbage_of_any_length() {
    let ns = unique_ns("garbage");
    let url = redis_url();
    let cache = redis_cache(&url, &ns).await;
    let calls = AtomicU32::new(0);
    load_user(&cache, &calls, 1, "t").await.unwrap();
    let stamp_keys: Vec<String> = keys_under(&url, &ns)
        .await
        .into_iter()
        .filter(|k| k.contains(":t:") || k.ends_with(":g"))
        .collect();
    assert_eq!(
        stamp_keys.len(),
        3,
        "generation and two tags: {stamp_keys:?}"
    );
    let mut conn = raw(&url).await;
    for key in &stamp_keys {
        for len in [0usize, 1, 16, 255, 256, 1000, 100_000] {
            let garbage = vec![b'x' ^ (len as u8); len];
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(&garbage)
                .query_async(&mut conn)
                .await
                .unwrap();
            let (before, errors) = (calls.load(SeqCst), cache.stats().decode_errors);
            for _ in 0..2 {
                let user = load_user(&cache, &calls, 1, "t").await.unwrap();
                assert_eq!(user.id, 1);
            }
            let ran = calls.load(SeqCst) - before;
            if (1..=255).contains(&len) {
                assert_eq!(ran, 1, "{key} = {len} bytes: a new stamp, then a hit");
            } else {
                assert_eq!(ran, 2, "{key} = {len} bytes: never served from the cache");
                assert!(cache.stats().decode_errors > errors, "counted");
            }
        }
        // Gone (as after an eviction): a fresh token, and the next key is tested alone.
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("DEL")
        .arg(&stamp_keys)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[cached_query(cache = cache, skip(calls))]
async fn scaled(cache: &Cache, calls: &AtomicU32, x: Option<f64>) -> Result<String, String> {
    calls.fetch_add(1, SeqCst);
    Ok(format!("{x:?}"))
}

/// serde_json writes NaN and the infinities as `null`: as keys they would share one entry
/// with each other and with `None`. They run uncached instead, each counted as an error.
#[tokio::test]
async fn non_finite_floats_run_uncached_and_never_share_an_entry() {
    let cache = redis_cache(&redis_url(), &unique_ns("floats")).await;
    let calls = AtomicU32::new(0);
    assert_eq!(scaled(&cache, &calls, None).await.unwrap(), "None");
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for _ in 0..2 {
            let got = scaled(&cache, &calls, Some(x)).await.unwrap();
            assert_eq!(got, format!("{:?}", Some(x)));
        }
    }
    assert_eq!(scaled(&cache, &calls, None).await.unwrap(), "None");
    let stats = cache.stats();
    assert_eq!(calls.load(SeqCst), 1 + 6, "{stats:?}");
    assert_eq!((stats.errors, stats.hits), (6, 1), "{stats:?}");
}
