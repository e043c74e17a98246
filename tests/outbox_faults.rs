//! Writers that do not finish normally, and a listener that loses its connection: the
//! invalidation still happens. Each test breaks something real: a COMMIT cancelled by a
//! timeout while the server runs it, a connection cut (through a TCP proxy) during COMMIT, a
//! writer process killed with SIGKILL right after COMMIT while Redis is frozen, the listening
//! backend terminated while writes continue.

mod common;

use common::users::{committed, name, reads, rename, schema};

use cached_query::{Cache, Error};
use common::{PgServer, RedisServer, TcpProxy, redis_url, unique_ns, url_of, within};
use sqlx::PgPool;
use std::io::BufRead;
use std::time::Duration;

/// The documented bounds: after a cancelled or lost-reply commit or a listener outage, and
/// after Redis thaws for a crashed writer.
const AFTER_FAULT: Duration = Duration::from_secs(2);
const AFTER_THAW: Duration = Duration::from_secs(3);

/// Every COMMIT that updated `users` takes `secs` on the server (a deferred trigger sleeps).
async fn slow_commits(pool: &PgPool, secs: f64) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep({secs}); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON users
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// `commit_and_invalidate` dropped by a timeout while the server runs COMMIT: the commit
/// lands, and the cache serves the new row (pending here, delivered in the background).
async fn cancelled_commit(pool: PgPool, cache: Cache, other: Option<Cache>) {
    schema(&pool).await;
    slow_commits(&pool, 0.3).await;
    let caches: Vec<&Cache> = [Some(&cache), other.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    for c in &caches {
        assert!(reads(&pool, c, 1, "Ada").await);
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Late' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_millis(50),
        cache.commit_and_invalidate(tx, ["user:1"]),
    )
    .await;
    assert!(out.is_err(), "the timeout fired during COMMIT");
    within(AFTER_FAULT, "the commit landed", || {
        committed(&pool, 1, "Late")
    })
    .await;
    for c in &caches {
        within(AFTER_FAULT, "the cache serves the committed row", || {
            reads(&pool, c, 1, "Late")
        })
        .await;
    }
}

#[sqlx::test]
async fn a_cancelled_commit_still_invalidates_redis(pool: PgPool) {
    let cache = common::redis_cache(&redis_url(), &unique_ns("cancel")).await;
    cancelled_commit(pool, cache, None).await;
}

#[sqlx::test]
async fn a_cancelled_commit_still_invalidates_memory(pool: PgPool) {
    cancelled_commit(pool, Cache::builder().build().await.unwrap(), None).await;
}

#[sqlx::test]
async fn a_cancelled_commit_still_invalidates_with_an_outbox(pool: PgPool) {
    let a = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let b = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    cancelled_commit(pool, a, Some(b)).await;
}

/// The connection is cut while the server runs COMMIT: the reply never comes, the outcome is
/// unknown to the writer (`Err(Commit)`), the commit lands, and the cache is invalidated.
#[sqlx::test]
async fn a_commit_whose_reply_is_lost_invalidates_anyway(pool: PgPool) {
    schema(&pool).await;
    slow_commits(&pool, 0.3).await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let proxied = PgPool::connect(&url_of(&pool, Some(proxy.port)))
        .await
        .unwrap();
    let cache = common::redis_cache(&redis_url(), &unique_ns("cut")).await;
    assert!(reads(&pool, &cache, 1, "Ada").await);

    let mut tx = proxied.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Cut' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    let commit = tokio::spawn({
        let cache = cache.clone();
        async move { cache.commit_and_invalidate(tx, ["user:1"]).await }
    });
    // The server is running this COMMIT (its deferred trigger sleeps): cut the link now.
    within(AFTER_FAULT, "COMMIT running on the server", || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active'
             AND datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        running == 1
    })
    .await;
    proxy.cut();
    let err = commit.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Commit(_)), "{err}");
    within(AFTER_FAULT, "the commit landed", || {
        committed(&pool, 1, "Cut")
    })
    .await;
    assert!(
        reads(&pool, &cache, 1, "Cut").await,
        "invalidated although the commit's outcome was unknown"
    );
}

/// The listening backend is terminated and a write commits before it reconnects: the
/// notice is lost, so the process drops what it holds and catches up.
#[sqlx::test]
async fn a_terminated_listener_drops_local_state_and_catches_up(pool: PgPool) {
    schema(&pool).await;
    let a = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let b = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    for round in 0..5 {
        let old = if round == 0 {
            "Ada".to_owned()
        } else {
            format!("Ada {}", round - 1)
        };
        assert!(reads(&pool, &b, 1, &old).await);
        within(AFTER_FAULT, "both listeners connected", || async {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            listening == 2
        })
        .await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(killed.len(), 2, "both listeners were terminated");
        let to = format!("Ada {round}");
        let mut tx = pool.begin().await.unwrap();
        rename(&mut tx, &a, 1, &to).await.unwrap();
        tx.commit().await.unwrap();
        within(AFTER_FAULT, "after the listener outage", || {
            reads(&pool, &b, 1, &to)
        })
        .await;
    }
}

