//! `Cache::watch_table`: statement-level triggers that turn any client's INSERT, UPDATE,
//! DELETE or TRUNCATE of a table into one outbox row, with tags computed in SQL from the old
//! and new rows (`"user:<id>"` → `'user:' || (r."id")::text`); `Cache::watch_tables`: one
//! more trigger per table recording `table:<name>`.

use super::{Outbox, run_script};
use crate::Error;
use sqlx::PgPool;

/// Column types whose PostgreSQL text form is what Rust's `Display` gives for the same value
/// (integers, text, UUIDs, booleans). Others (timestamps, numerics, floats…) render by session
/// settings or with another precision, and a tag that matches nothing is silent staleness.
const TAG_TYPES: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "text",
    "character varying",
    "uuid",
    "boolean",
];

/// Above this many distinct tags, one statement clears every namespace instead (a backfill
/// must not make an outbox row too large to deliver).
const MAX_TAGS: usize = 10_000;

/// Checks `templates` against the columns of `table` and installs (or replaces) its
/// triggers, under the outbox's advisory lock.
pub(crate) async fn install(outbox: &Outbox, table: &str, templates: &[&str]) -> Result<(), Error> {
    let pool = &outbox.pool;
    let oid = resolve(pool, table).await?;
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(|e| Error::outbox("reading the table's columns", e))?;
    if templates.is_empty() {
        return Err(watch_error(table, "at least one tag template is needed"));
    }
    let mut tags = Vec::with_capacity(templates.len());
    for t in templates {
        tags.push(compile(t, &columns).map_err(|p| watch_error(table, &p))?);
    }
    let tags = tags.join(", ");
    let schema = &outbox.schema;
    let function = format!("{schema}.{}", function_name(oid));
    // A dollar quote that no template can end early.
    let mut quote = "$cq$".to_owned();
    while tags.contains(&quote) {
        quote.insert(quote.len() - 1, 'x');
    }
    let target = format!("{oid}::regclass");
    let sql = format!(
        r#"
BEGIN;
SELECT pg_advisory_xact_lock(7421030571094261);
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {quote}
DECLARE t TEXT[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {schema}.cached_query_outbox (clear_namespace) VALUES ('*');
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT x) INTO t
        FROM (SELECT unnest(ARRAY[{tags}]) AS x FROM new_rows r) s WHERE x IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(DISTINCT x) INTO t
        FROM (SELECT unnest(ARRAY[{tags}]) AS x
              FROM (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) r) s
        WHERE x IS NOT NULL;
    ELSE
        SELECT array_agg(DISTINCT x) INTO t
        FROM (SELECT unnest(ARRAY[{tags}]) AS x FROM old_rows r) s WHERE x IS NOT NULL;
    END IF;
    IF cardinality(t) > {MAX_TAGS} THEN
        INSERT INTO {schema}.cached_query_outbox (clear_namespace) VALUES ('*');
    ELSIF t IS NOT NULL THEN
        INSERT INTO {schema}.cached_query_outbox (tags) VALUES (t);
    END IF;
    RETURN NULL;
END {quote};
DO $cq_do$
DECLARE target regclass := {target};
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_ins ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_upd ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_del ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_trunc ON %s', target);
    EXECUTE format('CREATE TRIGGER cached_query_watch_ins AFTER INSERT ON %s
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()', target);
    EXECUTE format('CREATE TRIGGER cached_query_watch_upd AFTER UPDATE ON %s
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {function}()', target);
    EXECUTE format('CREATE TRIGGER cached_query_watch_del AFTER DELETE ON %s
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()', target);
    EXECUTE format('CREATE TRIGGER cached_query_watch_trunc AFTER TRUNCATE ON %s
        FOR EACH STATEMENT EXECUTE FUNCTION {function}()', target);
END $cq_do$;
COMMIT;
"#
    );
    run_script(pool, sql)
        .await
        .map_err(|e| Error::outbox("installing the table's triggers", e))
}

/// Installs (or replaces) on each of `tables` one statement-level trigger that records the
/// tag `table:<name>` (`<name>`: the table's own name, no schema) for any INSERT, UPDATE,
/// DELETE or TRUNCATE, by any client: what `tables = auto` tags entries with.
pub(crate) async fn install_tables(outbox: &Outbox, tables: &[&str]) -> Result<(), Error> {
    let pool = &outbox.pool;
    let schema = &outbox.schema;
    let mut sql = String::from("BEGIN;\nSELECT pg_advisory_xact_lock(7421030571094261);\n");
    for table in tables {
        let oid = resolve(pool, table).await?;
        let (name, kind): (String, String) =
            sqlx::query_as("SELECT relname::text, relkind::text FROM pg_class WHERE oid = $1")
                .bind(oid)
                .fetch_one(pool)
                .await
                .map_err(|e| Error::outbox("reading the table's name", e))?;
        if kind != "r" && kind != "p" {
            return Err(watch_error(
                table,
                "is not a table (a view, a materialized view or a foreign table): watch the \
                 tables it reads, and tag the queries with them",
            ));
        }
        // Partitions and inheritance children: a statement naming one of them directly does
        // not fire the parent's statement trigger, so they get it too, recording the parent's
        // name (the name the application's SQL uses).
        let children: Vec<i64> = sqlx::query_scalar(CHILDREN)
            .bind(oid)
            .fetch_all(pool)
            .await
            .map_err(|e| Error::outbox("listing the table's partitions", e))?;
        let tag = literal(&format!("table:{name}"));
        let function = format!("{schema}.{}", table_function_name(oid));
        let mut quote = "$cq$".to_owned();
        while tag.contains(&quote) {
            quote.insert(quote.len() - 1, 'x');
        }
        sql.push_str(&format!(
            r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {quote}
BEGIN
    INSERT INTO {schema}.cached_query_outbox (tags) VALUES (ARRAY[{tag}]);
    RETURN NULL;
END {quote};
"#
        ));
        // Named after the watched table: a partition watched on its own keeps its own trigger.
        let trigger = table_function_name(oid);
        for target in std::iter::once(oid).chain(children) {
            sql.push_str(&format!(
                r#"
DO $cq_do$
DECLARE target regclass := {target}::regclass;
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS {trigger} ON %s', target);
    EXECUTE format('CREATE TRIGGER {trigger}
        AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
        FOR EACH STATEMENT EXECUTE FUNCTION {function}()', target);
END $cq_do$;
"#
            ));
        }
    }
    sql.push_str("COMMIT;\n");
    run_script(pool, sql)
        .await
        .map_err(|e| Error::outbox("installing the tables' triggers", e))
}

/// Removes what [`install`] created on `table`, if anything.
pub(crate) async fn uninstall(outbox: &Outbox, table: &str) -> Result<(), Error> {
    let pool = &outbox.pool;
    let oid = resolve(pool, table).await?;
    let function = format!("{}.{}", outbox.schema, function_name(oid));
    let table_function = format!("{}.{}", outbox.schema, table_function_name(oid));
    let sql = format!(
        r#"
BEGIN;
SELECT pg_advisory_xact_lock(7421030571094261);
DO $cq_do$
DECLARE target regclass := {oid}::regclass;
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_ins ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_upd ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_del ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS cached_query_watch_trunc ON %s', target);
END $cq_do$;
DROP FUNCTION IF EXISTS {function}();
-- With the triggers that use it: on the table, its partitions, and any partition detached
-- since it was watched.
DROP FUNCTION IF EXISTS {table_function}() CASCADE;
COMMIT;
"#
    );
    run_script(pool, sql)
        .await
        .map_err(|e| Error::outbox("removing the table's triggers", e))
}

/// The table's oid, resolved with the pool's `search_path` (`"schema.table"` also works).
async fn resolve(pool: &PgPool, table: &str) -> Result<i64, Error> {
    let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
        .bind(table)
        .fetch_one(pool)
        .await
        .map_err(|e| Error::outbox("resolving the table name", e))?;
    oid.ok_or_else(|| watch_error(table, "no such table"))
}

fn function_name(oid: i64) -> String {
    format!("cached_query_watch_{oid}")
}

/// Every partition and inheritance child of the table `$1`, at any depth.
const CHILDREN: &str = "WITH RECURSIVE c(oid) AS (
        SELECT inhrelid FROM pg_inherits WHERE inhparent = $1
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN c ON i.inhparent = c.oid)
    SELECT oid::bigint FROM c";

fn table_function_name(oid: i64) -> String {
    format!("cached_query_table_{oid}")
}

fn watch_error(table: &str, problem: &str) -> Error {
    Error::Watch {
        table: table.to_owned(),
        problem: problem.to_owned(),
    }
}

/// `"user:<id>"` as a SQL expression over a row `r`: literal parts quoted, each `<column>`
/// as its text form. A NULL column makes the whole tag NULL (no tag). `columns`: name, type.
fn compile(template: &str, columns: &[(String, String)]) -> Result<String, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('<') {
        if open > 0 {
            parts.push(literal(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else {
            return Err(format!("template {template:?}: `<` without a closing `>`"));
        };
        let column = &after[..close];
        let Some((_, ty)) = columns.iter().find(|(c, _)| c == column) else {
            let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
            return Err(format!(
                "template {template:?}: no column `{column}` (columns: {})",
                names.join(", ")
            ));
        };
        if !TAG_TYPES.contains(&ty.as_str()) {
            return Err(format!(
                "template {template:?}: column `{column}` is {ty}, whose text form may differ \
                 from the tag the application computes; tag by {}",
                TAG_TYPES.join(", ")
            ));
        }
        parts.push(format!("(r.{})::text", super::ident(column)));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(literal(rest));
    }
    if parts.is_empty() {
        return Err("an empty template".to_owned());
    }
    Ok(parts.join(" || "))
}

/// A SQL string literal (standard-conforming strings: only `'` needs doubling).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<(String, String)> {
        [
            ("id", "bigint"),
            ("org_id", "integer"),
            ("Weird\"Name", "text"),
            ("at", "timestamp with time zone"),
        ]
        .iter()
        .map(|(c, t)| ((*c).to_owned(), (*t).to_owned()))
        .collect()
    }

    #[test]
    fn templates_become_sql_over_the_row() {
        assert_eq!(
            compile("user:<id>", &cols()).unwrap(),
            "'user:' || (r.\"id\")::text"
        );
        assert_eq!(
            compile("<org_id>/<id>'s", &cols()).unwrap(),
            "(r.\"org_id\")::text || '/' || (r.\"id\")::text || '''s'"
        );
        assert_eq!(
            compile("w:<Weird\"Name>", &cols()).unwrap(),
            "'w:' || (r.\"Weird\"\"Name\")::text"
        );
        assert_eq!(compile("all", &cols()).unwrap(), "'all'");
    }

    #[test]
    fn unknown_columns_and_bad_templates_are_named() {
        let e = compile("user:<nme>", &cols()).unwrap_err();
        assert!(
            e.contains("no column `nme`") && e.contains("id, org_id"),
            "{e}"
        );
        assert!(
            compile("user:<id", &cols())
                .unwrap_err()
                .contains("without a closing")
        );
        assert!(compile("", &cols()).unwrap_err().contains("empty"));
        let e = compile("ev:<at>", &cols()).unwrap_err();
        assert!(e.contains("`at` is timestamp with time zone"), "{e}");
    }
}
