//! The growth graph's records and their rules: users and how they were
//! acquired, memberships, invitations, invite links, share links, referral
//! codes and clicks, and the referral-event history.
//!
//! Stored states are facts; time-dependent states (an invitation past its
//! expiry, a link past its last use) are computed when read, so nothing needs
//! a job that could fire twice or not at all.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::{DomainError, ErrorKind};

/// How a user came to sign up. When a signup carries several clues the most
/// specific wins, in this order: an invitation, an invite link, a share link,
/// a referral, paid campaign parameters, and otherwise organic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AcquisitionSource {
    Organic,
    Invite,
    InviteLink,
    Share,
    Referral,
    Paid,
}

impl AcquisitionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AcquisitionSource::Organic => "organic",
            AcquisitionSource::Invite => "invite",
            AcquisitionSource::InviteLink => "invite_link",
            AcquisitionSource::Share => "share",
            AcquisitionSource::Referral => "referral",
            AcquisitionSource::Paid => "paid",
        }
    }
}

/// First-touch campaign parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Utm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `utm_medium` values that mark paid traffic (compared case-insensitively).
pub const PAID_MEDIUMS: &[&str] = &[
    "cpc",
    "ppc",
    "paid",
    "paidsearch",
    "paid_search",
    "paidsocial",
    "paid_social",
    "display",
    "cpm",
    "affiliate",
];

impl Utm {
    pub fn is_paid(&self) -> bool {
        self.medium.as_deref().is_some_and(|medium| {
            PAID_MEDIUMS
                .iter()
                .any(|paid| medium.eq_ignore_ascii_case(paid))
        })
    }

