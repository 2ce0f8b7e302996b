//! Plans, entitlements and usage through the real server on both backends:
//! the catalog, check / consume / release with idempotency, entitlements
//! with ETag, events counted by meters before their 2xx, plan changes over
//! time, grants and overrides, and hard limits under concurrency across two
//! nodes.

mod common;

use std::sync::Arc;

use flywheel_client::Client;
use flywheel_domain::clock::{ManualClock, SharedClock, SystemClock};
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::call;

flywheel_store::for_each_backend!(
    the_catalog_is_validated_versioned_and_secret,
    check_consume_release_and_entitlements,
    a_tracked_event_is_counted_by_the_very_next_check,
    concurrent_consumes_across_two_nodes_grant_exactly_the_limit,
    plan_changes_follow_the_clock,
    grants_and_overrides_change_one_org,
    bad_requests_get_clear_errors,
);

struct App {
    _server: RunningServer,
    db: TestDatabase,
    secret: Client,
    secret_key: String,
    publishable: Client,
}

async fn spawn_with(backend: Backend, clock: SharedClock) -> App {
    let db = TestDatabase::create(backend).await;
    let started = common::start(common::test_settings(&db), clock).await;
    let secret_key = started
        .server
        .bootstrap
        .as_ref()
        .unwrap()
        .secret_key
        .plaintext
        .clone();
    App {
        secret: started.secret,
        secret_key,
        publishable: started.publishable,
        _server: started.server,
        db,
    }
}

async fn spawn(backend: Backend) -> App {
    spawn_with(backend, Arc::new(SystemClock)).await
}

fn catalog() -> Value {
    json!({
        "features": [
            {"key": "api_calls", "name": "API calls", "kind": "metered"},
            {"key": "projects", "name": "Projects", "kind": "metered"},
            {"key": "sso", "name": "Single sign-on", "kind": "boolean"},
            {"key": "export", "kind": "config"}
        ],
        "meters": [
            {"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT"}
        ],
        "plans": [
            {"key": "free", "name": "Free", "default": true, "features": {
                "api_calls": {"limit": 10},
                "projects": {"limit": 3, "reset": "never"},
                "export": {"value": {"max_rows": 100}}
            }},
            {"key": "pro", "name": "Pro", "price": {"amount": 2900, "currency": "usd"},
             "stripe_price_ids": ["price_pro"],
             "features": {
                "api_calls": {"limit": 1000, "hard": false},
                "projects": {"limit": 20, "reset": "never"},
                "sso": {},
                "export": {"value": {"max_rows": 10000}}
            }}
        ]
    })
}

