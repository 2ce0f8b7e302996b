//! The growth graph over HTTP: signup, users and members, invitations,
//! invite links, share links and guests, referrals, the referral-event
//! history, the org template and email templates.
//!
//! Secret keys for everything that creates, changes or lists; any key for
//! what a browser holding a token does (look an invitation up, decline it,
//! resolve a share link, record a referral click).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::growth::email::{identity_of_email, mask_email, normalize_email};
use flywheel_domain::growth::guest_token::{sign_guest_token, verify_guest_token, GuestClaims};
use flywheel_domain::growth::model::{
    generate_referral_code, invitation_expiry, normalize_referral_code, validate_external_id,
    validate_role, Invitation, InvitationStatus, InviteLink, ReferralEvent, ReferralEventKind,
    ShareAudience, ShareLink, SharePermission, ShareVisitor, Utm,
};
use flywheel_domain::growth::password::{hash_password, verify_password};
use flywheel_domain::growth::token::{digest_token, issue_token, plausible_token, TokenKind};
use flywheel_domain::project::ProjectId;
use flywheel_store::growth::{
    EmailRecord, EmailTemplate, InvitationBatch, InvitationOutcome, JoinRequest, MembershipRecord,
    NewInvitation, OrgProfile, ReferralEventQuery, ResendRequest, ShareLinkFilter, ShareLinkUpdate,
    SignupReply, SignupRequest, UserRecord,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{AnyKey, SecretKey};
use crate::error::{ApiError, ApiJson, ApiQuery, ErrorEnvelope};
use crate::growth::{effective_template, policy, render, url_with_token, EMAIL_KINDS};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/signup", post(signup))
        .route("/v1/users/{user_id}", get(get_user).patch(update_user))
        .route("/v1/users/{user_id}/referral-code", get(referral_code))
        .route("/v1/orgs/{org_id}/members", get(org_members))
        .route(
            "/v1/orgs/{org_id}/members/{user_id}",
            axum::routing::delete(remove_member),
        )
        .route(
            "/v1/orgs/{org_id}/invitations",
            get(list_invitations).post(create_invitations),
        )
        .route(
            "/v1/orgs/{org_id}/invitations/{id}/revoke",
            post(revoke_invitation),
        )
        .route(
            "/v1/orgs/{org_id}/invitations/{id}/resend",
            post(resend_invitation),
        )
        .route("/v1/invitations/lookup", post(lookup_invitation))
        .route("/v1/invitations/accept", post(accept_invitation))
        .route("/v1/invitations/decline", post(decline_invitation))
        .route(
            "/v1/orgs/{org_id}/invite-links",
            get(list_invite_links).post(create_invite_link),
        )
        .route(
            "/v1/orgs/{org_id}/invite-links/{id}/revoke",
            post(revoke_invite_link),
        )
        .route("/v1/invite-links/lookup", post(lookup_invite_link))
        .route("/v1/invite-links/join", post(join_invite_link))
        .route(
            "/v1/share-links",
            get(list_share_links).post(create_share_link),
        )
        .route(
            "/v1/share-links/{id}",
            get(get_share_link).patch(update_share_link),
        )
        .route("/v1/share-links/{id}/revoke", post(revoke_share_link))
        .route("/v1/share-links/resolve", post(resolve_share_link))
        .route("/v1/guest-tokens/verify", post(verify_guest))
        .route("/v1/referrals/click", post(referral_click))
        .route("/v1/referral-events", get(referral_events))
        .route(
            "/v1/org-template",
            get(get_org_template).put(put_org_template),
        )
        .route("/v1/email-templates", get(list_email_templates))
        .route(
            "/v1/email-templates/{kind}",
            axum::routing::put(put_email_template),
        )
        .route("/v1/emails", get(list_emails))
}

// ---- shared helpers --------------------------------------------------------

fn external_id(what: &'static str, id: &str) -> Result<(), ApiError> {
    validate_external_id(what, id).map_err(ApiError::from)
}

fn optional_text(field: &'static str, value: &Option<String>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(text) if text.len() > max || text.chars().any(char::is_control) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("{field} must be at most {max} bytes without control characters"),
        )),
        _ => Ok(()),
    }
}

fn token_hash(state: &AppState, kind: TokenKind, token: &str) -> Option<String> {
    plausible_token(kind, token).then(|| digest_token(&state.growth_keys.token_key, token).hash)
}

/// After a growth write: refresh the org cache with the orgs it changed
/// (seats) and wake the outbox senders.
fn after_commit(state: &AppState, project: ProjectId, orgs: Vec<std::sync::Arc<OrgState>>) {
    state
        .snapshot
        .orgs
        .offer_all(orgs.into_iter().map(|org| (project, org)).collect());
    state.outbox_signal.wake();
}

fn email_status(state: &AppState, send: bool) -> &'static str {
    match (send, state.smtp_enabled) {
        (false, _) => "not_sent",
        (true, true) => "queued",
        (true, false) => "not_configured",
    }
}

/// The client's address as the server saw it (no proxy headers: they can
/// be forged to dodge the limit).
pub struct PeerIp(pub Option<IpAddr>);

/// The peer address of a connection, recorded by the server for
/// [`PeerIp`].
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::shutdown::DrainingListener>,
    > for PeerAddr
{
    fn connect_info(
        stream: axum::serve::IncomingStream<'_, crate::shutdown::DrainingListener>,
    ) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(
            parts
                .extensions
                .get::<ConnectInfo<PeerAddr>>()
                .map(|info| info.0 .0.ip()),
        ))
    }
}

// ---- signup and users ------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupBody {
    /// The product's id for the user; minted (`usr_…`) when absent.
    #[serde(default)]
    user_id: Option<String>,
    email: String,
    /// Whether the product has verified the address (a signup with an
    /// invitation token counts as verified: the token went to that mailbox).
    #[serde(default)]
    email_verified: bool,
    #[serde(default)]
    name: Option<String>,
    /// The id of the org a new signup creates; minted (`org_…`) when absent.
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    org_name: Option<String>,
    #[serde(default)]
    invitation_token: Option<String>,
    #[serde(default)]
    invite_link_token: Option<String>,
    #[serde(default)]
    share_token: Option<String>,
    #[serde(default)]
    referral_code: Option<String>,
    /// The click id `POST /v1/referrals/click` returned.
    #[serde(default)]
    referral_click_id: Option<String>,
    /// The visitor's anonymous id: finds their referral clicks.
    #[serde(default)]
    anonymous_id: Option<String>,
    #[serde(default)]
    utm: Option<Utm>,
    #[serde(default)]
    referrer: Option<String>,
    idempotency_key: String,
}

/// Creates the user and either a new org (owner, default plan, anchored
/// now, provisioned from the org template) or a membership in the org an
/// invitation or invite link points to, with attribution, in one
/// transaction. The same `idempotency_key` answers the same reply.
#[utoipa::path(post, path = "/v1/signup", tag = "growth",
    security(("api_key" = [])),
    request_body = SignupBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Signed up (or the first reply of this key)", body = SignupReply),
        (status = 400, description = "Invalid field", body = ErrorEnvelope),
        (status = 403, description = "Seat limit reached, invitation for another address, or a publishable key", body = ErrorEnvelope),
        (status = 404, description = "The invitation or invite link is unknown, used, expired or revoked", body = ErrorEnvelope),
        (status = 409, description = "User, email or org exists; idempotency key reused", body = ErrorEnvelope),
    ))]
