//! The write side: invalidating tags, clearing the namespace, committing then invalidating,
//! and delivering invalidations that Redis did not accept the first time.

use super::Cache;
use super::pending::State;
use crate::Error;
use crate::backend::{StampKey, Store, StoreError};
use crate::timing::calls;
use std::future::Future;
use std::sync::atomic::Ordering;

/// Runs one `#[invalidates]` call: the body, then (on `Ok`) the invalidation.
pub async fn invalidating<T, E, F>(cache: Option<&Cache>, tags: Vec<String>, fut: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let result = calls::execute(fut).await;
    if result.is_ok() {
        match cache {
            Some(cache) => {
                if let Err(e) = cache.invalidate_many(&tags).await {
                    tracing::warn!(error = %e, "cached-query: #[invalidates] could not reach Redis");
                }
            }
            None => super::global::warn_no_cache("#[invalidates]"),
        }
    }
    result
}

impl Cache {
    /// Invalidates every entry tagged `tag`, in O(1) whatever their number. See
    /// [`invalidate_many`](Self::invalidate_many) for what an `Err` means.
    pub async fn invalidate(&self, tag: &str) -> Result<(), Error> {
        self.invalidate_many([tag]).await
    }

    /// Invalidates every entry carrying any of `tags`, in one round trip.
    ///
    /// `Err` means Redis could not be told. The invalidation then stays **pending**: from
    /// this moment this process serves no cached entry at all until it has delivered every
    /// pending invalidation to Redis (it tries before each read), so it cannot serve what
    /// the invalidation covered. Other processes see it once it is delivered.
    pub async fn invalidate_many<I, S>(&self, tags: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        if tags.is_empty() {
            return Ok(());
        }
        let keys: Vec<StampKey> = tags.iter().map(|t| self.tag_stamp(t, None)).collect();
        self.bump_or_defer(store, &keys, |p| p.tags.extend(tags.iter().cloned()))
            .await
    }

    /// Invalidates everything in this cache's namespace in O(1), by replacing the
    /// namespace generation that every entry is stamped with. `Err` is pending as for
    /// [`invalidate_many`](Self::invalidate_many).
    pub async fn clear(&self) -> Result<(), Error> {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        let keys = [self.generation_stamp()];
        self.bump_or_defer(store, &keys, |p| p.generation = true)
            .await
    }

    /// Commits `tx`, then invalidates `tags`. Returns `Err` only when the commit fails, in
    /// which case nothing is invalidated. An invalidation Redis does not accept is kept
    /// pending (see [`invalidate_many`](Self::invalidate_many)) and logged.
    pub async fn commit_and_invalidate<DB, I, S>(
        &self,
        tx: sqlx::Transaction<'_, DB>,
        tags: I,
    ) -> Result<(), Error>
    where
        DB: sqlx::Database,
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        tx.commit().await.map_err(Error::Commit)?;
        if let Err(e) = self.invalidate_many(tags).await {
            tracing::warn!(error = %e, "cached-query: invalidation after commit is pending");
        }
        Ok(())
    }

    /// Sends `keys` fresh tokens; on failure records them as pending (via `defer`).
    async fn bump_or_defer(
        &self,
        store: &Store,
        keys: &[StampKey],
        defer: impl FnOnce(&mut State),
    ) -> Result<(), Error> {
        let pending = &self.inner.pending;
        let result = if !store.is_remote() {
            store.bump(keys).await
        } else if pending.any() {
            // Older invalidations are undelivered: queue behind them and deliver everything.
            pending.defer(defer);
            self.forget_near(keys);
            self.deliver_pending(store, true).await
        } else {
            let r = self.bump(store, keys).await;
            if r.is_err() {
                // Pending before the near cache forgets: no fill can bring the old tokens
                // back in between (reads go to Redis only after delivering).
                pending.defer(defer);
            }
            self.forget_near(keys);
            r
        };
        result.map_err(|e| Error::InvalidationPending {
            source: e.into_source(),
        })
    }

    /// One bump round trip, when the breaker lets it through; the breaker observes it.
    async fn bump(&self, store: &Store, keys: &[StampKey]) -> Result<(), StoreError> {
        if !self.inner.breaker.allow() {
            return Err(StoreError::CircuitOpen);
        }
        let r = store.bump(keys).await;
        self.observe(&r);
        r
    }

    /// The near cache drops stamps this process changed (read-your-own-invalidation without
    /// waiting for Redis's message), or may have changed: a timed-out bump may have landed.
    fn forget_near(&self, keys: &[StampKey]) {
        if let Some(near) = &self.inner.near {
            near.forget(keys);
        }
    }

    /// Delivers every pending invalidation. `wait` makes an invalidating caller queue behind
    /// another delivery instead of giving up.
    pub(super) async fn deliver_pending(
        &self,
        store: &Store,
        wait: bool,
    ) -> Result<(), StoreError> {
        let pending = &self.inner.pending;
        let Some(_guard) = pending.lock_delivery(wait).await else {
            return Err(StoreError::PendingBusy);
        };
        let (tags, generation) = pending.snapshot();
        if tags.is_empty() && !generation {
            return Ok(());
        }
        let mut keys: Vec<StampKey> = tags.iter().map(|t| self.tag_stamp(t, None)).collect();
        if generation {
            keys.push(self.generation_stamp());
        }
        let result = self.bump(store, &keys).await;
        self.forget_near(&keys);
        result?;
        pending.delivered(&tags, generation);
        tracing::info!(
            tags = tags.len(),
            generation,
            "cached-query: delivered pending invalidations"
        );
        Ok(())
    }
}
