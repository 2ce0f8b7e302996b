//! In-product upgrade prompts: the rules a project writes (a trigger, an
//! optional flag audience, content templates, a frequency cap, a priority),
//! which rules a trigger fires, the variables their templates see, and the
//! prompt instances the store creates in the transaction of the trigger.
//!
//! Pure: the store calls [`PromptRules::matching`], [`Frequency::allows`],
//! [`choose_content`] and [`render`] inside the transaction that saw the
//! trigger (an event crossing a milestone, a billing write crossing a
//! usage line, a denied `consume`), so a prompt and its trigger commit
//! together and a retried request, which changes nothing, raises nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::DomainError;

/// Most prompt rules a project may define, and variants a rule may have.
pub const MAX_PROMPTS: usize = 50;
pub const MAX_VARIANTS: usize = 10;
/// The longest template, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 4096;
/// Default frequency cap: one prompt of a rule per user a day.
pub const DEFAULT_CAP_HOURS: u32 = 24;
/// A prompt not acted on stops being pending after this long (default).
pub const DEFAULT_EXPIRY_HOURS: u32 = 7 * 24;
/// An upgrade within this many days of a click is credited to the prompt.
pub const DEFAULT_ATTRIBUTION_DAYS: u32 = 7;

/// What makes a rule fire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Trigger {
    /// An activation rule's milestone was reached. `feature` (optional)
    /// names a metered feature whose usage fills `{{used}}`/`{{limit}}`.
    Milestone {
        milestone: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        feature: Option<String>,
    },
    /// A metered feature passed its `warn_at` share (any feature when
    /// `feature` is absent).
    UsageWarning {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        feature: Option<String>,
    },
    /// A hard or soft limit was reached by a write, or a `consume` was
    /// denied at the limit.
    LimitReached {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        feature: Option<String>,
    },
    /// The org's subscription started a trial: fired then, with the date it
    /// ends (`{{ends_at}}`, `{{days_left}}`).
    TrialEnding,
    /// A payment failed and the grace period started: fired then, with the
    /// date access ends.
    GraceEnding,
}

impl Trigger {
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Milestone { .. } => "milestone",
            Trigger::UsageWarning { .. } => "usage_warning",
            Trigger::LimitReached { .. } => "limit_reached",
            Trigger::TrialEnding => "trial_ending",
            Trigger::GraceEnding => "grace_ending",
        }
    }

    /// The metered feature whose usage the prompt shows, if any.
    pub fn feature(&self) -> Option<&str> {
        match self {
            Trigger::Milestone { feature, .. }
            | Trigger::UsageWarning { feature }
            | Trigger::LimitReached { feature } => feature.as_deref(),
            Trigger::TrialEnding | Trigger::GraceEnding => None,
        }
    }
}

/// Something that happened, as the store saw it in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerFact {
    Milestone { rule: String },
    UsageWarning { feature: String },
    LimitReached { feature: String, denied: bool },
    TrialEnding { ends_at: Option<DateTime<Utc>> },
    GraceEnding { ends_at: DateTime<Utc> },
}

impl TriggerFact {
    /// The metered feature the fact is about (usage facts only).
    pub fn feature(&self) -> Option<&str> {
        match self {
            TriggerFact::UsageWarning { feature } | TriggerFact::LimitReached { feature, .. } => {
                Some(feature)
            }
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TriggerFact::Milestone { .. } => "milestone",
            TriggerFact::UsageWarning { .. } => "usage_warning",
            TriggerFact::LimitReached { .. } => "limit_reached",
            TriggerFact::TrialEnding { .. } => "trial_ending",
            TriggerFact::GraceEnding { .. } => "grace_ending",
        }
    }

    fn matches(&self, trigger: &Trigger) -> bool {
        let feature_matches =
            |wanted: &Option<String>, seen: &str| wanted.as_deref().is_none_or(|w| w == seen);
        match (self, trigger) {
            (TriggerFact::Milestone { rule }, Trigger::Milestone { milestone, .. }) => {
                rule == milestone
            }
            (TriggerFact::UsageWarning { feature }, Trigger::UsageWarning { feature: wanted }) => {
                feature_matches(wanted, feature)
            }
            (
                TriggerFact::LimitReached { feature, .. },
                Trigger::LimitReached { feature: wanted },
            ) => feature_matches(wanted, feature),
            (TriggerFact::TrialEnding { .. }, Trigger::TrialEnding)
            | (TriggerFact::GraceEnding { .. }, Trigger::GraceEnding) => true,
            _ => false,
        }
    }
}

