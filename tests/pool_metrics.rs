//! `monitor_pool` exports a real PostgreSQL pool's occupancy as gauges. One test: the metrics
//! recorder is global to this binary.

use cached_query::{POOL_SAMPLE_PERIOD, monitor_pool};
use metrics_exporter_prometheus::PrometheusBuilder;
use sqlx::PgPool;
use std::time::Duration;

#[sqlx::test]
async fn pool_gauges_follow_the_pool(pool: PgPool) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .min_connections(0)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let gauge = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    let in_use = r#"cached_query_pool_connections{pool="main",state="in_use"}"#;
    let idle = r#"cached_query_pool_connections{pool="main",state="idle"}"#;
    let max = r#"cached_query_pool_max_connections{pool="main"}"#;
    // Waits for the sampler to show `want` (it samples every 500 ms: the documented bound).
    let seen = |series: &'static str, want: f64| {
        let handle = handle.clone();
        async move {
            let start = std::time::Instant::now();
            while gauge(&handle.render(), series) != Some(want) {
                assert!(
                    start.elapsed() <= POOL_SAMPLE_PERIOD * 4,
                    "{series} = {want} not seen:\n{}",
                    handle.render()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    let monitor = monitor_pool("main", &small);
    let held = [
        small.acquire().await.unwrap(),
        small.acquire().await.unwrap(),
        small.acquire().await.unwrap(),
    ];
    seen(in_use, 3.0).await;
    seen(max, 4.0).await;
    drop(held);
    seen(in_use, 0.0).await;
    seen(idle, 3.0).await;

    // Dropped: sampling stops, the gauges keep their last values.
    drop(monitor);
    let _again = small.acquire().await.unwrap();
    tokio::time::sleep(POOL_SAMPLE_PERIOD * 2).await;
    assert_eq!(gauge(&handle.render(), in_use), Some(0.0));
}
