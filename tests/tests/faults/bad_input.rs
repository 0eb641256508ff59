//! Bad input gives typed errors, never panics: invalid table names are
//! refused before anything reaches the database; stored events that do not
//! decode (a payload of the wrong shape, an unknown event type, a failing or
//! panicking upcaster) make loads and decodes fail with an error naming the
//! event, the same on PostgreSQL and in memory, and the events stay stored.

use outflow_tests as common;

use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::cqrs_es::persist::{SemanticVersionEventUpcaster, SerializedEvent};
use outflow::cqrs_es::Aggregate;
use outflow::upcast::{self, UpcastError, Upcaster};
use outflow::{
    AppendRequest, CommandBus, CommandError, EventRef, EventStore, MemoryStore, NewEvent,
    PostgresStore, RecordedEvent, StoreError,
};
use serde_json::{json, Value};
use sqlx::PgPool;

// ---------------------------------------------------------------------------
// (a) table names

/// Every table, view and sequence outside the system schemas.
async fn relations(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') \
            AND c.relkind IN ('r', 'v', 'S', 'p') \
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("list relations")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_table_names_are_refused_before_touching_the_database() {
    let db = common::TestDb::new("bad_names").await;
    let pool = db.pool(4).await;
    // The table an injected `drop table x` would drop.
    sqlx::query("CREATE TABLE x (id integer)")
        .execute(&pool)
        .await
        .expect("create the sentinel table");

    let e60 = "e".repeat(60);
    let e70 = "e".repeat(70);
    let qualified_long = format!("{}.{}", "s".repeat(30), "t".repeat(30));
    // (events table, snapshots table, what the error is about, the name it must report)
    let mut cases: Vec<(String, Option<String>, &str, String)> = Vec::new();
    for bad in [
        "events; drop table x",
        "Events",
        "a.b.c",
        e70.as_str(),
        "",
        "\"events\"",
        "public.Events",
        "1events",
        "events --",
        "ev\u{e9}nts",
    ] {
        cases.push((bad.to_owned(), None, "events table", bad.to_owned()));
    }
    for bad in ["snaps; drop table x", "Snapshots", "a.b.c", e70.as_str()] {
        cases.push((
            "events".to_owned(),
            Some(bad.to_owned()),
            "snapshots table",
            bad.to_owned(),
        ));
    }
    // Valid names whose derived names would exceed PostgreSQL's 63 bytes.
    cases.push((
        e60.clone(),
        None,
        "snapshots table",
        format!("{e60}_snapshots"),
    ));
    cases.push((
        e60.clone(),
        Some("snaps".to_owned()),
        "events log index name",
        format!("{e60}_log_idx"),
    ));
    cases.push((
        qualified_long.clone(),
        None,
        "notification channel derived from the events table",
        format!("outflow_{}", qualified_long.replace('.', "_")),
    ));

    for (events, snapshots, want_what, want_name) in &cases {
        let mut builder = PostgresStore::builder(pool.clone()).events_table(events.clone());
        if let Some(snapshots) = snapshots {
            builder = builder.snapshots_table(snapshots.clone());
        }
        match builder.build().await {
            Err(error @ StoreError::InvalidIdentifier { .. }) => {
                let text = error.to_string();
                let StoreError::InvalidIdentifier { what, name, reason } = error else {
                    unreachable!("matched above");
                };
                assert_eq!(
                    what, *want_what,
                    "events `{events}`, snapshots {snapshots:?}"
                );
                assert_eq!(
                    name, *want_name,
                    "events `{events}`, snapshots {snapshots:?}"
                );
                assert!(!reason.is_empty());
                assert!(
                    text.contains(&format!("`{want_name}`")) && text.contains(want_what),
                    "message must name the input: {text}"
                );
            }
            Err(other) => panic!("`{events}` / {snapshots:?}: wrong error {other:?}"),
            Ok(_) => panic!("`{events}` / {snapshots:?} was accepted"),
        }
    }
    for bad in ["events; drop table x", "Events", "a.b.c", e70.as_str()] {
        match PostgresStore::migrate(&pool, bad).await {
            Err(StoreError::InvalidIdentifier { what, name, .. }) => {
                assert_eq!((what, name.as_str()), ("events table", bad));
            }
            other => panic!("migrate(`{bad}`) gave {other:?}"),
        }
    }

    assert_eq!(
        relations(&pool).await,
        vec!["public.x".to_owned()],
        "a rejected name must not create (or drop) anything"
    );

    // The same pool with a valid name does create the schema: the check above
    // would have seen it.
    PostgresStore::builder(pool.clone())
        .events_table("good_events")
        .build()
        .await
        .expect("a valid name builds");
    let created = relations(&pool).await;
    for table in [
        "public.good_events",
        "public.good_events_snapshots",
        "public.outflow_migrations",
        "public.x",
    ] {
        assert!(
            created.contains(&table.to_owned()),
            "{table} in {created:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// (b)-(d) stored events that do not decode

fn event(event_type: &str, event_version: &str, payload: Value) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        payload,
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    }
}

/// Writes an opened account with 100 deposited, then `last`, in one append.
async fn seed<S: EventStore>(store: &S, id: &str, last: NewEvent) -> Vec<RecordedEvent> {
    let written = store
        .append(AppendRequest {
            aggregate_type: BankAccount::TYPE.to_owned(),
            aggregate_id: id.to_owned(),
            expected_version: 0,
            events: vec![
                event(
                    "AccountOpened",
                    "1.0",
                    json!({"AccountOpened": {"owner": "Ann"}}),
                ),
                event("Deposited", "1.0", json!({"Deposited": {"amount": 100}})),
                last,
            ],
        })
        .await
        .expect("append accepts any payload");
    assert_eq!(written.len(), 3);
    written
}

/// Outflow's own upcaster that refuses what it cannot read.
struct StrictCents;

impl Upcaster for StrictCents {
    fn name(&self) -> &str {
        "strict-cents"
    }
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "Deposited" && event_version == "0.9"
    }
    fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        let cents = &event.payload["Deposited"]["cents"];
        let amount = cents
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| UpcastError::new(format!("`cents` is not a numeric string: {cents}")))?;
        event.payload = json!({"Deposited": {"amount": amount}});
        event.event_version = "1.0".to_owned();
        Ok(event)
    }
}

