//! Tag lists: placeholders naming what parameter patterns bind, `Option` values, tag
//! functions declared once with `tags!`. (Tag rendering happens before any backend is
//! involved: the in-memory backend serves here.)

use axum::Json;
use axum::extract::{Path, State};
use cached_query::{Cache, cached_query, invalidates, tags};
use serde::Deserialize;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

/// Queries run by the functions of the test `an_option_placeholder_drops_the_whole_tag_when_none`.
static MEMBERS: AtomicU32 = AtomicU32::new(0);
/// Queries run by `profile`.
static PROFILES: AtomicU32 = AtomicU32::new(0);

/// Application state as an axum handler gets it: not `Serialize`, left out with `skip`.
#[derive(Clone)]
struct Ctx {
    cache: Cache,
    calls: &'static AtomicU32,
}

#[derive(Deserialize)]
struct NewTitle {
    title: String,
    author: Option<i64>,
}

#[cached_query(cache = ctx.cache, invalidate = "article:<slug>", skip(ctx))]
async fn article(State(ctx): State<Ctx>, Path(slug): Path<String>) -> Result<String, String> {
    ctx.calls.fetch_add(1, SeqCst);
    Ok(format!("article {slug}"))
}

#[invalidates("article:<slug>", "title:<body.title>", "author:<body.author>", cache = ctx.cache)]
async fn retitle(
    State(ctx): State<Ctx>,
    Path(slug): Path<String>,
    Json(body): Json<NewTitle>,
) -> Result<(), String> {
    let _ = (&ctx.calls, &slug, &body.title);
    Ok(())
}

#[tokio::test]
async fn placeholders_name_what_parameter_patterns_bind() {
    let cache = Cache::builder().memory().build().await.unwrap();
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ctx = Ctx {
        cache: cache.clone(),
        calls: &CALLS,
    };
    let get = |slug: &str| article(State(ctx.clone()), Path(slug.to_owned()));
    assert_eq!(get("a").await.unwrap(), "article a");
    assert_eq!(get("a").await.unwrap(), "article a");
    assert_eq!(get("b").await.unwrap(), "article b");
    assert_eq!(
        CALLS.load(SeqCst),
        2,
        "keyed by the bound name: a hit, then b missed"
    );

    let body = NewTitle {
        title: "T".into(),
        author: None,
    };
    retitle(State(ctx.clone()), Path("a".into()), Json(body))
        .await
        .unwrap();
    get("a").await.unwrap();
    get("b").await.unwrap();
    assert_eq!(CALLS.load(SeqCst), 3, "only article:a was invalidated");
}

#[cached_query(cache = cache, invalidate = ["org:<org>", "team:<team>", "all"])]
async fn members(cache: &Cache, org: Option<i64>, team: &Option<String>) -> Result<u32, String> {
    let _ = (org, team);
    Ok(MEMBERS.fetch_add(1, SeqCst))
}

#[cached_query(cache = cache, invalidate = "pair:<a>:<b>")]
async fn pair(cache: &Cache, (a, b): (i64, i64)) -> Result<i64, String> {
    MEMBERS.fetch_add(1, SeqCst);
    Ok(a + b)
}

#[tokio::test]
async fn an_option_placeholder_drops_the_whole_tag_when_none() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let team = Some("red".to_owned());
    let with = members(&cache, Some(3), &team).await.unwrap();
    let without = members(&cache, None, &None).await.unwrap();
    let before = MEMBERS.load(SeqCst);
    // A `None` renders no tag at all: neither `org:None` nor `org:` reaches it.
    cache
        .invalidate_many(["org:None", "org:", "team:None", "team:"])
        .await
        .unwrap();
    assert_eq!(members(&cache, Some(3), &team).await.unwrap(), with);
    assert_eq!(members(&cache, None, &None).await.unwrap(), without);
    assert_eq!(MEMBERS.load(SeqCst), before, "both hits");
    // A `Some` renders its value.
    cache.invalidate("org:3").await.unwrap();
    members(&cache, Some(3), &team).await.unwrap();
    assert_eq!(MEMBERS.load(SeqCst), before + 1);
    cache.invalidate("team:red").await.unwrap();
    members(&cache, Some(3), &team).await.unwrap();
    assert_eq!(MEMBERS.load(SeqCst), before + 2);
    // The remaining templates still apply to the `None` call.
    cache.invalidate("all").await.unwrap();
    members(&cache, None, &None).await.unwrap();
    members(&cache, Some(3), &team).await.unwrap();
    assert_eq!(MEMBERS.load(SeqCst), before + 4, "`all` reached both");

    assert_eq!(pair(&cache, (1, 2)).await.unwrap(), 3);
    assert_eq!(pair(&cache, (2, 1)).await.unwrap(), 3);
    let before = MEMBERS.load(SeqCst);
    cache.invalidate("pair:1:2").await.unwrap();
    pair(&cache, (1, 2)).await.unwrap();
    pair(&cache, (2, 1)).await.unwrap();
    assert_eq!(
        MEMBERS.load(SeqCst),
        before + 1,
        "tuple patterns bind their names"
    );
}

