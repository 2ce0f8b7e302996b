//! The billing rules, end to end over a sample catalog: checks, consume and
//! release with grants, lazy resets, plan changes across boundaries, grace.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use super::catalog::{Catalog, CatalogDocument, FeatureKind, Limit};
use super::org::*;
use super::period::NEVER_PERIOD_START;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

const GRACE: Duration = DEFAULT_PAST_DUE_GRACE;

fn catalog() -> Catalog {
    let document: CatalogDocument = serde_json::from_value(json!({
        "features": [
            {"key": "api_calls", "name": "API calls", "kind": "metered"},
            {"key": "seats", "kind": "metered"},
            {"key": "storage_mb", "kind": "metered"},
            {"key": "sso", "kind": "boolean"},
            {"key": "export", "kind": "config"}
        ],
        "meters": [
            {"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT"},
            {"key": "storage", "feature": "storage_mb", "event": "storage_measured",
             "aggregation": "MAX", "property": "mb"}
        ],
        "plans": [
            {"key": "free", "default": true, "features": {
                "api_calls": {"limit": 5},
                "seats": {"limit": 3, "reset": "never"},
                "storage_mb": {"limit": 100},
                "export": {"value": {"max_rows": 100}}
            }},
            {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "features": {
                "api_calls": {"limit": 10, "hard": false, "warn_at": 0.5},
                "seats": {"limit": 10, "reset": "never"},
                "storage_mb": {"limit": 1000},
                "sso": {},
                "export": {"value": {"max_rows": 10000}}
            }},
            {"key": "scale", "price": {"amount": 9900, "currency": "usd"}, "features": {
                "api_calls": {"limit": "unlimited"},
                "seats": {"limit": 50, "reset": "never"},
                "sso": {}
            }}
        ]
    }))
    .unwrap();
    Catalog::compile(document).unwrap()
}

fn org(created: &str) -> OrgState {
    OrgState::new("acme", at(created))
}

fn consume(state: &mut OrgState, c: &Catalog, feature: &str, amount: i64, now: &str) -> bool {
    let outcome = state
        .apply(
            c,
            &OrgCommand::Consume {
                feature: feature.into(),
                amount,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    outcome == CommandOutcome::Usage { applied: true }
}

fn change_plan(state: &mut OrgState, c: &Catalog, plan: &str, now: &str) -> CommandOutcome {
    let command = OrgCommand::ChangePlan {
        plan: plan.into(),
        timing: None,
    };
    state.apply(c, &command, GRACE, at(now)).unwrap()
}

fn set_status(state: &mut OrgState, c: &Catalog, status: SubscriptionStatus, now: &str) {
    state
        .apply(c, &OrgCommand::SetStatus { status }, GRACE, at(now))
        .unwrap();
}

fn used(state: &OrgState, c: &Catalog, feature: &str, now: &str) -> i64 {
    state
        .check(c, feature, 1, GRACE, at(now))
        .metered
        .unwrap()
        .used
}

#[test]
fn a_new_org_is_on_the_default_plan_with_every_kind_answered() {
    let c = catalog();
    let state = org("2027-01-31T10:00:00Z");
    let now = at("2027-02-10T00:00:00Z");
    let sso = state.check(&c, "sso", 1, GRACE, now);
    assert_eq!((sso.allowed, sso.reason), (false, Some(Reason::NotInPlan)));
    assert_eq!(sso.plan, Some("free"));
    let export = state.check(&c, "export", 1, GRACE, now);
    assert!(export.allowed);
    assert_eq!(export.value, Some(&json!({"max_rows": 100})));
    let unknown = state.check(&c, "teleport", 1, GRACE, now);
    assert_eq!(
        (unknown.allowed, unknown.kind, unknown.reason),
        (false, None, Some(Reason::UnknownFeature))
    );
    let api = state.check(&c, "api_calls", 1, GRACE, now);
    assert_eq!(api.kind, Some(FeatureKind::Metered));
    let usage = api.metered.unwrap();
    assert_eq!(
        (usage.used, usage.limit, usage.remaining),
        (0, Limit::Units(5), Some(5))
    );
    // Anchored at creation, month end clamped.
    assert_eq!(usage.period.start, at("2027-01-31T10:00:00Z"));
    assert_eq!(usage.period.end, Some(at("2027-02-28T10:00:00Z")));
    let seats = state.check(&c, "seats", 1, GRACE, now).metered.unwrap();
    assert_eq!(
        (seats.period.start, seats.period.end),
        (NEVER_PERIOD_START, None)
    );
}

#[test]
fn a_hard_limit_is_all_or_nothing_and_exact_at_the_edge() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-02T00:00:00Z";
    assert!(consume(&mut state, &c, "api_calls", 4, now));
    assert!(!consume(&mut state, &c, "api_calls", 2, now), "4 + 2 > 5");
    assert_eq!(used(&state, &c, "api_calls", now), 4);
    assert!(consume(&mut state, &c, "api_calls", 1, now));
    let full = state.check(&c, "api_calls", 1, GRACE, at(now));
    assert_eq!(
        (full.allowed, full.reason),
        (false, Some(Reason::LimitReached))
    );
    let usage = full.metered.unwrap();
    assert_eq!(
        (usage.used, usage.remaining, usage.warn),
        (5, Some(0), true)
    );
    // A check for zero more is allowed at the limit.
    assert!(state.check(&c, "api_calls", 0, GRACE, at(now)).allowed);
}

#[test]
fn usage_resets_lazily_at_the_anchored_boundary() {
    let c = catalog();
    let mut state = org("2027-01-31T10:00:00Z");
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        5,
        "2027-02-28T09:59:59Z"
    ));
    assert!(
        !state
            .check(&c, "api_calls", 1, GRACE, at("2027-02-28T09:59:59Z"))
            .allowed
    );
    // The boundary is anchored: Feb 28 10:00 (clamped), not Feb 31.
    let next = state.check(&c, "api_calls", 1, GRACE, at("2027-02-28T10:00:00Z"));
    assert!(next.allowed);
    assert_eq!(next.metered.unwrap().used, 0);
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        2,
        "2027-03-30T00:00:00Z"
    ));
    assert_eq!(used(&state, &c, "api_calls", "2027-03-30T00:00:00Z"), 2);
    // Then back to the 31st.
    assert_eq!(used(&state, &c, "api_calls", "2027-03-31T10:00:00Z"), 0);
    // Never-resetting totals carry across every boundary.
    assert!(consume(&mut state, &c, "seats", 3, "2027-03-01T00:00:00Z"));
    assert_eq!(used(&state, &c, "seats", "2029-01-01T00:00:00Z"), 3);
}

