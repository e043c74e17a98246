//! The rule for stacking `#[timed]` and `#[cached_query]`, written once for both: the written
//! order is the run-time order, whoever owns the attribute written below ours.
//!
//! Attribute macros expand top down and each one wraps the body it is given, so left alone the
//! attribute written lower would end up outermost. Hence:
//!
//! - An attribute of ours that finds, below it, one that may be the other of the pair by name
//!   (`timed`, `cached_query::timed`, `x::cached_query`…) does not guess whose it is and does
//!   not expand: it re-emits the item with itself as a *marker* right below that sibling, under
//!   a path no other crate's attribute has: `#[<crate>::__private::timed(__marker, args…)]`.
//! - If the sibling is ours, its expansion finds the marker (by that `__private` path, looked
//!   for before any name) and builds both layers itself, the marker's on the outside.
//! - If it is foreign, it expands on its own; the marker then expands as a plain attribute
//!   around whatever body that attribute produced: again the written order.
//!
//! A marker never hands over again, so expansion always ends. Nothing is absorbed without the
//! compiler resolving it, so the user's `use cached_query::timed;` is never reported unused.
//!
//! Where the rule stops: another crate's attribute written *above* ours has expanded before
//! ours runs, so ours cannot see it. What it does with the attribute below decides; one that
//! wraps the body it is given (such as `#[tracing::instrument]`) ends up inside ours.

use crate::args::{CachedArgs, Krate, TimedArgs};
use crate::cached;
use crate::item::{attr_args, body_future, expand_with, find_attr, replace_body};
use proc_macro2::{Ident, Span, TokenStream, TokenTree};
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
    /// The attribute's name, also the name of its re-export in `__private`.
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

    /// A marker of this kind: a path ending in `__private::<name>`.
    fn is_marker(self, path: &[String]) -> bool {
        matches!(path, [.., private, last] if private == "__private" && last == self.name())
    }

    /// An attribute that may be this one by its name (the last segment of its path); it may
    /// as well be another crate's.
    fn may_be(self, path: &[String]) -> bool {
        path.last().is_some_and(|last| last == self.name())
    }

    /// Checks this attribute's arguments and gives the crate path they name.
    fn krate(self, args: TokenStream) -> syn::Result<Krate> {
        Ok(match self {
            Kind::Cached => syn::parse2::<CachedArgs>(args)?.krate,
            Kind::Timed => syn::parse2::<TimedArgs>(args)?.krate,
        })
    }

    /// The function with this attribute only.
    fn alone(self, args: TokenStream, item: &ItemFn) -> syn::Result<TokenStream> {
        match self {
            Kind::Cached => cached::expand(&syn::parse2(args)?, item),
            Kind::Timed => crate::timed::expand(&syn::parse2(args)?, item),
        }
    }
}

/// The flag that makes an attribute's arguments a marker's.
const MARKER: &str = "__marker";

