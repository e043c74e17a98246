//! One `tracing` span per `#[cached_query]` call, seen by a capturing subscriber: its fields
//! for a hit, a miss, a bypass (inside a transaction, and with no cache) and a Redis error, the
//! query's own events inside it, and one span per call whatever the number of tags.

mod common;

use cached_query::{Cache, cached_query};
use common::RedisServer;
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// One captured `cached_query` span.
#[derive(Clone, Debug, Default, PartialEq)]
struct Captured {
    fields: HashMap<String, String>,
    /// The messages of the events emitted inside it.
    events: Vec<String>,
    closed: bool,
}

/// Every span named `cached_query`, in creation order; open ones also by id.
#[derive(Default)]
struct Spans {
    all: Vec<Captured>,
    open: HashMap<u64, usize>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Spans>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "cached_query" {
            return;
        }
        let mut captured = Captured::default();
        attrs.record(&mut Fields(&mut captured.fields));
        let mut spans = self.0.lock().unwrap();
        spans.all.push(captured);
        let at = spans.all.len() - 1;
        spans.open.insert(id.into_u64(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        if let Some(&at) = spans.open.get(&id.into_u64()) {
            values.record(&mut Fields(&mut spans.all[at].fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut spans = self.0.lock().unwrap();
        if let Some(&at) = spans.open.get(&span.id().into_u64()) {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            let message = fields.remove("message").unwrap_or_default();
            spans.all[at].events.push(message);
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        if let Some(at) = spans.open.remove(&id.into_u64()) {
            spans.all[at].closed = true;
        }
    }
}

impl Capture {
    /// Installs the capturing subscriber once per binary.
    fn install() -> Capture {
        static CAPTURE: OnceLock<Capture> = OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let capture = Capture::default();
                let subscriber = tracing_subscriber::registry().with(capture.clone());
                tracing::subscriber::set_global_default(subscriber).unwrap();
                capture
            })
            .clone()
    }

    /// The spans of query `name`, in creation order.
    fn of(&self, name: &str) -> Vec<Captured> {
        let query = format!("{name:?}");
        self.0
            .lock()
            .unwrap()
            .all
            .iter()
            .filter(|s| s.fields.get("query") == Some(&query))
            .cloned()
            .collect()
    }
}

fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cached_query(
    cache = cache,
    name = "spans.profile",
    invalidate = ["a:<id>", "b:<id>", "c:<id>", "d:<id>", "e:<id>", "f:<id>"]
)]
async fn profile(cache: &Cache, id: i64) -> Result<i64, String> {
    tracing::info!("profile query ran");
    Ok(id * 2)
}

#[tokio::test]
async fn a_miss_and_a_hit_each_get_one_span_with_the_query_inside() {
    let capture = Capture::install();
    let cache = Cache::builder()
        .redis(&common::redis_url())
        .namespace(&common::unique_ns("spans"))
        .build()
        .await
        .unwrap();
    assert_eq!(profile(&cache, 4).await.unwrap(), 8);
    assert_eq!(profile(&cache, 4).await.unwrap(), 8);

    let spans = capture.of("spans.profile");
    assert_eq!(
        spans.len(),
        2,
        "one span per call, six tags or not: {spans:#?}"
    );
    let miss = fields(&[
        ("query", "\"spans.profile\""),
        ("cache.backend", "\"redis\""),
        ("cache.hit", "false"),
    ]);
    assert_eq!(spans[0].fields, miss);
    assert_eq!(
        spans[0].events,
        ["profile query ran"],
        "the query runs inside"
    );
    assert!(spans[0].closed);
    let hit = fields(&[
        ("query", "\"spans.profile\""),
        ("cache.backend", "\"redis\""),
        ("cache.hit", "true"),
    ]);
    assert_eq!(spans[1].fields, hit);
    assert!(spans[1].events.is_empty(), "{:?}", spans[1].events);
}

#[cached_query(cache = cache, name = "spans.down")]
async fn down(cache: &Cache, id: i64) -> Result<i64, String> {
    tracing::info!("down query ran");
    Ok(id)
}

#[tokio::test]
async fn a_redis_error_is_recorded_as_error() {
    let capture = Capture::install();
    let mut server = RedisServer::start();
    let cache = common::fail_fast(&server.url(), "spans-down")
        .build()
        .await
        .unwrap();
    server.kill();
    assert_eq!(down(&cache, 1).await.unwrap(), 1);
    assert_eq!(cache.stats().errors, 1);
    let spans = capture.of("spans.down");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].fields["cache.hit"], "\"error\"");
    // The cache's own warning and the query's event, both inside.
    assert_eq!(
        spans[0].events,
        [
            "cached-query: Redis read failed; the query runs against the database",
            "down query ran"
        ]
    );
}

