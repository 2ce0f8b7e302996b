//! Billing in the store, on every backend: the catalog's versions, org
//! requests (atomic, idempotent, race-free across connections), and meters
//! applied in the transaction that commits their events.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use flywheel_domain::billing::org::{OrgCommand, SubscriptionStatus};
use flywheel_domain::billing::{Catalog, Reply};
use flywheel_domain::events::{Event, EventType, Source};
use flywheel_domain::project::{Project, ProjectId};
use flywheel_store::testing::TestDatabase;
use flywheel_store::{
    Backend, Billing, CommitResult, EncodedEvent, EventBatch, OrgRequest, OrgResult, Store,
};
use serde_json::json;
use uuid::Uuid;

flywheel_store::for_each_backend!(
    catalog_versions_are_appended_and_compiled_into_the_config,
    consume_is_idempotent_and_a_reused_key_is_refused,
    concurrent_consumers_on_two_connections_never_overrun_a_hard_limit,
    concurrent_batches_on_two_connections_never_overrun_a_hard_limit,
    groups_over_many_orgs_in_any_order_never_deadlock_and_count_exactly,
    a_group_creates_each_new_org_as_of_its_first_request,
    org_state_round_trips_with_subscription_grants_and_overrides,
    meters_count_new_events_in_their_commit_and_never_duplicates,
);

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
}

fn catalog_json() -> serde_json::Value {
    json!({
        "features": [
            {"key": "api_calls", "kind": "metered"},
            {"key": "viewers", "kind": "metered"},
            {"key": "sso", "kind": "boolean"}
        ],
        "meters": [
            {"key": "api", "feature": "api_calls", "event": "api_call", "aggregation": "COUNT",
             "filters": [{"property": "billable", "op": "ne", "value": false}]},
            {"key": "viewers", "feature": "viewers", "event": "doc_viewed", "aggregation": "UNIQUE_COUNT",
             "property": "viewer"}
        ],
        "plans": [
            {"key": "free", "default": true, "features": {
                "api_calls": {"limit": 10}, "viewers": {"limit": 100}}},
            {"key": "pro", "price": {"amount": 2900, "currency": "usd"}, "features": {
                "api_calls": {"limit": 1000}, "viewers": {"limit": 1000}, "sso": {}}}
        ]
    })
}

fn billing() -> Billing {
    Billing::new(
        Arc::new(Catalog::compile(serde_json::from_value(catalog_json()).unwrap()).unwrap()),
        Duration::days(7),
    )
}

async fn setup(backend: Backend) -> (TestDatabase, Arc<dyn Store>, Project) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let project = Project {
        id: ProjectId::new_v7(),
        name: "p".into(),
        created_at: at(0),
    };
    store.create_project(&project, &[]).await.unwrap();
    (db, store, project)
}

fn request(
    project: &Project,
    org: &str,
    command: OrgCommand,
    key: Option<&str>,
    now: DateTime<Utc>,
) -> OrgRequest {
    OrgRequest {
        project: project.id,
        org_id: org.into(),
        command,
        idempotency_key: key.map(Into::into),
        billing: billing(),
        now,
        actor_user_id: None,
    }
}

fn consume(amount: i64) -> OrgCommand {
    OrgCommand::Consume {
        feature: "api_calls".into(),
        amount,
    }
}

fn used(result: &OrgResult) -> (bool, Option<i64>) {
    match result {
        OrgResult::Applied(Reply::Usage(answer)) | OrgResult::Replayed(Reply::Usage(answer)) => {
            (answer.allowed, answer.used)
        }
        other => panic!("unexpected {other:?}"),
    }
}

async fn catalog_versions_are_appended_and_compiled_into_the_config(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let empty = store.load_project_config(p.id).await.unwrap().unwrap();
    assert_eq!(empty.catalog_version, 0);
    assert!(empty.catalog.default_plan().is_none());
    let first = store
        .write_catalog(p.id, &catalog_json(), "key:a", at(1))
        .await
        .unwrap();
    let mut changed = catalog_json();
    changed["plans"][0]["features"]["api_calls"]["limit"] = json!(20);
    let second = store
        .write_catalog(p.id, &changed, "key:b", at(2))
        .await
        .unwrap();
    assert_eq!((first.version, second.version), (1, 2));
    let config = store.load_project_config(p.id).await.unwrap().unwrap();
    assert_eq!(config.catalog_version, 2);
    assert_eq!(config.catalog.default_plan().unwrap().key, "free");
    let history = store.catalog_history(p.id).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[0].actor.as_str(), history[0].created_at),
        ("key:a", at(1))
    );
    assert_eq!(history[1].document, changed);
    assert!(
        store.latest_config_seq().await.unwrap() >= 2,
        "each write is a config change"
    );
}

