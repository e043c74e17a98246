//! Code generation. The signature is re-emitted verbatim; only the body is replaced by a
//! call into `::cached_query::__private` that receives the original body as a future.

use crate::args::{CachedArgs, InvalidatesArgs, TimedArgs};
use crate::sig::{self, FnInfo};
use crate::template;
use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ItemFn, LitStr};

pub(crate) fn cached_query(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_with(args, input, |args: CachedArgs, item| {
        expand_cached(args, item)
    })
}

pub(crate) fn timed(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_with(args, input, |args: TimedArgs, item| {
        crate::timed::expand(args, item)
    })
}

pub(crate) fn invalidates(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_with(args, input, |args: InvalidatesArgs, item| {
        expand_invalidates(args, item)
    })
}

/// Parses, expands, and on any error emits the original item unchanged next to the
/// `compile_error!`, so the rest of the crate (and IDEs) still see the function.
fn expand_with<A: syn::parse::Parse>(
    args: TokenStream,
    input: TokenStream,
    expand: impl FnOnce(A, &ItemFn) -> syn::Result<TokenStream>,
) -> TokenStream {
    let item: ItemFn = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(e) => {
            let err = e.into_compile_error();
            return quote!(#input #err);
        }
    };
    let result = syn::parse2::<A>(args).and_then(|args| expand(args, &item));
    match result {
        Ok(tokens) => tokens,
        Err(e) => {
            let err = e.into_compile_error();
            quote!(#item #err)
        }
    }
}

fn require_async(item: &ItemFn, macro_name: &str) -> syn::Result<()> {
    if item.sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            item.sig.fn_token,
            format!("#[{macro_name}] requires an `async fn`"),
        ));
    }
    Ok(())
}

/// The original body as a future whose output type is pinned to the declared return type
/// (the "fake return" edge keeps `?` and inference working inside it).
pub(crate) fn body_future(item: &ItemFn) -> TokenStream {
    let ret = match &item.sig.output {
        syn::ReturnType::Type(_, ty) => ty.to_token_stream(),
        syn::ReturnType::Default => quote!(()),
    };
    let stmts = &item.block.stmts;
    let span = item.block.span();
    quote_spanned! {span=>
        async {
            #[allow(
                unreachable_code,
                clippy::diverging_sub_expression,
                clippy::empty_loop,
                clippy::let_unit_value,
                clippy::needless_return
            )]
            if false {
                let __cq_fake_return: #ret = loop {};
                return __cq_fake_return;
            }
            #(#stmts)*
        }
    }
}