#[test]
fn grants_are_drawn_after_the_allowance_earliest_expiring_first() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-05T00:00:00Z";
    let grant = |amount, expires: Option<&str>| OrgCommand::AddGrant {
        id: Uuid::new_v4(),
        feature: "api_calls".into(),
        amount,
        expires_at: expires.map(at),
        reason: None,
    };
    for command in [
        grant(10, None),
        grant(3, Some("2027-01-20T00:00:00Z")),
        grant(2, Some("2027-01-10T00:00:00Z")),
    ] {
        state.apply(&c, &command, GRACE, at(now)).unwrap();
    }
    let before = state
        .check(&c, "api_calls", 1, GRACE, at(now))
        .metered
        .unwrap();
    assert_eq!((before.remaining, before.granted), (Some(20), 15));
    assert!(consume(&mut state, &c, "api_calls", 8, now));
    let remaining: Vec<i64> = state.grants.iter().map(|g| g.remaining).collect();
    // 5 from the plan, then 2 from the Jan 10 grant, then 1 from the Jan 20 one.
    assert_eq!(remaining, [10, 2, 0]);
    // After Jan 20 the rest of that grant is gone; the undated one stays.
    let later = state
        .check(&c, "api_calls", 1, GRACE, at("2027-01-25T00:00:00Z"))
        .metered
        .unwrap();
    assert_eq!(
        (later.used, later.remaining, later.granted),
        (8, Some(10), 10)
    );
    // Release gives back to grants first (latest-expiring first), then the plan.
    state
        .apply(
            &c,
            &OrgCommand::Release {
                feature: "api_calls".into(),
                amount: 2,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    let remaining: Vec<i64> = state.grants.iter().map(|g| g.remaining).collect();
    assert_eq!(remaining, [10, 3, 1]);
    state
        .apply(
            &c,
            &OrgCommand::Release {
                feature: "api_calls".into(),
                amount: 50,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    assert_eq!(used(&state, &c, "api_calls", now), 0);
    assert_eq!(
        state.grants.iter().map(|g| g.remaining).collect::<Vec<_>>(),
        [10, 3, 2]
    );
}

#[test]
fn a_hard_limit_with_too_few_grants_takes_nothing() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-05T00:00:00Z";
    state
        .apply(
            &c,
            &OrgCommand::AddGrant {
                id: Uuid::new_v4(),
                feature: "api_calls".into(),
                amount: 2,
                expires_at: None,
                reason: None,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    assert!(!consume(&mut state, &c, "api_calls", 8, now));
    assert_eq!(used(&state, &c, "api_calls", now), 0);
    assert_eq!(state.grants[0].remaining, 2);
    assert!(consume(&mut state, &c, "api_calls", 7, now));
}

#[test]
fn a_soft_limit_allows_and_reports_the_overage() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-05T00:00:00Z";
    state
        .apply(
            &c,
            &OrgCommand::ChangePlan {
                plan: "pro".into(),
                timing: None,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    assert!(consume(&mut state, &c, "api_calls", 12, now));
    let decision = state.check(&c, "api_calls", 1, GRACE, at(now));
    assert_eq!(
        (decision.allowed, decision.reason),
        (true, Some(Reason::SoftLimitExceeded))
    );
    let usage = decision.metered.unwrap();
    assert_eq!(
        (usage.used, usage.overage, usage.remaining, usage.soft),
        (12, 2, Some(0), true)
    );
}

#[test]
fn an_upgrade_applies_at_once_and_carries_usage() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-05T00:00:00Z";
    assert!(consume(&mut state, &c, "api_calls", 4, now));
    let outcome = state
        .apply(
            &c,
            &OrgCommand::ChangePlan {
                plan: "pro".into(),
                timing: None,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    assert_eq!(
        outcome,
        CommandOutcome::Plan {
            effective_plan: Some("pro".into()),
            scheduled: None
        }
    );
    let usage = state
        .check(&c, "api_calls", 1, GRACE, at(now))
        .metered
        .unwrap();
    // New remaining = new limit − used.
    assert_eq!(
        (usage.used, usage.remaining, usage.warn),
        (4, Some(6), false)
    );
    assert!(state.check(&c, "sso", 1, GRACE, at(now)).allowed);
}

#[test]
fn a_downgrade_waits_for_the_period_end_and_then_resets() {
    let c = catalog();
    let mut state = org("2027-01-31T00:00:00Z");
    change_plan(&mut state, &c, "scale", "2027-02-01T00:00:00Z");
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        40,
        "2027-02-10T00:00:00Z"
    ));
    let outcome = change_plan(&mut state, &c, "free", "2027-02-10T00:00:00Z");
    let CommandOutcome::Plan {
        effective_plan,
        scheduled,
    } = outcome
    else {
        panic!()
    };
    assert_eq!(effective_plan.as_deref(), Some("scale"));
    assert_eq!(
        scheduled.as_ref().map(|s| s.at),
        Some(at("2027-02-28T00:00:00Z"))
    );
    // Still scale until the boundary (half-open), free from it on.
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-27T23:59:59Z"))
            .allowed
    );
    let after = state.check(&c, "sso", 1, GRACE, at("2027-02-28T00:00:00Z"));
    assert_eq!((after.allowed, after.plan), (false, Some("free")));
    // The new period starts from zero under the free limit.
    let usage = state
        .check(&c, "api_calls", 1, GRACE, at("2027-02-28T00:00:00Z"))
        .metered
        .unwrap();
    assert_eq!((usage.used, usage.limit), (0, Limit::Units(5)));
    // A write after the boundary settles the change for good.
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        1,
        "2027-03-01T00:00:00Z"
    ));
    let subscription = state.subscription.as_ref().unwrap();
    assert_eq!(
        (subscription.plan.as_str(), subscription.scheduled.is_none()),
        ("free", true)
    );
}

#[test]
fn an_immediate_downgrade_carries_usage_and_the_hard_limit_blocks() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = "2027-01-05T00:00:00Z";
    state
        .apply(
            &c,
            &OrgCommand::ChangePlan {
                plan: "pro".into(),
                timing: None,
            },
            GRACE,
            at(now),
        )
        .unwrap();
    assert!(consume(&mut state, &c, "api_calls", 8, now));
    state
        .apply(
            &c,
            &OrgCommand::ChangePlan {
                plan: "free".into(),
                timing: Some(Timing::Immediate),
            },
            GRACE,
            at(now),
        )
        .unwrap();
    let decision = state.check(&c, "api_calls", 1, GRACE, at(now));
    assert_eq!(
        (decision.allowed, decision.reason),
        (false, Some(Reason::LimitReached))
    );
    assert_eq!(decision.metered.unwrap().used, 8);
    assert!(!consume(&mut state, &c, "api_calls", 1, now));
    // Until the next reset.
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        1,
        "2027-02-01T00:00:00Z"
    ));
}

