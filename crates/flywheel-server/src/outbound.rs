//! Delivery of what the outbox holds: webhooks (Standard Webhooks) and email
//! (SMTP). Both are background loops over the store: claim what is due (the
//! claim is a lease, so a crash mid-delivery only delays a message), send,
//! record the outcome, schedule a retry with backoff.
//!
//! Delivery is at least once: a receiver dedupes on `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flywheel_domain::clock::SharedClock;
use flywheel_domain::growth::webhook_signature::{sign, WebhookSecret};
use flywheel_store::growth::{ClaimedDelivery, ClaimedEmail, DeliveryAttempt};
use flywheel_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::settings::{SmtpSettings, WebhookSettings};

/// Delay before each retry of a webhook delivery: 5 s, 30 s, 2 min, 10 min,
/// 30 min, 1 h, 3 h, 6 h, 12 h, 24 h, 24 h: about 3 days in all, after which
/// the delivery is `failed` (it can still be replayed).
pub const WEBHOOK_RETRY_DELAYS_SECS: &[i64] = &[
    5,
    30,
    120,
    600,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    24 * 3600,
    24 * 3600,
];

/// Delay before each retry of an email: 30 s, 2 min, 10 min, 1 h, 6 h.
pub const EMAIL_RETRY_DELAYS_SECS: &[i64] = &[30, 120, 600, 3600, 6 * 3600];

/// How long a claimed email stays leased to the node sending it.
const LEASE_SECS: i64 = 60;

/// How long a claimed webhook delivery stays leased: comfortably longer
/// than one attempt (all claimed deliveries are sent at once, each bounded
/// by the request timeout), so only a dead node's deliveries come due again.
fn webhook_lease(settings: &WebhookSettings) -> chrono::Duration {
    chrono::Duration::seconds((settings.request_timeout_secs.max(1) as i64 * 3).max(3))
}

/// When to retry after `attempts` failed attempts (`None`: give up).
pub fn next_retry(
    delays: &[i64],
    attempts_so_far: i64,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    usize::try_from(attempts_so_far)
        .ok()
        .and_then(|index| delays.get(index))
        .map(|secs| now + chrono::Duration::seconds(*secs))
}

/// Wakes the delivery loops when a transaction wrote to the outbox, so a
/// webhook leaves within milliseconds instead of at the next poll.
#[derive(Debug, Default)]
pub struct OutboxSignal {
    webhooks: Notify,
    emails: Notify,
    /// The live hub: live messages are written beside outbox messages.
    live: Notify,
}

impl OutboxSignal {
    pub fn wake(&self) {
        self.webhooks.notify_one();
        self.emails.notify_one();
        self.live.notify_one();
    }

    /// Resolves at the next `wake` (or at once if one came since the last).
    pub async fn live_notified(&self) {
        self.live.notified().await
    }
}

/// How often finished outbound work is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes finished outbound work older than the retention (at least a
/// day, so nothing a retry could still want is deleted).
pub async fn prune(store: &dyn Store, now: chrono::DateTime<chrono::Utc>, retention_days: i64) {
    let cutoff = now - chrono::Duration::days(retention_days.max(1));
    match store.prune_outbound(cutoff).await {
        Ok(pruned) if pruned != Default::default() => tracing::info!(
            messages = pruned.messages,
            deliveries = pruned.deliveries,
            emails = pruned.emails,
            signup_keys = pruned.signup_keys,
            "pruned finished outbound work older than {retention_days} days"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot prune finished outbound work"),
    }
    match store.prune_live(now - LIVE_RETENTION).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "pruned live messages past the resume window"),
        Err(error) => tracing::warn!(%error, "cannot prune live messages"),
    }
}

/// How long live messages stay for streams that reconnect (`Last-Event-ID`):
/// well past the 5 minutes a stream is promised to resume across.
pub const LIVE_RETENTION: chrono::Duration = chrono::Duration::hours(1);