pub async fn signup(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<SignupBody>,
) -> Result<ApiJson<SignupReply>, ApiError> {
    if body.idempotency_key.is_empty() || body.idempotency_key.len() > 255 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "`idempotency_key` is 1–255 characters",
        ));
    }
    let email = normalize_email(&body.email)?;
    if let Some(user_id) = &body.user_id {
        external_id("user_id", user_id)?;
    }
    if let Some(org_id) = &body.org_id {
        external_id("org_id", org_id)?;
    }
    optional_text("name", &body.name, 200)?;
    optional_text("org_name", &body.org_name, 200)?;
    optional_text("referrer", &body.referrer, 2000)?;
    optional_text("anonymous_id", &body.anonymous_id, 200)?;
    if let Some(utm) = &body.utm {
        utm.validate()?;
    }
    let fingerprint = serde_json::to_string(&SignupBody {
        idempotency_key: String::new(),
        ..body.clone()
    })
    .map_err(ApiError::internal)?;
    let invitation_token_hash = match &body.invitation_token {
        Some(token) => Some(
            token_hash(&state, TokenKind::Invitation, token)
                .ok_or_else(|| ApiError::from(Invitation::not_found()))?,
        ),
        None => None,
    };
    let invite_link_token_hash = match &body.invite_link_token {
        Some(token) => Some(
            token_hash(&state, TokenKind::InviteLink, token)
                .ok_or_else(|| ApiError::from(InviteLink::not_found()))?,
        ),
        None => None,
    };
    // A malformed share token is an unknown one: the signup goes on, and
    // the attribution says why the share did not count.
    let share_token_hash = body.share_token.as_ref().map(|token| {
        token_hash(&state, TokenKind::ShareLink, token).unwrap_or_else(|| "malformed".to_owned())
    });
    let project = auth.principal.project_id();
    let now = state.clock.now();
    // `ThreadRng` is not `Send`: draw from a seeded CSPRNG that is.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    let request = SignupRequest {
        project,
        now,
        idempotency_key: body.idempotency_key.clone(),
        fingerprint,
        user_id: body
            .user_id
            .clone()
            .unwrap_or_else(|| format!("usr_{}", uuid::Uuid::now_v7().simple())),
        email_identity: identity_of_email(&email),
        email,
        email_verified: body.email_verified,
        name: body.name.clone(),
        new_org_id: body
            .org_id
            .clone()
            .unwrap_or_else(|| format!("org_{}", uuid::Uuid::now_v7().simple())),
        org_name: body.org_name.clone(),
        invitation_token_hash,
        invite_link_token_hash,
        share_token_hash,
        referral_code: body
            .referral_code
            .as_deref()
            .map(|code| normalize_referral_code(code).unwrap_or_else(|| code.trim().to_owned())),
        referral_click_id: body.referral_click_id.clone(),
        anonymous_id: body.anonymous_id.clone(),
        utm: body.utm.clone(),
        referrer: body.referrer.clone(),
        new_referral_code: generate_referral_code(&mut rng),
        policy: policy(&state.growth, &state.billing, &auth.principal),
    };
    // A new user's referral code could collide with an existing one (1 in
    // 31^8 per pair): draw again.
    let mut request = request;
    for attempt in 0.. {
        match state.store.signup(&request).await {
            Err(flywheel_store::StoreError::Conflict("user")) if attempt < 3 => {
                request.new_referral_code = generate_referral_code(&mut rng);
            }
            outcome => {
                let commit = outcome??;
                after_commit(&state, project, commit.orgs);
                state.profiles.forget(project, &commit.reply.user.user_id);
                return Ok(ApiJson(commit.reply));
            }
        }
    }
    unreachable!("the loop returns")
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    user: UserRecord,
    memberships: Vec<MembershipRecord>,
}

/// A user with their attribution and memberships.
#[utoipa::path(get, path = "/v1/users/{user_id}", tag = "growth",
    security(("api_key" = [])),
    params(("user_id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The user", body = UserView),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    ))]
pub async fn get_user(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(user_id): Path<String>,
) -> Result<ApiJson<UserView>, ApiError> {
    let project = auth.principal.project_id();
    let user = state
        .store
        .get_user(project, &user_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("user_not_found", "no user with this user_id has signed up")
        })?;
    let memberships = state.store.memberships_of_user(project, &user_id).await?;
    Ok(ApiJson(UserView { user, memberships }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    /// Set once the product has verified the user's address.
    email_verified: bool,
}

/// Marks a user's email verified (or not): accepting an invitation needs a
/// verified address.
#[utoipa::path(patch, path = "/v1/users/{user_id}", tag = "growth",
    security(("api_key" = [])),
    params(("user_id" = String, Path)),
    request_body = UpdateUserBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The user", body = UserRecord),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    ))]
pub async fn update_user(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson<UpdateUserBody>,
) -> Result<ApiJson<UserRecord>, ApiError> {
    state
        .store
        .set_email_verified(auth.principal.project_id(), &user_id, body.email_verified)
        .await?
        .map(ApiJson)
        .ok_or_else(|| {
            ApiError::not_found("user_not_found", "no user with this user_id has signed up")
        })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MembersView {
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<OrgProfile>,
    members: Vec<MembershipRecord>,
}

/// An org's profile (when a signup created it) and members.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/members", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The members", body = MembersView)))]
pub async fn org_members(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
) -> Result<ApiJson<MembersView>, ApiError> {
    let (org, members) = state
        .store
        .org_members(auth.principal.project_id(), &org_id)
        .await?;
    Ok(ApiJson(MembersView { org, members }))
}

/// Removes a member from an org and gives back their seat (a
/// `membership.removed` webhook follows). The org's owner cannot be
/// removed. The user keeps their account and other memberships.
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/members/{user_id}", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path), ("user_id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The membership that was removed", body = MembershipRecord),
        (status = 404, description = "The user is not a member of the org (`membership_not_found`)", body = ErrorEnvelope),
        (status = 409, description = "The user is the org's owner (`cannot_remove_owner`)", body = ErrorEnvelope),
    ))]
pub async fn remove_member(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, user_id)): Path<(String, String)>,
) -> Result<ApiJson<MembershipRecord>, ApiError> {
    external_id("org_id", &org_id)?;
    external_id("user_id", &user_id)?;
    let project = auth.principal.project_id();
    let commit = state
        .store
        .remove_member(
            project,
            &org_id,
            &user_id,
            &policy(&state.growth, &state.billing, &auth.principal),
            state.clock.now(),
        )
        .await??;
    after_commit(&state, project, commit.orgs);
    state.profiles.forget(project, &user_id);
    commit.reply.map(ApiJson).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "membership_not_found",
            format!("{user_id} is not a member of {org_id}"),
        )
    })
}