#[test]
fn cancel_keeps_access_to_period_end_and_resume_withdraws_it() {
    let c = catalog();
    let mut state = org("2027-01-15T00:00:00Z");
    change_plan(&mut state, &c, "pro", "2027-01-20T00:00:00Z");
    state
        .apply(
            &c,
            &OrgCommand::Cancel {
                timing: Timing::PeriodEnd,
            },
            GRACE,
            at("2027-01-25T00:00:00Z"),
        )
        .unwrap();
    let scheduled = state
        .subscription
        .as_ref()
        .unwrap()
        .scheduled
        .clone()
        .unwrap();
    assert_eq!(
        (scheduled.plan.as_str(), scheduled.at, scheduled.cancel),
        ("free", at("2027-02-15T00:00:00Z"), true)
    );
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-14T00:00:00Z"))
            .allowed
    );
    assert!(
        !state
            .check(&c, "sso", 1, GRACE, at("2027-02-15T00:00:00Z"))
            .allowed
    );
    // Resuming (asking for the current plan) before the end withdraws it.
    change_plan(&mut state, &c, "pro", "2027-02-01T00:00:00Z");
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-03-01T00:00:00Z"))
            .allowed
    );
    // An immediate cancellation applies at once.
    state
        .apply(
            &c,
            &OrgCommand::Cancel {
                timing: Timing::Immediate,
            },
            GRACE,
            at("2027-03-01T00:00:00Z"),
        )
        .unwrap();
    assert!(
        !state
            .check(&c, "sso", 1, GRACE, at("2027-03-01T00:00:00Z"))
            .allowed
    );
}

