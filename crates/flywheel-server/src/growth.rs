//! What the growth routes share: the installation's keys (token hashing,
//! guest-token signing), the growth policy of a request, email rendering
//! from project templates, and the per-IP limit on share-link resolves.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use flywheel_domain::snapshot::Principal;
use flywheel_store::growth::{EmailTemplate, GrowthPolicy, RenderedEmail};
use flywheel_store::{Billing, Store};
use rand::RngCore;

use crate::error::ApiError;
use crate::settings::{BillingSettings, GrowthSettings};

/// Keys this installation generated once and keeps in the store, so every
/// node (and every restart) hashes tokens and signs guest tokens alike.
#[derive(Clone)]
pub struct GrowthKeys {
    pub token_key: Arc<[u8]>,
    pub guest_key: Arc<[u8]>,
}

impl std::fmt::Debug for GrowthKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrowthKeys(..)")
    }
}

impl GrowthKeys {
    pub async fn load(store: &dyn Store) -> Result<Self, flywheel_store::StoreError> {
        let fresh = || {
            let mut bytes = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let token = store.instance_secret("token_hash_key", &fresh()).await?;
        let guest = store.instance_secret("guest_token_key", &fresh()).await?;
        Ok(Self {
            token_key: token.into_bytes().into(),
            guest_key: guest.into_bytes().into(),
        })
    }
}

pub fn policy(
    growth: &GrowthSettings,
    billing: &BillingSettings,
    principal: &Principal,
) -> GrowthPolicy {
    GrowthPolicy {
        invitations: growth.invitation_policy(),
        referral_window_days: growth.referral_window_days,
        click_model: growth.referral_click_model,
        seats_feature: growth.seats_feature.clone(),
        billing: Billing::for_project(&principal.project, billing.grace()),
    }
}

/// Refuses settings the rules cannot run with, naming the setting.
pub fn check_settings(growth: &GrowthSettings) -> anyhow::Result<()> {
    flywheel_domain::growth::model::invitation_expiry(growth.invitation_expiry_days)
        .map_err(|_| anyhow::anyhow!("growth.invitation_expiry_days must be between 1 and 30"))?;
    for (name, value) in [
        (
            "growth.invitations_per_org_per_hour",
            growth.invitations_per_org_per_hour,
        ),
        (
            "growth.pending_invitations_per_inviter",
            growth.pending_invitations_per_inviter,
        ),
        ("growth.referral_window_days", growth.referral_window_days),
        ("growth.guest_token_ttl_secs", growth.guest_token_ttl_secs),
    ] {
        anyhow::ensure!(value >= 1, "{name} must be at least 1");
    }
    anyhow::ensure!(
        growth.resends_per_invitation >= 0,
        "growth.resends_per_invitation must be at least 0"
    );
    Ok(())
}

/// Puts a token into a URL template's `{token}`.
pub fn url_with_token(template: &str, token: &str) -> String {
    template.replace("{token}", token)
}

/// The kinds of email Flywheel sends, with their default templates
/// (minijinja syntax); a project replaces one with `PUT
/// /v1/email-templates/{kind}`.
pub const EMAIL_KINDS: &[&str] = &["invitation", "share"];

pub fn default_template(kind: &str) -> Option<(&'static str, &'static str, &'static str)> {
    match kind {
        "invitation" => Some((
            "{{ inviter_name or 'A teammate' }} invited you to join {{ org_name or 'their team' }}",
            "Hi,\n\n{{ inviter_name or 'A teammate' }} invited you to join {{ org_name or 'their team' }} as {{ role }}.\n\nAccept the invitation:\n{{ accept_url }}\n\nThe invitation expires on {{ expires_at }}. If you were not expecting it, ignore this email.\n",
            "<p>Hi,</p><p>{{ inviter_name or 'A teammate' }} invited you to join <strong>{{ org_name or 'their team' }}</strong> as {{ role }}.</p><p><a href=\"{{ accept_url }}\">Accept the invitation</a></p><p>The invitation expires on {{ expires_at }}. If you were not expecting it, ignore this email.</p>",
        )),
        "share" => Some((
            "{{ sharer_name or 'Someone' }} shared a {{ resource_type }} with you",
            "Hi,\n\n{{ sharer_name or 'Someone' }} shared a {{ resource_type }} with you ({{ permission }} access).\n\nOpen it:\n{{ share_url }}\n",
            "<p>Hi,</p><p>{{ sharer_name or 'Someone' }} shared a {{ resource_type }} with you ({{ permission }} access).</p><p><a href=\"{{ share_url }}\">Open it</a></p>",
        )),
        _ => None,
    }
}

/// The template that applies: the project's, else the default.
pub fn effective_template(kind: &str, stored: &[EmailTemplate]) -> Option<EmailTemplate> {
    if let Some(template) = stored.iter().find(|t| t.kind == kind) {
        return Some(template.clone());
    }
    default_template(kind).map(|(subject, text, html)| EmailTemplate {
        kind: kind.to_owned(),
        subject: subject.to_owned(),
        text_body: text.to_owned(),
        html_body: Some(html.to_owned()),
        updated_at: chrono::DateTime::UNIX_EPOCH,
    })
}

/// Renders a template with `context`. The HTML body is auto-escaped; the
/// subject and text body are not (they are not HTML).
pub fn render(
    template: &EmailTemplate,
    recipient: &str,
    context: &serde_json::Value,
) -> Result<RenderedEmail, ApiError> {
    let plain = minijinja::Environment::new();
    let mut html = minijinja::Environment::new();
    html.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    let fail = |error: minijinja::Error| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_email_template",
            format!(
                "the {} email template does not render: {error}",
                template.kind
            ),
        )
    };
    let subject = plain
        .render_str(&template.subject, context)
        .map_err(fail)?
        .replace(['\r', '\n'], " ");
    Ok(RenderedEmail {
        kind: template.kind.clone(),
        recipient: recipient.to_owned(),
        subject,
        text_body: plain
            .render_str(&template.text_body, context)
            .map_err(fail)?,
        html_body: template
            .html_body
            .as_deref()
            .map(|body| html.render_str(body, context))
            .transpose()
            .map_err(fail)?,
    })
}

