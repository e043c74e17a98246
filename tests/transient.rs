//! `is_transient` on errors made by real servers: PostgreSQL (a terminated backend, a
//! serialization failure between two SERIALIZABLE transactions, a pool timeout; not a syntax
//! error, a unique violation or `RowNotFound`) and MariaDB (a lock wait timeout, a deadlock;
//! not a duplicate key or a syntax error).

mod common;

use cached_query::is_transient;
use common::mysql_url;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgPool};
use std::time::Duration;

#[sqlx::test]
async fn postgres_errors_are_told_apart(pool: PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL);
         INSERT INTO accounts VALUES (1, 100), (2, 100);",
    )
    .execute(&pool)
    .await
    .unwrap();

    // A backend terminated mid-query.
    let mut victim = pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *victim)
        .await
        .unwrap();
    let sleeping = tokio::spawn(async move {
        sqlx::query("SELECT pg_sleep(30)")
            .execute(&mut *victim)
            .await
            .map(drop)
    });
    common::wait_until_running(&pool, pid).await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    let terminated = sleeping.await.unwrap().unwrap_err();
    assert!(is_transient(&terminated), "{terminated:?}");

    // A serialization failure: two SERIALIZABLE transactions that read both rows and write
    // one each.
    let mut a = pool.begin().await.unwrap();
    let mut b = pool.begin().await.unwrap();
    for tx in [&mut a, &mut b] {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .execute(&mut **tx)
            .await
            .unwrap();
        sqlx::query("SELECT sum(balance) FROM accounts")
            .execute(&mut **tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        .execute(&mut *a)
        .await
        .unwrap();
    sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 2")
        .execute(&mut *b)
        .await
        .unwrap();
    a.commit().await.unwrap();
    let conflict = b.commit().await.unwrap_err();
    assert_eq!(code(&conflict).as_deref(), Some("40001"));
    assert!(is_transient(&conflict), "{conflict:?}");

    // A pool with nothing left to hand out.
    let tiny = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(100))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let _held = tiny.acquire().await.unwrap();
    let timed_out = tiny.acquire().await.unwrap_err();
    assert!(matches!(timed_out, sqlx::Error::PoolTimedOut));
    assert!(is_transient(&timed_out));

    // Not transient.
    let syntax = sqlx::query("SELEC 1").execute(&pool).await.unwrap_err();
    assert_eq!(code(&syntax).as_deref(), Some("42601"));
    let unique = sqlx::query("INSERT INTO accounts VALUES (1, 0)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(code(&unique).as_deref(), Some("23505"));
    let missing = sqlx::query("SELECT 1 FROM accounts WHERE id = 99")
        .fetch_one(&pool)
        .await
        .unwrap_err();
    assert!(matches!(missing, sqlx::Error::RowNotFound));
    for e in [syntax, unique, missing] {
        assert!(!is_transient(&e), "{e:?}");
    }
}

fn code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()?.code().map(|c| c.into_owned())
}

#[tokio::test]
async fn mariadb_errors_are_told_apart() {
    let table = format!("cq_transient_{}", std::process::id());
    let mut a = MySqlConnection::connect(&mysql_url()).await.unwrap();
    let mut b = MySqlConnection::connect(&mysql_url()).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB;
         INSERT INTO {table} VALUES (1, 0), (2, 0);"
    )))
    .execute(&mut a)
    .await
    .unwrap();
    let number = |e: &sqlx::Error| {
        e.as_database_error()
            .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(|d| d.number())
    };

    // Lock wait timeout (1205): b waits 1 s for the row a holds.
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut b)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET v = 1 WHERE id = 1"
    )))
    .execute(&mut a)
    .await
    .unwrap();
    let waited = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET v = 2 WHERE id = 1"
    )))
    .execute(&mut b)
    .await
    .unwrap_err();
    assert_eq!(number(&waited), Some(1205));
    assert!(is_transient(&waited), "{waited:?}");
    sqlx::query("ROLLBACK").execute(&mut a).await.unwrap();

    // Deadlock (1213): each holds one row and asks for the other's.
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 20")
        .execute(&mut b)
        .await
        .unwrap();
    for (conn, id) in [(&mut a, 1), (&mut b, 2)] {
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET v = 3 WHERE id = {id}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    let b_waits = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET v = 4 WHERE id = 1"
    )))
    .execute(&mut b);
    let mut watcher = MySqlConnection::connect(&mysql_url()).await.unwrap();
    let a_waits = async {
        // Once b is waiting for row 1 (InnoDB reports the wait), a asks for row 2: one of them
        // is chosen as the victim.
        // Bounded: if the wait is never reported, fail instead of hanging.
        let started = std::time::Instant::now();
        loop {
            let waits: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'",
            )
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            if waits > 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "InnoDB never reported b's lock wait"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET v = 4 WHERE id = 2"
        )))
        .execute(&mut a)
        .await
    };
    let (rb, ra) = tokio::join!(b_waits, a_waits);
    let deadlock = match (ra, rb) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("one of them is the deadlock's victim: {other:?}"),
    };
    assert_eq!(number(&deadlock), Some(1213));
    assert!(is_transient(&deadlock), "{deadlock:?}");
    let _ = sqlx::query("ROLLBACK").execute(&mut a).await;
    let _ = sqlx::query("ROLLBACK").execute(&mut b).await;

    // Not transient: a duplicate key (1062), a syntax error (1064).
    let duplicate = sqlx::query(AssertSqlSafe(format!("INSERT INTO {table} VALUES (1, 0)")))
        .execute(&mut a)
        .await
        .unwrap_err();
    assert_eq!(number(&duplicate), Some(1062));
    let syntax = sqlx::query("SELEC 1").execute(&mut a).await.unwrap_err();
    assert_eq!(number(&syntax), Some(1064));
    for e in [duplicate, syntax] {
        assert!(!is_transient(&e), "{e:?}");
    }
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&mut a)
        .await
        .unwrap();
}
