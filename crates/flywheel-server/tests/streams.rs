//! Long-lived streams on the wire, through the real server: a connection
//! whose first request opens a stream is served outside hyper (chunked,
//! `Connection: close`, middleware applied), a stream on a reused
//! connection is hyper's, refusals are complete responses, a departed
//! client is noticed, and every kind of stream ends cleanly at shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use flywheel_domain::clock::SystemClock;
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct App {
    server: RunningServer,
    _db: TestDatabase,
    publishable_key: String,
    secret_key: String,
}

async fn spawn() -> App {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let mut settings = common::test_settings(&db);
    settings.http.shutdown_drain_ms = 50;
    // Far beyond any test's patience: a shutdown that waits for it is stuck.
    settings.http.shutdown_grace_secs = 600;
    let started = common::start(settings, Arc::new(SystemClock)).await;
    let created = started.server.bootstrap.as_ref().expect("a fresh store");
    App {
        publishable_key: created.publishable_key.plaintext.clone(),
        secret_key: created.secret_key.plaintext.clone(),
        server: started.server,
        _db: db,
    }
}

/// A raw HTTP/1 connection and what it has read so far.
struct Wire {
    socket: TcpStream,
    read: Vec<u8>,
}

impl Wire {
    async fn connect(app: &App) -> Self {
        Self {
            socket: TcpStream::connect(app.server.local_addr()).await.unwrap(),
            read: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        self.socket.write_all(text.as_bytes()).await.unwrap();
    }

    /// Reads until `needle` has arrived (5 s at most).
    async fn until(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8_lossy(&self.read).into_owned();
            if text.contains(needle) {
                return text;
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.socket.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{needle:?} did not arrive; read so far: {text:?}"))
                .unwrap();
            assert!(read > 0, "closed before {needle:?}; read: {text:?}");
            self.read.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads until the server closes the connection (5 s at most).
    async fn until_closed(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.socket.read(&mut chunk))
                .await
                .expect("the server closes the connection")
                .unwrap_or(0);
            if read == 0 {
                return String::from_utf8_lossy(&self.read).into_owned();
            }
            self.read.extend_from_slice(&chunk[..read]);
        }
    }
}

/// The body of a chunked response, decoded.
fn dechunk(body: &str) -> String {
    let mut rest = body;
    let mut decoded = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            assert_eq!(after, "\r\n", "nothing after the last chunk");
            return decoded;
        }
        decoded.push_str(&after[..size]);
        assert_eq!(&after[size..size + 2], "\r\n");
        rest = &after[size + 2..];
    }
}

async fn wait_for_open_streams(app: &App, expected: u64) {
    for _ in 0..250 {
        if app.server.state().live.open_streams() == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "open streams: {} (expected {expected})",
        app.server.state().live.open_streams()
    );
}

#[tokio::test]
async fn a_stream_on_a_fresh_connection_is_served_outside_hyper() {
    let app = spawn().await;
    let mut wire = Wire::connect(&app).await;
    // The head arrives in pieces: the server waits for all of it.
    wire.send("GET /v1/str").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    wire.send(&format!(
        "eam?user_id=alice&key={} HTTP/1.1\r\nHost: flywheel\r\nOrigin: https://app.example\r\n\r\n",
        app.publishable_key
    ))
    .await;
    let text = wire.until("event: flags").await;
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for header in [
        "content-type: text/event-stream",
        "connection: close",
        "transfer-encoding: chunked",
        "x-request-id: ",
        "access-control-allow-origin: ",
        "date: ",
    ] {
        assert!(head.contains(header), "{header:?} missing from {head}");
    }
    wait_for_open_streams(&app, 1).await;
    // The client goes away: the server notices without writing anything.
    drop(wire);
    wait_for_open_streams(&app, 0).await;
    app.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_on_a_reused_connection_is_served_by_hyper() {
    let app = spawn().await;
    let client = reqwest::Client::new();
    let base = app.server.base_url();
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    let mut response = client
        .get(format!(
            "{base}/v1/stream?user_id=bob&key={}",
            app.publishable_key
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // hyper keeps the connection alive; the stream path closes it.
    assert!(response.headers().get("connection").is_none());
    let first = tokio::time::timeout(Duration::from_secs(5), response.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: flags"));
    wait_for_open_streams(&app, 1).await;
    drop(response);
    wait_for_open_streams(&app, 0).await;
    app.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_stream_is_a_complete_response_and_a_closed_connection() {
    let app = spawn().await;
    let mut wire = Wire::connect(&app).await;
    wire.send("GET /v1/stream?user_id=alice HTTP/1.1\r\nHost: flywheel\r\n\r\n")
        .await;
    let text = wire.until_closed().await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let body: serde_json::Value = serde_json::from_str(&dechunk(body)).unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    app.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_http_1_0_stream_is_delimited_by_closing() {
    let app = spawn().await;
    let mut wire = Wire::connect(&app).await;
    wire.send(&format!(
        "GET /v1/flags/stream?key={} HTTP/1.0\r\n\r\n",
        app.publishable_key
    ))
    .await;
    let text = wire.until("refetchEvaluation").await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(body.starts_with("event: message\n"), "{body:?}");
    app.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_kind_of_stream_ends_cleanly_at_shutdown() {
    let app = spawn().await;
    let mut wires = Vec::new();
    for (target, key, first) in [
        (
            "/v1/stream?user_id=carol",
            &app.publishable_key,
            "event: flags",
        ),
        (
            "/v1/flags/stream",
            &app.publishable_key,
            "refetchEvaluation",
        ),
        ("/v1/events/tail", &app.secret_key, "\r\n\r\n"),
    ] {
        let mut wire = Wire::connect(&app).await;
        wire.send(&format!(
            "GET {target} HTTP/1.1\r\nHost: flywheel\r\nAuthorization: Bearer {key}\r\n\r\n"
        ))
        .await;
        wire.until(first).await;
        wires.push(wire);
    }
    let shutdown = tokio::spawn(app.server.shutdown());
    for mut wire in wires {
        let text = wire.until_closed().await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        // The last chunk: the stream finished, it was not cut.
        assert!(body.ends_with("0\r\n\r\n"), "{body:?}");
        dechunk(body);
    }
    // The streams ended, so nothing waits for the 600 s grace period.
    tokio::time::timeout(Duration::from_secs(120), shutdown)
        .await
        .expect("shutdown does not wait for the grace period")
        .unwrap()
        .unwrap();
}
