//! The rule for stacking `#[timed]`, `#[cached_query]`, `#[retry]` and `#[invalidates]`,
//! written once for all four: the written order is the run-time order, whoever owns the
//! attributes written below ours.
//!
//! Attribute macros expand top down and each one wraps the body it is given, so left alone the
//! attribute written lower would end up outermost. Hence:
//!
//! - An attribute of ours that finds, below it, one that may be ours by name (`timed`,
//!   `cached_query::retry`, `x::cached_query`…) does not guess whose it is and does not
//!   expand: it re-emits the item with itself as a *marker* right below that sibling, under a
//!   path no other crate's attribute has: `#[<crate>::__private::timed(__marker, args…)]`.
//!   Markers it found (those written above it) move down with it, in written order.
//! - If the sibling is ours, it collects the markers (by that `__private` path, looked for
//!   before any name) as its outer layers and builds them all around itself, or hands them on
//!   again if another possible sibling is below it.
//! - If it is foreign, it expands on its own; the first marker then expands as a plain
//!   attribute and builds itself and the markers below it around whatever body that attribute
//!   produced (or hands them all on again past the next possible sibling): again the written
//!   order.
//!
//! Every hand-over moves the markers past an attribute that then expands, so expansion always
//! ends. Nothing is absorbed without the compiler resolving it, so the user's
//! `use cached_query::timed;` is never reported unused. The same attribute twice is an error.
//!
//! Where the rule stops: another crate's attribute written *above* ours has expanded before
//! ours runs, so ours cannot see it. What it does with the attribute below decides; one that
//! wraps the body it is given (such as `#[tracing::instrument]`) ends up inside ours. A foreign
//! attribute that has one of our names and sits *between* two of ours has already wrapped the
//! body when ours build their layers, so it runs inside both. One of ours imported under another
//! name is not recognised; written below another of ours, it finds that one's code in the body
//! and refuses to expand outside it (a compile error).

use crate::args::{CachedArgs, InvalidatesArgs, Krate, RetryArgs, TimedArgs};
use crate::cached;
use crate::item::{attr_args, body_future, expand_with, find_attr, path_of, replace_body};
use proc_macro2::{Ident, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::{ItemFn, LitStr};

/// The `#[cached_query]` entry point.
pub(crate) fn cached_query(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Cached, args, input)
}

/// The `#[timed]` entry point.
pub(crate) fn timed(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Timed, args, input)
}

/// The `#[retry]` entry point.
pub(crate) fn retry(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Retry, args, input)
}

/// The `#[invalidates]` entry point.
pub(crate) fn invalidates(args: TokenStream, input: TokenStream) -> TokenStream {
    expand(Kind::Invalidates, args, input)
}

