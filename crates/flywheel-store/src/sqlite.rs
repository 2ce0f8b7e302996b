//! The embedded default backend.
//!
//! Invariants:
//! * Every write goes through `writer`, a pool of exactly one connection, in
//!   `BEGIN IMMEDIATE` transactions: writers of this process queue in the pool
//!   instead of fighting over SQLite's lock, and the busy timeout covers other
//!   processes (the CLI) writing to the same file.
//! * `synchronous = FULL` with WAL: a commit is on disk when it returns.
//! * Times are stored as Unix microseconds, ids as hyphenated UUID text.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::events::{Effect, Event};
use flywheel_domain::project::ProjectId;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::number_events;
use crate::projects::UnknownValue;
use crate::sql::{
    bind_sqlite, micros_to_time, Done, Pooled, Reader, Row as SqlRow, Sql, SqlBackend, SqlConn,
    Transaction, Tx, WriteConn,
};
use crate::{
    apply_readings, meter_inputs, plan_links, plan_org_write, plan_traits, run_org_requests, timed,
    Backend, Billing, CommitResult, ConfigListener, EncodedEvent, EventBatch, EventCommit,
    EventQuery, OpenError, OrgCommit, OrgRequest, Store, StoreError, StoreOptions, StoredEvent,
    MAX_LINK_DEPTH,
};
use flywheel_domain::billing::org::{MeterInput, MeterReading, OrgState, UsageCounter, UsageGrant};
use flywheel_domain::billing::Reply;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Dropped with the last clone of the store, which stops the checkpointer.
    _checkpointer: std::sync::Arc<tokio::sync::oneshot::Sender<()>>,
}

/// How often the checkpointer copies committed WAL frames into the database.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// WAL frames (pages) after which the writer checkpoints by itself. The
/// checkpointer has copied almost all of them by then, so the writer's own
/// checkpoint is short; it is what lets the next write restart the WAL from
/// its beginning, which a checkpointer racing a busy writer seldom does.
const WRITER_AUTOCHECKPOINT_PAGES: &str = "4000";
/// The writer's page cache (KiB): the right-hand edges of the event indexes
/// stay cached across group commits.
const WRITER_CACHE_KIB: &str = "-32768";

/// Copies committed WAL frames into the database file on a connection of
/// its own, so group commits do not wait for that I/O (SQLite's default is
/// to checkpoint inside the commit that crosses 1,000 frames). PASSIVE never
/// blocks readers or the writer; a failure is logged and retried next tick.
async fn checkpoint_until_dropped(
    mut connection: SqliteConnection,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut connection)
            .await
        {
            tracing::warn!(%error, "background WAL checkpoint failed; retrying");
        }
    }
    let _ = sqlx::Connection::close(connection).await;
}

impl SqliteStore {
    pub async fn open(path: &Path, options: &StoreOptions) -> Result<Self, OpenError> {
        // Before the first connection of the process, or not at all.
        crate::sqlite_memory::configure();
        let connect = |source| OpenError::Connect {
            backend: "sqlite",
            target: path.display().to_string(),
            source,
        };
        let base = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true)
            .pragma("temp_store", "memory");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(
                base.clone()
                    .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
                    .pragma("cache_size", WRITER_CACHE_KIB),
            )
            .await
            .map_err(connect)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|source| OpenError::Migrate {
                backend: "sqlite",
                source,
            })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(base.clone().read_only(true))
            .await
            .map_err(connect)?;
        let checkpoints = sqlx::ConnectOptions::connect(&base)
            .await
            .map_err(connect)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(checkpoint_until_dropped(checkpoints, stopped));
        Ok(Self {
            writer,
            reader,
            _checkpointer: std::sync::Arc::new(stop),
        })
    }

    async fn record_change(
        tx: &mut sqlx::SqliteConnection,
        project: ProjectId,
        entity: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO config_changes (project_id, entity, changed_at) VALUES (?, ?, ?)")
            .bind(project.0.to_string())
            .bind(entity)
            .bind(at.timestamp_micros())
            .execute(tx)
            .await?;
        Ok(())
    }
}

fn uuid_column(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let text: String = row.try_get(column)?;
    Uuid::from_str(&text).map_err(StoreError::internal)
}

/// Rows per multi-row statement: 9 columns each, well under SQLite's
/// 32,766 bound parameters.
const ROWS_PER_STATEMENT: usize = 500;

fn decode_error(message: String) -> StoreError {
    StoreError::internal(sqlx::Error::Decode(message.into()))
}

