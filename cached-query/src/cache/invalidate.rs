//! The write side: invalidating tags, clearing the namespace, invalidating with a
//! transaction (outbox) or after it (`commit_and_invalidate`), and delivering invalidations
//! that Redis did not accept the first time.

use super::Cache;
use crate::Error;
use crate::backend::{StampKey, Store, StoreError};
use crate::timing::calls;
use std::future::Future;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// When an `#[invalidates]` call's invalidation takes effect; decided before its body runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// After the body, whatever it returns: its statements were autocommitted (or there is no
    /// connection argument to tell).
    AfterBody,
    /// Recorded in the caller's transaction (outbox): in effect after it commits, never if it
    /// rolls back.
    OnCommit,
    /// Inside a transaction but without an outbox: sent after the body, before the commit,
    /// logged and counted.
    BeforeCommit,
}

/// Decides [`When`] for a connection argument, recording the invalidation in its transaction
/// when it is inside one and the cache has an outbox (PostgreSQL only).
pub async fn on_connection<C>(cache: Option<&Cache>, tags: &[String], conn: &mut C) -> When
where
    C: sqlx::Connection + 'static,
{
    if !conn.is_in_transaction() {
        return When::AfterBody;
    }
    let Some(cache) = cache else {
        return When::AfterBody;
    };
    if cache.record_in(conn, tags).await {
        return When::OnCommit;
    }
    When::BeforeCommit
}

/// Runs one `#[invalidates]` call: the body, then (on `Ok` and on `Err`: an autocommitted
/// statement may have landed before the error) the invalidation, unless it was recorded in
/// the caller's transaction. Dropped during the body, it still invalidates.
pub async fn invalidating<T, E, F>(
    cache: Option<&Cache>,
    tags: Vec<String>,
    when: When,
    fut: F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let Some(cache) = cache else {
        super::global::warn_no_cache("#[invalidates]");
        return calls::execute(fut).await;
    };
    if when == When::OnCommit {
        return calls::execute(fut).await;
    }
    let guard = InvalidateOnDrop::new(cache, &tags);
    let result = calls::execute(fut).await;
    guard.disarm();
    if when == When::BeforeCommit {
        cache.inner.stats.invalidated_before_commit();
        if let Some(suppressed) = cache.inner.before_commit_errors.permit() {
            tracing::error!(
                suppressed,
                "cached-query: #[invalidates] ran inside a transaction on a cache without an outbox: \
                 the tags are invalidated before the commit, so a concurrent read can cache the old \
                 rows again until the TTL; build the cache with `CacheBuilder::outbox(pool)`"
            );
        }
    }
    if let Err(e) = cache.invalidate_many(&tags).await {
        tracing::warn!(error = %e, "cached-query: #[invalidates] could not reach Redis");
    }
    result
}

/// What an invalidation owes Redis when it cannot be delivered: tags, and whether the
/// namespace generation (`clear`).
#[derive(Debug, Clone, Copy)]
struct Owed<'a> {
    tags: &'a [String],
    generation: bool,
}

/// Invalidates `tags` if dropped armed: the future that owned it was cancelled at a point
/// where a write may have landed (during a body, during COMMIT, during a bump).
struct InvalidateOnDrop<'a> {
    cache: &'a Cache,
    owed: Owed<'a>,
    armed: bool,
}

impl<'a> InvalidateOnDrop<'a> {
    fn new(cache: &'a Cache, tags: &'a [String]) -> Self {
        Self::owing(
            cache,
            Owed {
                tags,
                generation: false,
            },
        )
    }

    fn owing(cache: &'a Cache, owed: Owed<'a>) -> Self {
        InvalidateOnDrop {
            cache,
            owed,
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for InvalidateOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache.invalidate_on_drop(self.owed);
        }
    }
}

impl Cache {
    /// Invalidates every entry tagged `tag`, in O(1) whatever their number. See
    /// [`invalidate_many`](Self::invalidate_many) for what an `Err` means.
    pub async fn invalidate(&self, tag: &str) -> Result<(), Error> {
        self.invalidate_many([tag]).await
    }

