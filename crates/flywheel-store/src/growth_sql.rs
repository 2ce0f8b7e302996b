//! The one implementation of [`crate::growth::GrowthStore`], for both
//! backends: its SQL is valid on SQLite and PostgreSQL alike, run through the
//! shared layer of [`crate::sql`]; what differs is the [`crate::Backend`]'s
//! lock suffixes and the backend's [`crate::sql::WriteConn`].

use super::*;
use crate::growth::*;
use crate::sql::*;
use flywheel_domain::billing::answer::Reply;
use flywheel_domain::billing::catalog::FeatureKind;
use flywheel_domain::billing::org::OrgCommand;
use flywheel_domain::growth::model::{
    attribute, pick_click, AcquisitionSource, Attribution, Invitation, InvitationStatus,
    InviteLink, NewReferralEvent, ReferralClick, ReferralClue, ReferralEvent, ReferralEventKind,
    RefusedClue, ShareAudience, ShareLink, SharePermission, SignupClues,
};
use flywheel_domain::{DomainError, ErrorKind};
use std::sync::Arc;

type Conn = dyn WriteConn;

fn rules<T>(error: DomainError) -> Result<Ruled<T>, StoreError> {
    Ok(Err(error))
}

fn parse_enum<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(StoreError::internal)
}

fn user_from(row: &Row) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        email_verified: row.try_get("email_verified")?,
        name: row.try_get("name")?,
        attribution: serde_json::from_value(read_json(row, "attribution")?)
            .map_err(StoreError::internal)?,
        referral_code: row.try_get("referral_code")?,
        created_at: read_time(row, "created_at")?,
    })
}

const USER_COLUMNS: &str =
    "user_id, email, email_verified, name, attribution, referral_code, created_at";

fn membership_from(row: &Row) -> Result<MembershipRecord, StoreError> {
    Ok(MembershipRecord {
        org_id: row.try_get("org_id")?,
        user_id: row.try_get("user_id")?,
        role: row.try_get("role")?,
        joined_via: row.try_get("joined_via")?,
        created_at: read_time(row, "created_at")?,
    })
}

fn profile_from(row: &Row) -> Result<OrgProfile, StoreError> {
    Ok(OrgProfile {
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        owner_user_id: row.try_get("owner_user_id")?,
        template_version: row.try_get("template_version")?,
        created_at: read_time(row, "created_at")?,
    })
}

const INVITATION_COLUMNS: &str = "id, org_id, email, role, inviter_user_id, token_prefix, status, \
     created_at, expires_at, sends, accepted_by_user_id, responded_at";

fn invitation_from(row: &Row) -> Result<Invitation, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Invitation {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        email: row.try_get("email")?,
        role: row.try_get("role")?,
        inviter_user_id: row.try_get("inviter_user_id")?,
        token_prefix: row.try_get("token_prefix")?,
        status: InvitationStatus::parse(&status).ok_or_else(|| {
            StoreError::internal(sqlx::Error::Protocol(format!(
                "unknown invitation status {status}"
            )))
        })?,
        created_at: read_time(row, "created_at")?,
        expires_at: read_time(row, "expires_at")?,
        sends: row.try_get("sends")?,
        accepted_by_user_id: row.try_get("accepted_by_user_id")?,
        responded_at: read_opt_time(row, "responded_at")?,
    })
}

const LINK_COLUMNS: &str = "id, org_id, role, created_by_user_id, token_prefix, created_at, \
     expires_at, max_uses, uses, revoked_at";

fn invite_link_from(row: &Row) -> Result<InviteLink, StoreError> {
    Ok(InviteLink {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        role: row.try_get("role")?,
        created_by_user_id: row.try_get("created_by_user_id")?,
        token_prefix: row.try_get("token_prefix")?,
        created_at: read_time(row, "created_at")?,
        expires_at: read_opt_time(row, "expires_at")?,
        max_uses: row.try_get("max_uses")?,
        uses: row.try_get("uses")?,
        revoked_at: read_opt_time(row, "revoked_at")?,
    })
}

const SHARE_COLUMNS: &str = "id, resource_type, resource_id, org_id, created_by_user_id, \
     permission, audience, allow_list, expires_at, password_hash, token_prefix, created_at, \
     revoked_at, accesses, unique_guests, first_access_at, last_access_at";

fn share_link_from(row: &Row) -> Result<ShareLinkSecret, StoreError> {
    let permission: String = row.try_get("permission")?;
    let audience: String = row.try_get("audience")?;
    let password_hash: Option<String> = row.try_get("password_hash")?;
    Ok(ShareLinkSecret {
        link: ShareLink {
            id: row.try_get("id")?,
            resource_type: row.try_get("resource_type")?,
            resource_id: row.try_get("resource_id")?,
            org_id: row.try_get("org_id")?,
            created_by_user_id: row.try_get("created_by_user_id")?,
            permission: parse_enum::<SharePermission>(&permission)?,
            audience: parse_enum::<ShareAudience>(&audience)?,
            allow_list: serde_json::from_value(read_json(row, "allow_list")?)
                .map_err(StoreError::internal)?,
            expires_at: read_opt_time(row, "expires_at")?,
            password_protected: password_hash.is_some(),
            token_prefix: row.try_get("token_prefix")?,
            created_at: read_time(row, "created_at")?,
            revoked_at: read_opt_time(row, "revoked_at")?,
            accesses: row.try_get("accesses")?,
            unique_guests: row.try_get("unique_guests")?,
            first_access_at: read_opt_time(row, "first_access_at")?,
            last_access_at: read_opt_time(row, "last_access_at")?,
        },
        password_hash,
    })
}

fn endpoint_from(row: &Row) -> Result<WebhookEndpoint, StoreError> {
    Ok(WebhookEndpoint {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        event_types: serde_json::from_value(read_json(row, "event_types")?)
            .map_err(StoreError::internal)?,
        description: row.try_get("description")?,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: read_opt_time(row, "failing_since")?,
        created_at: read_time(row, "created_at")?,
    })
}

const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.endpoint_id, o.event_type, d.status, \
     d.attempts, d.next_attempt_at, d.last_attempt_at, d.last_status_code, d.last_error, d.created_at";

fn delivery_from(row: &Row) -> Result<DeliveryRecord, StoreError> {
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        endpoint_id: row.try_get("endpoint_id")?,
        event_type: row.try_get("event_type")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: read_time(row, "next_attempt_at")?,
        last_attempt_at: read_opt_time(row, "last_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: read_time(row, "created_at")?,
    })
}

