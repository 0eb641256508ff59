//! One behaviour suite per backend role trait, each run against every
//! backend: `Leases`, `Checkpoints`, `DeadLetters`, `Inbox`, and
//! `Transactional` with `AppendInTransaction`. Whatever the backend, the same
//! calls give the same answers.

use outflow_tests as common;
use outflow_tests::on_every_backend;

use std::time::Duration;

use outflow::log::Wake;
use outflow::store::{
    DeadLetter, Lease, NewDeadLetter, ProjectionState, UnitError, UnitId, UnitRecord,
};
use outflow::{
    AppendRequest, Backend, Checkpoint, ConfigError, ErrorKind, LogFilter, NewEvent, RecordedEvent,
    StoreError,
};
use serde_json::json;
use uuid::Uuid;

fn deposit(id: &str, expected: u64) -> AppendRequest {
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        expected_version: expected,
        events: vec![NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Deposited".into(),
            event_version: "1.0".into(),
            payload: json!({ "Deposited": { "amount": 5 } }),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        }],
    }
}

/// Appends one event to a new stream and reads it back from the log.
async fn one_event<S: Backend>(store: &S, id: &str) -> RecordedEvent {
    let written = store.append(deposit(id, 0)).await.expect("append an event");
    let log = common::read_until(store, Checkpoint::START, &LogFilter::all(), 1).await;
    log.into_iter()
        .find(|e| e.event_id == written[0].event_id)
        .expect("the appended event is in the log")
}

fn unit(projection: &str, partition: u32) -> UnitId {
    UnitId {
        projection: projection.into(),
        partition,
    }
}

async fn record<S: Backend>(store: &S, unit: &UnitId) -> UnitRecord {
    units(store, Some(&unit.projection))
        .await
        .into_iter()
        .find(|u| &u.unit == unit)
        .unwrap_or_else(|| panic!("no unit {unit}"))
}

async fn claim<S: Backend>(store: &S, u: &UnitId, node: &str, ttl: Duration) -> Option<Lease> {
    store.claim(u, node, ttl).await.expect("claim")
}

async fn renew<S: Backend>(store: &S, node: &str, ttl: Duration) -> Vec<Lease> {
    store.renew(node, ttl).await.expect("renew")
}

async fn live<S: Backend>(store: &S, node: &str, ttl: Duration) -> Vec<String> {
    store.node_heartbeat(node, ttl).await.expect("heartbeat")
}

async fn letters<S: Backend>(store: &S, projection: &str) -> Vec<DeadLetter> {
    store.dead_letters(projection).await.expect("dead letters")
}

async fn save<S: Backend>(
    store: &S,
    tx: &mut S::Transaction,
    lease: &Lease,
    (from, to): (Checkpoint, Checkpoint),
) -> bool {
    store
        .save_checkpoint(tx, lease, from, to, 1)
        .await
        .expect("save")
}

async fn units<S: Backend>(store: &S, projection: Option<&str>) -> Vec<UnitRecord> {
    store.units(projection).await.expect("read the units")
}

async fn inbox<S: Backend>(store: &S, tx: &mut S::Transaction, handler: &str, id: &str) -> bool {
    store
        .inbox_claim(tx, handler, id)
        .await
        .expect("inbox claim")
}

fn ids(nodes: &[&str]) -> Vec<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

