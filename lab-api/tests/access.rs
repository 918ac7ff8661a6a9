//! Who sees what, through the router: callers named by static tokens, records and accounts
//! written by the stores as sync-daemon writes them, every read route asked by each caller.

use std::sync::Arc;

use axum::{
    body::{to_bytes, Body},
    http::{header, HeaderMap, Request, StatusCode},
    Router,
};
use bson::DateTime;
use lab_api::{app::router, auth::Authenticator, state::AppState};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::{
    access::{DirGroup, DirUser, Directory},
    accounts::AccountStore,
    change::{plan_access, plan_sync, Groups, Listing, Shares},
    config::{AccessConfig, ApiConfig, AuthConfig, AuthMode, Config, MongoConfig, StaticToken},
    fence::Term,
    record::{LabFields, ObservedLab},
    store::LabStore,
};
use testkit::TestDb;
use tower::ServiceExt;

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Tokens: `admin-token` (admin of the fleet, as the old `token_hashes`), and one per user.
fn auth() -> AuthConfig {
    let named = |user: &str| StaticToken {
        sha256: digest(&format!("{user}-token")),
        username: user.into(),
        admin: false,
    };
    AuthConfig {
        mode: AuthMode::Tokens,
        token_hashes: vec![digest("admin-token")],
        tokens: vec![
            named("alice"),
            named("bob"),
            named("carol"),
            named("root"),
            named(".*"),
            named("{\"$gt\":\"\"}"),
        ],
        ..AuthConfig::default()
    }
}

struct Api {
    router: Router,
    _db: TestDb,
}

fn user(id: &str, name: &str, admin: bool, groups: &[&str], labs: &[&str]) -> DirUser {
    DirUser {
        id: id.into(),
        username: name.into(),
        admin,
        groups: groups.iter().map(|s| s.to_string()).collect(),
        labs: labs.iter().map(|s| s.to_string()).collect(),
    }
}

fn lab(id: &str, owner: &str) -> ObservedLab {
    ObservedLab::new(
        id,
        LabFields {
            title: format!("Lab {id}"),
            notes: format!("secret notes of {id}"),
            state: "STOPPED".into(),
            owner_username: owner.into(),
            ..LabFields::default()
        },
    )
}

/// Writes a worker's labs and directory as a full sync does.
async fn sync(
    store: &LabStore,
    accounts: &AccountStore,
    worker: &str,
    labs: Vec<ObservedLab>,
    dir: &Directory,
) {
    let stored = store.records_for_sync(worker).await.expect("read");
    let mut plan = plan_sync(
        worker,
        &stored,
        labs,
        Listing::Complete,
        Groups::Observed,
        DateTime::now(),
    )
    .expect("plan");
    let shares = dir.shares(worker);
    plan_access(&mut plan, &stored, Shares::Read(&shares));
    store.apply(&plan, Term(1)).await.expect("apply");
    accounts
        .replace_worker(worker, &dir.accounts(worker), DateTime::now())
        .await
        .expect("accounts");
}

