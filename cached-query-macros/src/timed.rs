//! `#[timed]`: time the body's execution (from its first poll to its completion, not the
//! creation of the future), record it, and log it when slow.

use crate::args::TimedArgs;
use crate::item::{body_future, query_name, replace_body};
use crate::sig;
use proc_macro2::TokenStream;
use quote::quote;
use syn::visit::Visit;
use syn::{Expr, ItemFn, ReturnType, Stmt, Type};

/// `#[timed]` on its own.
pub(crate) fn expand(args: &TimedArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    if item.sig.asyncness.is_some() {
        let timed = timed_await(args, item, body_future(item), declared_output(item));
        return Ok(replace_body(item, timed));
    }
    // `#[async_trait]` turns `async fn` into `fn … { Box::pin(async move { … }) }`: time the
    // inner future, not its allocation.
    if let Some((stmts_before, inner)) = async_trait_body(item) {
        let inner_stmts = &inner.block.stmts;
        let capture = &inner.capture;
        let output = sig::boxed_future_output(&item.sig);
        let timed = timed_await(
            args,
            item,
            quote!(async #capture { #(#inner_stmts)* }),
            output,
        );
        return Ok(replace_body(
            item,
            quote! {
                #(#stmts_before)*
                ::std::boxed::Box::pin(async #capture { #timed })
            },
        ));
    }
    Ok(replace_body(item, timed_sync(args, item)))
}

/// `fut` (a future producing the function's output) with timing around it, as a future:
/// the inner layer of a stacked `#[cached_query]`, or the outer one around it.
pub(crate) fn wrap_future(args: &TimedArgs, item: &ItemFn, fut: TokenStream) -> TokenStream {
    let timed = timed_await(args, item, fut, declared_output(item));
    quote!(async { #timed })
}

/// Statements that await `fut` timed and end in its output, whose type is `output`.
fn timed_await(
    args: &TimedArgs,
    item: &ItemFn,
    fut: TokenStream,
    output: Option<&Type>,
) -> TokenStream {
    let krate = &args.krate;
    let timer = timer(args, item);
    let is_err = is_err(output);
    quote! {
        #timer
        let __cq_start = #krate::__private::Instant::now();
        let __cq_out = #krate::__private::timed_body(#fut).await;
        __CQ_TIMER.finish(__cq_start, #is_err);
        __cq_out
    }
}

/// The body of a synchronous function, run in a closure between two clock reads.
fn timed_sync(args: &TimedArgs, item: &ItemFn) -> TokenStream {
    let krate = &args.krate;
    let timer = timer(args, item);
    let is_err = is_err(declared_output(item));
    let stmts = &item.block.stmts;
    let closure = match &item.sig.output {
        ReturnType::Type(_, ty) if nameable(ty) => quote!(|| -> #ty { #(#stmts)* }),
        ReturnType::Default => quote!(|| { #(#stmts)* }),
        // `impl Trait` or elided references cannot be written on a closure: leave it inferred.
        ReturnType::Type(..) => quote!(|| { #(#stmts)* }),
    };
    quote! {
        #timer
        let __cq_start = #krate::__private::Instant::now();
        #[allow(clippy::redundant_closure_call)]
        let __cq_out = #krate::__private::timed_body_sync(#closure);
        __CQ_TIMER.finish(__cq_start, #is_err);
        __cq_out
    }
}

/// The `static __CQ_TIMER` item.
fn timer(args: &TimedArgs, item: &ItemFn) -> TokenStream {
    let krate = &args.krate;
    let name = query_name(args.name.as_ref(), item);
    let threshold = match args.threshold_ms {
        Some(ms) => quote!(::core::option::Option::Some(#ms)),
        None => quote!(::core::option::Option::None),
    };
    let level = args
        .level
        .clone()
        .unwrap_or_else(|| syn::Ident::new("Warn", proc_macro2::Span::call_site()));
    quote! {
        static __CQ_TIMER: #krate::__private::Timer = #krate::__private::Timer::new(
            #name,
            #threshold,
            #krate::__private::SlowLevel::#level,
        );
    }
}

/// Whether `__cq_out` is an `Err`, when its type `output` is a `Result`.
fn is_err(output: Option<&Type>) -> TokenStream {
    if output.is_some_and(sig::is_result) {
        quote!(::core::option::Option::Some(
            ::core::result::Result::is_err(&__cq_out)
        ))
    } else {
        quote!(::core::option::Option::None)
    }
}

/// The return type as written (`None` for `()`).
fn declared_output(item: &ItemFn) -> Option<&Type> {
    match &item.sig.output {
        ReturnType::Type(_, ty) => Some(ty),
        ReturnType::Default => None,
    }
}

/// Whether `ty` can be written as a closure's return type (no `impl Trait`, no references).
fn nameable(ty: &Type) -> bool {
    struct Check(bool);
    impl<'ast> Visit<'ast> for Check {
        fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
            self.0 = false;
        }
        fn visit_type_reference(&mut self, _: &'ast syn::TypeReference) {
            self.0 = false;
        }
        fn visit_lifetime(&mut self, _: &'ast syn::Lifetime) {
            self.0 = false;
        }
    }
    let mut check = Check(true);
    check.visit_type(ty);
    check.0
}

/// Recognises a body ending in `Box::pin(async move { … })`.
pub(crate) fn async_trait_body(item: &ItemFn) -> Option<(&[Stmt], &syn::ExprAsync)> {
    let (last, before) = item.block.stmts.split_last()?;
    let Stmt::Expr(Expr::Call(call), None) = last else {
        return None;
    };
    let Expr::Path(path) = &*call.func else {
        return None;
    };
    let segments: Vec<String> = path
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    if !segments.ends_with(&["Box".to_owned(), "pin".to_owned()]) || call.args.len() != 1 {
        return None;
    }
    match &call.args[0] {
        Expr::Async(inner) => Some((before, inner)),
        _ => None,
    }
}
