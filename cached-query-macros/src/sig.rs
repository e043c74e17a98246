//! What the macros need to know about the annotated function's signature: which parameters
//! are executors (left out of the key), and whether and what it returns as a `Result`.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{
    FnArg, GenericArgument, Generics, Ident, Pat, PathArguments, PathSegment, ReturnType,
    Signature, Type, TypeParamBound, WherePredicate,
};

/// Types (last path segment, through references) that never belong in a cache key.
const EXECUTOR_TYPES: &[&str] = &[
    "Pool",
    "PgPool",
    "SqlitePool",
    "MySqlPool",
    "AnyPool",
    "PoolConnection",
    "PgConnection",
    "SqliteConnection",
    "MySqlConnection",
    "AnyConnection",
    "Transaction",
    "PgTransaction",
    "SqliteTransaction",
    "MySqlTransaction",
    "AnyTransaction",
    "Cache",
];
/// sqlx's transaction type and its per-database aliases.
const TRANSACTION_TYPES: &[&str] = &[
    "Transaction",
    "PgTransaction",
    "SqliteTransaction",
    "MySqlTransaction",
    "AnyTransaction",
];
/// Executor types left out of the key that no other generated code checks (connections and
/// transactions are checked by their transaction test): each gets a compile-time check that
/// it really is a sqlx pool or a `Cache`, so a domain type that happens to share the name is
/// not silently left out of the key.
const HANDLE_TYPES: &[&str] = &[
    "Pool",
    "PgPool",
    "SqlitePool",
    "MySqlPool",
    "AnyPool",
    "Cache",
];
/// Traits whose implementors may be a transaction that the macro cannot see.
const EXECUTOR_TRAITS: &[&str] = &[
    "Executor",
    "Acquire",
    "PgExecutor",
    "SqliteExecutor",
    "MySqlExecutor",
    "AnyExecutor",
];
/// Connection types whose transaction state is checked at run time (`PoolConnection` derefs to
/// one of them).
const CONNECTION_TYPES: &[&str] = &[
    "PgConnection",
    "SqliteConnection",
    "MySqlConnection",
    "AnyConnection",
];

/// One typed parameter.
pub(crate) struct Param<'a> {
    /// `None` for destructuring patterns.
    pub(crate) ident: Option<&'a Ident>,
    /// The names the parameter binds, in pattern order: its own name, or those a pattern such
    /// as `Path(slug)`, `(a, b)` or `Point { x, y }` binds. Placeholders and the key use them.
    pub(crate) bound: Vec<&'a Ident>,
    pub(crate) pat: &'a Pat,
    pub(crate) ty: &'a Type,
    /// Excluded from the key because it is a pool, connection, executor, cache…
    pub(crate) executor: bool,
    /// An executor known only by a trait bound (`impl Executor`, `E: Acquire`): whether it
    /// runs inside a transaction cannot be checked.
    pub(crate) unchecked: bool,
}

pub(crate) struct FnInfo<'a> {
    pub(crate) params: Vec<Param<'a>>,
    pub(crate) has_self: bool,
}

