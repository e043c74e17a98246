//! Hit/miss/error counters, in total and per query name.

use super::span::{CallSpan, Outcome};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// A snapshot of a cache's counters since it was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CacheStats {
    /// Calls answered without running their query: cache hits, and callers that shared
    /// another caller's in-flight query (single-flight).
    pub hits: u64,
    /// Of `hits`, those answered by the near cache without a Redis round trip.
    pub near_hits: u64,
    /// Invalidation messages the near cache received from Redis (each names one or more keys
    /// that changed, expired or were evicted).
    pub near_invalidations: u64,
    /// Times the near cache dropped everything because messages may have been missed: its
    /// connection was lost, or Redis was flushed.
    pub near_resets: u64,
    /// Calls that ran their query.
    pub misses: u64,
    /// Calls whose cache step failed or was skipped because Redis was unavailable
    /// (the query still ran; see the README's failure modes).
    pub errors: u64,
    /// Stored entries that could not be decoded (corrupt, older format, changed Rust type);
    /// each was treated as a miss and overwritten.
    pub decode_errors: u64,
    /// Results that were returned but not stored because they exceeded the size limit.
    pub oversized: u64,
    /// Calls that ran their query without the cache because their connection argument was
    /// inside a transaction: nothing read from or written to the cache, not a hit or a miss.
    pub bypassed: u64,
    /// Calls whose query failed and that returned the entry `stale_if_error` kept past its
    /// freshness instead of the error (also counted as misses: the query ran).
    pub stale_served: u64,
    /// Misses that found another process's lease on their entry and waited for its result
    /// (see [`CacheBuilder::leases`](crate::CacheBuilder::leases)); those that got it are
    /// also counted as hits, the others (holder failed, lease expired) as misses.
    pub lease_waits: u64,
    /// Hits chosen by `refresh_ahead` to run their query and store a fresh entry before it
    /// expires (also counted as hits: the cached value stood in had the refresh failed).
    pub refreshes: u64,
    /// `#[invalidates]` calls that ran inside a transaction on a cache without an outbox, so
    /// their invalidation was sent before the commit (each also logged as an error).
    pub invalidations_before_commit: u64,
    /// Times a new Redis connection found a server this namespace was not last made safe
    /// on (first use, a restart from disk, a failover, another server) and replaced the
    /// namespace generation: every entry stored before became a miss. See the README's
    /// failure modes.
    pub server_changes: u64,
    /// The same figures per query name (`name = …`, by default `module_path::fn_name`).
    pub queries: BTreeMap<String, QueryStats>,
}

/// The counters of one query name; see [`CacheStats`] for their meaning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct QueryStats {
    /// See [`CacheStats::hits`].
    pub hits: u64,
    /// See [`CacheStats::near_hits`].
    pub near_hits: u64,
    /// See [`CacheStats::misses`].
    pub misses: u64,
    /// See [`CacheStats::errors`].
    pub errors: u64,
    /// See [`CacheStats::decode_errors`].
    pub decode_errors: u64,
    /// See [`CacheStats::oversized`].
    pub oversized: u64,
    /// See [`CacheStats::bypassed`].
    pub bypassed: u64,
    /// See [`CacheStats::stale_served`].
    pub stale_served: u64,
    /// See [`CacheStats::lease_waits`].
    pub lease_waits: u64,
    /// See [`CacheStats::refreshes`].
    pub refreshes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    hits: AtomicU64,
    near_hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    decode_errors: AtomicU64,
    oversized: AtomicU64,
    bypassed: AtomicU64,
    stale_served: AtomicU64,
    lease_waits: AtomicU64,
    refreshes: AtomicU64,
    /// The query's execution time, µs, a moving average (`refresh_ahead` weighs by it).
    query_micros: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> QueryStats {
        QueryStats {
            hits: self.hits.load(Relaxed),
            near_hits: self.near_hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            errors: self.errors.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            oversized: self.oversized.load(Relaxed),
            bypassed: self.bypassed.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            lease_waits: self.lease_waits.load(Relaxed),
            refreshes: self.refreshes.load(Relaxed),
        }
    }
}

/// Counters of one cache: a total and one set per query name.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    total: Counters,
    before_commit: AtomicU64,
    per_query: RwLock<HashMap<&'static str, Arc<Counters>>>,
}

/// The counters one call updates: the cache's total and its query's.
#[derive(Debug)]
pub(crate) struct Recorder<'a> {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    name: &'static str,
    total: &'a Counters,
    query: Arc<Counters>,
    /// The span of the call these counts are for, which takes their outcome.
    call: Option<&'a CallSpan>,
}

