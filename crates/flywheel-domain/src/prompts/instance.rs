//! A prompt instance: the copy a user gets (content choice, template
//! variables, rendering), what the product did with it, and its status.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{environment, PromptContent, PromptRule};
use crate::billing::org::OrgState;
use crate::billing::Catalog;

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
