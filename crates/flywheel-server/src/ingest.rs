//! Event ingestion after decoding: rate limits, and the group committer that
//! turns many concurrent requests into one transaction (one fsync) so a 2xx
//! is only sent once the events and their effects are durable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flywheel_domain::events::{prepare, Event, EventType, Prepared, Rejection};
use flywheel_domain::project::KeyId;
use flywheel_domain::snapshot::ProjectConfig;
use flywheel_store::{Billing, CommitResult, EncodedEvent, EventBatch, Store, StoreError};

use crate::billing::OrgCache;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::error::ApiError;

/// What a request's events came to.
#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct IngestOutcome {
    /// Newly stored.
    pub accepted: usize,
    /// Already stored (same event id): nothing changed.
    pub duplicates: usize,
    /// Refused, with their batch index and code; the others were processed.
    pub rejected: Vec<Rejection>,
    /// Dropped because the project requires analytics consent and the event had none.
    pub dropped_no_consent: usize,
    /// Dropped because they name a deleted person.
    pub suppressed: usize,
}

/// A commit failure, copied to every request of the failed group.
#[derive(Debug, Clone, Copy)]
enum CommitFailure {
    Unavailable,
    Internal,
}

struct Job {
    batch: EventBatch,
    reply: oneshot::Sender<Result<Vec<CommitResult>, CommitFailure>>,
}

/// Handle to the group-commit task.
#[derive(Debug, Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
    /// How long a `past_due` subscription keeps its plan (for meters).
    grace: chrono::Duration,
    /// Woken after every commit (for live tails on this node).
    pub committed: Arc<Notify>,
    /// Forgets the profiles `identify` and `group` events change.
    profiles: Arc<crate::enrichment::ProfileCache>,
}

impl Committer {
    /// Starts the commit loop; it stops after `cancel`, once queued jobs are
    /// written, and the returned task ends with it.
    pub fn spawn(
        store: Arc<dyn Store>,
        orgs: Arc<OrgCache>,
        profiles: Arc<crate::enrichment::ProfileCache>,
        outbox: Arc<crate::outbound::OutboxSignal>,
        grace: chrono::Duration,
        max_events: usize,
        cancel: CancellationToken,
    ) -> std::io::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (jobs, receiver) = mpsc::channel(4096);
        let committed = Arc::new(Notify::new());
        let commit_loop = run(
            store,
            orgs,
            outbox,
            receiver,
            max_events.max(1),
            committed.clone(),
            cancel,
        );
        let task = crate::serial_loop::spawn("flywheel-commit", commit_loop)?;
        Ok((
            Self {
                jobs,
                grace,
                committed,
                profiles,
            },
            task,
        ))
    }

    /// Commits one project's events (joining whatever else is waiting) and
    /// returns once they are durable.
    pub async fn commit(
        &self,
        config: &ProjectConfig,
        events: Vec<EncodedEvent>,
    ) -> Result<Vec<CommitResult>, ApiError> {
        let project = config.project.id;
        // Meters need the catalog, and so do activation rules over metered
        // usage and prompts (a milestone's prompt shows the org's usage).
        let billing = (config.catalog.has_meters()
            || config.activation.has_feature_conditions()
            || !config.prompts.is_empty())
        .then(|| Billing::for_project(config, self.grace));
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Whose profile these events change (traits, orgs), to forget once
        // they are committed.
        // With activation rules, any track event may record a milestone.
        let rules = !config.activation.rules.is_empty();
        let touched: Vec<String> = events
            .iter()
            .filter(|encoded| {
                matches!(encoded.event.kind, EventType::Identify | EventType::Group)
                    || (rules && encoded.event.kind == EventType::Track)
            })
            .flat_map(|encoded| {
                encoded
                    .event
                    .user_id
                    .iter()
                    .chain(encoded.event.anonymous_id.iter())
                    .cloned()
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            batch: EventBatch {
                project,
                events,
                billing,
                activation: (!config.activation.rules.is_empty())
                    .then(|| config.activation.clone()),
            },
            reply,
        };
        let unavailable = || {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; retry",
            )
        };
        self.jobs.send(job).await.map_err(|_| unavailable())?;
        match answer.await.map_err(|_| unavailable())? {
            Ok(results) => {
                for id in &touched {
                    self.profiles.forget(project, id);
                }
                Ok(results)
            }
            Err(CommitFailure::Unavailable) => Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store is unavailable; nothing was stored, retry later",
            )),
            Err(CommitFailure::Internal) => {
                Err(ApiError::internal("event commit failed (see the log)"))
            }
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    orgs: Arc<OrgCache>,
    outbox: Arc<crate::outbound::OutboxSignal>,
    mut receiver: mpsc::Receiver<Job>,
    max_events: usize,
    committed: Arc<Notify>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            job = receiver.recv() => match job { Some(job) => job, None => return },
            _ = cancel.cancelled() => {
                // Write what is queued, then stop.
                receiver.close();
                while let Some(job) = receiver.recv().await {
                    commit_group(store.as_ref(), &orgs, &outbox, vec![job], &committed).await;
                }
                return;
            }
        };
        // Everything that queued while the previous commit ran joins this one.
        let mut group = vec![first];
        let mut events = group[0].batch.events.len();
        while events < max_events {
            match receiver.try_recv() {
                Ok(job) => {
                    events += job.batch.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        commit_group(store.as_ref(), &orgs, &outbox, group, &committed).await;
    }
}

async fn commit_group(
    store: &dyn Store,
    orgs: &OrgCache,
    outbox: &crate::outbound::OutboxSignal,
    group: Vec<Job>,
    committed: &Notify,
) {
    let started = Instant::now();
    let (batches, replies): (Vec<_>, Vec<_>) =
        group.into_iter().map(|job| (job.batch, job.reply)).unzip();
    let count: usize = batches.iter().map(|b| b.events.len()).sum();
    // One batch per project: the store's look-ups run once per project and
    // group, not once per request. Each request keeps its span of results.
    let mut merged: Vec<EventBatch> = Vec::new();
    let mut spans = Vec::with_capacity(batches.len());
    for batch in batches {
        let slot = match merged.iter().position(|m| m.project == batch.project) {
            Some(slot) => slot,
            None => {
                merged.push(EventBatch {
                    project: batch.project,
                    events: Vec::new(),
                    billing: batch.billing.clone(),
                    activation: batch.activation.clone(),
                });
                merged.len() - 1
            }
        };
        let start = merged[slot].events.len();
        spans.push((slot, start, batch.events.len()));
        merged[slot].events.extend(batch.events);
    }
    match store.commit_events(&merged).await {
        Ok(commit) => {
            // Usage is in the cache before any request is answered: a check
            // after the 2xx sees the events' effect.
            orgs.offer_all(commit.orgs);
            if commit.outbox {
                outbox.wake();
            }
            let results = commit.results;
            for (reply, (slot, start, len)) in replies.into_iter().zip(spans) {
                let _ = reply.send(Ok(results[slot][start..start + len].to_vec()));
            }
            committed.notify_waiters();
        }
        Err(error) => {
            let failure = match error {
                StoreError::Unavailable(_) => CommitFailure::Unavailable,
                _ => CommitFailure::Internal,
            };
            tracing::error!(error = %error, events = count, "event commit failed; nothing of the group was stored");
            for reply in replies {
                let _ = reply.send(Err(failure));
            }
        }
    }
    metrics::histogram!("flywheel_group_commit_events").record(count as f64);
    metrics::histogram!("flywheel_group_commit_seconds").record(started.elapsed().as_secs_f64());
}

/// Per-key token buckets: `rate` requests per second, bursts up to `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<KeyId, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            rate: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when the key is over its rate.
    pub fn check(&self, key: KeyId, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, last) = buckets.entry(key).or_insert((self.rate, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate).max(Duration::from_secs(1)))
        }
    }
}

