//! The prompt rules, their content and their instances.

use super::*;
use serde_json::json;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn rules(document: Value) -> Result<PromptRules, Vec<String>> {
    let parsed: PromptRules = serde_json::from_value(document).map_err(|e| vec![e.to_string()])?;
    parsed
        .validate()
        .map_err(|problems| problems.into_iter().map(|p| p.message).collect())
}

fn seed_rules() -> PromptRules {
    rules(json!({"prompts": [
        {"key": "activated_upgrade", "trigger": {"on": "milestone", "milestone": "three_projects", "feature": "projects"},
         "content": {"title": "You have used {{used}} of {{limit}} {{feature_name}}",
                     "body": "Upgrade to {{upgrade_plan_name}}: {{upgrade_url}}", "cta": "Go {{upgrade_plan_name}}"},
         "upgrade_url": "https://app.example.com/billing?plan={{upgrade_plan}}&org={{org_id}}",
         "frequency": {"once_every_hours": 72}, "priority": 5},
        {"key": "seats_warning", "trigger": {"on": "usage_warning", "feature": "seats"},
         "audience": {"flag": "seat-prompt-copy"},
         "variants": {"plain": {"title": "{{used}} of {{limit}} seats"},
                      "urgent": {"title": "Only {{remaining}} seat left!"}},
         "frequency": "once", "priority": 9},
        {"key": "any_limit", "trigger": {"on": "limit_reached"},
         "content": {"title": "{{feature_name}} limit reached", "body": ""}},
        {"key": "grace", "trigger": {"on": "grace_ending"},
         "content": {"title": "Payment failed", "body": "Access ends in {{days_left}} days ({{ends_at}})"}}
    ]}))
    .unwrap()
}

#[test]
fn the_seed_prompts_parse_and_round_trip() {
    let rules = seed_rules();
    assert_eq!(rules.prompts.len(), 4);
    assert_eq!(
        rules.prompts[1].frequency,
        Frequency::Once(OnceMarker::Once)
    );
    assert_eq!(rules.prompts[2].frequency, Frequency::default());
    let again: PromptRules = serde_json::from_value(serde_json::to_value(&rules).unwrap()).unwrap();
    assert_eq!(again, rules);
    assert!(rules.has_billing_triggers());
}

#[test]
fn every_problem_is_named_with_its_path() {
    let problems = rules(json!({"attribution_window_days": 0, "prompts": [
        {"key": "Bad", "trigger": {"on": "milestone", "milestone": ""},
         "content": {"title": "{{usd}}", "body": "{% if %}"}},
        {"key": "dup", "trigger": {"on": "usage_warning"}},
        {"key": "dup", "trigger": {"on": "limit_reached"}, "audience": {"flag": "f"},
         "content": {"title": "t", "body": "b"}, "frequency": {"once_every_hours": 0}},
        {"key": "novariants", "trigger": {"on": "trial_ending"}, "audience": {"flag": "f"}},
        {"key": "stray", "trigger": {"on": "grace_ending"}, "content": {"title": " ", "body": "b"},
         "variants": {"a": {"title": "x", "body": "y"}}, "expires_after_hours": 0}
    ]}))
    .unwrap_err();
    let paths: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/attribution_window_days",
            "/prompts/0/key",
            "/prompts/0/trigger/milestone",
            "/prompts/0/content/title",
            "/prompts/0/content/body",
            "/prompts/1/content",
            "/prompts/2/key",
            "/prompts/2/content",
            "/prompts/2/frequency/once_every_hours",
            "/prompts/3/variants",
            "/prompts/4/variants",
            "/prompts/4/content/title",
            "/prompts/4/expires_after_hours",
        ],
        "{problems:#?}"
    );
    assert!(problems[3].contains("the variables are used, limit"));
}