    /// Invalidates every entry carrying any of `tags`, in one round trip.
    ///
    /// `Err(InvalidationPending)` means Redis could not be told. The invalidation then stays
    /// **pending**: from this moment this process serves no cached entry at all until it has
    /// delivered every pending invalidation to Redis (a background task retries with backoff,
    /// and each read tries first), so it cannot serve what the invalidation covered. Other
    /// processes see it once it is delivered; with an [outbox](crate::CacheBuilder::outbox) it
    /// is also recorded in PostgreSQL, so it is delivered even if this process dies.
    ///
    /// With an outbox and the in-memory backend, it is applied here at once and published to
    /// every other process (`Err(Outbox)` if PostgreSQL did not take it).
    pub async fn invalidate_many<I, S>(&self, tags: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        if tags.is_empty() {
            return Ok(());
        }
        self.invalidate_now(
            Owed {
                tags: &tags,
                generation: false,
            },
            true,
        )
        .await
    }

    /// Invalidates everything in this cache's namespace in O(1), by replacing the
    /// namespace generation that every entry is stamped with. `Err` is pending as for
    /// [`invalidate_many`](Self::invalidate_many); with an outbox every process clears.
    pub async fn clear(&self) -> Result<(), Error> {
        self.invalidate_now(
            Owed {
                tags: &[],
                generation: true,
            },
            true,
        )
        .await
    }

