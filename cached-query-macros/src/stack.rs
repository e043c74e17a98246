//! The rule for stacking `#[timed]` and `#[cached_query]`, written once for both: the one
//! written above is the outer layer at run time. `#[timed]` above `#[cached_query]` measures
//! what callers wait, hits included; below it, only executed queries.
//!
//! Attribute macros expand top down and each one wraps the body it is given, so left alone the
//! attribute written lower would end up outermost. Hence the upper one, finding the other of
//! the pair below it, removes it and builds both layers itself.

use crate::args::{CachedArgs, TimedArgs};
use crate::cached;
use crate::item::{attr_args, body_future, expand_with, find_attr, replace_body};
use proc_macro2::TokenStream;
use quote::quote;
use syn::ItemFn;

/// The `#[cached_query]` entry point.
pub(crate) fn cached_query(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Cached, args, input)
}

/// The `#[timed]` entry point.
pub(crate) fn timed(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Timed, args, input)
}

/// The two attributes that stack.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Cached,
    Timed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cached => "cached_query",
            Kind::Timed => "timed",
        }
    }

    fn other(self) -> Kind {
        match self {
            Kind::Cached => Kind::Timed,
            Kind::Timed => Kind::Cached,
        }
    }

    /// Whether `path` names this attribute: `#[name]` or `#[cached_query::name]`.
    fn is_ours(self, path: &[String]) -> bool {
        match path {
            [only] => only == self.name(),
            [.., krate, last] => krate == "cached_query" && last == self.name(),
            [] => false,
        }
    }

    /// The function with this attribute only.
    fn alone(self, args: TokenStream, item: &ItemFn) -> syn::Result<TokenStream> {
        match self {
            Kind::Cached => cached::expand(&syn::parse2(args)?, item),
            Kind::Timed => crate::timed::expand(&syn::parse2(args)?, item),
        }
    }
}

fn expand(kind: Kind, args: TokenStream, input: TokenStream) -> TokenStream {
    expand_with(input, |item| {
        // A sync `#[timed]` function leaves `#[cached_query]` to report that it needs `async`.
        let stacks = kind == Kind::Cached || item.sig.asyncness.is_some();
        let Some(i) = find_attr(item, |path| kind.other().is_ours(path)).filter(|_| stacks) else {
            return kind.alone(args, item);
        };
        let mut item = item.clone();
        let inner = item.attrs.remove(i);
        let body = both(kind, args, attr_args(&inner)?, &item)?;
        let used = mark_used(&inner);
        Ok(replace_body(&item, quote!(#used #body)))
    })
}

/// The body with both layers, the one of kind `outer` around the other.
fn both(
    outer: Kind,
    outer_args: TokenStream,
    inner_args: TokenStream,
    item: &ItemFn,
) -> syn::Result<TokenStream> {
    let (cached_args, timed_args) = match outer {
        Kind::Cached => (outer_args, inner_args),
        Kind::Timed => (inner_args, outer_args),
    };
    let cached: CachedArgs = syn::parse2(cached_args)?;
    let timed: TimedArgs = syn::parse2(timed_args)?;
    Ok(match outer {
        // `#[timed]` written below: it measures executed queries only, not cache hits.
        Kind::Cached => {
            let query = crate::timed::wrap_future(&timed, item, body_future(item));
            cached::block(&cached, item, query)?
        }
        // `#[timed]` written above: it measures what the caller waits, hits included.
        Kind::Timed => {
            let cached = cached::block(&cached, item, body_future(item))?;
            let timed = crate::timed::wrap_future(&timed, item, quote!(async { #cached }));
            quote!(#timed.await)
        }
    })
}

/// Keeps the user's import of an absorbed attribute from being reported unused.
fn mark_used(attr: &syn::Attribute) -> TokenStream {
    let path = attr.path();
    quote!(#[allow(unused_imports)] use #path as _;)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get() -> TokenStream {
        quote!(
            async fn get(id: i64) -> Result<i64, String> {
                Ok(id)
            }
        )
    }

    /// Every path into the runtime crate goes through `crate = my::cq`.
    fn assert_through_my_cq(out: &TokenStream) {
        let out = out.to_string();
        let through = out.matches("my :: cq :: __private ::").count();
        assert!(through > 0, "{out}");
        assert_eq!(through, out.matches("__private").count(), "{out}");
        assert!(!out.contains("cached_query ::"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn crate_path_is_used_by_every_generated_path() {
        let f = get();
        for out in [
            cached_query(
                quote!(crate = my::cq, ttl = 5, invalidate = "t:<id>"),
                f.clone(),
            ),
            cached_query(quote!(crate = my::cq, cache = c), f.clone()),
            crate::cached::invalidates(quote!("t:<id>", crate = my::cq), f.clone()),
            timed(quote!(crate = my::cq), f.clone()),
            timed(
                quote!(crate = my::cq),
                quote!(
                    fn sync(n: u8) -> Result<u8, ()> {
                        Ok(n)
                    }
                ),
            ),
            timed(
                quote!(crate = my::cq),
                quote!(
                    fn boxed(&self) -> Pin<Box<dyn Future<Output = u8> + Send + 'async_trait>> {
                        Box::pin(async move { 1 })
                    }
                ),
            ),
            cached_query(quote!(crate = my::cq), quote!(#[timed(crate = my::cq)] #f)),
            timed(
                quote!(crate = my::cq),
                quote!(#[cached_query(crate = my::cq)] #f),
            ),
        ] {
            assert_through_my_cq(&out);
        }
    }
}
