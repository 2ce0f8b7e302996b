//! Logs and metrics.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global tracing subscriber. `RUST_LOG` overrides the configured filter.
pub fn init_tracing(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env)?,
        _ => EnvFilter::try_new(&settings.filter)?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match settings.format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(())
}

/// The process-wide Prometheus recorder; installed on first use so several
/// servers in one test process share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding app's);
            // then our handle renders only what we record through it, which is nothing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a global metrics recorder was already installed; /metrics will be empty"
                );
            }
            handle
        })
        .clone()
}

/// The request-id header: the caller's, or a fresh one, on every response.
pub const REQUEST_ID: axum::http::HeaderName = axum::http::HeaderName::from_static("x-request-id");

/// A random UUID from the thread's userspace CSPRNG (tower-http's
/// `MakeRequestUuid` asks the kernel for entropy on every request).
fn new_request_id() -> axum::http::HeaderValue {
    let bytes: [u8; 16] = rand::random();
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    axum::http::HeaderValue::from_str(id.hyphenated().encode_lower(&mut text))
        .expect("a UUID is a valid header value")
}

/// The request edge, in one middleware (each layer costs a boxed service
/// clone and a boxed future per request, and a `tower-http` layer clones its
/// configuration too): it
/// - gives the request an id (`X-Request-Id`: the caller's, else a fresh
///   UUID) and returns it on the response;
/// - runs the request in a `request` span (method, path, request id) and
///   logs a 5xx at error level;
/// - bounds it by `timeout` (408 `request_timeout`) and turns a handler
///   panic into a 500 `internal` envelope (never a dropped connection);
/// - answers CORS preflights and adds the CORS headers ([`crate::cors`]);
/// - marks responses `Connection: close` while the server drains
///   (keep-alive clients finish what they sent and reconnect elsewhere);
/// - counts requests and times them, labelled by route template (not the
///   raw path, which would give every id its own series).
pub async fn track_http(
    timeout: std::time::Duration,
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut request: Request,
    next: Next,
) -> Response {
    use futures_util::FutureExt as _;
    use tracing::Instrument as _;
    let started = Instant::now();
    let request_id = match request.headers().get(REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = new_request_id();
            request.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = static_method(request.method());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = request_id.to_str().unwrap_or("-"),
    );
    let mut response = if crate::cors::is_preflight(&request) {
        crate::cors::preflight()
    } else {
        let handled =
            std::panic::AssertUnwindSafe(tokio::time::timeout(timeout, next.run(request)))
                .catch_unwind()
                .instrument(span.clone())
                .await;
        let mut response = match handled {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => crate::error::ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request took longer than {} s", timeout.as_secs()),
            )
            .into_response(),
            Err(_) => {
                tracing::error!(parent: &span, "a request handler panicked");
                crate::error::ApiError::internal("handler panicked").into_response()
            }
        };
        crate::cors::add_headers(response.headers_mut());
        response
    };
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, request_id);
    if draining.load(std::sync::atomic::Ordering::Relaxed) {
        headers.insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if status >= 500 {
        tracing::error!(parent: &span, status, latency_ms = elapsed.as_secs_f64() * 1e3, "request failed");
    } else {
        tracing::debug!(parent: &span, status, latency_ms = elapsed.as_secs_f64() * 1e3, "request finished");
    }
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let (requests, duration) = http_metrics(method, route, status);
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
    response
}

fn static_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

type HttpHandles = (metrics::Counter, metrics::Histogram);
type HandlesByRoute = std::collections::HashMap<
    String,
    Vec<((&'static str, u16), HttpHandles)>,
    foldhash::fast::RandomState,
>;

thread_local! {
    /// Metric handles per route, then per (method, status), per worker
    /// thread: the registry look-up (building and hashing the label set,
    /// allocating its strings) was a visible share of a cheap request.
    static HTTP_METRICS: std::cell::RefCell<HandlesByRoute> = std::cell::RefCell::new(HandlesByRoute::default());
}

fn http_metrics(method: &'static str, route: &str, status: u16) -> HttpHandles {
    HTTP_METRICS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(found) = cache
            .get(route)
            .and_then(|entries| entries.iter().find(|(key, _)| *key == (method, status)))
        {
            return found.1.clone();
        }
        let handles = (
            metrics::counter!("flywheel_http_requests_total", "method" => method, "route" => route.to_owned(), "status" => status.to_string()),
            metrics::histogram!("flywheel_http_request_duration_seconds", "method" => method, "route" => route.to_owned()),
        );
        cache
            .entry(route.to_owned())
            .or_default()
            .push(((method, status), handles.clone()));
        handles
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::middleware;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn edge(draining: Arc<AtomicBool>) -> Router {
        Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("a handler bug");
                    }
                    "unreachable"
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .layer(middleware::from_fn(move |request, next| {
                // Short, so the slow route runs past it at once.
                track_http(Duration::from_millis(50), draining.clone(), request, next)
            }))
    }

    async fn send(router: &Router, request: Request<Body>) -> Response {
        router.clone().oneshot(request).await.unwrap()
    }

    fn get_request(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    async fn error_code(response: Response) -> String {
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        body["error"]["code"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn every_response_has_a_request_id_and_cors_headers() {
        let router = edge(Arc::default());
        let minted = send(&router, get_request("/ok")).await;
        assert_eq!(minted.status(), StatusCode::OK);
        let id = minted.headers()[REQUEST_ID].to_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        assert_eq!(minted.headers()["access-control-allow-origin"], "*");
        let mut request = get_request("/missing");
        request
            .headers_mut()
            .insert(REQUEST_ID, "caller-7".parse().unwrap());
        let kept = send(&router, request).await;
        assert_eq!(kept.status(), StatusCode::NOT_FOUND);
        assert_eq!(kept.headers()[REQUEST_ID], "caller-7");
        assert!(!kept.headers().contains_key("connection"));
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_500_envelope_not_a_dropped_connection() {
        let router = edge(Arc::default());
        let response = send(&router, get_request("/boom")).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().contains_key(REQUEST_ID));
        assert_eq!(error_code(response).await, "internal");
        // The router still serves.
        assert_eq!(
            send(&router, get_request("/ok")).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_request_over_the_timeout_is_a_408() {
        let router = edge(Arc::default());
        let response = send(&router, get_request("/slow")).await;
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(error_code(response).await, "request_timeout");
    }

    #[tokio::test]
    async fn while_draining_responses_close_their_connection() {
        let draining = Arc::new(AtomicBool::new(false));
        let router = edge(draining.clone());
        draining.store(true, Ordering::Relaxed);
        let response = send(&router, get_request("/ok")).await;
        assert_eq!(response.headers()["connection"], "close");
    }

    #[tokio::test]
    async fn a_preflight_is_answered_without_reaching_the_route() {
        let router = edge(Arc::default());
        let request = Request::options("/boom")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .body(Body::empty())
            .unwrap();
        let response = send(&router, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
    }
}
