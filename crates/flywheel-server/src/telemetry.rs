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

/// The request edge: counts requests and times them, labelled by route
/// template (not the raw path, which would give every id its own series),
/// bounds each request by `timeout` (408 `request_timeout`), answers CORS
/// preflights and adds the CORS headers ([`crate::cors`]), and marks
/// responses `Connection: close` while the server drains (keep-alive
/// clients finish what they sent and reconnect elsewhere).
pub async fn track_http(
    timeout: std::time::Duration,
    state: crate::state::AppState,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = static_method(request.method());
    let mut response = if crate::cors::is_preflight(&request) {
        crate::cors::preflight()
    } else {
        let mut response = match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => crate::error::ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request took longer than {} s", timeout.as_secs()),
            )
            .into_response(),
        };
        crate::cors::add_headers(response.headers_mut());
        response
    };
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    let status = response.status().as_u16();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let (requests, duration) = http_metrics(method, route, status);
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
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
