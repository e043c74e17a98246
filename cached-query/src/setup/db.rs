//! Database pools configured from the environment: the knobs every hand-tuned pool has
//! (size, overflow, timeouts, recycling, pre-ping, echo), mapped onto sqlx.

use super::env::{non_empty, parse_bool, parse_millis, parse_secs, parse_u64};
use super::url::redact_url;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
use super::url::scrub_password;
use crate::Error;
use std::time::Duration;

/// Pool settings, usually read with [`DbConfig::from_env`].
///
/// How they map onto sqlx: `min_connections = pool_size`, `max_connections = pool_size +
/// max_overflow`, `acquire_timeout = pool_timeout`, `max_lifetime = pool_recycle`,
/// `idle_timeout`, `test_before_acquire = pre_ping`, statements logged at `info` when `echo`,
/// statements slower than `slow_statement_threshold` logged at `warn`; on PostgreSQL
/// `application_name` and `statement_timeout` are set on every connection, on MySQL and
/// MariaDB the statement timeout (see [`connect_mysql`](Self::connect_mysql)). The whole
/// connect is bounded by `connect_timeout`.
///
/// Build one with [`from_env`](Self::from_env) or [`new`](Self::new) (the defaults below),
/// then adjust its fields.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DbConfig {
    /// `DATABASE_URL`: `postgres://`, `postgresql://`, `mysql://`, `mariadb://` or `sqlite:`.
    pub url: String,
    /// `DB_POOL_SIZE` (10): connections kept open.
    pub pool_size: u32,
    /// `DB_MAX_OVERFLOW` (20): extra connections opened under load.
    pub max_overflow: u32,
    /// `DB_POOL_TIMEOUT` (30 s): how long `acquire` waits for a free connection.
    pub pool_timeout: Duration,
    /// `DB_POOL_RECYCLE` (3600 s): connections older than this are replaced.
    pub pool_recycle: Duration,
    /// `DB_IDLE_TIMEOUT` (600 s): idle connections above `pool_size` are closed after this.
    pub idle_timeout: Duration,
    /// `DB_PRE_PING` (true): check a connection before handing it out.
    pub pre_ping: bool,
    /// `DB_ECHO` (false): log every statement at `info`.
    pub echo: bool,
    /// `SLOW_QUERY_THRESHOLD_MS` (100): statements slower than this are logged at `warn`.
    pub slow_statement_threshold: Duration,
    /// `DB_CONNECT_TIMEOUT` (10 s): bound on `connect_*`.
    pub connect_timeout: Duration,
    /// `DB_APPLICATION_NAME`: shown in `pg_stat_activity` (PostgreSQL).
    pub application_name: Option<String>,
    /// `DB_STATEMENT_TIMEOUT_MS`: server-side statement timeout (PostgreSQL
    /// `statement_timeout`, MariaDB `max_statement_time`, MySQL `max_execution_time`).
    pub statement_timeout: Option<Duration>,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("max_overflow", &self.max_overflow)
            .field("pool_timeout", &self.pool_timeout)
            .field("pool_recycle", &self.pool_recycle)
            .field("idle_timeout", &self.idle_timeout)
            .field("pre_ping", &self.pre_ping)
            .field("echo", &self.echo)
            .field("slow_statement_threshold", &self.slow_statement_threshold)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// A pool's occupancy, for health endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Open connections (idle + in use).
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Connections handed out.
    pub in_use: u32,
    /// The pool's maximum (`pool_size + max_overflow`).
    pub max: u32,
}

/// The current occupancy of any sqlx pool.
pub fn pool_status<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> PoolStatus {
    let size = pool.size();
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
    PoolStatus {
        size,
        idle,
        in_use: size - idle,
        max: pool.options().get_max_connections(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Postgres,
    Sqlite,
    MySql,
}

fn scheme(url: &str) -> Option<Scheme> {
    let lower = url.get(..11).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql:") {
        Some(Scheme::Postgres)
    } else if lower.starts_with("sqlite:") {
        Some(Scheme::Sqlite)
    } else if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        Some(Scheme::MySql)
    } else {
        None
    }
}

/// What `DATABASE_URL` may be.
const URL_KINDS: &str = "a postgres://, postgresql://, mysql://, mariadb:// or sqlite: URL";

impl DbConfig {
    /// The settings for `url` with every default of the configuration table: 10 + 20
    /// connections, 30 s pool timeout, 3600 s recycle, 600 s idle timeout, pre-ping on, echo
    /// off, slow statements above 100 ms, 10 s connect timeout.
    pub fn new(url: impl Into<String>) -> DbConfig {
        DbConfig {
            url: url.into(),
            pool_size: 10,
            max_overflow: 20,
            pool_timeout: Duration::from_secs(30),
            pool_recycle: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(600),
            pre_ping: true,
            echo: false,
            slow_statement_threshold: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
            application_name: None,
            statement_timeout: None,
        }
    }

