//! Activation rules and the milestones they record.

use super::*;
use crate::growth::common::*;
use crate::growth::effects::*;
use crate::growth::outbound::*;
use crate::growth::prompts::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::growth::model::{NewReferralEvent, ReferralEventKind};
use flywheel_domain::project::ProjectId;

/// Activation rules and the milestones they record.
#[async_trait::async_trait]
pub trait ActivationStore: Send + Sync {
    /// Schedules a delivery again now, whatever its state.
    /// Stores a new version of the project's activation rules (validated
    /// by the caller) and records the configuration change. Returns the
    /// version.
    async fn put_activation_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, crate::StoreError>;
    /// The current rules document and its version (`None`: never written).
    async fn activation_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, crate::StoreError>;
    /// A user's or an org's milestones, oldest first.
    async fn milestones(
        &self,
        project: ProjectId,
        scope: flywheel_domain::activation::Scope,
        subject_id: &str,
    ) -> Result<Vec<flywheel_domain::activation::Milestone>, crate::StoreError>;
}

/// Stores the next version of a project's rules document in
/// `table` (append-only: activation or prompt rules) and records
/// the configuration change `change`. Returns the version.
pub(crate) async fn put_versioned(
    store: &impl SqlBackend,
    table: &'static str,
    change: &'static str,
    project: ProjectId,
    document: &serde_json::Value,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let mut tx = store.begin().await?;
    let latest: Option<i64> = query_scalar(format!(
        "SELECT MAX(version) FROM {table} WHERE project_id = $1"
    ))
    .bind(arg_project(project))
    .fetch_one(&mut *tx)
    .await?;
    let version = latest.unwrap_or(0) + 1;
    query(format!(
        "INSERT INTO {table} (project_id, version, document, actor, created_at) VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind(arg_project(project))
    .bind(version)
    .bind(arg_json(document))
    .bind(actor)
    .bind(arg_time(now))
    .execute(&mut *tx)
    .await
    .map_err(|e| StoreError::from_sqlx(e, change))?;
    tx.record_change(project, change, now).await?;
    tx.commit().await?;
    Ok(version)
}

/// The newest version of a project's rules document in `table`.
pub(crate) async fn latest_versioned(
    conn: &mut dyn SqlConn,
    table: &'static str,
    project: ProjectId,
) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
    let row = query(format!(
        "SELECT version, document FROM {table} WHERE project_id = $1 ORDER BY version DESC LIMIT 1"
    ))
    .bind(arg_project(project))
    .fetch_optional(conn)
    .await?;
    match row {
        Some(row) => Ok(Some((
            row.try_get("version")?,
            read_json(&row, "document")?,
        ))),
        None => Ok(None),
    }
}

/// Follows the project's activation rules over a batch's new
/// events, in their transaction: counts the events rules name
/// per user and org, and the first event that brings a subject
/// to a rule (inside its window) records the milestone, a
/// `milestone.reached` webhook and, for the activation
/// definition and a user, the `activated` referral event.
/// Returns the derived events to append after the batch. A
/// milestone's primary key makes it first-time-only; retried
/// events are duplicates and never reach here.
pub(crate) async fn apply_activation(
    conn: &mut Conn,
    project: ProjectId,
    rules: &flywheel_domain::activation::ActivationRules,
    fresh: &[(i64, &flywheel_domain::events::Event)],
    billing: Option<&crate::Billing>,
) -> Result<Vec<flywheel_domain::events::Event>, StoreError> {
    use flywheel_domain::activation::{derived_events, Measure, Milestone, Scope};
    use flywheel_domain::events::EventType;
    use std::collections::{BTreeSet, HashMap, HashSet};

    struct Subject {
        counts: HashMap<String, (i64, DateTime<Utc>)>,
        dirty: BTreeSet<String>,
        reached: HashSet<String>,
        signed_up_at: Option<DateTime<Utc>>,
        usage: HashMap<String, i64>,
    }
    let counted = rules.counted_events();
    let has_scope = |scope: Scope| rules.rules.iter().any(|rule| rule.scope == scope);
    let org_features: BTreeSet<&str> = rules
        .rules
        .iter()
        .filter(|rule| rule.scope == Scope::Org)
        .flat_map(|rule| &rule.conditions)
        .filter_map(|condition| match &condition.measure {
            Measure::Feature(name) => Some(name.as_str()),
            Measure::Event(_) => None,
        })
        .collect();
    let (users, orgs) = (has_scope(Scope::User), has_scope(Scope::Org));
    let mut touches: Vec<(usize, Scope, &str)> = Vec::new();
    for (i, (_, event)) in fresh.iter().enumerate() {
        if event.kind != EventType::Track {
            continue;
        }
        let named = counted.contains(event.event.as_str());
        if let (true, true, Some(user)) = (named, users, &event.user_id) {
            touches.push((i, Scope::User, user));
        }
        if let (true, Some(org)) = (named || !org_features.is_empty(), &event.org_id) {
            if orgs {
                touches.push((i, Scope::Org, org));
            }
        }
    }
    if touches.is_empty() {
        return Ok(Vec::new());
    }
    let now = fresh
        .iter()
        .map(|(_, event)| event.received_at)
        .max()
        .expect("touched");
    let mut subjects: HashMap<(Scope, &str), Subject> = HashMap::new();
    for &(_, scope, id) in &touches {
        if subjects.contains_key(&(scope, id)) {
            continue;
        }
        let mut counts = HashMap::new();
        for row in query(
            "SELECT event, count, first_at FROM activation_counts \
             WHERE project_id = $1 AND scope = $2 AND subject_id = $3",
        )
        .bind(arg_project(project))
        .bind(scope.as_str())
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        {
            counts.insert(
                row.try_get::<String, _>("event")?,
                (
                    row.try_get::<i64, _>("count")?,
                    read_time(&row, "first_at")?,
                ),
            );
        }
        let mut reached = HashSet::new();
        for row in query(
            "SELECT rule FROM milestones WHERE project_id = $1 AND scope = $2 AND subject_id = $3",
        )
        .bind(arg_project(project))
        .bind(scope.as_str())
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        {
            reached.insert(row.try_get::<String, _>("rule")?);
        }
        let signup_sql = match scope {
            Scope::User => "SELECT created_at FROM users WHERE project_id = $1 AND user_id = $2",
            Scope::Org => {
                "SELECT created_at FROM org_profiles WHERE project_id = $1 AND org_id = $2"
            }
        };
        let signed_up_at = match query(signup_sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
        {
            Some(row) => Some(read_time(&row, "created_at")?),
            None => None,
        };
        let mut signed_up_at = signed_up_at;
        let mut usage = HashMap::new();
        if let (Scope::Org, Some(billing), false) = (scope, billing, org_features.is_empty()) {
            // The batch's meters were applied just before: this is
            // the usage after it. A plain read: orgs the meters
            // changed are already locked by this transaction, and
            // locking others here, out of the global order, could
            // deadlock with an org writer.
            let state = conn.read_org(project, id, now).await?;
            // An org Flywheel did not provision counts from its
            // billing row's creation.
            signed_up_at = signed_up_at.or(Some(state.created_at));
            for feature in &org_features {
                let used = state
                    .check(&billing.catalog, feature, 0, billing.grace, now)
                    .metered
                    .map_or(0, |metered| metered.used);
                usage.insert((*feature).to_owned(), used);
            }
        }
        subjects.insert(
            (scope, id),
            Subject {
                counts,
                dirty: BTreeSet::new(),
                reached,
                signed_up_at,
                usage,
            },
        );
    }

    let mut derived = Vec::new();
    let mut messages = Vec::new();
    let mut triggers = Vec::new();
    for &(i, scope, id) in &touches {
        let (_, event) = fresh[i];
        let subject = subjects.get_mut(&(scope, id)).expect("loaded above");
        if counted.contains(event.event.as_str()) {
            let entry = subject
                .counts
                .entry(event.event.clone())
                .or_insert((0, event.timestamp));
            entry.0 += 1;
            subject.dirty.insert(event.event.clone());
        }
        // A subject Flywheel did not sign up is measured from its
        // first counted event.
        let signed_up_at = subject.signed_up_at.unwrap_or_else(|| {
            subject
                .counts
                .values()
                .map(|(_, first)| *first)
                .min()
                .unwrap_or(event.timestamp)
        });
        for rule in rules.rules.iter().filter(|rule| rule.scope == scope) {
            if subject.reached.contains(&rule.key) {
                continue;
            }
            let value_of = |measure: &Measure| match measure {
                Measure::Event(name) => subject.counts.get(name).map_or(0, |(count, _)| *count),
                Measure::Feature(name) => subject.usage.get(name).copied().unwrap_or(0),
            };
            if !rule.is_reached(value_of) || !rule.is_within_window(signed_up_at, event.timestamp) {
                continue;
            }
            let milestone = Milestone {
                rule: rule.key.clone(),
                scope,
                subject_id: id.to_owned(),
                reached_at: event.timestamp,
                signed_up_at,
                seconds_to_value: event
                    .timestamp
                    .signed_duration_since(signed_up_at)
                    .num_seconds()
                    .max(0),
                event_id: event.event_id,
                event: event.event.clone(),
                count: subject
                    .counts
                    .get(&event.event)
                    .map_or(0, |(count, _)| *count),
                activation: rule.activation,
            };
            query(
                "INSERT INTO milestones (project_id, rule, scope, subject_id, reached_at, signed_up_at, \
                 seconds_to_value, event_id, event, count, activation) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(arg_project(project))
            .bind(&milestone.rule)
            .bind(scope.as_str())
            .bind(id)
            .bind(arg_time(milestone.reached_at))
            .bind(arg_time(milestone.signed_up_at))
            .bind(milestone.seconds_to_value)
            .bind(milestone.event_id.to_string())
            .bind(&milestone.event)
            .bind(milestone.count)
            .bind(milestone.activation)
            .execute(&mut *conn)
            .await?;
            subject.reached.insert(rule.key.clone());
            derived.extend(derived_events(project, &milestone, event));
            if milestone.activation && scope == Scope::User {
                let inviter: Option<String> = match query(
                    "SELECT invited_by_user_id FROM users WHERE project_id = $1 AND user_id = $2",
                )
                .bind(arg_project(project))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
                {
                    Some(row) => row.try_get("invited_by_user_id")?,
                    None => None,
                };
                referral_event(
                    &mut *conn,
                    project,
                    NewReferralEvent {
                        kind: ReferralEventKind::Activated,
                        actor_user_id: inviter,
                        resource_type: "milestone".into(),
                        resource_id: milestone.rule.clone(),
                        via_id: None,
                        signup_user_id: Some(id.to_owned()),
                        org_id: event.org_id.clone(),
                    },
                    now,
                )
                .await?;
            }
            triggers.push(crate::PromptTrigger {
                fact: flywheel_domain::prompts::TriggerFact::Milestone {
                    rule: milestone.rule.clone(),
                },
                user_id: match scope {
                    Scope::User => Some(id.to_owned()),
                    Scope::Org => event.user_id.clone(),
                },
                org_id: event.org_id.clone(),
                org: None,
            });
            messages.push(OutboxMessage {
                event_type: "milestone.reached".into(),
                data: serde_json::to_value(&milestone).map_err(StoreError::internal)?,
            });
        }
    }
    for ((scope, id), subject) in &subjects {
        for name in &subject.dirty {
            let (count, first_at) = subject.counts[name];
            query(
                "INSERT INTO activation_counts (project_id, scope, subject_id, event, count, first_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (project_id, scope, subject_id, event) DO UPDATE SET count = excluded.count",
            )
            .bind(arg_project(project))
            .bind(scope.as_str())
            .bind(*id)
            .bind(name)
            .bind(count)
            .bind(arg_time(first_at))
            .execute(&mut *conn)
            .await?;
        }
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    if let Some(billing) = billing {
        raise_prompts(&mut *conn, project, billing, &triggers, now).await?;
    }
    Ok(derived)
}

#[async_trait::async_trait]
impl<S: SqlBackend> ActivationStore for S {
    async fn put_activation_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        put_versioned(
            self,
            "activation_rule_versions",
            "activation_rules",
            project,
            document,
            actor,
            now,
        )
        .await
    }

    async fn activation_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        latest_versioned(
            &mut *self.reader().await?,
            "activation_rule_versions",
            project,
        )
        .await
    }

    async fn milestones(
        &self,
        project: ProjectId,
        scope: flywheel_domain::activation::Scope,
        subject_id: &str,
    ) -> Result<Vec<flywheel_domain::activation::Milestone>, StoreError> {
        let rows = query(
            "SELECT rule, reached_at, signed_up_at, seconds_to_value, event_id, event, count, activation \
             FROM milestones WHERE project_id = $1 AND scope = $2 AND subject_id = $3 \
             ORDER BY reached_at, rule",
        )
        .bind(arg_project(project))
        .bind(scope.as_str())
        .bind(subject_id)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(flywheel_domain::activation::Milestone {
                    rule: row.try_get("rule")?,
                    scope,
                    subject_id: subject_id.to_owned(),
                    reached_at: read_time(row, "reached_at")?,
                    signed_up_at: read_time(row, "signed_up_at")?,
                    seconds_to_value: row.try_get("seconds_to_value")?,
                    event_id: row
                        .try_get::<String, _>("event_id")?
                        .parse()
                        .map_err(StoreError::internal)?,
                    event: row.try_get("event")?,
                    count: row.try_get("count")?,
                    activation: row.try_get("activation")?,
                })
            })
            .collect()
    }
}