impl<'a> FnInfo<'a> {
    pub(crate) fn new(sig: &'a Signature) -> Self {
        let mut params = Vec::new();
        let mut has_self = false;
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(_) => has_self = true,
                FnArg::Typed(pt) => {
                    let ident = match &*pt.pat {
                        Pat::Ident(pi) if pi.subpat.is_none() => Some(&pi.ident),
                        _ => None,
                    };
                    let unchecked = is_trait_executor(&pt.ty, &sig.generics);
                    let mut bound = Vec::new();
                    bindings(&pt.pat, &mut bound);
                    params.push(Param {
                        ident,
                        bound,
                        pat: &pt.pat,
                        ty: &pt.ty,
                        executor: unchecked || is_executor_type(&pt.ty),
                        unchecked,
                    });
                }
            }
        }
        FnInfo { params, has_self }
    }

    /// Every name the parameters bind (see [`Param::bound`]).
    pub(crate) fn names(&self) -> Vec<String> {
        self.params
            .iter()
            .flat_map(|p| &p.bound)
            .map(|i| i.to_string())
            .collect()
    }

    /// The connection parameters, each with the number of dereferences that reach the
    /// connection itself (`&mut PgConnection`: 1, `PoolConnection<Postgres>`: 1,
    /// `&mut PoolConnection<Postgres>` and `&mut Transaction<'_, Postgres>`: 2).
    pub(crate) fn connection_params(&self) -> impl Iterator<Item = (&Param<'a>, usize)> {
        self.params.iter().filter_map(|p| {
            let (refs, ty) = count_refs(p.ty);
            match last_segment(ty)?.as_str() {
                "PoolConnection" => Some((p, refs + 1)),
                name if TRANSACTION_TYPES.contains(&name) => Some((p, refs + 1)),
                name if CONNECTION_TYPES.contains(&name) => Some((p, refs)),
                _ => None,
            }
        })
    }

    /// The first connection parameter that can be borrowed mutably (`&mut PgConnection`,
    /// `&mut PoolConnection<…>`), with the dereferences that reach the connection: where
    /// `#[invalidates]` records an invalidation inside the caller's transaction.
    pub(crate) fn mutable_connection(&self) -> Option<(&Param<'a>, usize)> {
        self.connection_params()
            .find(|(p, _)| matches!(p.ty, Type::Reference(r) if r.mutability.is_some()))
    }

    /// Parameters left out of the key because their type is named like a pool or a `Cache`
    /// (see [`HANDLE_TYPES`]).
    pub(crate) fn named_handles(&self) -> impl Iterator<Item = &Param<'a>> {
        self.params.iter().filter(|p| {
            !p.unchecked
                && last_segment(strip_refs(p.ty))
                    .is_some_and(|s| HANDLE_TYPES.contains(&s.as_str()))
        })
    }

    /// The first executor parameter known only by a trait bound.
    pub(crate) fn unchecked_param(&self) -> Option<&Param<'a>> {
        self.params.iter().find(|p| p.unchecked)
    }

    /// The first parameter whose type is a sqlx `Transaction`.
    pub(crate) fn transaction_param(&self) -> Option<&Param<'a>> {
        self.params.iter().find(|p| {
            last_segment(strip_refs(p.ty)).is_some_and(|s| TRANSACTION_TYPES.contains(&s.as_str()))
        })
    }
}

/// Whether `ty` names a connection or a transaction anywhere inside it:
/// `Option<&mut PgConnection>`, `(&PgPool, PoolConnection<…>)`, `Transaction<'_, Postgres>`,
/// `DB::Connection` (for a type parameter `DB` of `generics`), `<Postgres as
/// Database>::Connection`, `impl DerefMut<Target = PgConnection>`. A type of the user's own
/// that is merely named `Transaction` or `Connection` (no generic arguments, not a type
/// parameter's associated type) is not one. Aliases cannot be seen.
pub(crate) fn type_names_connection(ty: &Type, generics: &Generics) -> bool {
    let mut found = Finder::new(generics);
    syn::visit::Visit::visit_type(&mut found, ty);
    found.found
}

/// The first bound on a type parameter used by the parameter types `used` that names a
/// connection or a transaction (`C: DerefMut<Target = PgConnection>` for `conn: &mut C`).
/// Bounds on other types, such as `for<'c> &'c mut DB::Connection: Executor<'c>` (how a
/// function generic over the database says its pool can run statements), are not looked at.
pub(crate) fn generic_naming_connection(
    generics: &Generics,
    used: &[&Type],
) -> Option<proc_macro2::TokenStream> {
    use quote::ToTokens;
    let uses = |ident: &Ident| {
        used.iter()
            .any(|ty| contains_ident(&ty.to_token_stream(), ident))
    };
    // A connection or transaction, or an executor known only by its trait (`&mut C:
    // Executor<'c>`): either may be a transaction.
    let names = |bounds: &syn::punctuated::Punctuated<TypeParamBound, syn::Token![+]>| {
        let mut found = Finder::new(generics);
        for bound in bounds {
            if let TypeParamBound::Trait(t) = bound
                && t.path
                    .segments
                    .last()
                    .is_some_and(|s| EXECUTOR_TRAITS.contains(&s.ident.to_string().as_str()))
            {
                return true;
            }
            syn::visit::Visit::visit_type_param_bound(&mut found, bound);
        }
        found.found
    };
    for param in generics.type_params() {
        if uses(&param.ident) && names(&param.bounds) {
            return Some(param.to_token_stream());
        }
    }
    for pred in generics.where_clause.iter().flat_map(|w| &w.predicates) {
        let WherePredicate::Type(pt) = pred else {
            continue;
        };
        // `C: …` and `&mut C: …` alike.
        let Type::Path(tp) = strip_refs(&pt.bounded_ty) else {
            continue;
        };
        if let Some(ident) = tp.path.get_ident()
            && uses(ident)
            && names(&pt.bounds)
        {
            return Some(pred.to_token_stream());
        }
    }
    None
}

