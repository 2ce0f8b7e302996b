//! The Stripe webhook through the real server on both backends, with events
//! signed here the way Stripe signs them: applied, replayed, reordered,
//! tampered with, stale, unmatched and ignored, each with its documented
//! outcome.

mod common;

use std::sync::Arc;

use flywheel_client::Client;
use flywheel_domain::billing::stripe::sign;
use flywheel_domain::clock::{ManualClock, SharedClock};
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::call;

flywheel_store::for_each_backend!(
    signed_subscription_events_apply_once_and_in_order,
    bad_signatures_are_refused_and_change_nothing,
    invoices_and_checkout_find_the_org_by_customer,
    checkout_and_the_billing_portal_call_stripe,
    a_trial_prompts_the_org_owner_with_its_end_date,
);

const SECRET: &str = "whsec_test_flywheel";
const NOW: &str = "2027-03-10T12:00:00Z";

struct App {
    _server: RunningServer,
    _db: TestDatabase,
    client: Client,
    secret: Client,
    clock: ManualClock,
}

async fn spawn(backend: Backend, secrets: Vec<String>) -> App {
    let db = TestDatabase::create(backend).await;
    let clock = ManualClock::new(NOW.parse().unwrap());
    let mut settings = common::test_settings(&db);
    settings.stripe.webhook_secrets = secrets;
    let shared: SharedClock = Arc::new(clock.clone());
    let started = common::start(settings, shared).await;
    let (status, body) = call(
        &started.secret,
        Method::PUT,
        "/v1/catalog",
        Some(json!({
            "features": [{"key": "sso", "kind": "boolean"}, {"key": "seats", "kind": "metered"}],
            "plans": [
                {"key": "free", "default": true, "features": {"seats": {"limit": 2, "reset": "never"}}},
                {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "stripe_price_ids": ["price_pro_monthly"],
                 "features": {"sso": {}, "seats": {"limit": 20, "reset": "never"}}}
            ]
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    App {
        client: started.client.clone(),
        secret: started.secret,
        _server: started.server,
        _db: db,
        clock,
    }
}

fn unix(at: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(at)
        .unwrap()
        .timestamp()
}

fn event(id: &str, kind: &str, created: &str, object: Value) -> Value {
    json!({"id": id, "object": "event", "type": kind, "created": unix(created), "livemode": false,
           "api_version": "2025-03-31.basil", "data": {"object": object}})
}

/// A subscription in the current API shape (periods on the items).
fn subscription(status: &str, cancel_at_period_end: bool, org: Option<&str>) -> Value {
    let mut metadata = json!({});
    if let Some(org) = org {
        metadata["org_id"] = json!(org);
    }
    json!({
        "id": "sub_123", "object": "subscription", "customer": "cus_123", "status": status,
        "cancel_at_period_end": cancel_at_period_end, "cancel_at": null, "metadata": metadata,
        "items": {"object": "list", "data": [{
            "id": "si_1", "price": {"id": "price_pro_monthly"},
            "current_period_start": unix("2027-03-10T00:00:00Z"),
            "current_period_end": unix("2027-04-10T00:00:00Z")
        }]}
    })
}

async fn deliver(app: &App, body: &Value, secret: &str, signed_at: i64) -> (StatusCode, Value) {
    let payload = serde_json::to_vec(body).unwrap();
    deliver_raw(app, payload.clone(), sign(&payload, secret, signed_at)).await
}

async fn deliver_raw(app: &App, payload: Vec<u8>, signature: String) -> (StatusCode, Value) {
    let response = app
        .client
        .request(Method::POST, "/v1/webhooks/stripe")
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(payload)
        .send()
        .await
        .unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn sso(app: &App, org: &str) -> Value {
    call(
        &app.secret,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": org, "feature": "sso"})),
    )
    .await
    .1
}

async fn signed_subscription_events_apply_once_and_in_order(backend: Backend) {
    let app = spawn(backend, vec!["whsec_old".into(), SECRET.into()]).await;
    let now = unix(NOW);
    let created = event(
        "evt_1",
        "customer.subscription.created",
        "2027-03-10T00:00:01Z",
        subscription("active", false, Some("acme")),
    );
    let (status, ack) = deliver(&app, &created, SECRET, now).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(
        (ack["outcome"].clone(), ack["org_id"].clone()),
        (json!("applied"), json!("acme"))
    );
    let answer = sso(&app, "acme").await;
    assert_eq!(
        (answer["allowed"].clone(), answer["plan"].clone()),
        (json!(true), json!("pro"))
    );
    // Redelivered: nothing changes.
    let (_, ack) = deliver(&app, &created, SECRET, now).await;
    assert_eq!(ack["outcome"], "duplicate");
    // A newer update (cancel at period end) arrives before an older one.
    let newer = event(
        "evt_3",
        "customer.subscription.updated",
        "2027-03-10T00:00:03Z",
        subscription("active", true, Some("acme")),
    );
    let older = event(
        "evt_2",
        "customer.subscription.updated",
        "2027-03-10T00:00:02Z",
        subscription("past_due", false, Some("acme")),
    );
    assert_eq!(
        deliver(&app, &newer, SECRET, now).await.1["outcome"],
        "applied"
    );
    assert_eq!(
        deliver(&app, &older, SECRET, now).await.1["outcome"],
        "stale"
    );
    let (_, view) = call(&app.secret, Method::GET, "/v1/orgs/acme/subscription", None).await;
    assert_eq!(
        view["subscription"]["status"], "active",
        "the older past_due did not overwrite"
    );
    assert_eq!(view["scheduled"]["at"], "2027-04-10T00:00:00Z");
    assert_eq!(view["subscription"]["stripe"]["subscription_id"], "sub_123");
    // Access lasts until the period end, then the default plan.
    app.clock.set("2027-04-10T00:00:00Z".parse().unwrap());
    assert_eq!(sso(&app, "acme").await["plan"], "free");
    // Deleted: the default plan at once. (Signed at the new "now".)
    let deleted = event(
        "evt_4",
        "customer.subscription.deleted",
        "2027-04-10T00:00:05Z",
        subscription("canceled", false, Some("acme")),
    );
    let (_, ack) = deliver(&app, &deleted, SECRET, unix("2027-04-10T00:00:00Z")).await;
    assert_eq!(ack["outcome"], "applied");
    assert_eq!(sso(&app, "acme").await["allowed"], false);
    // Types Flywheel does not use are acknowledged and ignored.
    let other = event(
        "evt_5",
        "charge.refunded",
        "2027-04-10T00:00:06Z",
        json!({"id": "ch_1", "object": "charge"}),
    );
    assert_eq!(
        deliver(&app, &other, SECRET, unix("2027-04-10T00:00:00Z"))
            .await
            .1["outcome"],
        "ignored"
    );
}

async fn bad_signatures_are_refused_and_change_nothing(backend: Backend) {
    let app = spawn(backend, vec![SECRET.into()]).await;
    let now = unix(NOW);
    let body = event(
        "evt_1",
        "customer.subscription.created",
        "2027-03-10T00:00:01Z",
        subscription("active", false, Some("acme")),
    );
    let payload = serde_json::to_vec(&body).unwrap();
    // Tampered: signed one body, sent another.
    let mut tampered = body.clone();
    tampered["data"]["object"]["metadata"]["org_id"] = json!("mallory");
    let (status, answer) = deliver_raw(
        &app,
        serde_json::to_vec(&tampered).unwrap(),
        sign(&payload, SECRET, now),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_signature"))
    );
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("signature_mismatch"));
    // Wrong secret.
    let (status, _) = deliver(&app, &body, "whsec_other", now).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Older than the 300 s tolerance.
    let (status, answer) = deliver(&app, &body, SECRET, now - 301).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("timestamp_outside_tolerance"));
    // No header at all.
    let response = app
        .client
        .request(Method::POST, "/v1/webhooks/stripe")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "missing_signature");
    // Nothing was applied by any of them.
    assert_eq!(sso(&app, "acme").await["plan"], "free");
    assert_eq!(sso(&app, "mallory").await["plan"], "free");
    // A signed body that is not an event.
    let junk = json!({"hello": "world"});
    let (status, answer) = deliver(&app, &junk, SECRET, now).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_stripe_event"))
    );
    // The genuine one, 299 s old, is accepted.
    let (status, answer) = deliver(&app, &body, SECRET, now - 299).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    // Over the body limit: 413 in the error envelope.
    let huge = vec![b' '; 128 * 1024];
    let (status, answer) = deliver_raw(&app, huge.clone(), sign(&huge, SECRET, now)).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    // A server without secrets refuses webhooks outright.
    let bare = spawn(backend, Vec::new()).await;
    let (status, answer) = deliver(&bare, &body, SECRET, now).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("stripe_not_configured"))
    );
}