/// Two workers. w1: alice owns l1 and l2, bob owns l3; l2 is shared with group g1 (carol); l3
/// with alice directly; root administers w1. w2: bob owns m1; alice has no user there.
async fn api(test: &str) -> Api {
    let db = TestDb::new(test).await;
    let mongodb = MongoConfig {
        database: db.name().to_owned(),
        ..MongoConfig::default()
    };
    let store = LabStore::new(&db.client, &mongodb, 50);
    store.ensure_indexes().await.expect("indexes");
    let accounts = AccountStore::new(&db.db, &mongodb.cml_accounts_collection);
    accounts.ensure_indexes().await.expect("indexes");
    let w1 = Directory {
        users: vec![
            user("1", "alice", false, &[], &["l3"]),
            user("2", "bob", false, &[], &[]),
            user("3", "carol", false, &["g1"], &[]),
            user("4", "root", true, &[], &[]),
        ],
        groups: vec![DirGroup {
            id: "g1".into(),
            members: vec![],
            labs: vec!["l2".into()],
        }],
    };
    sync(
        &store,
        &accounts,
        "w1",
        vec![lab("l1", "alice"), lab("l2", "alice"), lab("l3", "bob")],
        &w1,
    )
    .await;
    let w2 = Directory {
        users: vec![user("9", "bob", false, &[], &[])],
        groups: vec![],
    };
    sync(
        &store,
        &accounts,
        "w2",
        vec![lab("m1", "bob"), lab("m2", "alice")],
        &w2,
    )
    .await;
    for w in ["w1", "w2"] {
        db.db
            .collection::<bson::Document>("worker_sync_status")
            .insert_one(bson::doc! {
                "worker_id": w, "last_attempt_at": DateTime::now(), "last_success_at": DateTime::now(),
                "last_error": null, "consecutive_failures": 0_i64, "lab_count": 3_i64, "last_duration_ms": 5_i64,
                "last_counts": { "synced": 3_i64, "created": 0_i64, "updated": 0_i64, "unchanged": 3_i64, "removed": 0_i64 },
            })
            .await
            .expect("status");
    }
    let api_cfg = ApiConfig {
        auth: auth(),
        access: AccessConfig::default(),
        ..ApiConfig::default()
    };
    let config = Config {
        mongodb,
        api: api_cfg.clone(),
        ..Config::default()
    };
    let state = AppState::from_config(&config, &db.client);
    let authn = Arc::new(Authenticator::from_config(
        &api_cfg.auth,
        &api_cfg.access,
        reqwest::Client::new(),
    ));
    let (router, _) = router(state, authn, &api_cfg);
    Api { router, _db: db }
}