    /// Commits `tx`, then invalidates `tags`.
    ///
    /// Safe against cancellation and crashes: dropped at any point after COMMIT was sent,
    /// the invalidation still happens (pending in this process, delivered in the background);
    /// a commit that fails (its outcome may be unknown: connection lost before the reply)
    /// invalidates anyway and returns `Err(Commit)`. With an
    /// [outbox](crate::CacheBuilder::outbox) on PostgreSQL, the invalidation is also recorded
    /// inside `tx` before COMMIT, so a process killed right after COMMIT is covered: another
    /// process delivers it. An invalidation Redis does not accept is kept pending and logged.
    pub async fn commit_and_invalidate<DB, I, S>(
        &self,
        mut tx: sqlx::Transaction<'_, DB>,
        tags: I,
    ) -> Result<(), Error>
    where
        DB: sqlx::Database,
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        let recorded = self.record_in(&mut *tx, &tags).await;
        let guard = InvalidateOnDrop::new(self, &tags);
        let committed = tx.commit().await;
        guard.disarm();
        // Committed, or perhaps (an error): invalidate. A recorded row reaches every process;
        // this one also bumps now, so the invalidation is in effect when this returns.
        let owed = Owed {
            tags: &tags,
            generation: false,
        };
        if !tags.is_empty()
            && let Err(e) = self.invalidate_now(owed, !recorded).await
        {
            tracing::warn!(error = %e, "cached-query: invalidation after commit is pending");
        }
        committed.map_err(Error::Commit)
    }

    /// Records `tags` in the transaction on `conn` when the outbox can (PostgreSQL). A failure
    /// leaves the transaction intact (the record function catches its own errors) and is
    /// logged: the caller then invalidates without the outbox.
    async fn record_in<C: sqlx::Connection + 'static>(
        &self,
        conn: &mut C,
        tags: &[String],
    ) -> bool {
        #[cfg(feature = "postgres")]
        if let Some(outbox) = &self.inner.outbox
            && !tags.is_empty()
            && let Some(pg) = (conn as &mut dyn std::any::Any).downcast_mut::<sqlx::PgConnection>()
        {
            return match outbox.record(pg, tags, None).await {
                Ok(true) => true,
                Ok(false) => {
                    tracing::error!(
                        "cached-query: the outbox did not record an invalidation (see the PostgreSQL log); it is sent without the outbox"
                    );
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "cached-query: could not record an invalidation in the transaction; it is sent without the outbox");
                    false
                }
            };
        }
        let _ = (conn, tags);
        false
    }

    /// One invalidation now: bumped (or deferred) here, and published through the outbox when
    /// `publish` and other processes need the row (in-memory backends always; Redis ones only
    /// when Redis did not take it, so that a live process delivers it if this one dies).
    async fn invalidate_now(&self, owed: Owed<'_>, publish: bool) -> Result<(), Error> {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        let keys = self.stamp_keys(owed.tags.iter().map(String::as_str), owed.generation);
        let result = self.bump_or_defer(store, &keys, owed).await;
        #[cfg(feature = "postgres")]
        if let Some(outbox) = &self.inner.outbox
            && publish
            && (!store.is_remote() || result.is_err())
        {
            // In a task of its own: a caller cancelled meanwhile (a request timeout) must not
            // leave the other processes uninformed.
            let (outbox, tags) = (outbox.clone(), owed.tags.to_vec());
            let clear = owed.generation.then(|| self.namespace().to_owned());
            let published =
                tokio::spawn(async move { outbox.publish(&tags, clear.as_deref()).await })
                    .await
                    .unwrap_or_else(|e| {
                        Err(sqlx::Error::Protocol(format!(
                            "the publishing task failed: {e}"
                        )))
                    });
            if let Err(e) = published {
                tracing::warn!(error = %e, "cached-query: could not publish an invalidation to the outbox");
                if result.is_ok() {
                    return Err(Error::outbox("publishing the invalidation", e));
                }
            }
        }
        let _ = publish;
        result
    }

    /// A cancelled writer's invalidation: applied locally at once; for Redis, pending (this
    /// process serves nothing until it is delivered) and retried in the background.
    fn invalidate_on_drop(&self, owed: Owed<'_>) {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(store) = &self.inner.store else {
            return;
        };
        let keys = self.stamp_keys(owed.tags.iter().map(String::as_str), owed.generation);
        if store.is_remote() {
            self.defer(owed.tags, owed.generation);
            self.forget_near(&keys);
        } else {
            store.bump_local(&keys);
            #[cfg(feature = "postgres")]
            if let Some(outbox) = self.inner.outbox.clone()
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let tags = owed.tags.to_vec();
                let clear = owed.generation.then(|| self.namespace().to_owned());
                runtime.spawn(async move {
                    if let Err(e) = outbox.publish(&tags, clear.as_deref()).await {
                        tracing::warn!(error = %e, "cached-query: could not publish a cancelled writer's invalidation");
                    }
                });
            }
        }
    }

    /// Sends `keys` fresh tokens; on failure (or if dropped before knowing) records `owed`
    /// as pending.
    async fn bump_or_defer(
        &self,
        store: &Store,
        keys: &[StampKey],
        owed: Owed<'_>,
    ) -> Result<(), Error> {
        let result = if store.is_remote() {
            let guard = InvalidateOnDrop::owing(self, owed);
            let r = if self.inner.pending.any() {
                // Older invalidations are undelivered: queue behind them and deliver everything.
                self.defer(owed.tags, owed.generation);
                self.forget_near(keys);
                self.deliver_pending(store, true, store.until()).await
            } else {
                let r = self.bump(store, keys, store.until()).await;
                if r.is_err() {
                    // Pending before the near cache forgets: no fill can bring the old tokens
                    // back in between (reads go to Redis only after delivering).
                    self.defer(owed.tags, owed.generation);
                }
                self.forget_near(keys);
                r
            };
            guard.disarm();
            r
        } else {
            store.bump(keys, store.until()).await
        };
        result.map_err(|e| Error::InvalidationPending {
            source: e.into_source(),
        })
    }

    /// One bump round trip, when the breaker lets it through; the breaker observes it. No keys
    /// (another namespace's clear) is nothing to send, whatever the breaker says.
    pub(super) async fn bump(
        &self,
        store: &Store,
        keys: &[StampKey],
        until: Instant,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        if !self.inner.breaker.allow() {
            return Err(StoreError::CircuitOpen);
        }
        let r = store.bump(keys, until).await;
        self.observe(&r);
        r
    }

    /// The near cache drops stamps this process changed (read-your-own-invalidation without
    /// waiting for Redis's message), or may have changed: a timed-out bump may have landed.
    pub(super) fn forget_near(&self, keys: &[StampKey]) {
        if let Some(near) = &self.inner.near {
            near.forget(keys);
            // Every bump advances the sequence too.
            near.forget_sequence(&self.sequence_stamp());
        }
    }

    /// Delivers every pending invalidation by `until`. `wait` makes an invalidating caller
    /// queue behind another delivery instead of giving up.
    pub(super) async fn deliver_pending(
        &self,
        store: &Store,
        wait: bool,
        until: Instant,
    ) -> Result<(), StoreError> {
        let pending = &self.inner.pending;
        let Some(_guard) = pending.lock_delivery(wait).await else {
            return Err(StoreError::PendingBusy);
        };
        let sent = pending.snapshot();
        if sent.is_empty() {
            pending.delivered(&sent);
            return Ok(());
        }
        let keys = self.stamp_keys(sent.tags(), sent.generation());
        let result = self.bump(store, &keys, until).await;
        self.forget_near(&keys);
        result?;
        pending.delivered(&sent);
        tracing::info!(
            tags = keys.len() - usize::from(sent.generation()),
            generation = sent.generation(),
            "cached-query: delivered pending invalidations"
        );
        Ok(())
    }
}

