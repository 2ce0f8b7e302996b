//! Users, orgs and memberships: what signups provision, and the org templates.

use super::*;
use crate::growth::common::*;
use crate::growth::effects::*;
use crate::growth::outbound::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::project::ProjectId;
use flywheel_domain::{DomainError, ErrorKind};
use std::sync::Arc;

/// Users, orgs and memberships: what signups provision, and the org templates.
#[async_trait::async_trait]
pub trait MemberStore: Send + Sync {
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
    async fn is_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
    ) -> Result<bool, crate::StoreError>;
    /// What Flywheel knows of a user for flag-context enrichment: signup,
    /// attribution, orgs (memberships, then `group` calls) and `identify`
    /// traits. `None` when nothing is known.
    async fn user_profile(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<flywheel_domain::enrichment::UserProfile>, crate::StoreError>;
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
}

pub(crate) async fn user_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    user_id: &str,
) -> Result<Option<UserRecord>, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND user_id = $2");
    query(&sql)
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(user_from)
        .transpose()
}

pub(crate) async fn membership_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    org_id: &str,
    user_id: &str,
) -> Result<Option<MembershipRecord>, StoreError> {
    query(
        "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
         WHERE project_id = $1 AND org_id = $2 AND user_id = $3",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(membership_from)
    .transpose()
}

pub(crate) async fn insert_membership(
    conn: &mut Conn,
    project: ProjectId,
    membership: &MembershipRecord,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO memberships (project_id, org_id, user_id, role, joined_via, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(arg_project(project))
    .bind(&membership.org_id)
    .bind(&membership.user_id)
    .bind(&membership.role)
    .bind(&membership.joined_via)
    .bind(arg_time(membership.created_at))
    .execute(&mut *conn)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "membership"))?;
    Ok(())
}

