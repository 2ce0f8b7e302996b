//! What every handler can reach.

use std::sync::Arc;

use flywheel_domain::clock::SharedClock;
use flywheel_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::billing::OrgWriter;
use crate::growth::{GrowthKeys, IpLimiter};
use crate::ingest::{Committer, RateLimiter};
use crate::outbound::OutboxSignal;
use crate::settings::{BillingSettings, GrowthSettings, IngestSettings, StripeSettings};
use crate::snapshot::SnapshotCache;

/// What every handler can reach, behind one `Arc`: axum clones the state for
/// every request, and one reference count is cheaper than one per field (a
/// profile of `/v1/check` showed ~10 % in cloning and dropping the fields).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub snapshot: Arc<SnapshotCache>,
    pub clock: SharedClock,
    pub metrics: PrometheusHandle,
    pub committer: Committer,
    pub rate_limiter: Arc<RateLimiter>,
    /// Per-key limit on OFREP evaluation requests.
    pub evaluation_rate_limiter: Arc<RateLimiter>,
    pub ingest: Arc<IngestSettings>,
    /// Group-commits org writes (`consume`, `release`, plan changes).
    pub org_writer: OrgWriter,
    pub billing: Arc<BillingSettings>,
    pub stripe: Arc<StripeSettings>,
    /// Stripe's API, when `stripe.api_key` is set (Checkout, billing portal).
    pub stripe_client: Option<crate::stripe_api::StripeClient>,
    pub growth: Arc<GrowthSettings>,
    pub growth_keys: GrowthKeys,
    /// Whether `smtp.url` is set (emails are queued only then).
    pub smtp_enabled: bool,
    /// Wakes the webhook and email senders after an outbox write.
    pub outbox_signal: Arc<OutboxSignal>,
    pub share_resolve_limiter: IpLimiter,
    pub flags: Arc<crate::settings::FlagSettings>,
    /// Users' profiles for flag-context enrichment.
    pub profiles: Arc<crate::enrichment::ProfileCache>,
    /// This node's open live streams.
    pub live: Arc<crate::live::LiveHub>,
    /// Cancelled when the server starts draining: live streams end and no
    /// new connection is accepted.
    pub live_closing: tokio_util::sync::CancellationToken,
    /// Set at the same moment: every response then says `Connection: close`.
    /// A flag beside the token because it is read on every request, and the
    /// token's check takes a lock.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Projects' identity-verification secrets, once read.
    pub identity_secrets: dashmap::DashMap<flywheel_domain::project::ProjectId, Arc<str>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}