async fn suite_leases<S: Backend>(store: S) {
    let ttl = Duration::from_millis(300);
    store
        .register_projection("leased", 1)
        .await
        .expect("register `leased`");
    let u = unit("leased", 0);

    let a = claim(&store, &u, "node-a", ttl)
        .await
        .expect("a free unit is claimed");
    assert_eq!(a.epoch, 1, "the first claim of a unit");
    assert_eq!(a.checkpoint, Checkpoint::START);
    assert!(!a.paused);
    let held = record(&store, &u).await;
    assert_eq!(held.owner.as_deref(), Some("node-a"));
    assert!(held.lease_valid, "a fresh lease is valid");
    assert_eq!(held.epoch, 1);

    assert_eq!(
        claim(&store, &u, "node-b", ttl).await,
        None,
        "another node cannot claim a unit whose lease is valid"
    );
    let again = claim(&store, &u, "node-a", ttl)
        .await
        .expect("the owner claims its own unit again");
    assert_eq!(again, a, "re-claiming keeps the epoch");

    let renewed = renew(&store, "node-a", ttl).await;
    assert_eq!(renewed, vec![a.clone()], "renew returns the held leases");
    assert!(
        renew(&store, "node-b", ttl).await.is_empty(),
        "a node without leases renews nothing"
    );

    // Live nodes, sorted, the caller included.
    assert_eq!(live(&store, "node-b", ttl).await, ids(&["node-b"]));
    assert_eq!(
        live(&store, "node-a", ttl).await,
        ids(&["node-a", "node-b"]),
        "live nodes in id order"
    );

    // Past the lease (and the nodes' heartbeats).
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(
        !record(&store, &u).await.lease_valid,
        "the lease expired after its time to live"
    );
    assert_eq!(
        live(&store, "node-c", ttl).await,
        ids(&["node-c"]),
        "nodes that stopped beating are no longer live"
    );
    let b = claim(&store, &u, "node-b", ttl)
        .await
        .expect("an expired lease can be claimed by another node");
    assert_eq!(b.epoch, 2, "a new owner gets a new epoch");
    assert!(
        renew(&store, "node-a", ttl).await.is_empty(),
        "the previous owner's renewal no longer returns the unit"
    );
    assert_eq!(renew(&store, "node-b", ttl).await, vec![b.clone()]);

    // Release is fenced by the epoch: the old owner cannot free it.
    store.release(&a, "node-a").await.expect("release");
    assert_eq!(record(&store, &u).await.owner.as_deref(), Some("node-b"));
    store.release(&b, "node-b").await.expect("release");
    let freed = record(&store, &u).await;
    assert_eq!(freed.owner, None, "release frees the unit");
    assert!(!freed.lease_valid);
    let c = claim(&store, &u, "node-c", ttl)
        .await
        .expect("a released unit is claimed at once");
    assert_eq!(c.epoch, 3);
}

