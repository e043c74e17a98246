//! Fleet-wide single-flight (`CacheBuilder::leases`): a miss takes a lease in Redis on
//! computing its entry under the stamps it read (`SET NX PX`, `keyspace::lease_key`); a
//! miss in another process that finds the lease held waits for the holder's entry instead of
//! running the query.
//!
//! - **Scoped to stamps.** The lease key hashes the entry with every stamp the miss read: a
//!   caller that saw an invalidation reads other stamps, so it never waits for a query that
//!   began before it.
//! - **Idempotent.** Taking a lease is a `SET NX PX` in a script that also answers "taken"
//!   when this caller's token already holds it: a request run again on a new connection
//!   must not lock its own sender out. The guard exists before the request is sent, so a
//!   caller cancelled or timed out meanwhile releases what it may have taken.
//! - **Bounded.** A waiter polls (one read of the entry, the lease and the stamps: an `MGET`,
//!   split per slot on a cluster) at growing intervals, 2 ms up to 50 ms, and queries
//!   itself when the lease is gone without an entry (the holder failed, was cancelled, or
//!   its result was not stored: it releases the lease then), when the stamps changed (then
//!   it takes the new scope's lease first), or at `lease_ttl` after it began waiting,
//!   whatever happens: no request of the wait starts later than one response timeout before
//!   that, so each ends by then too (and none is cut short by it).
//! - **Served as a read.** A waiter returns only an entry its poll found fresh, exactly as a
//!   read at that moment would.
//! - **Fail-open.** A Redis error, timeout or open breaker skips the lease: the caller
//!   queries, as without leases.

use super::Cache;
use super::call::Check;
use super::stats::Recorder;
use crate::backend::{Read, StampKey, Store, StoreError};
use crate::keyspace::{lease_key, new_token};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first poll's delay; each next one is half as long again, up to `LAST_POLL`.
const FIRST_POLL: Duration = Duration::from_millis(2);
const LAST_POLL: Duration = Duration::from_millis(50);

/// A lease this caller holds, or may hold (its request was sent); released when dropped (in a
/// task of its own, once, whatever the breaker says: other processes may be waiting on it),
/// unless the entry's write released it.
pub(super) struct Lease {
    cache: Cache,
    key: String,
    token: Vec<u8>,
    held: bool,
}

impl Lease {
    /// The lease `key`, just taken with `token`.
    pub(super) fn new(cache: &Cache, key: String, token: Vec<u8>) -> Lease {
        Lease {
            cache: cache.clone(),
            key,
            token,
            held: true,
        }
    }

    /// The lease key and this holder's token (to release it along with the write).
    pub(super) fn id(&self) -> (&str, &[u8]) {
        (&self.key, &self.token)
    }

    /// The entry's write released it.
    pub(super) fn released(mut self) {
        self.held = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // It expires.
        };
        let (cache, key, token) = (
            self.cache.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            if let Some(store) = &cache.inner.store {
                // Not fed to the breaker: a release must not take its one probe.
                let _ = store.release(&key, &token, store.until()).await;
            }
        });
    }
}

/// What a miss does after trying the lease.
pub(super) enum Leased<T> {
    /// The holder's entry, found fresh by a poll: served (with its payload, for this
    /// process's followers).
    Hit(T, Arc<[u8]>),
    /// Run the query, with the stamps read last before it (to store the result with), holding
    /// the lease when it was taken.
    Query(Vec<Bytes>, Option<Lease>),
}

/// What a miss needs to take or wait for a lease.
pub(super) struct Miss<'a> {
    pub(super) entry: &'a str,
    pub(super) stamp_keys: &'a [StampKey],
    /// How long the entry is kept (the expiry of stamps a poll creates follows it).
    pub(super) kept: Duration,
    pub(super) own: usize,
    pub(super) by_result: bool,
    /// The end of the call's budget before its query: the first `SET NX` ends by then.
    pub(super) until: Instant,
}

/// What a `SET NX PX` of a lease found.
pub(super) enum Taken {
    Held(Lease),
    /// Another caller's token holds it.
    Busy,
    /// Not known: the request failed or timed out (or the breaker kept it from being sent);
    /// the guard of what it may have taken, to release.
    Failed(StoreError, Option<Lease>),
}

impl Cache {
    /// Whether misses of a site (`lease = false` opts out) take leases on this cache.
    pub(super) fn leasing(&self, site_lease: bool) -> bool {
        site_lease
            && self.inner.settings.leases
            && self.inner.store.as_ref().is_some_and(Store::is_remote)
    }

