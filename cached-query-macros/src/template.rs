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
#[derive(Clone)]
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
    /// Whether `ret` names the `Ok` value (`#[cached_query]`).
    pub(crate) ret: bool,
    pub(crate) krate: &'a Krate,
}

/// The rendered tag list of a call.
pub(crate) struct Rendered {
    /// `let __cq_tags: Vec<String> = …;` (and the values result tags take from parameters),
    /// before the query.
    pub(crate) before: TokenStream,
    /// A closure rendering the result tags from `&T`, when there are any, and their text
    /// (part of the key: entries are checked only against the result tags they carry).
    pub(crate) by_result: Option<(TokenStream, String)>,
}

/// Renders `tags` in order, leaving out those with a `None` value; tags that name `ret`
/// become the result tags, rendered for each element of the `Ok` value (through `Option` and
/// `Vec`).
pub(crate) fn render_all(tags: &[TagSpec], scope: &Scope<'_>) -> syn::Result<Rendered> {
    let krate = scope.krate;
    let (mut args, mut results, mut pre) = (Vec::new(), Vec::new(), Vec::new());
    let mut results_text = Vec::new();
    for t in tags {
        let (rendered, by_result) = match t {
            TagSpec::Template(lit) => compile(lit, scope, &mut pre)?,
            TagSpec::Expr(expr) => {
                let by_result = scope.ret && names_ret(quote!(#expr));
                if by_result && scope.names.iter().any(|n| n == "ret") {
                    return Err(syn::Error::new_spanned(
                        expr,
                        "`ret` names the result, but a parameter is also named `ret`: rename \
                         the parameter to tag entries by their result",
                    ));
                }
                (value(&quote!(#expr), expr.span(), krate), by_result)
            }
        };
        if by_result {
            results.push(rendered);
            results_text.push(match t {
                TagSpec::Template(lit) => lit.value(),
                TagSpec::Expr(expr) => quote!(#expr).to_string(),
            });
        } else {
            args.push(rendered);
        }
    }
    let imports = quote! {
        #[allow(unused_imports)]
        use #krate::__private::{TagDisplay as _, TagOption as _};
    };
    let before = quote! {
        #(#pre)*
        let __cq_tags: ::std::vec::Vec<::std::string::String> = {
            #imports
            let mut __cq_tags = ::std::vec::Vec::new();
            #(__cq_tags.extend(#args);)*
            __cq_tags
        };
    };
    let ret = format_ident!("ret");
    // One line per tag (a template with a line break in it is not a real concern).
    let spec = results_text.join("\n");
    let by_result = (!results.is_empty()).then(|| {
        quote! {
            |__cq_value| {
                #imports
                #[allow(unused_imports)]
                use #krate::__private::{EachOfOne as _, EachOfOption as _, EachOfVec as _};
                let mut __cq_tags = ::std::vec::Vec::new();
                for #ret in (&&#krate::__private::Each(__cq_value)).each() {
                    #(__cq_tags.extend(#results);)*
                }
                __cq_tags
            }
        }
    });
    let by_result = by_result.map(|render| (render, spec));
    Ok(Rendered { before, by_result })
}

/// Whether an expression uses the variable `ret`: the identifier, not as a field (`q.ret`)
/// or a path segment after `::` (`m::ret`); after a single `:` (`Key { id: ret.id }`) it is
/// the variable.
fn names_ret(tokens: TokenStream) -> bool {
    use proc_macro2::{Spacing, TokenTree};
    let (mut prev, mut before): (Option<TokenTree>, Option<TokenTree>) = (None, None);
    tokens.into_iter().any(|t| {
        let qualified = match (&before, &prev) {
            (_, Some(TokenTree::Punct(p))) if p.as_char() == '.' => true,
            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) => {
                a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
            }
            _ => false,
        };
        let hit = match &t {
            TokenTree::Ident(i) => i == "ret" && !qualified,
            TokenTree::Group(g) => names_ret(g.stream()),
            _ => false,
        };
        before = prev.take();
        prev = Some(t);
        hit
    })
}

/// `Option<String>` of a value: its `Display`, or `None` for an `Option` that is `None`.
fn value(expr: &TokenStream, span: Span, krate: &Krate) -> TokenStream {
    let krate = krate.at(span);
    quote_spanned!(span=> (&&#krate::__private::TagArg(&(#expr))).tag_part())
}

/// Compiles one template into an `Option<String>` expression, checking every placeholder
/// against `scope`, and whether it names `ret` (then its other values are rendered before
/// the query, into statements pushed on `pre`). Errors point at the placeholder where the
/// compiler can, else the literal.
fn compile(
    lit: &LitStr,
    scope: &Scope<'_>,
    pre: &mut Vec<TokenStream>,
) -> syn::Result<(TokenStream, bool)> {
    let by_result = scope.ret && names_ret_placeholder(&lit.value());
    if by_result && scope.names.iter().any(|n| n == "ret") {
        return Err(syn::Error::new(
            lit.span(),
            "`<ret>` names the result, but a parameter is also named `ret`: rename the \
             parameter to tag entries by their result",
        ));
    }
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
        let is_ret = by_result && root == "ret";
        let known =
            is_ret || scope.names.iter().any(|p| p == root) || (root == "self" && scope.has_self);
        if !known {
            let list = if scope.names.is_empty() {
                "it binds no names".to_owned()
            } else {
                format!("names in scope: {}", scope.names.join(", "))
            };
            let ret = if scope.ret {
                "; `<ret>` and `<ret.field>` name the result"
            } else if root == "ret" {
                "; tags from the result (`<ret…>`) are for #[cached_query]"
            } else {
                ""
            };
            return Err(err(
                span,
                format!(
                    "placeholder `<{path}>` does not name a parameter of this function, nor a \
                     name a parameter pattern binds ({list}){ret}"
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
        let mut value = value(&quote!(#root_tokens #(#fields)*), span, scope.krate);
        if by_result && !is_ret {
            // Rendered before the query: the body may consume the parameter.
            let early = format_ident!("__cq_r{}", pre.len());
            let krate = scope.krate;
            pre.push(
                quote!(let #early: ::core::option::Option<::std::string::String> = {
                #[allow(unused_imports)]
                use #krate::__private::{TagDisplay as _, TagOption as _};
                #value
            };),
            );
            value = quote!(::core::clone::Clone::clone(&#early));
        }
        let var = format_ident!("__cq_v{}", lets.len());
        lets.push(quote! {
            let #var = match #value {
                ::core::option::Option::Some(v) => v,
                // Not `break 'label ::core…`: syn (which an attribute below `#[invalidates]`
                // parses the function with) reads `'label ::` as a label.
                ::core::option::Option::None => break #label <::core::option::Option<_>>::None,
            };
        });
        fmt.push_str("{}");
        vars.push(var);
        rest = &after[close + 1..];
    }
    push_literal(&mut fmt, rest);
    let rendered = quote! {
        #label: {
            #(#lets)*
            ::core::option::Option::Some(::std::format!(#fmt #(, #vars)*))
        }
    };
    Ok((rendered, by_result))
}

/// Whether a template has a placeholder rooted at `ret` (`<ret>`, `<ret.id>`).
fn names_ret_placeholder(text: &str) -> bool {
    text.split('<')
        .skip(1)
        .any(|p| p.split(['>', '.']).next() == Some("ret"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ret_is_the_variable_not_a_field_or_path_segment() {
        assert!(names_ret(quote!(profile(ret.author_id))));
        assert!(names_ret(quote!(f(a, (ret)))));
        assert!(!names_ret(quote!(user(q.ret))));
        assert!(!names_ret(quote!(m::ret::f(id))));
        assert!(names_ret(quote!(tag(Key { id: ret.id }))));
        assert!(!names_ret(quote!(user(id))));
        assert!(names_ret_placeholder("a:<ret.id>") && names_ret_placeholder("<ret>"));
        assert!(!names_ret_placeholder("a:<retry>") && !names_ret_placeholder("ret:<id>"));
    }
}