async fn suite_checkpoints<S: Backend>(store: S) {
    let ttl = Duration::from_secs(30);
    store.register_projection("cp", 3).await.expect("register");
    store
        .register_projection("cp", 3)
        .await
        .expect("registering again with the same count");
    store
        .register_projection("other", 1)
        .await
        .expect("register `other`");
    let registered = units(&store, Some("cp")).await;
    assert_eq!(
        registered
            .iter()
            .map(|u| u.unit.partition)
            .collect::<Vec<_>>(),
        vec![0, 1, 2],
        "one unit per partition"
    );
    for u in &registered {
        assert_eq!((u.partitions, u.checkpoint), (3, Checkpoint::START));
        assert_eq!(
            (u.epoch, u.processed, u.state),
            (0, 0, ProjectionState::Idle)
        );
        assert_eq!(u.owner, None);
    }
    assert_eq!(units(&store, None).await.len(), 4);
    match store.register_projection("cp", 2).await {
        Err(StoreError::Config(ConfigError::PartitionCount {
            name,
            stored,
            configured,
        })) => assert_eq!((name.as_str(), stored.as_str(), configured), ("cp", "3", 2)),
        other => panic!("expected a partition count error, got {other:?}"),
    }
    assert_eq!(units(&store, Some("cp")).await.len(), 3);

    let u0 = unit("cp", 0);
    let lease = claim(&store, &u0, "node-a", ttl)
        .await
        .expect("claim a free unit");
    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease.clone()
    };
    let x = one_event(&store, "cp-1").await.checkpoint();
    let mut tx = store.begin().await.expect("begin");
    assert!(save(&store, &mut tx, &lease, (Checkpoint::START, x)).await);
    assert_eq!(
        record(&store, &u0).await.checkpoint,
        Checkpoint::START,
        "an uncommitted checkpoint is not visible"
    );
    store.commit(tx).await.expect("commit");
    let saved = record(&store, &u0).await;
    assert_eq!((saved.checkpoint, saved.processed), (x, 1));

    // Compare-and-set on the checkpoint, and on the epoch.
    let y = Checkpoint::new(x.transaction_id + 1, x.position + 1);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        !save(&store, &mut tx, &lease, (Checkpoint::START, y)).await,
        "a save from a checkpoint that moved is refused"
    );
    drop(tx);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        !save(&store, &mut tx, &stale, (x, y)).await,
        "a save under a stale epoch is refused"
    );
    drop(tx);
    let kept = record(&store, &u0).await;
    assert_eq!((kept.checkpoint, kept.processed, kept.epoch), (x, 1, 1));

    // State, fenced by the epoch; stopped units are not claimed until restarted.
    store
        .set_state(&lease, ProjectionState::Stopped, Some("boom"))
        .await
        .expect("set state");
    store
        .set_state(&stale, ProjectionState::Live, None)
        .await
        .expect("set state");
    let stopped = record(&store, &u0).await;
    assert_eq!(
        (stopped.state, stopped.last_error.as_deref()),
        (ProjectionState::Stopped, Some("boom"))
    );
    assert_eq!(stopped.error_kind, None, "recorded without its kind");
    // With its kind: kept beside the text, fenced by the epoch like the state.
    let failure = UnitError {
        kind: ErrorKind::Infrastructure,
        message: "relation \"x\" does not exist",
    };
    store
        .record_state(&lease, ProjectionState::Stopped, Some(failure))
        .await
        .expect("record state");
    store
        .record_state(
            &stale,
            ProjectionState::Retrying,
            Some(UnitError {
                kind: ErrorKind::Transient,
                message: "stale",
            }),
        )
        .await
        .expect("record state");
    let stopped = record(&store, &u0).await;
    assert_eq!(
        (
            stopped.state,
            stopped.last_error.as_deref(),
            stopped.error_kind
        ),
        (
            ProjectionState::Stopped,
            Some("relation \"x\" does not exist"),
            Some(ErrorKind::Infrastructure)
        )
    );
    store.release(&lease, "node-a").await.expect("release");
    assert_eq!(
        claim(&store, &u0, "node-b", ttl).await,
        None,
        "a stopped unit is not claimed"
    );
    store.restart_projection("cp").await.expect("restart");
    let restarted = record(&store, &u0).await;
    assert_eq!(
        (restarted.state, restarted.last_error, restarted.owner),
        (ProjectionState::Idle, None, None)
    );
    assert_eq!(restarted.error_kind, None, "a restart clears the kind too");
    let lease = claim(&store, &u0, "node-b", ttl)
        .await
        .expect("a restarted unit is claimed");
    assert_eq!((lease.epoch, lease.checkpoint), (2, x));

    // Pause and resume.
    store.set_paused("cp", true).await.expect("pause");
    let paused = units(&store, None).await;
    assert!(paused
        .iter()
        .all(|u| u.paused == (u.unit.projection == "cp")));
    assert_eq!(
        renew(&store, "node-b", ttl).await,
        vec![Lease {
            paused: true,
            ..lease.clone()
        }],
        "renewals carry the paused flag"
    );
    store.set_paused("cp", false).await.expect("resume");
    assert!(units(&store, None).await.iter().all(|u| !u.paused));

    // Reset: back to the start, every epoch bumped, in the caller's transaction.
    let before = units(&store, Some("cp")).await;
    let mut tx = store.begin().await.expect("begin");
    store
        .reset_projection(&mut tx, "cp", 7)
        .await
        .expect("reset");
    assert_eq!(
        record(&store, &u0).await.checkpoint,
        x,
        "reset not committed yet"
    );
    store.commit(tx).await.expect("commit the reset");
    for (u, old) in units(&store, Some("cp")).await.iter().zip(&before) {
        assert_eq!((u.checkpoint, u.processed), (Checkpoint::START, 0));
        assert_eq!((u.epoch, u.rebuild_total), (old.epoch + 1, Some(7)));
    }
    assert_eq!(record(&store, &unit("other", 0)).await.epoch, 0);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        !save(
            &store,
            &mut tx,
            &lease,
            (Checkpoint::START, Checkpoint::new(1, 1))
        )
        .await,
        "the reset fenced the owner"
    );
}