/// A `cqrs-es` upcaster whose function panics.
fn panicking_cqrs_upcaster() -> Box<dyn Upcaster> {
    upcast::from_cqrs(Box::new(SemanticVersionEventUpcaster::new(
        "Withdrawn",
        "2.0.0",
        Box::new(|_| panic!("withdrawal without amount")),
    )))
}

/// One bad stored event and what it must produce.
struct Case {
    name: &'static str,
    id: &'static str,
    last: fn() -> NewEvent,
    upcasters: fn() -> Vec<Box<dyn Upcaster>>,
    /// Checks the error's variant and details; returns a summary.
    check: fn(&StoreError) -> String,
}

fn no_upcasters() -> Vec<Box<dyn Upcaster>> {
    Vec::new()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "payload of the wrong shape",
            id: "bad-payload",
            last: || event("Deposited", "1.0", json!({"Deposited": {"amount": "lots"}})),
            upcasters: no_upcasters,
            check: |error| match error {
                StoreError::Deserialize { event, source } => {
                    assert!(source.to_string().contains("lots"), "{source}");
                    summary("Deserialize", event)
                }
                other => panic!("expected Deserialize, got {other:?}"),
            },
        },
        Case {
            name: "unknown event type",
            id: "unknown-type",
            last: || {
                event(
                    "InterestPaid",
                    "1.0",
                    json!({"InterestPaid": {"amount": 5, "rate": "0.5%"}}),
                )
            },
            upcasters: no_upcasters,
            check: |error| match error {
                StoreError::UnknownEventType { event, source } => {
                    assert!(source.to_string().contains("InterestPaid"), "{source}");
                    summary("UnknownEventType", event)
                }
                other => panic!("expected UnknownEventType, got {other:?}"),
            },
        },
        Case {
            name: "upcaster returning an error",
            id: "failing-upcaster",
            last: || event("Deposited", "0.9", json!({"Deposited": {"cents": "ten"}})),
            upcasters: || vec![Box::new(StrictCents)],
            check: |error| match error {
                StoreError::Upcast {
                    event,
                    upcaster,
                    message,
                } => {
                    assert_eq!(upcaster, "strict-cents");
                    assert!(
                        message.contains("`cents` is not a numeric string"),
                        "{message}"
                    );
                    assert!(error.to_string().contains("strict-cents"), "{error}");
                    format!("{} by {upcaster}", summary("Upcast", event))
                }
                other => panic!("expected Upcast, got {other:?}"),
            },
        },
        Case {
            name: "cqrs-es upcaster panicking",
            id: "panicking-upcaster",
            last: || event("Withdrawn", "1.0", json!({"Withdrawn": {}})),
            upcasters: || vec![panicking_cqrs_upcaster()],
            check: |error| match error {
                StoreError::Upcast {
                    event,
                    upcaster,
                    message,
                } => {
                    assert_eq!(upcaster, "cqrs-es upcaster");
                    assert!(message.contains("withdrawal without amount"), "{message}");
                    assert!(error.to_string().contains("cqrs-es upcaster"), "{error}");
                    format!("{} by {upcaster}", summary("Upcast", event))
                }
                other => panic!("expected Upcast, got {other:?}"),
            },
        },
    ]
}

