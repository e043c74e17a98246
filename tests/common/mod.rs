//! Shared helpers for the integration tests: unique namespaces on the shared Redis, and
//! private `redis-server` processes for tests that stop, stall or inspect a server.
#![allow(dead_code)]

pub mod source;
pub mod users;

use cached_query::Cache;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The shared Redis (never flushed by tests: each test uses its own namespace).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// `connect` (a `DbConfig::connect_*`) against a server that accepts TCP connections but never
/// answers (a hung server: the kernel's backlog accepts), then against the same port closed:
/// both fail with `Error::Connect` naming `127.0.0.1:<port>`, the first citing
/// `DB_CONNECT_TIMEOUT`, neither showing the URL's password.
pub async fn hung_and_refused_servers_are_named<F, Fut, P>(scheme: &str, connect: F)
where
    F: Fn(cached_query::DbConfig) -> Fut,
    Fut: std::future::Future<Output = Result<P, cached_query::Error>>,
    P: std::fmt::Debug,
{
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("{scheme}://app:hunter2@127.0.0.1:{port}/app");
    let config = cached_query::DbConfig::from_lookup(lookup(&[
        ("DATABASE_URL", &url),
        ("DB_CONNECT_TIMEOUT", "1"),
    ]))
    .unwrap();
    let target = format!("127.0.0.1:{port}");
    let err = connect(config.clone()).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        matches!(&err, cached_query::Error::Connect { target: t, .. } if *t == target),
        "{shown}"
    );
    assert!(shown.contains("DB_CONNECT_TIMEOUT"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");

    // Refused outright: the same kind of error, at once.
    drop(silent);
    let err = connect(config).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(&target), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// Waits until PostgreSQL backend `pid` is running a statement (`pg_stat_activity`).
pub async fn wait_until_running(pool: &sqlx::PgPool, pid: i32) {
    loop {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_optional(pool)
                .await
                .unwrap();
        if state.as_deref() == Some("active") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// An environment lookup over fixed variables, for `from_lookup` constructors.
pub fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

/// A cache builder that gives up on a broken Redis quickly: 200 ms to connect, 100 ms per
/// operation, breaker open after 3 failures for 50 ms.
pub fn fail_fast(url: &str, ns: &str) -> cached_query::CacheBuilder {
    Cache::builder()
        .redis(url)
        .namespace(ns)
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(100))
        .circuit_breaker(3, Duration::from_millis(50))
}

/// Runs `calls` against `server` frozen with SIGSTOP, thaws it, and checks the reads that
/// reached it meanwhile (it runs them once thawed) against a breaker of 3 failures and
/// `cooldown`: at most the 3 that opened it (fewer when a failed call was waiting for a new
/// connection instead), then one probe per cooldown of the elapsed time. A breaker that
/// never opened sends one read per call, far above that bound.
pub async fn assert_breaker_limits_reads_while_frozen<F: std::future::Future>(
    server: &RedisServer,
    cooldown: Duration,
    calls: F,
) -> F::Output {
    let before = server.command_calls("mget");
    let stalled = std::time::Instant::now();
    server.freeze();
    let out = calls.await;
    server.thaw();
    let bound = 3 + (stalled.elapsed().as_micros() / cooldown.as_micros()) as u64 + 1;
    let reached = server.command_calls("mget") - before;
    assert!(
        (1..=bound).contains(&reached),
        "{reached} reads reached the frozen Redis, bound {bound}"
    );
    out
}

/// A namespace no other test (or run) uses.
pub fn unique_ns(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t{}{}{}:{test}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

pub async fn redis_cache(url: &str, ns: &str) -> Cache {
    Cache::builder()
        .redis(url)
        .namespace(ns)
        .build()
        .await
        .expect("cache builds")
}

pub async fn redis_cache_with(builder: cached_query::CacheBuilder) -> Cache {
    builder.build().await.expect("cache builds")
}

pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

/// All key names under `ns:` (SCAN: fine for test inspection, never used by the library).
pub async fn keys_under(url: &str, ns: &str) -> Vec<String> {
    let mut conn = raw(url).await;
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{ns}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test's own, on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// CA file for `redis-cli` when the server speaks TLS only.
    tls_ca: Option<PathBuf>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let args = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::start_on(free_port(), args, None)
    }

    /// A server that accepts only TLS connections on its port.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Self {
        let port = free_port();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        let args = [
            ("--port", "0".to_owned()),
            ("--tls-port", port.to_string()),
            ("--tls-cert-file", path(cert)),
            ("--tls-key-file", path(key)),
            ("--tls-ca-cert-file", path(ca)),
            ("--tls-auth-clients", "no".to_owned()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        Self::start_on(port, args, Some(ca.to_owned()))
    }

    /// A server that starts from a copy of the RDB file `dump` (a snapshot of another one).
    pub fn start_from_dump(dump: &std::path::Path) -> Self {
        let port = free_port();
        let dir = Self::dir_for(port);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(dump, dir.join("dump.rdb")).unwrap();
        Self::start_on(port, Vec::new(), None)
    }

    fn dir_for(port: u16) -> PathBuf {
        std::env::temp_dir().join(format!("cq-redis-{port}-{}", std::process::id()))
    }

    fn start_on(port: u16, args: Vec<String>, tls_ca: Option<PathBuf>) -> Self {
        let dir = Self::dir_for(port);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port,
            dir,
            args,
            child: None,
            tls_ca,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        for _ in 0..500 {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `host:port`, for proxies and `REPLICAOF`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's working directory (its RDB and AOF files).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        if let Some(pos) = self.args.iter().position(|a| a == "--requirepass") {
            cmd.args(["--no-auth-warning", "-a", &self.args[pos + 1]]);
        }
        let out = cmd.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `args` preceded by `ASKING` on the same connection: a command on a key of a slot
    /// this cluster node is importing. Returns the command's reply.
    pub fn cli_asking(&self, args: &[&str]) -> String {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-cli runs");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "ASKING\n{}", args.join(" ")).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("OK"), "ASKING: {out}");
        lines.collect::<Vec<_>>().join("\n")
    }

    /// This cluster node's id.
    pub fn node_id(&self) -> String {
        self.cli(&["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// How often `command` ran on this server (from `INFO commandstats`).
    pub fn command_calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{}:calls=", command.to_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    /// How often any of `commands` ran, from one `INFO commandstats` (which counts itself
    /// only in later readings).
    pub fn commands_calls(&self, commands: &[&str]) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        commands
            .iter()
            .map(|c| {
                let prefix = format!("cmdstat_{}:calls=", c.to_lowercase());
                info.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .map(|rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Makes this server a replica of `master` (`host:port`) and waits until it is in sync
    /// (async: the link may go through a [`TcpProxy`] on this runtime).
    pub async fn replicate(&self, master: &str) {
        let (host, port) = master.split_once(':').unwrap();
        assert_eq!(self.cli(&["REPLICAOF", host, port]).trim(), "OK");
        for _ in 0..1000 {
            if self
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("replica on port {} did not sync with {master}", self.port);
    }

    /// Waits until this replica has processed everything `master` had when called.
    pub async fn caught_up(&self, master: &RedisServer) {
        let offset = |s: &RedisServer, field: &str| -> u64 {
            s.cli(&["INFO", "replication"])
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        let target = offset(master, "master_repl_offset");
        for _ in 0..1000 {
            if offset(self, "slave_repl_offset") >= target {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("replica on port {} did not catch up", self.port);
    }

    /// Whether the process runs (not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: the server and all its data are gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory: empty without persistence,
    /// else from what its files hold (after [`kill`](Self::kill): a crash).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGSTOP: the server keeps its connections and data but answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: undo [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal_cont_quietly();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServer {
    fn signal_cont_quietly(&self) -> std::io::Result<()> {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .map(|_| ())
    }
}

/// Everything logged through `tracing` in this test binary, one line per event, prefixed
/// with the thread name. A single global subscriber (instead of per-thread defaults) keeps
/// callsite interest correct when tests run in parallel.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Installs the capturing subscriber once per binary and returns it.
    pub fn capture() -> Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_thread_names(true)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("one subscriber per test binary");
            logs
        })
        .clone()
    }

    /// Lines logged on the current thread (a current-thread test runtime runs there) that
    /// contain `marker`.
    pub fn mine(&self, marker: &str) -> Vec<String> {
        let thread = std::thread::current().name().unwrap_or_default().to_owned();
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(&thread) && l.contains(marker))
            .map(str::to_owned)
            .collect()
    }

    /// Every line, from every thread.
    pub fn all(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A 3-master Redis Cluster on loopback ports; every node is killed on drop.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_sized(3, 0)
    }

    /// Three masters, each with one replica (promoted when its master dies).
    pub fn start_with_replicas() -> Self {
        Self::start_sized(6, 1)
    }

    fn start_sized(nodes: usize, replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..nodes)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_ok();
        if replicas > 0 {
            cluster.wait_replicas_online(replicas);
        }
        cluster
    }

    /// Waits until every master has `replicas` replicas online.
    fn wait_replicas_online(&self, replicas: usize) {
        for _ in 0..1000 {
            let masters: Vec<String> = self
                .nodes
                .iter()
                .map(|n| n.cli(&["INFO", "replication"]))
                .filter(|info| info.contains("role:master"))
                .collect();
            let online = |info: &String| info.matches("state=online").count() >= replicas;
            if !masters.is_empty() && masters.iter().all(online) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("replicas did not come online");
    }

    /// Waits until every running node reports `cluster_state:ok` and knows all 16384 slots.
    pub fn wait_ok(&self) {
        for _ in 0..1000 {
            let ok = self.nodes.iter().filter(|n| n.running()).all(|n| {
                let info = n.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cluster did not become ready");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The replica of master `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let port = self.nodes[master].port.to_string();
        self.nodes
            .iter()
            .position(|n| {
                let role = n.cli(&["ROLE"]);
                let mut lines = role.lines();
                lines.next() == Some("slave") && lines.nth(1) == Some(port.as_str())
            })
            .expect("every master has a replica")
    }

    /// The master whose keys under `pattern` change when `change` runs (found by reading
    /// them on every master before and after).
    pub async fn master_changed_by<F: std::future::Future>(
        &self,
        pattern: &str,
        change: F,
    ) -> usize {
        let snapshot = |n: &RedisServer| -> Vec<String> {
            n.cli(&["--scan", "--pattern", pattern])
                .lines()
                .map(|k| n.cli(&["GET", k]))
                .collect()
        };
        let before: Vec<_> = self.nodes.iter().map(snapshot).collect();
        change.await;
        (0..self.nodes.len())
            .find(|&i| {
                self.nodes[i].cli(&["ROLE"]).starts_with("master")
                    && snapshot(&self.nodes[i]) != before[i]
            })
            .expect("a master's keys changed")
    }

    /// The running master that holds `key`.
    pub fn master_of(&self, key: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                n.running()
                    && n.cli(&["ROLE"]).starts_with("master")
                    && n.cli(&["EXISTS", key]).trim() == "1"
            })
            .expect("a master holds the key")
    }

    /// Sum of a command's calls over all nodes.
    pub fn command_calls(&self, command: &str) -> u64 {
        self.nodes.iter().map(|n| n.command_calls(command)).sum()
    }

    pub fn reset_stats(&self) {
        for n in &self.nodes {
            n.cli(&["CONFIG", "RESETSTAT"]);
        }
    }
}

/// Creates a session in `store`, loads it back, deletes it: what tower-sessions does.
#[cfg(feature = "sessions")]
pub async fn session_round_trip(store: &cached_query::RedisSessionStore) {
    use tower_sessions::cookie::time::{Duration as TimeDuration, OffsetDateTime};
    use tower_sessions::session::{Id, Record};
    use tower_sessions::session_store::SessionStore;
    let mut record = Record {
        id: Id::default(),
        data: [("user".to_owned(), serde_json::json!(42))].into(),
        expiry_date: OffsetDateTime::now_utc() + TimeDuration::minutes(5),
    };
    store.create(&mut record).await.expect("session created");
    let loaded = store.load(&record.id).await.expect("session loaded");
    assert_eq!(loaded, Some(record.clone()));
    store.delete(&record.id).await.expect("session deleted");
    assert_eq!(store.load(&record.id).await.unwrap(), None);
}

/// Polls `check` until it holds and returns how long that took; fails past `bound`, the
/// documented staleness bound under test (the only timing a test asserts).
pub async fn within<F, Fut>(bound: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() <= bound,
            "{what}: not seen within the bound of {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// p50 and p99 of `samples`, for the printed delivery delays.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// A TCP proxy on a free loopback port in front of `target`, for faults a server cannot
/// make by itself: [`cut`](Self::cut) closes every connection through it at once (the
/// client sees the connection drop mid-request, e.g. during COMMIT); [`stall`](Self::stall)
/// stops forwarding without closing anything (a silent partition: no FIN, no RST);
/// [`switch`](Self::switch) sends new connections to another server (a failover behind a
/// fixed address).
pub struct TcpProxy {
    pub port: u16,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bit 0: forward nothing; bit 1: forward no replies (server to client).
    gate: tokio::sync::watch::Sender<u8>,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let gate = tokio::sync::watch::Sender::new(0u8);
        let target = std::sync::Arc::new(std::sync::Mutex::new(target.to_owned()));
        let (held, stalled, to) = (links.clone(), gate.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = to.lock().unwrap().clone();
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                let mut held = held.lock().unwrap();
                for (from, to, mask) in [(client_rx, server_tx, 1), (server_rx, client_tx, 3)] {
                    let gate = stalled.subscribe();
                    held.push(tokio::spawn(pump(from, to, gate, mask)).abort_handle());
                }
            }
        });
        TcpProxy {
            port,
            links,
            gate,
            target,
            accept,
        }
    }

    /// New connections go to `target` from now on (existing ones stay: `cut` them).
    pub fn switch(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_owned();
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Drops every connection made through the proxy so far (new ones still work).
    pub fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Stops forwarding in both directions; connections stay open and silent.
    pub fn stall(&self) {
        self.gate.send_modify(|g| *g |= 1);
    }

    /// Forwards again what a [`stall`](Self::stall) held, and everything after it.
    pub fn resume(&self) {
        self.gate.send_modify(|g| *g &= !1);
    }

    /// Holds the server's replies (requests still reach it): a server that has applied a
    /// command whose caller does not know it yet.
    pub fn hold_replies(&self) {
        self.gate.send_modify(|g| *g |= 2);
    }

    /// Forwards the replies [`hold_replies`](Self::hold_replies) held, and the next ones.
    pub fn release_replies(&self) {
        self.gate.send_modify(|g| *g &= !2);
    }
}

/// Copies `from` to `to`, holding the bytes while the gate has a bit of `mask` set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<u8>,
    mask: u8,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *stalled.borrow_and_update() & mask != 0 {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The URL of the database `pool` is connected to (a `#[sqlx::test]` database), through
/// `host:port` instead of the server's own address when given.
pub fn url_of(pool: &sqlx::PgPool, via: Option<u16>) -> String {
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let base = database_url();
    let base = match via {
        Some(port) => base.replace(":5432", &format!(":{port}")),
        None => base,
    };
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{db}")
}

/// A PostgreSQL server of this test's own (initdb in a temporary directory, a free loopback
/// port, trust authentication, fsync off), for faults that would disturb other tests on the
/// shared server: [`restart`](Self::restart) stops it immediately (like a crash) and starts it
/// again. Runs the server binaries as the `postgres` user when the tests run as root.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("pg_ctl").exists())
            .max()
            .expect("a PostgreSQL version with pg_ctl");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cq-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = PgServer { port, dir, bin };
        server.chown();
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.spawn();
        server
    }

    fn as_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"))
    }

    fn chown(&self) {
        if Self::as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres", self.dir.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    /// `tool` of the server's binaries, as the `postgres` user when running as root.
    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if Self::as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once (`-m immediate`: connections are cut, like a crash) and
    /// starts it again on the same port.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Sentinel of this test's own on a free port, monitoring `master` (`host:port`)
/// under `name` with a quorum of 2 and a 1 s down-after time; killed on drop.
pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Sentinel {
    pub fn start(name: &str, master: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cq-sentinel-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (host, master_port) = master.split_once(':').unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} {host} {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs as a sentinel");
        let sentinel = Sentinel { port, dir, child };
        for _ in 0..500 {
            if sentinel.cli(&["PING"]).trim() == "PONG" {
                return sentinel;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("sentinel on port {port} did not come up");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the master the sentinel on `port` names for `name` (blocking: call it off
    /// the test's runtime).
    pub fn master_port_at(port: u16, name: &str) -> Option<u16> {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "SENTINEL",
                "GET-MASTER-ADDR-BY-NAME",
                name,
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- Staleness behind commits, for the outbox's stress tests ------------------------------

/// The documented bound on delivery after a commit.
pub const AFTER_COMMIT: Duration = Duration::from_secs(1);

/// Prints the lags of `reads` behind returned commits and checks the documented bound.
pub fn check_lags(what: &str, commits: usize, mut lags: Vec<Duration>) {
    let worst = *lags.iter().max().unwrap();
    let behind = lags.iter().filter(|l| !l.is_zero()).count();
    let (p50, p99) = percentiles(&mut lags);
    println!(
        "{what}: {} reads during {commits} commits, {behind} behind a returned commit; lag p50 {p50:?}, p99 {p99:?}, worst {worst:?}",
        lags.len()
    );
    assert!(
        worst <= AFTER_COMMIT,
        "a read lagged {worst:?} behind a returned commit"
    );
}

/// When each value of a counter was committed (the instant `commit()` returned).
#[derive(Default)]
pub struct Commits(std::sync::Mutex<Vec<(i64, std::time::Instant)>>);

impl Commits {
    pub fn record(&self, value: i64) {
        self.0
            .lock()
            .unwrap()
            .push((value, std::time::Instant::now()));
    }

    /// How long before `start` a value newer than `seen` had been committed (zero if none).
    pub fn lag(&self, seen: i64, start: std::time::Instant) -> Duration {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(v, at)| *v > seen && *at <= start)
            .map(|(_, at)| start - *at)
            .max()
            .unwrap_or_default()
    }
}

/// The backends the stale-set stresses run on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Redis,
    NearCache,
    Memory,
    Cluster,
}

/// A cache on `backend`: under a namespace of its own made from `name` on the shared Redis,
/// or under `name` on a private cluster, returned with it (it must outlive the cache).
pub async fn cache_on(backend: Backend, name: &str) -> (Cache, Option<Cluster>) {
    match backend {
        Backend::Redis => (redis_cache(&redis_url(), &unique_ns(name)).await, None),
        Backend::NearCache => {
            let builder = Cache::builder()
                .redis(&redis_url())
                .namespace(&unique_ns(name))
                .near_cache(100);
            (redis_cache_with(builder).await, None)
        }
        Backend::Memory => (Cache::builder().memory().build().await.unwrap(), None),
        Backend::Cluster => {
            let cluster = Cluster::start();
            let builder = Cache::builder()
                .redis_cluster(cluster.urls())
                .namespace(name);
            (redis_cache_with(builder).await, Some(cluster))
        }
    }
}

/// The stale-set stress: 2 writers each commit 60 increments of `counters` row 1 with
/// `commit_and_invalidate(tx, ["counter:1"])` while 4 readers read the value through
/// `read`. No read may return a value older than the last invalidation that completed before
/// it began; the cache must have served some reads, with no error.
pub async fn no_stale_reads<F, Fut>(pool: sqlx::PgPool, cache: Cache, read: F)
where
    F: Fn(sqlx::PgPool, Cache) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = i64> + Send,
{
    let write = |pool: sqlx::PgPool, cache: Cache| async move {
        let mut tx = pool.begin().await.unwrap();
        let v: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + 1 WHERE id = 1 RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        cache
            .commit_and_invalidate(tx, ["counter:1"])
            .await
            .unwrap();
        v
    };
    stale_set_stress(pool, cache, write, read).await;
}

/// [`no_stale_reads`] on any database: `write` commits one increment of the counter (and
/// invalidates `counter:1` after its commit), returning the value it committed.
pub async fn stale_set_stress<P, W, WFut, F, Fut>(pool: P, cache: Cache, write: W, read: F)
where
    P: Clone + Send + 'static,
    W: Fn(P, Cache) -> WFut + Clone + Send + 'static,
    WFut: std::future::Future<Output = i64> + Send,
    F: Fn(P, Cache) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = i64> + Send,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
    let completed = Arc::new(AtomicI64::new(0));
    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, cache, completed, write) = (
                pool.clone(),
                cache.clone(),
                completed.clone(),
                write.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..60 {
                    let v = write(pool.clone(), cache.clone()).await;
                    completed.fetch_max(v, SeqCst);
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (pool, cache, completed, writing, read) = (
                pool.clone(),
                cache.clone(),
                completed.clone(),
                writing.clone(),
                read.clone(),
            );
            tokio::spawn(async move {
                let (mut reads, mut stale) = (0u32, Vec::new());
                while writing.load(SeqCst) {
                    let floor = completed.load(SeqCst);
                    let seen = read(pool.clone(), cache.clone()).await;
                    if seen < floor {
                        stale.push((seen, floor));
                    }
                    reads += 1;
                    // A memory hit is a ready future: give the writers their turn.
                    tokio::task::yield_now().await;
                }
                (reads, stale)
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    writing.store(false, SeqCst);
    let mut total = 0;
    for r in readers {
        let (reads, stale) = r.await.unwrap();
        assert!(stale.is_empty(), "stale reads (seen, floor): {stale:?}");
        total += reads;
    }
    assert_eq!(read(pool, cache.clone()).await, 120);
    let stats = cache.stats();
    assert!(
        stats.hits > 0,
        "the cache served some reads: {stats:?} of {total}"
    );
    assert_eq!(stats.errors, 0);
}