async fn with_catalog(app: &App) {
    let (status, body) = call(&app.secret, Method::PUT, "/v1/catalog", Some(catalog())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn consume(
    client: &Client,
    org: &str,
    feature: &str,
    amount: i64,
    key: &str,
) -> (StatusCode, Value) {
    call(
        client,
        Method::POST,
        "/v1/consume",
        Some(json!({"org_id": org, "feature": feature, "amount": amount, "idempotency_key": key})),
    )
    .await
}

async fn check(client: &Client, org: &str, feature: &str) -> Value {
    let (status, body) = call(
        client,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": org, "feature": feature})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn the_catalog_is_validated_versioned_and_secret(backend: Backend) {
    let app = spawn(backend).await;
    let (status, body) = call(&app.secret, Method::GET, "/v1/catalog", None).await;
    assert_eq!(
        (status, body["version"].clone()),
        (StatusCode::OK, json!(0))
    );
    let mut broken = catalog();
    broken["plans"][0]["features"]["sso"] = json!({"limit": 3});
    broken["meters"][0]["feature"] = json!("nope");
    let (status, body) = call(&app.secret, Method::PUT, "/v1/catalog", Some(broken)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_catalog");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/meters/0/feature") && message.contains("/plans/0/features/sso"),
        "{message}"
    );
    let (status, body) = call(
        &app.secret,
        Method::PUT,
        "/v1/catalog",
        Some(json!({"plans": [], "extra": 1})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    with_catalog(&app).await;
    let (_, body) = call(&app.secret, Method::GET, "/v1/catalog", None).await;
    assert_eq!(body["version"], 1);
    assert_eq!(body["catalog"]["plans"][1]["key"], "pro");
    let (_, body) = call(&app.secret, Method::GET, "/v1/catalog/versions", None).await;
    assert_eq!(body["versions"].as_array().unwrap().len(), 1);
    assert!(body["versions"][0]["actor"]
        .as_str()
        .unwrap()
        .starts_with("key:"));
    let (status, _) = call(&app.publishable, Method::GET, "/v1/catalog", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        &app.publishable,
        Method::PUT,
        "/v1/catalog",
        Some(catalog()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn check_consume_release_and_entitlements(backend: Backend) {
    let app = spawn(backend).await;
    with_catalog(&app).await;
    // An org never seen is on the default plan.
    let fresh = check(&app.publishable, "acme", "projects").await;
    assert_eq!(
        (
            fresh["allowed"].clone(),
            fresh["plan"].clone(),
            fresh["used"].clone(),
            fresh["limit"].clone()
        ),
        (json!(true), json!("free"), json!(0), json!(3))
    );
    assert_eq!(
        (fresh["period_start"].clone(), fresh["resets_at"].clone()),
        (Value::Null, Value::Null)
    );
    let (status, body) = consume(&app.secret, "acme", "projects", 2, "p-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["allowed"].clone(),
            body["used"].clone(),
            body["remaining"].clone()
        ),
        (json!(true), json!(2), json!(1))
    );
    // The same key again: the first answer, counted once.
    let (_, again) = consume(&app.secret, "acme", "projects", 2, "p-1").await;
    assert_eq!(again, body);
    let (status, body) = consume(&app.secret, "acme", "projects", 5, "p-1").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_reused"))
    );
    // Past the hard limit: refused, nothing taken.
    let (status, body) = consume(&app.secret, "acme", "projects", 2, "p-2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["allowed"].clone(),
            body["reason"].clone(),
            body["used"].clone()
        ),
        (json!(false), json!("limit_reached"), json!(2))
    );
    // With a preview for the upgrade prompt.
    let (_, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": "acme", "feature": "projects", "required": 2, "with_preview": true})),
    )
    .await;
    assert_eq!(body["allowed"], false);
    assert_eq!(body["preview"]["feature_name"], "Projects");
    assert_eq!(body["preview"]["usage_text"], "used 2 of 3");
    assert_eq!(body["preview"]["upgrade_plan"]["key"], "pro");
    // Release gives units back.
    let (status, body) = call(
        &app.secret,
        Method::POST,
        "/v1/release",
        Some(
            json!({"org_id": "acme", "feature": "projects", "amount": 1, "idempotency_key": "r-1"}),
        ),
    )
    .await;
    assert_eq!((status, body["used"].clone()), (StatusCode::OK, json!(1)));
    // Other kinds and reasons.
    let sso = check(&app.publishable, "acme", "sso").await;
    assert_eq!(
        (
            sso["allowed"].clone(),
            sso["reason"].clone(),
            sso["kind"].clone()
        ),
        (json!(false), json!("not_in_plan"), json!("boolean"))
    );
    let export = check(&app.publishable, "acme", "export").await;
    assert_eq!(export["value"], json!({"max_rows": 100}));
    let unknown = check(&app.publishable, "acme", "teleport").await;
    assert_eq!(
        (unknown["reason"].clone(), unknown["kind"].clone()),
        (json!("unknown_feature"), Value::Null)
    );
    // Entitlements: every feature, with an ETag that changes with usage.
    let response = app
        .publishable
        .request(Method::GET, "/v1/orgs/acme/entitlements")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["plan"], "free");
    let features: Vec<&str> = body["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["feature"].as_str().unwrap())
        .collect();
    assert_eq!(features, ["api_calls", "projects", "sso", "export"]);
    let unchanged = app
        .publishable
        .request(Method::GET, "/v1/orgs/acme/entitlements")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);
    consume(&app.secret, "acme", "projects", 1, "p-3").await;
    let changed = app
        .publishable
        .request(Method::GET, "/v1/orgs/acme/entitlements")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    // Only secret keys consume.
    let (status, _) = consume(&app.publishable, "acme", "projects", 1, "p-4").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn a_tracked_event_is_counted_by_the_very_next_check(backend: Backend) {
    let app = spawn(backend).await;
    with_catalog(&app).await;
    for i in 0..3 {
        let (status, body) = call(
            &app.publishable,
            Method::POST,
            "/v1/events",
            Some(json!({"batch": [
                {"type": "track", "event": "api_call", "user_id": "u1", "org_id": "acme"},
                {"type": "track", "event": "api_call", "user_id": "u1"}
            ]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // No wait, no poll: the 2xx means the usage is committed and cached.
        let answer = check(&app.publishable, "acme", "api_calls").await;
        assert_eq!(
            answer["used"],
            i + 1,
            "events without an org are not metered"
        );
    }
    // A retried event (same id) counts once.
    let event = json!({"batch": [{"type": "track", "event": "api_call", "user_id": "u1", "org_id": "globex",
                                 "event_id": "0192f1e4-7c2a-7cc4-8f3e-7d5b8f0a1b2c"}]});
    for _ in 0..2 {
        call(
            &app.publishable,
            Method::POST,
            "/v1/events",
            Some(event.clone()),
        )
        .await;
    }
    assert_eq!(
        check(&app.publishable, "globex", "api_calls").await["used"],
        1
    );
}

async fn concurrent_consumes_across_two_nodes_grant_exactly_the_limit(backend: Backend) {
    let app = spawn(backend).await;
    with_catalog(&app).await;
    // A second node on the same database, with the same keys.
    let node = common::start(common::test_settings(&app.db), Arc::new(SystemClock)).await;
    let other = node.client.with_key(&app.secret_key);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let client = if i % 2 == 0 {
                app.secret.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move {
                let (status, body) =
                    consume(&client, "acme", "api_calls", 1, &format!("k{i}")).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                body["allowed"].as_bool().unwrap()
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        if task.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 10, "a hard limit of 10 grants exactly 10");
    // What is stored, through a third node with an empty cache.
    let fresh = common::start(common::test_settings(&app.db), Arc::new(SystemClock)).await;
    let third = fresh.client.with_key(&app.secret_key);
    assert_eq!(check(&third, "acme", "api_calls").await["used"], 10);
    if backend == Backend::Postgres {
        // Other nodes' writes reach this node's cache by NOTIFY (bounded wait:
        // delivery crosses connections by design).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let used = check(&app.secret, "acme", "api_calls").await["used"].clone();
            if used == 10 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node A still sees used = {used}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    fresh.server.shutdown().await.unwrap();
    node.server.shutdown().await.unwrap();
}

async fn plan_changes_follow_the_clock(backend: Backend) {
    let clock = ManualClock::new("2027-01-31T12:00:00Z".parse().unwrap());
    let app = spawn_with(backend, Arc::new(clock.clone())).await;
    with_catalog(&app).await;
    let subscribe = |plan: &str, timing: Option<&str>| {
        let mut body = json!({"plan": plan});
        if let Some(timing) = timing {
            body["timing"] = json!(timing);
        }
        call(
            &app.secret,
            Method::POST,
            "/v1/orgs/acme/subscription",
            Some(body),
        )
    };
    consume(&app.secret, "acme", "api_calls", 8, "c-1").await;
    // Upgrade: at once, usage carries (1000 − 8 left).
    let (status, view) = subscribe("pro", None).await;
    assert_eq!(
        (status, view["plan"].clone()),
        (StatusCode::OK, json!("pro"))
    );
    let answer = check(&app.secret, "acme", "api_calls").await;
    assert_eq!(
        (
            answer["used"].clone(),
            answer["remaining"].clone(),
            answer["soft"].clone()
        ),
        (json!(8), json!(992), json!(true))
    );
    assert!(check(&app.secret, "acme", "sso").await["allowed"]
        .as_bool()
        .unwrap());
    // Downgrade: waits for the period end (anchored Jan 31 → Feb 28).
    let (_, view) = subscribe("free", None).await;
    assert_eq!(view["plan"], "pro");
    assert_eq!(view["scheduled"]["plan"], "free");
    assert_eq!(view["scheduled"]["at"], "2027-02-28T12:00:00Z");
    clock.set("2027-02-28T11:59:59Z".parse().unwrap());
    assert_eq!(check(&app.secret, "acme", "sso").await["allowed"], true);
    clock.set("2027-02-28T12:00:00Z".parse().unwrap());
    let after = check(&app.secret, "acme", "sso").await;
    assert_eq!(
        (after["allowed"].clone(), after["plan"].clone()),
        (json!(false), json!("free"))
    );
    let usage = check(&app.secret, "acme", "api_calls").await;
    assert_eq!(
        (usage["used"].clone(), usage["limit"].clone()),
        (json!(0), json!(10)),
        "a new period"
    );
    assert_eq!(usage["period_start"], "2027-02-28T12:00:00Z");
    assert_eq!(usage["resets_at"], "2027-03-31T12:00:00Z");
    // Upgrade again, then payment fails: the plan holds for the grace period.
    subscribe("pro", None).await;
    let (status, view) = call(
        &app.secret,
        Method::PUT,
        "/v1/orgs/acme/subscription/status",
        Some(json!({"status": "past_due"})),
    )
    .await;
    assert_eq!(
        (status, view["lapsed"].clone()),
        (StatusCode::OK, json!(false))
    );
    clock.advance(chrono::Duration::days(7));
    let lapsed = check(&app.secret, "acme", "sso").await;
    assert_eq!(lapsed["reason"], "no_active_subscription");
    call(
        &app.secret,
        Method::PUT,
        "/v1/orgs/acme/subscription/status",
        Some(json!({"status": "active"})),
    )
    .await;
    assert_eq!(check(&app.secret, "acme", "sso").await["allowed"], true);
    // Cancel: access until the period end, then the default plan.
    let (status, view) = call(
        &app.secret,
        Method::DELETE,
        "/v1/orgs/acme/subscription",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["scheduled"]["cancel"], true);
    let (_, view) = call(&app.secret, Method::GET, "/v1/orgs/acme/subscription", None).await;
    assert_eq!(view["plan"], "pro");
    clock.set("2027-03-31T12:00:00Z".parse().unwrap());
    assert_eq!(check(&app.secret, "acme", "sso").await["plan"], "free");
    let (status, body) = subscribe("gold", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_plan"))
    );
}

async fn grants_and_overrides_change_one_org(backend: Backend) {
    let app = spawn(backend).await;
    with_catalog(&app).await;
    let grant =
        json!({"feature": "projects", "amount": 2, "reason": "promo", "idempotency_key": "g-1"});
    let (status, first) = call(
        &app.secret,
        Method::POST,
        "/v1/orgs/acme/grants",
        Some(grant.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (_, again) = call(
        &app.secret,
        Method::POST,
        "/v1/orgs/acme/grants",
        Some(grant),
    )
    .await;
    assert_eq!(
        again["id"], first["id"],
        "a retried grant is the same grant"
    );
    let answer = check(&app.secret, "acme", "projects").await;
    assert_eq!(
        (answer["remaining"].clone(), answer["granted"].clone()),
        (json!(5), json!(2))
    );
    let (_, body) = consume(&app.secret, "acme", "projects", 5, "p-1").await;
    assert_eq!(
        (
            body["allowed"].clone(),
            body["used"].clone(),
            body["remaining"].clone()
        ),
        (json!(true), json!(5), json!(0))
    );
    let (_, grants) = call(&app.secret, Method::GET, "/v1/orgs/acme/grants", None).await;
    assert_eq!(grants["grants"][0]["remaining"], 0);
    // An override for this org only.
    let (status, _) = call(
        &app.secret,
        Method::PUT,
        "/v1/orgs/acme/overrides/sso",
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        check(&app.publishable, "acme", "sso").await["allowed"],
        true
    );
    assert_eq!(
        check(&app.publishable, "globex", "sso").await["allowed"],
        false
    );
    let (status, body) = call(
        &app.secret,
        Method::PUT,
        "/v1/orgs/acme/overrides/sso",
        Some(json!({"limit": 3})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_override"))
    );
    let (status, _) = call(
        &app.secret,
        Method::DELETE,
        "/v1/orgs/acme/overrides/sso",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        check(&app.publishable, "acme", "sso").await["allowed"],
        false
    );
}

async fn bad_requests_get_clear_errors(backend: Backend) {
    let app = spawn(backend).await;
    with_catalog(&app).await;
    let cases = [
        (
            "/v1/consume",
            json!({"org_id": "a", "feature": "projects", "amount": 0, "idempotency_key": "k"}),
            "invalid_amount",
        ),
        (
            "/v1/consume",
            json!({"org_id": "", "feature": "projects", "amount": 1, "idempotency_key": "k"}),
            "invalid_org_id",
        ),
        (
            "/v1/consume",
            json!({"org_id": "a", "feature": "projects", "amount": 1, "idempotency_key": ""}),
            "invalid_idempotency_key",
        ),
        (
            "/v1/consume",
            json!({"org_id": "a", "feature": "projects", "amount": 1}),
            "invalid_body",
        ),
        (
            "/v1/consume",
            json!({"org_id": "a", "feature": "sso", "amount": 1, "idempotency_key": "k"}),
            "feature_not_metered",
        ),
        (
            "/v1/check",
            json!({"org_id": "a", "feature": "projects", "required": -1}),
            "invalid_required",
        ),
        (
            "/v1/check",
            json!({"org_id": "a", "feature": "projects", "bogus": 1}),
            "invalid_body",
        ),
    ];
    for (path, body, code) in cases {
        let (status, answer) = call(&app.secret, Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path} {body}");
    }
    let (status, answer) = consume(&app.secret, "a", "teleport", 1, "k9").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_feature"))
    );
    let (status, _) = call(&app.publishable, Method::POST, "/v1/check", None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}