#[test]
fn unknown_trigger_and_fields_are_refused() {
    for bad in [
        json!({"prompts": [{"key": "k", "trigger": {"on": "timer"}, "content": {"title": "t", "body": "b"}}]}),
        json!({"prompts": [{"key": "k", "trigger": {"on": "milestone"}, "content": {"title": "t", "body": "b"}}]}),
        json!({"prompts": [{"key": "k", "trigger": {"on": "trial_ending"}, "content": {"title": "t", "body": "b"}, "color": 1}]}),
        json!({"prompts": [{"key": "k", "trigger": {"on": "trial_ending"}, "content": {"title": "t", "body": "b"}, "frequency": "twice"}]}),
    ] {
        assert!(rules(bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn facts_fire_the_matching_rules_by_priority() {
    let rules = seed_rules();
    let keys = |fact: TriggerFact| {
        rules
            .matching(&fact)
            .iter()
            .map(|rule| rule.key.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(TriggerFact::Milestone {
            rule: "three_projects".into()
        }),
        ["activated_upgrade"]
    );
    assert!(keys(TriggerFact::Milestone {
        rule: "other".into()
    })
    .is_empty());
    assert_eq!(
        keys(TriggerFact::UsageWarning {
            feature: "seats".into()
        }),
        ["seats_warning"]
    );
    assert!(keys(TriggerFact::UsageWarning {
        feature: "projects".into()
    })
    .is_empty());
    // A rule without a feature fires for every feature, denied or not.
    assert_eq!(
        keys(TriggerFact::LimitReached {
            feature: "api_calls".into(),
            denied: true
        }),
        ["any_limit"]
    );
    assert_eq!(
        keys(TriggerFact::GraceEnding {
            ends_at: at("2026-01-08T00:00:00Z")
        }),
        ["grace"]
    );
    assert!(keys(TriggerFact::TrialEnding { ends_at: None }).is_empty());
}

#[test]
fn priority_orders_and_ties_keep_document_order() {
    let rules = rules(json!({"prompts": [
        {"key": "low", "trigger": {"on": "limit_reached"}, "content": {"title": "a", "body": ""}},
        {"key": "high", "trigger": {"on": "limit_reached"}, "content": {"title": "b", "body": ""}, "priority": 3},
        {"key": "low2", "trigger": {"on": "limit_reached"}, "content": {"title": "c", "body": ""}}
    ]}))
    .unwrap();
    let fired: Vec<&str> = rules
        .matching(&TriggerFact::LimitReached {
            feature: "x".into(),
            denied: false,
        })
        .iter()
        .map(|rule| rule.key.as_str())
        .collect();
    assert_eq!(fired, ["high", "low", "low2"]);
}

#[test]
fn frequency_caps_are_half_open_and_once_is_forever() {
    let last = at("2026-03-01T12:00:00Z");
    let every = Frequency::Every {
        once_every_hours: 72,
    };
    assert!(every.allows(None, last));
    assert!(!every.allows(Some(last), at("2026-03-04T11:59:59Z")));
    assert!(every.allows(Some(last), at("2026-03-04T12:00:00Z")));
    let once = Frequency::Once(OnceMarker::Once);
    assert!(once.allows(None, last));
    assert!(!once.allows(Some(last), at("2030-01-01T00:00:00Z")));
}

#[test]
fn the_audience_flag_picks_the_copy_and_a_holdout_gets_none() {
    let rules = seed_rules();
    let seats = &rules.prompts[1];
    let (variant, content) = choose_content(seats, Some("urgent")).unwrap();
    assert_eq!(variant.as_deref(), Some("urgent"));
    assert_eq!(content.title, "Only {{remaining}} seat left!");
    assert!(choose_content(seats, Some("control")).is_none());
    assert!(choose_content(seats, None).is_none());
    let plain = &rules.prompts[0];
    let (variant, _) = choose_content(plain, Some("ignored")).unwrap();
    assert_eq!(variant, None);
}

#[test]
fn instances_render_every_variable_and_expire() {
    let rules = seed_rules();
    let rule = &rules.prompts[0];
    let mut variables = Map::new();
    for (name, value) in [
        ("used", json!(3)),
        ("limit", json!(5)),
        ("feature_name", json!("Projects")),
        ("upgrade_plan", json!("pro")),
        ("upgrade_plan_name", json!("Pro")),
    ] {
        variables.insert(name.into(), value);
    }
    let now = at("2026-01-31T10:00:00Z");
    let prompt = instantiate(
        "prm_1".into(),
        rule,
        None,
        rule.content.as_ref().unwrap(),
        "alice",
        Some("acme"),
        variables,
        now,
    );
    assert_eq!(prompt.title, "You have used 3 of 5 Projects");
    assert_eq!(
        prompt.upgrade_url.as_deref(),
        Some("https://app.example.com/billing?plan=pro&org=acme")
    );
    assert_eq!(
        prompt.body,
        "Upgrade to Pro: https://app.example.com/billing?plan=pro&org=acme"
    );
    assert_eq!(prompt.cta.as_deref(), Some("Go Pro"));
    assert_eq!(prompt.expires_at, at("2026-02-07T10:00:00Z"));
    assert_eq!(prompt.status, PromptStatus::Pending);
    assert!(prompt.is_pending(at("2026-02-07T09:59:59Z")));
    assert_eq!(
        prompt.status_at(at("2026-02-07T10:00:00Z")),
        PromptStatus::Expired
    );
    let mut clicked = prompt.clone();
    clicked.shown_at = Some(now);
    assert_eq!(clicked.status_at(now), PromptStatus::Shown);
    clicked.clicked_at = Some(now);
    assert_eq!(clicked.status_at(now), PromptStatus::Clicked);
    assert!(!clicked.is_pending(now));
    clicked.dismissed_at = Some(now);
    assert_eq!(clicked.status_at(now), PromptStatus::Dismissed);
}

#[test]
fn a_missing_variable_renders_empty_and_markup_is_not_escaped() {
    let mut variables = Map::new();
    variables.insert("feature_name".into(), json!("<b>API</b> & more"));
    assert_eq!(
        render("{{used}} of {{limit}} {{feature_name}}", &variables),
        " of  <b>API</b> & more"
    );
}

#[test]
fn deadlines_round_days_up() {
    let mut variables = Map::new();
    let now = at("2026-02-28T12:00:00Z");
    deadline_variables(at("2026-03-07T12:00:00Z"), now, &mut variables);
    assert_eq!(variables["days_left"], json!(7));
    assert_eq!(variables["ends_at"], json!("2026-03-07T12:00:00Z"));
    deadline_variables(at("2026-03-07T12:00:01Z"), now, &mut variables);
    assert_eq!(variables["days_left"], json!(8));
    deadline_variables(at("2026-02-01T00:00:00Z"), now, &mut variables);
    assert_eq!(variables["days_left"], json!(0));
}

#[test]
fn actions_map_to_events_with_fixed_ids() {
    for action in [
        PromptAction::Shown,
        PromptAction::Clicked,
        PromptAction::Dismissed,
    ] {
        assert_eq!(
            PromptAction::from_event_name(action.event_name()),
            Some(action)
        );
    }
    assert_eq!(PromptAction::from_event_name("$prompt_other"), None);
    assert_eq!(
        action_event_id("prm_1", PromptAction::Shown),
        action_event_id("prm_1", PromptAction::Shown)
    );
    assert_ne!(
        action_event_id("prm_1", PromptAction::Shown),
        action_event_id("prm_1", PromptAction::Clicked)
    );
    assert_ne!(
        action_event_id("prm_1", PromptAction::Shown),
        action_event_id("prm_2", PromptAction::Shown)
    );
}