async fn consume_is_idempotent_and_a_reused_key_is_refused(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let commit = store
        .execute_org_requests(&[
            request(&p, "acme", consume(4), Some("k1"), at(10)),
            // A retry in the same group: the first answer, counted once.
            request(&p, "acme", consume(4), Some("k1"), at(10)),
            request(&p, "acme", consume(7), Some("k2"), at(10)),
        ])
        .await
        .unwrap();
    assert_eq!(used(&commit.results[0]), (true, Some(4)));
    assert!(matches!(commit.results[1], OrgResult::Replayed(_)));
    assert_eq!(used(&commit.results[1]), (true, Some(4)));
    assert_eq!(
        used(&commit.results[2]),
        (false, Some(4)),
        "4 + 7 > 10: refused"
    );
    assert_eq!(commit.orgs.len(), 1);
    assert_eq!(commit.orgs[0].1.version, 1);
    // Later retries replay the first answers, even the refusal.
    let later = store
        .execute_org_requests(&[
            request(&p, "acme", consume(4), Some("k1"), at(20)),
            request(&p, "acme", consume(7), Some("k2"), at(20)),
            request(&p, "acme", consume(5), Some("k1"), at(20)),
        ])
        .await
        .unwrap();
    assert_eq!(used(&later.results[0]), (true, Some(4)));
    assert_eq!(used(&later.results[1]), (false, Some(4)));
    assert_eq!(later.results[2], OrgResult::KeyReused);
    assert_eq!(later.orgs[0].1.version, 1, "nothing changed");
    let state = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(state.usage["api_calls"].used(), 4);
    // A domain refusal changes nothing and records no key.
    let bad = store
        .execute_org_requests(&[request(
            &p,
            "acme",
            OrgCommand::Consume {
                feature: "sso".into(),
                amount: 1,
            },
            Some("k3"),
            at(30),
        )])
        .await
        .unwrap();
    assert!(matches!(&bad.results[0], OrgResult::Rejected(e) if e.code == "feature_not_metered"));
}

async fn concurrent_consumers_on_two_connections_never_overrun_a_hard_limit(backend: Backend) {
    let (db, store, p) = setup(backend).await;
    // A second store on the same database: another node (its own pool).
    let other = db.open().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let request = request(&p, "acme", consume(1), Some(&format!("k{i}")), at(10));
            tokio::spawn(async move { store.execute_org_requests(&[request]).await })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        let commit = task.await.unwrap().unwrap();
        if used(&commit.results[0]).0 {
            granted += 1;
        }
    }
    assert_eq!(granted, 10, "exactly the limit");
    let state = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(state.usage["api_calls"].used(), 10);
}

async fn concurrent_batches_on_two_connections_never_overrun_a_hard_limit(backend: Backend) {
    let (db, store, p) = setup(backend).await;
    let other = db.open().await;
    // Group-committed batches (as the server's writer sends them), racing
    // from two nodes on a fresh org.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let requests: Vec<OrgRequest> = (0..10)
                .map(|j| {
                    request(
                        &p,
                        "acme",
                        consume(1),
                        Some(&format!("k{i}-{j}")),
                        Utc::now(),
                    )
                })
                .collect();
            tokio::spawn(async move { store.execute_org_requests(&requests).await })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        let commit = task.await.unwrap().unwrap();
        granted += commit.results.iter().filter(|r| used(r).0).count();
    }
    let state = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(
        (granted, state.usage["api_calls"].used()),
        (10, 10),
        "exactly the limit"
    );
}

