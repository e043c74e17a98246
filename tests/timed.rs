//! `#[timed]` on real PostgreSQL: slow-query events (captured `tracing` output), statistics,
//! thresholds, every function shape, composition with `#[cached_query]`, and N+1 detection.

mod common;

use async_trait::async_trait;
use cached_query::{
    Cache, Timing, cached_query, count_calls, set_slow_query_threshold, timed, timings,
};
use common::{Logs, database_url};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::time::Duration;

fn timing(name: &str) -> Timing {
    timings()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no timings for {name}"))
}

async fn pool() -> PgPool {
    PgPool::connect(&database_url()).await.unwrap()
}

#[timed(threshold_ms = 100, name = "t.sleep")]
async fn sleep_query(pool: &PgPool, secs: f64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_sleep($1)")
        .bind(secs)
        .execute(pool)
        .await?;
    Ok(())
}

#[timed(threshold_ms = 0, name = "t.failing")]
async fn failing_query(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1 / 0").fetch_one(pool).await
}

#[tokio::test]
async fn slow_calls_log_one_event_with_their_fields_and_fast_calls_none() {
    let logs = Logs::capture();
    let pool = pool().await;
    sleep_query(&pool, 0.0).await.unwrap();
    assert!(logs.mine("t.sleep").is_empty(), "fast calls log nothing");
    sleep_query(&pool, 0.15).await.unwrap();
    let events = logs.mine("t.sleep");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert!(e.contains("WARN") && e.contains("slow query"), "{e}");
    assert!(
        e.contains("query=\"t.sleep\"")
            && e.contains("threshold_ms=100")
            && e.contains("error=false"),
        "{e}"
    );
    let elapsed: f64 = e
        .split("elapsed_ms=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(elapsed >= 150.0, "pg_sleep(0.15) took {elapsed} ms");

    assert!(failing_query(&pool).await.is_err());
    let failed = logs.mine("t.failing");
    assert!(
        failed.len() == 1 && failed[0].contains("error=true"),
        "{failed:?}"
    );

    let t = timing("t.sleep");
    assert_eq!((t.count, t.slow_count), (2, 1));
    assert!(
        t.max >= Duration::from_millis(150) && t.p99 <= t.max && t.p50 <= t.p95 && t.p95 <= t.p99
    );
}

#[timed(threshold_ms = 0, level = "info", name = "t.info")]
async fn info_level(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[tokio::test]
async fn the_level_of_the_slow_event_is_configurable() {
    let logs = Logs::capture();
    info_level(&pool().await).await.unwrap();
    let events = logs.mine("t.info");
    assert!(
        events.len() == 1 && events[0].contains(" INFO "),
        "{events:?}"
    );
}

#[timed(name = "t.default")]
async fn default_threshold(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

#[timed(name = "t.own", threshold_ms = 3_600_000)]
async fn own_threshold(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(pool).await
}

/// The only test that changes the process-wide threshold.
#[tokio::test]
async fn run_time_threshold_applies_unless_the_attribute_sets_one() {
    let pool = pool().await;
    set_slow_query_threshold(Duration::ZERO);
    default_threshold(&pool).await.unwrap();
    own_threshold(&pool).await.unwrap();
    set_slow_query_threshold(Duration::from_secs(3600));
    default_threshold(&pool).await.unwrap();
    set_slow_query_threshold(Duration::from_millis(100));
    assert_eq!(timing("t.default").slow_count, 1);
    assert_eq!(timing("t.own").slow_count, 0);
}

#[timed(name = "t.sync")]
fn sync_fn(n: u64) -> Result<u64, String> {
    if n > 100 {
        return Err("too big".into());
    }
    let parsed: u64 = "1".parse().map_err(|_| "parse".to_string())?;
    Ok(n + parsed)
}

#[timed(name = "t.sync_ref")]
fn sync_ref(items: &[String]) -> Option<&String> {
    items.first()
}

#[timed(name = "t.generic")]
async fn generic<T: std::fmt::Display + Send>(value: T, extra: impl AsRef<str> + Send) -> String {
    format!("{value}{}", extra.as_ref())
}

struct Counter {
    n: u64,
}

impl Counter {
    #[timed(name = "t.method")]
    async fn bump(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }
}

#[async_trait]
trait Repo {
    async fn slow(&self, pool: &PgPool) -> Result<(), sqlx::Error>;
}

struct PgRepo;

#[async_trait]
impl Repo for PgRepo {
    #[timed(name = "t.async_trait", threshold_ms = 50)]
    async fn slow(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_sleep(0.1)").execute(pool).await?;
        Ok(())
    }
}

#[tokio::test]
async fn every_function_shape_is_timed() {
    assert_eq!(sync_fn(1), Ok(2));
    assert!(sync_fn(1000).is_err());
    let items = vec!["a".to_owned()];
    assert_eq!(sync_ref(&items), Some(&items[0]));
    assert_eq!(generic(4, "x").await, "4x");
    assert_eq!(generic("y", String::from("z")).await, "yz");
    let mut c = Counter { n: 0 };
    assert_eq!(c.bump(2).await, 2);
    for (name, count) in [
        ("t.sync", 2),
        ("t.sync_ref", 1),
        ("t.generic", 2),
        ("t.method", 1),
    ] {
        assert_eq!(timing(name).count, count, "{name}");
    }

    // Inside #[async_trait] the inner future is timed, not the boxing.
    let repo: Box<dyn Repo + Send + Sync> = Box::new(PgRepo);
    let pool = pool().await;
    let fut = repo.slow(&pool);
    fut.await.unwrap();
    let t = timing("t.async_trait");
    assert_eq!((t.count, t.slow_count), (1, 1));
    assert!(t.max >= Duration::from_millis(100), "{t:?}");
}

#[async_trait]
trait FailingRepo {
    async fn slow_and_failing(&self, pool: &PgPool) -> Result<i32, sqlx::Error>;
}

#[async_trait]
impl FailingRepo for PgRepo {
    #[timed(name = "t.async_trait_err", threshold_ms = 50)]
    async fn slow_and_failing(&self, pool: &PgPool) -> Result<i32, sqlx::Error> {
        sqlx::query("SELECT pg_sleep(0.1)").execute(pool).await?;
        Err(sqlx::Error::RowNotFound)
    }
}

#[tokio::test]
async fn inside_async_trait_the_slow_event_says_whether_it_failed() {
    let logs = Logs::capture();
    let repo: Box<dyn FailingRepo + Send + Sync> = Box::new(PgRepo);
    assert!(repo.slow_and_failing(&pool().await).await.is_err());
    let events = logs.mine("t.async_trait_err");
    assert!(
        events.len() == 1 && events[0].contains("slow query") && events[0].contains("error=true"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_future_that_is_never_awaited_records_nothing() {
    // Polled until it is inside the timed body, then dropped before it completes: a call that
    // never finished records no timing and logs nothing, even with a zero threshold.
    let logs = Logs::capture();
    let entered = std::sync::atomic::AtomicBool::new(false);
    let (release, gate) = tokio::sync::oneshot::channel();
    let mut fut = Box::pin(never_awaited(&entered, gate));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert!(
        entered.load(std::sync::atomic::Ordering::SeqCst),
        "the timed body is running"
    );
    drop(fut);
    drop(release);
    assert!(timings().iter().all(|t| t.name != "t.never"));
    assert!(logs.mine("t.never").is_empty());
}

#[timed(name = "t.never", threshold_ms = 0)]
async fn never_awaited(
    entered: &std::sync::atomic::AtomicBool,
    gate: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), tokio::sync::oneshot::error::RecvError> {
    entered.store(true, std::sync::atomic::Ordering::SeqCst);
    gate.await
}

#[cached_query(cache = cache)]
#[timed(name = "t.inside")]
async fn timed_inside(cache: &Cache, id: i64) -> Result<i64, String> {
    Ok(id)
}

#[timed(name = "t.outside")]
#[cached_query(cache = cache)]
async fn timed_outside(cache: &Cache, id: i64) -> Result<i64, String> {
    Ok(id)
}

#[tokio::test]
async fn timed_and_cached_compose_in_either_order() {
    let cache = Cache::builder().memory().build().await.unwrap();
    for id in [1, 1, 1, 2] {
        timed_inside(&cache, id).await.unwrap();
        timed_outside(&cache, id).await.unwrap();
    }
    assert_eq!(timing("t.inside").count, 2, "inside: executed queries only");
    assert_eq!(
        timing("t.outside").count,
        4,
        "outside: every call, hits included"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (4, 4));

    let (_, calls) = count_calls(async {
        timed_inside(&cache, 3).await.unwrap();
        timed_outside(&cache, 3).await.unwrap();
        timed_inside(&cache, 3).await.unwrap();
        timed_outside(&cache, 3).await.unwrap();
    })
    .await;
    assert_eq!(
        (calls.queries, calls.cache_hits),
        (2, 2),
        "no double counting"
    );
}

// --- Another crate's attribute named `timed` ----------------------------------------------

/// `tracing`'s `#[instrument]` imported as `timed`: another crate's attribute that only its name
/// makes look like ours.
mod foreign_timed {
    use cached_query::{Cache, cached_query};
    use tracing::instrument as timed;

    #[cached_query(cache = cache)]
    #[timed(name = "foreign.instrumented")]
    pub async fn lookup(cache: &Cache, id: i64) -> Result<i64, String> {
        tracing::info!("the foreign attribute's body ran");
        Ok(id)
    }
}

#[tokio::test]
async fn a_foreign_timed_below_cached_query_runs_inside_it() {
    let logs = Logs::capture();
    let cache = Cache::builder().memory().build().await.unwrap();
    assert_eq!(foreign_timed::lookup(&cache, 7).await, Ok(7));
    assert_eq!(foreign_timed::lookup(&cache, 7).await, Ok(7));
    let ran = logs.mine("the foreign attribute's body ran");
    assert_eq!(ran.len(), 1, "the second call is a cache hit: {ran:?}");
    assert!(
        ran[0].contains("foreign.instrumented{"),
        "inside the foreign attribute's span: {ran:?}"
    );
    assert!(
        timings().iter().all(|t| t.name != "foreign.instrumented"),
        "our #[timed] did not take its place"
    );
}

// --- N+1 detection on the conversation list -------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct ConversationRow {
    id: i64,
    title: String,
    last_message: Option<String>,
}

async fn conversation_schema(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE conversations (id BIGSERIAL PRIMARY KEY, user_id BIGINT NOT NULL, title TEXT NOT NULL,
                                     updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
         CREATE TABLE messages (id BIGSERIAL PRIMARY KEY, conversation_id BIGINT NOT NULL REFERENCES conversations(id),
                                body TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL);
         CREATE INDEX idx_conversations_user_updated ON conversations (user_id, updated_at DESC);
         CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at DESC);
         INSERT INTO conversations (user_id, title, updated_at)
              SELECT 1, 'conversation ' || i, now() - i * interval '1 minute' FROM generate_series(1, 60) i;
         INSERT INTO messages (conversation_id, body, created_at)
              SELECT c.id, 'message ' || m || ' of ' || c.id, now() - (10 - m) * interval '1 second'
                FROM conversations c, generate_series(1, 3) m;",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[timed]
async fn conversations_page(
    pool: &PgPool,
    user_id: i64,
    limit: i64,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, title FROM conversations WHERE user_id = $1 ORDER BY updated_at DESC LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[timed]
async fn last_message(pool: &PgPool, conversation_id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT body FROM messages WHERE conversation_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(conversation_id)
    .fetch_optional(pool)
    .await
}

/// The N+1 version: one query for the page, one per conversation.
async fn list_naive(pool: &PgPool, user_id: i64, limit: i64) -> Vec<ConversationRow> {
    let mut out = Vec::new();
    for (id, title) in conversations_page(pool, user_id, limit).await.unwrap() {
        let last_message = last_message(pool, id).await.unwrap();
        out.push(ConversationRow {
            id,
            title,
            last_message,
        });
    }
    out
}

#[timed]
async fn count_conversations(pool: &PgPool, user_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM conversations WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(pool)
        .await
}

#[cached_query(cache = cache, invalidate = "conversations:<user_id>")]
#[timed]
async fn conversations_with_last_message(
    pool: &PgPool,
    cache: &Cache,
    user_id: i64,
    limit: i64,
) -> Result<Vec<ConversationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.id, c.title,
                (SELECT m.body FROM messages m WHERE m.conversation_id = c.id
                  ORDER BY m.created_at DESC LIMIT 1) AS last_message
           FROM conversations c WHERE c.user_id = $1 ORDER BY c.updated_at DESC LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[sqlx::test]
async fn count_calls_tells_an_n_plus_one_list_from_a_two_query_list(pool: PgPool) {
    conversation_schema(&pool).await;
    let cache = Cache::builder().memory().build().await.unwrap();

    let (naive, calls) = count_calls(list_naive(&pool, 1, 50)).await;
    assert_eq!(naive.len(), 50);
    assert_eq!((calls.queries, calls.cache_hits), (51, 0), "the N+1 loop");

    let ((total, fixed), calls) = count_calls(async {
        let total = count_conversations(&pool, 1).await.unwrap();
        (
            total,
            conversations_with_last_message(&pool, &cache, 1, 50)
                .await
                .unwrap(),
        )
    })
    .await;
    assert_eq!(
        (total, calls.queries, calls.cache_hits),
        (60, 2, 0),
        "count + one list query"
    );
    assert_eq!(fixed, naive, "same page, same last messages");

    let (_, calls) = count_calls(conversations_with_last_message(&pool, &cache, 1, 50)).await;
    assert_eq!(
        (calls.queries, calls.cache_hits),
        (0, 1),
        "served from the cache"
    );
}
