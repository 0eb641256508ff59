//! Contention: 64 writers on 8 aggregates at once, on every backend. Each
//! writer reads its aggregate's version and appends one event; most lose the
//! race and get a conflict. Afterwards every accepted append's event is in
//! the log exactly once, no refused one is, and every stream's sequences
//! are contiguous. Runs 3 s per backend (20 s with `OUTFLOW_SOAK=1`).

use outflow_tests as common;
use outflow_tests::on_every_backend;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use outflow::{AppendRequest, Checkpoint, EventLog, EventStore, LogFilter, NewEvent};
use uuid::Uuid;

const WRITERS: usize = 64;
const AGGREGATES: usize = 8;

fn duration() -> Duration {
    if std::env::var_os("OUTFLOW_SOAK").is_some() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    }
}

async fn contend<S: EventStore + EventLog + Clone>(store: S) {
    let until = Instant::now() + duration();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("agg-{}", writer % AGGREGATES);
            let (mut accepted, mut refused, mut conflicts) = (Vec::new(), Vec::new(), 0usize);
            while Instant::now() < until {
                let version = store
                    .load("contended", &id, false)
                    .await
                    .map_err(|e| outflow::error::error_chain(&e))?
                    .events
                    .last()
                    .map_or(0, |e| e.sequence);
                // Let the other writers run between the read and the write
                // (on a single-threaded runtime nothing else would).
                tokio::task::yield_now().await;
                let event_id = Uuid::now_v7();
                let result = store
                    .append(AppendRequest {
                        aggregate_type: "contended".into(),
                        aggregate_id: id.clone(),
                        expected_version: version,
                        events: vec![NewEvent {
                            event_id,
                            event_type: "Touched".into(),
                            event_version: "1".into(),
                            payload: serde_json::json!({ "writer": writer }),
                            metadata: Default::default(),
                            correlation_id: None,
                            causation_id: None,
                        }],
                    })
                    .await;
                match result {
                    Ok(_) => accepted.push(event_id),
                    Err(error) if error.is_conflict() => {
                        conflicts += 1;
                        refused.push(event_id);
                    }
                    // A busy file or server is transient: try again.
                    Err(error) if error.is_retryable() => refused.push(event_id),
                    Err(error) => return Err(outflow::error::error_chain(&error)),
                }
            }
            Ok::<_, String>((accepted, refused, conflicts))
        }));
    }
    let mut accepted = HashSet::new();
    let mut refused = HashSet::new();
    let mut conflicts = 0;
    for task in tasks {
        let (a, r, c) = task.await.expect("join").expect("a writer failed");
        accepted.extend(a);
        refused.extend(r);
        conflicts += c;
    }
    let events: Vec<_> = outflow::log::read_log(&store, Checkpoint::START, LogFilter::all(), 1000)
        .try_collect()
        .await
        .expect("read the log");
    let logged: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let unique: HashSet<Uuid> = logged.iter().copied().collect();
    assert_eq!(unique.len(), logged.len(), "an event is in the log twice");
    assert_eq!(
        unique, accepted,
        "the log differs from the accepted appends"
    );
    assert!(
        refused.is_disjoint(&unique),
        "a refused append is in the log"
    );
    let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for event in &events {
        streams
            .entry(event.aggregate_id.clone())
            .or_default()
            .push(event.sequence);
    }
    for (id, sequences) in &streams {
        assert_eq!(
            sequences,
            &(1..=sequences.len() as u64).collect::<Vec<_>>(),
            "`{id}` is not contiguous"
        );
    }
    assert!(
        conflicts > 0,
        "{WRITERS} writers on {AGGREGATES} aggregates never conflicted"
    );
    println!(
        "{} appends accepted, {conflicts} conflicts, {} refused in all, over {} streams",
        accepted.len(),
        refused.len(),
        streams.len()
    );
}

on_every_backend! {
    contend: memory_contention, postgres_contention, sqlite_contention;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_contention() {
    contend(common::jetstream_store(&common::nats_url(), "contention", 1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_cluster_contention() {
    contend(common::jetstream_store(&common::nats_cluster_url(), "contention", 1).await).await;
}
