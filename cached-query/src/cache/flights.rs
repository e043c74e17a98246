//! In-process single-flight: concurrent misses on the same key *and the same tag versions*
//! share one query. Followers receive the leader's serialised result (so values need no
//! `Clone`); if the leader fails or is cancelled they run their own query.
//!
//! A stored result also serves the callers whose read missed *before* it landed: under a
//! stampede the scheduler can run them long after the leader finished, and each would run
//! the query again. Callers take a [`ticket`](Flights::ticket) before their read; a landed
//! result is joinable only with an earlier ticket, so a read that started after the write
//! (and still missed: the entry was deleted or corrupt) runs its own query. The key
//! holds the tag versions, so such a result is exactly the entry those callers missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Landed results are kept only up to this size (they are also in the backend) …
const KEEP_LANDED_BYTES: usize = 64 * 1024;
/// … and dropped all at once when more than this many, or more than `SWEEP_ABOVE_BYTES`, are
/// kept. One landing (a batch's included) keeps at most `KEEP_LANDED` of them, and at most
/// `KEEP_LANDED_TOTAL` bytes: half, so that a batch's results outlive the next landing.
const SWEEP_ABOVE: usize = 256;
const SWEEP_ABOVE_BYTES: usize = 4 * 1024 * 1024;
const KEEP_LANDED: usize = SWEEP_ABOVE / 2;
const KEEP_LANDED_TOTAL: usize = SWEEP_ABOVE_BYTES / 2;

type Payload = Option<Arc<[u8]>>;

/// A flight: the leader's id (so only it removes the entry), its result channel, and the
/// ticket at which its result was stored (then it is kept for earlier readers).
#[derive(Debug)]
struct Flight {
    id: u64,
    rx: watch::Receiver<Payload>,
    landed: Option<u64>,
    /// A batch's flight: set while that batch waits for other flights before its query.
    waiting: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Default)]
pub(crate) struct Flights {
    next_id: AtomicU64,
    clock: AtomicU64,
    waiting: AtomicUsize,
    map: Mutex<HashMap<Vec<u8>, Flight>>,
    /// Landed flights kept in `map`, and their bytes (at most: one replaced by a new flight
    /// stays counted until the next sweep), changed under its lock.
    landed: AtomicUsize,
    landed_bytes: AtomicUsize,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Payload>),
    /// A batch's key whose flight belongs to a batch that is itself waiting: queried by this
    /// batch too, unshared, so that waits never chain.
    Alone,
}

/// The caller that runs the query. Dropping it without [`Leader::publish`] (error, panic,
/// cancellation) releases the followers to run their own queries.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: Vec<u8>,
    id: u64,
    tx: watch::Sender<Payload>,
}

impl Flights {
    /// Taken by a caller just before its backend read (a load: hits stay write-free).
    pub(crate) fn ticket(&self) -> u64 {
        self.clock.load(SeqCst)
    }

    /// Taken by a caller when it arrives: with [`join`](Self::join)'s `started_after`, it
    /// joins only flights whose query started after that point.
    pub(crate) fn arrival(&self) -> u64 {
        self.next_id.load(SeqCst)
    }

