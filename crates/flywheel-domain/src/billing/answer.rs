//! The wire shapes of billing decisions: what `check`, `consume` and
//! `release` answer, the upgrade preview, and the reply of every org
//! command (stored as the first answer of an idempotent request).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::catalog::{Catalog, FeatureKind, Limit, Price};
use super::org::{
    CommandOutcome, OrgCommand, OrgState, Reason, ScheduledChange, Subscription, UsageGrant,
};
use crate::error::DomainError;

/// The answer to `check`, `consume` and `release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageAnswer {
    /// Whether the org may use (or, for `consume`, did take) the units.
    pub allowed: bool,
    pub org_id: String,
    pub feature: String,
    /// `null` for an unknown feature.
    pub kind: Option<FeatureKind>,
    /// The plan that applies now.
    pub plan: Option<String>,
    /// Why it is denied, or `soft_limit_exceeded` when allowed past a soft
    /// limit. Absent when plainly allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Config features: the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Metered: units used this period.
    pub used: Option<i64>,
    /// Metered: the limit (`null` when unlimited).
    pub limit: Option<i64>,
    /// Metered: units left, allowance plus grants (`null` when unlimited).
    pub remaining: Option<i64>,
    pub unlimited: bool,
    /// The limit is soft: exceeding it is allowed and reported.
    pub soft: bool,
    /// Usage has reached the feature's `warn_at` share of the limit.
    pub warn: bool,
    /// Units used beyond the limit.
    pub overage: i64,
    /// Units of live grants left.
    pub granted: i64,
    /// Start of the current usage period (`null` for never-resetting totals).
    #[serde(serialize_with = "crate::wire_time::serialize_option")]
    pub period_start: Option<DateTime<Utc>>,
    /// When usage starts again from zero (`null` when it never does).
    #[serde(serialize_with = "crate::wire_time::serialize_option")]
    pub resets_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
}

/// What an upgrade prompt needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Preview {
    /// The feature's display name ("API calls").
    pub feature_name: String,
    /// "used 4 of 5", for metered features with a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_text: Option<String>,
    /// The cheapest plan that would allow the request; `null` when none does.
    pub upgrade_plan: Option<PlanSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanSummary {
    pub key: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
}

/// An org's subscription as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubscriptionView {
    pub org_id: String,
    /// The plan that applies now.
    pub plan: Option<String>,
    /// The stored subscription (`null`: on the default plan, never subscribed).
    pub subscription: Option<Subscription>,
    /// A change waiting for its boundary.
    pub scheduled: Option<ScheduledChange>,
    /// Payment lapsed past the grace period: the default plan applies.
    pub lapsed: bool,
    /// The anchor usage periods are counted from.
    pub anchor: DateTime<Utc>,
}

/// What an org command answers; stored as the first answer of an
/// idempotent request and replayed for its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Usage(UsageAnswer),
    Subscription(SubscriptionView),
    Grant(UsageGrant),
    Updated,
    /// A Stripe event older than the last one applied: nothing changed.
    Stale,
}

impl OrgState {
    /// The full answer for `feature`: the decision plus what a client shows.
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &self,
        catalog: &Catalog,
        feature: &str,
        required: i64,
        with_preview: bool,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> UsageAnswer {
        let decision = self.check(catalog, feature, required, grace, now);
        let metered = decision.metered;
        let limit = metered.and_then(|m| match m.limit {
            Limit::Units(n) => Some(n),
            Limit::Unlimited => None,
        });
        let preview = with_preview.then(|| self.preview(catalog, feature, required, grace, now));
        UsageAnswer {
            allowed: decision.allowed,
            org_id: self.org_id.clone(),
            feature: feature.to_string(),
            kind: decision.kind,
            plan: decision.plan.map(str::to_string),
            reason: decision.reason,
            value: decision.value.cloned(),
            used: metered.map(|m| m.used),
            limit,
            remaining: metered.and_then(|m| m.remaining),
            unlimited: metered.is_some_and(|m| m.limit == Limit::Unlimited),
            soft: metered.is_some_and(|m| m.soft),
            warn: metered.is_some_and(|m| m.warn),
            overage: metered.map_or(0, |m| m.overage),
            granted: metered.map_or(0, |m| m.granted),
            period_start: metered
                .filter(|m| m.period.resets())
                .map(|m| m.period.start),
            resets_at: metered.and_then(|m| m.period.end),
            preview,
        }
    }

