//! Bearer JWTs verified against a JWKS served locally by the test, with keys it generates.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
    Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lab_api::{
    app::router,
    auth::{Authenticator, JwksPolicy},
    state::AppState,
};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rsa::{pkcs1::EncodeRsaPrivateKey, traits::PublicKeyParts, RsaPrivateKey};
use serde_json::{json, Value};
use shared::config::{ApiConfig, AuthConfig, AuthMode, Config, MongoConfig};
use testkit::TestDb;
use tower::ServiceExt;

const ISSUER: &str = "https://sso.example.com/realms/cml";
const AUDIENCE: &str = "cml-labs-api";

struct Rsa {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn rsa_key(kid: &str) -> Rsa {
    let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA key");
    let der = key.to_pkcs1_der().expect("pkcs1");
    let jwk = json!({
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    });
    Rsa {
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk,
    }
}

fn ec_key(kid: &str) -> (EncodingKey, Value) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("EC key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("EC pair");
    let public = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
    });
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn token(alg: Algorithm, kid: &str, key: &EncodingKey, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn claims() -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "exp": now() + 300, "iat": now(),
        "preferred_username": "alice", "realm_access": { "roles": ["viewer", "admin"] },
    })
}

/// A local identity provider: serves a JWKS that the test can change, counting fetches; it
/// can be made to hang (accept the request, never answer).
struct Idp {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    hang: Arc<std::sync::atomic::AtomicBool>,
    url: String,
}