// ---- invitations -----------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInvitationsBody {
    /// One address, or use `emails` for several (up to 100).
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    emails: Vec<String>,
    #[serde(default = "default_role")]
    role: String,
    /// A member of the org.
    inviter_user_id: String,
    /// 1–30; the configured default when absent.
    #[serde(default)]
    expires_in_days: Option<i64>,
    /// Email the invitation (when SMTP is configured). Default true.
    #[serde(default = "yes")]
    send_email: bool,
}

fn default_role() -> String {
    "member".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationCreated {
    email: String,
    /// `created`, `already_pending` or `already_member`.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    invitation: Option<Invitation>,
    /// The token, shown only here, once.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accept_url: Option<String>,
    /// `queued` (SMTP set), `not_configured` (send `accept_url` yourself),
    /// `not_sent` (`send_email: false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    email_status: Option<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationsCreated {
    invitations: Vec<InvitationCreated>,
}

/// The invitation email's variables.
fn invitation_context(
    org_name: Option<&str>,
    inviter_name: Option<&str>,
    role: &str,
    accept_url: &str,
    expires_at: DateTime<Utc>,
    email: &str,
) -> serde_json::Value {
    serde_json::json!({
        "org_name": org_name,
        "inviter_name": inviter_name,
        "role": role,
        "accept_url": accept_url,
        "expires_at": expires_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        "email": email,
    })
}

/// Invites one or many addresses to an org. Each token is returned once;
/// with SMTP configured the invitation is emailed from the project's
/// template, otherwise send `accept_url` yourself.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/invitations", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path)),
    request_body = CreateInvitationsBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 201, description = "One entry per address", body = InvitationsCreated),
        (status = 400, description = "Invalid address, role or expiry", body = ErrorEnvelope),
        (status = 403, description = "The inviter is not a member", body = ErrorEnvelope),
        (status = 429, description = "Invitation rate limit", body = ErrorEnvelope),
    ))]
pub async fn create_invitations(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiJson(body): ApiJson<CreateInvitationsBody>,
) -> Result<(StatusCode, ApiJson<InvitationsCreated>), ApiError> {
    external_id("org_id", &org_id)?;
    external_id("user_id", &body.inviter_user_id)?;
    validate_role(&body.role)?;
    let mut emails = Vec::new();
    for raw in body.email.iter().chain(body.emails.iter()) {
        let email = normalize_email(raw)?;
        if !emails.contains(&email) {
            emails.push(email);
        }
    }
    if emails.is_empty() || emails.len() > 100 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "give 1 to 100 addresses in `email` or `emails`",
        ));
    }
    let expiry = invitation_expiry(
        body.expires_in_days
            .unwrap_or(state.growth.invitation_expiry_days),
    )?;
    let project = auth.principal.project_id();
    let now = state.clock.now();
    let expires_at = now + expiry;
    let send = body.send_email && state.smtp_enabled;
    let (profile, _) = state.store.org_members(project, &org_id).await?;
    let inviter = state.store.get_user(project, &body.inviter_user_id).await?;
    let template = if send {
        effective_template("invitation", &state.store.email_templates(project).await?)
    } else {
        None
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    let mut tokens = Vec::with_capacity(emails.len());
    let mut invitations = Vec::with_capacity(emails.len());
    for email in &emails {
        let token = issue_token(
            TokenKind::Invitation,
            &state.growth_keys.token_key,
            &mut rng,
        );
        let accept_url = url_with_token(&state.growth.accept_url, &token.plaintext);
        let email_message = match &template {
            Some(template) => Some(render(
                template,
                email,
                &invitation_context(
                    profile.as_ref().and_then(|p| p.name.as_deref()),
                    inviter.as_ref().and_then(|u| u.name.as_deref()),
                    &body.role,
                    &accept_url,
                    expires_at,
                    email,
                ),
            )?),
            None => None,
        };
        invitations.push(NewInvitation {
            id: format!("inv_{}", uuid::Uuid::now_v7().simple()),
            email: email.clone(),
            token_hash: token.digest.hash.clone(),
            token_prefix: token.digest.display_prefix.clone(),
            email_message,
        });
        tokens.push((token.plaintext, accept_url));
    }
    let outcomes = state
        .store
        .create_invitations(&InvitationBatch {
            project,
            org_id,
            inviter_user_id: body.inviter_user_id,
            role: body.role,
            expires_at,
            invitations,
            policy: state.growth.invitation_policy(),
            now,
        })
        .await??;
    state.outbox_signal.wake();
    let views = emails
        .into_iter()
        .zip(tokens)
        .zip(outcomes)
        .map(|((email, (token, accept_url)), outcome)| match outcome {
            InvitationOutcome::Created(invitation) => InvitationCreated {
                email,
                outcome: "created",
                invitation: Some(invitation),
                token: Some(token),
                accept_url: Some(accept_url),
                email_status: Some(email_status(&state, body.send_email)),
            },
            InvitationOutcome::AlreadyPending(invitation) => InvitationCreated {
                email,
                outcome: "already_pending",
                invitation: Some(invitation),
                token: None,
                accept_url: None,
                email_status: None,
            },
            InvitationOutcome::AlreadyMember => InvitationCreated {
                email,
                outcome: "already_member",
                invitation: None,
                token: None,
                accept_url: None,
                email_status: None,
            },
        })
        .collect();
    Ok((
        StatusCode::CREATED,
        ApiJson(InvitationsCreated { invitations: views }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvitationFilter {
    /// `pending`, `accepted`, `declined`, `revoked` or `expired`.
    status: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationList {
    invitations: Vec<Invitation>,
}

/// An org's invitations, newest first, with their status as of now.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/invitations", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path), InvitationFilter),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The invitations", body = InvitationList),
        (status = 400, description = "Unknown status", body = ErrorEnvelope),
    ))]
pub async fn list_invitations(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiQuery(filter): ApiQuery<InvitationFilter>,
) -> Result<ApiJson<InvitationList>, ApiError> {
    let status = match filter.status.as_deref() {
        Some(text) => Some(InvitationStatus::parse(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "status is one of pending, accepted, declined, revoked, expired",
            )
        })?),
        None => None,
    };
    let now = state.clock.now();
    let mut invitations = state
        .store
        .list_invitations(auth.principal.project_id(), &org_id, status, now)
        .await?;
    for invitation in &mut invitations {
        invitation.status = invitation.status_at(now);
    }
    Ok(ApiJson(InvitationList { invitations }))
}

/// Revokes a pending (or expired) invitation: its token stops working.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/invitations/{id}/revoke", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path), ("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Revoked", body = Invitation),
        (status = 404, description = "No such invitation", body = ErrorEnvelope),
        (status = 409, description = "Already accepted, declined or revoked", body = ErrorEnvelope),
    ))]
