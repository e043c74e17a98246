//! Attribute arguments: one generic parser for `key = value`, `key(a, b)` and bare string
//! literals, and the keys each attribute accepts.
//!
//! [`each`] walks the comma-separated list and offers every argument to the attribute's keys in
//! turn, so an attribute's `Parse` impl is just its list of keys and how to read each value.

use crate::template::TagSpec;
use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{Lookahead1, Parse, ParseStream, Peek};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitBool, LitInt, LitStr, Path, Token, bracketed, parenthesized};

mod kw {
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(invalidate);
    syn::custom_keyword!(cache);
    syn::custom_keyword!(skip);
    syn::custom_keyword!(key);
    syn::custom_keyword!(cache_none);
    syn::custom_keyword!(name);
    syn::custom_keyword!(version);
    syn::custom_keyword!(threshold_ms);
    syn::custom_keyword!(level);
    syn::custom_keyword!(assume_no_transaction);
    syn::custom_keyword!(tables);
    syn::custom_keyword!(auto);
    syn::custom_keyword!(batch);
    syn::custom_keyword!(stale_if_error);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(refresh_ahead);
    syn::custom_keyword!(attempts);
    syn::custom_keyword!(backoff_ms);
    syn::custom_keyword!(max_backoff_ms);
}

/// `tables = auto` or `tables("users", …)`: `table:<name>` tags from the SQL.
pub(crate) enum TablesArg {
    /// Found in the body's SQL literals; the span of `auto`.
    Auto(Span),
    Named(Vec<LitStr>),
}

/// Parses `arg, arg, …` (a trailing comma allowed), offering each argument to `accept`, which
/// returns whether one of its keys took it. When none did, the error lists every key tried.
fn each(
    input: ParseStream<'_>,
    mut accept: impl FnMut(&Arg<'_>) -> syn::Result<bool>,
) -> syn::Result<()> {
    while !input.is_empty() {
        let arg = Arg {
            input,
            look: input.lookahead1(),
        };
        if !accept(&arg)? {
            return Err(arg.look.error());
        }
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    Ok(())
}

/// The argument at the head of the input. Each method tries one key: it returns `Ok(false)`
/// (having only peeked) when the argument is something else.
struct Arg<'a> {
    input: ParseStream<'a>,
    look: Lookahead1<'a>,
}

impl Arg<'_> {
    /// `key = value`, the value read by `value` into `slot`.
    fn value<T>(
        &self,
        key: impl Peek,
        slot: &mut Option<T>,
        value: impl FnOnce(ParseStream<'_>) -> syn::Result<T>,
    ) -> syn::Result<bool> {
        if !self.key(key, slot.is_some())? {
            return Ok(false);
        }
        self.input.parse::<Token![=]>()?;
        *slot = Some(value(self.input)?);
        Ok(true)
    }

    /// `key(a, b, …)`.
    fn list<T: Parse>(&self, key: impl Peek, slot: &mut Option<Vec<T>>) -> syn::Result<bool> {
        if !self.key(key, slot.is_some())? {
            return Ok(false);
        }
        let content;
        parenthesized!(content in self.input);
        let items = Punctuated::<T, Token![,]>::parse_terminated(&content)?;
        *slot = Some(items.into_iter().collect());
        Ok(true)
    }

    /// `tables = auto` or `tables("a", …)`.
    fn tables(&self, slot: &mut Option<TablesArg>) -> syn::Result<bool> {
        if !self.key(kw::tables, slot.is_some())? {
            return Ok(false);
        }
        let input = self.input;
        if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            let auto: kw::auto = input.parse().map_err(|e| {
                syn::Error::new(
                    e.span(),
                    r#"expected `tables = auto` or `tables("users", …)`"#,
                )
            })?;
            *slot = Some(TablesArg::Auto(auto.span));
            return Ok(true);
        }
        let content;
        parenthesized!(content in input);
        let names = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
        *slot = Some(TablesArg::Named(names.into_iter().collect()));
        Ok(true)
    }

    /// A positional argument (anything but `name = …` or `tables(…)`), taken only while
    /// `open`: positional arguments come first.
    fn positional<T: Parse>(&self, out: &mut Vec<T>, open: bool) -> syn::Result<bool> {
        let input = self.input;
        let named = input.peek(kw::tables)
            || (input.peek(Ident::peek_any) && input.peek2(Token![=]) && !input.peek2(Token![==]));
        if !open || named {
            return Ok(false);
        }
        out.push(input.parse()?);
        Ok(true)
    }

    /// Consumes `key` when it comes next; a second occurrence is an error on its span.
    fn key(&self, key: impl Peek, seen: bool) -> syn::Result<bool> {
        if !self.look.peek(key) {
            return Ok(false);
        }
        let key: TokenTree = self.input.parse()?;
        if seen {
            return Err(syn::Error::new(
                key.span(),
                format!("duplicate `{key}` argument"),
            ));
        }
        Ok(true)
    }
}

