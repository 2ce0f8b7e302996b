//! Invite links: one link, many joins.

use super::*;
use crate::growth::common::*;
use crate::growth::invitations::*;
use crate::growth::members::*;
use crate::growth::outbound::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::growth::model::InviteLink;
use flywheel_domain::project::ProjectId;

/// Invite links: one link, many joins.
#[async_trait::async_trait]
pub trait InviteLinkStore: Send + Sync {
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
}

pub(crate) async fn invite_link_by_hash(
    conn: &mut Conn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<InviteLink>, StoreError> {
    let sql = format!(
        "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND token_hash = $2{}",
        conn.backend().lock()
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(invite_link_from)
        .transpose()
}

/// Counts one use of an invite link if it is still usable.
pub(crate) async fn use_invite_link(
    conn: &mut Conn,
    project: ProjectId,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let done = query(
        "UPDATE invite_links SET uses = uses + 1 WHERE project_id = $1 AND id = $2 \
         AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3) \
         AND (max_uses IS NULL OR uses < max_uses)",
    )
    .bind(arg_project(project))
    .bind(id)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(crate) async fn join_link_in(
    conn: &mut Conn,
    request: &JoinRequest,
) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
    let project = request.project;
    let now = request.now;
    let link = match invite_link_by_hash(&mut *conn, project, &request.token_hash).await? {
        Some(link) if link.status_at(now) == "active" => link,
        _ => return rules(InviteLink::not_found()),
    };
    if user_in(&mut *conn, project, &request.user_id)
        .await?
        .is_none()
    {
        return rules(user_not_found());
    }
    if let Some(membership) =
        membership_in(&mut *conn, project, &link.org_id, &request.user_id).await?
    {
        return Ok(Ok(GrowthCommit {
            reply: membership,
            orgs: Vec::new(),
        }));
    }
    if !use_invite_link(&mut *conn, project, &link.id, now).await? {
        return rules(InviteLink::not_found());
    }
    join_as_user(
        &mut *conn,
        request,
        &link.org_id,
        &link.role,
        "invite_link",
        &link.created_by_user_id,
        &link.id,
    )
    .await
}

#[async_trait::async_trait]
impl<S: SqlBackend> InviteLinkStore for S {
    async fn create_invite_link(
        &self,
        project: ProjectId,
        link: &InviteLink,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO invite_links (project_id, id, org_id, role, created_by_user_id, token_hash, \
             token_prefix, created_at, expires_at, max_uses, uses, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, NULL)",
        )
        .bind(arg_project(project))
        .bind(&link.id)
        .bind(&link.org_id)
        .bind(&link.role)
        .bind(&link.created_by_user_id)
        .bind(token_hash)
        .bind(&link.token_prefix)
        .bind(arg_time(link.created_at))
        .bind(arg_opt_time(link.expires_at))
        .bind(link.max_uses)
        .execute(&mut *tx)
        .await?;
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "invite_link.created".into(),
                data: serde_json::to_value(link).map_err(StoreError::internal)?,
            }],
            link.created_at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_invite_links(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<Vec<InviteLink>, StoreError> {
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND org_id = $2 \
             ORDER BY created_at DESC, id"
        );
        query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(invite_link_from)
            .collect()
    }

    async fn revoke_invite_link(
        &self,
        project: ProjectId,
        org_id: &str,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<InviteLink>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE invite_links SET revoked_at = COALESCE(revoked_at, $4) \
             WHERE project_id = $1 AND org_id = $2 AND id = $3",
        )
        .bind(arg_project(project))
        .bind(org_id)
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND org_id = $2 AND id = $3"
        );
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(org_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(invite_link_from)
            .transpose()?;
        tx.commit().await?;
        Ok(link)
    }

    async fn invite_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<(InviteLink, Option<String>)>, StoreError> {
        let mut conn = self.reader().await?;
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM invite_links WHERE project_id = $1 AND token_hash = $2"
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let link = invite_link_from(&row)?;
        let name = profile_in(&mut *conn, project, &link.org_id)
            .await?
            .and_then(|p| p.name);
        Ok(Some((link, name)))
    }

    async fn join_invite_link(
        &self,
        request: &JoinRequest,
    ) -> Result<Ruled<GrowthCommit<MembershipRecord>>, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = join_link_in(&mut *tx, request).await?;
        if outcome.is_ok() {
            tx.commit().await?;
        }
        Ok(outcome)
    }
}
