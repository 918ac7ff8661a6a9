//! The router driven with `oneshot`, over records written by the store into a real
//! MongoDB-wire server.

use std::sync::Arc;

use axum::{
    body::{to_bytes, Body},
    http::{header, Request, StatusCode},
    Router,
};
use bson::DateTime;
use lab_api::{app::router, auth::Authenticator, state::AppState};
use serde_json::Value;
use shared::{
    change::{plan_sync, Groups, Listing},
    config::{ApiConfig, AuthConfig, AuthMode, Config, MongoConfig},
    fence::Term,
    record::{LabFields, ObservedLab},
    store::LabStore,
};
use testkit::TestDb;
use tower::ServiceExt;

struct Api {
    router: Router,
    store: LabStore,
    db: TestDb,
}

/// The state lab-api builds from a configuration with these `mongodb` and `api` sections.
fn state(client: &mongodb::Client, mongodb: MongoConfig, api: &ApiConfig) -> AppState {
    let config = Config {
        mongodb,
        api: api.clone(),
        ..Config::default()
    };
    AppState::from_config(&config, client)
}

fn mongo_config(db: &TestDb) -> MongoConfig {
    MongoConfig {
        database: db.name().to_owned(),
        ..MongoConfig::default()
    }
}

fn authenticator(auth: &AuthConfig) -> Arc<Authenticator> {
    Arc::new(Authenticator::from_config(
        auth,
        &shared::config::AccessConfig::default(),
        reqwest::Client::new(),
    ))
}

async fn api(test: &str, auth: AuthConfig) -> Api {
    let db = TestDb::new(test).await;
    let store = LabStore::new(&db.client, &mongo_config(&db), 50);
    store.ensure_indexes().await.expect("indexes");
    let api_cfg = ApiConfig::default();
    let state = state(&db.client, mongo_config(&db), &api_cfg);
    let (router, _) = router(state, authenticator(&auth), &api_cfg);
    Api { router, store, db }
}

/// An open API that lists `https://ui.example.com` as a CORS origin.
fn ui_origin_router(db: &TestDb) -> Router {
    let api_cfg = ApiConfig {
        cors_allowed_origins: vec!["https://ui.example.com".into()],
        ..ApiConfig::default()
    };
    let (router, _) = router(
        state(&db.client, mongo_config(db), &api_cfg),
        authenticator(&open()),
        &api_cfg,
    );
    router
}

fn open() -> AuthConfig {
    AuthConfig {
        mode: AuthMode::None,
        ..AuthConfig::default()
    }
}

fn lab(id: &str, title: &str, state: &str) -> ObservedLab {
    ObservedLab::new(
        id,
        LabFields {
            title: title.into(),
            description: "desc".into(),
            notes: "notes".into(),
            state: state.into(),
            owner_username: "alice".into(),
            owner_fullname: "Alice Example".into(),
            node_count: 3,
            link_count: 2,
            groups: vec!["netops".into()],
            cml_created_at: Some(DateTime::from_millis(1_763_373_600_000)),
            ..LabFields::default()
        },
    )
}

async fn seed(store: &LabStore, worker: &str, labs: Vec<ObservedLab>) {
    let stored = store.records_for_sync(worker).await.expect("read");
    let plan = plan_sync(
        worker,
        &stored,
        labs,
        Listing::Complete,
        Groups::Observed,
        DateTime::now(),
    )
    .expect("plan");
    store.apply(&plan, Term(1)).await.expect("apply");
}

async fn get(
    router: &Router,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        to_bytes(body, 64 << 20).await.expect("body").to_vec(),
    )
}

