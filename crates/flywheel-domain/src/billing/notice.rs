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
use super::org::OrgState;

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
