//! `refresh_ahead`: during the last seconds of an entry's freshness, a hit may be chosen to
//! run the query and store a fresh entry, so that a hot key is replaced before it expires
//! instead of making callers wait for a query after.
//!
//! - **Who.** Each hit in the window is chosen with the XFetch rule (Vattani et al., VLDB
//!   2015): chosen when `τ · −ln(u) ≥ remaining`, `u` uniform in (0, 1], `remaining` the
//!   time the entry stays fresh. `τ` is the query's measured average execution time plus a
//!   tenth of the window (the window capped at the TTL), so a refresh is likely well before
//!   expiry under steady traffic (about `τ · ln(rate · τ)` before it) and slower queries
//!   refresh earlier. Nothing is chosen outside the window.
//! - **At most one.** Each version of an entry (its `fresh_until`) is refreshed at most once
//!   per process; with leases on, once across the fleet: the refresh takes a lease of its
//!   own on that version under the entry's own stamps, kept until the version expires (a
//!   miss never waits on it). A caller chosen while it is held returns its hit. Nobody waits
//!   on a refresh. A refresh that failed is not tried again for that version.
//! - **Coherent.** The refresh stores its result with the stamps read before its query, as
//!   a miss does: an invalidation during the refresh leaves its entry stale, never served. A
//!   result that is not stored deletes the entry it would have replaced. The chosen caller
//!   returns the new value, or its hit if the query fails.

use super::Cache;
use super::call::{Site, Target};
use super::envelope;
use super::stats::Recorder;
use crate::backend::{Store, StoreError};
use crate::keyspace::{lease_key, new_token};
use crate::timing::calls;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// The entry versions (their `fresh_until`) this process refreshed or is refreshing: a
/// version is refreshed at most once here, whatever the outcome (a failed refresh is not
/// tried again before that version expires: a failing database is not hammered once per
/// chosen hit).
#[derive(Debug, Default)]
pub(crate) struct Refreshing(Mutex<Claims>);

#[derive(Debug, Default)]
struct Claims {
    /// Each entry's latest version taken.
    versions: HashMap<String, u64>,
    /// The size at which expired versions are dropped next: twice what the last sweep kept,
    /// at least `SWEEP_ABOVE` (so sweeps cost O(1) per claim, amortised).
    sweep_at: usize,
}

const SWEEP_ABOVE: usize = 1024;

impl Refreshing {
    /// Whether this process already took `version` of `entry`, or a newer one.
    fn taken(&self, entry: &str, version: u64) -> bool {
        let claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        claims.versions.get(entry).is_some_and(|v| *v >= version)
    }

    /// Takes `version` of `entry`, unless it or a newer one is taken.
    fn claim(&self, entry: &str, version: u64) -> bool {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if claims.versions.get(entry).is_some_and(|v| *v >= version) {
            return false;
        }
        if claims.versions.len() >= claims.sweep_at.max(SWEEP_ABOVE) {
            let now = envelope::now_ms();
            claims.versions.retain(|_, v| *v > now);
            claims.sweep_at = 2 * claims.versions.len();
        }
        claims.versions.insert(entry.to_owned(), version);
        true
    }
}

/// The version (`fresh_until`) of the entry `bytes` if a hit on it is chosen to refresh it:
/// an entry of `site` fresh for `ttl`, whose version this process has not refreshed yet.
pub(super) fn due(
    cache: &Cache,
    (site, ttl): (&Site, Duration),
    rec: &Recorder<'_>,
    entry: &str,
    bytes: &[u8],
) -> Option<u64> {
    if site.refresh_secs == 0 {
        return None;
    }
    let version = envelope::fresh_until(bytes)?;
    let remaining = version.saturating_sub(envelope::now_ms()) as f64 / 1000.0;
    // A window as long as the TTL (the cache's default may be shorter than the attribute's
    // window) covers the whole life.
    let window = (site.refresh_secs as f64).min(ttl.as_secs_f64());
    if remaining <= 0.0 || remaining > window {
        return None;
    }
    let tau = rec.query_time().as_secs_f64() + window / 10.0;
    let u = 1.0 - super::uniform(); // in (0, 1]
    let chosen = tau * -u.ln() >= remaining;
    (chosen && !cache.inner.refreshing.taken(entry, version)).then_some(version)
}

impl Cache {
    /// Refreshes `target`'s entry, read fresh under `stamps` as `hit` at `version`: runs
    /// `fut` and stores its result, unless that version was refreshed already (in this
    /// process, or under its refresh lease elsewhere); returns the new value, or `hit` when
    /// not refreshed or when the query failed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn refresh<T, E, F>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        target: &Target<'_, T>,
        hit: T,
        stamps: Vec<Bytes>,
        version: u64,
        fut: F,
    ) -> Result<T, E>
    where
        T: Serialize,
        F: Future<Output = Result<T, E>>,
    {
        if !self.inner.refreshing.claim(target.entry, version) {
            return Ok(hit);
        }
        if self.leasing(target.site.lease) {
            match self.refresh_lease(store, target, &stamps, version).await {
                Ok(true) => {}
                Ok(false) => return Ok(hit),
                Err(e) => {
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
        let stored = match serde_json::to_vec(&value) {
            Ok(payload) => {
                self.store_result(store, rec, target, &stamps, &value, &payload, None)
                    .await
            }
            Err(e) => {
                rec.error();
                self.warn("the result could not be serialised", &e);
                false
            }
        };
        // A newer result that was not stored (`None` with `cache_none = false`, oversized,
        // refused): the older entry must not go on being served.
        if !stored {
            self.delete_entry(store, rec, target.entry).await;
        }
        Ok(value)
    }

    /// Takes the fleet-wide refresh lease of `version` of the entry under its own `stamps`
    /// (not a result-tagged site's sequence: an unrelated invalidation must not make two
    /// processes refresh it), kept until that version expires whatever the outcome.
    async fn refresh_lease<T>(
        &self,
        store: &Store,
        target: &Target<'_, T>,
        stamps: &[Bytes],
        version: u64,
    ) -> Result<bool, StoreError> {
        let version_bytes = version.to_be_bytes();
        let scope: Vec<&[u8]> = stamps[..target.own.min(stamps.len())]
            .iter()
            .map(|s| &s[..])
            .chain([&version_bytes[..]])
            .collect();
        let key = lease_key(&self.inner.settings.namespace, target.entry, &scope);
        let left = Duration::from_millis(version.saturating_sub(envelope::now_ms()).max(1));
        self.guarded(store.lease(&key, &new_token(), left, store.until()))
            .await
    }
}