async fn commit_batch(
    tx: &mut SqliteConnection,
    batch: &EventBatch,
    orgs: &mut Vec<(ProjectId, std::sync::Arc<OrgState>)>,
    outbox: &mut bool,
) -> Result<Vec<CommitResult>, StoreError> {
    let project = batch.project.0.to_string();
    let mut stored: HashSet<String> = HashSet::new();
    // Only ids the clients sent are looked up: a UUIDv7 minted by the
    // decoder for this request cannot be stored already.
    let sent: Vec<&EncodedEvent> = batch
        .events
        .iter()
        .filter(|encoded| !encoded.event.event_id_generated)
        .collect();
    for chunk in sent.chunks(ROWS_PER_STATEMENT) {
        let mut query =
            QueryBuilder::<Sqlite>::new("SELECT event_id FROM events WHERE project_id = ");
        query.push_bind(&project).push(" AND event_id IN (");
        let mut ids = query.separated(", ");
        for encoded in chunk {
            ids.push_bind(encoded.event.event_id.to_string());
        }
        query.push(")");
        let found: Vec<String> = query.build_query_scalar().fetch_all(&mut *tx).await?;
        stored.extend(found);
    }
    let suppressed = suppressed_among(&mut *tx, &project, &batch.events).await?;
    let last: Option<i64> =
        sqlx::query_scalar("SELECT last_seq FROM event_sequences WHERE project_id = ?")
            .bind(&project)
            .fetch_optional(&mut *tx)
            .await?;
    let mut next = last.unwrap_or(0);
    let mut results = Vec::with_capacity(batch.events.len());
    let mut fresh: Vec<(i64, &EncodedEvent)> = Vec::with_capacity(batch.events.len());
    for encoded in &batch.events {
        let event = &encoded.event;
        if is_suppressed(event, &suppressed) {
            results.push(CommitResult::Suppressed);
        // `insert` is false for a sent id already stored or earlier in this batch.
        } else if event.event_id_generated || stored.insert(event.event_id.to_string()) {
            next += 1;
            results.push(CommitResult::Accepted { seq: next });
            fresh.push((next, encoded));
        } else {
            results.push(CommitResult::Duplicate);
        }
    }
    if fresh.is_empty() {
        return Ok(results);
    }
    insert_events(tx, &project, &fresh, next).await?;
    let fresh: Vec<(i64, &Event)> = fresh
        .iter()
        .map(|(seq, encoded)| (*seq, &encoded.event))
        .collect();
    apply_effects(tx, &project, &fresh).await?;
    if fresh
        .iter()
        .any(|(_, event)| event.event.starts_with("$prompt_"))
    {
        crate::growth::prompts::apply_prompt_actions(tx, batch.project, &fresh).await?;
    }
    if let Some(billing) = &batch.billing {
        let events: Vec<&Event> = fresh.iter().map(|(_, event)| *event).collect();
        let (states, wrote) = apply_meters(tx, &project, billing, &events).await?;
        *outbox |= wrote;
        for state in states {
            orgs.push((batch.project, std::sync::Arc::new(state)));
        }
    }
    if let Some(rules) = &batch.activation {
        let derived = crate::growth::activation::apply_activation(
            tx,
            batch.project,
            rules,
            &fresh,
            batch.billing.as_ref(),
        )
        .await?;
        if !derived.is_empty() {
            *outbox = true;
            let encoded = number_events(derived, &mut next)?;
            let rows: Vec<(i64, &EncodedEvent)> =
                encoded.iter().map(|(seq, e)| (*seq, e)).collect();
            insert_events(tx, &project, &rows, next).await?;
        }
    }
    Ok(results)
}

/// Inserts numbered events and moves the project's sequence to `last_seq`.
async fn insert_events(
    tx: &mut SqliteConnection,
    project: &str,
    rows: &[(i64, &EncodedEvent)],
    last_seq: i64,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (project_id, event_id, seq, type, event, distinct_id, timestamp, received_at, body) ",
        );
        query.push_values(chunk, |mut row, (seq, encoded)| {
            let event = &encoded.event;
            row.push_bind(project)
                .push_bind(event.event_id.to_string())
                .push_bind(*seq)
                .push_bind(event.kind.as_str())
                .push_bind(&event.event)
                .push_bind(event.distinct_id().to_string())
                .push_bind(event.timestamp.timestamp_micros())
                .push_bind(event.received_at.timestamp_micros())
                .push_bind(&encoded.body);
        });
        query.build().execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO event_sequences (project_id, last_seq) VALUES (?, ?) \
         ON CONFLICT (project_id) DO UPDATE SET last_seq = excluded.last_seq",
    )
    .bind(project)
    .bind(last_seq)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The ids of this batch that belong to deleted people.
async fn suppressed_among(
    tx: &mut SqliteConnection,
    project: &str,
    events: &[EncodedEvent],
) -> Result<HashSet<String>, StoreError> {
    let ids: HashSet<&str> = events.iter().flat_map(|e| event_ids(&e.event)).collect();
    let mut found = HashSet::new();
    let ids: Vec<&str> = ids.into_iter().collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT distinct_id FROM suppressed_ids WHERE project_id = ",
        );
        query.push_bind(project).push(" AND distinct_id IN (");
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(id.to_string());
        }
        query.push(")");
        let rows: Vec<String> = query.build_query_scalar().fetch_all(&mut *tx).await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Applies what the new events imply, inside their transaction, set-wise:
