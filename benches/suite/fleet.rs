//! Multi-process cases (`--only fleet`): several processes of this binary, each with its own
//! cache on one namespace, started together by the parent (`--fleet-child …` is a child's
//! command line: it prints `ready`, waits for a line on stdin, runs, prints one `result`
//! line). The query sleeps 20 ms in PostgreSQL (`pg_sleep`), so that a caller that waited on
//! a query is told from a hit (well under 10 ms) by its latency alone. Also here, in the
//! parent: what a lease adds to a miss.

use super::{DB_EXECUTIONS, SETTINGS, User, percentile, pool, us};
use cached_query::{Cache, cached_query};
use sqlx::PgPool;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

const PROCESSES: usize = 8;
const CALLERS: usize = 125;
/// A call slower than this waited on a query (a hit takes well under a millisecond here).
const WAITED: Duration = Duration::from_millis(10);

async fn slow_user(pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    DB_EXECUTIONS.fetch_add(1, Relaxed);
    sqlx::query_as(
        "SELECT id, name, email, bio, karma FROM cq_bench_users, pg_sleep(0.02) WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
}

#[cached_query(cache = cache, ttl = 600, invalidate = "user:<id>", skip(pool))]
async fn cold_user(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    slow_user(pool, id).await
}

/// Expires every 2 s.
#[cached_query(cache = cache, ttl = 2, skip(pool))]
async fn hot_user(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    slow_user(pool, id).await
}

/// Expires every 2 s; hits in the last second may refresh it.
#[cached_query(cache = cache, ttl = 2, refresh_ahead = 1, skip(pool))]
async fn hot_user_refreshed(cache: &Cache, pool: &PgPool, id: i64) -> Result<User, sqlx::Error> {
    slow_user(pool, id).await
}

async fn fleet_cache(namespace: &str, leases: bool) -> Cache {
    Cache::builder()
        .redis(&SETTINGS.redis_url)
        .namespace(namespace)
        .leases(leases)
        .build()
        .await
        .unwrap()
}

/// A child's run: `--fleet-child <cold|steady|expiring|refresh> <namespace> <leases 0|1>
/// <id> <seconds>`.
pub(crate) async fn child(args: &[String]) {
    let [case, namespace, leases, id, secs] = args else {
        panic!("--fleet-child <case> <namespace> <leases> <id> <seconds>: {args:?}")
    };
    let id: i64 = id.parse().unwrap();
    let run_for = Duration::from_secs(secs.parse().unwrap());
    let cache = fleet_cache(namespace, leases == "1").await;
    // Connections made before the start.
    cache.invalidate("fleet:warm").await.unwrap();
    println!("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    let start = Instant::now();
    let mut latencies: Vec<Duration> = Vec::new();
    if case == "cold" {
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    assert_eq!(cold_user(&cache, pool(), id).await.unwrap().id, id);
                    t.elapsed()
                })
            })
            .collect();
        for c in callers {
            latencies.push(c.await.unwrap());
        }
    } else {
        // 4 readers, each calling every 20 ms: 200 calls/s per process.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (cache, case) = (cache.clone(), case.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut next = Instant::now();
                    while start.elapsed() < run_for {
                        let t = Instant::now();
                        let user = match case.as_str() {
                            "refresh" => hot_user_refreshed(&cache, pool(), id).await,
                            "expiring" => hot_user(&cache, pool(), id).await,
                            _ => cold_user(&cache, pool(), id).await,
                        };
                        assert_eq!(user.unwrap().id, id);
                        lat.push(t.elapsed());
                        next += Duration::from_millis(20);
                        tokio::time::sleep_until(next.into()).await;
                    }
                    lat
                })
            })
            .collect();
        for r in readers {
            latencies.extend(r.await.unwrap());
        }
    }
    let stats = cache.stats();
    let micros: Vec<String> = latencies
        .iter()
        .map(|d| d.as_micros().to_string())
        .collect();
    println!(
        "result {} {} {} {} {}",
        DB_EXECUTIONS.load(Relaxed),
        start.elapsed().as_micros(),
        stats.lease_waits,
        stats.refreshes,
        micros.join(",")
    );
}

/// What the processes of one round reported, summed.
#[derive(Default)]
struct Round {
    executions: u64,
    wall: Duration,
    lease_waits: u64,
    refreshes: u64,
    latencies: Vec<Duration>,
}

/// Starts `PROCESSES` children on `case`, lets them go together, and sums their reports.
fn round(case: &str, namespace: &str, leases: bool, id: i64, secs: u64) -> Round {
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            let mut cmd = Command::new(&exe);
            cmd.arg("--fleet-child")
                .args([case, namespace, if leases { "1" } else { "0" }])
                .args([id.to_string(), secs.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            if SETTINGS.smoke {
                cmd.env("CQ_BENCH_SMOKE", "1");
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let mut outs: Vec<_> = children
        .iter_mut()
        .map(|c| std::io::BufReader::new(c.stdout.take().unwrap()))
        .collect();
    let mut line = String::new();
    for out in &mut outs {
        while !line.starts_with("ready") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "a child exited early"
            );
        }
        line.clear();
    }
    let start = Instant::now();
    for c in &mut children {
        writeln!(c.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let mut sum = Round::default();
    for out in &mut outs {
        while !line.starts_with("result") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "a child exited early"
            );
        }
        let mut parts = line.split_whitespace().skip(1);
        let mut next = || parts.next().unwrap_or_default().to_owned();
        sum.executions += next().parse::<u64>().unwrap();
        let _child_wall = next();
        sum.lease_waits += next().parse::<u64>().unwrap();
        sum.refreshes += next().parse::<u64>().unwrap();
        sum.latencies.extend(
            next()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| Duration::from_micros(s.parse().unwrap())),
        );
        line.clear();
    }
    sum.wall = start.elapsed();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    sum.latencies.sort();
    sum
}