fn expand(kind: Kind, args: TokenStream, input: TokenStream) -> TokenStream {
    let (is_marker, args) = split_marker(args);
    expand_with(input, |item| {
        if is_marker {
            return kind.alone(args, item);
        }
        if let Some(i) = find_attr(item, |path| kind.other().is_marker(path)) {
            // Removed for good: if building both layers fails, the error is reported once.
            let marker = item.attrs.remove(i);
            let (_, outer_args) = split_marker(attr_args(&marker)?);
            return both(kind.other(), outer_args, args, item);
        }
        if let Some(i) = find_attr(item, |path| kind.other().may_be(path)) {
            let marker = marker(kind, &kind.krate(args.clone())?, &args);
            item.attrs.insert(i + 1, marker);
            return Ok(quote!(#item));
        }
        kind.alone(args, item)
    })
}

/// The function with both layers, the one of kind `outer` around the other.
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
    let body = match outer {
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
    };
    Ok(replace_body(item, body))
}

/// `#[<crate>::__private::<name>(__marker, args…)]`.
fn marker(kind: Kind, krate: &Krate, args: &TokenStream) -> syn::Attribute {
    let name = Ident::new(kind.name(), Span::call_site());
    let flag = Ident::new(MARKER, Span::call_site());
    syn::parse_quote!(#[#krate::__private::#name(#flag, #args)])
}

/// Whether `args` start with the marker flag, and the arguments after it.
fn split_marker(args: TokenStream) -> (bool, TokenStream) {
    let mut tokens = args.clone().into_iter();
    match tokens.next() {
        Some(TokenTree::Ident(ident)) if ident == MARKER => {
            let mut rest = tokens.peekable();
            if matches!(rest.peek(), Some(TokenTree::Punct(p)) if p.as_char() == ',') {
                rest.next();
            }
            (true, rest.collect())
        }
        _ => (false, args),
    }
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

    fn text(tokens: TokenStream) -> String {
        tokens.to_string()
    }

    #[test]
    fn an_attribute_hands_over_to_a_possible_sibling_and_stays_below_it() {
        let f = get();
        let out = text(cached_query(
            quote!(ttl = 5),
            quote!(#[doc = "d"] #[other::timed(x)] #[inline] #f),
        ));
        assert!(
            out.starts_with(
                "# [doc = \"d\"] # [other :: timed (x)] \
                 # [:: cached_query :: __private :: cached_query (__marker , ttl = 5)] # [inline] async fn get"
            ),
            "{out}"
        );
        assert!(!out.contains("Site"), "not expanded yet: {out}");

        let out = text(timed(quote!(), quote!(#[cached_query] #f)));
        assert!(
            out.starts_with(
                "# [cached_query] # [:: cached_query :: __private :: timed (__marker ,)] async fn"
            ),
            "{out}"
        );
    }

    #[test]
    fn the_sibling_builds_both_layers_with_the_marker_outside() {
        let f = get();
        // `#[cached_query]` written above `#[timed]`: the cache is outside, the timer inside.
        let out = text(timed(
            quote!(name = "t"),
            quote!(#[::cached_query::__private::cached_query(__marker, ttl = 5)] #f),
        ));
        assert!(!out.contains("__marker"), "the marker is consumed: {out}");
        let (site, timer) = (
            out.find("__CQ_SITE").unwrap(),
            out.find("__CQ_TIMER").unwrap(),
        );
        assert!(site < timer, "{out}");

        // `#[timed]` written above `#[cached_query]`: the timer is outside.
        let out = text(cached_query(
            quote!(ttl = 5),
            quote!(#[::cached_query::__private::timed(__marker)] #f),
        ));
        assert!(!out.contains("__marker"), "the marker is consumed: {out}");
        let (site, timer) = (
            out.find("__CQ_SITE").unwrap(),
            out.find("__CQ_TIMER").unwrap(),
        );
        assert!(timer < site, "{out}");
    }

    #[test]
    fn a_marker_never_hands_over_again() {
        let out = text(cached_query(
            quote!(__marker, ttl = 5),
            quote!(
                #[timed]
                async fn get() -> Result<i64, String> {
                    Ok(1)
                }
            ),
        ));
        assert!(out.starts_with("# [timed] async fn get"), "{out}");
        assert!(
            out.contains("__CQ_SITE") && !out.contains("__marker"),
            "{out}"
        );
    }

    #[test]
    fn without_a_sibling_an_attribute_expands_alone() {
        let out = text(timed(
            quote!(),
            quote!(
                #[cached_query_x]
                #[inline]
                fn f() {}
            ),
        ));
        assert!(
            out.starts_with("# [cached_query_x] # [inline] fn f"),
            "{out}"
        );
        assert!(
            out.contains("__CQ_TIMER") && !out.contains("__marker"),
            "{out}"
        );
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
            // Handing over, then building both layers, in either order.
            cached_query(quote!(crate = my::cq), quote!(#[timed(crate = my::cq)] #f)),
            timed(
                quote!(crate = my::cq),
                quote!(#[cached_query(crate = my::cq)] #f),
            ),
            timed(
                quote!(crate = my::cq),
                quote!(#[my::cq::__private::cached_query(__marker, crate = my::cq)] #f),
            ),
            cached_query(
                quote!(crate = my::cq),
                quote!(#[my::cq::__private::timed(__marker, crate = my::cq)] #f),
            ),
        ] {
            assert_through_my_cq(&out);
        }
    }
}
