//! The store test-suite: written once, run against every backend.
//! Each test gets a fresh database (a temp SQLite file, or a new PostgreSQL
//! database that is dropped afterwards).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use flywheel_domain::events::{Event, EventType, Source};
use flywheel_domain::keys::{GeneratedKey, KeyKind};
use flywheel_domain::privacy::{IpHandling, ProjectSettings, SchemaMode};
use flywheel_domain::project::{ApiKeyRecord, KeyId, Project, ProjectId};
use flywheel_domain::schemas::{EventSchema, PropertyType};
use flywheel_store::testing::TestDatabase;
use flywheel_store::{
    Backend, CommitResult, ConfigSignal, EncodedEvent, EventBatch, EventQuery, Store, StoreError,
};
use uuid::Uuid;

flywheel_store::for_each_backend!(
    ready_after_open_and_reopen_is_idempotent,
    projects_are_created_found_and_listed,
    duplicate_project_names_conflict,
    project_creation_is_atomic,
    keys_need_an_existing_project,
    revocation_is_idempotent_and_scoped_to_the_project,
    configs_carry_active_keys_only,
    every_change_is_recorded_in_order,
    concurrent_writers_all_commit,
    timestamps_round_trip_at_microsecond_precision,
    listener_reports_changes_from_other_connections,
    events_get_sequences_and_duplicates_change_nothing,
    identity_links_resolve_at_read_and_first_link_wins,
    event_queries_filter_and_tail,
    concurrent_event_commits_number_without_gaps,
    concurrent_retries_of_the_same_events_store_each_once,
    settings_and_schemas_are_part_of_the_config,
    deleted_people_are_gone_and_stay_gone,
    identify_traits_merge_into_the_profile_and_go_with_the_person,
    flag_versions_are_appended_compiled_into_the_config_and_restorable,
);

/// A fixed instant with whole microseconds (what both backends keep).
fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_764_000_000 + seconds, 123_456_000)
        .unwrap()
}

fn project(name: &str, created: DateTime<Utc>) -> Project {
    Project {
        id: ProjectId::new_v7(),
        name: name.into(),
        created_at: created,
    }
}

fn key(project: &Project, kind: KeyKind, created: DateTime<Utc>) -> ApiKeyRecord {
    let generated = GeneratedKey::generate(kind, &mut rand::rngs::OsRng);
    ApiKeyRecord {
        id: KeyId(Uuid::now_v7()),
        project_id: project.id,
        kind,
        prefix: generated.prefix(),
        hash: generated.hash(),
        label: Some("test".into()),
        created_at: created,
        revoked_at: None,
    }
}

async fn fresh(backend: Backend) -> (TestDatabase, Arc<dyn Store>) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    assert_eq!(store.backend(), backend);
    (db, store)
}

async fn ready_after_open_and_reopen_is_idempotent(backend: Backend) {
    let (db, store) = fresh(backend).await;
    store.check_ready().await.unwrap();
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    // Opening again re-runs the migrator: nothing to apply, data intact.
    let again = db.open().await;
    again.check_ready().await.unwrap();
    assert_eq!(again.list_projects().await.unwrap(), vec![p]);
}

async fn projects_are_created_found_and_listed(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    assert!(store.list_projects().await.unwrap().is_empty());
    let first = project("first", at(0));
    let second = project("second", at(1));
    store.create_project(&second, &[]).await.unwrap();
    store.create_project(&first, &[]).await.unwrap();
    assert_eq!(
        store.list_projects().await.unwrap(),
        vec![first.clone(), second.clone()],
        "oldest first"
    );
    assert_eq!(
        store.project_by_id(first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.project_by_name("second").await.unwrap(), Some(second));
    assert_eq!(store.project_by_name("third").await.unwrap(), None);
    assert_eq!(
        store.project_by_id(ProjectId::new_v7()).await.unwrap(),
        None
    );
}

async fn duplicate_project_names_conflict(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    store
        .create_project(&project("same", at(0)), &[])
        .await
        .unwrap();
    let err = store
        .create_project(&project("same", at(1)), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict("project name")),
        "{err:?}"
    );
    assert_eq!(store.list_projects().await.unwrap().len(), 1);
}

