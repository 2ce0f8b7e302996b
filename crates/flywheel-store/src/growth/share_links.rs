//! Share links and their guests.

use super::*;
use crate::growth::common::*;
use crate::growth::effects::*;
use crate::growth::outbound::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::growth::model::{NewReferralEvent, ReferralEventKind, ShareLink};
use flywheel_domain::project::ProjectId;

/// Share links and their guests.
#[async_trait::async_trait]
pub trait ShareLinkStore: Send + Sync {
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
    /// Counts an access by `guest_key`; a guest's first access also records
    /// a `share_viewed` referral event. Returns the updated link.
    async fn record_share_access(
        &self,
        project: ProjectId,
        link_id: &str,
        guest_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, crate::StoreError>;
}

pub(crate) async fn share_by_hash(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    token_hash: &str,
) -> Result<Option<ShareLinkSecret>, StoreError> {
    let sql = format!(
        "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND token_hash = $2"
    );
    query(&sql)
        .bind(arg_project(project))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(share_link_from)
        .transpose()
}

#[async_trait::async_trait]
impl<S: SqlBackend> ShareLinkStore for S {
    async fn create_share_link(
        &self,
        project: ProjectId,
        link: &ShareLink,
        token_hash: &str,
        password_hash: Option<&str>,
        notifications: &[RenderedEmail],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO share_links (project_id, id, resource_type, resource_id, org_id, \
             created_by_user_id, permission, audience, allow_list, expires_at, password_hash, \
             token_hash, token_prefix, created_at, revoked_at, accesses, unique_guests) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, NULL, 0, 0)",
        )
        .bind(arg_project(project))
        .bind(&link.id)
        .bind(&link.resource_type)
        .bind(&link.resource_id)
        .bind(&link.org_id)
        .bind(&link.created_by_user_id)
        .bind(link.permission.as_str())
        .bind(link.audience.as_str())
        .bind(arg_json(
            &serde_json::to_value(&link.allow_list).map_err(StoreError::internal)?,
        ))
        .bind(arg_opt_time(link.expires_at))
        .bind(password_hash)
        .bind(token_hash)
        .bind(&link.token_prefix)
        .bind(arg_time(link.created_at))
        .execute(&mut *tx)
        .await?;
        referral_event(
            &mut *tx,
            project,
            NewReferralEvent {
                kind: ReferralEventKind::Shared,
                actor_user_id: Some(link.created_by_user_id.clone()),
                resource_type: link.resource_type.clone(),
                resource_id: link.resource_id.clone(),
                via_id: Some(link.id.clone()),
                signup_user_id: None,
                org_id: link.org_id.clone(),
            },
            link.created_at,
        )
        .await?;
        for email in notifications {
            queue_email(&mut *tx, project, email, link.created_at).await?;
        }
        enqueue(
            &mut *tx,
            project,
            &[OutboxMessage {
                event_type: "share_link.created".into(),
                data: serde_json::to_value(link).map_err(StoreError::internal)?,
            }],
            link.created_at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_share_links(
        &self,
        project: ProjectId,
        filter: &ShareLinkFilter,
    ) -> Result<Vec<ShareLink>, StoreError> {
        // Optional filters as `($n IS NULL OR column = $n)`.
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 \
             AND ($2 IS NULL OR resource_type = $2) AND ($3 IS NULL OR resource_id = $3) \
             AND ($4 IS NULL OR created_by_user_id = $4) ORDER BY created_at DESC, id LIMIT 1000"
        );
        query(&sql)
            .bind(arg_project(project))
            .bind(&filter.resource_type)
            .bind(&filter.resource_id)
            .bind(&filter.created_by_user_id)
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .collect()
    }

    async fn get_share_link(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<Option<ShareLink>, StoreError> {
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *self.reader().await?)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()
    }

    async fn update_share_link(
        &self,
        project: ProjectId,
        id: &str,
        update: &ShareLinkUpdate,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2{}",
            tx.backend().lock()
        );
        let Some(row) = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let current = share_link_from(&row)?;
        let link = current.link;
        let permission = update.permission.unwrap_or(link.permission);
        let audience = update.audience.unwrap_or(link.audience);
        let allow_list = update.allow_list.clone().unwrap_or(link.allow_list);
        let expires_at = update.expires_at.unwrap_or(link.expires_at);
        let password_hash = update
            .password_hash
            .clone()
            .unwrap_or(current.password_hash);
        query(
            "UPDATE share_links SET permission = $3, audience = $4, allow_list = $5, \
             expires_at = $6, password_hash = $7 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(permission.as_str())
        .bind(audience.as_str())
        .bind(arg_json(
            &serde_json::to_value(&allow_list).map_err(StoreError::internal)?,
        ))
        .bind(arg_opt_time(expires_at))
        .bind(password_hash)
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)
            .and_then(|row| share_link_from(&row))?
            .link;
        tx.commit().await?;
        Ok(Some(link))
    }

    async fn revoke_share_link(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE share_links SET revoked_at = COALESCE(revoked_at, $3) WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()?;
        tx.commit().await?;
        Ok(link)
    }

    async fn share_link_by_token(
        &self,
        project: ProjectId,
        token_hash: &str,
    ) -> Result<Option<ShareLinkSecret>, StoreError> {
        let mut conn = self.reader().await?;
        share_by_hash(&mut *conn, project, token_hash).await
    }

    async fn record_share_access(
        &self,
        project: ProjectId,
        link_id: &str,
        guest_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ShareLink>, StoreError> {
        let mut tx = self.begin().await?;
        let first = query(
            "INSERT INTO share_guests (project_id, link_id, guest_key, first_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(arg_project(project))
        .bind(link_id)
        .bind(guest_key)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        query(
            "UPDATE share_links SET accesses = accesses + 1, unique_guests = unique_guests + $3, \
             first_access_at = COALESCE(first_access_at, $4), last_access_at = $4 \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(link_id)
        .bind(i64::from(first))
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {SHARE_COLUMNS} FROM share_links WHERE project_id = $1 AND id = $2");
        let link = query(&sql)
            .bind(arg_project(project))
            .bind(link_id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(|row| share_link_from(row).map(|secret| secret.link))
            .transpose()?;
        if let (true, Some(link)) = (first, &link) {
            referral_event(
                &mut *tx,
                project,
                NewReferralEvent {
                    kind: ReferralEventKind::ShareViewed,
                    actor_user_id: Some(link.created_by_user_id.clone()),
                    resource_type: link.resource_type.clone(),
                    resource_id: link.resource_id.clone(),
                    via_id: Some(link.id.clone()),
                    signup_user_id: None,
                    org_id: link.org_id.clone(),
                },
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(link)
    }
}
