//! Delivery strategies that need no broker: inline handlers (exactly once,
//! in the append transaction), post-commit in-memory pub/sub and multi-node
//! pub/sub (at most once).

use outflow_tests as common;

use std::time::Duration;

use async_trait::async_trait;
use example_accounts::{BankAccount, BankCommand};
use outflow::command::InlineHandler;
use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::projection::HandlerError;
use outflow::pubsub::{EventBus, NodeEvents, RecvError};
use outflow::{CommandBus, CommandError, Envelope, EventStore, MemoryStore, PostgresStore};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};

/// A user who registers with an e-mail address.
#[derive(Debug, Default, Serialize, Deserialize)]
struct User {
    email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum UserEvent {
    Registered { email: String },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        "Registered".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("already registered")]
struct AlreadyRegistered;

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = String;
    type Event = UserEvent;
    type Error = AlreadyRegistered;
    type Services = ();

    async fn handle(
        &mut self,
        email: String,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AlreadyRegistered> {
        if self.email.is_some() {
            return Err(AlreadyRegistered);
        }
        sink.write(UserEvent::Registered { email }, self).await;
        Ok(())
    }

    fn apply(&mut self, event: UserEvent) {
        let UserEvent::Registered { email } = event;
        self.email = Some(email);
    }
}

/// Reserves each e-mail address once, in the append transaction; writes an
/// audit row first, to show that every write of the handler rolls back.
struct UniqueEmails;

#[async_trait]
impl InlineHandler<User, PostgresStore> for UniqueEmails {
    fn name(&self) -> &str {
        "unique-emails"
    }