async fn get_json(router: &Router, uri: &str) -> (StatusCode, Value) {
    let (status, _, body) = get(router, uri, &[]).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn worker_labs_have_exactly_the_ui_keys_sorted_by_title() {
    let a = api("api_ui_shape", open()).await;
    seed(
        &a.store,
        "w1",
        vec![
            lab("l-b", "Beta", "STARTED"),
            lab("l-a", "Alpha", "STOPPED"),
            lab("l-c", "Beta", "STOPPED"),
        ],
    )
    .await;
    seed(&a.store, "w2", vec![lab("x", "Other", "STARTED")]).await;
    let (status, body) = get_json(&a.router, "/api/workers/w1/labs").await;
    assert_eq!(status, StatusCode::OK);
    let labs = body.as_array().expect("a bare array");
    let ids: Vec<&str> = labs.iter().map(|l| l["id"].as_str().expect("id")).collect();
    assert_eq!(ids, ["l-a", "l-b", "l-c"]);
    let keys: Vec<&str> = labs[0]
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = [
        "id",
        "title",
        "description",
        "notes",
        "state",
        "owner",
        "owner_username",
        "node_count",
        "link_count",
        "created",
        "modified",
        "groups",
        "last_synced",
    ];
    expected.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(keys_sorted, expected);
    let l = &labs[0];
    assert_eq!(l["owner"], "Alice Example");
    // Without a full name in CML, `owner` is null, not a copy of the username.
    let mut nameless = lab("l-n", "Nameless", "STOPPED");
    nameless.fields.owner_fullname = String::new();
    seed(&a.store, "w3", vec![nameless]).await;
    let (_, w3) = get_json(&a.router, "/api/workers/w3/labs").await;
    assert_eq!(w3[0]["owner"], Value::Null);
    assert_eq!(w3[0]["owner_username"], "alice");
    assert_eq!(l["owner_username"], "alice");
    assert_eq!(l["created"], "2025-11-17T10:00:00Z");
    assert_eq!(l["modified"], Value::Null);
    assert_eq!(l["groups"], serde_json::json!(["netops"]));
    assert!(l["last_synced"].as_str().expect("time").ends_with('Z'));
    assert!(!l["last_synced"].as_str().expect("time").contains("+00:00"));

    // The legacy path answers the same.
    let (status, legacy) = get_json(&a.router, "/api/labs/region/us-east-1/workers/w1/labs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(legacy, body);
    // A worker without records: an empty array, not a 404.
    let (status, empty) = get_json(&a.router, "/api/workers/nobody/labs").await;
    assert_eq!((status, empty), (StatusCode::OK, serde_json::json!([])));
}

#[tokio::test]
async fn removed_labs_are_hidden_unless_asked_for_and_records_show_history() {
    let a = api("api_removed", open()).await;
    seed(
        &a.store,
        "w1",
        vec![lab("l1", "One", "STARTED"), lab("l2", "Two", "STOPPED")],
    )
    .await;
    seed(&a.store, "w1", vec![lab("l1", "One", "STOPPED")]).await;
    let (_, visible) = get_json(&a.router, "/api/workers/w1/labs").await;
    assert_eq!(visible.as_array().map(Vec::len), Some(1));
    let (_, all) = get_json(&a.router, "/api/workers/w1/labs?include_removed=true").await;
    assert_eq!(all.as_array().map(Vec::len), Some(2));

    let (status, record) = get_json(&a.router, "/api/workers/w1/labs/l1").await;
    assert_eq!(status, StatusCode::OK);
    let history = record["operation_history"].as_array().expect("history");
    assert_eq!(history.len(), 1, "one change, no entry for the first sight");
    assert_eq!(history[0]["previous_state"], "STARTED");
    assert_eq!(history[0]["new_state"], "STOPPED");
    assert_eq!(
        history[0]["changed_fields"]["state"],
        serde_json::json!({"old": "STARTED", "new": "STOPPED"})
    );
    assert!(record["first_seen_at"].as_str().is_some());
    assert_eq!(record["removed_at"], Value::Null);
    let (_, gone) = get_json(&a.router, "/api/workers/w1/labs/l2").await;
    assert!(gone["removed_at"].as_str().is_some());
    assert_eq!(gone["operation_history"][0]["new_state"], "REMOVED");

    let (status, problem) = get_json(&a.router, "/api/workers/w1/labs/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["status"], 404);
}

#[tokio::test]
async fn every_bad_input_is_a_400_naming_the_parameter() {
    let a = api("api_bad_input", open()).await;
    let cases = [
        (
            "/api/workers/w1/labs?include_removed=maybe",
            "include_removed",
        ),
        ("/api/workers/w1/labs?includeRemoved=true", "includeRemoved"),
        (
            "/api/workers/w1/labs?include_removed=true&include_removed=false",
            "include_removed",
        ),
        ("/api/workers/w%20x/labs", "worker_id"),
        ("/api/workers/%7B%22%24ne%22%3A1%7D/labs", "worker_id"),
        ("/api/labs/region/US_EAST/workers/w1/labs", "aws_region"),
        ("/api/workers/w1/labs/l%2F1", "lab_id"),
        ("/api/workers/w1/labs/l1?x=1", "x"),
        ("/api/labs?limit=0", "limit"),
        ("/api/labs?limit=1001", "limit"),
        ("/api/labs?limit=abc", "limit"),
        ("/api/labs?cursor=not-a-cursor", "cursor"),
        ("/api/labs?state=RUNNING", "state"),
        ("/api/labs?state[$ne]=x", "state[$ne]"),
        ("/api/labs?owner_username=", "owner_username"),
        ("/api/labs?worker_id=a/b", "worker_id"),
        ("/api/workers/w1/sync-status?verbose=1", "verbose"),
    ];
    for (uri, param) in cases {
        let (status, headers, body) = get(&a.router, uri, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(
            headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{uri}"
        );
        let problem: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(problem["param"], param, "{uri}: {problem}");
        assert_eq!(problem["status"], 400);
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains(param)),
            "{uri}: {problem}"
        );
    }
    let (status, problem) = get_json(&a.router, "/api/nothing-here").await;
    assert_eq!(
        (status, problem["status"].clone()),
        (StatusCode::NOT_FOUND, Value::from(404))
    );
}

#[tokio::test]
async fn etags_turn_repeated_reads_into_304s_until_something_changes() {
    let a = api("api_etag", open()).await;
    seed(&a.store, "w1", vec![lab("l1", "One", "STARTED")]).await;
    let (status, headers, body) = get(&a.router, "/api/workers/w1/labs", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let etag = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .expect("etag")
        .to_owned();
    let (status, headers, empty) = get(
        &a.router,
        "/api/workers/w1/labs",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(empty.is_empty());
    assert_eq!(
        headers.get(header::ETAG).and_then(|v| v.to_str().ok()),
        Some(etag.as_str())
    );
    assert!(!body.is_empty());

    seed(&a.store, "w1", vec![lab("l1", "One", "STOPPED")]).await;
    let (status, headers, _) = get(
        &a.router,
        "/api/workers/w1/labs",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "changed data, new tag");
    assert_ne!(
        headers.get(header::ETAG).and_then(|v| v.to_str().ok()),
        Some(etag.as_str())
    );
}

#[tokio::test]
async fn responses_are_gzipped_for_clients_that_accept_it() {
    let a = api("api_gzip", open()).await;
    seed(
        &a.store,
        "w1",
        (0..50)
            .map(|i| {
                lab(
                    &format!("l{i:02}"),
                    "A title long enough to compress well",
                    "STARTED",
                )
            })
            .collect(),
    )
    .await;
    let (_, plain_headers, plain) = get(&a.router, "/api/workers/w1/labs", &[]).await;
    let (status, headers, zipped) = get(
        &a.router,
        "/api/workers/w1/labs",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    assert!(
        zipped.len() * 3 < plain.len(),
        "{} vs {}",
        zipped.len(),
        plain.len()
    );
    assert!(plain_headers.get(header::CONTENT_ENCODING).is_none());
}

#[tokio::test]
async fn paging_through_2500_labs_returns_each_once() {
    let a = api("api_paging", open()).await;
    for w in 0..25 {
        let labs = (0..100)
            .map(|i| {
                lab(
                    &format!("lab-{i:03}"),
                    "t",
                    if i % 4 == 0 { "STARTED" } else { "STOPPED" },
                )
            })
            .collect();
        seed(&a.store, &format!("worker-{w:02}"), labs).await;
    }
    let mut seen = std::collections::HashSet::new();
    let mut uri = "/api/labs?limit=333".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = get_json(&a.router, &uri).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for item in page["items"].as_array().expect("items") {
            let key = (
                item["worker_id"].as_str().expect("w").to_owned(),
                item["id"].as_str().expect("id").to_owned(),
            );
            assert!(seen.insert(key.clone()), "duplicate {key:?}");
        }
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/labs?limit=333&cursor={c}"),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (2500, 8));
    let (_, page) = get_json(
        &a.router,
        "/api/labs?state=STARTED&worker_id=worker-03&owner_username=alice&limit=1000",
    )
    .await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(25));
    assert_eq!(page["next_cursor"], Value::Null);
    let (_, page) = get_json(&a.router, "/api/labs").await;
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(100),
        "default limit"
    );
}

#[tokio::test]
async fn sync_status_is_served_and_404_when_never_synced() {
    let a = api("api_status", open()).await;
    a.db.db
        .collection::<bson::Document>("worker_sync_status")
        .insert_one(bson::doc! {
            "worker_id": "w1", "last_attempt_at": DateTime::from_millis(1_763_373_600_000),
            "last_success_at": null, "last_error": "CML worker w1: unreachable",
            "consecutive_failures": 1_i64, "lab_count": 0_i64, "last_duration_ms": 250_i64,
        })
        .await
        .expect("status");
    let (status, body) = get_json(&a.router, "/api/workers/w1/sync-status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["consecutive_failures"], 1);
    assert_eq!(body["last_attempt_at"], "2025-11-17T10:00:00Z");
    assert_eq!(body["last_success_at"], Value::Null);
    let (status, _) = get_json(&a.router, "/api/workers/w2/sync-status").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn static_tokens_guard_the_api_but_not_health_and_metrics() {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(b"service-token-1"));
    let a = api(
        "api_tokens",
        AuthConfig {
            mode: AuthMode::Tokens,
            token_hashes: vec![digest],
            ..AuthConfig::default()
        },
    )
    .await;
    let (status, headers, _) = get(&a.router, "/api/workers/w1/labs", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    assert_eq!(
        get(
            &a.router,
            "/api/workers/w1/labs",
            &[("authorization", "Bearer nope")]
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(
            &a.router,
            "/api/workers/w1/labs",
            &[("authorization", "Bearer service-token-1")]
        )
        .await
        .0,
        StatusCode::OK
    );
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(get(&a.router, open, &[]).await.0, StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_status() {
    let a = api("api_metrics", open()).await;
    get(&a.router, "/api/workers/w1/labs", &[]).await;
    get(&a.router, "/api/workers/w2/labs", &[]).await;
    get(&a.router, "/api/labs?limit=0", &[]).await;
    let (_, _, body) = get(&a.router, "/metrics", &[]).await;
    let text = String::from_utf8(body).expect("utf-8");
    assert!(text.contains("http_requests_total{route=\"/api/workers/{worker_id}/labs\",method=\"GET\",status=\"200\"} 2"), "{text}");
    assert!(
        text.contains("http_requests_total{route=\"/api/labs\",method=\"GET\",status=\"400\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_count{route=\"/api/labs\"} 1"),
        "{text}"
    );
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// A concrete URI for a documented path template, with valid parameter values.
fn example_uri(template: &str) -> String {
    template
        .replace("{aws_region}", "us-east-1")
        .replace("{worker_id}", "w1")
        .replace("{lab_id}", "l1")
        .replace("{request_id}", "r1")
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint() {
    let a = api("api_openapi", open()).await;
    let (status, doc) = get_json(&a.router, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let paths = doc["paths"].as_object().expect("paths");
    // The document is generated from the routes themselves (`lab_api::api::routes`); every
    // documented operation must be served, not fall through to "no such endpoint".
    let (_, routed) = lab_api::app::documented_routes();
    assert_eq!(paths.len(), routed.paths.paths.len());
    assert!(paths.len() >= 5, "{:?}", paths.keys());
    for (template, item) in paths {
        let ops = item.as_object().expect("operations");
        assert_eq!(ops.len(), 1, "one operation per path: {template}");
        let (method, op) = ops.iter().next().expect("an operation");
        let streamed = op["responses"]["200"]["content"]["text/event-stream"].is_object();
        if method == "post" {
            let resp = a
                .router
                .clone()
                .oneshot(
                    Request::builder()
                        .method("POST")
                        .uri(example_uri(template))
                        .body(Body::empty())
                        .expect("request"),
                )
                .await
                .expect("infallible");
            let status = resp.status();
            let body = to_bytes(resp.into_body(), 1 << 20).await.expect("body");
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED
                    && !String::from_utf8_lossy(&body).contains("No such endpoint"),
                "{template} is documented but not served: {status}"
            );
        } else if streamed {
            // A stream never ends: its head says it is served.
            let resp = a
                .router
                .clone()
                .oneshot(
                    Request::builder()
                        .uri(example_uri(template))
                        .body(Body::empty())
                        .expect("request"),
                )
                .await
                .expect("infallible");
            assert_eq!(resp.status(), StatusCode::OK, "{template}");
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
        } else {
            let (status, _, body) = get(&a.router, &example_uri(template), &[]).await;
            assert!(
                status == StatusCode::OK
                    || (status == StatusCode::NOT_FOUND
                        && !String::from_utf8_lossy(&body).contains("No such endpoint")),
                "{template} is documented but not served: {status}"
            );
        }
        // Every path parameter of the template is documented as such.
        let documented: Vec<&str> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let in_template: Vec<&str> = template
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(documented, in_template, "{template}");
        // ...with its rule: a schema of ours that states the pattern the handler checks.
        for p in op["parameters"].as_array().into_iter().flatten() {
            if p["in"] != "path" {
                continue;
            }
            let name = p["schema"]["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                .unwrap_or_else(|| panic!("{template}: {} has no rule: {p}", p["name"]));
            assert!(
                doc["components"]["schemas"][name]["pattern"].is_string(),
                "{template}: {name} states no pattern"
            );
        }
        // Every endpoint states its auth and the problems it can answer.
        assert!(op["security"][0]["bearer"].is_array(), "{template}");
        let codes: &[&str] = if method == "post" {
            &["200", "202", "400", "401", "404", "409", "429", "503"]
        } else if streamed {
            &["200", "400", "401", "503"]
        } else {
            &["200", "304", "400", "401", "503"]
        };
        for code in codes {
            assert!(op["responses"][*code].is_object(), "{template}: no {code}");
        }
    }
    // Every reference resolves (parameter types included).
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.iter().any(|r| r.ends_with("/Id")), "{refs:?}");
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("a schema reference");
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn cors_preflight_allows_the_configured_origin_only() {
    let db = TestDb::new("api_cors").await;
    let router = ui_origin_router(&db);
    let preflight = |origin: &'static str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/api/labs")
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .body(Body::empty())
            .expect("request")
    };
    let ok = router
        .clone()
        .oneshot(preflight("https://ui.example.com"))
        .await
        .expect("infallible");
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://ui.example.com")
    );
    let other = router
        .oneshot(preflight("https://evil.example"))
        .await
        .expect("infallible");
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

/// A store whose MongoDB never answers: every query waits for server selection (3 s).
async fn stalled(api_cfg: &ApiConfig) -> (Router, Arc<lab_api::metrics::Metrics>) {
    let client = mongodb::Client::with_uri_str(
        "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=3000&connectTimeoutMS=3000",
    )
    .await
    .expect("client");
    let cfg = MongoConfig {
        database: "stalled".into(),
        ..MongoConfig::default()
    };
    router(
        state(&client, cfg, api_cfg),
        authenticator(&open()),
        api_cfg,
    )
}

#[tokio::test]
async fn requests_past_the_timeout_get_a_503() {
    let cfg = ApiConfig {
        request_timeout: shared::duration::HumanDuration(std::time::Duration::from_millis(300)),
        ..ApiConfig::default()
    };
    let (router, metrics) = stalled(&cfg).await;
    let (status, headers, body) = get(&router, "/api/workers/w1/labs", &[]).await;
    // The store would answer "unavailable" only after its 3 s: a `timeout` problem means the
    // request timer fired first.
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/timeout")),
        "{problem}"
    );
    let text = metrics.registry.render();
    assert_eq!(
        testkit::metrics::value(&text, "http_requests_shed_total", &[("reason", "timeout")]),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn load_beyond_the_concurrency_limit_is_shed_with_503() {
    let logs = testkit::logs::Logs::capture();
    let cfg = ApiConfig {
        max_concurrent_requests: 1,
        ..ApiConfig::default()
    };
    let (router, metrics) = stalled(&cfg).await;
    let slow = tokio::spawn({
        let router = router.clone();
        async move { get(&router, "/api/workers/w1/labs", &[]).await.0 }
    });
    // On this single-threaded runtime the slow request runs until it waits for MongoDB, and it
    // takes the only slot before that: once it counts as in flight, it holds the slot.
    testkit::eventually(
        "the slow request is in flight",
        std::time::Duration::from_secs(5),
        || async { (metrics.in_flight() == 1.0).then_some(()) },
    )
    .await;
    let (status, _, body) = get(&router, "/api/workers/w2/labs", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !slow.is_finished() && metrics.in_flight() == 1.0,
        "shed while the slot was still taken, not queued behind it"
    );
    let problem: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/overloaded")),
        "{problem}"
    );
    assert_eq!(
        slow.await.expect("join"),
        StatusCode::SERVICE_UNAVAILABLE,
        "the stalled one: MongoDB unreachable"
    );
    // Each server error is logged once: the shed request at `warn`, MongoDB down at `error`.
    let failed = logs.events("request_failed");
    let of_kind =
        |kind: &str| -> Vec<&Value> { failed.iter().filter(|l| l["kind"] == kind).collect() };
    let shed: Vec<&Value> = of_kind("overloaded")
        .into_iter()
        .filter(|l| l["span"]["uri"] == "/api/workers/w2/labs")
        .collect();
    assert_eq!(shed.len(), 1, "{failed:?}");
    assert_eq!(shed[0]["level"], "WARN");
    let text = metrics.registry.render();
    assert_eq!(
        testkit::metrics::value(
            &text,
            "http_requests_shed_total",
            &[("reason", "overloaded")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        testkit::metrics::value(&text, "http_requests_shed_total", &[("reason", "timeout")]),
        None,
        "a MongoDB outage is not shedding"
    );
    let down = of_kind("unavailable");
    assert!(
        down.iter().all(|l| l["level"] == "ERROR") && !down.is_empty(),
        "{failed:?}"
    );
    assert!(
        logs.lines()
            .iter()
            .all(|l| l["level"] != "ERROR" || l["event"] == "request_failed"),
        "no second error line for the same failure"
    );
}

#[tokio::test]
async fn unknown_methods_and_paths_never_mint_new_series() {
    let a = api("api_cardinality", open()).await;
    for i in 0..50 {
        let method = format!("M{i:03}{}", "X".repeat(200));
        let req = Request::builder()
            .method(method.as_str())
            .uri(format!("/no/such/path/{i}"))
            .body(Body::empty())
            .expect("request");
        a.router.clone().oneshot(req).await.expect("infallible");
    }
    let (_, _, body) = get(&a.router, "/metrics", &[]).await;
    let text = String::from_utf8(body).expect("utf-8");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    assert!(series.len() <= 2, "{series:?}");
    assert!(
        text.contains(
            "http_requests_total{route=\"unmatched\",method=\"other\",status=\"404\"} 50"
        ),
        "{text}"
    );
    assert!(
        !text.contains("M000") && !text.contains("/no/such"),
        "{text}"
    );
}

#[tokio::test]
async fn the_concurrency_limit_holds_for_the_service_not_per_route() {
    let cfg = ApiConfig {
        max_concurrent_requests: 2,
        ..ApiConfig::default()
    };
    let (router, metrics) = stalled(&cfg).await;
    // Two slow requests on two different routes take both slots...
    let slow: Vec<_> = ["/api/workers/w1/labs", "/api/workers/w1/sync-status"]
        .into_iter()
        .map(|uri| {
            let router = router.clone();
            tokio::spawn(async move { get(&router, uri, &[]).await.0 })
        })
        .collect();
    testkit::eventually(
        "both slow requests are in flight",
        std::time::Duration::from_secs(5),
        || async { (metrics.in_flight() == 2.0).then_some(()) },
    )
    .await;
    // ...so a request on a third route is shed at once.
    let (status, _, body) = get(&router, "/api/labs", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/overloaded")),
        "{problem}"
    );
    assert!(slow.iter().all(|s| !s.is_finished()));
    for s in slow {
        s.abort();
    }
}

#[tokio::test]
async fn a_worker_with_more_labs_than_one_response_carries_gets_a_problem_document() {
    let db = TestDb::new("api_too_many_labs").await;
    let store = LabStore::new(&db.client, &mongo_config(&db), 50);
    store.ensure_indexes().await.expect("indexes");
    let cfg = ApiConfig {
        max_labs_per_response: 10,
        ..ApiConfig::default()
    };
    let (router, _) = router(
        state(&db.client, mongo_config(&db), &cfg),
        authenticator(&open()),
        &cfg,
    );
    let labs = |n: usize| -> Vec<ObservedLab> {
        (0..n)
            .map(|i| lab(&format!("l{i:02}"), "t", "STOPPED"))
            .collect()
    };
    seed(&store, "ten", labs(10)).await;
    seed(&store, "eleven", labs(11)).await;
    let (status, body) = get_json(&router, "/api/workers/ten/labs").await;
    assert_eq!(
        (status, body.as_array().map(Vec::len)),
        (StatusCode::OK, Some(10))
    );
    for uri in [
        "/api/workers/eleven/labs",
        "/api/labs/region/us-east-1/workers/eleven/labs",
    ] {
        let (status, headers, body) = get(&router, uri, &[]).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}");
        assert_eq!(
            headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let problem: Value = serde_json::from_slice(&body).expect("json");
        let detail = problem["detail"].as_str().expect("detail");
        assert!(
            detail.contains("more than 10 labs") && detail.contains("/api/labs?worker_id=eleven"),
            "{detail}"
        );
    }
    // The paged listing serves them all.
    let (_, page) = get_json(&router, "/api/labs?worker_id=eleven&limit=1000").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(11));
}

/// What sync-daemon does after each cycle for the fleet view: the registry's fields copied
/// into the statuses (a worker never synced gets a document without a sync).
async fn copy_registry_in(db: &mongodb::Database) {
    let workers = shared::registry::WorkerRegistry::new(db, "cml_workers")
        .all()
        .await
        .expect("registry");
    let rows = shared::status::SyncStatusReader::new(db, "worker_sync_status")
        .fleet_rows()
        .await
        .expect("rows");
    let changes = shared::fleet::reconcile(&workers, rows).changes;
    let statements: Vec<bson::Document> = changes.iter().map(|c| c.statement()).collect();
    shared::mongo::update_command(db, "worker_sync_status", statements, |_| false)
        .await
        .expect("registry fields");
}

/// The workers of the fleet-view test, most urgent first.
const URGENT_FIRST: [&str; 6] = [
    "failing",
    "never",
    "stale",
    "stopped",
    "static-only",
    "healthy",
];

#[tokio::test]
async fn the_fleet_view_lists_every_known_worker_most_urgent_first() {
    let a = api("api_fleet", open()).await;
    let now = DateTime::now().timestamp_millis();
    let ago = |minutes: i64| DateTime::from_millis(now - minutes * 60_000);
    let workers: Vec<bson::Document> = [
        ("healthy", "running", "us-east-1"),
        ("failing", "running", "us-east-1"),
        ("stale", "running", "eu-west-1"),
        ("never", "running", "eu-west-1"),
        ("stopped", "stopped", "eu-west-1"),
    ]
    .into_iter()
    .map(|(id, status, region)| {
        bson::doc! { "id": id, "name": format!("cml-{id}"), "aws_region": region, "status": status, "https_endpoint": "https://10.0.0.1" }
    })
    .collect();
    a.db.db
        .collection::<bson::Document>("cml_workers")
        .insert_many(workers)
        .await
        .expect("registry");
    let status = |id: &str, success: Option<i64>, failures: i64| {
        bson::doc! {
            "worker_id": id, "last_attempt_at": ago(1), "last_success_at": success.map(ago),
            "last_error": (failures > 0).then_some("CML worker: unreachable"),
            "consecutive_failures": failures, "lab_count": 4_i64, "last_duration_ms": 120_i64,
        }
    };
    a.db.db
        .collection::<bson::Document>("worker_sync_status")
        .insert_many([
            status("healthy", Some(5), 0),
            status("failing", Some(20), 3),
            status("stale", Some(24 * 60), 0),
            status("stopped", Some(48 * 60), 0),
            status("static-only", Some(10), 0),
        ])
        .await
        .expect("statuses");
    copy_registry_in(&a.db.db).await;
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["worker_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let (status_code, page) = get_json(&a.router, "/api/sync-status").await;
    assert_eq!(status_code, StatusCode::OK);
    assert_eq!(ids(&page), URGENT_FIRST);
    let failing = &page["items"][0];
    assert_eq!(failing["consecutive_failures"], 3);
    assert_eq!(failing["failing"], true);
    assert_eq!(failing["name"], "cml-failing");
    assert_eq!(failing["registry_status"], "running");
    assert_eq!(page["items"][1]["last_success_at"], Value::Null);
    assert_eq!(page["items"][1]["last_attempt_at"], Value::Null);
    assert_eq!(page["items"][1]["name"], "cml-never");
    // Its document holds only the registry's fields: still never synced.
    let (status_code, _) = get_json(&a.router, "/api/workers/never/sync-status").await;
    assert_eq!(status_code, StatusCode::NOT_FOUND);
    assert_eq!(page["items"][4]["registry_status"], Value::Null);
    let (_, stale) = get_json(&a.router, "/api/sync-status?stale=true").await;
    assert_eq!(ids(&stale), ["never", "stale", "stopped"]);
    let (_, failing) = get_json(&a.router, "/api/sync-status?failing=true").await;
    assert_eq!(ids(&failing), ["failing"]);
    let (_, eu) = get_json(&a.router, "/api/sync-status?region=eu-west-1&stale=true").await;
    assert_eq!(ids(&eu), ["never", "stale", "stopped"]);
    // Paged two at a time, every worker once, in the same order.
    let mut seen = Vec::new();
    let mut uri = "/api/sync-status?limit=2".to_owned();
    loop {
        let (_, page) = get_json(&a.router, &uri).await;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/sync-status?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, URGENT_FIRST);
    // An ETag, and 304 while nothing changed.
    let (_, headers, _) = get(&a.router, "/api/sync-status", &[]).await;
    let etag = headers[header::ETAG].to_str().expect("ascii").to_owned();
    let (status_code, _, _) = get(&a.router, "/api/sync-status", &[("if-none-match", &etag)]).await;
    assert_eq!(status_code, StatusCode::NOT_MODIFIED);
    for (uri, param) in [
        ("/api/sync-status?stale=yes", "stale"),
        ("/api/sync-status?region=US_EAST", "region"),
        ("/api/sync-status?cursor=abc", "cursor"),
        ("/api/sync-status?limit=0", "limit"),
        ("/api/sync-status?worker=x", "worker"),
    ] {
        let (status_code, problem) = get_json(&a.router, uri).await;
        assert_eq!(status_code, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(problem["param"], param, "{uri}");
    }
}

#[tokio::test]
async fn the_live_page_is_served_with_a_policy_that_allows_only_this_origin() {
    let a = api("api_live_page", open()).await;
    for (path, kind) in [
        ("/", "text/html"),
        ("/live.js", "text/javascript"),
        ("/live.css", "text/css"),
    ] {
        let (status, headers, body) = get(&a.router, path, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let content_type = headers["content-type"].to_str().expect("ascii");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        let policy = headers["content-security-policy"].to_str().expect("ascii");
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(!body.is_empty());
    }
}

#[tokio::test]
async fn a_refresh_sent_by_a_page_of_another_site_is_refused() {
    let db = TestDb::new("api_cross_site").await;
    let router = ui_origin_router(&db);
    let post = |headers: &[(&'static str, &'static str)]| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/api/workers/w1/labs/refresh")
            .header("host", "labs.example.com");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        router
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
    };
    let status = |r: axum::response::Response| r.status();
    for foreign in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", "https://labs.example.com.evil.example")],
    ] {
        let r = post(&foreign).await.expect("infallible");
        assert_eq!(status(r), StatusCode::FORBIDDEN, "{foreign:?}");
    }
    // The same site, the UI's listed origin, and clients that are no browser reach the handler
    // (the worker is unknown there: 404).
    for fine in [
        vec![
            ("origin", "https://labs.example.com"),
            ("sec-fetch-site", "same-origin"),
        ],
        vec![
            ("origin", "https://ui.example.com"),
            ("sec-fetch-site", "cross-site"),
        ],
        vec![],
    ] {
        let r = post(&fine).await.expect("infallible");
        assert_eq!(status(r), StatusCode::NOT_FOUND, "{fine:?}");
    }
    // Reads are not affected.
    let (s, _, _) = get(&router, "/api/labs", &[("origin", "https://evil.example")]).await;
    assert_eq!(s, StatusCode::OK);
}
