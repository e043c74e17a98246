//! In-process single-flight: concurrent misses on the same key *and the same tag versions*
//! share one query. Followers receive the leader's serialised result (so values need no
//! `Clone`); if the leader fails or is cancelled they run their own query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

type Payload = Option<Arc<[u8]>>;
/// A flight in progress: the leader's id (so only it removes the entry) and its result channel.
type InFlight = (u64, watch::Receiver<Payload>);

#[derive(Debug, Default)]
pub(crate) struct Flights {
    next_id: AtomicU64,
    waiting: AtomicUsize,
    map: Mutex<HashMap<Vec<u8>, InFlight>>,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Payload>),
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
    pub(crate) fn join(&self, key: Vec<u8>) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = map.get(&key) {
            return Role::Follower(rx.clone());
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), (id, rx));
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
    pub(crate) fn publish(self, payload: Arc<[u8]>) {
        self.tx.send_replace(Some(payload));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
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
        let Role::Leader(leader) = f.join(b"k".to_vec()) else {
            panic!("first caller must lead")
        };
        let Role::Follower(rx) = f.join(b"k".to_vec()) else {
            panic!("second caller must follow")
        };
        let (got, ()) = tokio::join!(f.follow(rx), async {
            while f.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            leader.publish(Arc::from(&b"42"[..]));
        });
        assert_eq!(got.as_deref(), Some(&b"42"[..]));
        assert_eq!(f.waiting(), 0);
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_empty_handed() {
        let f = Flights::default();
        let leader = f.join(b"k".to_vec());
        let Role::Follower(rx) = f.join(b"k".to_vec()) else {
            panic!("second caller must follow")
        };
        drop(leader);
        assert_eq!(f.follow(rx).await, None);
        assert!(matches!(f.join(b"k".to_vec()), Role::Leader(_)));
    }
}
