//! `#[retry]`: the body runs in a loop that hands each result to `<crate>::__private::Retry`,
//! which decides whether it is over or waits the backoff for another attempt.

use crate::args::RetryArgs;
use crate::item::{query_name, require_async};
use crate::sig::{self, FnInfo};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::ItemFn;
use syn::spanned::Spanned;

/// A future that runs `fut` (a future expression, built again for each attempt) until
/// `Retry` says the call is over, and ends in its result.
pub(crate) fn wrap_future(
    args: &RetryArgs,
    item: &ItemFn,
    fut: TokenStream,
) -> syn::Result<TokenStream> {
    check(item)?;
    let krate = &args.krate;
    let name = query_name(None, item);
    let (attempts, backoff, max) = args.policy();
    // A function whose error type is not `sqlx::Error` is told so on its return type.
    let span = match &item.sig.output {
        syn::ReturnType::Type(_, ty) => ty.span(),
        syn::ReturnType::Default => item.sig.ident.span(),
    };
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

/// A retry needs an `async fn` returning a `Result`, and nothing that holds a transaction.
fn check(item: &ItemFn) -> syn::Result<()> {
    require_async(item, "retry")?;
    sig::ok_type(&item.sig, "retry")?;
    let info = FnInfo::new(&item.sig);
    if let Some((p, _)) = info.connection_params().next() {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[retry] cannot run a statement again on a connection or in a transaction: after a \
             failed statement the transaction is aborted and the connection may be gone. Take the \
             pool (`&PgPool`) and begin, run and commit the whole transaction inside the body, so \
             each attempt retries all of it",
        ));
    }
    if let Some(p) = info.unchecked_param() {
        return Err(syn::Error::new_spanned(
            p.ty,
            "#[retry] cannot retry on an executor known only by its trait (it may be a \
             transaction or a connection used up by the first attempt): take the pool \
             (`&PgPool`) instead",
        ));
    }
    Ok(())
}