/// Writes messages to the outbox with one pending delivery per
/// enabled endpoint that wants the type.
pub(crate) async fn enqueue(
    conn: &mut Conn,
    project: ProjectId,
    messages: &[OutboxMessage],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let rows = query(
        "SELECT id, url, secret, event_types, description, enabled, disabled_reason, \
         failing_since, created_at FROM webhook_endpoints WHERE project_id = $1 AND enabled = $2",
    )
    .bind(arg_project(project))
    .bind(true)
    .fetch_all(&mut *conn)
    .await?;
    let endpoints = rows
        .iter()
        .map(endpoint_from)
        .collect::<Result<Vec<_>, _>>()?;
    for message in messages {
        let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        let payload = serde_json::json!({
            "type": message.event_type,
            "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": message.data,
        });
        query(
            "INSERT INTO outbox (id, project_id, event_type, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(arg_project(project))
        .bind(&message.event_type)
        .bind(arg_json(&payload))
        .bind(arg_time(now))
        .execute(&mut *conn)
        .await?;
        for endpoint in endpoints.iter().filter(|e| e.wants(&message.event_type)) {
            query(
                "INSERT INTO webhook_deliveries (id, project_id, message_id, endpoint_id, status, \
                 attempts, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
            )
            .bind(format!("dlv_{}", uuid::Uuid::now_v7().simple()))
            .bind(arg_project(project))
            .bind(&id)
            .bind(&endpoint.id)
            .bind(arg_time(now))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// What billing writes imply beyond the org rows, in their
/// transaction: their webhooks (`subscription.changed`,
/// `usage.warning`, `usage.limit_reached`) and the same as live
/// `entitlements` messages to the org's streams; the prompts they
/// fire (for the org's owner); an upgrade credited to a clicked
/// prompt; and, the first time an org leaves the default plan, a
/// `converted` referral event for its owner (actor: whoever
/// brought the owner).
pub(crate) async fn billing_effects(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    changes: &[(&OrgState, &OrgState)],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    billing_effects_by(
        conn,
        project,
        billing,
        changes,
        &std::collections::HashMap::new(),
        now,
    )
    .await
}

/// [`billing_effects`], with the user who moved each org
/// (`actors`, by org id) as the recipient of the prompts fired.
pub(crate) async fn billing_effects_by(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    changes: &[(&OrgState, &OrgState)],
    actors: &std::collections::HashMap<String, String>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    use flywheel_domain::billing::notice::{billing_notices, BillingNotice};
    use flywheel_domain::billing::org::SubscriptionStatus;
    use flywheel_domain::prompts::TriggerFact;
    let mut messages = Vec::new();
    let mut live = Vec::new();
    let mut triggers = Vec::new();
    for (before, after) in changes {
        if before.version == after.version {
            continue;
        }
        let org_id = after.org_id.clone();
        let mut upgraded_to: Option<String> = None;
        let trigger = |fact: TriggerFact| crate::PromptTrigger {
            fact,
            user_id: actors.get(&org_id).cloned(),
            org_id: Some(org_id.clone()),
            org: Some(*after),
        };
        for notice in billing_notices(&billing.catalog, billing.grace, before, after, now) {
            match notice {
                BillingNotice::Webhook { event_type, data } => {
                    let feature = data
                        .get("feature")
                        .and_then(|f| f.as_str())
                        .map(str::to_owned);
                    match (event_type, feature) {
                        ("usage.warning", Some(feature)) => {
                            triggers.push(trigger(TriggerFact::UsageWarning { feature }))
                        }
                        ("usage.limit_reached", Some(feature)) => {
                            triggers.push(trigger(TriggerFact::LimitReached {
                                feature,
                                denied: false,
                            }))
                        }
                        ("subscription.changed", _)
                            if data.get("upgrade") == Some(&serde_json::Value::Bool(true)) =>
                        {
                            upgraded_to =
                                data.get("plan").and_then(|p| p.as_str()).map(str::to_owned);
                        }
                        _ => {}
                    }
                    let mut payload = serde_json::Map::new();
                    payload.insert("type".into(), event_type.into());
                    if let serde_json::Value::Object(fields) = &data {
                        payload.extend(fields.clone());
                    }
                    live.push(LiveMessage {
                        user_id: None,
                        org_id: Some(org_id.clone()),
                        kind: "entitlements".into(),
                        payload: payload.into(),
                    });
                    messages.push(OutboxMessage {
                        event_type: event_type.to_owned(),
                        data,
                    });
                }
                BillingNotice::Converted {
                    org_id, to_plan, ..
                } => {
                    record_conversion(&mut *conn, project, &org_id, &to_plan, now).await?;
                    // A first paid plan is credited even when the
                    // catalog's order does not call it an upgrade.
                    upgraded_to.get_or_insert(to_plan);
                }
            }
        }
        if let Some(plan) = upgraded_to {
            messages
                .extend(credit_prompt(&mut *conn, project, billing, &org_id, &plan, now).await?);
        }
        let status = |state: &OrgState| state.subscription.as_ref().map(|s| s.status);
        let (was, is) = (status(before), status(after));
        if is == Some(SubscriptionStatus::Trialing) && was != is {
            let ends_at = after.subscription.as_ref().and_then(|s| s.trial_ends_at);
            triggers.push(trigger(TriggerFact::TrialEnding { ends_at }));
        }
        if is == Some(SubscriptionStatus::PastDue) && was != is {
            let since = after
                .subscription
                .as_ref()
                .and_then(|s| s.past_due_since)
                .unwrap_or(now);
            triggers.push(trigger(TriggerFact::GraceEnding {
                ends_at: since + billing.grace,
            }));
        }
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    // The change first, then the prompts it fires.
    publish_live(&mut *conn, project, &live, now).await?;
    let prompted = raise_prompts(&mut *conn, project, billing, &triggers, now).await?;
    Ok(prompted || !messages.is_empty())
}

/// Stores the next version of a project's rules document in
/// `table` (append-only: activation or prompt rules) and records
/// the configuration change `change`. Returns the version.
async fn put_versioned(
    store: &impl SqlBackend,
    table: &'static str,
    change: &'static str,
    project: ProjectId,
    document: &serde_json::Value,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let mut tx = store.begin().await?;
    let latest: Option<i64> = query_scalar(&format!(
        "SELECT MAX(version) FROM {table} WHERE project_id = $1"
    ))
    .bind(arg_project(project))
    .fetch_one(&mut *tx)
    .await?;
    let version = latest.unwrap_or(0) + 1;
    query(&format!(
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
    let row = query(&format!(
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

fn live_from(row: &Row) -> Result<LiveRecord, StoreError> {
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

const LIVE_COLUMNS: &str = "seq, project_id, user_id, org_id, kind, payload, created_at";

const PROMPT_COLUMNS: &str =
    "id, body, shown_at, clicked_at, dismissed_at, converted_at, converted_plan";

fn prompt_from(
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

/// Creates the prompts that `triggers` fire, in their
/// transaction: for each matching rule (highest priority first)
/// and recipient, unless the rule's frequency cap holds or the
/// audience flag serves a variant without copy. Each prompt is
/// rendered now, stored, sent as a `prompt.created` webhook and
/// as a live message to its user's streams. Returns whether
/// anything was written.
pub(crate) async fn raise_prompts(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    triggers: &[crate::PromptTrigger<'_>],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    use flywheel_domain::prompts::{
        choose_content, deadline_variables, instantiate, plan_variables, usage_variables,
        TriggerFact,
    };
    if billing.prompts.is_empty() {
        return Ok(false);
    }
    let mut messages = Vec::new();
    let mut live = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for trigger in triggers {
        let rules = billing.prompts.matching(&trigger.fact);
        if rules.is_empty() {
            continue;
        }
        let owned_state;
        let state = match (trigger.org, &trigger.org_id) {
            (Some(state), _) => Some(state),
            (None, Some(org_id)) => {
                owned_state = conn.read_org(project, org_id, now).await?;
                Some(&owned_state)
            }
            (None, None) => None,
        };
        let user = match (&trigger.user_id, &trigger.org_id) {
            (Some(user), _) => Some(user.clone()),
            (None, Some(org_id)) => {
                let row = query(
                    "SELECT owner_user_id FROM org_profiles WHERE project_id = $1 AND org_id = $2",
                )
                .bind(arg_project(project))
                .bind(org_id)
                .fetch_optional(&mut *conn)
                .await?;
                match row {
                    Some(row) => row.try_get::<Option<String>, _>("owner_user_id")?,
                    None => None,
                }
            }
            (None, None) => None,
        };
        let Some(user) = user else {
            metrics::counter!("flywheel_prompts_skipped_total", "reason" => "no_recipient")
                .increment(1);
            continue;
        };
        for rule in rules {
            if !seen.insert((rule.key.clone(), user.clone())) {
                continue;
            }
            let last = query(
                "SELECT created_at FROM prompts WHERE project_id = $1 AND rule = $2 AND user_id = $3 \
                 ORDER BY created_at DESC LIMIT 1",
            )
            .bind(arg_project(project))
            .bind(&rule.key)
            .bind(&user)
            .fetch_optional(&mut *conn)
            .await?;
            let last = match last {
                Some(row) => Some(read_time(&row, "created_at")?),
                None => None,
            };
            if !rule.frequency.allows(last, now) {
                metrics::counter!("flywheel_prompts_skipped_total", "reason" => "frequency_cap")
                    .increment(1);
                continue;
            }
            let plan = state.and_then(|state| {
                state
                    .access(&billing.catalog, billing.grace, now)
                    .plan
                    .map(|(_, plan)| plan.key.clone())
            });
            let served: Option<String> = match &rule.audience {
                None => None,
                Some(audience) => {
                    let mut context = serde_json::Map::new();
                    context.insert("targetingKey".into(), user.clone().into());
                    context.insert("user_id".into(), user.clone().into());
                    if let Some(org) = &trigger.org_id {
                        context.insert("org_id".into(), org.clone().into());
                    }
                    if let Some(plan) = &plan {
                        context.insert("plan".into(), plan.clone().into());
                    }
                    billing
                        .flags
                        .evaluate(&audience.flag, &context, now.timestamp())
                        .variant
                        .map(str::to_owned)
                }
            };
            let Some((variant, content)) = choose_content(rule, served.as_deref()) else {
                metrics::counter!("flywheel_prompts_skipped_total", "reason" => "audience")
                    .increment(1);
                continue;
            };
            let mut variables = serde_json::Map::new();
            let feature = trigger.fact.feature().or(rule.trigger.feature());
            match (feature, state) {
                (Some(feature), Some(state)) => usage_variables(
                    &billing.catalog,
                    state,
                    feature,
                    billing.grace,
                    now,
                    &mut variables,
                ),
                _ => plan_variables(&billing.catalog, plan.as_deref(), &mut variables),
            }
            match &trigger.fact {
                TriggerFact::Milestone { rule } => {
                    variables.insert("milestone".into(), rule.clone().into());
                }
                TriggerFact::GraceEnding { ends_at }
                | TriggerFact::TrialEnding {
                    ends_at: Some(ends_at),
                } => deadline_variables(*ends_at, now, &mut variables),
                _ => {}
            }
            let prompt = instantiate(
                format!("prm_{}", uuid::Uuid::now_v7().simple()),
                rule,
                variant,
                content,
                &user,
                trigger.org_id.as_deref(),
                variables,
                now,
            );
            let body = serde_json::to_value(&prompt).map_err(StoreError::internal)?;
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
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    publish_live(&mut *conn, project, &live, now).await?;
    Ok(!messages.is_empty())
}

/// One project's part of a group commit, after its orgs are
/// saved: the billing effects of what changed (`group` are the
/// project's requests, `latest` each of its orgs' committed
/// state), and every org's latest state into `commit` for the
/// caches, changed or not (the transaction holds their locks).
pub(crate) async fn org_group_effects(
    conn: &mut Conn,
    project: ProjectId,
    group: &[&crate::OrgRequest],
    requests: &[crate::OrgRequest],
    before: &std::collections::HashMap<(ProjectId, String), OrgState>,
    latest: Vec<OrgState>,
    commit: &mut crate::OrgCommit,
) -> Result<(), StoreError> {
    let changes: Vec<(&OrgState, &OrgState)> = latest
        .iter()
        .map(|after| (&before[&(project, after.org_id.clone())], after))
        .collect();
    let now = group
        .iter()
        .map(|request| request.now)
        .max()
        .expect("a group is never empty");
    let actors = crate::request_actors(requests, project);
    commit.outbox |= billing_effects_by(
        &mut *conn,
        project,
        &group[0].billing,
        &changes,
        &actors,
        now,
    )
    .await?;
    commit
        .orgs
        .extend(latest.into_iter().map(|state| (project, Arc::new(state))));
    Ok(())
}

/// Fires `limit_reached` prompts for the `consume`s of a group
/// that were denied at a hard limit (nothing else changed, so
/// `billing_effects` saw nothing), for each one's acting user.
pub(crate) async fn denied_consume_prompts(
    conn: &mut Conn,
    requests: &[crate::OrgRequest],
    results: &[crate::OrgResult],
    states: &[(ProjectId, Arc<OrgState>)],
) -> Result<bool, StoreError> {
    let mut wrote = false;
    for (request, feature) in crate::denied_consumes(requests, results) {
        let state = states
            .iter()
            .find(|(project, state)| *project == request.project && state.org_id == request.org_id)
            .map(|(_, state)| state.as_ref());
        let trigger = crate::PromptTrigger {
            fact: flywheel_domain::prompts::TriggerFact::LimitReached {
                feature,
                denied: true,
            },
            user_id: request.actor_user_id.clone(),
            org_id: Some(request.org_id.clone()),
            org: state,
        };
        wrote |= raise_prompts(
            &mut *conn,
            request.project,
            &request.billing,
            &[trigger],
            request.now,
        )
        .await?;
    }
    Ok(wrote)
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
async fn set_prompt_action(
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
    query(&format!(
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

/// Credits an upgrade of `org_id` to `plan` to the org's most
/// recently clicked prompt within the attribution window (once
/// per prompt). Returns the `prompt.converted` webhook.
async fn credit_prompt(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    org_id: &str,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<Option<OutboxMessage>, StoreError> {
    // Without rules the default window still credits earlier clicks.
    let window = billing.prompts.attribution_window();
    let row = query(&format!(
        "SELECT {PROMPT_COLUMNS} FROM prompts WHERE project_id = $1 AND org_id = $2 \
         AND clicked_at IS NOT NULL AND clicked_at >= $3 AND converted_at IS NULL \
         ORDER BY clicked_at DESC LIMIT 1{}",
        conn.backend().lock()
    ))
    .bind(arg_project(project))
    .bind(org_id)
    .bind(arg_time(now - window))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut prompt = prompt_from(&row, now)?;
    query("UPDATE prompts SET converted_at = $1, converted_plan = $2 WHERE project_id = $3 AND id = $4")
        .bind(arg_time(now))
        .bind(plan)
        .bind(arg_project(project))
        .bind(&prompt.id)
        .execute(&mut *conn)
        .await?;
    prompt.converted_at = Some(now);
    prompt.converted_plan = Some(plan.to_owned());
    metrics::counter!("flywheel_prompt_conversions_total").increment(1);
    Ok(Some(OutboxMessage {
        event_type: "prompt.converted".into(),
        data: serde_json::json!({
            "prompt_id": prompt.id,
            "rule": prompt.rule,
            "variant": prompt.variant,
            "flag": prompt.flag,
            "user_id": prompt.user_id,
            "org_id": org_id,
            "plan": plan,
            "clicked_at": prompt.clicked_at,
            "converted_at": now,
        }),
    }))
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

async fn record_conversion(
    conn: &mut Conn,
    project: ProjectId,
    org_id: &str,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seen = query(
        "SELECT 1 AS seen FROM referral_events WHERE project_id = $1 AND kind = 'converted' AND org_id = $2",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?;
    if seen.is_some() {
        return Ok(());
    }
    let owner = query(
        "SELECT u.user_id, u.invited_by_user_id, u.attribution FROM org_profiles p \
         JOIN users u ON u.project_id = p.project_id AND u.user_id = p.owner_user_id \
         WHERE p.project_id = $1 AND p.org_id = $2",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?;
    // An org Flywheel did not provision has no owner to credit.
    let Some(owner) = owner else {
        return Ok(());
    };
    let attribution: Attribution =
        serde_json::from_value(read_json(&owner, "attribution")?).map_err(StoreError::internal)?;
    let via_id = attribution
        .invitation_id
        .clone()
        .or(attribution.invite_link_id.clone())
        .or(attribution.share_link_id.clone())
        .or(attribution.referral_click_id.clone());
    referral_event(
        &mut *conn,
        project,
        NewReferralEvent {
            kind: ReferralEventKind::Converted,
            actor_user_id: owner.try_get("invited_by_user_id")?,
            resource_type: "plan".into(),
            resource_id: plan.to_owned(),
            via_id,
            signup_user_id: Some(owner.try_get("user_id")?),
            org_id: Some(org_id.to_owned()),
        },
        now,
    )
    .await
}

async fn queue_email(
    conn: &mut Conn,
    project: ProjectId,
    email: &RenderedEmail,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO emails (id, project_id, kind, recipient, subject, text_body, html_body, \
         status, attempts, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8)",
    )
    .bind(format!("eml_{}", uuid::Uuid::now_v7().simple()))
    .bind(arg_project(project))
    .bind(&email.kind)
    .bind(&email.recipient)
    .bind(&email.subject)
    .bind(&email.text_body)
    .bind(&email.html_body)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn referral_event(
    conn: &mut Conn,
    project: ProjectId,
    event: NewReferralEvent,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO referral_events (project_id, kind, actor_user_id, resource_type, \
         resource_id, via_id, signup_user_id, org_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(arg_project(project))
    .bind(event.kind.as_str())
    .bind(&event.actor_user_id)
    .bind(&event.resource_type)
    .bind(&event.resource_id)
    .bind(&event.via_id)
    .bind(&event.signup_user_id)
    .bind(&event.org_id)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes one seat of the org when the catalog meters seats;
/// always loads (and so creates) the org's billing row. Returns
/// the org's state after.
async fn take_seat(
    conn: &mut Conn,
    project: ProjectId,
    org_id: &str,
    policy: &GrowthPolicy,
    now: DateTime<Utc>,
) -> Result<Ruled<OrgState>, StoreError> {
    let before = conn.load_org(project, org_id, now).await?;
    let catalog = &policy.billing.catalog;
    let metered = catalog
        .feature(&policy.seats_feature)
        .is_some_and(|(_, feature)| feature.kind == FeatureKind::Metered);
    if !metered {
        // Written when new, so the usage anchor is the signup.
        let saved = conn.save_org(project, &before, before.clone()).await?;
        return Ok(Ok(saved));
    }
    let mut after = before.clone();
    let command = OrgCommand::Consume {
        feature: policy.seats_feature.clone(),
        amount: 1,
    };
    match after.execute(catalog, &command, policy.billing.grace, now) {
        Ok(Reply::Usage(answer)) if !answer.allowed => rules(DomainError::new(
            ErrorKind::Forbidden,
            "seat_limit_reached",
            match answer.limit {
                Some(limit) => format!(
                    "the org uses {} of {limit} seats; upgrade or free a seat first",
                    answer.used.unwrap_or(limit)
                ),
                None => "the org's plan does not include seats".to_owned(),
            },
        )),
        Ok(_) => {
            let saved = conn.save_org(project, &before, after).await?;
            billing_effects(
                &mut *conn,
                project,
                &policy.billing,
                &[(&before, &saved)],
                now,
            )
            .await?;
            Ok(Ok(saved))
        }
        Err(error) => rules(error),
    }
}

fn plan_of(state: &OrgState, policy: &GrowthPolicy, now: DateTime<Utc>) -> Option<String> {
    state
        .access(&policy.billing.catalog, policy.billing.grace, now)
        .plan
        .map(|(_, plan)| plan.key.clone())
}

async fn user_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    user_id: &str,
) -> Result<Option<UserRecord>, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND user_id = $2");
    query(&sql)
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(user_from)
        .transpose()
}

async fn membership_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    org_id: &str,
    user_id: &str,
) -> Result<Option<MembershipRecord>, StoreError> {
    query(
        "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
         WHERE project_id = $1 AND org_id = $2 AND user_id = $3",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(membership_from)
    .transpose()
}

async fn insert_membership(
    conn: &mut Conn,
    project: ProjectId,
    membership: &MembershipRecord,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO memberships (project_id, org_id, user_id, role, joined_via, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(arg_project(project))
    .bind(&membership.org_id)
    .bind(&membership.user_id)
    .bind(&membership.role)
    .bind(&membership.joined_via)
    .bind(arg_time(membership.created_at))
    .execute(&mut *conn)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "membership"))?;
    Ok(())
}

async fn profile_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    org_id: &str,
) -> Result<Option<OrgProfile>, StoreError> {
    query(
        "SELECT org_id, name, owner_user_id, template_version, created_at FROM org_profiles \
         WHERE project_id = $1 AND org_id = $2",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(profile_from)
    .transpose()
}

async fn invitation_by_hash(
    conn: &mut Conn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<Invitation>, StoreError> {
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND token_hash = $2{}",
        conn.backend().lock()
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(invitation_from)
        .transpose()
}

async fn invite_link_by_hash(
    conn: &mut Conn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<InviteLink>, StoreError> {
    let sql = format!(
        "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND token_hash = $2{}",
        conn.backend().lock()
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(invite_link_from)
        .transpose()
}

async fn share_by_hash(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<ShareLinkSecret>, StoreError> {
    let sql = format!(
        "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND token_hash = $2"
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(share_link_from)
        .transpose()
}

fn click_from(row: &Row) -> Result<ReferralClick, StoreError> {
    Ok(ReferralClick {
        click_id: row.try_get("click_id")?,
        code: row.try_get("code")?,
        referrer_user_id: row.try_get("referrer_user_id")?,
        anonymous_id: row.try_get("anonymous_id")?,
        at: read_time(row, "created_at")?,
    })
}

/// Finds the referral a signup carries: an explicit click, else
/// the visitor's clicks (by anonymous id, per the click model),
/// else a bare code. Clicks outside the window are refused.
async fn resolve_referral(
    conn: &mut Conn,
    request: &SignupRequest,
    refused: &mut Vec<RefusedClue>,
) -> Result<Option<ReferralClue>, StoreError> {
    let project = request.project;
    let window = request.policy.referral_window_days;
    let mut clicks = Vec::new();
    if let Some(click_id) = &request.referral_click_id {
        let row = query(
            "SELECT click_id, code, referrer_user_id, anonymous_id, created_at FROM referral_clicks \
             WHERE project_id = $1 AND click_id = $2",
        )
        .bind(arg_project(project))
        .bind(click_id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => clicks.push(click_from(&row)?),
            None => refused.push(RefusedClue {
                source: AcquisitionSource::Referral,
                reason: "unknown_click".into(),
            }),
        }
    } else if let Some(anonymous_id) = &request.anonymous_id {
        let rows = query(
            "SELECT click_id, code, referrer_user_id, anonymous_id, created_at FROM referral_clicks \
             WHERE project_id = $1 AND anonymous_id = $2 ORDER BY created_at LIMIT 1000",
        )
        .bind(arg_project(project))
        .bind(anonymous_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            clicks.push(click_from(&row)?);
        }
    }
    let chosen = pick_click(&clicks, request.now, window, request.policy.click_model);
    if chosen.is_none() && !clicks.is_empty() {
        refused.push(RefusedClue {
            source: AcquisitionSource::Referral,
            reason: "attribution_window_passed".into(),
        });
    }
    let (code, click_id) = match (chosen, &request.referral_code) {
        (Some(click), _) => (click.code.clone(), Some(click.click_id.clone())),
        (None, Some(code)) => (code.clone(), None),
        (None, None) => return Ok(None),
    };
    let owner = query(
        "SELECT user_id, email_identity FROM users WHERE project_id = $1 AND referral_code = $2",
    )
    .bind(arg_project(project))
    .bind(&code)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(owner) = owner else {
        refused.push(RefusedClue {
            source: AcquisitionSource::Referral,
            reason: "unknown_referral_code".into(),
        });
        return Ok(None);
    };
    Ok(Some(ReferralClue {
        code,
        owner_user_id: owner.try_get("user_id")?,
        owner_email_identity: owner.try_get("email_identity")?,
        click_id,
    }))
}

async fn signup_in(
    conn: &mut Conn,
    request: &SignupRequest,
) -> Result<Ruled<GrowthCommit<SignupReply>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let stored = query(
        "SELECT fingerprint, reply FROM growth_requests WHERE project_id = $1 AND idempotency_key = $2",
    )
    .bind(arg_project(project))
    .bind(&request.idempotency_key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = stored {
        let fingerprint: String = row.try_get("fingerprint")?;
        if fingerprint != request.fingerprint {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "idempotency_key_reused",
                "this idempotency_key was used for a different signup",
            ));
        }
        let reply =
            serde_json::from_value(read_json(&row, "reply")?).map_err(StoreError::internal)?;
        return Ok(Ok(GrowthCommit {
            reply,
            orgs: Vec::new(),
        }));
    }
    if user_in(&mut *conn, project, &request.user_id)
        .await?
        .is_some()
    {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "user_exists",
            "a user with this user_id has signed up already",
        ));
    }
    let taken: Option<String> =
        query_scalar("SELECT user_id FROM users WHERE project_id = $1 AND email = $2")
            .bind(arg_project(project))
            .bind(&request.email)
            .fetch_optional(&mut *conn)
            .await?;
    if taken.is_some() {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "email_taken",
            "a user with this email address has signed up already",
        ));
    }

    let mut clues = SignupClues {
        utm: request.utm.clone(),
        referrer: request.referrer.clone(),
        ..SignupClues::default()
    };
    let mut refused = Vec::new();
    let mut email_verified = request.email_verified;
    // The org an invitation or link points to: (org, role, via, invitation, link).
    let mut joining: Option<(
        String,
        String,
        &'static str,
        Option<Invitation>,
        Option<InviteLink>,
    )> = None;
    if let Some(hash) = &request.invitation_token_hash {
        let invitation = match invitation_by_hash(&mut *conn, project, hash).await? {
            Some(invitation) if invitation.is_open(now) => invitation,
            _ => return rules(Invitation::not_found()),
        };
        if invitation.email != request.email {
            return rules(DomainError::new(
                ErrorKind::Forbidden,
                "invitation_email_mismatch",
                "the invitation was sent to a different email address",
            ));
        }
        // The token was sent to this mailbox: holding it proves the address.
        email_verified = true;
        clues.invitation = Some((invitation.id.clone(), invitation.inviter_user_id.clone()));
        joining = Some((
            invitation.org_id.clone(),
            invitation.role.clone(),
            "invite",
            Some(invitation),
            None,
        ));
    } else if let Some(hash) = &request.invite_link_token_hash {
        let link = match invite_link_by_hash(&mut *conn, project, hash).await? {
            Some(link) if link.status_at(now) == "active" => link,
            _ => return rules(InviteLink::not_found()),
        };
        clues.invite_link = Some((link.id.clone(), link.created_by_user_id.clone()));
        joining = Some((
            link.org_id.clone(),
            link.role.clone(),
            "invite_link",
            None,
            Some(link),
        ));
    }
    let mut share: Option<ShareLink> = None;
    if let Some(hash) = &request.share_token_hash {
        match share_by_hash(&mut *conn, project, hash).await? {
            Some(found) if found.link.status_at(now) == "active" => {
                clues.share_link =
                    Some((found.link.id.clone(), found.link.created_by_user_id.clone()));
                share = Some(found.link);
            }
            _ => refused.push(RefusedClue {
                source: AcquisitionSource::Share,
                reason: "share_link_not_found".into(),
            }),
        }
    }
    clues.referral = resolve_referral(&mut *conn, request, &mut refused).await?;
    let mut attribution = attribute(&request.user_id, &request.email_identity, clues);
    attribution.refused.extend(refused);

    let (org_id, role, via, invitation, link) = joining.unwrap_or_else(|| {
        (
            request.new_org_id.clone(),
            "owner".to_owned(),
            "signup",
            None,
            None,
        )
    });
    let org_created = invitation.is_none() && link.is_none();
    let mut template: Option<(i64, serde_json::Value)> = None;
    if org_created {
        if profile_in(&mut *conn, project, &org_id).await?.is_some() {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "org_exists",
                "an org with this org_id exists already",
            ));
        }
        let row = query(
            "SELECT version, document FROM org_templates WHERE project_id = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(arg_project(project))
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            template = Some((row.try_get("version")?, read_json(&row, "document")?));
        }
        query(
            "INSERT INTO org_profiles (project_id, org_id, name, owner_user_id, template_version, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(arg_project(project))
        .bind(&org_id)
        .bind(&request.org_name)
        .bind(&request.user_id)
        .bind(template.as_ref().map(|(version, _)| *version))
        .bind(arg_time(now))
        .execute(&mut *conn)
        .await?;
    }
    let org_state = match take_seat(&mut *conn, project, &org_id, &request.policy, now).await? {
        Ok(state) => state,
        Err(error) => return rules(error),
    };
    let referral_code = Some(request.new_referral_code.clone());
    let user = UserRecord {
        user_id: request.user_id.clone(),
        email: request.email.clone(),
        email_verified,
        name: request.name.clone(),
        attribution: attribution.clone(),
        referral_code,
        created_at: now,
    };
    let attribution_json = serde_json::to_value(&attribution).map_err(StoreError::internal)?;
    query(
        "INSERT INTO users (project_id, user_id, email, email_identity, email_verified, name, \
         acquisition_source, invited_by_user_id, attribution, referral_code, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(arg_project(project))
    .bind(&user.user_id)
    .bind(&user.email)
    .bind(&request.email_identity)
    .bind(user.email_verified)
    .bind(&user.name)
    .bind(attribution.acquisition_source.as_str())
    .bind(&attribution.invited_by_user_id)
    .bind(arg_json(&attribution_json))
    .bind(&user.referral_code)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "user"))?;
    let membership = MembershipRecord {
        org_id: org_id.clone(),
        user_id: user.user_id.clone(),
        role,
        joined_via: via.to_owned(),
        created_at: now,
    };
    insert_membership(&mut *conn, project, &membership).await?;
    if let Some(invitation) = &invitation {
        mark_invitation_accepted(&mut *conn, project, &invitation.id, &user.user_id, now).await?;
    }
    if let Some(link) = &link {
        if !use_invite_link(&mut *conn, project, &link.id, now).await? {
            return rules(InviteLink::not_found());
        }
    }

    // The history: what brought the user, and the signup itself.
    let (resource_type, resource_id, via_id) = if let Some(invitation) = &invitation {
        (
            "org".to_owned(),
            org_id.clone(),
            Some(invitation.id.clone()),
        )
    } else if let Some(link) = &link {
        ("org".to_owned(), org_id.clone(), Some(link.id.clone()))
    } else if let Some(share) = &share {
        (
            share.resource_type.clone(),
            share.resource_id.clone(),
            Some(share.id.clone()),
        )
    } else if let Some(code) = &attribution.referral_code {
        (
            "referral_code".to_owned(),
            code.clone(),
            attribution.referral_click_id.clone(),
        )
    } else {
        ("org".to_owned(), org_id.clone(), None)
    };
    if let Some(invitation) = &invitation {
        referral_event(
            &mut *conn,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Accepted,
                actor_user_id: Some(invitation.inviter_user_id.clone()),
                resource_type: "org".into(),
                resource_id: org_id.clone(),
                via_id: Some(invitation.id.clone()),
                signup_user_id: Some(user.user_id.clone()),
                org_id: Some(org_id.clone()),
            },
            now,
        )
        .await?;
    }
    referral_event(
        &mut *conn,
        project,
        NewReferralEvent {
            kind: ReferralEventKind::SignedUp,
            actor_user_id: attribution.invited_by_user_id.clone(),
            resource_type,
            resource_id,
            via_id,
            signup_user_id: Some(user.user_id.clone()),
            org_id: Some(org_id.clone()),
        },
        now,
    )
    .await?;

    let org = match profile_in(&mut *conn, project, &org_id).await? {
        Some(profile) => profile,
        None => OrgProfile {
            org_id: org_id.clone(),
            name: None,
            owner_user_id: None,
            template_version: None,
            created_at: org_state.created_at,
        },
    };
    let plan = plan_of(&org_state, &request.policy, now);
    let mut messages = vec![OutboxMessage {
        event_type: "user.signed_up".into(),
        data: serde_json::json!({
            "user": &user,
            "org_id": &org_id,
            "org_created": org_created,
        }),
    }];
    if org_created {
        messages.push(OutboxMessage {
            event_type: "org.provisioned".into(),
            data: serde_json::json!({
                "org": &org,
                "owner_user_id": &user.user_id,
                "plan": &plan,
                "template_version": template.as_ref().map(|(v, _)| *v),
                "template": template.as_ref().map(|(_, document)| document),
            }),
        });
    }
    messages.push(OutboxMessage {
        event_type: "membership.created".into(),
        data: serde_json::to_value(&membership).map_err(StoreError::internal)?,
    });
    if let Some(invitation) = &invitation {
        messages.push(OutboxMessage {
            event_type: "invitation.accepted".into(),
            data: serde_json::json!({
                "invitation_id": &invitation.id,
                "org_id": &org_id,
                "user_id": &user.user_id,
                "inviter_user_id": &invitation.inviter_user_id,
            }),
        });
    }
    enqueue(&mut *conn, project, &messages, now).await?;

    let reply = SignupReply {
        user,
        org,
        membership,
        org_created,
        plan,
    };
    query(
        "INSERT INTO growth_requests (project_id, idempotency_key, fingerprint, reply, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(arg_project(project))
    .bind(&request.idempotency_key)
    .bind(&request.fingerprint)
    .bind(arg_json(&serde_json::to_value(&reply).map_err(StoreError::internal)?))
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(Ok(GrowthCommit {
        reply,
        orgs: vec![Arc::new(org_state)],
    }))
}

async fn mark_invitation_accepted(
    conn: &mut Conn,
    project: ProjectId,
    id: &str,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let done = query(
        "UPDATE invitations SET status = 'accepted', accepted_by_user_id = $3, responded_at = $4 \
         WHERE project_id = $1 AND id = $2 AND status = 'pending'",
    )
    .bind(arg_project(project))
    .bind(id)
    .bind(user_id)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        // The row was locked and checked pending above.
        return Err(StoreError::Conflict("invitation"));
    }
    Ok(())
}

/// Counts one use of an invite link if it is still usable.
async fn use_invite_link(
    conn: &mut Conn,
    project: ProjectId,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let done = query(
        "UPDATE invite_links SET uses = uses + 1 WHERE project_id = $1 AND id = $2 \
         AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3) \
         AND (max_uses IS NULL OR uses < max_uses)",
    )
    .bind(arg_project(project))
    .bind(id)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Accept or join as an existing user: the shared tail.
async fn join_as_user(
    conn: &mut Conn,
    request: &JoinRequest,
    org_id: &str,
    role: &str,
    via: &'static str,
    inviter: &str,
    via_id: &str,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let state = match take_seat(&mut *conn, project, org_id, &request.policy, now).await? {
        Ok(state) => state,
        Err(error) => return rules(error),
    };
    let membership = MembershipRecord {
        org_id: org_id.to_owned(),
        user_id: request.user_id.clone(),
        role: role.to_owned(),
        joined_via: via.to_owned(),
        created_at: now,
    };
    insert_membership(&mut *conn, project, &membership).await?;
    referral_event(
        &mut *conn,
        project,
        NewReferralEvent {
            kind: ReferralEventKind::Accepted,
            actor_user_id: Some(inviter.to_owned()),
            resource_type: "org".into(),
            resource_id: org_id.to_owned(),
            via_id: Some(via_id.to_owned()),
            signup_user_id: None,
            org_id: Some(org_id.to_owned()),
        },
        now,
    )
    .await?;
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "membership.created".into(),
            data: serde_json::to_value(&membership).map_err(StoreError::internal)?,
        }],
        now,
    )
    .await?;
    Ok(Ok(GrowthCommit {
        reply: membership,
        orgs: vec![Arc::new(state)],
    }))
}

fn user_not_found() -> DomainError {
    DomainError::not_found("user_not_found", "no user with this user_id has signed up")
}

async fn accept_in(
    conn: &mut Conn,
    request: &JoinRequest,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let Some(invitation) = invitation_by_hash(&mut *conn, project, &request.token_hash).await?
    else {
        return rules(Invitation::not_found());
    };
    let Some(user) = user_in(&mut *conn, project, &request.user_id).await? else {
        return rules(user_not_found());
    };
    // A retried accept by the same user answers as the first did.
    if invitation.status == InvitationStatus::Accepted
        && invitation.accepted_by_user_id.as_deref() == Some(user.user_id.as_str())
    {
        if let Some(membership) =
            membership_in(&mut *conn, project, &invitation.org_id, &user.user_id).await?
        {
            return Ok(Ok(GrowthCommit {
                reply: membership,
                orgs: Vec::new(),
            }));
        }
    }
    if !invitation.is_open(now) {
        return rules(Invitation::not_found());
    }
    if let Err(error) = invitation.check_recipient(&user.email, user.email_verified) {
        return rules(error);
    }
    mark_invitation_accepted(&mut *conn, project, &invitation.id, &user.user_id, now).await?;
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "invitation.accepted".into(),
            data: serde_json::json!({
                "invitation_id": &invitation.id,
                "org_id": &invitation.org_id,
                "user_id": &user.user_id,
                "inviter_user_id": &invitation.inviter_user_id,
            }),
        }],
        now,
    )
    .await?;
    if let Some(membership) =
        membership_in(&mut *conn, project, &invitation.org_id, &user.user_id).await?
    {
        return Ok(Ok(GrowthCommit {
            reply: membership,
            orgs: Vec::new(),
        }));
    }
    join_as_user(
        &mut *conn,
        request,
        &invitation.org_id,
        &invitation.role,
        "invite",
        &invitation.inviter_user_id,
        &invitation.id,
    )
    .await
}

async fn join_link_in(
    conn: &mut Conn,
    request: &JoinRequest,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let link = match invite_link_by_hash(&mut *conn, project, &request.token_hash).await? {
        Some(link) if link.status_at(now) == "active" => link,
        _ => return rules(InviteLink::not_found()),
    };
    if user_in(&mut *conn, project, &request.user_id)
        .await?
        .is_none()
    {
        return rules(user_not_found());
    }
    if let Some(membership) =
        membership_in(&mut *conn, project, &link.org_id, &request.user_id).await?
    {
        return Ok(Ok(GrowthCommit {
            reply: membership,
            orgs: Vec::new(),
        }));
    }
    if !use_invite_link(&mut *conn, project, &link.id, now).await? {
        return rules(InviteLink::not_found());
    }
    join_as_user(
        &mut *conn,
        request,
        &link.org_id,
        &link.role,
        "invite_link",
        &link.created_by_user_id,
        &link.id,
    )
    .await
}

async fn create_invitations_in(
    conn: &mut Conn,
    batch: &InvitationBatch,
) -> Result<Ruled<Vec<InvitationOutcome>>, StoreError> {
    let project = batch.project;
    let now = batch.now;
    if membership_in(&mut *conn, project, &batch.org_id, &batch.inviter_user_id)
        .await?
        .is_none()
    {
        return rules(DomainError::new(
            ErrorKind::Forbidden,
            "inviter_not_member",
            "the inviter must be a member of the org",
        ));
    }
    // Lock the org so concurrent batches count each other.
    conn.load_org(project, &batch.org_id, now).await?;
    let mut outcomes = Vec::with_capacity(batch.invitations.len());
    let mut fresh = Vec::new();
    for new in &batch.invitations {
        let member: Option<String> = query_scalar(
            "SELECT m.user_id FROM memberships m JOIN users u ON u.project_id = m.project_id \
             AND u.user_id = m.user_id WHERE m.project_id = $1 AND m.org_id = $2 AND u.email = $3",
        )
        .bind(arg_project(project))
        .bind(&batch.org_id)
        .bind(&new.email)
        .fetch_optional(&mut *conn)
        .await?;
        if member.is_some() {
            outcomes.push(Some(InvitationOutcome::AlreadyMember));
            continue;
        }
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 \
             AND email = $3 AND status = 'pending' AND expires_at > $4"
        );
        let pending = query(&sql)
            .bind(arg_project(project))
            .bind(&batch.org_id)
            .bind(&new.email)
            .bind(arg_time(now))
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = pending {
            outcomes.push(Some(InvitationOutcome::AlreadyPending(invitation_from(
                &row,
            )?)));
            continue;
        }
        // Decided below, once the rate limits pass.
        fresh.push(outcomes.len());
        outcomes.push(None);
    }
    let count = fresh.len() as i64;
    if count > 0 {
        let hour_ago = now - chrono::Duration::hours(1);
        let recent: i64 = query_scalar(
            "SELECT COUNT(*) FROM invitations WHERE project_id = $1 AND org_id = $2 AND created_at > $3",
        )
        .bind(arg_project(project))
        .bind(&batch.org_id)
        .bind(arg_time(hour_ago))
        .fetch_one(&mut *conn)
        .await?;
        if recent + count > batch.policy.per_org_per_hour {
            return rules(flywheel_domain::growth::model::rate_limited(
                "invitation_rate_limited",
                format!(
                    "an org may send at most {} invitations per hour",
                    batch.policy.per_org_per_hour
                ),
            ));
        }
        let pending: i64 = query_scalar(
            "SELECT COUNT(*) FROM invitations WHERE project_id = $1 AND inviter_user_id = $2 \
             AND status = 'pending' AND expires_at > $3",
        )
        .bind(arg_project(project))
        .bind(&batch.inviter_user_id)
        .bind(arg_time(now))
        .fetch_one(&mut *conn)
        .await?;
        if pending + count > batch.policy.pending_per_inviter {
            return rules(flywheel_domain::growth::model::rate_limited(
                "too_many_pending_invitations",
                format!(
                    "an inviter may have at most {} pending invitations",
                    batch.policy.pending_per_inviter
                ),
            ));
        }
    }
    let mut messages = Vec::new();
    for slot in fresh {
        let new = &batch.invitations[slot];
        let invitation = Invitation {
            id: new.id.clone(),
            org_id: batch.org_id.clone(),
            email: new.email.clone(),
            role: batch.role.clone(),
            inviter_user_id: batch.inviter_user_id.clone(),
            token_prefix: new.token_prefix.clone(),
            status: InvitationStatus::Pending,
            created_at: now,
            expires_at: batch.expires_at,
            sends: 1,
            accepted_by_user_id: None,
            responded_at: None,
        };
        query(
            "INSERT INTO invitations (project_id, id, org_id, email, role, inviter_user_id, token_hash, \
             token_prefix, status, created_at, expires_at, sends) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, 1)",
        )
        .bind(arg_project(project))
        .bind(&invitation.id)
        .bind(&invitation.org_id)
        .bind(&invitation.email)
        .bind(&invitation.role)
        .bind(&invitation.inviter_user_id)
        .bind(&new.token_hash)
        .bind(&invitation.token_prefix)
        .bind(arg_time(now))
        .bind(arg_time(invitation.expires_at))
        .execute(&mut *conn)
        .await?;
        if let Some(email) = &new.email_message {
            queue_email(&mut *conn, project, email, now).await?;
        }
        referral_event(
            &mut *conn,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Invited,
                actor_user_id: Some(batch.inviter_user_id.clone()),
                resource_type: "org".into(),
                resource_id: batch.org_id.clone(),
                via_id: Some(invitation.id.clone()),
                signup_user_id: None,
                org_id: Some(batch.org_id.clone()),
            },
            now,
        )
        .await?;
        messages.push(OutboxMessage {
            event_type: "invitation.created".into(),
            data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
        });
        outcomes[slot] = Some(InvitationOutcome::Created(invitation));
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    Ok(Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every slot decided"))
        .collect()))
}

async fn resend_in(
    conn: &mut Conn,
    request: &ResendRequest,
) -> Result<Ruled<Invitation>, StoreError> {
    let project = request.project;
    let now = request.now;
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3{}",
        conn.backend().lock()
    );
    let Some(row) = query(&sql)
        .bind(arg_project(project))
        .bind(&request.org_id)
        .bind(&request.id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return rules(DomainError::not_found(
            "invitation_not_found",
            "no such invitation in this org",
        ));
    };
    let mut invitation = invitation_from(&row)?;
    if !matches!(
        invitation.status_at(now),
        InvitationStatus::Pending | InvitationStatus::Expired
    ) {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "invitation_not_pending",
            format!("the invitation is {}", invitation.status_at(now).as_str()),
        ));
    }
    // `sends` counts the first send too.
    if invitation.sends > request.policy.resends_per_invitation {
        return rules(flywheel_domain::growth::model::rate_limited(
            "resend_limit_reached",
            format!(
                "an invitation may be resent at most {} times",
                request.policy.resends_per_invitation
            ),
        ));
    }
    query(
        "UPDATE invitations SET token_hash = $3, token_prefix = $4, expires_at = $5, \
         sends = sends + 1, status = 'pending' WHERE project_id = $1 AND id = $2",
    )
    .bind(arg_project(project))
    .bind(&request.id)
    .bind(&request.token_hash)
    .bind(&request.token_prefix)
    .bind(arg_time(request.expires_at))
    .execute(&mut *conn)
    .await?;
    invitation.token_prefix = request.token_prefix.clone();
    invitation.expires_at = request.expires_at;
    invitation.sends += 1;
    invitation.status = InvitationStatus::Pending;
    if let Some(email) = &request.email_message {
        queue_email(&mut *conn, project, email, now).await?;
    }
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "invitation.resent".into(),
            data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
        }],
        now,
    )
    .await?;
    Ok(Ok(invitation))
}

async fn finish_delivery_in(conn: &mut Conn, attempt: &DeliveryAttempt) -> Result<(), StoreError> {
    let (status, next) = match attempt.retry {
        None => ("succeeded", None),
        Some(Some(at)) => ("pending", Some(at)),
        Some(None) => ("failed", None),
    };
    query(
        "UPDATE webhook_deliveries SET status = $2, attempts = attempts + 1, \
         next_attempt_at = COALESCE($3, next_attempt_at), last_attempt_at = $4, \
         last_status_code = $5, last_error = $6 WHERE id = $1",
    )
    .bind(&attempt.id)
    .bind(status)
    .bind(arg_opt_time(next))
    .bind(arg_time(attempt.at))
    .bind(attempt.status_code)
    .bind(&attempt.error)
    .execute(&mut *conn)
    .await?;
    if attempt.retry.is_none() {
        query(
            "UPDATE webhook_endpoints SET failing_since = NULL WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .execute(&mut *conn)
        .await?;
    } else {
        query(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $3) \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .bind(arg_time(attempt.at))
        .execute(&mut *conn)
        .await?;
    }
    if let Some(reason) = &attempt.disable_endpoint {
        query(
            "UPDATE webhook_endpoints SET enabled = $3, disabled_reason = $4 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .bind(false)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl<S: SqlBackend> GrowthStore for S {
    async fn signup(
        &self,
        request: &SignupRequest,
    ) -> Result<Ruled<GrowthCommit<SignupReply>>, StoreError> {
        timed(Self::BACKEND, "signup", async {
            let mut tx = self.begin().await?;
            let outcome = signup_in(&mut *tx, request).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn get_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let mut conn = self.reader().await?;
        user_in(&mut *conn, project, user_id).await
    }

    async fn set_email_verified(
        &self,
        project: ProjectId,
        user_id: &str,
        verified: bool,
    ) -> Result<Option<UserRecord>, StoreError> {
        let mut tx = self.begin().await?;
        query("UPDATE users SET email_verified = $3 WHERE project_id = $1 AND user_id = $2")
            .bind(arg_project(project))
            .bind(user_id)
            .bind(verified)
            .execute(&mut *tx)
            .await?;
        let user = user_in(&mut *tx, project, user_id).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn memberships_of_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Vec<MembershipRecord>, StoreError> {
        query(
            "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
             WHERE project_id = $1 AND user_id = $2 ORDER BY created_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(membership_from)
        .collect()
    }

    async fn org_members(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<(Option<OrgProfile>, Vec<MembershipRecord>), StoreError> {
        let mut conn = self.reader().await?;
        let profile = profile_in(&mut *conn, project, org_id).await?;
        let members = query(
            "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
             WHERE project_id = $1 AND org_id = $2 ORDER BY created_at, user_id",
        )
        .bind(arg_project(project))
        .bind(org_id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(membership_from)
        .collect::<Result<Vec<_>, _>>()?;
        Ok((profile, members))
    }

    async fn create_invitations(
        &self,
        batch: &InvitationBatch,
    ) -> Result<Ruled<Vec<InvitationOutcome>>, StoreError> {
        timed(Self::BACKEND, "create_invitations", async {
            let mut tx = self.begin().await?;
            let outcome = create_invitations_in(&mut *tx, batch).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn list_invitations(
        &self,
        project: ProjectId,
        org_id: &str,
        status: Option<InvitationStatus>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Invitation>, StoreError> {
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 \
             ORDER BY created_at DESC, id LIMIT 1000"
        );
        let rows = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .fetch_all(&mut *self.reader().await?)
            .await?;
        let mut invitations = rows
            .iter()
            .map(invitation_from)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(status) = status {
            invitations.retain(|invitation| invitation.status_at(now) == status);
        }
        Ok(invitations)
    }

    async fn invitation_by_id(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
    ) -> Result<Option<InvitationLookup>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let invitation = invitation_from(&row)?;
        lookup_of(&mut *conn, project, invitation).await.map(Some)
    }

    async fn revoke_invitation(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3{}",
            tx.backend().lock()
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return rules(DomainError::not_found(
                "invitation_not_found",
                "no such invitation in this org",
            ));
        };
        let mut invitation = invitation_from(&row)?;
        if !matches!(
            invitation.status_at(now),
            InvitationStatus::Pending | InvitationStatus::Expired
        ) {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "invitation_not_pending",
                format!("the invitation is {}", invitation.status_at(now).as_str()),
            ));
        }
        query(
            "UPDATE invitations SET status = 'revoked', responded_at = $3 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        invitation.status = InvitationStatus::Revoked;
        invitation.responded_at = Some(now);
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invitation.revoked".into(),
                data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
            }],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(invitation))
    }

    async fn resend_invitation(
        &self,
        request: &ResendRequest,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = resend_in(&mut *tx, request).await?;
        if outcome.is_ok() {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    async fn invitation_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<InvitationLookup>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND token_hash = $2"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let invitation = invitation_from(&row)?;
        lookup_of(&mut *conn, project, invitation).await.map(Some)
    }

    async fn accept_invitation(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
        timed(Self::BACKEND, "accept_invitation", async {
            let mut tx = self.begin().await?;
            let outcome = accept_in(&mut *tx, request).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn decline_invitation(
        &self,
        project: ProjectId,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let Some(mut invitation) = invitation_by_hash(&mut *tx, project, token_hash).await? else {
            return rules(Invitation::not_found());
        };
        if !invitation.is_open(now) {
            return rules(Invitation::not_found());
        }
        query(
            "UPDATE invitations SET status = 'declined', responded_at = $3 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(&invitation.id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        invitation.status = InvitationStatus::Declined;
        invitation.responded_at = Some(now);
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invitation.declined".into(),
                data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
            }],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(invitation))
    }

    async fn create_invite_link(
        &self,
        project: ProjectId,
        link: &InviteLink,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO invite_links (project_id, id, org_id, role, created_by_user_id, token_hash, \
             token_prefix, created_at, expires_at, max_uses, uses, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, NULL)",
        )
        .bind(arg_project(project))
        .bind(&link.id)
        .bind(&link.org_id)
        .bind(&link.role)
        .bind(&link.created_by_user_id)
        .bind(token_hash)
        .bind(&link.token_prefix)
        .bind(arg_time(link.created_at))
        .bind(arg_opt_time(link.expires_at))
        .bind(link.max_uses)
        .execute(&mut *tx)
        .await?;
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invite_link.created".into(),
                data: serde_json::to_value(link).map_err(StoreError::internal)?,
            }],
            link.created_at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_invite_links(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<Vec<InviteLink>, StoreError> {
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND org_id = $2 \
             ORDER BY created_at DESC, id"
        );
        query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(invite_link_from)
            .collect()
    }

    async fn revoke_invite_link(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<InviteLink>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE invite_links SET revoked_at = COALESCE(revoked_at, $4) \
             WHERE project_id = $1 AND org_id = $2 AND id = $3",
        )
        .bind(arg_project(project))
        .bind(org_id)
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND org_id = $2 AND id = $3"
        );
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(invite_link_from)
            .transpose()?;
        tx.commit().await?;
        Ok(link)
    }

    async fn invite_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<(InviteLink, Option<String>)>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND token_hash = $2"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let link = invite_link_from(&row)?;
        let name = profile_in(&mut *conn, project, &link.org_id)
            .await?
            .and_then(|p| p.name);
        Ok(Some((link, name)))
    }

    async fn join_invite_link(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = join_link_in(&mut *tx, request).await?;
        if outcome.is_ok() {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    async fn create_share_link(
        &self,
        project: ProjectId,
        link: &ShareLink,
        token_hash: &str,
        password_hash: Option<&str>,
        notifications: &[RenderedEmail],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO share_links (project_id, id, resource_type, resource_id, org_id, \
             created_by_user_id, permission, audience, allow_list, expires_at, password_hash, \
             token_hash, token_prefix, created_at, revoked_at, accesses, unique_guests) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, NULL, 0, 0)",
        )
        .bind(arg_project(project))
        .bind(&link.id)
        .bind(&link.resource_type)
        .bind(&link.resource_id)
        .bind(&link.org_id)
        .bind(&link.created_by_user_id)
        .bind(link.permission.as_str())
        .bind(link.audience.as_str())
        .bind(arg_json(
            &serde_json::to_value(&link.allow_list).map_err(StoreError::internal)?,
        ))
        .bind(arg_opt_time(link.expires_at))
        .bind(password_hash)
        .bind(token_hash)
        .bind(&link.token_prefix)
        .bind(arg_time(link.created_at))
        .execute(&mut *tx)
        .await?;
        referral_event(
            &mut *tx,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Shared,
                actor_user_id: Some(link.created_by_user_id.clone()),
                resource_type: link.resource_type.clone(),
                resource_id: link.resource_id.clone(),
                via_id: Some(link.id.clone()),
                signup_user_id: None,
                org_id: link.org_id.clone(),
            },
            link.created_at,
        )
        .await?;
        for email in notifications {
            queue_email(&mut *tx, project, email, link.created_at).await?;
        }
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "share_link.created".into(),
                data: serde_json::to_value(link).map_err(StoreError::internal)?,
            }],
            link.created_at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_share_links(
        &self,
        project: ProjectId,
        filter: &ShareLinkFilter,
    ) -> Result<Vec<ShareLink>, StoreError> {
        // Optional filters as `($n IS NULL OR column = $n)`.
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 \
             AND ($2 IS NULL OR resource_type = $2) AND ($3 IS NULL OR resource_id = $3) \
             AND ($4 IS NULL OR created_by_user_id = $4) ORDER BY created_at DESC, id LIMIT 1000"
        );
        query(&sql)
            .bind(arg_project(project))
            .bind(&filter.resource_type)
            .bind(&filter.resource_id)
            .bind(&filter.created_by_user_id)
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .collect()
    }

    async fn get_share_link(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<Option<ShareLink>, StoreError> {
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *self.reader().await?)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()
    }

    async fn update_share_link(
        &self,
        project: ProjectId,
        id: &str,
        update: &ShareLinkUpdate,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2{}",
            tx.backend().lock()
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let current = share_link_from(&row)?;
        let link = current.link;
        let permission = update.permission.unwrap_or(link.permission);
        let audience = update.audience.unwrap_or(link.audience);
        let allow_list = update.allow_list.clone().unwrap_or(link.allow_list);
        let expires_at = update.expires_at.unwrap_or(link.expires_at);
        let password_hash = update
            .password_hash
            .clone()
            .unwrap_or(current.password_hash);
        query(
            "UPDATE share_links SET permission = $3, audience = $4, allow_list = $5, \
             expires_at = $6, password_hash = $7 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(permission.as_str())
        .bind(audience.as_str())
        .bind(arg_json(
            &serde_json::to_value(&allow_list).map_err(StoreError::internal)?,
        ))
        .bind(arg_opt_time(expires_at))
        .bind(password_hash)
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)
            .and_then(|row| share_link_from(&row))?
            .link;
        tx.commit().await?;
        Ok(Some(link))
    }

    async fn revoke_share_link(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE share_links SET revoked_at = COALESCE(revoked_at, $3) WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()?;
        tx.commit().await?;
        Ok(link)
    }

    async fn share_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<ShareLinkSecret>, StoreError> {
        let mut conn = self.reader().await?;
        share_by_hash(&mut *conn, project, token_hash).await
    }

    async fn remove_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
        policy: &GrowthPolicy,
        now: DateTime<Utc>,
    ) -> Result<Ruled<GrowthCommit<Option<MembershipRecord>>>, StoreError> {
        let mut tx = self.begin().await?;
        // The org row's lock serialises membership changes of the org.
        let before = tx.load_org(project, org_id, now).await?;
        let Some(membership) = membership_in(&mut *tx, project, org_id, user_id).await? else {
            return Ok(Ok(GrowthCommit {
                reply: None,
                orgs: vec![Arc::new(before)],
            }));
        };
        if let Some(profile) = profile_in(&mut *tx, project, org_id).await? {
            if profile.owner_user_id.as_deref() == Some(user_id) {
                return rules(DomainError::new(
                    ErrorKind::Conflict,
                    "cannot_remove_owner",
                    "the org's owner cannot be removed",
                ));
            }
        }
        query("DELETE FROM memberships WHERE project_id = $1 AND org_id = $2 AND user_id = $3")
            .bind(arg_project(project))
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        // The association `group` events made goes too, so flag
        // enrichment stops naming the org for this user.
        query("DELETE FROM org_members WHERE project_id = $1 AND org_id = $2 AND distinct_id = $3")
            .bind(arg_project(project))
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let catalog = &policy.billing.catalog;
        let metered = catalog
            .feature(&policy.seats_feature)
            .is_some_and(|(_, feature)| feature.kind == FeatureKind::Metered);
        let mut state = before.clone();
        if metered {
            let mut after = before.clone();
            let command = OrgCommand::Release {
                feature: policy.seats_feature.clone(),
                amount: 1,
            };
            // A seat the catalog no longer lets us give back
            // must not keep a member in: removal always works.
            if after
                .execute(catalog, &command, policy.billing.grace, now)
                .is_ok()
            {
                let saved = tx.save_org(project, &before, after).await?;
                billing_effects(
                    &mut *tx,
                    project,
                    &policy.billing,
                    &[(&before, &saved)],
                    now,
                )
                .await?;
                state = saved;
            }
        }
        let message = OutboxMessage {
            event_type: "membership.removed".into(),
            data: serde_json::json!({
                "org_id": org_id,
                "user_id": user_id,
                "role": &membership.role,
            }),
        };
        enqueue(&mut *tx, project, &[message], now).await?;
        tx.commit().await?;
        Ok(Ok(GrowthCommit {
            reply: Some(membership),
            orgs: vec![Arc::new(state)],
        }))
    }

    async fn is_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.reader().await?;
        Ok(membership_in(&mut *conn, project, org_id, user_id)
            .await?
            .is_some())
    }

    async fn record_share_access(
        &self,
        project: ProjectId,
        link_id: &str,
        guest_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        let first = query(
            "INSERT INTO share_guests (project_id, link_id, guest_key, first_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(arg_project(project))
        .bind(link_id)
        .bind(guest_key)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        query(
            "UPDATE share_links SET accesses = accesses + 1, unique_guests = unique_guests + $3, \
             first_access_at = COALESCE(first_access_at, $4), last_access_at = $4 \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(link_id)
        .bind(i64::from(first))
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(link_id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()?;
        if let (true, Some(link)) = (first, &link) {
            referral_event(
                &mut *tx,
                project,
                NewReferralEvent {
                    kind: ReferralEventKind::ShareViewed,
                    actor_user_id: Some(link.created_by_user_id.clone()),
                    resource_type: link.resource_type.clone(),
                    resource_id: link.resource_id.clone(),
                    via_id: Some(link.id.clone()),
                    signup_user_id: None,
                    org_id: link.org_id.clone(),
                },
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(link)
    }

    async fn referral_code(
        &self,
        project: ProjectId,
        user_id: &str,
        candidate: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE users SET referral_code = $3 WHERE project_id = $1 AND user_id = $2 \
             AND referral_code IS NULL",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .bind(candidate)
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "referral_code"))?;
        let code: Option<Option<String>> =
            query_scalar("SELECT referral_code FROM users WHERE project_id = $1 AND user_id = $2")
                .bind(arg_project(project))
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(code.flatten())
    }

    async fn record_referral_click(
        &self,
        project: ProjectId,
        click_id: &str,
        code: &str,
        anonymous_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin().await?;
        let owner: Option<String> =
            query_scalar("SELECT user_id FROM users WHERE project_id = $1 AND referral_code = $2")
                .bind(arg_project(project))
                .bind(code)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(owner) = owner else {
            return Ok(None);
        };
        query(
            "INSERT INTO referral_clicks (project_id, click_id, code, referrer_user_id, anonymous_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(arg_project(project))
        .bind(click_id)
        .bind(code)
        .bind(&owner)
        .bind(anonymous_id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(owner))
    }

    async fn referral_events(
        &self,
        project: ProjectId,
        query: &ReferralEventQuery,
    ) -> Result<Vec<ReferralEvent>, StoreError> {
        let rows = crate::sql::query(
            "SELECT id, kind, actor_user_id, resource_type, resource_id, via_id, signup_user_id, \
             org_id, created_at FROM referral_events WHERE project_id = $1 \
             AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR actor_user_id = $3) \
             AND ($4 IS NULL OR signup_user_id = $4) AND id > $5 ORDER BY id LIMIT $6",
        )
        .bind(arg_project(project))
        .bind(query.kind.map(ReferralEventKind::as_str))
        .bind(&query.actor_user_id)
        .bind(&query.signup_user_id)
        .bind(query.after_id.unwrap_or(0))
        .bind(i64::from(query.limit))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(ReferralEvent {
                    id: row.try_get("id")?,
                    kind: ReferralEventKind::parse(&kind).ok_or_else(|| {
                        StoreError::internal(sqlx::Error::Protocol(format!(
                            "unknown referral event kind {kind}"
                        )))
                    })?,
                    actor_user_id: row.try_get("actor_user_id")?,
                    resource_type: row.try_get("resource_type")?,
                    resource_id: row.try_get("resource_id")?,
                    via_id: row.try_get("via_id")?,
                    signup_user_id: row.try_get("signup_user_id")?,
                    org_id: row.try_get("org_id")?,
                    at: read_time(row, "created_at")?,
                })
            })
            .collect()
    }

    async fn put_org_template(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin().await?;
        let latest: Option<i64> =
            query_scalar("SELECT MAX(version) FROM org_templates WHERE project_id = $1")
                .bind(arg_project(project))
                .fetch_one(&mut *tx)
                .await?;
        let version = latest.unwrap_or(0) + 1;
        query(
            "INSERT INTO org_templates (project_id, version, document, actor, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(arg_project(project))
        .bind(version)
        .bind(arg_json(document))
        .bind(actor)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "org_template"))?;
        tx.commit().await?;
        Ok(version)
    }

    async fn org_template(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row = query(
            "SELECT version, document FROM org_templates WHERE project_id = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(arg_project(project))
        .fetch_optional(&mut *self.reader().await?)
        .await?;
        row.map(|row| Ok((row.try_get("version")?, read_json(&row, "document")?)))
            .transpose()
    }

    async fn put_email_template(
        &self,
        project: ProjectId,
        template: &EmailTemplate,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO email_templates (project_id, kind, subject, text_body, html_body, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (project_id, kind) DO UPDATE SET \
             subject = excluded.subject, text_body = excluded.text_body, \
             html_body = excluded.html_body, updated_at = excluded.updated_at",
        )
        .bind(arg_project(project))
        .bind(&template.kind)
        .bind(&template.subject)
        .bind(&template.text_body)
        .bind(&template.html_body)
        .bind(arg_time(template.updated_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn email_templates(&self, project: ProjectId) -> Result<Vec<EmailTemplate>, StoreError> {
        query(
            "SELECT kind, subject, text_body, html_body, updated_at FROM email_templates \
             WHERE project_id = $1 ORDER BY kind",
        )
        .bind(arg_project(project))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(EmailTemplate {
                kind: row.try_get("kind")?,
                subject: row.try_get("subject")?,
                text_body: row.try_get("text_body")?,
                html_body: row.try_get("html_body")?,
                updated_at: read_time(row, "updated_at")?,
            })
        })
        .collect()
    }

    async fn list_emails(
        &self,
        project: ProjectId,
        limit: u32,
    ) -> Result<Vec<EmailRecord>, StoreError> {
        query(
            "SELECT id, kind, recipient, subject, status, attempts, last_error, created_at, sent_at \
             FROM emails WHERE project_id = $1 ORDER BY created_at DESC, id LIMIT $2",
        )
        .bind(arg_project(project))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(EmailRecord {
                id: row.try_get("id")?,
                kind: row.try_get("kind")?,
                recipient: row.try_get("recipient")?,
                subject: row.try_get("subject")?,
                status: row.try_get("status")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                created_at: read_time(row, "created_at")?,
                sent_at: read_opt_time(row, "sent_at")?,
            })
        })
        .collect()
    }

    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedEmail>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT id FROM emails WHERE status = 'pending' AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $2{}",
            tx.backend().skip_locked()
        );
        let ids: Vec<String> = query_scalar(&sql)
            .bind(arg_time(now))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            let row = query(
                "UPDATE emails SET next_attempt_at = $2 WHERE id = $1 RETURNING id, project_id, kind, \
                 recipient, subject, text_body, html_body, attempts",
            )
            .bind(&id)
            .bind(arg_time(lease_until))
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(ClaimedEmail {
                id: row.try_get("id")?,
                project: read_project(&row, "project_id")?,
                kind: row.try_get("kind")?,
                recipient: row.try_get("recipient")?,
                subject: row.try_get("subject")?,
                text_body: row
                    .try_get::<Option<String>, _>("text_body")?
                    .unwrap_or_default(),
                html_body: row.try_get("html_body")?,
                attempts: row.try_get("attempts")?,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish_email(
        &self,
        id: &str,
        at: DateTime<Utc>,
        error: Option<&str>,
        retry_at: Option<Option<DateTime<Utc>>>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        match retry_at {
            None => {
                // Sent: drop the bodies (they may hold a token link).
                query(
                    "UPDATE emails SET status = 'sent', attempts = attempts + 1, sent_at = $2, \
                     last_error = NULL, text_body = NULL, html_body = NULL WHERE id = $1",
                )
                .bind(id)
                .bind(arg_time(at))
                .execute(&mut *tx)
                .await?;
            }
            Some(Some(next)) => {
                query(
                    "UPDATE emails SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(arg_time(next))
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
            Some(None) => {
                query(
                    "UPDATE emails SET status = 'failed', attempts = attempts + 1, last_error = $2, \
                     text_body = NULL, html_body = NULL WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_webhook_endpoint(
        &self,
        project: ProjectId,
        endpoint: &WebhookEndpoint,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO webhook_endpoints (project_id, id, url, secret, event_types, description, \
             enabled, disabled_reason, failing_since, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, $8)",
        )
        .bind(arg_project(project))
        .bind(&endpoint.id)
        .bind(&endpoint.url)
        .bind(&endpoint.secret)
        .bind(arg_json(&serde_json::to_value(&endpoint.event_types).map_err(StoreError::internal)?))
        .bind(&endpoint.description)
        .bind(endpoint.enabled)
        .bind(arg_time(endpoint.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_webhook_endpoints(
        &self,
        project: ProjectId,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        query(
            "SELECT id, url, secret, event_types, description, enabled, disabled_reason, failing_since, \
             created_at FROM webhook_endpoints WHERE project_id = $1 ORDER BY created_at, id",
        )
        .bind(arg_project(project))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(endpoint_from)
        .collect()
    }

    async fn delete_webhook_endpoint(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let deleted = query("DELETE FROM webhook_endpoints WHERE project_id = $1 AND id = $2")
            .bind(arg_project(project))
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        // Its undelivered messages have nowhere to go.
        query(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = 'endpoint deleted' \
             WHERE project_id = $1 AND endpoint_id = $2 AND status = 'pending'",
        )
        .bind(arg_project(project))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn set_webhook_endpoint_enabled(
        &self,
        project: ProjectId,
        id: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE webhook_endpoints SET enabled = $3, disabled_reason = $4, \
             failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(enabled)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let endpoint = query(
            "SELECT id, url, secret, event_types, description, enabled, disabled_reason, failing_since, \
             created_at FROM webhook_endpoints WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(endpoint_from)
        .transpose()?;
        tx.commit().await?;
        Ok(endpoint)
    }

    async fn enqueue_messages(
        &self,
        project: ProjectId,
        messages: &[OutboxMessage],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        enqueue(&mut *tx, project, messages, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT d.id FROM webhook_deliveries d WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
             AND EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.project_id = d.project_id \
             AND e.id = d.endpoint_id AND e.enabled = $3) ORDER BY d.next_attempt_at LIMIT $2{}",
            tx.backend().skip_locked()
        );
        let ids: Vec<String> = query_scalar(&sql)
            .bind(arg_time(now))
            .bind(i64::from(limit))
            .bind(true)
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            query("UPDATE webhook_deliveries SET next_attempt_at = $2 WHERE id = $1")
                .bind(&id)
                .bind(arg_time(lease_until))
                .execute(&mut *tx)
                .await?;
            let row = query(
                "SELECT d.id, d.project_id, d.message_id, d.endpoint_id, d.attempts, e.url, e.secret, \
                 e.failing_since, o.event_type, o.payload, o.created_at FROM webhook_deliveries d \
                 JOIN webhook_endpoints e ON e.project_id = d.project_id AND e.id = d.endpoint_id \
                 JOIN outbox o ON o.id = d.message_id WHERE d.id = $1",
            )
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(ClaimedDelivery {
                id: row.try_get("id")?,
                project: read_project(&row, "project_id")?,
                message_id: row.try_get("message_id")?,
                endpoint_id: row.try_get("endpoint_id")?,
                url: row.try_get("url")?,
                secret: row.try_get("secret")?,
                event_type: row.try_get("event_type")?,
                payload: read_json(&row, "payload")?,
                message_created_at: read_time(&row, "created_at")?,
                attempts: row.try_get("attempts")?,
                failing_since: read_opt_time(&row, "failing_since")?,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish_delivery(&self, attempt: &DeliveryAttempt) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        finish_delivery_in(&mut *tx, attempt).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_deliveries(
        &self,
        project: ProjectId,
        query: &DeliveryQuery,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox o ON o.id = d.message_id \
             WHERE d.project_id = $1 AND ($2 IS NULL OR d.endpoint_id = $2) \
             AND ($3 IS NULL OR d.status = $3) AND ($4 IS NULL OR d.message_id = $4) \
             ORDER BY d.created_at DESC, d.id LIMIT $5"
        );
        crate::sql::query(&sql)
            .bind(arg_project(project))
            .bind(&query.endpoint_id)
            .bind(&query.status)
            .bind(&query.message_id)
            .bind(i64::from(query.limit))
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(delivery_from)
            .collect()
    }

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

    async fn user_profile(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<flywheel_domain::enrichment::UserProfile>, StoreError> {
        let mut conn = self.reader().await?;
        let mut profile = flywheel_domain::enrichment::UserProfile {
            user_id: user_id.to_owned(),
            ..Default::default()
        };
        if let Some(user) = user_in(&mut *conn, project, user_id).await? {
            profile.signed_up_at = Some(user.created_at);
            profile.acquisition_source =
                Some(user.attribution.acquisition_source.as_str().to_owned());
        }
        let rows = query(
            "SELECT org_id FROM memberships WHERE project_id = $1 AND user_id = $2 \
             ORDER BY created_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            profile.org_ids.push(row.try_get("org_id")?);
        }
        let rows = query(
            "SELECT org_id FROM org_members WHERE project_id = $1 AND distinct_id = $2 \
             ORDER BY joined_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let org: String = row.try_get("org_id")?;
            if !profile.org_ids.contains(&org) {
                profile.org_ids.push(org);
            }
        }
        let traits =
            query("SELECT traits FROM person_traits WHERE project_id = $1 AND distinct_id = $2")
                .bind(arg_project(project))
                .bind(user_id)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(row) = traits {
            if let serde_json::Value::Object(traits) = read_json(&row, "traits")? {
                profile.traits = traits;
            }
        }
        let rows = query(
            "SELECT rule, activation FROM milestones WHERE project_id = $1 AND \
             ((scope = 'user' AND subject_id = $2) OR (scope = 'org' AND subject_id = $3)) \
             ORDER BY reached_at, rule",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .bind(profile.org_ids.first().map_or("", String::as_str))
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            profile.activated |= row.try_get::<bool, _>("activation")?;
            profile.milestones.push(row.try_get("rule")?);
        }
        Ok((!profile.is_empty()).then_some(profile))
    }

    async fn prune_outbound(
        &self,
        older_than: DateTime<Utc>,
    ) -> Result<PrunedOutbound, StoreError> {
        let mut tx = self.begin().await?;
        let deliveries = query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND message_id IN (\
             SELECT id FROM outbox WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM webhook_deliveries pending WHERE pending.message_id = outbox.id \
             AND pending.status = 'pending'))",
        )
        .bind(arg_time(older_than))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let messages = query(
            "DELETE FROM outbox WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM webhook_deliveries d WHERE d.message_id = outbox.id)",
        )
        .bind(arg_time(older_than))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let emails = query("DELETE FROM emails WHERE created_at < $1 AND status <> 'pending'")
            .bind(arg_time(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let signup_keys = query("DELETE FROM growth_requests WHERE created_at < $1")
            .bind(arg_time(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(PrunedOutbound {
            messages,
            deliveries,
            emails,
            signup_keys,
        })
    }

    async fn instance_secret(&self, name: &str, candidate: &str) -> Result<String, StoreError> {
        let mut tx = self.begin().await?;
        query("INSERT INTO instance_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&mut *tx)
            .await?;
        let value: String = query_scalar("SELECT value FROM instance_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(value)
    }

    async fn replay_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3 \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox o ON o.id = d.message_id \
             WHERE d.project_id = $1 AND d.id = $2"
        );
        let record = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(delivery_from)
            .transpose()?;
        tx.commit().await?;
        Ok(record)
    }

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
        let rows = query(&format!(
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
        let row = query(&format!(
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
        let rows = query(&format!(
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
        let rows = query(&format!(
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

async fn lookup_of(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    invitation: Invitation,
) -> Result<InvitationLookup, StoreError> {
    let org_name = profile_in(&mut *conn, project, &invitation.org_id)
        .await?
        .and_then(|p| p.name);
    let inviter_name = user_in(&mut *conn, project, &invitation.inviter_user_id)
        .await?
        .and_then(|user| user.name);
    Ok(InvitationLookup {
        invitation,
        org_name,
        inviter_name,
    })
}
