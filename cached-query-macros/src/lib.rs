//! Procedural macros of `cached-query`. Depend on `cached-query`, which re-exports them
//! with documentation; generated code refers to `::cached_query::__private` only.

mod args;
mod expand;
mod sig;
mod template;
mod timed;

use proc_macro::TokenStream;

/// Caches the `Ok` results of an `async fn`. Documented on `cached_query::cached_query`.
#[proc_macro_attribute]
pub fn cached_query(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::cached_query(args.into(), input.into()).into()
}

/// Invalidates tags after an `async fn` returns `Ok`. Documented on `cached_query::invalidates`.
#[proc_macro_attribute]
pub fn invalidates(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::invalidates(args.into(), input.into()).into()
}

/// Times a function and logs it when slow. Documented on `cached_query::timed`.
#[proc_macro_attribute]
pub fn timed(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::timed(args.into(), input.into()).into()
}
