//! Flywheel's HTTP server as a library. The `flywheel` binary is a thin CLI
//! over [`start`]; integration tests call [`start`] too, on port 0.
//!
//! Boundaries: this crate owns HTTP (axum), settings, telemetry and the
//! in-memory decision snapshot. Storage is reached only through the
//! `flywheel_store::Store` trait; rules live in `flywheel_domain`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::Router;
use flywheel_domain::clock::SharedClock;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod auth;
pub mod billing;
pub mod cors;
pub mod enrichment;
pub mod error;
pub mod growth;
pub mod ingest;
pub mod live;
pub mod openapi;
pub mod outbound;
pub mod projects;
pub mod routes;
pub mod serial_loop;
pub mod settings;
pub mod shutdown;
pub mod snapshot;
pub mod state;
pub mod stream_connections;
pub mod stripe_api;
pub mod telemetry;

pub use settings::Settings;
pub use state::AppState;

use crate::projects::CreatedProject;
use crate::snapshot::SnapshotCache;

/// A server that is accepting connections.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    state: AppState,
    /// The `default` project, when this start created it (an empty store).
    pub bootstrap: Option<CreatedProject>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A token that, once cancelled, starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting connections, lets in-flight requests finish (up to the
    /// configured grace period), stops background work, and returns.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Runs until the shutdown token is cancelled and the server has drained.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task panicked")?
    }
}

