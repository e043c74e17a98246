//! MySQL and MariaDB on a real MariaDB (`MYSQL_URL`): `DbConfig::connect_mysql` (its
//! variables, statement timeout, pool limits, connect errors, URL checks, redaction), the
//! attributes on `&MySqlPool` and `&mut MySqlConnection` with the transaction rules, and the
//! stale-set stress.

mod common;

use cached_query::{Cache, DbConfig, cached_query, invalidates, pool_status, timed, timings};
use common::{lookup, mysql_url};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

fn mysql_config(extra: &[(&str, &str)]) -> DbConfig {
    let url = mysql_url();
    let mut vars = vec![("DATABASE_URL", url.as_str())];
    vars.extend_from_slice(extra);
    DbConfig::from_lookup(lookup(&vars)).unwrap()
}

/// A table of its own per test (MariaDB has no per-test databases here).
fn table(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "cq_{test}_{}_{}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    )
}

#[tokio::test]
async fn mysql_connections_carry_the_statement_timeout() {
    let pool = mysql_config(&[("DB_STATEMENT_TIMEOUT_MS", "200"), ("DB_POOL_SIZE", "2")])
        .connect_mysql()
        .await
        .unwrap();
    // Both connections of the pool, held at once.
    let mut held = vec![pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
    for conn in &mut held {
        let timeout: f64 = sqlx::query_scalar("SELECT @@SESSION.max_statement_time")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(timeout, 0.2);
    }
    drop(held);
    // Enforced by the server: MariaDB error 1969.
    let err = sqlx::query("SELECT SLEEP(3)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_statement_time"), "{err}");

    // `mariadb://` works the same; without the variable, no timeout.
    let url = mysql_url().replacen("mysql://", "mariadb://", 1);
    let pool = DbConfig::new(url).connect_mysql().await.unwrap();
    let timeout: f64 = sqlx::query_scalar("SELECT @@SESSION.max_statement_time")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timeout, 0.0);
}

#[tokio::test]
async fn the_pool_has_the_configured_limits() {
    let pool = mysql_config(&[
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "1"),
        ("DB_POOL_TIMEOUT", "1"),
    ])
    .connect_mysql()
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            pool.acquire()
                .await
                .expect("within pool_size + max_overflow"),
        );
    }
    let status = pool_status(&pool);
    assert_eq!(
        (status.size, status.in_use, status.idle, status.max),
        (3, 3, 0, 3)
    );
    let err = pool.acquire().await.unwrap_err();
    assert!(matches!(err, sqlx::Error::PoolTimedOut), "{err}");
    drop(held);
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

#[tokio::test]
async fn an_unresponsive_database_fails_within_connect_timeout_naming_host_and_port() {
    common::hung_and_refused_servers_are_named("mysql", |c| async move { c.connect_mysql().await })
        .await;
}

#[tokio::test]
async fn a_refused_login_names_the_server_and_hides_the_password() {
    let url = "mysql://cq_nobody:hunter2@127.0.0.1:3306/test";
    let config = DbConfig::from_lookup(lookup(&[
        ("DATABASE_URL", url),
        ("DB_CONNECT_TIMEOUT", "5"),
    ]))
    .unwrap();
    let err = config.connect_mysql().await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("127.0.0.1:3306"), "{shown}");
    assert!(shown.contains("Access denied"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        format!("{config:?}").contains("cq_nobody:***@"),
        "{config:?}"
    );
}

#[tokio::test]
async fn urls_are_checked_against_the_backend() {
    let my = DbConfig::from_lookup(lookup(&[("DATABASE_URL", "mysql://h/db")])).unwrap();
    let err = my.connect_postgres().await.unwrap_err();
    assert!(err.to_string().contains("for connect_postgres"), "{err}");
    let pg = DbConfig::from_lookup(lookup(&[("DATABASE_URL", "postgres://h/db")])).unwrap();
    let err = pg.connect_mysql().await.unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("DATABASE_URL")
            && shown.contains("a mysql:// or mariadb:// URL for connect_mysql"),
        "{shown}"
    );
}

// --- The attributes on MySQL types -------------------------------------------------------

/// Counts executions of the reads below.
static READS: AtomicU32 = AtomicU32::new(0);

#[cached_query(cache = cache, ttl = 300, invalidate = "person:<id>", skip(table))]
#[timed(name = "mysql.person_name")]
async fn person_name(
    cache: &Cache,
    pool: &MySqlPool,
    table: &str,
    id: i64,
) -> Result<Option<String>, sqlx::Error> {
    READS.fetch_add(1, SeqCst);
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT name FROM {table} WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

#[cached_query(cache = cache, ttl = 300, invalidate = "person:<id>", skip(table))]
async fn person_name_on(
    cache: &Cache,
    conn: &mut MySqlConnection,
    table: &str,
    id: i64,
) -> Result<Option<String>, sqlx::Error> {
    READS.fetch_add(1, SeqCst);
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT name FROM {table} WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

#[invalidates("person:<id>", cache = cache)]
async fn rename(
    cache: &Cache,
    pool: &MySqlPool,
    table: &str,
    id: i64,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET name = ? WHERE id = ?"
    )))
    .bind(name)
    .bind(id)
    .execute(pool)
    .await
    .map(drop)
}

#[invalidates("person:<id>", cache = cache)]
async fn rename_on(
    cache: &Cache,
    conn: &mut MySqlConnection,
    table: &str,
    id: i64,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET name = ? WHERE id = ?"
    )))
    .bind(name)
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

async fn people(pool: &MySqlPool) -> String {
    let table = table("people");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL) ENGINE=InnoDB;
         INSERT INTO {table} VALUES (1, 'ada'), (2, 'grace');"
    )))
    .execute(pool)
    .await
    .unwrap();
    table
}

