//! The `metrics` feature: latency histograms, hit/miss/error counters and retries per query.
//! One test: the recorder is global to this binary.

mod common;

use cached_query::{Cache, cached_query, retry, timed};
use metrics_exporter_prometheus::PrometheusBuilder;

#[cached_query(cache = cache, name = "metrics.lookup")]
#[timed(name = "metrics.lookup.query", threshold_ms = 0)]
async fn lookup(cache: &Cache, id: i64) -> Result<i64, String> {
    tokio::task::yield_now().await;
    Ok(id)
}

/// Every attempt terminates its own backend (a real transient error).
#[retry(attempts = 3, backoff_ms = 0, max_backoff_ms = 0)]
async fn terminated(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(pool)
        .await
        .map(drop)
}

#[tokio::test]
async fn latencies_and_cache_counters_are_exported() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let cache = Cache::builder().memory().build().await.unwrap();
    for id in [1, 1, 1, 2] {
        lookup(&cache, id).await.unwrap();
    }
    let text = handle.render();
    let value = |metric: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(metric))
            .unwrap_or_else(|| panic!("{metric} missing in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("cached_query_cache_hits_total{query=\"metrics.lookup\"}"),
        2.0
    );
    assert_eq!(
        value("cached_query_cache_misses_total{query=\"metrics.lookup\"}"),
        2.0
    );
    // Only the two executed queries reach the inner #[timed].
    assert_eq!(
        value("cached_query_duration_seconds_count{query=\"metrics.lookup.query\"}"),
        2.0
    );
    assert_eq!(
        value("cached_query_slow_total{query=\"metrics.lookup.query\"}"),
        2.0
    );

    // Two retries of three attempts: counted once per retry.
    let pool = sqlx::PgPool::connect(&common::database_url())
        .await
        .unwrap();
    terminated(&pool).await.unwrap_err();
    let text = handle.render();
    let retries = text
        .lines()
        .find(|l| l.starts_with("cached_query_retries_total{query=\"metrics::terminated\"}"))
        .unwrap_or_else(|| panic!("no retries in:\n{text}"));
    assert!(retries.ends_with(" 2"), "{retries}");
}