/// Whether `tokens` hold the identifier `ident` at any depth.
fn contains_ident(tokens: &proc_macro2::TokenStream, ident: &Ident) -> bool {
    tokens.clone().into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(i) => i == *ident,
        proc_macro2::TokenTree::Group(g) => contains_ident(&g.stream(), ident),
        _ => false,
    })
}

/// Finds a path naming a connection or transaction type.
struct Finder {
    found: bool,
    /// The function's type parameters: `DB::Connection` is a connection for these.
    params: Vec<String>,
}

impl Finder {
    fn new(generics: &Generics) -> Self {
        Finder {
            found: false,
            params: generics
                .type_params()
                .map(|p| p.ident.to_string())
                .collect(),
        }
    }
}

impl<'ast> syn::visit::Visit<'ast> for Finder {
    fn visit_type_path(&mut self, tp: &'ast syn::TypePath) {
        if self.names_connection(&tp.path, tp.qself.is_some()) {
            self.found = true;
        }
        syn::visit::visit_type_path(self, tp);
    }

    /// `impl sqlx::Connection<…>`, `C: Connection`: the trait names a connection.
    fn visit_trait_bound(&mut self, bound: &'ast syn::TraitBound) {
        if bound
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Connection")
            || self.names_connection(&bound.path, false)
        {
            self.found = true;
        }
        syn::visit::visit_trait_bound(self, bound);
    }
}

impl Finder {
    /// Whether `path` (after a `<T as Trait>::` when `qself`) is sqlx's connection or
    /// transaction: a connection type's name; `Transaction<'c, DB>` with its type argument
    /// (a bare `Transaction` is a domain type); `X::Connection` for a type `X` (a type
    /// parameter, `Self`, or any capitalised name: not a module's `Connection` type).
    fn names_connection(&self, path: &syn::Path, qself: bool) -> bool {
        let segments: Vec<&PathSegment> = path.segments.iter().collect();
        segments.iter().enumerate().any(|(i, segment)| {
            let name = segment.ident.to_string();
            let has_type_arg = matches!(&segment.arguments, PathArguments::AngleBracketed(a)
                if a.args.iter().any(|arg| matches!(arg, GenericArgument::Type(_))));
            CONNECTION_TYPES.contains(&name.as_str())
                || name == "PoolConnection"
                || (TRANSACTION_TYPES.contains(&name.as_str())
                    && (name != "Transaction" || has_type_arg))
                || (name == "Connection"
                    && (qself
                        || i.checked_sub(1).is_some_and(|prev| {
                            let prev = segments[prev].ident.to_string();
                            self.params.contains(&prev)
                                || prev.starts_with(|c: char| c.is_ascii_uppercase())
                        })))
        })
    }
}