#[test]
fn past_due_keeps_access_for_the_grace_period_then_lapses() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    change_plan(&mut state, &c, "pro", "2027-01-02T00:00:00Z");
    set_status(
        &mut state,
        &c,
        SubscriptionStatus::PastDue,
        "2027-01-10T00:00:00Z",
    );
    // A second failure does not restart the grace period.
    set_status(
        &mut state,
        &c,
        SubscriptionStatus::PastDue,
        "2027-01-12T00:00:00Z",
    );
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-01-16T23:59:59Z"))
            .allowed
    );
    let lapsed = state.check(&c, "sso", 1, GRACE, at("2027-01-17T00:00:00Z"));
    assert_eq!(
        (lapsed.allowed, lapsed.reason, lapsed.plan),
        (false, Some(Reason::NoActiveSubscription), Some("free"))
    );
    // Features of the default plan keep working at its limits.
    let api = state
        .check(&c, "api_calls", 1, GRACE, at("2027-01-17T00:00:00Z"))
        .metered
        .unwrap();
    assert_eq!(api.limit, Limit::Units(5));
    // Paying restores the plan.
    set_status(
        &mut state,
        &c,
        SubscriptionStatus::Active,
        "2027-01-18T00:00:00Z",
    );
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-01-18T00:00:00Z"))
            .allowed
    );
}

#[test]
fn overrides_replace_the_plan_entry_for_one_org() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-02T00:00:00Z");
    let entry: super::PlanFeature = serde_json::from_value(json!({"limit": 1000})).unwrap();
    state
        .apply(
            &c,
            &OrgCommand::SetOverride {
                feature: "api_calls".into(),
                entry: Some(entry),
            },
            GRACE,
            now,
        )
        .unwrap();
    assert_eq!(
        state
            .check(&c, "api_calls", 1, GRACE, now)
            .metered
            .unwrap()
            .limit,
        Limit::Units(1000)
    );
    let bad: super::PlanFeature = serde_json::from_value(json!({"value": 3})).unwrap();
    let err = state
        .apply(
            &c,
            &OrgCommand::SetOverride {
                feature: "sso".into(),
                entry: Some(bad),
            },
            GRACE,
            now,
        )
        .unwrap_err();
    assert_eq!(err.code, "invalid_override");
    state
        .apply(
            &c,
            &OrgCommand::SetOverride {
                feature: "sso".into(),
                entry: Some(Default::default()),
            },
            GRACE,
            now,
        )
        .unwrap();
    assert!(state.check(&c, "sso", 1, GRACE, now).allowed);
}

#[test]
fn gauges_are_levels_and_cannot_be_consumed() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-02T00:00:00Z");
    let meter = c
        .document
        .meters
        .iter()
        .find(|m| m.key == "storage")
        .unwrap()
        .clone();
    for level in [40, 90, 60] {
        state.record(&c, &meter, MeterReading::Level(level), GRACE, now);
    }
    let usage = state
        .check(&c, "storage_mb", 20, GRACE, now)
        .metered
        .unwrap();
    assert_eq!((usage.used, usage.remaining), (90, Some(10)));
    let err = state
        .apply(
            &c,
            &OrgCommand::Consume {
                feature: "storage_mb".into(),
                amount: 1,
            },
            GRACE,
            now,
        )
        .unwrap_err();
    assert_eq!(err.code, "feature_not_consumable");
    let err = state
        .apply(
            &c,
            &OrgCommand::Consume {
                feature: "sso".into(),
                amount: 1,
            },
            GRACE,
            now,
        )
        .unwrap_err();
    assert_eq!(err.code, "feature_not_metered");
}

#[test]
fn events_count_past_a_hard_limit_because_they_already_happened() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-02T00:00:00Z");
    let meter = c
        .document
        .meters
        .iter()
        .find(|m| m.key == "api")
        .unwrap()
        .clone();
    for _ in 0..7 {
        state.record(&c, &meter, MeterReading::Add(1), GRACE, now);
    }
    let decision = state.check(&c, "api_calls", 1, GRACE, now);
    assert_eq!(
        (
            decision.allowed,
            decision.metered.unwrap().used,
            decision.metered.unwrap().overage
        ),
        (false, 7, 2)
    );
}

#[test]
fn meters_read_filters_sums_and_unique_values() {
    let meter = |aggregation: &str,
                 property: Option<&str>,
                 filters: serde_json::Value|
     -> super::catalog::MeterDefinition {
        serde_json::from_value(json!({
            "key": "m", "feature": "f", "event": "e", "aggregation": aggregation,
            "property": property, "filters": filters
        }))
        .unwrap()
    };
    let props = |v: serde_json::Value| v.as_object().unwrap().clone();
    let count = meter("COUNT", None, json!([{"property": "plan", "value": "pro"}]));
    assert_eq!(
        read_meter(&count, &props(json!({"plan": "pro"}))),
        Some(MeterInput::Reading(MeterReading::Add(1)))
    );
    assert_eq!(read_meter(&count, &props(json!({"plan": "free"}))), None);
    let sum = meter("SUM", Some("rows"), json!([]));
    assert_eq!(
        read_meter(&sum, &props(json!({"rows": 2.6}))),
        Some(MeterInput::Reading(MeterReading::Add(3)))
    );
    assert_eq!(read_meter(&sum, &props(json!({"rows": "many"}))), None);
    assert_eq!(read_meter(&sum, &props(json!({"rows": -4}))), None);
    let unique = meter("UNIQUE_COUNT", Some("doc.id"), json!([]));
    assert_eq!(
        read_meter(&unique, &props(json!({"doc": {"id": 42}}))),
        Some(MeterInput::Unique("42".into()))
    );
    assert_eq!(
        read_meter(&unique, &props(json!({"doc": {"id": "a"}}))),
        Some(MeterInput::Unique("a".into()))
    );
    let max = meter("MAX", Some("mb"), json!([]));
    assert_eq!(
        read_meter(&max, &props(json!({"mb": 12}))),
        Some(MeterInput::Reading(MeterReading::Level(12)))
    );
}

