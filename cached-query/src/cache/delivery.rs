//! Background delivery: retrying pending invalidations with backoff, and (with an outbox)
//! the listener that applies every process's invalidations and the sweeper that delivers
//! what nobody did (a writer killed after COMMIT, Redis down when the notice came).

use super::{Cache, Inner};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// First and longest wait between two background delivery attempts.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl Cache {
    fn from_weak(weak: &Weak<Inner>) -> Option<Cache> {
        weak.upgrade().map(|inner| Cache { inner })
    }

    /// Makes sure a background task retries pending invalidations until none is left (one
    /// task per cache; none outside a Tokio runtime, where the next call delivers them).
    pub(super) fn retry_pending_in_background(&self) {
        let pending = &self.inner.pending;
        if pending.retrying.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            pending.retrying.store(false, Ordering::SeqCst);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut delay = RETRY_FIRST;
            loop {
                tokio::time::sleep(delay).await;
                let Some(cache) = Cache::from_weak(&weak) else {
                    return;
                };
                let pending = &cache.inner.pending;
                if !pending.any() {
                    pending.retrying.store(false, Ordering::SeqCst);
                    // Something deferred between the check and the store found the flag
                    // still set and left it to this task.
                    if !pending.any() || pending.retrying.swap(true, Ordering::SeqCst) {
                        return;
                    }
                }
                let Some(store) = &cache.inner.store else {
                    return;
                };
                delay = match cache.deliver_pending(store, false, store.until()).await {
                    Ok(()) => RETRY_FIRST,
                    Err(_) => (delay * 2).min(RETRY_MAX),
                };
            }
        });
    }
}

#[cfg(feature = "postgres")]
pub(crate) use outbox::start;

#[cfg(feature = "postgres")]
mod outbox {
    use super::*;
    use crate::Error;
    use crate::backend::StampKey;
    use crate::outbox::{self as sql, ALL_NAMESPACES, Outbox, Row};
    use sqlx::postgres::PgListener;
    use std::sync::atomic::AtomicU64;

    /// The listener's liveness. Every sweep sends a ping through PostgreSQL that this
    /// process's listener must have seen by the next sweep: one that does not come back means
    /// the connection died without saying so (a partition, a NAT or load-balancer timeout),
    /// so the process drops what it holds and reconnects.
    #[derive(Debug)]
    struct Heartbeat {
        /// Tells this listener's pings from other processes'.
        token: String,
        /// The random nonce of the last ping sent (0: none yet), and of the last one seen.
        sent: AtomicU64,
        seen: AtomicU64,
        lost: tokio::sync::Notify,
    }

    impl Heartbeat {
        fn nonce() -> u64 {
            let bytes = crate::keyspace::new_token();
            u64::from_le_bytes(bytes[..8].try_into().expect("tokens are 16 bytes")) | 1
        }

        /// A fresh listener owes nothing for pings sent before it listened.
        fn forgive(&self) {
            self.seen
                .store(self.sent.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    /// Connects the listener (so nothing committed after `build()` returns is missed), runs
    /// one sweep, and starts the listening and sweeping tasks; they end when the cache is
    /// dropped.
    pub(crate) async fn start(cache: &Cache) -> Result<(), Error> {
        let Some(outbox) = cache.inner.outbox.clone() else {
            return Ok(());
        };
        let listener = connect(&outbox)
            .await
            .map_err(|e| Error::outbox("listening for invalidations", e))?;
        // A namespace that is new or was forgotten may have missed rows that are gone: its
        // Redis entries are cleared once (pending until Redis takes it).
        // (The clear is recorded by the registration itself and delivered by the sweep.)
        if cache.is_remote() {
            match outbox.register(cache.namespace()).await {
                Ok(true) => {
                    tracing::info!("cached-query: namespace new to the outbox; clearing it once")
                }
                Ok(false) => {}
                Err(e) => return Err(Error::outbox("registering the namespace", e)),
            }
        }
        // Catch up before serving: rows committed while no process of this fleet could
        // deliver them (a writer killed while Redis was down) wait for a sweep.
        cache.outbox_sweep(&outbox).await;
        let weak = Arc::downgrade(&cache.inner);
        let stop = cache.inner.stop.subscribe();
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        let heartbeat = Arc::new(Heartbeat {
            token: crate::keyspace::new_token()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            sent: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            lost: tokio::sync::Notify::new(),
        });
        tokio::spawn(listen(
            weak.clone(),
            outbox.clone(),
            listener,
            queue,
            heartbeat.clone(),
            stop.clone(),
        ));
        tokio::spawn(deliver_queued(weak.clone(), outbox.clone(), queued));
        tokio::spawn(sweep(weak, outbox, heartbeat, stop));
        Ok(())
    }

    /// Delivers what the listener queued, in batches: under load one claim covers every
    /// notice that arrived while the previous one ran.
    async fn deliver_queued(
        weak: Weak<Inner>,
        outbox: Outbox,
        mut queued: tokio::sync::mpsc::UnboundedReceiver<Vec<sql::Notice>>,
    ) {
        while let Some(mut notices) = queued.recv().await {
            while let Ok(more) = queued.try_recv() {
                notices.extend(more);
            }
            let Some(cache) = Cache::from_weak(&weak) else {
                return;
            };
            cache.outbox_notified(&outbox, notices).await;
        }
    }

    async fn connect(outbox: &Outbox) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&outbox.listen_pool).await?;
        listener.ignore_pool_close_event(true);
        listener.listen(sql::CHANNEL).await?;
        Ok(listener)
    }

