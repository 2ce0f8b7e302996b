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

/// Advances activation with a batch's new events, in their transaction:
/// loads each touched subject's counters, milestones, signup and (for org
/// rules on usage) metered usage; lets the domain's
/// [`flywheel_domain::activation::advance`] decide; writes the milestones
/// (each with a `milestone.reached` webhook, an `activated` referral event
/// for the activation rule, and the prompts it fires) and the counters.
/// Returns the derived events to number after the batch.
pub(crate) async fn apply_activation(
    conn: &mut Conn,
    project: ProjectId,
    rules: &flywheel_domain::activation::ActivationRules,
    fresh: &[(i64, &flywheel_domain::events::Event)],
    billing: Option<&crate::Billing>,
) -> Result<Vec<flywheel_domain::events::Event>, StoreError> {
    use flywheel_domain::activation::{advance, derived_events, measured_features, touches, Scope};
    let events: Vec<&flywheel_domain::events::Event> = fresh.iter().map(|(_, e)| *e).collect();
    let touches = touches(rules, &events);
    if touches.is_empty() {
        return Ok(Vec::new());
    }
    let now = events
        .iter()
        .map(|event| event.received_at)
        .max()
        .expect("touched");
    let features = measured_features(rules);
    let mut subjects = HashMap::new();
    for touch in &touches {
        let key = (touch.scope, touch.subject_id.to_owned());
        if let std::collections::hash_map::Entry::Vacant(slot) = subjects.entry(key) {
            let loaded = load_progress(
                &mut *conn,
                project,
                touch.scope,
                touch.subject_id,
                &features,
                billing,
                now,
            )
            .await?;
            slot.insert(loaded);
        }
    }
    let progress = advance(rules, &touches, &mut subjects);

    let mut derived = Vec::new();
    let mut messages = Vec::new();
    let mut triggers = Vec::new();
    for reached in &progress.reached {
        let milestone = &reached.milestone;
        query(
            "INSERT INTO milestones (project_id, rule, scope, subject_id, reached_at, signed_up_at, \
             seconds_to_value, event_id, event, count, activation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(arg_project(project))
        .bind(&milestone.rule)
        .bind(milestone.scope.as_str())
        .bind(&milestone.subject_id)
        .bind(arg_time(milestone.reached_at))
        .bind(arg_time(milestone.signed_up_at))
        .bind(milestone.seconds_to_value)
        .bind(milestone.event_id.to_string())
        .bind(&milestone.event)
        .bind(milestone.count)
        .bind(milestone.activation)
        .execute(&mut *conn)
        .await?;
        derived.extend(derived_events(project, milestone, reached.event));
        if milestone.activation && milestone.scope == Scope::User {
            let inviter: Option<Option<String>> = query_scalar(
                "SELECT invited_by_user_id FROM users WHERE project_id = $1 AND user_id = $2",
            )
            .bind(arg_project(project))
            .bind(&milestone.subject_id)
            .fetch_optional(&mut *conn)
            .await?;
            referral_event(
                &mut *conn,
                project,
                NewReferralEvent {
                    kind: ReferralEventKind::Activated,
                    actor_user_id: inviter.flatten(),
                    resource_type: "milestone".into(),
                    resource_id: milestone.rule.clone(),
                    via_id: None,
                    signup_user_id: Some(milestone.subject_id.clone()),
                    org_id: reached.event.org_id.clone(),
                },
                now,
            )
            .await?;
        }
        triggers.push(crate::PromptTrigger {
            fact: flywheel_domain::prompts::TriggerFact::Milestone {
                rule: milestone.rule.clone(),
            },
            user_id: reached.recipient.clone(),
            org_id: reached.event.org_id.clone(),
            org: None,
        });
        messages.push(OutboxMessage {
            event_type: "milestone.reached".into(),
            data: serde_json::to_value(milestone).map_err(StoreError::internal)?,
        });
    }
    for count in &progress.counts {
        query(
            "INSERT INTO activation_counts (project_id, scope, subject_id, event, count, first_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (project_id, scope, subject_id, event) DO UPDATE SET count = excluded.count",
        )
        .bind(arg_project(project))
        .bind(count.scope.as_str())
        .bind(&count.subject_id)
        .bind(&count.event)
        .bind(count.count)
        .bind(arg_time(count.first_at))
        .execute(&mut *conn)
        .await?;
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    if let Some(billing) = billing {
        raise_prompts(&mut *conn, project, billing, &triggers, now).await?;
    }
    Ok(derived)
}

/// A subject's stored progress: counters, milestones reached, signup, and
/// for an org the usage of the features org rules measure.
async fn load_progress(
    conn: &mut Conn,
    project: ProjectId,
    scope: flywheel_domain::activation::Scope,
    id: &str,
    features: &std::collections::BTreeSet<&str>,
    billing: Option<&crate::Billing>,
    now: DateTime<Utc>,
) -> Result<flywheel_domain::activation::SubjectProgress, StoreError> {
    use flywheel_domain::activation::{Scope, SubjectProgress};
    let mut progress = SubjectProgress::default();
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
        progress.counts.insert(
            row.try_get::<String, _>("event")?,
            (
                row.try_get::<i64, _>("count")?,
                read_time(&row, "first_at")?,
            ),
        );
    }
    let reached: Vec<String> = query_scalar(
        "SELECT rule FROM milestones WHERE project_id = $1 AND scope = $2 AND subject_id = $3",
    )
    .bind(arg_project(project))
    .bind(scope.as_str())
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    progress.reached = reached.into_iter().collect();
    let signup_sql = match scope {
        Scope::User => "SELECT created_at FROM users WHERE project_id = $1 AND user_id = $2",
        Scope::Org => "SELECT created_at FROM org_profiles WHERE project_id = $1 AND org_id = $2",
    };
    progress.signed_up_at = query(signup_sql)
        .bind(arg_project(project))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| read_time(&row, "created_at"))
        .transpose()?;
    if let (Scope::Org, Some(billing), false) = (scope, billing, features.is_empty()) {
        // The batch's meters were applied just before: this is the usage
        // after it. A plain read: orgs the meters changed are already
        // locked by this transaction, and locking others here, out of the
        // global order, could deadlock with an org writer.
        let state = conn.read_org(project, id, now).await?;
        // An org Flywheel did not provision counts from its billing row's
        // creation.
        progress.signed_up_at = progress.signed_up_at.or(Some(state.created_at));
        for feature in features {
            let used = state
                .check(&billing.catalog, feature, 0, billing.grace, now)
                .metered
                .map_or(0, |metered| metered.used);
            progress.usage.insert((*feature).to_owned(), used);
        }
    }
    Ok(progress)
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