/// What must match between stores (positions may differ).
fn summary(variant: &str, event: &EventRef) -> String {
    format!(
        "{variant} {} v{} of {} `{}` #{}",
        event.event_type,
        event.event_version,
        event.aggregate_type,
        event.aggregate_id,
        event.sequence
    )
}

/// The error names exactly the stored event, in its fields and its message.
fn assert_names(error: &StoreError, bad: &RecordedEvent, context: &str) {
    let event = match error {
        StoreError::Deserialize { event, .. }
        | StoreError::UnknownEventType { event, .. }
        | StoreError::Upcast { event, .. } => event,
        other => panic!("{context}: not an event error: {other:?}"),
    };
    let expected = EventRef {
        aggregate_type: "account".to_owned(),
        aggregate_id: bad.aggregate_id.clone(),
        sequence: bad.sequence,
        position: Some(bad.position),
        event_type: bad.event_type.clone(),
        event_version: bad.event_version.clone(),
    };
    assert_eq!(**event, expected, "{context}");
    let text = error.to_string();
    for part in [
        format!("`{}`", bad.event_type),
        format!("`{}`", bad.aggregate_id),
        format!("#{}", bad.sequence),
        format!("position {}", bad.position),
    ] {
        assert!(
            text.contains(&part),
            "{context}: `{part}` missing from: {text}"
        );
    }
}

