//! Flywheel's storage: one [`Store`] interface, two backends.
//!
//! * [`sqlite::SqliteStore`], the embedded default: one file in the data
//!   directory, WAL mode, one writer connection (SQLite allows one writer at a
//!   time anyway, and a single writer never meets `SQLITE_BUSY` from itself)
//!   plus a pool of readers.
//! * [`postgres::PgStore`], for scale-out: any number of nodes on one database,
//!   configuration changes fanned out with `LISTEN`/`NOTIFY`.
//!
//! The backend is chosen once, from the database URL, by [`open`].
//! Boundaries: this crate knows SQL and the domain types; it knows nothing of
//! HTTP, settings files or the in-memory snapshot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::billing::org::{MeterInput, MeterReading, OrgCommand, OrgState};
use flywheel_domain::billing::{Catalog, Reply};
use flywheel_domain::events::{Event, EventType};
use flywheel_domain::flags::{FlagAction, FlagChange};
use flywheel_domain::project::ProjectId;
use flywheel_domain::snapshot::ProjectConfig;
use flywheel_domain::DomainError;

pub mod configuration;
pub mod growth;
pub mod postgres;
pub mod projects;
mod sql;
pub mod sqlite;
pub mod sqlite_memory;
#[cfg(feature = "testing")]
pub mod testing;

/// Which backend a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
    /// Appended to a `SELECT` whose rows the transaction will update: SQLite's
    /// single writer already serialises, PostgreSQL locks the rows.
    pub(crate) fn lock(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Appended to a claim of queued work, so that nodes claim different rows.
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Appended to a `SELECT` of a row that must not change or go away
    /// before the transaction ends (PostgreSQL's `FOR SHARE`).
    pub(crate) fn lock_shared(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR SHARE",
        }
    }

    /// Whether a number taken from a sequence can commit after a larger one
    /// (PostgreSQL's identity columns), so a cursor must look back.
    pub(crate) fn late_commits(self) -> bool {
        matches!(self, Backend::Postgres)
    }
}

/// Failures of the store, by kind. Database text stays inside `source`, for
/// logs; the HTTP layer never shows it to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was violated; the string names what collided.
    #[error("conflict on {0}")]
    Conflict(&'static str),
    /// The database cannot be reached (connection refused, pool exhausted).
    #[error("the store is unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("the store failed")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Classifies a driver error. `conflict` names what a unique violation means
    /// for the operation at hand.
    pub(crate) fn from_sqlx(error: sqlx::Error, conflict: &'static str) -> Self {
        match &error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(conflict),
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(error),
            _ => StoreError::Internal(Box::new(error)),
        }
    }

    pub(crate) fn internal(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Internal(Box::new(error))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::from_sqlx(error, "unique value")
    }
}

/// A signal from a [`ConfigListener`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSignal {
    /// This project's configuration changed.
    Project(ProjectId),
    /// Changes may have been missed (e.g. a reconnect): reload everything.
    Resync,
    /// An org's billing state was written (by any node) at this version.
    OrgChanged {
        project: ProjectId,
        org_id: String,
        version: i64,
    },
    /// Live messages were committed (by any node) with these numbers.
    Live(Vec<i64>),
}

/// Pushes configuration changes made by any process on the same store.
#[async_trait]
pub trait ConfigListener: Send {
    async fn next(&mut self) -> Result<ConfigSignal, StoreError>;
}

/// Configuration changes after a given sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChanges {
    /// The highest sequence number seen (the argument when there was nothing new).
    pub latest_seq: i64,
    /// Projects changed after the argument, each once.
    pub projects: Vec<ProjectId>,
}

/// One project's decoded events, committed together with other batches in
/// one transaction (group commit).
#[derive(Debug, Clone)]
pub struct EventBatch {
    pub project: ProjectId,
    pub events: Vec<EncodedEvent>,
    /// The project's catalog when the batch was prepared: its meters turn
    /// the new events into usage in the same transaction.
    pub billing: Option<Billing>,
    /// The project's activation rules: milestones are recorded in the same
    /// transaction. `None` (or empty): no rules.
    pub activation: Option<Arc<flywheel_domain::activation::ActivationRules>>,
}

