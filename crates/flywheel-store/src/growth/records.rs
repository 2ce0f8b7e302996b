//! The growth graph's request and record types.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::growth::model::{
    Attribution, ClickModel, Invitation, InvitationPolicy, ReferralEventKind, ShareAudience,
    ShareLink, SharePermission, Utm,
};
use flywheel_domain::project::ProjectId;
use serde::{Deserialize, Serialize};

use crate::Billing;

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserRecord {
    pub user_id: String,
    pub email: String,
    pub email_verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub attribution: Attribution,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral_code: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MembershipRecord {
    pub org_id: String,
    pub user_id: String,
    pub role: String,
    /// How the membership came about: `signup` (the org's creator),
    /// `invite`, `invite_link`.
    pub joined_via: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrgProfile {
    pub org_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The user whose signup created the org (absent for orgs the product
    /// created some other way and that gained members through Flywheel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<String>,
    /// The org template version it was provisioned from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_version: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// The rules growth writes run under (from settings and the catalog).
#[derive(Debug, Clone)]
pub struct GrowthPolicy {
    pub invitations: InvitationPolicy,
    pub referral_window_days: i64,
    pub click_model: ClickModel,
    /// The metered feature memberships count against (`seats`); ignored
    /// when the catalog has no such metered feature.
    pub seats_feature: String,
    pub billing: Billing,
}

impl GrowthPolicy {
    /// The rules seats are taken and given back under.
    pub fn seat_rules(&self) -> flywheel_domain::growth::seats::SeatRules<'_> {
        flywheel_domain::growth::seats::SeatRules {
            catalog: &self.billing.catalog,
            feature: &self.seats_feature,
            grace: self.billing.grace,
        }
    }
}

/// A message for the product's webhook endpoints, written in the
/// transaction of the effect it reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub event_type: String,
    pub data: serde_json::Value,
}

/// An email rendered by the caller, queued in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
}

/// The outcome of a growth write: the reply and the billing states of orgs
/// it changed (seats), for the caller's caches.
#[derive(Debug, Clone)]
pub struct GrowthCommit<T> {
    pub reply: T,
    pub orgs: Vec<Arc<OrgState>>,
}

/// `POST /v1/signup`, resolved by the server: ids minted, email
/// normalised, tokens hashed.
#[derive(Debug, Clone)]
pub struct SignupRequest {
    pub project: ProjectId,
    pub now: DateTime<Utc>,
    pub idempotency_key: String,
    /// What the key must keep meaning.
    pub fingerprint: String,
    pub user_id: String,
    pub email: String,
    pub email_identity: String,
    pub email_verified: bool,
    pub name: Option<String>,
    /// The id a new org gets (when no invitation or link decides the org).
    pub new_org_id: String,
    pub org_name: Option<String>,
    pub invitation_token_hash: Option<String>,
    pub invite_link_token_hash: Option<String>,
    pub share_token_hash: Option<String>,
    pub referral_code: Option<String>,
    pub referral_click_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub utm: Option<Utm>,
    pub referrer: Option<String>,
    /// The referral code the new user gets.
    pub new_referral_code: String,
    pub policy: GrowthPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignupReply {
    pub user: UserRecord,
    pub org: OrgProfile,
    pub membership: MembershipRecord,
    /// Whether the signup created the org (false: joined an existing one).
    pub org_created: bool,
    /// The plan the org is on now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// An invitation to create, with its token already hashed.
#[derive(Debug, Clone)]
pub struct NewInvitation {
    pub id: String,
    pub email: String,
    pub token_hash: String,
    pub token_prefix: String,
    pub email_message: Option<RenderedEmail>,
}

#[derive(Debug, Clone)]
pub struct InvitationBatch {
    pub project: ProjectId,
    pub org_id: String,
    pub inviter_user_id: String,
    pub role: String,
    pub expires_at: DateTime<Utc>,
    /// Distinct addresses (the caller dedupes); one outcome each, in order.
    pub invitations: Vec<NewInvitation>,
    pub policy: InvitationPolicy,
    pub now: DateTime<Utc>,
}

/// What became of one address of an [`InvitationBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvitationOutcome {
    Created(Invitation),
    /// A pending invitation to this address exists already.
    AlreadyPending(Invitation),
    /// The address belongs to a member of the org already.
    AlreadyMember,
}

/// An invitation found by its token, with what the invitee is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationLookup {
    pub invitation: Invitation,
    pub org_name: Option<String>,
    pub inviter_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ResendRequest {
    pub project: ProjectId,
    pub org_id: String,
    pub id: String,
    pub token_hash: String,
    pub token_prefix: String,
    pub expires_at: DateTime<Utc>,
    /// Rendered by the caller once it knows the address (see
    /// [`InvitationStore::invitation_by_id`](super::InvitationStore::invitation_by_id)).
    pub email_message: Option<RenderedEmail>,
    pub policy: InvitationPolicy,
    pub now: DateTime<Utc>,
}

/// Accepting an invitation or joining through an invite link, as an
/// existing user.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub project: ProjectId,
    pub token_hash: String,
    pub user_id: String,
    pub policy: GrowthPolicy,
    pub now: DateTime<Utc>,
}

/// Changes to a share link (absent fields stay).
#[derive(Debug, Clone, Default)]
pub struct ShareLinkUpdate {
    pub permission: Option<SharePermission>,
    pub audience: Option<ShareAudience>,
    pub allow_list: Option<Vec<String>>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub password_hash: Option<Option<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct ShareLinkFilter {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub created_by_user_id: Option<String>,
}

/// A share link found by its token, with its password hash for checking.
#[derive(Debug, Clone)]
pub struct ShareLinkSecret {
    pub link: ShareLink,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ReferralEventQuery {
    pub kind: Option<ReferralEventKind>,
    pub actor_user_id: Option<String>,
    pub signup_user_id: Option<String>,
    /// Only events with `id > after_id` (paging, oldest first).
    pub after_id: Option<i64>,
    pub limit: u32,
}

/// A webhook endpoint of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    /// `whsec_…`, for Standard Webhooks signatures.
    pub secret: String,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Since when every attempt has failed (cleared by a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    pub fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }
}

/// What [`OutboundStore::prune_outbound`](super::OutboundStore::prune_outbound) deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunedOutbound {
    pub messages: u64,
    pub deliveries: u64,
    pub emails: u64,
    pub signup_keys: u64,
}

/// A message for users' open live streams, written in the transaction of
/// what it reports: to one user (`user_id`) or to every user streaming for
/// an org (`org_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMessage {
    pub user_id: Option<String>,
    pub org_id: Option<String>,
    /// `prompt` or `entitlements`: the SSE event name.
    pub kind: String,
    pub payload: serde_json::Value,
}

