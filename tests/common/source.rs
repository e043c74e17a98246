//! A database stand-in whose value, availability and timing a test sets: the queries of the
//! lease, refresh and stale-value tests read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::SeqCst};
use tokio::sync::{Notify, Semaphore};

/// The value `query` returns (plus the id), how many queries ran, and the next `holds`
/// queries stop after reading the value (telling `entered`) until `go` lets them on.
pub struct Source {
    pub value: AtomicI64,
    pub calls: AtomicU32,
    pub holds: AtomicU32,
    pub entered: Notify,
    pub go: Semaphore,
    /// A held query fails once let on.
    pub fail_held: AtomicBool,
    /// Every query fails.
    pub fail: AtomicBool,
}

impl Source {
    pub fn new(value: i64, holds: u32) -> Arc<Source> {
        Arc::new(Source {
            value: AtomicI64::new(value),
            calls: AtomicU32::new(0),
            holds: AtomicU32::new(holds),
            entered: Notify::new(),
            go: Semaphore::new(0),
            fail_held: AtomicBool::new(false),
            fail: AtomicBool::new(false),
        })
    }

    /// One query of item `id`: reads the value, then holds if asked, then fails if asked.
    pub async fn query(&self, id: i64) -> Result<i64, String> {
        let value = self.value.load(SeqCst) + id;
        self.calls.fetch_add(1, SeqCst);
        let held = self
            .holds
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if held {
            self.entered.notify_one();
            self.go.acquire().await.unwrap().forget();
        }
        if self.fail.load(SeqCst) || (held && self.fail_held.load(SeqCst)) {
            return Err(format!("query of item {id} failed"));
        }
        Ok(value)
    }
}
