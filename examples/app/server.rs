//! The example application's routes, shared by `main.rs` and the end-to-end test.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cached_query::{Cache, RedisSessionStore, cached_query, pool_status, tags, timed};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// Largest page of conversations a client may ask for.
pub const MAX_LIMIT: i64 = 200;

pub struct AppConfig {
    /// How long an inactive session lives (`SESSION_TTL_SECS`).
    pub session_ttl: Duration,
    /// Adds `Secure` to the session cookie (`COOKIE_SECURE=true`, for HTTPS deployments).
    pub secure_cookies: bool,
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    cache: Cache,
    metrics: PrometheusHandle,
}

tags! {
    /// One user's row.
    pub fn user(id: i64) = "user:{id}";
    /// Everything about one user's conversations: the list, each conversation, their messages.
    pub fn conversations(user_id: i64) = "conversations:{user_id}";
}

/// The tables whose writes by anyone invalidate the cache: the tags each row carries (the
/// templates render as `user` and `conversations` above do).
pub async fn watch(cache: &Cache) -> Result<(), cached_query::Error> {
    cache.watch_table("users", &["user:<id>"]).await?;
    cache
        .watch_table("conversations", &["conversations:<user_id>"])
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("examples/app/migrations").run(pool).await
}

pub fn router(
    pool: PgPool,
    cache: Cache,
    sessions: RedisSessionStore,
    metrics: PrometheusHandle,
    config: &AppConfig,
) -> Router {
    let ttl = tower_sessions::cookie::time::Duration::seconds(
        i64::try_from(config.session_ttl.as_secs()).unwrap_or(i64::MAX),
    );
    let session_layer = SessionManagerLayer::new(sessions)
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        .with_secure(config.secure_cookies)
        .with_expiry(Expiry::OnInactivity(ttl));
    Router::new()
        .route("/users/{id}", get(get_user).put(put_user))
        .route("/users/{id}/conversations", get(list_conversations))
        .route("/conversations/{id}", get(get_conversation))
        .route("/conversations/{id}/messages", post(post_message))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/debug/slow", get(debug_slow))
        .layer(session_layer)
        .with_state(AppState {
            pool,
            cache,
            metrics,
        })
}

// --- errors: JSON bodies, 4xx for bad input, never a 500 for it --------------------------

pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(what: &str) -> Self {
        ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<tower_sessions::session::Error> for ApiError {
    fn from(e: tower_sessions::session::Error) -> Self {
        tracing::error!(error = %e, "session store error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "sessions unavailable".into(),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

// --- queries ------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: String,
}

#[cached_query(cache = cache, ttl = 300, invalidate = [user(id)], name = "app.user_by_id")]
async fn user_by_id(pool: &PgPool, cache: &Cache, id: i64) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as("SELECT id, email, name FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct ConversationSummary {
    pub id: i64,
    pub title: String,
    pub last_message: Option<String>,
}

/// One query for the page, the last message of each conversation included (no N+1).
#[cached_query(cache = cache, ttl = 60, invalidate = [conversations(user_id)], name = "app.conversations")]
#[timed(name = "app.conversations.query")]
async fn conversations_page(
    pool: &PgPool,
    cache: &Cache,
    user_id: i64,
    limit: i64,
    offset: i64,
) -> Result<Vec<ConversationSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.id, c.title,
                (SELECT m.body FROM messages m WHERE m.conversation_id = c.id
                  ORDER BY m.created_at DESC, m.id DESC LIMIT 1) AS last_message
           FROM conversations c
          WHERE c.user_id = $1
          ORDER BY c.updated_at DESC, c.id DESC
          LIMIT $2 OFFSET $3",
    )
    .bind(user_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Conversation {
    pub id: i64,
    pub user_id: i64,
    pub title: String,
    pub last_message: Option<String>,
}

/// Fetched by its id; its owner is only known from the row, so the entry is tagged by the
/// result: a new message (which invalidates the owner's conversations) reaches it. A missing
/// conversation is cached untagged until its TTL: ids are never reused.
#[cached_query(cache = cache, ttl = 60, invalidate = [conversations(ret.user_id)], name = "app.conversation")]
async fn conversation_by_id(
    pool: &PgPool,
    cache: &Cache,
    id: i64,
) -> Result<Option<Conversation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.id, c.user_id, c.title,
                (SELECT m.body FROM messages m WHERE m.conversation_id = c.id
                  ORDER BY m.created_at DESC, m.id DESC LIMIT 1) AS last_message
           FROM conversations c
          WHERE c.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Deletes the messages past their `expires_at` (served by `idx_messages_expires`). The same
/// transaction touches each affected conversation, so its watch trigger invalidates the
/// owner's cached pages (their last message may have gone) when the deletion commits.
#[timed(name = "app.delete_expired_messages")]
pub async fn delete_expired_messages(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let conversations: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM messages WHERE expires_at < now() RETURNING conversation_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !conversations.is_empty() {
        sqlx::query("UPDATE conversations SET updated_at = updated_at WHERE id = ANY($1)")
            .bind(&conversations)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(conversations.len() as u64)
}

/// Runs [`delete_expired_messages`] every `period` until the task is dropped; a failure is
/// logged and retried at the next period.
pub fn spawn_cleanup(pool: PgPool, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match delete_expired_messages(&pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "expired messages deleted"),
                Err(e) => tracing::warn!(error = %e, "deleting expired messages failed"),
            }
        }
    })
}

#[timed(name = "app.debug_slow", threshold_ms = 100)]
async fn slow_report(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1 FROM pg_sleep(0.15)")
        .fetch_one(pool)
        .await
}

