//! What every expansion shares: reading the item (and recovering from errors), and rebuilding
//! the function with its signature verbatim around a new body.

use crate::args::Krate;
use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ItemFn, LitStr};

/// Parses the function and expands it with `expand`. On any error the item is emitted as
/// `expand` left it, next to the `compile_error!`, so the rest of the crate (and IDEs) still
/// see the function and the only error is the real one.
pub(crate) fn expand_with(
    input: TokenStream,
    expand: impl FnOnce(&mut ItemFn) -> syn::Result<TokenStream>,
) -> TokenStream {
    let mut item: ItemFn = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(e) => {
            let err = e.into_compile_error();
            return quote!(#input #err);
        }
    };
    match expand(&mut item) {
        Ok(tokens) => tokens,
        Err(e) => {
            let err = e.into_compile_error();
            quote!(#item #err)
        }
    }
}

pub(crate) fn require_async(item: &ItemFn, macro_name: &str) -> syn::Result<()> {
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

/// Re-emits the function with its attributes and signature verbatim and `body` as its block.
pub(crate) fn replace_body(item: &ItemFn, body: TokenStream) -> TokenStream {
    let (attrs, vis, sig) = (&item.attrs, &item.vis, &item.sig);
    quote!(#(#attrs)* #vis #sig { #body })
}

/// `let __cq_cache: Option<&Cache> = …;` from `cache = expr`, or the installed default.
pub(crate) fn resolve_cache(krate: &Krate, cache: Option<&Expr>) -> TokenStream {
    match cache {
        Some(expr) => {
            let span = expr.span();
            let krate = krate.at(span);
            // `let x = &(expr);` extends the lifetime of temporaries such as `&self.cache`.
            quote_spanned! {span=>
                let __cq_cache_ref = &(#expr);
                let __cq_cache = ::core::option::Option::Some(
                    #krate::__private::as_cache(__cq_cache_ref),
                );
            }
        }
        None => quote! {
            let __cq_default = #krate::__private::default_cache();
            let __cq_cache = ::core::option::Option::as_ref(&__cq_default);
        },
    }
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

/// The position of the first attribute on `item` whose path satisfies `matches`, given the
/// path's segments as strings.
pub(crate) fn find_attr(item: &ItemFn, matches: impl Fn(&[String]) -> bool) -> Option<usize> {
    item.attrs.iter().position(|attr| matches(&path_of(attr)))
}

/// An attribute's path, its segments as strings.
pub(crate) fn path_of(attr: &Attribute) -> Vec<String> {
    attr.path()
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect()
}

/// An attribute's arguments: the tokens inside `#[x(…)]`, nothing for a bare `#[x]`.
pub(crate) fn attr_args(attr: &Attribute) -> syn::Result<TokenStream> {
    match &attr.meta {
        syn::Meta::Path(_) => Ok(TokenStream::new()),
        syn::Meta::List(list) => Ok(list.tokens.clone()),
        syn::Meta::NameValue(nv) => Err(syn::Error::new_spanned(
            nv,
            "expected `#[attr]` or `#[attr(...)]`",
        )),
    }
}
