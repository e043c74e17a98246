//! Procedural macros of `cached-query`. Depend on `cached-query`, which re-exports them with
//! documentation; generated code names only `<crate>::__private` (`crate = path`, by default
//! `::cached_query`), `::core` and `::std`.
//!
//! `stack` decides how `#[timed]`, `#[cached_query]`, `#[retry]` and `#[invalidates]` nest and
//! calls `cached`,
//! `timed` or `retry`, which expand one attribute each with the helpers of `item`, `sig` and `template`, from the
//! arguments `args` parsed; `batch` expands `#[cached_query(batch = …)]`'s call.

mod args;
mod batch;
mod cached;
mod item;
mod retry;
mod sig;
mod sql;
mod stack;
mod template;
mod timed;

use proc_macro::TokenStream;

/// Caches the `Ok` results of an `async fn`. Documented on `cached_query::cached_query`.
#[proc_macro_attribute]
pub fn cached_query(args: TokenStream, input: TokenStream) -> TokenStream {
    stack::cached_query(args.into(), input.into()).into()
}

/// Invalidates tags after an `async fn` returns (or at its transaction's commit). Documented on
/// `cached_query::invalidates`.
#[proc_macro_attribute]
pub fn invalidates(args: TokenStream, input: TokenStream) -> TokenStream {
    stack::invalidates(args.into(), input.into()).into()
}

/// Times a function and logs it when slow. Documented on `cached_query::timed`.
#[proc_macro_attribute]
pub fn timed(args: TokenStream, input: TokenStream) -> TokenStream {
    stack::timed(args.into(), input.into()).into()
}

/// Runs an `async fn` again on transient database errors. Documented on `cached_query::retry`.
#[proc_macro_attribute]
pub fn retry(args: TokenStream, input: TokenStream) -> TokenStream {
    stack::retry(args.into(), input.into()).into()
}
