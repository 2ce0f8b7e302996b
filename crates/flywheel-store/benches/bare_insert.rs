//! The bare baseline for the ingestion benchmark (`scripts/bench-ingest`):
//! inserts the same rows the server stores, into SQLite with the same
//! durability (WAL, synchronous=FULL, one transaction per batch), with no
//! HTTP, no parsing and no dedupe. Prints events/s. It allocates as the
//! server does (mimalloc, and SQLite's heap configured by
//! `flywheel_store::sqlite_memory`), so the ratio measures Flywheel's work
//! and not a difference in setup.
//!
//! With a native batch file (`{"batch":[…]}`, as `scripts/bench-ingest`
//! sends), each row is one of its events as the server stores it: decoded
//! and encoded by the same domain code before the clock starts, and given a
//! fresh UUIDv7 id as the server mints one. Without it, a synthetic ~270-byte
//! track event.
//!
//! `cargo bench -p flywheel-store --bench bare_insert -- [events] [batch] [batch.json]`

use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, QueryBuilder, Sqlite};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let all: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; test runners (`cargo test --all-targets`,
    // nextest's --list) run bench targets too: do nothing for them.
    if !all.iter().any(|a| a == "--bench") {
        return Ok(());
    }
    let args: Vec<String> = all.into_iter().filter(|a| !a.starts_with("--")).collect();
    let total: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let batch: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let heap = flywheel_store::sqlite_memory::configure();
    let dir = tempfile::tempdir()?;
    let mut conn = SqliteConnectOptions::new()
        .filename(dir.path().join("bare.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    sqlx::query(
        "CREATE TABLE events (project_id TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, \
         type TEXT NOT NULL, event TEXT NOT NULL, distinct_id TEXT NOT NULL, timestamp INTEGER NOT NULL, \
         received_at INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (project_id, event_id)) STRICT, WITHOUT ROWID",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query("CREATE UNIQUE INDEX events_by_seq ON events (project_id, seq)")
        .execute(&mut conn)
        .await?;
    let project = uuid::Uuid::now_v7().to_string();
    let rows = match args.get(3) {
        Some(path) => rows_of(&std::fs::read_to_string(path)?)?,
        None => vec![Row {
            kind: "track",
            event: "project_created".into(),
            distinct_id: "user-1".into(),
            timestamp: 0,
            body: format!(
                "{{\"type\":\"track\",\"event\":\"project_created\",\"properties\":{{\"plan\":\"free\",\"pad\":\"{}\"}}}}",
                "x".repeat(200)
            ),
        }],
    };
    let row_bytes = rows.iter().map(|row| row.body.len()).sum::<usize>() / rows.len();
    let started = Instant::now();
    let mut seq = 0i64;
    while (seq as usize) < total {
        let mut sqlx_tx = sqlx::Connection::begin(&mut conn).await?;
        let mut done = 0;
        while done < batch {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (project_id, event_id, seq, type, event, distinct_id, timestamp, received_at, body) ",
            );
            let count = (batch - done).min(500);
            query.push_values(0..count, |mut values, _| {
                let row = &rows[seq as usize % rows.len()];
                seq += 1;
                values
                    .push_bind(&project)
                    .push_bind(uuid::Uuid::now_v7().to_string())
                    .push_bind(seq)
                    .push_bind(row.kind)
                    .push_bind(&row.event)
                    .push_bind(&row.distinct_id)
                    .push_bind(row.timestamp)
                    .push_bind(seq)
                    .push_bind(&row.body);
            });
            query.build().execute(&mut *sqlx_tx).await?;
            done += count;
        }
        sqlx_tx.commit().await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "bare SQLite insert: {seq} events in {elapsed:.2} s = {:.0} events/s ({batch} per transaction, {row_bytes}-byte bodies, SQLite heap: {heap:?})",
        seq as f64 / elapsed
    );
    Ok(())
}

/// One stored row but its id and sequence number.
struct Row {
    kind: &'static str,
    event: String,
    distinct_id: String,
    timestamp: i64,
    body: String,
}

/// The rows the server stores for a native batch: the same decoder and the
/// same stored encoding (`decode_native_text`, `EncodedEvent::encode`).
fn rows_of(batch: &str) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    #[derive(serde::Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        batch: Vec<&'a serde_json::value::RawValue>,
    }
    let parsed: Batch<'_> = serde_json::from_str(batch)?;
    let envelope = flywheel_domain::events::Envelope {
        received_at: chrono::Utc::now(),
        sent_at: None,
        context: None,
        max_event_bytes: usize::MAX,
    };
    let mut rows = Vec::with_capacity(parsed.batch.len());
    for (index, raw) in parsed.batch.iter().enumerate() {
        let event = flywheel_domain::events::decode_native_text(raw.get(), index, &envelope)
            .map_err(|rejected| format!("event {index}: {}", rejected.message))?;
        let encoded = flywheel_store::EncodedEvent::encode(event)?;
        rows.push(Row {
            kind: encoded.event.kind.as_str(),
            event: encoded.event.event.clone(),
            distinct_id: encoded.event.distinct_id().to_string(),
            timestamp: encoded.event.timestamp.timestamp_micros(),
            body: encoded.body,
        });
    }
    if rows.is_empty() {
        return Err("the batch file has no events".into());
    }
    Ok(rows)
}
