//! Set-up: settings read from the environment (with errors that name the variable), URLs
//! that never show their password, database pools, and the Redis session store.

pub(crate) mod db;
pub(crate) mod env;
#[cfg(feature = "metrics")]
pub(crate) mod monitor;
pub(crate) mod redis_config;
#[cfg(feature = "sessions")]
pub(crate) mod sessions;
pub(crate) mod url;