/// The attributes that stack.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Cached,
    Timed,
    Retry,
    Invalidates,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Cached, Kind::Timed, Kind::Retry, Kind::Invalidates];

    /// The attribute's name, also the name of its re-export in `__private`.
    fn name(self) -> &'static str {
        match self {
            Kind::Cached => "cached_query",
            Kind::Timed => "timed",
            Kind::Retry => "retry",
            Kind::Invalidates => "invalidates",
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
            Kind::Retry => syn::parse2::<RetryArgs>(args)?.krate,
            Kind::Invalidates => syn::parse2::<InvalidatesArgs>(args)?.krate,
        })
    }

    /// The function with this attribute only.
    fn alone(self, args: TokenStream, item: &ItemFn) -> syn::Result<TokenStream> {
        match self {
            Kind::Cached => cached::expand(&syn::parse2(args)?, item),
            Kind::Timed => crate::timed::expand(&syn::parse2(args)?, item),
            Kind::Retry => crate::retry::expand(&syn::parse2(args)?, item),
            Kind::Invalidates => cached::expand_invalidates(&syn::parse2(args)?, item),
        }
    }

    /// A future expression that runs `fut` (a future expression) under this attribute;
    /// `name` is the query name another layer gives, if any.
    fn wrap(
        self,
        args: TokenStream,
        item: &ItemFn,
        fut: TokenStream,
        name: Option<&LitStr>,
    ) -> syn::Result<TokenStream> {
        Ok(match self {
            Kind::Cached => {
                let block = cached::block(&syn::parse2(args)?, item, fut)?;
                quote!(async { #block })
            }
            Kind::Timed => crate::timed::wrap_future(&syn::parse2(args)?, item, fut),
            Kind::Retry => {
                let mut args: RetryArgs = syn::parse2(args)?;
                if args.name.is_none() {
                    args.name = name.cloned();
                }
                crate::retry::check(item, false)?;
                crate::retry::wrap_future(&args, item, fut)?
            }
            Kind::Invalidates => {
                let block = cached::invalidates_block(&syn::parse2(args)?, item, fut)?;
                quote!(async { #block })
            }
        })
    }

    /// The `name = "…"` this attribute gives its query, if any.
    fn query_name(self, args: &TokenStream) -> Option<LitStr> {
        match self {
            Kind::Cached => syn::parse2::<CachedArgs>(args.clone()).ok()?.name,
            Kind::Timed => syn::parse2::<TimedArgs>(args.clone()).ok()?.name,
            Kind::Retry => syn::parse2::<RetryArgs>(args.clone()).ok()?.name,
            Kind::Invalidates => None,
        }
    }
}

/// The flag that makes an attribute's arguments a marker's.
const MARKER: &str = "__marker";

/// One attribute of ours on the item: its kind and arguments.
type Layer = (Kind, TokenStream);

fn expand(kind: Kind, args: TokenStream, input: TokenStream) -> TokenStream {
    let (is_marker, args) = split_marker(args);
    expand_with(input, |item| {
        // Removed for good: if building the layers fails, the error is reported once.
        let markers = take_markers(item)?;
        let layers: Vec<Layer> = if is_marker {
            // A marker expands as an attribute only after a foreign sibling did; the markers
            // still on the item were written below it.
            std::iter::once((kind, args)).chain(markers).collect()
        } else {
            // The markers were written above this attribute: they are the outer layers.
            markers.into_iter().chain([(kind, args)]).collect()
        };
        if let Some(i) = find_attr(item, |path| Kind::ALL.iter().any(|k| k.may_be(path))) {
            // Each hand-over moves past an attribute that then expands: expansion ends.
            let mut handed = Vec::new();
            for (kind, args) in &layers {
                handed.push(marker(*kind, &kind.krate(args.clone())?, args));
            }
            item.attrs.splice(i + 1..i + 1, handed);
            return Ok(quote!(#item));
        }
        if !is_marker && already_expanded(item) {
            return Err(syn::Error::new(
                Span::call_site(),
                format!(
                    "#[{}] is written below another cached-query attribute that did not \
                     recognise it and has already expanded, so it would run outside it: write \
                     the attributes by their own names (`cached_query`, `timed`, `retry`), not \
                     renamed imports, so that the written order is the run-time order",
                    kind.name()
                ),
            ));
        }
        build(&layers, item)
    })
}

/// Whether the body holds code one of the stacking attributes generated: the names only their
/// expansions declare.
fn already_expanded(item: &ItemFn) -> bool {
    const SENTINELS: [&str; 4] = ["__CQ_SITE", "__CQ_TIMER", "__cq_retry", "__cq_when"];
    fn walk(tokens: TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            TokenTree::Ident(i) => SENTINELS.iter().any(|s| i == s),
            TokenTree::Group(g) => walk(g.stream()),
            _ => false,
        })
    }
    walk(item.block.to_token_stream())
}

/// Removes the markers of ours from `item`, in written order.
fn take_markers(item: &mut ItemFn) -> syn::Result<Vec<Layer>> {
    let mut markers = Vec::new();
    let mut kept = Vec::new();
    for attr in std::mem::take(&mut item.attrs) {
        let path = path_of(&attr);
        match Kind::ALL.into_iter().find(|k| k.is_marker(&path)) {
            Some(kind) => {
                let (_, args) = split_marker(attr_args(&attr)?);
                markers.push((kind, args));
            }
            None => kept.push(attr),
        }
    }
    item.attrs = kept;
    Ok(markers)
}

/// The function with `layers`, the first outermost; the written order is the run-time order.
fn build(layers: &[Layer], item: &ItemFn) -> syn::Result<TokenStream> {
    for (i, (kind, _)) in layers.iter().enumerate() {
        if layers[..i].iter().any(|(k, _)| k == kind) {
            return Err(syn::Error::new(
                Span::call_site(),
                format!("#[{}] is written twice on this function", kind.name()),
            ));
        }
    }
    let Some(((outer, outer_args), inner)) = layers.split_first() else {
        return Ok(quote!(#item));
    };
    // `#[retry]` counts its retries under the name `#[cached_query]`, else `#[timed]`, gives.
    let name = [Kind::Cached, Kind::Timed].into_iter().find_map(|want| {
        let (kind, args) = layers.iter().find(|(kind, _)| *kind == want)?;
        kind.query_name(args)
    });
    if inner.is_empty() {
        return outer.alone(outer_args.clone(), item);
    }
    if item.sig.asyncness.is_none() && crate::timed::async_trait_body(item).is_some() {
        return Err(syn::Error::new_spanned(
            item.sig.fn_token,
            "stacked cached-query attributes are not supported inside `#[async_trait]` (only \
             `#[timed]` or `#[retry]` alone): move the work into an inherent `async fn` and \
             stack them there",
        ));
    }
    let mut fut = body_future(item);
    for (kind, args) in inner.iter().rev() {
        fut = kind.wrap(args.clone(), item, fut, name.as_ref())?;
    }
    let body = match outer {
        Kind::Cached => cached::block(&syn::parse2(outer_args.clone())?, item, fut)?,
        Kind::Invalidates => {
            cached::invalidates_block(&syn::parse2(outer_args.clone())?, item, fut)?
        }
        _ => {
            let fut = outer.wrap(outer_args.clone(), item, fut, name.as_ref())?;
            quote!(#fut.await)
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

    /// Expands the item's attributes the way the compiler does: the first one of ours (by
    /// name, markers included) each time, until none is left.
    fn expand_all(mut tokens: TokenStream) -> String {
        loop {
            let mut item: ItemFn = syn::parse2(tokens.clone()).unwrap();
            let Some(i) = find_attr(&item, |path| {
                Kind::ALL
                    .iter()
                    .any(|k| k.may_be(path) || k.is_marker(path))
            }) else {
                return tokens.to_string();
            };
            let attr = item.attrs.remove(i);
            let args = attr_args(&attr).unwrap();
            let path = path_of(&attr);
            if path[0] == "foreign" {
                // Another crate's attribute: wraps the body it is given.
                let stmts = &item.block.stmts;
                item.block =
                    syn::parse_quote!({ foreign_wrapper(async move { #(#stmts)* }).await });
                tokens = quote!(#item);
                continue;
            }
            let name = path.last().unwrap().clone();
            let rest = quote!(#item);
            tokens = match name.as_str() {
                "cached_query" => cached_query(args, rest),
                "timed" => timed(args, rest),
                "retry" => retry(args, rest),
                other => panic!("{other}"),
            };
            assert!(!tokens.to_string().contains("compile_error"), "{tokens}");
        }
    }

    #[test]
    fn three_attributes_nest_in_the_written_order() {
        let f = get();
        let at = |out: &str, what: &str| out.find(what).unwrap_or_else(|| panic!("{what}: {out}"));
        for (attrs, order) in [
            (
                quote!(#[timed] #[cached_query(ttl = 5)] #[retry]),
                ["__CQ_TIMER", "__CQ_SITE", "Retry :: new"],
            ),
            (
                quote!(#[retry] #[cached_query(ttl = 5)] #[timed]),
                ["Retry :: new", "__CQ_SITE", "__CQ_TIMER"],
            ),
            (
                quote!(#[cached_query(ttl = 5)] #[retry(attempts = 2)] #[timed]),
                ["__CQ_SITE", "Retry :: new", "__CQ_TIMER"],
            ),
        ] {
            let out = expand_all(quote!(#attrs #f));
            assert!(!out.contains("__marker"), "{out}");
            let positions = order.map(|what| at(&out, what));
            assert!(
                positions.is_sorted(),
                "{attrs}: {order:?} at {positions:?} in {out}"
            );
        }
    }

    #[test]
    fn a_marker_hands_over_past_the_next_possible_sibling() {
        let out = text(cached_query(
            quote!(__marker, ttl = 5),
            quote!(
                #[timed]
                async fn get() -> Result<i64, String> {
                    Ok(1)
                }
            ),
        ));
        assert!(
            out.starts_with(
                "# [timed] # [:: cached_query :: __private :: cached_query (__marker , ttl = 5)] async fn get"
            ),
            "{out}"
        );
        assert!(!out.contains("__CQ_SITE"), "not expanded yet: {out}");
    }

    #[test]
    fn a_foreign_namesake_between_two_of_ours_runs_inside_both() {
        let f = get();
        // `foreign::timed` stands for another crate's attribute: it wraps the body.
        let out = expand_all(quote!(
            #[cached_query(ttl = 5)]
            #[foreign::timed]
            #[retry]
            #f
        ));
        let at = |what: &str| out.find(what).unwrap_or_else(|| panic!("{what}: {out}"));
        assert!(at("__CQ_SITE") < at("Retry :: new"), "{out}");
        assert!(at("Retry :: new") < at("foreign_wrapper"), "{out}");
    }

    #[test]
    fn the_same_attribute_twice_is_an_error() {
        let f = get();
        let out = text(retry(
            quote!(),
            quote!(#[::cached_query::__private::retry(__marker, attempts = 2)] #f),
        ));
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("written twice"), "{out}");
    }

    #[test]
    fn an_attribute_below_an_expanded_one_refuses_to_run_outside_it() {
        // `#[cached_query]` above a renamed `#[retry]` did not see it and expanded alone.
        let expanded = text(cached_query(quote!(ttl = 5), get()));
        let item: TokenStream = expanded.parse().unwrap();
        let out = text(retry(quote!(), item));
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("renamed imports"), "{out}");
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
            invalidates(quote!("t:<id>", crate = my::cq), f.clone()),
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
            retry(quote!(crate = my::cq, attempts = 2), f.clone()),
            retry(
                quote!(crate = my::cq),
                quote!(#[timed(crate = my::cq)] #[cached_query(crate = my::cq)] #f),
            ),
        ] {
            assert_through_my_cq(&out);
        }
    }

    #[test]
    fn the_output_of_invalidates_parses_again_for_the_attribute_below() {
        let out = invalidates(
            quote!("account:<id>", cache = cache),
            quote!(
                #[retry]
                async fn rename(cache: &Cache, id: i64) -> Result<(), E> {
                    Ok(())
                }
            ),
        );
        let item: syn::Result<ItemFn> = syn::parse2(out.clone());
        assert!(item.is_ok(), "{:?}: {out}", item.err());
    }
}
