//! Shared by the server's integration tests: settings for a throwaway store
//! on port 0, and a started server with its bootstrap keys as clients.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex};

use flywheel_client::Client;
use flywheel_domain::clock::SharedClock;
use flywheel_server::{RunningServer, Settings};
use flywheel_store::testing::TestDatabase;

/// Settings for a server on a free port over `db`.
pub fn test_settings(db: &TestDatabase) -> Settings {
    let options = db.options();
    let mut settings = Settings {
        bind: "127.0.0.1:0".parse().unwrap(),
        data_dir: options.data_dir,
        database_url: options.database_url,
        ..Settings::default()
    };
    settings.http.body_limit_bytes = 64 * 1024;
    settings.snapshot.poll_interval_ms = 20;
    settings
}

/// A running server and clients for the `default` project's keys (plain
/// clients when this start did not create the project: a second node).
pub struct Started {
    pub server: RunningServer,
    pub client: Client,
    pub secret: Client,
    pub publishable: Client,
    pub publishable_key: Option<String>,
}

pub async fn start(settings: Settings, clock: SharedClock) -> Started {
    let server = flywheel_server::start(settings, clock)
        .await
        .expect("the server starts");
    let client = Client::new(server.base_url());
    let (secret, publishable, publishable_key) = match &server.bootstrap {
        Some(created) => (
            client.with_key(&created.secret_key.plaintext),
            client.with_key(&created.publishable_key.plaintext),
            Some(created.publishable_key.plaintext.clone()),
        ),
        None => (client.clone(), client.clone(), None),
    };
    Started {
        server,
        client,
        secret,
        publishable,
        publishable_key,
    }
}

/// Sends one request and returns its status and JSON body (`null` when the
/// body is not JSON).
pub async fn call(
    client: &Client,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut request = client.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Webhooks a receiver got: the Standard Webhooks headers (as JSON) and the
/// body, in arrival order.
pub type Webhooks = Arc<Mutex<Vec<(serde_json::Value, String)>>>;

/// A local HTTP receiver at `url` that records each webhook; with
/// `fail_first` it answers 500 to the first delivery, to exercise a retry.
pub async fn receiver_failing_first(fail_first: bool) -> (String, Webhooks) {
    let seen: Webhooks = Arc::default();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(!fail_first));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let record = record.clone();
            let failed_once = failed_once.clone();
            async move {
                if !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return reqwest::StatusCode::INTERNAL_SERVER_ERROR;
                }
                let headers = serde_json::json!({
                    "webhook-id": headers["webhook-id"].to_str().unwrap(),
                    "webhook-timestamp": headers["webhook-timestamp"].to_str().unwrap(),
                    "webhook-signature": headers["webhook-signature"].to_str().unwrap(),
                });
                record.lock().unwrap().push((headers, body));
                reqwest::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}