/// Runs every case on `store`; returns one summary line per error seen.
async fn undecodable_events<S: outflow::Backend>(store: S) -> Vec<String> {
    let mut summaries = Vec::new();
    for case in cases() {
        let written = seed(&store, case.id, (case.last)()).await;
        let bad = written[2].clone();
        let context = |how: &str| format!("{} via {how}", case.name);
        let mut check = |error: &StoreError, how: &str| {
            assert_names(error, &bad, &context(how));
            summaries.push(format!("{}: {}", context(how), (case.check)(error)));
        };

        // Loading, with and without the snapshot path.
        for snapshots in [0, 1] {
            let mut builder = CommandBus::<BankAccount, _>::builder(store.clone(), ());
            for upcaster in (case.upcasters)() {
                builder = builder.upcaster(upcaster);
            }
            let bus = builder.snapshot_every(snapshots).build();
            let error = bus.load(case.id).await.expect_err("load must fail");
            check(&error, &format!("load (snapshot_every {snapshots})"));

            // A command on the aggregate fails the same way and writes nothing.
            match bus
                .execute(case.id, BankCommand::Deposit { amount: 1 })
                .await
            {
                Err(CommandError::Store(error)) => {
                    check(&error, &format!("execute (snapshot_every {snapshots})"));
                }
                Err(other) => panic!("{}: execute gave {other:?}", case.name),
                Ok(_) => panic!("{}: execute succeeded on an undecodable stream", case.name),
            }
        }

        // Decoding the stored event directly; the good ones still decode.
        let stored = store
            .read_stream("account", case.id, 0, 100)
            .await
            .expect("read the stream");
        let upcasters = (case.upcasters)();
        let decoded: Vec<Result<_, _>> = stored
            .iter()
            .cloned()
            .map(|e| e.decode::<BankAccount>(&upcasters))
            .collect();
        assert_eq!(decoded.len(), 3, "{}", case.name);
        match &decoded[0] {
            Ok(envelope) => assert_eq!(
                envelope.payload,
                BankEvent::AccountOpened {
                    owner: "Ann".into()
                }
            ),
            Err(error) => panic!("{}: a good event did not decode: {error}", case.name),
        }
        match &decoded[2] {
            Err(error) => check(error, "decode"),
            Ok(envelope) => panic!("{}: decoded to {:?}", case.name, envelope.payload),
        }

        // Nothing lost: the stream is still exactly what was written.
        let key = |e: &RecordedEvent| {
            (
                e.event_id,
                e.sequence,
                e.position,
                e.event_type.clone(),
                e.event_version.clone(),
                e.payload.clone(),
            )
        };
        assert_eq!(
            stored.iter().map(key).collect::<Vec<_>>(),
            written.iter().map(key).collect::<Vec<_>>(),
            "{}: the stored events changed",
            case.name
        );
    }
    summaries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_events_give_the_same_typed_errors_on_both_stores() {
    let db = common::TestDb::new("bad_events").await;
    let postgres = db.store().await;
    let from_postgres = undecodable_events(postgres.clone()).await;
    let from_memory = undecodable_events(MemoryStore::new()).await;
    // 4 cases x (2 loads + 2 executes + 1 decode)
    assert_eq!(from_postgres.len(), 20, "{from_postgres:#?}");
    assert_eq!(from_postgres, from_memory);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(postgres.pool())
        .await
        .expect("count events");
    assert_eq!(rows, 12, "every seeded event is still stored, nothing else");
}

// ---------------------------------------------------------------------------
// a working upcaster chain

/// `Credited` was renamed `Deposited`.
struct CreditedIsDeposited;

impl Upcaster for CreditedIsDeposited {
    fn name(&self) -> &str {
        "credited-is-deposited"
    }
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "Credited" && event_version == "1.0"
    }
    fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        let body = event
            .payload
            .get("Credited")
            .cloned()
            .ok_or_else(|| UpcastError::new("no `Credited` body"))?;
        event.payload = json!({ "Deposited": body });
        event.event_type = "Deposited".to_owned();
        Ok(event)
    }
}

/// `Deposited` 1.0 was first written with `cents` as a string; 1.1.0 reads
/// both shapes as `amount`.
fn cents_to_amount() -> Box<dyn Upcaster> {
    upcast::from_cqrs(Box::new(SemanticVersionEventUpcaster::new(
        "Deposited",
        "1.1.0",
        Box::new(|payload| {
            match payload["Deposited"]["cents"]
                .as_str()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(amount) => json!({"Deposited": {"amount": amount}}),
                None => payload,
            }
        }),
    )))
}

fn working_chain() -> Vec<Box<dyn Upcaster>> {
    vec![Box::new(CreditedIsDeposited), cents_to_amount()]
}