/// a handful of statements per batch however many effects it carries.
async fn apply_effects(
    tx: &mut SqliteConnection,
    project: &str,
    fresh: &[(i64, &Event)],
) -> Result<(), StoreError> {
    let mut links = Vec::new();
    let mut joins = Vec::new();
    let mut violations = Vec::new();
    let mut traits = Vec::new();
    for (_, event) in fresh {
        for effect in event.effects() {
            match effect {
                Effect::LinkIdentity { alias, user_id } => links.push((alias, user_id)),
                Effect::JoinOrg {
                    distinct_id,
                    org_id,
                } => joins.push((org_id, distinct_id, event.received_at)),
                Effect::RecordSchemaViolation { problems } => violations.push((*event, problems)),
                Effect::SetTraits {
                    distinct_id,
                    traits: set,
                } => traits.push((distinct_id, set)),
            }
        }
    }
    if !traits.is_empty() {
        apply_traits(tx, project, &traits, fresh[0].1.received_at).await?;
    }
    if !links.is_empty() {
        let mut known = HashMap::new();
        let mut pending: Vec<String> = links
            .iter()
            .flat_map(|(alias, user)| [alias.clone(), user.clone()])
            .collect();
        let mut asked: HashSet<String> = HashSet::new();
        for _ in 0..MAX_LINK_DEPTH {
            pending.retain(|id| asked.insert(id.clone()));
            if pending.is_empty() {
                break;
            }
            let mut found: Vec<(String, String)> = Vec::new();
            for chunk in pending.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT alias, user_id FROM identity_links WHERE project_id = ",
                );
                query.push_bind(project).push(" AND alias IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id.clone());
                }
                query.push(")");
                found.extend(
                    query
                        .build_query_as::<(String, String)>()
                        .fetch_all(&mut *tx)
                        .await?,
                );
            }
            pending = found.iter().map(|(_, user)| user.clone()).collect();
            known.extend(found);
        }
        let added = plan_links(&links, &mut known);
        let at = fresh[0].1.received_at.timestamp_micros();
        for chunk in added.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO identity_links (project_id, alias, user_id, linked_at) ",
            );
            query.push_values(chunk, |mut row, (alias, user)| {
                row.push_bind(project)
                    .push_bind(alias)
                    .push_bind(user)
                    .push_bind(at);
            });
            query.push(" ON CONFLICT (project_id, alias) DO NOTHING");
            query.build().execute(&mut *tx).await?;
        }
    }
    for chunk in joins.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO org_members (project_id, org_id, distinct_id, joined_at) ",
        );
        query.push_values(chunk, |mut row, (org, distinct, at)| {
            row.push_bind(project)
                .push_bind(org)
                .push_bind(distinct)
                .push_bind(at.timestamp_micros());
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut *tx).await?;
    }
    for (event, problems) in violations {
        sqlx::query(
            "INSERT INTO schema_violations (project_id, event_id, event, problems, recorded_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(project)
        .bind(event.event_id.to_string())
        .bind(&event.event)
        .bind(serde_json::to_string(&problems).map_err(StoreError::internal)?)
        .bind(event.received_at.timestamp_micros())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Merges a batch's `identify` traits into `person_traits`: the stored
/// rows of the batch's people are read, merged in memory in commit order
/// (`plan_traits`) and written back, a few statements per batch.
async fn apply_traits(
    tx: &mut SqliteConnection,
    project: &str,
    sets: &[(String, serde_json::Map<String, serde_json::Value>)],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut ids: Vec<&str> = sets.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut stored = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT distinct_id, traits FROM person_traits WHERE project_id = ",
        );
        query.push_bind(project).push(" AND distinct_id IN (");
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        query.push(")");
        for (id, traits) in query
            .build_query_as::<(String, String)>()
            .fetch_all(&mut *tx)
            .await?
        {
            stored.insert(id, from_json_text(&traits)?);
        }
    }
    let planned = plan_traits(sets, stored);
    for chunk in planned.chunks(ROWS_PER_STATEMENT / 4) {
        let mut rows = Vec::with_capacity(chunk.len());
        for (id, traits) in chunk {
            rows.push((id, json_text(traits)?));
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO person_traits (project_id, distinct_id, traits, updated_at) ",
        );
        query.push_values(rows, |mut row, (id, traits)| {
            row.push_bind(project)
                .push_bind(id)
                .push_bind(traits)
                .push_bind(at.timestamp_micros());
        });
        query.push(
            " ON CONFLICT (project_id, distinct_id) DO UPDATE SET traits = excluded.traits, \
             updated_at = excluded.updated_at",
        );
        query.build().execute(&mut *tx).await?;
    }
    Ok(())
}

