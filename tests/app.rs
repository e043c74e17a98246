//! End to end: the example application on a free loopback port, real PostgreSQL and Redis,
//! driven over HTTP. One test (the metrics recorder is global to the process).

mod common;
#[path = "../examples/app/server.rs"]
mod server;

use cached_query::{Cache, RedisConfig, RedisSessionStore};
use common::{keys_under, redis_url, unique_ns};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Duration;

struct App {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the application as `main.rs` does, on a free port.
async fn start(pool: &PgPool, ns: &str, metrics: &PrometheusHandle) -> App {
    let redis = RedisConfig::from_lookup(|k| (k == "REDIS_URL").then(redis_url)).unwrap();
    let cache = Cache::builder()
        .redis_config(redis.clone())
        .namespace(ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    server::watch(&cache).await.unwrap();
    let sessions = RedisSessionStore::new(&redis, ns).unwrap();
    let config = server::AppConfig {
        session_ttl: Duration::from_secs(600),
        secure_cookies: false,
    };
    let router = server::router(pool.clone(), cache, sessions, metrics.clone(), &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    App { base, task }
}

async fn seed(pool: &PgPool) {
    sqlx::raw_sql(
        "INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada'), ('alan@example.com', 'Alan');
         INSERT INTO conversations (user_id, title, updated_at)
              SELECT 1, 'conversation ' || i, now() - i * interval '1 minute' FROM generate_series(1, 30) i;
         INSERT INTO messages (conversation_id, body, created_at)
              SELECT c.id, 'message ' || m || ' of ' || c.id, now() - (5 - m) * interval '1 second'
                FROM conversations c, generate_series(1, 3) m;",
    )
    .execute(pool)
    .await
    .unwrap();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.text().await.unwrap();
    let value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({status}): {body}"));
    (status, value)
}

#[sqlx::test]
async fn the_example_app_end_to_end(pool: PgPool) {
    server::migrate(&pool).await.unwrap();
    seed(&pool).await;
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let ns = unique_ns("app");
    let app = start(&pool, &ns, &metrics).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", app.base);

    // Cache miss, then hit — visible in /metrics.
    for _ in 0..2 {
        let (status, user) = json_of(http.get(url("/users/1")).send().await.unwrap()).await;
        assert_eq!(
            (status, user["name"].as_str()),
            (StatusCode::OK, Some("Ada"))
        );
    }
    let text = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            "cached_query_cache_misses_total{query=\"app.user_by_id\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "cached_query_cache_hits_total{query=\"app.user_by_id\"}"
        ),
        1.0,
        "{text}"
    );

    // Update, then a fresh read.
    let (status, user) = json_of(
        http.put(url("/users/1"))
            .json(&json!({"name": "Ada Lovelace"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, user["name"].as_str()),
        (StatusCode::OK, Some("Ada Lovelace"))
    );
    let (_, user) = json_of(http.get(url("/users/1")).send().await.unwrap()).await;
    assert_eq!(user["name"], "Ada Lovelace");

    // An edit made outside the application (psql, an admin tool): the watched table's trigger
    // invalidates the cached profile within the documented bound (1 s).
    sqlx::query("UPDATE users SET name = 'Ada King' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    common::within(Duration::from_secs(1), "an outside edit", || async {
        let (_, user) = json_of(http.get(url("/users/1")).send().await.unwrap()).await;
        user["name"] == "Ada King"
    })
    .await;
    sqlx::query("UPDATE users SET name = 'Ada Lovelace' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    common::within(Duration::from_secs(1), "the edit undone", || async {
        let (_, user) = json_of(http.get(url("/users/1")).send().await.unwrap()).await;
        user["name"] == "Ada Lovelace"
    })
    .await;

    // Pagination and the last message in one query.
    let (status, page) = json_of(
        http.get(url("/users/1/conversations?limit=10&offset=5"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    assert_eq!(items[0]["title"], "conversation 6");
    let first_id = items[0]["id"].as_i64().unwrap();
    assert_eq!(items[0]["last_message"], format!("message 3 of {first_id}"));
    let (_, page) = json_of(
        http.get(url("/users/1/conversations?limit=200&offset=25"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5);

    // One conversation, by id: tagged by its owner, which only its row knows.
    let conversation = url(&format!("/conversations/{first_id}"));
    let (status, one) = json_of(http.get(&conversation).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["last_message"], format!("message 3 of {first_id}"));
    let (status, _) = json_of(http.get(url("/conversations/999999")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A new message reorders the (cached) list at once.
    let (status, _) = json_of(
        http.post(url(&format!("/conversations/{first_id}/messages")))
            .json(&json!({"body": "hello"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, page) = json_of(
        http.get(url("/users/1/conversations?limit=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            page["items"][0]["id"].as_i64(),
            page["items"][0]["last_message"].as_str()
        ),
        (Some(first_id), Some("hello"))
    );
    // The conversation's entry carried its owner's tag: it shows the new message too.
    let (_, one) = json_of(http.get(&conversation).send().await.unwrap()).await;
    assert_eq!(one["last_message"], "hello");

    // Bad input: 4xx with a JSON error, never a 500.
    for (method, path, body, expected) in [
        (
            "GET",
            "/users/1/conversations?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/users/1/conversations?limit=100000",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/users/1/conversations?limit=0",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/users/1/conversations?offset=-1",
            None,
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/users/abc", None, StatusCode::BAD_REQUEST),
        ("GET", "/users/999999", None, StatusCode::NOT_FOUND),
        (
            "GET",
            "/users/999999/conversations",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "PUT",
            "/users/1",
            Some(json!({"nom": "x"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/users/1",
            Some(json!({"name": ""})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/conversations/999999/messages",
            Some(json!({"body": "x"})),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let request = match method {
            "GET" => http.get(url(path)),
            "PUT" => http.put(url(path)),
            _ => http.post(url(path)),
        };
        let request = match body {
            Some(b) => request.json(&b),
            None => request,
        };
        let (status, error) = json_of(request.send().await.unwrap()).await;
        assert_eq!(status, expected, "{method} {path}: {error}");
        assert!(error["error"].is_string(), "{method} {path}: {error}");
    }

    // Sessions: cookie attributes, survive a restart, gone from Redis after logout.
    let login = http
        .post(url("/login"))
        .json(&json!({"email": "alan@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(
        !set_cookie.contains("Secure"),
        "not configured here: {set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let me = |base: String| {
        let (http, cookie) = (http.clone(), cookie.clone());
        async move {
            json_of(
                http.get(format!("{base}/me"))
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let (status, user) = me(app.base.clone()).await;
    assert_eq!(
        (status, user["email"].as_str()),
        (StatusCode::OK, Some("alan@example.com"))
    );
    let session_keys = keys_under(&redis_url(), &format!("{ns}:session")).await;
    assert_eq!(session_keys.len(), 1);
    let mut conn = common::raw(&redis_url()).await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(&session_keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=600).contains(&ttl),
        "sessions expire with SESSION_TTL_SECS (600 here): {ttl}"
    );

    expired_messages_are_deleted_and_leave_the_cache(&pool, &app.base).await;
    app.task.abort();
    let _ = app.task.await;
    let app = start(&pool, &ns, &metrics).await; // a new process would see the same Redis
    let (status, user) = me(app.base.clone()).await;
    assert_eq!(
        (status, user["email"].as_str()),
        (StatusCode::OK, Some("alan@example.com")),
        "still logged in"
    );

    let logout = http
        .post(format!("{}/logout", app.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert!(
        keys_under(&redis_url(), &format!("{ns}:session"))
            .await
            .is_empty(),
        "session deleted from Redis"
    );
    let (status, _) = me(app.base.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = json_of(
        http.post(format!("{}/login", app.base))
            .json(&json!({"email": "nobody@example.com"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Health and the slow-query demo.
    let (status, health) = json_of(
        http.get(format!("{}/health", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            status,
            health["database"].as_str(),
            health["redis"].as_str()
        ),
        (StatusCode::OK, Some("ok"), Some("ok"))
    );
    assert!(
        health["pool"]["max"].as_u64().unwrap() >= 1 && health["cache"]["misses"].is_u64(),
        "{health}"
    );
    assert_eq!(health["breaches"], serde_json::json!([]), "{health}");
    let (status, slow) = json_of(
        http.get(format!("{}/debug/slow", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, slow["slow_count"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{slow}"
    );
}

/// The TTL cleanup: the latest message of user 1's first conversation expires; the app's
/// periodic task deletes it through `idx_messages_expires`, and the cached page that showed it
/// is invalidated when the deletion commits.
async fn expired_messages_are_deleted_and_leave_the_cache(pool: &PgPool, base: &str) {
    let http = reqwest::Client::new();
    let page = || async {
        let (status, page) = json_of(
            http.get(format!("{base}/users/1/conversations?limit=1"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        (
            page["items"][0]["id"].as_i64().unwrap(),
            page["items"][0]["last_message"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    let (id, shown) = page().await;
    let bodies: Vec<String> = sqlx::query_scalar(
        "SELECT body FROM messages WHERE conversation_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(bodies[0], shown);
    // The latest message expires; nothing the cache watches changed.
    sqlx::query(
        "UPDATE messages SET expires_at = now() - interval '1 second'
          WHERE id = (SELECT id FROM messages WHERE conversation_id = $1
                       ORDER BY created_at DESC, id DESC LIMIT 1)",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(page().await.1, shown, "still cached");
    // The app's periodic task (every 100 ms here) deletes it; the invalidation is delivered
    // through the outbox (the documented bound of a commit's invalidation).
    let cleanup = server::spawn_cleanup(pool.clone(), Duration::from_millis(100));
    let previous = bodies[1].clone();
    common::within(
        Duration::from_secs(5),
        "the page without the expired message",
        || {
            let page = page();
            let previous = previous.clone();
            async move { page.await.1 == previous }
        },
    )
    .await;
    cleanup.abort();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE conversation_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left as usize, bodies.len() - 1);
    assert_eq!(server::delete_expired_messages(pool).await.unwrap(), 0);
    // The partial index serves the cleanup's scan.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN DELETE FROM messages WHERE expires_at < now()")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("idx_messages_expires")),
        "{plan:?}"
    );
}