#[test]
fn a_new_anchor_carries_the_current_period_usage() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-20T00:00:00Z");
    state
        .apply(
            &c,
            &OrgCommand::ChangePlan {
                plan: "pro".into(),
                timing: None,
            },
            GRACE,
            now,
        )
        .unwrap();
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        6,
        "2027-01-20T00:00:00Z"
    ));
    state.rebase_anchor(&c, now, GRACE, now);
    let usage = state.check(&c, "api_calls", 1, GRACE, now).metered.unwrap();
    assert_eq!(
        (usage.used, usage.period.start, usage.period.end),
        (6, now, Some(at("2027-02-20T00:00:00Z")))
    );
}

#[test]
fn bad_commands_change_nothing() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-02T00:00:00Z");
    let before = state.clone();
    for (command, code) in [
        (
            OrgCommand::Consume {
                feature: "api_calls".into(),
                amount: 0,
            },
            "invalid_amount",
        ),
        (
            OrgCommand::Consume {
                feature: "nope".into(),
                amount: 1,
            },
            "unknown_feature",
        ),
        (
            OrgCommand::ChangePlan {
                plan: "gold".into(),
                timing: None,
            },
            "unknown_plan",
        ),
        (
            OrgCommand::SetStatus {
                status: SubscriptionStatus::PastDue,
            },
            "no_subscription",
        ),
        (
            OrgCommand::AddGrant {
                id: Uuid::new_v4(),
                feature: "api_calls".into(),
                amount: 5,
                expires_at: Some(at("2026-01-01T00:00:00Z")),
                reason: None,
            },
            "invalid_expiry",
        ),
    ] {
        assert_eq!(
            state.apply(&c, &command, GRACE, now).unwrap_err().code,
            code
        );
    }
    assert_eq!(state, before);
}

fn stripe(created: &str, subscription: &str, change: StripeChange) -> OrgCommand {
    OrgCommand::StripeSync(StripeSync {
        event_created: at(created),
        customer_id: Some("cus_1".into()),
        subscription_id: Some(subscription.into()),
        change,
    })
}

fn stripe_subscription(
    plan: Option<&str>,
    status: SubscriptionStatus,
    start: &str,
    end: &str,
    cancel_at_period_end: bool,
) -> StripeChange {
    StripeChange::Subscription {
        plan: plan.map(Into::into),
        status,
        current_period_start: Some(at(start)),
        current_period_end: Some(at(end)),
        cancel_at_period_end,
        cancel_at: None,
        trial_end: None,
        deleted: false,
    }
}

#[test]
fn stripe_events_apply_in_created_order_and_older_ones_are_stale() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let now = at("2027-01-10T00:00:00Z");
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        4,
        "2027-01-09T00:00:00Z"
    ));
    let created = stripe(
        "2027-01-10T00:00:00Z",
        "sub_1",
        stripe_subscription(
            Some("pro"),
            SubscriptionStatus::Active,
            "2027-01-10T00:00:00Z",
            "2027-02-10T00:00:00Z",
            false,
        ),
    );
    assert!(matches!(
        state.execute(&c, &created, GRACE, now).unwrap(),
        super::Reply::Subscription(_)
    ));
    assert_eq!(state.stripe_customer_id.as_deref(), Some("cus_1"));
    let usage = state.check(&c, "api_calls", 1, GRACE, now).metered.unwrap();
    // Anchored at the subscription's period start; free-plan usage carried.
    assert_eq!(
        (usage.used, usage.limit, usage.period.start),
        (4, Limit::Units(10), at("2027-01-10T00:00:00Z"))
    );
    // A newer update schedules the cancellation at period end…
    let cancel = stripe(
        "2027-01-12T00:00:00Z",
        "sub_1",
        stripe_subscription(
            Some("pro"),
            SubscriptionStatus::Active,
            "2027-01-10T00:00:00Z",
            "2027-02-10T00:00:00Z",
            true,
        ),
    );
    state
        .execute(&c, &cancel, GRACE, at("2027-01-12T00:00:00Z"))
        .unwrap();
    // …and the older event, delivered late, changes nothing.
    let before = state.clone();
    let late = stripe(
        "2027-01-11T00:00:00Z",
        "sub_1",
        stripe_subscription(
            Some("scale"),
            SubscriptionStatus::Active,
            "2027-01-10T00:00:00Z",
            "2027-02-10T00:00:00Z",
            false,
        ),
    );
    assert_eq!(
        state
            .execute(&c, &late, GRACE, at("2027-01-13T00:00:00Z"))
            .unwrap(),
        super::Reply::Stale
    );
    assert_eq!(state, before);
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-09T23:59:59Z"))
            .allowed
    );
    assert_eq!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-10T00:00:00Z"))
            .plan,
        Some("free")
    );
}

