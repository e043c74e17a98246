//! `monitor_pool`: a pool's occupancy as gauges, sampled in the background.

use super::db::pool_status;
use std::time::Duration;

/// How often [`monitor_pool`] samples.
pub const POOL_SAMPLE_PERIOD: Duration = Duration::from_millis(500);

/// Samples `pool` every [`POOL_SAMPLE_PERIOD`] (500 ms), at once first, into the gauges
/// `cached_query_pool_connections{pool = name, state = "idle" | "in_use"}` and
/// `cached_query_pool_max_connections{pool = name}`, until the returned guard is dropped.
/// Sampling reads the pool's counters only: it never takes a connection or waits on the pool.
///
/// # Panics
///
/// Outside a Tokio runtime (the sampler is a task on it).
#[must_use = "sampling stops when the guard is dropped"]
pub fn monitor_pool<DB: sqlx::Database>(name: &str, pool: &sqlx::Pool<DB>) -> PoolMonitor {
    let runtime = tokio::runtime::Handle::try_current()
        .expect("cached_query::monitor_pool must be called inside a Tokio runtime");
    let (name, pool) = (name.to_owned(), pool.clone());
    let task = runtime.spawn(async move {
        let idle = metrics::gauge!("cached_query_pool_connections", "pool" => name.clone(), "state" => "idle");
        let in_use = metrics::gauge!("cached_query_pool_connections", "pool" => name.clone(), "state" => "in_use");
        let max = metrics::gauge!("cached_query_pool_max_connections", "pool" => name);
        let mut tick = tokio::time::interval(POOL_SAMPLE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let status = pool_status(&pool);
            idle.set(f64::from(status.idle));
            in_use.set(f64::from(status.in_use));
            max.set(f64::from(status.max));
        }
    });
    PoolMonitor { task }
}

/// Stops [`monitor_pool`]'s sampling when dropped (the gauges keep their last values).
#[derive(Debug)]
pub struct PoolMonitor {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PoolMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