/// Where generated code finds the runtime crate: `crate = path`, by default `::cached_query`.
#[derive(Default)]
pub(crate) struct Krate(Option<Path>);

impl Krate {
    /// The path for code spanned at `span`: the default is written there, so that errors in
    /// that code keep pointing at the user's tokens; a given path keeps its own spans.
    pub(crate) fn at(&self, span: Span) -> TokenStream {
        match &self.0 {
            Some(path) => path.to_token_stream(),
            None => quote_spanned!(span=> ::cached_query),
        }
    }
}

impl ToTokens for Krate {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        tokens.extend(self.at(Span::call_site()));
    }
}

/// `#[cached_query(...)]`.
#[derive(Default)]
pub(crate) struct CachedArgs {
    pub(crate) ttl: Option<u64>,
    pub(crate) invalidate: Option<Vec<TagSpec>>,
    pub(crate) cache: Option<Expr>,
    pub(crate) skip: Option<Vec<Ident>>,
    pub(crate) key: Option<Expr>,
    pub(crate) cache_none: Option<LitBool>,
    pub(crate) name: Option<LitStr>,
    pub(crate) version: Option<u32>,
    /// `assume_no_transaction = true`: executor arguments whose transaction state cannot be
    /// checked (`impl Executor`, a generic `E: Executor`, `Acquire`) are trusted to be outside one.
    pub(crate) assume_no_transaction: Option<LitBool>,
    pub(crate) tables: Option<TablesArg>,
    /// `batch = ids`: the parameter whose elements are each their own entry.
    pub(crate) batch: Option<Ident>,
    /// `stale_if_error = 3600`: seconds an entry is kept past its TTL, returned if the query
    /// fails; the span of the value.
    pub(crate) stale_if_error: Option<(u64, Span)>,
    /// `lease = false`: this query's misses take no lease.
    pub(crate) lease: Option<LitBool>,
    /// `refresh_ahead = 30`: seconds before expiry during which a hit may refresh the
    /// entry; the span of the value.
    pub(crate) refresh_ahead: Option<(u64, Span)>,
    pub(crate) krate: Krate,
}

impl Parse for CachedArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut a = CachedArgs::default();
        each(input, |arg| {
            Ok(arg.value(kw::ttl, &mut a.ttl, ttl)?
                || arg.value(kw::invalidate, &mut a.invalidate, tag_list)?
                || arg.tables(&mut a.tables)?
                || arg.value(kw::cache_none, &mut a.cache_none, LitBool::parse)?
                || arg.value(kw::cache, &mut a.cache, Expr::parse)?
                || arg.list(kw::skip, &mut a.skip)?
                || arg.value(kw::key, &mut a.key, Expr::parse)?
                || arg.value(kw::name, &mut a.name, name)?
                || arg.value(kw::version, &mut a.version, version)?
                || arg.value(kw::batch, &mut a.batch, Ident::parse)?
                || arg.value(kw::stale_if_error, &mut a.stale_if_error, stale_secs)?
                || arg.value(kw::lease, &mut a.lease, LitBool::parse)?
                || arg.value(kw::refresh_ahead, &mut a.refresh_ahead, refresh_secs)?
                || arg.value(
                    kw::assume_no_transaction,
                    &mut a.assume_no_transaction,
                    LitBool::parse,
                )?
                || arg.value(Token![crate], &mut a.krate.0, crate_path)?)
        })?;
        Ok(a)
    }
}

/// `#[invalidates("tmpl", tag_fn(x), ..., cache = expr, assume_no_transaction = true,
/// crate = path)]`.
pub(crate) struct InvalidatesArgs {
    pub(crate) tags: Vec<TagSpec>,
    pub(crate) cache: Option<Expr>,
    /// As for [`CachedArgs::assume_no_transaction`].
    pub(crate) assume_no_transaction: Option<LitBool>,
    /// `table:<name>` tags for the tables the body writes.
    pub(crate) tables: Option<TablesArg>,
    pub(crate) krate: Krate,
}

