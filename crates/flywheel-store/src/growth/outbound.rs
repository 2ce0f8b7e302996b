//! Outbound work: the outbox, webhook endpoints and deliveries, emails, and the installation's secrets.

use super::*;
use crate::growth::common::*;
use crate::sql::*;
use crate::*;
use chrono::{DateTime, Utc};
use flywheel_domain::project::ProjectId;

/// Outbound work: the outbox, webhook endpoints and deliveries, emails, and the installation's secrets.
#[async_trait::async_trait]
pub trait OutboundStore: Send + Sync {
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
    async fn replay_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DeliveryRecord>, crate::StoreError>;
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
}

pub(crate) async fn finish_delivery_in(
    conn: &mut Conn,
    attempt: &DeliveryAttempt,
) -> Result<(), StoreError> {
    let (status, next) = match attempt.retry {
        None => ("succeeded", None),
        Some(Some(at)) => ("pending", Some(at)),
        Some(None) => ("failed", None),
    };
    query(
        "UPDATE webhook_deliveries SET status = $2, attempts = attempts + 1, \
         next_attempt_at = COALESCE($3, next_attempt_at), last_attempt_at = $4, \
         last_status_code = $5, last_error = $6 WHERE id = $1",
    )
    .bind(&attempt.id)
    .bind(status)
    .bind(arg_opt_time(next))
    .bind(arg_time(attempt.at))
    .bind(attempt.status_code)
    .bind(&attempt.error)
    .execute(&mut *conn)
    .await?;
    if attempt.retry.is_none() {
        query(
            "UPDATE webhook_endpoints SET failing_since = NULL WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .execute(&mut *conn)
        .await?;
    } else {
        query(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $3) \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .bind(arg_time(attempt.at))
        .execute(&mut *conn)
        .await?;
    }
    if let Some(reason) = &attempt.disable_endpoint {
        query(
            "UPDATE webhook_endpoints SET enabled = $3, disabled_reason = $4 WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(attempt.project))
        .bind(&attempt.endpoint_id)
        .bind(false)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Writes messages to the outbox with one pending delivery per
/// enabled endpoint that wants the type.
pub(crate) async fn enqueue(
    conn: &mut Conn,
    project: ProjectId,
    messages: &[OutboxMessage],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let rows = query(
        "SELECT id, url, secret, event_types, description, enabled, disabled_reason, \
         failing_since, created_at FROM webhook_endpoints WHERE project_id = $1 AND enabled = $2",
    )
    .bind(arg_project(project))
    .bind(true)
    .fetch_all(&mut *conn)
    .await?;
    let endpoints = rows
        .iter()
        .map(endpoint_from)
        .collect::<Result<Vec<_>, _>>()?;
    for message in messages {
        let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        let payload = serde_json::json!({
            "type": message.event_type,
            "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": message.data,
        });
        query(
            "INSERT INTO outbox (id, project_id, event_type, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(arg_project(project))
        .bind(&message.event_type)
        .bind(arg_json(&payload))
        .bind(arg_time(now))
        .execute(&mut *conn)
        .await?;
        for endpoint in endpoints.iter().filter(|e| e.wants(&message.event_type)) {
            query(
                "INSERT INTO webhook_deliveries (id, project_id, message_id, endpoint_id, status, \
                 attempts, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
            )
            .bind(format!("dlv_{}", uuid::Uuid::now_v7().simple()))
            .bind(arg_project(project))
            .bind(&id)
            .bind(&endpoint.id)
            .bind(arg_time(now))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

pub(crate) async fn queue_email(
    conn: &mut Conn,
    project: ProjectId,
    email: &RenderedEmail,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO emails (id, project_id, kind, recipient, subject, text_body, html_body, \
         status, attempts, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8)",
    )
    .bind(format!("eml_{}", uuid::Uuid::now_v7().simple()))
    .bind(arg_project(project))
    .bind(&email.kind)
    .bind(&email.recipient)
    .bind(&email.subject)
    .bind(&email.text_body)
    .bind(&email.html_body)
    .bind(arg_time(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl<S: SqlBackend> OutboundStore for S {
    async fn put_email_template(
        &self,
        project: ProjectId,
        template: &EmailTemplate,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO email_templates (project_id, kind, subject, text_body, html_body, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (project_id, kind) DO UPDATE SET \
             subject = excluded.subject, text_body = excluded.text_body, \
             html_body = excluded.html_body, updated_at = excluded.updated_at",
        )
        .bind(arg_project(project))
        .bind(&template.kind)
        .bind(&template.subject)
        .bind(&template.text_body)
        .bind(&template.html_body)
        .bind(arg_time(template.updated_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn email_templates(&self, project: ProjectId) -> Result<Vec<EmailTemplate>, StoreError> {
        query(
            "SELECT kind, subject, text_body, html_body, updated_at FROM email_templates \
             WHERE project_id = $1 ORDER BY kind",
        )
        .bind(arg_project(project))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(EmailTemplate {
                kind: row.try_get("kind")?,
                subject: row.try_get("subject")?,
                text_body: row.try_get("text_body")?,
                html_body: row.try_get("html_body")?,
                updated_at: read_time(row, "updated_at")?,
            })
        })
        .collect()
    }

    async fn list_emails(
        &self,
        project: ProjectId,
        limit: u32,
    ) -> Result<Vec<EmailRecord>, StoreError> {
        query(
            "SELECT id, kind, recipient, subject, status, attempts, last_error, created_at, sent_at \
             FROM emails WHERE project_id = $1 ORDER BY created_at DESC, id LIMIT $2",
        )
        .bind(arg_project(project))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(EmailRecord {
                id: row.try_get("id")?,
                kind: row.try_get("kind")?,
                recipient: row.try_get("recipient")?,
                subject: row.try_get("subject")?,
                status: row.try_get("status")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                created_at: read_time(row, "created_at")?,
                sent_at: read_opt_time(row, "sent_at")?,
            })
        })
        .collect()
    }

    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedEmail>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT id FROM emails WHERE status = 'pending' AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $2{}",
            tx.backend().skip_locked()
        );
        let ids: Vec<String> = query_scalar(&sql)
            .bind(arg_time(now))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            let row = query(
                "UPDATE emails SET next_attempt_at = $2 WHERE id = $1 RETURNING id, project_id, kind, \
                 recipient, subject, text_body, html_body, attempts",
            )
            .bind(&id)
            .bind(arg_time(lease_until))
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(ClaimedEmail {
                id: row.try_get("id")?,
                project: read_project(&row, "project_id")?,
                kind: row.try_get("kind")?,
                recipient: row.try_get("recipient")?,
                subject: row.try_get("subject")?,
                text_body: row
                    .try_get::<Option<String>, _>("text_body")?
                    .unwrap_or_default(),
                html_body: row.try_get("html_body")?,
                attempts: row.try_get("attempts")?,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish_email(
        &self,
        id: &str,
        at: DateTime<Utc>,
        error: Option<&str>,
        retry_at: Option<Option<DateTime<Utc>>>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        match retry_at {
            None => {
                // Sent: drop the bodies (they may hold a token link).
                query(
                    "UPDATE emails SET status = 'sent', attempts = attempts + 1, sent_at = $2, \
                     last_error = NULL, text_body = NULL, html_body = NULL WHERE id = $1",
                )
                .bind(id)
                .bind(arg_time(at))
                .execute(&mut *tx)
                .await?;
            }
            Some(Some(next)) => {
                query(
                    "UPDATE emails SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(arg_time(next))
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
            Some(None) => {
                query(
                    "UPDATE emails SET status = 'failed', attempts = attempts + 1, last_error = $2, \
                     text_body = NULL, html_body = NULL WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_webhook_endpoint(
        &self,
        project: ProjectId,
        endpoint: &WebhookEndpoint,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        query(
            "INSERT INTO webhook_endpoints (project_id, id, url, secret, event_types, description, \
             enabled, disabled_reason, failing_since, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, $8)",
        )
        .bind(arg_project(project))
        .bind(&endpoint.id)
        .bind(&endpoint.url)
        .bind(&endpoint.secret)
        .bind(arg_json(&serde_json::to_value(&endpoint.event_types).map_err(StoreError::internal)?))
        .bind(&endpoint.description)
        .bind(endpoint.enabled)
        .bind(arg_time(endpoint.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_webhook_endpoints(
        &self,
        project: ProjectId,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        query(
            "SELECT id, url, secret, event_types, description, enabled, disabled_reason, failing_since, \
             created_at FROM webhook_endpoints WHERE project_id = $1 ORDER BY created_at, id",
        )
        .bind(arg_project(project))
        .fetch_all(&mut *self.reader().await?)
        .await?
        .iter()
        .map(endpoint_from)
        .collect()
    }

    async fn delete_webhook_endpoint(
        &self,
        project: ProjectId,
        id: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let deleted = query("DELETE FROM webhook_endpoints WHERE project_id = $1 AND id = $2")
            .bind(arg_project(project))
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        // Its undelivered messages have nowhere to go.
        query(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = 'endpoint deleted' \
             WHERE project_id = $1 AND endpoint_id = $2 AND status = 'pending'",
        )
        .bind(arg_project(project))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn set_webhook_endpoint_enabled(
        &self,
        project: ProjectId,
        id: &str,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE webhook_endpoints SET enabled = $3, disabled_reason = $4, \
             failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(enabled)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let endpoint = query(
            "SELECT id, url, secret, event_types, description, enabled, disabled_reason, failing_since, \
             created_at FROM webhook_endpoints WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(endpoint_from)
        .transpose()?;
        tx.commit().await?;
        Ok(endpoint)
    }

    async fn enqueue_messages(
        &self,
        project: ProjectId,
        messages: &[OutboxMessage],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        enqueue(&mut *tx, project, messages, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT d.id FROM webhook_deliveries d WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
             AND EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.project_id = d.project_id \
             AND e.id = d.endpoint_id AND e.enabled = $3) ORDER BY d.next_attempt_at LIMIT $2{}",
            tx.backend().skip_locked()
        );
        let ids: Vec<String> = query_scalar(&sql)
            .bind(arg_time(now))
            .bind(i64::from(limit))
            .bind(true)
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            query("UPDATE webhook_deliveries SET next_attempt_at = $2 WHERE id = $1")
                .bind(&id)
                .bind(arg_time(lease_until))
                .execute(&mut *tx)
                .await?;
            let row = query(
                "SELECT d.id, d.project_id, d.message_id, d.endpoint_id, d.attempts, e.url, e.secret, \
                 e.failing_since, o.event_type, o.payload, o.created_at FROM webhook_deliveries d \
                 JOIN webhook_endpoints e ON e.project_id = d.project_id AND e.id = d.endpoint_id \
                 JOIN outbox o ON o.id = d.message_id WHERE d.id = $1",
            )
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(ClaimedDelivery {
                id: row.try_get("id")?,
                project: read_project(&row, "project_id")?,
                message_id: row.try_get("message_id")?,
                endpoint_id: row.try_get("endpoint_id")?,
                url: row.try_get("url")?,
                secret: row.try_get("secret")?,
                event_type: row.try_get("event_type")?,
                payload: read_json(&row, "payload")?,
                message_created_at: read_time(&row, "created_at")?,
                attempts: row.try_get("attempts")?,
                failing_since: read_opt_time(&row, "failing_since")?,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish_delivery(&self, attempt: &DeliveryAttempt) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        finish_delivery_in(&mut *tx, attempt).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_deliveries(
        &self,
        project: ProjectId,
        query: &DeliveryQuery,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox o ON o.id = d.message_id \
             WHERE d.project_id = $1 AND ($2 IS NULL OR d.endpoint_id = $2) \
             AND ($3 IS NULL OR d.status = $3) AND ($4 IS NULL OR d.message_id = $4) \
             ORDER BY d.created_at DESC, d.id LIMIT $5"
        );
        crate::sql::query(&sql)
            .bind(arg_project(project))
            .bind(&query.endpoint_id)
            .bind(&query.status)
            .bind(&query.message_id)
            .bind(i64::from(query.limit))
            .fetch_all(&mut *self.reader().await?)
            .await?
            .iter()
            .map(delivery_from)
            .collect()
    }

    async fn replay_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let mut tx = self.begin().await?;
        query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3 \
             WHERE project_id = $1 AND id = $2",
        )
        .bind(arg_project(project))
        .bind(id)
        .bind(arg_time(now))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN outbox o ON o.id = d.message_id \
             WHERE d.project_id = $1 AND d.id = $2"
        );
        let record = query(&sql)
            .bind(arg_project(project))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(delivery_from)
            .transpose()?;
        tx.commit().await?;
        Ok(record)
    }

    async fn prune_outbound(
        &self,
        older_than: DateTime<Utc>,
    ) -> Result<PrunedOutbound, StoreError> {
        let mut tx = self.begin().await?;
        let deliveries = query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND message_id IN (\
             SELECT id FROM outbox WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM webhook_deliveries pending WHERE pending.message_id = outbox.id \
             AND pending.status = 'pending'))",
        )
        .bind(arg_time(older_than))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let messages = query(
            "DELETE FROM outbox WHERE created_at < $1 AND NOT EXISTS (\
             SELECT 1 FROM webhook_deliveries d WHERE d.message_id = outbox.id)",
        )
        .bind(arg_time(older_than))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let emails = query("DELETE FROM emails WHERE created_at < $1 AND status <> 'pending'")
            .bind(arg_time(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let signup_keys = query("DELETE FROM growth_requests WHERE created_at < $1")
            .bind(arg_time(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(PrunedOutbound {
            messages,
            deliveries,
            emails,
            signup_keys,
        })
    }

    async fn instance_secret(&self, name: &str, candidate: &str) -> Result<String, StoreError> {
        let mut tx = self.begin().await?;
        query("INSERT INTO instance_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&mut *tx)
            .await?;
        let value: String = query_scalar("SELECT value FROM instance_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(value)
    }
}