async fn groups_over_many_orgs_in_any_order_never_deadlock_and_count_exactly(backend: Backend) {
    let (db, store, p) = setup(backend).await;
    let q = Project {
        id: ProjectId::new_v7(),
        name: "q".into(),
        created_at: at(0),
    };
    store.create_project(&q, &[]).await.unwrap();
    let other = db.open().await;
    let orgs: Vec<String> = (0..6).map(|i| format!("org-{i}")).collect();
    // Group-committed batches from two nodes, each naming every org of both
    // projects (all new at first) in a different order: the stores must lock
    // in one global order whatever the order of the requests.
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let mut names: Vec<&String> = orgs.iter().collect();
            names.rotate_left(i % orgs.len());
            if i % 2 == 1 {
                names.reverse();
            }
            let projects = if i % 3 == 0 { [&q, &p] } else { [&p, &q] };
            let requests: Vec<OrgRequest> = projects
                .iter()
                .flat_map(|project| {
                    names.iter().map(move |org| {
                        request(
                            project,
                            org,
                            consume(1),
                            Some(&format!("k{i}-{org}")),
                            Utc::now(),
                        )
                    })
                })
                .collect();
            tokio::spawn(async move {
                let commit = store.execute_org_requests(&requests).await.unwrap();
                requests
                    .into_iter()
                    .zip(commit.results)
                    .filter(|(_, result)| used(result).0)
                    .map(|(request, _)| (request.project, request.org_id))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut granted = std::collections::HashMap::new();
    for task in tasks {
        let done = tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .expect("no group waits forever");
        for key in done.unwrap() {
            *granted.entry(key).or_insert(0) += 1;
        }
    }
    for project in [&p, &q] {
        for org in &orgs {
            assert_eq!(
                granted.get(&(project.id, org.clone())),
                Some(&10),
                "{} {org}",
                project.name
            );
            let state = store.load_org(project.id, org).await.unwrap().unwrap();
            assert_eq!(
                state.usage["api_calls"].used(),
                10,
                "{} {org}",
                project.name
            );
        }
    }
}

async fn a_group_creates_each_new_org_as_of_its_first_request(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let commit = store
        .execute_org_requests(&[
            request(&p, "acme", consume(1), Some("a1"), at(10)),
            request(&p, "beta", consume(2), Some("b1"), at(20)),
            request(&p, "acme", consume(3), Some("a2"), at(30)),
        ])
        .await
        .unwrap();
    let results: Vec<_> = commit.results.iter().map(used).collect();
    assert_eq!(results, [(true, Some(1)), (true, Some(2)), (true, Some(4))]);
    let acme = store.load_org(p.id, "acme").await.unwrap().unwrap();
    let beta = store.load_org(p.id, "beta").await.unwrap().unwrap();
    assert_eq!((acme.created_at, beta.created_at), (at(10), at(20)));
    assert_eq!(
        (
            acme.usage["api_calls"].used(),
            beta.usage["api_calls"].used()
        ),
        (4, 2)
    );
    // Both are in the commit, as each one's latest state.
    let mut orgs: Vec<&str> = commit
        .orgs
        .iter()
        .map(|(_, state)| state.org_id.as_str())
        .collect();
    orgs.sort();
    assert_eq!(orgs, ["acme", "beta"]);
}

async fn org_state_round_trips_with_subscription_grants_and_overrides(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    assert!(store.load_org(p.id, "acme").await.unwrap().is_none());
    let grant_id = Uuid::now_v7();
    let commit = store
        .execute_org_requests(&[
            request(
                &p,
                "acme",
                OrgCommand::ChangePlan {
                    plan: "pro".into(),
                    timing: None,
                },
                None,
                at(10),
            ),
            request(
                &p,
                "acme",
                OrgCommand::SetStatus {
                    status: SubscriptionStatus::PastDue,
                },
                None,
                at(11),
            ),
            request(
                &p,
                "acme",
                OrgCommand::AddGrant {
                    id: grant_id,
                    feature: "api_calls".into(),
                    amount: 50,
                    expires_at: Some(at(86_400)),
                    reason: Some("top-up".into()),
                },
                None,
                at(12),
            ),
            request(
                &p,
                "acme",
                OrgCommand::SetOverride {
                    feature: "viewers".into(),
                    entry: Some(
                        serde_json::from_value(json!({"limit": 5, "hard": false})).unwrap(),
                    ),
                },
                None,
                at(13),
            ),
            request(&p, "acme", consume(1010), None, at(14)),
        ])
        .await
        .unwrap();
    assert!(
        commit
            .results
            .iter()
            .all(|r| matches!(r, OrgResult::Applied(_))),
        "{:?}",
        commit.results
    );
    let cached = commit.orgs[0].1.clone();
    let loaded = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(*cached, loaded, "what the writer returns is what is stored");
    let subscription = loaded.subscription.as_ref().unwrap();
    assert_eq!(
        (subscription.plan.as_str(), subscription.status),
        ("pro", SubscriptionStatus::PastDue)
    );
    assert_eq!(subscription.past_due_since, Some(at(11)));
    assert_eq!(loaded.grants.len(), 1);
    assert_eq!(
        (loaded.grants[0].id, loaded.grants[0].remaining),
        (grant_id, 40)
    );
    assert_eq!(loaded.usage["api_calls"].plan_used, 1000);
    assert_eq!(loaded.usage["api_calls"].grant_used, 10);
    assert!(loaded.overrides.contains_key("viewers"));
    assert_eq!(loaded.created_at, at(10));
}

fn track(name: &str, org: Option<&str>, properties: serde_json::Value, seconds: i64) -> Event {
    Event {
        event_id: Uuid::now_v7(),
        event_id_generated: false,
        kind: EventType::Track,
        event: name.into(),
        user_id: Some("u1".into()),
        anonymous_id: None,
        org_id: org.map(Into::into),
        previous_id: None,
        timestamp: at(seconds),
        original_timestamp: None,
        sent_at: None,
        received_at: at(seconds),
        skew_corrected: false,
        future_clamped: false,
        properties: properties.as_object().unwrap().clone(),
        traits: Default::default(),
        context: Default::default(),
        schema_version: None,
        source: Source::Native,
        schema_violations: Vec::new(),
    }
}

fn metered_batch(project: &Project, events: Vec<Event>) -> EventBatch {
    EventBatch {
        project: project.id,
        events: events
            .into_iter()
            .map(|e| EncodedEvent::encode(e).unwrap())
            .collect(),
        billing: Some(billing()),
        activation: None,
    }
}

async fn meters_count_new_events_in_their_commit_and_never_duplicates(backend: Backend) {
    let (_db, store, p) = setup(backend).await;
    let call = track("api_call", Some("acme"), json!({}), 10);
    let events = vec![
        call.clone(),
        track("api_call", Some("acme"), json!({"billable": false}), 10),
        track("api_call", None, json!({}), 10),
        track("api_call", Some("globex"), json!({}), 10),
        track("doc_viewed", Some("acme"), json!({"viewer": "v1"}), 10),
        track("doc_viewed", Some("acme"), json!({"viewer": "v1"}), 10),
        track("doc_viewed", Some("acme"), json!({"viewer": "v2"}), 10),
    ];
    let commit = store
        .commit_events(&[metered_batch(&p, events)])
        .await
        .unwrap();
    assert!(commit.results[0]
        .iter()
        .all(|r| matches!(r, CommitResult::Accepted { .. })));
    let mut orgs: Vec<(String, i64)> = commit
        .orgs
        .iter()
        .map(|(_, s)| (s.org_id.clone(), s.version))
        .collect();
    orgs.sort();
    assert_eq!(orgs, [("acme".to_string(), 1), ("globex".to_string(), 1)]);
    let acme = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(
        acme.usage["api_calls"].used(),
        1,
        "the non-billable call is filtered out"
    );
    assert_eq!(acme.usage["viewers"].used(), 2, "v1 counted once");
    // A retry of the same event is a duplicate: usage unchanged.
    let retry = store
        .commit_events(&[metered_batch(
            &p,
            vec![
                call,
                track("doc_viewed", Some("acme"), json!({"viewer": "v2"}), 20),
            ],
        )])
        .await
        .unwrap();
    assert_eq!(retry.results[0][0], CommitResult::Duplicate);
    let acme = store.load_org(p.id, "acme").await.unwrap().unwrap();
    assert_eq!(acme.usage["api_calls"].used(), 1);
    assert_eq!(
        acme.usage["viewers"].used(),
        2,
        "v2 already counted this period"
    );
}
