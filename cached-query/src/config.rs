//! Reading cache settings from the environment (or any lookup function), and URL helpers
//! that keep passwords out of messages.

use crate::{CacheBuilder, Error};
use std::time::Duration;

/// `lookup(name)`, with empty or blank values treated as unset.
pub(crate) fn non_empty(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name).filter(|v| !v.trim().is_empty())
}

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

/// Redis connection settings, usually read with [`RedisConfig::from_env`] and passed to
/// [`CacheBuilder::redis_config`]. `url: None` means "no Redis": the in-memory backend.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `REDIS_URL`, with `REDIS_PASSWORD` put in when the URL has no password.
    pub url: Option<String>,
    /// `REDIS_CLUSTER_URLS` (comma-separated node URLs, same password rule); when set, a
    /// Redis Cluster is used and `url` is ignored.
    pub cluster_urls: Vec<String>,
    /// `REDIS_CONNECT_TIMEOUT_MS` (1000).
    pub connect_timeout: Duration,
    /// `REDIS_RESPONSE_TIMEOUT_MS` (250): the deadline of every Redis operation.
    pub response_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster_urls: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "cluster_urls",
                &self
                    .cluster_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Reads `REDIS_URL`, `REDIS_CLUSTER_URLS`, `REDIS_PASSWORD`, `REDIS_CONNECT_TIMEOUT_MS` and
    /// `REDIS_RESPONSE_TIMEOUT_MS` from the process environment.
    pub fn from_env() -> Result<RedisConfig, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The same rules as [`from_env`](Self::from_env), reading variables from `lookup`.
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(lookup: F) -> Result<RedisConfig, Error> {
        let get = |name: &str| non_empty(&lookup, name);
        let mut config = RedisConfig::default();
        if let Some(v) = get("REDIS_CONNECT_TIMEOUT_MS") {
            config.connect_timeout =
                Duration::from_millis(parse_u64("REDIS_CONNECT_TIMEOUT_MS", &v, 1)?);
        }
        if let Some(v) = get("REDIS_RESPONSE_TIMEOUT_MS") {
            config.response_timeout =
                Duration::from_millis(parse_u64("REDIS_RESPONSE_TIMEOUT_MS", &v, 1)?);
        }
        let password = get("REDIS_PASSWORD");
        let with_password = |url: &str| match &password {
            Some(password) => inject_password(url.trim(), password),
            None => url.trim().to_owned(),
        };
        config.url = get("REDIS_URL").map(|url| with_password(&url));
        config.cluster_urls = get("REDIS_CLUSTER_URLS")
            .map(|urls| {
                urls.split(',')
                    .filter(|u| !u.trim().is_empty())
                    .map(with_password)
                    .collect()
            })
            .unwrap_or_default();
        Ok(config)
    }
}

/// Applies [`RedisConfig`] plus `CACHE_NAMESPACE`, `CACHE_DEFAULT_TTL` and `CACHE_ENABLED`.
pub(crate) fn builder_from_lookup<F>(lookup: F) -> Result<CacheBuilder, Error>
where
    F: Fn(&str) -> Option<String>,
{
    let redis = RedisConfig::from_lookup(&lookup)?;
    let get = |name: &str| non_empty(&lookup, name);
    let mut builder = CacheBuilder::default();
    if let Some(ns) = get("CACHE_NAMESPACE") {
        builder = builder.namespace(ns.trim());
    }
    if let Some(v) = get("CACHE_DEFAULT_TTL") {
        builder = builder.default_ttl(Duration::from_secs(parse_u64("CACHE_DEFAULT_TTL", &v, 1)?));
    }
    let enabled = match get("CACHE_ENABLED") {
        Some(v) => parse_bool("CACHE_ENABLED", &v)?,
        None => true,
    };
    if !enabled {
        return Ok(builder.disabled());
    }
    if redis.url.is_none() && redis.cluster_urls.is_empty() {
        tracing::info!("REDIS_URL is not set: cached-query uses its in-process memory backend");
    }
    if let Some(v) = get("CACHE_NEAR_CAPACITY") {
        builder = builder.near_cache(parse_u64("CACHE_NEAR_CAPACITY", &v, 1)?);
    }
    Ok(builder.redis_config(redis))
}

/// Replaces the password of `url` (if any) wherever it appears in `message`.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn scrub_password(message: &str, url: &str) -> String {
    match split_authority(url).and_then(|(_, userinfo, _)| userinfo?.split_once(':')) {
        Some((_, password)) if !password.is_empty() => message.replace(password, "***"),
        _ => message.to_owned(),
    }
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