async fn drop_table(pool: &MySqlPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_attributes_work_on_mysql_pools_and_connections() {
    let pool = DbConfig::new(mysql_url()).connect_mysql().await.unwrap();
    let cache = Cache::builder()
        .redis(&common::redis_url())
        .namespace(&common::unique_ns("mysql-attrs"))
        .build()
        .await
        .unwrap();
    let t = people(&pool).await;
    let reads = || READS.load(SeqCst);

    // On the pool: a miss, then a hit; `#[timed]` inside times the one execution.
    let before = reads();
    assert_eq!(
        person_name(&cache, &pool, &t, 1).await.unwrap().as_deref(),
        Some("ada")
    );
    assert_eq!(
        person_name(&cache, &pool, &t, 1).await.unwrap().as_deref(),
        Some("ada")
    );
    assert_eq!(reads() - before, 1);
    let timed = timings()
        .into_iter()
        .find(|t| t.name == "mysql.person_name")
        .unwrap();
    assert_eq!(timed.count, 1, "inside the cache: the one execution");

    // `#[invalidates]` on the pool: the next read sees the new row.
    rename(&cache, &pool, &t, 1, "ada l.").await.unwrap();
    assert_eq!(
        person_name(&cache, &pool, &t, 1).await.unwrap().as_deref(),
        Some("ada l.")
    );

    // On a connection outside a transaction: cached like the pool.
    let mut conn = pool.acquire().await.unwrap();
    let before = reads();
    assert_eq!(
        person_name_on(&cache, &mut conn, &t, 2)
            .await
            .unwrap()
            .as_deref(),
        Some("grace")
    );
    assert_eq!(
        person_name_on(&cache, &mut conn, &t, 2)
            .await
            .unwrap()
            .as_deref(),
        Some("grace")
    );
    assert_eq!(reads() - before, 1);

    // Inside a transaction: the read bypasses the cache (it may see uncommitted rows), and
    // `#[invalidates]` has no outbox on MySQL: it invalidates before the commit, counted.
    let mut tx = conn.begin().await.unwrap();
    rename_on(&cache, &mut tx, &t, 2, "uncommitted")
        .await
        .unwrap();
    let before = (reads(), cache.stats().bypassed);
    assert_eq!(
        person_name_on(&cache, &mut tx, &t, 2)
            .await
            .unwrap()
            .as_deref(),
        Some("uncommitted")
    );
    assert_eq!(
        (reads(), cache.stats().bypassed),
        (before.0 + 1, before.1 + 1)
    );
    tx.rollback().await.unwrap();
    assert_eq!(cache.stats().invalidations_before_commit, 1);
    // Rolled back: the cache was never filled from the transaction.
    assert_eq!(
        person_name_on(&cache, &mut conn, &t, 2)
            .await
            .unwrap()
            .as_deref(),
        Some("grace")
    );
    drop(conn);
    drop_table(&pool, &t).await;
}

#[cached_query(cache = cache, invalidate = "counter:1", skip(table))]
async fn counter(cache: &Cache, pool: &MySqlPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT value FROM {table} WHERE id = 1"
    )))
    .fetch_one(pool)
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_reads_on_mariadb() {
    let pool = mysql_config(&[("DB_POOL_SIZE", "8")])
        .connect_mysql()
        .await
        .unwrap();
    let t = table("counters");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, value BIGINT NOT NULL) ENGINE=InnoDB;
         INSERT INTO {t} VALUES (1, 0);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let cache = Cache::builder()
        .redis(&common::redis_url())
        .namespace(&common::unique_ns("mysql-stress"))
        .build()
        .await
        .unwrap();
    let t: &'static str = Box::leak(t.into_boxed_str());
    // MariaDB has no `UPDATE … RETURNING`: the row stays locked until the commit, so the
    // value read back in the transaction is the one committed.
    let write = move |pool: MySqlPool, cache: Cache| async move {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {t} SET value = value + 1 WHERE id = 1"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        let v: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT value FROM {t} WHERE id = 1")))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        cache
            .commit_and_invalidate(tx, ["counter:1"])
            .await
            .unwrap();
        v
    };
    let read = move |pool: MySqlPool, cache: Cache| async move {
        counter(&cache, &pool, t).await.unwrap()
    };
    common::stale_set_stress(pool.clone(), cache, write, read).await;
    drop_table(&pool, t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn echo_and_slow_statement_logging_reach_tracing() {
    let logs = common::Logs::capture();
    let quiet = mysql_config(&[("DB_POOL_SIZE", "1")])
        .connect_mysql()
        .await
        .unwrap();
    sqlx::query("SELECT 4242 AS my_quiet_marker")
        .execute(&quiet)
        .await
        .unwrap();
    assert!(
        logs.mine("my_quiet_marker").is_empty(),
        "no echo by default"
    );

    let echo = mysql_config(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_ECHO", "true"),
        ("SLOW_QUERY_THRESHOLD_MS", "50"),
    ])
    .connect_mysql()
    .await
    .unwrap();
    sqlx::query("SELECT 4242 AS my_echo_marker")
        .execute(&echo)
        .await
        .unwrap();
    sqlx::query("SELECT SLEEP(0.2), 1 AS my_slow_marker")
        .execute(&echo)
        .await
        .unwrap();
    let line = |marker: &str| logs.mine(marker).first().cloned().unwrap_or_default();
    assert!(line("my_echo_marker").contains("INFO"), "{}", logs.all());
    assert!(line("my_slow_marker").contains("WARN"), "{}", logs.all());
}