#[test]
fn stripe_payment_failures_start_the_grace_period_and_deletion_ends_access() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let sub = |created: &str| {
        stripe(
            created,
            "sub_1",
            stripe_subscription(
                Some("pro"),
                SubscriptionStatus::Active,
                "2027-01-05T00:00:00Z",
                "2027-02-05T00:00:00Z",
                false,
            ),
        )
    };
    state
        .execute(
            &c,
            &sub("2027-01-05T00:00:00Z"),
            GRACE,
            at("2027-01-05T00:00:00Z"),
        )
        .unwrap();
    state
        .execute(
            &c,
            &stripe("2027-02-05T01:00:00Z", "sub_1", StripeChange::PaymentFailed),
            GRACE,
            at("2027-02-05T01:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        state.subscription.as_ref().unwrap().past_due_since,
        Some(at("2027-02-05T01:00:00Z"))
    );
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-12T00:59:59Z"))
            .allowed
    );
    assert_eq!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-12T01:00:00Z"))
            .reason,
        Some(Reason::NoActiveSubscription)
    );
    state
        .execute(
            &c,
            &stripe("2027-02-13T00:00:00Z", "sub_1", StripeChange::InvoicePaid),
            GRACE,
            at("2027-02-13T00:00:00Z"),
        )
        .unwrap();
    assert!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-13T00:00:00Z"))
            .allowed
    );
    // An invoice of another subscription does not touch this one.
    state
        .execute(
            &c,
            &stripe(
                "2027-02-14T00:00:00Z",
                "sub_old",
                StripeChange::PaymentFailed,
            ),
            GRACE,
            at("2027-02-14T00:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        state.subscription.as_ref().unwrap().status,
        SubscriptionStatus::Active
    );
    let deleted = stripe(
        "2027-02-20T00:00:00Z",
        "sub_1",
        StripeChange::Subscription {
            plan: Some("pro".into()),
            status: SubscriptionStatus::Canceled,
            current_period_start: None,
            current_period_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            trial_end: None,
            deleted: true,
        },
    );
    state
        .execute(&c, &deleted, GRACE, at("2027-02-20T00:00:00Z"))
        .unwrap();
    assert_eq!(
        state
            .check(&c, "sso", 1, GRACE, at("2027-02-20T00:00:00Z"))
            .plan,
        Some("free")
    );
}

#[test]
fn an_unmapped_stripe_price_keeps_the_current_plan() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    change_plan(&mut state, &c, "pro", "2027-01-02T00:00:00Z");
    let unknown = stripe(
        "2027-01-03T00:00:00Z",
        "sub_1",
        stripe_subscription(
            None,
            SubscriptionStatus::Active,
            "2027-01-01T00:00:00Z",
            "2027-02-01T00:00:00Z",
            false,
        ),
    );
    state
        .execute(&c, &unknown, GRACE, at("2027-01-03T00:00:00Z"))
        .unwrap();
    assert_eq!(state.subscription.as_ref().unwrap().plan, "pro");
}

#[test]
fn a_request_timed_before_the_org_was_created_lands_in_the_current_period() {
    // Node B took its time before node A created the org and wrote usage.
    let c = catalog();
    let mut state = org("2027-01-31T10:00:00.000500Z");
    assert!(consume(
        &mut state,
        &c,
        "api_calls",
        5,
        "2027-01-31T10:00:00.000600Z"
    ));
    assert!(
        !consume(
            &mut state,
            &c,
            "api_calls",
            1,
            "2027-01-31T10:00:00.000100Z"
        ),
        "not an empty earlier period"
    );
    assert_eq!(state.usage.len(), 1);
    // Reads behind the writer's clock see the current counter too.
    assert_eq!(used(&state, &c, "api_calls", "2027-01-31T09:59:59Z"), 5);
}

mod notices {
    use super::*;
    use crate::billing::notice::{billing_notices, BillingNotice};

    /// `after` as the store saves it: a changed state has a new version.
    fn saved(mut after: OrgState, before: &OrgState) -> OrgState {
        after.version = before.version + 1;
        after
    }