async fn idp(keys: Vec<Value>) -> Idp {
    let keys = Arc::new(Mutex::new(keys));
    let fetches = Arc::new(AtomicUsize::new(0));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (k, f, h) = (keys.clone(), fetches.clone(), hang.clone());
    let app = Router::new().route(
        "/realms/cml/protocol/openid-connect/certs",
        axum::routing::get(move || {
            let (k, f, h) = (k.clone(), f.clone(), h.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                if h.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                axum::Json(json!({ "keys": *k.lock().expect("lock") }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/realms/cml/protocol/openid-connect/certs",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Idp {
        keys,
        fetches,
        hang,
        url,
    }
}

/// Fetch at most every 300 ms on demand; no timed background refresh during a test.
fn quick() -> JwksPolicy {
    JwksPolicy {
        min_refresh_interval: Duration::from_millis(300),
        max_wait: Duration::from_secs(1),
        refresh_every: Duration::from_secs(3600),
        retry_after_failure: Duration::from_secs(3600),
    }
}

async fn api(db: &TestDb, jwks_url: &str) -> Router {
    api_with(db, jwks_url, JwksPolicy::default()).await
}

async fn api_with(db: &TestDb, jwks_url: &str, policy: JwksPolicy) -> Router {
    let config = Config {
        mongodb: MongoConfig {
            database: db.name().to_owned(),
            ..MongoConfig::default()
        },
        ..Config::default()
    };
    let state = AppState::from_config(&config, &db.client);
    let auth = AuthConfig {
        mode: AuthMode::Jwt,
        jwks_url: jwks_url.into(),
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        token_hashes: vec![],
        tokens: vec![],
        cookie_name: COOKIE.into(),
    };
    router(
        state,
        Arc::new(Authenticator::with_policy(
            &auth,
            &shared::config::AccessConfig::default(),
            reqwest::Client::new(),
            policy,
        )),
        &ApiConfig::default(),
    )
    .0
}

/// The cookie the API takes the token from when no `Authorization` header carries one.
const COOKIE: &str = "cml_access_token";

async fn status(router: &Router, bearer: Option<&str>) -> (StatusCode, Value) {
    answer(
        router,
        bearer.map(|t| ("authorization", format!("Bearer {t}"))),
    )
    .await
}

/// The same request with the token in the cookie, among others, and no header.
async fn status_by_cookie(router: &Router, token: &str) -> (StatusCode, Value) {
    answer(
        router,
        Some(("cookie", format!("theme=dark; {COOKIE}={token}"))),
    )
    .await
}

async fn answer(router: &Router, header: Option<(&str, String)>) -> (StatusCode, Value) {
    let mut req = Request::builder().uri("/api/workers/w1/labs");
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_tokens_pass_and_bad_ones_get_401() {
    let rsa = rsa_key("rsa-1");
    let (ec, ec_jwk) = ec_key("ec-1");
    let provider = idp(vec![rsa.jwk.clone(), ec_jwk]).await;
    let db = TestDb::new("api_jwt").await;
    let router = api(&db, &provider.url).await;

    assert_eq!(
        status(&router, None).await.0,
        StatusCode::UNAUTHORIZED,
        "no token"
    );
    assert_eq!(
        status(
            &router,
            Some(&token(Algorithm::RS256, &rsa.kid, &rsa.encoding, claims()))
        )
        .await
        .0,
        StatusCode::OK,
        "RS256"
    );
    assert_eq!(
        status(
            &router,
            Some(&token(Algorithm::ES256, "ec-1", &ec, claims()))
        )
        .await
        .0,
        StatusCode::OK,
        "ES256"
    );
    assert_eq!(
        status_by_cookie(
            &router,
            &token(Algorithm::RS256, &rsa.kid, &rsa.encoding, claims())
        )
        .await
        .0,
        StatusCode::OK,
        "in the cookie"
    );

    let impostor = rsa_key("rsa-1");
    let forged = token(Algorithm::RS256, "rsa-1", &impostor.encoding, claims());
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let mut wrong_aud = claims();
    wrong_aud["aud"] = json!("another-api");
    let mut wrong_iss = claims();
    wrong_iss["iss"] = json!("https://evil.example");
    let hs = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(b"guess")).expect("sign")
    };
    let cases = [
        ("bad signature", forged, "signature"),
        (
            "expired",
            token(Algorithm::RS256, &rsa.kid, &rsa.encoding, expired),
            "expired",
        ),
        (
            "wrong audience",
            token(Algorithm::RS256, &rsa.kid, &rsa.encoding, wrong_aud),
            "audience",
        ),
        (
            "wrong issuer",
            token(Algorithm::RS256, &rsa.kid, &rsa.encoding, wrong_iss),
            "issuer",
        ),
        ("HS256", hs, "RS256"),
        ("garbage", "not.a.jwt".to_owned(), "JWT"),
    ];
    for (name, t, why) in cases {
        for (code, problem) in [
            status(&router, Some(&t)).await,
            status_by_cookie(&router, &t).await,
        ] {
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{name}");
            assert!(
                problem["detail"].as_str().is_some_and(|d| d.contains(why)),
                "{name}: {problem}"
            );
        }
    }
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        1,
        "keys are cached"
    );
}

/// Polls with `bearer` until it is accepted (at most 10 s).
async fn until_accepted(router: &Router, bearer: &str) {
    testkit::eventually("the token is accepted", Duration::from_secs(10), || async {
        (status(router, Some(bearer)).await.0 == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_and_unknown_kids_cost_at_most_a_fetch_a_period() {
    let first = rsa_key("k1");
    let provider = idp(vec![first.jwk.clone()]).await;
    let db = TestDb::new("api_jwt_rotation").await;
    let router = api_with(&db, &provider.url, quick()).await;
    until_accepted(
        &router,
        &token(Algorithm::RS256, "k1", &first.encoding, claims()),
    )
    .await;
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        1,
        "one fetch at start"
    );

    // The identity provider rotates in a new key: a token naming it triggers a fetch.
    let second = rsa_key("k2");
    provider.keys.lock().expect("lock").push(second.jwk.clone());
    until_accepted(
        &router,
        &token(Algorithm::RS256, "k2", &second.encoding, claims()),
    )
    .await;
    assert_eq!(provider.fetches.load(Ordering::SeqCst), 2);

    // A burst of tokens naming keys nobody has costs at most one fetch per period.
    // Signed first, sent together: the burst lands within one period.
    let tokens: Vec<String> = (0..50)
        .map(|i| {
            token(
                Algorithm::RS256,
                &format!("made-up-{i}"),
                &second.encoding,
                claims(),
            )
        })
        .collect();
    let burst: Vec<_> = tokens
        .into_iter()
        .map(|t| {
            let router = router.clone();
            tokio::spawn(async move { status(&router, Some(&t)).await.0 })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.expect("joined"), StatusCode::UNAUTHORIZED);
    }
    assert!(
        provider.fetches.load(Ordering::SeqCst) <= 3,
        "one more fetch at most"
    );
    // Known keys were never refetched for.
    assert_eq!(
        status(
            &router,
            Some(&token(Algorithm::RS256, "k1", &first.encoding, claims()))
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_kids_never_starves_a_real_rotation() {
    let first = rsa_key("k1");
    let provider = idp(vec![first.jwk.clone()]).await;
    let db = TestDb::new("api_jwt_flood").await;
    let router = api_with(&db, &provider.url, quick()).await;
    until_accepted(
        &router,
        &token(Algorithm::RS256, "k1", &first.encoding, claims()),
    )
    .await;
    // An attacker keeps naming made-up keys, hundreds of them...
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let fetches_before = provider.fetches.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let flood = {
        let (router, stop, sent, enc) = (
            router.clone(),
            stop.clone(),
            sent.clone(),
            first.encoding.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let i = sent.fetch_add(1, Ordering::SeqCst);
                let t = token(Algorithm::RS256, &format!("attack-{i}"), &enc, claims());
                status(&router, Some(&t)).await;
            }
        })
    };
    testkit::eventually("200 made-up keys sent", Duration::from_secs(30), || async {
        (sent.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;
    // ...while the identity provider genuinely rotates: the new key is accepted all the same.
    let rotated = rsa_key("k-rotated");
    provider
        .keys
        .lock()
        .expect("lock")
        .push(rotated.jwk.clone());
    until_accepted(
        &router,
        &token(Algorithm::RS256, "k-rotated", &rotated.encoding, claims()),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    flood.await.expect("joined");
    let sent = sent.load(Ordering::SeqCst);
    let fetches = provider.fetches.load(Ordering::SeqCst) - fetches_before;
    // At most one fetch per period (plus the one a period may start with), however many keys.
    let periods = started.elapsed().as_secs_f64() / quick().min_refresh_interval.as_secs_f64();
    assert!(
        (fetches as f64) <= periods + 1.0,
        "{fetches} fetches in {periods:.1} periods for {sent} made-up keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_identity_provider_never_holds_up_known_keys() {
    let key = rsa_key("k1");
    let provider = idp(vec![key.jwk.clone()]).await;
    let db = TestDb::new("api_jwt_hang").await;
    let router = api_with(&db, &provider.url, quick()).await;
    let known = token(Algorithm::RS256, "k1", &key.encoding, claims());
    until_accepted(&router, &known).await;
    // The identity provider stops answering; a token naming an unknown key sets a fetch off.
    provider.hang.store(true, Ordering::SeqCst);
    let before = provider.fetches.load(Ordering::SeqCst);
    // Within a period of the last fetch an unknown key is refused at once; the first one past
    // it starts a fetch, and waits for it.
    let unknown = loop {
        let pending = {
            let (router, t) = (
                router.clone(),
                token(Algorithm::RS256, "k-new", &key.encoding, claims()),
            );
            tokio::spawn(async move { status(&router, Some(&t)).await })
        };
        let fetched = testkit::eventually(
            "a fetch starts, or the request is refused",
            Duration::from_secs(10),
            || async {
                if provider.fetches.load(Ordering::SeqCst) > before {
                    Some(true)
                } else {
                    pending.is_finished().then_some(false)
                }
            },
        )
        .await;
        if fetched {
            break pending;
        }
    };
    // A known key is served while that fetch hangs: nothing queues behind it.
    assert_eq!(status(&router, Some(&known)).await.0, StatusCode::OK);
    assert!(
        !unknown.is_finished(),
        "the unknown key still waits for the fetch"
    );
    // The unknown key's wait is bounded, and the answer names the right cause.
    let (code, problem) = unknown.await.expect("joined");
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/auth-unavailable")),
        "{problem}"
    );
    let detail = problem["detail"].as_str().expect("detail");
    assert!(detail.contains("identity provider"), "{detail}");
    assert!(!detail.contains("lab store"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_identity_provider_is_a_503_not_a_401() {
    let key = rsa_key("k1");
    let db = TestDb::new("api_jwt_down").await;
    let router = api(&db, "http://127.0.0.1:9/certs").await;
    let (code, problem) = status(
        &router,
        Some(&token(Algorithm::RS256, "k1", &key.encoding, claims())),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !problem.to_string().contains("127.0.0.1:9"),
        "no internals in 5xx bodies: {problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("identity provider")),
        "the right cause: {problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_username_claim_names_the_caller_and_a_bad_one_is_a_403_naming_it() {
    let rsa = rsa_key("rsa-1");
    let provider = idp(vec![rsa.jwk.clone()]).await;
    let db = TestDb::new("api_jwt_identity").await;
    let router = api(&db, &provider.url).await;
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        token(Algorithm::RS256, &rsa.kid, &rsa.encoding, c)
    };
    for (why, bad) in [
        (
            "absent",
            with(&|c| drop(c.as_object_mut().map(|o| o.remove("preferred_username")))),
        ),
        ("a number", with(&|c| c["preferred_username"] = json!(7))),
        (
            "an object",
            with(&|c| c["preferred_username"] = json!({ "$ne": "" })),
        ),
        (
            "a list",
            with(&|c| c["preferred_username"] = json!(["alice"])),
        ),
        ("empty", with(&|c| c["preferred_username"] = json!(""))),
        (
            "10 KB",
            with(&|c| c["preferred_username"] = json!("a".repeat(10_000))),
        ),
        (
            "with a NUL",
            with(&|c| c["preferred_username"] = json!("ali\u{0}ce")),
        ),
    ] {
        let (status, body) = status(&router, Some(&bad)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("`preferred_username`"),
            "{why}: {body}"
        );
    }
    // A user with no account anywhere (even one named like an operator or a pattern) sees
    // an empty answer, not an error; the fleet's admins see everything.
    for name in ["nobody", "{\"$gt\": \"\"}", ".*", "a|b", "$where"] {
        let t = with(&|c| {
            c["preferred_username"] = json!(name);
            c["realm_access"] = json!({ "roles": ["viewer"] });
        });
        let (status, body) = status(&router, Some(&t)).await;
        assert_eq!((status, body), (StatusCode::OK, json!([])), "{name}");
        let (status, _) = answer(&router, Some(("authorization", format!("Bearer {t}")))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let admin = with(&|c| c["realm_access"] = json!({ "roles": "admin" }));
    assert_eq!(status(&router, Some(&admin)).await.0, StatusCode::OK);
}