/// A fixed-window count of requests per client IP per minute.
#[derive(Debug)]
pub struct IpLimiter {
    per_minute: u32,
    windows: DashMap<IpAddr, (i64, u32), foldhash::fast::RandomState>,
    /// The minute of the last sweep of old windows.
    swept: std::sync::atomic::AtomicI64,
}

impl IpLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            windows: DashMap::default(),
            swept: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Counts a request at `now_secs`; `Err(retry_after_secs)` when over.
    pub fn check(&self, ip: IpAddr, now_secs: i64) -> Result<(), u64> {
        let minute = now_secs.div_euclid(60);
        let mut entry = self.windows.entry(ip).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        if entry.1 >= self.per_minute {
            return Err((60 - now_secs.rem_euclid(60)) as u64);
        }
        entry.1 += 1;
        drop(entry);
        // Keep the map from growing without bound: past 4,096 IPs, forget
        // old windows, at most once a minute (a pass per request would make
        // a flood of distinct IPs quadratic).
        if self.windows.len() > 4096
            && self
                .swept
                .swap(minute, std::sync::atomic::Ordering::Relaxed)
                != minute
        {
            self.windows.retain(|_, (window, _)| *window == minute);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_templates_render_and_escape_html_only() {
        let template = effective_template("invitation", &[]).unwrap();
        let context = serde_json::json!({
            "inviter_name": "Ann <script>",
            "org_name": "Acme\nInc",
            "role": "member",
            "accept_url": "https://app.example/accept?token=t&x=1",
            "expires_at": "2026-01-08",
        });
        let email = render(&template, "bob@example.com", &context).unwrap();
        assert_eq!(email.subject, "Ann <script> invited you to join Acme Inc");
        assert!(email
            .text_body
            .contains("https://app.example/accept?token=t&x=1"));
        let html = email.html_body.unwrap();
        assert!(html.contains("Ann &lt;script&gt;"));
        assert!(html.contains("token=t&amp;x=1"));
        let fallback = render(&template, "b@x.io", &serde_json::json!({"role": "admin"})).unwrap();
        assert!(fallback.subject.starts_with("A teammate invited you"));
    }

    #[test]
    fn broken_templates_are_reported() {
        let mut template = effective_template("share", &[]).unwrap();
        template.text_body = "{{ unclosed".into();
        let error = render(&template, "b@x.io", &serde_json::json!({})).unwrap_err();
        assert_eq!(error.code, "invalid_email_template");
        assert!(effective_template("nope", &[]).is_none());
    }

    #[test]
    fn the_ip_limit_resets_each_minute() {
        let limiter = IpLimiter::new(2);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        assert!(limiter.check(ip, 120).is_ok());
        assert!(limiter.check(ip, 121).is_ok());
        assert_eq!(limiter.check(ip, 150), Err(30));
        assert!(limiter.check(other, 150).is_ok());
        assert!(limiter.check(ip, 180).is_ok(), "a new minute");
    }

    #[test]
    fn old_windows_are_forgotten_once_the_map_is_large() {
        let limiter = IpLimiter::new(10);
        for i in 0..5000u32 {
            limiter.check(IpAddr::from(i.to_be_bytes()), 60).unwrap();
        }
        assert_eq!(
            limiter.windows.len(),
            5000,
            "same minute: nothing to forget"
        );
        limiter.check("203.0.113.1".parse().unwrap(), 120).unwrap();
        assert_eq!(
            limiter.windows.len(),
            1,
            "a new minute sweeps the old windows"
        );
    }
}
