//! The growth graph's storage: the [`GrowthStore`] interface, its request
//! and record types, and its one implementation, written once as SQL that
//! both backends accept (`$n` parameters, `ON CONFLICT`, `RETURNING`) and
//! expanded into each backend by [`growth_store_impl!`].
//!
//! Every operation that changes the graph runs in one transaction with its
//! consequences: the seat it takes, the referral events it records, the
//! outbox messages (webhooks) and emails it queues. A crash loses all of it
//! or none of it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::growth::model::{
    Attribution, ClickModel, Invitation, InvitationPolicy, InvitationStatus, InviteLink,
    ReferralEventKind, ShareAudience, ShareLink, SharePermission, Utm,
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
    /// [`GrowthStore::invitation_by_id`]).
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

/// What [`GrowthStore::prune_outbound`] deleted.
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

/// The growth graph's storage. Every backend implements it with
/// [`growth_store_impl!`]; `tests/growth_suite.rs` runs against each.
#[async_trait::async_trait]
pub trait GrowthStore: Send + Sync {
    /// Creates the user and its org (or membership), in one transaction with
    /// its seat, attribution, referral events, template and outbox messages.
    async fn signup(
        &self,
        request: &SignupRequest,
    ) -> Result<Ruled<GrowthCommit<SignupReply>>, crate::StoreError>;
    async fn get_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<UserRecord>, crate::StoreError>;
    async fn set_email_verified(
        &self,
        project: ProjectId,
        user_id: &str,
        verified: bool,
    ) -> Result<Option<UserRecord>, crate::StoreError>;
    async fn memberships_of_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Vec<MembershipRecord>, crate::StoreError>;
    /// The org's profile (if provisioned by a signup) and members.
    async fn org_members(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<(Option<OrgProfile>, Vec<MembershipRecord>), crate::StoreError>;

    /// Removes a member and gives back the seat they held, in one
    /// transaction with its `membership.removed` webhook. `Ok(None)`: not
    /// a member. The org's owner cannot be removed (`cannot_remove_owner`).
    async fn remove_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
        policy: &GrowthPolicy,
        now: DateTime<Utc>,
    ) -> Result<Ruled<GrowthCommit<Option<MembershipRecord>>>, crate::StoreError>;