async fn project_creation_is_atomic(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let existing = project("existing", at(0));
    let taken = key(&existing, KeyKind::Secret, at(0));
    store
        .create_project(&existing, std::slice::from_ref(&taken))
        .await
        .unwrap();

    // The second project's key collides on its hash: nothing of it may remain.
    let doomed = project("doomed", at(1));
    let mut clash = key(&doomed, KeyKind::Secret, at(1));
    clash.hash = taken.hash;
    let ok_key = key(&doomed, KeyKind::Publishable, at(1));
    let err = store
        .create_project(&doomed, &[ok_key, clash])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict("api key")), "{err:?}");
    assert_eq!(store.project_by_name("doomed").await.unwrap(), None);
    assert!(store.list_keys(doomed.id).await.unwrap().is_empty());
}

async fn keys_need_an_existing_project(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let ghost = project("ghost", at(0));
    let err = store
        .insert_key(&key(&ghost, KeyKind::Secret, at(0)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

async fn revocation_is_idempotent_and_scoped_to_the_project(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let mine = project("mine", at(0));
    let theirs = project("theirs", at(0));
    let my_key = key(&mine, KeyKind::Secret, at(0));
    let their_key = key(&theirs, KeyKind::Secret, at(0));
    store
        .create_project(&mine, std::slice::from_ref(&my_key))
        .await
        .unwrap();
    store
        .create_project(&theirs, std::slice::from_ref(&their_key))
        .await
        .unwrap();

    let revoked = store.revoke_key(mine.id, my_key.id, at(10)).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(at(10)));
    let again = store.revoke_key(mine.id, my_key.id, at(20)).await.unwrap();
    assert_eq!(
        again.revoked_at,
        Some(at(10)),
        "the first revocation time is kept"
    );

    let err = store
        .revoke_key(mine.id, their_key.id, at(30))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound),
        "another project's key: {err:?}"
    );
    let err = store
        .revoke_key(mine.id, KeyId(Uuid::now_v7()), at(30))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(store.list_keys(theirs.id).await.unwrap()[0].is_active());
}

async fn configs_carry_active_keys_only(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    let pk = key(&p, KeyKind::Publishable, at(0));
    let sk = key(&p, KeyKind::Secret, at(1));
    store
        .create_project(&p, &[pk.clone(), sk.clone()])
        .await
        .unwrap();
    let extra = key(&p, KeyKind::Secret, at(2));
    store.insert_key(&extra).await.unwrap();
    store.revoke_key(p.id, sk.id, at(3)).await.unwrap();

    let listed = store.list_keys(p.id).await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![pk.id, sk.id, extra.id]
    );
    let config = store.load_project_config(p.id).await.unwrap().unwrap();
    assert_eq!(config.project, p);
    assert_eq!(config.keys, vec![pk, extra]);
    assert_eq!(
        store.load_all_project_configs().await.unwrap(),
        vec![config]
    );
    assert_eq!(
        store
            .load_project_config(ProjectId::new_v7())
            .await
            .unwrap(),
        None
    );
}

async fn every_change_is_recorded_in_order(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    assert_eq!(store.latest_config_seq().await.unwrap(), 0);
    let a = project("a", at(0));
    let b = project("b", at(0));
    let a_key = key(&a, KeyKind::Secret, at(0));
    store
        .create_project(&a, std::slice::from_ref(&a_key))
        .await
        .unwrap();
    let after_a = store.latest_config_seq().await.unwrap();
    assert!(after_a > 0);

    store.create_project(&b, &[]).await.unwrap();
    store
        .insert_key(&key(&b, KeyKind::Publishable, at(1)))
        .await
        .unwrap();
    store.revoke_key(a.id, a_key.id, at(2)).await.unwrap();

    let changes = store.config_changes_since(after_a).await.unwrap();
    assert_eq!(
        changes.projects,
        vec![b.id, a.id],
        "distinct, in first-change order"
    );
    assert_eq!(changes.latest_seq, store.latest_config_seq().await.unwrap());
    let none = store
        .config_changes_since(changes.latest_seq)
        .await
        .unwrap();
    assert!(none.projects.is_empty());
    assert_eq!(none.latest_seq, changes.latest_seq);
}