/// Appends the identifiers `pat` binds (`mut x`, `x @ Some(y)`, `Path(slug)`, `(a, b)`,
/// `Point { x, y: (a, _) }`, `[first, ..]`); an or-pattern binds the same names on each side.
fn bindings<'a>(pat: &'a Pat, out: &mut Vec<&'a Ident>) {
    match pat {
        Pat::Ident(pi) => {
            out.push(&pi.ident);
            if let Some((_, sub)) = &pi.subpat {
                bindings(sub, out);
            }
        }
        Pat::Tuple(t) => t.elems.iter().for_each(|p| bindings(p, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|p| bindings(p, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| bindings(&f.pat, out)),
        Pat::Slice(s) => s.elems.iter().for_each(|p| bindings(p, out)),
        Pat::Reference(r) => bindings(&r.pat, out),
        Pat::Paren(p) => bindings(&p.pat, out),
        Pat::Type(t) => bindings(&t.pat, out),
        Pat::Or(o) => {
            if let Some(first) = o.cases.first() {
                bindings(first, out);
            }
        }
        _ => {}
    }
}

/// The type behind any references, and how many there were.
fn count_refs(mut ty: &Type) -> (usize, &Type) {
    let mut refs = 0;
    loop {
        match ty {
            Type::Reference(r) => {
                refs += 1;
                ty = &r.elem;
            }
            Type::Paren(p) => ty = &p.elem,
            Type::Group(g) => ty = &g.elem,
            _ => return (refs, ty),
        }
    }
}

fn strip_refs(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Reference(r) => ty = &r.elem,
            Type::Paren(p) => ty = &p.elem,
            Type::Group(g) => ty = &g.elem,
            _ => return ty,
        }
    }
}

fn last_segment(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(tp) if tp.qself.is_none() => {
            tp.path.segments.last().map(|s| s.ident.to_string())
        }
        _ => None,
    }
}

fn bounds_name_executor<'b>(bounds: impl IntoIterator<Item = &'b TypeParamBound>) -> bool {
    bounds.into_iter().any(|b| match b {
        TypeParamBound::Trait(t) => t
            .path
            .segments
            .last()
            .is_some_and(|s| EXECUTOR_TRAITS.contains(&s.ident.to_string().as_str())),
        _ => false,
    })
}

/// A pool, connection, transaction or cache named by its type.
fn is_executor_type(ty: &Type) -> bool {
    last_segment(strip_refs(ty)).is_some_and(|name| EXECUTOR_TYPES.contains(&name.as_str()))
}

/// An executor known by a trait bound: `impl Executor<…>`, or a generic parameter bounded by
/// one of [`EXECUTOR_TRAITS`] inline or in the where clause.
fn is_trait_executor(ty: &Type, generics: &Generics) -> bool {
    let ty = strip_refs(ty);
    if let Type::ImplTrait(it) = ty {
        return bounds_name_executor(&it.bounds);
    }
    let is_single_ident = matches!(ty, Type::Path(tp) if tp.path.segments.len() == 1);
    let Some(name) = last_segment(ty).filter(|_| is_single_ident) else {
        return false;
    };
    let inline = generics
        .type_params()
        .any(|tp| tp.ident == name && bounds_name_executor(&tp.bounds));
    let in_where = generics
        .where_clause
        .iter()
        .flat_map(|w| &w.predicates)
        .any(|p| match p {
            WherePredicate::Type(pt) => {
                last_segment(&pt.bounded_ty).is_some_and(|n| n == name)
                    && bounds_name_executor(&pt.bounds)
            }
            _ => false,
        });
    inline || in_where
}

/// The last path segment of `ty` when it is written as a `…Result` type: `Result<T, E>`,
/// `sqlx::Result<T>`, `fmt::Result`, `anyhow::Result<T>`, a project alias like `DbResult<T>`.
/// The one place that decides what counts as a `Result`.
fn result_segment(ty: &Type) -> Option<&PathSegment> {
    let Type::Path(tp) = ty else {
        return None;
    };
    tp.path
        .segments
        .last()
        .filter(|s| s.ident.to_string().ends_with("Result"))
}

/// Whether `ty` is a `Result` (see [`result_segment`]).
pub(crate) fn is_result(ty: &Type) -> bool {
    result_segment(ty).is_some()
}

/// The return type, checked to be `…Result<T, …>`; yields `T` (the Ok type).
pub(crate) fn ok_type<'a>(sig: &'a Signature, macro_name: &str) -> syn::Result<&'a Type> {
    let not_result = |span: Span| {
        syn::Error::new(
            span,
            format!(
                "#[{macro_name}] requires the function to return `Result<T, E>` (or an alias such as `sqlx::Result<T>`)"
            ),
        )
    };
    let ty = match &sig.output {
        ReturnType::Type(_, ty) => ty,
        ReturnType::Default => return Err(not_result(sig.paren_token.span.join())),
    };
    let Some(last) = result_segment(ty) else {
        return Err(not_result(ty.span()));
    };
    first_type_arg(last).ok_or_else(|| not_result(ty.span()))
}