/// The listener's connection goes silent (a partition: no FIN, no RST, so no error is ever
/// seen): the missed heartbeat makes the process drop what it holds within two sweep
/// intervals, so an invalidation it could not hear of is not served stale.
#[sqlx::test]
async fn a_silent_listener_is_detected_by_its_heartbeat(pool: PgPool) {
    schema(&pool).await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let proxied = PgPool::connect(&url_of(&pool, Some(proxy.port)))
        .await
        .unwrap();
    let a = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let b = Cache::builder()
        .outbox(proxied)
        .outbox_sweep_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &b, 1, "Ada").await);
    assert!(reads(&pool, &b, 1, "Ada").await);
    assert_eq!(b.stats().hits, 1);
    proxy.stall();
    sqlx::query("UPDATE users SET name = 'Partitioned' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    a.invalidate("user:1").await.unwrap();
    within(
        AFTER_FAULT,
        "b stops serving what it may have missed",
        || reads(&pool, &b, 1, "Partitioned"),
    )
    .await;
}

/// The record function fails inside the writer's transaction (here a constraint makes the
/// outbox refuse the row): the transaction is not poisoned, the commit keeps the data, and
/// the invalidation is sent without the outbox.
#[sqlx::test]
async fn a_failed_record_never_rolls_back_the_writers_transaction(pool: PgPool) {
    schema(&pool).await;
    let cache = common::redis_cache_with(
        Cache::builder()
            .redis(&redis_url())
            .namespace(&unique_ns("record-fails"))
            .outbox(pool.clone()),
    )
    .await;
    assert!(reads(&pool, &cache, 1, "Ada").await);
    sqlx::raw_sql(
        "ALTER TABLE cached_query_outbox ADD CONSTRAINT refuse CHECK (cardinality(tags) < 0) NOT VALID",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Kept' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    cache.commit_and_invalidate(tx, ["user:1"]).await.unwrap();
    assert!(
        committed(&pool, 1, "Kept").await,
        "the transaction committed"
    );
    assert!(reads(&pool, &cache, 1, "Kept").await, "and was invalidated");

    // #[invalidates] in a transaction: falls back to invalidating before the commit, counted.
    let mut tx = pool.begin().await.unwrap();
    rename(&mut tx, &cache, 1, "Kept too").await.unwrap();
    tx.commit().await.unwrap();
    assert!(committed(&pool, 1, "Kept too").await);
    assert_eq!(cache.stats().invalidations_before_commit, 1);
    assert!(reads(&pool, &cache, 1, "Kept too").await);

    // By hand: an error, and the transaction is still usable.
    let mut tx = pool.begin().await.unwrap();
    let err = cache
        .invalidate_on_commit(&mut tx, ["user:1"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Outbox { .. }), "{err}");
    sqlx::query("UPDATE users SET name = 'Still' WHERE id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(committed(&pool, 2, "Still").await);
}

/// The writer's `search_path` does not reach the outbox (schema-per-tenant applications).
#[sqlx::test]
async fn the_outbox_works_under_any_search_path(pool: PgPool) {
    schema(&pool).await;
    let a = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let b = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    a.watch_table("users", &["user:<id>"]).await.unwrap();
    assert!(reads(&pool, &b, 1, "Ada").await);
    sqlx::raw_sql("CREATE SCHEMA tenant")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL search_path = tenant, pg_catalog")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE public.users SET name = 'Tenant' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    a.commit_and_invalidate(tx, ["user:1"]).await.unwrap();
    assert!(committed(&pool, 1, "Tenant").await);
    within(AFTER_FAULT, "b", || reads(&pool, &b, 1, "Tenant")).await;
}

/// PostgreSQL crashes and restarts (`pg_ctl stop -m immediate`): every listener loses its
/// connection, and a write committed before they reconnect sends its notice to nobody. Each
/// process drops what it holds when it reconnects and catches up, in-memory and Redis alike.
#[tokio::test]
async fn a_postgres_restart_loses_no_invalidation() {
    let pg = PgServer::start();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    schema(&pool).await;
    let ns = unique_ns("pg-restart");
    let memory = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let redis = Cache::builder()
        .redis(&redis_url())
        .namespace(&ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    for cache in [&memory, &redis] {
        assert!(reads(&pool, cache, 1, "Ada").await);
        assert!(reads(&pool, cache, 1, "Ada").await);
    }
    pg.restart();
    // Written by another client as soon as the server accepts connections again, before the
    // listeners can reconnect: `psql` runs while this test's runtime (one thread) is blocked,
    // so the notice goes to nobody. It records the invalidation as any service can.
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &pg.url(), "-c"])
        .arg(
            "BEGIN; UPDATE users SET name = 'After restart' WHERE id = 1;
             SELECT cached_query_record(ARRAY['user:1'], NULL); COMMIT;",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for cache in [&memory, &redis] {
        within(AFTER_FAULT, "after the restart", || {
            reads(&pool, cache, 1, "After restart")
        })
        .await;
    }
}

/// A writer process commits (its invalidation recorded in the transaction) while Redis is
/// frozen, and is killed with SIGKILL right after COMMIT. Once Redis thaws, a process that was
/// running serves the new row within the bound, and one started afterwards (it never got the
/// notice) serves it at once: it sweeps before its first call.
#[sqlx::test]
async fn a_writer_killed_after_commit_is_covered_by_the_others(pool: PgPool) {
    schema(&pool).await;
    let redis = RedisServer::start();
    let ns = unique_ns("killed");
    let build = || {
        common::fail_fast(&redis.url(), &ns)
            .outbox(pool.clone())
            .build()
    };
    // Entries cached in Redis by processes that are gone by the time of the write.
    let earlier = build().await.unwrap();
    for id in [1, 2] {
        name(&pool, &earlier, id).await.unwrap();
    }
    drop(earlier);
    let running = build().await.unwrap();
    assert!(reads(&pool, &running, 1, "Ada").await);
    assert_eq!(running.stats().hits, 1);

    redis.freeze();
    let mut writer = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["writer_process", "--exact", "--ignored", "--nocapture"])
        .env("CQ_WRITER_DATABASE", url_of(&pool, None))
        .env("CQ_WRITER_REDIS", redis.url())
        .env("CQ_WRITER_NAMESPACE", &ns)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(writer.stdout.take().unwrap());
    let committed_line = tokio::task::spawn_blocking(move || {
        stdout
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("writer: committed"))
    })
    .await
    .unwrap();
    assert!(committed_line, "the writer committed");
    writer.kill().unwrap(); // SIGKILL
    writer.wait().unwrap();
    assert!(committed(&pool, 1, "Killed").await && committed(&pool, 2, "Killed").await);

    redis.thaw();
    let late = build().await.unwrap();
    assert!(
        reads(&pool, &late, 2, "Killed").await,
        "a new process sweeps first"
    );
    within(AFTER_THAW, "a running process serves the new row", || {
        reads(&pool, &running, 1, "Killed")
    })
    .await;
    within(AFTER_THAW, "every row delivered", || async {
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM cached_query_outbox WHERE NOT ($1 = ANY(delivered))",
        )
        .bind(&ns)
        .fetch_one(&pool)
        .await
        .unwrap();
        rows == 0
    })
    .await;
}

