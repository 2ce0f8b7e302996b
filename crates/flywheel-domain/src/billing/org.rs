//! An org's billing state (subscription, overrides, grants, usage) and the
//! rules over it: which plan applies now, `check`, `consume`, `release`,
//! metering, and plan changes. Pure: the store loads an [`OrgState`], locks
//! it, applies an [`OrgCommand`] here, and saves the result in the same
//! transaction.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::catalog::{
    Aggregation, BillingInterval, Catalog, FeatureKind, Limit, MeterDefinition, PlanDefinition,
    PlanFeature,
};
use super::period::{period_containing, Period, ResetInterval};
use super::FastMap;
use crate::error::DomainError;

/// Stripe's subscription statuses, plus what the API can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    /// A payment failed: access continues for the grace period.
    PastDue,
    /// Payment failed for good (Stripe's `unpaid`, `incomplete_expired`).
    Unpaid,
    /// Not paid yet (Stripe's `incomplete`, `paused`).
    Incomplete,
    Canceled,
}

/// A plan change waiting for a boundary (a downgrade or a cancellation at
/// period end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduledChange {
    pub plan: String,
    pub at: DateTime<Utc>,
    /// The change is a cancellation (to the default plan).
    #[serde(default)]
    pub cancel: bool,
}

/// Where the subscription is managed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StripeLink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// `created` of the newest Stripe event applied: an older one never
    /// overwrites newer state (Stripe does not deliver in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Subscription {
    pub plan: String,
    pub status: SubscriptionStatus,
    /// Usage periods and billing periods are counted from here.
    pub anchor: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<ScheduledChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_due_since: Option<DateTime<Utc>>,
    /// When the trial ends, while the subscription is `trialing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_ends_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe: Option<StripeLink>,
}

/// One-off units of a metered feature (a purchased top-up, a goodwill
/// credit), drawn after the plan's allowance, earliest-expiring first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageGrant {
    pub id: Uuid,
    pub feature: String,
    pub amount: i64,
    pub remaining: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl UsageGrant {
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// Usage of one feature in one period. `plan_used` is drawn from the plan's
/// allowance (and holds any soft-limit overage or a gauge's level);
/// `grant_used` from grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounter {
    pub period_start: DateTime<Utc>,
    pub plan_used: i64,
    pub grant_used: i64,
}

impl UsageCounter {
    pub fn used(&self) -> i64 {
        self.plan_used.saturating_add(self.grant_used)
    }
}

/// Everything Flywheel holds about one org's billing.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgState {
    pub org_id: String,
    /// The anchor of orgs on the default plan.
    pub created_at: DateTime<Utc>,
    pub subscription: Option<Subscription>,
    /// Per feature key, replacing the plan's entry.
    pub overrides: BTreeMap<String, PlanFeature>,
    pub grants: Vec<UsageGrant>,
    /// Per feature key, the counter of the latest period written.
    pub usage: FastMap<String, UsageCounter>,
    /// The org's Stripe customer, once checkout or a webhook linked it.
    pub stripe_customer_id: Option<String>,
    /// Bumped by every write; caches keep the highest version they saw.
    pub version: i64,
}

/// How long a `past_due` subscription keeps its plan.
pub const DEFAULT_PAST_DUE_GRACE: Duration = Duration::days(7);

/// Which plan applies to an org now, and from which anchor.
#[derive(Debug, Clone, Copy)]
pub struct Access<'c> {
    /// `None` when the catalog has no plans at all.
    pub plan: Option<(usize, &'c PlanDefinition)>,
    pub anchor: DateTime<Utc>,
    /// The paid plan stopped applying because payment lapsed (past the grace
    /// period, unpaid, incomplete): the default plan applies meanwhile.
    pub lapsed: Option<&'c PlanDefinition>,
}

/// Why a request is denied (or, for `soft_limit_exceeded`, allowed past its
/// limit). A closed set: clients may match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Reason {
    /// The feature is not in the org's plan (or is switched off there).
    NotInPlan,
    /// A hard limit: the request would exceed what remains.
    LimitReached,
    /// Allowed past a soft limit; the overage is reported.
    SoftLimitExceeded,
    /// The org's paid plan lapsed (payment failed past the grace period) and
    /// the default plan does not include the feature.
    NoActiveSubscription,
    /// The catalog has no such feature.
    UnknownFeature,
}