pub async fn revoke_invitation(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<ApiJson<Invitation>, ApiError> {
    let invitation = state
        .store
        .revoke_invitation(auth.principal.project_id(), &org_id, &id, state.clock.now())
        .await??;
    state.outbox_signal.wake();
    Ok(ApiJson(invitation))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResendBody {
    #[serde(default = "yes")]
    send_email: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationResent {
    invitation: Invitation,
    /// The new token (the old one stops working), shown once.
    token: String,
    accept_url: String,
    email_status: &'static str,
}

/// Sends an invitation again with a new token and a new expiry (the old
/// token stops working). Limited per invitation.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/invitations/{id}/resend", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path), ("id" = String, Path)),
    request_body = ResendBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Resent", body = InvitationResent),
        (status = 404, description = "No such invitation", body = ErrorEnvelope),
        (status = 409, description = "Accepted, declined or revoked", body = ErrorEnvelope),
        (status = 429, description = "Resend limit reached", body = ErrorEnvelope),
    ))]
pub async fn resend_invitation(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<ApiJson<InvitationResent>, ApiError> {
    // The body is optional: empty means the defaults.
    let body: ResendBody = if body.iter().all(u8::is_ascii_whitespace) {
        ResendBody { send_email: true }
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", error.to_string())
        })?
    };
    let project = auth.principal.project_id();
    let now = state.clock.now();
    let lookup = state
        .store
        .invitation_by_id(project, &org_id, &id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("invitation_not_found", "no such invitation in this org")
        })?;
    let expires_at = now + invitation_expiry(state.growth.invitation_expiry_days)?;
    let token = issue_token(
        TokenKind::Invitation,
        &state.growth_keys.token_key,
        &mut rand::thread_rng(),
    );
    let accept_url = url_with_token(&state.growth.accept_url, &token.plaintext);
    let send = body.send_email && state.smtp_enabled;
    let email_message = if send {
        let template =
            effective_template("invitation", &state.store.email_templates(project).await?)
                .expect("invitation has a default template");
        let invitation = &lookup.invitation;
        Some(render(
            &template,
            &invitation.email,
            &invitation_context(
                lookup.org_name.as_deref(),
                lookup.inviter_name.as_deref(),
                &invitation.role,
                &accept_url,
                expires_at,
                &invitation.email,
            ),
        )?)
    } else {
        None
    };
    let invitation = state
        .store
        .resend_invitation(&ResendRequest {
            project,
            org_id,
            id,
            token_hash: token.digest.hash,
            token_prefix: token.digest.display_prefix,
            expires_at,
            email_message,
            policy: state.growth.invitation_policy(),
            now,
        })
        .await??;
    state.outbox_signal.wake();
    Ok(ApiJson(InvitationResent {
        invitation,
        token: token.plaintext,
        accept_url,
        email_status: email_status(&state, body.send_email),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationPreview {
    invitation_id: String,
    org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_name: Option<String>,
    inviter_user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    inviter_name: Option<String>,
    role: String,
    /// Masked: `a***e@example.com`.
    email: String,
    expires_at: DateTime<Utc>,
}

/// What an invitation page shows before the invitee accepts. Unknown,
/// used, expired and revoked tokens all get the same 404.
#[utoipa::path(post, path = "/v1/invitations/lookup", tag = "growth",
    security(("api_key" = [])),
    request_body = TokenBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The open invitation", body = InvitationPreview),
        (status = 404, description = "No open invitation has this token", body = ErrorEnvelope),
    ))]
pub async fn lookup_invitation(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<ApiJson<InvitationPreview>, ApiError> {
    let hash = token_hash(&state, TokenKind::Invitation, &body.token)
        .ok_or_else(|| ApiError::from(Invitation::not_found()))?;
    let lookup = state
        .store
        .invitation_by_token(auth.principal.project_id(), &hash)
        .await?
        .filter(|lookup| lookup.invitation.is_open(state.clock.now()))
        .ok_or_else(|| ApiError::from(Invitation::not_found()))?;
    let invitation = lookup.invitation;
    Ok(ApiJson(InvitationPreview {
        invitation_id: invitation.id,
        org_id: invitation.org_id,
        org_name: lookup.org_name,
        inviter_user_id: invitation.inviter_user_id,
        inviter_name: lookup.inviter_name,
        role: invitation.role,
        email: mask_email(&invitation.email),
        expires_at: invitation.expires_at,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    token: String,
    /// An existing user (for new users, sign up with the token instead).
    user_id: String,
}

/// Accepts an invitation as an existing user whose verified address is
/// the invited one. Single use: of concurrent accepts one wins; the same
/// user retrying gets the same membership.
#[utoipa::path(post, path = "/v1/invitations/accept", tag = "growth",
    security(("api_key" = [])),
    request_body = JoinBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The membership", body = MembershipRecord),
        (status = 403, description = "Another address, an unverified address, or no seat left", body = ErrorEnvelope),
        (status = 404, description = "No open invitation has this token, or no such user", body = ErrorEnvelope),
    ))]
pub async fn accept_invitation(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<JoinBody>,
) -> Result<ApiJson<MembershipRecord>, ApiError> {
    let hash = token_hash(&state, TokenKind::Invitation, &body.token)
        .ok_or_else(|| ApiError::from(Invitation::not_found()))?;
    let project = auth.principal.project_id();
    let commit = state
        .store
        .accept_invitation(&JoinRequest {
            project,
            token_hash: hash,
            user_id: body.user_id,
            policy: policy(&state.growth, &state.billing, &auth.principal),
            now: state.clock.now(),
        })
        .await??;
    after_commit(&state, project, commit.orgs);
    state.profiles.forget(project, &commit.reply.user_id);
    Ok(ApiJson(commit.reply))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Declined {
    invitation_id: String,
    status: InvitationStatus,
}

/// Declines an invitation (the invitee's choice; any key).
#[utoipa::path(post, path = "/v1/invitations/decline", tag = "growth",
    security(("api_key" = [])),
    request_body = TokenBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Declined", body = Declined),
        (status = 404, description = "No open invitation has this token", body = ErrorEnvelope),
    ))]
pub async fn decline_invitation(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<ApiJson<Declined>, ApiError> {
    let hash = token_hash(&state, TokenKind::Invitation, &body.token)
        .ok_or_else(|| ApiError::from(Invitation::not_found()))?;
    let invitation = state
        .store
        .decline_invitation(auth.principal.project_id(), &hash, state.clock.now())
        .await??;
    state.outbox_signal.wake();
    Ok(ApiJson(Declined {
        invitation_id: invitation.id,
        status: invitation.status,
    }))
}

// ---- invite links ----------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInviteLinkBody {
    #[serde(default = "default_role")]
    role: String,
    /// A member of the org.
    created_by_user_id: String,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    max_uses: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InviteLinkCreated {
    link: InviteLink,
    /// Shown only here, once.
    token: String,
    join_url: String,
}

/// Creates a multi-use join link for an org.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/invite-links", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path)),
    request_body = CreateInviteLinkBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 201, description = "Created", body = InviteLinkCreated),
        (status = 400, description = "Invalid role, expiry or max_uses", body = ErrorEnvelope),
        (status = 403, description = "The creator is not a member", body = ErrorEnvelope),
    ))]
