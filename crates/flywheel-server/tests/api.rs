//! The HTTP API through the real server: each test starts its own server on
//! port 0 with a fresh store, for each backend, and drives it with the
//! project's own client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use flywheel_client::{Client, KeyKind};
use flywheel_domain::clock::SystemClock;
use flywheel_server::{RunningServer, Settings};
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::Value;

flywheel_store::for_each_backend!(
    health_readiness_and_contract,
    metrics_count_requests_by_route,
    every_bad_credential_gets_its_status,
    keys_work_and_stop_working_at_once,
    key_listing_never_shows_a_key,
    bad_input_gets_the_error_envelope,
    oversized_bodies_are_refused,
    unknown_routes_and_methods_get_the_envelope,
    request_ids_are_returned_and_propagated,
    projects_are_isolated,
    a_second_node_sees_changes,
    changes_reach_a_running_node_within_a_second,
    shutdown_finishes_and_stops,
    draining_closes_kept_alive_connections_and_refuses_new_ones,
);

struct TestApp {
    server: RunningServer,
    /// Unauthenticated.
    client: Client,
    /// The bootstrap project's secret key.
    secret: Client,
    publishable: Client,
    db: Arc<TestDatabase>,
}

fn settings_for(db: &TestDatabase) -> Settings {
    common::test_settings(db)
}

async fn spawn_app(backend: Backend) -> TestApp {
    let db = Arc::new(TestDatabase::create(backend).await);
    spawn_on(db).await
}

async fn spawn_on(db: Arc<TestDatabase>) -> TestApp {
    let started = common::start(settings_for(&db), Arc::new(SystemClock)).await;
    TestApp {
        server: started.server,
        client: started.client,
        secret: started.secret,
        publishable: started.publishable,
        db,
    }
}

fn code_of(error: flywheel_client::Error) -> (u16, String) {
    let (status, code) = error
        .status_and_code()
        .unwrap_or_else(|| panic!("not an envelope: {error}"));
    (status, code.to_string())
}

async fn health_readiness_and_contract(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(app.client.healthz().await.unwrap().status, "ok");
    let ready = app.client.readyz().await.unwrap();
    assert_eq!(ready.status, "ready");
    assert_eq!(ready.backend, backend.as_str());
    assert_eq!(ready.projects, 1, "the bootstrap project");

    let doc = app.client.openapi().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/project",
        "/v1/keys",
        "/v1/keys/{key_id}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
}

async fn metrics_count_requests_by_route(backend: Backend) {
    let app = spawn_app(backend).await;
    app.secret.current_project().await.unwrap();
    let text = app.client.metrics().await.unwrap();
    assert!(
        text.contains(
            "flywheel_http_requests_total{method=\"GET\",route=\"/v1/project\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("flywheel_http_request_duration_seconds_bucket"),
        "latency histograms"
    );
    assert!(
        text.contains(&format!(
            "flywheel_store_operation_seconds_count{{backend=\"{}\"",
            backend.as_str()
        )),
        "store timings"
    );
}

async fn every_bad_credential_gets_its_status(backend: Backend) {
    let app = spawn_app(backend).await;
    let project = app.secret.current_project().await.unwrap();
    assert_eq!(project.name, "default");
    assert_eq!(project.key_kind, KeyKind::Secret);
    assert_eq!(
        app.publishable.current_project().await.unwrap().key_kind,
        KeyKind::Publishable
    );

    let missing = app.client.current_project().await.unwrap_err();
    assert_eq!(code_of(missing), (401, "missing_api_key".into()));

    let well_formed_unknown = app.client.with_key(format!("sk_{}", "A".repeat(32)));
    for client in [app.client.with_key("garbage"), well_formed_unknown] {
        assert_eq!(
            code_of(client.current_project().await.unwrap_err()),
            (401, "invalid_api_key".into())
        );
    }

    for header in ["Basic Zm9vOmJhcg==", "Bearer", "sk_nospace"] {
        let request = app
            .client
            .request(Method::GET, "/v1/project")
            .header("authorization", header);
        let err = app.client.send::<Value>(request).await.unwrap_err();
        assert_eq!(
            code_of(err),
            (401, "invalid_authorization_header".into()),
            "{header}"
        );
    }

    let forbidden = app.publishable.list_keys().await.unwrap_err();
    assert_eq!(code_of(forbidden), (403, "secret_key_required".into()));
    let forbidden = app
        .publishable
        .create_key(KeyKind::Secret, None)
        .await
        .unwrap_err();
    assert_eq!(code_of(forbidden), (403, "secret_key_required".into()));
}

async fn keys_work_and_stop_working_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app
        .secret
        .create_key(KeyKind::Secret, Some("ci"))
        .await
        .unwrap();
    assert!(created.key.starts_with("sk_"));
    assert!(created.key.starts_with(&created.info.prefix));
    assert_eq!(created.info.label.as_deref(), Some("ci"));
    let new_client = app.client.with_key(&created.key);
    assert_eq!(
        new_client.list_keys().await.unwrap().len(),
        3,
        "usable at once, on this node"
    );

    let revoked = app.secret.revoke_key(created.info.id).await.unwrap();
    let revoked_at = revoked.revoked_at.expect("revoked");
    assert_eq!(
        code_of(new_client.current_project().await.unwrap_err()),
        (401, "invalid_api_key".into())
    );

    let again = app.secret.revoke_key(created.info.id).await.unwrap();
    assert_eq!(
        again.revoked_at,
        Some(revoked_at),
        "revoking twice keeps the first time"
    );

    let unknown = app
        .secret
        .revoke_key(uuid::Uuid::now_v7())
        .await
        .unwrap_err();
    assert_eq!(code_of(unknown), (404, "key_not_found".into()));
    let bad_id = app
        .secret
        .send::<Value>(app.secret.request(Method::DELETE, "/v1/keys/not-a-uuid"))
        .await;
    assert_eq!(code_of(bad_id.unwrap_err()), (400, "invalid_key_id".into()));

    let publishable = app
        .secret
        .create_key(KeyKind::Publishable, None)
        .await
        .unwrap();
    assert!(publishable.key.starts_with("pk_"));
    assert_eq!(
        app.client
            .with_key(&publishable.key)
            .current_project()
            .await
            .unwrap()
            .key_kind,
        KeyKind::Publishable
    );
}