/// Who sees which copy: a flag whose variant keys name the rule's
/// `variants`. A user the flag serves another variant (or none: disabled,
/// missing) gets no prompt, so a holdout is a variant without copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Audience {
    pub flag: String,
}

/// A prompt's copy, as minijinja templates over the prompt's variables
/// (`{{used}}`, `{{limit}}`, `{{feature_name}}`, `{{plan_name}}`,
/// `{{upgrade_plan_name}}`, `{{upgrade_url}}`, …). Rendered as plain text:
/// the product escapes it for wherever it shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PromptContent {
    pub title: String,
    /// Optional: a banner may be a title alone.
    #[serde(default)]
    pub body: String,
    /// The call to action's label ("Upgrade to Pro").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cta: Option<String>,
}

/// How often one user may get a rule's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Frequency {
    /// `"once"`: never again after the first.
    Once(OnceMarker),
    /// `{"once_every_hours": 72}`: at most one per this many hours.
    Every { once_every_hours: u32 },
}

/// The literal `"once"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OnceMarker {
    Once,
}

impl Default for Frequency {
    fn default() -> Self {
        Frequency::Every {
            once_every_hours: DEFAULT_CAP_HOURS,
        }
    }
}

impl Frequency {
    /// Whether a new prompt may be created at `now`, given when the user's
    /// last prompt of the rule was created.
    pub fn allows(self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        match (self, last) {
            (_, None) => true,
            (Frequency::Once(_), Some(_)) => false,
            (Frequency::Every { once_every_hours }, Some(last)) => {
                now >= last + Duration::hours(i64::from(once_every_hours))
            }
        }
    }
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// One prompt rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PromptRule {
    /// Stable identifier (`[a-z0-9_]`, at most 64).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Audience>,
    /// The copy when there is no audience flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<PromptContent>,
    /// The copy per flag variant, with an audience flag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, PromptContent>,
    /// Template of the upgrade link (`{{upgrade_url}}` in the copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_url: Option<String>,
    #[serde(default)]
    pub frequency: Frequency,
    /// Higher first, when a user has several pending prompts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Hours until an unanswered prompt stops being pending (default 168).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_hours: Option<u32>,
}

impl PromptRule {
    pub fn expires_after(&self) -> Duration {
        Duration::hours(i64::from(
            self.expires_after_hours.unwrap_or(DEFAULT_EXPIRY_HOURS),
        ))
    }
}

/// A project's prompt rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PromptRules {
    pub prompts: Vec<PromptRule>,
    /// An upgrade this many days after a click is credited to the clicked
    /// prompt (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution_window_days: Option<u32>,
}