/// `let __cq_default …; let __cq_cache: Option<&Cache> = …;`
fn resolve_cache(cache: Option<&Expr>) -> TokenStream {
    match cache {
        Some(expr) => {
            let span = expr.span();
            // `let x = &(expr);` extends the lifetime of temporaries such as `&self.cache`.
            quote_spanned! {span=>
                let __cq_cache_ref = &(#expr);
                let __cq_cache = ::core::option::Option::Some(
                    ::cached_query::__private::as_cache(__cq_cache_ref),
                );
            }
        }
        None => quote! {
            let __cq_default = ::cached_query::__private::default_cache();
            let __cq_cache = ::core::option::Option::as_ref(&__cq_default);
        },
    }
}

fn compile_tags(templates: &[LitStr], info: &FnInfo<'_>) -> syn::Result<TokenStream> {
    let names = info.names();
    let tags = templates
        .iter()
        .map(|t| template::compile(t, &names, info.has_self))
        .collect::<syn::Result<Vec<_>>>()?;
    Ok(quote!(let __cq_tags: ::std::vec::Vec<::std::string::String> = ::std::vec![#(#tags),*];))
}

fn expand_cached(args: CachedArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    require_async(item, "cached_query")?;
    // `#[timed]` written below `#[cached_query]` times only executed queries: absorb it here,
    // as its own expansion would wrap the cached call instead.
    let mut item = item.clone();
    let timed_attr = take_attr(&mut item, "timed");
    let inner_timed = timed_attr
        .as_ref()
        .map(parse_attr_args::<TimedArgs>)
        .transpose()?;
    let block = cached_block(args, &item, inner_timed)?;
    let used = timed_attr.as_ref().map(mark_used);
    Ok(replace_body(&item, quote!(#used #block)))
}

/// The body of a `#[cached_query]` function (optionally with an inner `#[timed]` layer).
pub(crate) fn cached_block(
    args: CachedArgs,
    item: &ItemFn,
    inner_timed: Option<TimedArgs>,
) -> syn::Result<TokenStream> {
    require_async(item, "cached_query")?;
    let ok_ty = sig::ok_type(&item.sig, "cached_query")?;
    let info = FnInfo::new(&item.sig);

    if let Some(lit) = &args.cache_none
        && !lit.value
        && !sig::is_option(ok_ty)
    {
        return Err(syn::Error::new(
            lit.span(),
            "`cache_none = false` needs the Ok type to be written as `Option<…>`",
        ));
    }
    for name in &args.skip {
        if !info.params.iter().any(|p| p.ident == Some(name)) {
            return Err(syn::Error::new(
                name.span(),
                format!("`skip({name})`: this function has no parameter named `{name}`"),
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
            for p in &info.params {
                if p.executor || p.ident.is_some_and(|i| args.skip.contains(i)) {
                    continue;
                }
                let Some(ident) = p.ident else {
                    return Err(syn::Error::new_spanned(
                        p.pat,
                        "#[cached_query] needs a plain parameter name to put this argument in the key; \
                         destructure it inside the body, or use `key = …`",
                    ));
                };
                let span = p.ty.span();
                key_parts.push(quote_spanned!(span=> __cq_key.arg(&#ident);));
            }
        }
    }

    let name = query_name(args.name.as_ref(), item);
    let ttl = args.ttl.unwrap_or(0);
    let version = args.version;
    let cache_none = args.cache_none.as_ref().is_none_or(|l| l.value);
    let cache = resolve_cache(args.cache.as_ref());
    let tags = compile_tags(&args.invalidate, &info)?;
    let mut body = body_future(item);
    if let Some(timed) = inner_timed {
        body = crate::timed::wrap_future(&timed, item, body);
    }
    Ok(quote! {
            static __CQ_SITE: ::cached_query::__private::Site = ::cached_query::__private::Site {
                name: #name,
                version: #version,
                ttl_secs: #ttl,
                cache_none: #cache_none,
            };
            #cache
            let mut __cq_key = ::cached_query::__private::key(&__CQ_SITE);
            #(#key_parts)*
            #tags
            ::cached_query::__private::cached(__cq_cache, &__CQ_SITE, __cq_key, __cq_tags, #body).await
    })
}

/// Whether `attr` is this crate's attribute `name` (`#[name]` or `#[cached_query::name]`).
fn is_ours(attr: &syn::Attribute, name: &str) -> bool {
    let segments: Vec<String> = attr
        .path()
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    match segments.as_slice() {
        [only] => only == name,
        [.., krate, last] => krate == "cached_query" && last == name,
        [] => false,
    }
}

/// Removes and returns the first of this crate's `name` attributes on `item`.
pub(crate) fn take_attr(item: &mut ItemFn, name: &str) -> Option<syn::Attribute> {
    let pos = item.attrs.iter().position(|a| is_ours(a, name))?;
    Some(item.attrs.remove(pos))
}

/// `name = "…"`, or `module_path::fn_name` by default (stats, timings and the key use it).
pub(crate) fn query_name(name: Option<&LitStr>, item: &ItemFn) -> TokenStream {
    let fn_name = &item.sig.ident;
    match name {
        Some(lit) => quote!(#lit),
        None => quote!(::core::concat!(
            ::core::module_path!(),
            "::",
            ::core::stringify!(#fn_name)
        )),
    }
}

/// Keeps the user's import of an absorbed attribute from being reported unused.
pub(crate) fn mark_used(attr: &syn::Attribute) -> TokenStream {
    let path = attr.path();
    quote!(#[allow(unused_imports)] use #path as _;)
}

/// Parses an attribute's arguments (`#[x]` alone gives the defaults).
pub(crate) fn parse_attr_args<A: syn::parse::Parse>(attr: &syn::Attribute) -> syn::Result<A> {
    match &attr.meta {
        syn::Meta::Path(_) => syn::parse2(TokenStream::new()),
        syn::Meta::List(list) => syn::parse2(list.tokens.clone()),
        syn::Meta::NameValue(nv) => Err(syn::Error::new_spanned(
            nv,
            "expected `#[attr]` or `#[attr(...)]`",
        )),
    }
}

fn expand_invalidates(args: InvalidatesArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    require_async(item, "invalidates")?;
    let info = FnInfo::new(&item.sig);
    if let Some(p) = info.transaction_param() {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[invalidates] would invalidate before this transaction commits, so a concurrent read \
             could cache the old rows again; commit with `cache.commit_and_invalidate(tx, tags)` instead",
        ));
    }
    sig::ok_type(&item.sig, "invalidates")?;
    let cache = resolve_cache(args.cache.as_ref());
    let tags = compile_tags(&args.templates, &info)?;
    let body = body_future(item);
    Ok(replace_body(
        item,
        quote! {
            #cache
            #tags
            ::cached_query::__private::invalidating(__cq_cache, __cq_tags, #body).await
        },
    ))
}

/// Re-emits the function with its attributes and signature verbatim and `body` as its block.
pub(crate) fn replace_body(item: &ItemFn, body: TokenStream) -> TokenStream {
    let (attrs, vis, sig) = (&item.attrs, &item.vis, &item.sig);
    quote!(#(#attrs)* #vis #sig { #body })
}
