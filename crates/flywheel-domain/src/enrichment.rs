//! What the server adds to a flag evaluation context when its
//! `targetingKey` is a user Flywheel knows, so a targeting rule can say
//! "free orgs whose users signed up in the last 14 days".
//!
//! Names added (each only when the caller's context lacks it: values the
//! caller sends win):
//!
//! * `org_id`: the org the user belongs to (their first membership);
//! * `plan`: that org's current plan key;
//! * `entitlements`: `{feature: true|false}` for the catalog's boolean
//!   features, as the org has them now;
//! * `signed_up_at`: Unix seconds of the signup (compare with
//!   `$flagd.timestamp`), and `days_since_signup` (whole days);
//! * `acquisition_source`: `organic`, `invite`, `invite_link`, `share`,
//!   `referral` or `paid`;
//! * `traits`: the user's traits, merged from `identify` calls;
//! * `activated` (the activation rule is reached) and `milestones`
//!   (`{rule: true}` for each rule reached by the user or their org).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::billing::catalog::{Catalog, FeatureKind};
use crate::billing::org::OrgState;

/// What Flywheel knows of a user, for enrichment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    pub user_id: String,
    /// Absent for users known only from events.
    pub signed_up_at: Option<DateTime<Utc>>,
    pub acquisition_source: Option<String>,
    /// Memberships first (oldest first), then orgs joined by `group` events.
    pub org_ids: Vec<String>,
    pub traits: Map<String, Value>,
    /// Rules reached by the user or by their first org (`milestones.<rule>`).
    #[serde(default)]
    pub milestones: Vec<String>,
    /// One of those is the project's activation definition.
    #[serde(default)]
    pub activated: bool,
}

impl UserProfile {
    /// Nothing is known: nothing to add.
    pub fn is_empty(&self) -> bool {
        self.signed_up_at.is_none()
            && self.org_ids.is_empty()
            && self.traits.is_empty()
            && self.milestones.is_empty()
    }

    /// The org the context is about: the caller's `org_id`, else the
    /// user's first org.
    pub fn org_for<'a>(&'a self, context: &'a Map<String, Value>) -> Option<&'a str> {
        match context.get("org_id") {
            Some(Value::String(org)) => Some(org),
            Some(_) => None,
            None => self.org_ids.first().map(String::as_str),
        }
    }
}

/// Adds what `profile` and the org's billing state say to `context`,
/// leaving every name the caller set untouched.
pub fn enrich_context(
    context: &mut Map<String, Value>,
    profile: &UserProfile,
    org: Option<&OrgState>,
    catalog: &Catalog,
    grace: Duration,
    now: DateTime<Utc>,
) {
    let mut add = |name: &str, value: Value| {
        if !context.contains_key(name) {
            context.insert(name.to_owned(), value);
        }
    };
    if let Some(org) = profile.org_ids.first() {
        add("org_id", Value::String(org.clone()));
    }
    if let Some(at) = profile.signed_up_at {
        add("signed_up_at", Value::from(at.timestamp()));
        add(
            "days_since_signup",
            Value::from((now - at).num_days().max(0)),
        );
    }
    if let Some(source) = &profile.acquisition_source {
        add("acquisition_source", Value::String(source.clone()));
    }
    if !profile.traits.is_empty() {
        add("traits", Value::Object(profile.traits.clone()));
    }
    if profile.signed_up_at.is_some() || !profile.milestones.is_empty() {
        add("activated", Value::Bool(profile.activated));
        let reached: Map<String, Value> = profile
            .milestones
            .iter()
            .map(|rule| (rule.clone(), Value::Bool(true)))
            .collect();
        add("milestones", Value::Object(reached));
    }
    let Some(org) = org else {
        return;
    };
    let access = org.access(catalog, grace, now);
    if let Some((_, plan)) = access.plan {
        add("plan", Value::String(plan.key.clone()));
    }
    let booleans: Map<String, Value> = catalog
        .document
        .features
        .iter()
        .filter(|feature| feature.kind == FeatureKind::Boolean)
        .map(|feature| {
            let allowed = org.check(catalog, &feature.key, 1, grace, now).allowed;
            (feature.key.clone(), Value::Bool(allowed))
        })
        .collect();
    if !booleans.is_empty() {
        add("entitlements", Value::Object(booleans));
    }
}