    async fn handle(
        &self,
        events: &[Envelope<User>],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            let UserEvent::Registered { email } = &event.payload;
            sqlx::query("INSERT INTO audit (user_id, note) VALUES ($1, 'registering')")
                .bind(&event.aggregate_id)
                .execute(&mut **tx)
                .await?;
            sqlx::query("INSERT INTO emails (email, user_id) VALUES ($1, $2)")
                .bind(email)
                .bind(&event.aggregate_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

async fn user_store(db: &common::TestDb) -> PostgresStore {
    let store = db.store().await;
    sqlx::raw_sql(
        "CREATE TABLE emails (email text PRIMARY KEY, user_id text NOT NULL);
         CREATE TABLE audit (user_id text NOT NULL, note text NOT NULL);",
    )
    .execute(store.pool())
    .await
    .expect("tables");
    store
}

async fn count(store: &PostgresStore, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_handler_error_rolls_back_the_events_and_its_writes() {
    let db = common::TestDb::new("inline").await;
    let store = user_store(&db).await;
    let events = EventBus::new(16);
    let mut subscription = events.subscribe();
    let bus = CommandBus::<User, _>::builder(store.clone(), ())
        .inline(UniqueEmails)
        .publish_to(events.clone())
        .build();

    let first = bus
        .execute("u1", "ann@example.com".to_owned())
        .await
        .expect("first registration");
    assert_eq!(first.version, 1);
    assert_eq!(count(&store, "SELECT count(*) FROM emails").await, 1);
    let published = subscription.recv().await.expect("published after commit");
    assert_eq!(published.event_id, first.events[0].event_id);

    match bus.execute("u2", "ann@example.com".to_owned()).await {
        Err(CommandError::Inline { handler, error }) => {
            assert_eq!(handler, "unique-emails");
            assert!(error.chain().contains("duplicate key"), "{error}");
        }
        other => panic!("expected an inline handler error, got {other:?}"),
    }
    // Nothing of the failed command remains: no events, no rows, no message.
    assert!(store
        .read_stream("user", "u2", 0, 10)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        count(&store, "SELECT count(*) FROM audit WHERE user_id = 'u2'").await,
        0
    );
    assert_eq!(count(&store, "SELECT count(*) FROM emails").await, 1);
    assert_eq!(count(&store, "SELECT count(*) FROM events").await, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), subscription.recv())
            .await
            .is_err(),
        "a rolled-back command published something"
    );

    // The same user may register with a free address afterwards.
    bus.execute("u2", "bob@example.com".to_owned())
        .await
        .expect("second address");
    assert_eq!(count(&store, "SELECT count(*) FROM emails").await, 2);
}

/// Fails every command: shows the in-memory store rolls back too.
struct Refuse;

#[async_trait]
impl InlineHandler<BankAccount, MemoryStore> for Refuse {
    fn name(&self) -> &str {
        "refuse"
    }
    async fn handle(
        &self,
        _: &[Envelope<BankAccount>],
        _: &mut outflow::store::memory::MemoryTransaction,
    ) -> Result<(), HandlerError> {
        Err(HandlerError::msg("no"))
    }
}

#[tokio::test]
async fn inline_handlers_roll_back_on_the_memory_store_too() {
    let store = MemoryStore::new();
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .inline(Refuse)
        .build();
    let result = bus
        .execute(
            "acc",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await;
    assert!(
        matches!(result, Err(CommandError::Inline { .. })),
        "{result:?}"
    );
    assert!(store.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_publishes_after_commit_and_tells_a_lagging_subscriber_what_it_missed() {
    let db = common::TestDb::new("pubsub").await;
    let store = db.store().await;
    let reader = db.store().await;
    let events = EventBus::new(4);
    let mut slow = events.subscribe();
    let mut fast = events.subscribe();
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .publish_to(events.clone())
        .build();

    bus.execute(
        "acc",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");
    // When a subscriber sees an event, it is committed: another connection
    // can read it.
    let seen = fast.recv().await.expect("the open event");
    let stored = reader
        .read_stream("account", "acc", 0, 10)
        .await
        .expect("read");
    assert_eq!(stored[0].event_id, seen.event_id);

    // A rejected command publishes nothing.
    assert!(bus
        .execute("acc", BankCommand::Withdraw { amount: 10 })
        .await
        .is_err());
    // Ten deposits while `slow` reads nothing: the command path never waits
    // for it, and it learns how many it missed.
    for _ in 0..10 {
        bus.execute("acc", BankCommand::Deposit { amount: 1 })
            .await
            .expect("deposit");
        fast.recv().await.expect("fast keeps up");
    }
    match slow.recv().await {
        Err(RecvError::Lagged(missed)) => assert_eq!(missed, 7, "11 events, 4 kept"),
        other => panic!("expected Lagged, got {other:?}"),
    }
    let mut rest = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(100), slow.recv()).await {
        rest.push(event.sequence);
    }
    assert_eq!(rest, vec![8, 9, 10, 11], "the newest four remain");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), fast.recv())
            .await
            .is_err(),
        "the rejected withdrawal published nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_on_one_node_reach_subscribers_on_every_node() {
    let db = common::TestDb::new("nodes_pubsub").await;
    let node_a = db.store().await;
    let node_b = db.store().await;
    let bus_a = EventBus::new(64);
    let bus_b = EventBus::new(64);
    let _feed_a = NodeEvents::start(node_a.clone(), bus_a.clone())
        .await
        .expect("feed a");
    let _feed_b = NodeEvents::start(node_b.clone(), bus_b.clone())
        .await
        .expect("feed b");
    let mut on_a = bus_a.subscribe();
    let mut on_b = bus_b.subscribe();

    let commands = CommandBus::<BankAccount, _>::new(node_a.clone(), ());
    let big_owner = "x".repeat(20_000);
    commands
        .execute(
            "small",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("small");
    commands
        .execute(
            "big",
            BankCommand::Open {
                owner: big_owner.clone(),
            },
        )
        .await
        .expect("an event far above NOTIFY's 8000 bytes");
    for subscription in [&mut on_a, &mut on_b] {
        let mut got = Vec::new();
        for _ in 0..2 {
            let event = tokio::time::timeout(Duration::from_secs(20), subscription.recv())
                .await
                .expect("delivered within 20 s")
                .expect("an event");
            got.push((event.aggregate_id.clone(), event.payload.to_string().len()));
        }
        assert_eq!(got[0].0, "small");
        assert_eq!(got[1].0, "big");
        assert!(got[1].1 > 20_000);
    }
}