async fn resolve_in(
    conn: &mut SqliteConnection,
    project: &str,
    id: &str,
) -> Result<String, StoreError> {
    let mut current = id.to_string();
    for _ in 0..MAX_LINK_DEPTH {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT user_id FROM identity_links WHERE project_id = ? AND alias = ?",
        )
        .bind(project)
        .bind(&current)
        .fetch_optional(&mut *conn)
        .await?;
        match next {
            Some(next) if next != current => current = next,
            _ => break,
        }
    }
    Ok(current)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        timed(Backend::Sqlite, "check_ready", async {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.reader)
                    .await?;
            let expected = MIGRATOR.iter().map(|m| m.version).max();
            if applied != expected {
                return Err(StoreError::internal(sqlx::Error::Protocol(format!(
                    "schema at migration {applied:?}, binary expects {expected:?}"
                ))));
            }
            Ok(())
        })
        .await
    }

    async fn commit_events(&self, batches: &[EventBatch]) -> Result<EventCommit, StoreError> {
        timed(Backend::Sqlite, "commit_events", async {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            let mut commit = EventCommit::default();
            for batch in batches {
                let results =
                    commit_batch(&mut tx, batch, &mut commit.orgs, &mut commit.outbox).await?;
                commit.results.push(results);
            }
            tx.commit().await?;
            Ok(commit)
        })
        .await
    }

    async fn list_events(
        &self,
        project: ProjectId,
        filter: &EventQuery,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        timed(Backend::Sqlite, "list_events", async {
            let mut query =
                QueryBuilder::<Sqlite>::new("SELECT seq, body FROM events WHERE project_id = ");
            query.push_bind(project.0.to_string());
            if let Some(ids) = &filter.distinct_ids {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                query.push(" AND distinct_id IN (");
                let mut list = query.separated(", ");
                for id in ids {
                    list.push_bind(id.clone());
                }
                query.push(")");
            }
            if let Some(name) = &filter.event {
                query.push(" AND event = ").push_bind(name.clone());
            }
            if let Some(since) = filter.since {
                query
                    .push(" AND timestamp >= ")
                    .push_bind(since.timestamp_micros());
            }
            match filter.after_seq {
                Some(after) => query
                    .push(" AND seq > ")
                    .push_bind(after)
                    .push(" ORDER BY seq ASC"),
                None => query.push(" ORDER BY seq DESC"),
            };
            query.push(" LIMIT ").push_bind(i64::from(filter.limit));
            let rows = query.build().fetch_all(&self.reader).await?;
            rows.iter()
                .map(|row| {
                    let body: String = row.try_get("body")?;
                    let event =
                        serde_json::from_str(&body).map_err(|e| decode_error(e.to_string()))?;
                    Ok(StoredEvent {
                        seq: row.try_get("seq")?,
                        event,
                    })
                })
                .collect()
        })
        .await
    }

    async fn person_ids(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        timed(Backend::Sqlite, "person_ids", async {
            let project = project.0.to_string();
            let mut ids = vec![user_id.to_string()];
            let mut frontier = vec![user_id.to_string()];
            for _ in 0..MAX_LINK_DEPTH {
                if frontier.is_empty() {
                    break;
                }
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT alias FROM identity_links WHERE project_id = ",
                );
                query.push_bind(&project).push(" AND user_id IN (");
                let mut list = query.separated(", ");
                for id in &frontier {
                    list.push_bind(id.clone());
                }
                query.push(")");
                let found: Vec<String> = query.build_query_scalar().fetch_all(&self.reader).await?;
                frontier = found.into_iter().filter(|id| !ids.contains(id)).collect();
                ids.extend(frontier.iter().cloned());
            }
            Ok(ids)
        })
        .await
    }

    async fn resolve_person(
        &self,
        project: ProjectId,
        distinct_id: &str,
    ) -> Result<String, StoreError> {
        let mut conn = self.reader.acquire().await?;
        timed(
            Backend::Sqlite,
            "resolve_person",
            resolve_in(&mut conn, &project.0.to_string(), distinct_id),
        )
        .await
    }

    async fn orgs_of(
        &self,
        project: ProjectId,
        distinct_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let person = self.resolve_person(project, distinct_id).await?;
        let ids = self.person_ids(project, &person).await?;
        timed(Backend::Sqlite, "orgs_of", async {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT DISTINCT org_id FROM org_members WHERE project_id = ",
            );
            query
                .push_bind(project.0.to_string())
                .push(" AND distinct_id IN (");
            let mut list = query.separated(", ");
            for id in &ids {
                list.push_bind(id.clone());
            }
            query.push(") ORDER BY org_id");
            Ok(query.build_query_scalar().fetch_all(&self.reader).await?)
        })
        .await
    }

    async fn delete_person(
        &self,
        project: ProjectId,
        ids: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        timed(Backend::Sqlite, "delete_person", async {
            let project = project.0.to_string();
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            let mut deleted = 0;
            for id in ids {
                deleted += sqlx::query("DELETE FROM events WHERE project_id = ? AND distinct_id = ?")
                    .bind(&project)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                // Events that named the id as their anonymous id.
                deleted += sqlx::query(
                    "DELETE FROM events WHERE project_id = ? AND json_extract(body, '$.anonymous_id') = ?",
                )
                .bind(&project)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query(
                    "DELETE FROM identity_links WHERE project_id = ?1 AND (alias = ?2 OR user_id = ?2)",
                )
                .bind(&project)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM org_members WHERE project_id = ? AND distinct_id = ?")
                    .bind(&project)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM person_traits WHERE project_id = ? AND distinct_id = ?")
                    .bind(&project)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                for table in ["activation_counts", "milestones"] {
                    sqlx::query(&format!(
                        "DELETE FROM {table} WHERE project_id = ? AND scope = 'user' AND subject_id = ?"
                    ))
                    .bind(&project)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                // Their prompts and what was streamed to them.
                for table in ["prompts", "live_messages"] {
                    sqlx::query(&format!(
                        "DELETE FROM {table} WHERE project_id = ? AND user_id = ?"
                    ))
                    .bind(&project)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO suppressed_ids (project_id, distinct_id, suppressed_at) VALUES (?, ?, ?) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(&project)
                .bind(id)
                .bind(at.timestamp_micros())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(deleted)
        })
        .await
    }

    async fn load_org(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<Option<OrgState>, StoreError> {
        timed(Backend::Sqlite, "load_org", async {
            let mut conn = self.reader.acquire().await?;
            let ids = [(org_id.to_string(), Utc::now())];
            let mut states = load_orgs_in(&mut conn, &project.0.to_string(), &ids).await?;
            Ok(states.remove(org_id).filter(|state| state.version > 0))
        })
        .await
    }

    async fn org_for_stripe_customer(
        &self,
        project: ProjectId,
        customer_id: &str,
    ) -> Result<Option<String>, StoreError> {
        timed(Backend::Sqlite, "org_for_stripe_customer", async {
            Ok(sqlx::query_scalar(
                "SELECT org_id FROM orgs WHERE project_id = ? AND stripe_customer_id = ? \
                 ORDER BY org_id LIMIT 1",
            )
            .bind(project.0.to_string())
            .bind(customer_id)
            .fetch_optional(&self.reader)
            .await?)
        })
        .await
    }

    async fn execute_org_requests(&self, requests: &[OrgRequest]) -> Result<OrgCommit, StoreError> {
        timed(Backend::Sqlite, "execute_org_requests", async {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            // Set-wise per project: a few statements per group, not per request.
            let by_project = crate::requests_by_project(requests);
            let mut replies = HashMap::new();
            let mut states = HashMap::new();
            for (project, group) in &by_project {
                let id = project.0.to_string();
                let keys: Vec<&str> = group
                    .iter()
                    .filter_map(|request| request.idempotency_key.as_deref())
                    .collect();
                for chunk in keys.chunks(ROWS_PER_STATEMENT) {
                    let mut query = QueryBuilder::<Sqlite>::new(
                        "SELECT idempotency_key, fingerprint, reply FROM org_requests WHERE project_id = ",
                    );
                    query.push_bind(&id).push(" AND idempotency_key IN (");
                    let mut list = query.separated(", ");
                    for key in chunk {
                        list.push_bind(*key);
                    }
                    query.push(")");
                    for row in query.build().fetch_all(&mut *tx).await? {
                        let reply: Reply = from_json_text(&row.try_get::<String, _>("reply")?)?;
                        replies.insert(
                            (*project, row.try_get("idempotency_key")?),
                            (row.try_get("fingerprint")?, reply),
                        );
                    }
                }
                let orgs = crate::orgs_as_of_first_request(group);
                for (org, state) in load_orgs_in(&mut tx, &id, &orgs).await? {
                    states.insert((*project, org), state);
                }
            }
            let before = states.clone();
            let mut fresh = Vec::new();
            let results = run_org_requests(requests, &mut states, &mut replies, &mut fresh);
            let mut commit = OrgCommit {
                results,
                orgs: Vec::new(),
                outbox: false,
            };
            for (project, group) in &by_project {
                let mut keys: Vec<(ProjectId, String)> =
                    states.keys().filter(|(p, _)| p == project).cloned().collect();
                keys.sort();
                let writes: Vec<(&OrgState, OrgState)> = keys
                    .iter()
                    .map(|key| (&before[key], states.remove(key).expect("listed above")))
                    .collect();
                let saved = save_orgs_in(&mut tx, &project.0.to_string(), writes).await?;
                crate::growth::effects::org_group_effects(
                    &mut *tx,
                    *project,
                    group,
                    requests,
                    &before,
                    saved,
                    &mut commit,
                )
                .await?;
            }
            commit.outbox |=
                crate::growth::effects::denied_consume_prompts(&mut *tx, requests, &commit.results, &commit.orgs).await?;
            for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
                let mut rows = Vec::with_capacity(chunk.len());
                for (project, key, fingerprint, reply, at) in chunk {
                    rows.push((
                        project.0.to_string(),
                        key.clone(),
                        fingerprint.clone(),
                        json_text(reply)?,
                        at.timestamp_micros(),
                    ));
                }
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO org_requests (project_id, idempotency_key, fingerprint, reply, created_at) ",
                );
                query.push_values(rows, |mut row, (project, key, fingerprint, reply, at)| {
                    row.push_bind(project)
                        .push_bind(key)
                        .push_bind(fingerprint)
                        .push_bind(reply)
                        .push_bind(at);
                });
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(commit)
        })
        .await
    }

    async fn config_listener(&self) -> Result<Option<Box<dyn ConfigListener>>, StoreError> {
        // Writers serialise on SQLite's lock, so sequence numbers commit in
        // order and polling `config_changes_since` never skips a change.
        Ok(None)
    }
}

/// The user and anonymous ids an event names.
fn event_ids(event: &Event) -> impl Iterator<Item = &str> {
    event
        .user_id
        .as_deref()
        .into_iter()
        .chain(event.anonymous_id.as_deref())
}

fn is_suppressed(event: &Event, suppressed: &HashSet<String>) -> bool {
    !suppressed.is_empty() && event_ids(event).any(|id| suppressed.contains(id))
}

// ---- Billing: org state, usage, idempotent org requests ------------------

fn json_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(StoreError::internal)
}

fn from_json_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(StoreError::internal)
}

