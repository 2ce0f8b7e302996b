//! Activation rules: what "this user (or org) got value" means for a
//! project, as thresholds over event counts and metered usage within a
//! window from signup (`project_created >= 3 within 14 days`).
//!
//! This module is the pure half: the rule document, its validation (every
//! problem with its JSON path), and deciding whether a subject's counts
//! reach a rule and when a change of counts crosses it. The store applies
//! it in the events' commit transaction (issue 7), so the event that
//! crosses a threshold records the milestone exactly once.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;

/// Whose progress a rule follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// The event's user (`user_id`).
    User,
    /// The event's org (`org_id`).
    Org,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Org => "org",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "user" => Some(Scope::User),
            "org" => Some(Scope::Org),
            _ => None,
        }
    }
}

/// A rule reached by a user or an org: recorded once, by the event that
/// crossed the threshold, in that event's transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Milestone {
    pub rule: String,
    pub scope: Scope,
    pub subject_id: String,
    pub reached_at: DateTime<Utc>,
    /// Where the window and time-to-value are measured from: the signup
    /// (or, for a subject Flywheel did not sign up, its first counted event).
    pub signed_up_at: DateTime<Utc>,
    /// Time to value: `reached_at - signed_up_at`, in seconds.
    pub seconds_to_value: i64,
    /// The event that crossed the threshold.
    pub event_id: uuid::Uuid,
    pub event: String,
    /// Its count at the crossing.
    pub count: i64,
    /// This rule is the project's activation definition.
    pub activation: bool,
}

/// How a rule's conditions combine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Combine {
    #[default]
    All,
    Any,
}

/// What a condition counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Measure {
    /// `track` events of this name since signup.
    Event(String),
    /// The org's usage of this metered catalog feature in its current period.
    Feature(String),
}

/// One threshold: `measure >= at_least`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Condition {
    #[serde(flatten)]
    pub measure: Measure,
    pub at_least: i64,
}

/// A condition is written either as the seeds write it,
/// `"project_created >= 3"` (an event count; `feature:api_calls >= 50` for
/// metered usage), or as `{"event"|"feature": name, "at_least": n}`.
impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Written {
            event: Option<String>,
            feature: Option<String>,
            at_least: i64,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Object(Written),
        }
        match Form::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "a condition is \"event_name >= N\", \"feature:key >= N\", or \
                 {\"event\" or \"feature\": name, \"at_least\": N}",
            )
        })? {
            Form::Text(text) => parse_condition(&text).map_err(serde::de::Error::custom),
            Form::Object(Written {
                event: Some(event),
                feature: None,
                at_least,
            }) => Ok(Condition {
                measure: Measure::Event(event),
                at_least,
            }),
            Form::Object(Written {
                event: None,
                feature: Some(feature),
                at_least,
            }) => Ok(Condition {
                measure: Measure::Feature(feature),
                at_least,
            }),
            Form::Object(_) => Err(serde::de::Error::custom(
                "a condition names exactly one of `event` and `feature`",
            )),
        }
    }
}

fn parse_condition(text: &str) -> Result<Condition, String> {
    let Some((left, right)) = text.split_once(">=") else {
        return Err(format!(
            "condition `{text}`: write `name >= N` (a threshold: only `>=` is supported)"
        ));
    };
    let name = left.trim();
    let at_least = right
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("condition `{text}`: the threshold must be a whole number"))?;
    let measure = match name.strip_prefix("feature:") {
        Some(feature) => Measure::Feature(feature.trim().to_owned()),
        None => Measure::Event(name.to_owned()),
    };
    Ok(Condition { measure, at_least })
}

/// One activation rule of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ActivationRule {
    /// Stable identifier (`[a-z0-9_]`, at most 64): the milestone's name.
    pub key: String,
    /// For people: "Created three projects".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub scope: Scope,
    pub conditions: Vec<Condition>,
    #[serde(default, rename = "match")]
    pub combine: Combine,
    /// The milestone counts only if reached within this many days of the
    /// subject's signup (absent: whenever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_days: Option<u32>,
    /// This rule is *the* activation definition (`$activated`); at most one.
    #[serde(default)]
    pub activation: bool,
}