async fn concurrent_writers_all_commit(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("busy", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let store = store.clone();
            let record = key(&p, KeyKind::Secret, at(i));
            tokio::spawn(async move { store.insert_key(&record).await })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    assert_eq!(store.list_keys(p.id).await.unwrap().len(), 32);
    assert_eq!(
        store.config_changes_since(0).await.unwrap().projects,
        vec![p.id]
    );
}

async fn timestamps_round_trip_at_microsecond_precision(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    // Month end, leap day, and the far side of 2038.
    for (i, when) in [
        Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap()
            + chrono::Duration::microseconds(999_999),
        Utc.with_ymd_and_hms(2039, 1, 31, 0, 0, 0).unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let p = project(&format!("t{i}"), when);
        store
            .create_project(&p, &[key(&p, KeyKind::Secret, when)])
            .await
            .unwrap();
        let back = store.project_by_id(p.id).await.unwrap().unwrap();
        assert_eq!(back.created_at, when);
        assert_eq!(store.list_keys(p.id).await.unwrap()[0].created_at, when);
    }
}

async fn listener_reports_changes_from_other_connections(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let listener = store.config_listener().await.unwrap();
    match backend {
        // SQLite has no push channel; servers poll `config_changes_since`.
        Backend::Sqlite => assert!(listener.is_none()),
        Backend::Postgres => {
            let mut listener = listener.expect("PostgreSQL pushes changes");
            // A second store on the same database stands for another node.
            let other_node = db.open().await;
            let p = project("pushed", at(0));
            other_node.create_project(&p, &[]).await.unwrap();
            let signal = tokio::time::timeout(Duration::from_secs(5), listener.next())
                .await
                .expect("a notification arrives")
                .unwrap();
            assert_eq!(signal, ConfigSignal::Project(p.id));
        }
    }
}

fn event(
    kind: EventType,
    name: &str,
    user: Option<&str>,
    anonymous: Option<&str>,
    seconds: i64,
) -> Event {
    Event {
        event_id: Uuid::now_v7(),
        event_id_generated: false,
        kind,
        event: name.into(),
        user_id: user.map(Into::into),
        anonymous_id: anonymous.map(Into::into),
        org_id: None,
        previous_id: None,
        timestamp: at(seconds),
        original_timestamp: Some(at(seconds)),
        sent_at: None,
        received_at: at(seconds),
        skew_corrected: false,
        future_clamped: false,
        properties: serde_json::Map::new(),
        traits: serde_json::Map::new(),
        context: serde_json::Map::new(),
        schema_version: None,
        source: Source::Native,
        schema_violations: Vec::new(),
    }
}

fn batch(project: &Project, events: Vec<Event>) -> EventBatch {
    EventBatch {
        project: project.id,
        events: events
            .into_iter()
            .map(|e| EncodedEvent::encode(e).unwrap())
            .collect(),
        billing: None,
        activation: None,
    }
}

async fn events_get_sequences_and_duplicates_change_nothing(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let (a, b) = (project("a", at(0)), project("b", at(0)));
    store.create_project(&a, &[]).await.unwrap();
    store.create_project(&b, &[]).await.unwrap();
    let first = event(EventType::Track, "x", Some("u1"), None, 1);
    let second = event(EventType::Track, "y", Some("u1"), None, 2);
    let mut same_id_other_content = event(EventType::Track, "changed", Some("u9"), None, 3);
    same_id_other_content.event_id = first.event_id;

    let results = store
        .commit_events(&[
            batch(&a, vec![first.clone(), second.clone(), first.clone()]),
            batch(&b, vec![first.clone()]),
        ])
        .await
        .unwrap()
        .results;
    use CommitResult::*;
    assert_eq!(
        results[0],
        vec![Accepted { seq: 1 }, Accepted { seq: 2 }, Duplicate],
        "in-batch duplicate"
    );
    assert_eq!(
        results[1],
        vec![Accepted { seq: 1 }],
        "ids are per project, sequences too"
    );

    // A retry, partly overlapping, with a changed copy: only the new event counts.
    let third = event(EventType::Track, "z", Some("u1"), None, 4);
    let results = store
        .commit_events(&[batch(
            &a,
            vec![second.clone(), same_id_other_content, third.clone()],
        )])
        .await
        .unwrap()
        .results;
    assert_eq!(results[0], vec![Duplicate, Duplicate, Accepted { seq: 3 }]);
    let stored = store
        .list_events(
            a.id,
            &EventQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let names: Vec<_> = stored
        .iter()
        .map(|e| (e.seq, e.event.event.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![(3, "z"), (2, "y"), (1, "x")],
        "the first copy is kept"
    );
    assert_eq!(stored[2].event, first, "the envelope round-trips");
}

async fn identity_links_resolve_at_read_and_first_link_wins(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let anonymous_view = event(EventType::Page, "Pricing", None, Some("anon-1"), 1);
    let mut identify = event(
        EventType::Identify,
        "$identify",
        Some("user-1"),
        Some("anon-1"),
        2,
    );
    identify
        .traits
        .insert("email".into(), "a@example.com".into());
    let later_other = event(
        EventType::Identify,
        "$identify",
        Some("user-2"),
        Some("anon-1"),
        3,
    );
    let mut alias = event(EventType::Alias, "$alias", Some("user-1"), None, 4);
    alias.previous_id = Some("old-id".into());
    let mut cycle = event(EventType::Alias, "$alias", Some("anon-1"), None, 5);
    cycle.previous_id = Some("user-1".into());
    let mut group = event(EventType::Group, "$group", Some("old-id"), None, 6);
    group.org_id = Some("acme".into());
    store
        .commit_events(&[batch(
            &p,
            vec![anonymous_view, identify, later_other, alias, cycle, group],
        )])
        .await
        .unwrap();

    assert_eq!(
        store.resolve_person(p.id, "anon-1").await.unwrap(),
        "user-1",
        "first link wins"
    );
    assert_eq!(
        store.resolve_person(p.id, "old-id").await.unwrap(),
        "user-1"
    );
    assert_eq!(
        store.resolve_person(p.id, "user-1").await.unwrap(),
        "user-1",
        "no cycle was made"
    );
    assert_eq!(
        store.resolve_person(p.id, "stranger").await.unwrap(),
        "stranger"
    );
    let mut ids = store.person_ids(p.id, "user-1").await.unwrap();
    ids.sort();
    assert_eq!(ids, vec!["anon-1", "old-id", "user-1"]);
    assert_eq!(
        store.orgs_of(p.id, "anon-1").await.unwrap(),
        vec!["acme"],
        "orgs resolve through the person"
    );

    // History is not rewritten: the anonymous page view still says anon-1.
    let mine = store
        .list_events(
            p.id,
            &EventQuery {
                distinct_ids: Some(ids),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(mine
        .iter()
        .any(|e| e.event.anonymous_id.as_deref() == Some("anon-1") && e.event.user_id.is_none()));
    assert_eq!(
        mine.len(),
        5,
        "every event of the person, not user-2's identify"
    );
}

async fn event_queries_filter_and_tail(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| {
            event(
                EventType::Track,
                if i % 2 == 0 { "even" } else { "odd" },
                Some("u"),
                None,
                i,
            )
        })
        .collect();
    store.commit_events(&[batch(&p, events)]).await.unwrap();
    let query = |q: EventQuery| {
        let store = store.clone();
        async move {
            store
                .list_events(p.id, &q)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        query(EventQuery {
            limit: 3,
            ..Default::default()
        })
        .await,
        vec![10, 9, 8]
    );
    assert_eq!(
        query(EventQuery {
            event: Some("odd".into()),
            limit: 2,
            ..Default::default()
        })
        .await,
        vec![10, 8]
    );
    assert_eq!(
        query(EventQuery {
            since: Some(at(7)),
            limit: 100,
            ..Default::default()
        })
        .await,
        vec![10, 9, 8]
    );
    assert_eq!(
        query(EventQuery {
            after_seq: Some(7),
            limit: 2,
            ..Default::default()
        })
        .await,
        vec![8, 9]
    );
    let nobody = EventQuery {
        distinct_ids: Some(vec![]),
        limit: 5,
        ..Default::default()
    };
    assert!(query(nobody).await.is_empty());
}

async fn concurrent_event_commits_number_without_gaps(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    // Two stores on one database stand for two nodes.
    let other = db.open().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            let events: Vec<_> = (0..25)
                .map(|j| event(EventType::Track, "e", Some("u"), None, j))
                .collect();
            let project = p.clone();
            tokio::spawn(async move { store.commit_events(&[batch(&project, events)]).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        for result in task.await.unwrap().unwrap().results.remove(0) {
            match result {
                CommitResult::Accepted { seq } => seqs.push(seq),
                other => panic!("no duplicates or suppressed ids were sent: {other:?}"),
            }
        }
    }
    seqs.sort();
    assert_eq!(seqs, (1..=500).collect::<Vec<i64>>());
}

async fn settings_and_schemas_are_part_of_the_config(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let config = store.load_project_config(p.id).await.unwrap().unwrap();
    assert_eq!(config.settings, ProjectSettings::default());
    assert!(config.schemas.is_empty());
    let before = store.latest_config_seq().await.unwrap();

    let settings = ProjectSettings {
        require_analytics_consent: true,
        ip_handling: IpHandling::Drop,
        schema_mode: SchemaMode::Warn,
        ..ProjectSettings::default()
    };
    store
        .update_project_settings(p.id, &settings, at(1))
        .await
        .unwrap();
    let schema = EventSchema {
        event: "signup".into(),
        version: 1,
        required: [("plan".to_string(), PropertyType::String)].into(),
    };
    store.put_event_schema(p.id, &schema, at(2)).await.unwrap();
    let v2 = EventSchema {
        version: 2,
        ..schema.clone()
    };
    store.put_event_schema(p.id, &v2, at(3)).await.unwrap();
    let config = store.load_project_config(p.id).await.unwrap().unwrap();
    assert_eq!(config.settings, settings);
    assert_eq!(config.schemas["signup"], v2, "put replaces");
    assert!(
        store.latest_config_seq().await.unwrap() >= before + 3,
        "each change is recorded"
    );

    store
        .delete_event_schema(p.id, "signup", at(4))
        .await
        .unwrap();
    let err = store
        .delete_event_schema(p.id, "signup", at(5))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound));
    let err = store
        .update_project_settings(ProjectId::new_v7(), &settings, at(6))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound));

    // Violations recorded in warn mode come back for review.
    let mut broken = event(EventType::Track, "signup", Some("u"), None, 7);
    broken.schema_violations = vec!["missing property `plan`".into()];
    store
        .commit_events(&[batch(&p, vec![broken.clone()])])
        .await
        .unwrap();
    let violations = store.list_schema_violations(p.id, 10).await.unwrap();
    assert_eq!(violations.len(), 1);
    assert_eq!(
        (violations[0].event_id, violations[0].problems.clone()),
        (broken.event_id, broken.schema_violations)
    );
}

async fn deleted_people_are_gone_and_stay_gone(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let anonymous = event(EventType::Page, "Landing", None, Some("anon-d"), 1);
    let identify = event(
        EventType::Identify,
        "$identify",
        Some("user-d"),
        Some("anon-d"),
        2,
    );
    let mut group = event(EventType::Group, "$group", Some("user-d"), None, 3);
    group.org_id = Some("acme".into());
    let bystander = event(EventType::Track, "x", Some("other"), None, 4);
    store
        .commit_events(&[batch(
            &p,
            vec![anonymous, identify.clone(), group, bystander],
        )])
        .await
        .unwrap();

    let ids = store.person_ids(p.id, "user-d").await.unwrap();
    let deleted = store.delete_person(p.id, &ids, at(10)).await.unwrap();
    assert_eq!(deleted, 3);
    let left = store
        .list_events(
            p.id,
            &EventQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event.user_id.as_deref(), Some("other"));
    assert_eq!(
        store.resolve_person(p.id, "anon-d").await.unwrap(),
        "anon-d",
        "links are gone"
    );
    assert!(store.orgs_of(p.id, "user-d").await.unwrap().is_empty());

    // A late retry of the identify, and new events naming either id, are dropped.
    let late = event(EventType::Track, "late", None, Some("anon-d"), 11);
    let fresh_event = event(EventType::Track, "new", Some("newcomer"), None, 12);
    let results = store
        .commit_events(&[batch(&p, vec![identify, late, fresh_event])])
        .await
        .unwrap()
        .results;
    assert_eq!(
        results[0],
        vec![
            CommitResult::Suppressed,
            CommitResult::Suppressed,
            CommitResult::Accepted { seq: 5 }
        ]
    );
}

async fn concurrent_retries_of_the_same_events_store_each_once(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    let other_node = db.open().await;
    let events: Vec<_> = (0..20)
        .map(|i| event(EventType::Track, "e", Some("u"), None, i))
        .collect();
    // The same batch, retried concurrently through two nodes.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other_node.clone()
            };
            let retry = batch(&p, events.clone());
            tokio::spawn(async move { store.commit_events(&[retry]).await })
        })
        .collect();
    let mut accepted = 0;
    for task in tasks {
        for result in task.await.unwrap().unwrap().results.remove(0) {
            match result {
                CommitResult::Accepted { .. } => accepted += 1,
                CommitResult::Duplicate => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(accepted, 20, "each event is stored exactly once");
    let stored = store
        .list_events(
            p.id,
            &EventQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 20);
}

async fn flag_versions_are_appended_compiled_into_the_config_and_restorable(backend: Backend) {
    use flywheel_domain::flags::{FlagAction, FlagChange, FlagEntryKind};
    use serde_json::json;

    let (_db, store) = fresh(backend).await;
    let owner = project("flags", at(0));
    store.create_project(&owner, &[]).await.unwrap();
    let change = |kind, key: &str, definition: Option<serde_json::Value>, action| FlagChange {
        kind,
        key: key.into(),
        definition,
        action,
    };
    let on = json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on",
                    "targeting": {"if": [{"$ref": "pro"}, "on", "off"]}});
    let off = json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"});
    let written = store
        .write_flags(
            owner.id,
            &[
                change(
                    FlagEntryKind::Evaluator,
                    "pro",
                    Some(json!({"==": [{"var": "plan"}, "pro"]})),
                    FlagAction::Imported,
                ),
                change(
                    FlagEntryKind::Flag,
                    "new-nav",
                    Some(on.clone()),
                    FlagAction::Updated,
                ),
                change(FlagEntryKind::Flag, "gone", None, FlagAction::Deleted),
            ],
            "key-1",
            at(1),
        )
        .await
        .unwrap();
    assert_eq!(written.len(), 2, "deleting an absent flag writes nothing");
    assert_eq!(
        (written[1].version, written[1].action),
        (1, FlagAction::Created)
    );

    // Writing the same definition again is not a new version.
    let again = store
        .write_flags(
            owner.id,
            &[change(
                FlagEntryKind::Flag,
                "new-nav",
                Some(on.clone()),
                FlagAction::Updated,
            )],
            "key-1",
            at(2),
        )
        .await
        .unwrap();
    assert!(again.is_empty());

    store
        .write_flags(
            owner.id,
            &[change(
                FlagEntryKind::Flag,
                "new-nav",
                Some(off.clone()),
                FlagAction::Updated,
            )],
            "key-2",
            at(3),
        )
        .await
        .unwrap();
    let config = store.load_project_config(owner.id).await.unwrap().unwrap();
    assert_eq!(config.flags.len(), 1);
    let context = json!({"targetingKey": "u", "plan": "pro"})
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(
        config.flags.evaluate("new-nav", &context, 0).variant,
        Some("off")
    );
    assert_eq!(config.flags.document().evaluators.len(), 1);

    store
        .write_flags(
            owner.id,
            &[change(
                FlagEntryKind::Flag,
                "new-nav",
                None,
                FlagAction::Deleted,
            )],
            "key-2",
            at(4),
        )
        .await
        .unwrap();
    assert!(store
        .load_project_config(owner.id)
        .await
        .unwrap()
        .unwrap()
        .flags
        .is_empty());

    // Restoring version 1 writes version 4 with its definition.
    let history = store
        .flag_history(owner.id, FlagEntryKind::Flag, "new-nav")
        .await
        .unwrap();
    let actions: Vec<(i64, FlagAction, &str)> = history
        .iter()
        .map(|version| (version.version, version.action, version.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (1, FlagAction::Created, "key-1"),
            (2, FlagAction::Updated, "key-2"),
            (3, FlagAction::Deleted, "key-2")
        ]
    );
    assert_eq!(history[0].created_at, at(1));
    store
        .write_flags(
            owner.id,
            &[change(
                FlagEntryKind::Flag,
                "new-nav",
                history[0].definition.clone(),
                FlagAction::Restored,
            )],
            "cli",
            at(5),
        )
        .await
        .unwrap();
    let config = store.load_project_config(owner.id).await.unwrap().unwrap();
    assert_eq!(
        config.flags.evaluate("new-nav", &context, 0).variant,
        Some("on")
    );
    assert_eq!(
        config
            .flag_entries
            .iter()
            .find(|entry| entry.key == "new-nav")
            .unwrap()
            .version,
        4
    );
    assert!(store.latest_config_seq().await.unwrap() >= 4);
}