#[cached_query(cache = cache, name = "spans.in_tx")]
async fn in_tx(cache: &Cache, conn: &mut PgConnection, id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT $1::bigint")
        .bind(id)
        .fetch_one(conn)
        .await
}

#[cached_query(name = "spans.no_cache")]
async fn no_cache(id: i64) -> Result<i64, String> {
    Ok(id)
}

#[tokio::test]
async fn a_bypass_is_recorded_as_bypassed() {
    let capture = Capture::install();
    let cache = Cache::builder().memory().build().await.unwrap();
    let mut conn = PgConnection::connect(&common::database_url())
        .await
        .unwrap();
    let mut tx = conn.begin().await.unwrap();
    assert_eq!(in_tx(&cache, &mut tx, 5).await.unwrap(), 5);
    tx.rollback().await.unwrap();
    assert_eq!(in_tx(&cache, &mut conn, 5).await.unwrap(), 5);
    let spans = capture.of("spans.in_tx");
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert_eq!(spans[0].fields["cache.hit"], "\"bypassed\"");
    assert_eq!(spans[0].fields["cache.backend"], "\"memory\"");
    assert_eq!(spans[1].fields["cache.hit"], "false");

    // No cache installed in this binary: the call runs uncached.
    assert_eq!(no_cache(6).await.unwrap(), 6);
    let spans = capture.of("spans.no_cache");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].fields["cache.hit"], "\"bypassed\"");
    assert_eq!(spans[0].fields["cache.backend"], "\"none\"");
}

#[cached_query(cache = cache, name = "spans.batch", batch = ids, invalidate = "n:<ids>")]
async fn doubled(cache: &Cache, ids: &[i64]) -> Result<HashMap<i64, i64>, String> {
    tracing::info!("batch query ran");
    Ok(ids.iter().map(|&id| (id, id * 2)).collect())
}

#[tokio::test]
async fn a_batch_call_gets_one_span_hit_only_when_every_key_hit() {
    let capture = Capture::install();
    let cache = Cache::builder().memory().build().await.unwrap();
    doubled(&cache, &[1, 2, 3]).await.unwrap();
    doubled(&cache, &[1, 2, 3]).await.unwrap();
    doubled(&cache, &[1, 2, 3, 4]).await.unwrap();
    let spans = capture.of("spans.batch");
    let hits: Vec<&str> = spans
        .iter()
        .map(|s| s.fields["cache.hit"].as_str())
        .collect();
    assert_eq!(hits, ["false", "true", "false"], "{spans:#?}");
    let events: Vec<usize> = spans.iter().map(|s| s.events.len()).collect();
    assert_eq!(events, [1, 0, 1], "{spans:#?}");
}

#[cached_query(cache = cache, name = "spans.disabled")]
async fn on_disabled(cache: &Cache, id: i64) -> Result<i64, String> {
    Ok(id)
}

#[tokio::test]
async fn a_disabled_cache_and_an_empty_batch_get_their_span() {
    let capture = Capture::install();
    let cache = Cache::builder().disabled().build().await.unwrap();
    assert_eq!(on_disabled(&cache, 3).await.unwrap(), 3);
    let spans = capture.of("spans.disabled");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].fields["cache.hit"], "\"bypassed\"");
    assert_eq!(spans[0].fields["cache.backend"], "\"none\"");

    let memory = Cache::builder().memory().build().await.unwrap();
    let before = capture.of("spans.batch").len();
    assert!(doubled(&memory, &[]).await.unwrap().is_empty());
    let spans = capture.of("spans.batch");
    assert_eq!(spans.len(), before + 1, "{spans:#?}");
    assert_eq!(spans[before].fields["cache.hit"], "true");
}

#[cached_query(cache = cache, name = "spans.dropped")]
async fn never_answers(cache: &Cache, id: i64) -> Result<i64, String> {
    tracing::info!("dropped query started");
    std::future::pending::<()>().await;
    Ok(id)
}

#[tokio::test]
async fn a_call_dropped_during_its_query_closes_its_one_span_as_a_miss() {
    let capture = Capture::install();
    let cache = Cache::builder().memory().build().await.unwrap();
    let mut call = Box::pin(never_answers(&cache, 1));
    // Polled until the query has started (its event is in the span), then dropped.
    while capture
        .of("spans.dropped")
        .first()
        .is_none_or(|s| s.events.is_empty())
    {
        assert!(futures_util::poll!(call.as_mut()).is_pending());
    }
    drop(call);
    let spans = capture.of("spans.dropped");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert!(spans[0].closed, "{spans:#?}");
    assert_eq!(spans[0].fields["cache.hit"], "false", "{spans:#?}");
}