pub(crate) async fn fleet_case() {
    let ns = |name: &str| format!("{}:fleet-{name}", SETTINGS.prefix);
    println!(
        "\n### Fleet: {PROCESSES} processes, one cold key ({CALLERS} concurrent callers each, \
         a 20 ms query)\n"
    );
    println!(
        "| leases | round | database executions | callers that waited on a lease | wall time |"
    );
    println!("|---|---:|---:|---:|---:|");
    let rounds = if SETTINGS.smoke { 1 } else { 3 };
    for leases in [false, true] {
        for r in 0..rounds {
            let round = round("cold", &ns(&format!("cold-{leases}")), leases, r + 1, 0);
            println!(
                "| {} | {r} | {} | {} | {:.1} ms |",
                if leases { "on" } else { "off" },
                round.executions,
                round.lease_waits,
                round.wall.as_secs_f64() * 1e3
            );
        }
    }

    let secs = if SETTINGS.smoke { 3 } else { 11 };
    println!(
        "\n### Fleet: a hot key read for {secs} s ({PROCESSES} processes × 4 readers × 50 \
         calls/s, TTL 2 s: {} expiries, a 20 ms query; the key is cached before)\n",
        secs / 2
    );
    println!(
        "| entry | leases | calls | waited on a query (≥ 10 ms) | per expiry | refreshes | \
         database executions | p50 | p99 | p99.9 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cases = [
        ("steady", false, "never expires (baseline)"),
        ("expiring", false, "expires"),
        ("expiring", true, "expires"),
        ("refresh", false, "expires, `refresh_ahead = 1`"),
        ("refresh", true, "expires, `refresh_ahead = 1`"),
    ];
    for (i, (case, leases, what)) in cases.into_iter().enumerate() {
        let (name, id) = (format!("hot-{case}-{leases}"), 1 + i as i64);
        // Cached before the round: what follows are expiries only.
        let cache = fleet_cache(&ns(&name), false).await;
        match case {
            "steady" => cold_user(&cache, pool(), id).await,
            "expiring" => hot_user(&cache, pool(), id).await,
            _ => hot_user_refreshed(&cache, pool(), id).await,
        }
        .unwrap();
        let round = round(case, &ns(&name), leases, id, secs);
        let waited = round.latencies.iter().filter(|l| **l >= WAITED).count();
        let lat = &round.latencies;
        println!(
            "| {what} | {} | {} | {waited} | {:.1} | {} | {} | {:.0} µs | {:.0} µs | {:.0} µs |",
            if leases { "on" } else { "off" },
            lat.len(),
            waited as f64 / (secs / 2) as f64,
            round.refreshes,
            round.executions,
            us(percentile(lat, 0.5)),
            us(percentile(lat, 0.99)),
            us(percentile(lat, 0.999)),
        );
    }
    lease_cost().await;
}

#[cached_query(cache = cache, ttl = 60, invalidate = "user:<id>", skip(pool))]
async fn miss_user(cache: &Cache, pool: &PgPool, id: i64, nonce: u64) -> Result<User, sqlx::Error> {
    let _ = nonce;
    super::select_user(pool, id).await
}

/// A miss (a fresh key every call, the plain 0.1 ms query) with and without leases: p50,
/// and the Redis commands per miss from `INFO commandstats`.
async fn lease_cost() {
    let n: u64 = if SETTINGS.smoke { 50 } else { 3_000 };
    println!("\n### What a lease adds to a miss ({n} misses, one caller, a 0.1 ms query)\n");
    println!("| leases | p50 | p99 | Redis commands per miss |\n|---|---:|---:|---:|");
    let mut conn = super::raw_redis().await;
    for leases in [false, true] {
        let cache = fleet_cache(&format!("{}:lease-cost-{leases}", SETTINGS.prefix), leases).await;
        miss_user(&cache, pool(), 1, 0).await.unwrap();
        let before = total_calls(&mut conn).await;
        let mut lat = Vec::new();
        for i in 1..=n {
            let start = Instant::now();
            miss_user(&cache, pool(), 1 + (i as i64 % 100), i)
                .await
                .unwrap();
            lat.push(start.elapsed());
        }
        // The INFO calls themselves are counted too: one before, one after.
        let commands = total_calls(&mut conn).await - before - 1;
        lat.sort();
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.2} |",
            if leases { "on" } else { "off" },
            us(percentile(&lat, 0.5)),
            us(percentile(&lat, 0.99)),
            commands as f64 / n as f64
        );
    }
}

/// Commands the Redis server ran so far (`INFO commandstats`, every command summed).
async fn total_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}
