//! Invitations by email.

use super::*;
use crate::growth::common::*;
use crate::growth::effects::*;
use crate::growth::members::*;
use crate::growth::outbound::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::growth::model::{
    Invitation, InvitationStatus, NewReferralEvent, ReferralEventKind,
};
use flywheel_domain::project::ProjectId;
use flywheel_domain::{DomainError, ErrorKind};
use std::sync::Arc;

/// Invitations by email.
#[async_trait::async_trait]
pub trait InvitationStore: Send + Sync {
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
}

pub(crate) async fn invitation_by_hash(
    conn: &mut Conn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<Invitation>, StoreError> {
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND token_hash = $2{}",
        conn.backend().lock()
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(invitation_from)
        .transpose()
}

pub(crate) async fn mark_invitation_accepted(
    conn: &mut Conn,
    project: ProjectId,
    id: &str,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let done = query(
        "UPDATE invitations SET status = 'accepted', accepted_by_user_id = $3, responded_at = $4 \
         WHERE project_id = $1 AND id = $2 AND status = 'pending'",
    )
    .bind(arg_project(project))
    .bind(id)
    .bind(user_id)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        // The row was locked and checked pending above.
        return Err(StoreError::Conflict("invitation"));
    }
    Ok(())
}

/// Accept or join as an existing user: the shared tail.
pub(crate) async fn join_as_user(
    conn: &mut Conn,
    request: &JoinRequest,
    org_id: &str,
    role: &str,
    via: &'static str,
    inviter: &str,
    via_id: &str,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let state = match take_seat(&mut *conn, project, org_id, &request.policy, now).await? {
        Ok(state) => state,
        Err(error) => return rules(error),
    };
    let membership = MembershipRecord {
        org_id: org_id.to_owned(),
        user_id: request.user_id.clone(),
        role: role.to_owned(),
        joined_via: via.to_owned(),
        created_at: now,
    };
    insert_membership(&mut *conn, project, &membership).await?;
    referral_event(
        &mut *conn,
        project,
        NewReferralEvent {
            kind: ReferralEventKind::Accepted,
            actor_user_id: Some(inviter.to_owned()),
            resource_type: "org".into(),
            resource_id: org_id.to_owned(),
            via_id: Some(via_id.to_owned()),
            // The member who joined (by an invitation or an invite link), as
            // for a signup through it.
            signup_user_id: Some(request.user_id.clone()),
            org_id: Some(org_id.to_owned()),
        },
        now,
    )
    .await?;
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "membership.created".into(),
            data: serde_json::to_value(&membership).map_err(StoreError::internal)?,
        }],
        now,
    )
    .await?;
    Ok(Ok(GrowthCommit {
        reply: membership,
        orgs: vec![Arc::new(state)],
    }))
}

pub(crate) async fn accept_in(
    conn: &mut Conn,
    request: &JoinRequest,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let Some(invitation) = invitation_by_hash(&mut *conn, project, &request.token_hash).await?
    else {
        return rules(Invitation::not_found());
    };
    let Some(user) = user_in(&mut *conn, project, &request.user_id).await? else {
        return rules(user_not_found());
    };
    // A retried accept by the same user answers as the first did.
    if invitation.status == InvitationStatus::Accepted
        && invitation.accepted_by_user_id.as_deref() == Some(user.user_id.as_str())
    {
        if let Some(membership) =
            membership_in(&mut *conn, project, &invitation.org_id, &user.user_id).await?
        {
            return Ok(Ok(GrowthCommit {
                reply: membership,
                orgs: Vec::new(),
            }));
        }
    }
    if !invitation.is_open(now) {
        return rules(Invitation::not_found());
    }
    if let Err(error) = invitation.check_recipient(&user.email, user.email_verified) {
        return rules(error);
    }
    mark_invitation_accepted(&mut *conn, project, &invitation.id, &user.user_id, now).await?;
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "invitation.accepted".into(),
            data: serde_json::json!({
                "invitation_id": &invitation.id,
                "org_id": &invitation.org_id,
                "user_id": &user.user_id,
                "inviter_user_id": &invitation.inviter_user_id,
            }),
        }],
        now,
    )
    .await?;
    if let Some(membership) =
        membership_in(&mut *conn, project, &invitation.org_id, &user.user_id).await?
    {
        return Ok(Ok(GrowthCommit {
            reply: membership,
            orgs: Vec::new(),
        }));
    }
    join_as_user(
        &mut *conn,
        request,
        &invitation.org_id,
        &invitation.role,
        "invite",
        &invitation.inviter_user_id,
        &invitation.id,
    )
    .await
}