/// A project's rules, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ActivationRules {
    pub rules: Vec<ActivationRule>,
}

/// Most rules a project may define, and conditions a rule may have.
pub const MAX_RULES: usize = 50;
pub const MAX_CONDITIONS: usize = 10;
/// The longest window, in days.
pub const MAX_WINDOW_DAYS: u32 = 366;

impl ActivationRules {
    /// Checks a document; every problem is reported with its JSON path.
    pub fn validate(self) -> Result<Self, Vec<DomainError>> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| {
            problems.push(DomainError::invalid(
                "invalid_activation_rules",
                format!("{path}: {message}"),
            ));
        };
        if self.rules.len() > MAX_RULES {
            problem(
                "/rules".into(),
                format!("at most {MAX_RULES} rules, got {}", self.rules.len()),
            );
        }
        let mut keys = BTreeSet::new();
        let mut activation = None;
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("/rules/{i}");
            let valid_key = !rule.key.is_empty()
                && rule.key.len() <= 64
                && rule
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid_key {
                problem(
                    format!("{at}/key"),
                    "1-64 characters of a-z, 0-9 and _".into(),
                );
            } else if !keys.insert(rule.key.as_str()) {
                problem(
                    format!("{at}/key"),
                    format!("`{}` is defined twice", rule.key),
                );
            }
            if rule.conditions.is_empty() || rule.conditions.len() > MAX_CONDITIONS {
                problem(
                    format!("{at}/conditions"),
                    format!("1 to {MAX_CONDITIONS} conditions"),
                );
            }
            for (j, condition) in rule.conditions.iter().enumerate() {
                let (Measure::Event(name) | Measure::Feature(name)) = &condition.measure;
                if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                    problem(
                        format!("{at}/conditions/{j}"),
                        "the name must be 1-200 characters without control characters".into(),
                    );
                }
                if condition.at_least < 1 {
                    problem(
                        format!("{at}/conditions/{j}"),
                        "the threshold must be at least 1".into(),
                    );
                }
                if rule.scope == Scope::User && matches!(condition.measure, Measure::Feature(_)) {
                    problem(
                        format!("{at}/conditions/{j}"),
                        "metered usage belongs to an org: use it in an `org` rule".into(),
                    );
                }
            }
            if let Some(days) = rule.within_days {
                if days == 0 || days > MAX_WINDOW_DAYS {
                    problem(
                        format!("{at}/within_days"),
                        format!("1 to {MAX_WINDOW_DAYS} days"),
                    );
                }
            }
            if rule.activation {
                if let Some(first) = activation {
                    problem(
                        format!("{at}/activation"),
                        format!("only one rule is the activation definition (rule {first} is)"),
                    );
                }
                activation.get_or_insert(i);
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }

    /// Whether a rule reads metered usage (`feature:` conditions).
    pub fn has_feature_conditions(&self) -> bool {
        self.rules
            .iter()
            .flat_map(|rule| &rule.conditions)
            .any(|condition| matches!(condition.measure, Measure::Feature(_)))
    }

    /// The event names any rule counts: only these need counters.
    pub fn counted_events(&self) -> BTreeSet<&str> {
        self.rules
            .iter()
            .flat_map(|rule| &rule.conditions)
            .filter_map(|condition| match &condition.measure {
                Measure::Event(name) => Some(name.as_str()),
                Measure::Feature(_) => None,
            })
            .collect()
    }
}

impl ActivationRule {
    /// Whether the subject's measures (`value_of`) reach the rule.
    pub fn is_reached(&self, value_of: impl Fn(&Measure) -> i64) -> bool {
        let met = |condition: &Condition| value_of(&condition.measure) >= condition.at_least;
        match self.combine {
            Combine::All => self.conditions.iter().all(met),
            Combine::Any => self.conditions.iter().any(met),
        }
    }