async fn get(
    router: &Router,
    uri: &str,
    token: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder()
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let (parts, body) = resp.into_parts();
    let body = to_bytes(body, 16 << 20).await.expect("body");
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn ids(items: &Value) -> Vec<String> {
    let mut ids: Vec<String> = items
        .as_array()
        .expect("a list")
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn each_caller_sees_what_its_cml_servers_show_its_user_on_every_read_route() {
    let a = api("access_routes").await;
    // (token, w1's labs, w2's labs)
    let cases: [(&str, &[&str], &[&str]); 8] = [
        ("admin-token", &["l1", "l2", "l3"], &["m1", "m2"]),
        ("root-token", &["l1", "l2", "l3"], &[]),
        ("alice-token", &["l1", "l2", "l3"], &[]),
        ("bob-token", &["l3"], &["m1"]),
        ("carol-token", &["l2"], &[]),
        (".*-token", &[], &[]),
        ("{\"$gt\":\"\"}-token", &[], &[]),
        ("admin-token", &["l1", "l2", "l3"], &["m1", "m2"]),
    ];
    for (token, w1, w2) in cases {
        for (worker, want) in [("w1", w1), ("w2", w2)] {
            let (status, _, body) = get(
                &a.router,
                &format!("/api/workers/{worker}/labs"),
                token,
                &[],
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{token} {worker}");
            assert_eq!(ids(&body), want.to_vec(), "{token} {worker}");
            let (_, _, legacy) = get(
                &a.router,
                &format!("/api/labs/region/us-east-1/workers/{worker}/labs"),
                token,
                &[],
            )
            .await;
            assert_eq!(legacy, body, "{token}: the legacy path answers the same");
            let (_, _, page) = get(
                &a.router,
                &format!("/api/labs?worker_id={worker}"),
                token,
                &[],
            )
            .await;
            assert_eq!(
                ids(&page["items"]),
                want.to_vec(),
                "{token} {worker} /api/labs"
            );
        }
        // The whole fleet, a page of one at a time: every visible lab once, nothing else.
        let mut all: Vec<String> = Vec::new();
        let mut uri = "/api/labs?limit=1".to_owned();
        loop {
            let (status, _, page) = get(&a.router, &uri, token, &[]).await;
            assert_eq!(status, StatusCode::OK);
            all.extend(ids(&page["items"]));
            match page["next_cursor"].as_str() {
                Some(c) => uri = format!("/api/labs?limit=1&cursor={c}"),
                None => break,
            }
        }
        let mut want: Vec<String> = w1.iter().chain(w2).map(|s| s.to_string()).collect();
        want.sort();
        all.sort();
        assert_eq!(all, want, "{token}: /api/labs across pages");
        // A single lab: 200 when visible, and a 404 identical to a lab that does not exist.
        let (_, _, missing) = get(&a.router, "/api/workers/w1/labs/nope", token, &[]).await;
        for (worker, labs) in [("w1", &["l1", "l2", "l3"][..]), ("w2", &["m1", "m2"][..])] {
            for l in labs {
                let (status, _, body) = get(
                    &a.router,
                    &format!("/api/workers/{worker}/labs/{l}"),
                    token,
                    &[],
                )
                .await;
                let visible = w1.contains(l) || w2.contains(l);
                if visible {
                    assert_eq!(status, StatusCode::OK, "{token} {l}");
                    assert_eq!(body["notes"], format!("secret notes of {l}"));
                } else {
                    assert_eq!(status, StatusCode::NOT_FOUND, "{token} {l}");
                    let norm =
                        |v: &Value, id: &str| v.to_string().replace(id, "ID").replace(worker, "W");
                    assert_eq!(
                        norm(&body, l),
                        norm(&missing, "nope").replace("w1", "W"),
                        "{token} {l}: a 404 like any"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn counts_statuses_and_etags_never_reveal_another_view() {
    let a = api("access_counts").await;
    // The fleet view: the workers where the caller has a user, with its own counts.
    let (_, _, fleet) = get(&a.router, "/api/sync-status", "carol-token", &[]).await;
    let items = fleet["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{fleet}");
    assert_eq!(items[0]["worker_id"], "w1");
    assert_eq!(items[0]["lab_count"], 1, "carol sees one lab of w1");
    let (_, _, fleet) = get(&a.router, "/api/sync-status", "root-token", &[]).await;
    let counts: Vec<(String, i64)> = fleet["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap_or("").to_owned(),
                w["lab_count"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [("w1".to_owned(), 3)],
        "an admin of w1 sees its figures"
    );
    let (_, _, fleet) = get(&a.router, "/api/sync-status", ".*-token", &[]).await;
    assert_eq!(fleet["items"], Value::Array(vec![]));
    // A worker's status: hidden where the caller has no user; cut to its labs where it has.
    let (status, _, _) = get(&a.router, "/api/workers/w2/sync-status", "alice-token", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, st) = get(&a.router, "/api/workers/w2/sync-status", "bob-token", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["lab_count"], 1);
    assert_eq!(
        st["last_counts"],
        Value::Null,
        "no figures of the whole worker"
    );
    let (_, _, st) = get(&a.router, "/api/workers/w2/sync-status", "admin-token", &[]).await;
    assert_eq!(st["lab_count"], 3);
    // ETags: per view, private, varying with the credential.
    let (_, h_alice, _) = get(&a.router, "/api/workers/w2/labs", "alice-token", &[]).await;
    let (_, h_carol, _) = get(&a.router, "/api/workers/w2/labs", "carol-token", &[]).await;
    let tag = |h: &HeaderMap| {
        h.get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_ne!(
        tag(&h_alice),
        tag(&h_carol),
        "two empty answers, two views, two tags"
    );
    assert_eq!(
        h_alice.get(header::VARY).map(|v| v.to_str().unwrap_or("")),
        Some("Authorization, Cookie")
    );
    assert!(h_alice
        .get(header::CACHE_CONTROL)
        .is_some_and(|v| v.to_str().unwrap_or("").contains("private")));
    let (status, _, _) = get(
        &a.router,
        "/api/workers/w2/labs",
        "carol-token",
        &[("if-none-match", &tag(&h_alice))],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another view's tag confirms nothing"
    );
    let (status, _, _) = get(
        &a.router,
        "/api/workers/w2/labs",
        "alice-token",
        &[("if-none-match", &tag(&h_alice))],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
}