pub async fn create_invite_link(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
    ApiJson(body): ApiJson<CreateInviteLinkBody>,
) -> Result<(StatusCode, ApiJson<InviteLinkCreated>), ApiError> {
    external_id("org_id", &org_id)?;
    validate_role(&body.role)?;
    let now = state.clock.now();
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_expiry",
            "expires_at must be in the future",
        ));
    }
    if body.max_uses.is_some_and(|max| max < 1) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_max_uses",
            "max_uses must be at least 1",
        ));
    }
    let project = auth.principal.project_id();
    if !state
        .store
        .is_member(project, &org_id, &body.created_by_user_id)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "inviter_not_member",
            "the link's creator must be a member of the org",
        ));
    }
    let token = issue_token(
        TokenKind::InviteLink,
        &state.growth_keys.token_key,
        &mut rand::thread_rng(),
    );
    let link = InviteLink {
        id: format!("lnk_{}", uuid::Uuid::now_v7().simple()),
        org_id,
        role: body.role,
        created_by_user_id: body.created_by_user_id,
        token_prefix: token.digest.display_prefix.clone(),
        created_at: now,
        expires_at: body.expires_at,
        max_uses: body.max_uses,
        uses: 0,
        revoked_at: None,
    };
    state
        .store
        .create_invite_link(project, &link, &token.digest.hash)
        .await?;
    state.outbox_signal.wake();
    Ok((
        StatusCode::CREATED,
        ApiJson(InviteLinkCreated {
            join_url: url_with_token(&state.growth.accept_url, &token.plaintext),
            link,
            token: token.plaintext,
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InviteLinkView {
    #[serde(flatten)]
    link: InviteLink,
    /// `active`, `expired`, `exhausted` or `revoked`, as of now.
    status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InviteLinkList {
    links: Vec<InviteLinkView>,
}

/// An org's invite links with their use counts.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/invite-links", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The links", body = InviteLinkList)))]
pub async fn list_invite_links(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(org_id): Path<String>,
) -> Result<ApiJson<InviteLinkList>, ApiError> {
    let now = state.clock.now();
    let links = state
        .store
        .list_invite_links(auth.principal.project_id(), &org_id)
        .await?;
    Ok(ApiJson(InviteLinkList {
        links: links
            .into_iter()
            .map(|link| InviteLinkView {
                status: link.status_at(now),
                link,
            })
            .collect(),
    }))
}

/// Revokes an invite link.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/invite-links/{id}/revoke", tag = "growth",
    security(("api_key" = [])),
    params(("org_id" = String, Path), ("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Revoked", body = InviteLinkView),
        (status = 404, description = "No such link", body = ErrorEnvelope),
    ))]
pub async fn revoke_invite_link(
    State(state): State<AppState>,
    auth: SecretKey,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<ApiJson<InviteLinkView>, ApiError> {
    let now = state.clock.now();
    let link = state
        .store
        .revoke_invite_link(auth.principal.project_id(), &org_id, &id, now)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("invite_link_not_found", "no such invite link in this org")
        })?;
    Ok(ApiJson(InviteLinkView {
        status: link.status_at(now),
        link,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InviteLinkPreview {
    org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_name: Option<String>,
    role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
}

/// What a join page shows. Unusable links get the same 404 as unknown ones.
#[utoipa::path(post, path = "/v1/invite-links/lookup", tag = "growth",
    security(("api_key" = [])),
    request_body = TokenBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The usable link", body = InviteLinkPreview),
        (status = 404, description = "No usable invite link has this token", body = ErrorEnvelope),
    ))]
pub async fn lookup_invite_link(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<ApiJson<InviteLinkPreview>, ApiError> {
    let hash = token_hash(&state, TokenKind::InviteLink, &body.token)
        .ok_or_else(|| ApiError::from(InviteLink::not_found()))?;
    let now = state.clock.now();
    let (link, org_name) = state
        .store
        .invite_link_by_token(auth.principal.project_id(), &hash)
        .await?
        .filter(|(link, _)| link.status_at(now) == "active")
        .ok_or_else(|| ApiError::from(InviteLink::not_found()))?;
    Ok(ApiJson(InviteLinkPreview {
        org_id: link.org_id,
        org_name,
        role: link.role,
        expires_at: link.expires_at,
    }))
}

/// Joins an org through an invite link as an existing user.
#[utoipa::path(post, path = "/v1/invite-links/join", tag = "growth",
    security(("api_key" = [])),
    request_body = JoinBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The membership", body = MembershipRecord),
        (status = 403, description = "No seat left", body = ErrorEnvelope),
        (status = 404, description = "No usable invite link has this token, or no such user", body = ErrorEnvelope),
    ))]
pub async fn join_invite_link(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<JoinBody>,
) -> Result<ApiJson<MembershipRecord>, ApiError> {
    let hash = token_hash(&state, TokenKind::InviteLink, &body.token)
        .ok_or_else(|| ApiError::from(InviteLink::not_found()))?;
    let project = auth.principal.project_id();
    let commit = state
        .store
        .join_invite_link(&JoinRequest {
            project,
            token_hash: hash,
            user_id: body.user_id,
            policy: policy(&state.growth, &state.billing, &auth.principal),
            now: state.clock.now(),
        })
        .await??;
    after_commit(&state, project, commit.orgs);
    state.profiles.forget(project, &commit.reply.user_id);
    Ok(ApiJson(commit.reply))
}

// ---- share links -----------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateShareLinkBody {
    resource_type: String,
    resource_id: String,
    /// The org the resource belongs to (required for audience `org`).
    #[serde(default)]
    org_id: Option<String>,
    /// A signed-up user.
    created_by_user_id: String,
    permission: SharePermission,
    audience: ShareAudience,
    /// Addresses for audience `listed`.
    #[serde(default)]
    allow_list: Vec<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    password: Option<String>,
    /// Email the listed addresses (audience `listed`, SMTP configured).
    #[serde(default)]
    notify: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShareLinkCreated {
    link: ShareLink,
    /// Shown only here, once.
    token: String,
    share_url: String,
    /// Notification emails queued.
    emails_queued: usize,
}

fn normalized_allow_list(raw: &[String]) -> Result<Vec<String>, ApiError> {
    let mut list = Vec::new();
    for email in raw {
        let email = normalize_email(email)?;
        if !list.contains(&email) {
            list.push(email);
        }
    }
    if list.len() > 1000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_allow_list",
            "at most 1000 addresses",
        ));
    }
    Ok(list)
}

fn check_audience(
    audience: ShareAudience,
    org_id: Option<&str>,
    allow_list: &[String],
) -> Result<(), ApiError> {
    match audience {
        ShareAudience::Org if org_id.is_none() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_audience",
            "audience `org` needs the link's org_id",
        )),
        ShareAudience::Listed if allow_list.is_empty() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_audience",
            "audience `listed` needs a non-empty allow_list",
        )),
        _ => Ok(()),
    }
}

/// Shares a resource (an artifact of the product) through a link.
#[utoipa::path(post, path = "/v1/share-links", tag = "growth",
    security(("api_key" = [])),
    request_body = CreateShareLinkBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 201, description = "Created", body = ShareLinkCreated),
        (status = 400, description = "Invalid field", body = ErrorEnvelope),
        (status = 404, description = "The creator has not signed up", body = ErrorEnvelope),
    ))]