/// Loads the orgs' billing state in three statements per chunk (SQLite has
/// one writer, so the transaction already excludes every other writer).
/// Orgs without a row start fresh, created at the time paired with them.
async fn load_orgs_in(
    conn: &mut SqliteConnection,
    project: &str,
    orgs: &[(String, DateTime<Utc>)],
) -> Result<HashMap<String, OrgState>, StoreError> {
    let mut states: HashMap<String, OrgState> = orgs
        .iter()
        .map(|(org, created)| (org.clone(), OrgState::new(org.clone(), *created)))
        .collect();
    let ids: Vec<String> = states.keys().cloned().collect();
    fn in_list(query: &mut QueryBuilder<'_, Sqlite>, chunk: &[String]) {
        query.push(" AND org_id IN (");
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(id.clone());
        }
        query.push(")");
    }
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT org_id, created_at, subscription, overrides, stripe_customer_id, version \
             FROM orgs WHERE project_id = ",
        );
        query.push_bind(project);
        in_list(&mut query, chunk);
        for row in query.build().fetch_all(&mut *conn).await? {
            let org: String = row.try_get("org_id")?;
            let Some(state) = states.get_mut(&org) else {
                continue;
            };
            state.created_at = micros_to_time(row.try_get("created_at")?)?;
            let subscription: Option<String> = row.try_get("subscription")?;
            state.subscription = subscription.as_deref().map(from_json_text).transpose()?;
            state.overrides = from_json_text(&row.try_get::<String, _>("overrides")?)?;
            state.stripe_customer_id = row.try_get("stripe_customer_id")?;
            state.version = row.try_get("version")?;
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT org_id, feature, period_start, plan_used, grant_used FROM usage_counters AS c \
             WHERE project_id = ",
        );
        query.push_bind(project);
        in_list(&mut query, chunk);
        query.push(
            " AND period_start = (SELECT MAX(period_start) FROM usage_counters AS d \
             WHERE d.project_id = c.project_id AND d.org_id = c.org_id AND d.feature = c.feature)",
        );
        for row in query.build().fetch_all(&mut *conn).await? {
            let org: String = row.try_get("org_id")?;
            let Some(state) = states.get_mut(&org) else {
                continue;
            };
            state.usage.insert(
                row.try_get("feature")?,
                UsageCounter {
                    period_start: micros_to_time(row.try_get("period_start")?)?,
                    plan_used: row.try_get("plan_used")?,
                    grant_used: row.try_get("grant_used")?,
                },
            );
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT org_id, grant_id, feature, amount, remaining, expires_at, created_at, reason \
             FROM usage_grants WHERE project_id = ",
        );
        query.push_bind(project);
        in_list(&mut query, chunk);
        query.push(" ORDER BY created_at, grant_id");
        for row in query.build().fetch_all(&mut *conn).await? {
            let org: String = row.try_get("org_id")?;
            let Some(state) = states.get_mut(&org) else {
                continue;
            };
            state.grants.push(UsageGrant {
                id: uuid_column(&row, "grant_id")?,
                feature: row.try_get("feature")?,
                amount: row.try_get("amount")?,
                remaining: row.try_get("remaining")?,
                expires_at: row
                    .try_get::<Option<i64>, _>("expires_at")?
                    .map(micros_to_time)
                    .transpose()?,
                created_at: micros_to_time(row.try_get("created_at")?)?,
                reason: row.try_get("reason")?,
            });
        }
    }
    Ok(states)
}