impl Parse for InvalidatesArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut tags = Vec::new();
        let (mut cache, mut krate, mut assume, mut tables) = (None, Krate::default(), None, None);
        each(input, |arg| {
            let open = cache.is_none() && krate.0.is_none() && assume.is_none() && tables.is_none();
            Ok(arg.positional(&mut tags, open)?
                || arg.tables(&mut tables)?
                || arg.value(kw::cache, &mut cache, Expr::parse)?
                || arg.value(kw::assume_no_transaction, &mut assume, LitBool::parse)?
                || arg.value(Token![crate], &mut krate.0, crate_path)?)
        })?;
        if tags.is_empty() && tables.is_none() {
            return Err(syn::Error::new(
                proc_macro2::Span::call_site(),
                r#"expected at least one tag, e.g. #[invalidates("user:<id>")], #[invalidates(user(id))] or #[invalidates(tables = auto)]"#,
            ));
        }
        Ok(InvalidatesArgs {
            tags,
            tables,
            cache,
            assume_no_transaction: assume,
            krate,
        })
    }
}

/// `#[timed(threshold_ms = 50, name = "…", level = "warn", crate = path)]`.
#[derive(Default)]
pub(crate) struct TimedArgs {
    pub(crate) threshold_ms: Option<u64>,
    pub(crate) name: Option<LitStr>,
    /// The `SlowLevel` variant: `Error`, `Warn`, `Info`, `Debug` or `Trace`.
    pub(crate) level: Option<Ident>,
    pub(crate) krate: Krate,
}

impl Parse for TimedArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut a = TimedArgs::default();
        each(input, |arg| {
            Ok(
                arg.value(kw::threshold_ms, &mut a.threshold_ms, threshold_ms)?
                    || arg.value(kw::name, &mut a.name, name)?
                    || arg.value(kw::level, &mut a.level, level)?
                    || arg.value(Token![crate], &mut a.krate.0, crate_path)?,
            )
        })?;
        Ok(a)
    }
}

/// `#[retry(attempts = 3, backoff_ms = 50, max_backoff_ms = 2000, name = "…", crate = path)]`.
#[derive(Default)]
pub(crate) struct RetryArgs {
    pub(crate) attempts: Option<(u32, Span)>,
    pub(crate) backoff_ms: Option<(u64, Span)>,
    pub(crate) max_backoff_ms: Option<(u64, Span)>,
    /// The `query` of the warn event and the metric; stacked, `#[cached_query]`'s or
    /// `#[timed]`'s `name` when this one has none.
    pub(crate) name: Option<LitStr>,
    pub(crate) krate: Krate,
}

impl RetryArgs {
    /// The defaults the documentation of `#[retry]` states.
    pub(crate) const ATTEMPTS: u32 = 3;
    pub(crate) const BACKOFF_MS: u64 = 50;
    pub(crate) const MAX_BACKOFF_MS: u64 = 2000;

    /// `(attempts, backoff_ms, max_backoff_ms)`, the defaults filled in.
    pub(crate) fn policy(&self) -> (u32, u64, u64) {
        (
            self.attempts.map_or(Self::ATTEMPTS, |(n, _)| n),
            self.backoff_ms.map_or(Self::BACKOFF_MS, |(n, _)| n),
            self.max_backoff_ms.map_or(Self::MAX_BACKOFF_MS, |(n, _)| n),
        )
    }
}

impl Parse for RetryArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut a = RetryArgs::default();
        each(input, |arg| {
            Ok(arg.value(kw::attempts, &mut a.attempts, attempts)?
                || arg.value(kw::backoff_ms, &mut a.backoff_ms, |i| {
                    millis(i, "backoff_ms")
                })?
                || arg.value(kw::max_backoff_ms, &mut a.max_backoff_ms, |i| {
                    millis(i, "max_backoff_ms")
                })?
                || arg.value(kw::name, &mut a.name, name)?
                || arg.value(Token![crate], &mut a.krate.0, crate_path)?)
        })?;
        let (_, backoff, max) = a.policy();
        if backoff > max {
            let span = a
                .max_backoff_ms
                .or(a.backoff_ms)
                .map_or_else(Span::call_site, |(_, span)| span);
            return Err(syn::Error::new(
                span,
                format!(
                    "`backoff_ms` ({backoff}{}) is more than `max_backoff_ms` ({max}{}): the \
                     first delay cannot exceed the cap",
                    if a.backoff_ms.is_none() {
                        ", the default"
                    } else {
                        ""
                    },
                    if a.max_backoff_ms.is_none() {
                        ", the default"
                    } else {
                        ""
                    },
                ),
            ));
        }
        Ok(a)
    }
}

