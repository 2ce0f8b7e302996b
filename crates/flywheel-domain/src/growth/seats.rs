//! Seats: a member takes one of the org's seats when the catalog meters
//! them (the growth policy names the feature), and gives it back on leaving.
//! The store loads the org's billing state under its lock, calls these, and
//! saves the state they return in the membership's transaction.

use chrono::{DateTime, Duration, Utc};

use crate::billing::answer::Reply;
use crate::billing::catalog::FeatureKind;
use crate::billing::org::{OrgCommand, OrgState};
use crate::billing::Catalog;
use crate::error::{DomainError, ErrorKind};

/// The rules seats are counted under.
#[derive(Debug, Clone, Copy)]
pub struct SeatRules<'a> {
    pub catalog: &'a Catalog,
    /// The metered feature that counts seats (`seats` by default).
    pub feature: &'a str,
    /// How long a `past_due` subscription keeps its plan.
    pub grace: Duration,
}

impl SeatRules<'_> {
    /// Whether the catalog meters seats at all.
    pub fn metered(&self) -> bool {
        self.catalog
            .feature(self.feature)
            .is_some_and(|(_, feature)| feature.kind == FeatureKind::Metered)
    }
}

/// The org's state once a new member took a seat: unchanged when seats are
/// not metered; `seat_limit_reached` (403) when the plan's limit is used up.
pub fn take_seat(
    rules: SeatRules<'_>,
    org: &OrgState,
    now: DateTime<Utc>,
) -> Result<OrgState, DomainError> {
    let mut after = org.clone();
    if !rules.metered() {
        return Ok(after);
    }
    let command = OrgCommand::Consume {
        feature: rules.feature.to_owned(),
        amount: 1,
    };
    match after.execute(rules.catalog, &command, rules.grace, now)? {
        Reply::Usage(answer) if !answer.allowed => Err(DomainError::new(
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
        _ => Ok(after),
    }
}

/// The org's state once a member left: one seat fewer when seats are
/// metered. Leaving always works: a seat the catalog no longer lets the org
/// give back leaves the state as it was.
pub fn give_back_seat(rules: SeatRules<'_>, org: &OrgState, now: DateTime<Utc>) -> OrgState {
    let mut after = org.clone();
    if !rules.metered() {
        return after;
    }
    let command = OrgCommand::Release {
        feature: rules.feature.to_owned(),
        amount: 1,
    };
    match after.execute(rules.catalog, &command, rules.grace, now) {
        Ok(_) => after,
        Err(_) => org.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::catalog::CatalogDocument;
    use crate::billing::org::DEFAULT_PAST_DUE_GRACE;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn catalog(features: serde_json::Value) -> Catalog {
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [
                {"key": "seats", "kind": "metered"},
                {"key": "sso", "kind": "boolean"}
            ],
            "plans": [{"key": "free", "default": true, "features": features}]
        }))
        .unwrap();
        Catalog::compile(document).unwrap()
    }

    fn rules<'a>(catalog: &'a Catalog, feature: &'a str) -> SeatRules<'a> {
        SeatRules {
            catalog,
            feature,
            grace: DEFAULT_PAST_DUE_GRACE,
        }
    }

    fn used(org: &OrgState) -> i64 {
        org.usage.get("seats").map_or(0, |usage| usage.plan_used)
    }

    #[test]
    fn seats_are_taken_up_to_the_limit_and_the_refusal_says_how_many() {
        let catalog = catalog(json!({"seats": {"limit": 2, "reset": "never"}}));
        let now = at("2026-01-31T23:59:59Z");
        let org = OrgState::new("acme", now);
        let one = take_seat(rules(&catalog, "seats"), &org, now).unwrap();
        let two = take_seat(rules(&catalog, "seats"), &one, now).unwrap();
        assert_eq!((used(&one), used(&two)), (1, 2));
        let refused =
            take_seat(rules(&catalog, "seats"), &two, at("2026-02-28T00:00:00Z")).unwrap_err();
        assert_eq!(refused.code, "seat_limit_reached");
        assert_eq!(refused.kind, ErrorKind::Forbidden);
        assert!(
            refused.message.contains("2 of 2 seats"),
            "{}",
            refused.message
        );
        // Giving one back frees it for the next member.
        let freed = give_back_seat(rules(&catalog, "seats"), &two, now);
        assert_eq!(used(&freed), 1);
        assert_eq!(
            used(&take_seat(rules(&catalog, "seats"), &freed, now).unwrap()),
            2
        );
    }

    #[test]
    fn unmetered_seats_change_nothing() {
        let catalog = catalog(json!({"sso": {}}));
        let now = at("2026-03-01T00:00:00Z");
        let org = OrgState::new("acme", now);
        for feature in ["sso", "no_such_feature"] {
            assert!(!rules(&catalog, feature).metered());
            assert_eq!(take_seat(rules(&catalog, feature), &org, now).unwrap(), org);
            assert_eq!(give_back_seat(rules(&catalog, feature), &org, now), org);
        }
    }

    #[test]
    fn a_plan_without_seats_refuses_a_member_and_leaving_always_works() {
        // Seats are metered, but the free plan does not include them.
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [{"key": "seats", "kind": "metered"}],
            "plans": [{"key": "free", "default": true, "features": {}}]
        }))
        .unwrap();
        let without = Catalog::compile(document).unwrap();
        let now = at("2026-03-01T00:00:00Z");
        let org = OrgState::new("acme", now);
        let refused = take_seat(rules(&without, "seats"), &org, now).unwrap_err();
        assert_eq!(refused.code, "seat_limit_reached");
        assert_eq!(refused.message, "the org's plan does not include seats");
        // Nothing to give back: the member still leaves, no seat in use.
        assert_eq!(
            used(&give_back_seat(rules(&without, "seats"), &org, now)),
            0
        );
    }
}
