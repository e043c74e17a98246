//! Tags: templates such as `"user:<id>"` or `"org:<user.org_id>"`, and tag expressions such
//! as `user(id)` (a function declared with `tags!`), and the code that renders them per call.
//!
//! A placeholder names a parameter, a name bound by a parameter pattern (`Path(slug)`), or
//! `self`, optionally followed by fields or tuple indices; it is replaced by the value's
//! `Display`. A value that is an `Option` leaves the whole tag out when `None`.

use crate::args::Krate;
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr};

/// One element of a tag list.
pub(crate) enum TagSpec {
    /// `"user:<id>"`.
    Template(LitStr),
    /// Any other expression, e.g. `user(id)`: its value's `Display` (or nothing for `None`).
    Expr(Box<Expr>),
}

impl Parse for TagSpec {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        Ok(match input.parse()? {
            Expr::Lit(ExprLit {
                lit: Lit::Str(lit), ..
            }) => TagSpec::Template(lit),
            expr => TagSpec::Expr(Box::new(expr)),
        })
    }
}

/// What placeholders may name.
pub(crate) struct Scope<'a> {
    /// Parameter names and the names parameter patterns bind.
    pub(crate) names: Vec<String>,
    pub(crate) has_self: bool,
    pub(crate) krate: &'a Krate,
}

/// `let __cq_tags: Vec<String> = …;` rendering `tags` in order, leaving out those with a
/// `None` value.
pub(crate) fn render_all(tags: &[TagSpec], scope: &Scope<'_>) -> syn::Result<TokenStream> {
    let krate = scope.krate;
    let rendered = tags
        .iter()
        .map(|t| match t {
            TagSpec::Template(lit) => compile(lit, scope),
            TagSpec::Expr(expr) => Ok(value(&quote!(#expr), expr.span(), krate)),
        })
        .collect::<syn::Result<Vec<_>>>()?;
    Ok(quote! {
        let __cq_tags: ::std::vec::Vec<::std::string::String> = {
            #[allow(unused_imports)]
            use #krate::__private::{TagDisplay as _, TagOption as _};
            let mut __cq_tags = ::std::vec::Vec::new();
            #(__cq_tags.extend(#rendered);)*
            __cq_tags
        };
    })
}

/// `Option<String>` of a value: its `Display`, or `None` for an `Option` that is `None`.
fn value(expr: &TokenStream, span: Span, krate: &Krate) -> TokenStream {
    let krate = krate.at(span);
    quote_spanned!(span=> (&&#krate::__private::TagArg(&(#expr))).tag_part())
}

/// Compiles one template into an `Option<String>` expression, checking every placeholder
/// against `scope`. Errors point at the placeholder where the compiler can, else the literal.
fn compile(lit: &LitStr, scope: &Scope<'_>) -> syn::Result<TokenStream> {
    let text = lit.value();
    let err = |span: Span, msg: String| syn::Error::new(span, msg);
    let label = syn::Lifetime::new("'__cq_tag", Span::call_site());
    let mut fmt = String::new();
    let (mut lets, mut vars) = (Vec::new(), Vec::new());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('<') {
        push_literal(&mut fmt, &rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('>').ok_or_else(|| {
            err(
                lit.span(),
                format!("unclosed `<` in tag template {text:?}: write `<name>` or `<name.field>`"),
            )
        })?;
        let path = &after[..close];
        let span = placeholder_span(lit, path);
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let fields: Vec<&str> = parts.collect();
        if !valid_ident(root)
            || !fields
                .iter()
                .all(|f| valid_ident(f) || f.parse::<u32>().is_ok())
        {
            return Err(err(
                span,
                format!(
                    "invalid placeholder `<{path}>`: write `<name>`, `<name.field>` or \
                     `<name.0>` (a tuple field)"
                ),
            ));
        }
        let known = scope.names.iter().any(|p| p == root) || (root == "self" && scope.has_self);
        if !known {
            let list = if scope.names.is_empty() {
                "it binds no names".to_owned()
            } else {
                format!("names in scope: {}", scope.names.join(", "))
            };
            return Err(err(
                span,
                format!(
                    "placeholder `<{path}>` does not name a parameter of this function, nor a \
                     name a parameter pattern binds ({list})"
                ),
            ));
        }
        let root_tokens = if root == "self" {
            quote_spanned!(span=> self)
        } else {
            let ident = format_ident!("{}", root, span = span);
            quote!(#ident)
        };
        let fields = fields.iter().map(|f| match f.parse::<u32>() {
            Ok(i) => {
                let idx = syn::Index { index: i, span };
                quote!(.#idx)
            }
            Err(_) => {
                let ident = format_ident!("{}", f, span = span);
                quote!(.#ident)
            }
        });
        let value = value(&quote!(#root_tokens #(#fields)*), span, scope.krate);
        let var = format_ident!("__cq_v{}", lets.len());
        lets.push(quote! {
            let #var = match #value {
                ::core::option::Option::Some(v) => v,
                ::core::option::Option::None => break #label ::core::option::Option::None,
            };
        });
        fmt.push_str("{}");
        vars.push(var);
        rest = &after[close + 1..];
    }
    push_literal(&mut fmt, rest);
    Ok(quote! {
        #label: {
            #(#lets)*
            ::core::option::Option::Some(::std::format!(#fmt #(, #vars)*))
        }
    })
}

/// The span of `<path>` inside `lit` where the compiler can point inside literals (nightly),
/// else the whole literal.
fn placeholder_span(lit: &LitStr, path: &str) -> Span {
    let source = lit.token().to_string();
    let needle = format!("<{path}>");
    source
        .find(&needle)
        .and_then(|at| lit.token().subspan(at..at + needle.len()))
        .unwrap_or_else(|| lit.span())
}

fn valid_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Appends text to a format string, escaping braces.
fn push_literal(fmt: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '{' => fmt.push_str("{{"),
            '}' => fmt.push_str("}}"),
            c => fmt.push(c),
        }
    }
}
