//! How a batch of new events advances activation: which subjects (users,
//! orgs) it touches, their counters, and the milestones it records. The
//! store loads each touched subject's [`SubjectProgress`], calls
//! [`advance`], and writes what it returns in the events' transaction.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{ActivationRules, Measure, Milestone, Scope};
use crate::events::{Event, EventType};

/// One new event that counts toward a subject's rules.
#[derive(Debug, Clone, Copy)]
pub struct Touch<'e> {
    pub event: &'e Event,
    pub scope: Scope,
    pub subject_id: &'e str,
}

/// What is stored of a subject's progress before the batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubjectProgress {
    /// Per counted event name: the count and the time of the first one.
    pub counts: HashMap<String, (i64, DateTime<Utc>)>,
    /// The rules already reached (a milestone is recorded once).
    pub reached: HashSet<String>,
    /// The signup (users) or provisioning (orgs), if Flywheel recorded one.
    pub signed_up_at: Option<DateTime<Utc>>,
    /// Metered usage of the features org rules measure, after the batch's
    /// meters.
    pub usage: HashMap<String, i64>,
}

/// A milestone the batch reached, with the event that reached it.
#[derive(Debug, Clone)]
pub struct Reached<'e> {
    pub milestone: Milestone,
    pub event: &'e Event,
    /// Who a prompt of this milestone is for: the user, or for an org's
    /// milestone the user who sent the event.
    pub recipient: Option<String>,
}

/// A counter to store (the new count; `first_at` only on insert).
#[derive(Debug, Clone, PartialEq)]
pub struct CountWrite {
    pub scope: Scope,
    pub subject_id: String,
    pub event: String,
    pub count: i64,
    pub first_at: DateTime<Utc>,
}

/// What [`advance`] decided.
#[derive(Debug, Clone, Default)]
pub struct Progress<'e> {
    /// In the order reached.
    pub reached: Vec<Reached<'e>>,
    pub counts: Vec<CountWrite>,
}

/// The metered features that org rules measure (`feature:` conditions).
pub fn measured_features(rules: &ActivationRules) -> BTreeSet<&str> {
    rules
        .rules
        .iter()
        .filter(|rule| rule.scope == Scope::Org)
        .flat_map(|rule| &rule.conditions)
        .filter_map(|condition| match &condition.measure {
            Measure::Feature(name) => Some(name.as_str()),
            Measure::Event(_) => None,
        })
        .collect()
}

/// The subjects `events` touch, in event order: a `track` event's user when
/// a user rule counts its name; its org when an org rule counts its name or
/// any org rule measures usage (a meter may have moved).
pub fn touches<'e>(rules: &ActivationRules, events: &[&'e Event]) -> Vec<Touch<'e>> {
    let counted = rules.counted_events();
    let has_scope = |scope: Scope| rules.rules.iter().any(|rule| rule.scope == scope);
    let (users, orgs) = (has_scope(Scope::User), has_scope(Scope::Org));
    let measures_usage = !measured_features(rules).is_empty();
    let mut touches = Vec::new();
    for event in events {
        if event.kind != EventType::Track {
            continue;
        }
        let named = counted.contains(event.event.as_str());
        if let (true, true, Some(user)) = (named, users, &event.user_id) {
            touches.push(Touch {
                event,
                scope: Scope::User,
                subject_id: user,
            });
        }
        if let (true, true, Some(org)) = (named || measures_usage, orgs, &event.org_id) {
            touches.push(Touch {
                event,
                scope: Scope::Org,
                subject_id: org,
            });
        }
    }
    touches
}

