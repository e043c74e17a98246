//! Parsing of the attribute arguments.

use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitBool, LitInt, LitStr, Token, bracketed, parenthesized};

mod kw {
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(invalidate);
    syn::custom_keyword!(cache);
    syn::custom_keyword!(skip);
    syn::custom_keyword!(key);
    syn::custom_keyword!(cache_none);
    syn::custom_keyword!(name);
    syn::custom_keyword!(version);
}

/// `#[cached_query(...)]`.
#[derive(Default)]
pub(crate) struct CachedArgs {
    pub(crate) ttl: Option<u64>,
    pub(crate) invalidate: Vec<LitStr>,
    pub(crate) cache: Option<Expr>,
    pub(crate) skip: Vec<Ident>,
    pub(crate) key: Option<Expr>,
    pub(crate) cache_none: Option<LitBool>,
    pub(crate) name: Option<LitStr>,
    pub(crate) version: u32,
}

/// `#[invalidates("tmpl", ..., cache = expr)]`.
pub(crate) struct InvalidatesArgs {
    pub(crate) templates: Vec<LitStr>,
    pub(crate) cache: Option<Expr>,
}

/// Rejects a second occurrence of an argument, pointing at it.
fn once<T>(slot: &mut Option<T>, span: proc_macro2::Span, name: &str, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            span,
            format!("duplicate `{name}` argument"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

impl Parse for CachedArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = CachedArgs::default();
        let mut ttl = None;
        let mut invalidate = None;
        let mut skip = None;
        let mut version = None;
        while !input.is_empty() {
            let look = input.lookahead1();
            if look.peek(kw::ttl) {
                let k: kw::ttl = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitInt = input.parse()?;
                let secs: u64 = lit.base10_parse().map_err(|_| {
                    syn::Error::new(lit.span(), "`ttl` must be a whole number of seconds")
                })?;
                if secs == 0 {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`ttl = 0` would never cache; remove the attribute or give a TTL of at least 1 second",
                    ));
                }
                once(&mut ttl, k.span, "ttl", secs)?;
            } else if look.peek(kw::invalidate) {
                let k: kw::invalidate = input.parse()?;
                input.parse::<Token![=]>()?;
                let templates = if input.peek(syn::token::Bracket) {
                    let content;
                    bracketed!(content in input);
                    Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?
                        .into_iter()
                        .collect()
                } else {
                    vec![input.parse::<LitStr>()?]
                };
                once(&mut invalidate, k.span, "invalidate", templates)?;
            } else if look.peek(kw::cache_none) {
                let k: kw::cache_none = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitBool = input.parse()?;
                once(&mut args.cache_none, k.span, "cache_none", lit)?;
            } else if look.peek(kw::cache) {
                let k: kw::cache = input.parse()?;
                input.parse::<Token![=]>()?;
                let expr: Expr = input.parse()?;
                once(&mut args.cache, k.span, "cache", expr)?;
            } else if look.peek(kw::skip) {
                let k: kw::skip = input.parse()?;
                let content;
                parenthesized!(content in input);
                let names = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
                once(&mut skip, k.span, "skip", names.into_iter().collect())?;
            } else if look.peek(kw::key) {
                let k: kw::key = input.parse()?;
                input.parse::<Token![=]>()?;
                let expr: Expr = input.parse()?;
                once(&mut args.key, k.span, "key", expr)?;
            } else if look.peek(kw::name) {
                let k: kw::name = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitStr = input.parse()?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
                }
                once(&mut args.name, k.span, "name", lit)?;
            } else if look.peek(kw::version) {
                let k: kw::version = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitInt = input.parse()?;
                let v: u32 = lit.base10_parse().map_err(|_| {
                    syn::Error::new(lit.span(), "`version` must be a whole number (u32)")
                })?;
                once(&mut version, k.span, "version", v)?;
            } else {
                return Err(look.error());
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        args.ttl = ttl;
        args.invalidate = invalidate.unwrap_or_default();
        args.skip = skip.unwrap_or_default();
        args.version = version.unwrap_or(0);
        Ok(args)
    }
}

impl Parse for InvalidatesArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut templates = Vec::new();
        let mut cache = None;
        while !input.is_empty() {
            let look = input.lookahead1();
            if look.peek(LitStr) && cache.is_none() {
                templates.push(input.parse()?);
            } else if look.peek(kw::cache) {
                let k: kw::cache = input.parse()?;
                input.parse::<Token![=]>()?;
                once(&mut cache, k.span, "cache", input.parse::<Expr>()?)?;
            } else {
                return Err(look.error());
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        if templates.is_empty() {
            return Err(syn::Error::new(
                proc_macro2::Span::call_site(),
                r#"expected at least one tag template, e.g. #[invalidates("user:<id>")]"#,
            ));
        }
        Ok(InvalidatesArgs { templates, cache })
    }
}

mod timed_kw {
    syn::custom_keyword!(threshold_ms);
    syn::custom_keyword!(name);
    syn::custom_keyword!(level);
}

/// `#[timed(threshold_ms = 50, name = "…", level = "warn")]`.
#[derive(Default)]
pub(crate) struct TimedArgs {
    pub(crate) threshold_ms: Option<u64>,
    pub(crate) name: Option<LitStr>,
    /// One of `error`, `warn`, `info`, `debug`, `trace`.
    pub(crate) level: Option<Ident>,
}

impl Parse for TimedArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = TimedArgs::default();
        while !input.is_empty() {
            let look = input.lookahead1();
            if look.peek(timed_kw::threshold_ms) {
                let k: timed_kw::threshold_ms = input.parse()?;
                input.parse::<Token![=]>()?;
                if input.peek(Token![-]) {
                    return Err(
                        input.error("`threshold_ms` must be a whole number of milliseconds ≥ 0")
                    );
                }
                let lit: LitInt = input.parse()?;
                let ms: u64 = lit.base10_parse().map_err(|_| {
                    syn::Error::new(
                        lit.span(),
                        "`threshold_ms` must be a whole number of milliseconds ≥ 0",
                    )
                })?;
                once(&mut args.threshold_ms, k.span, "threshold_ms", ms)?;
            } else if look.peek(timed_kw::name) {
                let k: timed_kw::name = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitStr = input.parse()?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
                }
                once(&mut args.name, k.span, "name", lit)?;
            } else if look.peek(timed_kw::level) {
                let k: timed_kw::level = input.parse()?;
                input.parse::<Token![=]>()?;
                let lit: LitStr = input.parse()?;
                let variant = match lit.value().to_ascii_lowercase().as_str() {
                    "error" => "Error",
                    "warn" => "Warn",
                    "info" => "Info",
                    "debug" => "Debug",
                    "trace" => "Trace",
                    _ => {
                        return Err(syn::Error::new(
                            lit.span(),
                            "`level` must be one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
                        ));
                    }
                };
                once(
                    &mut args.level,
                    k.span,
                    "level",
                    Ident::new(variant, lit.span()),
                )?;
            } else {
                return Err(look.error());
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}