/// Merges `update` into `traits`, key by key (a later value replaces an
/// earlier one; `null` removes the trait), as Segment's `identify` does.
pub fn merge_traits(traits: &mut Map<String, Value>, update: &Map<String, Value>) {
    for (name, value) in update {
        if value.is_null() {
            traits.remove(name);
        } else {
            traits.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::catalog::CatalogDocument;
    use crate::billing::org::OrgCommand;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn catalog() -> Catalog {
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [
                {"key": "sso", "kind": "boolean"},
                {"key": "audit_log", "kind": "boolean"},
                {"key": "seats", "kind": "metered"}
            ],
            "plans": [
                {"key": "free", "default": true, "features": {"seats": {"limit": 3}}},
                {"key": "pro", "price": {"amount": 2900, "currency": "usd"},
                 "features": {"sso": {}, "seats": {"limit": 10}}}
            ]
        }))
        .unwrap();
        Catalog::compile(document).unwrap()
    }

    fn profile() -> UserProfile {
        UserProfile {
            user_id: "alice".into(),
            signed_up_at: Some(at("2026-03-01T12:00:00Z")),
            acquisition_source: Some("referral".into()),
            org_ids: vec!["acme".into(), "side".into()],
            traits: json!({"company_size": 40}).as_object().unwrap().clone(),
            milestones: Vec::new(),
            activated: false,
        }
    }

    #[test]
    fn a_known_user_gets_org_plan_entitlements_signup_and_traits() {
        let catalog = catalog();
        let mut org = OrgState::new("acme", at("2026-03-01T12:00:00Z"));
        let command = OrgCommand::ChangePlan {
            plan: "pro".into(),
            timing: None,
        };
        org.execute(
            &catalog,
            &command,
            Duration::days(7),
            at("2026-03-02T00:00:00Z"),
        )
        .unwrap();
        let mut context = json!({"targetingKey": "alice"})
            .as_object()
            .unwrap()
            .clone();
        let now = at("2026-03-15T11:59:59Z");
        enrich_context(
            &mut context,
            &profile(),
            Some(&org),
            &catalog,
            Duration::days(7),
            now,
        );
        assert_eq!(
            Value::Object(context),
            json!({
                "targetingKey": "alice",
                "org_id": "acme",
                "plan": "pro",
                "entitlements": {"sso": true, "audit_log": false},
                "signed_up_at": at("2026-03-01T12:00:00Z").timestamp(),
                "days_since_signup": 13,
                "acquisition_source": "referral",
                "traits": {"company_size": 40},
                "activated": false,
                "milestones": {}
            })
        );
    }

    #[test]
    fn what_the_caller_sends_wins() {
        let catalog = catalog();
        let org = OrgState::new("side", at("2026-03-01T12:00:00Z"));
        let mut context = json!({
            "targetingKey": "alice", "org_id": "side", "plan": "enterprise", "traits": {}
        })
        .as_object()
        .unwrap()
        .clone();
        let profile = profile();
        assert_eq!(profile.org_for(&context), Some("side"));
        enrich_context(
            &mut context,
            &profile,
            Some(&org),
            &catalog,
            Duration::days(7),
            at("2026-03-02T00:00:00Z"),
        );
        assert_eq!(context["org_id"], "side");
        assert_eq!(context["plan"], "enterprise");
        assert_eq!(context["traits"], json!({}));
        assert_eq!(
            context["entitlements"],
            json!({"sso": false, "audit_log": false})
        );
        assert_eq!(context["days_since_signup"], 0);
    }

    #[test]
    fn a_user_known_only_from_events_gets_what_is_known() {
        let catalog = catalog();
        let profile = UserProfile {
            user_id: "u1".into(),
            traits: json!({"role": "admin"}).as_object().unwrap().clone(),
            ..UserProfile::default()
        };
        let mut context = Map::new();
        enrich_context(
            &mut context,
            &profile,
            None,
            &catalog,
            Duration::days(7),
            at("2026-03-02T00:00:00Z"),
        );
        assert_eq!(Value::Object(context), json!({"traits": {"role": "admin"}}));
        assert!(UserProfile::default().is_empty());
        // An org_id that is not a string names no org.
        let odd = json!({"org_id": 7}).as_object().unwrap().clone();
        assert_eq!(profile.org_for(&odd), None);
    }

    #[test]
    fn traits_merge_key_by_key_and_null_removes() {
        let mut traits = json!({"plan": "free", "name": "A"})
            .as_object()
            .unwrap()
            .clone();
        merge_traits(
            &mut traits,
            json!({"plan": "pro", "name": null, "seats": 3})
                .as_object()
                .unwrap(),
        );
        assert_eq!(Value::Object(traits), json!({"plan": "pro", "seats": 3}));
    }
}