    /// Reads the process environment; see the README's configuration table.
    pub fn from_env() -> Result<DbConfig, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The same rules as [`from_env`](Self::from_env), reading variables from `lookup`.
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(lookup: F) -> Result<DbConfig, Error> {
        let get = |name: &str| non_empty(&lookup, name);
        let url = get("DATABASE_URL").ok_or_else(|| {
            Error::config("DATABASE_URL", "", &format!("{URL_KINDS} (it is not set)"))
        })?;
        let url = url.trim().to_owned();
        if scheme(&url).is_none() {
            return Err(Error::config("DATABASE_URL", &redact_url(&url), URL_KINDS));
        }
        let mut config = DbConfig::new(url);
        let u32_var = |name: &str, v: &str, min: u64| -> Result<u32, Error> {
            let n = parse_u64(name, v, min)?;
            u32::try_from(n).map_err(|_| {
                Error::config(
                    name,
                    v,
                    &format!("a whole number from {min} to {}", u32::MAX),
                )
            })
        };
        if let Some(v) = get("DB_POOL_SIZE") {
            config.pool_size = u32_var("DB_POOL_SIZE", &v, 1)?;
        }
        if let Some(v) = get("DB_MAX_OVERFLOW") {
            config.max_overflow = u32_var("DB_MAX_OVERFLOW", &v, 0)?;
        }
        if let Some(v) = get("DB_POOL_TIMEOUT") {
            config.pool_timeout = parse_secs("DB_POOL_TIMEOUT", &v)?;
        }
        if let Some(v) = get("DB_POOL_RECYCLE") {
            config.pool_recycle = parse_secs("DB_POOL_RECYCLE", &v)?;
        }
        if let Some(v) = get("DB_IDLE_TIMEOUT") {
            config.idle_timeout = parse_secs("DB_IDLE_TIMEOUT", &v)?;
        }
        if let Some(v) = get("DB_CONNECT_TIMEOUT") {
            config.connect_timeout = parse_secs("DB_CONNECT_TIMEOUT", &v)?;
        }
        if let Some(v) = get("DB_PRE_PING") {
            config.pre_ping = parse_bool("DB_PRE_PING", &v)?;
        }
        if let Some(v) = get("DB_ECHO") {
            config.echo = parse_bool("DB_ECHO", &v)?;
        }
        if let Some(v) = get("SLOW_QUERY_THRESHOLD_MS") {
            config.slow_statement_threshold =
                Duration::from_millis(parse_u64("SLOW_QUERY_THRESHOLD_MS", &v, 0)?);
        }
        if let Some(v) = get("DB_STATEMENT_TIMEOUT_MS") {
            config.statement_timeout = Some(parse_millis("DB_STATEMENT_TIMEOUT_MS", &v)?);
        }
        config.application_name = get("DB_APPLICATION_NAME").map(|v| v.trim().to_owned());
        u32::checked_add(config.pool_size, config.max_overflow).ok_or_else(|| {
            Error::config(
                "DB_MAX_OVERFLOW",
                &config.max_overflow.to_string(),
                "DB_POOL_SIZE + DB_MAX_OVERFLOW to fit in a u32",
            )
        })?;
        Ok(config)
    }

    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    fn check_scheme(&self, wanted: Scheme) -> Result<(), Error> {
        if scheme(&self.url) == Some(wanted) {
            return Ok(());
        }
        let expected = match wanted {
            Scheme::Postgres => "a postgres:// or postgresql:// URL for connect_postgres",
            Scheme::Sqlite => "a sqlite: URL for connect_sqlite",
            Scheme::MySql => "a mysql:// or mariadb:// URL for connect_mysql",
        };
        Err(Error::config(
            "DATABASE_URL",
            &redact_url(&self.url),
            expected,
        ))
    }

    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    fn pool_options<DB: sqlx::Database>(&self) -> sqlx::pool::PoolOptions<DB> {
        sqlx::pool::PoolOptions::new()
            .min_connections(self.pool_size)
            .max_connections(self.pool_size + self.max_overflow)
            .acquire_timeout(self.pool_timeout)
            .max_lifetime(self.pool_recycle)
            .idle_timeout(self.idle_timeout)
            .test_before_acquire(self.pre_ping)
    }

    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    fn logging<O: sqlx::ConnectOptions>(&self, options: O) -> O {
        let echo = if self.echo {
            log::LevelFilter::Info
        } else {
            log::LevelFilter::Off
        };
        options
            .log_statements(echo)
            .log_slow_statements(log::LevelFilter::Warn, self.slow_statement_threshold)
    }