tags! {
    /// Everything read about one user.
    pub fn user(id: i64) = "user:{id}";
    fn org(id: i64) = "org:{id}";
}

#[cached_query(cache = cache, invalidate = [user(id), "org:<org_id>"])]
async fn profile(cache: &Cache, id: i64, org_id: i64) -> Result<String, String> {
    PROFILES.fetch_add(1, SeqCst);
    Ok(format!("{id}@{org_id}"))
}

#[invalidates(user(id), cache = cache)]
async fn rename(cache: &Cache, id: i64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

#[tokio::test]
async fn tag_functions_serve_both_sides() {
    let cache = Cache::builder().memory().build().await.unwrap();
    profile(&cache, 42, 8).await.unwrap();
    profile(&cache, 44, 9).await.unwrap();
    let before = PROFILES.load(SeqCst);
    rename(&cache, 42).await.unwrap();
    profile(&cache, 42, 8).await.unwrap();
    profile(&cache, 44, 9).await.unwrap();
    assert_eq!(
        PROFILES.load(SeqCst),
        before + 1,
        "#[invalidates(user(id))] reached user 42 only"
    );
    cache.invalidate(&user(42)).await.unwrap();
    profile(&cache, 42, 8).await.unwrap();
    assert_eq!(PROFILES.load(SeqCst), before + 2);
    // A function's tag equals the template's rendering: either side may use either form.
    cache.invalidate_many([user(44), org(8)]).await.unwrap();
    profile(&cache, 42, 8).await.unwrap();
    profile(&cache, 44, 9).await.unwrap();
    assert_eq!(PROFILES.load(SeqCst), before + 4);
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Draft {
    id: i64,
    editor: Option<i64>,
}

/// Queries run by `drafts`.
static DRAFTS: AtomicU32 = AtomicU32::new(0);

#[cached_query(cache = cache, invalidate = ["editor:<ret.editor>", "draft:<ret.id>"])]
async fn drafts(cache: &Cache, ids: Vec<(i64, Option<i64>)>) -> Result<Vec<Draft>, String> {
    DRAFTS.fetch_add(1, SeqCst);
    Ok(ids
        .into_iter()
        .map(|(id, editor)| Draft { id, editor })
        .collect())
}

/// `<ret.field>` where the field is an `Option`: one tag per element that has one.
#[tokio::test]
async fn an_option_field_of_the_result_drops_only_its_own_tag() {
    let cache = Cache::builder().memory().build().await.unwrap();
    let list = vec![(1, Some(5)), (2, None)];
    drafts(&cache, list.clone()).await.unwrap();
    cache
        .invalidate_many(["editor:None", "editor:"])
        .await
        .unwrap();
    drafts(&cache, list.clone()).await.unwrap();
    assert_eq!(
        DRAFTS.load(SeqCst),
        1,
        "no tag for the draft without an editor"
    );
    cache.invalidate("draft:2").await.unwrap();
    drafts(&cache, list.clone()).await.unwrap();
    assert_eq!(DRAFTS.load(SeqCst), 2, "its other tag is there");
    cache.invalidate("editor:5").await.unwrap();
    drafts(&cache, list).await.unwrap();
    assert_eq!(DRAFTS.load(SeqCst), 3);
}
