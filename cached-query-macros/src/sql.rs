//! `tables = auto`: the SQL string literals of a function body, and the tables they read and
//! write, named as PostgreSQL folds them (unquoted names lowercased, no schema).
//!
//! What is seen: string literals passed directly to sqlx's `query!`, `query_as!`,
//! `query_scalar!` (and their `_unchecked` forms), to `query(…)`, `query_as(…)`,
//! `query_scalar(…)` (and `…_with`) and `raw_sql(…)`, and to executor methods such as
//! `.execute("…")`, written in this body. SQL built at run time, kept in a constant, or run by
//! a helper the body calls is not seen. A query call inside another macro (`try_join!(…)`),
//! `query_file!` and `QueryBuilder` are refused rather than missed, and so are functions in
//! `FROM` (their tables are invisible).

use proc_macro2::{Span, TokenTree};
use sqlparser::ast::{
    FromTable, ObjectName, ObjectNamePart, Statement, TableFactor, TableObject, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use syn::spanned::Spanned;
use syn::visit::Visit as SynVisit;
use syn::{Block, Expr, ExprCall, LitStr};

const MACROS: &[&str] = &[
    "query",
    "query_as",
    "query_scalar",
    "query_unchecked",
    "query_as_unchecked",
    "query_scalar_unchecked",
];
const FUNCTIONS: &[&str] = &[
    "query",
    "query_as",
    "query_scalar",
    "query_with",
    "query_as_with",
    "query_scalar_with",
    "raw_sql",
];
/// Set-returning functions that read no table, allowed in `FROM`.
const READS_NO_TABLE: &[&str] = &[
    "generate_series",
    "generate_subscripts",
    "unnest",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_each",
    "json_each_text",
    "jsonb_each",
    "jsonb_each_text",
    "json_to_record",
    "json_to_recordset",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "regexp_matches",
    "regexp_split_to_table",
    "string_to_table",
];
/// Executor methods that take the SQL itself.
const METHODS: &[&str] = &[
    "execute",
    "execute_many",
    "fetch",
    "fetch_all",
    "fetch_many",
    "fetch_one",
    "fetch_optional",
];
/// Names that, met where the SQL cannot be read (inside another macro's tokens, or as the
/// query itself), mean SQL this parser would miss.
const HIDDEN: &[&str] = &[
    "query_file",
    "query_file_as",
    "query_file_scalar",
    "query_file_unchecked",
    "query_file_as_unchecked",
    "query_file_scalar_unchecked",
    "QueryBuilder",
];

/// The SQL literals in `body`, in order; `Err` with the span of SQL it cannot read.
pub(crate) fn literals(body: &Block) -> Result<Vec<LitStr>, Span> {
    let mut finder = Finder::default();
    finder.visit_block(body);
    match finder.hidden {
        Some(span) => Err(span),
        None => Ok(finder.found),
    }
}

#[derive(Default)]
struct Finder {
    found: Vec<LitStr>,
    /// Where SQL was met that cannot be read.
    hidden: Option<Span>,
}

/// Whether `tokens` call a query function or macro anywhere (`query(`, `query!`,
/// `query::<…>(`, `QueryBuilder::`): a macro's arguments are not parsed, so its SQL cannot be
/// read. A variable that happens to be named `query` is not a call.
fn mentions_queries(tokens: proc_macro2::TokenStream) -> bool {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    tokens.iter().enumerate().any(|(i, t)| match t {
        TokenTree::Ident(ident) => {
            let name = ident.to_string();
            let named = FUNCTIONS.contains(&name.as_str())
                || MACROS.contains(&name.as_str())
                || HIDDEN.contains(&name.as_str());
            let called = match tokens.get(i + 1) {
                Some(TokenTree::Group(g)) => g.delimiter() == proc_macro2::Delimiter::Parenthesis,
                Some(TokenTree::Punct(p)) => p.as_char() == '!' || p.as_char() == ':',
                _ => false,
            };
            named && called
        }
        TokenTree::Group(g) => mentions_queries(g.stream()),
        _ => false,
    })
}

impl<'ast> SynVisit<'ast> for Finder {
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let name = m.path.segments.last().map(|s| s.ident.to_string());
        let name = name.as_deref().unwrap_or_default();
        if MACROS.contains(&name) {
            // The first string literal among the macro's arguments (`query_as!(T, "…")`).
            let lit = m.tokens.clone().into_iter().find_map(|t| match t {
                TokenTree::Literal(l) => match syn::Lit::new(l) {
                    syn::Lit::Str(s) => Some(s),
                    _ => None,
                },
                _ => None,
            });
            match lit {
                Some(lit) => self.found.push(lit),
                None => self.hidden = self.hidden.or(Some(m.path.span())),
            }
        } else if HIDDEN.contains(&name) || mentions_queries(m.tokens.clone()) {
            self.hidden = self.hidden.or(Some(m.path.span()));
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments
            .iter()
            .any(|s| HIDDEN.contains(&s.ident.to_string().as_str()))
        {
            self.hidden = self.hidden.or(Some(p.span()));
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_expr_method_call(&mut self, call: &'ast syn::ExprMethodCall) {
        if METHODS.contains(&call.method.to_string().as_str())
            && let Some(Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            })) = call.args.first()
        {
            self.found.push(s.clone());
        }
        syn::visit::visit_expr_method_call(self, call);
    }

    fn visit_expr_call(&mut self, call: &'ast ExprCall) {
        if let Expr::Path(p) = &*call.func
            && p.path
                .segments
                .last()
                .is_some_and(|s| FUNCTIONS.contains(&s.ident.to_string().as_str()))
        {
            match call.args.first() {
                Some(Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                })) => self.found.push(s.clone()),
                // SQL from a variable, `include_str!`, `format!`…: not readable here.
                Some(other) => self.hidden = self.hidden.or(Some(other.span())),
                None => {}
            }
        }
        syn::visit::visit_expr_call(self, call);
    }
}