    /// Whether `at` is inside the rule's window from `signed_up_at`.
    pub fn is_within_window(&self, signed_up_at: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        match self.within_days {
            None => true,
            Some(days) => at < signed_up_at + Duration::days(i64::from(days)),
        }
    }

    /// Whether moving from `before` to `after` crosses the rule at `at`:
    /// not reached before, reached after, inside the window. A subject
    /// that already has the milestone is the caller's check (first time
    /// only, across retries and restarts, is a stored fact).
    pub fn is_crossed(
        &self,
        before: impl Fn(&Measure) -> i64,
        after: impl Fn(&Measure) -> i64,
        signed_up_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> bool {
        !self.is_reached(before)
            && self.is_reached(after)
            && self.is_within_window(signed_up_at, at)
    }
}

/// Fixes derived event ids: one per project, subject, rule and event name,
/// so the same milestone can never add its events twice.
const DERIVED_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x3b0c_51d7_8e2a_4f61_9c0d_a4e7_2b18_f5c9);

/// The events a new milestone adds to the stream, right after the event
/// that crossed it: `activation_threshold_crossed` (`rule`, `event`,
/// `count`, `scope`, `seconds_to_value`) and, for the activation
/// definition, `$activated`. They carry the crossing event's user, org
/// and time.
pub fn derived_events(
    project: crate::project::ProjectId,
    milestone: &Milestone,
    crossing: &crate::events::Event,
) -> Vec<crate::events::Event> {
    use crate::events::{Event, EventType, Source};
    let make = |name: &str| {
        let id = format!(
            "{}/{}/{}/{}/{name}",
            project.0,
            milestone.scope.as_str(),
            milestone.subject_id,
            milestone.rule
        );
        let mut properties = serde_json::Map::new();
        properties.insert("rule".into(), milestone.rule.clone().into());
        properties.insert("event".into(), milestone.event.clone().into());
        properties.insert("count".into(), milestone.count.into());
        properties.insert("scope".into(), milestone.scope.as_str().into());
        properties.insert("seconds_to_value".into(), milestone.seconds_to_value.into());
        Event {
            event_id: uuid::Uuid::new_v5(&DERIVED_NAMESPACE, id.as_bytes()),
            event_id_generated: false,
            kind: EventType::Track,
            event: name.to_owned(),
            user_id: crossing.user_id.clone(),
            anonymous_id: crossing.anonymous_id.clone(),
            org_id: crossing.org_id.clone(),
            previous_id: None,
            timestamp: crossing.timestamp,
            original_timestamp: None,
            sent_at: None,
            received_at: crossing.received_at,
            skew_corrected: false,
            future_clamped: false,
            properties,
            traits: serde_json::Map::new(),
            context: serde_json::Map::new(),
            schema_version: None,
            source: Source::Derived,
            schema_violations: Vec::new(),
        }
    };
    let mut events = vec![make("activation_threshold_crossed")];
    if milestone.activation {
        events.push(make("$activated"));
    }
    events
}

mod progress;