async fn key_listing_never_shows_a_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app.secret.create_key(KeyKind::Secret, None).await.unwrap();
    let raw = app
        .secret
        .request(Method::GET, "/v1/keys")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!raw.contains(&created.key), "plaintext never listed");
    assert!(raw.contains(&created.info.prefix));
    let keys = app.secret.list_keys().await.unwrap();
    assert_eq!(keys.len(), 3);
    assert!(keys
        .iter()
        .all(|k| k.prefix.len() == 9 && k.revoked_at.is_none()));
}

async fn bad_input_gets_the_error_envelope(backend: Backend) {
    let app = spawn_app(backend).await;
    let long_label = format!(r#"{{"kind":"secret","label":"{}"}}"#, "x".repeat(101));
    let cases: Vec<(&str, &str, (u16, &str))> = vec![
        ("application/json", "{not json", (400, "invalid_json")),
        ("application/json", "", (400, "invalid_json")),
        (
            "application/json",
            r#"{"kind":"admin"}"#,
            (400, "invalid_body"),
        ),
        (
            "application/json",
            r#"{"kind":"secret","extra":1}"#,
            (400, "invalid_body"),
        ),
        ("application/json", r#"[1,2,3]"#, (400, "invalid_body")),
        ("application/json", r#"{"kind":1}"#, (400, "invalid_body")),
        (
            "application/json; charset=utf-8",
            r#"{"kind":"secret","label":7}"#,
            (400, "invalid_body"),
        ),
        (
            "text/plain",
            r#"{"kind":"secret"}"#,
            (415, "unsupported_media_type"),
        ),
        ("application/json", &long_label, (400, "invalid_key_label")),
        (
            "application/json",
            "{\"kind\":\"secret\",\"label\":\"\\u0000\"}",
            (400, "invalid_key_label"),
        ),
    ];
    for (content_type, body, expected) in cases {
        let request = app
            .secret
            .request(Method::POST, "/v1/keys")
            .header("content-type", content_type)
            .body(body.to_string());
        let err = app.secret.send::<Value>(request).await.unwrap_err();
        assert_eq!(
            code_of(err),
            (expected.0, expected.1.to_string()),
            "{content_type} {body:?}"
        );
    }
    assert_eq!(
        app.secret.list_keys().await.unwrap().len(),
        2,
        "nothing was created"
    );
}

async fn oversized_bodies_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let huge = format!(
        r#"{{"kind":"secret","label":"{}"}}"#,
        // Just over the 64 KiB limit: small enough to be fully sent before
        // the server answers, so the client reads the 413 rather than a reset.
        "x".repeat(66 * 1024)
    );
    let request = app
        .secret
        .request(Method::POST, "/v1/keys")
        .header("content-type", "application/json")
        .body(huge);
    let err = app.secret.send::<Value>(request).await.unwrap_err();
    assert_eq!(code_of(err), (413, "payload_too_large".into()));
    // The server is unharmed.
    assert_eq!(app.secret.list_keys().await.unwrap().len(), 2);
}

async fn unknown_routes_and_methods_get_the_envelope(backend: Backend) {
    let app = spawn_app(backend).await;
    let err = app
        .client
        .send::<Value>(app.client.request(Method::GET, "/v1/nope"))
        .await
        .unwrap_err();
    assert_eq!(code_of(err), (404, "route_not_found".into()));
    let err = app
        .client
        .send::<Value>(app.client.request(Method::PUT, "/healthz"))
        .await
        .unwrap_err();
    assert_eq!(code_of(err), (405, "method_not_allowed".into()));
}

async fn request_ids_are_returned_and_propagated(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app
        .client
        .request(Method::GET, "/healthz")
        .send()
        .await
        .unwrap();
    let minted = response
        .headers()
        .get("x-request-id")
        .expect("minted")
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(minted).is_ok(), "{minted}");
    let response = app
        .client
        .request(Method::GET, "/v1/project")
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["x-request-id"],
        "trace-me-123",
        "kept on errors too"
    );
}