async fn identify_traits_merge_into_the_profile_and_go_with_the_person(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = project("p", at(0));
    store.create_project(&p, &[]).await.unwrap();
    assert_eq!(store.user_profile(p.id, "user-t").await.unwrap(), None);
    let with_traits = |traits: serde_json::Value, seconds| {
        let mut identify = event(
            EventType::Identify,
            "$identify",
            Some("user-t"),
            None,
            seconds,
        );
        identify.traits = traits.as_object().unwrap().clone();
        identify
    };
    // Two identifies in one batch merge in order; a later batch merges on
    // top, and null removes a trait.
    let first = with_traits(serde_json::json!({"plan": "free", "company": "Acme"}), 1);
    store
        .commit_events(&[batch(
            &p,
            vec![
                first.clone(),
                with_traits(serde_json::json!({"plan": "trial", "seats": 3}), 2),
            ],
        )])
        .await
        .unwrap();
    let mut group = event(EventType::Group, "$group", Some("user-t"), None, 3);
    group.org_id = Some("acme".into());
    store
        .commit_events(&[batch(
            &p,
            vec![
                group,
                with_traits(serde_json::json!({"company": null, "role": "admin"}), 4),
            ],
        )])
        .await
        .unwrap();
    // A retry of the first identify is a duplicate: it changes no trait.
    store
        .commit_events(&[batch(&p, vec![first])])
        .await
        .unwrap();
    let profile = store.user_profile(p.id, "user-t").await.unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(profile.traits),
        serde_json::json!({"plan": "trial", "seats": 3, "role": "admin"})
    );
    assert_eq!(profile.org_ids, ["acme"]);
    assert_eq!(profile.signed_up_at, None, "known from events only");
    store
        .delete_person(p.id, &["user-t".to_owned()], at(10))
        .await
        .unwrap();
    assert_eq!(store.user_profile(p.id, "user-t").await.unwrap(), None);
}
