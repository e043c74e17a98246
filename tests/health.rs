//! `Health::check`: pool utilisation from a real PostgreSQL pool, p95 from `#[timed]`
//! queries, the cache's error rate with a real Redis killed; only what is strictly over its
//! threshold is reported.

mod common;

use cached_query::{Breach, Cache, Health, cached_query, pool_status, timed};
use common::{RedisServer, unique_ns};
use sqlx::PgPool;
use std::time::Duration;

#[timed(name = "health.slow")]
async fn slow(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_sleep(0.03)")
        .execute(pool)
        .await
        .map(drop)
}

#[sqlx::test]
async fn a_pool_over_its_threshold_is_a_breach(pool: PgPool) {
    let cache = Cache::builder().memory().build().await.unwrap();
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let health = Health::default();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(small.acquire().await.unwrap());
    }
    // 4 of 5: exactly 80 %, not over.
    assert_eq!(
        health.check(&cache, &[("main", pool_status(&small))]),
        vec![]
    );
    held.push(small.acquire().await.unwrap());
    let breaches = health.check(&cache, &[("main", pool_status(&small))]);
    assert_eq!(
        breaches,
        vec![Breach::Pool {
            pool: "main".into(),
            utilisation: 1.0,
            threshold: 0.8
        }]
    );
    assert_eq!(
        breaches[0].to_string(),
        "pool main: 100 % of its connections in use (threshold 80 %)"
    );
    drop(held);
    let lax = health.pool_utilisation(1.0);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(small.acquire().await.unwrap());
    }
    assert_eq!(lax.check(&cache, &[("main", pool_status(&small))]), vec![]);
}

#[sqlx::test]
async fn a_slow_timed_query_is_a_breach(pool: PgPool) {
    let cache = Cache::builder().memory().build().await.unwrap();
    for _ in 0..5 {
        slow(&pool).await.unwrap();
    }
    let breaches = Health::default()
        .p95(Duration::from_millis(10))
        .check(&cache, &[]);
    let slow: Vec<_> = breaches
        .iter()
        .filter(|b| matches!(b, Breach::P95 { query, .. } if query == "health.slow"))
        .collect();
    assert_eq!(slow.len(), 1, "{breaches:?}");
    let Breach::P95 { p95, threshold, .. } = slow[0] else {
        unreachable!()
    };
    assert!(*p95 >= Duration::from_millis(30), "{p95:?}");
    assert_eq!(*threshold, Duration::from_millis(10));
    // Under the default 500 ms: healthy.
    assert!(
        !Health::default()
            .check(&cache, &[])
            .iter()
            .any(|b| matches!(b, Breach::P95 { query, .. } if query == "health.slow"))
    );
}

#[cached_query(cache = cache, ttl = 60)]
async fn value(cache: &Cache, id: i64) -> Result<i64, String> {
    Ok(id)
}

/// Redis killed: every call is a cache error, the error rate is 100 % of the calls since.
#[tokio::test]
async fn cache_errors_over_the_threshold_are_a_breach() {
    let mut server = RedisServer::start();
    let cache = common::fail_fast(&server.url(), &unique_ns("health"))
        .build()
        .await
        .unwrap();
    assert_eq!(Health::default().check(&cache, &[]), vec![], "no calls yet");
    for id in 0..20 {
        value(&cache, id).await.unwrap();
    }
    assert_eq!(Health::default().check(&cache, &[]), vec![]);
    server.kill();
    for id in 0..2 {
        value(&cache, id).await.unwrap();
    }
    let stats = cache.stats();
    let rate = stats.errors as f64 / (stats.hits + stats.misses) as f64;
    assert!(rate > 0.05, "{stats:?}");
    assert_eq!(
        Health::default().check(&cache, &[]),
        vec![Breach::ErrorRate {
            rate,
            threshold: 0.05
        }]
    );
    assert_eq!(Health::default().error_rate(0.5).check(&cache, &[]), vec![]);
}
