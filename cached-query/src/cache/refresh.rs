//! `refresh_ahead`: during the last seconds of an entry's freshness, a hit may be chosen to
//! run the query and store a fresh entry, so that a hot key is replaced before it expires
//! instead of making callers wait for a query after.
//!
//! - **Who.** Each hit in the window is chosen with the XFetch rule (Vattani et al., VLDB
//!   2015): chosen when `τ · −ln(u) ≥ remaining`, `u` uniform in (0, 1], `remaining` the
//!   time the entry stays fresh. `τ` is the query's measured average execution time plus a
//!   tenth of the window, so a refresh is likely well before expiry under steady traffic
//!   (about `τ · ln(rate · τ)` before it) and slower queries refresh earlier. Nothing is
//!   chosen outside the window.
//! - **At most one.** One refresh per entry runs in a process; with leases on, one per entry
//!   across the fleet (the refresh takes the entry's lease under the stamps it read; a
//!   caller that finds it held returns its hit). Nobody waits on a refresh: a caller chosen
//!   while one runs gets the hit.
//! - **Coherent.** The refresh stores its result with the stamps read before its query, as
//!   a miss does: an invalidation during the refresh leaves its entry stale, never served.
//!   The chosen caller returns the new value, or its hit if the query fails.

use super::Cache;
use super::call::{Site, Target};
use super::envelope;
use super::lease::Taken;
use super::stats::Recorder;
use crate::backend::Store;
use crate::keyspace::lease_key;
use crate::timing::calls;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;

/// The entries being refreshed by this process.
#[derive(Debug, Default)]
pub(crate) struct Refreshing(Mutex<HashSet<String>>);

/// One entry's refresh in this process; ends when dropped.
struct Claim<'a> {
    set: &'a Refreshing,
    entry: String,
}

impl Refreshing {
    fn claim(&self, entry: &str) -> Option<Claim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(entry.to_owned()).then(|| Claim {
            set: self,
            entry: entry.to_owned(),
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.entry);
    }
}

/// Whether a hit on `bytes` (an entry of `site`) is chosen to refresh it.
pub(super) fn due(site: &Site, rec: &Recorder<'_>, bytes: &[u8]) -> bool {
    if site.refresh_secs == 0 {
        return false;
    }
    let Some(until) = envelope::fresh_until(bytes) else {
        return false;
    };
    let remaining = until.saturating_sub(envelope::now_ms()) as f64 / 1000.0;
    let window = site.refresh_secs as f64;
    if remaining <= 0.0 || remaining > window {
        return false;
    }
    let tau = rec.query_time().as_secs_f64() + window / 10.0;
    // u in (0, 1] from 53 random bits.
    let u = ((getrandom::u64().unwrap_or(0) >> 11) + 1) as f64 / (1u64 << 53) as f64;
    tau * -u.ln() >= remaining
}

impl Cache {
    /// Refreshes `target`'s entry, read fresh under `stamps` as `hit`: runs `fut` and stores
    /// its result, unless another refresh of it runs (in this process, or under the lease
    /// elsewhere); returns the new value, or `hit` when not refreshed or when the query
    /// failed.
    pub(super) async fn refresh<T, E, F>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        target: &Target<'_, T>,
        hit: T,
        stamps: Vec<Bytes>,
        fut: F,
    ) -> Result<T, E>
    where
        T: Serialize,
        F: Future<Output = Result<T, E>>,
    {
        let Some(_claim) = self.inner.refreshing.claim(target.entry) else {
            return Ok(hit);
        };
        let mut lease = None;
        if self.leasing(target.site.lease) {
            let key = lease_key(&self.inner.settings.namespace, target.entry, &stamps);
            match self.take_lease(store, key, store.until()).await {
                Taken::Held(held) => lease = Some(held),
                Taken::Busy => return Ok(hit),
                Taken::Failed(e, _) => {
                    rec.error();
                    self.warn("taking a refresh lease failed", &e);
                    return Ok(hit);
                }
            }
        }
        rec.refresh();
        let started = std::time::Instant::now();
        let result = calls::execute(fut).await;
        rec.query_took(started.elapsed());
        let Ok(value) = result else {
            if let Some(suppressed) = self.inner.warnings.permit() {
                tracing::warn!(
                    query = target.site.name,
                    suppressed,
                    "cached-query: a refresh_ahead query failed; the cached value is returned"
                );
            }
            return Ok(hit);
        };
        match serde_json::to_vec(&value) {
            Ok(payload) => {
                self.store_result(store, rec, target, &stamps, &value, &payload, lease)
                    .await;
            }
            Err(e) => {
                rec.error();
                self.warn("the result could not be serialised", &e);
            }
        }
        Ok(value)
    }
}