    /// Checks lengths (each value at most 200 bytes, no control characters).
    pub fn validate(&self) -> Result<(), DomainError> {
        for (name, value) in [
            ("source", &self.source),
            ("medium", &self.medium),
            ("campaign", &self.campaign),
            ("term", &self.term),
            ("content", &self.content),
        ] {
            if let Some(value) = value {
                if value.len() > 200 || value.chars().any(char::is_control) {
                    return Err(DomainError::invalid(
                        "invalid_utm",
                        format!("utm.{name} must be at most 200 bytes without control characters"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What brought a user: the winning source and every id that explains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attribution {
    pub acquisition_source: AcquisitionSource,
    /// The user whose invitation, link, share or referral brought this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invited_by_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_link_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_link_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral_click_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm: Option<Utm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// Clues that were present but did not count, with why (e.g. a
    /// self-referral).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedClue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefusedClue {
    pub source: AcquisitionSource,
    /// `self_referral`, `click_expired`, …
    pub reason: String,
}

/// The clues a signup carries, already resolved to the records they name.
#[derive(Debug, Clone, Default)]
pub struct SignupClues {
    /// The invitation's id and inviter.
    pub invitation: Option<(String, String)>,
    /// The invite link's id and creator.
    pub invite_link: Option<(String, String)>,
    /// The share link's id and creator.
    pub share_link: Option<(String, String)>,
    /// The referral: code, its owner, the owner's email identity, and the
    /// click id when a click was matched.
    pub referral: Option<ReferralClue>,
    pub utm: Option<Utm>,
    pub referrer: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReferralClue {
    pub code: String,
    pub owner_user_id: String,
    pub owner_email_identity: String,
    pub click_id: Option<String>,
}

/// Decides a new user's attribution from its clues (see
/// [`AcquisitionSource`] for the precedence). A referral from the user's own
/// mailbox (same id, or same normalised address: case, `+tags`, Gmail dots)
/// is refused and recorded as such.
pub fn attribute(user_id: &str, email_identity: &str, clues: SignupClues) -> Attribution {
    let mut attribution = Attribution {
        acquisition_source: AcquisitionSource::Organic,
        invited_by_user_id: None,
        invitation_id: None,
        invite_link_id: None,
        share_link_id: None,
        referral_code: None,
        referral_click_id: None,
        utm: clues.utm,
        referrer: clues.referrer,
        refused: Vec::new(),
    };
    let referral = clues.referral.filter(|referral| {
        let own =
            referral.owner_user_id == user_id || referral.owner_email_identity == email_identity;
        if own {
            attribution.refused.push(RefusedClue {
                source: AcquisitionSource::Referral,
                reason: "self_referral".into(),
            });
        }
        !own
    });
    if let Some((id, inviter)) = clues.invitation {
        attribution.acquisition_source = AcquisitionSource::Invite;
        attribution.invitation_id = Some(id);
        attribution.invited_by_user_id = Some(inviter);
    } else if let Some((id, creator)) = clues.invite_link {
        attribution.acquisition_source = AcquisitionSource::InviteLink;
        attribution.invite_link_id = Some(id);
        attribution.invited_by_user_id = Some(creator);
    } else if let Some((id, creator)) = clues.share_link {
        attribution.acquisition_source = AcquisitionSource::Share;
        attribution.share_link_id = Some(id);
        attribution.invited_by_user_id = Some(creator);
    } else if let Some(referral) = &referral {
        attribution.acquisition_source = AcquisitionSource::Referral;
        attribution.invited_by_user_id = Some(referral.owner_user_id.clone());
    } else if attribution.utm.as_ref().is_some_and(Utm::is_paid) {
        attribution.acquisition_source = AcquisitionSource::Paid;
    }
    // A referral that did not win is still recorded: "who referred" stays
    // a query even when an invitation decided the org.
    if let Some(referral) = referral {
        attribution.referral_code = Some(referral.code);
        attribution.referral_click_id = referral.click_id;
    }
    attribution
}

/// A role in an org: the product's own vocabulary (`owner`, `admin`,
/// `member`, …), lowercase letters, digits, `_` and `-`, 1–32 bytes.
pub fn validate_role(role: &str) -> Result<(), DomainError> {
    let valid = !role.is_empty()
        && role.len() <= 32
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "invalid_role",
            "role must be 1-32 lowercase letters, digits, '_' or '-'",
        ))
    }
}

/// Ids the product chooses (users, orgs, resources): 1–200 bytes, no
/// control characters.
pub fn validate_external_id(what: &'static str, id: &str) -> Result<(), DomainError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            format!("invalid_{what}"),
            format!("{what} must be 1-200 bytes without control characters"),
        ));
    }
    Ok(())
}

/// The stored state of an invitation. `Pending` past `expires_at` reads as
/// `Expired` ([`Invitation::status_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InvitationStatus {
    Pending,
    Accepted,
    Declined,
    Revoked,
    Expired,
}

impl InvitationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvitationStatus::Pending => "pending",
            InvitationStatus::Accepted => "accepted",
            InvitationStatus::Declined => "declined",
            InvitationStatus::Revoked => "revoked",
            InvitationStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => InvitationStatus::Pending,
            "accepted" => InvitationStatus::Accepted,
            "declined" => InvitationStatus::Declined,
            "revoked" => InvitationStatus::Revoked,
            "expired" => InvitationStatus::Expired,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Invitation {
    pub id: String,
    pub org_id: String,
    /// Normalised address.
    pub email: String,
    pub role: String,
    pub inviter_user_id: String,
    /// The first characters of the token, to tell tokens apart in lists.
    pub token_prefix: String,
    pub status: InvitationStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// How many times the token was sent (1 + resends).
    pub sends: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responded_at: Option<DateTime<Utc>>,
}

impl Invitation {
    /// The status as of `now`: a pending invitation past its expiry is
    /// expired.
    pub fn status_at(&self, now: DateTime<Utc>) -> InvitationStatus {
        match self.status {
            InvitationStatus::Pending if now >= self.expires_at => InvitationStatus::Expired,
            status => status,
        }
    }

    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        self.status_at(now) == InvitationStatus::Pending
    }

    /// The one answer for every token that cannot be used (unknown, expired,
    /// revoked, already used): no enumeration.
    pub fn not_found() -> DomainError {
        DomainError::not_found("invitation_not_found", "no open invitation has this token")
    }

    /// Whether `email` (normalised) may accept this invitation.
    pub fn check_recipient(&self, email: &str, email_verified: bool) -> Result<(), DomainError> {
        if email != self.email {
            return Err(DomainError::new(
                ErrorKind::Forbidden,
                "invitation_email_mismatch",
                "the invitation was sent to a different email address",
            ));
        }
        if !email_verified {
            return Err(DomainError::new(
                ErrorKind::Forbidden,
                "email_not_verified",
                "the user's email address is not verified; verify it before accepting",
            ));
        }
        Ok(())
    }
}

/// Invitation limits, per project (documented defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitationPolicy {
    pub expiry_days: i64,
    pub per_org_per_hour: i64,
    pub pending_per_inviter: i64,
    pub resends_per_invitation: i64,
}