async fn projects_are_isolated(backend: Backend) {
    let app = spawn_app(backend).await;
    let state = app.server.state();
    let other =
        flywheel_server::projects::create_project(state.store.as_ref(), &SystemClock, "other")
            .await
            .unwrap();
    state
        .snapshot
        .reload_project(other.project.id)
        .await
        .unwrap();
    let other_client = app.client.with_key(&other.secret_key.plaintext);
    assert_eq!(other_client.current_project().await.unwrap().name, "other");

    let mine = app.secret.list_keys().await.unwrap();
    let theirs = other_client.list_keys().await.unwrap();
    assert!(mine.iter().all(|k| !theirs.contains(k)));
    let err = other_client.revoke_key(mine[0].id).await.unwrap_err();
    assert_eq!(
        code_of(err),
        (404, "key_not_found".into()),
        "another project's key is invisible"
    );
    assert!(app.secret.list_keys().await.unwrap()[0]
        .revoked_at
        .is_none());
}

async fn a_second_node_sees_changes(backend: Backend) {
    let first = spawn_app(backend).await;
    let second = spawn_on(first.db.clone()).await;
    assert!(
        second.server.bootstrap.is_none(),
        "only an empty store gets a default project"
    );

    let created = first
        .secret
        .create_key(KeyKind::Secret, None)
        .await
        .unwrap();
    let on_second = second.client.with_key(&created.key);
    // Catch the second node up deterministically (its watcher would do the same).
    second.server.state().snapshot.poll_once().await.unwrap();
    assert_eq!(on_second.current_project().await.unwrap().name, "default");

    first.secret.revoke_key(created.info.id).await.unwrap();
    second.server.state().snapshot.poll_once().await.unwrap();
    assert_eq!(
        code_of(on_second.current_project().await.unwrap_err()),
        (401, "invalid_api_key".into())
    );
}

/// The real watcher (polling on SQLite, LISTEN/NOTIFY on PostgreSQL) applies
/// another node's change within the one second the design promises.
async fn changes_reach_a_running_node_within_a_second(backend: Backend) {
    let first = spawn_app(backend).await;
    let second = spawn_on(first.db.clone()).await;
    let created = first
        .secret
        .create_key(KeyKind::Publishable, None)
        .await
        .unwrap();
    let on_second = second.client.with_key(&created.key);
    let seen = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if on_second.current_project().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "the second node did not see the new key within 1 s"
    );
}

async fn shutdown_finishes_and_stops(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = app.server.base_url();
    app.server.shutdown().await.unwrap();
    let after = reqwest::get(format!("{base}/healthz")).await;
    assert!(after.is_err(), "no longer accepting connections");
}

/// During the drain window a kept-alive connection still gets its answer,
/// marked `Connection: close`, and new connections are refused outright.
async fn draining_closes_kept_alive_connections_and_refuses_new_ones(backend: Backend) {
    let db = Arc::new(TestDatabase::create(backend).await);
    let mut settings = settings_for(&db);
    settings.http.shutdown_drain_ms = 3_000;
    let server = flywheel_server::start(settings, Arc::new(SystemClock))
        .await
        .unwrap();
    let address = server.local_addr();
    // One explicit kept-alive connection (a pooled client may open a new one
    // whenever the old one is not back in its pool yet, racing the closing
    // listener).
    let mut connection =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(address).await.unwrap());
    let first = get_on(&mut connection, "/healthz").await;
    assert!(
        !first.contains("connection: close"),
        "keep-alive before shutdown: {first}"
    );

    server.shutdown_token().cancel();
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let head = get_on(&mut connection, "/healthz").await;
            assert!(
                head.starts_with("http/1.1 200"),
                "answered while draining: {head}"
            );
            if head.contains("connection: close") {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "responses say Connection: close while draining"
    );
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        while tokio::net::TcpStream::connect(address).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "new connections are refused while draining"
    );
    server.wait().await.unwrap();
}

/// Sends `GET path` on a kept-alive HTTP/1.1 connection and returns the
/// response head, lower-cased (the body is read and dropped).
async fn get_on(
    connection: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    path: &str,
) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    connection
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .unwrap();
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        let read = connection.read_line(&mut line).await.unwrap();
        assert!(read > 0, "the connection closed before a response");
        let line = line.to_ascii_lowercase();
        if let Some(value) = line.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    connection.read_exact(&mut body).await.unwrap();
    head
}
