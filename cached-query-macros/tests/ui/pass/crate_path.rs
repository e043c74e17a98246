//! `crate = path` on all three attributes, alone and stacked in both orders, through a
//! re-export of the runtime crate under another name. The attributes' imports count as used.
#![deny(unused_imports)]

mod deps {
    pub use ::cached_query as cq;
}

use deps::cq::{cached_query, invalidates, timed};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

#[cached_query(crate = deps::cq, ttl = 5)]
async fn cached(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[invalidates("user:<id>", crate = deps::cq)]
async fn invalidating(id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

#[timed(crate = deps::cq, name = "crate_path.timed")]
async fn timed_alone(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[timed(crate = deps::cq, name = "crate_path.sync")]
fn timed_sync(id: i64) -> i64 {
    id
}

#[cached_query(crate = deps::cq)]
#[timed(crate = deps::cq, name = "crate_path.inside")]
async fn timed_inside(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[deps::cq::timed(name = "crate_path.outside", crate = deps::cq)]
#[deps::cq::cached_query(crate = deps::cq, version = 2)]
async fn timed_outside(id: i64) -> Result<i64, String> {
    Ok(id)
}

/// Runs a future that never waits (no cache is installed, so every call runs its body).
fn run<F: Future>(fut: F) -> F::Output {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("nothing here waits"),
    }
}

fn main() {
    assert_eq!(run(cached(1)), Ok(1));
    assert_eq!(run(invalidating(1)), Ok(()));
    assert_eq!(run(timed_alone(2)), Ok(2));
    assert_eq!(timed_sync(3), 3);
    assert_eq!(run(timed_inside(4)), Ok(4));
    assert_eq!(run(timed_outside(5)), Ok(5));
    let names: Vec<String> = deps::cq::timings().into_iter().map(|t| t.name).collect();
    for name in ["crate_path.timed", "crate_path.sync", "crate_path.inside", "crate_path.outside"] {
        assert!(names.iter().any(|n| n == name), "{name} not timed: {names:?}");
    }
}
