//! Tag templates: `"user:<id>"`, `"org:<user.org_id>"`. Each placeholder names a parameter
//! (or `self`), optionally followed by fields; it is replaced by the value's `Display`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::LitStr;

/// Compiles `lit` into a `::std::format!(…)` expression, checking every placeholder
/// against `params` (and `self` when `has_self`). Errors point at the string literal.
pub(crate) fn compile(lit: &LitStr, params: &[String], has_self: bool) -> syn::Result<TokenStream> {
    let text = lit.value();
    let err = |msg: String| syn::Error::new(lit.span(), msg);
    let mut fmt = String::new();
    let mut values = Vec::new();
    let mut rest = text.as_str();
    while let Some(open) = rest.find('<') {
        push_literal(&mut fmt, &rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('>')
            .ok_or_else(|| err(format!("unclosed `<` in tag template {text:?}")))?;
        let path = &after[..close];
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let fields: Vec<&str> = parts.collect();
        let valid_ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                && s.chars().all(|c| c.is_alphanumeric() || c == '_')
        };
        if !valid_ident(root)
            || !fields
                .iter()
                .all(|f| valid_ident(f) || f.parse::<u32>().is_ok())
        {
            return Err(err(format!(
                "invalid placeholder `<{path}>`: expected `<param>` or `<param.field>`"
            )));
        }
        let known = params.iter().any(|p| p == root) || (root == "self" && has_self);
        if !known {
            let list = if params.is_empty() {
                "it has no parameters".to_owned()
            } else {
                format!("parameters are: {}", params.join(", "))
            };
            return Err(err(format!(
                "placeholder `<{path}>` does not name a parameter of this function ({list})"
            )));
        }
        let root_tokens = if root == "self" {
            quote!(self)
        } else {
            let ident = format_ident!("{}", root);
            quote!(#ident)
        };
        let fields = fields.iter().map(|f| match f.parse::<u32>() {
            Ok(i) => {
                let idx = syn::Index::from(i as usize);
                quote!(.#idx)
            }
            Err(_) => {
                let ident = format_ident!("{}", f);
                quote!(.#ident)
            }
        });
        values.push(quote!(&#root_tokens #(#fields)*));
        fmt.push_str("{}");
        rest = &after[close + 1..];
    }
    push_literal(&mut fmt, rest);
    Ok(quote!(::std::format!(#fmt #(, #values)*)))
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