async fn suite_dead_letters<S: Backend>(store: S) {
    store.register_projection("dl", 1).await.expect("register");
    let u = unit("dl", 0);
    let event = one_event(&store, "dl-1").await;
    let mut tx = store.begin().await.expect("begin");
    store
        .park(
            &mut tx,
            NewDeadLetter {
                unit: &u,
                event: &event,
                error: "bad event".into(),
                attempts: 3,
                first_failed_at: event.recorded_at,
            },
        )
        .await
        .expect("park");
    assert!(
        letters(&store, "dl").await.is_empty(),
        "a dead letter is not visible before its commit"
    );
    store.commit(tx).await.expect("commit");
    let parked = letters(&store, "dl").await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    let letter = parked[0].clone();
    let expected = DeadLetter {
        id: letter.id,
        unit: u.clone(),
        event_id: event.event_id,
        checkpoint: event.checkpoint(),
        event: event.event_ref(),
        error: "bad event".into(),
        attempts: 3,
        first_failed_at: event.recorded_at,
        last_failed_at: letter.last_failed_at,
    };
    assert_eq!(letter, expected, "the dead letter as parked");
    assert!(letters(&store, "other").await.is_empty());

    // Taking it in a transaction that rolls back leaves it parked.
    let mut tx = store.begin().await.expect("begin");
    let taken = store
        .take_dead_letter(&mut tx, letter.id)
        .await
        .expect("take")
        .expect("the dead letter is there");
    assert_eq!(taken, letter);
    assert_eq!(
        store
            .take_dead_letter(&mut tx, letter.id + 1000)
            .await
            .expect("take"),
        None
    );
    drop(tx);
    assert_eq!(letters(&store, "dl").await, vec![letter.clone()]);

    store
        .note_dead_letter_failure(letter.id, "still bad")
        .await
        .expect("note a failure");
    let noted = letters(&store, "dl").await;
    let failure = (noted.len(), noted[0].attempts, noted[0].error.as_str());
    assert_eq!(failure, (1, 4, "still bad"));
    assert!(noted[0].last_failed_at >= letter.last_failed_at);

    assert!(store.discard_dead_letter(letter.id).await.expect("discard"));
    assert!(!store.discard_dead_letter(letter.id).await.expect("discard"));
    assert!(letters(&store, "dl").await.is_empty());
}

async fn suite_inbox<S: Backend>(store: S) {
    let mut tx = store.begin().await.expect("begin");
    assert!(inbox(&store, &mut tx, "h", "m-1").await);
    assert!(
        !inbox(&store, &mut tx, "h", "m-1").await,
        "claimed already in this transaction"
    );
    store.commit(tx).await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    assert!(
        !inbox(&store, &mut tx, "h", "m-1").await,
        "a handled message is claimed once"
    );
    assert!(
        inbox(&store, &mut tx, "other", "m-1").await,
        "another handler claims the same message"
    );
    store.commit(tx).await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    assert!(inbox(&store, &mut tx, "h", "m-2").await);
    drop(tx);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        inbox(&store, &mut tx, "h", "m-2").await,
        "a rolled-back claim leaves nothing"
    );
    store.commit(tx).await.expect("commit");
}

async fn suite_transactions<S: Backend>(store: S) {
    assert_eq!(store.classify(&std::fmt::Error), None, "not the backend's");

    // A backend may wake its readers once when it starts listening
    // (PostgreSQL does, on connecting): let that pass before subscribing.
    let mut warm_up = store.wakeups();
    let settled = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Wake::Poll) = tokio::time::timeout_at(settled, warm_up.wait()).await {}

    let mut tx = store.begin().await.expect("begin");
    let rolled_back = store
        .append_in(&mut tx, deposit("tx-1", 0))
        .await
        .expect("append in a transaction");
    assert_eq!(rolled_back.len(), 1);
    drop(tx);
    assert!(store
        .read_stream("account", "tx-1", 0, 10)
        .await
        .expect("read the stream")
        .is_empty());
    assert!(
        store
            .read_log(Checkpoint::START, &LogFilter::all(), 10)
            .await
            .expect("read the log")
            .is_empty(),
        "a rolled-back append leaves nothing in the log"
    );

    let mut wakeups = store.wakeups();
    let mut tx = store.begin().await.expect("begin");
    let written = store
        .append_in(&mut tx, deposit("tx-1", 0))
        .await
        .expect("append in a transaction");
    store.commit(tx).await.expect("commit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(deadline, wakeups.wait()).await {
            Ok(Wake::Signalled) => break,
            Ok(Wake::Poll) => {}
            Err(_) => panic!("no wake-up signal within 1 s of the commit"),
        }
    }
    let log = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 1).await;
    assert_eq!(
        log.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![written[0].event_id],
        "exactly the committed event is in the log"
    );
    assert_eq!(log[0].checkpoint(), written[0].checkpoint());

    // The stream's version counts committed events only.
    let mut tx = store.begin().await.expect("begin");
    let outcome = match store.append_in(&mut tx, deposit("tx-1", 0)).await {
        Ok(_) => store.commit(tx).await,
        Err(error) => Err(error),
    };
    assert!(
        matches!(outcome, Err(StoreError::Conflict { .. })),
        "expected a conflict, got {outcome:?}"
    );
}

