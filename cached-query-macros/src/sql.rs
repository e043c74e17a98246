//! `tables = auto`: the SQL string literals of a function body, and the tables they read and
//! write, named as PostgreSQL folds them (unquoted names lowercased, no schema).
//!
//! What is seen: string literals passed directly to sqlx's `query!`, `query_as!`,
//! `query_scalar!` (and their `_unchecked` forms) and to `query(…)`, `query_as(…)`,
//! `query_scalar(…)` (and `…_with`) written in this body. SQL built at run time, kept in a
//! constant, or run by a helper the body calls is not seen.

use proc_macro2::{Span, TokenTree};
use sqlparser::ast::{
    FromTable, ObjectName, ObjectNamePart, Query, Statement, TableFactor, TableObject, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use syn::visit::Visit as SynVisit;
use syn::{Block, Expr, ExprCall, ExprMacro, LitStr};

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
];

/// The SQL literals in `body`, in order.
pub(crate) fn literals(body: &Block) -> Vec<LitStr> {
    let mut finder = Finder(Vec::new());
    finder.visit_block(body);
    finder.0
}

struct Finder(Vec<LitStr>);

impl<'ast> SynVisit<'ast> for Finder {
    fn visit_expr_macro(&mut self, m: &'ast ExprMacro) {
        let named = m
            .mac
            .path
            .segments
            .last()
            .is_some_and(|s| MACROS.contains(&s.ident.to_string().as_str()));
        if named {
            // The first string literal among the macro's arguments (`query_as!(T, "…")`).
            let lit = m.mac.tokens.clone().into_iter().find_map(|t| match t {
                TokenTree::Literal(l) => match syn::Lit::new(l) {
                    syn::Lit::Str(s) => Some(s),
                    _ => None,
                },
                _ => None,
            });
            self.0.extend(lit);
        }
        syn::visit::visit_expr_macro(self, m);
    }

    fn visit_expr_call(&mut self, call: &'ast ExprCall) {
        if let Expr::Path(p) = &*call.func
            && p.path
                .segments
                .last()
                .is_some_and(|s| FUNCTIONS.contains(&s.ident.to_string().as_str()))
            && let Some(Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            })) = call.args.first()
        {
            self.0.push(s.clone());
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

/// Parses `sql` (PostgreSQL syntax) into the tables it reads (every relation named, common
/// table expressions excepted) and writes (targets of INSERT, UPDATE, DELETE, MERGE,
/// TRUNCATE).
pub(crate) fn tables(sql: &str) -> Result<Tables, String> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| e.to_string())?;
    let mut v = Relations::default();
    let _ = statements.visit(&mut v);
    let mut out = Tables::default();
    for name in v.relations {
        if !v.ctes.contains(&name) {
            out.read.insert(name);
        }
    }
    out.written = v.written;
    // A target is written, not read, unless the statement also reads it elsewhere: keep it
    // in both only when it appears as a source too (counted by `sources`).
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
    ctes: BTreeSet<String>,
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
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(fold_ident(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if let Some(n) = fold(relation) {
            *self.seen.entry(n.clone()).or_default() += 1;
            self.relations.insert(n);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
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

fn fold_ident(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
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

        let t = tables("WITH recent AS (SELECT * FROM articles) SELECT * FROM recent").unwrap();
        assert_eq!(t.read, set(&["articles"]), "a CTE is not a table");

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
            let built = sqlx::query(&sql);
            helper(pool).await
        });
        let found: Vec<String> = literals(&body).iter().map(LitStr::value).collect();
        assert_eq!(
            found,
            [
                "SELECT 1 FROM a",
                "SELECT * FROM \"B\"",
                "SELECT 1 FROM c",
                "SELECT 1 FROM d"
            ]
        );
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
