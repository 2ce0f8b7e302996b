//! The scale-out backend: PostgreSQL shared by any number of nodes.
//!
//! Invariants:
//! * Every configuration write inserts a `config_changes` row and calls
//!   `pg_notify('flywheel_config_changes', project_id)` in its transaction,
//!   so the notification is delivered exactly when the change is visible.
//! * Identity sequence numbers may commit out of order across sessions, so
//!   nodes follow NOTIFY rather than polling `seq`; after a lost listener
//!   connection they reload everything ([`ConfigSignal::Resync`]).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::events::{Effect, Event};
use flywheel_domain::project::ProjectId;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::number_events;
use crate::sql::{
    bind_pg, Done, Pooled, Reader, Row as SqlRow, Sql, SqlBackend, SqlConn, Transaction, Tx,
    WriteConn,
};
use crate::{
    apply_readings, meter_inputs, plan_links, plan_org_write, plan_traits, redact_url,
    run_org_requests, timed, Backend, Billing, CommitResult, ConfigListener, ConfigSignal,
    EncodedEvent, EventBatch, EventCommit, EventQuery, OpenError, OrgCommit, OrgRequest, Store,
    StoreError, StoreOptions, StoredEvent, MAX_LINK_DEPTH,
};
use flywheel_domain::billing::org::{MeterInput, MeterReading, OrgState, UsageCounter, UsageGrant};
use flywheel_domain::billing::Reply;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The NOTIFY channel carrying `"{project_id} {version} {org_id}"` for every
/// write to an org's billing state, so other nodes drop stale cache entries.
pub const ORG_CHANNEL: &str = "flywheel_org_changes";
/// Announces committed live messages by number (`12,13,14`).
pub const LIVE_CHANNEL: &str = "flywheel_live";

