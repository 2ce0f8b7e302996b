//! Feature flags through the real server on both backends: administration,
//! versions and restore, import/export, the local-evaluation snapshot, the
//! live stream, and OFREP evaluation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use flywheel_client::Client;
use flywheel_domain::clock::SystemClock;
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

flywheel_store::for_each_backend!(
    flags_are_created_changed_versioned_restored_and_deleted,
    documents_import_and_export_with_replace_or_merge,
    ofrep_evaluates_single_flags_with_reasons_and_errors,
    ofrep_bulk_answers_every_flag_with_an_etag,
    snapshot_and_stream_follow_changes,
    known_users_are_enriched_and_the_caller_wins,
);

struct App {
    server: RunningServer,
    _db: TestDatabase,
    secret: Client,
    publishable: Client,
    publishable_key: String,
}

async fn spawn(backend: Backend) -> App {
    let db = TestDatabase::create(backend).await;
    let started = common::start(common::test_settings(&db), Arc::new(SystemClock)).await;
    App {
        secret: started.secret,
        publishable: started.publishable,
        publishable_key: started.publishable_key.unwrap(),
        server: started.server,
        _db: db,
    }
}

use common::call;

fn pro_flag() -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
           "targeting": {"if": [{"in": [{"var": "plan"}, ["pro", "team"]]}, "on", null]},
           "metadata": {"owner": "growth"}})
}