    /// Opens a PostgreSQL pool, failing within `connect_timeout` with an error that names
    /// the host and port.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn connect_postgres(&self) -> Result<sqlx::PgPool, Error> {
        use std::str::FromStr;
        self.check_scheme(Scheme::Postgres)?;
        let mut options =
            sqlx::postgres::PgConnectOptions::from_str(&self.url).map_err(|e| Error::Connect {
                target: redact_url(&self.url),
                source: Scrubbed::boxed(e, &self.url),
            })?;
        if let Some(name) = &self.application_name {
            options = options.application_name(name);
        }
        if let Some(timeout) = self.statement_timeout {
            options =
                options.options([("statement_timeout", format!("{}ms", timeout.as_millis()))]);
        }
        let target = format!("{}:{}", options.get_host(), options.get_port());
        let options = self.logging(options);
        self.bounded_connect(target, self.pool_options().connect_with(options))
            .await
    }

    /// Opens a SQLite pool: WAL journal, `busy_timeout = pool_timeout`, the file created if
    /// missing, foreign keys enforced.
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub async fn connect_sqlite(&self) -> Result<sqlx::SqlitePool, Error> {
        use std::str::FromStr;
        self.check_scheme(Scheme::Sqlite)?;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)
            .map_err(|e| Error::Connect {
                target: self.url.clone(),
                source: Scrubbed::boxed(e, &self.url),
            })?
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(self.pool_timeout)
            .create_if_missing(true)
            .foreign_keys(true);
        let target = self.url.clone();
        let options = self.logging(options);
        self.bounded_connect(target, self.pool_options().connect_with(options))
            .await
    }

    /// Opens a MySQL or MariaDB pool (`mysql://` or `mariadb://`), failing within
    /// `connect_timeout` with an error that names the host and port.
    ///
    /// `statement_timeout` becomes MariaDB's `max_statement_time` (every statement) or, on
    /// MySQL, `max_execution_time` (read-only `SELECT`s only: MySQL has no other), set on
    /// every new connection; the server is told apart by the variable it knows.
    /// `application_name` is not sent: sqlx's MySQL driver has no connection attributes. A
    /// `?socket=` URL's errors name the socket instead of a host and port.
    #[cfg(feature = "mysql")]
    #[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
    pub async fn connect_mysql(&self) -> Result<sqlx::MySqlPool, Error> {
        use std::str::FromStr;
        self.check_scheme(Scheme::MySql)?;
        let options =
            sqlx::mysql::MySqlConnectOptions::from_str(&self.url).map_err(|e| Error::Connect {
                target: redact_url(&self.url),
                source: Scrubbed::boxed(e, &self.url),
            })?;
        let target = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        let options = self.logging(options);
        let mut pool = self.pool_options::<sqlx::MySql>();
        // Zero means none, as on the servers.
        if let Some(timeout) = self.statement_timeout.filter(|t| !t.is_zero()) {
            pool = pool.after_connect(move |conn, _| {
                Box::pin(async move { mysql_statement_timeout(conn, timeout).await })
            });
        }
        self.bounded_connect(target, pool.connect_with(options))
            .await
    }

    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    async fn bounded_connect<P>(
        &self,
        target: String,
        connect: impl Future<Output = Result<P, sqlx::Error>>,
    ) -> Result<P, Error> {
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(pool)) => Ok(pool),
            Ok(Err(e)) => Err(Error::Connect {
                target,
                source: Scrubbed::boxed(e, &self.url),
            }),
            Err(_) => Err(Error::Connect {
                target,
                source: format!(
                    "no connection within DB_CONNECT_TIMEOUT ({:?})",
                    self.connect_timeout
                )
                .into(),
            }),
        }
    }
}

/// Sets the statement timeout on a new MySQL or MariaDB connection: MariaDB's
/// `max_statement_time` (seconds), else MySQL's `max_execution_time` (milliseconds), which
/// MariaDB rejects as an unknown variable (error 1193) and MySQL the other way round.
#[cfg(feature = "mysql")]
async fn mysql_statement_timeout(
    conn: &mut sqlx::MySqlConnection,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    use sqlx::{AssertSqlSafe, Executor};
    let mariadb = format!("SET SESSION max_statement_time = {}", timeout.as_secs_f64());
    match conn.execute(AssertSqlSafe(mariadb)).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|e| e.number() == 1193) =>
        {
            let millis = timeout.as_millis().clamp(1, u128::from(u32::MAX));
            let mysql = format!("SET SESSION max_execution_time = {millis}");
            conn.execute(AssertSqlSafe(mysql)).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

/// A database error whose message is shown with the URL's passwords removed (in `Display`
/// and `Debug`); its I/O cause (connection refused, reset…) stays reachable as `source()`,
/// other causes (which may quote the URL) do not.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
struct Scrubbed {
    message: String,
    error: sqlx::Error,
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
impl Scrubbed {
    fn boxed(error: sqlx::Error, url: &str) -> crate::error::BoxError {
        Box::new(Scrubbed {
            message: scrub_password(&error.to_string(), url),
            error,
        })
    }
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
impl std::fmt::Display for Scrubbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
impl std::fmt::Debug for Scrubbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Scrubbed").field(&self.message).finish()
    }
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
impl std::error::Error for Scrubbed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.error {
            sqlx::Error::Io(e) => Some(e),
            _ => None,
        }
    }
}
