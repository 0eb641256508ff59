//! Snapshots on real PostgreSQL: commands that emit several events at once
//! cross snapshot boundaries by more than one; a load from the snapshot must
//! always equal a full replay (state and version), the snapshot row must hold
//! the state at the version that crossed the boundary, and a snapshot that no
//! longer deserializes must fall back to replaying every event.
//!
//! `cqrs-es` 0.5's `PersistedEventStore` re-applies the events of a command
//! when it builds the snapshot (four increments reload as eight); comparing
//! every snapshot load against a replay catches that class of bug.

use outflow_tests as common;

use std::convert::Infallible;

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::{CommandBus, MemoryStore};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

const EVERY: u64 = 4;

/// Counts `Added` events. Every field is required, so a snapshot of another
/// shape does not deserialize.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Tally {
    /// Number of `Added` events applied.
    count: u64,
    /// Sum of their `nth` values: `count * (count + 1) / 2` when each is applied once.
    sum: u64,
    /// The `nth` of the last event applied.
    last: u64,
}

#[derive(Debug, Clone)]
enum TallyCommand {
    /// Emits `times` `Added` events.
    Add { times: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum TallyEvent {
    Added { nth: u64 },
}

impl DomainEvent for TallyEvent {
    fn event_type(&self) -> String {
        "Added".to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = Infallible;
    type Services = ();

    async fn handle(
        &mut self,
        command: TallyCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Infallible> {
        match command {
            TallyCommand::Add { times } => {
                for _ in 0..times {
                    // `write` applies the event, so `count` moves on each time.
                    let nth = self.count + 1;
                    sink.write(TallyEvent::Added { nth }, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: TallyEvent) {
        match event {
            TallyEvent::Added { nth } => {
                self.count += 1;
                self.sum += nth;
                self.last = nth;
            }
        }
    }
}

/// The state after `version` events, folded independently of any store.
fn fold(version: u64) -> Tally {
    let mut tally = Tally::default();
    for nth in 1..=version {
        tally.apply(TallyEvent::Added { nth });
    }
    tally
}

/// The version of the last snapshot written for a stream that went through
/// `versions` (0 first): a snapshot is written whenever a command moves the
/// version across a multiple of `EVERY`, holding the state at the new version.
fn expected_snapshot(versions: &[u64]) -> Option<u64> {
    versions
        .windows(2)
        .rev()
        .find(|w| w[0] / EVERY != w[1] / EVERY)
        .map(|w| w[1])
}

/// The snapshot row of a stream, read straight from the table.
async fn snapshot_row(pool: &PgPool, id: &str) -> Option<(u64, serde_json::Value)> {
    let row = sqlx::query(
        "SELECT version, payload FROM events_snapshots \
          WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(Tally::TYPE)
    .bind(id)
    .fetch_optional(pool)
    .await
    .expect("read the snapshots table")?;
    let version: i64 = row.try_get("version").expect("snapshot version column");
    let payload: serde_json::Value = row.try_get("payload").expect("snapshot payload column");
    Some((
        u64::try_from(version).expect("non-negative version"),
        payload,
    ))
}

/// Runs commands of the given event counts on two interleaved streams and
/// checks, after each, that the snapshot bus loads what a replay loads, what
/// the fold says, and that the stored snapshot is the right one. With `pool`,
/// also checks the PostgreSQL snapshots table itself.
async fn snapshot_loads_equal_replays<S: outflow::Backend>(store: S, pool: Option<&PgPool>) {
    let snapshotting = CommandBus::<Tally, _>::builder(store.clone(), ())
        .snapshot_every(EVERY)
        .build();
    let replaying = CommandBus::<Tally, _>::new(store.clone(), ());
    let plans: [(&str, &[u64]); 2] = [
        ("t-1", &[1, 3, 5, 2, 7, 1, 4]),
        ("t-2", &[4, 4, 9, 1, 3, 6]),
    ];
    let mut versions: Vec<Vec<u64>> = vec![vec![0]; plans.len()];
    let rounds = plans.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    let mut snapshots_seen = 0;
    for round in 0..rounds {
        for (stream, (id, plan)) in plans.iter().enumerate() {
            let Some(&times) = plan.get(round) else {
                continue;
            };
            let before = *versions[stream].last().expect("starts at 0");
            let committed = snapshotting
                .execute(id, TallyCommand::Add { times })
                .await
                .expect("command runs");
            let after = before + times;
            assert_eq!(committed.version, after, "{id}: version after the command");
            assert_eq!(committed.events.len() as u64, times, "{id}: events written");
            let sequences: Vec<u64> = committed.events.iter().map(|e| e.sequence).collect();
            assert_eq!(sequences, (before + 1..=after).collect::<Vec<_>>(), "{id}");
            versions[stream].push(after);

            let from_snapshot = snapshotting.load(id).await.expect("load with snapshot");
            let from_events = replaying.load(id).await.expect("load by replay");
            assert_eq!(
                from_snapshot, from_events,
                "{id}: snapshot load differs from replay after going {before} -> {after}"
            );
            assert_eq!(from_snapshot, (fold(after), after), "{id}: not the fold");

            let expected = expected_snapshot(&versions[stream]);
            let stored = store
                .load(Tally::TYPE, id, true)
                .await
                .expect("load the stream with its snapshot");
            let stored_snapshot = stored
                .snapshot
                .as_ref()
                .map(|s| (s.version, s.state.clone()));
            let want = expected.map(|v| (v, serde_json::to_value(fold(v)).expect("serializes")));
            assert_eq!(
                stored_snapshot, want,
                "{id}: stored snapshot after going {before} -> {after}"
            );
            let after_snapshot: Vec<u64> = stored.events.iter().map(|e| e.sequence).collect();
            assert_eq!(
                after_snapshot,
                (expected.unwrap_or(0) + 1..=after).collect::<Vec<_>>(),
                "{id}: events loaded after the snapshot"
            );
            if let Some(pool) = pool {
                assert_eq!(
                    snapshot_row(pool, id).await,
                    want,
                    "{id}: events_snapshots row after going {before} -> {after}"
                );
            }
            if expected.is_some() {
                snapshots_seen += 1;
            }
        }
    }
    assert!(snapshots_seen > 0, "the plan never crossed a boundary");
    // Plans chosen so that commands jump over boundaries by more than one.
    assert_eq!(expected_snapshot(&versions[0]), Some(23));
    assert_eq!(expected_snapshot(&versions[1]), Some(27));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_loads_equal_replays_on_postgres() {
    let db = common::TestDb::new("snapshots_equal").await;
    let store = db.store().await;
    let pool = store.pool().clone();
    snapshot_loads_equal_replays(store, Some(&pool)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events_snapshots")
        .fetch_one(&pool)
        .await
        .expect("count snapshots");
    assert_eq!(rows, 2, "one snapshot row per stream");
}

#[tokio::test]
async fn snapshot_loads_equal_replays_in_memory() {
    snapshot_loads_equal_replays(MemoryStore::new(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_snapshot_falls_back_to_replay() {
    let db = common::TestDb::new("snapshots_fallback").await;
    let store = db.store().await;
    let pool = store.pool().clone();
    let bus = CommandBus::<Tally, _>::builder(store.clone(), ())
        .snapshot_every(EVERY)
        .build();
    for times in [3, 6] {
        bus.execute("t-1", TallyCommand::Add { times })
            .await
            .expect("command runs");
    }
    assert_eq!(
        snapshot_row(&pool, "t-1").await,
        Some((9, serde_json::to_value(fold(9)).expect("serializes"))),
        "3 -> 9 crosses two boundaries: one snapshot at 9"
    );

    // An older shape of the aggregate: a field of another type, then required
    // fields missing altogether.
    for stale in [
        r#"{"count": "nine", "sum": 45, "last": 9}"#,
        r#"{"wrong": true}"#,
    ] {
        let updated = sqlx::query(
            "UPDATE events_snapshots SET payload = $1::json \
              WHERE aggregate_type = 'tally' AND aggregate_id = 't-1'",
        )
        .bind(stale)
        .execute(&pool)
        .await
        .expect("corrupt the snapshot");
        assert_eq!(updated.rows_affected(), 1);
        assert!(
            serde_json::from_str::<Tally>(stale).is_err(),
            "the test payload must not deserialize"
        );
        let loaded = bus
            .load("t-1")
            .await
            .expect("load falls back to the events");
        assert_eq!(loaded, (fold(9), 9), "fallback with snapshot {stale}");
    }

    // A command on top of the unreadable snapshot still sees the right state,
    // and crossing the next boundary replaces the snapshot.
    let committed = bus
        .execute("t-1", TallyCommand::Add { times: 3 })
        .await
        .expect("command runs on a replayed aggregate");
    assert_eq!(committed.version, 12);
    let nths: Vec<TallyEvent> = committed.events.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(
        nths,
        (10..=12)
            .map(|nth| TallyEvent::Added { nth })
            .collect::<Vec<_>>(),
        "the command saw the replayed state"
    );
    assert_eq!(
        snapshot_row(&pool, "t-1").await,
        Some((12, serde_json::to_value(fold(12)).expect("serializes"))),
        "the unreadable snapshot was replaced at the next boundary"
    );
    assert_eq!(bus.load("t-1").await.expect("load"), (fold(12), 12));
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = 't-1'")
        .fetch_one(&pool)
        .await
        .expect("count events");
    assert_eq!(events, 12, "no event lost or duplicated");
}
