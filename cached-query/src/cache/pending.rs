//! Invalidations that did not reach Redis. While any are pending this process reads
//! nothing from Redis and serves nothing from its near cache: it first delivers them, or
//! runs queries uncached.

use std::collections::HashSet;
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

/// What is owed to Redis: tags, and whether the namespace generation (`clear`).
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) tags: HashSet<String>,
    pub(crate) generation: bool,
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
    pub(crate) fn defer(&self, add: impl FnOnce(&mut State)) {
        let mut state = self.state();
        add(&mut state);
        if state.tags.len() > MAX_PENDING_TAGS {
            state.tags.clear();
            state.generation = true;
        }
        self.any.store(true, Ordering::SeqCst);
    }

    /// The pending tags and generation flag, to deliver.
    pub(crate) fn snapshot(&self) -> (Vec<String>, bool) {
        let state = self.state();
        (state.tags.iter().cloned().collect(), state.generation)
    }

    /// Removes what a successful delivery of `snapshot()`'s result covered.
    pub(crate) fn delivered(&self, tags: &[String], generation: bool) {
        let mut state = self.state();
        for t in tags {
            state.tags.remove(t);
        }
        if generation {
            state.generation = false;
        }
        if state.tags.is_empty() && !state.generation {
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
