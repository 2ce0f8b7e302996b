//! Upgrade prompts and the live stream through the real server, on both
//! backends: the seeds' scenario end to end (a free org's user creates a
//! third project → milestone, `activation_threshold_crossed`, prompt on the
//! open stream and in `decide`, signed webhook; click, upgrade, limits
//! lift, conversion credited to the prompt's variant), retries and caps
//! that never fire twice, a reconnecting stream that gets what it missed,
//! and identity verification.

mod common;

use std::sync::Arc;
use std::time::Duration;

use flywheel_client::Client;
use flywheel_domain::clock::SystemClock;
use flywheel_domain::growth::webhook_signature::{verify, WebhookSecret};
use flywheel_domain::identity::user_hash;
use flywheel_server::RunningServer;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::call;

flywheel_store::for_each_backend!(
    the_seeds_scenario_runs_end_to_end,
    retries_and_caps_never_fire_twice_and_a_reconnecting_stream_gets_what_it_missed,
    identity_verification_guards_a_users_reads,
    refusals_have_documented_codes,
    without_consent_a_prompt_action_changes_the_prompt_and_stores_no_event,
);

struct App {
    server: RunningServer,
    _db: TestDatabase,
    secret: Client,
    publishable: Client,
    publishable_key: String,
}

async fn spawn(backend: Backend) -> App {
    let db = TestDatabase::create(backend).await;
    let mut settings = common::test_settings(&db);
    settings.webhooks.poll_interval_ms = 50;
    let started = common::start(settings, Arc::new(SystemClock)).await;
    App {
        server: started.server,
        _db: db,
        secret: started.secret,
        publishable: started.publishable,
        publishable_key: started
            .publishable_key
            .expect("a fresh store bootstraps keys"),
    }
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// A minimal SSE reader over a streaming response.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(
        app: &App,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Self, (StatusCode, Value)> {
        let url = format!("{}/v1/stream?{query}", app.server.base_url());
        let mut request = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err((status, response.json().await.unwrap_or(Value::Null)));
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event (heartbeat comments skipped), or `None` after 5 s.
    async fn next(&mut self) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (heartbeat)
                }
                return Some(Sse {
                    id,
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event named `name`, skipping others.
    async fn next_named(&mut self, name: &str) -> Option<Sse> {
        loop {
            let event = self.next().await?;
            if event.event == name {
                return Some(event);
            }
        }
    }
}

/// Opens a stream that must be refused: its status and error code.
async fn refused(app: &App, query: &str, last_event_id: Option<&str>) -> (StatusCode, Value) {
    match EventStream::open(app, query, last_event_id).await {
        Ok(_) => panic!("the stream {query} was not refused"),
        Err((status, body)) => (status, body["error"]["code"].clone()),
    }
}

fn catalog() -> Value {
    json!({
        "features": [{"key": "projects", "name": "Projects", "kind": "metered"}],
        "meters": [{"key": "projects_created", "feature": "projects", "event": "project_created", "aggregation": "COUNT"}],
        "plans": [
            {"key": "free", "name": "Free", "default": true,
             "features": {"projects": {"limit": 5, "reset": "never", "warn_at": 0.8}}},
            {"key": "pro", "name": "Pro", "price": {"amount": 2900, "currency": "usd"},
             "features": {"projects": {"limit": "unlimited", "reset": "never"}}}
        ]
    })
}

/// Waits (bounded) for a webhook of `event_type` and returns its headers
/// and body.
async fn webhook(seen: &common::Webhooks, event_type: &str) -> (Value, String) {
    for _ in 0..200 {
        let found = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(_, body)| serde_json::from_str::<Value>(body).unwrap()["type"] == event_type)
            .cloned();
        if let Some(found) = found {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {event_type} webhook arrived");
}

fn project_created(n: u128, user: &str, org: &str) -> Value {
    json!({"event_id": uuid::Uuid::from_u128(n), "type": "track", "event": "project_created",
           "user_id": user, "org_id": org})
}

async fn track(app: &App, events: Vec<Value>) {
    let (status, answer) = call(
        &app.publishable,
        Method::POST,
        "/v1/events",
        Some(json!({"batch": events})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

async fn the_seeds_scenario_runs_end_to_end(backend: Backend) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, body) = call(s, Method::PUT, "/v1/catalog", Some(catalog())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = call(
        s,
        Method::PUT,
        "/v1/activation-rules",
        Some(json!({"rules": [
            {"key": "three_projects", "scope": "user", "conditions": ["project_created >= 3"],
             "within_days": 14, "activation": true}
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The copy experiment is an ordinary flag: alice lands in `bold`.
    let (status, _) = call(s, Method::PUT, "/v1/flags/upgrade-copy", Some(json!({
        "state": "ENABLED", "variants": {"plain": "plain", "bold": "bold", "holdout": "holdout"},
        "defaultVariant": "plain",
        "targeting": {"if": [{"==": [{"var": "targetingKey"}, "alice"]}, "bold", "holdout"]}
    }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, written) = call(s, Method::PUT, "/v1/prompt-rules", Some(json!({"prompts": [{
        "key": "activated_upgrade", "name": "Upgrade after activation",
        "trigger": {"on": "milestone", "milestone": "three_projects", "feature": "projects"},
        "audience": {"flag": "upgrade-copy"},
        "variants": {
            "plain": {"title": "{{used}} of {{limit}} {{feature_name}} used", "body": "Upgrade to {{upgrade_plan_name}}"},
            "bold": {"title": "You have used {{used}} of {{limit}} {{feature_name}}",
                     "body": "{{upgrade_plan_name}} lifts the limit: {{upgrade_url}}", "cta": "Go {{upgrade_plan_name}}"}
        },
        "upgrade_url": "https://app.example.com/billing?plan={{upgrade_plan}}",
        "frequency": {"once_every_hours": 72}, "priority": 10
    }]}))).await;
    assert_eq!(
        (status, written["version"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{written}"
    );
    let (url, seen) = common::receiver_failing_first(false).await;
    let (status, endpoint) = call(
        s,
        Method::POST,
        "/v1/webhook-endpoints",
        Some(json!({"url": url, "event_types": ["prompt.created", "prompt.converted"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = WebhookSecret::parse(endpoint["secret"].as_str().unwrap()).unwrap();

    let (status, alice) = call(s, Method::POST, "/v1/signup", Some(json!({
        "user_id": "alice", "email": "alice@example.com", "org_name": "Acme", "idempotency_key": "signup-alice"
    }))).await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    let org = alice["org"]["org_id"].as_str().unwrap().to_owned();

    // Alice's browser opens her stream with the publishable key.
    let mut stream = EventStream::open(
        &app,
        &format!("user_id=alice&key={}", app.publishable_key),
        None,
    )
    .await
    .unwrap();
    let first = stream.next().await.expect("the flags event on connect");
    assert_eq!(first.event, "flags");
    assert!(first.id.is_none());

    track(
        &app,
        vec![
            project_created(1, "alice", &org),
            project_created(2, "alice", &org),
        ],
    )
    .await;
    let (_, none) = call(s, Method::GET, "/v1/prompts?user_id=alice", None).await;
    assert_eq!(none["prompts"], json!([]));
    // The third project: the milestone, then the prompt on the open stream.
    track(&app, vec![project_created(3, "alice", &org)]).await;
    let live = stream
        .next_named("prompt")
        .await
        .expect("the prompt arrives on the open stream");
    let prompt = live.data.clone();
    assert!(live.id.is_some());
    assert_eq!(prompt["rule"], "activated_upgrade");
    assert_eq!(prompt["user_id"], "alice");
    assert_eq!(prompt["org_id"], json!(org));
    assert_eq!(prompt["variant"], "bold");
    assert_eq!(prompt["flag"], "upgrade-copy");
    assert_eq!(prompt["trigger"], "milestone");
    assert_eq!(prompt["title"], "You have used 3 of 5 Projects");
    assert_eq!(
        prompt["body"],
        "Pro lifts the limit: https://app.example.com/billing?plan=pro"
    );
    assert_eq!(prompt["cta"], "Go Pro");
    assert_eq!(prompt["status"], "pending");
    let prompt_id = prompt["id"].as_str().unwrap().to_owned();

    // Milestone with time-to-value, and the derived event in the stream.
    let (_, milestones) = call(s, Method::GET, "/v1/users/alice/milestones", None).await;
    assert_eq!(milestones["milestones"][0]["rule"], "three_projects");
    assert!(
        milestones["milestones"][0]["seconds_to_value"]
            .as_i64()
            .unwrap()
            >= 0
    );
    let (_, crossed) = call(
        s,
        Method::GET,
        "/v1/events?event=activation_threshold_crossed",
        None,
    )
    .await;
    assert_eq!(crossed["events"].as_array().unwrap().len(), 1);

    // A retried third event fires nothing again.
    track(&app, vec![project_created(3, "alice", &org)]).await;

    // decide: flags, entitlements with usage, the pending prompt, the stream.
    let (status, decided) = call(
        &app.publishable,
        Method::POST,
        "/v1/decide",
        Some(json!({"user_id": "alice"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(decided["org_id"], json!(org));
    let prompts = decided["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 1, "{decided}");
    assert_eq!(prompts[0]["id"], json!(prompt_id));
    let copy_flag = decided["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "upgrade-copy")
        .unwrap();
    assert_eq!(copy_flag["variant"], "bold");
    let projects = &decided["entitlements"]["entitlements"][0];
    assert_eq!(
        (
            projects["feature"].clone(),
            projects["used"].clone(),
            projects["limit"].clone()
        ),
        (json!("projects"), json!(3), json!(5))
    );
    assert!(decided["stream_url"]
        .as_str()
        .unwrap()
        .starts_with("/v1/stream?user_id=alice"));

    // The webhook arrives, signed (Standard Webhooks).
    let (headers, body) = webhook(&seen, "prompt.created").await;
    let header = |name: &str| headers[name].as_str().unwrap().to_owned();
    verify(
        &secret,
        &header("webhook-id"),
        &header("webhook-timestamp"),
        &header("webhook-signature"),
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
        300,
    )
    .expect("the signature verifies");
    let delivered: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(delivered["data"]["id"], json!(prompt_id));
    assert_eq!(seen.lock().unwrap().len(), 1, "one prompt, one webhook");

    // Shown, then clicked: recorded as events; no longer pending.
    for action in ["shown", "clicked", "clicked"] {
        let (status, after) = call(
            &app.publishable,
            Method::POST,
            &format!("/v1/prompts/{prompt_id}/events"),
            Some(json!({"type": action})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{after}");
    }
    let (_, clicked) = call(s, Method::GET, &format!("/v1/prompts/{prompt_id}"), None).await;
    assert_eq!(clicked["status"], "clicked");
    assert!(
        clicked["shown_at"].is_string() && clicked["clicked_at"].is_string(),
        "{clicked}"
    );
    let (_, events) = call(s, Method::GET, "/v1/events?event=$prompt_clicked", None).await;
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "clicking twice records one event");
    assert_eq!(events[0]["properties"]["variant"], "bold");
    let (_, pending) = call(s, Method::GET, "/v1/prompts?user_id=alice", None).await;
    assert_eq!(pending["prompts"], json!([]));

    // The org upgrades: limits lift, the stream hears it, the conversion is
    // credited to the prompt and its variant.
    let (status, upgraded) = call(
        s,
        Method::POST,
        &format!("/v1/orgs/{org}/subscription"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{upgraded}");
    let (_, check) = call(
        &app.publishable,
        Method::POST,
        "/v1/check",
        Some(json!({"org_id": org, "feature": "projects", "required": 100})),
    )
    .await;
    assert_eq!(
        (check["allowed"].clone(), check["unlimited"].clone()),
        (json!(true), json!(true)),
        "{check}"
    );
    let change = stream
        .next_named("entitlements")
        .await
        .expect("the plan change on the stream");
    assert_eq!(change.data["type"], "subscription.changed");
    assert_eq!(change.data["plan"], "pro");
    let (_, converted) = call(s, Method::GET, &format!("/v1/prompts/{prompt_id}"), None).await;
    assert_eq!(converted["converted_plan"], "pro", "{converted}");
    assert!(converted["converted_at"].is_string());
    let (_, conversion) = webhook(&seen, "prompt.converted").await;
    let conversion: Value = serde_json::from_str(&conversion).unwrap();
    assert_eq!(conversion["data"]["variant"], "bold");
    assert_eq!(conversion["data"]["prompt_id"], json!(prompt_id));
    let (_, stats) = call(s, Method::GET, "/v1/prompts/stats", None).await;
    assert_eq!(
        stats["stats"],
        json!([{"rule": "activated_upgrade", "variant": "bold", "created": 1,
        "shown": 1, "clicked": 1, "dismissed": 0, "converted": 1}])
    );

    // Deleting alice deletes her prompts too.
    let (status, _) = call(s, Method::DELETE, "/v1/users/alice", None).await;
    assert!(status.is_success(), "{status}");
    let (status, _) = call(s, Method::GET, &format!("/v1/prompts/{prompt_id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, stats) = call(s, Method::GET, "/v1/prompts/stats", None).await;
    assert_eq!(stats["stats"], json!([]));
}

async fn retries_and_caps_never_fire_twice_and_a_reconnecting_stream_gets_what_it_missed(
    backend: Backend,
) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, body) = call(s, Method::PUT, "/v1/catalog", Some(catalog())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(s, Method::PUT, "/v1/prompt-rules", Some(json!({"prompts": [
        {"key": "nearly_full", "trigger": {"on": "usage_warning", "feature": "projects"},
         "content": {"title": "{{used}} of {{limit}} {{feature_name}}", "body": "{{remaining}} left on {{plan_name}}"},
         "frequency": "once"},
        {"key": "full", "trigger": {"on": "limit_reached"},
         "content": {"title": "{{feature_name}} limit reached", "body": "Upgrade to {{upgrade_plan_name}}"},
         "frequency": {"once_every_hours": 72}, "priority": 5}
    ]}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let consume = |n: u32| {
        json!({"org_id": "acme", "feature": "projects", "amount": 1,
                                 "idempotency_key": format!("c{n}"), "user_id": "bob"})
    };
    let mut stream = EventStream::open(
        &app,
        &format!("user_id=bob&org_id=acme&key={}", app.publishable_key),
        None,
    )
    .await
    .unwrap();
    assert_eq!(stream.next().await.unwrap().event, "flags");
    for n in 1..=4 {
        let (status, answer) = call(s, Method::POST, "/v1/consume", Some(consume(n))).await;
        assert_eq!(
            (status, answer["allowed"].clone()),
            (StatusCode::OK, json!(true)),
            "{answer}"
        );
    }
    // The fourth of five passed warn_at (80 %): the change, then one
    // warning prompt, live.
    let mut delivered = std::collections::HashSet::new();
    let warning = loop {
        let event = stream.next().await.expect("the warning prompt");
        delivered.extend(event.id.clone());
        if event.event == "prompt" {
            break event;
        }
        assert_eq!(event.data["type"], "usage.warning", "{event:?}");
    };
    assert_eq!(warning.data["rule"], "nearly_full");
    assert_eq!(warning.data["title"], "4 of 5 Projects");
    assert_eq!(warning.data["body"], "1 left on Free");
    let warned_id = warning.id.clone().unwrap();
    // A retried consume (same key) replays and fires nothing.
    let (_, replayed) = call(s, Method::POST, "/v1/consume", Some(consume(4))).await;
    assert_eq!(replayed["used"], 4);

    // Bob's connection drops; meanwhile the limit is reached and then a
    // consume is denied (capped: no second `full` prompt).
    drop(stream);
    let (_, fifth) = call(s, Method::POST, "/v1/consume", Some(consume(5))).await;
    assert_eq!(fifth["remaining"], 0, "{fifth}");
    for n in 6..=8 {
        let (_, denied) = call(s, Method::POST, "/v1/consume", Some(consume(n))).await;
        assert_eq!(
            (denied["allowed"].clone(), denied["reason"].clone()),
            (json!(false), json!("limit_reached"))
        );
    }
    let mut resumed = EventStream::open(
        &app,
        &format!("user_id=bob&org_id=acme&key={}", app.publishable_key),
        Some(&warned_id),
    )
    .await
    .unwrap();
    assert_eq!(resumed.next().await.unwrap().event, "flags");
    let mut missed = Vec::new();
    while let Some(event) = resumed.next().await {
        missed.push(event.clone());
        if event.event == "prompt" && event.data["rule"] == "full" {
            break;
        }
    }
    let kinds: Vec<(String, Value)> = missed
        .iter()
        .map(|event| {
            (
                event.event.clone(),
                event
                    .data
                    .get("type")
                    .or(event.data.get("rule"))
                    .cloned()
                    .unwrap(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("entitlements".into(), json!("usage.limit_reached"))),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("prompt".into(), json!("full"))),
        "{kinds:?}"
    );
    let fresh_warning = missed.iter().any(|event| {
        event.data["rule"] == "nearly_full" && !delivered.contains(event.id.as_ref().unwrap())
    });
    assert!(!fresh_warning, "the warning prompt fired once: {kinds:?}");
    let full = missed.iter().find(|e| e.data["rule"] == "full").unwrap();
    assert_eq!(full.data["title"], "Projects limit reached");
    assert_eq!(full.data["body"], "Upgrade to Pro");
    for event in &missed {
        let id = event.id.clone().unwrap();
        let after = id.parse::<i64>().unwrap() > warned_id.parse::<i64>().unwrap();
        // PostgreSQL re-sends what committed in the last seconds below the
        // cursor (numbers can commit out of order there): only what this
        // client already had, never something new it skipped.
        let resent = backend == Backend::Postgres && delivered.contains(&id);
        assert!(after || resent, "{missed:?}");
    }
    let (_, listed) = call(s, Method::GET, "/v1/prompts?user_id=bob", None).await;
    let rules: Vec<&Value> = listed["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["rule"])
        .collect();
    assert_eq!(
        rules,
        [&json!("full"), &json!("nearly_full")],
        "priority first: {listed}"
    );
    // Dismissed: no longer pending.
    let id = listed["prompts"][0]["id"].as_str().unwrap();
    let (status, dismissed) = call(
        &app.publishable,
        Method::POST,
        &format!("/v1/prompts/{id}/events"),
        Some(json!({"type": "dismissed"})),
    )
    .await;
    assert_eq!(
        (status, dismissed["status"].clone()),
        (StatusCode::OK, json!("dismissed"))
    );
    let (_, listed) = call(s, Method::GET, "/v1/prompts?user_id=bob", None).await;
    assert_eq!(listed["prompts"].as_array().unwrap().len(), 1);
    let (_, stats) = call(s, Method::GET, "/v1/prompts/stats", None).await;
    let created: Vec<i64> = stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["created"].as_i64().unwrap())
        .collect();
    assert_eq!(created, [1, 1], "{stats}");
}

async fn identity_verification_guards_a_users_reads(backend: Backend) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, identity) = call(s, Method::GET, "/v1/project/identity-secret", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(identity["required"], false);
    let secret = identity["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("idv_"));
    let (_, again) = call(s, Method::GET, "/v1/project/identity-secret", None).await;
    assert_eq!(again["secret"], json!(secret), "generated once");
    let (status, _) = call(
        &app.publishable,
        Method::GET,
        "/v1/project/identity-secret",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Off by default: a user id is enough.
    assert!(EventStream::open(
        &app,
        &format!("user_id=carol&key={}", app.publishable_key),
        None
    )
    .await
    .is_ok());

    let (status, settings) = call(s, Method::GET, "/v1/project/settings", None).await;
    assert_eq!(status, StatusCode::OK);
    let mut settings = settings;
    settings["identity_verification"] = json!(true);
    let (status, body) = call(s, Method::PUT, "/v1/project/settings", Some(settings)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let key = &app.publishable_key;
    assert_eq!(
        refused(&app, &format!("user_id=carol&key={key}"), None).await,
        (StatusCode::UNAUTHORIZED, json!("user_hash_required"))
    );
    let forged = user_hash(&secret, "mallory");
    assert_eq!(
        refused(
            &app,
            &format!("user_id=carol&user_hash={forged}&key={key}"),
            None
        )
        .await,
        (StatusCode::FORBIDDEN, json!("invalid_user_hash"))
    );
    let signed = user_hash(&secret, "carol");
    assert!(EventStream::open(
        &app,
        &format!("user_id=carol&user_hash={signed}&key={key}"),
        None
    )
    .await
    .is_ok());
    // An org the user does not belong to cannot be followed.
    assert_eq!(
        refused(
            &app,
            &format!("user_id=carol&org_id=acme&user_hash={signed}&key={key}"),
            None
        )
        .await,
        (StatusCode::FORBIDDEN, json!("org_not_permitted"))
    );
    // The same for decide and the prompt list; the secret key is trusted.
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        "/v1/decide",
        Some(json!({"user_id": "carol"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, decided) = call(
        &app.publishable,
        Method::POST,
        "/v1/decide",
        Some(json!({"user_id": "carol", "user_hash": signed})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert!(decided["stream_url"]
        .as_str()
        .unwrap()
        .contains("user_hash="));
    let (status, _) = call(
        &app.publishable,
        Method::GET,
        "/v1/prompts?user_id=carol",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &app.publishable,
        Method::GET,
        &format!("/v1/prompts?user_id=carol&user_hash={signed}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(s, Method::GET, "/v1/prompts?user_id=carol", None).await;
    assert_eq!(status, StatusCode::OK);
}

async fn refusals_have_documented_codes(backend: Backend) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, bad) = call(
        s,
        Method::PUT,
        "/v1/prompt-rules",
        Some(json!({"prompts": [
            {"key": "k", "trigger": {"on": "milestone", "milestone": "m"},
             "content": {"title": "{{usd}}", "body": ""}}
        ]})),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_prompt_rules"))
    );
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/prompts/0/content/title"),
        "{bad}"
    );
    let (status, bad) = call(
        s,
        Method::PUT,
        "/v1/prompt-rules",
        Some(json!({"prompts": [
            {"key": "k", "trigger": {"on": "timer"}, "content": {"title": "t", "body": ""}}
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, _) = call(
        &app.publishable,
        Method::PUT,
        "/v1/prompt-rules",
        Some(json!({"prompts": []})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, read) = call(s, Method::GET, "/v1/prompt-rules", None).await;
    assert_eq!(
        (status, read["version"].clone()),
        (StatusCode::OK, json!(0))
    );
    let unknown = "prm_0123456789abcdef0123456789abcdef";
    for path in [
        format!("/v1/prompts/{unknown}"),
        "/v1/prompts/nonsense".to_owned(),
    ] {
        let (status, body) = call(s, Method::GET, &path, None).await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (StatusCode::NOT_FOUND, json!("prompt_not_found"))
        );
    }
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        &format!("/v1/prompts/{unknown}/events"),
        Some(json!({"type": "shown"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("prompt_not_found"))
    );
    let (status, _) = call(
        &app.publishable,
        Method::POST,
        &format!("/v1/prompts/{unknown}/events"),
        Some(json!({"type": "liked"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = call(
        &app.publishable,
        Method::POST,
        "/v1/decide",
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("missing_identity"))
    );
    let (status, _) = call(
        &app.publishable,
        Method::GET,
        "/v1/prompts?user_id=a&limit=1000",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused(&app, "user_id=a", None).await,
        (StatusCode::UNAUTHORIZED, json!("missing_api_key"))
    );
    let query = format!("user_id=a&key={}", app.publishable_key);
    assert_eq!(
        refused(&app, &query, Some("yesterday")).await,
        (StatusCode::BAD_REQUEST, json!("invalid_last_event_id"))
    );
    // A mistyped parameter is a 400 in the error envelope, like a body.
    let query = format!("user_id=a&last_event_id=soon&key={}", app.publishable_key);
    assert_eq!(
        refused(&app, &query, None).await,
        (StatusCode::BAD_REQUEST, json!("invalid_query"))
    );
    let (status, body) = call(s, Method::GET, "/v1/prompts?user_id=a&limit=many", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_query"))
    );
    let query = format!("user_id={}&key={}", "x".repeat(300), app.publishable_key);
    assert_eq!(refused(&app, &query, None).await.0, StatusCode::BAD_REQUEST);
}

async fn without_consent_a_prompt_action_changes_the_prompt_and_stores_no_event(backend: Backend) {
    let app = spawn(backend).await;
    let s = &app.secret;
    let (status, body) = call(s, Method::PUT, "/v1/catalog", Some(catalog())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(
        s,
        Method::PUT,
        "/v1/prompt-rules",
        Some(json!({"prompts": [
            {"key": "nearly_full", "trigger": {"on": "usage_warning", "feature": "projects"},
             "content": {"title": "{{used}} of {{limit}}"}, "frequency": "once"},
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(
        s,
        Method::PUT,
        "/v1/project/settings",
        Some(json!({"require_analytics_consent": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for n in 1..=4 {
        let (status, _) = call(
            s,
            Method::POST,
            "/v1/consume",
            Some(json!({
                "org_id": "acme", "feature": "projects", "amount": 1,
                "idempotency_key": format!("c{n}"), "user_id": "erin"
            })),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, pending) = call(s, Method::GET, "/v1/prompts?user_id=erin", None).await;
    let prompt_id = pending["prompts"][0]["id"]
        .as_str()
        .expect("a prompt")
        .to_owned();
    let path = format!("/v1/prompts/{prompt_id}/events");
    let act = |body: Value| call(&app.publishable, Method::POST, &path, Some(body));
    // Shown with consent: the event is stored.
    let (status, shown) = act(json!({"type": "shown", "consent": {"analytics": true}})).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert!(shown["shown_at"].is_string(), "{shown}");
    // Dismissed without: the prompt is dismissed all the same, no event.
    let (status, dismissed) = act(json!({"type": "dismissed"})).await;
    assert_eq!(status, StatusCode::OK, "{dismissed}");
    assert!(dismissed["dismissed_at"].is_string(), "{dismissed}");
    assert_eq!(dismissed["status"], "dismissed", "{dismissed}");
    let (_, pending) = call(s, Method::GET, "/v1/prompts?user_id=erin", None).await;
    assert_eq!(pending["prompts"], json!([]));
    for (name, count) in [("$prompt_shown", 1), ("$prompt_dismissed", 0)] {
        let (_, events) = call(s, Method::GET, &format!("/v1/events?event={name}"), None).await;
        assert_eq!(events["events"].as_array().unwrap().len(), count, "{name}");
    }
    // Repeating it changes nothing.
    let (_, again) = act(json!({"type": "dismissed"})).await;
    assert_eq!(again["dismissed_at"], dismissed["dismissed_at"]);
}
