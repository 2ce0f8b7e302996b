//! What a write to an org's billing state announces: the webhooks
//! `subscription.changed`, `usage.warning` and `usage.limit_reached`, and
//! whether the org just converted from the default plan to another.
//!
//! Notices compare the state before and after one transaction, both read
//! at the same instant, so a retried request (which changes nothing) and a
//! read that merely crosses a boundary announce nothing. A scheduled change
//! is announced when it is scheduled (with its `at`), not again when its
//! boundary passes: nothing runs at the boundary (see `OrgState::access`).

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use super::catalog::{Catalog, FeatureKind};
use super::org::{OrgState, SubscriptionStatus};
use crate::prompts::TriggerFact;

/// One thing a billing write announces.
#[derive(Debug, Clone, PartialEq)]
pub enum BillingNotice {
    /// A webhook: its type and `data`.
    Webhook {
        event_type: &'static str,
        data: Value,
    },
    /// The org left the default plan for another one (an upgrade to a
    /// paid plan, in the usual catalog): a referral `converted` event.
    Converted {
        org_id: String,
        from_plan: Option<String>,
        to_plan: String,
    },
}

/// Compares `before` and `after` (the same org) at `now`.
pub fn billing_notices(
    catalog: &Catalog,
    grace: Duration,
    before: &OrgState,
    after: &OrgState,
    now: DateTime<Utc>,
) -> Vec<BillingNotice> {
    let mut notices = Vec::new();
    if before.subscription == after.subscription
        && before.usage == after.usage
        && before.grants == after.grants
        && before.overrides == after.overrides
    {
        return notices;
    }
    let old = before.subscription_view(catalog, grace, now);
    let new = after.subscription_view(catalog, grace, now);
    let status =
        |view: &super::answer::SubscriptionView| view.subscription.as_ref().map(|s| s.status);
    if old.plan != new.plan
        || status(&old) != status(&new)
        || old.scheduled != new.scheduled
        || old.lapsed != new.lapsed
    {
        notices.push(BillingNotice::Webhook {
            event_type: "subscription.changed",
            data: json!({
                "org_id": after.org_id,
                "previous_plan": old.plan,
                "plan": new.plan,
                "status": status(&new),
                "scheduled": new.scheduled,
                "lapsed": new.lapsed,
                "upgrade": match (&old.plan, &new.plan) {
                    (Some(from), Some(to)) => from != to && catalog.is_upgrade(from, to),
                    _ => false,
                },
            }),
        });
        let default = catalog.default_plan().map(|plan| plan.key.as_str());
        let was_default = old.plan.is_none() || old.plan.as_deref() == default;
        if let Some(to) = &new.plan {
            if was_default && Some(to.as_str()) != default {
                notices.push(BillingNotice::Converted {
                    org_id: after.org_id.clone(),
                    from_plan: old.plan.clone(),
                    to_plan: to.clone(),
                });
            }
        }
    }
    for feature in &catalog.document.features {
        if feature.kind != FeatureKind::Metered {
            continue;
        }
        let was = before.check(catalog, &feature.key, 1, grace, now);
        let is = after.check(catalog, &feature.key, 1, grace, now);
        let (Some(was_usage), Some(usage)) = (was.metered, is.metered) else {
            continue;
        };
        let Some(limit) = usage.remaining.map(|_| usage.limit) else {
            continue; // unlimited
        };
        let exhausted = |remaining: Option<i64>| remaining.is_some_and(|left| left <= 0);
        let data = || {
            json!({
                "org_id": after.org_id,
                "feature": feature.key,
                "feature_name": feature.display_name(),
                "plan": is.plan,
                "used": usage.used,
                "limit": limit,
                "remaining": usage.remaining,
                "soft": usage.soft,
                "period_start": usage.period.end.map(|_| usage.period.start),
                "resets_at": usage.period.end,
            })
        };
        if !was_usage.warn && usage.warn {
            notices.push(BillingNotice::Webhook {
                event_type: "usage.warning",
                data: data(),
            });
        }
        if !exhausted(was_usage.remaining) && exhausted(usage.remaining) {
            notices.push(BillingNotice::Webhook {
                event_type: "usage.limit_reached",
                data: data(),
            });
        }
    }
    notices
}

/// Everything one org's billing change implies beyond its rows, decided
/// from the state before and after the write at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeEffects {
    /// Webhooks (`type`, `data`); each also reaches the org's live streams
    /// as an `entitlements` message ([`entitlements_message`]).
    pub webhooks: Vec<(&'static str, Value)>,
    /// What may fire prompt rules (for the org's acting user, else its owner).
    pub triggers: Vec<TriggerFact>,
    /// The plan the org converted to from the default plan: its owner's
    /// referral `converted` event.
    pub converted_to: Option<String>,
    /// The plan to credit to the org's most recently clicked prompt: an
    /// upgrade, or a first conversion even where the catalog's order does
    /// not call it an upgrade.
    pub credit_plan: Option<String>,
}

/// What a write that took `before` to `after` implies; nothing when the
/// write changed nothing (`version` unchanged).
pub fn change_effects(
    catalog: &Catalog,
    grace: Duration,
    before: &OrgState,
    after: &OrgState,
    now: DateTime<Utc>,
) -> ChangeEffects {
    let mut effects = ChangeEffects::default();
    if before.version == after.version {
        return effects;
    }
    let mut upgraded_to = None;
    for notice in billing_notices(catalog, grace, before, after, now) {
        match notice {
            BillingNotice::Webhook { event_type, data } => {
                let feature = data
                    .get("feature")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                match (event_type, feature) {
                    ("usage.warning", Some(feature)) => {
                        effects.triggers.push(TriggerFact::UsageWarning { feature })
                    }
                    ("usage.limit_reached", Some(feature)) => {
                        effects.triggers.push(TriggerFact::LimitReached {
                            feature,
                            denied: false,
                        })
                    }
                    ("subscription.changed", _)
                        if data.get("upgrade") == Some(&Value::Bool(true)) =>
                    {
                        upgraded_to = data.get("plan").and_then(Value::as_str).map(str::to_owned);
                    }
                    _ => {}
                }
                effects.webhooks.push((event_type, data));
            }
            BillingNotice::Converted { to_plan, .. } => effects.converted_to = Some(to_plan),
        }
    }
    effects.credit_plan = upgraded_to.or_else(|| effects.converted_to.clone());
    let status = |state: &OrgState| state.subscription.as_ref().map(|s| s.status);
    let (was, is) = (status(before), status(after));
    if is == Some(SubscriptionStatus::Trialing) && was != is {
        let ends_at = after.subscription.as_ref().and_then(|s| s.trial_ends_at);
        effects.triggers.push(TriggerFact::TrialEnding { ends_at });
    }
    if is == Some(SubscriptionStatus::PastDue) && was != is {
        let since = after
            .subscription
            .as_ref()
            .and_then(|s| s.past_due_since)
            .unwrap_or(now);
        effects.triggers.push(TriggerFact::GraceEnding {
            ends_at: since + grace,
        });
    }
    effects
}

/// The live `entitlements` message of a billing webhook: its `data` with
/// the webhook's `type`.
pub fn entitlements_message(event_type: &str, data: &Value) -> Value {
    let mut payload = serde_json::Map::new();
    payload.insert("type".into(), event_type.into());
    if let Value::Object(fields) = data {
        payload.extend(fields.clone());
    }
    payload.into()
}
