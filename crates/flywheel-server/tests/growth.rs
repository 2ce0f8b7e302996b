//! The growth graph through the real server: a newcomer's whole loop (sign
//! up, invite, accept, share, resolve as a guest, sign the guest up, read
//! every step's attribution and referral event), webhooks delivered and
//! verified by the Standard Webhooks reference library, invitation email
//! received by a real SMTP server (aiosmtpd), and the documented refusals.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_client::Client;
use flywheel_domain::clock::SystemClock;
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::call;

flywheel_store::for_each_backend!(
    a_newcomer_walks_the_whole_loop_and_every_step_is_attributed,
    webhooks_arrive_signed_and_verify_with_the_reference_library,
    refusals_have_documented_codes,
    members_leave_and_billing_changes_reach_webhooks,
    usage_webhooks_leave_at_once_from_consume_and_from_events,
    the_third_project_records_a_milestone_once_with_its_events_and_webhook,
);

struct App {
    server: RunningServer,
    _db: TestDatabase,
    secret: Client,
    publishable: Client,
}

async fn spawn(backend: Backend, edit: impl FnOnce(&mut flywheel_server::Settings)) -> App {
    let db = TestDatabase::create(backend).await;
    let mut settings = common::test_settings(&db);
    settings.webhooks.poll_interval_ms = 50;
    settings.smtp.poll_interval_ms = 50;
    edit(&mut settings);
    let started = common::start(settings, Arc::new(SystemClock)).await;
    App {
        server: started.server,
        _db: db,
        secret: started.secret,
        publishable: started.publishable,
    }
}

