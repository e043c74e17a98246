//! `#[timed]` expansion: time the body's execution (the `.await`, not the creation of the
//! future), record it, and log it when slow.

use crate::args::{CachedArgs, TimedArgs};
use crate::expand::{
    body_future, cached_block, mark_used, parse_attr_args, query_name, replace_body, take_attr,
};
use proc_macro2::TokenStream;
use quote::quote;
use syn::visit::Visit;
use syn::{Expr, ItemFn, ReturnType, Stmt, Type};

pub(crate) fn expand(args: TimedArgs, item: &ItemFn) -> syn::Result<TokenStream> {
    // `#[cached_query]` written below `#[timed]`: time what the caller waits, hits included.
    // Its own expansion would put the timing inside the cache, so build both layers here.
    if item.sig.asyncness.is_some() {
        let mut item = item.clone();
        if let Some(attr) = take_attr(&mut item, "cached_query") {
            let cached = cached_block(parse_attr_args::<CachedArgs>(&attr)?, &item, None)?;
            let timed = wrap_future(&args, &item, quote!(async { #cached }));
            let used = mark_used(&attr);
            return Ok(replace_body(&item, quote!(#used #timed.await)));
        }
    }
    let (timer, is_err) = timer_parts(&args, item);

    if item.sig.asyncness.is_some() {
        let body = body_future(item);
        return Ok(replace_body(
            item,
            quote! {
                #timer
                let __cq_start = ::cached_query::__private::Instant::now();
                let __cq_out = ::cached_query::__private::timed_body(#body).await;
                __CQ_TIMER.finish(__cq_start, #is_err);
                __cq_out
            },
        ));
    }
    expand_sync(timer, is_err, item)
}

/// `fut` (a future expression producing the function's output) with timing around it.
pub(crate) fn wrap_future(args: &TimedArgs, item: &ItemFn, fut: TokenStream) -> TokenStream {
    let (timer, is_err) = timer_parts(args, item);
    quote! {
        async {
            #timer
            let __cq_start = ::cached_query::__private::Instant::now();
            let __cq_out = ::cached_query::__private::timed_body(#fut).await;
            __CQ_TIMER.finish(__cq_start, #is_err);
            __cq_out
        }
    }
}

/// The `static __CQ_TIMER` item and the expression telling whether `__cq_out` is an `Err`.
fn timer_parts(args: &TimedArgs, item: &ItemFn) -> (TokenStream, TokenStream) {
    let name = query_name(args.name.as_ref(), item);
    let threshold = match args.threshold_ms {
        Some(ms) => quote!(::core::option::Option::Some(#ms)),
        None => quote!(::core::option::Option::None),
    };
    let level = args
        .level
        .clone()
        .unwrap_or_else(|| syn::Ident::new("Warn", proc_macro2::Span::call_site()));
    let timer = quote! {
        static __CQ_TIMER: ::cached_query::__private::Timer = ::cached_query::__private::Timer::new(
            #name,
            #threshold,
            ::cached_query::__private::SlowLevel::#level,
        );
    };
    let is_err = if returns_result(&item.sig.output) {
        quote!(::core::option::Option::Some(
            ::core::result::Result::is_err(&__cq_out)
        ))
    } else {
        quote!(::core::option::Option::None)
    };
    (timer, is_err)
}

fn expand_sync(timer: TokenStream, is_err: TokenStream, item: &ItemFn) -> syn::Result<TokenStream> {
    // `#[async_trait]` turns `async fn` into `fn … { Box::pin(async move { … }) }`: time the
    // inner future, not its allocation.
    if let Some((stmts_before, inner)) = async_trait_body(item) {
        let inner_stmts = &inner.block.stmts;
        let capture = &inner.capture;
        return Ok(replace_body(
            item,
            quote! {
                #timer
                #(#stmts_before)*
                ::std::boxed::Box::pin(async #capture {
                    let __cq_start = ::cached_query::__private::Instant::now();
                    let __cq_out = ::cached_query::__private::timed_body(async #capture { #(#inner_stmts)* }).await;
                    __CQ_TIMER.finish(__cq_start, ::core::option::Option::None);
                    __cq_out
                })
            },
        ));
    }

    let stmts = &item.block.stmts;
    let closure = match &item.sig.output {
        ReturnType::Type(_, ty) if nameable(ty) => quote!(|| -> #ty { #(#stmts)* }),
        ReturnType::Default => quote!(|| { #(#stmts)* }),
        // `impl Trait` or elided references cannot be written on a closure: leave it inferred.
        ReturnType::Type(..) => quote!(|| { #(#stmts)* }),
    };
    Ok(replace_body(
        item,
        quote! {
            #timer
            let __cq_start = ::cached_query::__private::Instant::now();
            #[allow(clippy::redundant_closure_call)]
            let __cq_out = ::cached_query::__private::timed_body_sync(#closure);
            __CQ_TIMER.finish(__cq_start, #is_err);
            __cq_out
        },
    ))
}

fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(tp) => tp
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident.to_string().ends_with("Result")),
            _ => false,
        },
        ReturnType::Default => false,
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
fn async_trait_body(item: &ItemFn) -> Option<(&[Stmt], &syn::ExprAsync)> {
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