impl Default for InvitationPolicy {
    fn default() -> Self {
        Self {
            expiry_days: DEFAULT_INVITATION_EXPIRY_DAYS,
            per_org_per_hour: 100,
            pending_per_inviter: 500,
            resends_per_invitation: 5,
        }
    }
}

pub const DEFAULT_INVITATION_EXPIRY_DAYS: i64 = 7;
pub const MIN_INVITATION_EXPIRY_DAYS: i64 = 1;
pub const MAX_INVITATION_EXPIRY_DAYS: i64 = 30;

/// Checks an expiry in days against the allowed 1–30.
pub fn invitation_expiry(days: i64) -> Result<Duration, DomainError> {
    if (MIN_INVITATION_EXPIRY_DAYS..=MAX_INVITATION_EXPIRY_DAYS).contains(&days) {
        Ok(Duration::days(days))
    } else {
        Err(DomainError::invalid(
            "invalid_expiry",
            format!(
                "expires_in_days must be between {MIN_INVITATION_EXPIRY_DAYS} and {MAX_INVITATION_EXPIRY_DAYS}"
            ),
        ))
    }
}

pub fn rate_limited(code: &'static str, message: impl Into<String>) -> DomainError {
    DomainError::new(ErrorKind::LimitExceeded, code, message)
}

/// A multi-use link that lets anyone holding it join an org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InviteLink {
    pub id: String,
    pub org_id: String,
    pub role: String,
    pub created_by_user_id: String,
    pub token_prefix: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<i64>,
    pub uses: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl InviteLink {
    /// `active`, `revoked`, `expired` or `exhausted` as of `now`.
    pub fn status_at(&self, now: DateTime<Utc>) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|at| now >= at) {
            "expired"
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            "exhausted"
        } else {
            "active"
        }
    }

    pub fn not_found() -> DomainError {
        DomainError::not_found(
            "invite_link_not_found",
            "no usable invite link has this token",
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SharePermission {
    View,
    Comment,
    Edit,
}

impl SharePermission {
    pub fn as_str(self) -> &'static str {
        match self {
            SharePermission::View => "view",
            SharePermission::Comment => "comment",
            SharePermission::Edit => "edit",
        }
    }
}

/// Who may open a share link: anyone holding it, members of the sharing
/// org, or the listed addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ShareAudience {
    Anyone,
    Org,
    Listed,
}

impl ShareAudience {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareAudience::Anyone => "anyone",
            ShareAudience::Org => "org",
            ShareAudience::Listed => "listed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShareLink {
    pub id: String,
    pub resource_type: String,
    pub resource_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    pub created_by_user_id: String,
    pub permission: SharePermission,
    pub audience: ShareAudience,
    /// Normalised addresses (audience `listed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_list: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub password_protected: bool,
    pub token_prefix: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    pub accesses: i64,
    pub unique_guests: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_access_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_access_at: Option<DateTime<Utc>>,
}

/// Who is opening a share link, as far as the caller knows.
#[derive(Debug, Clone, Default)]
pub struct ShareVisitor {
    /// Normalised email, when the guest gave one.
    pub email: Option<String>,
    /// Whether the visitor is a member of the link's org (looked up by the
    /// store from the visitor's user id).
    pub org_member: bool,
}