    #[test]
    fn change_effects_turn_usage_lines_into_webhooks_and_prompt_triggers() {
        use crate::billing::notice::{change_effects, entitlements_message};
        use crate::prompts::TriggerFact;
        let c = catalog();
        let mut state = org("2026-01-10T00:00:00Z");
        assert!(consume(
            &mut state,
            &c,
            "api_calls",
            4,
            "2026-01-11T00:00:00Z"
        ));
        let before = state.clone();
        assert!(consume(
            &mut state,
            &c,
            "api_calls",
            1,
            "2026-01-11T00:00:01Z"
        ));
        let now = at("2026-01-11T00:00:01Z");
        // Unsaved (same version): the write changed nothing.
        assert_eq!(
            change_effects(&c, GRACE, &before, &state, now),
            Default::default()
        );
        let effects = change_effects(&c, GRACE, &before, &saved(state, &before), now);
        let types: Vec<&str> = effects.webhooks.iter().map(|(t, _)| *t).collect();
        assert_eq!(types, ["usage.limit_reached"]);
        assert_eq!(
            effects.triggers,
            [TriggerFact::LimitReached {
                feature: "api_calls".into(),
                denied: false
            }]
        );
        assert_eq!((effects.converted_to, effects.credit_plan), (None, None));
        let message = entitlements_message(effects.webhooks[0].0, &effects.webhooks[0].1);
        assert_eq!(message["type"], "usage.limit_reached");
        assert_eq!(message["feature"], "api_calls");
        assert_eq!(message["used"], 5);
    }

    #[test]
    fn change_effects_credit_an_upgrade_and_a_first_conversion() {
        use crate::billing::notice::change_effects;
        let c = catalog();
        let state = org("2026-01-31T00:00:00Z");
        let mut pro = state.clone();
        let now = at("2026-01-31T12:00:00Z");
        let to = |plan: &str| OrgCommand::ChangePlan {
            plan: plan.into(),
            timing: None,
        };
        pro.execute(&c, &to("pro"), GRACE, now).unwrap();
        let pro = saved(pro, &state);
        let effects = change_effects(&c, GRACE, &state, &pro, now);
        assert_eq!(effects.converted_to.as_deref(), Some("pro"));
        assert_eq!(effects.credit_plan.as_deref(), Some("pro"));
        assert!(effects.triggers.is_empty());
        // pro → scale is an upgrade but no longer a conversion.
        let mut scale = pro.clone();
        scale.execute(&c, &to("scale"), GRACE, now).unwrap();
        let effects = change_effects(&c, GRACE, &pro, &saved(scale, &pro), now);
        assert_eq!(effects.converted_to, None);
        assert_eq!(effects.credit_plan.as_deref(), Some("scale"));
    }

    #[test]
    fn change_effects_announce_a_grace_period_ending_after_the_grace() {
        use crate::billing::notice::change_effects;
        use crate::prompts::TriggerFact;
        let c = catalog();
        let mut active = org("2026-02-28T00:00:00Z");
        let now = at("2026-02-28T10:00:00Z");
        let command = OrgCommand::ChangePlan {
            plan: "pro".into(),
            timing: None,
        };
        active.execute(&c, &command, GRACE, now).unwrap();
        let mut past_due = active.clone();
        let command = OrgCommand::SetStatus {
            status: SubscriptionStatus::PastDue,
        };
        past_due.execute(&c, &command, GRACE, now).unwrap();
        let past_due = saved(past_due, &active);
        let effects = change_effects(&c, GRACE, &active, &past_due, now);
        assert!(effects.triggers.contains(&TriggerFact::GraceEnding {
            ends_at: now + GRACE
        }));
        // Staying past due fires nothing again.
        let mut again = past_due.clone();
        assert!(consume(
            &mut again,
            &c,
            "api_calls",
            1,
            "2026-02-28T11:00:00Z"
        ));
        let effects = change_effects(
            &c,
            GRACE,
            &past_due,
            &saved(again, &past_due),
            at("2026-02-28T11:00:00Z"),
        );
        assert!(!effects
            .triggers
            .iter()
            .any(|t| matches!(t, TriggerFact::GraceEnding { .. })));
    }

    fn types(notices: &[BillingNotice]) -> Vec<&str> {
        notices
            .iter()
            .map(|notice| match notice {
                BillingNotice::Webhook { event_type, .. } => *event_type,
                BillingNotice::Converted { .. } => "converted",
            })
            .collect()
    }

    #[test]
    fn crossing_the_limit_announces_it_once() {
        let c = catalog();
        let mut state = org("2026-01-10T00:00:00Z");
        assert!(consume(
            &mut state,
            &c,
            "api_calls",
            3,
            "2026-01-11T00:00:00Z"
        ));
        let before = state.clone();
        // 4 of 5: past the default warn_at (80 %), not yet at the limit.
        assert!(consume(
            &mut state,
            &c,
            "api_calls",
            1,
            "2026-01-11T00:00:01Z"
        ));
        let now = at("2026-01-11T00:00:01Z");
        assert_eq!(
            types(&billing_notices(&c, GRACE, &before, &state, now)),
            ["usage.warning"]
        );
        let before = state.clone();
        assert!(consume(
            &mut state,
            &c,
            "api_calls",
            1,
            "2026-01-11T00:00:02Z"
        ));
        let now = at("2026-01-11T00:00:02Z");
        let notices = billing_notices(&c, GRACE, &before, &state, now);
        assert_eq!(types(&notices), ["usage.limit_reached"]);
        let BillingNotice::Webhook { data, .. } = &notices[0] else {
            unreachable!()
        };
        assert_eq!(data["used"], 5);
        assert_eq!(data["limit"], 5);
        assert_eq!(data["feature_name"], "API calls");
        assert_eq!(data["resets_at"], "2026-02-10T00:00:00Z");
        // A refused consume changes nothing and announces nothing.
        let before = state.clone();
        assert!(!consume(
            &mut state,
            &c,
            "api_calls",
            1,
            "2026-01-11T00:00:03Z"
        ));
        assert!(billing_notices(&c, GRACE, &before, &state, at("2026-01-11T00:00:03Z")).is_empty());
    }

