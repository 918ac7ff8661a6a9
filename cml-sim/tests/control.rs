//! The simulator's HTTP control API drives the same state the CML API serves.

use axum::{
    body::{to_bytes, Body},
    http::{Request, StatusCode},
    Router,
};
use cml_sim::{control, Fleet, FleetConfig, Personality};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn labs_faults_and_tokens_are_controlled_over_http() {
    let fleet = Fleet::generate(&FleetConfig {
        workers: 2,
        labs_per_worker: 3,
        personalities: vec![Personality::V2_9],
        ..FleetConfig::default()
    });
    let app = control::router(fleet.clone(), Default::default());
    let w = fleet.workers[0].clone();

    let (status, workers) = call(&app, "GET", "/workers", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(workers.as_array().map(Vec::len), Some(2));

    let (status, lab) = call(
        &app,
        "POST",
        &format!("/workers/{}/labs", w.id),
        Some(json!({"title": "New lab", "state": "STOPPED"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let lab_id = lab["id"].as_str().expect("id").to_owned();
    assert_eq!(w.lab(&lab_id).map(|l| l.title), Some("New lab".into()));

    let (status, _) = call(
        &app,
        "PATCH",
        &format!("/workers/{}/labs/{lab_id}", w.id),
        Some(json!({"state": "STARTED", "node_count": 9})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let l = w.lab(&lab_id).expect("exists");
    assert_eq!((l.state.as_str(), l.node_count), ("STARTED", 9));
    assert!(l.modified >= l.created);

    let (status, _) = call(
        &app,
        "PATCH",
        &format!("/workers/{}/labs/{lab_id}", w.id),
        Some(json!({"state": "BOOTED"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "BOOTED is a node state");

    let (status, _) = call(
        &app,
        "PUT",
        &format!("/workers/{}/faults", w.id),
        Some(json!({"latency_ms": 50, "bulk_missing": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(w.faults().bulk_missing);
    let (status, _) = call(
        &app,
        "PUT",
        &format!("/workers/{}/faults", w.id),
        Some(json!({"error_rate": 2.0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &app,
        "PUT",
        &format!("/workers/{}/faults", w.id),
        Some(json!({"explode": true})),
    )
    .await;
    assert!(status.is_client_error(), "unknown fault names are refused");
    call(&app, "DELETE", &format!("/workers/{}/faults", w.id), None).await;
    assert_eq!(w.faults(), cml_sim::Faults::default());

    // Sharing a lab: by group name, made on the server when new; the lab's time stays.
    let modified = w.lab(&lab_id).expect("exists").modified;
    let (status, lab) = call(
        &app,
        "PUT",
        &format!("/workers/{}/labs/{lab_id}/groups", w.id),
        Some(json!([{"name": "netops"}, {"name": "brand-new", "permissions": ["lab_admin"]}])),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{lab}");
    let l = w.lab(&lab_id).expect("exists");
    let shared: Vec<(&str, &[String])> = l
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.permissions.as_slice()))
        .collect();
    assert_eq!(
        shared,
        [
            ("netops", &["lab_view".to_owned()][..]),
            ("brand-new", &["lab_admin".to_owned()][..])
        ]
    );
    assert_eq!(l.groups[1].id, w.group_named("brand-new"));
    assert_eq!(l.modified, modified);
    for (body, want) in [
        (
            json!([{"name": "x", "permissions": ["root"]}]),
            StatusCode::BAD_REQUEST,
        ),
        (json!([{"name": " "}]), StatusCode::BAD_REQUEST),
        (json!({"name": "x"}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (status, _) = call(
            &app,
            "PUT",
            &format!("/workers/{}/labs/{lab_id}/groups", w.id),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, want, "{body}");
    }
    let (status, _) = call(
        &app,
        "PUT",
        &format!("/workers/{}/labs/nope/groups", w.id),
        Some(json!([])),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Event streams: listed per worker, dropped on demand.
    let (_, workers) = call(&app, "GET", "/workers", None).await;
    assert_eq!(workers[0]["event_stream"], true);
    assert_eq!(workers[0]["open_streams"], 0);
    let mut dropped = w.streams_epoch();
    let (status, _) = call(
        &app,
        "POST",
        &format!("/workers/{}/drop-streams", w.id),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(dropped.has_changed().unwrap_or(false));
    dropped.mark_unchanged();

    let epoch = w.token_epoch();
    call(
        &app,
        "POST",
        &format!("/workers/{}/expire-tokens", w.id),
        None,
    )
    .await;
    assert_eq!(w.token_epoch(), epoch + 1);

    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/workers/{}/labs/{lab_id}", w.id),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(w.lab(&lab_id).is_none());
    let (status, _) = call(&app, "GET", "/workers/nope/labs", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, changed) = call(&app, "POST", "/churn", Some(json!({"share": 1.0}))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(changed["changed"].as_u64().is_some());
}
