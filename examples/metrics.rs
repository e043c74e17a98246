//! `#[timed]` and cache counters exported in Prometheus text format (feature `metrics`).
//!
//! `cargo run --example metrics --features metrics`

use cached_query::{Cache, cached_query, timed};
use metrics_exporter_prometheus::PrometheusBuilder;

#[cached_query(cache = cache, ttl = 60)]
#[timed(name = "users.by_id", threshold_ms = 1)]
async fn user_name(cache: &Cache, id: i64) -> Result<String, std::io::Error> {
    tokio::time::sleep(std::time::Duration::from_millis(2)).await; // a slow "query"
    Ok(format!("user {id}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let cache = Cache::builder().memory().build().await?;
    for id in [1, 2, 1, 1, 2, 3] {
        user_name(&cache, id).await?;
    }
    // What a `GET /metrics` handler returns:
    print!("{}", prometheus.render());
    Ok(())
}