/// What billing rules a write runs under.
#[derive(Debug, Clone)]
pub struct Billing {
    pub catalog: Arc<Catalog>,
    /// How long a `past_due` subscription keeps its plan.
    pub grace: chrono::Duration,
    /// The project's prompt rules (empty: none): billing writes and
    /// milestones that fire them create prompts in their transaction.
    pub prompts: Arc<flywheel_domain::prompts::PromptRules>,
    /// The project's flags: a prompt's copy is the variant its audience
    /// flag serves the user.
    pub flags: Arc<flywheel_flags::CompiledFlagSet>,
}

impl Billing {
    /// Rules without prompts.
    pub fn new(catalog: Arc<Catalog>, grace: chrono::Duration) -> Self {
        Self {
            catalog,
            grace,
            prompts: Arc::default(),
            flags: Arc::default(),
        }
    }

    /// The rules a write for `config`'s project runs under (reference
    /// counts only: this is on the ingestion and `consume` paths).
    pub fn for_project(config: &ProjectConfig, grace: chrono::Duration) -> Self {
        Self {
            catalog: config.catalog.clone(),
            grace,
            prompts: config.prompts.clone(),
            flags: config.flags.clone(),
        }
    }
}

/// Something a transaction saw that may fire prompt rules, and whom for:
/// `user_id` (the acting user), else the owner of `org_id`.
pub(crate) struct PromptTrigger<'a> {
    pub fact: flywheel_domain::prompts::TriggerFact,
    pub user_id: Option<String>,
    pub org_id: Option<String>,
    /// The org's billing state as this transaction leaves it, when known.
    pub org: Option<&'a OrgState>,
}

