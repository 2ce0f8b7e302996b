//! Signup, attribution and referrals.

use super::*;
use crate::growth::common::*;
use crate::growth::effects::*;
use crate::growth::invitations::*;
use crate::growth::invite_links::*;
use crate::growth::members::*;
use crate::growth::outbound::*;
use crate::growth::share_links::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::growth::model::{
    attribute, pick_click, AcquisitionSource, Invitation, InviteLink, NewReferralEvent,
    ReferralClick, ReferralClue, ReferralEvent, ReferralEventKind, RefusedClue, ShareLink,
    SignupClues,
};
use flywheel_domain::project::ProjectId;
use flywheel_domain::{DomainError, ErrorKind};
use std::sync::Arc;

/// Signup, attribution and referrals.
#[async_trait::async_trait]
pub trait SignupStore: Send + Sync {
    /// Creates the user and its org (or membership), in one transaction with
    /// its seat, attribution, referral events, template and outbox messages.
    async fn signup(
        &self,
        request: &SignupRequest,
    ) -> Result<Ruled<GrowthCommit<SignupReply>>, crate::StoreError>;
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
}

pub(crate) fn click_from(row: &Row) -> Result<ReferralClick, StoreError> {
    Ok(ReferralClick {
        click_id: row.try_get("click_id")?,
        code: row.try_get("code")?,
        referrer_user_id: row.try_get("referrer_user_id")?,
        anonymous_id: row.try_get("anonymous_id")?,
        at: read_time(row, "created_at")?,
    })
}

/// Finds the referral a signup carries: an explicit click, else
/// the visitor's clicks (by anonymous id, per the click model),
/// else a bare code. Clicks outside the window are refused.
pub(crate) async fn resolve_referral(
    conn: &mut Conn,
    request: &SignupRequest,
    refused: &mut Vec<RefusedClue>,
) -> Result<Option<ReferralClue>, StoreError> {
    let project = request.project;
    let window = request.policy.referral_window_days;
    let mut clicks = Vec::new();
    if let Some(click_id) = &request.referral_click_id {
        let row = query(
            "SELECT click_id, code, referrer_user_id, anonymous_id, created_at FROM referral_clicks \
             WHERE project_id = $1 AND click_id = $2",
        )
        .bind(arg_project(project))
        .bind(click_id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => clicks.push(click_from(&row)?),
            None => refused.push(RefusedClue {
                source: AcquisitionSource::Referral,
                reason: "unknown_click".into(),
            }),
        }
    } else if let Some(anonymous_id) = &request.anonymous_id {
        let rows = query(
            "SELECT click_id, code, referrer_user_id, anonymous_id, created_at FROM referral_clicks \
             WHERE project_id = $1 AND anonymous_id = $2 ORDER BY created_at LIMIT 1000",
        )
        .bind(arg_project(project))
        .bind(anonymous_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            clicks.push(click_from(&row)?);
        }
    }
    let chosen = pick_click(&clicks, request.now, window, request.policy.click_model);
    if chosen.is_none() && !clicks.is_empty() {
        refused.push(RefusedClue {
            source: AcquisitionSource::Referral,
            reason: "attribution_window_passed".into(),
        });
    }
    let (code, click_id) = match (chosen, &request.referral_code) {
        (Some(click), _) => (click.code.clone(), Some(click.click_id.clone())),
        (None, Some(code)) => (code.clone(), None),
        (None, None) => return Ok(None),
    };
    let owner = query(
        "SELECT user_id, email_identity FROM users WHERE project_id = $1 AND referral_code = $2",
    )
    .bind(arg_project(project))
    .bind(&code)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(owner) = owner else {
        refused.push(RefusedClue {
            source: AcquisitionSource::Referral,
            reason: "unknown_referral_code".into(),
        });
        return Ok(None);
    };
    Ok(Some(ReferralClue {
        code,
        owner_user_id: owner.try_get("user_id")?,
        owner_email_identity: owner.try_get("email_identity")?,
        click_id,
    }))
}

/// The org a signup joins through an invitation or an invite link, or the
/// one it creates.
struct Joining {
    org_id: String,
    role: String,
    /// `memberships.joined_via`.
    via: &'static str,
    invitation: Option<Invitation>,
    link: Option<InviteLink>,
}