/// Operators' requests (a rebuild, a retry) made through the store by a
/// process without the projection's code: asked, listed, taken once in the
/// transaction that serves them, and kept when that transaction rolls back.
async fn suite_requests<S: Backend>(store: S) {
    assert!(
        !store.request_rebuild("nobody").await.expect("request"),
        "no rebuild is asked of an unknown projection"
    );
    store.register_projection("rq", 2).await.expect("register");
    assert!(store.rebuild_requests().await.expect("list").is_empty());
    assert!(store.request_rebuild("rq").await.expect("request"));
    assert!(store.request_rebuild("rq").await.expect("asked twice"));
    assert_eq!(
        store.rebuild_requests().await.expect("list"),
        vec!["rq".to_owned()]
    );

    // Taken in a transaction that rolls back: still asked.
    let mut tx = store.begin().await.expect("begin");
    assert!(store
        .take_rebuild_request(&mut tx, "rq")
        .await
        .expect("take"));
    drop(tx);
    assert_eq!(
        store.rebuild_requests().await.expect("list"),
        vec!["rq".to_owned()]
    );
    // Taken and committed: gone; a second taker finds nothing.
    let mut tx = store.begin().await.expect("begin");
    assert!(store
        .take_rebuild_request(&mut tx, "rq")
        .await
        .expect("take"));
    store.commit(tx).await.expect("commit");
    assert!(store.rebuild_requests().await.expect("list").is_empty());
    let mut tx = store.begin().await.expect("begin");
    assert!(!store
        .take_rebuild_request(&mut tx, "rq")
        .await
        .expect("take"));
    drop(tx);

    // A retry: asked of a dead letter, listed with the unit that parked it,
    // served by an attempt that fails (noted) or by taking it.
    let u = unit("rq", 1);
    let event = one_event(&store, "rq-1").await;
    let mut tx = store.begin().await.expect("begin");
    store
        .park(
            &mut tx,
            NewDeadLetter {
                unit: &u,
                event: &event,
                error: "bad".into(),
                attempts: 1,
                first_failed_at: event.recorded_at,
            },
        )
        .await
        .expect("park");
    store.commit(tx).await.expect("commit");
    let id = letters(&store, "rq").await[0].id;
    assert!(!store.request_retry(id + 1000).await.expect("request"));
    assert!(store.retry_requests().await.expect("list").is_empty());
    assert!(store.request_retry(id).await.expect("request"));
    assert_eq!(
        store.retry_requests().await.expect("list"),
        vec![(u.clone(), id)]
    );
    store
        .note_dead_letter_failure(id, "still bad")
        .await
        .expect("note");
    assert!(
        store.retry_requests().await.expect("list").is_empty(),
        "a failed attempt serves the request"
    );
    assert!(store.request_retry(id).await.expect("request"));
    let mut tx = store.begin().await.expect("begin");
    store.take_dead_letter(&mut tx, id).await.expect("take");
    store.commit(tx).await.expect("commit");
    assert!(
        store.retry_requests().await.expect("list").is_empty(),
        "a dead letter handled is no longer asked of"
    );
}

on_every_backend! {
    suite_leases: memory_leases, postgres_leases, sqlite_leases;
    suite_checkpoints: memory_checkpoints, postgres_checkpoints, sqlite_checkpoints;
    suite_dead_letters: memory_dead_letters, postgres_dead_letters, sqlite_dead_letters;
    suite_inbox: memory_inbox, postgres_inbox, sqlite_inbox;
    suite_transactions: memory_transactions, postgres_transactions, sqlite_transactions;
    suite_requests: memory_requests, postgres_requests, sqlite_requests;
}
