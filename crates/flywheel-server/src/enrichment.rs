//! Flag-context enrichment on the server: what Flywheel knows of the user a
//! `targetingKey` names (see `flywheel_domain::enrichment` for the names
//! added), cached per node so an evaluation rarely waits on the store.
//!
//! Freshness: this node forgets a user's entry when it commits their
//! `identify`/`group` events or a growth write about them (signup, join,
//! removal), so its own writes are seen at once; another node's writes are
//! seen within `flags.enrichment_ttl_ms`. The org's plan and entitlements
//! are not cached here: they come from the org cache, always current.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use flywheel_domain::enrichment::{enrich_context, UserProfile};
use flywheel_domain::project::ProjectId;
use flywheel_domain::snapshot::Principal;
use flywheel_flags::EvaluationContext;
use flywheel_store::Store;
use foldhash::fast::RandomState;
use serde_json::Value;

use crate::state::AppState;

/// Profiles kept per node; past it the cache starts over (a burst of
/// never-seen ids must not grow memory without bound).
const MAX_ENTRIES: usize = 200_000;

struct Entry {
    loaded: Instant,
    /// `None`: nothing is known of this id (cached too, so unknown ids do
    /// not cost a store read each).
    profile: Option<Arc<UserProfile>>,
}

type Profiles = DashMap<String, Entry, RandomState>;

/// The per-node cache of [`UserProfile`]s.
pub struct ProfileCache {
    projects: DashMap<ProjectId, Arc<Profiles>, RandomState>,
    ttl: Duration,
    entries: AtomicUsize,
    /// Bumped by every `forget`: a read that started before a forget must
    /// not cache what it read (it may predate the write being forgotten).
    forgets: AtomicU64,
}

impl std::fmt::Debug for ProfileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileCache")
            .field("ttl", &self.ttl)
            .field("entries", &self.entries.load(Relaxed))
            .finish()
    }
}

impl ProfileCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            projects: DashMap::default(),
            ttl,
            entries: AtomicUsize::new(0),
            forgets: AtomicU64::new(0),
        }
    }

    /// The user's profile: cached while fresh, else read from the store.
    /// A store error is logged and answers `None` (the evaluation goes on
    /// with the caller's context alone).
    pub async fn get(
        &self,
        store: &dyn Store,
        project: ProjectId,
        user_id: &str,
    ) -> Option<Arc<UserProfile>> {
        if let Some(profiles) = self.projects.get(&project) {
            if let Some(entry) = profiles.get(user_id) {
                if entry.loaded.elapsed() < self.ttl {
                    return entry.profile.clone();
                }
            }
        }
        let generation = self.forgets.load(std::sync::atomic::Ordering::Acquire);
        let profile = match store.user_profile(project, user_id).await {
            Ok(profile) => profile.map(Arc::new),
            Err(error) => {
                tracing::warn!(%error, "cannot read the user's profile; evaluating without enrichment");
                return None;
            }
        };
        if self.forgets.load(std::sync::atomic::Ordering::Acquire) != generation {
            // A write was forgotten while we read: answer, but do not keep it.
            return profile;
        }
        if self.entries.fetch_add(1, Relaxed) >= MAX_ENTRIES {
            self.projects.clear();
            self.entries.store(1, Relaxed);
        }
        let profiles = self.projects.entry(project).or_default().clone();
        let previous = profiles.insert(
            user_id.to_owned(),
            Entry {
                loaded: Instant::now(),
                profile: profile.clone(),
            },
        );
        if previous.is_some() {
            self.entries.fetch_sub(1, Relaxed);
        }
        profile
    }

    /// This node wrote something about the user: read it again next time.
    pub fn forget(&self, project: ProjectId, user_id: &str) {
        self.forgets
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        if let Some(profiles) = self.projects.get(&project) {
            if profiles.remove(user_id).is_some() {
                self.entries.fetch_sub(1, Relaxed);
            }
        }
    }
}

/// The caller's context with what Flywheel knows of its `targetingKey`
/// added (caller's values win). Unchanged when enrichment is off, there is
/// no targeting key, or nothing is known of it.
pub async fn enrich(
    state: &AppState,
    principal: &Principal,
    mut context: EvaluationContext,
) -> EvaluationContext {
    if !state.flags.enrichment {
        return context;
    }
    let Some(user) = context
        .get("targetingKey")
        .and_then(Value::as_str)
        .filter(|key| !key.is_empty())
    else {
        return context;
    };
    let project = principal.project_id();
    let Some(profile) = state
        .profiles
        .get(state.store.as_ref(), project, user)
        .await
    else {
        return context;
    };
    let now = state.clock.now();
    let org = match profile.org_for(&context) {
        Some(org_id) => {
            match state
                .snapshot
                .orgs
                .load(state.store.as_ref(), project, org_id, now)
                .await
            {
                Ok(org) => Some(org),
                Err(error) => {
                    tracing::warn!(%error, "cannot read the org's billing state; enriching without it");
                    None
                }
            }
        }
        None => None,
    };
    let config = &principal.project;
    enrich_context(
        &mut context,
        &profile,
        org.as_deref(),
        &config.catalog,
        state.billing.grace(),
        now,
    );
    context
}