pub(crate) async fn create_invitations_in(
    conn: &mut Conn,
    batch: &InvitationBatch,
) -> Result<Ruled<Vec<InvitationOutcome>>, StoreError> {
    let project = batch.project;
    let now = batch.now;
    if membership_in(&mut *conn, project, &batch.org_id, &batch.inviter_user_id)
        .await?
        .is_none()
    {
        return rules(DomainError::new(
            ErrorKind::Forbidden,
            "inviter_not_member",
            "the inviter must be a member of the org",
        ));
    }
    // Lock the org so concurrent batches count each other.
    conn.load_org(project, &batch.org_id, now).await?;
    let mut outcomes = Vec::with_capacity(batch.invitations.len());
    let mut fresh = Vec::new();
    for new in &batch.invitations {
        let member: Option<String> = query_scalar(
            "SELECT m.user_id FROM memberships m JOIN users u ON u.project_id = m.project_id \
             AND u.user_id = m.user_id WHERE m.project_id = $1 AND m.org_id = $2 AND u.email = $3",
        )
        .bind(arg_project(project))
        .bind(&batch.org_id)
        .bind(&new.email)
        .fetch_optional(&mut *conn)
        .await?;
        if member.is_some() {
            outcomes.push(Some(InvitationOutcome::AlreadyMember));
            continue;
        }
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 \
             AND email = $3 AND status = 'pending' AND expires_at > $4"
        );
        let pending = query(&sql)
            .bind(arg_project(project))
            .bind(&batch.org_id)
            .bind(&new.email)
            .bind(arg_time(now))
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = pending {
            outcomes.push(Some(InvitationOutcome::AlreadyPending(invitation_from(
                &row,
            )?)));
            continue;
        }
        // Decided below, once the rate limits pass.
        fresh.push(outcomes.len());
        outcomes.push(None);
    }
    let count = fresh.len() as i64;
    if count > 0 {
        let hour_ago = now - chrono::Duration::hours(1);
        let recent: i64 = query_scalar(
            "SELECT COUNT(*) FROM invitations WHERE project_id = $1 AND org_id = $2 AND created_at > $3",
        )
        .bind(arg_project(project))
        .bind(&batch.org_id)
        .bind(arg_time(hour_ago))
        .fetch_one(&mut *conn)
        .await?;
        if recent + count > batch.policy.per_org_per_hour {
            return rules(flywheel_domain::growth::model::rate_limited(
                "invitation_rate_limited",
                format!(
                    "an org may send at most {} invitations per hour",
                    batch.policy.per_org_per_hour
                ),
            ));
        }
        let pending: i64 = query_scalar(
            "SELECT COUNT(*) FROM invitations WHERE project_id = $1 AND inviter_user_id = $2 \
             AND status = 'pending' AND expires_at > $3",
        )
        .bind(arg_project(project))
        .bind(&batch.inviter_user_id)
        .bind(arg_time(now))
        .fetch_one(&mut *conn)
        .await?;
        if pending + count > batch.policy.pending_per_inviter {
            return rules(flywheel_domain::growth::model::rate_limited(
                "too_many_pending_invitations",
                format!(
                    "an inviter may have at most {} pending invitations",
                    batch.policy.pending_per_inviter
                ),
            ));
        }
    }
    let mut messages = Vec::new();
    for slot in fresh {
        let new = &batch.invitations[slot];
        let invitation = Invitation {
            id: new.id.clone(),
            org_id: batch.org_id.clone(),
            email: new.email.clone(),
            role: batch.role.clone(),
            inviter_user_id: batch.inviter_user_id.clone(),
            token_prefix: new.token_prefix.clone(),
            status: InvitationStatus::Pending,
            created_at: now,
            expires_at: batch.expires_at,
            sends: 1,
            accepted_by_user_id: None,
            responded_at: None,
        };
        query(
            "INSERT INTO invitations (project_id, id, org_id, email, role, inviter_user_id, token_hash, \
             token_prefix, status, created_at, expires_at, sends) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, 1)",
        )
        .bind(arg_project(project))
        .bind(&invitation.id)
        .bind(&invitation.org_id)
        .bind(&invitation.email)
        .bind(&invitation.role)
        .bind(&invitation.inviter_user_id)
        .bind(&new.token_hash)
        .bind(&invitation.token_prefix)
        .bind(arg_time(now))
        .bind(arg_time(invitation.expires_at))
        .execute(&mut *conn)
        .await?;
        if let Some(email) = &new.email_message {
            queue_email(&mut *conn, project, email, now).await?;
        }
        referral_event(
            &mut *conn,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Invited,
                actor_user_id: Some(batch.inviter_user_id.clone()),
                resource_type: "org".into(),
                resource_id: batch.org_id.clone(),
                via_id: Some(invitation.id.clone()),
                signup_user_id: None,
                org_id: Some(batch.org_id.clone()),
            },
            now,
        )
        .await?;
        messages.push(OutboxMessage {
            event_type: "invitation.created".into(),
            data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
        });
        outcomes[slot] = Some(InvitationOutcome::Created(invitation));
    }
    enqueue(&mut *conn, project, &messages, now).await?;
    Ok(Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every slot decided"))
        .collect()))
}