/// The `consume`s of a group the rules refused at a limit: each fires
/// `limit_reached` prompts for its acting user.
pub(crate) fn denied_consumes<'a>(
    requests: &'a [OrgRequest],
    results: &[OrgResult],
) -> Vec<(&'a OrgRequest, String)> {
    use flywheel_domain::billing::org::Reason;
    requests
        .iter()
        .zip(results)
        .filter_map(|(request, result)| match (&request.command, result) {
            (OrgCommand::Consume { feature, .. }, OrgResult::Applied(Reply::Usage(answer)))
                if !answer.allowed && answer.reason == Some(Reason::LimitReached) =>
            {
                Some((request, feature.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A group commit's requests by project, projects in order (the order in
/// which both backends lock and write them).
pub(crate) fn requests_by_project(
    requests: &[OrgRequest],
) -> std::collections::BTreeMap<ProjectId, Vec<&OrgRequest>> {
    let mut by_project: std::collections::BTreeMap<ProjectId, Vec<&OrgRequest>> =
        std::collections::BTreeMap::new();
    for request in requests {
        by_project.entry(request.project).or_default().push(request);
    }
    by_project
}

/// The orgs one project's requests name, each paired with the time of the
/// first request naming it: a new org is created as of then.
pub(crate) fn orgs_as_of_first_request(
    group: &[&OrgRequest],
) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    let mut orgs: Vec<(String, chrono::DateTime<chrono::Utc>)> = Vec::new();
    for request in group {
        if !orgs.iter().any(|(org, _)| *org == request.org_id) {
            orgs.push((request.org_id.clone(), request.now));
        }
    }
    orgs
}

/// The user acting in each org's latest request of `project` that names one.
pub(crate) fn request_actors(
    requests: &[OrgRequest],
    project: ProjectId,
) -> HashMap<String, String> {
    requests
        .iter()
        .filter(|request| request.project == project)
        .filter_map(|request| Some((request.org_id.clone(), request.actor_user_id.clone()?)))
        .collect()
}

/// The user each org's usage was last moved by, among new events.
pub(crate) fn event_actors(events: &[&Event]) -> HashMap<String, String> {
    events
        .iter()
        .filter_map(|event| Some((event.org_id.clone()?, event.user_id.clone()?)))
        .collect()
}

/// What creating prompts needs: the rules, and the flags their audiences
/// name (a prompt's copy is the variant its flag serves the user).
#[derive(Debug)]
pub struct Prompting {
    pub rules: Arc<flywheel_domain::prompts::PromptRules>,
    pub flags: Arc<flywheel_flags::CompiledFlagSet>,
}

/// The outcome of [`Store::commit_events`].
#[derive(Debug, Clone, Default)]
pub struct EventCommit {
    /// One result per event, per batch.
    pub results: Vec<Vec<CommitResult>>,
    /// Orgs whose usage the new events changed, as committed.
    pub orgs: Vec<(ProjectId, Arc<OrgState>)>,
    /// Outbox messages were written (usage crossed a line): wake the sender.
    pub outbox: bool,
}

/// A write to one org's billing state.
#[derive(Debug, Clone)]
pub struct OrgRequest {
    pub project: ProjectId,
    pub org_id: String,
    pub command: OrgCommand,
    /// Retries with the same key get the first reply and change nothing.
    pub idempotency_key: Option<String>,
    pub billing: Billing,
    pub now: DateTime<Utc>,
    /// The product's user acting (`consume` for a user): the one a prompt
    /// the write fires is for. `None`: the org's owner.
    pub actor_user_id: Option<String>,
}

impl OrgRequest {
    /// What the key must keep meaning: a reused key with another request is
    /// refused.
    pub fn fingerprint(&self) -> String {
        format!("{}|{:?}", self.org_id, self.command)
    }
}

/// What became of one [`OrgRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum OrgResult {
    Applied(Reply),
    /// The idempotency key was used before for the same request: its first reply.
    Replayed(Reply),
    /// The idempotency key was used before for a different request.
    KeyReused,
    /// The rules refused the command; nothing changed.
    Rejected(DomainError),
}

/// The outcome of [`Store::execute_org_requests`].
#[derive(Debug, Clone, Default)]
pub struct OrgCommit {
    pub results: Vec<OrgResult>,
    /// Every org the requests named, as committed: changed or not, it is
    /// the latest state (the org was locked), so it refreshes caches.
    pub orgs: Vec<(ProjectId, Arc<OrgState>)>,
    /// Outbox messages were written: wake the sender.
    pub outbox: bool,
}

/// One version of a project's billing catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogVersion {
    pub version: i64,
    pub document: serde_json::Value,
    pub actor: String,
    pub created_at: DateTime<Utc>,
}

/// An event with the JSON it is stored as, encoded by the caller: callers
/// encode in parallel, so the single writer spends no time serialising.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    pub event: Event,
    pub body: String,
}

impl EncodedEvent {
    pub fn encode(event: Event) -> Result<Self, serde_json::Error> {
        let body = event.to_stored_json()?;
        Ok(Self { event, body })
    }
}

/// What became of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    /// Stored with this per-project sequence number.
    Accepted { seq: i64 },
    /// An event with the same id was already stored (or came earlier in the
    /// same batch); the first one is kept, this one changed nothing.
    Duplicate,
    /// Its user or anonymous id belongs to a deleted person: dropped.
    Suppressed,
}

/// An event stored in `warn` mode despite breaking its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    pub event_id: uuid::Uuid,
    pub event: String,
    pub problems: Vec<String>,
    pub recorded_at: DateTime<Utc>,
}

/// A filter over a project's stored events, newest first.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only events whose actor is one of these ids.
    pub distinct_ids: Option<Vec<String>>,
    pub event: Option<String>,
    /// Only events with `timestamp >= since`.
    pub since: Option<DateTime<Utc>>,
    /// Only events with `seq > after_seq` (for tailing).
    pub after_seq: Option<i64>,
    pub limit: u32,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: Event,
}