/// The answer to "may this org use this feature now?". Borrows from the
/// catalog, so a check allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision<'c> {
    pub allowed: bool,
    pub kind: Option<FeatureKind>,
    /// The plan that applies (`None` when the catalog has no plans).
    pub plan: Option<&'c str>,
    pub reason: Option<Reason>,
    /// Config features: the value.
    pub value: Option<&'c Value>,
    pub metered: Option<MeteredUsage>,
}

/// The usage side of a metered decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeteredUsage {
    pub used: i64,
    /// The plan's (or override's) limit; `Unlimited` when unlimited.
    pub limit: Limit,
    /// Units left, plan allowance plus live grants; `None` when unlimited.
    pub remaining: Option<i64>,
    /// Units of live grants not yet used.
    pub granted: i64,
    /// Units used beyond the limit (soft limits).
    pub overage: i64,
    pub soft: bool,
    /// Usage has reached `warn_at` of the limit.
    pub warn: bool,
    pub period: Period,
}

impl OrgState {
    /// An org Flywheel has not stored yet: on the default plan, anchored at
    /// `created_at`, no usage.
    pub fn new(org_id: impl Into<String>, created_at: DateTime<Utc>) -> Self {
        Self {
            org_id: org_id.into(),
            created_at,
            subscription: None,
            overrides: BTreeMap::new(),
            grants: Vec::new(),
            usage: FastMap::default(),
            stripe_customer_id: None,
            version: 0,
        }
    }

    /// The plan that applies at `now`. Scheduled changes take effect lazily
    /// (no job runs at the boundary, so nothing can fire twice).
    pub fn access<'c>(
        &self,
        catalog: &'c Catalog,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Access<'c> {
        let default = catalog.default_plan_entry();
        let Some(subscription) = &self.subscription else {
            return Access {
                plan: default,
                anchor: self.created_at,
                lapsed: None,
            };
        };
        let by_key = |key: &str| {
            catalog
                .plan_position(key)
                .map(|i| (i, &catalog.document.plans[i]))
                .or(default)
        };
        let anchor = subscription.anchor;
        if let Some(change) = &subscription.scheduled {
            if change.at <= now {
                return Access {
                    plan: by_key(&change.plan),
                    anchor,
                    lapsed: None,
                };
            }
        }
        let current = by_key(&subscription.plan);
        let lapsed = match subscription.status {
            SubscriptionStatus::Active | SubscriptionStatus::Trialing => false,
            SubscriptionStatus::PastDue => subscription
                .past_due_since
                .is_some_and(|since| now >= since + grace),
            SubscriptionStatus::Unpaid | SubscriptionStatus::Incomplete => true,
            SubscriptionStatus::Canceled => {
                return Access {
                    plan: default,
                    anchor,
                    lapsed: None,
                }
            }
        };
        if lapsed {
            Access {
                plan: default,
                anchor,
                lapsed: current.map(|(_, plan)| plan),
            }
        } else {
            Access {
                plan: current,
                anchor,
                lapsed: None,
            }
        }
    }