pub async fn create_share_link(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<CreateShareLinkBody>,
) -> Result<(StatusCode, ApiJson<ShareLinkCreated>), ApiError> {
    external_id("resource_type", &body.resource_type)?;
    external_id("resource_id", &body.resource_id)?;
    if let Some(org) = &body.org_id {
        external_id("org_id", org)?;
    }
    let allow_list = normalized_allow_list(&body.allow_list)?;
    check_audience(body.audience, body.org_id.as_deref(), &allow_list)?;
    let now = state.clock.now();
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_expiry",
            "expires_at must be in the future",
        ));
    }
    let project = auth.principal.project_id();
    let creator = state
        .store
        .get_user(project, &body.created_by_user_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("user_not_found", "the link's creator has not signed up")
        })?;
    let password_hash = match &body.password {
        Some(password) => Some(hash_password(password, &mut rand::thread_rng())?),
        None => None,
    };
    let token = issue_token(
        TokenKind::ShareLink,
        &state.growth_keys.token_key,
        &mut rand::thread_rng(),
    );
    let share_url = url_with_token(&state.growth.share_url, &token.plaintext);
    let link = ShareLink {
        id: format!("shr_{}", uuid::Uuid::now_v7().simple()),
        resource_type: body.resource_type,
        resource_id: body.resource_id,
        org_id: body.org_id,
        created_by_user_id: body.created_by_user_id,
        permission: body.permission,
        audience: body.audience,
        allow_list,
        expires_at: body.expires_at,
        password_protected: password_hash.is_some(),
        token_prefix: token.digest.display_prefix.clone(),
        created_at: now,
        revoked_at: None,
        accesses: 0,
        unique_guests: 0,
        first_access_at: None,
        last_access_at: None,
    };
    let mut emails = Vec::new();
    if body.notify && state.smtp_enabled && link.audience == ShareAudience::Listed {
        let template = effective_template("share", &state.store.email_templates(project).await?)
            .expect("share has a default template");
        for recipient in &link.allow_list {
            emails.push(render(
                &template,
                recipient,
                &serde_json::json!({
                    "sharer_name": creator.name,
                    "resource_type": link.resource_type,
                    "permission": link.permission.as_str(),
                    "share_url": share_url,
                }),
            )?);
        }
    }
    state
        .store
        .create_share_link(
            project,
            &link,
            &token.digest.hash,
            password_hash.as_deref(),
            &emails,
        )
        .await?;
    state.outbox_signal.wake();
    Ok((
        StatusCode::CREATED,
        ApiJson(ShareLinkCreated {
            link,
            token: token.plaintext,
            share_url,
            emails_queued: emails.len(),
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ShareLinkQuery {
    resource_type: Option<String>,
    resource_id: Option<String>,
    created_by_user_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShareLinkList {
    links: Vec<ShareLink>,
}

/// Share links, newest first, with their access counts.
#[utoipa::path(get, path = "/v1/share-links", tag = "growth",
    security(("api_key" = [])),
    params(ShareLinkQuery),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The links", body = ShareLinkList)))]
pub async fn list_share_links(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(query): ApiQuery<ShareLinkQuery>,
) -> Result<ApiJson<ShareLinkList>, ApiError> {
    let links = state
        .store
        .list_share_links(
            auth.principal.project_id(),
            &ShareLinkFilter {
                resource_type: query.resource_type,
                resource_id: query.resource_id,
                created_by_user_id: query.created_by_user_id,
            },
        )
        .await?;
    Ok(ApiJson(ShareLinkList { links }))
}

/// One share link with its access counts.
#[utoipa::path(get, path = "/v1/share-links/{id}", tag = "growth",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The link", body = ShareLink),
        (status = 404, description = "No such link", body = ErrorEnvelope),
    ))]
pub async fn get_share_link(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<ApiJson<ShareLink>, ApiError> {
    state
        .store
        .get_share_link(auth.principal.project_id(), &id)
        .await?
        .map(ApiJson)
        .ok_or_else(|| ApiError::not_found("share_link_not_found", "no such share link"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateShareLinkBody {
    #[serde(default)]
    permission: Option<SharePermission>,
    #[serde(default)]
    audience: Option<ShareAudience>,
    #[serde(default)]
    allow_list: Option<Vec<String>>,
    /// `null` removes the expiry.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    expires_at: Option<Option<DateTime<Utc>>>,
    /// `null` removes the password.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    password: Option<Option<String>>,
}

/// `absent` → None, `null` → Some(None), a value → Some(Some(v)).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

/// Changes a share link's permission, audience, allow list, expiry or
/// password (the token stays).
#[utoipa::path(patch, path = "/v1/share-links/{id}", tag = "growth",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    request_body = UpdateShareLinkBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The link", body = ShareLink),
        (status = 400, description = "Invalid field", body = ErrorEnvelope),
        (status = 404, description = "No such link", body = ErrorEnvelope),
    ))]
pub async fn update_share_link(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateShareLinkBody>,
) -> Result<ApiJson<ShareLink>, ApiError> {
    let project = auth.principal.project_id();
    let current = state
        .store
        .get_share_link(project, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("share_link_not_found", "no such share link"))?;
    let allow_list = body
        .allow_list
        .as_deref()
        .map(normalized_allow_list)
        .transpose()?;
    check_audience(
        body.audience.unwrap_or(current.audience),
        current.org_id.as_deref(),
        allow_list.as_deref().unwrap_or(&current.allow_list),
    )?;
    let password_hash = match body.password {
        Some(Some(password)) => Some(Some(hash_password(&password, &mut rand::thread_rng())?)),
        Some(None) => Some(None),
        None => None,
    };
    state
        .store
        .update_share_link(
            project,
            &id,
            &ShareLinkUpdate {
                permission: body.permission,
                audience: body.audience,
                allow_list,
                expires_at: body.expires_at,
                password_hash,
            },
        )
        .await?
        .map(ApiJson)
        .ok_or_else(|| ApiError::not_found("share_link_not_found", "no such share link"))
}

/// Revokes a share link: its token stops resolving.
#[utoipa::path(post, path = "/v1/share-links/{id}/revoke", tag = "growth",
    security(("api_key" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Revoked", body = ShareLink),
        (status = 404, description = "No such link", body = ErrorEnvelope),
    ))]
pub async fn revoke_share_link(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(id): Path<String>,
) -> Result<ApiJson<ShareLink>, ApiError> {
    state
        .store
        .revoke_share_link(auth.principal.project_id(), &id, state.clock.now())
        .await?
        .map(ApiJson)
        .ok_or_else(|| ApiError::not_found("share_link_not_found", "no such share link"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    token: String,
    #[serde(default)]
    password: Option<String>,
    /// The guest's address (audience `listed`).
    #[serde(default)]
    email: Option<String>,
    /// A signed-in user (audience `org`: must be a member).
    #[serde(default)]
    user_id: Option<String>,
    /// The id a previous resolve returned, to count the guest once.
    #[serde(default)]
    guest_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Resolved {
    /// Verify with `POST /v1/guest-tokens/verify`.
    guest_token: String,
    expires_at: DateTime<Utc>,
    /// Keep it (e.g. in a cookie) and send it next time.
    guest_id: String,
    link_id: String,
    resource_type: String,
    resource_id: String,
    permission: SharePermission,
}

/// Opens a share link as a guest: checks the password and audience, counts
/// the access, and returns a short-lived guest token scoped to the
/// resource and permission. Unknown, revoked and expired links get the
/// same 404. Limited per client IP.
#[utoipa::path(post, path = "/v1/share-links/resolve", tag = "growth",
    security(("api_key" = [])),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "A guest token", body = Resolved),
        (status = 401, description = "Password required or wrong", body = ErrorEnvelope),
        (status = 403, description = "Not in the link's audience", body = ErrorEnvelope),
        (status = 404, description = "No active share link has this token", body = ErrorEnvelope),
        (status = 429, description = "Too many resolves from this address", body = ErrorEnvelope),
    ))]
pub async fn resolve_share_link(
    State(state): State<AppState>,
    auth: AnyKey,
    PeerIp(ip): PeerIp,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    if let Some(ip) = ip {
        if let Err(retry_after) = state.share_resolve_limiter.check(ip, now.timestamp()) {
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many share-link resolves from this address; retry later",
            )
            .into_response();
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after));
            return Ok(response);
        }
    }
    let project = auth.principal.project_id();
    let hash = token_hash(&state, TokenKind::ShareLink, &body.token)
        .ok_or_else(|| ApiError::from(ShareLink::not_found()))?;
    let found = state
        .store
        .share_link_by_token(project, &hash)
        .await?
        .filter(|found| found.link.status_at(now) == "active")
        .ok_or_else(|| ApiError::from(ShareLink::not_found()))?;
    if let Some(phc) = &found.password_hash {
        match &body.password {
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "share_password_required",
                    "this link needs a password",
                ))
            }
            Some(password) if !verify_password(password, phc) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "share_password_invalid",
                    "the password is wrong",
                ))
            }
            Some(_) => {}
        }
    }
    let email = body.email.as_deref().map(normalize_email).transpose()?;
    let org_member = match (&body.user_id, &found.link.org_id) {
        (Some(user), Some(org)) => state.store.is_member(project, org, user).await?,
        _ => false,
    };
    found.link.admit(&ShareVisitor {
        email: email.clone(),
        org_member,
    })?;
    let guest_id = body
        .guest_id
        .filter(|id| validate_external_id("guest_id", id).is_ok())
        .unwrap_or_else(|| format!("gst_{}", uuid::Uuid::now_v7().simple()));
    let guest = match (&body.user_id, &email) {
        (Some(user), _) => format!("user:{user}"),
        (None, Some(email)) => format!("email:{email}"),
        (None, None) => format!("guest:{guest_id}"),
    };
    let link = state
        .store
        .record_share_access(project, &found.link.id, &guest, now)
        .await?
        .ok_or_else(|| ApiError::from(ShareLink::not_found()))?;
    let expires_at = now + Duration::seconds(state.growth.guest_token_ttl_secs.max(1));
    let claims = GuestClaims {
        project: project.0.to_string(),
        link_id: link.id.clone(),
        resource_type: link.resource_type.clone(),
        resource_id: link.resource_id.clone(),
        permission: link.permission.as_str().to_owned(),
        guest,
        issued_at: now.timestamp(),
        expires_at: expires_at.timestamp(),
    };
    Ok(ApiJson(Resolved {
        guest_token: sign_guest_token(&state.growth_keys.guest_key, &claims),
        expires_at,
        guest_id,
        link_id: link.id,
        resource_type: link.resource_type,
        resource_id: link.resource_id,
        permission: link.permission,
    })
    .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyGuestBody {
    guest_token: String,
}

/// Checks a guest token (signature, expiry, project) and returns its claims.
#[utoipa::path(post, path = "/v1/guest-tokens/verify", tag = "growth",
    security(("api_key" = [])),
    request_body = VerifyGuestBody,
    responses(
        (status = 200, description = "The claims", body = GuestClaims),
        (status = 401, description = "Invalid or expired guest token", body = ErrorEnvelope),
    ))]