pub(crate) async fn signup_in(
    conn: &mut Conn,
    request: &SignupRequest,
) -> Result<Ruled<GrowthCommit<SignupReply>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let stored = query(
        "SELECT fingerprint, reply FROM growth_requests WHERE project_id = $1 AND idempotency_key = $2",
    )
    .bind(arg_project(project))
    .bind(&request.idempotency_key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = stored {
        let fingerprint: String = row.try_get("fingerprint")?;
        if fingerprint != request.fingerprint {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "idempotency_key_reused",
                "this idempotency_key was used for a different signup",
            ));
        }
        let reply =
            serde_json::from_value(read_json(&row, "reply")?).map_err(StoreError::internal)?;
        return Ok(Ok(GrowthCommit {
            reply,
            orgs: Vec::new(),
        }));
    }
    if user_in(&mut *conn, project, &request.user_id)
        .await?
        .is_some()
    {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "user_exists",
            "a user with this user_id has signed up already",
        ));
    }
    let taken: Option<String> =
        query_scalar("SELECT user_id FROM users WHERE project_id = $1 AND email = $2")
            .bind(arg_project(project))
            .bind(&request.email)
            .fetch_optional(&mut *conn)
            .await?;
    if taken.is_some() {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "email_taken",
            "a user with this email address has signed up already",
        ));
    }

    let mut clues = SignupClues {
        utm: request.utm.clone(),
        referrer: request.referrer.clone(),
        ..SignupClues::default()
    };
    let mut refused = Vec::new();
    let mut email_verified = request.email_verified;
    let mut joining: Option<Joining> = None;
    if let Some(hash) = &request.invitation_token_hash {
        let invitation = match invitation_by_hash(&mut *conn, project, hash).await? {
            Some(invitation) if invitation.is_open(now) => invitation,
            _ => return rules(Invitation::not_found()),
        };
        if invitation.email != request.email {
            return rules(DomainError::new(
                ErrorKind::Forbidden,
                "invitation_email_mismatch",
                "the invitation was sent to a different email address",
            ));
        }
        // The token was sent to this mailbox: holding it proves the address.
        email_verified = true;
        clues.invitation = Some((invitation.id.clone(), invitation.inviter_user_id.clone()));
        joining = Some(Joining {
            org_id: invitation.org_id.clone(),
            role: invitation.role.clone(),
            via: "invite",
            invitation: Some(invitation),
            link: None,
        });
    } else if let Some(hash) = &request.invite_link_token_hash {
        let link = match invite_link_by_hash(&mut *conn, project, hash).await? {
            Some(link) if link.status_at(now) == "active" => link,
            _ => return rules(InviteLink::not_found()),
        };
        clues.invite_link = Some((link.id.clone(), link.created_by_user_id.clone()));
        joining = Some(Joining {
            org_id: link.org_id.clone(),
            role: link.role.clone(),
            via: "invite_link",
            invitation: None,
            link: Some(link),
        });
    }
    let mut share: Option<ShareLink> = None;
    if let Some(hash) = &request.share_token_hash {
        match share_by_hash(&mut *conn, project, hash).await? {
            Some(found) if found.link.status_at(now) == "active" => {
                clues.share_link =
                    Some((found.link.id.clone(), found.link.created_by_user_id.clone()));
                share = Some(found.link);
            }
            _ => refused.push(RefusedClue {
                source: AcquisitionSource::Share,
                reason: "share_link_not_found".into(),
            }),
        }
    }
    clues.referral = resolve_referral(&mut *conn, request, &mut refused).await?;
    let mut attribution = attribute(&request.user_id, &request.email_identity, clues);
    attribution.refused.extend(refused);

    let Joining {
        org_id,
        role,
        via,
        invitation,
        link,
    } = joining.unwrap_or_else(|| Joining {
        org_id: request.new_org_id.clone(),
        role: "owner".to_owned(),
        via: "signup",
        invitation: None,
        link: None,
    });
    let org_created = invitation.is_none() && link.is_none();
    let mut template: Option<(i64, serde_json::Value)> = None;
    if org_created {
        if profile_in(&mut *conn, project, &org_id).await?.is_some() {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "org_exists",
                "an org with this org_id exists already",
            ));
        }
        let row = query(
            "SELECT version, document FROM org_templates WHERE project_id = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(arg_project(project))
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            template = Some((row.try_get("version")?, read_json(&row, "document")?));
        }
        query(
            "INSERT INTO org_profiles (project_id, org_id, name, owner_user_id, template_version, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(arg_project(project))
        .bind(&org_id)
        .bind(&request.org_name)
        .bind(&request.user_id)
        .bind(template.as_ref().map(|(version, _)| *version))
        .bind(arg_time(now))
        .execute(&mut *conn)
        .await?;
    }
    let org_state = match take_seat(&mut *conn, project, &org_id, &request.policy, now).await? {
        Ok(state) => state,
        Err(error) => return rules(error),
    };
    let referral_code = Some(request.new_referral_code.clone());
    let user = UserRecord {
        user_id: request.user_id.clone(),
        email: request.email.clone(),
        email_verified,
        name: request.name.clone(),
        attribution: attribution.clone(),
        referral_code,
        created_at: now,
    };
    let attribution_json = serde_json::to_value(&attribution).map_err(StoreError::internal)?;
    query(
        "INSERT INTO users (project_id, user_id, email, email_identity, email_verified, name, \
         acquisition_source, invited_by_user_id, attribution, referral_code, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(arg_project(project))
    .bind(&user.user_id)
    .bind(&user.email)
    .bind(&request.email_identity)
    .bind(user.email_verified)
    .bind(&user.name)
    .bind(attribution.acquisition_source.as_str())
    .bind(&attribution.invited_by_user_id)
    .bind(arg_json(&attribution_json))
    .bind(&user.referral_code)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "user"))?;
    let membership = MembershipRecord {
        org_id: org_id.clone(),
        user_id: user.user_id.clone(),
        role,
        joined_via: via.to_owned(),
        created_at: now,
    };
    insert_membership(&mut *conn, project, &membership).await?;
    if let Some(invitation) = &invitation {
        mark_invitation_accepted(&mut *conn, project, &invitation.id, &user.user_id, now).await?;
    }
    if let Some(link) = &link {
        if !use_invite_link(&mut *conn, project, &link.id, now).await? {
            return rules(InviteLink::not_found());
        }
    }

    // The history: what brought the user, and the signup itself.
    let (resource_type, resource_id, via_id) = if let Some(invitation) = &invitation {
        (
            "org".to_owned(),
            org_id.clone(),
            Some(invitation.id.clone()),
        )
    } else if let Some(link) = &link {
        ("org".to_owned(), org_id.clone(), Some(link.id.clone()))
    } else if let Some(share) = &share {
        (
            share.resource_type.clone(),
            share.resource_id.clone(),
            Some(share.id.clone()),
        )
    } else if let Some(code) = &attribution.referral_code {
        (
            "referral_code".to_owned(),
            code.clone(),
            attribution.referral_click_id.clone(),
        )
    } else {
        ("org".to_owned(), org_id.clone(), None)
    };
    if let Some(invitation) = &invitation {
        referral_event(
            &mut *conn,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Accepted,
                actor_user_id: Some(invitation.inviter_user_id.clone()),
                resource_type: "org".into(),
                resource_id: org_id.clone(),
                via_id: Some(invitation.id.clone()),
                signup_user_id: Some(user.user_id.clone()),
                org_id: Some(org_id.clone()),
            },
            now,
        )
        .await?;
    }
    referral_event(
        &mut *conn,
        project,
        NewReferralEvent {
            kind: ReferralEventKind::SignedUp,
            actor_user_id: attribution.invited_by_user_id.clone(),
            resource_type,
            resource_id,
            via_id,
            signup_user_id: Some(user.user_id.clone()),
            org_id: Some(org_id.clone()),
        },
        now,
    )
    .await?;

    let org = match profile_in(&mut *conn, project, &org_id).await? {
        Some(profile) => profile,
        None => OrgProfile {
            org_id: org_id.clone(),
            name: None,
            owner_user_id: None,
            template_version: None,
            created_at: org_state.created_at,
        },
    };
    let plan = plan_of(&org_state, &request.policy, now);
    let mut messages = vec![OutboxMessage {
        event_type: "user.signed_up".into(),
        data: serde_json::json!({
            "user": &user,
            "org_id": &org_id,
            "org_created": org_created,
        }),
    }];
    if org_created {
        messages.push(OutboxMessage {
            event_type: "org.provisioned".into(),
            data: serde_json::json!({
                "org": &org,
                "owner_user_id": &user.user_id,
                "plan": &plan,
                "template_version": template.as_ref().map(|(v, _)| *v),
                "template": template.as_ref().map(|(_, document)| document),
            }),
        });
    }
    messages.push(OutboxMessage {
        event_type: "membership.created".into(),
        data: serde_json::to_value(&membership).map_err(StoreError::internal)?,
    });
    if let Some(invitation) = &invitation {
        messages.push(OutboxMessage {
            event_type: "invitation.accepted".into(),
            data: serde_json::json!({
                "invitation_id": &invitation.id,
                "org_id": &org_id,
                "user_id": &user.user_id,
                "inviter_user_id": &invitation.inviter_user_id,
            }),
        });
    }
    enqueue(&mut *conn, project, &messages, now).await?;

    let reply = SignupReply {
        user,
        org,
        membership,
        org_created,
        plan,
    };
    query(
        "INSERT INTO growth_requests (project_id, idempotency_key, fingerprint, reply, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(arg_project(project))
    .bind(&request.idempotency_key)
    .bind(&request.fingerprint)
    .bind(arg_json(&serde_json::to_value(&reply).map_err(StoreError::internal)?))
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(Ok(GrowthCommit {
        reply,
        orgs: vec![Arc::new(org_state)],
    }))
}