impl ShareLink {
    pub fn status_at(&self, now: DateTime<Utc>) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|at| now >= at) {
            "expired"
        } else {
            "active"
        }
    }

    pub fn not_found() -> DomainError {
        DomainError::not_found(
            "share_link_not_found",
            "no active share link has this token",
        )
    }

    /// Whether this visitor may open the link (the password is checked
    /// separately, before this).
    pub fn admit(&self, visitor: &ShareVisitor) -> Result<(), DomainError> {
        match self.audience {
            ShareAudience::Anyone => Ok(()),
            ShareAudience::Org if visitor.org_member => Ok(()),
            ShareAudience::Org => Err(DomainError::new(
                ErrorKind::Forbidden,
                "share_requires_org_member",
                "this link is shared with members of the org only; pass the user_id of a member",
            )),
            ShareAudience::Listed => match &visitor.email {
                Some(email) if self.allow_list.iter().any(|listed| listed == email) => Ok(()),
                Some(_) => Err(DomainError::new(
                    ErrorKind::Forbidden,
                    "share_not_on_allow_list",
                    "this address is not on the link's allow list",
                )),
                None => Err(DomainError::new(
                    ErrorKind::Forbidden,
                    "share_requires_email",
                    "this link is shared with listed addresses only; pass the guest's email",
                )),
            },
        }
    }
}

/// Kinds of entries in the referral-event history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReferralEventKind {
    Invited,
    Shared,
    ShareViewed,
    Accepted,
    SignedUp,
    Activated,
    Converted,
}

impl ReferralEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReferralEventKind::Invited => "invited",
            ReferralEventKind::Shared => "shared",
            ReferralEventKind::ShareViewed => "share_viewed",
            ReferralEventKind::Accepted => "accepted",
            ReferralEventKind::SignedUp => "signed_up",
            ReferralEventKind::Activated => "activated",
            ReferralEventKind::Converted => "converted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "invited" => ReferralEventKind::Invited,
            "shared" => ReferralEventKind::Shared,
            "share_viewed" => ReferralEventKind::ShareViewed,
            "accepted" => ReferralEventKind::Accepted,
            "signed_up" => ReferralEventKind::SignedUp,
            "activated" => ReferralEventKind::Activated,
            "converted" => ReferralEventKind::Converted,
            _ => return None,
        })
    }
}

/// One step of the viral loop: who did it (`actor_user_id`), to what
/// (`resource_type`/`resource_id`: an org, an invitation, a shared artifact),
/// through what (`via_id`: the invitation, link or code), and which signup
/// resulted, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReferralEvent {
    pub id: i64,
    pub kind: ReferralEventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_user_id: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_id: Option<String>,
    /// The user the event is about, whom the actor brought: who signed up,
    /// accepted (a new or an existing user), activated or converted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signup_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    pub at: DateTime<Utc>,
}

/// A referral event before it is stored (the store assigns the id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReferralEvent {
    pub kind: ReferralEventKind,
    pub actor_user_id: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    pub via_id: Option<String>,
    pub signup_user_id: Option<String>,
    pub org_id: Option<String>,
}

/// Which click counts when a visitor followed several referral links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickModel {
    #[default]
    LastClick,
    FirstClick,
}

pub const DEFAULT_REFERRAL_WINDOW_DAYS: i64 = 90;

/// A recorded referral click.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReferralClick {
    pub click_id: String,
    pub code: String,
    pub referrer_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    pub at: DateTime<Utc>,
}

impl ReferralClick {
    /// Whether a signup at `now` still falls in the attribution window.
    pub fn attributable_at(&self, now: DateTime<Utc>, window_days: i64) -> bool {
        now >= self.at && now - self.at <= Duration::days(window_days)
    }
}

/// Picks the click that counts among a visitor's clicks inside the window.
pub fn pick_click(
    clicks: &[ReferralClick],
    now: DateTime<Utc>,
    window_days: i64,
    model: ClickModel,
) -> Option<&ReferralClick> {
    let eligible = clicks
        .iter()
        .filter(|click| click.attributable_at(now, window_days));
    match model {
        ClickModel::LastClick => eligible.max_by_key(|click| click.at),
        ClickModel::FirstClick => eligible.min_by_key(|click| click.at),
    }
}

