//! `rediss://` against a local redis-server with a certificate made by the test.

mod common;

use cached_query::{Cache, Error, cached_query};
use common::RedisServer;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let subject = format!("/CN={ca_name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", &subject,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    )
}

#[cached_query(cache = cache)]
async fn value(cache: &Cache, id: i64) -> Result<i64, String> {
    Ok(id + 1)
}

#[tokio::test]
async fn rediss_works_with_the_right_ca_and_fails_open_with_a_clear_error_otherwise() {
    let dir = std::env::temp_dir().join(format!("cq-tls-{}", std::process::id()));
    let (cert, key, ca) = certificates(&dir.join("good"), "cq-test-ca");
    let (_, _, wrong_ca) = certificates(&dir.join("other"), "some-other-ca");
    let server = RedisServer::start_tls(&cert, &key, &ca);
    let url = format!("rediss://127.0.0.1:{}", server.port);

    let trusted = Cache::builder()
        .redis(&url)
        .namespace("tls")
        .redis_root_certificate(std::fs::read(&ca).unwrap())
        .build()
        .await
        .unwrap();
    assert_eq!(value(&trusted, 1).await.unwrap(), 2);
    assert_eq!(value(&trusted, 1).await.unwrap(), 2);
    let stats = trusted.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.errors),
        (1, 1, 0),
        "cached over TLS"
    );
    assert!(server.cli(&["DBSIZE"]).trim().parse::<u32>().unwrap() >= 2);

    let untrusted = Cache::builder()
        .redis(&url)
        .namespace("tls")
        .redis_root_certificate(std::fs::read(&wrong_ca).unwrap())
        .response_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    assert_eq!(
        value(&untrusted, 1).await.unwrap(),
        2,
        "the query still runs"
    );
    assert_eq!(untrusted.stats().errors, 1);
    let err = untrusted.invalidate("x").await.unwrap_err();
    assert!(matches!(err, Error::InvalidationPending { .. }));
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "a clear reason: {err}"
    );
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `REDIS_CA_CERT` configures the cache and the session store alike.
#[cfg(feature = "sessions")]
#[tokio::test]
async fn sessions_and_the_cache_trust_the_ca_named_by_redis_ca_cert() {
    let dir = std::env::temp_dir().join(format!("cq-tls-sessions-{}", std::process::id()));
    let (cert, key, ca) = certificates(&dir, "cq-session-ca");
    let server = RedisServer::start_tls(&cert, &key, &ca);
    let url = format!("rediss://127.0.0.1:{}", server.port);
    let vars = common::lookup(&[
        ("REDIS_URL", &url),
        ("REDIS_CA_CERT", ca.to_str().unwrap()),
        ("CACHE_NAMESPACE", "tls-env"),
    ]);
    let config = cached_query::RedisConfig::from_lookup(&vars).unwrap();
    let store = cached_query::RedisSessionStore::new(&config, "tls-sessions").unwrap();
    common::session_round_trip(&store).await;

    let cache = Cache::from_lookup(vars).await.unwrap();
    cache.ping().await.unwrap();
    assert_eq!(value(&cache, 5).await.unwrap(), 6);
    assert_eq!(value(&cache, 5).await.unwrap(), 6);
    assert_eq!(cache.stats().errors, 0);

    let missing = cached_query::RedisConfig::from_lookup(common::lookup(&[(
        "REDIS_CA_CERT",
        "/nonexistent/ca.pem",
    )]))
    .unwrap_err()
    .to_string();
    assert!(
        missing.starts_with("REDIS_CA_CERT=\"/nonexistent/ca.pem\""),
        "{missing}"
    );
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
