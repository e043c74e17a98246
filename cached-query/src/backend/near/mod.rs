//! The near cache: entries and stamps kept in process in front of Redis, coherent through
//! RESP3 client-side caching. Every value it holds was read on one dedicated connection with
//! `CLIENT TRACKING ON`, so Redis pushes an `invalidate` message on that same connection
//! when any of those keys changes, expires or is evicted.
//!
//! Coherence rules:
//! - a push message drops the keys it names (a `null` one, after `FLUSHALL`, drops all);
//! - this process's own invalidations drop their keys once sent (accepted or not: a timed-out
//!   one may have landed);
//! - a lost connection drops everything: messages may have been missed;
//! - a fill (values read from Redis) is kept only if nothing was dropped while it was in
//!   flight, so a message that overtook its reply cannot be undone by it;
//! - an entry whose stamps were checked is served without checking them again until a
//!   stamp is dropped (a tag or generation message, an own invalidation, a reset); messages
//!   about entries (every miss in any process writes one) do not end that state;
//! - nothing is served from process memory unless a request sent on the current tracking
//!   connection at most `lease` ago was answered: Redis writes an invalidation message
//!   before the replies to requests it receives after the change, so such an answer proves
//!   every invalidation that returned before that request was sent has been applied. A
//!   silent partition (no FIN, no RST: nothing ever fails) thus costs at most `lease` of
//!   staleness. Near hits past half the lease send a `PING` in the background to renew it.

mod shards;

use super::connect::{Source, Timeouts};
use super::identity::{self, Guard};
use super::link::{self, Link, LinkConn};
use super::{Read, StampKey, StoreError};
use crate::keyspace::{is_entry_key, is_sequence_key};
use bytes::Bytes;
use futures_util::FutureExt;
use redis::{PushInfo, PushKind, Value};
use shards::Shards;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

pub(crate) struct NearCache {
    shared: Arc<Shared>,
    /// The tracking connection: made in the background, checked with the namespace's
    /// guard, and everything held dropped before it is used.
    link: Link,
    /// How long an answered request vouches for what is held (module docs).
    lease: Duration,
}

struct Shared {
    entries: Shards,
    stamps: Shards,
    /// Bumped by every drop (under `drops`): a fill that started under another value is
    /// not kept.
    seq: AtomicU64,
    /// Bumped when a stamp (tag version or generation) may have changed: an entry checked
    /// under another value is checked again.
    stamp_seq: AtomicU64,
    /// Makes "bump `seq` and drop" and "check `seq` and fill" exclusive.
    drops: Mutex<()>,
    /// Origin of the times below.
    origin: std::time::Instant,
    /// The tracking connection in use (its link id).
    current: AtomicU64,
    /// When (µs after `origin`, plus one; 0: never) the latest answered request on the
    /// current connection was sent.
    acked: AtomicU64,
    /// A heartbeat `PING` is in flight.
    pinging: AtomicBool,
    invalidations: AtomicU64,
    resets: AtomicU64,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("entries", &self.shared.entries.len())
            .finish_non_exhaustive()
    }
}