// --- Values --------------------------------------------------------------------------------

/// An integer literal that fits `T`, or `msg` on it.
fn whole<T>(input: ParseStream<'_>, msg: &str) -> syn::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let lit: LitInt = input.parse()?;
    lit.base10_parse()
        .map_err(|_| syn::Error::new(lit.span(), msg))
}

fn ttl(input: ParseStream<'_>) -> syn::Result<u64> {
    let span = input.span();
    let secs = whole(input, "`ttl` must be a whole number of seconds")?;
    if secs == 0 {
        return Err(syn::Error::new(
            span,
            "`ttl = 0` would never cache; remove the attribute or give a TTL of at least 1 second",
        ));
    }
    Ok(secs)
}

fn stale_secs(input: ParseStream<'_>) -> syn::Result<(u64, Span)> {
    let span = input.span();
    let secs = whole(
        input,
        "`stale_if_error` must be a whole number of seconds (how long past its TTL an entry \
         is kept for when the query fails)",
    )?;
    if secs == 0 {
        return Err(syn::Error::new(
            span,
            "`stale_if_error = 0` keeps nothing past the TTL; remove it, or give at least 1 second",
        ));
    }
    Ok((secs, span))
}

fn refresh_secs(input: ParseStream<'_>) -> syn::Result<(u64, Span)> {
    let span = input.span();
    let secs = whole(
        input,
        "`refresh_ahead` must be a whole number of seconds (the end of an entry's life during \
         which a hit may refresh it)",
    )?;
    if secs == 0 {
        return Err(syn::Error::new(
            span,
            "`refresh_ahead = 0` never refreshes; remove it, or give at least 1 second",
        ));
    }
    Ok((secs, span))
}

fn attempts(input: ParseStream<'_>) -> syn::Result<(u32, Span)> {
    let span = input.span();
    let n = whole(
        input,
        "`attempts` must be a whole number (every execution, the first included)",
    )?;
    if n == 0 {
        return Err(syn::Error::new(
            span,
            "`attempts = 0` would never run the function; `attempts` counts every execution, \
             the first included (1 = no retries)",
        ));
    }
    Ok((n, span))
}

fn millis(input: ParseStream<'_>, key: &str) -> syn::Result<(u64, Span)> {
    let span = input.span();
    let n = whole(
        input,
        &format!("`{key}` must be a whole number of milliseconds"),
    )?;
    Ok((n, span))
}

fn version(input: ParseStream<'_>) -> syn::Result<u32> {
    whole(input, "`version` must be a whole number (u32)")
}

fn threshold_ms(input: ParseStream<'_>) -> syn::Result<u64> {
    const MSG: &str = "`threshold_ms` must be a whole number of milliseconds ≥ 0";
    if input.peek(Token![-]) {
        return Err(input.error(MSG));
    }
    whole(input, MSG)
}

/// A tag or `[tag, …]`: templates (`"user:<id>"`) and expressions (`user(id)`).
fn tag_list(input: ParseStream<'_>) -> syn::Result<Vec<TagSpec>> {
    if !input.peek(syn::token::Bracket) {
        return Ok(vec![input.parse()?]);
    }
    let content;
    bracketed!(content in input);
    let list = Punctuated::<TagSpec, Token![,]>::parse_terminated(&content)?;
    Ok(list.into_iter().collect())
}

/// A non-empty string.
fn name(input: ParseStream<'_>) -> syn::Result<LitStr> {
    let lit: LitStr = input.parse()?;
    if lit.value().is_empty() {
        return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
    }
    Ok(lit)
}

fn level(input: ParseStream<'_>) -> syn::Result<Ident> {
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
    Ok(Ident::new(variant, lit.span()))
}

/// A path such as `my_crate::reexports::cached_query` (no generic arguments).
fn crate_path(input: ParseStream<'_>) -> syn::Result<Path> {
    if input.peek(Ident::peek_any) || input.peek(Token![::]) {
        return Path::parse_mod_style(input);
    }
    let not = if input.peek(LitStr) {
        ", not a string"
    } else {
        ""
    };
    Err(input.error(format!(
        "`crate` takes a path{not}: e.g. `crate = my_crate::cached_query`"
    )))
}