/// `R` in a return type `Pin<Box<dyn Future<Output = R> + …>>`: the output of the boxed
/// future an `#[async_trait]` method returns in place of its `async fn`.
pub(crate) fn boxed_future_output(sig: &Signature) -> Option<&Type> {
    let ReturnType::Type(_, ty) = &sig.output else {
        return None;
    };
    let boxed = type_arg_of(ty, "Pin")?;
    let Type::TraitObject(object) = type_arg_of(boxed, "Box")? else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(t) = bound else {
            return None;
        };
        let future = t.path.segments.last().filter(|s| s.ident == "Future")?;
        let PathArguments::AngleBracketed(ab) = &future.arguments else {
            return None;
        };
        ab.args.iter().find_map(|a| match a {
            GenericArgument::AssocType(at) if at.ident == "Output" => Some(&at.ty),
            _ => None,
        })
    })
}

/// The first type argument of `ty` when its last segment is `name`: `Box<T>` gives `T`.
fn type_arg_of<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(tp) = ty else {
        return None;
    };
    tp.path
        .segments
        .last()
        .filter(|s| s.ident == name)
        .and_then(first_type_arg)
}

fn first_type_arg(segment: &PathSegment) -> Option<&Type> {
    let PathArguments::AngleBracketed(ab) = &segment.arguments else {
        return None;
    };
    ab.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}

/// How a batch parameter holds its elements (see [`batch_elements`]).
#[derive(Clone, Copy)]
pub(crate) enum BatchKind {
    /// `&[K]`.
    Slice,
    /// `Vec<K>`.
    Vec,
    /// `&Vec<K>`.
    RefVec,
}

/// The element type of a batch parameter written `&[K]`, `Vec<K>` or `&Vec<K>`.
pub(crate) fn batch_elements(ty: &Type) -> Option<(BatchKind, &Type)> {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => match &*r.elem {
            Type::Slice(slice) => Some((BatchKind::Slice, &slice.elem)),
            inner => type_arg_of(inner, "Vec").map(|k| (BatchKind::RefVec, k)),
        },
        Type::Paren(p) => batch_elements(&p.elem),
        Type::Group(g) => batch_elements(&g.elem),
        other => type_arg_of(other, "Vec").map(|k| (BatchKind::Vec, k)),
    }
}

/// The key and value types of an Ok type written `HashMap<K, V, …>` or `BTreeMap<K, V>`.
pub(crate) fn map_types(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(tp) = ty else {
        return None;
    };
    let last = tp
        .path
        .segments
        .last()
        .filter(|s| s.ident == "HashMap" || s.ident == "BTreeMap")?;
    let PathArguments::AngleBracketed(ab) = &last.arguments else {
        return None;
    };
    let mut types = ab.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    });
    Some((types.next()?, types.next()?))
}

/// Whether `ty` is written as `Option<…>`.
pub(crate) fn is_option(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s == "Option")
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;

    fn output_of(sig: &str) -> Option<String> {
        let sig: Signature = syn::parse_str(sig).unwrap();
        boxed_future_output(&sig).map(|ty| ty.to_token_stream().to_string())
    }

    #[test]
    fn the_output_of_an_async_trait_method_is_found() {
        // What async-trait writes in place of `async fn get(&self) -> Result<u8, E>`.
        let sig = "fn get<'life0, 'async_trait>(&'life0 self) -> ::core::pin::Pin<Box<\
                   dyn ::core::future::Future<Output = Result<u8, E>> + ::core::marker::Send + 'async_trait>>";
        assert_eq!(output_of(sig).as_deref(), Some("Result < u8 , E >"));
        let sig = "fn get(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>";
        assert_eq!(output_of(sig).as_deref(), Some("()"));
        assert_eq!(output_of("fn get(&self) -> Box<u8>"), None);
        assert_eq!(output_of("fn get(&self)"), None);
    }
}
