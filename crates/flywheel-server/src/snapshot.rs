//! Keeps the in-memory [`DecisionSnapshot`] in step with the store.
//!
//! Readers call [`SnapshotCache::load`] and get an `Arc` to an immutable
//! snapshot without taking any lock. Writers (this process's own API writes,
//! and the watcher that follows other processes' writes) rebuild the changed
//! project and swap a whole new snapshot in. Reloads are serialised by an
//! async mutex held across the store read, so a slower, older read can never
//! overwrite a newer one.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flywheel_domain::project::ProjectId;
use flywheel_domain::snapshot::DecisionSnapshot;
use flywheel_store::{ConfigSignal, Store, StoreError};
use tokio::sync::{broadcast, Mutex};
use tokio_util::sync::CancellationToken;

use crate::billing::OrgCache;

#[derive(Debug)]
pub struct SnapshotCache {
    current: ArcSwap<DecisionSnapshot>,
    store: Arc<dyn Store>,
    /// The last `config_changes` sequence number applied (SQLite polling).
    applied_seq: Mutex<i64>,
    /// Announces a project whose flag set changed, with the new set's ETag,
    /// to live-update streams.
    flag_changes: broadcast::Sender<FlagSetChanged>,
    /// Orgs' billing state (hot state beside the configuration).
    pub orgs: Arc<OrgCache>,
}

/// A project's flags changed; `etag` is the new flag set's tag.
#[derive(Debug, Clone)]
pub struct FlagSetChanged {
    pub project: ProjectId,
    pub etag: String,
}

impl SnapshotCache {
    /// Loads every project. The change cursor is read first, so a change made
    /// during the load is applied again by the next poll rather than missed.
    pub async fn load_from(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let cursor = store.latest_config_seq().await?;
        let snapshot = DecisionSnapshot::from_configs(store.load_all_project_configs().await?);
        Ok(Self {
            current: ArcSwap::from_pointee(snapshot),
            store,
            applied_seq: Mutex::new(cursor),
            flag_changes: broadcast::channel(256).0,
            orgs: Arc::default(),
        })
    }

    /// The current snapshot. Lock-free; hold it for the whole request so the
    /// request sees one consistent configuration.
    pub fn load(&self) -> Arc<DecisionSnapshot> {
        self.current.load_full()
    }

    /// Re-reads one project from the store and swaps it in.
    pub async fn reload_project(&self, project: ProjectId) -> Result<(), StoreError> {
        let _serialised = self.applied_seq.lock().await;
        self.reload_locked(project).await
    }

    /// Subscribes to flag-set changes (applied snapshots only).
    pub fn subscribe_flag_changes(&self) -> broadcast::Receiver<FlagSetChanged> {
        self.flag_changes.subscribe()
    }

    async fn reload_locked(&self, project: ProjectId) -> Result<(), StoreError> {
        let config = self.store.load_project_config(project).await?;
        let previous = self.current.load_full();
        let next = previous.with_project(project, config);
        self.announce_flag_changes(&previous, &next, Some(project));
        self.current.store(Arc::new(next));
        metrics::counter!("flywheel_snapshot_reloads_total", "scope" => "project").increment(1);
        Ok(())
    }

    fn announce_flag_changes(
        &self,
        before: &DecisionSnapshot,
        after: &DecisionSnapshot,
        only: Option<ProjectId>,
    ) {
        let projects: Vec<ProjectId> = match only {
            Some(project) => vec![project],
            None => after.project_ids().collect(),
        };
        for project in projects {
            let old = before.project(project).map(|config| config.flags.etag());
            let new = after.project(project).map(|config| config.flags.etag());
            if let (Some(new), true) = (new, old != new) {
                // No receivers is fine: nobody is streaming.
                let _ = self.flag_changes.send(FlagSetChanged {
                    project,
                    etag: new.to_string(),
                });
            }
        }
    }

    /// Re-reads everything (after a lost change notification).
    pub async fn resync(&self) -> Result<(), StoreError> {
        let mut applied = self.applied_seq.lock().await;
        let cursor = self.store.latest_config_seq().await?;
        let snapshot = DecisionSnapshot::from_configs(self.store.load_all_project_configs().await?);
        self.announce_flag_changes(&self.current.load_full(), &snapshot, None);
        self.current.store(Arc::new(snapshot));
        *applied = cursor;
        metrics::counter!("flywheel_snapshot_reloads_total", "scope" => "all").increment(1);
        Ok(())
    }

    /// Applies every change recorded since the last call. Returns how many
    /// projects were reloaded. The watcher calls this on a timer; tests call
    /// it directly to catch up without waiting.
    pub async fn poll_once(&self) -> Result<usize, StoreError> {
        let mut applied = self.applied_seq.lock().await;
        let changes = self.store.config_changes_since(*applied).await?;
        for project in &changes.projects {
            self.reload_locked(*project).await?;
        }
        *applied = changes.latest_seq;
        Ok(changes.projects.len())
    }
}

/// Follows configuration changes made by other processes until cancelled:
/// LISTEN/NOTIFY where the store offers it, polling otherwise.
pub async fn watch(
    cache: Arc<SnapshotCache>,
    live: Arc<crate::live::LiveHub>,
    poll_interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        let listener = match cache.store.config_listener().await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for configuration changes; polling instead");
                None
            }
        };
        match listener {
            None => {
                poll_until_cancelled(&cache, poll_interval, &cancel).await;
                return;
            }
            Some(mut listener) => {
                // Anything committed before LISTEN took effect was not notified.
                if let Err(error) = cache.resync().await {
                    tracing::warn!(error = %error, "snapshot resync failed");
                }
                loop {
                    let signal = tokio::select! {
                        _ = cancel.cancelled() => return,
                        signal = listener.next() => signal,
                    };
                    let applied = match signal {
                        Ok(ConfigSignal::Project(project)) => cache.reload_project(project).await,
                        Ok(ConfigSignal::Resync) => {
                            // Org changes and live messages may have been missed too.
                            cache.orgs.clear();
                            if let Err(error) = live.catch_up().await {
                                tracing::warn!(%error, "cannot read live messages");
                            }
                            cache.resync().await
                        }
                        Ok(ConfigSignal::Live(seqs)) => live.deliver_announced(&seqs).await,
                        Ok(ConfigSignal::OrgChanged {
                            project,
                            org_id,
                            version,
                        }) => {
                            cache.orgs.invalidate(project, &org_id, version);
                            Ok(())
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "configuration listener failed; reconnecting");
                            break;
                        }
                    };
                    if let Err(error) = applied {
                        tracing::warn!(error = %error, "snapshot reload failed");
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(poll_interval) => {}
                }
            }
        }
    }
}

async fn poll_until_cancelled(
    cache: &SnapshotCache,
    poll_interval: Duration,
    cancel: &CancellationToken,
) {
    let mut ticker = tokio::time::interval(poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = cache.poll_once().await {
            tracing::warn!(error = %error, "polling for configuration changes failed");
        }
    }
}
