//! Renaming an event is one line: with `EventAliases` given to the bus and
//! the runner, events stored under the old name load under the new one, a
//! projection filtered by the new name reads them (a batch projection and a
//! view), and nothing stored changes — on memory, PostgreSQL and SQLite.
//! Without the aliases the filtered projection silently saw only the events
//! stored under the new name.

use outflow_tests as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::views::Balance;
use example_accounts::{BankAccount, BankEvent};
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::upcast::{EventAliases, UpcastError, Upcaster, Upcasters};
use outflow::view::{ViewProjection, ViewStore};
use outflow::{AppendRequest, Backend, CommandBus, LogFilter, NewEvent, RecordedEvent};

/// Sums the deposits it is handed; filtered by the new name only.
struct Deposits<S> {
    seen: Arc<Mutex<Vec<(String, i64)>>>,
    _store: std::marker::PhantomData<fn() -> S>,
}

#[async_trait]
impl<S: Backend> Projection<S> for Deposits<S> {
    fn name(&self) -> &str {
        "deposits"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"]).with_event_types(["Deposited"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().expect("the record");
        for event in events {
            let BankEvent::Deposited { amount } = event.decode_payload::<BankAccount>()? else {
                return Err(HandlerError::msg(format!(
                    "not a deposit: {}",
                    event.event_type
                )));
            };
            seen.push((event.event_type.clone(), amount));
        }
        Ok(())
    }
}

fn stored(event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.into(),
        event_version: "1.0".into(),
        payload,
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    }
}

async fn a_renamed_event_is_read_under_its_new_name<S: Backend + ViewStore>(store: S) {
    // History: the account was credited under the event's old name twice,
    // then under the new one.
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "r".into(),
            expected_version: 0,
            events: vec![
                stored(
                    "AccountOpened",
                    serde_json::json!({ "AccountOpened": { "owner": "Ren" } }),
                ),
                stored(
                    "AccountCredited",
                    serde_json::json!({ "AccountCredited": { "amount": 5 } }),
                ),
                stored(
                    "AccountCredited",
                    serde_json::json!({ "AccountCredited": { "amount": 7 } }),
                ),
                stored(
                    "Deposited",
                    serde_json::json!({ "Deposited": { "amount": 3 } }),
                ),
            ],
        })
        .await
        .expect("append the history");
    let aliases = EventAliases::new().rename("AccountCredited", "Deposited");

    // Loads.
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .event_aliases(aliases.clone())
        .build();
    let (account, version) = bus.load("r").await.expect("load under the new name");
    assert_eq!((account.balance, version), (15, 4));

    // A batch projection filtered by the new name, and a view.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let balances =
        ViewProjection::<BankAccount, Balance>::new("renamed_balances", "renamed_balances")
            .expect("a view");
    let runner = ProjectionRunner::builder(store.clone())
        .event_aliases(aliases)
        .projection(ProjectionOptions::new(Deposits::<S> {
            seen: seen.clone(),
            _store: std::marker::PhantomData,
        }))
        .projection(ProjectionOptions::new(balances.clone()))
        .build()
        .expect("the runner");
    let (stop, running) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(
            head,
            &["deposits", "renamed_balances"],
            Duration::from_secs(30),
        )
        .await
        .expect("both caught up");
    let seen = seen.lock().expect("the record").clone();
    assert_eq!(
        seen,
        [
            ("Deposited".to_owned(), 5),
            ("Deposited".to_owned(), 7),
            ("Deposited".to_owned(), 3)
        ],
        "every deposit, under the new name"
    );
    let view = balances
        .query(&store)
        .load("r")
        .await
        .expect("the view")
        .expect("a row");
    assert_eq!(view.balance, 15);
    common::stop_runner(stop, running).await;

    // Nothing stored changed.
    let raw = store
        .read_stream("account", "r", 0, 10)
        .await
        .expect("the stream");
    assert_eq!(raw[1].event_type, "AccountCredited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_on_postgres() {
    let db = common::TestDb::new("renames").await;
    a_renamed_event_is_read_under_its_new_name(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_on_sqlite() {
    let dir = common::TestDir::new("renames");
    a_renamed_event_is_read_under_its_new_name(dir.sqlite().await).await;
}

/// Version 1 of `Deposited` stored the amount as a string.
struct AmountAsNumber;

impl Upcaster for AmountAsNumber {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "Deposited" && event_version == "1.0"
    }

    fn upcast(
        &self,
        mut event: cqrs_es::persist::SerializedEvent,
    ) -> Result<cqrs_es::persist::SerializedEvent, UpcastError> {
        let amount = event.payload["Deposited"]["amount"]
            .as_str()
            .and_then(|a| a.parse::<i64>().ok())
            .ok_or_else(|| UpcastError::new("`amount` is not a numeric string"))?;
        event.payload["Deposited"]["amount"] = amount.into();
        event.event_version = "2.0".into();
        Ok(event)
    }
}

/// A hand-written projection decoding with the shared list.
struct Decoding<S> {
    upcasters: Upcasters,
    seen: Arc<Mutex<Vec<i64>>>,
    _store: std::marker::PhantomData<fn() -> S>,
}

#[async_trait]
impl<S: Backend> Projection<S> for Decoding<S> {
    fn name(&self) -> &str {
        "decoding"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        for event in events {
            if let BankEvent::Deposited { amount } =
                event.decode_payload_with::<BankAccount>(&self.upcasters)?
            {
                self.seen.lock().expect("the record").push(amount);
            }
        }
        Ok(())
    }
}

/// One list of upcasters — a rename and a version bump — declared once and
/// given, cloned, to the bus, a view and a hand-written projection.
async fn one_list_of_upcasters<S: Backend + ViewStore>(store: S) {
    let mut old = stored(
        "AccountCredited",
        serde_json::json!({ "AccountCredited": { "amount": "5" } }),
    );
    old.event_version = "1.0".into();
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "u".into(),
            expected_version: 0,
            events: vec![
                stored(
                    "AccountOpened",
                    serde_json::json!({ "AccountOpened": { "owner": "Una" } }),
                ),
                old,
            ],
        })
        .await
        .expect("append the history");
    let upcasters = Upcasters::new()
        .with(EventAliases::new().rename("AccountCredited", "Deposited"))
        .with(AmountAsNumber);

    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .upcasters(upcasters.clone())
        .build();
    let (account, _) = bus.load("u").await.expect("load through the list");
    assert_eq!(account.balance, 5);

    let balances =
        ViewProjection::<BankAccount, Balance>::new("upcast_balances", "upcast_balances")
            .expect("a view")
            .upcasters(upcasters.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(balances.clone()))
        .projection(ProjectionOptions::new(Decoding::<S> {
            upcasters,
            seen: seen.clone(),
            _store: std::marker::PhantomData,
        }))
        .build()
        .expect("the runner");
    let (stop, running) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(
            head,
            &["upcast_balances", "decoding"],
            Duration::from_secs(30),
        )
        .await
        .expect("both caught up");
    common::stop_runner(stop, running).await;
    let view = balances
        .query(&store)
        .load("u")
        .await
        .expect("the view")
        .expect("a row");
    assert_eq!(view.balance, 5);
    assert_eq!(*seen.lock().expect("the record"), [5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_list_of_upcasters_on_postgres() {
    let db = common::TestDb::new("upcaster_list").await;
    one_list_of_upcasters(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_list_of_upcasters_on_sqlite() {
    let dir = common::TestDir::new("upcaster_list");
    one_list_of_upcasters(dir.sqlite().await).await;
}