    /// Takes the lease on `miss` under `stamps`, or waits for its holder's entry (see the
    /// module documentation).
    pub(super) async fn lease_or_wait<T>(
        &self,
        store: &Store,
        rec: &Recorder<'_>,
        miss: Miss<'_>,
        mut stamps: Vec<Bytes>,
        decode: impl Fn(&[u8]) -> Option<T>,
    ) -> Leased<T> {
        let namespace = &self.inner.settings.namespace;
        let start = Instant::now();
        // No request of the wait starts later than one response timeout before its end, so
        // each ends by then (the builder makes lease_ttl longer than that timeout).
        let last = (start + self.inner.settings.lease_ttl)
            .checked_sub(store.deadline().unwrap_or_default())
            .unwrap_or(start);
        // The first take: within the call's budget before its query.
        let mut until = miss.until;
        let mut waited = false;
        let mut delay = FIRST_POLL;
        loop {
            let key = lease_key(namespace, miss.entry, &stamps);
            match self.take_lease(store, key.clone(), until).await {
                Taken::Held(lease) => return Leased::Query(stamps, Some(lease)),
                Taken::Busy => {}
                Taken::Failed(e, lease) => {
                    rec.error();
                    self.warn("taking a lease failed", &e);
                    return Leased::Query(stamps, lease);
                }
            }
            if !waited {
                waited = true;
                rec.lease_wait();
            }
            // Held elsewhere: poll until its entry comes, it goes, or the stamps change.
            loop {
                let now = Instant::now();
                if now >= last {
                    return Leased::Query(stamps, None);
                }
                tokio::time::sleep_until((now + delay).min(last)).await;
                delay = (delay * 3 / 2).min(LAST_POLL);
                until = store.until();
                let (read, held) = match self.poll(store, &miss, &key, until).await {
                    Ok(polled) => polled,
                    Err(e) => {
                        rec.error();
                        self.warn("polling a lease failed", &e);
                        return Leased::Query(stamps, None);
                    }
                };
                let check = Check {
                    own: miss.own,
                    by_result: miss.by_result,
                    until,
                };
                let kept = |p: &[u8]| decode(p).map(|value| (value, Arc::<[u8]>::from(p)));
                if let Some(((value, payload), _)) =
                    self.fresh(store, rec, miss.entry, &read, check, kept).await
                {
                    return Leased::Hit(value, payload);
                }
                if read.stamps != stamps {
                    // Invalidated meanwhile: the holder's result will not be served; the new
                    // stamps' lease is the one to take or wait for.
                    stamps = read.stamps;
                    break;
                }
                if !held {
                    break; // Released or expired without an entry: take it.
                }
            }
            if Instant::now() >= last {
                return Leased::Query(stamps, None);
            }
            until = store.until();
        }
    }

    /// `SET NX PX` of the lease `key` for `lease_ttl` by `until`, while the breaker lets
    /// calls through.
    pub(super) async fn take_lease(&self, store: &Store, key: String, until: Instant) -> Taken {
        let ttl = self.inner.settings.lease_ttl;
        // Before the request: a caller dropped while it is under way releases it.
        let mut lease = Lease::new(self, key, new_token());
        let r = self
            .guarded(store.lease(&lease.key, &lease.token, ttl, until))
            .await;
        match r {
            Ok(true) => Taken::Held(lease),
            Ok(false) => {
                lease.held = false;
                Taken::Busy
            }
            // Never sent.
            Err(e @ StoreError::CircuitOpen) => {
                lease.held = false;
                Taken::Failed(e, None)
            }
            Err(e) => Taken::Failed(e, Some(lease)),
        }
    }

    /// One read of the entry, its stamps and the lease (pending invalidations delivered
    /// first, as for any read): the entry as a [`Read`], and whether the lease is held.
    async fn poll(
        &self,
        store: &Store,
        miss: &Miss<'_>,
        lease: &str,
        until: Instant,
    ) -> Result<(Read, bool), StoreError> {
        self.may_read(store, until).await?;
        let r = store
            .read_many(
                &[miss.entry, lease],
                miss.kept,
                miss.stamp_keys,
                None,
                until,
            )
            .await;
        self.observe(&r);
        let r = r?;
        // An entry whose stamps were just created cannot have been stored under them.
        let created = r.created.contains(&true);
        let mut entries = r.entries.into_iter();
        let (entry, held) = (entries.next().flatten(), entries.next().flatten());
        let read = Read {
            entry: entry.filter(|_| !created),
            stamps: r.stamps,
            near: None,
        };
        Ok((read, held.is_some()))
    }
}