/// A live message as stored, with its sequence number (the SSE event id).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRecord {
    pub seq: i64,
    pub project: ProjectId,
    pub message: LiveMessage,
    pub created_at: DateTime<Utc>,
}

/// How one prompt rule (and variant) has done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PromptStats {
    pub rule: String,
    pub variant: Option<String>,
    pub created: i64,
    pub shown: i64,
    pub clicked: i64,
    pub dismissed: i64,
    /// Upgrades credited to a clicked prompt.
    pub converted: i64,
}

/// A delivery claimed for sending: the lease runs until the claim's
/// `lease_until`; if the sender dies, it is due again then.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDelivery {
    pub id: String,
    pub project: ProjectId,
    pub message_id: String,
    pub endpoint_id: String,
    pub url: String,
    pub secret: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub message_created_at: DateTime<Utc>,
    pub attempts: i64,
    pub failing_since: Option<DateTime<Utc>>,
}

/// How an attempt went, and what to do next.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub id: String,
    pub project: ProjectId,
    pub endpoint_id: String,
    pub at: DateTime<Utc>,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    /// `None`: succeeded. `Some(Some(t))`: retry at `t`. `Some(None)`:
    /// retries exhausted.
    pub retry: Option<Option<DateTime<Utc>>>,
    /// Disable the endpoint (it has failed for too long), with this reason.
    pub disable_endpoint: Option<String>,
}

/// A delivery as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryRecord {
    pub id: String,
    pub message_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    /// `pending`, `succeeded`, `failed`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub endpoint_id: Option<String>,
    pub status: Option<String>,
    pub message_id: Option<String>,
    pub limit: u32,
}

/// An email claimed for sending (lease as for deliveries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEmail {
    pub id: String,
    pub project: ProjectId,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub attempts: i64,
}

/// An email as listed (bodies are not shown: they may hold a token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EmailRecord {
    pub id: String,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub status: String,
    pub attempts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
}

/// A project's template for one kind of email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EmailTemplate {
    pub kind: String,
    pub subject: String,
    pub text_body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_body: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// Result of a growth operation the rules may refuse.
pub type Ruled<T> = Result<T, flywheel_domain::DomainError>;