/// The storage interface every backend implements; the store test-suite in
/// `tests/store_suite.rs` runs against each.
#[async_trait]
pub trait Store:
    growth::GrowthStore
    + projects::ProjectStore
    + configuration::ConfigStore
    + Send
    + Sync
    + std::fmt::Debug
{
    fn backend(&self) -> Backend;

    /// Reachable, and every migration this binary knows is applied.
    async fn check_ready(&self) -> Result<(), StoreError>;

    /// Commits every batch in one transaction: new events get the next
    /// sequence numbers of their project, duplicates (same project and
    /// `event_id`) are skipped, and each new event's effects are applied in
    /// the same transaction. Returns one result per event, per batch.
    async fn commit_events(&self, batches: &[EventBatch]) -> Result<EventCommit, StoreError>;

    async fn list_events(
        &self,
        project: ProjectId,
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// `user_id` and every id linked to it, transitively (for reads that
    /// resolve events to their person).
    async fn person_ids(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// The person an id resolves to (itself when it is not linked).
    async fn resolve_person(
        &self,
        project: ProjectId,
        distinct_id: &str,
    ) -> Result<String, StoreError>;

    /// Orgs the id (or its person) joined through group calls.
    async fn orgs_of(
        &self,
        project: ProjectId,
        distinct_id: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// Deletes a person's events, identity links and memberships, and
    /// suppresses every one of `ids` so late retries are dropped. Returns how
    /// many events were deleted.
    async fn delete_person(
        &self,
        project: ProjectId,
        ids: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// An org's billing state; `None` when nothing was written for it yet.
    async fn load_org(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<Option<OrgState>, StoreError>;

    /// The org linked to a Stripe customer, if any.
    async fn org_for_stripe_customer(
        &self,
        project: ProjectId,
        customer_id: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Applies org commands in order, in one transaction, each org locked
    /// for the transaction (so concurrent writers on any node serialise per
    /// org and a hard limit cannot be overrun). Idempotency keys are checked
    /// and recorded in the same transaction.
    async fn execute_org_requests(&self, requests: &[OrgRequest]) -> Result<OrgCommit, StoreError>;

    /// A push channel for changes, where the backend has one (PostgreSQL);
    /// `None` means the caller polls [`projects::ProjectStore::config_changes_since`].
    async fn config_listener(&self) -> Result<Option<Box<dyn ConfigListener>>, StoreError>;
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://…` or `postgres://…`; `None` means the embedded default.
    pub database_url: Option<String>,
    /// Where the embedded SQLite database lives when no URL is given.
    pub data_dir: PathBuf,
    pub max_connections: u32,
    /// How long a SQLite writer waits for another process's lock.
    pub busy_timeout: Duration,
    /// How long to wait for a connection before reporting the store unavailable.
    pub acquire_timeout: Duration,
}

impl StoreOptions {
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            database_url: None,
            data_dir: data_dir.into(),
            max_connections: 16,
            busy_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a store could not be opened. Shown to the operator, so it says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported database URL scheme `{0}`: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedScheme(String),
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {backend} at {target}")]
    Connect {
        backend: &'static str,
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply {backend} migrations")]
    Migrate {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// Opens the store the options describe and applies its migrations.
pub async fn open(options: &StoreOptions) -> Result<Arc<dyn Store>, OpenError> {
    match options.database_url.as_deref() {
        None => {
            std::fs::create_dir_all(&options.data_dir).map_err(|source| OpenError::DataDir {
                path: options.data_dir.clone(),
                source,
            })?;
            let path = options.data_dir.join("flywheel.db");
            Ok(Arc::new(sqlite::SqliteStore::open(&path, options).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            Ok(Arc::new(
                sqlite::SqliteStore::open(path.as_ref(), options).await?,
            ))
        }
        Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
            Ok(Arc::new(postgres::PgStore::open(url, options).await?))
        }
        Some(url) => {
            let scheme = url.split(':').next().unwrap_or(url);
            Err(OpenError::UnsupportedScheme(scheme.to_string()))
        }
    }
}

/// Hides the password of a database URL, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}://{}:***{}",
                    &url[..scheme_end],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Times a store operation into the `flywheel_store_operation_seconds` histogram.
pub(crate) async fn timed<T>(
    backend: Backend,
    op: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = work.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(
        "flywheel_store_operation_seconds",
        "backend" => backend.as_str(),
        "op" => op,
        "outcome" => outcome,
    )
    .record(started.elapsed().as_secs_f64());
    result
}

/// How deep identity chains are followed (a → b → c …); links are written
/// to the root, so real chains are short, and this bounds a corrupt one.
pub(crate) const MAX_LINK_DEPTH: usize = 8;

/// The identity links a group of events adds, decided in memory from the
/// links already stored (`known`: alias → user, loaded for every id involved
/// and the chains behind them). Links point at the root of the target, the
/// first link of an alias wins, and a link that would close a cycle is
/// skipped. `known` is updated, so later links in the group see earlier ones.
pub(crate) fn plan_links(
    requested: &[(String, String)],
    known: &mut std::collections::HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut added = Vec::new();
    for (alias, user_id) in requested {
        let mut root = user_id.clone();
        for _ in 0..MAX_LINK_DEPTH {
            match known.get(&root) {
                Some(next) if *next != root => root = next.clone(),
                _ => break,
            }
        }
        if root == *alias || known.contains_key(alias) {
            continue;
        }
        known.insert(alias.clone(), root.clone());
        added.push((alias.clone(), root));
    }
    added
}

/// Collapses a change list to distinct projects, keeping first-seen order.
/// What writing `change` over an entry whose newest version is `current`
/// (its number and definition, `None` when deleted) amounts to: the version
/// to write and its action, or `None` when nothing changes.
pub(crate) fn plan_flag_version(
    current: Option<(i64, Option<&serde_json::Value>)>,
    change: &FlagChange,
) -> Option<(i64, FlagAction)> {
    let next = current.map_or(1, |(version, _)| version + 1);
    let live = current.and_then(|(_, definition)| definition);
    match (&change.definition, live) {
        (None, None) => None,
        (Some(new), Some(old)) if new == old => None,
        (None, Some(_)) => Some((next, FlagAction::Deleted)),
        (Some(_), existing) => {
            let action = match change.action {
                FlagAction::Created | FlagAction::Updated if existing.is_some() => {
                    FlagAction::Updated
                }
                FlagAction::Created | FlagAction::Updated => FlagAction::Created,
                other => other,
            };
            Some((next, action))
        }
    }
}

/// Numbers events after `next` (advancing it) and encodes them: the
/// derived events a batch appends (activation) in its transaction.
pub(crate) fn number_events(
    events: Vec<Event>,
    next: &mut i64,
) -> Result<Vec<(i64, EncodedEvent)>, StoreError> {
    events
        .into_iter()
        .map(|event| {
            *next += 1;
            Ok((
                *next,
                EncodedEvent::encode(event).map_err(StoreError::internal)?,
            ))
        })
        .collect()
}

/// The `person_traits` rows a batch writes: each person's stored traits
/// with the batch's `identify` traits merged in commit order.
pub(crate) fn plan_traits(
    sets: &[(String, serde_json::Map<String, serde_json::Value>)],
    mut stored: HashMap<String, serde_json::Map<String, serde_json::Value>>,
) -> Vec<(String, serde_json::Map<String, serde_json::Value>)> {
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (id, update) in sets {
        flywheel_domain::enrichment::merge_traits(stored.entry(id.clone()).or_default(), update);
        if seen.insert(id.clone()) {
            order.push(id.clone());
        }
    }
    order
        .into_iter()
        .map(|id| {
            let traits = stored.remove(&id).unwrap_or_default();
            (id, traits)
        })
        .collect()
}

/// Runs org requests against states loaded and locked by the backend.
/// `replies` holds what earlier requests stored under each idempotency key
/// (fingerprint, reply); new ones are added. Returns one result per request.
pub(crate) fn run_org_requests(
    requests: &[OrgRequest],
    states: &mut HashMap<(ProjectId, String), OrgState>,
    replies: &mut HashMap<(ProjectId, String), (String, Reply)>,
    fresh_replies: &mut Vec<(ProjectId, String, String, Reply, DateTime<Utc>)>,
) -> Vec<OrgResult> {
    requests
        .iter()
        .map(|request| {
            let fingerprint = request.fingerprint();
            if let Some(key) = &request.idempotency_key {
                if let Some((stored, reply)) = replies.get(&(request.project, key.clone())) {
                    return if *stored == fingerprint {
                        OrgResult::Replayed(reply.clone())
                    } else {
                        OrgResult::KeyReused
                    };
                }
            }
            let state = states
                .get_mut(&(request.project, request.org_id.clone()))
                .expect("the backend loads every org a request names");
            let mut next = state.clone();
            match next.execute(
                &request.billing.catalog,
                &request.command,
                request.billing.grace,
                request.now,
            ) {
                Ok(reply) => {
                    *state = next;
                    if let Some(key) = &request.idempotency_key {
                        replies.insert(
                            (request.project, key.clone()),
                            (fingerprint.clone(), reply.clone()),
                        );
                        fresh_replies.push((
                            request.project,
                            key.clone(),
                            fingerprint,
                            reply.clone(),
                            request.now,
                        ));
                    }
                    OrgResult::Applied(reply)
                }
                Err(error) => OrgResult::Rejected(error),
            }
        })
        .collect()
}

/// What committing new events adds to meters, per (project, org): the
/// events' meter inputs in commit order. Only `track` events with an org
/// count; usage lands in the period containing `at` (commit time).
pub(crate) fn meter_inputs<'a>(
    billing: &'a Billing,
    events: impl IntoIterator<Item = &'a Event>,
) -> Vec<(
    String,
    &'a flywheel_domain::billing::catalog::MeterDefinition,
    MeterInput,
)> {
    let mut inputs = Vec::new();
    if !billing.catalog.has_meters() {
        return inputs;
    }
    for event in events {
        let Some(org) = &event.org_id else {
            continue;
        };
        let name = &event.event;
        if event.kind != EventType::Track {
            continue;
        }
        for meter in billing.catalog.meters_for_event(name) {
            if let Some(input) = flywheel_domain::billing::org::read_meter(meter, &event.properties)
            {
                inputs.push((org.clone(), meter, input));
            }
        }
    }
    inputs
}

/// Applies meter readings to loaded org states (unique values already
/// resolved to `Add(1)` or dropped by the backend).
pub(crate) fn apply_readings(
    billing: &Billing,
    states: &mut HashMap<String, OrgState>,
    readings: Vec<(
        String,
        &flywheel_domain::billing::catalog::MeterDefinition,
        MeterReading,
    )>,
    at: DateTime<Utc>,
) {
    for (org, meter, reading) in readings {
        if let Some(state) = states.get_mut(&org) {
            state.record(&billing.catalog, meter, reading, billing.grace, at);
        }
    }
}

/// What saving `after` over `before` writes: the org row when its own
/// fields changed, and the counters and grants that differ. Bumps the
/// version when anything changed; `None` when nothing did.
pub(crate) fn plan_org_write(before: &OrgState, after: &mut OrgState) -> Option<OrgWrite> {
    if before == after {
        return None;
    }
    after.version = before.version + 1;
    let counters = after
        .usage
        .iter()
        .filter(|(feature, counter)| before.usage.get(*feature) != Some(*counter))
        .map(|(feature, counter)| (feature.clone(), *counter))
        .collect();
    let grants = after
        .grants
        .iter()
        .filter(|grant| !before.grants.contains(grant))
        .cloned()
        .collect();
    Some(OrgWrite { counters, grants })
}

/// See [`plan_org_write`]. The org row (subscription, overrides, version) is
/// always written.
pub(crate) struct OrgWrite {
    pub counters: Vec<(String, flywheel_domain::billing::org::UsageCounter)>,
    pub grants: Vec<flywheel_domain::billing::org::UsageGrant>,
}

/// Compiles the stored catalog of a project. Documents are validated before
/// they are written, so a failure means a newer binary wrote it or the rules
/// tightened: the project runs on an empty catalog and the problem is logged.
pub(crate) fn compile_stored_catalog(
    project: ProjectId,
    document: Option<serde_json::Value>,
) -> Arc<Catalog> {
    let Some(document) = document else {
        return Arc::default();
    };
    let compiled = serde_json::from_value(document)
        .map_err(|error| vec![DomainError::invalid("invalid_catalog", error.to_string())])
        .and_then(Catalog::compile);
    match compiled {
        Ok(catalog) => Arc::new(catalog),
        Err(problems) => {
            for problem in problems {
                tracing::error!(project = %project.0, %problem, "the stored catalog does not compile; running without it");
            }
            Arc::default()
        }
    }
}

/// Rules documents stored in a version table: activation and prompt rules.
pub(crate) trait StoredRules: serde::de::DeserializeOwned + Default {
    const WHAT: &'static str;
    fn check(self) -> Result<Self, Vec<DomainError>>;
}

impl StoredRules for flywheel_domain::activation::ActivationRules {
    const WHAT: &'static str = "activation rules";
    fn check(self) -> Result<Self, Vec<DomainError>> {
        self.validate()
    }
}

impl StoredRules for flywheel_domain::prompts::PromptRules {
    const WHAT: &'static str = "prompt rules";
    fn check(self) -> Result<Self, Vec<DomainError>> {
        self.validate()
    }
}

/// A project's stored rules, if any. They are validated before they are
/// written; a document that no longer checks (a rule this binary refuses)
/// is logged and the project runs without those rules.
pub(crate) fn compile_stored_rules<T: StoredRules>(
    project: ProjectId,
    stored: Option<(i64, serde_json::Value)>,
) -> Arc<T> {
    let Some((_, document)) = stored else {
        return Arc::default();
    };
    let parsed = serde_json::from_value::<T>(document)
        .map_err(|error| vec![error.to_string()])
        .and_then(|rules| {
            rules
                .check()
                .map_err(|problems| problems.into_iter().map(|p| p.message).collect())
        });
    match parsed {
        Ok(rules) => Arc::new(rules),
        Err(problems) => {
            for problem in problems {
                tracing::error!(project = %project.0, %problem, "the stored {} do not check; running without them", T::WHAT);
            }
            Arc::default()
        }
    }
}

pub(crate) fn distinct_projects(changed: impl IntoIterator<Item = ProjectId>) -> Vec<ProjectId> {
    let mut seen = std::collections::HashSet::new();
    changed.into_iter().filter(|id| seen.insert(*id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_domain::flags::FlagEntryKind;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused_with_the_scheme_named() {
        let mut options = StoreOptions::embedded("unused");
        options.database_url = Some("mysql://root@localhost/db".into());
        let err = open(&options).await.unwrap_err();
        assert!(err.to_string().contains("`mysql`"), "{err}");
    }

    #[test]
    fn links_point_at_roots_first_link_wins_and_cycles_are_skipped() {
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let mut known: std::collections::HashMap<String, String> = [pair("old", "user")].into();
        let added = plan_links(
            &[
                pair("anon", "old"),   // the root of old: user
                pair("anon", "other"), // anon is taken: the first link wins
                pair("user", "anon"),  // would close a cycle
                pair("x", "x"),        // a self-link
                pair("dev", "anon"),   // sees the link added above
            ],
            &mut known,
        );
        assert_eq!(added, vec![pair("anon", "user"), pair("dev", "user")]);
    }

    #[test]
    fn flag_versions_skip_no_ops_and_name_creation_and_update() {
        use serde_json::json;
        let change = |definition: Option<serde_json::Value>, action| FlagChange {
            kind: FlagEntryKind::Flag,
            key: "f".into(),
            definition,
            action,
        };
        let on = json!({"state": "ENABLED"});
        let off = json!({"state": "DISABLED"});
        assert_eq!(
            plan_flag_version(None, &change(Some(on.clone()), FlagAction::Updated)),
            Some((1, FlagAction::Created))
        );
        assert_eq!(
            plan_flag_version(
                Some((1, Some(&on))),
                &change(Some(on.clone()), FlagAction::Updated)
            ),
            None
        );
        assert_eq!(
            plan_flag_version(
                Some((1, Some(&on))),
                &change(Some(off.clone()), FlagAction::Created)
            ),
            Some((2, FlagAction::Updated))
        );
        assert_eq!(
            plan_flag_version(Some((2, Some(&off))), &change(None, FlagAction::Deleted)),
            Some((3, FlagAction::Deleted))
        );
        assert_eq!(
            plan_flag_version(Some((3, None)), &change(None, FlagAction::Deleted)),
            None
        );
        assert_eq!(
            plan_flag_version(
                Some((3, None)),
                &change(Some(on.clone()), FlagAction::Restored)
            ),
            Some((4, FlagAction::Restored))
        );
        assert_eq!(
            plan_flag_version(None, &change(None, FlagAction::Deleted)),
            None
        );
    }

    #[test]
    fn distinct_projects_keeps_first_order() {
        let (a, b) = (ProjectId::new_v7(), ProjectId::new_v7());
        assert_eq!(distinct_projects([b, a, b, a]), vec![b, a]);
    }
}