/// Splits decode results into events to commit and rejections, commits, and
/// counts the outcome.
pub async fn ingest(
    committer: &Committer,
    config: &ProjectConfig,
    decoded: Vec<Result<Event, Rejection>>,
) -> Result<IngestOutcome, ApiError> {
    let mut outcome = IngestOutcome::default();
    let mut events = Vec::with_capacity(decoded.len());
    for (index, item) in decoded.into_iter().enumerate() {
        match item.map(|event| prepare(event, index, config)) {
            // Encoded here, in the request's task, so the single committer does not.
            Ok(Prepared::Store(event)) => {
                events.push(EncodedEvent::encode(*event).map_err(ApiError::internal)?)
            }
            Ok(Prepared::DroppedNoConsent) => outcome.dropped_no_consent += 1,
            Ok(Prepared::Rejected(rejection)) | Err(rejection) => outcome.rejected.push(rejection),
        }
    }
    for result in committer.commit(config, events).await? {
        match result {
            CommitResult::Accepted { .. } => outcome.accepted += 1,
            CommitResult::Duplicate => outcome.duplicates += 1,
            CommitResult::Suppressed => outcome.suppressed += 1,
        }
    }
    metrics::counter!("flywheel_events_accepted_total").increment(outcome.accepted as u64);
    metrics::counter!("flywheel_events_duplicate_total").increment(outcome.duplicates as u64);
    metrics::counter!("flywheel_events_rejected_total").increment(outcome.rejected.len() as u64);
    metrics::counter!("flywheel_events_dropped_total", "reason" => "no_consent")
        .increment(outcome.dropped_no_consent as u64);
    metrics::counter!("flywheel_events_dropped_total", "reason" => "suppressed")
        .increment(outcome.suppressed as u64);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn rate_limiter_allows_a_burst_then_refills() {
        let limiter = RateLimiter::new(3);
        let key = KeyId(Uuid::now_v7());
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(key, start).is_ok());
        }
        let retry = limiter.check(key, start).unwrap_err();
        assert!(
            retry >= Duration::from_secs(1),
            "Retry-After is whole seconds"
        );
        // A third of a second later one token is back.
        assert!(limiter
            .check(key, start + Duration::from_millis(334))
            .is_ok());
        assert!(limiter
            .check(key, start + Duration::from_millis(334))
            .is_err());
        // Other keys are unaffected.
        assert!(limiter.check(KeyId(Uuid::now_v7()), start).is_ok());
    }
}