    /// The entry that governs a feature: the org's override, else the plan's.
    fn entry<'a>(
        &'a self,
        catalog: &'a Catalog,
        access: &Access<'a>,
        key: &str,
        index: usize,
    ) -> Option<&'a PlanFeature> {
        self.overrides.get(key).or_else(|| {
            access
                .plan
                .and_then(|(plan, _)| catalog.plan_feature(plan, index))
        })
    }

    fn live_grants(&self, feature: &str, now: DateTime<Utc>) -> i64 {
        self.grants
            .iter()
            .filter(|g| g.feature == feature && g.is_live(now))
            .map(|g| g.remaining)
            .sum()
    }

    /// Time as this org has seen it: never before its creation or the start
    /// of a period it already wrote. Nodes' clocks differ and a request's
    /// time is taken before it waits for the org's lock, so without this a
    /// late request could land in an earlier period and see it empty.
    pub fn monotonic(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.usage
            .values()
            .map(|counter| counter.period_start)
            .fold(now.max(self.created_at), DateTime::max)
    }

    fn counter(&self, feature: &str, period: &Period) -> UsageCounter {
        match self.usage.get(feature) {
            // A stored counter newer than `period` (a reader behind the
            // writer's clock) is still the current one.
            Some(counter) if counter.period_start >= period.start => *counter,
            _ => UsageCounter {
                period_start: period.start,
                plan_used: 0,
                grant_used: 0,
            },
        }
    }

    /// `check`: may the org use `required` units of `feature` now?
    /// Read-only and advisory.
    pub fn check<'c>(
        &'c self,
        catalog: &'c Catalog,
        feature: &str,
        required: i64,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Decision<'c> {
        let access = self.access(catalog, grace, now);
        let plan = access.plan.map(|(_, plan)| plan.key.as_str());
        let Some((index, definition)) = catalog.feature(feature) else {
            return Decision {
                allowed: false,
                kind: None,
                plan,
                reason: Some(Reason::UnknownFeature),
                value: None,
                metered: None,
            };
        };
        let kind = Some(definition.kind);
        let denied = |reason| Decision {
            allowed: false,
            kind,
            plan,
            reason: Some(reason),
            value: None,
            metered: None,
        };
        let not_in_plan = || {
            let lapsed_had_it = access
                .lapsed
                .is_some_and(|paid| paid.features.contains_key(feature));
            denied(if lapsed_had_it {
                Reason::NoActiveSubscription
            } else {
                Reason::NotInPlan
            })
        };
        let Some(entry) = self.entry(catalog, &access, feature, index) else {
            return not_in_plan();
        };
        match definition.kind {
            FeatureKind::Boolean if !entry.enabled => not_in_plan(),
            FeatureKind::Boolean => Decision {
                allowed: true,
                kind,
                plan,
                reason: None,
                value: None,
                metered: None,
            },
            FeatureKind::Config => Decision {
                allowed: true,
                kind,
                plan,
                reason: None,
                value: entry.value.as_ref(),
                metered: None,
            },
            FeatureKind::Metered => {
                let additive = catalog
                    .meter_of_feature(index)
                    .is_none_or(|meter| meter.aggregation.is_additive());
                let usage = self.metered_usage(feature, entry, additive, access.anchor, now);
                let (allowed, reason) = match usage.remaining {
                    None => (true, None),
                    Some(remaining) if required <= remaining => (true, None),
                    Some(_) if usage.soft => (true, Some(Reason::SoftLimitExceeded)),
                    Some(_) => (false, Some(Reason::LimitReached)),
                };
                Decision {
                    allowed,
                    kind,
                    plan,
                    reason,
                    value: None,
                    metered: Some(usage),
                }
            }
        }
    }

    fn metered_usage(
        &self,
        feature: &str,
        entry: &PlanFeature,
        additive: bool,
        anchor: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> MeteredUsage {
        let period = period_containing(anchor, entry.reset, now);
        let counter = self.counter(feature, &period);
        let used = counter.used();
        let granted = self.live_grants(feature, now);
        let limit = entry.limit.unwrap_or(Limit::Unlimited);
        let (remaining, overage, warn) = match limit {
            Limit::Unlimited => (None, 0, false),
            Limit::Units(limit) => {
                let (remaining, overage) = if additive {
                    (
                        (limit - counter.plan_used).max(0) + granted,
                        (counter.plan_used - limit).max(0),
                    )
                } else {
                    // A gauge: grants raise the ceiling instead of being drawn.
                    (
                        (limit + granted - used).max(0),
                        (used - limit - granted).max(0),
                    )
                };
                let warn = used as f64 >= entry.warn_at * limit as f64;
                (Some(remaining), overage, warn)
            }
        };
        MeteredUsage {
            used,
            limit,
            remaining,
            granted,
            overage,
            soft: !entry.hard,
            warn,
            period,
        }
    }
}

/// How a plan change is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Timing {
    Immediate,
    PeriodEnd,
}

/// A write to one org, applied under the org's lock in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum OrgCommand {
    /// Take units of a metered feature (all or nothing under a hard limit).
    Consume { feature: String, amount: i64 },
    /// Give units back (a deleted project, a refunded call).
    Release { feature: String, amount: i64 },
    /// Move to a plan; `timing` defaults by direction (upgrade now,
    /// downgrade at period end).
    ChangePlan {
        plan: String,
        timing: Option<Timing>,
    },
    /// Back to the default plan, at period end unless `Immediate`.
    Cancel { timing: Timing },
    /// Add units of a metered feature.
    AddGrant {
        id: Uuid,
        feature: String,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        reason: Option<String>,
    },
    /// Replace (or with `None` remove) the org's override of a feature.
    SetOverride {
        feature: String,
        entry: Option<PlanFeature>,
    },
    /// Mark payment state (from the API or Stripe).
    SetStatus { status: SubscriptionStatus },
    /// What a Stripe event says (Stripe is the billing truth).
    StripeSync(StripeSync),
    /// The org's Stripe customer, created by Flywheel before Checkout.
    LinkStripeCustomer { customer_id: String },
}

