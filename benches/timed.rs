//! Cost of `#[timed]` on a call below its threshold: `cargo bench --bench timed`.
//!
//! Prints nanoseconds per call for a plain function and the same function with `#[timed]`,
//! sync and async (awaited in a loop inside one task, as application code does).

use cached_query::timed;
use std::hint::black_box;
use std::time::Instant;

#[inline(never)]
fn plain(x: u64) -> u64 {
    x.wrapping_mul(31).rotate_left(7)
}

#[timed(name = "bench.sync")]
#[inline(never)]
fn instrumented(x: u64) -> u64 {
    x.wrapping_mul(31).rotate_left(7)
}

#[timed(name = "bench.async")]
async fn instrumented_async(x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31).rotate_left(7))
}

fn per_call(iterations: u64, mut f: impl FnMut(u64) -> u64) -> f64 {
    for i in 0..iterations / 10 {
        black_box(f(i)); // warm-up
    }
    let start = Instant::now();
    for i in 0..iterations {
        black_box(f(black_box(i)));
    }
    start.elapsed().as_nanos() as f64 / iterations as f64
}

/// The same measurement for async functions, awaited in a loop inside one task.
fn per_call_async<F: std::future::Future<Output = u64>>(
    rt: &tokio::runtime::Runtime,
    iterations: u64,
    f: impl Fn(u64) -> F,
) -> f64 {
    rt.block_on(async {
        for i in 0..iterations / 10 {
            black_box(f(i).await);
        }
        let start = Instant::now();
        for i in 0..iterations {
            black_box(f(black_box(i)).await);
        }
        start.elapsed().as_nanos() as f64 / iterations as f64
    })
}

#[inline(never)]
async fn plain_async(x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31).rotate_left(7))
}

fn main() {
    let smoke =
        std::env::args().any(|a| a == "--smoke") || std::env::var_os("CQ_BENCH_SMOKE").is_some();
    let n = if smoke { 10_000 } else { 5_000_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    println!("#[timed] overhead per call below threshold ({n} calls each, best of 5 runs)");
    let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(f64::MAX, f64::min);
    let base = best(&|| per_call(n, plain));
    let sync = best(&|| per_call(n, instrumented));
    println!(
        "  sync : plain {base:6.1} ns   timed {sync:6.1} ns   overhead {:6.1} ns",
        sync - base
    );
    let base = best(&|| per_call_async(&rt, n, |x| async move { plain_async(x).await.unwrap() }));
    let timed = best(&|| {
        per_call_async(
            &rt,
            n,
            |x| async move { instrumented_async(x).await.unwrap() },
        )
    });
    println!(
        "  async: plain {base:6.1} ns   timed {timed:6.1} ns   overhead {:6.1} ns",
        timed - base
    );
}
