//! Which prompts a transaction's triggers raise. The store loads what the
//! rule needs (each trigger's org state and recipient, when each matching
//! rule last prompted the recipient), calls [`raise`], and writes the
//! prompts it returns in the trigger's transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use flywheel_flags::CompiledFlagSet;
use serde_json::Map;

use super::{
    choose_content, deadline_variables, instantiate, plan_variables, usage_variables, Prompt,
    PromptRule, PromptRules, TriggerFact,
};
use crate::billing::org::OrgState;
use crate::billing::Catalog;

/// The project's rules a write runs under, as far as prompts need them.
#[derive(Debug, Clone, Copy)]
pub struct PromptSetting<'a> {
    pub rules: &'a PromptRules,
    pub catalog: &'a Catalog,
    /// How long a `past_due` subscription keeps its plan.
    pub grace: Duration,
    /// The flags that `audience`s name.
    pub flags: &'a CompiledFlagSet,
}

/// A trigger with what the store loaded for it.
#[derive(Debug, Clone)]
pub struct LoadedTrigger<'a> {
    pub fact: TriggerFact,
    /// Who gets the prompts: the acting user, else the org's owner (`None`:
    /// nobody to show them to).
    pub recipient: Option<String>,
    pub org_id: Option<String>,
    /// The org's billing state as the transaction leaves it.
    pub org: Option<&'a OrgState>,
}

/// Why a matching rule raised no prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither an acting user nor an org owner.
    NoRecipient,
    /// The rule prompted this user too recently.
    FrequencyCap,
    /// The audience flag served a variant without copy (or none).
    Audience,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoRecipient => "no_recipient",
            SkipReason::FrequencyCap => "frequency_cap",
            SkipReason::Audience => "audience",
        }
    }
}

/// What [`raise`] decided.
#[derive(Debug, Clone, Default)]
pub struct RaisedPrompts {
    /// The prompts to create, in the order decided.
    pub prompts: Vec<Prompt>,
    pub skipped: Vec<SkipReason>,
}

