//! `DbConfig` and `RedisConfig` from the environment, against real PostgreSQL, SQLite and Redis.

mod common;

use cached_query::{Cache, DbConfig, RedisConfig, cached_query, pool_status};
use common::{Logs, database_url, lookup, redis_url, unique_ns};
use std::convert::Infallible;
use std::time::Duration;

#[test]
fn defaults_need_only_database_url() {
    let c =
        DbConfig::from_lookup(lookup(&[("DATABASE_URL", "postgres://app@db:5432/app")])).unwrap();
    assert_eq!(c.url, "postgres://app@db:5432/app");
    assert_eq!((c.pool_size, c.max_overflow), (10, 20));
    assert_eq!(c.pool_timeout, Duration::from_secs(30));
    assert_eq!(c.pool_recycle, Duration::from_secs(3600));
    assert_eq!(c.idle_timeout, Duration::from_secs(600));
    assert!(c.pre_ping && !c.echo);
    assert_eq!(c.slow_statement_threshold, Duration::from_millis(100));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!((c.application_name, c.statement_timeout), (None, None));
}

#[test]
fn every_variable_is_read() {
    let c = DbConfig::from_lookup(lookup(&[
        ("DATABASE_URL", "postgresql://app@db/app"),
        ("DB_POOL_SIZE", "5"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "7"),
        ("DB_POOL_RECYCLE", "120"),
        ("DB_IDLE_TIMEOUT", "60"),
        ("DB_PRE_PING", "false"),
        ("DB_ECHO", "yes"),
        ("SLOW_QUERY_THRESHOLD_MS", "250"),
        ("DB_CONNECT_TIMEOUT", "3"),
        ("DB_APPLICATION_NAME", "billing"),
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
    ]))
    .unwrap();
    assert_eq!((c.pool_size, c.max_overflow), (5, 0));
    assert_eq!(c.pool_timeout, Duration::from_secs(7));
    assert_eq!(c.pool_recycle, Duration::from_secs(120));
    assert_eq!(c.idle_timeout, Duration::from_secs(60));
    assert!(!c.pre_ping && c.echo);
    assert_eq!(c.slow_statement_threshold, Duration::from_millis(250));
    assert_eq!(c.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.application_name.as_deref(), Some("billing"));
    assert_eq!(c.statement_timeout, Some(Duration::from_millis(1500)));

    let r = RedisConfig::from_lookup(lookup(&[
        ("REDIS_URL", "redis://cache:6380/2"),
        ("REDIS_PASSWORD", "pw"),
        ("REDIS_CONNECT_TIMEOUT_MS", "300"),
        ("REDIS_RESPONSE_TIMEOUT_MS", "40"),
    ]))
    .unwrap();
    assert_eq!(r.url.as_deref(), Some("redis://:pw@cache:6380/2"));
    assert_eq!(
        (r.connect_timeout, r.response_timeout),
        (Duration::from_millis(300), Duration::from_millis(40))
    );
    let defaults = RedisConfig::from_lookup(lookup(&[])).unwrap();
    assert_eq!(defaults, RedisConfig::default());
    assert_eq!(defaults.url, None);
}

