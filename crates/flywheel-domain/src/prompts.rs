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

use crate::billing::org::OrgState;
use crate::billing::Catalog;
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

fn environment(strict: bool) -> minijinja::Environment<'static> {
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

/// Renders one template leniently: a variable the trigger does not provide
/// (`{{limit}}` for a milestone without a feature) renders empty rather
/// than losing the prompt.
pub fn render(template: &str, variables: &Map<String, Value>) -> String {
    environment(false)
        .render_str(template, variables)
        .unwrap_or_else(|_| template.to_owned())
}

/// Which copy a user gets: without an audience the rule's content; with
/// one, the copy of the variant the flag served (`None`: no prompt).
pub fn choose_content<'r>(
    rule: &'r PromptRule,
    served_variant: Option<&str>,
) -> Option<(Option<String>, &'r PromptContent)> {
    match (&rule.audience, &rule.content) {
        (None, Some(content)) => Some((None, content)),
        (Some(_), _) => {
            let variant = served_variant?;
            rule.variants
                .get(variant)
                .map(|content| (Some(variant.to_owned()), content))
        }
        (None, None) => None,
    }
}

/// The variables of an org's usage of `feature`: used, limit, remaining,
/// the plan and the cheapest plan that lifts the limit.
pub fn usage_variables(
    catalog: &Catalog,
    state: &OrgState,
    feature: &str,
    grace: Duration,
    now: DateTime<Utc>,
    variables: &mut Map<String, Value>,
) {
    // One more unit than used: the upgrade that would allow the next one.
    let answer = state.answer(catalog, feature, 1, true, grace, now);
    variables.insert("feature".into(), feature.into());
    if let Some(used) = answer.used {
        variables.insert("used".into(), used.into());
    }
    if let Some(limit) = answer.limit {
        variables.insert("limit".into(), limit.into());
    }
    if let Some(remaining) = answer.remaining {
        variables.insert("remaining".into(), remaining.into());
    }
    if let Some(preview) = answer.preview {
        variables.insert("feature_name".into(), preview.feature_name.into());
        if let Some(plan) = preview.upgrade_plan {
            variables.insert("upgrade_plan".into(), plan.key.into());
            variables.insert("upgrade_plan_name".into(), plan.name.into());
        }
    }
    plan_variables(catalog, answer.plan.as_deref(), variables);
}

/// `plan` and `plan_name` of the plan that applies.
pub fn plan_variables(catalog: &Catalog, plan: Option<&str>, variables: &mut Map<String, Value>) {
    if let Some(plan) = plan {
        variables.insert("plan".into(), plan.into());
        let name = catalog
            .plan(plan)
            .and_then(|definition| definition.name.clone())
            .unwrap_or_else(|| plan.to_owned());
        variables.insert("plan_name".into(), name.into());
    }
}

/// `ends_at` and `days_left` (whole days, rounded up) of a deadline.
pub fn deadline_variables(
    ends_at: DateTime<Utc>,
    now: DateTime<Utc>,
    variables: &mut Map<String, Value>,
) {
    variables.insert(
        "ends_at".into(),
        ends_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .into(),
    );
    let seconds = (ends_at - now).num_seconds().max(0);
    variables.insert("days_left".into(), ((seconds + 86_399) / 86_400).into());
}

/// What the product did with a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PromptAction {
    Shown,
    Clicked,
    Dismissed,
}

impl PromptAction {
    /// The event the action is recorded as.
    pub fn event_name(self) -> &'static str {
        match self {
            PromptAction::Shown => "$prompt_shown",
            PromptAction::Clicked => "$prompt_clicked",
            PromptAction::Dismissed => "$prompt_dismissed",
        }
    }

    pub fn from_event_name(name: &str) -> Option<Self> {
        match name {
            "$prompt_shown" => Some(PromptAction::Shown),
            "$prompt_clicked" => Some(PromptAction::Clicked),
            "$prompt_dismissed" => Some(PromptAction::Dismissed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PromptAction::Shown => "shown",
            PromptAction::Clicked => "clicked",
            PromptAction::Dismissed => "dismissed",
        }
    }
}