/// A Stripe event, reduced to what it means for one org.
#[derive(Debug, Clone, PartialEq)]
pub struct StripeSync {
    /// The event's `created`: an event older than the last one applied
    /// changes nothing (Stripe does not deliver in order).
    pub event_created: DateTime<Utc>,
    pub customer_id: Option<String>,
    pub subscription_id: Option<String>,
    pub change: StripeChange,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StripeChange {
    /// The subscription's current state.
    Subscription {
        /// The plan its prices map to; `None` when no price maps to a plan
        /// (the current plan is kept).
        plan: Option<String>,
        status: SubscriptionStatus,
        current_period_start: Option<DateTime<Utc>>,
        current_period_end: Option<DateTime<Utc>>,
        cancel_at_period_end: bool,
        cancel_at: Option<DateTime<Utc>>,
        /// When the trial ends (Stripe's `trial_end`), if there is one.
        trial_end: Option<DateTime<Utc>>,
        deleted: bool,
    },
    /// An invoice was paid: a `past_due` subscription is active again.
    InvoicePaid,
    /// A payment failed: `past_due` (the grace period starts).
    PaymentFailed,
    /// Checkout completed: the org is this Stripe customer.
    Linked,
}

/// What a command did, beyond the new state.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    /// `consume` / `release`: whether the units moved. The full decision is
    /// read back from the new state with [`OrgState::check`].
    Usage {
        applied: bool,
    },
    /// A plan change: what applies now, and what is scheduled.
    Plan {
        effective_plan: Option<String>,
        scheduled: Option<ScheduledChange>,
    },
    Granted,
    Updated,
    /// A Stripe event older than the last one applied: ignored.
    Stale,
}

fn bad(code: &'static str, message: impl Into<String>) -> DomainError {
    DomainError::invalid(code, message)
}

