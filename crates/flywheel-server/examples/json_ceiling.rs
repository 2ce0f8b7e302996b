//! The HTTP ceiling for the `check` benchmark: a minimal axum server that
//! parses a small JSON body and answers a small JSON body, nothing else.
//! `scripts/bench-billing` runs it beside Flywheel in the same run.
//!
//! Run: cargo run --release -p flywheel-server --example json_ceiling -- 127.0.0.1:0

use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Request {
    org_id: String,
    feature: String,
}

#[derive(Serialize)]
struct Answer {
    allowed: bool,
    org_id: String,
    feature: String,
    used: i64,
    limit: i64,
}

async fn check(Json(request): Json<Request>) -> Json<Answer> {
    Json(Answer {
        allowed: true,
        org_id: request.org_id,
        feature: request.feature,
        used: 4,
        limit: 5,
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, Router::new().route("/check", post(check))).await
}
