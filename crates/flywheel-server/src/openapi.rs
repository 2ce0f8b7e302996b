//! The OpenAPI 3.1 document, generated from the handlers' annotations. It is
//! committed as `openapi.json` at the repository root; a test and CI fail
//! when the committed copy differs from what the code generates.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flywheel",
        description = "Self-hosted product-led-growth engine: events, flags, entitlements, growth graph.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        routes::health::healthz,
        routes::health::readyz,
        routes::health::metrics,
        routes::health::openapi,
        routes::project::current_project,
        routes::keys::list_keys,
        routes::keys::create_key,
        routes::keys::revoke_key,
        routes::events::native,
        routes::events::list_events,
        routes::events::tail_events,
        routes::events::segment_batch,
        routes::events::segment_single,
        routes::events::posthog,
        routes::privacy::get_settings,
        routes::privacy::put_settings,
        routes::privacy::list_schemas,
        routes::privacy::put_schema,
        routes::privacy::delete_schema,
        routes::privacy::list_violations,
        routes::privacy::delete_user,
        routes::flags::list_flags,
        routes::flags::create_flag,
        routes::flags::get_flag,
        routes::flags::put_flag,
        routes::flags::delete_flag,
        routes::flags::flag_versions,
        routes::flags::restore_flag,
        routes::flags::export_document,
        routes::flags::import_document,
        routes::flags::snapshot,
        routes::flags::stream,
        routes::ofrep::evaluate_flag,
        routes::ofrep::evaluate_flags,
        routes::billing::get_catalog,
        routes::billing::put_catalog,
        routes::billing::catalog_versions,
        routes::billing::check,
        routes::billing::consume,
        routes::billing::release,
        routes::billing::entitlements,
        routes::billing::get_subscription,
        routes::billing::change_subscription,
        routes::billing::cancel_subscription,
        routes::billing::set_status,
        routes::billing::add_grant,
        routes::billing::list_grants,
        routes::billing::put_override,
        routes::billing::delete_override,
        routes::stripe::webhook,
        routes::stripe::checkout,
        routes::stripe::billing_portal,
        routes::growth::signup,
        routes::growth::get_user,
        routes::growth::update_user,
        routes::growth::org_members,
        routes::growth::remove_member,
        routes::growth::create_invitations,
        routes::growth::list_invitations,
        routes::growth::revoke_invitation,
        routes::growth::resend_invitation,
        routes::growth::lookup_invitation,
        routes::growth::accept_invitation,
        routes::growth::decline_invitation,
        routes::growth::create_invite_link,
        routes::growth::list_invite_links,
        routes::growth::revoke_invite_link,
        routes::growth::lookup_invite_link,
        routes::growth::join_invite_link,
        routes::growth::create_share_link,
        routes::growth::list_share_links,
        routes::growth::get_share_link,
        routes::growth::update_share_link,
        routes::growth::revoke_share_link,
        routes::growth::resolve_share_link,
        routes::growth::verify_guest,
        routes::growth::referral_code,
        routes::growth::referral_click,
        routes::growth::referral_events,
        routes::growth::get_org_template,
        routes::growth::put_org_template,
        routes::growth::list_email_templates,
        routes::growth::put_email_template,
        routes::growth::list_emails,
        routes::webhooks::create_endpoint,
        routes::webhooks::list_endpoints,
        routes::webhooks::delete_endpoint,
        routes::webhooks::enable_endpoint,
        routes::webhooks::disable_endpoint,
        routes::webhooks::list_deliveries,
        routes::webhooks::replay_delivery,
        routes::activation::get_activation_rules,
        routes::activation::put_activation_rules,
        routes::activation::user_milestones,
        routes::activation::org_milestones,
        routes::prompts::get_prompt_rules,
        routes::prompts::put_prompt_rules,
        routes::prompts::list_prompts,
        routes::prompts::prompt_stats,
        routes::prompts::get_prompt,
        routes::prompts::prompt_event,
        routes::prompts::decide,
        routes::prompts::stream,
        routes::prompts::identity_secret_view,
    ),
    components(schemas(
        crate::error::ErrorEnvelope,
        crate::error::ErrorBody,
        flywheel_domain::events::EventType,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Health, readiness, metrics, contract"),
        (name = "projects", description = "The calling key's project"),
        (name = "keys", description = "API key management (secret keys)"),
        (name = "events", description = "Event ingestion (native, Segment, PostHog) and inspection"),
        (name = "privacy", description = "Consent, IP and PII settings, event schemas, deleting a person"),
        (name = "flags", description = "Feature flags in flagd's format: admin, versions, snapshot, live stream"),
        (name = "ofrep", description = "OpenFeature Remote Evaluation Protocol"),
        (name = "growth", description = "Signup and attribution, members, invitations, invite links, share links and guests, referrals, org and email templates"),
        (name = "webhooks", description = "Outbound webhook endpoints (Standard Webhooks) and their deliveries"),
        (name = "billing", description = "Plans, entitlements and usage: catalog, check, consume, release, subscriptions, grants, overrides"),
        (name = "activation", description = "Activation rules and the milestones they record when events commit"),
        (name = "prompts", description = "Upgrade prompts fired by milestones and usage, the per-user live stream, decide"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("pk_… (publishable) or sk_… (secret)")
                    .build(),
            ),
        );
    }
}

/// The document as pretty JSON with a trailing newline, exactly as committed.
pub fn document_json() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}
