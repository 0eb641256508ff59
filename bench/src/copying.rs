//! Copying a log between backends (`outflow::copy::LogCopy`, what `outflow
//! copy` runs): SQLite into PostgreSQL, and PostgreSQL into the 3-node
//! JetStream cluster, events per second for the copy itself and the time of
//! the verification that follows it.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use outflow::copy::{tally, LogCopy};
use outflow::{AppendInTransaction, AppendRequest, PostgresStore, SqliteStore};

use crate::jetstream::jetstream_store;
use crate::setup::{pool, sqlite_dir, Server};
use crate::stats::Size;

/// One copy's figures.
struct Copied {
    events: u64,
    seconds: f64,
    verify_seconds: f64,
}

/// Fills `store` with `events` deposits on `streams` streams, ten events an
/// append, a hundred appends a transaction.
async fn fill<S: AppendInTransaction>(store: &S, streams: usize, events: usize) -> Result<()> {
    let mut versions = vec![0u64; streams];
    let mut written = 0;
    let mut stream = 0;
    while written < events {
        let mut tx = store.begin().await?;
        for _ in 0..100 {
            if written >= events {
                break;
            }
            let request = AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: format!("a-{stream}"),
                expected_version: versions[stream],
                events: (0..10)
                    .map(|i| outflow::NewEvent {
                        event_id: uuid::Uuid::now_v7(),
                        event_type: "Deposited".into(),
                        event_version: "1.0".into(),
                        payload: serde_json::json!({"Deposited": {"amount": 100 + i}}),
                        metadata: Default::default(),
                        correlation_id: None,
                        causation_id: None,
                    })
                    .collect(),
            };
            store.append_in(&mut tx, request).await?;
            versions[stream] += 10;
            written += 10;
            stream = (stream + 1) % streams;
        }
        store.commit(tx).await?;
    }
    Ok(())
}

/// Copies `from` into `to`, then verifies both, timing each.
async fn timed<F, T>(from: &F, to: &T) -> Result<Copied>
where
    F: outflow::EventLog,
    T: outflow::store::CopyTarget,
{
    let started = Instant::now();
    let report = LogCopy::new(from, to).verify(false).run(|_| {}).await?;
    let seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let (a, b) = (tally(from).await?, tally(to).await?);
    anyhow::ensure!(a == b, "the copy differs: source {a}, target {b}");
    Ok(Copied {
        events: report.copied,
        seconds,
        verify_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Both copies, as a section of the report.
pub(crate) async fn log_copies(server: &Server, size: &Size) -> Result<String> {
    let (sqlite_events, jetstream_events) = if size.quick {
        (100_000, 10_000)
    } else {
        (1_000_000, 100_000)
    };
    std::fs::create_dir_all(sqlite_dir())?;
    let source = SqliteStore::open(sqlite_dir().join("copy_source.db")).await?;
    fill(&source, 1_000, sqlite_events).await?;
    let (options, _) = server.fresh_db("copy_target").await?;
    let target = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    let into_postgres = timed(&source, &target).await?;

    let (options, _) = server.fresh_db("copy_pg_source").await?;
    let pg_source = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    fill(&pg_source, 1_000, jetstream_events).await?;
    let jetstream = jetstream_store("copy", 3).await?;
    let into_jetstream = timed(&pg_source, &jetstream).await?;

    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Copying a log between backends\n\n`outflow copy` (`LogCopy`): deposits on 1,000 \
         accounts, ten events an append; the copy appends each source append as one, \
         batches of 1,000 events in one target transaction where the target has them. \
         Verification reads both logs again and compares counts and checksums.\n\n\
         | from → to | events | events/s | verification s |\n|---|---|---|---|"
    );
    for (label, copied) in [
        ("SQLite file → PostgreSQL", &into_postgres),
        (
            "PostgreSQL → JetStream (3 partitions, 3 replicas)",
            &into_jetstream,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {} | {:.0} | {:.1} |",
            copied.events,
            copied.events as f64 / copied.seconds,
            copied.verify_seconds
        );
    }
    Ok(md)
}
