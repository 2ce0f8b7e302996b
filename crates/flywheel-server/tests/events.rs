//! Event ingestion through the real server, on both backends: the native,
//! Segment and PostHog protocols, dedupe, identity, limits and errors.

mod common;

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use flywheel_client::Client;
use flywheel_domain::clock::ManualClock;
use flywheel_server::{RunningServer, Settings};
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

flywheel_store::for_each_backend!(
    native_batches_accept_reject_and_dedupe,
    segment_protocol_works_with_basic_auth_and_write_key,
    posthog_protocol_works_on_every_path,
    identity_resolves_across_protocols_at_read,
    bodies_may_be_gzip_text_or_form,
    limits_give_documented_outcomes,
    keys_and_rate_limits_are_enforced,
    clock_skew_is_corrected_and_future_clamped,
    the_live_tail_streams_new_events,
    browsers_get_cors,
);

const NOW: (i32, u32, u32, u32, u32, u32) = (2026, 3, 31, 12, 0, 0);

struct App {
    _server: RunningServer,
    _db: TestDatabase,
    secret: Client,
    publishable: Client,
    pk: String,
    base: String,
    http: reqwest::Client,
}

async fn spawn(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> App {
    let db = TestDatabase::create(backend).await;
    let mut settings = common::test_settings(&db);
    tweak(&mut settings);
    let (y, mo, d, h, mi, s) = NOW;
    let clock = ManualClock::new(Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap());
    let started = common::start(settings, Arc::new(clock)).await;
    App {
        secret: started.secret,
        publishable: started.publishable,
        pk: started.publishable_key.expect("a fresh store bootstraps"),
        base: started.server.base_url(),
        http: reqwest::Client::new(),
        _server: started.server,
        _db: db,
    }
}

impl App {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .publishable
            .request(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            response.status(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn events(&self, query: &str) -> Vec<Value> {
        let list: Value = self
            .secret
            .send(
                self.secret
                    .request(Method::GET, &format!("/v1/events{query}")),
            )
            .await
            .unwrap();
        list["events"].as_array().unwrap().clone()
    }
}

fn counts(body: &Value) -> (u64, u64, usize) {
    (
        body["accepted"].as_u64().unwrap(),
        body["duplicates"].as_u64().unwrap(),
        body["rejected"].as_array().unwrap().len(),
    )
}

async fn native_batches_accept_reject_and_dedupe(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let id = Uuid::new_v4();
    let batch = json!({"batch": [
        {"event_id": id, "type": "track", "event": "project_created", "user_id": "u1", "properties": {"plan": "free"}},
        {"type": "track", "user_id": "u1"},
        {"type": "identify", "user_id": "u1", "anonymous_id": "a1", "traits": {"email": "x@example.com"}},
        "not an object",
    ]});
    let (status, body) = app.post("/v1/events", batch.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts(&body), (2, 0, 2));
    assert_eq!(
        body["rejected"][0],
        json!({"index": 1, "code": "missing_event_name", "message": "a track event needs an event name"})
    );
    assert_eq!(body["rejected"][1]["index"], 3);
    assert_eq!(body["rejected"][1]["code"], "invalid_event");

    // The retry changes nothing: the identify had no id and got a new one,
    // so only it is new again (documented: send ids to make retries safe).
    let (_, body) = app.post("/v1/events", batch).await;
    assert_eq!(counts(&body), (1, 1, 2));

    // Same id, other content: the first is kept and this counts as a duplicate.
    let changed = json!({"batch": [{"event_id": id, "event": "something_else", "user_id": "u2"}]});
    let (_, body) = app.post("/v1/events", changed).await;
    assert_eq!(counts(&body), (0, 1, 0));
    let stored = app.events("?event=project_created").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["event_id"], id.to_string());
    assert_eq!(stored[0]["properties"]["plan"], "free");
    assert_eq!(stored[0]["event_id_generated"], false);
    assert!(app.events("?event=something_else").await.is_empty());
    let seqs: Vec<i64> = app
        .events("")
        .await
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 2, 1], "per-project sequence in commit order");
}