    #[test]
    fn a_jump_straight_to_the_limit_announces_warning_and_limit() {
        let c = catalog();
        let mut state = org("2026-01-10T00:00:00Z");
        let before = state.clone();
        assert!(consume(&mut state, &c, "seats", 3, "2026-01-11T00:00:00Z"));
        let notices = billing_notices(&c, GRACE, &before, &state, at("2026-01-11T00:00:00Z"));
        assert_eq!(types(&notices), ["usage.warning", "usage.limit_reached"]);
        let BillingNotice::Webhook { data, .. } = &notices[1] else {
            unreachable!()
        };
        // Seats never reset.
        assert_eq!(data["resets_at"], serde_json::Value::Null);
        assert_eq!(data["period_start"], serde_json::Value::Null);
    }

    #[test]
    fn an_upgrade_from_the_default_plan_is_a_conversion_and_lifts_nothing_spurious() {
        let c = catalog();
        let mut state = org("2026-01-10T00:00:00Z");
        let before = state.clone();
        change_plan(&mut state, &c, "pro", "2026-01-12T00:00:00Z");
        let notices = billing_notices(&c, GRACE, &before, &state, at("2026-01-12T00:00:00Z"));
        assert_eq!(types(&notices), ["subscription.changed", "converted"]);
        let BillingNotice::Webhook { data, .. } = &notices[0] else {
            unreachable!()
        };
        assert_eq!(data["previous_plan"], "free");
        assert_eq!(data["plan"], "pro");
        assert_eq!(data["upgrade"], true);
        // pro → scale is a change but not a conversion (already off the free tier).
        let before = state.clone();
        change_plan(&mut state, &c, "scale", "2026-01-13T00:00:00Z");
        let notices = billing_notices(&c, GRACE, &before, &state, at("2026-01-13T00:00:00Z"));
        assert_eq!(types(&notices), ["subscription.changed"]);
    }

    #[test]
    fn a_scheduled_downgrade_is_announced_when_scheduled_with_its_date() {
        let c = catalog();
        let mut state = org("2026-01-31T00:00:00Z");
        change_plan(&mut state, &c, "pro", "2026-01-31T00:00:00Z");
        let before = state.clone();
        change_plan(&mut state, &c, "free", "2026-02-10T00:00:00Z");
        let notices = billing_notices(&c, GRACE, &before, &state, at("2026-02-10T00:00:00Z"));
        assert_eq!(types(&notices), ["subscription.changed"]);
        let BillingNotice::Webhook { data, .. } = &notices[0] else {
            unreachable!()
        };
        assert_eq!(data["plan"], "pro");
        assert_eq!(data["scheduled"]["plan"], "free");
        // Anchored on Jan 31: the period ends on Feb 28 (clamped).
        assert_eq!(data["scheduled"]["at"], "2026-02-28T00:00:00Z");
    }

    #[test]
    fn an_unchanged_state_announces_nothing() {
        let c = catalog();
        let state = org("2026-01-10T00:00:00Z");
        assert!(billing_notices(
            &c,
            GRACE,
            &state,
            &state.clone(),
            at("2026-03-01T00:00:00Z")
        )
        .is_empty());
    }
}

#[test]
fn a_trial_end_is_kept_while_trialing_and_dropped_when_the_trial_is_over() {
    let c = catalog();
    let mut state = org("2027-01-01T00:00:00Z");
    let trial_end = at("2027-01-15T00:00:00Z");
    let sync = |created: &str, status, trial_end| {
        let mut change = stripe_subscription(
            Some("pro"),
            status,
            "2027-01-01T00:00:00Z",
            "2027-01-15T00:00:00Z",
            false,
        );
        if let StripeChange::Subscription { trial_end: end, .. } = &mut change {
            *end = trial_end;
        }
        stripe(created, "sub_1", change)
    };
    let trial_ends_at = |state: &OrgState| state.subscription.as_ref().unwrap().trial_ends_at;
    let trialing = sync(
        "2027-01-01T00:00:00Z",
        SubscriptionStatus::Trialing,
        Some(trial_end),
    );
    state
        .execute(&c, &trialing, GRACE, at("2027-01-01T00:00:00Z"))
        .unwrap();
    assert_eq!(trial_ends_at(&state), Some(trial_end));
    // Stripe keeps `trial_end` on the subscription after the trial: an
    // active subscription has no trial ending.
    let active = sync(
        "2027-01-15T00:00:01Z",
        SubscriptionStatus::Active,
        Some(trial_end),
    );
    state
        .execute(&c, &active, GRACE, at("2027-01-15T00:00:01Z"))
        .unwrap();
    assert_eq!(trial_ends_at(&state), None);
}