/// Every variable a template may use, with a sample value (validation
/// renders each template against these, strictly, to catch typos).
pub const VARIABLES: &[(&str, &str)] = &[
    ("used", "4"),
    ("limit", "5"),
    ("remaining", "1"),
    ("feature", "projects"),
    ("feature_name", "Projects"),
    ("plan", "free"),
    ("plan_name", "Free"),
    ("upgrade_plan", "pro"),
    ("upgrade_plan_name", "Pro"),
    ("upgrade_url", "https://example.com/upgrade"),
    ("milestone", "three_projects"),
    ("user_id", "user_1"),
    ("org_id", "org_1"),
    ("ends_at", "2026-01-31T00:00:00Z"),
    ("days_left", "3"),
];

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl PromptRules {
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn attribution_window(&self) -> Duration {
        Duration::days(i64::from(
            self.attribution_window_days
                .unwrap_or(DEFAULT_ATTRIBUTION_DAYS),
        ))
    }

    /// Checks a document; every problem is reported with its JSON path.
    pub fn validate(self) -> Result<Self, Vec<DomainError>> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| {
            problems.push(DomainError::invalid(
                "invalid_prompt_rules",
                format!("{path}: {message}"),
            ));
        };
        if self.prompts.len() > MAX_PROMPTS {
            problem(
                "/prompts".into(),
                format!("at most {MAX_PROMPTS} prompts, got {}", self.prompts.len()),
            );
        }
        if let Some(days) = self.attribution_window_days {
            if days == 0 || days > 366 {
                problem("/attribution_window_days".into(), "1 to 366 days".into());
            }
        }
        let mut keys = BTreeSet::new();
        for (i, rule) in self.prompts.iter().enumerate() {
            let at = format!("/prompts/{i}");
            if !valid_key(&rule.key) {
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
            let names = [
                match &rule.trigger {
                    Trigger::Milestone { milestone, .. } => Some(("milestone", milestone)),
                    _ => None,
                },
                rule.trigger.feature().map(|_| {
                    (
                        "feature",
                        match &rule.trigger {
                            Trigger::Milestone { feature, .. }
                            | Trigger::UsageWarning { feature }
                            | Trigger::LimitReached { feature } => {
                                feature.as_ref().expect("checked by feature()")
                            }
                            _ => unreachable!("feature() is None for the others"),
                        },
                    )
                }),
            ];
            for (field, name) in names.into_iter().flatten() {
                if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                    problem(
                        format!("{at}/trigger/{field}"),
                        "1-200 characters without control characters".into(),
                    );
                }
            }
            match (&rule.audience, &rule.content, rule.variants.is_empty()) {
                (None, Some(_), true) => {}
                (None, None, _) => problem(
                    format!("{at}/content"),
                    "a prompt without an audience flag needs `content`".into(),
                ),
                (None, Some(_), false) => problem(
                    format!("{at}/variants"),
                    "`variants` need an `audience` flag that picks one".into(),
                ),
                (Some(_), Some(_), _) => problem(
                    format!("{at}/content"),
                    "with an `audience` flag, write the copy per variant in `variants`".into(),
                ),
                (Some(_), None, true) => problem(
                    format!("{at}/variants"),
                    "an `audience` flag needs at least one variant's copy".into(),
                ),
                (Some(audience), None, false) => {
                    if audience.flag.is_empty() || audience.flag.len() > 200 {
                        problem(
                            format!("{at}/audience/flag"),
                            "a flag key of 1-200 characters".into(),
                        );
                    }
                }
            }
            if rule.variants.len() > MAX_VARIANTS {
                problem(
                    format!("{at}/variants"),
                    format!("at most {MAX_VARIANTS} variants"),
                );
            }
            let copies = rule
                .content
                .iter()
                .map(|content| (format!("{at}/content"), content))
                .chain(
                    rule.variants
                        .iter()
                        .map(|(name, content)| (format!("{at}/variants/{name}"), content)),
                );
            for (path, content) in copies {
                let fields = [
                    ("title", Some(&content.title)),
                    ("body", Some(&content.body)),
                    ("cta", content.cta.as_ref()),
                ];
                for (field, template) in fields {
                    if let Some(template) = template {
                        if let Err(message) = check_template(template) {
                            problem(format!("{path}/{field}"), message);
                        }
                    }
                }
                if content.title.trim().is_empty() {
                    problem(format!("{path}/title"), "a title is required".into());
                }
            }
            if let Some(url) = &rule.upgrade_url {
                if let Err(message) = check_template(url) {
                    problem(format!("{at}/upgrade_url"), message);
                }
            }
            if let Frequency::Every { once_every_hours } = rule.frequency {
                if once_every_hours == 0 || once_every_hours > 24 * 366 {
                    problem(
                        format!("{at}/frequency/once_every_hours"),
                        "1 to 8784 hours (or \"once\")".into(),
                    );
                }
            }
            if let Some(hours) = rule.expires_after_hours {
                if hours == 0 || hours > 24 * 366 {
                    problem(
                        format!("{at}/expires_after_hours"),
                        "1 to 8784 hours".into(),
                    );
                }
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }

    /// The rules a fact fires, highest priority first (then in document
    /// order).
    pub fn matching<'r>(&'r self, fact: &TriggerFact) -> Vec<&'r PromptRule> {
        let mut rules: Vec<&PromptRule> = self
            .prompts
            .iter()
            .filter(|rule| fact.matches(&rule.trigger))
            .collect();
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.priority));
        rules
    }

    /// Whether any rule is about metered usage or billing state (so billing
    /// writes must look for triggers).
    pub fn has_billing_triggers(&self) -> bool {
        self.prompts
            .iter()
            .any(|rule| !matches!(rule.trigger, Trigger::Milestone { .. }))
    }
}

pub(super) fn environment(strict: bool) -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(if strict {
        minijinja::UndefinedBehavior::Strict
    } else {
        minijinja::UndefinedBehavior::Lenient
    });
    // Plain text: no HTML escaping (the product escapes for its medium).
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// A template must compile, fit, and use only the known variables.
fn check_template(template: &str) -> Result<(), String> {
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("at most {MAX_TEMPLATE_BYTES} bytes"));
    }
    let samples: Map<String, Value> = VARIABLES
        .iter()
        .map(|(name, sample)| ((*name).to_owned(), Value::from(*sample)))
        .collect();
    environment(true)
        .render_str(template, &samples)
        .map(|_| ())
        .map_err(|error| {
            let known = VARIABLES
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ");
            format!("the template does not render ({error}); the variables are {known}")
        })
}

mod instance;
mod raise;

pub use instance::*;
pub use raise::*;

#[cfg(test)]
mod tests;
