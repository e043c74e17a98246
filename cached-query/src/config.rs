//! Reading cache settings from the environment (or any lookup function), and URL helpers
//! that keep passwords out of messages.

use crate::{CacheBuilder, Error};
use std::time::Duration;

/// Parses a boolean the way people write them in environment files.
pub(crate) fn parse_bool(name: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(
            name,
            value,
            "true or false (also 1/0, yes/no, on/off)",
        )),
    }
}

/// Parses a whole number that must be at least `min`.
pub(crate) fn parse_u64(name: &str, value: &str, min: u64) -> Result<u64, Error> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| Error::config(name, value, &format!("a whole number ≥ {min}")))
}

/// Applies `REDIS_URL`, `REDIS_PASSWORD`, `REDIS_CONNECT_TIMEOUT_MS`,
/// `REDIS_RESPONSE_TIMEOUT_MS`, `CACHE_NAMESPACE`, `CACHE_DEFAULT_TTL` and `CACHE_ENABLED`.
pub(crate) fn builder_from_lookup<F>(lookup: F) -> Result<CacheBuilder, Error>
where
    F: Fn(&str) -> Option<String>,
{
    let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let mut builder = CacheBuilder::default();
    if let Some(v) = get("CACHE_ENABLED")
        && !parse_bool("CACHE_ENABLED", &v)?
    {
        builder = builder.disabled();
    }
    if let Some(ns) = get("CACHE_NAMESPACE") {
        builder = builder.namespace(ns.trim());
    }
    if let Some(v) = get("CACHE_DEFAULT_TTL") {
        builder = builder.default_ttl(Duration::from_secs(parse_u64("CACHE_DEFAULT_TTL", &v, 1)?));
    }
    if let Some(v) = get("REDIS_CONNECT_TIMEOUT_MS") {
        builder.connect_timeout =
            Duration::from_millis(parse_u64("REDIS_CONNECT_TIMEOUT_MS", &v, 1)?);
    }
    if let Some(v) = get("REDIS_RESPONSE_TIMEOUT_MS") {
        builder.response_timeout =
            Duration::from_millis(parse_u64("REDIS_RESPONSE_TIMEOUT_MS", &v, 1)?);
    }
    match get("REDIS_URL") {
        Some(url) => {
            let url = match get("REDIS_PASSWORD") {
                Some(password) => inject_password(url.trim(), &password),
                None => url.trim().to_owned(),
            };
            if builder.enabled() {
                builder = builder.redis(&url);
            }
        }
        None => {
            if builder.enabled() {
                tracing::info!(
                    "REDIS_URL is not set: cached-query uses its in-process memory backend"
                );
            }
        }
    }
    Ok(builder)
}

/// Splits `scheme://userinfo@rest` into its three parts (userinfo may be absent).
fn split_authority(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => Some((scheme, Some(&rest[..at]), &rest[at + 1..])),
        None => Some((scheme, None, rest)),
    }
}

/// The URL with its password (if any) replaced by `***`, safe for logs and errors.
pub fn redact_url(url: &str) -> String {
    match split_authority(url) {
        Some((scheme, Some(userinfo), rest)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{rest}"),
            None => url.to_owned(),
        },
        Some(_) => url.to_owned(),
        // Not a URL we understand: it might be a bare secret, show nothing of it.
        None => "<unparseable URL>".to_owned(),
    }
}

/// Puts `password` into `url` unless the URL already carries one.
pub(crate) fn inject_password(url: &str, password: &str) -> String {
    let encoded = percent_encode(password);
    match split_authority(url) {
        Some((scheme, None, rest)) => format!("{scheme}://:{encoded}@{rest}"),
        Some((scheme, Some(userinfo), rest)) if !userinfo.contains(':') => {
            format!("{scheme}://{userinfo}:{encoded}@{rest}")
        }
        _ => url.to_owned(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://u:s3cret@h"), "redis://u:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("s3cret"), "<unparseable URL>");
    }

    #[test]
    fn injects_password_only_when_absent() {
        assert_eq!(
            inject_password("redis://h:1/0", "p@ss"),
            "redis://:p%40ss@h:1/0"
        );
        assert_eq!(inject_password("redis://u@h", "p"), "redis://u:p@h");
        assert_eq!(inject_password("redis://u:q@h", "p"), "redis://u:q@h");
    }

    #[test]
    fn bad_numbers_name_the_variable_and_value() {
        let e = parse_u64("CACHE_DEFAULT_TTL", "abc", 1)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "CACHE_DEFAULT_TTL=\"abc\": expected a whole number ≥ 1");
        assert!(parse_u64("X", "0", 1).is_err());
        assert!(parse_u64("X", "-5", 1).is_err());
        assert!(parse_bool("CACHE_ENABLED", "maybe").is_err());
        assert!(!parse_bool("CACHE_ENABLED", "FALSE").unwrap());
    }
}