    async fn create_invitations(
        &self,
        batch: &InvitationBatch,
    ) -> Result<Ruled<Vec<InvitationOutcome>>, crate::StoreError>;
    async fn list_invitations(
        &self,
        project: ProjectId,
        org_id: &str,
        status: Option<InvitationStatus>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Invitation>, crate::StoreError>;
    async fn invitation_by_id(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
    ) -> Result<Option<InvitationLookup>, crate::StoreError>;
    async fn revoke_invitation(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, crate::StoreError>;
    /// Rotates the token and restarts the expiry; counts against the
    /// resend limit.
    async fn resend_invitation(
        &self,
        request: &ResendRequest,
    ) -> Result<Ruled<Invitation>, crate::StoreError>;
    async fn invitation_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<InvitationLookup>, crate::StoreError>;
    /// Single use and race-free: of concurrent accepts, one wins.
    async fn accept_invitation(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, crate::StoreError>;
    async fn decline_invitation(
        &self,
        project: ProjectId,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, crate::StoreError>;

    async fn create_invite_link(
        &self,
        project: ProjectId,
        link: &InviteLink,
        token_hash: &str,
    ) -> Result<(), crate::StoreError>;
    async fn list_invite_links(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<Vec<InviteLink>, crate::StoreError>;
    async fn revoke_invite_link(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<InviteLink>, crate::StoreError>;
    async fn invite_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<(InviteLink, Option<String>)>, crate::StoreError>;
    async fn join_invite_link(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, crate::StoreError>;

    async fn create_share_link(
        &self,
        project: ProjectId,
        link: &ShareLink,
        token_hash: &str,
        password_hash: Option<&str>,
        notifications: &[RenderedEmail],
    ) -> Result<(), crate::StoreError>;
    async fn list_share_links(
        &self,
        project: ProjectId,
        filter: &ShareLinkFilter,
    ) -> Result<Vec<ShareLink>, crate::StoreError>;
    async fn get_share_link(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<Option<ShareLink>, crate::StoreError>;
    async fn update_share_link(
        &self,
        project: ProjectId,
        id: &str,
        update: &ShareLinkUpdate,
    ) -> Result<Option<ShareLink>, crate::StoreError>;
    async fn revoke_share_link(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, crate::StoreError>;
    async fn share_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<ShareLinkSecret>, crate::StoreError>;
    async fn is_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
    ) -> Result<bool, crate::StoreError>;
    /// Counts an access by `guest_key`; a guest's first access also records
    /// a `share_viewed` referral event. Returns the updated link.
    async fn record_share_access(
        &self,
        project: ProjectId,
        link_id: &str,
        guest_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, crate::StoreError>;

    /// The user's referral code, creating it (as `candidate`) on first use.
    /// `None` for an unknown user.
    async fn referral_code(
        &self,
        project: ProjectId,
        user_id: &str,
        candidate: &str,
    ) -> Result<Option<String>, crate::StoreError>;
    /// Records a click on a code; `None` when no user has the code.
    async fn record_referral_click(
        &self,
        project: ProjectId,
        click_id: &str,
        code: &str,
        anonymous_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, crate::StoreError>;
    async fn referral_events(
        &self,
        project: ProjectId,
        query: &ReferralEventQuery,
    ) -> Result<Vec<flywheel_domain::growth::model::ReferralEvent>, crate::StoreError>;

    async fn put_org_template(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, crate::StoreError>;
    async fn org_template(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, crate::StoreError>;

    async fn put_email_template(
        &self,
        project: ProjectId,
        template: &EmailTemplate,
    ) -> Result<(), crate::StoreError>;
    async fn email_templates(
        &self,
        project: ProjectId,
    ) -> Result<Vec<EmailTemplate>, crate::StoreError>;
    async fn list_emails(
        &self,
        project: ProjectId,
        limit: u32,
    ) -> Result<Vec<EmailRecord>, crate::StoreError>;
    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedEmail>, crate::StoreError>;
    /// `retry_at`: `None` once sent; `Some(Some(t))` to retry at `t`;
    /// `Some(None)` when retries are exhausted.
    async fn finish_email(
        &self,
        id: &str,
        at: DateTime<Utc>,
        error: Option<&str>,
        retry_at: Option<Option<DateTime<Utc>>>,
    ) -> Result<(), crate::StoreError>;

    async fn create_webhook_endpoint(
        &self,
        project: ProjectId,
        endpoint: &WebhookEndpoint,
    ) -> Result<(), crate::StoreError>;
    async fn list_webhook_endpoints(
        &self,
        project: ProjectId,
    ) -> Result<Vec<WebhookEndpoint>, crate::StoreError>;
    async fn delete_webhook_endpoint(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<bool, crate::StoreError>;
    /// Enables (clearing the failure record) or disables an endpoint.
    async fn set_webhook_endpoint_enabled(
        &self,
        project: ProjectId,
        id: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<Option<WebhookEndpoint>, crate::StoreError>;
    /// Writes messages to the outbox on their own (for effects that are not
    /// growth writes), with their deliveries.
    async fn enqueue_messages(
        &self,
        project: ProjectId,
        messages: &[OutboxMessage],
        now: DateTime<Utc>,
    ) -> Result<(), crate::StoreError>;
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>, crate::StoreError>;
    async fn finish_delivery(&self, attempt: &DeliveryAttempt) -> Result<(), crate::StoreError>;
    async fn list_deliveries(
        &self,
        project: ProjectId,
        query: &DeliveryQuery,
    ) -> Result<Vec<DeliveryRecord>, crate::StoreError>;
    /// Schedules a delivery again now, whatever its state.
    /// Stores a new version of the project's activation rules (validated
    /// by the caller) and records the configuration change. Returns the
    /// version.
    async fn put_activation_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, crate::StoreError>;
    /// The current rules document and its version (`None`: never written).
    async fn activation_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, crate::StoreError>;
    /// A user's or an org's milestones, oldest first.
    async fn milestones(
        &self,
        project: ProjectId,
        scope: flywheel_domain::activation::Scope,
        subject_id: &str,
    ) -> Result<Vec<flywheel_domain::activation::Milestone>, crate::StoreError>;
    /// What Flywheel knows of a user for flag-context enrichment: signup,
    /// attribution, orgs (memberships, then `group` calls) and `identify`
    /// traits. `None` when nothing is known.
    async fn user_profile(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<flywheel_domain::enrichment::UserProfile>, crate::StoreError>;
    /// Deletes what outbound work is done with and older than `older_than`:
    /// messages none of whose deliveries is still pending (with their
    /// deliveries), sent or failed emails, and signup idempotency keys.
    /// Pending work is never pruned.
    async fn prune_outbound(
        &self,
        older_than: DateTime<Utc>,
    ) -> Result<PrunedOutbound, crate::StoreError>;
    /// The installation's secret called `name`, set to `candidate` if it has
    /// none yet (every node then reads the first one written).
    async fn instance_secret(
        &self,
        name: &str,
        candidate: &str,
    ) -> Result<String, crate::StoreError>;
    async fn replay_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DeliveryRecord>, crate::StoreError>;

    /// Stores a new version of the project's prompt rules (validated by the
    /// caller) and records the configuration change. Returns the version.
    async fn put_prompt_rules(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, crate::StoreError>;
    /// The current prompt rules and their version (`None`: never written).
    async fn prompt_rules(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, crate::StoreError>;
    /// A user's pending prompts at `now` (not clicked, dismissed or
    /// expired), highest priority first, then newest.
    async fn pending_prompts(
        &self,
        project: ProjectId,
        user_id: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<flywheel_domain::prompts::Prompt>, crate::StoreError>;
    async fn get_prompt(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<flywheel_domain::prompts::Prompt>, crate::StoreError>;
    /// Records what the product did with a prompt of `user_id` without an
    /// event: for a project that requires analytics consent, when the
    /// request had none. The prompt still changes (a dismissed prompt stops
    /// showing; a click is still credited) but no analytics event is
    /// stored. The first time of each action counts.
    async fn record_prompt_action(
        &self,
        project: ProjectId,
        prompt_id: &str,
        user_id: &str,
        action: flywheel_domain::prompts::PromptAction,
        at: DateTime<Utc>,
    ) -> Result<(), crate::StoreError>;
    /// Counts per rule and variant.
    async fn prompt_stats(&self, project: ProjectId)
        -> Result<Vec<PromptStats>, crate::StoreError>;
    /// The highest live-message sequence number (0: none).
    async fn latest_live_seq(&self) -> Result<i64, crate::StoreError>;
    /// Live messages of every project after `after_seq`, in order (at most
    /// `limit`).
    async fn live_messages_after(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
    /// These live messages (the numbers a NOTIFY announced), in order.
    async fn live_messages_by_seq(
        &self,
        seqs: &[i64],
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
    /// What a stream of `user_id` (following `orgs`) missed after
    /// `after_seq`, in order; on PostgreSQL also the messages numbered at or
    /// below it that committed in the last `late_commits` (numbers can
    /// commit out of order there), which the client may see twice.
    /// Deletes live messages older than `older_than` (past the resume
    /// window). Returns how many.
    async fn prune_live(&self, older_than: DateTime<Utc>) -> Result<u64, crate::StoreError>;
    async fn live_messages_for(
        &self,
        project: ProjectId,
        user_id: &str,
        orgs: &[String],
        after_seq: i64,
        late_since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<LiveRecord>, crate::StoreError>;
}