/// Writes what changed between each `before` and `after` (bumping versions)
/// in a few multi-row statements. Returns every org's state after the write.
async fn save_orgs_in(
    conn: &mut SqliteConnection,
    project: &str,
    writes: Vec<(&OrgState, OrgState)>,
) -> Result<Vec<OrgState>, StoreError> {
    let mut states = Vec::with_capacity(writes.len());
    let mut changed = Vec::new();
    for (before, mut after) in writes {
        match plan_org_write(before, &mut after) {
            Some(write) => changed.push((after, write)),
            None => states.push(after),
        }
    }
    // SQLite binds at most 32,766 parameters per statement: chunk by columns.
    for chunk in changed.chunks(ROWS_PER_STATEMENT / 8) {
        let mut rows = Vec::with_capacity(chunk.len());
        for (after, _) in chunk {
            rows.push((
                after,
                after.subscription.as_ref().map(json_text).transpose()?,
                json_text(&after.overrides)?,
            ));
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO orgs (project_id, org_id, created_at, subscription, overrides, stripe_customer_id, version) ",
        );
        query.push_values(rows, |mut row, (after, subscription, overrides)| {
            row.push_bind(project)
                .push_bind(after.org_id.clone())
                .push_bind(after.created_at.timestamp_micros())
                .push_bind(subscription)
                .push_bind(overrides)
                .push_bind(after.stripe_customer_id.clone())
                .push_bind(after.version);
        });
        query.push(
            " ON CONFLICT (project_id, org_id) DO UPDATE SET subscription = excluded.subscription, \
             overrides = excluded.overrides, stripe_customer_id = excluded.stripe_customer_id, \
             version = excluded.version",
        );
        query.build().execute(&mut *conn).await?;
    }
    let counters: Vec<(&str, &String, &UsageCounter)> = changed
        .iter()
        .flat_map(|(after, write)| {
            write
                .counters
                .iter()
                .map(move |(feature, counter)| (after.org_id.as_str(), feature, counter))
        })
        .collect();
    for chunk in counters.chunks(ROWS_PER_STATEMENT / 6) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_counters (project_id, org_id, feature, period_start, plan_used, grant_used) ",
        );
        query.push_values(chunk, |mut row, (org, feature, counter)| {
            row.push_bind(project)
                .push_bind(*org)
                .push_bind(feature.as_str())
                .push_bind(counter.period_start.timestamp_micros())
                .push_bind(counter.plan_used)
                .push_bind(counter.grant_used);
        });
        query.push(
            " ON CONFLICT (project_id, org_id, feature, period_start) \
             DO UPDATE SET plan_used = excluded.plan_used, grant_used = excluded.grant_used",
        );
        query.build().execute(&mut *conn).await?;
    }
    let grants: Vec<(&str, &UsageGrant)> = changed
        .iter()
        .flat_map(|(after, write)| {
            write
                .grants
                .iter()
                .map(move |grant| (after.org_id.as_str(), grant))
        })
        .collect();
    for chunk in grants.chunks(ROWS_PER_STATEMENT / 9) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_grants (project_id, org_id, grant_id, feature, amount, remaining, \
             expires_at, created_at, reason) ",
        );
        query.push_values(chunk, |mut row, (org, grant)| {
            row.push_bind(project)
                .push_bind(*org)
                .push_bind(grant.id.to_string())
                .push_bind(grant.feature.as_str())
                .push_bind(grant.amount)
                .push_bind(grant.remaining)
                .push_bind(grant.expires_at.map(|at| at.timestamp_micros()))
                .push_bind(grant.created_at.timestamp_micros())
                .push_bind(grant.reason.as_deref());
        });
        query.push(
            " ON CONFLICT (project_id, org_id, grant_id) DO UPDATE SET remaining = excluded.remaining",
        );
        query.build().execute(&mut *conn).await?;
    }
    states.extend(changed.into_iter().map(|(after, _)| after));
    Ok(states)
}