pub(crate) async fn resend_in(
    conn: &mut Conn,
    request: &ResendRequest,
) -> Result<Ruled<Invitation>, StoreError> {
    let project = request.project;
    let now = request.now;
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3{}",
        conn.backend().lock()
    );
    let Some(row) = query(&sql)
        .bind(arg_project(project))
        .bind(&request.org_id)
        .bind(&request.id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return rules(DomainError::not_found(
            "invitation_not_found",
            "no such invitation in this org",
        ));
    };
    let mut invitation = invitation_from(&row)?;
    if !matches!(
        invitation.status_at(now),
        InvitationStatus::Pending | InvitationStatus::Expired
    ) {
        return rules(DomainError::new(
            ErrorKind::Conflict,
            "invitation_not_pending",
            format!("the invitation is {}", invitation.status_at(now).as_str()),
        ));
    }
    // `sends` counts the first send too.
    if invitation.sends > request.policy.resends_per_invitation {
        return rules(flywheel_domain::growth::model::rate_limited(
            "resend_limit_reached",
            format!(
                "an invitation may be resent at most {} times",
                request.policy.resends_per_invitation
            ),
        ));
    }
    query(
        "UPDATE invitations SET token_hash = $3, token_prefix = $4, expires_at = $5, \
         sends = sends + 1, status = 'pending' WHERE project_id = $1 AND id = $2",
    )
    .bind(arg_project(project))
    .bind(&request.id)
    .bind(&request.token_hash)
    .bind(&request.token_prefix)
    .bind(arg_time(request.expires_at))
    .execute(&mut *conn)
    .await?;
    invitation.token_prefix = request.token_prefix.clone();
    invitation.expires_at = request.expires_at;
    invitation.sends += 1;
    invitation.status = InvitationStatus::Pending;
    if let Some(email) = &request.email_message {
        queue_email(&mut *conn, project, email, now).await?;
    }
    enqueue(
        &mut *conn,
        project,
        &[OutboxMessage {
            event_type: "invitation.resent".into(),
            data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
        }],
        now,
    )
    .await?;
    Ok(Ok(invitation))
}