    /// Applies every notified row. A lost connection (after which notices may have been
    /// missed) makes the process drop what it holds locally and catch up from the table.
    async fn listen(
        weak: Weak<Inner>,
        outbox: Outbox,
        listener: PgListener,
        queue: tokio::sync::mpsc::UnboundedSender<Vec<sql::Notice>>,
        heartbeat: Arc<Heartbeat>,
        mut stop: tokio::sync::watch::Receiver<()>,
    ) {
        let mut listener = Some(listener);
        let mut delay = RETRY_FIRST;
        loop {
            let Some(l) = listener.as_mut() else {
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                match connect(&outbox).await {
                    Ok(l) => {
                        listener = Some(l);
                        heartbeat.forgive();
                        delay = RETRY_FIRST;
                        let Some(cache) = Cache::from_weak(&weak) else {
                            return;
                        };
                        cache.outbox_gap(&outbox).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cached-query: outbox listener cannot reconnect");
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                }
                continue;
            };
            let received = tokio::select! {
                _ = stop.changed() => return,
                () = heartbeat.lost.notified() => {
                    listener = None;
                    continue;
                }
                r = l.try_recv() => r,
            };
            let Some(cache) = Cache::from_weak(&weak) else {
                return;
            };
            match received {
                Ok(Some(first)) => {
                    let mut notices = Vec::new();
                    let mut next = Some(first);
                    while let Some(n) = next {
                        match sql::Notice::parse(n.payload()) {
                            Some(sql::Notice::Ping { from, n }) => {
                                if from == heartbeat.token {
                                    heartbeat.seen.store(n, Ordering::SeqCst);
                                }
                            }
                            Some(notice) => notices.push(notice),
                            None => {
                                // Something this process cannot apply: assume the worst.
                                tracing::warn!(
                                    payload = n.payload(),
                                    "cached-query: unreadable outbox notice; dropping local entries"
                                );
                                cache.drop_local();
                            }
                        }
                        next = l.next_buffered();
                    }
                    // This process stops serving what the rows cover at once; Redis is told
                    // by the delivery task.
                    let rows: Vec<Row> = notices
                        .iter()
                        .filter_map(|n| match n {
                            sql::Notice::Row(r) => Some(r.clone()),
                            _ => None,
                        })
                        .collect();
                    cache.apply_locally(&rows);
                    if !notices.is_empty() && queue.send(notices).is_err() {
                        return;
                    }
                }
                // Reconnected (sqlx reconnects before returning): notices may be lost.
                Ok(None) => {
                    heartbeat.forgive();
                    tracing::warn!("cached-query: outbox listener reconnected; catching up");
                    cache.outbox_gap(&outbox).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cached-query: outbox listener lost its connection");
                    listener = None;
                }
            }
        }
    }

    /// Every `sweep_interval`: delivers rows nobody delivered (Redis backends), removes
    /// expired ones (in-memory backends).
    async fn sweep(
        weak: Weak<Inner>,
        outbox: Outbox,
        heartbeat: Arc<Heartbeat>,
        mut stop: tokio::sync::watch::Receiver<()>,
    ) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(outbox.sweep_interval) => {}
            }
            let Some(cache) = Cache::from_weak(&weak) else {
                return;
            };
            let sent = heartbeat.sent.load(Ordering::SeqCst);
            let missed = sent != 0 && heartbeat.seen.load(Ordering::SeqCst) != sent;
            // Each step gets one interval: a stalled connection must not stall the sweeper.
            let limit = outbox.sweep_interval;
            let nonce = Heartbeat::nonce();
            let pinged = match tokio::time::timeout(limit, outbox.ping(&heartbeat.token, nonce))
                .await
            {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cached-query: cannot send the outbox heartbeat");
                    false
                }
                Err(_) => false,
            };
            // A ping that timed out may still arrive: nothing is expected of the next check.
            heartbeat
                .sent
                .store(if pinged { nonce } else { 0 }, Ordering::SeqCst);
            if missed || !pinged {
                // Either the listener is deaf or PostgreSQL cannot be reached: this process
                // may miss invalidations, so it keeps nothing it could serve stale.
                tracing::warn!(
                    missed,
                    "cached-query: the outbox heartbeat failed; dropping local entries and reconnecting the listener"
                );
                cache.drop_local();
                if missed {
                    heartbeat.lost.notify_one();
                }
            }
            let _ = tokio::time::timeout(limit, cache.outbox_sweep(&outbox)).await;
        }
    }

    impl Cache {
        /// Rows were committed and those the notices carried are applied here: apply the
        /// others (read first), and deliver all of them to Redis once.
        async fn outbox_notified(&self, outbox: &Outbox, notices: Vec<sql::Notice>) {
            let ids: Vec<i64> = notices.iter().filter_map(sql::Notice::id).collect();
            let mut rows = Vec::new();
            let unread: Vec<i64> = notices
                .iter()
                .filter_map(|n| match n {
                    sql::Notice::Id(id) => Some(*id),
                    _ => None,
                })
                .collect();
            if !unread.is_empty() {
                match outbox.rows(&unread).await {
                    Ok(read) => {
                        if read.len() < unread.len() && !self.is_remote() {
                            // Gone already: expired while this process lagged.
                            self.drop_local();
                        }
                        rows.extend(read);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cached-query: cannot read the outbox");
                        self.outbox_gap(outbox).await;
                        return;
                    }
                }
            }
            self.apply_locally(&rows);
            if self.is_remote() {
                for chunk in ids.chunks(sql::SWEEP_BATCH as usize) {
                    self.deliver(outbox, Some(chunk)).await;
                }
            }
        }

        fn is_remote(&self) -> bool {
            self.inner.store.as_ref().is_some_and(|s| s.is_remote())
        }

        /// Notices may have been missed: drop what this process holds, then deliver what
        /// the table still has.
        async fn outbox_gap(&self, outbox: &Outbox) {
            self.drop_local();
            self.outbox_sweep(outbox).await;
        }

        async fn outbox_sweep(&self, outbox: &Outbox) {
            if self.inner.store.is_none() {
                return; // a pass-through cache holds nothing and delivers nothing
            }
            if self.is_remote() {
                if let Err(e) = outbox.register(self.namespace()).await {
                    tracing::warn!(error = %e, "cached-query: cannot register with the outbox");
                }
                while self.deliver(outbox, None).await {}
            }
            if let Err(e) = outbox.expire().await {
                tracing::warn!(error = %e, "cached-query: cannot expire outbox rows");
            }
        }

        /// Claims rows for this namespace (`ids`, or the oldest for a sweep), bumps them in
        /// Redis and marks them delivered; on failure they stay undelivered in the table and
        /// pending here. Returns whether a full batch was delivered (a sweep goes on).
        async fn deliver(&self, outbox: &Outbox, ids: Option<&[i64]>) -> bool {
            let Some(store) = &self.inner.store else {
                return false;
            };
            let (tx, rows) = match outbox.claim(self.namespace(), ids).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, "cached-query: cannot claim outbox rows");
                    return false;
                }
            };
            if rows.is_empty() {
                return false;
            }
            let (keys, tags, generation) = self.keys_of(&rows);
            self.inner.epoch.fetch_add(1, Ordering::SeqCst);
            match self.bump(store, &keys, store.until()).await {
                Ok(()) => {
                    self.forget_near(&keys);
                    if let Err(e) = Outbox::delivered(tx, self.namespace(), &rows).await {
                        // Delivered; the rows come back and are delivered again (a spurious miss).
                        tracing::warn!(error = %e, "cached-query: cannot mark outbox rows delivered");
                    }
                    Outbox::batch_full(&rows)
                }
                Err(e) => {
                    drop(tx);
                    self.forget_near(&keys);
                    self.defer(&tags, generation);
                    tracing::warn!(error = %e, rows = rows.len(), "cached-query: outbox rows pending until Redis accepts them");
                    false
                }
            }
        }

        /// Drops everything this process holds: the in-memory backend's entries (by a local
        /// generation change) or the near cache.
        fn drop_local(&self) {
            self.inner.epoch.fetch_add(1, Ordering::SeqCst);
            if let Some(store) = &self.inner.store {
                store.bump_local(&[self.generation_stamp()]);
            }
            if let Some(near) = &self.inner.near {
                near.reset();
            }
        }

        /// Makes this process stop serving what `rows` cover: the in-memory backend bumps
        /// its stamps, the near cache forgets them.
        fn apply_locally(&self, rows: &[Row]) {
            if rows.is_empty() {
                return;
            }
            let (keys, _, _) = self.keys_of(rows);
            self.inner.epoch.fetch_add(1, Ordering::SeqCst);
            if let Some(store) = &self.inner.store {
                store.bump_local(&keys);
            }
            self.forget_near(&keys);
        }

        /// The stamps `rows` change in this cache, with their tags and whether they clear
        /// its namespace.
        fn keys_of(&self, rows: &[Row]) -> (Vec<StampKey>, Vec<String>, bool) {
            let mut tags: Vec<String> = rows.iter().flat_map(|r| r.tags.iter().cloned()).collect();
            tags.sort_unstable();
            tags.dedup();
            let namespace = self.namespace();
            let generation = rows
                .iter()
                .filter_map(|r| r.clear.as_deref())
                .any(|c| c == namespace || c == ALL_NAMESPACES);
            let keys = self.stamp_keys(tags.iter().map(String::as_str), generation);
            (keys, tags, generation)
        }
    }
}

impl Cache {
    /// Records `tags` (and the generation) as owed to Redis and makes sure they are retried.
    pub(super) fn defer(&self, tags: &[String], generation: bool) {
        self.inner.pending.defer(tags, generation);
        self.retry_pending_in_background();
    }
}
