//! The bare baseline for the ingestion benchmark (`scripts/bench-ingest`):
//! inserts the same rows the server stores, into SQLite with the same
//! durability (WAL, synchronous=FULL, one transaction per batch), with no
//! HTTP, no parsing and no dedupe. Prints events/s.
//!
//! `cargo bench -p flywheel-store --bench bare_insert -- [events] [batch]`

use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, QueryBuilder, Sqlite};

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
    let body = format!(
        "{{\"type\":\"track\",\"event\":\"project_created\",\"properties\":{{\"plan\":\"free\",\"pad\":\"{}\"}}}}",
        "x".repeat(200)
    );
    let started = Instant::now();
    let mut seq = 0i64;
    while (seq as usize) < total {
        let mut sqlx_tx = sqlx::Connection::begin(&mut conn).await?;
        let mut done = 0;
        while done < batch {
            let rows = (batch - done).min(500);
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (project_id, event_id, seq, type, event, distinct_id, timestamp, received_at, body) ",
            );
            query.push_values(0..rows, |mut row, _| {
                seq += 1;
                row.push_bind(&project)
                    .push_bind(uuid::Uuid::now_v7().to_string())
                    .push_bind(seq)
                    .push_bind("track")
                    .push_bind("project_created")
                    .push_bind("user-1")
                    .push_bind(seq)
                    .push_bind(seq)
                    .push_bind(&body);
            });
            query.build().execute(&mut *sqlx_tx).await?;
            done += rows;
        }
        sqlx_tx.commit().await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "bare SQLite insert: {seq} events in {elapsed:.2} s = {:.0} events/s ({batch} per transaction)",
        seq as f64 / elapsed
    );
    Ok(())
}