#[test]
fn bad_values_name_the_variable_the_value_and_what_is_expected() {
    let url = ("DATABASE_URL", "postgres://u:pw@h/db");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[],
            "DATABASE_URL=\"\": expected a postgres://, postgresql://, mysql://, mariadb:// or sqlite: URL (it is not set)",
        ),
        (
            &[("DATABASE_URL", "oracle://u:hunter2@h/db")],
            "DATABASE_URL=\"oracle://u:***@h/db\": expected a postgres://, postgresql://, mysql://, mariadb:// or sqlite: URL",
        ),
        (
            &[url, ("DB_POOL_SIZE", "abc")],
            "DB_POOL_SIZE=\"abc\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_POOL_SIZE", "0")],
            "DB_POOL_SIZE=\"0\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_POOL_SIZE", "-3")],
            "DB_POOL_SIZE=\"-3\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_POOL_SIZE", "99999999999")],
            "DB_POOL_SIZE=\"99999999999\": expected a whole number from 1 to 4294967295",
        ),
        (
            &[url, ("DB_MAX_OVERFLOW", "-1")],
            "DB_MAX_OVERFLOW=\"-1\": expected a whole number ≥ 0",
        ),
        (
            &[url, ("DB_POOL_TIMEOUT", "1.5")],
            "DB_POOL_TIMEOUT=\"1.5\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_POOL_RECYCLE", "0")],
            "DB_POOL_RECYCLE=\"0\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_IDLE_TIMEOUT", "10m")],
            "DB_IDLE_TIMEOUT=\"10m\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_CONNECT_TIMEOUT", "x")],
            "DB_CONNECT_TIMEOUT=\"x\": expected a whole number ≥ 1",
        ),
        (
            &[url, ("DB_PRE_PING", "sometimes")],
            "DB_PRE_PING=\"sometimes\": expected true or false",
        ),
        (
            &[url, ("DB_ECHO", "2")],
            "DB_ECHO=\"2\": expected true or false",
        ),
        (
            &[url, ("SLOW_QUERY_THRESHOLD_MS", "-100")],
            "SLOW_QUERY_THRESHOLD_MS=\"-100\": expected a whole number ≥ 0",
        ),
        (
            &[url, ("DB_STATEMENT_TIMEOUT_MS", "0")],
            "DB_STATEMENT_TIMEOUT_MS=\"0\": expected a whole number ≥ 1",
        ),
    ];
    for (vars, expected) in cases {
        let err = DbConfig::from_lookup(lookup(vars)).unwrap_err();
        assert!(
            err.to_string().starts_with(expected),
            "{err}\nexpected: {expected}"
        );
        assert!(!format!("{err} {err:?}").contains("hunter2"));
    }
    let err =
        RedisConfig::from_lookup(lookup(&[("REDIS_CONNECT_TIMEOUT_MS", "soon")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "REDIS_CONNECT_TIMEOUT_MS=\"soon\": expected a whole number ≥ 1"
    );
}

#[test]
fn passwords_never_appear_in_debug_output() {
    let db = DbConfig::from_lookup(lookup(&[("DATABASE_URL", "postgres://app:hunter2@db/app")]))
        .unwrap();
    let redis = RedisConfig::from_lookup(lookup(&[
        ("REDIS_URL", "redis://h"),
        ("REDIS_PASSWORD", "hunter2"),
    ]))
    .unwrap();
    for shown in [format!("{db:?}"), format!("{redis:?}")] {
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
    }
}

fn pg_config(extra: &[(&str, &str)]) -> DbConfig {
    let url = database_url();
    let mut vars = vec![("DATABASE_URL", url.as_str())];
    vars.extend_from_slice(extra);
    DbConfig::from_lookup(lookup(&vars)).unwrap()
}

#[tokio::test]
async fn postgres_connections_carry_application_name_and_statement_timeout() {
    let pool = pg_config(&[
        ("DB_APPLICATION_NAME", "cq-test-app"),
        ("DB_STATEMENT_TIMEOUT_MS", "1234"),
        ("DB_POOL_SIZE", "2"),
    ])
    .connect_postgres()
    .await
    .unwrap();
    for _ in 0..3 {
        let mut conn = pool.acquire().await.unwrap();
        let name: String = sqlx::query_scalar("SHOW application_name")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!((name.as_str(), timeout.as_str()), ("cq-test-app", "1234ms"));
    }
    // The statement timeout is enforced by the server.
    let err = sqlx::query("SELECT pg_sleep(3)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
}

#[tokio::test]
async fn the_pool_has_the_configured_limits() {
    let pool = pg_config(&[
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "1"),
        ("DB_POOL_TIMEOUT", "1"),
    ])
    .connect_postgres()
    .await
    .unwrap();
    let held: Vec<_> = futures_join(&pool, 3).await;
    let status = pool_status(&pool);
    assert_eq!(
        (status.size, status.in_use, status.idle, status.max),
        (3, 3, 0, 3)
    );
    let err = pool.acquire().await.unwrap_err();
    assert!(matches!(err, sqlx::Error::PoolTimedOut), "{err}");
    drop(held); // connections go back to the pool in the background
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool_status(&pool).in_use > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("released connections return to the pool");
    let status = pool_status(&pool);
    assert_eq!((status.idle, status.max), (status.size, 3));
}

async fn futures_join(
    pool: &sqlx::PgPool,
    n: usize,
) -> Vec<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(
            pool.acquire()
                .await
                .expect("within pool_size + max_overflow"),
        );
    }
    held
}

#[tokio::test]
async fn an_unresponsive_database_fails_within_connect_timeout_naming_host_and_port() {
    common::hung_and_refused_servers_are_named("postgres", |c| async move {
        c.connect_postgres().await
    })
    .await;
}