// --- handlers -----------------------------------------------------------------------------

async fn get_user(
    State(s): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<User>> {
    let Path(id) = id?;
    let user = user_by_id(&s.pool, &s.cache, id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(user))
}

#[derive(Deserialize)]
struct UserUpdate {
    name: String,
}

async fn put_user(
    State(s): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<UserUpdate>, JsonRejection>,
) -> ApiResult<Json<User>> {
    let (Path(id), Json(update)) = (id?, body?);
    let name = update.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::bad_request("name must be 1 to 200 characters"));
    }
    let mut tx = s.pool.begin().await?;
    let updated = sqlx::query("UPDATE users SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::not_found("user"));
    }
    // Recorded in the transaction (outbox), bumped after the commit before we answer: the
    // response below reads the new row, and a crash right after COMMIT loses nothing.
    if let Err(e) = s.cache.commit_and_invalidate(tx, [user(id)]).await {
        tracing::error!(error = %e, "commit failed");
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".into(),
        ));
    }
    get_user(State(s), Ok(Path(id))).await
}

async fn get_conversation(
    State(s): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Conversation>> {
    let Path(id) = id?;
    let conversation = conversation_by_id(&s.pool, &s.cache, id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    Ok(Json(conversation))
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<i64>,
    offset: Option<i64>,
}

async fn list_conversations(
    State(s): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    page: Result<Query<PageParams>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let (Path(user_id), Query(page)) = (id?, page?);
    let limit = page.limit.unwrap_or(20);
    let offset = page.offset.unwrap_or(0);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    if offset < 0 {
        return Err(ApiError::bad_request("offset must be 0 or more"));
    }
    if user_by_id(&s.pool, &s.cache, user_id).await?.is_none() {
        return Err(ApiError::not_found("user"));
    }
    let items = conversations_page(&s.pool, &s.cache, user_id, limit, offset).await?;
    Ok(Json(
        json!({ "limit": limit, "offset": offset, "items": items }),
    ))
}

#[derive(Deserialize)]
struct NewMessage {
    body: String,
}

async fn post_message(
    State(s): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<NewMessage>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let (Path(conversation_id), Json(message)) = (id?, body?);
    if message.body.trim().is_empty() {
        return Err(ApiError::bad_request("body must not be empty"));
    }
    let mut tx = s.pool.begin().await?;
    let owner: Option<i64> = sqlx::query_scalar(
        "UPDATE conversations SET updated_at = now() WHERE id = $1 RETURNING user_id",
    )
    .bind(conversation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let owner = owner.ok_or_else(|| ApiError::not_found("conversation"))?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO messages (conversation_id, body) VALUES ($1, $2) RETURNING id",
    )
    .bind(conversation_id)
    .bind(&message.body)
    .fetch_one(&mut *tx)
    .await?;
    if let Err(e) = s
        .cache
        .commit_and_invalidate(tx, [conversations(owner)])
        .await
    {
        tracing::error!(error = %e, "commit failed");
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".into(),
        ));
    }
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

#[derive(Deserialize)]
struct Login {
    email: String,
}

async fn login(
    State(s): State<AppState>,
    session: Session,
    body: Result<Json<Login>, JsonRejection>,
) -> ApiResult<Json<User>> {
    let Json(login) = body?;
    let user: Option<User> = sqlx::query_as("SELECT id, email, name FROM users WHERE email = $1")
        .bind(&login.email)
        .fetch_optional(&s.pool)
        .await?;
    let user = user.ok_or(ApiError(StatusCode::UNAUTHORIZED, "unknown user".into()))?;
    session.cycle_id().await?; // no session fixation
    session.insert("user_id", user.id).await?;
    Ok(Json(user))
}

async fn logout(session: Session) -> ApiResult<StatusCode> {
    session.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(s): State<AppState>, session: Session) -> ApiResult<Json<User>> {
    let id: i64 = session
        .get("user_id")
        .await?
        .ok_or(ApiError(StatusCode::UNAUTHORIZED, "not logged in".into()))?;
    let user = user_by_id(&s.pool, &s.cache, id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(user))
}

async fn health(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let database = sqlx::query("SELECT 1").execute(&s.pool).await.map(drop);
    let redis = s.cache.ping().await;
    let pool = pool_status(&s.pool);
    // The usual alert thresholds: pool > 80 % in use, a query's p95 > 500 ms, cache errors
    // > 5 % of calls.
    let breaches = cached_query::Health::default().check(&s.cache, &[("main", pool)]);
    let status = if database.is_ok() && redis.is_ok() && breaches.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let stats = s.cache.stats();
    let show = |r: Result<(), String>| r.map_or_else(|e| e, |()| "ok".to_owned());
    (
        status,
        Json(json!({
            "database": show(database.map_err(|e| e.to_string())),
            "redis": show(redis.map_err(|e| e.to_string())),
            "pool": { "size": pool.size, "idle": pool.idle, "in_use": pool.in_use, "max": pool.max },
            "cache": stats,
            "breaches": breaches.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })),
    )
}

async fn metrics_text(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn debug_slow(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    slow_report(&s.pool).await?; // logs a "slow query" warning: 150 ms > 100 ms
    let timing = cached_query::timings()
        .into_iter()
        .find(|t| t.name == "app.debug_slow");
    Ok(Json(json!({
        "query": "app.debug_slow",
        "count": timing.as_ref().map_or(0, |t| t.count),
        "slow_count": timing.as_ref().map_or(0, |t| t.slow_count),
        "p99_ms": timing.map_or(0.0, |t| t.p99.as_secs_f64() * 1000.0),
    })))
}