/// Sends due webhook deliveries until `stop` is cancelled.
pub async fn run_webhooks(
    store: Arc<dyn Store>,
    clock: SharedClock,
    settings: WebhookSettings,
    signal: Arc<OutboxSignal>,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(settings.request_timeout_secs.max(1)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("flywheel-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook HTTP client; webhooks are not delivered");
            return;
        }
    };
    let poll = Duration::from_millis(settings.poll_interval_ms.max(10));
    let limit = settings.concurrency.clamp(1, 256) as u32;
    let mut next_prune = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_prune {
            next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
            prune(store.as_ref(), clock.now(), settings.retention_days).await;
        }
        // Read after pruning, so a slow prune cannot shorten the lease.
        let now = clock.now();
        let claimed = match store
            .claim_deliveries(now, now + webhook_lease(&settings), limit)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "cannot claim webhook deliveries");
                Vec::new()
            }
        };
        let busy = claimed.len() as u32 == limit;
        let sends = claimed
            .into_iter()
            .map(|delivery| deliver(&client, store.as_ref(), &clock, &settings, delivery));
        futures_util::future::join_all(sends).await;
        if busy {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = signal.webhooks.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

async fn deliver(
    client: &reqwest::Client,
    store: &dyn Store,
    clock: &SharedClock,
    settings: &WebhookSettings,
    delivery: ClaimedDelivery,
) {
    let body = delivery.payload.to_string();
    let outcome = match WebhookSecret::parse(&delivery.secret) {
        Ok(secret) => {
            let timestamp = clock.now().timestamp();
            let signature = sign(&secret, &delivery.message_id, timestamp, body.as_bytes());
            client
                .post(&delivery.url)
                .header("content-type", "application/json")
                .header("webhook-id", &delivery.message_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .map_err(|error| (None, error.without_url().to_string()))
                .and_then(|response| {
                    let status = response.status();
                    if status.is_success() {
                        Ok(i64::from(status.as_u16()))
                    } else {
                        Err((
                            Some(i64::from(status.as_u16())),
                            format!("the endpoint answered {status}"),
                        ))
                    }
                })
        }
        Err(error) => Err((None, error.message)),
    };
    let at = clock.now();
    let attempt = match outcome {
        Ok(code) => DeliveryAttempt {
            id: delivery.id.clone(),
            project: delivery.project,
            endpoint_id: delivery.endpoint_id.clone(),
            at,
            status_code: Some(code),
            error: None,
            retry: None,
            disable_endpoint: None,
        },
        Err((code, error)) => {
            let failing_since = delivery.failing_since.unwrap_or(at);
            let disable =
                at - failing_since >= chrono::Duration::hours(settings.disable_after_hours.max(1));
            metrics::counter!("flywheel_webhook_failures_total").increment(1);
            if disable {
                tracing::warn!(endpoint = %delivery.endpoint_id, since = %failing_since, "disabling a webhook endpoint that has failed for too long");
            }
            DeliveryAttempt {
                id: delivery.id.clone(),
                project: delivery.project,
                endpoint_id: delivery.endpoint_id.clone(),
                at,
                status_code: code,
                error: Some(error),
                retry: Some(next_retry(WEBHOOK_RETRY_DELAYS_SECS, delivery.attempts, at)),
                disable_endpoint: disable.then(|| {
                    format!(
                        "every delivery failed for {} hours",
                        settings.disable_after_hours
                    )
                }),
            }
        }
    };
    metrics::counter!("flywheel_webhook_attempts_total").increment(1);
    if let Err(error) = store.finish_delivery(&attempt).await {
        // The lease expires and the delivery is retried: at least once.
        tracing::warn!(%error, delivery = %delivery.id, "cannot record a webhook attempt");
    }
}

/// Sends due emails over SMTP until `stop` is cancelled. Does nothing
/// without `smtp.url`.
pub async fn run_emails(
    store: Arc<dyn Store>,
    clock: SharedClock,
    settings: SmtpSettings,
    signal: Arc<OutboxSignal>,
    stop: CancellationToken,
) {
    use lettre::AsyncTransport;
    let Some(url) = settings.url.clone() else {
        return;
    };
    let transport = match lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&url) {
        Ok(builder) => builder.build(),
        Err(error) => {
            tracing::error!(%error, "smtp.url is not a valid SMTP URL; email is not sent");
            return;
        }
    };
    let from: lettre::message::Mailbox = match settings.from.parse() {
        Ok(from) => from,
        Err(error) => {
            tracing::error!(%error, "smtp.from is not a valid mailbox; email is not sent");
            return;
        }
    };
    let poll = Duration::from_millis(settings.poll_interval_ms.max(10));
    loop {
        let now = clock.now();
        let claimed = match store
            .claim_emails(now, now + chrono::Duration::seconds(LEASE_SECS), 32)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "cannot claim emails");
                Vec::new()
            }
        };
        let busy = claimed.len() == 32;
        for email in claimed {
            let result = match build_message(&from, &email) {
                Ok(message) => transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            let at = clock.now();
            let (error, retry) = match &result {
                Ok(()) => (None, None),
                Err(error) => (
                    Some(error.as_str()),
                    Some(next_retry(EMAIL_RETRY_DELAYS_SECS, email.attempts, at)),
                ),
            };
            metrics::counter!("flywheel_emails_total", "outcome" => if result.is_ok() { "sent" } else { "failed" }).increment(1);
            if let Err(error) = store.finish_email(&email.id, at, error, retry).await {
                tracing::warn!(%error, email = %email.id, "cannot record an email attempt");
            }
        }
        if busy {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = signal.emails.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

fn build_message(
    from: &lettre::message::Mailbox,
    email: &ClaimedEmail,
) -> Result<lettre::Message, String> {
    use lettre::message::{MultiPart, SinglePart};
    let to: lettre::message::Mailbox = email
        .recipient
        .parse()
        .map_err(|error: lettre::address::AddressError| error.to_string())?;
    let builder = lettre::Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone());
    let message = match &email.html_body {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(
            email.text_body.clone(),
            html.clone(),
        )),
        None => builder.singlepart(SinglePart::plain(email.text_body.clone())),
    };
    message.map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retries_follow_the_schedule_then_stop_after_about_three_days() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            next_retry(WEBHOOK_RETRY_DELAYS_SECS, 0, now),
            Some(now + chrono::Duration::seconds(5))
        );
        assert_eq!(
            next_retry(WEBHOOK_RETRY_DELAYS_SECS, 10, now),
            Some(now + chrono::Duration::hours(24))
        );
        assert_eq!(next_retry(WEBHOOK_RETRY_DELAYS_SECS, 11, now), None);
        let total: i64 = WEBHOOK_RETRY_DELAYS_SECS.iter().sum();
        assert!(
            (chrono::Duration::days(3) - chrono::Duration::seconds(total))
                .num_hours()
                .abs()
                < 6,
            "retries span about 3 days, not {total} s"
        );
        assert_eq!(next_retry(EMAIL_RETRY_DELAYS_SECS, -1, now), None);
    }

    #[test]
    fn messages_carry_both_bodies_when_html_is_given() {
        let from: lettre::message::Mailbox = "Flywheel <no-reply@example.com>".parse().unwrap();
        let mut email = ClaimedEmail {
            id: "e".into(),
            project: flywheel_domain::project::ProjectId(uuid::Uuid::nil()),
            kind: "invitation".into(),
            recipient: "bob@example.com".into(),
            subject: "Join us".into(),
            text_body: "plain".into(),
            html_body: Some("<p>html</p>".into()),
            attempts: 0,
        };
        let formatted =
            String::from_utf8(build_message(&from, &email).unwrap().formatted()).unwrap();
        assert!(formatted.contains("multipart/alternative"));
        assert!(formatted.contains("Subject: Join us"));
        email.recipient = "not an address".into();
        assert!(build_message(&from, &email).is_err());
    }
}