/// Opens the store, loads the snapshot, binds and starts serving.
pub async fn start(settings: Settings, clock: SharedClock) -> anyhow::Result<RunningServer> {
    // First, so the store work done while starting is measured too.
    let metrics = telemetry::metrics_handle();
    let store = flywheel_store::open(&settings.store_options())
        .await
        .context("cannot open the store")?;
    let bootstrap = projects::ensure_default_project(store.as_ref(), clock.as_ref())
        .await
        .context("cannot create the default project")?;
    let snapshot = Arc::new(
        SnapshotCache::load_from(store.clone())
            .await
            .context("cannot load configuration")?,
    );
    let background = CancellationToken::new();
    let profiles = Arc::new(enrichment::ProfileCache::new(Duration::from_millis(
        settings.flags.enrichment_ttl_ms,
    )));
    let outbox_signal = Arc::new(outbound::OutboxSignal::default());
    let (committer, committer_task) = ingest::Committer::spawn(
        store.clone(),
        snapshot.orgs.clone(),
        profiles.clone(),
        outbox_signal.clone(),
        settings.billing.grace(),
        settings.ingest.group_commit_max_events,
        background.clone(),
    )
    .context("cannot start the event committer")?;
    let (org_writer, org_writer_task) = billing::OrgWriter::spawn(
        store.clone(),
        snapshot.orgs.clone(),
        outbox_signal.clone(),
        settings.billing.write_batch_max,
        background.clone(),
    );
    growth::check_settings(&settings.growth)?;
    let growth_keys = growth::GrowthKeys::load(store.as_ref())
        .await
        .context("cannot load the installation's growth keys")?;
    let webhooks_task = tokio::spawn(outbound::run_webhooks(
        store.clone(),
        clock.clone(),
        settings.webhooks.clone(),
        outbox_signal.clone(),
        background.clone(),
    ));
    let emails_task = tokio::spawn(outbound::run_emails(
        store.clone(),
        clock.clone(),
        settings.smtp.clone(),
        outbox_signal.clone(),
        background.clone(),
    ));
    let live = live::LiveHub::new(store.clone())
        .await
        .context("cannot read the live messages")?;
    let live_task = tokio::spawn(live::run(
        live.clone(),
        outbox_signal.clone(),
        Duration::from_secs(1),
        background.clone(),
    ));
    let live_closing = CancellationToken::new();
    let state = AppState::new(state::Shared {
        store,
        snapshot: snapshot.clone(),
        clock,
        metrics,
        committer,
        rate_limiter: Arc::new(ingest::RateLimiter::new(settings.ingest.rate_limit_per_key)),
        evaluation_rate_limiter: Arc::new(ingest::RateLimiter::new(
            settings.flags.rate_limit_per_key,
        )),
        ingest: Arc::new(settings.ingest.clone()),
        org_writer,
        billing: Arc::new(settings.billing.clone()),
        stripe: Arc::new(settings.stripe.clone()),
        stripe_client: stripe_api::StripeClient::from_settings(&settings.stripe),
        growth: Arc::new(settings.growth.clone()),
        growth_keys,
        smtp_enabled: settings.smtp.url.is_some(),
        outbox_signal,
        share_resolve_limiter: growth::IpLimiter::new(
            settings.growth.share_resolves_per_minute_per_ip,
        ),
        flags: Arc::new(settings.flags.clone()),
        profiles,
        live: live.clone(),
        live_closing: live_closing.clone(),
        draining: Default::default(),
        identity_secrets: Default::default(),
    });
    let listener = TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.bind))?;
    let local_addr = listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(snapshot::watch(
        snapshot,
        live,
        Duration::from_millis(settings.snapshot.poll_interval_ms.max(10)),
        background.clone(),
    ));
    let app = app(state.clone(), &settings);
    // One acceptor: connections that open a stream are served outside
    // hyper (see `stream_connections`), the rest go to `axum::serve`.
    let (to_hyper, hyper_connections) = tokio::sync::mpsc::channel(1024);
    let stream_tasks = tokio_util::task::TaskTracker::new();
    let acceptor = tokio::spawn(stream_connections::accept(
        listener,
        // Draining ends the streams and the accepting together.
        live_closing.clone(),
        to_hyper,
        app.clone(),
        stream_tasks.clone(),
    ));
    let listener = shutdown::DrainingListener::new(hyper_connections, local_addr);
    let grace = Duration::from_secs(settings.http.shutdown_grace_secs);
    let drain = Duration::from_millis(settings.http.shutdown_drain_ms);
    let token = shutdown.clone();
    let drain_state = state.clone();
    let task = tokio::spawn(async move {
        // Drain first (refuse new connections, close kept-alive ones after
        // their next response), then close what is idle and finish the rest.
        let drained = {
            let token = token.clone();
            async move {
                token.cancelled().await;
                drain_state
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                // No new connections, and open streams end now: their
                // clients reconnect elsewhere and resume from Last-Event-ID.
                live_closing.cancel();
                tokio::time::sleep(drain).await;
            }
        };
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<routes::growth::PeerAddr>(),
        )
        .with_graceful_shutdown(drained);
        let outcome = tokio::select! {
            served = serve => served.context("the HTTP server failed"),
            _ = async { token.cancelled().await; tokio::time::sleep(drain + grace).await } => {
                tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish within the grace period");
                Ok(())
            }
        };
        // Streams served outside hyper ended when `live_closing` fired.
        if let Err(error) = acceptor.await {
            tracing::warn!(error = %error, "the connection acceptor ended abnormally");
        }
        stream_tasks.close();
        if tokio::time::timeout(grace, stream_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("stream connections did not close within the grace period");
        }
        // HTTP has drained: now stop and flush background work.
        background.cancel();
        if let Err(error) = watcher.await {
            tracing::warn!(error = %error, "the snapshot watcher ended abnormally");
        }
        if let Err(error) = committer_task.await {
            tracing::warn!(error = %error, "the event committer ended abnormally");
        }
        if let Err(error) = org_writer_task.await {
            tracing::warn!(error = %error, "the org writer ended abnormally");
        }
        for (name, task) in [
            ("webhook sender", webhooks_task),
            ("email sender", emails_task),
            ("live hub", live_task),
        ] {
            if let Err(error) = task.await {
                tracing::warn!(error = %error, "the {name} ended abnormally");
            }
        }
        tracing::info!("shutdown complete");
        outcome
    });
    tracing::info!(address = %local_addr, backend = state.store.backend().as_str(), "flywheel is listening");
    Ok(RunningServer {
        local_addr,
        state,
        bootstrap,
        shutdown,
        task,
    })
}

/// The complete application: routes plus the middleware every request passes.
pub fn app(state: AppState, settings: &Settings) -> Router {
    let timeout = Duration::from_secs(settings.http.request_timeout_secs.max(1));
    let draining = state.draining.clone();
    routes::router()
        // The whole request edge (request id, span, timeout, panics, CORS,
        // drain, metrics) is this one layer: see `telemetry::track_http`.
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            telemetry::track_http(timeout, draining.clone(), request, next)
        }))
        .layer(DefaultBodyLimit::max(settings.http.body_limit_bytes))
        .with_state(state)
}