async fn a_trial_prompts_the_org_owner_with_its_end_date(backend: Backend) {
    let app = spawn(backend, vec![SECRET.into()]).await;
    let s = &app.secret;
    let (status, body) = call(
        s,
        Method::PUT,
        "/v1/prompt-rules",
        Some(json!({"prompts": [
            {"key": "trial", "trigger": {"on": "trial_ending"},
             "content": {"title": "{{days_left}} days left of your {{plan_name}} trial",
                         "body": "It ends {{ends_at}}."}, "frequency": "once"}
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, signup) = call(s, Method::POST, "/v1/signup", Some(json!({
        "user_id": "dana", "email": "dana@example.com", "org_name": "Dana's", "idempotency_key": "s-dana"
    }))).await;
    assert_eq!(status, StatusCode::OK, "{signup}");
    let org = signup["org"]["org_id"].as_str().unwrap().to_owned();
    let mut trialing = subscription("trialing", false, Some(&org));
    trialing["trial_end"] = json!(unix("2027-03-24T12:00:00Z"));
    let created = event(
        "evt_t1",
        "customer.subscription.created",
        "2027-03-10T11:59:00Z",
        trialing.clone(),
    );
    let (status, ack) = deliver(&app, &created, SECRET, unix(NOW)).await;
    assert_eq!(
        (status, ack["outcome"].clone()),
        (StatusCode::OK, json!("applied")),
        "{ack}"
    );
    let (_, subscription_view) = call(
        s,
        Method::GET,
        &format!("/v1/orgs/{org}/subscription"),
        None,
    )
    .await;
    assert_eq!(
        subscription_view["subscription"]["trial_ends_at"], "2027-03-24T12:00:00Z",
        "{subscription_view}"
    );
    let (_, pending) = call(s, Method::GET, "/v1/prompts?user_id=dana", None).await;
    let prompts = pending["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 1, "{pending}");
    assert_eq!(prompts[0]["title"], "14 days left of your pro trial");
    assert_eq!(prompts[0]["body"], "It ends 2027-03-24T12:00:00Z.");
    assert_eq!(prompts[0]["data"]["days_left"], 14);
    // A redelivery, and an update that is still the same trial, fire nothing.
    deliver(&app, &created, SECRET, unix(NOW)).await;
    let updated = event(
        "evt_t2",
        "customer.subscription.updated",
        "2027-03-10T11:59:30Z",
        trialing,
    );
    assert_eq!(
        deliver(&app, &updated, SECRET, unix(NOW)).await.1["outcome"],
        "applied"
    );
    let (_, pending) = call(s, Method::GET, "/v1/prompts?user_id=dana", None).await;
    assert_eq!(pending["prompts"].as_array().unwrap().len(), 1, "{pending}");
}

async fn invoices_and_checkout_find_the_org_by_customer(backend: Backend) {
    let app = spawn(backend, vec![SECRET.into()]).await;
    let now = unix(NOW);
    // Before any link, an invoice for an unknown customer matches no org.
    let failed = event(
        "evt_f1",
        "invoice.payment_failed",
        "2027-03-10T00:00:10Z",
        json!({"id": "in_1", "object": "invoice", "customer": "cus_123", "subscription": "sub_123"}),
    );
    assert_eq!(
        deliver(&app, &failed, SECRET, now).await.1["outcome"],
        "unmatched"
    );
    // Checkout links the customer to the org (client_reference_id).
    let checkout = event(
        "evt_c1",
        "checkout.session.completed",
        "2027-03-10T00:00:00Z",
        json!({"id": "cs_1", "object": "checkout.session", "client_reference_id": "acme",
               "customer": "cus_123", "subscription": "sub_123", "mode": "subscription"}),
    );
    assert_eq!(
        deliver(&app, &checkout, SECRET, now).await.1["outcome"],
        "applied"
    );
    // The subscription event without metadata finds the org by customer.
    let created = event(
        "evt_s1",
        "customer.subscription.created",
        "2027-03-10T00:00:01Z",
        subscription("active", false, None),
    );
    let (_, ack) = deliver(&app, &created, SECRET, now).await;
    assert_eq!(
        (ack["outcome"].clone(), ack["org_id"].clone()),
        (json!("applied"), json!("acme"))
    );
    // A failed payment (newer API shape: the subscription under `parent`).
    let failed = event(
        "evt_f2",
        "invoice.payment_failed",
        "2027-03-10T00:00:20Z",
        json!({"id": "in_2", "object": "invoice", "customer": {"id": "cus_123", "object": "customer"},
               "parent": {"subscription_details": {"subscription": "sub_123"}}}),
    );
    assert_eq!(
        deliver(&app, &failed, SECRET, now).await.1["outcome"],
        "applied"
    );
    let (_, view) = call(&app.secret, Method::GET, "/v1/orgs/acme/subscription", None).await;
    assert_eq!(view["subscription"]["status"], "past_due");
    // Access holds for the 7-day grace period, then lapses.
    app.clock.set("2027-03-17T00:00:19Z".parse().unwrap());
    assert_eq!(sso(&app, "acme").await["allowed"], true);
    app.clock.set("2027-03-17T00:00:20Z".parse().unwrap());
    assert_eq!(sso(&app, "acme").await["reason"], "no_active_subscription");
    let paid = event(
        "evt_p1",
        "invoice.paid",
        "2027-03-17T00:01:00Z",
        json!({"id": "in_3", "object": "invoice", "customer": "cus_123", "subscription": "sub_123"}),
    );
    assert_eq!(
        deliver(&app, &paid, SECRET, unix("2027-03-17T00:01:00Z"))
            .await
            .1["outcome"],
        "applied"
    );
    assert_eq!(sso(&app, "acme").await["allowed"], true);
}

/// What the Stripe stand-in received: path, Authorization header, form.
type Recorded = Arc<std::sync::Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

/// A stand-in for Stripe's Checkout and billing-portal endpoints, which
/// localstripe (the stateful fake used below) does not implement: it records
/// each call and answers with the documented response shape.
async fn stripe_stand_in() -> (String, Recorded) {
    use axum::extract::{OriginalUri, State};
    use axum::http::HeaderMap;
    let recorded: Recorded = Arc::default();
    async fn handle(
        State(recorded): State<Recorded>,
        OriginalUri(uri): OriginalUri,
        headers: HeaderMap,
        body: String,
    ) -> (axum::http::StatusCode, axum::Json<Value>) {
        let form: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap();
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let path = uri.path().to_string();
        recorded
            .lock()
            .unwrap()
            .push((path.clone(), auth, form.clone()));
        let price = form
            .iter()
            .find(|(k, _)| k == "line_items[0][price]")
            .map(|(_, v)| v.as_str());
        match (path.as_str(), price) {
            (_, Some("price_archived")) => (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(
                    json!({"error": {"type": "invalid_request_error", "message": "The price specified is inactive."}}),
                ),
            ),
            ("/v1/customers", _) => (
                axum::http::StatusCode::OK,
                axum::Json(json!({"id": "cus_new1", "object": "customer"})),
            ),
            ("/v1/checkout/sessions", _) => (
                axum::http::StatusCode::OK,
                axum::Json(
                    json!({"id": "cs_test_1", "object": "checkout.session", "url": "https://checkout.stripe.com/c/pay/cs_test_1"}),
                ),
            ),
            _ => (
                axum::http::StatusCode::OK,
                axum::Json(
                    json!({"id": "bps_1", "object": "billing_portal.session", "url": "https://billing.stripe.com/p/session/bps_1"}),
                ),
            ),
        }
    }
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(recorded.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, recorded)
}

async fn checkout_and_the_billing_portal_call_stripe(backend: Backend) {
    let (stripe_base, recorded) = stripe_stand_in().await;
    let db = TestDatabase::create(backend).await;
    let mut settings = common::test_settings(&db);
    settings.stripe.api_key = Some("sk_test_flywheel".into());
    settings.stripe.api_base = stripe_base;
    let started = common::start(settings, Arc::new(flywheel_domain::clock::SystemClock)).await;
    let secret = started.secret.clone();
    let catalog = json!({
        "features": [{"key": "sso", "kind": "boolean"}],
        "plans": [
            {"key": "free", "default": true, "features": {}},
            {"key": "pro", "stripe_price_ids": ["price_pro_monthly"], "features": {"sso": {}}},
            {"key": "legacy", "stripe_price_ids": ["price_archived"], "features": {"sso": {}}},
            {"key": "enterprise", "features": {"sso": {}}}
        ]
    });
    assert_eq!(
        call(&secret, Method::PUT, "/v1/catalog", Some(catalog))
            .await
            .0,
        StatusCode::OK
    );
    // The portal needs a customer, which only Checkout creates.
    let portal = json!({"return_url": "https://app.example.com/settings"});
    let (status, body) = call(
        &secret,
        Method::POST,
        "/v1/orgs/acme/billing-portal",
        Some(portal.clone()),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_stripe_customer"))
    );
    let request = json!({"plan": "pro", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/no"});
    let (status, session) = call(
        &secret,
        Method::POST,
        "/v1/orgs/acme/checkout",
        Some(request.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(
        session["url"],
        "https://checkout.stripe.com/c/pay/cs_test_1"
    );
    {
        let calls = recorded.lock().unwrap();
        assert_eq!(calls.len(), 2);
        let (path, auth, form) = &calls[0];
        assert_eq!(
            (path.as_str(), auth.as_str()),
            ("/v1/customers", "Bearer sk_test_flywheel")
        );
        assert!(form.contains(&("metadata[org_id]".into(), "acme".into())));
        let (path, _, form) = &calls[1];
        assert_eq!(path, "/v1/checkout/sessions");
        for expected in [
            ("mode", "subscription"),
            ("customer", "cus_new1"),
            ("client_reference_id", "acme"),
            ("line_items[0][price]", "price_pro_monthly"),
            ("subscription_data[metadata][org_id]", "acme"),
            ("success_url", "https://app.example.com/ok"),
        ] {
            assert!(
                form.contains(&(expected.0.into(), expected.1.into())),
                "{expected:?} in {form:?}"
            );
        }
    }
    // A second checkout reuses the linked customer.
    call(
        &secret,
        Method::POST,
        "/v1/orgs/acme/checkout",
        Some(request),
    )
    .await;
    assert_eq!(
        recorded
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == "/v1/customers")
            .count(),
        1
    );
    let (status, session) = call(
        &secret,
        Method::POST,
        "/v1/orgs/acme/billing-portal",
        Some(portal),
    )
    .await;
    assert_eq!(
        (status, session["url"].as_str()),
        (
            StatusCode::OK,
            Some("https://billing.stripe.com/p/session/bps_1")
        )
    );
    assert!(recorded
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .2
        .contains(&("customer".into(), "cus_new1".into())));
    // Refusals: Stripe's message passes through; bad input never reaches Stripe.
    let bad = |plan: &str, url: &str| json!({"plan": plan, "success_url": url, "cancel_url": "https://app.example.com/no"});
    for (body, status, code) in [
        (
            bad("legacy", "https://app.example.com/ok"),
            StatusCode::BAD_GATEWAY,
            "stripe_error",
        ),
        (
            bad("enterprise", "https://app.example.com/ok"),
            StatusCode::BAD_REQUEST,
            "plan_not_purchasable",
        ),
        (
            bad("gold", "https://app.example.com/ok"),
            StatusCode::NOT_FOUND,
            "unknown_plan",
        ),
        (
            bad("pro", "/relative"),
            StatusCode::BAD_REQUEST,
            "invalid_url",
        ),
    ] {
        let (got, answer) = call(
            &secret,
            Method::POST,
            "/v1/orgs/acme/checkout",
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        if code == "stripe_error" {
            assert!(answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("The price specified is inactive."));
        }
    }
    // Only secret keys start a checkout.
    let (status, body) = call(
        &started.publishable,
        Method::POST,
        "/v1/orgs/acme/checkout",
        Some(bad("pro", "https://x.example")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    started.server.shutdown().await.unwrap();
    let _keep = db;
}

/// localstripe (PyPI), a stateful fake Stripe server, run as a child process
/// and killed on drop.
struct LocalStripe {
    child: std::process::Child,
    base: String,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn localstripe() -> LocalStripe {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("localstripe")
        .args(["--port", &port.to_string(), "--from-scratch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("localstripe is not installed: `python3 -m pip install -r crates/flywheel/tests/clients/requirements.txt` (.ci/run does)");
    // Owned at once, so it is killed and reaped on every path.
    let ls = LocalStripe {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let probe = http
            .get(format!("{}/v1/customers", ls.base))
            .basic_auth("sk_test_x", Some(""));
        if probe.send().await.is_ok() {
            return ls;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("localstripe did not start on {}", ls.base);
}

async fn stripe_post(ls: &LocalStripe, path: &str, form: &[(&str, &str)]) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", ls.base))
        .basic_auth("sk_test_x", Some(""))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    // `/_config/…` answers with an empty body.
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {body}");
    body
}

/// The whole loop against a running fake Stripe: Flywheel creates the org's
/// customer through Stripe's API, a subscription is created in Stripe, and
/// Stripe's signed `customer.subscription.created` webhook moves the org to
/// the plan its price maps to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localstripe_subscription_webhooks_move_the_org_to_its_plan() {
    let ls = localstripe().await;
    let db = TestDatabase::create(Backend::Sqlite).await;
    let mut settings = common::test_settings(&db);
    settings.stripe.api_key = Some("sk_test_x".into());
    settings.stripe.api_base = ls.base.clone();
    settings.stripe.webhook_secrets = vec![SECRET.into()];
    let started = common::start(settings, Arc::new(flywheel_domain::clock::SystemClock)).await;
    let secret = started.secret.clone();
    let catalog = json!({
        "features": [{"key": "sso", "kind": "boolean"}],
        "plans": [
            {"key": "free", "default": true, "features": {}},
            {"key": "pro", "stripe_price_ids": ["price_pro_monthly"], "features": {"sso": {}}}
        ]
    });
    assert_eq!(
        call(&secret, Method::PUT, "/v1/catalog", Some(catalog))
            .await
            .0,
        StatusCode::OK
    );
    let hook = format!("{}/v1/webhooks/stripe", started.server.base_url());
    stripe_post(
        &ls,
        "/_config/webhooks/flywheel",
        &[("url", &hook), ("secret", SECRET)],
    )
    .await;
    stripe_post(
        &ls,
        "/v1/plans",
        &[
            ("id", "price_pro_monthly"),
            ("amount", "2900"),
            ("currency", "usd"),
            ("interval", "month"),
            ("product[name]", "Pro"),
        ],
    )
    .await;
    // Checkout: the customer is created in Stripe and linked to the org;
    // localstripe has no Checkout Sessions, so that second call is refused.
    let request = json!({"plan": "pro", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/no"});
    let (status, body) = call(
        &secret,
        Method::POST,
        "/v1/orgs/acme/checkout",
        Some(request),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("stripe_error")),
        "{body}"
    );
    let (_, view) = call(&secret, Method::GET, "/v1/orgs/acme/subscription", None).await;
    assert_eq!(view["plan"], "free");
    let customers = reqwest::Client::new()
        .get(format!("{}/v1/customers", ls.base))
        .basic_auth("sk_test_x", Some(""))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let customer = customers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metadata"]["org_id"] == "acme")
        .expect("Flywheel created the org's customer in Stripe")["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The customer pays: a card, then a subscription (no org metadata: the
    // webhook finds the org through the linked customer).
    let card = stripe_post(
        &ls,
        "/v1/payment_methods",
        &[
            ("type", "card"),
            ("card[number]", "4242424242424242"),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2030"),
            ("card[cvc]", "123"),
        ],
    )
    .await;
    let card = card["id"].as_str().unwrap();
    stripe_post(
        &ls,
        &format!("/v1/payment_methods/{card}/attach"),
        &[("customer", &customer)],
    )
    .await;
    stripe_post(
        &ls,
        &format!("/v1/customers/{customer}"),
        &[("invoice_settings[default_payment_method]", card)],
    )
    .await;
    let subscription = stripe_post(
        &ls,
        "/v1/subscriptions",
        &[
            ("customer", &customer),
            ("items[0][plan]", "price_pro_monthly"),
        ],
    )
    .await;
    assert_eq!(subscription["status"], "active");
    // localstripe delivers its webhooks after answering: wait (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, answer) = call(
            &secret,
            Method::POST,
            "/v1/check",
            Some(json!({"org_id": "acme", "feature": "sso"})),
        )
        .await;
        if answer["allowed"] == true {
            assert_eq!(answer["plan"], "pro");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook did not arrive: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, view) = call(&secret, Method::GET, "/v1/orgs/acme/subscription", None).await;
    assert_eq!(
        view["subscription"]["stripe"]["subscription_id"],
        subscription["id"]
    );
    assert_eq!(
        view["subscription"]["stripe"]["customer_id"],
        customer.as_str()
    );
    started.server.shutdown().await.unwrap();
}