/// Referral codes: 8 characters from an alphabet without look-alikes
/// (no 0/O, 1/I/L), so a code read aloud or typed survives.
pub const REFERRAL_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
pub const REFERRAL_CODE_LEN: usize = 8;

pub fn generate_referral_code(rng: &mut impl rand::RngCore) -> String {
    (0..REFERRAL_CODE_LEN)
        .map(|_| {
            // Rejection sampling keeps every character equally likely.
            loop {
                let byte = (rng.next_u32() & 0xff) as usize;
                let limit = 256 - 256 % REFERRAL_ALPHABET.len();
                if byte < limit {
                    break REFERRAL_ALPHABET[byte % REFERRAL_ALPHABET.len()] as char;
                }
            }
        })
        .collect()
}

/// Normalises a referral code as typed (case, surrounding spaces).
pub fn normalize_referral_code(raw: &str) -> Option<String> {
    let code = raw.trim().to_ascii_uppercase();
    (code.len() == REFERRAL_CODE_LEN && code.bytes().all(|b| REFERRAL_ALPHABET.contains(&b)))
        .then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
    }

    fn referral(owner: &str, identity: &str) -> ReferralClue {
        ReferralClue {
            code: "ABCDEFGH".into(),
            owner_user_id: owner.into(),
            owner_email_identity: identity.into(),
            click_id: Some("click-1".into()),
        }
    }

    #[test]
    fn invitation_beats_every_other_clue_and_the_referral_is_still_recorded() {
        let clues = SignupClues {
            invitation: Some(("inv-1".into(), "alice".into())),
            invite_link: Some(("link-1".into(), "bob".into())),
            share_link: Some(("share-1".into(), "carol".into())),
            referral: Some(referral("dave", "dave@example.com")),
            utm: Some(Utm {
                medium: Some("cpc".into()),
                ..Utm::default()
            }),
            referrer: Some("https://news.example".into()),
        };
        let attribution = attribute("erin", "erin@example.com", clues);
        assert_eq!(attribution.acquisition_source, AcquisitionSource::Invite);
        assert_eq!(attribution.invited_by_user_id.as_deref(), Some("alice"));
        assert_eq!(attribution.invitation_id.as_deref(), Some("inv-1"));
        assert_eq!(attribution.invite_link_id, None);
        assert_eq!(attribution.referral_code.as_deref(), Some("ABCDEFGH"));
        assert_eq!(
            attribution.referrer.as_deref(),
            Some("https://news.example")
        );
    }

    #[test]
    fn precedence_runs_link_then_share_then_referral_then_paid_then_organic() {
        let link = SignupClues {
            invite_link: Some(("link-1".into(), "bob".into())),
            share_link: Some(("share-1".into(), "carol".into())),
            ..SignupClues::default()
        };
        assert_eq!(
            attribute("u", "u@x.io", link).acquisition_source,
            AcquisitionSource::InviteLink
        );
        let share = SignupClues {
            share_link: Some(("share-1".into(), "carol".into())),
            referral: Some(referral("dave", "dave@x.io")),
            ..SignupClues::default()
        };
        let shared = attribute("u", "u@x.io", share);
        assert_eq!(shared.acquisition_source, AcquisitionSource::Share);
        assert_eq!(shared.invited_by_user_id.as_deref(), Some("carol"));
        let referred = SignupClues {
            referral: Some(referral("dave", "dave@x.io")),
            utm: Some(Utm {
                medium: Some("CPC".into()),
                ..Utm::default()
            }),
            ..SignupClues::default()
        };
        let referred = attribute("u", "u@x.io", referred);
        assert_eq!(referred.acquisition_source, AcquisitionSource::Referral);
        assert_eq!(referred.referral_click_id.as_deref(), Some("click-1"));
        let paid = SignupClues {
            utm: Some(Utm {
                medium: Some("Paid_Social".into()),
                ..Utm::default()
            }),
            ..SignupClues::default()
        };
        assert_eq!(
            attribute("u", "u@x.io", paid).acquisition_source,
            AcquisitionSource::Paid
        );
        let organic = SignupClues {
            utm: Some(Utm {
                medium: Some("email".into()),
                ..Utm::default()
            }),
            ..SignupClues::default()
        };
        assert_eq!(
            attribute("u", "u@x.io", organic).acquisition_source,
            AcquisitionSource::Organic
        );
    }

    #[test]
    fn self_referral_by_id_or_mailbox_is_refused_and_recorded() {
        for (owner, identity) in [("u", "other@x.io"), ("someone", "u@x.io")] {
            let clues = SignupClues {
                referral: Some(referral(owner, identity)),
                ..SignupClues::default()
            };
            let attribution = attribute("u", "u@x.io", clues);
            assert_eq!(attribution.acquisition_source, AcquisitionSource::Organic);
            assert_eq!(attribution.referral_code, None);
            assert_eq!(attribution.invited_by_user_id, None);
            assert_eq!(
                attribution.refused,
                vec![RefusedClue {
                    source: AcquisitionSource::Referral,
                    reason: "self_referral".into()
                }]
            );
        }
    }

    fn invitation(expires_at: DateTime<Utc>) -> Invitation {
        Invitation {
            id: "inv".into(),
            org_id: "org".into(),
            email: "bob@example.com".into(),
            role: "member".into(),
            inviter_user_id: "alice".into(),
            token_prefix: "fwinv_abc".into(),
            status: InvitationStatus::Pending,
            created_at: at(1, 0),
            expires_at,
            sends: 1,
            accepted_by_user_id: None,
            responded_at: None,
        }
    }

    #[test]
    fn a_pending_invitation_expires_exactly_at_its_expiry() {
        let invitation = invitation(at(8, 0));
        assert_eq!(invitation.status_at(at(7, 23)), InvitationStatus::Pending);
        assert_eq!(invitation.status_at(at(8, 0)), InvitationStatus::Expired);
        let mut accepted = invitation.clone();
        accepted.status = InvitationStatus::Accepted;
        assert_eq!(accepted.status_at(at(30, 0)), InvitationStatus::Accepted);
    }

    #[test]
    fn only_the_invited_verified_address_may_accept() {
        let invitation = invitation(at(8, 0));
        assert!(invitation.check_recipient("bob@example.com", true).is_ok());
        assert_eq!(
            invitation
                .check_recipient("eve@example.com", true)
                .unwrap_err()
                .code,
            "invitation_email_mismatch"
        );
        assert_eq!(
            invitation
                .check_recipient("bob@example.com", false)
                .unwrap_err()
                .code,
            "email_not_verified"
        );
    }

    #[test]
    fn expiry_days_are_bounded_to_one_through_thirty() {
        assert!(invitation_expiry(0).is_err());
        assert_eq!(invitation_expiry(1).unwrap(), Duration::days(1));
        assert_eq!(invitation_expiry(30).unwrap(), Duration::days(30));
        assert!(invitation_expiry(31).is_err());
    }

    #[test]
    fn invite_link_status_covers_revocation_expiry_and_use_count() {
        let mut link = InviteLink {
            id: "l".into(),
            org_id: "o".into(),
            role: "member".into(),
            created_by_user_id: "a".into(),
            token_prefix: "p".into(),
            created_at: at(1, 0),
            expires_at: Some(at(5, 0)),
            max_uses: Some(2),
            uses: 1,
            revoked_at: None,
        };
        assert_eq!(link.status_at(at(2, 0)), "active");
        assert_eq!(link.status_at(at(5, 0)), "expired");
        link.uses = 2;
        assert_eq!(link.status_at(at(2, 0)), "exhausted");
        link.revoked_at = Some(at(2, 0));
        assert_eq!(link.status_at(at(2, 0)), "revoked");
    }

    fn share(audience: ShareAudience) -> ShareLink {
        ShareLink {
            id: "s".into(),
            resource_type: "doc".into(),
            resource_id: "d1".into(),
            org_id: Some("o".into()),
            created_by_user_id: "a".into(),
            permission: SharePermission::View,
            audience,
            allow_list: vec!["bob@example.com".into()],
            expires_at: None,
            password_protected: false,
            token_prefix: "p".into(),
            created_at: at(1, 0),
            revoked_at: None,
            accesses: 0,
            unique_guests: 0,
            first_access_at: None,
            last_access_at: None,
        }
    }

    #[test]
    fn share_audiences_admit_whom_they_say() {
        let nobody = ShareVisitor::default();
        assert!(share(ShareAudience::Anyone).admit(&nobody).is_ok());
        assert_eq!(
            share(ShareAudience::Org).admit(&nobody).unwrap_err().code,
            "share_requires_org_member"
        );
        let member = ShareVisitor {
            email: None,
            org_member: true,
        };
        assert!(share(ShareAudience::Org).admit(&member).is_ok());
        assert_eq!(
            share(ShareAudience::Listed)
                .admit(&nobody)
                .unwrap_err()
                .code,
            "share_requires_email"
        );
        let eve = ShareVisitor {
            email: Some("eve@example.com".into()),
            org_member: false,
        };
        assert_eq!(
            share(ShareAudience::Listed).admit(&eve).unwrap_err().code,
            "share_not_on_allow_list"
        );
        let bob = ShareVisitor {
            email: Some("bob@example.com".into()),
            org_member: false,
        };
        assert!(share(ShareAudience::Listed).admit(&bob).is_ok());
    }

    #[test]
    fn clicks_count_inside_the_window_by_the_chosen_model() {
        let click = |id: &str, day: u32| ReferralClick {
            click_id: id.into(),
            code: "ABCDEFGH".into(),
            referrer_user_id: "r".into(),
            anonymous_id: None,
            at: at(day, 0),
        };
        let clicks = vec![click("early", 1), click("middle", 10), click("late", 20)];
        let now = at(25, 0);
        assert_eq!(
            pick_click(&clicks, now, 90, ClickModel::LastClick).map(|c| c.click_id.as_str()),
            Some("late")
        );
        assert_eq!(
            pick_click(&clicks, now, 90, ClickModel::FirstClick).map(|c| c.click_id.as_str()),
            Some("early")
        );
        // A 10-day window keeps only clicks on or after the 15th.
        assert_eq!(
            pick_click(&clicks, now, 10, ClickModel::FirstClick).map(|c| c.click_id.as_str()),
            Some("late")
        );
        assert!(pick_click(&clicks, now, 1, ClickModel::LastClick).is_none());
        // The window's last instant still counts.
        assert!(click("edge", 15).attributable_at(at(25, 0), 10));
        assert!(!click("future", 26).attributable_at(at(25, 0), 10));
    }

    #[test]
    fn referral_codes_are_uniform_unambiguous_and_normalised() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let code = generate_referral_code(&mut rng);
            assert_eq!(
                normalize_referral_code(&code.to_lowercase()),
                Some(code.clone())
            );
            assert!(!code.contains(['0', 'O', '1', 'I', 'L']));
        }
        assert_eq!(
            normalize_referral_code("  abcd2345 "),
            Some("ABCD2345".into())
        );
        assert_eq!(normalize_referral_code("ABCD2345"), Some("ABCD2345".into()));
        assert_eq!(normalize_referral_code("ABCD234O"), None);
        assert_eq!(normalize_referral_code("ABC"), None);
    }

    #[test]
    fn roles_and_ids_are_validated() {
        assert!(validate_role("admin").is_ok());
        assert!(validate_role("billing-admin_2").is_ok());
        assert!(validate_role("").is_err());
        assert!(validate_role("Admin").is_err());
        assert!(validate_external_id("user_id", "u-1").is_ok());
        assert_eq!(
            validate_external_id("user_id", "").unwrap_err().code,
            "invalid_user_id"
        );
        assert!(validate_external_id("user_id", &"x".repeat(201)).is_err());
    }

    #[test]
    fn paid_mediums_and_utm_lengths() {
        assert!(!Utm::default().is_paid());
        let long = Utm {
            campaign: Some("c".repeat(201)),
            ..Utm::default()
        };
        assert_eq!(long.validate().unwrap_err().code, "invalid_utm");
    }
}