/// Applies the meters of a batch's new events, in the events' transaction.
async fn apply_meters(
    conn: &mut SqliteConnection,
    project: &str,
    billing: &Billing,
    events: &[&Event],
) -> Result<(Vec<OrgState>, bool), StoreError> {
    let inputs = meter_inputs(billing, events.iter().copied());
    if inputs.is_empty() {
        return Ok((Vec::new(), false));
    }
    let now = events
        .iter()
        .map(|event| event.received_at)
        .max()
        .expect("inputs come from events");
    let mut orgs: Vec<(String, DateTime<Utc>)> =
        inputs.iter().map(|(org, ..)| (org.clone(), now)).collect();
    orgs.sort();
    orgs.dedup();
    let mut states = load_orgs_in(conn, project, &orgs).await?;
    let before = states.clone();
    let mut readings = Vec::with_capacity(inputs.len());
    for (org, meter, input) in inputs {
        let reading = match input {
            MeterInput::Reading(reading) => reading,
            MeterInput::Unique(value) => {
                let state = &states[&org];
                let period = state.period_for(&billing.catalog, &meter.feature, billing.grace, now);
                let inserted = sqlx::query(
                    "INSERT OR IGNORE INTO meter_unique_values (project_id, org_id, meter, period_start, value) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(project)
                .bind(&org)
                .bind(&meter.key)
                .bind(period.start.timestamp_micros())
                .bind(&value)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 0 {
                    continue;
                }
                MeterReading::Add(1)
            }
        };
        readings.push((org, meter, reading));
    }
    apply_readings(billing, &mut states, readings, now);
    let mut keys: Vec<String> = states.keys().cloned().collect();
    keys.sort();
    let writes: Vec<(&OrgState, OrgState)> = keys
        .iter()
        .map(|org| (&before[org], states.remove(org).expect("listed above")))
        .collect();
    let saved = save_orgs_in(conn, project, writes).await?;
    let changes: Vec<(&OrgState, &OrgState)> = saved
        .iter()
        .map(|after| (&before[&after.org_id], after))
        .collect();
    let project_id = ProjectId(uuid::Uuid::parse_str(project).map_err(StoreError::internal)?);
    let actors = crate::event_actors(events);
    let wrote = crate::growth::effects::billing_effects_by(
        conn, project_id, billing, &changes, &actors, now,
    )
    .await?;
    // Only the orgs the events changed (the others were only read).
    let changed = saved
        .into_iter()
        .filter(|state| state.version != before[&state.org_id].version)
        .collect();
    Ok((changed, wrote))
}

// What the shared SQL layer (`sql.rs`, `growth/`) needs from this
// backend.

#[async_trait]
impl SqlBackend for SqliteStore {
    const BACKEND: Backend = Backend::Sqlite;

    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx::new(Transaction(
            self.writer.begin_with("BEGIN IMMEDIATE").await?,
        )))
    }

    async fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Box::new(Pooled(self.reader.acquire().await?)))
    }
}