    /// Joins the flight for `key` (or one that landed after `ticket`), or leads a new one.
    /// With `started_after` (an [`arrival`](Self::arrival)), only a flight whose leader
    /// started after it is joined: without stamps (Redis unreadable) the key cannot tell a
    /// query that began before an invalidation this caller has seen.
    pub(crate) fn join(&self, key: Vec<u8>, ticket: u64, started_after: Option<u64>) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        self.join_locked(&mut map, key, ticket, started_after, None)
    }

    /// [`join`](Self::join) for a batch's keys, all under one lock, so every flight a batch
    /// follows was created before any flight it leads. A batch waits for the flights it
    /// follows before running its one query for the rest, with `waiting` set meanwhile (its
    /// flights carry it): a flight whose batch is waiting is not followed by another batch
    /// ([`Role::Alone`]). Waits thus go only to older flights (no cycle) whose query is
    /// running (no chain: a batch waits at most for queries already under way).
    pub(crate) fn join_many(
        &self,
        keys: Vec<Vec<u8>>,
        ticket: u64,
        started_after: Option<u64>,
        waiting: &Arc<AtomicBool>,
    ) -> Vec<Role<'_>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        keys.into_iter()
            .map(|key| self.join_locked(&mut map, key, ticket, started_after, Some(waiting)))
            .collect()
    }

    fn join_locked(
        &self,
        map: &mut HashMap<Vec<u8>, Flight>,
        key: Vec<u8>,
        ticket: u64,
        started_after: Option<u64>,
        batch: Option<&Arc<AtomicBool>>,
    ) -> Role<'_> {
        let joinable = |f: &&Flight| {
            f.landed.is_none_or(|landed| ticket < landed)
                && started_after.is_none_or(|arrived| f.id >= arrived)
        };
        if let Some(flight) = map.get(&key).filter(joinable) {
            let chained =
                flight.landed.is_none() && flight.waiting.as_ref().is_some_and(|w| w.load(SeqCst));
            if batch.is_some() && chained {
                return Role::Alone;
            }
            return Role::Follower(flight.rx.clone());
        }
        let id = self.next_id.fetch_add(1, SeqCst);
        let (tx, rx) = watch::channel(None);
        map.insert(
            key.clone(),
            Flight {
                id,
                rx,
                landed: None,
                waiting: batch.cloned(),
            },
        );
        Role::Leader(Leader {
            flights: self,
            key,
            id,
            tx,
        })
    }

    /// Callers currently waiting for another caller's query.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Waits for the leader; `None` if it went away without a result.
    pub(crate) async fn follow(&self, mut rx: watch::Receiver<Payload>) -> Option<Arc<[u8]>> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting);
        rx.wait_for(Option::is_some).await.ok()?.clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Leader<'_> {
    /// Hands `payload` to the followers at once (before it is stored, so none waits for
    /// that write); [`landed`](Self::landed) follows.
    pub(crate) fn share(&self, payload: Arc<[u8]>) {
        self.tx.send_replace(Some(payload));
    }

    /// `stored`: the shared result was written to the backend under this key's tag
    /// versions, so it is kept for callers whose read came before.
    pub(crate) fn landed(self, stored: bool) {
        let flights = self.flights;
        flights.land_all(vec![(self, stored)]);
    }
}

impl Flights {
    /// [`Leader::landed`] for several leaders at once (a batch): one lock, one sweep.
    pub(crate) fn land_all(&self, leaders: Vec<(Leader<'_>, bool)>) {
        let mut total = 0;
        let kept: Vec<&Leader<'_>> = leaders
            .iter()
            .filter(|(_, stored)| *stored)
            .map(|(leader, _)| leader)
            .filter(|leader| {
                let size = leader.tx.borrow().as_ref().map_or(usize::MAX, |p| p.len());
                let keep = size <= KEEP_LANDED_BYTES && total + size <= KEEP_LANDED_TOTAL;
                total += if keep { size } else { 0 };
                keep
            })
            .take(KEEP_LANDED)
            .collect();
        if kept.is_empty() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Counted, not measured by the map's size: a large batch in flight must not make
        // every landing scan the map.
        if self.landed.load(Relaxed) + kept.len() > SWEEP_ABOVE
            || self.landed_bytes.load(Relaxed) + total > SWEEP_ABOVE_BYTES
        {
            map.retain(|_, f| f.landed.is_none());
            self.landed.store(0, Relaxed);
            self.landed_bytes.store(0, Relaxed);
        }
        // Tickets taken from now on are >= landed; earlier ones are below it.
        let landed = self.clock.fetch_add(1, SeqCst) + 1;
        for leader in kept {
            if let Some(flight) = map.get_mut(&leader.key).filter(|f| f.id == leader.id) {
                flight.landed = Some(landed);
                self.landed.fetch_add(1, Relaxed);
                let size = leader.tx.borrow().as_ref().map_or(0, |p| p.len());
                self.landed_bytes.fetch_add(size, Relaxed);
            }
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|f| f.id == self.id && f.landed.is_none())
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_bytes() {
        let f = Flights::default();
        let Role::Leader(leader) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("first caller must lead")
        };
        let Role::Follower(rx) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("second caller must follow")
        };
        let (got, ()) = tokio::join!(f.follow(rx), async {
            while f.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            leader.share(Arc::from(&b"42"[..]));
            leader.landed(false);
        });
        assert_eq!(got.as_deref(), Some(&b"42"[..]));
        assert_eq!(f.waiting(), 0);
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn a_stored_result_serves_only_reads_from_before_it_landed() {
        let f = Flights::default();
        let Role::Leader(leader) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("first caller must lead")
        };
        let missed_before = f.ticket();
        leader.share(Arc::from(&b"7"[..]));
        leader.landed(true);
        let Role::Follower(rx) = f.join(b"k".to_vec(), missed_before, None) else {
            panic!("a caller whose read came before the write joins the stored result")
        };
        assert_eq!(f.follow(rx).await.as_deref(), Some(&b"7"[..]));
        // A read after the write that still missed (entry deleted, corrupt): run again.
        assert!(matches!(
            f.join(b"k".to_vec(), f.ticket(), None),
            Role::Leader(_)
        ));
    }