impl OrgState {
    /// Applies a command. An `Err` leaves the state untouched.
    pub fn apply(
        &mut self,
        catalog: &Catalog,
        command: &OrgCommand,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<CommandOutcome, DomainError> {
        let now = self.monotonic(now);
        self.settle(now);
        match command {
            OrgCommand::Consume { feature, amount } => {
                let applied = self.consume(catalog, feature, *amount, false, grace, now)?;
                Ok(CommandOutcome::Usage { applied })
            }
            OrgCommand::Release { feature, amount } => {
                self.release(catalog, feature, *amount, grace, now)?;
                Ok(CommandOutcome::Usage { applied: true })
            }
            OrgCommand::ChangePlan { plan, timing } => {
                self.change_plan(catalog, plan, *timing, now)
            }
            OrgCommand::Cancel { timing } => {
                let default = catalog
                    .default_plan()
                    .ok_or_else(|| bad("no_default_plan", "the catalog has no default plan"))?
                    .key
                    .clone();
                self.move_to(catalog, &default, *timing, true, now)
            }
            OrgCommand::AddGrant {
                id,
                feature,
                amount,
                expires_at,
                reason,
            } => {
                self.metered_feature(catalog, feature)?;
                if *amount <= 0 {
                    return Err(bad("invalid_amount", "a grant adds at least 1 unit"));
                }
                if expires_at.is_some_and(|at| at <= now) {
                    return Err(bad("invalid_expiry", "`expires_at` is in the past"));
                }
                self.grants.push(UsageGrant {
                    id: *id,
                    feature: feature.clone(),
                    amount: *amount,
                    remaining: *amount,
                    expires_at: *expires_at,
                    created_at: now,
                    reason: reason.clone(),
                });
                Ok(CommandOutcome::Granted)
            }
            OrgCommand::SetOverride { feature, entry } => {
                let Some((_, definition)) = catalog.feature(feature) else {
                    return Err(DomainError::not_found(
                        "unknown_feature",
                        format!("no feature `{feature}` in the catalog"),
                    ));
                };
                match entry {
                    Some(entry) => {
                        super::catalog::check_plan_feature(definition.kind, entry)
                            .map_err(|message| bad("invalid_override", message))?;
                        self.overrides.insert(feature.clone(), entry.clone());
                    }
                    None => {
                        self.overrides.remove(feature);
                    }
                }
                Ok(CommandOutcome::Updated)
            }
            OrgCommand::SetStatus { status } => {
                let subscription = self.subscription.as_mut().ok_or_else(|| {
                    DomainError::new(
                        crate::error::ErrorKind::Conflict,
                        "no_subscription",
                        "the org is on the default plan without a subscription",
                    )
                })?;
                set_status(subscription, *status, now);
                Ok(CommandOutcome::Updated)
            }
            OrgCommand::StripeSync(sync) => Ok(self.stripe_sync(catalog, sync, grace, now)),
            OrgCommand::LinkStripeCustomer { customer_id } => {
                self.stripe_customer_id = Some(customer_id.clone());
                Ok(CommandOutcome::Updated)
            }
        }
    }

    fn stripe_sync(
        &mut self,
        catalog: &Catalog,
        sync: &StripeSync,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> CommandOutcome {
        let last = self
            .subscription
            .as_ref()
            .and_then(|s| s.stripe.as_ref())
            .and_then(|link| link.last_event_at);
        if last.is_some_and(|last| sync.event_created < last) {
            return CommandOutcome::Stale;
        }
        if let Some(customer) = &sync.customer_id {
            self.stripe_customer_id = Some(customer.clone());
        }
        let default = catalog.default_plan().map(|plan| plan.key.clone());
        match &sync.change {
            StripeChange::Linked => {}
            StripeChange::Subscription {
                plan,
                status,
                current_period_start,
                current_period_end,
                cancel_at_period_end,
                cancel_at,
                trial_end,
                deleted,
            } => {
                let anchor = current_period_start.unwrap_or(sync.event_created);
                let same_subscription = self
                    .subscription
                    .as_ref()
                    .and_then(|s| s.stripe.as_ref())
                    .is_some_and(|link| {
                        link.subscription_id.is_some()
                            && link.subscription_id == sync.subscription_id
                    });
                let keep_plan = self
                    .subscription
                    .as_ref()
                    .map(|s| s.plan.clone())
                    .or(default.clone());
                if self.subscription.is_none() {
                    // From the default plan: same anchor until rebased below.
                    self.subscription = Some(Subscription {
                        plan: keep_plan.clone().unwrap_or_default(),
                        status: SubscriptionStatus::Active,
                        anchor: self.created_at,
                        scheduled: None,
                        past_due_since: None,
                        trial_ends_at: None,
                        stripe: None,
                    });
                }
                if !same_subscription {
                    // A new subscription starts a new billing cycle: usage of
                    // the current period carries into it.
                    self.rebase_anchor(catalog, anchor, grace, now);
                }
                let subscription = self.subscription.as_mut().expect("created above");
                subscription.plan = plan.clone().or(keep_plan).unwrap_or_default();
                let status = if *deleted {
                    SubscriptionStatus::Canceled
                } else {
                    *status
                };
                set_status(subscription, status, sync.event_created);
                subscription.trial_ends_at =
                    trial_end.filter(|_| status == SubscriptionStatus::Trialing);
                let cancel_time = if *cancel_at_period_end {
                    *current_period_end
                } else {
                    *cancel_at
                };
                subscription.scheduled = match (cancel_time, &default) {
                    (Some(at), Some(default)) if status != SubscriptionStatus::Canceled => {
                        Some(ScheduledChange {
                            plan: default.clone(),
                            at,
                            cancel: true,
                        })
                    }
                    _ => None,
                };
            }
            StripeChange::InvoicePaid | StripeChange::PaymentFailed => {
                let Some(subscription) = self.subscription.as_mut() else {
                    return CommandOutcome::Updated;
                };
                let known = subscription
                    .stripe
                    .as_ref()
                    .and_then(|link| link.subscription_id.as_ref());
                if sync.subscription_id.is_some()
                    && known.is_some()
                    && known != sync.subscription_id.as_ref()
                {
                    // An invoice of another (older) subscription.
                    return CommandOutcome::Updated;
                }
                match sync.change {
                    StripeChange::PaymentFailed => set_status(
                        subscription,
                        SubscriptionStatus::PastDue,
                        sync.event_created,
                    ),
                    _ if matches!(
                        subscription.status,
                        SubscriptionStatus::PastDue
                            | SubscriptionStatus::Unpaid
                            | SubscriptionStatus::Incomplete
                    ) =>
                    {
                        set_status(subscription, SubscriptionStatus::Active, sync.event_created)
                    }
                    _ => {}
                }
            }
        }
        if let Some(subscription) = self.subscription.as_mut() {
            let link = subscription.stripe.get_or_insert_with(StripeLink::default);
            if sync.customer_id.is_some() {
                link.customer_id = sync.customer_id.clone();
            }
            if sync.subscription_id.is_some()
                && matches!(sync.change, StripeChange::Subscription { .. })
            {
                link.subscription_id = sync.subscription_id.clone();
            }
            link.last_event_at = Some(
                link.last_event_at
                    .map_or(sync.event_created, |last| last.max(sync.event_created)),
            );
        }
        CommandOutcome::Updated
    }

    /// Makes a due scheduled change permanent, so later changes start from
    /// it. Idempotent; reading applies the same rule without writing.
    pub fn settle(&mut self, now: DateTime<Utc>) {
        if let Some(subscription) = &mut self.subscription {
            if let Some(change) = subscription.scheduled.take_if(|change| change.at <= now) {
                subscription.plan = change.plan;
                subscription.status = SubscriptionStatus::Active;
                subscription.past_due_since = None;
            }
        }
    }

    fn metered_feature(&self, catalog: &Catalog, feature: &str) -> Result<usize, DomainError> {
        match catalog.feature(feature) {
            None => Err(DomainError::not_found(
                "unknown_feature",
                format!("no feature `{feature}` in the catalog"),
            )),
            Some((index, definition)) if definition.kind == FeatureKind::Metered => Ok(index),
            Some(_) => Err(bad(
                "feature_not_metered",
                format!("`{feature}` is not a metered feature"),
            )),
        }
    }

    fn usage_target(
        &self,
        catalog: &Catalog,
        feature: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<(PlanFeature, Period)>, DomainError> {
        let index = self.metered_feature(catalog, feature)?;
        if let Some(meter) = catalog.meter_of_feature(index) {
            if !meter.aggregation.is_additive() {
                return Err(bad(
                    "feature_not_consumable",
                    format!(
                        "`{feature}` is a level set by the {:?} meter `{}`, not consumed in units",
                        meter.aggregation, meter.key
                    ),
                ));
            }
        }
        let access = self.access(catalog, grace, now);
        Ok(self.entry(catalog, &access, feature, index).map(|entry| {
            let period = period_containing(access.anchor, entry.reset, now);
            (entry.clone(), period)
        }))
    }

    /// Takes `amount` units: from the plan's allowance, then from live grants
    /// earliest-expiring first. Under a hard limit it is all or nothing;
    /// `force` (events, which already happened) and soft limits put what is
    /// left over the limit. Returns whether the units were taken.
    fn consume(
        &mut self,
        catalog: &Catalog,
        feature: &str,
        amount: i64,
        force: bool,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError> {
        if amount <= 0 {
            return Err(bad("invalid_amount", "`amount` is a whole number ≥ 1"));
        }
        let Some((entry, period)) = self.usage_target(catalog, feature, grace, now)? else {
            if force {
                // Not in the plan: still recorded, so an upgrade sees it.
                let period = period_containing(
                    self.access(catalog, grace, now).anchor,
                    ResetInterval::Month,
                    now,
                );
                let mut counter = self.counter(feature, &period);
                counter.plan_used = counter.plan_used.saturating_add(amount);
                self.usage.insert(feature.to_string(), counter);
                return Ok(true);
            }
            return Ok(false);
        };
        let mut counter = self.counter(feature, &period);
        let room = match entry.limit.unwrap_or(Limit::Unlimited) {
            Limit::Unlimited => i64::MAX,
            Limit::Units(limit) => (limit - counter.plan_used).max(0),
        };
        let from_plan = amount.min(room);
        let mut rest = amount - from_plan;
        if rest > 0 && entry.hard && !force && self.live_grants(feature, now) < rest {
            return Ok(false);
        }
        counter.plan_used += from_plan;
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| {
                self.grants[i].feature == feature
                    && self.grants[i].is_live(now)
                    && self.grants[i].remaining > 0
            })
            .collect();
        order.sort_by_key(|&i| {
            (
                self.grants[i].expires_at.is_none(),
                self.grants[i].expires_at,
                self.grants[i].created_at,
            )
        });
        for i in order {
            if rest == 0 {
                break;
            }
            let take = rest.min(self.grants[i].remaining);
            self.grants[i].remaining -= take;
            counter.grant_used += take;
            rest -= take;
        }
        counter.plan_used = counter.plan_used.saturating_add(rest);
        self.usage.insert(feature.to_string(), counter);
        Ok(true)
    }

    /// Gives units back in the reverse order of [`consume`](Self::consume):
    /// to live grants first (latest-expiring first), then to the plan's
    /// allowance; usage never goes below zero.
    fn release(
        &mut self,
        catalog: &Catalog,
        feature: &str,
        amount: i64,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        if amount <= 0 {
            return Err(bad("invalid_amount", "`amount` is a whole number ≥ 1"));
        }
        let period = match self.usage_target(catalog, feature, grace, now)? {
            Some((_, period)) => period,
            None => period_containing(
                self.access(catalog, grace, now).anchor,
                ResetInterval::Month,
                now,
            ),
        };
        let mut counter = self.counter(feature, &period);
        let mut rest = amount;
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| {
                self.grants[i].feature == feature
                    && self.grants[i].is_live(now)
                    && self.grants[i].remaining < self.grants[i].amount
            })
            .collect();
        order.sort_by_key(|&i| {
            (
                self.grants[i].expires_at.is_none(),
                self.grants[i].expires_at,
                self.grants[i].created_at,
            )
        });
        for i in order.into_iter().rev() {
            let take = rest
                .min(counter.grant_used)
                .min(self.grants[i].amount - self.grants[i].remaining);
            if take == 0 {
                break;
            }
            self.grants[i].remaining += take;
            counter.grant_used -= take;
            rest -= take;
        }
        counter.plan_used = (counter.plan_used - rest).max(0);
        self.usage.insert(feature.to_string(), counter);
        Ok(())
    }

    /// What one event adds to a meter, in the period containing `at` (the
    /// time the event was committed: a late event does not reopen a closed
    /// period). `unique_is_new` says, for `UNIQUE_COUNT`, whether the value
    /// was not seen this period (the store keeps the set).
    pub fn record(
        &mut self,
        catalog: &Catalog,
        meter: &MeterDefinition,
        reading: MeterReading,
        grace: Duration,
        at: DateTime<Utc>,
    ) {
        let at = self.monotonic(at);
        self.settle(at);
        let feature = meter.feature.as_str();
        match (meter.aggregation, reading) {
            // Errors are impossible: a meter feeds a metered feature.
            (Aggregation::Count | Aggregation::Sum, MeterReading::Add(units)) if units > 0 => {
                let _ = self.consume(catalog, feature, units, true, grace, at);
            }
            (Aggregation::UniqueCount, MeterReading::Add(units)) => {
                // A gauge of distinct values: grants raise its ceiling
                // instead of being drawn, as for the other gauges.
                let period = self.period_for(catalog, feature, grace, at);
                let mut counter = self.counter(feature, &period);
                counter.plan_used = counter.plan_used.saturating_add(units.max(0));
                self.usage.insert(feature.to_string(), counter);
            }
            (Aggregation::Max | Aggregation::Latest, MeterReading::Level(level)) => {
                let period = self.period_for(catalog, feature, grace, at);
                let mut counter = self.counter(feature, &period);
                counter.plan_used = if meter.aggregation == Aggregation::Max {
                    counter.plan_used.max(level)
                } else {
                    level
                };
                self.usage.insert(feature.to_string(), counter);
            }
            _ => {}
        }
    }

    /// The period a feature's usage is counted in now (month when the plan
    /// does not include the feature).
    pub fn period_for(
        &self,
        catalog: &Catalog,
        feature: &str,
        grace: Duration,
        at: DateTime<Utc>,
    ) -> Period {
        let access = self.access(catalog, grace, at);
        let reset = catalog
            .feature(feature)
            .and_then(|(index, _)| self.entry(catalog, &access, feature, index))
            .map_or(ResetInterval::Month, |entry| entry.reset);
        period_containing(access.anchor, reset, at)
    }

    fn change_plan(
        &mut self,
        catalog: &Catalog,
        plan: &str,
        timing: Option<Timing>,
        now: DateTime<Utc>,
    ) -> Result<CommandOutcome, DomainError> {
        if catalog.plan(plan).is_none() {
            return Err(DomainError::not_found(
                "unknown_plan",
                format!("no plan `{plan}` in the catalog"),
            ));
        }
        let current = self.current_plan_key(catalog);
        let timing = timing.unwrap_or(match &current {
            Some(current) if !catalog.is_upgrade(current, plan) => Timing::PeriodEnd,
            _ => Timing::Immediate,
        });
        self.move_to(catalog, plan, timing, false, now)
    }

    fn current_plan_key(&self, catalog: &Catalog) -> Option<String> {
        match &self.subscription {
            Some(subscription) if subscription.status != SubscriptionStatus::Canceled => {
                Some(subscription.plan.clone())
            }
            _ => catalog.default_plan().map(|plan| plan.key.clone()),
        }
    }

    fn move_to(
        &mut self,
        catalog: &Catalog,
        plan: &str,
        timing: Timing,
        cancel: bool,
        now: DateTime<Utc>,
    ) -> Result<CommandOutcome, DomainError> {
        let created_at = self.created_at;
        let current = self.current_plan_key(catalog);
        let subscription = self.subscription.get_or_insert_with(|| Subscription {
            plan: current.clone().unwrap_or_else(|| plan.to_string()),
            status: SubscriptionStatus::Active,
            anchor: created_at,
            scheduled: None,
            past_due_since: None,
            trial_ends_at: None,
            stripe: None,
        });
        if current.as_deref() == Some(plan) {
            // Already there: a pending change is withdrawn (e.g. "resume"
            // after a cancellation at period end).
            subscription.scheduled = None;
        } else {
            match timing {
                Timing::Immediate => {
                    // Same anchor, same period: usage carries, so the new
                    // remaining is the new limit minus what was used.
                    subscription.plan = plan.to_string();
                    subscription.status = SubscriptionStatus::Active;
                    subscription.past_due_since = None;
                    subscription.scheduled = None;
                }
                Timing::PeriodEnd => {
                    let interval = catalog
                        .plan(&subscription.plan)
                        .and_then(|plan| plan.price.as_ref())
                        .map_or(BillingInterval::Month, |price| price.interval);
                    let reset = match interval {
                        BillingInterval::Month => ResetInterval::Month,
                        BillingInterval::Year => ResetInterval::Year,
                    };
                    let end = period_containing(subscription.anchor, reset, now)
                        .end
                        .expect("billing periods end");
                    subscription.scheduled = Some(ScheduledChange {
                        plan: plan.to_string(),
                        at: end,
                        cancel,
                    });
                }
            }
        }
        Ok(CommandOutcome::Plan {
            effective_plan: Some(
                subscription
                    .scheduled
                    .as_ref()
                    .filter(|c| c.at <= now)
                    .map_or_else(|| subscription.plan.clone(), |c| c.plan.clone()),
            ),
            scheduled: subscription.scheduled.clone(),
        })
    }

    /// Moves the anchor (a new Stripe billing cycle), carrying the current
    /// period's usage into the period of the new anchor so a mid-period
    /// upgrade does not reset usage.
    pub fn rebase_anchor(
        &mut self,
        catalog: &Catalog,
        new_anchor: DateTime<Utc>,
        grace: Duration,
        now: DateTime<Utc>,
    ) {
        let Some(subscription) = &self.subscription else {
            return;
        };
        if subscription.anchor == new_anchor {
            return;
        }
        let features: Vec<String> = self.usage.keys().cloned().collect();
        let old: Vec<(String, Period)> = features
            .iter()
            .map(|f| (f.clone(), self.period_for(catalog, f, grace, now)))
            .collect();
        if let Some(subscription) = &mut self.subscription {
            subscription.anchor = new_anchor;
        }
        for (feature, old_period) in old {
            let new_period = self.period_for(catalog, &feature, grace, now);
            if let Some(counter) = self.usage.get_mut(&feature) {
                if counter.period_start == old_period.start {
                    counter.period_start = new_period.start;
                }
            }
        }
    }
}

fn set_status(subscription: &mut Subscription, status: SubscriptionStatus, now: DateTime<Utc>) {
    if status == SubscriptionStatus::PastDue {
        subscription.past_due_since.get_or_insert(now);
    } else {
        subscription.past_due_since = None;
    }
    subscription.status = status;
}

/// What one matching event contributes to a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterReading {
    /// Units to add (COUNT, SUM, a new UNIQUE_COUNT value).
    Add(i64),
    /// A level (MAX, LATEST).
    Level(i64),
}

/// What an event's properties give a meter: `None` when it does not match
/// its filters or lacks a usable value. `UNIQUE_COUNT` returns the value to
/// deduplicate as [`UniqueValue`]; the caller turns a first sighting into
/// `Add(1)`.
pub fn read_meter(
    meter: &MeterDefinition,
    properties: &serde_json::Map<String, Value>,
) -> Option<MeterInput> {
    if !super::catalog::filters_match(&meter.filters, properties) {
        return None;
    }
    let property = || {
        meter
            .property
            .as_deref()
            .and_then(|path| super::catalog::lookup(properties, path))
    };
    let number = || {
        property()
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite())
            .map(|n| n.round() as i64)
    };
    match meter.aggregation {
        Aggregation::Count => Some(MeterInput::Reading(MeterReading::Add(1))),
        Aggregation::Sum => number()
            .filter(|&n| n > 0)
            .map(|n| MeterInput::Reading(MeterReading::Add(n))),
        Aggregation::Max | Aggregation::Latest => {
            number().map(|n| MeterInput::Reading(MeterReading::Level(n)))
        }
        Aggregation::UniqueCount => property().filter(|v| !v.is_null()).map(|value| {
            MeterInput::Unique(match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }),
    }
}

/// See [`read_meter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterInput {
    Reading(MeterReading),
    /// A value of a `UNIQUE_COUNT` meter, counted once per period.
    Unique(String),
}