pub use progress::*;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn rules(document: serde_json::Value) -> Result<ActivationRules, Vec<String>> {
        let parsed: ActivationRules =
            serde_json::from_value(document).map_err(|e| vec![e.to_string()])?;
        parsed
            .validate()
            .map_err(|problems| problems.into_iter().map(|p| p.message).collect())
    }

    #[test]
    fn the_seed_thresholds_are_expressible_as_written() {
        let rules = rules(json!({"rules": [
            {"key": "three_projects", "scope": "user", "conditions": ["project_created >= 3"],
             "within_days": 14, "activation": true},
            {"key": "api_usage", "scope": "org", "conditions": ["feature:api_calls >= 50"]},
            {"key": "team", "scope": "user", "conditions": ["team_invites >= 2"]},
            {"key": "engaged", "scope": "org", "match": "any", "conditions": [
                "project_created >= 3", {"event": "export_generated", "at_least": 1}]}
        ]}))
        .unwrap();
        assert_eq!(
            rules.rules[0].conditions[0],
            Condition {
                measure: Measure::Event("project_created".into()),
                at_least: 3
            }
        );
        assert_eq!(
            rules.rules[1].conditions[0].measure,
            Measure::Feature("api_calls".into())
        );
        assert_eq!(
            rules.counted_events().into_iter().collect::<Vec<_>>(),
            ["export_generated", "project_created", "team_invites"]
        );
    }

    #[test]
    fn every_problem_is_named_with_its_path() {
        let problems = rules(json!({"rules": [
            {"key": "Bad Key", "scope": "user", "conditions": ["x >= 0"], "within_days": 0},
            {"key": "dup", "scope": "user", "conditions": [], "activation": true},
            {"key": "dup", "scope": "user", "conditions": ["feature:api_calls >= 5"], "activation": true}
        ]}))
        .unwrap_err();
        let expected = [
            "/rules/0/key: 1-64 characters of a-z, 0-9 and _",
            "/rules/0/conditions/0: the threshold must be at least 1",
            "/rules/0/within_days: 1 to 366 days",
            "/rules/1/conditions: 1 to 10 conditions",
            "/rules/2/key: `dup` is defined twice",
            "/rules/2/conditions/0: metered usage belongs to an org: use it in an `org` rule",
            "/rules/2/activation: only one rule is the activation definition (rule 1 is)",
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn malformed_conditions_are_refused_with_the_accepted_forms() {
        for bad in [
            json!("project_created > 3"),
            json!("project_created >= three"),
            json!({"event": "a", "feature": "b", "at_least": 1}),
            json!({"at_least": 1}),
            json!(3),
        ] {
            let error =
                rules(json!({"rules": [{"key": "k", "scope": "user", "conditions": [bad]}]}))
                    .unwrap_err();
            assert!(error[0].contains("condition"), "{bad}: {error:?}");
        }
    }

    #[test]
    fn all_and_any_combine_conditions() {
        let rules = rules(json!({"rules": [
            {"key": "both", "scope": "org", "conditions": ["a >= 2", "b >= 1"]},
            {"key": "either", "scope": "org", "match": "any", "conditions": ["a >= 2", "b >= 1"]}
        ]}))
        .unwrap();
        let counts = |a: i64, b: i64| {
            move |measure: &Measure| match measure {
                Measure::Event(name) if name == "a" => a,
                Measure::Event(name) if name == "b" => b,
                _ => 0,
            }
        };
        assert!(!rules.rules[0].is_reached(counts(2, 0)));
        assert!(rules.rules[0].is_reached(counts(2, 1)));
        assert!(rules.rules[1].is_reached(counts(0, 1)));
        assert!(!rules.rules[1].is_reached(counts(1, 0)));
    }

    #[test]
    fn a_crossing_counts_once_and_only_inside_the_window() {
        let rule = rules(json!({"rules": [
            {"key": "three", "scope": "user", "conditions": ["project_created >= 3"], "within_days": 14}
        ]}))
        .unwrap()
        .rules
        .remove(0);
        let count = |n: i64| move |_: &Measure| n;
        let signup = at("2026-01-31T10:00:00Z");
        // The third project, on day 13: crossed.
        assert!(rule.is_crossed(count(2), count(3), signup, at("2026-02-13T09:59:59Z")));
        // A fourth one crosses nothing (already reached).
        assert!(!rule.is_crossed(count(3), count(4), signup, at("2026-02-13T10:00:00Z")));
        // The window is half-open: exactly 14 days after signup is outside.
        assert!(!rule.is_crossed(count(2), count(3), signup, at("2026-02-14T10:00:00Z")));
        assert!(rule.is_within_window(signup, at("2026-02-14T09:59:59Z")));
        // No window: whenever.
        let mut open = rule.clone();
        open.within_days = None;
        assert!(open.is_crossed(count(0), count(5), signup, at("2027-01-01T00:00:00Z")));
    }
}
