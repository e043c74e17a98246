//! The PostgreSQL side of [`CacheBuilder::outbox`](crate::CacheBuilder::outbox): every SQL
//! statement the outbox runs, and nothing about caching.
//!
//! An invalidation is one row of `cached_query_outbox` (its tags, or a namespace to clear),
//! inserted inside the writer's transaction when there is one. A trigger on that table sends
//! `NOTIFY cached_query_outbox` with the row as JSON (its id alone when over the payload
//! limit), which PostgreSQL delivers at commit and never on rollback. Listening processes
//! apply the rows notified. Redis is told once per namespace: a Redis-backed process claims
//! the rows its namespace has not delivered (an advisory lock per namespace and row), bumps
//! the tags and adds its namespace to the rows' `delivered` in the same transaction. Such
//! processes register their namespace in `cached_query_outbox_consumers`; a row is removed
//! once every namespace seen within the last hour has delivered it and it is older than the
//! retention period (which in-memory fleets, keeping no shared state, rely on alone).

pub(crate) mod watch;

use sqlx::{PgConnection, PgPool, Postgres, Row as _, Transaction};
use std::time::Duration;

/// The channel the outbox trigger notifies on.
pub(crate) const CHANNEL: &str = "cached_query_outbox";

/// A `clear_namespace` value that clears every namespace (a watched table was truncated).
pub(crate) const ALL_NAMESPACES: &str = "*";

/// Rows claimed per statement by a sweep, and per claim of notified rows.
pub(crate) const SWEEP_BATCH: i64 = 500;

/// A row's tags as a plain one-dimensional array without NULLs, whoever inserted it.
const TAGS: &str = "ARRAY(SELECT t FROM unnest(tags) t WHERE t IS NOT NULL)";

/// A namespace whose processes have all been gone this long is forgotten: rows it did not
/// deliver may then be removed, and its next process clears its Redis entries first.
const CONSUMER_WINDOW_SECS: f64 = 3600.0;

/// Marks the installed objects' version (a comment on the record function): processes find
/// it current and run no DDL, so roles that do not own the objects can use them.
const SCHEMA_VERSION: &str = "cached-query outbox 5";