/// The prompts `triggers` raise at `now`: for each trigger, every matching
/// rule (highest priority first) unless its frequency cap holds for the
/// recipient (`last_prompted`: when the rule last prompted the user, by
/// (rule key, user id), as stored) or its audience flag serves a variant
/// without copy. One rule prompts one user at most once per call, however
/// many triggers fire it. `new_id` names each prompt.
pub fn raise(
    setting: PromptSetting<'_>,
    triggers: &[LoadedTrigger<'_>],
    last_prompted: &HashMap<(String, String), DateTime<Utc>>,
    now: DateTime<Utc>,
    new_id: &mut dyn FnMut() -> String,
) -> RaisedPrompts {
    let mut raised = RaisedPrompts::default();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for trigger in triggers {
        let rules = setting.rules.matching(&trigger.fact);
        if rules.is_empty() {
            continue;
        }
        let Some(user) = trigger.recipient.as_deref() else {
            raised.skipped.push(SkipReason::NoRecipient);
            continue;
        };
        for rule in rules {
            if !seen.insert((&rule.key, user)) {
                continue;
            }
            let last = last_prompted
                .get(&(rule.key.clone(), user.to_owned()))
                .copied();
            if !rule.frequency.allows(last, now) {
                raised.skipped.push(SkipReason::FrequencyCap);
                continue;
            }
            match prompt_for(setting, trigger, rule, user, now, new_id) {
                Some(prompt) => raised.prompts.push(prompt),
                None => raised.skipped.push(SkipReason::Audience),
            }
        }
    }
    raised
}

/// The (rule key, user) pairs whose last prompt [`raise`] needs: each
/// matching rule of each trigger with a recipient.
pub fn frequency_lookups(
    rules: &PromptRules,
    triggers: &[LoadedTrigger<'_>],
) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for trigger in triggers {
        let Some(user) = &trigger.recipient else {
            continue;
        };
        for rule in rules.matching(&trigger.fact) {
            let pair = (rule.key.clone(), user.clone());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    pairs
}

/// One rule's prompt for `user`, or `None` when its audience serves no copy.
fn prompt_for(
    setting: PromptSetting<'_>,
    trigger: &LoadedTrigger<'_>,
    rule: &PromptRule,
    user: &str,
    now: DateTime<Utc>,
    new_id: &mut dyn FnMut() -> String,
) -> Option<Prompt> {
    let state = trigger.org;
    let plan = state.and_then(|state| {
        state
            .access(setting.catalog, setting.grace, now)
            .plan
            .map(|(_, plan)| plan.key.clone())
    });
    let served = rule.audience.as_ref().and_then(|audience| {
        let mut context = Map::new();
        context.insert("targetingKey".into(), user.into());
        context.insert("user_id".into(), user.into());
        if let Some(org) = &trigger.org_id {
            context.insert("org_id".into(), org.clone().into());
        }
        if let Some(plan) = &plan {
            context.insert("plan".into(), plan.clone().into());
        }
        setting
            .flags
            .evaluate(&audience.flag, &context, now.timestamp())
            .variant
            .map(str::to_owned)
    });
    let (variant, content) = choose_content(rule, served.as_deref())?;
    let mut variables = Map::new();
    let feature = trigger.fact.feature().or(rule.trigger.feature());
    match (feature, state) {
        (Some(feature), Some(state)) => usage_variables(
            setting.catalog,
            state,
            feature,
            setting.grace,
            now,
            &mut variables,
        ),
        _ => plan_variables(setting.catalog, plan.as_deref(), &mut variables),
    }
    match &trigger.fact {
        TriggerFact::Milestone { rule } => {
            variables.insert("milestone".into(), rule.clone().into());
        }
        TriggerFact::GraceEnding { ends_at }
        | TriggerFact::TrialEnding {
            ends_at: Some(ends_at),
        } => deadline_variables(*ends_at, now, &mut variables),
        _ => {}
    }
    Some(instantiate(
        new_id(),
        rule,
        variant,
        content,
        user,
        trigger.org_id.as_deref(),
        variables,
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::catalog::CatalogDocument;
    use crate::billing::org::{OrgCommand, DEFAULT_PAST_DUE_GRACE};
    use serde_json::{json, Value};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn catalog() -> Catalog {
        let document: CatalogDocument = serde_json::from_value(json!({
            "features": [{"key": "projects", "name": "Projects", "kind": "metered"}],
            "plans": [
                {"key": "free", "name": "Free", "default": true,
                 "features": {"projects": {"limit": 3, "reset": "never"}}},
                {"key": "pro", "name": "Pro", "price": {"amount": 2900, "currency": "usd"},
                 "features": {"projects": {"limit": 10, "reset": "never"}}}
            ]
        }))
        .unwrap();
        Catalog::compile(document).unwrap()
    }

    fn rules(document: Value) -> PromptRules {
        serde_json::from_value::<PromptRules>(document)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn flags(document: Value) -> CompiledFlagSet {
        CompiledFlagSet::compile(flywheel_flags::FlagDocument::from_json(&document).unwrap())
            .unwrap()
    }

    fn limit_rules() -> PromptRules {
        rules(json!({"prompts": [
            {"key": "low", "trigger": {"on": "limit_reached", "feature": "projects"},
             "content": {"title": "{{used}} of {{limit}} {{feature_name}}", "body": "{{upgrade_plan_name}}"},
             "priority": 1},
            {"key": "high", "trigger": {"on": "limit_reached"},
             "content": {"title": "Limit on {{plan_name}}", "body": ""}, "priority": 9}
        ]}))
    }

    fn org_at_limit(now: DateTime<Utc>) -> OrgState {
        let catalog = catalog();
        let mut org = OrgState::new("acme", now);
        let consume = OrgCommand::Consume {
            feature: "projects".into(),
            amount: 3,
        };
        org.apply(&catalog, &consume, DEFAULT_PAST_DUE_GRACE, now)
            .unwrap();
        org
    }

    fn limit<'a>(recipient: Option<&str>, org: Option<&'a OrgState>) -> LoadedTrigger<'a> {
        LoadedTrigger {
            fact: TriggerFact::LimitReached {
                feature: "projects".into(),
                denied: true,
            },
            recipient: recipient.map(str::to_owned),
            org_id: Some("acme".into()),
            org,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("prm_{n}")
        }
    }

    #[test]
    fn matching_rules_raise_by_priority_with_usage_filled_in() {
        let now = at("2026-01-31T23:59:59Z");
        let (catalog, rules, flags) = (catalog(), limit_rules(), CompiledFlagSet::default());
        let setting = PromptSetting {
            rules: &rules,
            catalog: &catalog,
            grace: DEFAULT_PAST_DUE_GRACE,
            flags: &flags,
        };
        let org = org_at_limit(now);
        let raised = raise(
            setting,
            &[limit(Some("alice"), Some(&org))],
            &HashMap::new(),
            now,
            &mut ids(),
        );
        let titles: Vec<(&str, &str)> = raised
            .prompts
            .iter()
            .map(|p| (p.rule.as_str(), p.title.as_str()))
            .collect();
        assert_eq!(
            titles,
            [("high", "Limit on Free"), ("low", "3 of 3 Projects")]
        );
        assert_eq!(raised.prompts[1].body, "Pro");
        assert_eq!(raised.prompts[0].id, "prm_1");
        assert!(raised
            .prompts
            .iter()
            .all(|p| p.user_id == "alice" && p.created_at == now));
        assert!(raised.skipped.is_empty());
    }

    #[test]
    fn no_recipient_is_one_skip_per_trigger_and_no_rule_matching_is_none() {
        let now = at("2026-03-01T00:00:00Z");
        let (catalog, rules, flags) = (catalog(), limit_rules(), CompiledFlagSet::default());
        let setting = PromptSetting {
            rules: &rules,
            catalog: &catalog,
            grace: DEFAULT_PAST_DUE_GRACE,
            flags: &flags,
        };
        let unmatched = LoadedTrigger {
            fact: TriggerFact::Milestone { rule: "x".into() },
            recipient: None,
            org_id: None,
            org: None,
        };
        let raised = raise(
            setting,
            &[limit(None, None), unmatched],
            &HashMap::new(),
            now,
            &mut ids(),
        );
        assert!(raised.prompts.is_empty());
        assert_eq!(raised.skipped, [SkipReason::NoRecipient]);
        assert!(frequency_lookups(&rules, &[limit(None, None)]).is_empty());
    }

    #[test]
    fn the_frequency_cap_is_half_open_and_a_rule_prompts_a_user_once_per_call() {
        let now = at("2026-03-02T12:00:00Z");
        let (catalog, rules, flags) = (catalog(), limit_rules(), CompiledFlagSet::default());
        let setting = PromptSetting {
            rules: &rules,
            catalog: &catalog,
            grace: DEFAULT_PAST_DUE_GRACE,
            flags: &flags,
        };
        let triggers = [limit(Some("alice"), None), limit(Some("alice"), None)];
        assert_eq!(
            frequency_lookups(&rules, &triggers),
            [
                ("high".to_owned(), "alice".to_owned()),
                ("low".to_owned(), "alice".to_owned())
            ]
        );
        // The default cap is a day: 24 h after the last prompt is allowed
        // again, a microsecond less is not.
        let mut last = HashMap::new();
        last.insert(
            ("high".to_owned(), "alice".to_owned()),
            now - Duration::hours(24),
        );
        last.insert(
            ("low".to_owned(), "alice".to_owned()),
            now - Duration::hours(24) + Duration::microseconds(1),
        );
        let raised = raise(setting, &triggers, &last, now, &mut ids());
        let keys: Vec<&str> = raised.prompts.iter().map(|p| p.rule.as_str()).collect();
        assert_eq!(keys, ["high"]);
        assert_eq!(raised.skipped, [SkipReason::FrequencyCap]);
    }

    #[test]
    fn the_audience_flag_picks_the_copy_for_the_user_and_plan() {
        let now = at("2026-03-02T12:00:00Z");
        let catalog = catalog();
        let rules = rules(json!({"prompts": [
            {"key": "copy_test", "trigger": {"on": "limit_reached"}, "audience": {"flag": "copy"},
             "variants": {"bold": {"title": "Bold {{user_id}}", "body": ""}}}
        ]}));
        // bob is held out (a variant without copy); everyone else on the
        // free plan sees the bold copy.
        let flags = flags(json!({"flags": {"copy": {
            "state": "ENABLED", "defaultVariant": "control",
            "variants": {"control": "control", "bold": "bold"},
            "targeting": {"if": [
                {"==": [{"var": "user_id"}, "bob"]}, "control",
                {"==": [{"var": "plan"}, "free"]}, "bold",
                "control"
            ]}
        }}}));
        let setting = PromptSetting {
            rules: &rules,
            catalog: &catalog,
            grace: DEFAULT_PAST_DUE_GRACE,
            flags: &flags,
        };
        let org = org_at_limit(now);
        let triggers = [
            limit(Some("alice"), Some(&org)),
            limit(Some("bob"), Some(&org)),
        ];
        let raised = raise(setting, &triggers, &HashMap::new(), now, &mut ids());
        assert_eq!(raised.prompts.len(), 1);
        assert_eq!(raised.prompts[0].title, "Bold alice");
        assert_eq!(raised.prompts[0].variant.as_deref(), Some("bold"));
        assert_eq!(raised.prompts[0].flag.as_deref(), Some("copy"));
        assert_eq!(raised.skipped, [SkipReason::Audience]);
    }

    #[test]
    fn deadlines_and_milestones_fill_their_variables() {
        let now = at("2026-02-28T12:00:00Z");
        let catalog = catalog();
        let rules = rules(json!({"prompts": [
            {"key": "grace", "trigger": {"on": "grace_ending"},
             "content": {"title": "{{days_left}} days", "body": "until {{ends_at}}"}},
            {"key": "activated", "trigger": {"on": "milestone", "milestone": "three_projects"},
             "content": {"title": "{{milestone}} on {{plan_name}}", "body": ""}}
        ]}));
        let flags = CompiledFlagSet::default();
        let setting = PromptSetting {
            rules: &rules,
            catalog: &catalog,
            grace: DEFAULT_PAST_DUE_GRACE,
            flags: &flags,
        };
        let org = OrgState::new("acme", now);
        let triggers = [
            LoadedTrigger {
                fact: TriggerFact::GraceEnding {
                    ends_at: at("2026-03-02T12:00:01Z"),
                },
                recipient: Some("owner".into()),
                org_id: Some("acme".into()),
                org: Some(&org),
            },
            LoadedTrigger {
                fact: TriggerFact::Milestone {
                    rule: "three_projects".into(),
                },
                recipient: Some("alice".into()),
                org_id: Some("acme".into()),
                org: Some(&org),
            },
        ];
        let raised = raise(setting, &triggers, &HashMap::new(), now, &mut ids());
        let titles: Vec<&str> = raised.prompts.iter().map(|p| p.title.as_str()).collect();
        // Two days and a second left round up to three.
        assert_eq!(titles, ["3 days", "three_projects on Free"]);
        assert_eq!(raised.prompts[0].body, "until 2026-03-02T12:00:01Z");
    }
}