pub(crate) async fn profile_in(
    conn: &mut dyn SqlConn,
    project: ProjectId,
    org_id: &str,
) -> Result<Option<OrgProfile>, StoreError> {
    query(
        "SELECT org_id, name, owner_user_id, template_version, created_at FROM org_profiles \
         WHERE project_id = $1 AND org_id = $2",
    )
    .bind(arg_project(project))
    .bind(org_id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(profile_from)
    .transpose()
}

pub(crate) fn user_not_found() -> DomainError {
    DomainError::not_found("user_not_found", "no user with this user_id has signed up")
}

#[async_trait::async_trait]
impl<S: SqlBackend> MemberStore for S {
    async fn get_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let mut conn = self.reader().await?;
        user_in(&mut *conn, project, user_id).await
    }

    async fn set_email_verified(
        &self,
        project: ProjectId,
        user_id: &str,
        verified: bool,
    ) -> Result<Option<UserRecord>, StoreError> {
        let mut tx = self.begin().await?;
        query("UPDATE users SET email_verified = $3 WHERE project_id = $1 AND user_id = $2")
            .bind(arg_project(project))
            .bind(user_id)
            .bind(verified)
            .execute(&mut *tx)
            .await?;
        let user = user_in(&mut *tx, project, user_id).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn memberships_of_user(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Vec<MembershipRecord>, StoreError> {
        query(
            "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
             WHERE project_id = $1 AND user_id = $2 ORDER BY created_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(membership_from)
        .collect()
    }

    async fn org_members(
        &self,
        project: ProjectId,
        org_id: &str,
    ) -> Result<(Option<OrgProfile>, Vec<MembershipRecord>), StoreError> {
        let mut conn = self.reader().await?;
        let profile = profile_in(&mut *conn, project, org_id).await?;
        let members = query(
            "SELECT org_id, user_id, role, joined_via, created_at FROM memberships \
             WHERE project_id = $1 AND org_id = $2 ORDER BY created_at, user_id",
        )
        .bind(arg_project(project))
        .bind(org_id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(membership_from)
        .collect::<Result<Vec<_>, _>>()?;
        Ok((profile, members))
    }

    async fn remove_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
        policy: &GrowthPolicy,
        now: DateTime<Utc>,
    ) -> Result<Ruled<GrowthCommit<Option<MembershipRecord>>>, StoreError> {
        let mut tx = self.begin().await?;
        // The org row's lock serialises membership changes of the org.
        let before = tx.load_org(project, org_id, now).await?;
        let Some(membership) = membership_in(&mut *tx, project, org_id, user_id).await? else {
            return Ok(Ok(GrowthCommit {
                reply: None,
                orgs: vec![Arc::new(before)],
            }));
        };
        if let Some(profile) = profile_in(&mut *tx, project, org_id).await? {
            if profile.owner_user_id.as_deref() == Some(user_id) {
                return rules(DomainError::new(
                    ErrorKind::Conflict,
                    "cannot_remove_owner",
                    "the org's owner cannot be removed",
                ));
            }
        }
        query("DELETE FROM memberships WHERE project_id = $1 AND org_id = $2 AND user_id = $3")
            .bind(arg_project(project))
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        // The association `group` events made goes too, so flag
        // enrichment stops naming the org for this user.
        query("DELETE FROM org_members WHERE project_id = $1 AND org_id = $2 AND distinct_id = $3")
            .bind(arg_project(project))
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let after =
            flywheel_domain::growth::seats::give_back_seat(policy.seat_rules(), &before, now);
        let state = tx.save_org(project, &before, after).await?;
        billing_effects(
            &mut *tx,
            project,
            &policy.billing,
            &[(&before, &state)],
            now,
        )
        .await?;
        let message = OutboxMessage {
            event_type: "membership.removed".into(),
            data: serde_json::json!({
                "org_id": org_id,
                "user_id": user_id,
                "role": &membership.role,
            }),
        };
        enqueue(&mut *tx, project, &[message], now).await?;
        tx.commit().await?;
        Ok(Ok(GrowthCommit {
            reply: Some(membership),
            orgs: vec![Arc::new(state)],
        }))
    }

    async fn is_member(
        &self,
        project: ProjectId,
        org_id: &str,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.reader().await?;
        Ok(membership_in(&mut *conn, project, org_id, user_id)
            .await?
            .is_some())
    }

    async fn user_profile(
        &self,
        project: ProjectId,
        user_id: &str,
    ) -> Result<Option<flywheel_domain::enrichment::UserProfile>, StoreError> {
        let mut conn = self.reader().await?;
        let mut profile = flywheel_domain::enrichment::UserProfile {
            user_id: user_id.to_owned(),
            ..Default::default()
        };
        if let Some(user) = user_in(&mut *conn, project, user_id).await? {
            profile.signed_up_at = Some(user.created_at);
            profile.acquisition_source =
                Some(user.attribution.acquisition_source.as_str().to_owned());
        }
        let rows = query(
            "SELECT org_id FROM memberships WHERE project_id = $1 AND user_id = $2 \
             ORDER BY created_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            profile.org_ids.push(row.try_get("org_id")?);
        }
        let rows = query(
            "SELECT org_id FROM org_members WHERE project_id = $1 AND distinct_id = $2 \
             ORDER BY joined_at, org_id",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let org: String = row.try_get("org_id")?;
            if !profile.org_ids.contains(&org) {
                profile.org_ids.push(org);
            }
        }
        let traits =
            query("SELECT traits FROM person_traits WHERE project_id = $1 AND distinct_id = $2")
                .bind(arg_project(project))
                .bind(user_id)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(row) = traits {
            if let serde_json::Value::Object(traits) = read_json(&row, "traits")? {
                profile.traits = traits;
            }
        }
        let rows = query(
            "SELECT rule, activation FROM milestones WHERE project_id = $1 AND \
             ((scope = 'user' AND subject_id = $2) OR (scope = 'org' AND subject_id = $3)) \
             ORDER BY reached_at, rule",
        )
        .bind(arg_project(project))
        .bind(user_id)
        .bind(profile.org_ids.first().map_or("", String::as_str))
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            profile.activated |= row.try_get::<bool, _>("activation")?;
            profile.milestones.push(row.try_get("rule")?);
        }
        Ok((!profile.is_empty()).then_some(profile))
    }

    async fn put_org_template(
        &self,
        project: ProjectId,
        document: &serde_json::Value,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin().await?;
        let latest: Option<i64> =
            query_scalar("SELECT MAX(version) FROM org_templates WHERE project_id = $1")
                .bind(arg_project(project))
                .fetch_one(&mut *tx)
                .await?;
        let version = latest.unwrap_or(0) + 1;
        query(
            "INSERT INTO org_templates (project_id, version, document, actor, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(arg_project(project))
        .bind(version)
        .bind(arg_json(document))
        .bind(actor)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "org_template"))?;
        tx.commit().await?;
        Ok(version)
    }

    async fn org_template(
        &self,
        project: ProjectId,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row = query(
            "SELECT version, document FROM org_templates WHERE project_id = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(arg_project(project))
        .fetch_optional(&mut *self.reader().await?)
        .await?;
        row.map(|row| Ok((row.try_get("version")?, read_json(&row, "document")?)))
            .transpose()
    }
}
