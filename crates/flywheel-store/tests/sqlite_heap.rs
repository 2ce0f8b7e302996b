//! SQLite on the heap `sqlite_memory` configures. A test binary of its own,
//! with one test, so that its first SQLite call is the configuration
//! (under nextest and `cargo test` alike), as in the server.

// Reads SQLite's own allocation counter, a C function.
#![allow(unsafe_code)]

use chrono::Utc;
use flywheel_domain::events::{decode_native_text, Envelope};
use flywheel_domain::project::{Project, ProjectId};
use flywheel_store::projects::ProjectStore;
use flywheel_store::sqlite::SqliteStore;
use flywheel_store::sqlite_memory::{configure, Configured};
use flywheel_store::{EncodedEvent, EventBatch, EventQuery, Store, StoreOptions};
use uuid::Uuid;

#[tokio::test]
async fn sqlite_allocates_through_rust_and_stores_and_reads_events() {
    assert_eq!(
        configure(),
        Configured::RustAllocator,
        "nothing in this process opened SQLite before"
    );
    assert_eq!(configure(), Configured::RustAllocator, "later calls agree");

    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::embedded(dir.path());
    let store = SqliteStore::open(&dir.path().join("heap.db"), &options)
        .await
        .unwrap();
    let project = Project {
        id: ProjectId(Uuid::now_v7()),
        name: "heap".into(),
        created_at: Utc::now(),
    };
    store.create_project(&project, &[]).await.unwrap();
    let envelope = Envelope {
        received_at: Utc::now(),
        sent_at: None,
        context: None,
        max_event_bytes: 32 * 1024,
    };
    // Bodies from a few bytes to ~20 KB, so SQLite grows and frees blocks
    // of many sizes (records, overflow pages, the page cache).
    let events: Vec<EncodedEvent> = (0..300)
        .map(|i| {
            let pad = "x".repeat((i * 67) % 20_000);
            let raw = format!(
                r#"{{"type":"track","event":"heap_{i}","user_id":"user-{i}","properties":{{"pad":"{pad}"}}}}"#
            );
            EncodedEvent::encode(decode_native_text(&raw, i, &envelope).unwrap()).unwrap()
        })
        .collect();
    let commit = store
        .commit_events(&[EventBatch {
            project: project.id,
            events,
            billing: None,
            activation: None,
        }])
        .await
        .unwrap();
    assert_eq!(commit.results[0].len(), 300);

    let stored = store
        .list_events(
            project.id,
            &EventQuery {
                limit: 1000,
                ..EventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 300);
    let longest = stored
        .iter()
        .map(|e| e.event.properties["pad"].as_str().unwrap().len())
        .max();
    assert_eq!(longest, Some(19_966), "event 298: 298 × 67 bytes");

    // SQLite keeps no statistics on this heap: with its default allocator
    // this counts every live block (megabytes by now).
    // SAFETY: a read of a counter; SQLite is initialised.
    assert_eq!(unsafe { libsqlite3_sys::sqlite3_memory_used() }, 0);
}