async fn segment_protocol_works_with_basic_auth_and_write_key(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let batch = json!({
        "batch": [
            {"type": "track", "event": "Signed Up", "userId": "u1", "anonymousId": "a1", "messageId": "ajs-1",
             "timestamp": "2026-03-31T11:59:00Z", "properties": {"plan": "free"}},
            {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "ajs-2", "traits": {"name": "Ada"}},
        ],
        "context": {"library": {"name": "analytics-python", "version": "2.3.3"}},
        "sentAt": "2026-03-31T12:00:00Z",
    });
    let response = app
        .http
        .post(format!("{}/v1/batch", app.base))
        .basic_auth(&app.pk, Some(""))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(counts(&body), (2, 0, 0));

    // writeKey in the body instead of Basic auth; a retry dedupes on messageId.
    let mut with_key = batch.clone();
    with_key["writeKey"] = json!(app.pk);
    let body: Value = app
        .http
        .post(format!("{}/v1/batch", app.base))
        .json(&with_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counts(&body), (0, 2, 0));

    for (call, message) in [
        ("track", json!({"event": "Clicked", "userId": "u1"})),
        (
            "identify",
            json!({"userId": "u1", "traits": {"plan": "pro"}}),
        ),
        ("alias", json!({"previousId": "old", "userId": "u1"})),
        (
            "group",
            json!({"groupId": "acme", "userId": "u1", "traits": {"name": "Acme"}}),
        ),
        ("page", json!({"name": "Pricing", "anonymousId": "a2"})),
        ("screen", json!({"name": "Home", "userId": "u1"})),
    ] {
        let response = app
            .http
            .post(format!("{}/v1/{call}", app.base))
            .basic_auth(&app.pk, Some(""))
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{call}");
    }
    let stored = app.events("?event=Signed%20Up").await;
    assert_eq!(stored[0]["source"], "segment");
    assert_eq!(
        stored[0]["context"]["library"]["name"], "analytics-python",
        "batch context merged"
    );
    assert_eq!(stored[0]["timestamp"], "2026-03-31T11:59:00Z");
    assert_eq!(stored[0]["sent_at"], "2026-03-31T12:00:00Z");
    assert_eq!(app.events("?event=Pricing").await[0]["type"], "page");

    let rejected = app
        .http
        .post(format!("{}/v1/track", app.base))
        .basic_auth(&app.pk, Some(""))
        .json(&json!({"userId": "u1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        rejected.status(),
        StatusCode::BAD_REQUEST,
        "Segment libraries do not retry a 400"
    );
    let body: Value = rejected.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_event_name");
    let unknown = app
        .http
        .post(format!("{}/v1/shout", app.base))
        .basic_auth(&app.pk, Some(""))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

async fn posthog_protocol_works_on_every_path(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let event = |name: &str| json!({"event": name, "distinct_id": "u1", "uuid": Uuid::now_v7(), "properties": {"$lib": "posthog-python"}});
    let bodies = [
        (
            "/batch",
            json!({"api_key": app.pk, "batch": [event("a"), event("b")]}),
        ),
        ("/batch/", json!({"api_key": app.pk, "batch": [event("c")]})),
        ("/e", {
            let mut e = event("d");
            e["api_key"] = json!(app.pk);
            e
        }),
        (
            "/i/v0/e/",
            json!([{"event": "e", "distinct_id": "u1", "properties": {"token": app.pk}}]),
        ),
        (
            "/capture/",
            json!({"token": app.pk, "event": "f", "distinct_id": "u1"}),
        ),
        (
            "/capture",
            json!({"api_key": app.pk, "batch": [{"event": "g", "properties": {"distinct_id": "u1"}}]}),
        ),
    ];
    for (path, body) in bodies {
        let response = app
            .http
            .post(format!("{}{path}", app.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["status"], 1, "{path}");
        assert_eq!(answer["rejected"], json!([]), "{path}");
    }
    let stored = app.events("?user_id=u1&limit=100").await;
    assert_eq!(stored.len(), 7);
    assert!(stored.iter().all(|e| e["source"] == "posthog"));

    let missing_key = app
        .http
        .post(format!("{}/e", app.base))
        .json(&event("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status(), StatusCode::UNAUTHORIZED);
}

async fn identity_resolves_across_protocols_at_read(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    app.post(
        "/v1/events",
        json!({"batch": [{"type": "page", "event": "Landing", "anonymous_id": "anon-7"}]}),
    )
    .await;
    let identify = json!({"api_key": app.pk, "event": "$identify", "distinct_id": "user-7",
        "properties": {"$anon_distinct_id": "anon-7", "$set": {"email": "u7@example.com"}}});
    app.http
        .post(format!("{}/capture/", app.base))
        .json(&identify)
        .send()
        .await
        .unwrap();
    let group = json!({"groupId": "acme", "userId": "user-7"});
    app.http
        .post(format!("{}/v1/group", app.base))
        .basic_auth(&app.pk, Some(""))
        .json(&group)
        .send()
        .await
        .unwrap();

    let mine = app.events("?user_id=user-7").await;
    assert_eq!(mine.len(), 3);
    assert!(mine.iter().all(|e| e["person_id"] == "user-7"), "{mine:?}");
    let landing = mine.iter().find(|e| e["event"] == "Landing").unwrap();
    assert_eq!(landing["anonymous_id"], "anon-7");
    assert_eq!(landing["user_id"], Value::Null, "history is not rewritten");
    // Asking by the anonymous id finds the same person.
    assert_eq!(app.events("?user_id=anon-7").await.len(), 3);
}

async fn bodies_may_be_gzip_text_or_form(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let batch = json!({"batch": [{"event": "zipped", "user_id": "u1"}]});
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(batch.to_string().as_bytes()).unwrap();
    let gzipped = encoder.finish().unwrap();
    let send = |content_type: &'static str, encoding: Option<&'static str>, body: Vec<u8>| {
        let mut request = app
            .publishable
            .request(Method::POST, "/v1/events")
            .header("content-type", content_type)
            .body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        request.send()
    };
    let response = send("application/json", Some("gzip"), gzipped)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = send(
        "text/plain;charset=UTF-8",
        None,
        json!({"batch": [{"event": "beacon", "user_id": "u1"}]})
            .to_string()
            .into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(json!([{"event": "formed", "distinct_id": "u1", "api_key": app.pk}]).to_string());
    let form = format!(
        "data={}",
        encoded
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    );
    let response = app
        .http
        .post(format!("{}/e/", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for name in ["zipped", "beacon", "formed"] {
        assert_eq!(
            app.events(&format!("?event={name}")).await.len(),
            1,
            "{name}"
        );
    }

    let response = send("application/json", Some("gzip"), b"not gzip".to_vec())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_gzip"
    );
    let response = send("application/json", Some("br"), b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "unsupported_content_encoding"
    );
}

async fn limits_give_documented_outcomes(backend: Backend) {
    let app = spawn(backend, |s| {
        s.ingest.max_event_bytes = 1024;
        s.ingest.max_batch_bytes = 8 * 1024;
    })
    .await;
    let big = "x".repeat(2000);
    let (status, body) = app
        .post("/v1/events", json!({"batch": [{"event": "ok", "user_id": "u"}, {"event": "big", "user_id": "u", "properties": {"blob": big}}]}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts(&body), (1, 0, 1));
    assert_eq!(body["rejected"][0]["code"], "event_too_large");

    let huge: Vec<Value> = (0..20)
        .map(|_| json!({"event": "e", "user_id": "u", "properties": {"pad": "y".repeat(500)}}))
        .collect();
    let (status, body) = app.post("/v1/events", json!({"batch": huge})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "not 413: Segment and PostHog libraries retry 413"
    );
    assert_eq!(body["error"]["code"], "batch_too_large");

    // A gzip bomb is cut off at the limit after decompression.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(
            format!(
                "{{\"batch\":[{{\"event\":\"{}\"}}]}}",
                "z".repeat(1_000_000)
            )
            .as_bytes(),
        )
        .unwrap();
    let response = app
        .publishable
        .request(Method::POST, "/v1/events")
        .header("content-encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "batch_too_large"
    );

    for garbage in ["{", "[]", "{\"batch\": 5}", "null"] {
        let response = app
            .publishable
            .request(Method::POST, "/v1/events")
            .body(garbage)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{garbage}");
    }
    assert_eq!(
        app.events("").await.len(),
        1,
        "only the one good event was stored"
    );
}

async fn keys_and_rate_limits_are_enforced(backend: Backend) {
    let app = spawn(backend, |s| s.ingest.rate_limit_per_key = 3).await;
    let batch = json!({"batch": [{"event": "e", "user_id": "u"}]});
    let anonymous = app
        .http
        .post(format!("{}/v1/events", app.base))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = app
        .http
        .post(format!("{}/v1/batch", app.base))
        .basic_auth(format!("pk_{}", "Z".repeat(32)), Some(""))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let forbidden = app
        .publishable
        .send::<Value>(app.publishable.request(Method::GET, "/v1/events"))
        .await
        .unwrap_err();
    assert_eq!(
        forbidden.status_and_code(),
        Some((403, "secret_key_required"))
    );

    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = app
            .publishable
            .request(Method::POST, "/v1/events")
            .json(&batch)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry_after >= 1);
            assert_eq!(
                response.json::<Value>().await.unwrap()["error"]["code"],
                "rate_limited"
            );
        }
        statuses.push(status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.starts_with(&[200, 200, 200]), "{statuses:?}");
}

async fn clock_skew_is_corrected_and_future_clamped(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    // The device clock runs 2 h behind: it says it sent at 10:00 what happened at 09:59:50.
    let batch = json!({"sent_at": "2026-03-31T10:00:00Z", "batch": [
        {"event": "skewed", "user_id": "u", "timestamp": "2026-03-31T09:59:50Z"},
    ]});
    app.post("/v1/events", batch).await;
    let skewed = &app.events("?event=skewed").await[0];
    assert_eq!(skewed["timestamp"], "2026-03-31T11:59:50Z");
    assert_eq!(skewed["original_timestamp"], "2026-03-31T09:59:50Z");
    assert_eq!(skewed["received_at"], "2026-03-31T12:00:00Z");
    assert_eq!(skewed["skew_corrected"], true);

    // 20 s of network delay is not skew: the device's time stands.
    let batch = json!({"sent_at": "2026-03-31T11:59:40Z", "batch": [
        {"event": "delayed", "user_id": "u", "timestamp": "2026-03-31T11:59:30Z"},
        {"event": "future", "user_id": "u", "timestamp": "2026-04-01T12:00:00Z", "sent_at": "2026-03-31T12:00:00Z"},
    ]});
    app.post("/v1/events", batch).await;
    let delayed = &app.events("?event=delayed").await[0];
    assert_eq!(
        (
            delayed["timestamp"].as_str(),
            delayed["skew_corrected"].as_bool()
        ),
        (Some("2026-03-31T11:59:30Z"), Some(false))
    );
    let future = &app.events("?event=future").await[0];
    assert_eq!(future["timestamp"], "2026-03-31T12:00:00Z");
    assert_eq!(future["future_clamped"], true);
}

async fn the_live_tail_streams_new_events(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    app.post(
        "/v1/events",
        json!({"batch": [{"event": "before", "user_id": "u"}]}),
    )
    .await;
    let mut stream = app
        .secret
        .request(Method::GET, "/v1/events/tail")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    app.post(
        "/v1/events",
        json!({"batch": [{"event": "after", "user_id": "u"}]}),
    )
    .await;
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while let Some(chunk) = stream.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("\n\n") && text.contains("data:") {
                return text;
            }
        }
        text
    })
    .await
    .expect("the tail delivers the new event");
    assert!(received.contains("\"event\":\"after\""), "{received}");
    assert!(
        !received.contains("\"event\":\"before\""),
        "only events after the stream opened"
    );
    assert!(received.contains("id: 2"));
}

async fn browsers_get_cors(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let response = app
        .http
        .request(Method::OPTIONS, format!("{}/v1/events", app.base))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert!(headers["access-control-max-age"].to_str().is_ok());
    // A preflight for a path that does not exist is answered all the same
    // (the browser then gets the 404 of the request itself).
    let response = app
        .http
        .request(Method::OPTIONS, format!("{}/v1/nowhere", app.base))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    // The request itself: readable from any origin, with its request id
    // exposed; an error too.
    for path in ["/healthz", "/v1/nowhere"] {
        let response = app
            .http
            .get(format!("{}{path}", app.base))
            .header("origin", "https://app.example.com")
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers["access-control-allow-origin"], "*", "{path}");
        assert!(
            headers["access-control-expose-headers"]
                .to_str()
                .unwrap()
                .contains("x-request-id"),
            "{path}"
        );
        assert!(headers.contains_key("x-request-id"), "{path}");
    }
}