    /// The upgrade preview: display name, "used N of M", and the cheapest
    /// plan (other than the current one) under which the request would be
    /// allowed with the org's current usage.
    pub fn preview(
        &self,
        catalog: &Catalog,
        feature: &str,
        required: i64,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Preview {
        let decision = self.check(catalog, feature, required, grace, now);
        let Some((_, definition)) = catalog.feature(feature) else {
            return Preview {
                feature_name: feature.to_string(),
                usage_text: None,
                upgrade_plan: None,
            };
        };
        let used = decision.metered.map_or(0, |m| m.used);
        let usage_text = decision.metered.and_then(|m| match m.limit {
            Limit::Units(limit) => Some(format!("used {} of {limit}", m.used)),
            Limit::Unlimited => None,
        });
        let current = decision.plan;
        let upgrade_plan = catalog
            .plans_by_price()
            .into_iter()
            .filter(|plan| Some(plan.key.as_str()) != current)
            .find(|plan| {
                plan.features
                    .get(feature)
                    .is_some_and(|entry| match definition.kind {
                        FeatureKind::Boolean => entry.enabled,
                        FeatureKind::Config => true,
                        FeatureKind::Metered => match entry.limit.unwrap_or(Limit::Unlimited) {
                            Limit::Unlimited => true,
                            Limit::Units(limit) => !entry.hard || used + required <= limit,
                        },
                    })
            })
            .map(|plan| PlanSummary {
                key: plan.key.clone(),
                name: plan.display_name().to_string(),
                price: plan.price.clone(),
            });
        Preview {
            feature_name: definition.display_name().to_string(),
            usage_text,
            upgrade_plan,
        }
    }

    pub fn subscription_view(
        &self,
        catalog: &Catalog,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> SubscriptionView {
        let access = self.access(catalog, grace, now);
        SubscriptionView {
            org_id: self.org_id.clone(),
            plan: access.plan.map(|(_, plan)| plan.key.clone()),
            subscription: self.subscription.clone(),
            scheduled: self
                .subscription
                .as_ref()
                .and_then(|s| s.scheduled.clone())
                .filter(|change| change.at > now),
            lapsed: access.lapsed.is_some(),
            anchor: access.anchor,
        }
    }

    /// Applies a command and builds its reply. An `Err` leaves the state
    /// untouched.
    pub fn execute(
        &mut self,
        catalog: &Catalog,
        command: &OrgCommand,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<Reply, DomainError> {
        let now = self.monotonic(now);
        let outcome = self.apply(catalog, command, grace, now)?;
        Ok(match (command, outcome) {
            (OrgCommand::Consume { feature, amount }, CommandOutcome::Usage { applied }) => {
                let mut answer = self.answer(catalog, feature, 0, false, grace, now);
                answer.allowed = applied;
                if !applied {
                    // The units were refused: report the request's own reason.
                    answer.reason = self.check(catalog, feature, *amount, grace, now).reason;
                } else if answer.overage > 0 && answer.soft {
                    answer.reason = Some(Reason::SoftLimitExceeded);
                }
                Reply::Usage(answer)
            }
            (OrgCommand::Release { feature, .. }, _) => {
                let mut answer = self.answer(catalog, feature, 0, false, grace, now);
                answer.allowed = true;
                Reply::Usage(answer)
            }
            (
                OrgCommand::ChangePlan { .. }
                | OrgCommand::Cancel { .. }
                | OrgCommand::SetStatus { .. },
                _,
            ) => Reply::Subscription(self.subscription_view(catalog, grace, now)),
            (_, CommandOutcome::Stale) => Reply::Stale,
            (OrgCommand::StripeSync(_), _) => {
                Reply::Subscription(self.subscription_view(catalog, grace, now))
            }
            (OrgCommand::AddGrant { id, .. }, _) => Reply::Grant(
                self.grants
                    .iter()
                    .find(|grant| grant.id == *id)
                    .cloned()
                    .expect("the grant was just added"),
            ),
            _ => Reply::Updated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn catalog() -> Catalog {
        Catalog::compile(
            serde_json::from_value(json!({
                "features": [{"key": "projects", "name": "Projects", "kind": "metered"}, {"key": "sso", "kind": "boolean"}],
                "plans": [
                    {"key": "free", "default": true, "features": {"projects": {"limit": 5, "reset": "never"}}},
                    {"key": "team", "name": "Team", "price": {"amount": 99000, "currency": "usd", "interval": "year"},
                     "features": {"projects": {"limit": "unlimited", "reset": "never"}, "sso": {}}},
                    {"key": "pro", "name": "Pro", "price": {"amount": 2900, "currency": "usd"},
                     "features": {"projects": {"limit": 20, "reset": "never"}}}
                ]
            }))
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_preview_names_usage_and_the_cheapest_plan_that_allows() {
        let c = catalog();
        let now = at("2027-01-02T00:00:00Z");
        let mut state = OrgState::new("acme", at("2027-01-01T00:00:00Z"));
        state
            .execute(
                &c,
                &OrgCommand::Consume {
                    feature: "projects".into(),
                    amount: 4,
                },
                Duration::days(7),
                now,
            )
            .unwrap();
        let answer = state.answer(&c, "projects", 2, true, Duration::days(7), now);
        assert!(!answer.allowed);
        let preview = answer.preview.unwrap();
        assert_eq!(preview.feature_name, "Projects");
        assert_eq!(preview.usage_text.as_deref(), Some("used 4 of 5"));
        assert_eq!(preview.upgrade_plan.unwrap().key, "pro");
        // 30 more projects: only the unlimited team plan allows it.
        let big = state.preview(&c, "projects", 30, Duration::days(7), now);
        assert_eq!(big.upgrade_plan.unwrap().key, "team");
        let sso = state.preview(&c, "sso", 1, Duration::days(7), now);
        assert_eq!((sso.feature_name.as_str(), sso.usage_text), ("sso", None));
        assert_eq!(sso.upgrade_plan.unwrap().key, "team");
        assert!(state
            .preview(&c, "nope", 1, Duration::days(7), now)
            .upgrade_plan
            .is_none());
    }

    #[test]
    fn a_consume_reply_says_what_happened_and_round_trips_as_json() {
        let c = catalog();
        let now = at("2027-01-02T00:00:00Z");
        let mut state = OrgState::new("acme", at("2027-01-01T00:00:00Z"));
        let take = |state: &mut OrgState, amount| {
            state
                .execute(
                    &c,
                    &OrgCommand::Consume {
                        feature: "projects".into(),
                        amount,
                    },
                    Duration::days(7),
                    now,
                )
                .unwrap()
        };
        let Reply::Usage(ok) = take(&mut state, 5) else {
            panic!()
        };
        assert_eq!(
            (ok.allowed, ok.used, ok.remaining, ok.reason),
            (true, Some(5), Some(0), None)
        );
        assert_eq!((ok.period_start, ok.resets_at), (None, None));
        let denied = take(&mut state, 1);
        let Reply::Usage(answer) = &denied else {
            panic!()
        };
        assert_eq!(
            (answer.allowed, answer.reason, answer.used),
            (false, Some(Reason::LimitReached), Some(5))
        );
        let json = serde_json::to_value(&denied).unwrap();
        assert_eq!(json["reply"], "usage");
        assert_eq!(json["reason"], "limit_reached");
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), denied);
    }
}
