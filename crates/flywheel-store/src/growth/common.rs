//! What the growth areas share: row readers, column lists and small helpers.

use super::*;
use crate::sql::*;
use crate::*;
use flywheel_domain::growth::model::{
    Invitation, InvitationStatus, InviteLink, ShareAudience, ShareLink, SharePermission,
};
use flywheel_domain::DomainError;

pub(crate) type Conn = dyn WriteConn;

pub(crate) fn rules<T>(error: DomainError) -> Result<Ruled<T>, StoreError> {
    Ok(Err(error))
}

pub(crate) fn parse_enum<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(StoreError::internal)
}

pub(crate) fn user_from(row: &Row) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        email_verified: row.try_get("email_verified")?,
        name: row.try_get("name")?,
        attribution: serde_json::from_value(read_json(row, "attribution")?)
            .map_err(StoreError::internal)?,
        referral_code: row.try_get("referral_code")?,
        created_at: read_time(row, "created_at")?,
    })
}

pub(crate) const USER_COLUMNS: &str =
    "user_id, email, email_verified, name, attribution, referral_code, created_at";

pub(crate) fn membership_from(row: &Row) -> Result<MembershipRecord, StoreError> {
    Ok(MembershipRecord {
        org_id: row.try_get("org_id")?,
        user_id: row.try_get("user_id")?,
        role: row.try_get("role")?,
        joined_via: row.try_get("joined_via")?,
        created_at: read_time(row, "created_at")?,
    })
}

pub(crate) fn profile_from(row: &Row) -> Result<OrgProfile, StoreError> {
    Ok(OrgProfile {
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        owner_user_id: row.try_get("owner_user_id")?,
        template_version: row.try_get("template_version")?,
        created_at: read_time(row, "created_at")?,
    })
}

pub(crate) const INVITATION_COLUMNS: &str =
    "id, org_id, email, role, inviter_user_id, token_prefix, status, \
     created_at, expires_at, sends, accepted_by_user_id, responded_at";

pub(crate) fn invitation_from(row: &Row) -> Result<Invitation, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Invitation {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        email: row.try_get("email")?,
        role: row.try_get("role")?,
        inviter_user_id: row.try_get("inviter_user_id")?,
        token_prefix: row.try_get("token_prefix")?,
        status: InvitationStatus::parse(&status).ok_or_else(|| {
            StoreError::internal(sqlx::Error::Protocol(format!(
                "unknown invitation status {status}"
            )))
        })?,
        created_at: read_time(row, "created_at")?,
        expires_at: read_time(row, "expires_at")?,
        sends: row.try_get("sends")?,
        accepted_by_user_id: row.try_get("accepted_by_user_id")?,
        responded_at: read_opt_time(row, "responded_at")?,
    })
}

pub(crate) const LINK_COLUMNS: &str =
    "id, org_id, role, created_by_user_id, token_prefix, created_at, \
     expires_at, max_uses, uses, revoked_at";

pub(crate) fn invite_link_from(row: &Row) -> Result<InviteLink, StoreError> {
    Ok(InviteLink {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        role: row.try_get("role")?,
        created_by_user_id: row.try_get("created_by_user_id")?,
        token_prefix: row.try_get("token_prefix")?,
        created_at: read_time(row, "created_at")?,
        expires_at: read_opt_time(row, "expires_at")?,
        max_uses: row.try_get("max_uses")?,
        uses: row.try_get("uses")?,
        revoked_at: read_opt_time(row, "revoked_at")?,
    })
}

pub(crate) const SHARE_COLUMNS: &str =
    "id, resource_type, resource_id, org_id, created_by_user_id, \
     permission, audience, allow_list, expires_at, password_hash, token_prefix, created_at, \
     revoked_at, accesses, unique_guests, first_access_at, last_access_at";

pub(crate) fn share_link_from(row: &Row) -> Result<ShareLinkSecret, StoreError> {
    let permission: String = row.try_get("permission")?;
    let audience: String = row.try_get("audience")?;
    let password_hash: Option<String> = row.try_get("password_hash")?;
    Ok(ShareLinkSecret {
        link: ShareLink {
            id: row.try_get("id")?,
            resource_type: row.try_get("resource_type")?,
            resource_id: row.try_get("resource_id")?,
            org_id: row.try_get("org_id")?,
            created_by_user_id: row.try_get("created_by_user_id")?,
            permission: parse_enum::<SharePermission>(&permission)?,
            audience: parse_enum::<ShareAudience>(&audience)?,
            allow_list: serde_json::from_value(read_json(row, "allow_list")?)
                .map_err(StoreError::internal)?,
            expires_at: read_opt_time(row, "expires_at")?,
            password_protected: password_hash.is_some(),
            token_prefix: row.try_get("token_prefix")?,
            created_at: read_time(row, "created_at")?,
            revoked_at: read_opt_time(row, "revoked_at")?,
            accesses: row.try_get("accesses")?,
            unique_guests: row.try_get("unique_guests")?,
            first_access_at: read_opt_time(row, "first_access_at")?,
            last_access_at: read_opt_time(row, "last_access_at")?,
        },
        password_hash,
    })
}

pub(crate) fn endpoint_from(row: &Row) -> Result<WebhookEndpoint, StoreError> {
    Ok(WebhookEndpoint {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        event_types: serde_json::from_value(read_json(row, "event_types")?)
            .map_err(StoreError::internal)?,
        description: row.try_get("description")?,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: read_opt_time(row, "failing_since")?,
        created_at: read_time(row, "created_at")?,
    })
}

pub(crate) const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.endpoint_id, o.event_type, d.status, \
     d.attempts, d.next_attempt_at, d.last_attempt_at, d.last_status_code, d.last_error, d.created_at";

pub(crate) fn delivery_from(row: &Row) -> Result<DeliveryRecord, StoreError> {
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        endpoint_id: row.try_get("endpoint_id")?,
        event_type: row.try_get("event_type")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: read_time(row, "next_attempt_at")?,
        last_attempt_at: read_opt_time(row, "last_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: read_time(row, "created_at")?,
    })
}