#[async_trait::async_trait]
impl<S: SqlBackend> SignupStore for S {
    async fn signup(
        &self,
        request: &SignupRequest,
    ) -> Result<Ruled<GrowthCommit<SignupReply>>, StoreError> {
        timed(Self::BACKEND, "signup", async {
            let mut tx = self.begin().await?;
            let outcome = signup_in(&mut *tx, request).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn referral_code(
        &self,
        project: ProjectId,
        user_id: &str,
        candidate: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE users SET referral_code = $3 WHERE project_id = $1 AND user_id = $2 \
             AND referral_code IS NULL",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .bind(candidate)
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "referral_code"))?;
        let code: Option<Option<String>> =
            query_scalar("SELECT referral_code FROM users WHERE project_id = $1 AND user_id = $2")
                .bind(arg_project(project))
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(code.flatten())
    }

    async fn record_referral_click(
        &self,
        project: ProjectId,
        click_id: &str,
        code: &str,
        anonymous_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin().await?;
        let owner: Option<String> =
            query_scalar("SELECT user_id FROM users WHERE project_id = $1 AND referral_code = $2")
                .bind(arg_project(project))
                .bind(code)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(owner) = owner else {
            return Ok(None);
        };
        query(
            "INSERT INTO referral_clicks (project_id, click_id, code, referrer_user_id, anonymous_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(arg_project(project))
        .bind(click_id)
        .bind(code)
        .bind(&owner)
        .bind(anonymous_id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(owner))
    }

    async fn referral_events(
        &self,
        project: ProjectId,
        query: &ReferralEventQuery,
    ) -> Result<Vec<ReferralEvent>, StoreError> {
        let rows = crate::sql::query(
            "SELECT id, kind, actor_user_id, resource_type, resource_id, via_id, signup_user_id, \
             org_id, created_at FROM referral_events WHERE project_id = $1 \
             AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR actor_user_id = $3) \
             AND ($4 IS NULL OR signup_user_id = $4) AND id > $5 ORDER BY id LIMIT $6",
        )
        .bind(arg_project(project))
        .bind(query.kind.map(ReferralEventKind::as_str))
        .bind(&query.actor_user_id)
        .bind(&query.signup_user_id)
        .bind(query.after_id.unwrap_or(0))
        .bind(i64::from(query.limit))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(ReferralEvent {
                    id: row.try_get("id")?,
                    kind: ReferralEventKind::parse(&kind).ok_or_else(|| {
                        StoreError::internal(sqlx::Error::Protocol(format!(
                            "unknown referral event kind {kind}"
                        )))
                    })?,
                    actor_user_id: row.try_get("actor_user_id")?,
                    resource_type: row.try_get("resource_type")?,
                    resource_id: row.try_get("resource_id")?,
                    via_id: row.try_get("via_id")?,
                    signup_user_id: row.try_get("signup_user_id")?,
                    org_id: row.try_get("org_id")?,
                    at: read_time(row, "created_at")?,
                })
            })
            .collect()
    }
}