    #[tokio::test]
    async fn an_unstored_result_is_not_kept() {
        let f = Flights::default();
        let Role::Leader(leader) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("first caller must lead")
        };
        let missed_before = f.ticket();
        leader.share(Arc::from(&b"7"[..]));
        leader.landed(false);
        assert!(matches!(
            f.join(b"k".to_vec(), missed_before, None),
            Role::Leader(_)
        ));
    }

    #[test]
    fn without_stamps_only_a_query_that_started_after_arrival_is_shared() {
        let f = Flights::default();
        let arrived = f.arrival();
        let Role::Leader(_older) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("first caller must lead")
        };
        let late = f.arrival();
        // Arrived after that query started: it must run its own.
        let Role::Leader(_own) = f.join(b"k".to_vec(), f.ticket(), Some(late)) else {
            panic!("a query that started before this caller arrived was joined")
        };
        // Arrived before the (new) query started: sharing it is safe.
        assert!(matches!(
            f.join(b"k".to_vec(), f.ticket(), Some(arrived)),
            Role::Follower(_)
        ));
    }

    #[test]
    fn a_batch_keeps_its_results_and_is_not_followed_while_it_waits() {
        let f = Flights::default();
        let waiting = Arc::new(AtomicBool::new(true));
        let keys = |n: u32| (0..n).map(|i| i.to_le_bytes().to_vec()).collect();
        let roles = f.join_many(keys(1000), f.ticket(), None, &waiting);
        // Another batch meets them while this one waits: it queries them apart.
        let other = Arc::new(AtomicBool::new(true));
        let theirs = f.join_many(keys(3), f.ticket(), None, &other);
        assert!(theirs.iter().all(|r| matches!(r, Role::Alone)));
        waiting.store(false, SeqCst);
        assert!(matches!(
            f.join(keys(1).remove(0), f.ticket(), None),
            Role::Follower(_)
        ));
        let missed_before = f.ticket();
        let leaders = roles
            .into_iter()
            .map(|r| match r {
                Role::Leader(l) => {
                    l.share(Arc::from(&b"1"[..]));
                    (l, true)
                }
                _ => panic!("a new key is led"),
            })
            .collect();
        f.land_all(leaders);
        // Another landing does not sweep them.
        let Role::Leader(other) = f.join(b"other".to_vec(), f.ticket(), None) else {
            panic!("a new key is led")
        };
        other.share(Arc::from(&b"2"[..]));
        other.landed(true);
        // The first 128 (of small results) are kept, for callers that read before the write.
        for (i, key) in keys(1000).into_iter().enumerate() {
            let joined = matches!(f.join(key, missed_before, None), Role::Follower(_));
            assert_eq!(joined, i < KEEP_LANDED, "{i}");
        }
    }

    #[test]
    fn landed_results_stay_bounded_however_large_the_batch() {
        let f = Flights::default();
        let waiting = Arc::new(AtomicBool::new(false));
        for round in 0..20u32 {
            let keys = (0..5000u32)
                .map(|i| (round * 5000 + i).to_le_bytes().to_vec())
                .collect();
            let leaders = f
                .join_many(keys, f.ticket(), None, &waiting)
                .into_iter()
                .map(|r| match r {
                    Role::Leader(l) => {
                        l.share(Arc::from(vec![0u8; 60_000]));
                        (l, true)
                    }
                    _ => panic!("a new key is led"),
                })
                .collect();
            f.land_all(leaders);
            let map = f.map.lock().unwrap();
            let kept: usize = map
                .values()
                .filter(|fl| fl.landed.is_some())
                .map(|fl| fl.rx.borrow().as_ref().map_or(0, |p| p.len()))
                .sum();
            assert!(
                kept <= SWEEP_ABOVE_BYTES,
                "round {round}: {kept} bytes kept"
            );
            assert!(
                map.len() <= 2 * SWEEP_ABOVE,
                "round {round}: {} flights",
                map.len()
            );
        }
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_empty_handed() {
        let f = Flights::default();
        let leader = f.join(b"k".to_vec(), f.ticket(), None);
        let Role::Follower(rx) = f.join(b"k".to_vec(), f.ticket(), None) else {
            panic!("second caller must follow")
        };
        drop(leader);
        assert_eq!(f.follow(rx).await, None);
        assert!(matches!(
            f.join(b"k".to_vec(), f.ticket(), None),
            Role::Leader(_)
        ));
    }
}