/// The child of [`a_writer_killed_after_commit_is_covered_by_the_others`]: commits a rename
/// through `#[invalidates]` in a transaction, says so, and waits to be killed.
#[tokio::test]
#[ignore = "run as a child process by a_writer_killed_after_commit_is_covered_by_the_others"]
async fn writer_process() {
    let Ok(db) = std::env::var("CQ_WRITER_DATABASE") else {
        return;
    };
    let redis = std::env::var("CQ_WRITER_REDIS").unwrap();
    let ns = std::env::var("CQ_WRITER_NAMESPACE").unwrap();
    let pool = PgPool::connect(&db).await.unwrap();
    let cache = common::fail_fast(&redis, &ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    rename(&mut tx, &cache, 1, "Killed").await.unwrap();
    rename(&mut tx, &cache, 2, "Killed").await.unwrap();
    tx.commit().await.unwrap();
    println!("writer: committed");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// The outbox's `SECURITY DEFINER` functions run as their owner: a role that can create
/// functions in the outbox schema must not get them to run its code with the owner's rights
/// (functions named like the built-ins they call, found first on a `search_path`).
#[sqlx::test]
async fn the_outbox_functions_cannot_be_hijacked(pool: PgPool) {
    schema(&pool).await;
    let _cache = Cache::builder().outbox(pool.clone()).build().await.unwrap();
    let role = format!("cq_probe_{}", std::process::id());
    let attack = format!(
        r#"CREATE ROLE {role} LOGIN;
        GRANT CREATE, USAGE ON SCHEMA public TO {role};
        SET ROLE {role};
        CREATE FUNCTION public.json_build_object(text, bigint, text, text[], text, text)
        RETURNS json LANGUAGE plpgsql AS $$
        BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; RETURN '{{}}'::json; END $$;
        CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
        BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; RETURN; END $$;
        SELECT public.cached_query_record(ARRAY['user:1'], NULL);
        RESET ROLE;"#
    );
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(attack))
        .execute(&pool)
        .await;
    let superuser: Option<bool> =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
            .bind(&role)
            .fetch_optional(&pool)
            .await
            .unwrap();
    let cleanup = format!(
        "RESET ROLE; DROP FUNCTION IF EXISTS public.json_build_object(text, bigint, text, text[], text, text);
         DROP FUNCTION IF EXISTS public.unnest(text[]);
         REVOKE ALL ON SCHEMA public FROM {role}; DROP ROLE IF EXISTS {role};"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(cleanup))
        .execute(&pool)
        .await
        .unwrap();
    result.unwrap();
    assert_eq!(
        superuser,
        Some(false),
        "the probe role gained the owner's rights"
    );
}

/// The clear a namespace new to the outbox owes its Redis is recorded durably: its first
/// process starts while Redis is frozen and dies with the clear pending; the next process
/// (which finds the namespace registered) still delivers it before serving.
#[sqlx::test]
async fn a_new_namespaces_clear_survives_its_first_process(pool: PgPool) {
    schema(&pool).await;
    let redis = RedisServer::start();
    let ns = unique_ns("durable-clear");
    let before = common::fail_fast(&redis.url(), &ns).build().await.unwrap();
    assert!(reads(&pool, &before, 1, "Ada").await);
    sqlx::query("UPDATE users SET name = 'Ada D' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    redis.freeze();
    let first = common::fail_fast(&redis.url(), &ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    drop(first); // dies with the clear pending
    redis.thaw();
    let next = common::fail_fast(&redis.url(), &ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    assert!(reads(&pool, &next, 1, "Ada D").await);
}

#[cached_query::invalidates("user:<id>", cache = cache)]
async fn rename_then_hang(
    pool: &PgPool,
    cache: &Cache,
    id: i64,
    to: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(to)
        .execute(pool)
        .await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// An `#[invalidates]` call dropped while its body runs (after an autocommitted write landed)
/// still invalidates.
#[sqlx::test]
async fn an_invalidates_call_dropped_mid_body_still_invalidates(pool: PgPool) {
    schema(&pool).await;
    for cache in [
        Cache::builder().build().await.unwrap(),
        common::redis_cache(&redis_url(), &unique_ns("mid-body")).await,
    ] {
        let to = format!("Hung {}", cache.namespace());
        assert!(
            reads(
                &pool,
                &cache,
                1,
                &name(&pool, &cache, 1).await.unwrap().unwrap()
            )
            .await
        );
        let hung = tokio::time::timeout(
            Duration::from_millis(200),
            rename_then_hang(&pool, &cache, 1, &to),
        );
        assert!(hung.await.is_err(), "dropped mid-body");
        assert!(committed(&pool, 1, &to).await);
        within(AFTER_FAULT, "invalidated", || reads(&pool, &cache, 1, &to)).await;
    }
}

/// A claimer frozen mid-claim (its Redis answers nothing while it holds the claim's
/// transaction open, as a SIGSTOPped process would) is cut off by PostgreSQL after 10 s
/// (`idle_in_transaction_session_timeout` on the outbox's connections); another process of
/// the namespace then delivers the rows.
#[sqlx::test]
async fn a_frozen_claimer_does_not_hold_its_rows(pool: PgPool) {
    schema(&pool).await;
    let ns = unique_ns("frozen-claimer");
    let frozen = RedisServer::start();
    // The claimer: its Redis will hang for a minute on the bump, its claim held open.
    let claimer = Cache::builder()
        .redis(&frozen.url())
        .namespace(&ns)
        .response_timeout(Duration::from_secs(60))
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    // Connected before the freeze, so the bump waits on a reply, not on connecting.
    assert!(reads(&pool, &claimer, 2, "Alan").await);
    let reader = common::redis_cache(&redis_url(), &ns).await;
    assert!(reads(&pool, &reader, 1, "Ada").await);
    frozen.freeze();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'Unfrozen' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    claimer
        .invalidate_on_commit(&mut tx, ["user:1"])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The claimer's listener claims the row and hangs on its Redis.
    within(AFTER_FAULT, "the row is claimed", || async {
        let idle: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        idle == 1
    })
    .await;
    // Another process of the namespace, on a Redis that answers.
    let other = Cache::builder()
        .redis(&redis_url())
        .namespace(&ns)
        .outbox(pool.clone())
        .build()
        .await
        .unwrap();
    within(
        Duration::from_secs(15),
        "delivered by the other process",
        || reads(&pool, &reader, 1, "Unfrozen"),
    )
    .await;
    frozen.thaw();
    drop((claimer, other));
}
