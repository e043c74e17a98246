//! `#[cached_query]` and `#[invalidates]`: the body becomes a call into
//! `<crate>::__private` that receives the original body as a future.

use crate::args::{CachedArgs, InvalidatesArgs, Krate, TablesArg};
use crate::batch::Batch;
use crate::item::{body_future, query_name, replace_body, require_async, resolve_cache};
use crate::sig::{self, FnInfo};
use crate::sql;
use crate::template::{self, Rendered, Scope, TagSpec};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ItemFn;
use syn::spanned::Spanned;

/// `#[cached_query]` on its own.
pub(crate) fn expand(args: &CachedArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    let block = block(args, item, body_future(item))?;
    Ok(replace_body(item, block))
}

/// The body of a `#[cached_query]` function whose query, run on a miss, is `body`: the
/// original body as a future, possibly inside an inner layer.
pub(crate) fn block(
    args: &CachedArgs,
    item: &ItemFn,
    body: TokenStream,
) -> syn::Result<TokenStream> {
    require_async(item, "cached_query")?;
    let ok_ty = sig::ok_type(&item.sig, "cached_query")?;
    let info = FnInfo::new(&item.sig);
    let skip = args.skip.as_deref().unwrap_or_default();

    let batch = match &args.batch {
        Some(name) => Some(Batch::new(name, args, &info, ok_ty)?),
        None => None,
    };
    if let Some(lit) = &args.cache_none
        && !lit.value
        && !sig::is_option(ok_ty)
        && batch.is_none()
    {
        return Err(syn::Error::new(
            lit.span(),
            "`cache_none = false` needs the Ok type to be written as `Option<…>` (or a batch \
             function's map)",
        ));
    }
    if let Some(p) = info.transaction_param() {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[cached_query] never caches reads made inside a transaction (they may see rows that \
             are never committed): take `&mut PgConnection` (pass `&mut *tx`), which runs uncached \
             inside a transaction and cached outside one, or read outside the transaction",
        ));
    }
    check_unchecked(&info, args.assume_no_transaction.as_ref(), "cached_query")?;
    for name in skip {
        if !info.params.iter().any(|p| p.bound.contains(&name)) {
            return Err(syn::Error::new(
                name.span(),
                format!(
                    "`skip({name})`: this function has no parameter named `{name}`, and no \
                     parameter pattern binds it"
                ),
            ));
        }
    }

    let mut key_parts = Vec::new();
    for tp in item.sig.generics.type_params() {
        let ident = &tp.ident;
        key_parts.push(quote!(__cq_key.type_name::<#ident>();));
    }
    if let syn::ReturnType::Type(_, ret) = &item.sig.output {
        key_parts.push(quote!(__cq_key.type_name::<#ret>();));
    }
    if info.has_self {
        key_parts.push(quote!(__cq_key.type_name::<Self>();));
    }
    match &args.key {
        Some(expr) => {
            let span = expr.span();
            key_parts.push(quote_spanned!(span=> __cq_key.custom(&(#expr));));
        }
        None => {
            // A batch's elements are keyed one by one, at run time.
            let batched = |p: &&sig::Param<'_>| {
                batch
                    .as_ref()
                    .is_some_and(|b| p.ident.is_some_and(|i| i == b.ident))
            };
            for p in info.params.iter().filter(|p| !p.executor && !batched(p)) {
                if let Some(ident) = p.ident {
                    if !skip.contains(ident) {
                        let span = p.ty.span();
                        key_parts.push(quote_spanned!(span=> __cq_key.arg(&#ident);));
                    }
                    continue;
                }
                // A pattern (`Path(slug): Path<String>`): keyed by the names it binds, so the
                // wrapper type needs no `Serialize`.
                for ident in p.bound.iter().filter(|i| !skip.contains(i)) {
                    let span = ident.span();
                    key_parts.push(quote_spanned!(span=> __cq_key.arg(&#ident);));
                }
            }
        }
    }

    let krate = &args.krate;
    // A parameter left out of the key for its type's name must really be a pool or a cache.
    for p in info.named_handles() {
        let Some(ident) = p.ident.filter(|i| !skip.contains(i)) else {
            continue;
        };
        let span = p.ty.span();
        key_parts.push(quote_spanned!(span=> #krate::__private::skipped_handle(&#ident);));
    }
    // Connection arguments: inside a transaction the call bypasses the cache.
    let mut in_transaction = Vec::new();
    for (p, derefs) in info.connection_params() {
        let Some(ident) = p.ident else {
            return Err(syn::Error::new_spanned(
                p.pat,
                "#[cached_query] needs a plain parameter name for a connection, to check whether \
                 it is inside a transaction",
            ));
        };
        let stars = (0..derefs).map(|_| quote!(*));
        let span = p.ty.span();
        in_transaction
            .push(quote_spanned!(span=> #krate::__private::in_transaction(&#(#stars)* #ident)));
    }
    let in_transaction = if in_transaction.is_empty() {
        quote!(false)
    } else {
        quote!(#(#in_transaction)||*)
    };
    let name = query_name(args.name.as_ref(), item);
    let ttl = args.ttl.unwrap_or(0);
    let version = args.version.unwrap_or(0);
    let cache_none = args.cache_none.as_ref().is_none_or(|l| l.value);
    let stale_secs = args.stale_if_error.map_or(0, |(secs, _)| secs);
    let lease = args.lease.as_ref().is_none_or(|l| l.value);
    let refresh_secs = args.refresh_ahead.map_or(0, |(secs, _)| secs);
    if let (Some((refresh, span)), Some(ttl)) = (args.refresh_ahead, args.ttl)
        && refresh >= ttl
    {
        return Err(syn::Error::new(
            span,
            format!(
                "`refresh_ahead = {refresh}` must be shorter than `ttl = {ttl}`: it is the end \
                 of an entry's life during which a hit may refresh it"
            ),
        ));
    }
    let cache = resolve_cache(krate, args.cache.as_ref());
    let mut tags: Vec<TagSpec> = args.invalidate.clone().unwrap_or_default();
    tags.extend(table_tags(args.tables.as_ref(), item, Access::Read)?);
    let tags = compile_tags(&tags, &info, true, krate)?;
    let before = &tags.before;
    let prelude = quote! {
        static __CQ_SITE: #krate::__private::Site = #krate::__private::Site {
            name: #name,
            version: #version,
            ttl_secs: #ttl,
            cache_none: #cache_none,
            stale_secs: #stale_secs,
            lease: #lease,
            refresh_secs: #refresh_secs,
        };
        #cache
        let mut __cq_key = #krate::__private::key(&__CQ_SITE);
        #(#key_parts)*
    };
    if let Some(batch) = &batch {
        if let Some((_, span)) = args.stale_if_error {
            return Err(syn::Error::new(
                span,
                "`stale_if_error` is not supported with `batch` (yet): an element's expired \
                 value cannot stand in for a failed batch query",
            ));
        }
        if let Some((_, span)) = args.refresh_ahead {
            return Err(syn::Error::new(
                span,
                "`refresh_ahead` is not supported with `batch` (yet): a batch's hits are not \
                 refreshed one by one",
            ));
        }
        if let Some(lease) = &args.lease {
            return Err(syn::Error::new_spanned(
                lease,
                "`lease` has no effect with `batch`: batch reads take no leases (yet)",
            ));
        }
        if tags.by_result.is_some() {
            return Err(syn::Error::new(
                batch.ident.span(),
                "tags from the result (`<ret…>`) are not supported with `batch`: tag each \
                 element by its key instead (`\"user:<ids>\"`)",
            ));
        }
        return Ok(batch.call(krate, prelude, before, in_transaction, body));
    }
    // With result tags, the closure that renders them goes last: it is type-checked after
    // the body, whose output gives it its argument type.
    let (entry, by_result, spec) = match &tags.by_result {
        Some((render, spec)) => (
            quote!(cached_by_result),
            quote!(, #render),
            quote!(__cq_key.result_tags(#spec);),
        ),
        None => (quote!(cached), quote!(), quote!()),
    };
    Ok(quote! {
        #prelude
        #spec
        #before
        let __cq_in_transaction: bool = #in_transaction;
        #krate::__private::#entry(
            __cq_cache,
            &__CQ_SITE,
            __cq_key,
            __cq_tags,
            __cq_in_transaction,
            #body
            #by_result
        )
        .await
    })
}

/// The `#[invalidates]` entry point.
/// `#[invalidates]` on its own.
pub(crate) fn expand_invalidates(
    args: &InvalidatesArgs,
    item: &ItemFn,
) -> syn::Result<TokenStream> {
    let block = invalidates_block(args, item, body_future(item))?;
    Ok(replace_body(item, block))
}

/// The body of an `#[invalidates]` function whose work is `body`: the original body as a
/// future, possibly inside an inner layer.
pub(crate) fn invalidates_block(
    args: &InvalidatesArgs,
    item: &ItemFn,
    body: TokenStream,
) -> syn::Result<TokenStream> {
    require_async(item, "invalidates")?;
    let info = FnInfo::new(&item.sig);
    if let Some(p) = info.transaction_param()
        && !matches!(p.ty, syn::Type::Reference(r) if r.mutability.is_some())
    {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[invalidates] records its invalidation in the caller's transaction, which it must \
             borrow: take `&mut Transaction<'_, _>` or `&mut PgConnection` (pass `&mut *tx`), or \
             commit with `cache.commit_and_invalidate(tx, tags)`",
        ));
    }
    sig::ok_type(&item.sig, "invalidates")?;
    check_unchecked(&info, args.assume_no_transaction.as_ref(), "invalidates")?;
    let krate: &Krate = &args.krate;
    let cache = resolve_cache(krate, args.cache.as_ref());
    let mut tags: Vec<TagSpec> = args.tags.clone();
    tags.extend(table_tags(args.tables.as_ref(), item, Access::Write)?);
    let tags = compile_tags(&tags, &info, false, krate)?.before;
    // A connection inside a transaction gets the invalidation recorded in that transaction
    // before the body runs (it takes effect on commit); otherwise it is sent after the body.
    let when = match info.mutable_connection() {
        Some((p, derefs)) => {
            let Some(ident) = p.ident else {
                return Err(syn::Error::new_spanned(
                    p.pat,
                    "#[invalidates] needs a plain parameter name for a connection, to check \
                     whether it is inside a transaction",
                ));
            };
            let stars = (0..derefs).map(|_| quote!(*));
            let span = p.ty.span();
            quote_spanned! {span=>
                #krate::__private::on_connection(__cq_cache, &__cq_tags, &mut #(#stars)* #ident).await
            }
        }
        None => quote!(#krate::__private::When::AfterBody),
    };
    Ok(quote! {
        #cache
        #tags
        let __cq_when = #when;
        #krate::__private::invalidating(__cq_cache, __cq_tags, __cq_when, #body).await
    })
}

/// An executor known only by a trait bound may be a transaction: refused unless the attribute
/// says `assume_no_transaction = true` (which is refused where there is nothing to assume).
fn check_unchecked(
    info: &FnInfo<'_>,
    assume: Option<&syn::LitBool>,
    macro_name: &str,
) -> syn::Result<()> {
    let assumed = assume.is_some_and(|l| l.value);
    match (info.unchecked_param(), assume) {
        (Some(p), _) if !assumed => Err(syn::Error::new_spanned(
            p.ty,
            format!(
                "#[{macro_name}] cannot tell whether this executor runs inside a transaction \
                 (a transaction's reads and writes are not visible to others until it commits): \
                 take `&PgPool` or `&mut PgConnection` (checked on every call), or add \
                 `assume_no_transaction = true` to the attribute if it never does"
            ),
        )),
        (None, Some(lit)) => Err(syn::Error::new(
            lit.span(),
            "`assume_no_transaction` is for executor arguments known only by a trait \
             (`impl Executor`, `E: Executor`, `Acquire`); this function has none",
        )),
        _ => Ok(()),
    }
}

/// Which tables `tables = auto` tags by.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// Those the body's SQL reads (`#[cached_query]`).
    Read,
    /// Those it writes (`#[invalidates]`).
    Write,
}

/// `table:<name>` tags: named by hand, or found in the body's SQL literals (`auto`).
fn table_tags(arg: Option<&TablesArg>, item: &ItemFn, access: Access) -> syn::Result<Vec<TagSpec>> {
    let tag = |name: &str, span: Span| {
        let lit = syn::LitStr::new(&format!("table:{name}"), span);
        TagSpec::Expr(Box::new(syn::parse_quote_spanned!(span=> #lit)))
    };
    let explicit = r#"`tables("users", …)`"#;
    match arg {
        None => Ok(Vec::new()),
        Some(TablesArg::Named(names)) => names
            .iter()
            .map(|lit| {
                Ok(tag(
                    &sql::fold_written(&lit.value(), lit.span())?,
                    lit.span(),
                ))
            })
            .collect(),
        Some(TablesArg::Auto(span)) => {
            let literals = sql::literals(&item.block).map_err(|at| {
                syn::Error::new(
                    at,
                    format!(
                        "`tables = auto` cannot read the SQL here (not a string literal, inside \
                         another macro, a query file or a query builder); name the tables \
                         instead: {explicit}"
                    ),
                )
            })?;
            if literals.is_empty() {
                return Err(syn::Error::new(
                    *span,
                    format!(
                        "`tables = auto` found no SQL in this function's body: it reads the string \
                         literals passed to sqlx's `query!`, `query_as!`, `query_scalar!` macros, \
                         to `query(…)`, `query_as(…)`, `query_scalar(…)`, `raw_sql(…)` and to \
                         executor methods (`.execute(\"…\")`) written in the body itself; name \
                         the tables instead: {explicit}"
                    ),
                ));
            }
            let mut names = std::collections::BTreeSet::new();
            for lit in &literals {
                let found = sql::tables(&lit.value()).map_err(|e| {
                    syn::Error::new(
                        lit.span(),
                        format!(
                            "`tables = auto` cannot use this SQL ({e}); name the tables \
                             instead: {explicit}"
                        ),
                    )
                })?;
                names.extend(match access {
                    Access::Read => found.read,
                    Access::Write => found.written,
                });
            }
            if names.is_empty() {
                let what = match access {
                    Access::Read => "reads no table",
                    Access::Write => "writes no table (INSERT, UPDATE, DELETE, MERGE, TRUNCATE)",
                };
                return Err(syn::Error::new(
                    *span,
                    format!(
                        "`tables = auto`: the SQL in this body {what}; name the tables instead: {explicit}"
                    ),
                ));
            }
            Ok(names.iter().map(|n| tag(n, *span)).collect())
        }
    }
}

/// This function's tags; `ret` names the result when `by_result`.
fn compile_tags(
    tags: &[TagSpec],
    info: &FnInfo<'_>,
    by_result: bool,
    krate: &Krate,
) -> syn::Result<Rendered> {
    let scope = Scope {
        names: info.names(),
        has_self: info.has_self,
        ret: by_result,
        krate,
    };
    template::render_all(tags, &scope)
}
