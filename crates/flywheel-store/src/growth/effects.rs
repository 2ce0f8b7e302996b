//! What billing writes imply beyond the org rows, in their transaction.

use super::*;
use crate::growth::common::*;
use crate::growth::outbound::*;
use crate::growth::prompts::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::growth::model::{Attribution, NewReferralEvent, ReferralEventKind};
use flywheel_domain::growth::seats;
use flywheel_domain::project::ProjectId;
use std::sync::Arc;

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
    use flywheel_domain::billing::notice::{change_effects, entitlements_message};
    let mut messages = Vec::new();
    let mut live = Vec::new();
    let mut triggers = Vec::new();
    for (before, after) in changes {
        let effects = change_effects(&billing.catalog, billing.grace, before, after, now);
        let org_id = &after.org_id;
        for (event_type, data) in effects.webhooks {
            live.push(LiveMessage {
                user_id: None,
                org_id: Some(org_id.clone()),
                kind: "entitlements".into(),
                payload: entitlements_message(event_type, &data),
            });
            messages.push(OutboxMessage {
                event_type: event_type.to_owned(),
                data,
            });
        }
        if let Some(plan) = &effects.converted_to {
            record_conversion(&mut *conn, project, org_id, plan, now).await?;
        }
        if let Some(plan) = &effects.credit_plan {
            messages.extend(credit_prompt(&mut *conn, project, billing, org_id, plan, now).await?);
        }
        triggers.extend(
            effects
                .triggers
                .into_iter()
                .map(|fact| crate::PromptTrigger {
                    fact,
                    user_id: actors.get(org_id).cloned(),
                    org_id: Some(org_id.clone()),
                    org: Some(*after),
                }),
        );
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    // The change first, then the prompts it fires.
    publish_live(&mut *conn, project, &live, now).await?;
    let prompted = raise_prompts(&mut *conn, project, billing, &triggers, now).await?;
    Ok(prompted || !messages.is_empty())
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

/// Credits an upgrade of `org_id` to `plan` to the org's most
/// recently clicked prompt within the attribution window (once
/// per prompt). Returns the `prompt.converted` webhook.
pub(crate) async fn credit_prompt(
    conn: &mut Conn,
    project: ProjectId,
    billing: &crate::Billing,
    org_id: &str,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<Option<OutboxMessage>, StoreError> {
    // Without rules the default window still credits earlier clicks.
    let window = billing.prompts.attribution_window();
    let row = query(format!(
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

pub(crate) async fn record_conversion(
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

/// Takes one seat of the org (the domain's `seats::take_seat`); always
/// loads (and so creates) the org's billing row, written when new so that
/// the usage anchor is the signup. Returns the org's state after.
pub(crate) async fn take_seat(
    conn: &mut Conn,
    project: ProjectId,
    org_id: &str,
    policy: &GrowthPolicy,
    now: DateTime<Utc>,
) -> Result<Ruled<OrgState>, StoreError> {
    let before = conn.load_org(project, org_id, now).await?;
    let after = match seats::take_seat(policy.seat_rules(), &before, now) {
        Ok(after) => after,
        Err(error) => return rules(error),
    };
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

pub(crate) fn plan_of(
    state: &OrgState,
    policy: &GrowthPolicy,
    now: DateTime<Utc>,
) -> Option<String> {
    state
        .access(&policy.billing.catalog, policy.billing.grace, now)
        .plan
        .map(|(_, plan)| plan.key.clone())
}

pub(crate) async fn referral_event(
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