/// Creates (or upgrades) the table, its notify trigger, and the record function, in the
/// schema `{schema}` (the outbox pool's current schema). Serialised by an advisory lock, so
/// processes starting together do not race on `CREATE … IF NOT EXISTS`.
///
/// `cached_query_record` is what writers call inside their transactions: schema-qualified,
/// `SECURITY DEFINER` (so the writer's `search_path` and table grants do not matter) with
/// `search_path = pg_catalog, pg_temp` and every object qualified (so nothing a role can
/// create in the outbox schema runs with the owner's rights), normalising its tags (one
/// dimension, no NULLs), and catching its own errors (so a failure can never abort, and
/// thereby silently roll back, the writer's transaction). `cached_query_register` lets
/// Redis-backed processes register their namespace without grants on that table.
const SCHEMA: &str = r#"
BEGIN;
SELECT pg_advisory_xact_lock(7421030571094261);
CREATE TABLE IF NOT EXISTS {schema}.cached_query_outbox (
    id BIGSERIAL PRIMARY KEY,
    tags TEXT[] NOT NULL DEFAULT '{}',
    clear_namespace TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE {schema}.cached_query_outbox
    ADD COLUMN IF NOT EXISTS delivered TEXT[] NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS {schema}.cached_query_outbox_consumers (
    namespace TEXT PRIMARY KEY,
    last_seen TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS cached_query_outbox_created_at
    ON {schema}.cached_query_outbox (created_at);
CREATE OR REPLACE FUNCTION {schema}.cached_query_outbox_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE payload TEXT := json_build_object(
    'id', NEW.id, 'tags', NEW.tags, 'clear', NEW.clear_namespace)::text;
BEGIN
    IF octet_length(payload) > 7900 THEN
        payload := json_build_object('id', NEW.id)::text;
    END IF;
    PERFORM pg_notify('cached_query_outbox', payload);
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION {schema}.cached_query_record(tags TEXT[], clear TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {schema}.cached_query_outbox (tags, clear_namespace)
    VALUES (ARRAY(SELECT DISTINCT t FROM unnest(coalesce(tags, '{}')) t WHERE t IS NOT NULL), clear);
    RETURN true;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cached-query: invalidation not recorded: %', SQLERRM;
    RETURN false;
END $$;
-- Registers a Redis-backed namespace. When it is new or was gone long enough for rows to have
-- been removed without it, also records a clear of it, durably: every process of it delivers
-- that clear like any other row (one that starts, or one whose sweep finds itself forgotten).
CREATE OR REPLACE FUNCTION {schema}.cached_query_register(ns TEXT, window_secs DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE previous TIMESTAMPTZ;
BEGIN
    SELECT last_seen INTO previous FROM {schema}.cached_query_outbox_consumers WHERE namespace = ns;
    INSERT INTO {schema}.cached_query_outbox_consumers (namespace, last_seen)
    VALUES (ns, clock_timestamp())
    ON CONFLICT (namespace) DO UPDATE SET last_seen = excluded.last_seen;
    IF previous IS NULL OR previous < clock_timestamp() - make_interval(secs => window_secs) THEN
        INSERT INTO {schema}.cached_query_outbox (clear_namespace) VALUES (ns);
        RETURN true;
    END IF;
    RETURN false;
END $$;
REVOKE EXECUTE ON FUNCTION {schema}.cached_query_register(TEXT, DOUBLE PRECISION) FROM PUBLIC;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'cached_query_outbox_notify'
          AND tgrelid = '{schema}.cached_query_outbox'::regclass
    ) THEN
        CREATE TRIGGER cached_query_outbox_notify AFTER INSERT ON {schema}.cached_query_outbox
        FOR EACH ROW EXECUTE FUNCTION {schema}.cached_query_outbox_notify();
    END IF;
END $$;
COMMENT ON FUNCTION {schema}.cached_query_record(TEXT[], TEXT) IS '{version}';
COMMIT;
"#;

/// Runs a multi-statement DDL script on a connection of its own, which is closed instead of
/// returned to the pool if the script fails (it would be left inside an aborted transaction).
pub(crate) async fn run_script(pool: &PgPool, sql: String) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = sqlx::Connection::close(conn.detach()).await;
            Err(e)
        }
    }
}

/// A quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One recorded invalidation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct Row {
    pub(crate) id: i64,
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    /// A namespace to clear, or [`ALL_NAMESPACES`].
    #[serde(default)]
    pub(crate) clear: Option<String>,
}

/// What a notice carries: the whole row, or only its id (the row was too large, or it comes
/// from an older trigger that sent bare ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    Row(Row),
    Id(i64),
    /// A listener's heartbeat ([`ping_payload`]), seen by every listener.
    Ping {
        from: String,
        n: u64,
    },
}

/// The payload of heartbeat `n` of the listener identified by `from`.
pub(crate) fn ping_payload(from: &str, n: u64) -> String {
    serde_json::json!({ "ping": from, "n": n }).to_string()
}

impl Notice {
    pub(crate) fn parse(payload: &str) -> Option<Notice> {
        if let Ok(id) = payload.parse::<i64>() {
            return Some(Notice::Id(id));
        }
        #[derive(serde::Deserialize)]
        struct Ping {
            ping: String,
            n: u64,
        }
        if let Ok(p) = serde_json::from_str::<Ping>(payload) {
            return Some(Notice::Ping {
                from: p.ping,
                n: p.n,
            });
        }
        #[derive(serde::Deserialize)]
        struct Payload {
            id: i64,
            tags: Option<Vec<Option<String>>>,
            #[serde(default)]
            clear: Option<String>,
        }
        let p: Payload = serde_json::from_str(payload).ok()?;
        Some(match p.tags {
            Some(tags) => Notice::Row(Row {
                id: p.id,
                tags: tags.into_iter().flatten().collect(),
                clear: p.clear,
            }),
            None => Notice::Id(p.id),
        })
    }