pub async fn verify_guest(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(body): ApiJson<VerifyGuestBody>,
) -> Result<ApiJson<GuestClaims>, ApiError> {
    let claims = verify_guest_token(
        &state.growth_keys.guest_key,
        &body.guest_token,
        state.clock.now().timestamp(),
    )?;
    if claims.project != auth.principal.project_id().0.to_string() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_guest_token",
            "the guest token belongs to another project",
        ));
    }
    Ok(ApiJson(claims))
}

// ---- referrals -------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct ReferralCodeView {
    user_id: String,
    code: String,
}

/// A user's referral code (created with the user).
#[utoipa::path(get, path = "/v1/users/{user_id}/referral-code", tag = "growth",
    security(("api_key" = [])),
    params(("user_id" = String, Path)),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The code", body = ReferralCodeView),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    ))]
pub async fn referral_code(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(user_id): Path<String>,
) -> Result<ApiJson<ReferralCodeView>, ApiError> {
    let project = auth.principal.project_id();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    for _ in 0..4 {
        match state
            .store
            .referral_code(project, &user_id, &generate_referral_code(&mut rng))
            .await
        {
            Ok(Some(code)) => return Ok(ApiJson(ReferralCodeView { user_id, code })),
            Ok(None) => {
                return Err(ApiError::not_found(
                    "user_not_found",
                    "no user with this user_id has signed up",
                ))
            }
            Err(flywheel_store::StoreError::Conflict(_)) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "could not draw a free referral code; retry",
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClickBody {
    code: String,
    /// The visitor's anonymous id: a later signup with it finds the click.
    #[serde(default)]
    anonymous_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClickRecorded {
    /// Pass to signup as `referral_click_id`.
    click_id: String,
    /// Until when a signup is attributed to this click.
    attributable_until: DateTime<Utc>,
}

/// Records a click on a referral link (any key: browsers call it).
#[utoipa::path(post, path = "/v1/referrals/click", tag = "growth",
    security(("api_key" = [])),
    request_body = ClickBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 201, description = "Recorded", body = ClickRecorded),
        (status = 404, description = "No user has this code", body = ErrorEnvelope),
    ))]
