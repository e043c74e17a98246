//! `reset_timings` is process-wide, so it gets a test binary of its own.

use cached_query::{reset_timings, timed, timings};

#[timed(name = "reset.me")]
fn work(n: u32) -> u32 {
    n + 1
}

#[test]
fn reset_forgets_statistics() {
    for n in 0..3 {
        work(n);
    }
    let count = |name: &str| {
        timings()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.count)
    };
    assert_eq!(count("reset.me"), Some(3));
    reset_timings();
    assert_eq!(
        count("reset.me"),
        None,
        "series without calls are not listed"
    );
    work(1);
    assert_eq!(count("reset.me"), Some(1));
}