#[tokio::test]
async fn urls_are_checked_against_the_backend() {
    let pg = DbConfig::from_lookup(lookup(&[("DATABASE_URL", "postgres://h/db")])).unwrap();
    let err = pg.connect_sqlite().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a sqlite: URL for connect_sqlite"),
        "{err}"
    );
    let lite = DbConfig::from_lookup(lookup(&[("DATABASE_URL", "sqlite::memory:")])).unwrap();
    let err = lite.connect_postgres().await.unwrap_err();
    assert!(err.to_string().contains("for connect_postgres"), "{err}");
}

#[tokio::test]
async fn sqlite_gets_wal_foreign_keys_busy_timeout_and_is_created() {
    let dir = std::env::temp_dir().join(unique_ns("sqlite").replace(':', "-"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    let url = format!("sqlite://{}", file.display());
    let pool = DbConfig::from_lookup(lookup(&[
        ("DATABASE_URL", &url),
        ("DB_POOL_TIMEOUT", "4"),
        ("DB_POOL_SIZE", "1"),
    ]))
    .unwrap()
    .connect_sqlite()
    .await
    .unwrap();
    assert!(file.exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((mode.as_str(), fk, busy), ("wal", 1, 4000));
    sqlx::raw_sql(
        "CREATE TABLE p (id INTEGER PRIMARY KEY); CREATE TABLE c (p INTEGER REFERENCES p(id));",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(
        sqlx::query("INSERT INTO c VALUES (9)")
            .execute(&pool)
            .await
            .is_err(),
        "foreign keys enforced"
    );
    pool.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cached_query(cache = cache)]
async fn triple(cache: &Cache, n: i64) -> Result<i64, Infallible> {
    Ok(n * 3)
}

#[tokio::test]
async fn the_builder_takes_a_redis_config() {
    let config = RedisConfig::from_lookup(lookup(&[
        ("REDIS_URL", &redis_url()),
        ("REDIS_RESPONSE_TIMEOUT_MS", "500"),
    ]))
    .unwrap();
    let cache = Cache::builder()
        .redis_config(config)
        .namespace(&unique_ns("rcfg"))
        .build()
        .await
        .unwrap();
    assert!(format!("{cache:?}").contains("redis"));
    triple(&cache, 2).await.unwrap();
    assert_eq!(triple(&cache, 2).await.unwrap(), 6);
    assert_eq!((cache.stats().hits, cache.stats().errors), (1, 0));
}

/// redis-rs reads a unix socket's password from `?pass=`: `REDIS_PASSWORD` goes there, and
/// stays out of messages.
#[tokio::test]
async fn redis_password_reaches_a_unix_socket_server() {
    let socket = std::env::temp_dir().join(format!("cq-{}.sock", unique_ns("unix")));
    let socket = socket.to_str().unwrap().replace(':', "-");
    let server =
        common::RedisServer::start_with(&["--unixsocket", &socket, "--requirepass", "s3cret"]);
    let url = format!("unix://{socket}");
    let vars = lookup(&[("REDIS_URL", &url), ("REDIS_PASSWORD", "s3cret")]);
    let config = RedisConfig::from_lookup(&vars).unwrap();
    assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
    let cache = Cache::from_lookup(vars).await.unwrap();
    cache.ping().await.unwrap();
    triple(&cache, 7).await.unwrap();
    assert_eq!(triple(&cache, 7).await.unwrap(), 21);
    assert_eq!((cache.stats().hits, cache.stats().errors), (1, 0));
    assert!(server.cli(&["DBSIZE"]).trim().parse::<u32>().unwrap() >= 2);
    drop(server);
    let _ = std::fs::remove_file(&socket);
}

#[tokio::test(flavor = "current_thread")]
async fn echo_and_slow_statement_logging_reach_tracing() {
    let logs = Logs::capture();

    let quiet = pg_config(&[("DB_POOL_SIZE", "1")])
        .connect_postgres()
        .await
        .unwrap();
    sqlx::query("SELECT 4242 AS quiet_marker")
        .execute(&quiet)
        .await
        .unwrap();
    assert!(logs.mine("quiet_marker").is_empty(), "no echo by default");

    let echo = pg_config(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_ECHO", "true"),
        ("SLOW_QUERY_THRESHOLD_MS", "50"),
    ])
    .connect_postgres()
    .await
    .unwrap();
    sqlx::query("SELECT 4242 AS echo_marker")
        .execute(&echo)
        .await
        .unwrap();
    sqlx::query("SELECT pg_sleep(0.2), 1 AS slow_marker")
        .execute(&echo)
        .await
        .unwrap();
    let line = |marker: &str| logs.mine(marker).first().cloned().unwrap_or_default();
    assert!(line("echo_marker").contains("INFO"), "{}", logs.all());
    assert!(line("slow_marker").contains("WARN"), "{}", logs.all());
}