fn signup_body(user: &str, extra: Value) -> Value {
    let mut body = json!({
        "user_id": user,
        "email": format!("{user}@example.com"),
        "name": user.to_uppercase(),
        "org_name": format!("{user}'s team"),
        "idempotency_key": format!("signup-{user}"),
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn a_newcomer_walks_the_whole_loop_and_every_step_is_attributed(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let s = &app.secret;
    // Seats: 3 on the free plan, so the seat entitlement shows "2 of 3".
    let (status, _) = call(s, Method::PUT, "/v1/catalog", Some(json!({
        "features": [{"key": "seats", "name": "Seats", "kind": "metered"}],
        "plans": [{"key": "free", "default": true, "features": {"seats": {"limit": 3, "reset": "never"}}}]
    }))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, template) = call(
        s,
        Method::PUT,
        "/v1/org-template",
        Some(json!({"projects": [{"name": "Sample project"}]})),
    )
    .await;
    assert_eq!(
        (status, template["version"].as_i64()),
        (StatusCode::OK, Some(1))
    );

    // 1. Alice signs up: user, org (owner, default plan), attribution.
    let (status, alice) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body(
            "alice",
            json!({"utm": {"source": "hn", "medium": "social"}}),
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    assert_eq!(alice["org_created"], true);
    assert_eq!(alice["plan"], "free");
    assert_eq!(alice["membership"]["role"], "owner");
    assert_eq!(alice["org"]["template_version"], 1);
    assert_eq!(
        alice["user"]["attribution"]["acquisition_source"],
        "organic"
    );
    assert_eq!(alice["user"]["attribution"]["utm"]["source"], "hn");
    let org = alice["org"]["org_id"].as_str().unwrap().to_owned();
    // The same key answers the same reply.
    let (_, again) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body(
            "alice",
            json!({"utm": {"source": "hn", "medium": "social"}}),
        )),
    )
    .await;
    assert_eq!(again, alice);

    // 2. She invites Bob; without SMTP the reply carries the accept URL.
    let (status, invited) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({
            "emails": ["Bob@Example.com"], "role": "member", "inviter_user_id": "alice"
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{invited}");
    let entry = &invited["invitations"][0];
    assert_eq!(
        (entry["outcome"].as_str(), entry["email_status"].as_str()),
        (Some("created"), Some("not_configured"))
    );
    let token = entry["token"].as_str().unwrap().to_owned();
    assert!(entry["accept_url"].as_str().unwrap().contains(&token));
    assert_eq!(entry["invitation"]["email"], "bob@example.com");
    assert!(
        entry["invitation"].get("token").is_none(),
        "the token is not part of the record"
    );

    // 3. Bob's browser looks it up (publishable key), then he signs up with it.
    let (status, preview) = call(
        &app.publishable,
        Method::POST,
        "/v1/invitations/lookup",
        Some(json!({"token": token})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            preview["email"].as_str(),
            preview["org_name"].as_str(),
            preview["inviter_name"].as_str()
        ),
        (
            Some("b***b@example.com"),
            Some("alice's team"),
            Some("ALICE")
        )
    );
    let (status, bob) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("bob", json!({"invitation_token": token}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bob}");
    assert_eq!(bob["org_created"], false);
    assert_eq!(bob["org"]["org_id"], org.as_str());
    assert_eq!(
        bob["user"]["email_verified"], true,
        "the token proves the mailbox"
    );
    assert_eq!(bob["user"]["attribution"]["acquisition_source"], "invite");
    assert_eq!(bob["user"]["attribution"]["invited_by_user_id"], "alice");
    // Single use: the token is gone for everyone (the same 404 as unknown).
    let (status, gone) = call(
        &app.publishable,
        Method::POST,
        "/v1/invitations/lookup",
        Some(json!({"token": token})),
    )
    .await;
    assert_eq!(
        (status, gone["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("invitation_not_found"))
    );
    let (_, seats) = call(
        &app.publishable,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": org, "feature": "seats"})),
    )
    .await;
    assert_eq!(
        (seats["used"].as_i64(), seats["limit"].as_i64()),
        (Some(2), Some(3))
    );

    // 4. Bob shares a document (password), a guest resolves it.
    let (status, shared) = call(s, Method::POST, "/v1/share-links", Some(json!({
        "resource_type": "doc", "resource_id": "d-42", "org_id": org, "created_by_user_id": "bob",
        "permission": "comment", "audience": "anyone", "password": "open sesame"
    }))).await;
    assert_eq!(status, StatusCode::CREATED, "{shared}");
    let share_token = shared["token"].as_str().unwrap().to_owned();
    let (status, refused) = call(
        &app.publishable,
        Method::POST,
        "/v1/share-links/resolve",
        Some(json!({"token": share_token})),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("share_password_required"))
    );
    let (status, resolved) = call(
        &app.publishable,
        Method::POST,
        "/v1/share-links/resolve",
        Some(json!({"token": share_token, "password": "open sesame"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(
        (
            resolved["resource_id"].as_str(),
            resolved["permission"].as_str()
        ),
        (Some("d-42"), Some("comment"))
    );
    let guest_id = resolved["guest_id"].as_str().unwrap().to_owned();
    let (status, claims) = call(
        s,
        Method::POST,
        "/v1/guest-tokens/verify",
        Some(json!({"guest_token": resolved["guest_token"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(claims["guest"], format!("guest:{guest_id}"));
    // The same guest again: two accesses, one unique guest.
    call(
        &app.publishable,
        Method::POST,
        "/v1/share-links/resolve",
        Some(json!({"token": share_token, "password": "open sesame", "guest_id": guest_id})),
    )
    .await;
    let link_id = shared["link"]["id"].as_str().unwrap();
    let (_, link) = call(s, Method::GET, &format!("/v1/share-links/{link_id}"), None).await;
    // The write's reply and a later read carry the same instant (the
    // system clock's nanoseconds are not in the reply only).
    assert_eq!(link["created_at"], shared["link"]["created_at"]);
    assert_eq!(
        (link["accesses"].as_i64(), link["unique_guests"].as_i64()),
        (Some(2), Some(1))
    );

    // 5. The guest signs up with the share token: attributed to the share.
    let (status, gina) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("gina", json!({"share_token": share_token}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{gina}");
    assert_eq!(gina["org_created"], true);
    assert_eq!(gina["user"]["attribution"]["acquisition_source"], "share");
    assert_eq!(gina["user"]["attribution"]["share_link_id"], link_id);
    assert_eq!(gina["user"]["attribution"]["invited_by_user_id"], "bob");

    // 6. Referral: Gina's code, a click, a signup in the window.
    let (_, code) = call(s, Method::GET, "/v1/users/gina/referral-code", None).await;
    let code = code["code"].as_str().unwrap().to_owned();
    let (status, click) = call(
        &app.publishable,
        Method::POST,
        "/v1/referrals/click",
        Some(json!({"code": code.to_lowercase(), "anonymous_id": "anon-9"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{click}");
    let (_, hank) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("hank", json!({"anonymous_id": "anon-9"}))),
    )
    .await;
    assert_eq!(
        hank["user"]["attribution"]["acquisition_source"],
        "referral"
    );
    assert_eq!(hank["user"]["attribution"]["invited_by_user_id"], "gina");
    assert_eq!(
        hank["user"]["attribution"]["referral_click_id"],
        click["click_id"]
    );

    // 7. The history answers "who brought whom, through what".
    let (status, history) = call(s, Method::GET, "/v1/referral-events?limit=100", None).await;
    assert_eq!(status, StatusCode::OK);
    let steps: Vec<(String, String, String)> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["actor_user_id"].as_str().unwrap_or("-").to_owned(),
                e["signup_user_id"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("signed_up", "-", "alice"),
        ("invited", "alice", "-"),
        ("accepted", "alice", "bob"),
        ("signed_up", "alice", "bob"),
        ("shared", "bob", "-"),
        ("share_viewed", "bob", "-"),
        ("signed_up", "bob", "gina"),
        ("signed_up", "gina", "hank"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
    .collect();
    assert_eq!(steps, expected);
    let (_, invites_by_alice) = call(
        s,
        Method::GET,
        "/v1/referral-events?kind=invited&actor_user_id=alice",
        None,
    )
    .await;
    assert_eq!(invites_by_alice["events"].as_array().unwrap().len(), 1);
    let (_, user) = call(s, Method::GET, "/v1/users/bob", None).await;
    assert_eq!(user["memberships"][0]["joined_via"], "invite");
    let (_, members) = call(s, Method::GET, &format!("/v1/orgs/{org}/members"), None).await;
    assert_eq!(members["members"].as_array().unwrap().len(), 2);
    let (_, listed) = call(
        s,
        Method::GET,
        &format!("/v1/orgs/{org}/invitations?status=accepted"),
        None,
    )
    .await;
    assert_eq!(listed["invitations"][0]["accepted_by_user_id"], "bob");
    assert_eq!(
        (
            &listed["invitations"][0]["created_at"],
            &listed["invitations"][0]["expires_at"]
        ),
        (
            &entry["invitation"]["created_at"],
            &entry["invitation"]["expires_at"]
        ),
        "the invitation reads as it was written"
    );
}

/// A webhook receiver that answers 500 to the first delivery, to exercise a
/// retry.
async fn receiver() -> (String, common::Webhooks) {
    common::receiver_failing_first(true).await
}

async fn webhooks_arrive_signed_and_verify_with_the_reference_library(backend: Backend) {
    // A real SMTP server: aiosmtpd, printing what it receives.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut smtp = std::process::Command::new("python3")
        .args([
            "-u",
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Debugging",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    let mailbox: Arc<Mutex<String>> = Arc::default();
    let stdout = smtp.stdout.take().unwrap();
    let sink = mailbox.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut text = sink.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let app = spawn(backend, |settings| {
        settings.smtp.url = Some(format!("smtp://127.0.0.1:{port}"));
        settings.smtp.from = "Acme <team@acme.test>".into();
    })
    .await;
    let s = &app.secret;
    let (url, seen) = receiver().await;
    let (status, endpoint) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": url, "description": "crm"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{endpoint}");
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));

    let (status, _) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let org = call(s, Method::GET, "/v1/users/alice", None).await.1["memberships"][0]["org_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, invited) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({
            "email": "bob@example.com", "inviter_user_id": "alice"
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(invited["invitations"][0]["email_status"], "queued");
    let token = invited["invitations"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // The email reaches the SMTP server, with the accept link.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !mailbox.lock().unwrap().contains(&token) {
        assert!(
            std::time::Instant::now() < deadline,
            "no email arrived: {}",
            mailbox.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let text = mailbox.lock().unwrap();
        assert!(text.contains("bob@example.com"));
        assert!(
            text.contains("ALICE invited you to join alice's team"),
            "{text}"
        );
    }
    let (_, emails) = call(s, Method::GET, "/v1/emails", None).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut emails = emails;
    while emails["emails"][0]["status"] != "sent" {
        assert!(std::time::Instant::now() < deadline, "{emails}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        emails = call(s, Method::GET, "/v1/emails", None).await.1;
    }
    let _ = smtp.kill();
    let _ = smtp.wait();

    // Webhooks: user.signed_up, org.provisioned, membership.created,
    // invitation.created; the first attempt got a 500 and was retried (5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} webhooks arrived",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(headers, body)| json!({"headers": headers, "body": body}))
        .collect();
    let mut types: Vec<String> = messages
        .iter()
        .map(|m| {
            serde_json::from_str::<Value>(m["body"].as_str().unwrap()).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            "invitation.created",
            "membership.created",
            "org.provisioned",
            "user.signed_up"
        ]
    );
    let verify = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
data = json.load(sys.stdin)
hook = Webhook(data["secret"])
for message in data["messages"]:
    hook.verify(message["body"], message["headers"])
try:
    tampered = data["messages"][0]
    hook.verify(tampered["body"] + " ", tampered["headers"])
    print("tampered message verified")
    sys.exit(1)
except Exception:
    pass
print("verified", len(data["messages"]))
"#;
    let mut python = std::process::Command::new("python3")
        .args(["-c", verify])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(
            json!({"secret": secret, "messages": messages})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "standardwebhooks refused a signature (pip install -r crates/flywheel/tests/clients/requirements.txt): {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "verified 4");
    // The failed first attempt is on record, and a delivery can be replayed.
    let (_, deliveries) = call(s, Method::GET, "/v1/webhook-deliveries?limit=100", None).await;
    let deliveries = deliveries["deliveries"].as_array().unwrap().clone();
    assert!(
        deliveries.iter().all(|d| d["status"] == "succeeded"),
        "{deliveries:?}"
    );
    assert_eq!(
        deliveries
            .iter()
            .map(|d| d["attempts"].as_i64().unwrap())
            .sum::<i64>(),
        5
    );
    let id = deliveries[0]["id"].as_str().unwrap();
    let (status, replayed) = call(
        s,
        Method::POST,
        &format!("/v1/webhook-deliveries/{id}/replay"),
        None,
    )
    .await;
    assert_eq!(
        (status, replayed["status"].as_str()),
        (StatusCode::OK, Some("pending"))
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replay did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replayed_id = &seen.lock().unwrap()[4].0["webhook-id"];
    assert_eq!(
        replayed_id, &deliveries[0]["message_id"],
        "a replay keeps the webhook-id"
    );
    drop(app.server);
}

async fn refusals_have_documented_codes(backend: Backend) {
    let app = spawn(backend, |settings| {
        settings.growth.resends_per_invitation = 1
    })
    .await;
    let s = &app.secret;
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/signup",
        Some(signup_body("x", json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(json!({"email": "not-an-email", "idempotency_key": "k"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_email".into())
    );
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(json!({"email": "a@b.io"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({}))),
    )
    .await;
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({"idempotency_key": "other"}))),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "user_exists".into())
    );
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({"name": "changed"}))),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "idempotency_key_reused".into())
    );
    // Unknown and malformed tokens: the same 404.
    for token in [
        "fwinv_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "garbage",
    ] {
        let (status, body) = call(
            &app.publishable,
            Method::POST,
            "/v1/invitations/lookup",
            Some(json!({"token": token})),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::NOT_FOUND, "invitation_not_found".into())
        );
        let (status, body) = call(
            &app.publishable,
            Method::POST,
            "/v1/share-links/resolve",
            Some(json!({"token": token})),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::NOT_FOUND, "share_link_not_found".into())
        );
    }
    let org = call(s, Method::GET, "/v1/users/alice", None).await.1["memberships"][0]["org_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({"email": "b@x.io", "inviter_user_id": "mallory"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "inviter_not_member".into())
    );
    let (status, body) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({"email": "b@x.io", "inviter_user_id": "alice", "expires_in_days": 31})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_expiry".into())
    );
    let (_, invited) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({"email": "b@x.io", "inviter_user_id": "alice"})),
    )
    .await;
    let id = invited["invitations"][0]["invitation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_token = invited["invitations"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, resent) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations/{id}/resend"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resent}");
    assert_ne!(
        resent["token"],
        old_token.as_str(),
        "resend rotates the token"
    );
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/invitations/lookup",
        Some(json!({"token": old_token})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the old token stops working");
    let (status, body) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations/{id}/resend"),
        None,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "resend_limit_reached".into())
    );
    let (status, _) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/invitations/lookup",
        Some(json!({"token": resent["token"]})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "invitation_not_found".into())
    );
    // Accepting needs a verified address.
    call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("carol", json!({}))),
    )
    .await;
    let (_, invited) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({"email": "carol@example.com", "inviter_user_id": "alice"})),
    )
    .await;
    let token = invited["invitations"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/invitations/accept",
        Some(json!({"token": token, "user_id": "carol"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "email_not_verified".into())
    );
    call(
        s,
        Method::PATCH,
        "/v1/users/carol",
        Some(json!({"email_verified": true})),
    )
    .await;
    let (status, membership) = call(
        s,
        Method::POST,
        "/v1/invitations/accept",
        Some(json!({"token": token, "user_id": "carol"})),
    )
    .await;
    assert_eq!(
        (status, membership["role"].as_str()),
        (StatusCode::OK, Some("member"))
    );
    // The accepted event says who accepted, though carol signed up before.
    let (_, history) = call(
        s,
        Method::GET,
        "/v1/referral-events?kind=accepted&signup_user_id=carol",
        None,
    )
    .await;
    let accepted = history["events"].as_array().unwrap();
    assert_eq!(accepted.len(), 1, "{history}");
    assert_eq!(
        (
            accepted[0]["actor_user_id"].as_str(),
            accepted[0]["org_id"].as_str()
        ),
        (Some("alice"), Some(org.as_str()))
    );
    // Share-link audiences and bad input.
    let (status, body) = call(s, Method::POST, "/v1/share-links", Some(json!({
        "resource_type": "doc", "resource_id": "d", "created_by_user_id": "alice", "permission": "view", "audience": "listed"
    }))).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_audience".into())
    );
    let (_, shared) = call(s, Method::POST, "/v1/share-links", Some(json!({
        "resource_type": "doc", "resource_id": "d", "created_by_user_id": "alice", "permission": "view",
        "audience": "listed", "allow_list": ["Dan@Example.com"]
    }))).await;
    let share = shared["token"].as_str().unwrap().to_owned();
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/share-links/resolve",
        Some(json!({"token": share, "email": "eve@example.com"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "share_not_on_allow_list".into())
    );
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/share-links/resolve",
        Some(json!({"token": share, "email": "dan@example.com"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/referrals/click",
        Some(json!({"code": "ZZZZZZZZ"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "referral_code_not_found".into())
    );
    let (status, body) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": "ftp://x"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_url".into())
    );
    let (status, body) = call(
        s,
        Method::PUT,
        "/v1/email-templates/invitation",
        Some(json!({"subject": "{{ broken", "text_body": "x"})),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_email_template".into())
    );
    let (status, body) = call(s, Method::GET, "/v1/referral-events?kind=nope", None).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_query".into())
    );
}

async fn members_leave_and_billing_changes_reach_webhooks(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let s = &app.secret;
    let (status, _) = call(s, Method::PUT, "/v1/catalog", Some(json!({
        "features": [{"key": "seats", "name": "Seats", "kind": "metered"}],
        "plans": [
            {"key": "free", "default": true, "features": {"seats": {"limit": 2, "reset": "never"}}},
            {"key": "pro", "price": {"amount": 2900, "currency": "usd"},
             "features": {"seats": {"limit": 20, "reset": "never"}}}
        ]
    }))).await;
    assert_eq!(status, StatusCode::OK);
    let (url, seen) = common::receiver_failing_first(false).await;
    let (status, _) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": url})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, alice) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    let org = alice["org"]["org_id"].as_str().unwrap().to_owned();
    let (_, invited) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/invitations"),
        Some(json!({"email": "bob@example.com", "inviter_user_id": "alice"})),
    )
    .await;
    let token = invited["invitations"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, bob) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("bob", json!({"invitation_token": token}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bob}");

    let members = format!("/v1/orgs/{org}/members");
    let (status, owner) = call(s, Method::DELETE, &format!("{members}/alice"), None).await;
    assert_eq!(
        (status, owner["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("cannot_remove_owner"))
    );
    let (status, removed) = call(s, Method::DELETE, &format!("{members}/bob"), None).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(removed["user_id"], "bob");
    let (status, again) = call(s, Method::DELETE, &format!("{members}/bob"), None).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("membership_not_found"))
    );
    // The seat is back, at once (the cache follows the write).
    let (_, check) = call(
        s,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": org, "feature": "seats"})),
    )
    .await;
    assert_eq!(check["used"], 1, "{check}");
    let (status, _) = call(
        &app.publishable,
        Method::DELETE,
        &format!("{members}/alice"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "removing members takes a secret key"
    );

    let (status, changed) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/subscription"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let (_, conversions) = call(s, Method::GET, "/v1/referral-events?kind=converted", None).await;
    let conversions = conversions["events"].as_array().unwrap().clone();
    assert_eq!(conversions.len(), 1, "{conversions:?}");
    assert_eq!(conversions[0]["signup_user_id"], "alice");
    assert_eq!(conversions[0]["resource_id"], "pro");

    let wanted = [
        "usage.limit_reached",
        "membership.removed",
        "subscription.changed",
    ];
    let mut arrived = Vec::new();
    for _ in 0..200 {
        arrived = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| serde_json::from_str::<Value>(body).unwrap())
            .collect::<Vec<Value>>();
        if wanted
            .iter()
            .all(|t| arrived.iter().any(|m| m["type"] == *t))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let of_type = |t: &str| {
        arrived
            .iter()
            .find(|m| m["type"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} in {arrived:?}"))
    };
    let limit = of_type("usage.limit_reached");
    assert_eq!(
        (
            limit["data"]["feature"].as_str(),
            limit["data"]["used"].as_i64()
        ),
        (Some("seats"), Some(2))
    );
    assert_eq!(of_type("membership.removed")["data"]["user_id"], "bob");
    let change = of_type("subscription.changed");
    assert_eq!(
        (
            change["data"]["previous_plan"].as_str(),
            change["data"]["plan"].as_str()
        ),
        (Some("free"), Some("pro"))
    );
}

/// A write that crosses a usage line wakes the sender itself: with the
/// dispatcher's poll set to a minute, `usage.limit_reached` still arrives
/// from a `consume` and from metered events.
async fn usage_webhooks_leave_at_once_from_consume_and_from_events(backend: Backend) {
    let app = spawn(backend, |settings| {
        settings.webhooks.poll_interval_ms = 60_000
    })
    .await;
    let s = &app.secret;
    let (status, body) = call(s, Method::PUT, "/v1/catalog", Some(json!({
        "features": [{"key": "exports", "kind": "metered"}, {"key": "api_calls", "kind": "metered"}],
        "meters": [{"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT"}],
        "plans": [{"key": "free", "default": true, "features": {
            "exports": {"limit": 3}, "api_calls": {"limit": 3}}}]
    }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (url, seen) = common::receiver_failing_first(false).await;
    let (status, _) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": url, "event_types": ["usage.limit_reached"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let arrived = |org: &'static str| {
        let seen = seen.clone();
        async move {
            for _ in 0..400 {
                let orgs: Vec<Value> = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, body)| {
                        serde_json::from_str::<Value>(body).unwrap()["data"]["org_id"].clone()
                    })
                    .collect();
                if orgs.contains(&json!(org)) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        }
    };
    let (status, answer) = call(
        s,
        Method::POST,
        "/v1/consume",
        Some(json!({
            "org_id": "acme", "feature": "exports", "amount": 3, "idempotency_key": "e1"
        })),
    )
    .await;
    assert_eq!(
        (status, answer["remaining"].as_i64()),
        (StatusCode::OK, Some(0)),
        "{answer}"
    );
    assert!(
        arrived("acme").await,
        "the consume's webhook left before the next poll"
    );
    let events: Vec<Value> = (0..3)
        .map(|_| json!({"type": "track", "event": "api_call", "user_id": "u1", "org_id": "globex"}))
        .collect();
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/events",
        Some(json!({"batch": events})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        arrived("globex").await,
        "the events' webhook left before the next poll"
    );
}

/// The seeds' threshold, through the real server: rules written as the
/// seeds write them, the third `project_created` records the milestone
/// with its time to value, `activation_threshold_crossed` and `$activated`
/// join the event stream, `milestone.reached` is delivered, and a retried
/// batch fires nothing again.
async fn the_third_project_records_a_milestone_once_with_its_events_and_webhook(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let s = &app.secret;
    let (status, bad) = call(s, Method::PUT, "/v1/activation-rules", Some(json!({"rules": [
        {"key": "x", "scope": "user", "conditions": ["project_created >= 0"], "within_days": 400}
    ]}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_activation_rules");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/rules/0/within_days"),
        "{bad}"
    );
    let rules = json!({"rules": [
        {"key": "three_projects", "scope": "user", "conditions": ["project_created >= 3"],
         "within_days": 14, "activation": true},
        {"key": "team", "scope": "org", "conditions": ["team_invites >= 2"]}
    ]});
    let (status, written) = call(s, Method::PUT, "/v1/activation-rules", Some(rules)).await;
    assert_eq!(
        (status, written["version"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{written}"
    );
    let (status, _) = call(&app.publishable, Method::GET, "/v1/activation-rules", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, read) = call(s, Method::GET, "/v1/activation-rules", None).await;
    assert_eq!(
        read["rules"]["rules"][0]["conditions"][0],
        json!({"event": "project_created", "at_least": 3})
    );

    let (url, seen) = common::receiver_failing_first(false).await;
    let (status, _) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": url, "event_types": ["milestone.reached"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call(s, Method::PUT, "/v1/flags/activated-banner", Some(json!({
        "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
        "targeting": {"if": [{"and": [{"var": "activated"}, {"var": "milestones.three_projects"}]}, "on", "off"]}
    }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let banner = || async {
        let response = app
            .publishable
            .request(Method::POST, "/ofrep/v1/evaluate/flags/activated-banner")
            .json(&json!({"context": {"targetingKey": "alice"}}))
            .send()
            .await
            .unwrap();
        response.json::<Value>().await.unwrap()["variant"].clone()
    };
    let (_, alice) = call(
        s,
        Method::POST,
        "/v1/signup",
        Some(signup_body("alice", json!({}))),
    )
    .await;
    let org = alice["org"]["org_id"].as_str().unwrap().to_owned();
    assert_eq!(banner().await, "off");
    let project = |n: u32| {
        json!({"event_id": uuid::Uuid::from_u128(u128::from(n)), "type": "track",
               "event": "project_created", "user_id": "alice", "org_id": org})
    };
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/events",
        Some(json!({"batch": [project(1), project(2)]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, none) = call(s, Method::GET, "/v1/users/alice/milestones", None).await;
    assert_eq!(none["milestones"], json!([]));
    for _ in 0..2 {
        // The second time is the client retrying: duplicates, nothing new.
        let (status, answer) = call(
            &app.publishable,
            Method::POST,
            "/v1/events",
            Some(json!({"batch": [project(3)]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let (status, listed) = call(s, Method::GET, "/v1/users/alice/milestones", None).await;
    assert_eq!(status, StatusCode::OK);
    let milestones = listed["milestones"].as_array().unwrap();
    assert_eq!(milestones.len(), 1, "{listed}");
    assert_eq!(milestones[0]["rule"], "three_projects");
    assert_eq!(milestones[0]["count"], 3);
    assert_eq!(milestones[0]["event_id"], json!(uuid::Uuid::from_u128(3)));
    assert!(milestones[0]["seconds_to_value"].as_i64().unwrap() >= 0);
    let (_, crossed) = call(
        s,
        Method::GET,
        "/v1/events?event=activation_threshold_crossed",
        None,
    )
    .await;
    let crossed = crossed["events"].as_array().unwrap();
    assert_eq!(crossed.len(), 1, "{crossed:?}");
    assert_eq!(crossed[0]["properties"]["rule"], "three_projects");
    assert_eq!(crossed[0]["properties"]["event"], "project_created");
    assert_eq!(crossed[0]["properties"]["count"], 3);
    let (_, activated) = call(s, Method::GET, "/v1/events?event=$activated", None).await;
    assert_eq!(activated["events"].as_array().unwrap().len(), 1);
    // Milestones enrich flag contexts at once (this node committed them).
    assert_eq!(banner().await, "on");
    let (_, org_milestones) =
        call(s, Method::GET, &format!("/v1/orgs/{org}/milestones"), None).await;
    assert_eq!(
        org_milestones["milestones"],
        json!([]),
        "two team invites not yet"
    );

    let mut delivered = Vec::new();
    for _ in 0..200 {
        delivered = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| body.clone())
            .collect();
        if !delivered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    let message: Value = serde_json::from_str(&delivered[0]).unwrap();
    assert_eq!(message["type"], "milestone.reached");
    assert_eq!(message["data"]["subject_id"], "alice");
}
