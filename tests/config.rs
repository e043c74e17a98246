//! `Cache::from_env` rules through `Cache::from_lookup` (no process-environment mutation).

mod common;

use cached_query::{Cache, cached_query};
use common::{Logs, RedisServer, keys_under, lookup, redis_url, unique_ns};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

#[cached_query(cache = cache, skip(calls))]
async fn square(cache: &Cache, calls: &AtomicU32, n: i64) -> Result<i64, Infallible> {
    calls.fetch_add(1, SeqCst);
    Ok(n * n)
}

#[tokio::test]
async fn without_redis_url_the_memory_backend_is_used() {
    let cache = Cache::from_lookup(lookup(&[])).await.unwrap();
    assert!(format!("{cache:?}").contains("\"memory\""), "{cache:?}");
    assert_eq!(cache.namespace(), "cq");
    let calls = AtomicU32::new(0);
    square(&cache, &calls, 3).await.unwrap();
    square(&cache, &calls, 3).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test]
async fn cache_enabled_false_is_a_pass_through() {
    for off in ["false", "0", "no", "OFF"] {
        let cache = Cache::from_lookup(lookup(&[
            ("CACHE_ENABLED", off),
            ("REDIS_URL", &redis_url()),
        ]))
        .await
        .unwrap();
        assert!(format!("{cache:?}").contains("disabled"), "{cache:?}");
        let calls = AtomicU32::new(0);
        square(&cache, &calls, 3).await.unwrap();
        square(&cache, &calls, 3).await.unwrap();
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(cache.stats().misses, 2);
        cache.invalidate("anything").await.unwrap();
    }
}

#[tokio::test]
async fn namespace_and_ttl_come_from_the_environment() {
    let ns = unique_ns("env");
    let cache = Cache::from_lookup(lookup(&[
        ("REDIS_URL", &redis_url()),
        ("CACHE_NAMESPACE", &ns),
        ("CACHE_DEFAULT_TTL", "42"),
    ]))
    .await
    .unwrap();
    let calls = AtomicU32::new(0);
    square(&cache, &calls, 5).await.unwrap();
    let keys = keys_under(&redis_url(), &ns).await;
    let entry = keys
        .iter()
        .find(|k| k.contains(":e:"))
        .expect("entry under the namespace");
    let mut conn = common::raw(&redis_url()).await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=42).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn bad_values_name_the_variable_and_value() {
    let cases = [
        (
            ("CACHE_DEFAULT_TTL", "abc"),
            "CACHE_DEFAULT_TTL=\"abc\": expected a whole number ≥ 1",
        ),
        (
            ("CACHE_DEFAULT_TTL", "0"),
            "CACHE_DEFAULT_TTL=\"0\": expected a whole number ≥ 1",
        ),
        (
            ("CACHE_DEFAULT_TTL", "-5"),
            "CACHE_DEFAULT_TTL=\"-5\": expected a whole number ≥ 1",
        ),
        (
            ("CACHE_NEAR_CAPACITY", "lots"),
            "CACHE_NEAR_CAPACITY=\"lots\": expected a whole number ≥ 1",
        ),
        (
            ("CACHE_ENABLED", "maybe"),
            "CACHE_ENABLED=\"maybe\": expected true or false",
        ),
        (
            ("CACHE_LEASES", "sometimes"),
            "CACHE_LEASES=\"sometimes\": expected true or false",
        ),
        (
            ("REDIS_RESPONSE_TIMEOUT_MS", "fast"),
            "REDIS_RESPONSE_TIMEOUT_MS=\"fast\": expected a whole number ≥ 1",
        ),
        (
            ("CACHE_NAMESPACE", "has space"),
            "namespace=\"has space\": expected 1 to 64 printable ASCII",
        ),
        (
            ("REDIS_RESPONSE_TIMEOUT_MS", "7200000"),
            "response_timeout=\"7200s\": expected at most one hour",
        ),
        (
            ("REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379"),
            "REDIS_SENTINEL_MASTER=\"\": expected the master's name",
        ),
        (
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            "REDIS_SENTINEL_URLS=\"\": expected Sentinel URLs",
        ),
    ];
    for ((name, value), expected) in cases {
        let err = Cache::from_lookup(lookup(&[(name, value)]))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with(expected), "{err}");
    }
}

#[tokio::test]
async fn redis_password_is_injected_and_never_shown() {
    let server = RedisServer::start_with(&["--requirepass", "s3cr3t-pw"]);
    let cache = Cache::from_lookup(lookup(&[
        ("REDIS_URL", &server.url()),
        ("REDIS_PASSWORD", "s3cr3t-pw"),
    ]))
    .await
    .unwrap();
    let calls = AtomicU32::new(0);
    square(&cache, &calls, 4).await.unwrap();
    square(&cache, &calls, 4).await.unwrap();
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.errors),
        (1, 0),
        "authenticated: {stats:?}"
    );
    assert!(!format!("{cache:?}").contains("s3cr3t"));

    // Wrong password: fail-open, counted, and the password shows up nowhere.
    let wrong = Cache::from_lookup(lookup(&[
        ("REDIS_URL", &server.url()),
        ("REDIS_PASSWORD", "nope-pw"),
    ]))
    .await
    .unwrap();
    square(&wrong, &calls, 4).await.unwrap();
    assert_eq!(wrong.stats().errors, 1);
    let err = wrong.invalidate("x").await.unwrap_err();
    assert!(
        !format!("{err} {err:?} {wrong:?}").contains("nope-pw"),
        "{err}"
    );

    let builder = Cache::builder().redis("redis://:s3cr3t-pw@127.0.0.1:1");
    assert!(!format!("{builder:?}").contains("s3cr3t"), "{builder:?}");
}

#[tokio::test]
async fn passwords_never_reach_the_logs() {
    let logs = Logs::capture();

    let mut server = RedisServer::start_with(&["--requirepass", "right-pw"]);
    for password in ["hunter2-wrong", "right-pw"] {
        let cache = Cache::from_lookup(lookup(&[
            ("REDIS_URL", &server.url()),
            ("REDIS_PASSWORD", password),
        ]))
        .await
        .unwrap();
        let calls = AtomicU32::new(0);
        square(&cache, &calls, 2).await.unwrap();
        let _ = cache.invalidate("t").await;
        if password == "right-pw" {
            server.kill(); // now every operation fails and is logged
            for n in 0..5 {
                square(&cache, &calls, n).await.unwrap();
            }
            assert!(cache.invalidate("t").await.is_err());
        }
    }
    assert!(
        !logs.mine("WARN").is_empty(),
        "the failures were logged: {}",
        logs.all()
    );
    let everything = logs.all();
    assert!(
        !everything.contains("hunter2") && !everything.contains("right-pw"),
        "{everything}"
    );
}
