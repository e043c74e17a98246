//! Invalidations that did not reach Redis. While any are pending this process reads
//! nothing from Redis and serves nothing from its near cache: it first delivers them, or
//! runs queries uncached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Beyond this many undelivered tags, recovery bumps the whole namespace instead.
const MAX_PENDING_TAGS: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct Pending {
    any: AtomicBool,
    state: Mutex<State>,
    /// Held by the one call delivering them.
    delivering: tokio::sync::Mutex<()>,
    /// Whether a background task is retrying them.
    pub(crate) retrying: AtomicBool,
}

/// What is owed to Redis: tags, and whether the namespace generation (`clear`), each with
/// the sequence number of its latest deferral, so that a delivery only settles what it sent
/// (an invalidation deferred again while it was under way stays owed).
#[derive(Debug, Default)]
struct State {
    tags: HashMap<String, u64>,
    generation: Option<u64>,
    seq: u64,
}

/// What one delivery sends, with the sequence numbers it settles.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    tags: Vec<(String, u64)>,
    generation: Option<u64>,
}

impl Snapshot {
    pub(crate) fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.iter().map(|(t, _)| t.as_str())
    }

    pub(crate) fn generation(&self) -> bool {
        self.generation.is_some()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.generation.is_none()
    }
}

impl Pending {
    /// Whether anything is pending (one atomic load: the hot path asks on every call).
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records undelivered invalidations (too many tags become one namespace bump).
    pub(crate) fn defer(&self, tags: &[String], generation: bool) {
        if tags.is_empty() && !generation {
            return;
        }
        let mut state = self.state();
        state.seq += 1;
        let seq = state.seq;
        for t in tags {
            state.tags.insert(t.clone(), seq);
        }
        if generation || state.tags.len() > MAX_PENDING_TAGS {
            state.generation = Some(seq);
        }
        if state.tags.len() > MAX_PENDING_TAGS {
            state.tags.clear();
        }
        self.any.store(true, Ordering::SeqCst);
    }

    /// The pending tags and generation flag, to deliver.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = self.state();
        Snapshot {
            tags: state.tags.iter().map(|(t, s)| (t.clone(), *s)).collect(),
            generation: state.generation,
        }
    }

    /// Settles what a successful delivery of `sent` covered: entries not deferred again since.
    pub(crate) fn delivered(&self, sent: &Snapshot) {
        let mut state = self.state();
        for (t, seq) in &sent.tags {
            if state.tags.get(t) == Some(seq) {
                state.tags.remove(t);
            }
        }
        if sent.generation.is_some() && state.generation == sent.generation {
            state.generation = None;
        }
        if state.tags.is_empty() && state.generation.is_none() {
            self.any.store(false, Ordering::SeqCst);
        }
    }

    /// The right to deliver: waits for another delivery when `wait`, else `None` if one
    /// is under way.
    pub(crate) async fn lock_delivery(
        &self,
        wait: bool,
    ) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if wait {
            Some(self.delivering.lock().await)
        } else {
            self.delivering.try_lock().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_delivery_settles_only_what_it_sent() {
        let p = Pending::default();
        p.defer(&tags(&["t", "u"]), false);
        let sent = p.snapshot();
        // A new invalidation of `t` (after a new commit) while the delivery is under way.
        p.defer(&tags(&["t"]), false);
        p.delivered(&sent);
        assert!(p.any(), "t is still owed");
        let again = p.snapshot();
        assert_eq!(again.tags().collect::<Vec<_>>(), ["t"]);
        p.delivered(&again);
        assert!(!p.any());
    }

    #[test]
    fn a_clear_deferred_during_a_delivery_stays_owed() {
        let p = Pending::default();
        p.defer(&[], true);
        let sent = p.snapshot();
        p.defer(&[], true);
        p.delivered(&sent);
        assert!(p.any() && p.snapshot().generation());
    }

    #[test]
    fn nothing_owed_is_not_pending() {
        let p = Pending::default();
        p.defer(&[], false);
        assert!(!p.any());
    }

    #[test]
    fn too_many_tags_become_one_namespace_bump() {
        let p = Pending::default();
        let many: Vec<String> = (0..=MAX_PENDING_TAGS).map(|i| i.to_string()).collect();
        p.defer(&many, false);
        let s = p.snapshot();
        assert!(s.generation() && s.tags().next().is_none());
    }
}
