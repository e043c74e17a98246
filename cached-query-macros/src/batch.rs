//! `#[cached_query(batch = ids)]`: which parameter is the batch, what it and the returned map
//! must look like, and the call into `__private::cached_batch`.
//!
//! The body runs as a future that takes the elements to query from a slot the runtime fills
//! (`BatchKeys`), rebinding the batch parameter to them in the type it was declared with, so
//! the body reads exactly as written and borrows the other parameters as a single read does.

use crate::args::{CachedArgs, Krate};
use crate::sig::{self, BatchKind, FnInfo};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, Pat, Type};

/// A checked `batch = …` argument.
pub(crate) struct Batch<'a> {
    /// The batch parameter's name.
    pub(crate) ident: &'a Ident,
    /// Its pattern (`ids` or `mut ids`), bound again to the elements that missed.
    pat: &'a Pat,
    kind: BatchKind,
    element: &'a Type,
    map_key: &'a Type,
}

impl<'a> Batch<'a> {
    /// Checks `batch = name` against the function: a parameter `&[K]`, `Vec<K>` or
    /// `&Vec<K>`, an Ok type `HashMap<K, V>` or `BTreeMap<K, V>`, no `key = …`.
    pub(crate) fn new(
        name: &Ident,
        args: &CachedArgs,
        info: &FnInfo<'a>,
        ok_ty: &'a Type,
    ) -> syn::Result<Self> {
        if let Some(key) = &args.key {
            return Err(syn::Error::new_spanned(
                key,
                "`key = …` cannot be used with `batch`: each element is its own entry, keyed by \
                 the other arguments plus the element",
            ));
        }
        let Some((param, ident)) = info
            .params
            .iter()
            .find_map(|p| p.ident.filter(|i| *i == name).map(|i| (p, i)))
        else {
            return Err(syn::Error::new(
                name.span(),
                format!("`batch = {name}`: this function has no parameter named `{name}`"),
            ));
        };
        if let Some(skipped) = args.skip.iter().flatten().find(|s| *s == name) {
            return Err(syn::Error::new(
                skipped.span(),
                "the batch parameter cannot be skipped: each element is part of its entry's key",
            ));
        }
        let Some((kind, element)) = sig::batch_elements(param.ty) else {
            return Err(syn::Error::new_spanned(
                param.ty,
                format!(
                    "`batch = {name}` needs `{name}` to be a collection of keys: `&[K]`, \
                     `Vec<K>` or `&Vec<K>`"
                ),
            ));
        };
        let Some((map_key, _)) = sig::map_types(ok_ty) else {
            return Err(syn::Error::new_spanned(
                ok_ty,
                format!(
                    "a batch function returns a map from the elements of `{name}` to their \
                     values: `HashMap<K, V>` or `BTreeMap<K, V>` inside the `Result`"
                ),
            ));
        };
        Ok(Batch {
            ident,
            pat: param.pat,
            kind,
            element,
            map_key,
        })
    }

    /// The call: `prelude` (site, cache and key), the tags rendered per element by `before`
    /// (which names the batch parameter, bound there to one element), and `body`, the
    /// function's query as a future.
    pub(crate) fn call(
        &self,
        krate: &Krate,
        prelude: TokenStream,
        before: &TokenStream,
        in_transaction: TokenStream,
        body: TokenStream,
    ) -> TokenStream {
        let Batch {
            ident,
            pat,
            element,
            map_key,
            ..
        } = self;
        // The elements typed as the map's keys and back: a map keyed by another type is one
        // error, on its key type.
        let (as_keys, as_elements) = {
            let span = map_key.span();
            let krate = krate.at(span);
            (
                quote_spanned!(span=> #krate::__private::as_map_keys::<#map_key, #element>),
                quote_spanned!(span=> #krate::__private::as_elements::<#map_key, #element>),
            )
        };
        let requested = {
            let span = ident.span();
            match self.kind {
                BatchKind::Slice => quote_spanned!(span=> #as_keys(#ident)),
                BatchKind::Vec | BatchKind::RefVec => quote_spanned!(span=> #as_keys(&#ident[..])),
            }
        };
        let rebound = match self.kind {
            BatchKind::Slice => quote!(&__cq_keys[..]),
            BatchKind::Vec => quote!(__cq_keys),
            BatchKind::RefVec => quote!(&__cq_keys),
        };
        // `mut ids` in the signature: the parameter itself is only read (its rebinding in the
        // body is what may be changed).
        let mutable = matches!(pat, Pat::Ident(p) if p.mutability.is_some())
            .then(|| quote!(let _ = &mut #ident;));
        quote! {
            #prelude
            #mutable
            let __cq_requested = #requested;
            let __cq_tags: ::std::vec::Vec<::std::vec::Vec<::std::string::String>> =
                ::core::iter::Iterator::collect(::core::iter::Iterator::map(
                    <[_]>::iter(__cq_requested),
                    |#ident| {
                        let _ = &#ident;
                        #before
                        __cq_tags
                    },
                ));
            let __cq_in_transaction: bool = #in_transaction;
            let __cq_missing = #krate::__private::BatchKeys::for_keys(__cq_requested);
            #krate::__private::cached_batch(
                __cq_cache,
                &__CQ_SITE,
                __cq_key,
                __cq_requested,
                __cq_tags,
                __cq_in_transaction,
                &__cq_missing,
                async {
                    let __cq_keys = #as_elements(__cq_missing.take());
                    let #pat = #rebound;
                    (#body).await
                },
            )
            .await
        }
    }
}
