//! `#[retry]`: the body runs in a loop that hands each result to `<crate>::__private::Retry`,
//! which says whether the call is over or returns the backoff to wait before another attempt.

use crate::args::RetryArgs;
use crate::item::{body_future, query_name, replace_body};
use crate::sig::{self, FnInfo};
use crate::timed::async_trait_body;
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ItemFn;
use syn::spanned::Spanned;

/// `#[retry]` on its own: on an `async fn`, or on the `fn … { Box::pin(async move { … }) }`
/// that `#[async_trait]` makes of one (the inner future is retried).
pub(crate) fn expand(args: &RetryArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    if item.sig.asyncness.is_none()
        && let Some((before, inner)) = async_trait_body(item)
    {
        let output = sig::boxed_future_output(&item.sig);
        check(item, output.is_some_and(sig::is_result))?;
        let (stmts, capture) = (&inner.block.stmts, &inner.capture);
        let fut = wrap_future(args, item, quote!(async { #(#stmts)* }))?;
        return Ok(replace_body(
            item,
            quote! {
                #(#before)*
                ::std::boxed::Box::pin(async #capture { #fut.await })
            },
        ));
    }
    check(item, false)?;
    let fut = wrap_future(args, item, body_future(item))?;
    Ok(replace_body(item, quote!(#fut.await)))
}

/// A future that runs `fut` (a future expression, built again for each attempt) until
/// `Retry` says the call is over, and ends in its result. The caller has run [`check`].
pub(crate) fn wrap_future(
    args: &RetryArgs,
    item: &ItemFn,
    fut: TokenStream,
) -> syn::Result<TokenStream> {
    let krate = &args.krate;
    let name = query_name(args.name.as_ref(), item);
    let (attempts, backoff, max) = args.policy();
    // A function whose error type is not `sqlx::Error` is told so on its return type.
    let span = match &item.sig.output {
        syn::ReturnType::Type(_, ty) => ty.span(),
        syn::ReturnType::Default => item.sig.ident.span(),
    };
    let span = Span::call_site().located_at(span);
    let after = quote_spanned!(span=> __cq_retry.after(__cq_result));
    Ok(quote! {
        async {
            let mut __cq_retry =
                #krate::__private::Retry::new(#name, #attempts, #backoff, #max);
            loop {
                let __cq_result = #fut.await;
                match #after {
                    ::core::ops::ControlFlow::Break(__cq_done) => break __cq_done,
                    ::core::ops::ControlFlow::Continue(__cq_backoff) => __cq_backoff.await,
                }
            }
        }
    })
}

/// A retry needs an `async fn` (or an `#[async_trait]` one: `boxed`) returning a `Result`,
/// and nothing that holds a connection or a transaction.
pub(crate) fn check(item: &ItemFn, boxed: bool) -> syn::Result<()> {
    if !boxed {
        crate::item::require_async(item, "retry")?;
        sig::ok_type(&item.sig, "retry")?;
    }
    const ABORTED: &str = "#[retry] cannot run a statement again on a connection or in a \
        transaction: after a failed statement the transaction is aborted and the connection may \
        be gone. Take the pool (`&PgPool`, `&MySqlPool`) and begin, run and commit the whole \
        transaction inside the body, so each attempt retries all of it";
    let info = FnInfo::new(&item.sig);
    let generics = &item.sig.generics;
    if let Some(p) = info
        .params
        .iter()
        .find(|p| sig::type_names_connection(p.ty, generics))
    {
        return Err(syn::Error::new_spanned(p.ty, ABORTED));
    }
    let used: Vec<&syn::Type> = info.params.iter().map(|p| p.ty).collect();
    if let Some(generic) = sig::generic_naming_connection(generics, &used) {
        return Err(syn::Error::new_spanned(generic, ABORTED));
    }
    if let Some(p) = info.unchecked_param() {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[retry] cannot retry on an executor known only by its trait (it may be a \
             transaction or a connection used up by the first attempt): take the pool \
             (`&PgPool`, `&MySqlPool`) instead",
        ));
    }
    Ok(())
}