impl NearCache {
    /// A near cache of at most `capacity` entries (and as many stamps). `source` must speak
    /// RESP3; nothing connects until the first read.
    pub(crate) fn new(
        source: Source,
        capacity: u64,
        connect_timeout: Duration,
        response_timeout: Duration,
        lease: Duration,
        guard: Option<Guard>,
    ) -> Self {
        let shared = Arc::new(Shared {
            entries: Shards::new(capacity),
            stamps: Shards::new(capacity),
            seq: AtomicU64::new(0),
            stamp_seq: AtomicU64::new(0),
            drops: Mutex::new(()),
            origin: std::time::Instant::now(),
            current: AtomicU64::new(u64::MAX),
            acked: AtomicU64::new(0),
            pinging: AtomicBool::new(false),
            invalidations: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let timeouts = Timeouts {
            connect: connect_timeout,
            response: response_timeout,
            blocking: Duration::ZERO,
        };
        let config = timeouts.config();
        let recheck = guard
            .as_ref()
            .map(|g| identity::still_master(g.server_key.clone()));
        let weak = Arc::downgrade(&shared);
        let connect = Box::new(move |id: u64| {
            let (source, guard, weak) = (source.clone(), guard.clone(), weak.clone());
            let config = {
                let weak = weak.clone();
                config
                    .clone()
                    .set_push_sender(move |info: PushInfo| on_push(&weak, info))
            };
            async move {
                let mut conn = source.connect(timeouts, &config).await?;
                redis::cmd("CLIENT")
                    .arg("TRACKING")
                    .arg("ON")
                    .query_async::<()>(&mut conn)
                    .await?;
                if let Some(guard) = &guard {
                    identity::check(&mut conn, guard).await?;
                }
                // Whatever was held came from an earlier connection: start from nothing, with
                // no answer on this one yet.
                if let Some(shared) = weak.upgrade() {
                    shared.drop_all();
                    shared.acked.store(0, SeqCst);
                    shared.current.store(id, SeqCst);
                }
                Ok(conn)
            }
            .boxed()
        });
        // A connection given up on (a timeout) may still be open, but from now on it is not
        // read: its messages no longer count, so nothing it vouched for may be served.
        let weak = Arc::downgrade(&shared);
        let on_discard = Box::new(move |id: u64| {
            if let Some(shared) = weak.upgrade()
                && shared.current.load(SeqCst) == id
            {
                shared.current.store(u64::MAX, SeqCst);
                shared.acked.store(0, SeqCst);
                shared.reset();
            }
        });
        NearCache {
            shared,
            link: Link::new(connect, connect_timeout, recheck, Some(on_discard)),
            lease,
        }
    }

    /// Whether what is held may be served: an answer to a request sent within the lease
    /// came back on the current connection. Renews the lease in the background past half.
    fn leased(&self) -> bool {
        let acked = self.shared.acked.load(SeqCst);
        if acked == 0 {
            return false;
        }
        let age = Duration::from_micros(self.shared.now().saturating_sub(acked - 1));
        if age > self.lease / 2 {
            self.heartbeat();
        }
        age <= self.lease
    }

    /// Sends one `PING` on the tracking connection (unless one is in flight); its answer
    /// renews the lease, its timeout discards the connection.
    fn heartbeat(&self) {
        let (link, shared, patience) = (self.link.clone(), self.shared.clone(), self.lease);
        link::spawn_unless_running(&self.shared, |s| &s.pinging, async move {
            let sent = shared.now();
            if let Ok(Ok((mut conn, _))) = tokio::time::timeout(patience, link.get()).await {
                let ping = redis::cmd("PING");
                match tokio::time::timeout(patience, ping.query_async::<()>(&mut conn)).await {
                    Ok(Ok(())) => shared.ack(conn.id(), sent),
                    Ok(Err(_)) => {}
                    Err(_) => conn.discard(),
                }
            }
        });
    }

    /// The entry, if it is held and its stamps were checked with no stamp dropped since.
    pub(crate) fn checked(&self, entry: &str) -> Option<Bytes> {
        if !self.leased() {
            return None;
        }
        let stamp_seq = self.shared.stamp_seq.load(SeqCst);
        match self.shared.entries.get_checked(entry, stamp_seq) {
            Some((bytes, true)) => Some(bytes),
            _ => None,
        }
    }

    /// Records that `bytes` under `entry` matched the stamps of a lookup that started at
    /// `stamp_seq` (as returned in [`Read::near`]).
    pub(crate) fn mark_checked(&self, entry: &str, bytes: &Bytes, stamp_seq: u64) {
        self.shared.entries.mark(entry, bytes, stamp_seq);
    }

    /// The entry and every stamp, if all are held locally.
    pub(crate) fn lookup<'k>(
        &self,
        entry: &str,
        stamps: impl IntoIterator<Item = &'k StampKey>,
    ) -> Option<Read> {
        if !self.leased() {
            return None;
        }
        let s = &*self.shared;
        let stamp_seq = s.stamp_seq.load(SeqCst);
        let entry = s.entries.get(entry)?;
        let stamps = stamps
            .into_iter()
            .map(|k| s.stamps.get(&k.key))
            .collect::<Option<Vec<_>>>()?;
        Some(Read {
            entry: Some(entry),
            stamps,
            near: Some(stamp_seq),
        })
    }

    /// Snapshot to pass to [`fill`](Self::fill); take it before sending the read.
    pub(crate) fn seq(&self) -> u64 {
        self.shared.seq.load(SeqCst)
    }

    /// Runs `read` (reads only) on the tracking connection by `until` (a connection that
    /// times out is discarded: a silent link would never fail by itself).
    pub(crate) async fn read<F, Fut>(
        &self,
        until: Instant,
        deadline: Duration,
        read: F,
    ) -> Result<Vec<Option<Bytes>>, StoreError>
    where
        F: FnOnce(LinkConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<Vec<Option<Bytes>>>>,
    {
        let (conn, _) = match tokio::time::timeout_at(until, self.link.get()).await {
            Ok(got) => got?,
            Err(_) => return Err(StoreError::Timeout(deadline)),
        };
        let sent = self.shared.now();
        match tokio::time::timeout_at(until, read(conn.clone())).await {
            Ok(values) => {
                let values = values?;
                self.shared.ack(conn.id(), sent);
                Ok(values)
            }
            Err(_) => {
                conn.discard();
                Err(StoreError::Timeout(deadline))
            }
        }
    }

    /// Keeps what `MGET`s of `entries` then `stamps` on the tracking connection returned
    /// (`values`, in that order; `None`: absent in Redis, not kept), unless something was
    /// dropped since `seq` was taken.
    pub(crate) fn fill(
        &self,
        seq: u64,
        (entries, entry_ttl): (&[&str], Duration),
        stamps: &[StampKey],
        values: &[Option<Bytes>],
    ) {
        let s = &*self.shared;
        // Under the drop lock: a drop is either before the check (nothing is kept) or after
        // the inserts (it removes them). Inserting first and undoing on a changed `seq`
        // would let another caller check an entry against a stale token in between.
        let _exclusive = s.drop_lock();
        if s.seq.load(SeqCst) != seq || values.len() != entries.len() + stamps.len() {
            return;
        }
        let (entry_values, stamp_values) = values.split_at(entries.len());
        for (entry, v) in entries.iter().zip(entry_values) {
            if let Some(bytes) = v {
                s.entries.insert(entry, bytes.clone(), Some(entry_ttl));
            }
        }
        for (k, v) in stamps.iter().zip(stamp_values) {
            if let Some(bytes) = v {
                s.stamps.insert(&k.key, bytes.clone(), k.ttl);
            }
        }
    }

    /// Keeps what an `MGET` of `stamps` alone returned, as [`fill`](Self::fill) does.
    pub(crate) fn fill_stamps(&self, seq: u64, stamps: &[StampKey], values: &[Option<Bytes>]) {
        self.fill(seq, (&[], Duration::ZERO), stamps, values);
    }

    /// The tokens of `stamps`, if all are held locally, with the stamp sequence before the
    /// lookup (as in [`Read::near`]).
    pub(crate) fn lookup_stamps(&self, stamps: &[StampKey]) -> Option<(Vec<Bytes>, u64)> {
        if !self.leased() {
            return None;
        }
        let s = &*self.shared;
        let stamp_seq = s.stamp_seq.load(SeqCst);
        let tokens = stamps
            .iter()
            .map(|k| s.stamps.get(&k.key))
            .collect::<Option<Vec<_>>>()?;
        Some((tokens, stamp_seq))
    }

    /// Drops the sequence key (this process just advanced it): like a message about it,
    /// entries stay checked.
    pub(crate) fn forget_sequence(&self, key: &StampKey) {
        let _exclusive = self.shared.drop_lock();
        self.shared.seq.fetch_add(1, SeqCst);
        self.shared.stamps.remove(&key.key);
    }

    /// Drops `keys` (stamps this process just changed in Redis).
    pub(crate) fn forget(&self, keys: &[StampKey]) {
        let _exclusive = self.shared.drop_lock();
        self.shared.seq.fetch_add(1, SeqCst);
        self.shared.stamp_seq.fetch_add(1, SeqCst);
        for k in keys {
            self.shared.stamps.remove(&k.key);
        }
    }

    /// Drops everything held (messages may have been missed), counted as a reset.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.shared.reset();
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.shared.entries.len() as u64
    }

    /// Invalidation messages received and resets, since the cache was built.
    pub(crate) fn counters(&self) -> (u64, u64) {
        (
            self.shared.invalidations.load(SeqCst),
            self.shared.resets.load(SeqCst),
        )
    }
}

impl Shared {
    /// µs since `origin`.
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    /// A request sent at `sent` on connection `id` was answered.
    fn ack(&self, id: u64, sent: u64) {
        if self.current.load(SeqCst) == id {
            self.acked.fetch_max(sent + 1, SeqCst);
        }
    }