/// The NOTIFY channel carrying changed project ids.
pub const CONFIG_CHANNEL: &str = "flywheel_config_changes";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, OpenError> {
        let connect = |source| OpenError::Connect {
            backend: "postgres",
            target: redact_url(url),
            source,
        };
        let connect_options = PgConnectOptions::from_str(url)
            .map_err(connect)?
            .application_name("flywheel");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect_options)
            .await
            .map_err(connect)?;
        // sqlx takes an advisory lock here, so nodes starting together migrate once.
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| OpenError::Migrate {
                backend: "postgres",
                source,
            })?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn record_change(
        tx: &mut sqlx::PgConnection,
        project: ProjectId,
        entity: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO config_changes (project_id, entity, changed_at) VALUES ($1, $2, $3)",
        )
        .bind(project.0)
        .bind(entity)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CONFIG_CHANNEL)
            .bind(project.0.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Rows per multi-row statement: 9 columns each, under PostgreSQL's 65,535
/// bound parameters.
const ROWS_PER_STATEMENT: usize = 1000;

async fn commit_batch(
    tx: &mut PgConnection,
    batch: &EventBatch,
    orgs: &mut Vec<(ProjectId, std::sync::Arc<OrgState>)>,
    outbox: &mut bool,
) -> Result<Vec<CommitResult>, StoreError> {
    let project = batch.project.0;
    // The project's sequence row is the lock every writer of the project
    // takes first: numbering and the duplicate check below are race-free
    // across nodes, and seq order is commit order.
    sqlx::query(
        "INSERT INTO event_sequences (project_id, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(project)
    .execute(&mut *tx)
    .await?;
    let last: i64 =
        sqlx::query_scalar("SELECT last_seq FROM event_sequences WHERE project_id = $1 FOR UPDATE")
            .bind(project)
            .fetch_one(&mut *tx)
            .await?;
    let named: HashSet<&str> = batch
        .events
        .iter()
        .flat_map(|e| event_ids(&e.event))
        .collect();
    let named: Vec<&str> = named.into_iter().collect();
    let suppressed: HashSet<String> = sqlx::query_scalar::<_, String>(
        "SELECT distinct_id FROM suppressed_ids WHERE project_id = $1 AND distinct_id = ANY($2)",
    )
    .bind(project)
    .bind(&named)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    // Only ids the clients sent are looked up: a UUIDv7 minted by the
    // decoder for this request cannot be stored already.
    let ids: Vec<Uuid> = batch
        .events
        .iter()
        .filter(|e| !e.event.event_id_generated)
        .map(|e| e.event.event_id)
        .collect();
    let found: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE project_id = $1 AND event_id = ANY($2)",
    )
    .bind(project)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut stored: HashSet<Uuid> = found.into_iter().collect();
    let mut next = last;
    let mut results = Vec::with_capacity(batch.events.len());
    let mut fresh: Vec<(i64, &EncodedEvent)> = Vec::with_capacity(batch.events.len());
    for encoded in &batch.events {
        let event = &encoded.event;
        if is_suppressed(event, &suppressed) {
            results.push(CommitResult::Suppressed);
        } else if event.event_id_generated || stored.insert(event.event_id) {
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
    insert_events(tx, project, &fresh, next).await?;
    let fresh: Vec<(i64, &Event)> = fresh
        .iter()
        .map(|(seq, encoded)| (*seq, &encoded.event))
        .collect();
    apply_effects(tx, project, &fresh).await?;
    if fresh
        .iter()
        .any(|(_, event)| event.event.starts_with("$prompt_"))
    {
        crate::growth::prompts::apply_prompt_actions(tx, batch.project, &fresh).await?;
    }
    if let Some(billing) = &batch.billing {
        let events: Vec<&Event> = fresh.iter().map(|(_, event)| *event).collect();
        let (states, wrote) = apply_meters(tx, project, billing, &events).await?;
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
            insert_events(tx, project, &rows, next).await?;
        }
    }
    Ok(results)
}

/// Inserts numbered events and moves the project's sequence (locked by the
/// caller) to `last_seq`.
async fn insert_events(
    tx: &mut PgConnection,
    project: Uuid,
    rows: &[(i64, &EncodedEvent)],
    last_seq: i64,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO events (project_id, event_id, seq, type, event, distinct_id, timestamp, received_at, body) ",
        );
        query.push_values(chunk, |mut row, (seq, encoded)| {
            let event = &encoded.event;
            row.push_bind(project)
                .push_bind(event.event_id)
                .push_bind(*seq)
                .push_bind(event.kind.as_str())
                .push_bind(&event.event)
                .push_bind(event.distinct_id().to_string())
                .push_bind(event.timestamp)
                .push_bind(event.received_at)
                .push_bind(&encoded.body)
                .push_unseparated("::jsonb");
        });
        query.build().execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE event_sequences SET last_seq = $2 WHERE project_id = $1")
        .bind(project)
        .bind(last_seq)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Applies what the new events imply, inside their transaction, set-wise:
/// a handful of statements per batch however many effects it carries.
async fn apply_effects(
    tx: &mut PgConnection,
    project: Uuid,
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
                let mut query = QueryBuilder::<Postgres>::new(
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
        let at = fresh[0].1.received_at;
        for chunk in added.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Postgres>::new(
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
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO org_members (project_id, org_id, distinct_id, joined_at) ",
        );
        query.push_values(chunk, |mut row, (org, distinct, at)| {
            row.push_bind(project)
                .push_bind(org)
                .push_bind(distinct)
                .push_bind(*at);
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut *tx).await?;
    }
    for (event, problems) in violations {
        sqlx::query(
            "INSERT INTO schema_violations (project_id, event_id, event, problems, recorded_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(project)
        .bind(event.event_id)
        .bind(&event.event)
        .bind(serde_json::to_value(&problems).map_err(StoreError::internal)?)
        .bind(event.received_at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Merges a batch's `identify` traits into `person_traits` (see the SQLite
/// twin). The project's `event_sequences` row, locked by the batch, keeps
/// concurrent batches from merging over each other.
async fn apply_traits(
    tx: &mut PgConnection,
    project: Uuid,
    sets: &[(String, serde_json::Map<String, serde_json::Value>)],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut ids: Vec<String> = sets.iter().map(|(id, _)| id.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut stored = HashMap::new();
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT distinct_id, traits FROM person_traits WHERE project_id = $1 AND distinct_id = ANY($2)",
    )
    .bind(project)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for (id, traits) in rows {
        if let serde_json::Value::Object(traits) = traits {
            stored.insert(id, traits);
        }
    }
    let planned = plan_traits(sets, stored);
    for chunk in planned.chunks(ROWS_PER_STATEMENT / 4) {
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO person_traits (project_id, distinct_id, traits, updated_at) ",
        );
        query.push_values(chunk, |mut row, (id, traits)| {
            row.push_bind(project)
                .push_bind(id)
                .push_bind(serde_json::Value::Object(traits.clone()))
                .push_bind(at);
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
    conn: &mut PgConnection,
    project: Uuid,
    id: &str,
) -> Result<String, StoreError> {
    let mut current = id.to_string();
    for _ in 0..MAX_LINK_DEPTH {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT user_id FROM identity_links WHERE project_id = $1 AND alias = $2",
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
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        timed(Backend::Postgres, "check_ready", async {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.pool)
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
        timed(Backend::Postgres, "commit_events", async {
            // Lock projects in one global order so two nodes committing
            // overlapping projects cannot deadlock.
            let mut order: Vec<usize> = (0..batches.len()).collect();
            order.sort_by_key(|&i| batches[i].project);
            let mut tx = self.pool.begin().await?;
            let mut commit = EventCommit {
                results: vec![Vec::new(); batches.len()],
                orgs: Vec::new(),
                outbox: false,
            };
            for i in order {
                commit.results[i] =
                    commit_batch(&mut tx, &batches[i], &mut commit.orgs, &mut commit.outbox)
                        .await?;
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
        timed(Backend::Postgres, "list_events", async {
            let mut query =
                QueryBuilder::<Postgres>::new("SELECT seq, body FROM events WHERE project_id = ");
            query.push_bind(project.0);
            if let Some(ids) = &filter.distinct_ids {
                query
                    .push(" AND distinct_id = ANY(")
                    .push_bind(ids.clone())
                    .push(")");
            }
            if let Some(name) = &filter.event {
                query.push(" AND event = ").push_bind(name.clone());
            }
            if let Some(since) = filter.since {
                query.push(" AND timestamp >= ").push_bind(since);
            }
            match filter.after_seq {
                Some(after) => query
                    .push(" AND seq > ")
                    .push_bind(after)
                    .push(" ORDER BY seq ASC"),
                None => query.push(" ORDER BY seq DESC"),
            };
            query.push(" LIMIT ").push_bind(i64::from(filter.limit));
            let rows = query.build().fetch_all(&self.pool).await?;
            rows.iter()
                .map(|row| {
                    let body: serde_json::Value = row.try_get("body")?;
                    let event = serde_json::from_value(body).map_err(StoreError::internal)?;
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
        timed(Backend::Postgres, "person_ids", async {
            let mut ids = vec![user_id.to_string()];
            let mut frontier = vec![user_id.to_string()];
            for _ in 0..MAX_LINK_DEPTH {
                if frontier.is_empty() {
                    break;
                }
                let found: Vec<String> = sqlx::query_scalar(
                    "SELECT alias FROM identity_links WHERE project_id = $1 AND user_id = ANY($2)",
                )
                .bind(project.0)
                .bind(&frontier)
                .fetch_all(&self.pool)
                .await?;
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
        let mut conn = self.pool.acquire().await?;
        timed(
            Backend::Postgres,
            "resolve_person",
            resolve_in(&mut conn, project.0, distinct_id),
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
        timed(Backend::Postgres, "orgs_of", async {
            Ok(sqlx::query_scalar(
                "SELECT DISTINCT org_id FROM org_members WHERE project_id = $1 AND distinct_id = ANY($2) ORDER BY org_id",
            )
            .bind(project.0)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?)
        })
        .await
    }

    async fn delete_person(
        &self,
        project: ProjectId,
        ids: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        timed(Backend::Postgres, "delete_person", async {
            let mut tx = self.pool.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM events WHERE project_id = $1 \
                 AND (distinct_id = ANY($2) OR body->>'anonymous_id' = ANY($2))",
            )
            .bind(project.0)
            .bind(ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "DELETE FROM identity_links WHERE project_id = $1 AND (alias = ANY($2) OR user_id = ANY($2))",
            )
            .bind(project.0)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM org_members WHERE project_id = $1 AND distinct_id = ANY($2)")
                .bind(project.0)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM person_traits WHERE project_id = $1 AND distinct_id = ANY($2)")
                .bind(project.0)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            for table in ["activation_counts", "milestones"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE project_id = $1 AND scope = 'user' AND subject_id = ANY($2)"
                ))
                .bind(project.0)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            }
            // Their prompts and what was streamed to them.
            for table in ["prompts", "live_messages"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE project_id = $1 AND user_id = ANY($2)"
                ))
                .bind(project.0)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO suppressed_ids (project_id, distinct_id, suppressed_at) \
                 SELECT $1, id, $3 FROM UNNEST($2::text[]) AS id ON CONFLICT DO NOTHING",
            )
            .bind(project.0)
            .bind(ids)
            .bind(at)
            .execute(&mut *tx)
            .await?;
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
        timed(Backend::Postgres, "load_org", async {
            let mut tx = self.pool.begin_with(BEGIN_CUSTOM_PLANS).await?;
            let orgs = [(org_id.to_string(), Utc::now())];
            let mut states = load_orgs_in(&mut tx, project.0, &orgs, false).await?;
            tx.commit().await?;
            Ok(states.remove(org_id).filter(|state| state.version > 0))
        })
        .await
    }

    async fn org_for_stripe_customer(
        &self,
        project: ProjectId,
        customer_id: &str,
    ) -> Result<Option<String>, StoreError> {
        timed(Backend::Postgres, "org_for_stripe_customer", async {
            Ok(sqlx::query_scalar(
                "SELECT org_id FROM orgs WHERE project_id = $1 AND stripe_customer_id = $2 \
                 ORDER BY org_id LIMIT 1",
            )
            .bind(project.0)
            .bind(customer_id)
            .fetch_optional(&self.pool)
            .await?)
        })
        .await
    }

    async fn execute_org_requests(&self, requests: &[OrgRequest]) -> Result<OrgCommit, StoreError> {
        timed(Backend::Postgres, "execute_org_requests", async {
            let mut tx = self.pool.begin_with(BEGIN_CUSTOM_PLANS).await?;
            // Set-wise per project, projects in order: a few statements per
            // group, not per request, and every org locked in one global
            // (project, org) order, so no two nodes deadlock.
            let by_project = crate::requests_by_project(requests);
            let mut replies = HashMap::new();
            let mut states = HashMap::new();
            for (project, group) in &by_project {
                let keys: Vec<&str> = group
                    .iter()
                    .filter_map(|request| request.idempotency_key.as_deref())
                    .collect();
                if !keys.is_empty() {
                    let rows = sqlx::query(
                        "SELECT idempotency_key, fingerprint, reply FROM org_requests \
                         WHERE project_id = $1 AND idempotency_key = ANY($2)",
                    )
                    .bind(project.0)
                    .bind(&keys)
                    .fetch_all(&mut *tx)
                    .await?;
                    for row in rows {
                        let reply: Reply =
                            serde_json::from_value(row.try_get("reply")?).map_err(StoreError::internal)?;
                        replies.insert(
                            (*project, row.try_get("idempotency_key")?),
                            (row.try_get("fingerprint")?, reply),
                        );
                    }
                }
                let orgs = crate::orgs_as_of_first_request(group);
                for (org, state) in load_orgs_in(&mut tx, project.0, &orgs, true).await? {
                    states.insert((*project, org), state);
                }
            }
            let before = states.clone();
            let mut fresh = Vec::new();
            let results = run_org_requests(requests, &mut states, &mut replies, &mut fresh);
            let mut commit = OrgCommit { results, orgs: Vec::new(), outbox: false };
            for (project, group) in &by_project {
                let mut keys: Vec<(ProjectId, String)> =
                    states.keys().filter(|(p, _)| p == project).cloned().collect();
                keys.sort();
                let writes = keys
                    .iter()
                    .map(|key| (&before[key], states.remove(key).expect("listed above")))
                    .collect();
                let saved = save_orgs_in(&mut tx, project.0, writes).await?;
                // Changed or not, each is the latest committed state (the
                // orgs are locked): it refreshes caches either way.
                let latest: Vec<OrgState> = keys
                    .iter()
                    .zip(saved)
                    .map(|(key, saved)| saved.unwrap_or_else(|| before[key].clone()))
                    .collect();
                crate::growth::effects::org_group_effects(&mut *tx, *project, group, requests, &before, latest, &mut commit)
                    .await?;
            }
            commit.outbox |=
                crate::growth::effects::denied_consume_prompts(&mut *tx, requests, &commit.results, &commit.orgs).await?;
            if !fresh.is_empty() {
                let mut replies = Vec::with_capacity(fresh.len());
                for (_, _, _, reply, _) in &fresh {
                    replies.push(serde_json::to_value(reply).map_err(StoreError::internal)?);
                }
                sqlx::query(
                    "INSERT INTO org_requests (project_id, idempotency_key, fingerprint, reply, created_at) \
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])",
                )
                .bind(fresh.iter().map(|(project, ..)| project.0).collect::<Vec<_>>())
                .bind(fresh.iter().map(|(_, key, ..)| key.as_str()).collect::<Vec<_>>())
                .bind(fresh.iter().map(|(_, _, fingerprint, ..)| fingerprint.as_str()).collect::<Vec<_>>())
                .bind(replies)
                .bind(fresh.iter().map(|(.., at)| *at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(commit)
        })
        .await
    }

    async fn config_listener(&self) -> Result<Option<Box<dyn ConfigListener>>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([CONFIG_CHANNEL, ORG_CHANNEL, LIVE_CHANNEL])
            .await?;
        Ok(Some(Box::new(PgConfigListener { listener })))
    }
}

struct PgConfigListener {
    listener: PgListener,
}

#[async_trait]
impl ConfigListener for PgConfigListener {
    async fn next(&mut self) -> Result<ConfigSignal, StoreError> {
        // `try_recv` yields `None` when the connection dropped and was
        // re-established: notifications sent meanwhile are lost.
        match self.listener.try_recv().await? {
            None => Ok(ConfigSignal::Resync),
            Some(notification) if notification.channel() == LIVE_CHANNEL => {
                let seqs: Result<Vec<i64>, _> =
                    notification.payload().split(',').map(str::parse).collect();
                Ok(seqs.map(ConfigSignal::Live).unwrap_or(ConfigSignal::Resync))
            }
            Some(notification) if notification.channel() == ORG_CHANNEL => {
                Ok(parse_org_notification(notification.payload()).unwrap_or(ConfigSignal::Resync))
            }
            Some(notification) => match Uuid::from_str(notification.payload()) {
                Ok(id) => Ok(ConfigSignal::Project(ProjectId(id))),
                Err(_) => Ok(ConfigSignal::Resync),
            },
        }
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

fn parse_org_notification(payload: &str) -> Option<ConfigSignal> {
    let mut parts = payload.splitn(3, ' ');
    let project = Uuid::from_str(parts.next()?).ok()?;
    let version = parts.next()?.parse().ok()?;
    let org_id = parts.next()?.to_string();
    Some(ConfigSignal::OrgChanged {
        project: ProjectId(project),
        org_id,
        version,
    })
}

// ---- Billing: org state, usage, idempotent org requests ------------------

/// `BEGIN` and [`custom_plans`] in one round trip (a simple query).
const BEGIN_CUSTOM_PLANS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// Plans the rest of the transaction's statements for their parameters,
/// not once for all: a cached generic plan of `org_id = ANY($2)` or
/// `idempotency_key = ANY($2)`, chosen while a table was small and kept
/// until the next ANALYZE, scans every row of the project and filters
/// (measured: 10+ ms per group commit after 25,000 `org_requests`, and
/// growing). Run it first in every transaction that calls
/// [`load_orgs_in`] (or begin it with [`BEGIN_CUSTOM_PLANS`], which saves
/// the round trip); `SET LOCAL` ends with the transaction.
async fn custom_plans(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Loads the orgs' billing state in three statements (the org rows, their
/// current counters, their grants), whatever the number of orgs. Orgs
/// without a row start fresh, created at the time paired with them.
///
/// With `lock`, missing rows are created and every row is locked until the
/// transaction ends, by one `INSERT … ON CONFLICT DO UPDATE` that visits the
/// orgs in sorted order (it inserts a missing row, or locks the existing one
/// and returns its latest committed version): concurrent writers on every
/// node take their locks in one global order, as one statement per org did,
/// and never deadlock. Callers with several projects lock them in order too.
async fn load_orgs_in(
    conn: &mut PgConnection,
    project: Uuid,
    orgs: &[(String, DateTime<Utc>)],
    lock: bool,
) -> Result<HashMap<String, OrgState>, StoreError> {
    let mut sorted: Vec<&(String, DateTime<Utc>)> = orgs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let ids: Vec<&str> = sorted.iter().map(|(org, _)| org.as_str()).collect();
    let created: Vec<DateTime<Utc>> = sorted.iter().map(|(_, at)| *at).collect();
    let mut states: HashMap<String, OrgState> = sorted
        .iter()
        .map(|(org, at)| (org.clone(), OrgState::new(org.clone(), *at)))
        .collect();
    if ids.is_empty() {
        return Ok(states);
    }
    let sql = if lock {
        // `SET version = orgs.version` changes nothing: it is what makes the
        // conflict path lock the row (`DO NOTHING` would not).
        "INSERT INTO orgs (project_id, org_id, created_at, subscription, overrides, version) \
         SELECT $1, o.org_id, o.created_at, NULL, '{}', 0 \
         FROM UNNEST($2::text[], $3::timestamptz[]) WITH ORDINALITY AS o (org_id, created_at, n) \
         ORDER BY o.n \
         ON CONFLICT (project_id, org_id) DO UPDATE SET version = orgs.version \
         RETURNING org_id, created_at, subscription, overrides, stripe_customer_id, version"
    } else {
        "SELECT org_id, created_at, subscription, overrides, stripe_customer_id, version FROM orgs \
         WHERE project_id = $1 AND org_id = ANY($2)"
    };
    let query = sqlx::query(sql).bind(project).bind(&ids);
    let query = if lock { query.bind(&created) } else { query };
    let rows = query.fetch_all(&mut *conn).await?;
    for row in rows {
        let org: String = row.try_get("org_id")?;
        let Some(state) = states.get_mut(&org) else {
            continue;
        };
        state.created_at = row.try_get("created_at")?;
        let subscription: Option<serde_json::Value> = row.try_get("subscription")?;
        state.subscription = subscription
            .map(serde_json::from_value)
            .transpose()
            .map_err(StoreError::internal)?;
        state.overrides =
            serde_json::from_value(row.try_get("overrides")?).map_err(StoreError::internal)?;
        state.stripe_customer_id = row.try_get("stripe_customer_id")?;
        state.version = row.try_get("version")?;
    }
    let counters = sqlx::query(
        "SELECT DISTINCT ON (org_id, feature) org_id, feature, period_start, plan_used, grant_used \
         FROM usage_counters WHERE project_id = $1 AND org_id = ANY($2) \
         ORDER BY org_id, feature, period_start DESC",
    )
    .bind(project)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in counters {
        let org: String = row.try_get("org_id")?;
        let Some(state) = states.get_mut(&org) else {
            continue;
        };
        state.usage.insert(
            row.try_get("feature")?,
            UsageCounter {
                period_start: row.try_get("period_start")?,
                plan_used: row.try_get("plan_used")?,
                grant_used: row.try_get("grant_used")?,
            },
        );
    }
    let grants = sqlx::query(
        "SELECT org_id, grant_id, feature, amount, remaining, expires_at, created_at, reason \
         FROM usage_grants WHERE project_id = $1 AND org_id = ANY($2) \
         ORDER BY org_id, created_at, grant_id",
    )
    .bind(project)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in grants {
        let org: String = row.try_get("org_id")?;
        let Some(state) = states.get_mut(&org) else {
            continue;
        };
        state.grants.push(UsageGrant {
            id: row.try_get("grant_id")?,
            feature: row.try_get("feature")?,
            amount: row.try_get("amount")?,
            remaining: row.try_get("remaining")?,
            expires_at: row.try_get("expires_at")?,
            created_at: row.try_get("created_at")?,
            reason: row.try_get("reason")?,
        });
    }
    Ok(states)
}

/// Writes what changed between `before` and `after` (bumping the version)
/// and notifies other nodes. Returns the committed state when anything changed.
async fn save_org_in(
    conn: &mut PgConnection,
    project: Uuid,
    before: &OrgState,
    after: OrgState,
) -> Result<Option<OrgState>, StoreError> {
    let mut saved = save_orgs_in(conn, project, vec![(before, after)]).await?;
    Ok(saved.pop().flatten())
}

/// [`save_org_in`] for many orgs of one project, in five statements at most
/// (orgs, counters, grants, notifications), whatever their number. Returns,
/// in the order given, each org's committed state when anything changed.
async fn save_orgs_in(
    conn: &mut PgConnection,
    project: Uuid,
    writes: Vec<(&OrgState, OrgState)>,
) -> Result<Vec<Option<OrgState>>, StoreError> {
    let mut saved = Vec::with_capacity(writes.len());
    let mut changed = Vec::new();
    for (before, mut after) in writes {
        match plan_org_write(before, &mut after) {
            Some(write) => {
                changed.push((saved.len(), write));
                saved.push(Some(after));
            }
            None => saved.push(None),
        }
    }
    if changed.is_empty() {
        return Ok(saved);
    }
    let written = || {
        changed
            .iter()
            .map(|(at, _)| saved[*at].as_ref().expect("changed"))
    };
    let mut subscriptions = Vec::with_capacity(changed.len());
    let mut overrides = Vec::with_capacity(changed.len());
    for after in written() {
        subscriptions.push(
            after
                .subscription
                .as_ref()
                .map(serde_json::to_value)
                .transpose()
                .map_err(StoreError::internal)?,
        );
        overrides.push(serde_json::to_value(&after.overrides).map_err(StoreError::internal)?);
    }
    sqlx::query(
        "INSERT INTO orgs (project_id, org_id, created_at, subscription, overrides, stripe_customer_id, version) \
         SELECT $1, * FROM UNNEST($2::text[], $3::timestamptz[], $4::jsonb[], $5::jsonb[], $6::text[], $7::int8[]) \
         ON CONFLICT (project_id, org_id) DO UPDATE SET \
         subscription = excluded.subscription, overrides = excluded.overrides, \
         stripe_customer_id = excluded.stripe_customer_id, version = excluded.version",
    )
    .bind(project)
    .bind(written().map(|after| after.org_id.as_str()).collect::<Vec<_>>())
    .bind(written().map(|after| after.created_at).collect::<Vec<_>>())
    .bind(subscriptions)
    .bind(overrides)
    .bind(written().map(|after| after.stripe_customer_id.as_deref()).collect::<Vec<_>>())
    .bind(written().map(|after| after.version).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let counters: Vec<(&str, &String, &UsageCounter)> = changed
        .iter()
        .flat_map(|(at, write)| {
            let org = saved[*at].as_ref().expect("changed").org_id.as_str();
            write
                .counters
                .iter()
                .map(move |(feature, counter)| (org, feature, counter))
        })
        .collect();
    if !counters.is_empty() {
        sqlx::query(
            "INSERT INTO usage_counters (project_id, org_id, feature, period_start, plan_used, grant_used) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::timestamptz[], $5::int8[], $6::int8[]) \
             ON CONFLICT (project_id, org_id, feature, period_start) \
             DO UPDATE SET plan_used = excluded.plan_used, grant_used = excluded.grant_used",
        )
        .bind(project)
        .bind(counters.iter().map(|(org, ..)| *org).collect::<Vec<_>>())
        .bind(counters.iter().map(|(_, feature, _)| feature.as_str()).collect::<Vec<_>>())
        .bind(counters.iter().map(|(.., c)| c.period_start).collect::<Vec<_>>())
        .bind(counters.iter().map(|(.., c)| c.plan_used).collect::<Vec<_>>())
        .bind(counters.iter().map(|(.., c)| c.grant_used).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    let grants: Vec<(&str, &UsageGrant)> = changed
        .iter()
        .flat_map(|(at, write)| {
            let org = saved[*at].as_ref().expect("changed").org_id.as_str();
            write.grants.iter().map(move |grant| (org, grant))
        })
        .collect();
    if !grants.is_empty() {
        sqlx::query(
            "INSERT INTO usage_grants (project_id, org_id, grant_id, feature, amount, remaining, expires_at, created_at, reason) \
             SELECT $1, * FROM UNNEST($2::text[], $3::uuid[], $4::text[], $5::int8[], $6::int8[], \
             $7::timestamptz[], $8::timestamptz[], $9::text[]) \
             ON CONFLICT (project_id, org_id, grant_id) DO UPDATE SET remaining = excluded.remaining",
        )
        .bind(project)
        .bind(grants.iter().map(|(org, _)| *org).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.id).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.feature.as_str()).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.amount).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.remaining).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.expires_at).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.created_at).collect::<Vec<_>>())
        .bind(grants.iter().map(|(_, g)| g.reason.as_deref()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
        .bind(ORG_CHANNEL)
        .bind(
            written()
                .map(|after| format!("{project} {} {}", after.version, after.org_id))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await?;
    Ok(saved)
}

/// Applies the meters of a batch's new events, in the events' transaction.
async fn apply_meters(
    conn: &mut PgConnection,
    project: Uuid,
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
    let orgs: Vec<(String, DateTime<Utc>)> =
        inputs.iter().map(|(org, ..)| (org.clone(), now)).collect();
    let actors = crate::event_actors(events);
    custom_plans(conn).await?;
    let mut states = load_orgs_in(conn, project, &orgs, true).await?;
    let before = states.clone();
    let mut readings = Vec::with_capacity(inputs.len());
    for (org, meter, input) in inputs {
        let reading = match input {
            MeterInput::Reading(reading) => reading,
            MeterInput::Unique(value) => {
                let state = &states[&org];
                let period = state.period_for(&billing.catalog, &meter.feature, billing.grace, now);
                let inserted = sqlx::query(
                    "INSERT INTO meter_unique_values (project_id, org_id, meter, period_start, value) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(project)
                .bind(&org)
                .bind(&meter.key)
                .bind(period.start)
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
    let mut orgs: Vec<String> = states.keys().cloned().collect();
    orgs.sort();
    let writes = orgs
        .iter()
        .map(|org| (&before[org], states.remove(org).expect("listed above")))
        .collect();
    let saved: Vec<OrgState> = save_orgs_in(conn, project, writes)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let changes: Vec<(&OrgState, &OrgState)> = saved
        .iter()
        .map(|state| (&before[&state.org_id], state))
        .collect();
    let wrote = crate::growth::effects::billing_effects_by(
        conn,
        ProjectId(project),
        billing,
        &changes,
        &actors,
        now,
    )
    .await?;
    Ok((saved, wrote))
}

// What the shared SQL layer (`sql.rs`, `growth/`) needs from this
// backend.

#[async_trait]
impl SqlBackend for PgStore {
    const BACKEND: Backend = Backend::Postgres;

    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx::new(Transaction(self.pool.begin().await?)))
    }

    async fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Box::new(Pooled(self.pool.acquire().await?)))
    }
}

#[async_trait]
impl SqlConn for PgConnection {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn execute(&mut self, sql: Sql<'_>) -> Result<Done, sqlx::Error> {
        let done = bind_pg(&sql).execute(&mut *self).await?;
        Ok(Done::new(done.rows_affected()))
    }

    async fn fetch_all(&mut self, sql: Sql<'_>) -> Result<Vec<SqlRow>, sqlx::Error> {
        let rows = bind_pg(&sql).fetch_all(&mut *self).await?;
        Ok(rows.into_iter().map(SqlRow::Pg).collect())
    }

    async fn fetch_optional(&mut self, sql: Sql<'_>) -> Result<Option<SqlRow>, sqlx::Error> {
        let row = bind_pg(&sql).fetch_optional(&mut *self).await?;
        Ok(row.map(SqlRow::Pg))
    }
}

#[async_trait]
impl WriteConn for PgConnection {
    async fn load_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError> {
        custom_plans(self).await?;
        let mut states = load_orgs_in(self, project.0, &[(org_id.to_owned(), now)], true).await?;
        states.remove(org_id).ok_or(StoreError::NotFound)
    }

    async fn read_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError> {
        custom_plans(self).await?;
        let mut states = load_orgs_in(self, project.0, &[(org_id.to_owned(), now)], false).await?;
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
        Ok(save_org_in(self, project.0, before, after)
            .await?
            .unwrap_or_else(|| before.clone()))
    }

    /// Announces live messages to every node at commit.
    async fn notify_live(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        // NOTIFY payloads stop at 8,000 bytes: a few hundred numbers each.
        for chunk in seqs.chunks(400) {
            let payload = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(LIVE_CHANNEL)
                .bind(payload)
                .execute(&mut *self)
                .await?;
        }
        Ok(())
    }

    async fn record_change(
        &mut self,
        project: ProjectId,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        PgStore::record_change(self, project, kind, now).await
    }
}
