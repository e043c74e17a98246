//! An axum application on PostgreSQL + Redis: cached profiles and conversation lists,
//! Redis-backed sessions, health and Prometheus metrics, slow-query logging.
//!
//! `cargo run --example app --features app` (needs `DATABASE_URL` and `REDIS_URL`; see README).

mod server;

use cached_query::{CacheBuilder, DbConfig, RedisConfig, RedisSessionStore};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let pool = DbConfig::from_env()?.connect_postgres().await?;
    // Pool gauges for /metrics (and the alert rules in the README), sampled until shutdown.
    let _pool_monitor = cached_query::monitor_pool("main", &pool);
    server::migrate(&pool).await?;
    seed(&pool).await?;
    // Invalidation through PostgreSQL: recorded in each write's transaction, and writes by any
    // other client (psql, migrations, other services) to the watched tables reach the cache.
    let cache = CacheBuilder::from_env()?
        .outbox(pool.clone())
        .build()
        .await?;
    server::watch(&cache).await?;
    // Expired messages are deleted every minute.
    let _cleanup = server::spawn_cleanup(pool.clone(), Duration::from_secs(60));
    let sessions = RedisSessionStore::new(&RedisConfig::from_env()?, cache.namespace())?;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = server::AppConfig {
        session_ttl: Duration::from_secs(
            env("SESSION_TTL_SECS")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(86_400),
        ),
        secure_cookies: env("COOKIE_SECURE").is_some_and(|v| v == "true"),
    };
    let addr = env("APP_ADDR").unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, "listening; try GET /users/1 and /users/1/conversations");
    axum::serve(
        listener,
        server::router(pool, cache, sessions, metrics, &config),
    )
    .await?;
    Ok(())
}

/// Demo data on an empty database: two users, 30 conversations with messages.
async fn seed(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(pool)
        .await?;
    if users == 0 {
        sqlx::raw_sql(
            "INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada'), ('alan@example.com', 'Alan');
             INSERT INTO conversations (user_id, title, updated_at)
                  SELECT 1, 'conversation ' || i, now() - i * interval '1 minute' FROM generate_series(1, 30) i;
             INSERT INTO messages (conversation_id, body, created_at)
                  SELECT c.id, 'message ' || m, now() - (5 - m) * interval '1 second'
                    FROM conversations c, generate_series(1, 3) m;",
        )
        .execute(pool)
        .await?;
    }
    Ok(())
}