#[async_trait]
impl SqlConn for SqliteConnection {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn execute(&mut self, sql: Sql<'_>) -> Result<Done, sqlx::Error> {
        let done = bind_sqlite(&sql).execute(&mut *self).await?;
        Ok(Done::new(done.rows_affected()))
    }

    async fn fetch_all(&mut self, sql: Sql<'_>) -> Result<Vec<SqlRow>, sqlx::Error> {
        let rows = bind_sqlite(&sql).fetch_all(&mut *self).await?;
        Ok(rows.into_iter().map(SqlRow::Sqlite).collect())
    }

    async fn fetch_optional(&mut self, sql: Sql<'_>) -> Result<Option<SqlRow>, sqlx::Error> {
        let row = bind_sqlite(&sql).fetch_optional(&mut *self).await?;
        Ok(row.map(SqlRow::Sqlite))
    }
}

#[async_trait]
impl WriteConn for SqliteConnection {
    /// The writer transaction already holds SQLite's lock.
    async fn load_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError> {
        let id = project.0.to_string();
        sqlx::query(
            "INSERT INTO orgs (project_id, org_id, created_at, subscription, overrides, version) \
             VALUES (?, ?, ?, NULL, '{}', 0) ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(org_id)
        .bind(now.timestamp_micros())
        .execute(&mut *self)
        .await?;
        let mut states = load_orgs_in(self, &id, &[(org_id.to_owned(), now)]).await?;
        states
            .remove(org_id)
            .ok_or_else(|| StoreError::internal(UnknownValue(org_id.to_owned())))
    }

    async fn read_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError> {
        let mut states =
            load_orgs_in(self, &project.0.to_string(), &[(org_id.to_owned(), now)]).await?;
        Ok(states
            .remove(org_id)
            .unwrap_or_else(|| OrgState::new(org_id, now)))
    }

    async fn save_org(
        &mut self,
        project: ProjectId,
        before: &OrgState,
        after: OrgState,
    ) -> Result<OrgState, StoreError> {
        let mut saved = save_orgs_in(self, &project.0.to_string(), vec![(before, after)]).await?;
        saved
            .pop()
            .ok_or_else(|| StoreError::internal(UnknownValue(before.org_id.clone())))
    }

    /// The single writer numbers live messages in commit order; this node is
    /// woken by the outbox signal, and nothing else needs telling.
    async fn notify_live(&mut self, _seqs: &[i64]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn record_change(
        &mut self,
        project: ProjectId,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        SqliteStore::record_change(self, project, kind, now).await
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;

    /// Committed pages reach the database file without any commit crossing
    /// the writer's own autocheckpoint: only the background checkpointer
    /// copies them there (in WAL mode nothing else writes the main file).
    #[tokio::test]
    async fn the_checkpointer_copies_committed_pages_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flywheel.db");
        let store = SqliteStore::open(&path, &StoreOptions::embedded(dir.path()))
            .await
            .unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        // Let the migrations' pages settle first.
        tokio::time::sleep(CHECKPOINT_INTERVAL * 6).await;
        let before = size();
        sqlx::query("CREATE TABLE filler (data BLOB NOT NULL)")
            .execute(&store.writer)
            .await
            .unwrap();
        // ~250 pages: far below WRITER_AUTOCHECKPOINT_PAGES.
        for _ in 0..250 {
            sqlx::query("INSERT INTO filler (data) VALUES (zeroblob(4000))")
                .execute(&store.writer)
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() < before + 200 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file stayed at {} bytes (from {before})",
                size()
            );
            tokio::time::sleep(CHECKPOINT_INTERVAL).await;
        }
    }
}