async fn flags_are_created_changed_versioned_restored_and_deleted(backend: Backend) {
    let app = spawn(backend).await;
    let (status, body) = call(
        &app.secret,
        Method::POST,
        "/v1/flags",
        Some(json!({"key": "rollout", "enabled": true, "rollout_percentage": 30})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["definition"]["targeting"],
        json!({"fractional": [["on", 30], ["off", 70]]})
    );
    assert_eq!(body["version"], 1);

    let (status, body) = call(
        &app.secret,
        Method::POST,
        "/v1/flags",
        Some(json!({"key": "rollout", "enabled": false})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("flag_exists"))
    );

    // A bad flag names the JSON path at fault.
    let mut bad = pro_flag();
    bad["variants"]["off"] = json!("no");
    let (status, body) = call(&app.secret, Method::PUT, "/v1/flags/pro", Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "flag_schema_violation");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/variants/"),
        "{body}"
    );
    let (status, body) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/pro",
        Some(json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "nope"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_default_variant"))
    );

    let (status, _) = call(&app.secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut changed = pro_flag();
    changed["defaultVariant"] = json!("on");
    let (status, body) = call(&app.secret, Method::PUT, "/v1/flags/pro", Some(changed)).await;
    assert_eq!(
        (status, body["version"].as_i64()),
        (StatusCode::OK, Some(2))
    );
    // The same definition again is no new version.
    let (_, body) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/pro",
        Some(body["definition"].clone()),
    )
    .await;
    assert_eq!(body["version"], 2);

    let (_, list) = call(&app.secret, Method::GET, "/v1/flags", None).await;
    let keys: Vec<&str> = list["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|flag| flag["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["pro", "rollout"]);

    let (status, _) = call(&app.secret, Method::DELETE, "/v1/flags/pro", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call(&app.secret, Method::GET, "/v1/flags/pro", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("flag_not_found"))
    );

    let (_, history) = call(&app.secret, Method::GET, "/v1/flags/pro/versions", None).await;
    let versions = history["versions"].as_array().unwrap();
    let actions: Vec<&str> = versions
        .iter()
        .map(|version| version["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["created", "updated", "deleted"]);
    assert!(versions[1]["actor"].as_str().unwrap().starts_with("key:"));
    assert_eq!(
        versions[1]["changes"],
        json!([{"path": "/defaultVariant", "before": "off", "after": "on"}])
    );

    let (status, body) = call(
        &app.secret,
        Method::POST,
        "/v1/flags/pro/versions/1/restore",
        None,
    )
    .await;
    assert_eq!(
        (status, body["version"].as_i64()),
        (StatusCode::OK, Some(4)),
        "{body}"
    );
    assert_eq!(body["definition"]["defaultVariant"], "off");
    let (status, _) = call(
        &app.secret,
        Method::POST,
        "/v1/flags/pro/versions/9/restore",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Administration is for secret keys only.
    let (status, _) = call(&app.publishable, Method::GET, "/v1/flags", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn documents_import_and_export_with_replace_or_merge(backend: Backend) {
    let app = spawn(backend).await;
    call(&app.secret, Method::PUT, "/v1/flags/old", Some(pro_flag())).await;
    let document = json!({
        "flags": [
            {"key": "nav", "state": "ENABLED", "variants": {"a": "classic", "b": "new"}, "defaultVariant": "a",
             "targeting": {"if": [{"$ref": "paying"}, "b", null]}},
            {"key": "banner", "enabled": true, "rollout_percentage": 10}
        ],
        "$evaluators": {"paying": {"in": [{"var": "plan"}, ["pro", "team"]]}},
        "metadata": {"flagSetId": "web", "version": "7"}
    });
    let (status, summary) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/document?mode=merge",
        Some(document.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["created"], json!(["banner", "nav"]));
    let (_, exported) = call(&app.secret, Method::GET, "/v1/flags/document", None).await;
    assert_eq!(
        exported["flags"].as_object().unwrap().len(),
        3,
        "merge keeps `old`"
    );
    assert_eq!(exported["metadata"]["flagSetId"], "web");
    assert_eq!(
        exported["$evaluators"]["paying"],
        document["$evaluators"]["paying"]
    );

    // Replacing with the export of a different set deletes what it lacks;
    // importing the same again changes nothing.
    let (_, summary) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/document",
        Some(document.clone()),
    )
    .await;
    assert_eq!(summary["deleted"], json!(["old"]));
    assert_eq!(summary["unchanged"], 2);
    let (_, summary) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/document",
        Some(document),
    )
    .await;
    assert_eq!(
        (
            summary["created"].as_array().unwrap().len(),
            summary["unchanged"].as_i64()
        ),
        (0, Some(2))
    );

    let (status, body) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/document",
        Some(
            json!({"flags": {"x": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                    "targeting": {"if": [{"$ref": "nope"}, "a", null]}}}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "unknown_evaluator");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/flags/x/targeting/if/0"),
        "{body}"
    );
    let (status, _) = call(
        &app.secret,
        Method::PUT,
        "/v1/flags/document?mode=sideways",
        Some(json!({"flags": {}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn ofrep_evaluates_single_flags_with_reasons_and_errors(backend: Backend) {
    let app = spawn(backend).await;
    call(&app.secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/static",
        Some(json!({"state": "ENABLED", "variants": {"blue": "#00f"}, "defaultVariant": "blue"})),
    )
    .await;
    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/killed",
        Some(json!({"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"})),
    )
    .await;
    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/rollout",
        Some(json!({"rollout_percentage": 50})),
    )
    .await;

    let evaluate = |key: &str, body: Value| {
        let request = app
            .publishable
            .request(Method::POST, &format!("/ofrep/v1/evaluate/flags/{key}"))
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = evaluate(
        "pro",
        json!({"context": {"targetingKey": "u1", "plan": "team"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"key": "pro", "value": true, "reason": "TARGETING_MATCH", "variant": "on", "metadata": {"owner": "growth"}})
    );
    let (_, body) = evaluate(
        "pro",
        json!({"context": {"targetingKey": "u1", "plan": "free"}}),
    )
    .await;
    assert_eq!(
        (body["value"].clone(), body["reason"].as_str()),
        (json!(false), Some("DEFAULT"))
    );
    let (_, body) = evaluate("static", json!({})).await;
    assert_eq!(
        (body["value"].as_str(), body["reason"].as_str()),
        (Some("#00f"), Some("STATIC"))
    );
    let (status, body) = evaluate("killed", json!({"context": {"targetingKey": "u1"}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["reason"], "DISABLED");
    assert!(
        body.get("value").is_none(),
        "a disabled flag has no value: {body}"
    );

    let (status, body) = evaluate("nope", json!({"context": {}})).await;
    assert_eq!(
        (status, body["errorCode"].as_str(), body["key"].as_str()),
        (StatusCode::NOT_FOUND, Some("FLAG_NOT_FOUND"), Some("nope"))
    );
    let (status, body) = evaluate("rollout", json!({"context": {"plan": "pro"}})).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("TARGETING_KEY_MISSING"))
    );
    let (status, body) = evaluate("pro", json!({"context": {"targetingKey": 42}})).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_CONTEXT"))
    );
    let response = app
        .publishable
        .request(Method::POST, "/ofrep/v1/evaluate/flags/pro")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap()["errorCode"],
        "PARSE_ERROR"
    );

    // X-API-Key works as well as Bearer; no key is a 401.
    let plain = reqwest::Client::new();
    let url = format!("{}/ofrep/v1/evaluate/flags/static", app.server.base_url());
    let response = plain
        .post(&url)
        .header("X-API-Key", &app.publishable_key)
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = plain
        .post(&url)
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

async fn ofrep_bulk_answers_every_flag_with_an_etag(backend: Backend) {
    let app = spawn(backend).await;
    call(&app.secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/killed",
        Some(json!({"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"})),
    )
    .await;
    let bulk = |etag: Option<String>| {
        let mut request = app
            .publishable
            .request(Method::POST, "/ofrep/v1/evaluate/flags")
            .json(&json!({"context": {"targetingKey": "u1", "plan": "pro"}}));
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let etag = response
                .headers()
                .get("etag")
                .map(|value| value.to_str().unwrap().to_string());
            (
                status,
                etag,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, etag, body) = bulk(None).await;
    assert_eq!(status, StatusCode::OK);
    let flags = body["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 2);
    assert_eq!(
        (flags[0]["key"].as_str(), flags[0]["reason"].as_str()),
        (Some("killed"), Some("DISABLED"))
    );
    assert_eq!(
        (flags[1]["key"].as_str(), flags[1]["value"].clone()),
        (Some("pro"), json!(true))
    );
    let stream = &body["eventStreams"][0];
    assert_eq!(stream["type"], "sse");
    assert!(stream["endpoint"]["requestUri"]
        .as_str()
        .unwrap()
        .starts_with("/v1/flags/stream?key=pk_"));

    let etag = etag.expect("an ETag");
    let (status, _, _) = bulk(Some(etag.clone())).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let mut changed = pro_flag();
    changed["targeting"] = json!({"if": [false, "on", null]});
    call(&app.secret, Method::PUT, "/v1/flags/pro", Some(changed)).await;
    let (status, new_etag, body) = bulk(Some(etag.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(new_etag.unwrap(), etag);
    assert_eq!(body["flags"][1]["value"], json!(false));
}

async fn snapshot_and_stream_follow_changes(backend: Backend) {
    let app = spawn(backend).await;
    call(&app.secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    let response = app
        .publishable
        .request(Method::GET, "/v1/flags/snapshot")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["flags"]["pro"]["defaultVariant"], "off");
    let response = app
        .publishable
        .request(Method::GET, "/v1/flags/snapshot")
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // The stream takes the key in the query, as a browser's EventSource must.
    let url = format!(
        "{}/v1/flags/stream?key={}",
        app.server.base_url(),
        app.publishable_key
    );
    let response = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut response = response;
    let mut seen = String::new();
    let first = next_event(&mut response, &mut seen).await;
    assert!(
        first.contains("event: message") && first.contains("refetchEvaluation"),
        "{first}"
    );
    assert!(first.contains(&etag.replace('"', "\\\"")), "{first}");

    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/pro",
        Some(json!({"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"})),
    )
    .await;
    let change = next_event(&mut response, &mut seen).await;
    assert!(
        change.contains("refetchEvaluation") && !change.contains(&etag.replace('"', "\\\"")),
        "{change}"
    );

    let (status, _) = call(
        &Client::new(app.server.base_url()),
        Method::GET,
        "/v1/flags/stream",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// The next server-sent event with data, waiting at most 10 s (a hang, not
/// a latency check).
async fn next_event(response: &mut reqwest::Response, seen: &mut String) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = seen.find("\n\n") {
                let event: String = seen.drain(..end + 2).collect();
                if event.contains("data:") {
                    return event;
                }
                continue;
            }
            let chunk = response
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("an event arrives")
}

/// The Rust OpenFeature SDK with its OFREP provider (`open-feature-ofrep`)
/// evaluates Flywheel's flags with nothing changed but the base URL and the
/// key header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_openfeature_ofrep_provider_evaluates_flags() {
    use open_feature::{EvaluationContext, EvaluationErrorCode, OpenFeature};
    use open_feature_ofrep::{OfrepOptions, OfrepProvider};

    let app = spawn(Backend::Sqlite).await;
    call(&app.secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    call(
        &app.secret,
        Method::PUT,
        "/v1/flags/banner",
        Some(
            json!({"state": "ENABLED", "variants": {"hello": "hello"}, "defaultVariant": "hello"}),
        ),
    )
    .await;

    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", app.publishable_key.parse().unwrap());
    let provider = OfrepProvider::new(OfrepOptions {
        base_url: app.server.base_url().trim_end_matches('/').to_string(),
        headers,
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .expect("valid provider options");
    // The SDK is a process-wide singleton: a named provider keeps this test
    // apart from any other in the same binary.
    OpenFeature::singleton_mut()
        .await
        .set_named_provider("flywheel", provider)
        .await;
    let client = OpenFeature::singleton()
        .await
        .create_named_client("flywheel");

    let pro = EvaluationContext::default()
        .with_targeting_key("rust-user")
        .with_custom_field("plan", "team");
    let free = EvaluationContext::default()
        .with_targeting_key("rust-user")
        .with_custom_field("plan", "free");
    let details = client
        .get_bool_details("pro", Some(&pro), None)
        .await
        .unwrap();
    assert_eq!(
        (details.value, details.variant.as_deref()),
        (true, Some("on"))
    );
    assert!(!client
        .get_bool_value("pro", Some(&free), None)
        .await
        .unwrap());
    assert_eq!(
        client
            .get_string_value("banner", Some(&pro), None)
            .await
            .unwrap(),
        "hello"
    );
    let missing = client
        .get_bool_value("missing", Some(&pro), None)
        .await
        .unwrap_err();
    assert_eq!(missing.code, EvaluationErrorCode::FlagNotFound);
    // A boolean asked for as a string fails in the client; this provider
    // (0.1.2) reports its own type check as a parse error.
    let mismatched = client
        .get_string_value("pro", Some(&pro), None)
        .await
        .unwrap_err();
    assert_eq!(mismatched.code, EvaluationErrorCode::ParseError);
}

/// `track_exposure` records a `$exposure` event for each served variant, at
/// most once per user, flag and variant per UTC day, through the durable
/// ingestion path (so it is stored before the evaluation is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposures_are_recorded_once_per_user_flag_variant_and_day() {
    use flywheel_domain::clock::ManualClock;

    let db = TestDatabase::create(Backend::Sqlite).await;
    let clock = ManualClock::new("2026-03-31T23:00:00Z".parse().unwrap());
    let started = common::start(common::test_settings(&db), Arc::new(clock.clone())).await;
    let (secret, publishable) = (started.secret, started.publishable);
    call(&secret, Method::PUT, "/v1/flags/pro", Some(pro_flag())).await;
    call(
        &secret,
        Method::PUT,
        "/v1/flags/killed",
        Some(json!({"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"})),
    )
    .await;
    let exposures = || async {
        let (_, body) = call(
            &secret,
            Method::GET,
            "/v1/events?event=%24exposure&limit=100",
            None,
        )
        .await;
        body["events"].as_array().unwrap().clone()
    };
    let pro = json!({"context": {"targetingKey": "u1", "plan": "pro"}});

    for _ in 0..3 {
        let (status, _) = call(
            &publishable,
            Method::POST,
            "/ofrep/v1/evaluate/flags/pro?track_exposure=true",
            Some(pro.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Without the flag nothing is recorded.
    call(
        &publishable,
        Method::POST,
        "/ofrep/v1/evaluate/flags/pro",
        Some(json!({"context": {"targetingKey": "u2", "plan": "pro"}})),
    )
    .await;
    let recorded = exposures().await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["user_id"], "u1");
    assert_eq!(
        recorded[0]["properties"],
        json!({"flag": "pro", "variant": "on", "reason": "TARGETING_MATCH"})
    );

    // Bulk, in the body: the disabled flag serves nothing, so only `pro`
    // could be exposed, and it already was today. A new variant is new.
    let (status, _) = call(
        &publishable,
        Method::POST,
        "/ofrep/v1/evaluate/flags",
        Some(json!({"context": {"targetingKey": "u1", "plan": "free"}, "track_exposure": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let recorded = exposures().await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(recorded
        .iter()
        .any(|event| event["properties"]["variant"] == "off"));

    // The next UTC day (one hour later) counts again.
    clock.advance(chrono::Duration::hours(1));
    call(
        &publishable,
        Method::POST,
        "/ofrep/v1/evaluate/flags/pro?track_exposure=true",
        Some(pro.clone()),
    )
    .await;
    assert_eq!(exposures().await.len(), 3);

    let (status, body) = call(
        &publishable,
        Method::POST,
        "/ofrep/v1/evaluate/flags/pro",
        Some(json!({"context": {}, "track_exposure": "yes"})),
    )
    .await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_CONTEXT"))
    );
    drop(started.server);
}

/// A known `targetingKey` brings its org, plan, boolean entitlements,
/// signup age, acquisition source and `identify` traits into the context;
/// this node's own writes show at once; what the caller sends wins.
async fn known_users_are_enriched_and_the_caller_wins(backend: Backend) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, _) = call(s, Method::PUT, "/v1/catalog", Some(json!({
        "features": [{"key": "sso", "kind": "boolean"}],
        "plans": [
            {"key": "free", "default": true, "features": {}},
            {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "features": {"sso": {}}}
        ]
    }))).await;
    assert_eq!(status, StatusCode::OK);
    let onboarding = json!({"state": "ENABLED", "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"if": [{"and": [
            {"==": [{"var": "plan"}, "free"]},
            {"<": [{"var": "days_since_signup"}, 14]},
            {"==": [{"var": "acquisition_source"}, "organic"]},
            {">=": [{"var": "traits.company_size"}, 40]}
        ]}, "on", "off"]}});
    let (status, _) = call(s, Method::PUT, "/v1/flags/new-onboarding", Some(onboarding)).await;
    assert_eq!(status, StatusCode::CREATED);
    let sso = json!({"state": "ENABLED", "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"if": [{"var": "entitlements.sso"}, "on", "off"]}});
    let (status, _) = call(s, Method::PUT, "/v1/flags/sso-banner", Some(sso)).await;
    assert_eq!(status, StatusCode::CREATED);

    let evaluate = |key: &'static str, context: Value| {
        let request = app
            .publishable
            .request(Method::POST, &format!("/ofrep/v1/evaluate/flags/{key}"))
            .json(&json!({"context": context}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.json::<Value>().await.unwrap();
            body["variant"].as_str().unwrap().to_owned()
        }
    };
    // Unknown yet: nothing to enrich with.
    assert_eq!(
        evaluate("new-onboarding", json!({"targetingKey": "alice"})).await,
        "off"
    );

    let (status, signup) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(json!({
            "user_id": "alice", "email": "alice@example.com", "idempotency_key": "a"
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{signup}");
    let org = signup["org"]["org_id"].as_str().unwrap().to_owned();
    let identify = |size: i64| json!({"batch": [{"type": "identify", "user_id": "alice", "traits": {"company_size": size}}]});
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/events",
        Some(identify(40)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The signup and the identify were written through this node: seen at once.
    assert_eq!(
        evaluate("new-onboarding", json!({"targetingKey": "alice"})).await,
        "on"
    );
    // What the caller sends wins over what Flywheel knows.
    assert_eq!(
        evaluate(
            "new-onboarding",
            json!({"targetingKey": "alice", "plan": "pro"})
        )
        .await,
        "off"
    );
    assert_eq!(
        evaluate(
            "new-onboarding",
            json!({"targetingKey": "alice", "traits": {"company_size": 2}})
        )
        .await,
        "off"
    );
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/events",
        Some(identify(12)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        evaluate("new-onboarding", json!({"targetingKey": "alice"})).await,
        "off"
    );

    // Entitlements follow the org's plan as soon as it changes.
    assert_eq!(
        evaluate("sso-banner", json!({"targetingKey": "alice"})).await,
        "off"
    );
    let (status, _) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/subscription"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        evaluate("sso-banner", json!({"targetingKey": "alice"})).await,
        "on"
    );
    // The bulk endpoint enriches the same way.
    let response = app
        .publishable
        .request(Method::POST, "/ofrep/v1/evaluate/flags")
        .json(&json!({"context": {"targetingKey": "alice"}}))
        .send()
        .await
        .unwrap();
    let bulk: Value = response.json().await.unwrap();
    let banner = bulk["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "sso-banner")
        .unwrap();
    assert_eq!(banner["variant"], "on");
}