pub(crate) async fn lookup_of(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    invitation: Invitation,
) -> Result<InvitationLookup, StoreError> {
    let org_name = profile_in(&mut *conn, project, &invitation.org_id)
        .await?
        .and_then(|p| p.name);
    let inviter_name = user_in(&mut *conn, project, &invitation.inviter_user_id)
        .await?
        .and_then(|user| user.name);
    Ok(InvitationLookup {
        invitation,
        org_name,
        inviter_name,
    })
}

#[async_trait::async_trait]
impl<S: SqlBackend> InvitationStore for S {
    async fn create_invitations(
        &self,
        batch: &InvitationBatch,
    ) -> Result<Ruled<Vec<InvitationOutcome>>, StoreError> {
        timed(Self::BACKEND, "create_invitations", async {
            let mut tx = self.begin().await?;
            let outcome = create_invitations_in(&mut *tx, batch).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn list_invitations(
        &self,
        project: ProjectId,
        org_id: &str,
        status: Option<InvitationStatus>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Invitation>, StoreError> {
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 \
             ORDER BY created_at DESC, id LIMIT 1000"
        );
        let rows = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .fetch_all(&mut *self.reader().await?)
            .await?;
        let mut invitations = rows
            .iter()
            .map(invitation_from)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(status) = status {
            invitations.retain(|invitation| invitation.status_at(now) == status);
        }
        Ok(invitations)
    }

    async fn invitation_by_id(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
    ) -> Result<Option<InvitationLookup>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let invitation = invitation_from(&row)?;
        lookup_of(&mut *conn, project, invitation).await.map(Some)
    }

    async fn revoke_invitation(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND org_id = $2 AND id = $3{}",
            tx.backend().lock()
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return rules(DomainError::not_found(
                "invitation_not_found",
                "no such invitation in this org",
            ));
        };
        let mut invitation = invitation_from(&row)?;
        if !matches!(
            invitation.status_at(now),
            InvitationStatus::Pending | InvitationStatus::Expired
        ) {
            return rules(DomainError::new(
                ErrorKind::Conflict,
                "invitation_not_pending",
                format!("the invitation is {}", invitation.status_at(now).as_str()),
            ));
        }
        query(
            "UPDATE invitations SET status = 'revoked', responded_at = $3 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        invitation.status = InvitationStatus::Revoked;
        invitation.responded_at = Some(now);
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invitation.revoked".into(),
                data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
            }],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(invitation))
    }

    async fn resend_invitation(
        &self,
        request: &ResendRequest,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = resend_in(&mut *tx, request).await?;
        if outcome.is_ok() {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    async fn invitation_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<InvitationLookup>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE project_id = $1 AND token_hash = $2"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let invitation = invitation_from(&row)?;
        lookup_of(&mut *conn, project, invitation).await.map(Some)
    }

    async fn accept_invitation(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
        timed(Self::BACKEND, "accept_invitation", async {
            let mut tx = self.begin().await?;
            let outcome = accept_in(&mut *tx, request).await?;
            if outcome.is_ok() {
                tx.commit().await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn decline_invitation(
        &self,
        project: ProjectId,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruled<Invitation>, StoreError> {
        let mut tx = self.begin().await?;
        let Some(mut invitation) = invitation_by_hash(&mut *tx, project, token_hash).await? else {
            return rules(Invitation::not_found());
        };
        if !invitation.is_open(now) {
            return rules(Invitation::not_found());
        }
        query(
            "UPDATE invitations SET status = 'declined', responded_at = $3 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(&invitation.id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        invitation.status = InvitationStatus::Declined;
        invitation.responded_at = Some(now);
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invitation.declined".into(),
                data: serde_json::to_value(&invitation).map_err(StoreError::internal)?,
            }],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(invitation))
    }
}
