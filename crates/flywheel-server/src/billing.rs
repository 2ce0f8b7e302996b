//! Billing on the hot path: the in-memory org cache that `check` reads, and
//! the group-committing writer for org requests (`consume`, `release`, plan
//! changes, grants), which refreshes the cache before it answers.
//!
//! Invariant: a state enters the cache only if its version is higher than
//! the cached one, so a slow load can never overwrite a newer commit; a
//! write on this node is in the cache before its caller gets the reply, so
//! an event's usage is visible to the next `check` with no delay.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::project::ProjectId;
use flywheel_store::{OrgCommit, OrgRequest, OrgResult, Store, StoreError};
use foldhash::fast::RandomState;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The billing state of every org this node has seen, per project.
/// Two levels so a lookup by `&str` allocates nothing.
#[derive(Debug)]
pub struct OrgCache {
    projects: DashMap<ProjectId, Arc<Orgs>, RandomState>,
    /// Orgs never written (version 0) held in the cache, and the most it
    /// may hold: any caller with a publishable key can name new org ids, so
    /// those answers stop being cached past the bound (each then costs a
    /// store read), while real orgs are always cached.
    phantoms: std::sync::atomic::AtomicUsize,
    max_phantoms: usize,
}

impl Default for OrgCache {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PHANTOM_ORGS)
    }
}

/// See [`OrgCache::new`].
pub const DEFAULT_MAX_PHANTOM_ORGS: usize = 100_000;

type Orgs = DashMap<String, Arc<OrgState>, RandomState>;

impl OrgCache {
    /// A cache holding at most `max_phantoms` never-written orgs.
    pub fn new(max_phantoms: usize) -> Self {
        Self {
            projects: DashMap::default(),
            phantoms: std::sync::atomic::AtomicUsize::new(0),
            max_phantoms,
        }
    }

    fn phantom_count(&self, delta: isize) {
        use std::sync::atomic::Ordering::Relaxed;
        if delta > 0 {
            self.phantoms.fetch_add(1, Relaxed);
        } else {
            let _ = self
                .phantoms
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }

    pub fn get(&self, project: ProjectId, org_id: &str) -> Option<Arc<OrgState>> {
        self.with(project, org_id, |state| state.clone())
    }

    /// Runs `read` on the cached state without taking a reference count
    /// (the `check` hot path).
    pub fn with<R>(
        &self,
        project: ProjectId,
        org_id: &str,
        read: impl FnOnce(&Arc<OrgState>) -> R,
    ) -> Option<R> {
        let orgs = self.projects.get(&project)?;
        let state = orgs.get(org_id)?;
        Some(read(&state))
    }

    fn orgs_of(&self, project: ProjectId) -> Arc<Orgs> {
        if let Some(orgs) = self.projects.get(&project) {
            return orgs.clone();
        }
        self.projects.entry(project).or_default().clone()
    }

    /// Keeps `state` unless a newer (or equal) version is cached; returns
    /// what the cache holds afterwards.
    pub fn offer(&self, project: ProjectId, state: Arc<OrgState>) -> Arc<OrgState> {
        let orgs = self.orgs_of(project);
        let mut inserted = false;
        let mut entry = orgs.entry(state.org_id.clone()).or_insert_with(|| {
            inserted = true;
            state.clone()
        });
        if inserted && state.version == 0 {
            self.phantom_count(1);
        } else if entry.version < state.version {
            if entry.version == 0 {
                self.phantom_count(-1);
            }
            *entry = state;
        }
        entry.clone()
    }

    /// Another node wrote `version`: drop an older cached copy so the next
    /// read loads it.
    pub fn invalidate(&self, project: ProjectId, org_id: &str, version: i64) {
        if let Some(orgs) = self.projects.get(&project) {
            if let Some((_, removed)) = orgs.remove_if(org_id, |_, cached| cached.version < version)
            {
                if removed.version == 0 {
                    self.phantom_count(-1);
                }
            }
        }
    }

    /// Forgets everything (after a lost change feed).
    pub fn clear(&self) {
        self.projects.clear();
        self.phantoms.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The org's state: cached, else loaded (an org never written is fresh,
    /// on the default plan, anchored now).
    pub async fn load(
        &self,
        store: &dyn Store,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Arc<OrgState>, StoreError> {
        if let Some(state) = self.get(project, org_id) {
            return Ok(state);
        }
        match store.load_org(project, org_id).await? {
            Some(loaded) => Ok(self.offer(project, Arc::new(loaded))),
            None => {
                let phantom = Arc::new(OrgState::new(org_id, now));
                if self.phantoms.load(std::sync::atomic::Ordering::Relaxed) >= self.max_phantoms {
                    return Ok(phantom);
                }
                Ok(self.offer(project, phantom))
            }
        }
    }

    pub fn offer_all(&self, orgs: Vec<(ProjectId, Arc<OrgState>)>) {
        for (project, state) in orgs {
            self.offer(project, state);
        }
    }
}

struct Job {
    request: OrgRequest,
    reply: oneshot::Sender<Result<OrgResult, ApiError>>,
}

/// Handle to the org-request writer: requests queued while a transaction
/// runs share the next one (one fsync for many `consume` calls).
#[derive(Debug, Clone)]
pub struct OrgWriter {
    jobs: mpsc::Sender<Job>,
}

impl OrgWriter {
    pub fn spawn(
        store: Arc<dyn Store>,
        cache: Arc<OrgCache>,
        outbox: Arc<crate::outbound::OutboxSignal>,
        max_batch: usize,
        cancel: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (jobs, receiver) = mpsc::channel(4096);
        let task = tokio::spawn(run(
            store,
            cache,
            outbox,
            receiver,
            max_batch.max(1),
            cancel,
        ));
        (Self { jobs }, task)
    }

    /// Applies one request durably and returns its result.
    pub async fn execute(&self, request: OrgRequest) -> Result<OrgResult, ApiError> {
        let (reply, answer) = oneshot::channel();
        let unavailable = || {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; retry",
            )
        };
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| unavailable())?;
        answer.await.map_err(|_| unavailable())?
    }
}

async fn run(
    store: Arc<dyn Store>,
    cache: Arc<OrgCache>,
    outbox: Arc<crate::outbound::OutboxSignal>,
    mut receiver: mpsc::Receiver<Job>,
    max_batch: usize,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            job = receiver.recv() => match job { Some(job) => job, None => return },
            _ = cancel.cancelled() => {
                receiver.close();
                while let Some(job) = receiver.recv().await {
                    write_group(store.as_ref(), &cache, &outbox, vec![job]).await;
                }
                return;
            }
        };
        let mut group = vec![first];
        while group.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        write_group(store.as_ref(), &cache, &outbox, group).await;
    }
}