const ACTION_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x7d1e_0a4c_52b9_4c3e_8f60_1b2d_93a7_c4e8);

/// The event id of an action on a prompt: one per prompt and action, so
/// reporting `shown` twice records it once.
pub fn action_event_id(prompt_id: &str, action: PromptAction) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &ACTION_NAMESPACE,
        format!("{prompt_id}/{}", action.as_str()).as_bytes(),
    )
}

/// Where a prompt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PromptStatus {
    /// Created, not yet shown.
    Pending,
    Shown,
    /// Acted on: no longer pending.
    Clicked,
    /// Closed by the user: no longer pending.
    Dismissed,
    /// Not acted on before `expires_at`.
    Expired,
}

/// A prompt instance: what the product shows, rendered when its trigger
/// fired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Prompt {
    /// `prm_…`
    pub id: String,
    /// The rule's key.
    pub rule: String,
    pub user_id: String,
    pub org_id: Option<String>,
    /// The audience flag's variant that chose the copy.
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// What fired it: `milestone`, `usage_warning`, `limit_reached`,
    /// `trial_ending`, `grace_ending`.
    pub trigger: String,
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cta: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_url: Option<String>,
    /// The variables the copy was rendered with.
    pub data: Map<String, Value>,
    pub priority: i32,
    pub status: PromptStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub shown_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    pub dismissed_at: Option<DateTime<Utc>>,
    /// An upgrade credited to this prompt (after a click).
    pub converted_at: Option<DateTime<Utc>>,
    pub converted_plan: Option<String>,
}

impl Prompt {
    /// The status at `now`, from the recorded times.
    pub fn status_at(&self, now: DateTime<Utc>) -> PromptStatus {
        if self.dismissed_at.is_some() {
            PromptStatus::Dismissed
        } else if self.clicked_at.is_some() {
            PromptStatus::Clicked
        } else if now >= self.expires_at {
            PromptStatus::Expired
        } else if self.shown_at.is_some() {
            PromptStatus::Shown
        } else {
            PromptStatus::Pending
        }
    }

    /// Still waiting for the user: neither clicked, dismissed nor expired.
    pub fn is_pending(&self, now: DateTime<Utc>) -> bool {
        matches!(
            self.status_at(now),
            PromptStatus::Pending | PromptStatus::Shown
        )
    }
}

/// Builds a prompt instance for a user from a rule that fired.
#[allow(clippy::too_many_arguments)]
pub fn instantiate(
    id: String,
    rule: &PromptRule,
    variant: Option<String>,
    content: &PromptContent,
    user_id: &str,
    org_id: Option<&str>,
    mut variables: Map<String, Value>,
    now: DateTime<Utc>,
) -> Prompt {
    variables.insert("user_id".into(), user_id.into());
    if let Some(org) = org_id {
        variables.insert("org_id".into(), org.into());
    }
    let upgrade_url = rule
        .upgrade_url
        .as_ref()
        .map(|template| render(template, &variables));
    if let Some(url) = &upgrade_url {
        variables.insert("upgrade_url".into(), url.clone().into());
    }
    let mut prompt = Prompt {
        id,
        rule: rule.key.clone(),
        user_id: user_id.to_owned(),
        org_id: org_id.map(str::to_owned),
        variant,
        flag: rule.audience.as_ref().map(|audience| audience.flag.clone()),
        trigger: rule.trigger.kind().to_owned(),
        title: render(&content.title, &variables),
        body: render(&content.body, &variables),
        cta: content.cta.as_ref().map(|cta| render(cta, &variables)),
        upgrade_url,
        data: variables,
        priority: rule.priority,
        status: PromptStatus::Pending,
        created_at: now,
        expires_at: now + rule.expires_after(),
        shown_at: None,
        clicked_at: None,
        dismissed_at: None,
        converted_at: None,
        converted_plan: None,
    };
    prompt.status = prompt.status_at(now);
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn rules(document: Value) -> Result<PromptRules, Vec<String>> {
        let parsed: PromptRules =
            serde_json::from_value(document).map_err(|e| vec![e.to_string()])?;
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
        let again: PromptRules =
            serde_json::from_value(serde_json::to_value(&rules).unwrap()).unwrap();
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
}