/// Invalidation through PostgreSQL: requires [`CacheBuilder::outbox`](crate::CacheBuilder::outbox).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl Cache {
    /// Records the invalidation of `tags` inside the transaction `conn` is in: it takes
    /// effect in every process only if and after that transaction commits (within the
    /// delivery delay, see the README), never if it rolls back. Outside a transaction it is
    /// [`invalidate_many`](Self::invalidate_many). `Err(NoOutbox)` without an outbox.
    pub async fn invalidate_on_commit<I, S>(
        &self,
        conn: &mut sqlx::PgConnection,
        tags: I,
    ) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        use sqlx::Connection as _;
        if self.inner.outbox.is_none() {
            return Err(Error::NoOutbox {
                operation: "invalidate_on_commit",
            });
        }
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        if !conn.is_in_transaction() {
            return self.invalidate_many(&tags).await;
        }
        if tags.is_empty() {
            return Ok(());
        }
        let outbox = self.inner.outbox.as_ref().expect("checked above");
        match outbox.record(conn, &tags, None).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::outbox(
                "recording the invalidation in the transaction (the transaction is intact; see the PostgreSQL log)",
                "the outbox record function failed",
            )),
            Err(e) => Err(Error::outbox(
                "recording the invalidation in the transaction",
                e,
            )),
        }
    }

    /// Makes any INSERT, UPDATE, DELETE or TRUNCATE of `table`, by any client (psql,
    /// migrations, another service), invalidate the tags computed from the old and new
    /// rows: `"user:<id>"` names the column `id`, rendered as PostgreSQL's text form (as
    /// `Display` renders integers, text, UUIDs and booleans); a NULL column yields no tag; a
    /// TRUNCATE clears every namespace. Installs statement-level triggers (one outbox row
    /// per statement); calling it again replaces the tags. An unknown table or column is an
    /// `Err(Watch)` naming it.
    pub async fn watch_table(&self, table: &str, tags: &[&str]) -> Result<(), Error> {
        let Some(outbox) = &self.inner.outbox else {
            return Err(Error::NoOutbox {
                operation: "watch_table",
            });
        };
        crate::outbox::watch::install(outbox, table, tags).await
    }

    /// Makes any INSERT, UPDATE, DELETE or TRUNCATE of each of `tables`, by any client,
    /// invalidate the tag `table:<name>` (the table's own name, without schema): what
    /// `#[cached_query(tables = auto)]` and `tables("…")` tag entries with. Installs one
    /// statement-level trigger per table (one outbox row per statement), delivered like
    /// every outbox row. Names resolve through the outbox pool's `search_path`
    /// (`"schema.table"` also works); writers with any `search_path` are covered. Calling it
    /// again is harmless; an unknown table is an `Err(Watch)` naming it.
    pub async fn watch_tables(&self, tables: &[&str]) -> Result<(), Error> {
        let Some(outbox) = &self.inner.outbox else {
            return Err(Error::NoOutbox {
                operation: "watch_tables",
            });
        };
        crate::outbox::watch::install_tables(outbox, tables).await
    }

    /// Removes what [`watch_table`](Self::watch_table) and
    /// [`watch_tables`](Self::watch_tables) installed on `table` (nothing if it was not
    /// watched).
    pub async fn unwatch_table(&self, table: &str) -> Result<(), Error> {
        let Some(outbox) = &self.inner.outbox else {
            return Err(Error::NoOutbox {
                operation: "unwatch_table",
            });
        };
        crate::outbox::watch::uninstall(outbox, table).await
    }
}