macro_rules! record {
    ($($name:ident $(/ $many:ident)? => $field:ident, $metric:expr, $outcome:ident);* $(;)?) => {$(
        pub(crate) fn $name(&self) {
            self.add(|c| &c.$field, $metric, 1);
            self.report(Outcome::$outcome);
        }
        $(
            /// Counts `n` at once (a batch's keys).
            pub(crate) fn $many(&self, n: u64) {
                self.add(|c| &c.$field, $metric, n);
                if n > 0 {
                    self.report(Outcome::$outcome);
                }
            }
        )?
    )*};
}

impl<'a> Recorder<'a> {
    record! {
        hit / hits => hits, Some("cached_query_cache_hits_total"), Hit;
        near_hit / near_hits => near_hits, Some("cached_query_near_hits_total"), None;
        miss / misses => misses, Some("cached_query_cache_misses_total"), Miss;
        error => errors, Some("cached_query_cache_errors_total"), Error;
        // Also a stamp evicted mid-read or an entry of another format: treated as a miss.
        decode_error => decode_errors, None, None;
        oversized => oversized, None, None;
        bypassed => bypassed, Some("cached_query_cache_bypassed_total"), Bypassed;
        stale_served => stale_served, Some("cached_query_stale_served_total"), None;
        lease_wait => lease_waits, Some("cached_query_lease_waits_total"), None;
        // The caller runs the query for its refresh.
        refresh => refreshes, Some("cached_query_refreshes_total"), Miss;
    }

    /// These counts are for the call of `call`, which records their outcome.
    pub(crate) fn reporting_to<'b>(self, call: &'b CallSpan) -> Recorder<'b>
    where
        'a: 'b,
    {
        Recorder {
            call: Some(call),
            ..self
        }
    }

    /// The query is about to run: the span says so even if the call is dropped during it (the
    /// miss itself is counted when the query returns).
    pub(crate) fn querying(&self) {
        self.report(Outcome::Miss);
    }

    #[inline]
    fn report(&self, outcome: Outcome) {
        if let Some(call) = self.call
            && outcome != Outcome::None
        {
            call.report(outcome);
        }
    }

    /// Folds one execution time of the query into its moving average (weight 1/8).
    pub(crate) fn query_took(&self, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .query
            .query_micros
            .fetch_update(Relaxed, Relaxed, |avg| {
                Some(if avg == 0 {
                    micros
                } else {
                    avg - avg / 8 + micros / 8
                })
            });
    }

    /// The query's average execution time (zero before it ran in this process).
    pub(crate) fn query_time(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.query.query_micros.load(Relaxed))
    }

    /// Adds `n` to a counter of the cache's total and of this query's, and to its metric.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn add(&self, field: fn(&Counters) -> &AtomicU64, metric: Option<&'static str>, n: u64) {
        if n == 0 {
            return;
        }
        field(self.total).fetch_add(n, Relaxed);
        field(&self.query).fetch_add(n, Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metric) = metric {
            metrics::counter!(metric, "query" => self.name).increment(n);
        }
    }
}

impl Stats {
    pub(crate) fn invalidated_before_commit(&self) {
        self.before_commit.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("cached_query_invalidations_before_commit_total").increment(1);
    }

    pub(crate) fn recorder(&self, name: &'static str) -> Recorder<'_> {
        let existing = self
            .per_query
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let query = existing.unwrap_or_else(|| {
            let mut map = self.per_query.write().unwrap_or_else(|e| e.into_inner());
            map.entry(name).or_default().clone()
        });
        Recorder {
            name,
            total: &self.total,
            query,
            call: None,
        }
    }

    /// The counters, with the near cache's own message and reset counts.
    pub(crate) fn snapshot(
        &self,
        near_invalidations: u64,
        near_resets: u64,
        server_changes: u64,
    ) -> CacheStats {
        let total = self.total.snapshot();
        let queries = self
            .per_query
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, c)| ((*name).to_owned(), c.snapshot()))
            .collect();
        CacheStats {
            hits: total.hits,
            near_hits: total.near_hits,
            near_invalidations,
            near_resets,
            misses: total.misses,
            errors: total.errors,
            decode_errors: total.decode_errors,
            oversized: total.oversized,
            bypassed: total.bypassed,
            stale_served: total.stale_served,
            lease_waits: total.lease_waits,
            refreshes: total.refreshes,
            invalidations_before_commit: self.before_commit.load(Relaxed),
            server_changes,
            queries,
        }
    }
}