pub async fn referral_click(
    State(state): State<AppState>,
    auth: AnyKey,
    ApiJson(body): ApiJson<ClickBody>,
) -> Result<(StatusCode, ApiJson<ClickRecorded>), ApiError> {
    optional_text("anonymous_id", &body.anonymous_id, 200)?;
    let not_found =
        || ApiError::not_found("referral_code_not_found", "no user has this referral code");
    let code = normalize_referral_code(&body.code).ok_or_else(not_found)?;
    let now = state.clock.now();
    let click_id = format!("clk_{}", uuid::Uuid::now_v7().simple());
    state
        .store
        .record_referral_click(
            auth.principal.project_id(),
            &click_id,
            &code,
            body.anonymous_id.as_deref(),
            now,
        )
        .await?
        .ok_or_else(not_found)?;
    Ok((
        StatusCode::CREATED,
        ApiJson(ClickRecorded {
            click_id,
            attributable_until: now + Duration::days(state.growth.referral_window_days),
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReferralEventParams {
    /// `invited`, `shared`, `share_viewed`, `accepted`, `signed_up`, …
    kind: Option<String>,
    actor_user_id: Option<String>,
    signup_user_id: Option<String>,
    /// Page after this event id.
    after_id: Option<i64>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReferralEventList {
    events: Vec<ReferralEvent>,
    /// Pass as `after_id` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_id: Option<i64>,
}

/// The viral loop's history, oldest first: who invited, shared, whose
/// shares were viewed, who accepted and signed up through whom.
#[utoipa::path(get, path = "/v1/referral-events", tag = "growth",
    security(("api_key" = [])),
    params(ReferralEventParams),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "The events", body = ReferralEventList),
        (status = 400, description = "Unknown kind or bad limit", body = ErrorEnvelope),
    ))]
pub async fn referral_events(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(params): ApiQuery<ReferralEventParams>,
) -> Result<ApiJson<ReferralEventList>, ApiError> {
    let limit = crate::routes::page_limit(params.limit)?;
    let kind = match params.kind.as_deref() {
        Some(text) => Some(ReferralEventKind::parse(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("unknown referral event kind {text}"),
            )
        })?),
        None => None,
    };
    let events = state
        .store
        .referral_events(
            auth.principal.project_id(),
            &ReferralEventQuery {
                kind,
                actor_user_id: params.actor_user_id,
                signup_user_id: params.signup_user_id,
                after_id: params.after_id,
                limit,
            },
        )
        .await?;
    let next_after_id = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(ApiJson(ReferralEventList {
        events,
        next_after_id,
    }))
}

// ---- templates -------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct OrgTemplateView {
    /// 0 until a template is written.
    version: i64,
    template: serde_json::Value,
}

/// The project's org template (initial settings and sample resources),
/// delivered with each `org.provisioned` webhook.
#[utoipa::path(get, path = "/v1/org-template", tag = "growth",
    security(("api_key" = [])),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The current template", body = OrgTemplateView)))]
pub async fn get_org_template(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<OrgTemplateView>, ApiError> {
    let (version, template) = state
        .store
        .org_template(auth.principal.project_id())
        .await?
        .unwrap_or((0, serde_json::json!({})));
    Ok(ApiJson(OrgTemplateView { version, template }))
}

/// Replaces the org template (a JSON object, at most 256 KiB); each write
/// is a new version and new orgs record the version they got.
#[utoipa::path(put, path = "/v1/org-template", tag = "growth",
    security(("api_key" = [])),
    request_body = Object,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Written", body = OrgTemplateView),
        (status = 400, description = "Not a JSON object, or too large", body = ErrorEnvelope),
    ))]
pub async fn put_org_template(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiJson(template): ApiJson<serde_json::Value>,
) -> Result<ApiJson<OrgTemplateView>, ApiError> {
    if !template.is_object() || template.to_string().len() > 256 * 1024 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_org_template",
            "the org template is a JSON object of at most 256 KiB",
        ));
    }
    let actor = format!("key:{}", auth.principal.key_id.0);
    let version = state
        .store
        .put_org_template(
            auth.principal.project_id(),
            &template,
            &actor,
            state.clock.now(),
        )
        .await?;
    Ok(ApiJson(OrgTemplateView { version, template }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmailTemplateList {
    /// Every kind, the project's version or the default.
    templates: Vec<EmailTemplate>,
}

/// The email templates in effect (minijinja syntax).
#[utoipa::path(get, path = "/v1/email-templates", tag = "growth",
    security(("api_key" = [])),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The templates", body = EmailTemplateList)))]
pub async fn list_email_templates(
    State(state): State<AppState>,
    auth: SecretKey,
) -> Result<ApiJson<EmailTemplateList>, ApiError> {
    let stored = state
        .store
        .email_templates(auth.principal.project_id())
        .await?;
    Ok(ApiJson(EmailTemplateList {
        templates: EMAIL_KINDS
            .iter()
            .filter_map(|kind| effective_template(kind, &stored))
            .collect(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailTemplateBody {
    subject: String,
    text_body: String,
    #[serde(default)]
    html_body: Option<String>,
}

/// Replaces the template of one kind of email (`invitation`, `share`). It
/// must render with sample values.
#[utoipa::path(put, path = "/v1/email-templates/{kind}", tag = "growth",
    security(("api_key" = [])),
    params(("kind" = String, Path)),
    request_body = EmailTemplateBody,
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),
        (status = 200, description = "Written", body = EmailTemplate),
        (status = 400, description = "Does not render", body = ErrorEnvelope),
        (status = 404, description = "Unknown kind", body = ErrorEnvelope),
    ))]
pub async fn put_email_template(
    State(state): State<AppState>,
    auth: SecretKey,
    Path(kind): Path<String>,
    ApiJson(body): ApiJson<EmailTemplateBody>,
) -> Result<ApiJson<EmailTemplate>, ApiError> {
    if !EMAIL_KINDS.contains(&kind.as_str()) {
        return Err(ApiError::not_found(
            "email_template_not_found",
            format!("kinds are {}", EMAIL_KINDS.join(", ")),
        ));
    }
    let template = EmailTemplate {
        kind,
        subject: body.subject,
        text_body: body.text_body,
        html_body: body.html_body,
        updated_at: state.clock.now(),
    };
    let sample = serde_json::json!({
        "org_name": "Acme", "inviter_name": "Ann", "role": "member",
        "accept_url": "https://example.com/accept", "expires_at": "2026-01-01 00:00 UTC",
        "email": "bob@example.com", "sharer_name": "Ann", "resource_type": "document",
        "permission": "view", "share_url": "https://example.com/s",
    });
    render(&template, "bob@example.com", &sample)?;
    state
        .store
        .put_email_template(auth.principal.project_id(), &template)
        .await?;
    Ok(ApiJson(template))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EmailListParams {
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmailList {
    emails: Vec<EmailRecord>,
}

/// Emails queued and sent, newest first (bodies are not kept once sent).
#[utoipa::path(get, path = "/v1/emails", tag = "growth",
    security(("api_key" = [])),
    params(EmailListParams),
    responses(
        (status = 401, description = "Missing, unknown or revoked key", body = ErrorEnvelope),(status = 200, description = "The emails", body = EmailList)))]
pub async fn list_emails(
    State(state): State<AppState>,
    auth: SecretKey,
    ApiQuery(params): ApiQuery<EmailListParams>,
) -> Result<ApiJson<EmailList>, ApiError> {
    let limit = crate::routes::page_limit(params.limit)?;
    let emails = state
        .store
        .list_emails(auth.principal.project_id(), limit)
        .await?;
    Ok(ApiJson(EmailList { emails }))
}
