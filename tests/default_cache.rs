//! The process-wide default cache (`install`), used by attributes without `cache = …`.
//! One test only: the default is global to this test binary.

use cached_query::{Cache, Error, cached_query, install, installed, invalidate, invalidates};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

static CALLS: AtomicU32 = AtomicU32::new(0);

#[cached_query(invalidate = "item:<id>")]
async fn item(id: u32) -> Result<u32, std::io::Error> {
    CALLS.fetch_add(1, SeqCst);
    Ok(id * 2)
}

#[invalidates("item:<id>")]
async fn touch(id: u32) -> Result<(), std::io::Error> {
    Ok(())
}

#[tokio::test]
async fn installed_default_cache() {
    // Nothing installed: queries run uncached, invalidate() says why it cannot work.
    assert_eq!(item(1).await.unwrap(), 2);
    assert_eq!(item(1).await.unwrap(), 2);
    assert_eq!(CALLS.load(SeqCst), 2);
    touch(1).await.unwrap();
    assert!(matches!(
        invalidate("item:1").await,
        Err(Error::NoDefaultCache)
    ));

    assert!(installed().is_none());
    let cache = Cache::builder().memory().build().await.unwrap();
    install(cache.clone());
    item(1).await.unwrap();
    item(1).await.unwrap();
    assert_eq!(CALLS.load(SeqCst), 3);
    touch(1).await.unwrap();
    item(1).await.unwrap();
    assert_eq!(
        CALLS.load(SeqCst),
        4,
        "#[invalidates] used the default cache"
    );
    invalidate("item:1").await.unwrap();
    item(1).await.unwrap();
    assert_eq!(CALLS.load(SeqCst), 5, "so did cached_query::invalidate");
    assert_eq!(cache.stats().hits, 1);
    // installed() shares state with the installed cache.
    let shared = installed().expect("installed");
    item(1).await.unwrap();
    assert_eq!((shared.stats().hits, cache.stats().hits), (2, 2));
    shared.invalidate("item:1").await.unwrap();
    item(1).await.unwrap();
    assert_eq!(
        CALLS.load(SeqCst),
        6,
        "an invalidation through it reached it"
    );

    // Replacing the default takes effect at once.
    install(Cache::builder().memory().build().await.unwrap());
    item(1).await.unwrap();
    assert_eq!(CALLS.load(SeqCst), 7);
    assert_eq!(
        installed().unwrap().stats().misses,
        1,
        "installed() follows"
    );
    assert_eq!(
        shared.stats().misses,
        4,
        "a clone taken before keeps its cache"
    );
}
