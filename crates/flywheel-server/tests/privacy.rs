//! Consent, IP reduction, PII redaction, event schemas and person deletion,
//! through the real server on both backends.

mod common;

use std::sync::Arc;

use flywheel_client::Client;
use flywheel_domain::clock::SystemClock;
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

flywheel_store::for_each_backend!(
    settings_round_trip_and_are_secret_only,
    events_without_required_consent_are_dropped_and_counted,
    ips_are_truncated_by_default_or_dropped,
    pii_is_redacted_before_storage,
    schemas_warn_or_enforce,
    deleting_a_user_removes_them_and_suppresses_retries,
);

struct App {
    _server: RunningServer,
    _db: TestDatabase,
    secret: Client,
    publishable: Client,
}

async fn spawn(backend: Backend) -> App {
    let db = TestDatabase::create(backend).await;
    let started = common::start(common::test_settings(&db), Arc::new(SystemClock)).await;
    App {
        secret: started.secret,
        publishable: started.publishable,
        _server: started.server,
        _db: db,
    }
}

impl App {
    async fn call(
        &self,
        client: &Client,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        common::call(client, method, path, body).await
    }

    async fn send(&self, events: Value) -> Value {
        let (status, body) = self
            .call(
                &self.publishable,
                Method::POST,
                "/v1/events",
                Some(json!({"batch": events})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn stored(&self, query: &str) -> Vec<Value> {
        let (_, body) = self
            .call(
                &self.secret,
                Method::GET,
                &format!("/v1/events{query}"),
                None,
            )
            .await;
        body["events"].as_array().unwrap().clone()
    }

    async fn settings(&self, settings: Value) {
        let (status, body) = self
            .call(
                &self.secret,
                Method::PUT,
                "/v1/project/settings",
                Some(settings),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

async fn settings_round_trip_and_are_secret_only(backend: Backend) {
    let app = spawn(backend).await;
    let (status, defaults) = app
        .call(&app.secret, Method::GET, "/v1/project/settings", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(defaults["ip_handling"], "truncate");
    assert_eq!(defaults["require_analytics_consent"], false);
    assert_eq!(defaults["schema_mode"], "off");
    app.settings(json!({"ip_handling": "drop", "schema_mode": "warn"}))
        .await;
    let (_, now) = app
        .call(&app.secret, Method::GET, "/v1/project/settings", None)
        .await;
    assert_eq!(
        (now["ip_handling"].as_str(), now["schema_mode"].as_str()),
        (Some("drop"), Some("warn"))
    );
    assert_eq!(now["pii_detectors"], true, "omitted fields take defaults");

    let (status, body) = app
        .call(
            &app.secret,
            Method::PUT,
            "/v1/project/settings",
            Some(json!({"ip": "drop"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    let (status, _) = app
        .call(&app.publishable, Method::GET, "/v1/project/settings", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn events_without_required_consent_are_dropped_and_counted(backend: Backend) {
    let app = spawn(backend).await;
    app.settings(json!({"require_analytics_consent": true}))
        .await;
    let outcome = app
        .send(json!([
            {"event": "no_consent", "user_id": "u"},
            {"event": "refused", "user_id": "u", "consent": {"analytics": false}},
            {"event": "native_yes", "user_id": "u", "consent": {"analytics": true}},
            {"event": "segment_yes", "user_id": "u", "context": {"consent": {"categoryPreferences": {"Analytics": true}}}},
        ]))
        .await;
    assert_eq!(outcome["accepted"], 2);
    assert_eq!(outcome["dropped_no_consent"], 2);
    let names: Vec<String> = app
        .stored("")
        .await
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["segment_yes", "native_yes"],
        "dropped events are never stored"
    );
}

async fn ips_are_truncated_by_default_or_dropped(backend: Backend) {
    let app = spawn(backend).await;
    app.send(json!([{"event": "v4", "user_id": "u", "context": {"ip": "203.0.113.77"}},
                    {"event": "v6", "user_id": "u", "context": {"ip": "2001:db8:85a3:8d3:1319:8a2e:370:7348"}}]))
        .await;
    assert_eq!(
        app.stored("?event=v4").await[0]["context"]["ip"],
        "203.0.113.0"
    );
    assert_eq!(
        app.stored("?event=v6").await[0]["context"]["ip"],
        "2001:db8:85a3::"
    );
    app.settings(json!({"ip_handling": "drop"})).await;
    app.send(json!([{"event": "dropped", "user_id": "u", "context": {"ip": "203.0.113.77"}}]))
        .await;
    assert!(app.stored("?event=dropped").await[0]["context"]
        .get("ip")
        .is_none());
}

async fn pii_is_redacted_before_storage(backend: Backend) {
    let app = spawn(backend).await;
    app.send(json!([{"event": "support", "user_id": "u",
        "properties": {"message": "reach me at ada@example.com or +44 20 7946 0958", "password": "hunter2",
                       "payment": {"card": "4242 4242 4242 4242"}, "plan": "pro"},
        "traits": {"email": "ada@example.com"}}]))
    .await;
    let stored = &app.stored("?event=support").await[0];
    assert_eq!(
        stored["properties"]["message"],
        "reach me at [redacted:email] or [redacted:phone]"
    );
    assert_eq!(stored["properties"]["password"], "[redacted]");
    assert_eq!(stored["properties"]["payment"]["card"], "[redacted:card]");
    assert_eq!(stored["properties"]["plan"], "pro");
    assert_eq!(
        stored["traits"]["email"], "ada@example.com",
        "identify traits are the product's own record"
    );
    assert!(!app
        .stored("")
        .await
        .iter()
        .any(|e| e.to_string().contains("hunter2")));
}

async fn schemas_warn_or_enforce(backend: Backend) {
    let app = spawn(backend).await;
    let schema = json!({"version": 3, "required": {"project_id": "string", "count": "number"}});
    let (status, body) = app
        .call(
            &app.secret,
            Method::PUT,
            "/v1/schemas/project_created",
            Some(schema),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, list) = app
        .call(&app.secret, Method::GET, "/v1/schemas", None)
        .await;
    assert_eq!(list["schemas"][0]["event"], "project_created");

    let good = json!({"event": "project_created", "user_id": "u", "properties": {"project_id": "p", "count": 1}});
    let bad = json!({"event": "project_created", "user_id": "u", "properties": {"project_id": 5}});
    // Off (the default): nothing is checked.
    assert_eq!(app.send(json!([bad.clone()])).await["accepted"], 1);

    app.settings(json!({"schema_mode": "warn"})).await;
    assert_eq!(
        app.send(json!([bad.clone(), good.clone()])).await["accepted"],
        2
    );
    let (_, violations) = app
        .call(&app.secret, Method::GET, "/v1/schemas/violations", None)
        .await;
    let violations = violations["violations"].as_array().unwrap().clone();
    assert_eq!(violations.len(), 1);
    assert_eq!(
        violations[0]["problems"],
        json!([
            "missing property `count`",
            "property `project_id` must be a string"
        ])
    );

    app.settings(json!({"schema_mode": "enforce"})).await;
    let outcome = app.send(json!([good.clone(), bad.clone()])).await;
    assert_eq!(outcome["accepted"], 1, "the rest of the batch proceeds");
    assert_eq!(outcome["rejected"][0]["index"], 1);
    assert_eq!(outcome["rejected"][0]["code"], "schema_violation");
    assert!(outcome["rejected"][0]["message"]
        .as_str()
        .unwrap()
        .contains("schema version 3"));

    let (status, _) = app
        .call(
            &app.secret,
            Method::DELETE,
            "/v1/schemas/project_created",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.send(json!([bad])).await["accepted"],
        1,
        "no schema, nothing to enforce"
    );
    let (status, body) = app
        .call(
            &app.secret,
            Method::DELETE,
            "/v1/schemas/project_created",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("schema_not_found"))
    );
    let (status, _) = app
        .call(
            &app.secret,
            Method::PUT,
            "/v1/schemas/x",
            Some(json!({"version": 1, "required": {"a": "date"}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn deleting_a_user_removes_them_and_suppresses_retries(backend: Backend) {
    let app = spawn(backend).await;
    let identify = json!({"event_id": uuid::Uuid::new_v4(), "type": "identify", "user_id": "gone", "anonymous_id": "anon-g"});
    app.send(
        json!([{"type": "page", "event": "Landing", "anonymous_id": "anon-g"}, identify.clone(),
                    {"event": "stay", "user_id": "keeper"}]),
    )
    .await;
    let (status, deleted) = app
        .call(&app.secret, Method::DELETE, "/v1/users/gone", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["events_deleted"], 2);
    let mut ids: Vec<String> = serde_json::from_value(deleted["ids"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, vec!["anon-g", "gone"]);
    assert!(app.stored("?user_id=gone").await.is_empty());
    assert_eq!(app.stored("").await.len(), 1, "other people are untouched");

    // A late retry, and any new event naming their ids, is dropped and counted.
    let outcome = app
        .send(json!([identify, {"event": "late", "anonymous_id": "anon-g"}]))
        .await;
    assert_eq!(
        (outcome["accepted"].as_u64(), outcome["suppressed"].as_u64()),
        (Some(0), Some(2))
    );
    let (status, again) = app
        .call(&app.secret, Method::DELETE, "/v1/users/gone", None)
        .await;
    assert_eq!(
        (status, again["events_deleted"].as_u64()),
        (StatusCode::OK, Some(0)),
        "idempotent"
    );
}