async fn write_group(
    store: &dyn Store,
    cache: &OrgCache,
    outbox: &crate::outbound::OutboxSignal,
    group: Vec<Job>,
) {
    let (requests, replies): (Vec<_>, Vec<_>) = group
        .into_iter()
        .map(|job| (job.request, job.reply))
        .unzip();
    metrics::histogram!("flywheel_org_write_group_size").record(requests.len() as f64);
    match store.execute_org_requests(&requests).await {
        Ok(OrgCommit {
            results,
            orgs,
            outbox: wrote,
        }) => {
            // Into the cache first: the caller's next check must see it.
            cache.offer_all(orgs);
            if wrote {
                outbox.wake();
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(error) => {
            tracing::error!(error = %error, requests = requests.len(), "org write failed; nothing of the group was applied");
            let unavailable = matches!(error, StoreError::Unavailable(_));
            for reply in replies {
                let _ = reply.send(Err(if unavailable {
                    ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        "the store is unavailable; nothing was applied, retry later",
                    )
                } else {
                    ApiError::internal("org write failed (see the log)")
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(org: &str, version: i64) -> Arc<OrgState> {
        let mut state = OrgState::new(org, Utc::now());
        state.version = version;
        Arc::new(state)
    }

    #[test]
    fn the_cache_keeps_the_newest_version() {
        let cache = OrgCache::default();
        let project = ProjectId::new_v7();
        cache.offer(project, state("acme", 3));
        assert_eq!(
            cache.offer(project, state("acme", 2)).version,
            3,
            "an older load loses"
        );
        assert_eq!(cache.offer(project, state("acme", 4)).version, 4);
        cache.invalidate(project, "acme", 4);
        assert_eq!(
            cache.get(project, "acme").unwrap().version,
            4,
            "not older: kept"
        );
        cache.invalidate(project, "acme", 5);
        assert!(cache.get(project, "acme").is_none());
        assert!(cache.get(ProjectId::new_v7(), "acme").is_none());
    }

    #[tokio::test]
    async fn never_written_orgs_are_cached_only_up_to_the_bound() {
        let store =
            flywheel_store::testing::TestDatabase::create(flywheel_store::Backend::Sqlite).await;
        let store = store_of(&store).await;
        let cache = OrgCache::new(2);
        let project = ProjectId::new_v7();
        for org in ["a", "b", "c"] {
            cache
                .load(store.as_ref(), project, org, Utc::now())
                .await
                .unwrap();
        }
        assert!(cache.get(project, "a").is_some() && cache.get(project, "b").is_some());
        assert!(
            cache.get(project, "c").is_none(),
            "past the bound: answered, not cached"
        );
        // A real state replacing a phantom frees its place.
        cache.offer(project, state("a", 1));
        cache
            .load(store.as_ref(), project, "c", Utc::now())
            .await
            .unwrap();
        assert!(cache.get(project, "c").is_some());
    }

    async fn store_of(db: &flywheel_store::testing::TestDatabase) -> Arc<dyn Store> {
        db.open().await
    }
}