/// The tables one SQL text reads and writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tables {
    pub(crate) read: BTreeSet<String>,
    pub(crate) written: BTreeSet<String>,
}

/// Parses `sql` (PostgreSQL syntax) into the tables it reads (every relation named: a common
/// table expression's name too, since it may shadow a table it reads, and a tag nothing bumps
/// costs nothing) and writes (targets of INSERT, UPDATE, DELETE, MERGE, TRUNCATE). A function
/// in `FROM` is an error: the tables it reads are invisible here.
pub(crate) fn tables(sql: &str) -> Result<Tables, String> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("it does not parse: {e}"))?;
    let mut v = Relations::default();
    if let ControlFlow::Break(function) = statements.visit(&mut v) {
        return Err(format!(
            "`{function}` in FROM is a function: the tables it reads cannot be seen"
        ));
    }
    let mut out = Tables {
        read: v.relations,
        written: v.written,
    };
    // A target is written, not read, unless the statement also reads it elsewhere: keep it
    // in both only when it appears as a relation more often than as a target.
    for w in &out.written {
        if v.targets.get(w).copied().unwrap_or(0) >= v.seen.get(w).copied().unwrap_or(0) {
            out.read.remove(w);
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Relations {
    relations: BTreeSet<String>,
    written: BTreeSet<String>,
    /// How often each name appears as a relation, and as a write target.
    seen: std::collections::BTreeMap<String, usize>,
    targets: std::collections::BTreeMap<String, usize>,
}

impl Relations {
    fn target(&mut self, name: &ObjectName) {
        if let Some(n) = fold(name) {
            *self.targets.entry(n.clone()).or_default() += 1;
            self.written.insert(n);
        }
    }

    fn target_factor(&mut self, factor: &TableFactor) {
        if let TableFactor::Table { name, .. } = factor {
            self.target(name);
        }
    }
}

impl Visitor for Relations {
    /// The name of a function met in `FROM`.
    type Break = String;

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. }
                if !READS_NO_TABLE.contains(&name.to_string().to_ascii_lowercase().as_str()) =>
            {
                ControlFlow::Break(name.to_string())
            }
            TableFactor::TableFunction { expr, .. } => ControlFlow::Break(expr.to_string()),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<String> {
        if let Some(n) = fold(relation) {
            *self.seen.entry(n.clone()).or_default() += 1;
            self.relations.insert(n);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<String> {
        match statement {
            Statement::Insert(insert) => {
                if let TableObject::TableName(name) = &insert.table {
                    self.target(name);
                }
            }
            Statement::Update(update) => self.target_factor(&update.table.relation),
            Statement::Delete(delete) => {
                for name in &delete.tables {
                    self.target(name);
                }
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) =
                    &delete.from;
                if delete.tables.is_empty()
                    && let Some(first) = from.first()
                {
                    self.target_factor(&first.relation);
                }
            }
            Statement::Merge(merge) => self.target_factor(&merge.table),
            Statement::Truncate(truncate) => {
                for t in &truncate.table_names {
                    self.target(&t.name);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The table part of a name as PostgreSQL folds it: quoted kept, unquoted lowercased, schema
/// dropped.
fn fold(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(ident) => Some(fold_ident(ident)),
        ObjectNamePart::Function(_) => None,
    }
}

/// PostgreSQL's folding: unquoted names lowercased in ASCII only, every name cut to 63 bytes
/// (as `relname` holds it).
fn fold_ident(ident: &sqlparser::ast::Ident) -> String {
    let mut name = if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    };
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// A table name written by hand (`tables("users", "app.\"Orgs\"")`) folded the same way.
pub(crate) fn fold_written(name: &str, span: Span) -> syn::Result<String> {
    let err = |why: String| {
        syn::Error::new(
            span,
            format!(
                "`tables(…)`: {name:?} is not a table name ({why}); write it as in SQL, e.g. \"users\" or \"app.users\""
            ),
        )
    };
    let mut parser = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(name)
        .map_err(|e| err(e.to_string()))?;
    let parsed = parser
        .parse_object_name(false)
        .map_err(|e| err(e.to_string()))?;
    if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
        return Err(err("unexpected text after the name".to_owned()));
    }
    fold(&parsed).ok_or_else(|| err("not a plain name".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn reads_and_writes_are_told_apart() {
        let t = tables(
            "SELECT a.id, u.name FROM public.Articles a JOIN \"Users\" u ON u.id = a.author_id \
             WHERE a.slug = $1 AND EXISTS (SELECT 1 FROM follows f WHERE f.followee = u.id)",
        )
        .unwrap();
        assert_eq!(t.read, set(&["Users", "articles", "follows"]));
        assert!(t.written.is_empty());

        let t = tables(
            "WITH articles AS (SELECT * FROM articles WHERE NOT hidden) SELECT * FROM articles",
        )
        .unwrap();
        assert_eq!(
            t.read,
            set(&["articles"]),
            "a CTE shadowing the table it reads"
        );
        let t = tables("WITH d AS (DELETE FROM x RETURNING *) SELECT * FROM d").unwrap();
        assert_eq!(t.written, set(&["x"]), "a writable CTE");
        assert!(
            tables("SELECT * FROM feed_for($1)")
                .unwrap_err()
                .contains("feed_for")
        );
        let long = format!("SELECT 1 FROM {}", "a".repeat(70));
        assert_eq!(tables(&long).unwrap().read, set(&[&"a".repeat(63)]));
        assert_eq!(tables("SELECT 1 FROM ÄRZTE").unwrap().read, set(&["Ärzte"]));

        let t = tables("UPDATE users SET name = $1 WHERE id = $2").unwrap();
        assert_eq!((t.written, t.read), (set(&["users"]), set(&[])));
        let t =
            tables("INSERT INTO follows (a, b) SELECT $1, id FROM users WHERE name = $2").unwrap();
        assert_eq!((t.written, t.read), (set(&["follows"]), set(&["users"])));
        let t = tables("DELETE FROM sessions USING users WHERE users.id = sessions.uid").unwrap();
        assert_eq!((t.written, t.read), (set(&["sessions"]), set(&["users"])));
        let t = tables("TRUNCATE audit; UPDATE counters SET value = 0").unwrap();
        assert_eq!(t.written, set(&["audit", "counters"]));
        assert!(tables("SELEC 1").is_err());
    }

    #[test]
    fn literals_are_found_in_sqlx_macros_and_calls_of_this_body_only() {
        let body: Block = syn::parse_quote!({
            let a = sqlx::query!("SELECT 1 FROM a");
            let b = sqlx::query_as!(Row, r#"SELECT * FROM "B""#, id);
            let c = query_scalar::<_, i64>("SELECT 1 FROM c")
                .fetch_one(pool)
                .await?;
            let d = sqlx::query_as_with("SELECT 1 FROM d", args);
            let not = format!("SELECT 1 FROM e");
            let e = pool.execute("DELETE FROM e").await?;
            let f = sqlx::raw_sql("TRUNCATE f").execute(pool).await?;
            helper(pool).await
        });
        let found: Vec<String> = literals(&body).unwrap().iter().map(LitStr::value).collect();
        assert_eq!(
            found,
            [
                "SELECT 1 FROM a",
                "SELECT * FROM \"B\"",
                "SELECT 1 FROM c",
                "SELECT 1 FROM d",
                "DELETE FROM e",
                "TRUNCATE f"
            ]
        );
        let fine: Block = syn::parse_quote!({
            tracing::debug!(query, "searching");
            let rows = sqlx::query("SELECT 1 FROM a").fetch_all(p).await?;
            println!("{}", vec![query]);
        });
        assert_eq!(
            literals(&fine).unwrap().len(),
            1,
            "a variable named query is not a call"
        );
        assert!(tables("SELECT x FROM generate_series(1, 3) x").is_ok());
        for hidden in [
            syn::parse_quote!({ sqlx::query(include_str!("q.sql")) }),
            syn::parse_quote!({ sqlx::query(&sql) }),
            syn::parse_quote!({ tokio::try_join!(query("SELECT 1 FROM a").fetch_one(p)) }),
            syn::parse_quote!({ sqlx::query_file!("q.sql") }),
            syn::parse_quote!({ QueryBuilder::new("SELECT * FROM a") }),
        ] {
            let body: Block = hidden;
            assert!(literals(&body).is_err());
        }
    }

    #[test]
    fn names_written_by_hand_fold_as_in_sql() {
        let s = Span::call_site();
        assert_eq!(fold_written("Users", s).unwrap(), "users");
        assert_eq!(fold_written("app.\"Orgs\"", s).unwrap(), "Orgs");
        assert!(fold_written("users; drop", s).is_err());
        assert!(fold_written("", s).is_err());
    }
}