/// Applies `touches` in order to the subjects' progress (`subjects`, by
/// scope and id, loaded for every touched subject): counts each counted
/// event, and records each rule of the subject's scope that is reached
/// within its window from the signup, once. A subject Flywheel did not sign
/// up is measured from its first counted event.
pub fn advance<'e>(
    rules: &ActivationRules,
    touches: &[Touch<'e>],
    subjects: &mut HashMap<(Scope, String), SubjectProgress>,
) -> Progress<'e> {
    let counted = rules.counted_events();
    let mut progress = Progress::default();
    let mut dirty: BTreeSet<(Scope, &str, &str)> = BTreeSet::new();
    for touch in touches {
        let event = touch.event;
        let key = (touch.scope, touch.subject_id.to_owned());
        let subject = subjects.entry(key).or_default();
        if counted.contains(event.event.as_str()) {
            let entry = subject
                .counts
                .entry(event.event.clone())
                .or_insert((0, event.timestamp));
            entry.0 += 1;
            dirty.insert((touch.scope, touch.subject_id, &event.event));
        }
        let signed_up_at = subject.signed_up_at.unwrap_or_else(|| {
            subject
                .counts
                .values()
                .map(|(_, first)| *first)
                .min()
                .unwrap_or(event.timestamp)
        });
        for rule in rules.rules.iter().filter(|rule| rule.scope == touch.scope) {
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
                scope: touch.scope,
                subject_id: touch.subject_id.to_owned(),
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
            subject.reached.insert(rule.key.clone());
            let recipient = match touch.scope {
                Scope::User => Some(touch.subject_id.to_owned()),
                Scope::Org => event.user_id.clone(),
            };
            progress.reached.push(Reached {
                milestone,
                event,
                recipient,
            });
        }
    }
    for (scope, subject_id, name) in dirty {
        let (count, first_at) = subjects[&(scope, subject_id.to_owned())].counts[name];
        progress.counts.push(CountWrite {
            scope,
            subject_id: subject_id.to_owned(),
            event: name.to_owned(),
            count,
            first_at,
        });
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Source;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn rules(document: serde_json::Value) -> ActivationRules {
        serde_json::from_value::<ActivationRules>(document)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn track(name: &str, user: Option<&str>, org: Option<&str>, time: &str) -> Event {
        Event {
            event_id: uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("{name}{time}").as_bytes(),
            ),
            event_id_generated: false,
            kind: EventType::Track,
            event: name.to_owned(),
            user_id: user.map(str::to_owned),
            anonymous_id: None,
            org_id: org.map(str::to_owned),
            previous_id: None,
            timestamp: at(time),
            original_timestamp: None,
            sent_at: None,
            received_at: at(time),
            skew_corrected: false,
            future_clamped: false,
            properties: Default::default(),
            traits: Default::default(),
            context: Default::default(),
            schema_version: None,
            source: Source::Native,
            schema_violations: Vec::new(),
        }
    }

    fn seed() -> ActivationRules {
        rules(json!({"rules": [
            {"key": "three_projects", "scope": "user", "conditions": ["project_created >= 3"],
             "within_days": 14, "activation": true},
            {"key": "api_usage", "scope": "org", "conditions": ["feature:api_calls >= 50"]}
        ]}))
    }

    #[test]
    fn touches_follow_what_the_rules_count_and_measure() {
        let rules = seed();
        let events = [
            track(
                "project_created",
                Some("alice"),
                Some("acme"),
                "2026-01-01T00:00:00Z",
            ),
            track("page_viewed", Some("alice"), None, "2026-01-01T00:00:01Z"),
            track(
                "page_viewed",
                Some("alice"),
                Some("acme"),
                "2026-01-01T00:00:02Z",
            ),
        ];
        let mut identify = track("x", Some("alice"), Some("acme"), "2026-01-01T00:00:03Z");
        identify.kind = EventType::Identify;
        let refs: Vec<&Event> = events.iter().chain([&identify]).collect();
        let found: Vec<(Scope, &str, &str)> = touches(&rules, &refs)
            .iter()
            .map(|t| (t.scope, t.subject_id, t.event.event.as_str()))
            .collect();
        // The org is touched by any event while an org rule measures usage;
        // the user only by what a user rule counts; identify never.
        assert_eq!(
            found,
            [
                (Scope::User, "alice", "project_created"),
                (Scope::Org, "acme", "project_created"),
                (Scope::Org, "acme", "page_viewed"),
            ]
        );
        assert_eq!(
            measured_features(&rules).into_iter().collect::<Vec<_>>(),
            ["api_calls"]
        );
    }

    #[test]
    fn the_third_project_within_the_window_is_the_milestone_once() {
        let rules = seed();
        let signed_up = at("2026-01-31T00:00:00Z");
        let mut subjects = HashMap::new();
        subjects.insert(
            (Scope::User, "alice".to_owned()),
            SubjectProgress {
                counts: [("project_created".to_owned(), (1, signed_up))].into(),
                signed_up_at: Some(signed_up),
                ..Default::default()
            },
        );
        let events = [
            track(
                "project_created",
                Some("alice"),
                None,
                "2026-02-13T23:59:58Z",
            ),
            track(
                "project_created",
                Some("alice"),
                None,
                "2026-02-13T23:59:59Z",
            ),
            track(
                "project_created",
                Some("alice"),
                None,
                "2026-02-14T00:00:00Z",
            ),
        ];
        let refs: Vec<&Event> = events.iter().collect();
        let progress = advance(&rules, &touches(&rules, &refs), &mut subjects);
        assert_eq!(progress.reached.len(), 1);
        let reached = &progress.reached[0];
        assert_eq!(reached.milestone.rule, "three_projects");
        assert_eq!(reached.milestone.count, 3);
        assert_eq!(reached.milestone.reached_at, at("2026-02-13T23:59:59Z"));
        assert_eq!(reached.milestone.seconds_to_value, 14 * 86_400 - 1);
        assert!(reached.milestone.activation);
        assert_eq!(reached.recipient.as_deref(), Some("alice"));
        assert_eq!(
            progress.counts,
            [CountWrite {
                scope: Scope::User,
                subject_id: "alice".into(),
                event: "project_created".into(),
                count: 4,
                first_at: signed_up,
            }]
        );
        // Reached is remembered: another batch records nothing again.
        let more = [track(
            "project_created",
            Some("alice"),
            None,
            "2026-02-15T00:00:00Z",
        )];
        let refs: Vec<&Event> = more.iter().collect();
        assert!(advance(&rules, &touches(&rules, &refs), &mut subjects)
            .reached
            .is_empty());
    }

    #[test]
    fn past_the_window_nothing_is_reached_and_an_unknown_subject_counts_from_its_first_event() {
        let rules = seed();
        let mut subjects = HashMap::new();
        // Never signed up through Flywheel: measured from the first event.
        subjects.insert((Scope::User, "bob".to_owned()), SubjectProgress::default());
        let events = [
            track("project_created", Some("bob"), None, "2026-03-01T00:00:00Z"),
            track("project_created", Some("bob"), None, "2026-03-10T00:00:00Z"),
            track("project_created", Some("bob"), None, "2026-03-15T00:00:00Z"),
        ];
        let refs: Vec<&Event> = events.iter().collect();
        let progress = advance(&rules, &touches(&rules, &refs), &mut subjects);
        // The window is half-open: exactly 14 days after is outside.
        assert!(
            progress.reached.is_empty(),
            "the third came 14 days after the first"
        );
        assert_eq!(progress.counts[0].count, 3);
        assert_eq!(progress.counts[0].first_at, at("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn an_org_rule_reads_usage_and_its_prompt_is_for_the_acting_user() {
        let rules = seed();
        let mut subjects = HashMap::new();
        subjects.insert(
            (Scope::Org, "acme".to_owned()),
            SubjectProgress {
                signed_up_at: Some(at("2026-01-01T00:00:00Z")),
                usage: [("api_calls".to_owned(), 50)].into(),
                ..Default::default()
            },
        );
        let events = [track(
            "api_call",
            Some("carol"),
            Some("acme"),
            "2026-01-02T00:00:00Z",
        )];
        let refs: Vec<&Event> = events.iter().collect();
        let progress = advance(&rules, &touches(&rules, &refs), &mut subjects);
        assert_eq!(progress.reached.len(), 1);
        assert_eq!(progress.reached[0].milestone.scope, Scope::Org);
        assert_eq!(
            progress.reached[0].milestone.count, 0,
            "api_call is not counted"
        );
        assert_eq!(progress.reached[0].recipient.as_deref(), Some("carol"));
        assert!(progress.counts.is_empty());
    }
}
