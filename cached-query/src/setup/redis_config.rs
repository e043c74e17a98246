//! `RedisConfig`: where Redis is and how long to wait for it, read from the environment and
//! shared by the cache and the session store.

use super::env::{non_empty, parse_millis};
use super::url::{inject_password, redact_url, redact_urls};
use crate::Error;
use std::time::Duration;

/// Redis connection settings, usually read with [`RedisConfig::from_env`] and passed to
/// [`CacheBuilder::redis_config`](crate::CacheBuilder::redis_config) and
/// `RedisSessionStore::new`. `url: None` and no `cluster_urls` means "no Redis": the
/// in-memory backend. Build one with [`from_env`](Self::from_env), [`new`](Self::new),
/// [`cluster`](Self::cluster) or `default()`, then adjust its fields.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `REDIS_URL`, with `REDIS_PASSWORD` put in when the URL has no password.
    pub url: Option<String>,
    /// `REDIS_CLUSTER_URLS` (comma-separated node URLs, same password rule); when set, a
    /// Redis Cluster is used and `url` is ignored.
    pub cluster_urls: Vec<String>,
    /// `REDIS_SENTINEL_URLS` (comma-separated Sentinel URLs, same password rule) with
    /// `REDIS_SENTINEL_MASTER` (the master's name): when set (and no cluster is), the cache
    /// uses the master the Sentinels name, and `url` is ignored.
    pub sentinel_urls: Vec<String>,
    /// `REDIS_SENTINEL_MASTER`: see `sentinel_urls`.
    pub sentinel_master: Option<String>,
    /// `REDIS_CONNECT_TIMEOUT_MS` (1000).
    pub connect_timeout: Duration,
    /// `REDIS_RESPONSE_TIMEOUT_MS` (250): the deadline of every Redis operation.
    pub response_timeout: Duration,
    /// `REDIS_CA_CERT` (the path of a PEM file, read at start-up): the CA trusted for
    /// `rediss://` instead of the system's roots. Needs the `tls` feature to be used.
    pub root_certificate: Option<Vec<u8>>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster_urls: Vec::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
            root_certificate: None,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("cluster_urls", &redact_urls(&self.cluster_urls))
            .field("sentinel_urls", &redact_urls(&self.sentinel_urls))
            .field("sentinel_master", &self.sentinel_master)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("root_certificate", &self.root_certificate.is_some())
            .finish()
    }
}

impl RedisConfig {
    /// A single Redis node at `url`, with the default timeouts.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: Some(url.into()),
            ..RedisConfig::default()
        }
    }

    /// A Redis Cluster, given one or more of its nodes' URLs, with the default timeouts.
    pub fn cluster<I, S>(urls: I) -> RedisConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisConfig {
            cluster_urls: urls.into_iter().map(Into::into).collect(),
            ..RedisConfig::default()
        }
    }

    /// Reads `REDIS_URL`, `REDIS_CLUSTER_URLS`, `REDIS_SENTINEL_URLS`, `REDIS_SENTINEL_MASTER`,
    /// `REDIS_PASSWORD`, `REDIS_CONNECT_TIMEOUT_MS`, `REDIS_RESPONSE_TIMEOUT_MS` and
    /// `REDIS_CA_CERT` from the process environment.
    pub fn from_env() -> Result<RedisConfig, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The same rules as [`from_env`](Self::from_env), reading variables from `lookup`.
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(lookup: F) -> Result<RedisConfig, Error> {
        let get = |name: &str| non_empty(&lookup, name);
        let mut config = RedisConfig::default();
        if let Some(v) = get("REDIS_CONNECT_TIMEOUT_MS") {
            config.connect_timeout = parse_millis("REDIS_CONNECT_TIMEOUT_MS", &v)?;
        }
        if let Some(v) = get("REDIS_RESPONSE_TIMEOUT_MS") {
            config.response_timeout = parse_millis("REDIS_RESPONSE_TIMEOUT_MS", &v)?;
        }
        if let Some(path) = get("REDIS_CA_CERT") {
            let path = path.trim();
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(
                    "REDIS_CA_CERT",
                    path,
                    &format!("the path of a readable PEM file ({e})"),
                )
            })?;
            config.root_certificate = Some(pem);
        }
        let password = get("REDIS_PASSWORD");
        let with_password = |url: &str| match &password {
            Some(password) => inject_password(url.trim(), password),
            None => url.trim().to_owned(),
        };
        config.url = get("REDIS_URL").map(|url| with_password(&url));
        let list = |name: &str| -> Vec<String> {
            get(name)
                .map(|urls| {
                    urls.split(',')
                        .filter(|u| !u.trim().is_empty())
                        .map(with_password)
                        .collect()
                })
                .unwrap_or_default()
        };
        config.cluster_urls = list("REDIS_CLUSTER_URLS");
        config.sentinel_urls = list("REDIS_SENTINEL_URLS");
        config.sentinel_master = get("REDIS_SENTINEL_MASTER").map(|m| m.trim().to_owned());
        match (config.sentinel_urls.is_empty(), &config.sentinel_master) {
            (false, None) => {
                return Err(Error::config(
                    "REDIS_SENTINEL_MASTER",
                    "",
                    "the master's name (REDIS_SENTINEL_URLS is set)",
                ));
            }
            (true, Some(master)) => {
                return Err(Error::config(
                    "REDIS_SENTINEL_URLS",
                    "",
                    &format!("Sentinel URLs (REDIS_SENTINEL_MASTER is set to {master:?})"),
                ));
            }
            _ => {}
        }
        Ok(config)
    }
}