    pub(crate) fn id(&self) -> Option<i64> {
        match self {
            Notice::Row(r) => Some(r.id),
            Notice::Id(id) => Some(*id),
            Notice::Ping { .. } => None,
        }
    }
}

/// The outbox database and its timings.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    /// The outbox's own small pool on the application's database: delivery never waits
    /// behind the application's queries, nor takes its connections.
    pub(crate) pool: PgPool,
    /// One connection, for the listener.
    pub(crate) listen_pool: PgPool,
    /// Where the outbox's objects live (quoted): the outbox pool's current schema.
    pub(crate) schema: String,
    /// How often undelivered rows are swept (and expired rows removed).
    pub(crate) sweep_interval: Duration,
    /// How long in-memory fleets keep delivered rows for listeners that lag behind.
    pub(crate) retention: Duration,
}

impl Outbox {
    /// An outbox on the database of `app_pool`, with connections of its own.
    pub(crate) fn new(app_pool: &PgPool, sweep_interval: Duration, retention: Duration) -> Self {
        let options = (*app_pool.connect_options()).clone().options([
            // A claimer frozen mid-claim (SIGSTOP, a partition) must not hold its rows longer.
            ("idle_in_transaction_session_timeout", "10s"),
            ("lock_timeout", "5s"),
        ]);
        let pool = |n, acquire| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(n)
                .min_connections(0)
                .acquire_timeout(acquire)
                .connect_lazy_with(options.clone())
        };
        Outbox {
            pool: pool(2, Duration::from_secs(30)),
            // Two: a listener given up for dead may hold its connection while it closes; a
            // short acquire keeps reconnecting attempts frequent.
            listen_pool: pool(2, Duration::from_secs(2)),
            schema: String::new(),
            sweep_interval,
            retention,
        }
    }

    /// Creates what the outbox needs in its database, unless the current version is there.
    pub(crate) async fn create_schema(&mut self) -> Result<(), sqlx::Error> {
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&self.pool)
            .await?;
        self.schema = ident(&schema);
        // Current when the record function carries this version and both tables exist (a
        // dropped table under a surviving function must be recreated).
        let current: Option<bool> = sqlx::query_scalar(
            "SELECT obj_description(to_regprocedure($1), 'pg_proc') = $2
                AND to_regclass($3) IS NOT NULL AND to_regclass($4) IS NOT NULL",
        )
        .bind(format!("{}.cached_query_record(text[],text)", self.schema))
        .bind(SCHEMA_VERSION)
        .bind(format!("{}.cached_query_outbox", self.schema))
        .bind(format!("{}.cached_query_outbox_consumers", self.schema))
        .fetch_one(&self.pool)
        .await?;
        if current == Some(true) {
            return Ok(());
        }
        let sql = SCHEMA
            .replace("{schema}", &self.schema)
            .replace("{version}", SCHEMA_VERSION);
        run_script(&self.pool, sql).await
    }

    /// Records an invalidation on `conn`: inside its transaction if it has one (effective at
    /// commit), else at once. One statement whatever the number of tags. `Ok(false)`: not
    /// recorded, and the transaction is intact (the record function catches its errors).
    pub(crate) async fn record(
        &self,
        conn: &mut PgConnection,
        tags: &[String],
        clear: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!("SELECT {}.cached_query_record($1, $2)", self.schema);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(tags)
            .bind(clear)
            .fetch_one(conn)
            .await
    }

    /// Publishes an invalidation at once (its own autocommitted statement).
    pub(crate) async fn publish(
        &self,
        tags: &[String],
        clear: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        match self.record(&mut conn, tags, clear).await? {
            true => Ok(()),
            false => Err(sqlx::Error::Protocol(
                "the outbox record function failed (see the server log)".into(),
            )),
        }
    }

    /// The rows among `ids` that still exist.
    pub(crate) async fn rows(&self, ids: &[i64]) -> Result<Vec<Row>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, ARRAY(SELECT t FROM unnest(tags) t WHERE t IS NOT NULL) AS tags, clear_namespace
             FROM cached_query_outbox WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// Claims, for `namespace`, the rows among `ids` (or, for a sweep, the oldest) that it
    /// has not delivered and no other process of it is delivering, in a transaction that the
    /// caller passes to [`delivered`](Self::delivered) once Redis has them, or drops to put
    /// them back.
    pub(crate) async fn claim(
        &self,
        namespace: &str,
        ids: Option<&[i64]>,
    ) -> Result<(Transaction<'static, Postgres>, Vec<Row>), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let lock = "pg_try_advisory_xact_lock(hashtextextended($1 || '/' || id::text, 7421))";
        let query = match ids {
            Some(ids) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, {TAGS} AS tags, clear_namespace FROM cached_query_outbox
                 WHERE id = ANY($2) AND NOT ($1 = ANY(delivered)) AND {lock}"
            )))
            .bind(namespace)
            .bind(ids),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, {TAGS} AS tags, clear_namespace FROM (
                     SELECT id, tags, clear_namespace FROM cached_query_outbox
                     WHERE NOT ($1 = ANY(delivered)) ORDER BY id LIMIT $2 OFFSET 0) o
                 WHERE {lock}"
            )))
            .bind(namespace)
            .bind(SWEEP_BATCH),
        };
        let rows = query.fetch_all(&mut *tx).await?;
        let rows = rows.iter().map(row).collect::<Result<Vec<_>, _>>()?;
        Ok((tx, rows))
    }

    /// Marks claimed `rows` delivered for `namespace` and ends the claim.
    pub(crate) async fn delivered(
        mut tx: Transaction<'static, Postgres>,
        namespace: &str,
        rows: &[Row],
    ) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        sqlx::query(
            "UPDATE cached_query_outbox SET delivered = array_append(delivered, $1)
             WHERE id = ANY($2) AND NOT ($1 = ANY(delivered))",
        )
        .bind(namespace)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Registers `namespace` as one that Redis-backed processes deliver to (each sweep).
    /// Returns whether it is new or was forgotten; the function then also records a clear of
    /// it, which the caller's sweep delivers.
    pub(crate) async fn register(&self, namespace: &str) -> Result<bool, sqlx::Error> {
        let sql = format!("SELECT {}.cached_query_register($1, $2)", self.schema);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(namespace)
            .bind(CONSUMER_WINDOW_SECS)
            .fetch_one(&self.pool)
            .await
    }

    /// Sends a heartbeat through the notification channel.
    pub(crate) async fn ping(&self, from: &str, n: u64) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(ping_payload(from, n))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes rows that every registered namespace has delivered: at once when there are
    /// such namespaces (Redis-backed fleets), after the retention period when there are none
    /// or the row is too large for its notice (in-memory processes read those rows).
    pub(crate) async fn expire(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "WITH live AS (
                 SELECT coalesce(array_agg(namespace), '{}') AS ns
                 FROM cached_query_outbox_consumers
                 WHERE last_seen > clock_timestamp() - make_interval(secs => $2))
             DELETE FROM cached_query_outbox o USING live
             WHERE o.delivered @> live.ns
               AND ((cardinality(live.ns) > 0 AND pg_column_size(o.tags) < 7000)
                    OR o.created_at < clock_timestamp() - $1::interval)",
        )
        .bind(format!("{} milliseconds", self.retention.as_millis()))
        .bind(CONSUMER_WINDOW_SECS)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Whether a claim batch came back full (more rows may wait).
    pub(crate) fn batch_full(rows: &[Row]) -> bool {
        rows.len() as i64 >= SWEEP_BATCH
    }
}

fn row(r: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        id: r.try_get("id")?,
        tags: r.try_get("tags")?,
        clear: r.try_get("clear_namespace")?,
    })
}