async fn old_shapes_upcast<S: outflow::Backend>(store: S) {
    let old_deposit = json!({"Deposited": {"cents": "250"}});
    let written = store
        .append(AppendRequest {
            aggregate_type: "account".to_owned(),
            aggregate_id: "legacy".to_owned(),
            expected_version: 0,
            events: vec![
                event(
                    "AccountOpened",
                    "1.0",
                    json!({"AccountOpened": {"owner": "Ann"}}),
                ),
                event("Deposited", "1.0", old_deposit.clone()),
                event("Credited", "1.0", json!({"Credited": {"amount": 50}})),
                event("Withdrawn", "1.0", json!({"Withdrawn": {"amount": 100}})),
            ],
        })
        .await
        .expect("append old shapes");
    assert_eq!(written.len(), 4);

    // Without the upcasters the old shape does not load.
    let plain = CommandBus::<BankAccount, _>::new(store.clone(), ());
    match plain.load("legacy").await {
        Err(StoreError::Deserialize { event, .. }) => assert_eq!(event.sequence, 2),
        other => panic!("old shape loaded without upcasters: {other:?}"),
    }

    let mut builder = CommandBus::<BankAccount, _>::builder(store.clone(), ()).snapshot_every(2);
    for upcaster in working_chain() {
        builder = builder.upcaster(upcaster);
    }
    let bus = builder.build();
    let (account, version) = bus.load("legacy").await.expect("upcast load");
    assert_eq!(version, 4);
    assert_eq!(
        account,
        BankAccount {
            opened: true,
            closed: false,
            owner: "Ann".into(),
            balance: 250 + 50 - 100,
        }
    );

    let committed = bus
        .execute("legacy", BankCommand::Withdraw { amount: 200 })
        .await
        .expect("the upcast balance allows this withdrawal");
    assert_eq!(committed.version, 5);
    let (account, version) = bus.load("legacy").await.expect("load after the command");
    assert_eq!((account.balance, version), (0, 5));
    let refused = bus
        .execute("legacy", BankCommand::Withdraw { amount: 1 })
        .await;
    assert!(
        matches!(refused, Err(CommandError::Rejected(_))),
        "{refused:?}"
    );

    // Decoding shows the upcast type, version and payload; the rows keep the old shape.
    let stored = store
        .read_stream("account", "legacy", 0, 100)
        .await
        .expect("read the stream");
    assert_eq!(stored.len(), 5);
    assert_eq!(stored[1].payload, old_deposit, "rows are not rewritten");
    assert_eq!(stored[2].event_type, "Credited");
    let chain = working_chain();
    let decoded: Vec<(String, String, BankEvent)> = stored
        .into_iter()
        .map(|e| {
            let envelope = e.decode::<BankAccount>(&chain).expect("decodes");
            (
                envelope.event_type,
                envelope.event_version,
                envelope.payload,
            )
        })
        .collect();
    assert_eq!(
        decoded,
        vec![
            (
                "AccountOpened".into(),
                "1.0".into(),
                BankEvent::AccountOpened {
                    owner: "Ann".into()
                }
            ),
            (
                "Deposited".into(),
                "1.1.0".into(),
                BankEvent::Deposited { amount: 250 }
            ),
            (
                "Deposited".into(),
                "1.1.0".into(),
                BankEvent::Deposited { amount: 50 }
            ),
            (
                "Withdrawn".into(),
                "1.0".into(),
                BankEvent::Withdrawn { amount: 100 }
            ),
            (
                "Withdrawn".into(),
                "1.0".into(),
                BankEvent::Withdrawn { amount: 200 }
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_event_shapes_are_upcast_on_postgres() {
    let db = common::TestDb::new("upcast_ok").await;
    old_shapes_upcast(db.store().await).await;
}

#[tokio::test]
async fn old_event_shapes_are_upcast_in_memory() {
    old_shapes_upcast(MemoryStore::new()).await;
}
