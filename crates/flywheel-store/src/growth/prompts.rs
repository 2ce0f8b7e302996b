//! Prompt rules, prompts and the live messages that carry them.

use super::*;
use crate::growth::activation::*;
use crate::growth::common::*;
use crate::growth::outbound::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::project::ProjectId;

/// Prompt rules, prompts and the live messages that carry them.
#[async_trait::async_trait]
pub trait PromptStore: Send + Sync {
    /// Stores a new version of the project's prompt rules (validated by the
    /// caller) and records the configuration change. Returns the version.
    async fn put_prompt_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, crate::StoreError>;
    /// The current prompt rules and their version (`None`: never written).
    async fn prompt_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, crate::StoreError>;
    /// A user's pending prompts at `now` (not clicked, dismissed or
    /// expired), highest priority first, then newest.
    async fn pending_prompts(
        &self,
        project: ProjectId,
        user_id: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<flywheel_domain::prompts::Prompt>, crate::StoreError>;
    async fn get_prompt(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<flywheel_domain::prompts::Prompt>, crate::StoreError>;
    /// Records what the product did with a prompt of `user_id` without an
    /// event: for a project that requires analytics consent, when the
    /// request had none. The prompt still changes (a dismissed prompt stops
    /// showing; a click is still credited) but no analytics event is
    /// stored. The first time of each action counts.
    async fn record_prompt_action(
        &self,
        project: ProjectId,
        prompt_id: &str,
        user_id: &str,
        action: flywheel_domain::prompts::PromptAction,
        at: DateTime<Utc>,
    ) -> Result<(), crate::StoreError>;
    /// Counts per rule and variant.
    async fn prompt_stats(&self, project: ProjectId)
        -> Result<Vec<PromptStats>, crate::StoreError>;
    /// The highest live-message sequence number (0: none).
    async fn latest_live_seq(&self) -> Result<i64, crate::StoreError>;
    /// Live messages of every project after `after_seq`, in order (at most
    /// `limit`).
    async fn live_messages_after(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
    /// These live messages (the numbers a NOTIFY announced), in order.
    async fn live_messages_by_seq(
        &self,
        seqs: &[i64],
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
    /// Deletes live messages older than `older_than` (past the resume
    /// window). Returns how many.
    async fn prune_live(&self, older_than: DateTime<Utc>) -> Result<u64, crate::StoreError>;
    /// What a stream of `user_id` (following `orgs`) missed after
    /// `after_seq`, in order; on PostgreSQL also the messages numbered at or
    /// below it that committed in the last `late_commits` (numbers can
    /// commit out of order there), which the client may see twice.
    async fn live_messages_for(
        &self,
        project: ProjectId,
        user_id: &str,
        orgs: &[String],
        after_seq: i64,
        late_since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
}

/// Writes live messages for users' open streams, in the
/// transaction of what they report; other nodes learn their
/// numbers by NOTIFY (PostgreSQL), this node by the outbox wake-up.
pub(crate) async fn publish_live(
    conn: &mut Conn,
    project: ProjectId,
    messages: &[LiveMessage],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut seqs = Vec::with_capacity(messages.len());
    for message in messages {
        let seq: i64 = query_scalar(
            "INSERT INTO live_messages (project_id, user_id, org_id, kind, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
        )
        .bind(arg_project(project))
        .bind(&message.user_id)
        .bind(&message.org_id)
        .bind(&message.kind)
        .bind(arg_json(&message.payload))
        .bind(arg_time(now))
        .fetch_one(&mut *conn)
        .await?;
        seqs.push(seq);
    }
    conn.notify_live(&seqs).await
}

pub(crate) fn live_from(row: &Row) -> Result<LiveRecord, StoreError> {
    Ok(LiveRecord {
        seq: row.try_get("seq")?,
        project: read_project(row, "project_id")?,
        message: LiveMessage {
            user_id: row.try_get("user_id")?,
            org_id: row.try_get("org_id")?,
            kind: row.try_get("kind")?,
            payload: read_json(row, "payload")?,
        },
        created_at: read_time(row, "created_at")?,
    })
}

pub(crate) const LIVE_COLUMNS: &str = "seq, project_id, user_id, org_id, kind, payload, created_at";

pub(crate) const PROMPT_COLUMNS: &str =
    "id, body, shown_at, clicked_at, dismissed_at, converted_at, converted_plan";

pub(crate) fn prompt_from(
    row: &Row,
    now: DateTime<Utc>,
) -> Result<flywheel_domain::prompts::Prompt, StoreError> {
    let mut prompt: flywheel_domain::prompts::Prompt =
        serde_json::from_value(read_json(row, "body")?).map_err(StoreError::internal)?;
    prompt.shown_at = read_opt_time(row, "shown_at")?;
    prompt.clicked_at = read_opt_time(row, "clicked_at")?;
    prompt.dismissed_at = read_opt_time(row, "dismissed_at")?;
    prompt.converted_at = read_opt_time(row, "converted_at")?;
    prompt.converted_plan = row.try_get("converted_plan")?;
    prompt.status = prompt.status_at(now);
    Ok(prompt)
}

/// Creates the prompts that `triggers` fire, in their transaction: loads
/// what the rule needs (each trigger's org state and recipient, when each
/// matching rule last prompted the recipient), lets
/// [`flywheel_domain::prompts::raise`] decide, and writes each prompt with
/// its `prompt.created` webhook and a live message to its user's streams.
/// Returns whether anything was written.
pub(crate) async fn raise_prompts(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    triggers: &[crate::PromptTrigger<'_>],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    use flywheel_domain::prompts::{frequency_lookups, raise, LoadedTrigger, PromptSetting};
    if billing.prompts.is_empty() {
        return Ok(false);
    }
    // Load: only for triggers some rule matches.
    let mut read_states: Vec<Option<OrgState>> = Vec::with_capacity(triggers.len());
    let mut recipients = Vec::with_capacity(triggers.len());
    for trigger in triggers {
        let matched = !billing.prompts.matching(&trigger.fact).is_empty();
        read_states.push(match (matched, trigger.org, &trigger.org_id) {
            (true, None, Some(org_id)) => Some(conn.read_org(project, org_id, now).await?),
            _ => None,
        });
        recipients.push(match (matched, &trigger.user_id, &trigger.org_id) {
            (false, _, _) => None,
            (true, Some(user), _) => Some(user.clone()),
            (true, None, Some(org_id)) => org_owner(&mut *conn, project, org_id).await?,
            (true, None, None) => None,
        });
    }
    let loaded: Vec<LoadedTrigger<'_>> = triggers
        .iter()
        .zip(&read_states)
        .zip(recipients)
        .map(|((trigger, read), recipient)| LoadedTrigger {
            fact: trigger.fact.clone(),
            recipient,
            org_id: trigger.org_id.clone(),
            org: trigger.org.or(read.as_ref()),
        })
        .collect();
    let mut last_prompted = HashMap::new();
    for (rule, user) in frequency_lookups(&billing.prompts, &loaded) {
        if let Some(at) = last_prompt(&mut *conn, project, &rule, &user).await? {
            last_prompted.insert((rule, user), at);
        }
    }
    // Plan.
    let setting = PromptSetting {
        rules: &billing.prompts,
        catalog: &billing.catalog,
        grace: billing.grace,
        flags: &billing.flags,
    };
    let mut new_id = || format!("prm_{}", uuid::Uuid::now_v7().simple());
    let raised = raise(setting, &loaded, &last_prompted, now, &mut new_id);
    for reason in &raised.skipped {
        metrics::counter!("flywheel_prompts_skipped_total", "reason" => reason.as_str())
            .increment(1);
    }
    // Write.
    let mut messages = Vec::with_capacity(raised.prompts.len());
    let mut live = Vec::with_capacity(raised.prompts.len());
    for prompt in &raised.prompts {
        let body = serde_json::to_value(prompt).map_err(StoreError::internal)?;
        query(
            "INSERT INTO prompts (id, project_id, rule, user_id, org_id, variant, priority, body, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&prompt.id)
        .bind(arg_project(project))
        .bind(&prompt.rule)
        .bind(&prompt.user_id)
        .bind(&prompt.org_id)
        .bind(&prompt.variant)
        .bind(prompt.priority)
        .bind(arg_json(&body))
        .bind(arg_time(prompt.created_at))
        .bind(arg_time(prompt.expires_at))
        .execute(&mut *conn)
        .await?;
        metrics::counter!("flywheel_prompts_created_total").increment(1);
        messages.push(OutboxMessage {
            event_type: "prompt.created".into(),
            data: body.clone(),
        });
        live.push(LiveMessage {
            user_id: Some(prompt.user_id.clone()),
            org_id: None,
            kind: "prompt".into(),
            payload: body,
        });
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    publish_live(&mut *conn, project, &live, now).await?;
    Ok(!messages.is_empty())
}

/// The user who owns an org (signed up creating it), if known.
async fn org_owner(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    org_id: &str,
) -> Result<Option<String>, StoreError> {
    let owner: Option<Option<String>> = query_scalar(
        "SELECT owner_user_id FROM org_profiles WHERE project_id = $1 AND org_id = $2",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .fetch_optional(conn)
    .await?;
    Ok(owner.flatten())
}

/// When `rule` last prompted `user`.
async fn last_prompt(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    rule: &str,
    user: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row = query(
        "SELECT created_at FROM prompts WHERE project_id = $1 AND rule = $2 AND user_id = $3 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(arg_project(project))
    .bind(rule)
    .bind(user)
    .fetch_optional(conn)
    .await?;
    row.map(|row| read_time(&row, "created_at")).transpose()
}

/// Records `$prompt_shown`/`$prompt_clicked`/`$prompt_dismissed`
/// events on their prompts (`properties.prompt_id`), in the
/// events' transaction: the first time of each counts. Only the
/// prompt's own user can act on it.
pub(crate) async fn apply_prompt_actions(
    conn: &mut Conn,
    project: ProjectId,
    fresh: &[(i64, &flywheel_domain::events::Event)],
) -> Result<(), StoreError> {
    use flywheel_domain::prompts::PromptAction;
    for (_, event) in fresh {
        let Some(action) = PromptAction::from_event_name(&event.event) else {
            continue;
        };
        let (Some(prompt_id), Some(user)) = (
            event.properties.get("prompt_id").and_then(|id| id.as_str()),
            event.user_id.as_deref(),
        ) else {
            continue;
        };
        set_prompt_action(conn, project, prompt_id, user, action, event.timestamp).await?;
    }
    Ok(())
}

/// Marks `action` on a prompt of `user` at `at`, unless it is
/// marked already.
pub(crate) async fn set_prompt_action(
    conn: &mut Conn,
    project: ProjectId,
    prompt_id: &str,
    user: &str,
    action: flywheel_domain::prompts::PromptAction,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    use flywheel_domain::prompts::PromptAction;
    let column = match action {
        PromptAction::Shown => "shown_at",
        PromptAction::Clicked => "clicked_at",
        PromptAction::Dismissed => "dismissed_at",
    };
    query(format!(
        "UPDATE prompts SET {column} = $1 WHERE project_id = $2 AND id = $3 AND user_id = $4 \
         AND {column} IS NULL"
    ))
    .bind(arg_time(at))
    .bind(arg_project(project))
    .bind(prompt_id)
    .bind(user)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl<S: SqlBackend> PromptStore for S {
    async fn put_prompt_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        put_versioned(
            self,
            "prompt_rule_versions",
            "prompt_rules",
            project,
            document,
            actor,
            now,
        )
        .await
    }

    async fn prompt_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        latest_versioned(&mut *self.reader().await?, "prompt_rule_versions", project).await
    }

    async fn pending_prompts(
        &self,
        project: ProjectId,
        user_id: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<flywheel_domain::prompts::Prompt>, StoreError> {
        let rows = query(format!(
            "SELECT {PROMPT_COLUMNS} FROM prompts WHERE project_id = $1 AND user_id = $2 \
             AND clicked_at IS NULL AND dismissed_at IS NULL AND expires_at > $3 \
             ORDER BY priority DESC, created_at DESC, id DESC LIMIT $4"
        ))
        .bind(arg_project(project))
        .bind(user_id)
        .bind(arg_time(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter().map(|row| prompt_from(row, now)).collect()
    }

    async fn get_prompt(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<flywheel_domain::prompts::Prompt>, StoreError> {
        let row = query(format!(
            "SELECT {PROMPT_COLUMNS} FROM prompts WHERE project_id = $1 AND id = $2"
        ))
        .bind(arg_project(project))
        .bind(id)
        .fetch_optional(&mut *self.reader().await?)
        .await?;
        row.as_ref().map(|row| prompt_from(row, now)).transpose()
    }

    async fn record_prompt_action(
        &self,
        project: ProjectId,
        prompt_id: &str,
        user_id: &str,
        action: flywheel_domain::prompts::PromptAction,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        set_prompt_action(&mut *tx, project, prompt_id, user_id, action, at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prompt_stats(&self, project: ProjectId) -> Result<Vec<PromptStats>, StoreError> {
        let rows = query(
            "SELECT rule, variant, COUNT(*) AS created, COUNT(shown_at) AS shown, \
             COUNT(clicked_at) AS clicked, COUNT(dismissed_at) AS dismissed, \
             COUNT(converted_at) AS converted FROM prompts WHERE project_id = $1 \
             GROUP BY rule, variant ORDER BY rule, variant",
        )
        .bind(arg_project(project))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PromptStats {
                    rule: row.try_get("rule")?,
                    variant: row.try_get("variant")?,
                    created: row.try_get("created")?,
                    shown: row.try_get("shown")?,
                    clicked: row.try_get("clicked")?,
                    dismissed: row.try_get("dismissed")?,
                    converted: row.try_get("converted")?,
                })
            })
            .collect()
    }

    async fn latest_live_seq(&self) -> Result<i64, StoreError> {
        let latest: Option<i64> = query_scalar("SELECT MAX(seq) FROM live_messages")
            .fetch_one(&mut *self.reader().await?)
            .await?;
        Ok(latest.unwrap_or(0))
    }

    async fn live_messages_after(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, StoreError> {
        let rows = query(format!(
            "SELECT {LIVE_COLUMNS} FROM live_messages WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter().map(live_from).collect()
    }

    async fn live_messages_by_seq(&self, seqs: &[i64]) -> Result<Vec<LiveRecord>, StoreError> {
        let (Some(low), Some(high)) = (seqs.iter().min(), seqs.iter().max()) else {
            return Ok(Vec::new());
        };
        // One commit's numbers are close together: a range, filtered.
        let wanted: std::collections::HashSet<i64> = seqs.iter().copied().collect();
        let rows = query(format!(
            "SELECT {LIVE_COLUMNS} FROM live_messages WHERE seq >= $1 AND seq <= $2 ORDER BY seq"
        ))
        .bind(*low)
        .bind(*high)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        let mut records = Vec::with_capacity(seqs.len());
        for row in &rows {
            let record = live_from(row)?;
            if wanted.contains(&record.seq) {
                records.push(record);
            }
        }
        Ok(records)
    }

    async fn prune_live(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let deleted = query("DELETE FROM live_messages WHERE created_at < $1")
            .bind(arg_time(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    async fn live_messages_for(
        &self,
        project: ProjectId,
        user_id: &str,
        orgs: &[String],
        after_seq: i64,
        late_since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, StoreError> {
        let org_list = (0..orgs.len())
            .map(|i| format!("${}", i + 6))
            .collect::<Vec<_>>()
            .join(", ");
        let audience = if orgs.is_empty() {
            "user_id = $2".to_owned()
        } else {
            format!("(user_id = $2 OR org_id IN ({org_list}))")
        };
        // Where numbers can commit out of order, messages numbered
        // below the cursor that committed lately may be new.
        let late = if Self::BACKEND.late_commits() {
            " OR (seq <= $3 AND created_at >= $4)"
        } else {
            " OR $4 IS NULL"
        };
        let sql = format!(
            "SELECT {LIVE_COLUMNS} FROM live_messages WHERE project_id = $1 AND {audience} \
             AND (seq > $3{late}) ORDER BY seq LIMIT $5"
        );
        let mut query = query(&sql)
            .bind(arg_project(project))
            .bind(user_id)
            .bind(after_seq)
            .bind(arg_time(late_since))
            .bind(i64::from(limit));
        for org in orgs {
            query = query.bind(org);
        }
        let rows = query.fetch_all(&mut *self.reader().await?).await?;
        rows.iter().map(live_from).collect()
    }
}
