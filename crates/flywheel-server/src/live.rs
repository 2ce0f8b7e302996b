//! The live hub: fans committed live messages (prompts, entitlement
//! changes) out to the users' open streams on this node.
//!
//! Messages are written by the store in the transaction of what they
//! report (`live_messages`), so a stream never shows something that did not
//! commit, and a reconnecting stream reads what it missed from the store
//! (`Last-Event-ID`). The hub learns of new rows two ways: this node's
//! commits wake it (the outbox signal) and it reads everything after its
//! cursor; on PostgreSQL every node's commits are also announced by NOTIFY
//! with their exact numbers (which can commit out of order there). A
//! bounded set of recently dispatched numbers keeps the two from
//! delivering one message twice.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use flywheel_domain::project::ProjectId;
use flywheel_store::growth::LiveRecord;
use flywheel_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How many messages one stream may have waiting; a client that falls
/// further behind is disconnected and resumes from the store.
pub const STREAM_BUFFER: usize = 64;
/// How many dispatched numbers are remembered against double delivery.
const RECENT: usize = 16_384;
/// Most rows read per catch-up query.
const BATCH: u32 = 1_000;

type Key = (ProjectId, String);

#[derive(Debug)]
struct Subscriber {
    id: u64,
    sender: mpsc::Sender<Arc<LiveRecord>>,
}

/// This node's open streams, by user and by org.
#[derive(Debug)]
pub struct LiveHub {
    store: Arc<dyn Store>,
    users: DashMap<Key, Vec<Subscriber>, foldhash::fast::RandomState>,
    orgs: DashMap<Key, Vec<Subscriber>, foldhash::fast::RandomState>,
    next_id: AtomicU64,
    /// The highest number read by catch-up.
    cursor: tokio::sync::Mutex<i64>,
    recent: Mutex<(HashSet<i64>, VecDeque<i64>)>,
    open: AtomicU64,
}

/// One open stream's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<LiveHub>,
    id: u64,
    user: Key,
    orgs: Vec<Key>,
    pub receiver: mpsc::Receiver<Arc<LiveRecord>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(&self.hub.users, &self.user, self.id);
        for org in &self.orgs {
            self.hub.remove(&self.hub.orgs, org, self.id);
        }
        self.hub.open.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("flywheel_live_streams").decrement(1.0);
    }
}

impl LiveHub {
    /// A hub whose catch-up starts after what is stored now.
    pub async fn new(store: Arc<dyn Store>) -> Result<Arc<Self>, flywheel_store::StoreError> {
        let cursor = store.latest_live_seq().await?;
        Ok(Arc::new(Self {
            store,
            users: DashMap::default(),
            orgs: DashMap::default(),
            next_id: AtomicU64::new(1),
            cursor: tokio::sync::Mutex::new(cursor),
            recent: Mutex::new((HashSet::new(), VecDeque::new())),
            open: AtomicU64::new(0),
        }))
    }

    /// Streams open on this node.
    pub fn open_streams(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Registers a stream for `user` and the `orgs` it follows.
    pub fn subscribe(
        self: &Arc<Self>,
        project: ProjectId,
        user: &str,
        orgs: &[String],
    ) -> Subscription {
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let user_key = (project, user.to_owned());
        self.users
            .entry(user_key.clone())
            .or_default()
            .push(Subscriber {
                id,
                sender: sender.clone(),
            });
        let mut org_keys = Vec::with_capacity(orgs.len());
        for org in orgs {
            let key = (project, org.clone());
            self.orgs.entry(key.clone()).or_default().push(Subscriber {
                id,
                sender: sender.clone(),
            });
            org_keys.push(key);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("flywheel_live_streams").increment(1.0);
        Subscription {
            hub: self.clone(),
            id,
            user: user_key,
            orgs: org_keys,
            receiver,
        }
    }

    fn remove(
        &self,
        map: &DashMap<Key, Vec<Subscriber>, foldhash::fast::RandomState>,
        key: &Key,
        id: u64,
    ) {
        if let dashmap::Entry::Occupied(mut entry) = map.entry(key.clone()) {
            entry.get_mut().retain(|subscriber| subscriber.id != id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }

    /// Delivers records to the streams they are for, each number once.
    fn dispatch(&self, records: Vec<LiveRecord>) {
        for record in records {
            {
                let mut recent = self.recent.lock().expect("not poisoned");
                if !recent.0.insert(record.seq) {
                    continue;
                }
                recent.1.push_back(record.seq);
                if recent.1.len() > RECENT {
                    if let Some(old) = recent.1.pop_front() {
                        recent.0.remove(&old);
                    }
                }
            }
            let record = Arc::new(record);
            let message = &record.message;
            if let Some(user) = &message.user_id {
                self.send(&self.users, &(record.project, user.clone()), &record);
            }
            if let Some(org) = &message.org_id {
                self.send(&self.orgs, &(record.project, org.clone()), &record);
            }
        }
    }

    fn send(
        &self,
        map: &DashMap<Key, Vec<Subscriber>, foldhash::fast::RandomState>,
        key: &Key,
        record: &Arc<LiveRecord>,
    ) {
        if let Some(mut subscribers) = map.get_mut(key) {
            // A stream too far behind is cut off (its sender dropped): the
            // client reconnects and resumes from the store.
            subscribers.retain(
                |subscriber| match subscriber.sender.try_send(record.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("flywheel_live_streams_lagged_total").increment(1);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                },
            );
        }
    }

    /// Reads and delivers everything committed after the cursor.
    pub async fn catch_up(&self) -> Result<(), flywheel_store::StoreError> {
        let mut cursor = self.cursor.lock().await;
        loop {
            let records = self.store.live_messages_after(*cursor, BATCH).await?;
            let Some(last) = records.last().map(|record| record.seq) else {
                return Ok(());
            };
            let full = records.len() == BATCH as usize;
            *cursor = last;
            self.dispatch(records);
            if !full {
                return Ok(());
            }
        }
    }

    /// Delivers the messages a NOTIFY announced by number.
    pub async fn deliver_announced(&self, seqs: &[i64]) -> Result<(), flywheel_store::StoreError> {
        let records = self.store.live_messages_by_seq(seqs).await?;
        self.dispatch(records);
        Ok(())
    }
}

/// Runs catch-up whenever this node commits live messages (`wake`) and on
/// a timer (another process writing the same SQLite file), until cancelled.
pub async fn run(
    hub: Arc<LiveHub>,
    wake: Arc<crate::outbound::OutboxSignal>,
    poll: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.live_notified() => {}
            _ = ticker.tick() => {}
        }
        if let Err(error) = hub.catch_up().await {
            tracing::warn!(%error, "cannot read live messages");
        }
    }
}