    fn drop_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.drops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drop_all(&self) {
        let _exclusive = self.drop_lock();
        self.seq.fetch_add(1, SeqCst);
        self.stamp_seq.fetch_add(1, SeqCst);
        self.entries.clear();
        self.stamps.clear();
    }

    /// Drops everything because messages may have been missed (connection loss, flush).
    fn reset(&self) {
        self.drop_all();
        self.resets.fetch_add(1, SeqCst);
    }

    fn drop_keys(&self, keys: &[Value]) {
        let _exclusive = self.drop_lock();
        self.seq.fetch_add(1, SeqCst);
        for key in keys {
            let k = match key {
                Value::BulkString(k) => std::str::from_utf8(k).ok(),
                _ => None,
            };
            match k {
                Some(k) if is_entry_key(k) => self.entries.remove(k),
                // The invalidation sequence stamps no entry: checked entries stay checked.
                Some(k) if is_sequence_key(k) => self.stamps.remove(k),
                // A stamp (held or not: it may have been evicted locally), or a key that
                // is not ours to judge.
                _ => {
                    self.stamp_seq.fetch_add(1, SeqCst);
                    if let Some(k) = k {
                        self.stamps.remove(k);
                    }
                }
            }
        }
    }
}

/// Runs on the connection's reader, in the order messages arrive. (A lost connection also
/// fails its next request, which discards it from the link.)
fn on_push(shared: &Weak<Shared>, info: PushInfo) -> Result<(), ()> {
    let Some(shared) = shared.upgrade() else {
        return Err(());
    };
    match info.kind {
        PushKind::Invalidate => {
            shared.invalidations.fetch_add(1, SeqCst);
            match info.data.first() {
                Some(Value::Array(keys)) => shared.drop_keys(keys),
                // `null`: the whole keyspace was flushed.
                _ => shared.reset(),
            }
        }
        PushKind::Disconnection => shared.reset(),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A near cache that never connects: only what the tests put in and take out.
    pub(crate) fn offline() -> NearCache {
        let source = Source::node("redis://127.0.0.1:1", true, None).unwrap();
        let near = NearCache::new(
            source,
            100,
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(3600),
            None,
        );
        // As if a request had just been answered.
        near.shared.acked.store(1, SeqCst);
        near
    }

    pub(crate) fn key(name: &str) -> StampKey {
        StampKey {
            key: name.to_owned(),
            ttl: None,
        }
    }

    pub(crate) fn fill(near: &NearCache, seq: u64, entry: &str, tag: &StampKey) {
        let values = [
            Some(Bytes::from_static(b"entry")),
            Some(Bytes::from_static(b"token")),
        ];
        near.fill(
            seq,
            (&[entry], Duration::from_secs(60)),
            std::slice::from_ref(tag),
            &values,
        );
    }

    #[test]
    fn a_fill_is_served_until_its_stamp_is_forgotten() {
        let (near, tag) = (offline(), key("t"));
        fill(&near, near.seq(), "e", &tag);
        let read = near.lookup("e", std::slice::from_ref(&tag)).unwrap();
        assert_eq!(read.entry.as_deref(), Some(&b"entry"[..]));
        assert_eq!(read.stamps, [Bytes::from_static(b"token")]);
        let seq = read.near.unwrap();
        let entry = read.entry.unwrap();
        assert_eq!(near.checked("e"), None, "not checked yet");
        near.mark_checked("e", &entry, seq);
        assert_eq!(near.checked("e"), Some(entry));
        near.forget(std::slice::from_ref(&tag));
        assert_eq!(near.checked("e"), None, "any drop ends the checked state");
        assert!(near.lookup("e", &[tag]).is_none());
    }

    #[test]
    fn a_fill_that_raced_with_a_drop_is_not_kept() {
        let (near, tag) = (offline(), key("t"));
        let seq = near.seq();
        // The message for `t` is processed while the read that saw the old token is in flight.
        near.shared.drop_keys(&[Value::BulkString(b"t".to_vec())]);
        fill(&near, seq, "e", &tag);
        assert!(near.lookup("e", &[tag]).is_none());
        assert_eq!(near.entry_count(), 0);
    }

    #[test]
    fn entry_messages_keep_other_entries_checked_and_stamp_messages_do_not() {
        let near = offline();
        let entry = |n: u8| crate::keyspace::entry_key("ns", &[n; 32]);
        let tag = key(&crate::keyspace::tag_key("ns", "items"));
        for n in [1, 2] {
            fill(&near, near.seq(), &entry(n), &tag);
            let read = near.lookup(&entry(n), std::slice::from_ref(&tag)).unwrap();
            near.mark_checked(&entry(n), read.entry.as_ref().unwrap(), read.near.unwrap());
        }
        // Another process wrote entry 2 (every miss does): entry 1 stays checked.
        near.shared
            .drop_keys(&[Value::BulkString(entry(2).into_bytes())]);
        assert!(near.checked(&entry(1)).is_some());
        assert!(near.checked(&entry(2)).is_none());
        // Its tag changed: nothing stays checked, even if the tag was evicted locally.
        near.shared.stamps.remove(&tag.key);
        near.shared
            .drop_keys(&[Value::BulkString(tag.key.clone().into_bytes())]);
        assert!(near.checked(&entry(1)).is_none());
        assert!(near.lookup(&entry(1), &[tag]).is_none());
    }

    #[test]
    fn sequence_messages_keep_entries_checked() {
        let near = offline();
        let entry = crate::keyspace::entry_key("ns", &[1; 32]);
        let tag = key(&crate::keyspace::tag_key("ns", "items"));
        fill(&near, near.seq(), &entry, &tag);
        let read = near.lookup(&entry, std::slice::from_ref(&tag)).unwrap();
        near.mark_checked(&entry, read.entry.as_ref().unwrap(), read.near.unwrap());
        // Every invalidation anywhere in the namespace advances its sequence.
        let sequence = crate::keyspace::sequence_key("ns");
        near.shared
            .drop_keys(&[Value::BulkString(sequence.clone().into_bytes())]);
        near.forget_sequence(&key(&sequence));
        assert!(near.checked(&entry).is_some());
    }

    #[test]
    fn a_reset_drops_everything_and_is_counted() {
        let (near, tag) = (offline(), key("t"));
        fill(&near, near.seq(), "e", &tag);
        near.shared.reset();
        assert!(near.lookup("e", &[tag]).is_none());
        assert_eq!(near.counters().1, 1);
    }
}
