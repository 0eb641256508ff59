//! The time chapter (`docs/src/time.md`): an order released when it is not
//! paid within 24 hours — a process manager scheduling and cancelling a
//! timer, a scheduler firing it — and a reminder scheduled by application
//! code in its own transaction, on a SQLite file. `tests/time.rs` runs it
//! with a clock it moves forward.

// ANCHOR: domain
use outflow::cqrs_es::event_sink::EventSink;
use outflow::prelude::*;
use serde::{Deserialize, Serialize};

/// An order: placed, then paid — or released when payment does not come.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Order {
    pub placed: bool,
    pub paid: bool,
    pub released: bool,
}

/// Serialize and Deserialize: a timer stores its command as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub enum OrderCommand {
    Place,
    Pay,
    Release,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    OrderPlaced,
    OrderPaid,
    OrderReleased,
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            OrderEvent::OrderPlaced => "OrderPlaced",
            OrderEvent::OrderPaid => "OrderPaid",
            OrderEvent::OrderReleased => "OrderReleased",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, PartialEq)]
pub enum OrderError {
    NotPlaced,
    AlreadyPlaced,
    AlreadyPaid,
    Released,
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OrderError::NotPlaced => "no such order",
            OrderError::AlreadyPlaced => "the order is already placed",
            OrderError::AlreadyPaid => "the order is paid",
            OrderError::Released => "the order was released",
        })
    }
}

impl std::error::Error for OrderError {}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = ();

    /// The order decides between payment and release: whichever comes
    /// first wins, and the other is refused.
    async fn handle(
        &mut self,
        command: OrderCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), OrderError> {
        let event = match command {
            OrderCommand::Place if self.placed => return Err(OrderError::AlreadyPlaced),
            OrderCommand::Place => OrderEvent::OrderPlaced,
            _ if !self.placed => return Err(OrderError::NotPlaced),
            _ if self.released => return Err(OrderError::Released),
            _ if self.paid => return Err(OrderError::AlreadyPaid),
            OrderCommand::Pay => OrderEvent::OrderPaid,
            OrderCommand::Release => OrderEvent::OrderReleased,
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderPlaced => self.placed = true,
            OrderEvent::OrderPaid => self.paid = true,
            OrderEvent::OrderReleased => self.released = true,
        }
    }
}
// ANCHOR_END: domain

// ANCHOR: process
use std::convert::Infallible;
use std::time::Duration;

use outflow::process::ProcessManager;
use outflow::timer::{Timer, TimerChange};

/// How long an order waits for its payment.
pub const PAYMENT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The key of an order's payment deadline.
pub fn deadline_key(order_id: &str) -> String {
    format!("order/{order_id}/payment")
}

/// Releases an order left unpaid for 24 hours. It only keeps time: no state
/// of its own, and no command of its own to dispatch (the timer sends
/// `Release` when it falls due).
pub struct PaymentDeadline;

#[async_trait]
impl ProcessManager for PaymentDeadline {
    type State = ();
    type Command = Infallible;

    fn name(&self) -> &str {
        "payment_deadline"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["order"]).with_event_types(["OrderPlaced", "OrderPaid"])
    }

    fn process_id(&self, event: &RecordedEvent) -> Option<String> {
        Some(event.aggregate_id.clone())
    }

    fn react(
        &self,
        _state: &mut (),
        _event: &RecordedEvent,
    ) -> Result<Vec<Infallible>, HandlerError> {
        Ok(Vec::new())
    }

    /// Applied in the transaction that stores this step, each change
    /// caused by `event`.
    fn timers(&self, _state: &(), event: &RecordedEvent) -> Result<Vec<TimerChange>, HandlerError> {
        let key = deadline_key(&event.aggregate_id);
        Ok(match event.event_type.as_str() {
            "OrderPlaced" => vec![TimerChange::Schedule(
                Timer::command::<Order>(key, &event.aggregate_id, &OrderCommand::Release)?
                    .after(PAYMENT_WINDOW), // by the database's clock
            )],
            "OrderPaid" => vec![TimerChange::Cancel(key)],
            _ => Vec::new(),
        })
    }

    async fn dispatch(&self, command: Infallible, _: CommandContext) -> Result<(), HandlerError> {
        match command {}
    }
}
// ANCHOR_END: process

// ANCHOR: wiring
use std::sync::Arc;

use outflow::outbox::Outbox;
use outflow::process::Process;
use outflow::timer::{Clock, Timers};

/// The running application, for its test.
pub struct Shop {
    pub store: SqliteStore,
    pub orders: Arc<CommandBus<Order, SqliteStore>>,
    pub timers: Timers<SqliteStore>,
    pub outbox: Outbox<SqliteStore>,
    pub runner: ProjectionRunner<SqliteStore>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<Result<(), StoreError>>,
}

pub async fn start(file: &std::path::Path, clock: Clock) -> Result<Shop, StoreError> {
    // Opening applies the migrations, which create the timers table.
    let store = SqliteStore::open(file).await?;
    // `Timers::new(&store)` in production: the database's clock as it is.
    // A test passes a clock it moves forward.
    let timers = Timers::with_clock(&store, clock).await?;
    let outbox = Outbox::new(&store).await?;
    let orders = Arc::new(CommandBus::<Order, _>::new(store.clone(), ()));

    // The process's steps schedule and cancel in its batches' transactions.
    let deadlines =
        Process::new(PaymentDeadline, &store, "payment_deadlines")?.with_timers(timers.clone());
    // Fires what falls due: commands to orders, messages into the outbox.
    let scheduler = timers
        .scheduler()
        .command(orders.clone())
        .outbox(outbox.clone())
        .build()?;
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(deadlines))
        .scheduler(scheduler) // under the runner's node id and lease
        .build()?;

    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });
    Ok(Shop {
        store,
        orders,
        timers,
        outbox,
        runner,
        shutdown,
        running,
    })
}
// ANCHOR_END: wiring

impl Shop {
    /// Stops the runner (and the scheduler with it).
    pub async fn stop(self) -> Result<(), Box<dyn std::error::Error>> {
        self.shutdown.cancel();
        self.running.await??;
        self.store.close().await;
        Ok(())
    }
}

// ANCHOR: own_transaction
use outflow::outbox::OutboxMessage;
use outflow::sqlx;
use serde_json::json;

/// A support agent promises to call a customer back within `within`: the
/// promise (a row of the application's own table) and the reminder that it
/// is due commit together, or not at all.
pub async fn promise_callback(
    store: &SqliteStore,
    timers: &Timers<SqliteStore>,
    order_id: &str,
    within: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    // On SQLite, a write transaction on the store's writer connection; on
    // PostgreSQL, `store.pool().begin()`.
    let mut tx = store.begin().await?;
    sqlx::query("INSERT INTO callbacks (order_id) VALUES (?)")
        .bind(order_id)
        .execute(&mut *tx)
        .await?;
    let reminder = OutboxMessage::new(
        order_id,
        "support.callback_due",
        json!({ "order": order_id }),
    );
    timers
        .schedule(
            &mut tx,
            Timer::message(format!("callback/{order_id}"), reminder).after(within),
        )
        .await?;
    timers.commit(tx).await?; // commits, then wakes a scheduler in this process
    Ok(())
}
// ANCHOR_END: own_transaction

// ANCHOR: inline
use outflow::command::InlineHandler;
use outflow::sqlx::{Sqlite, Transaction};
use outflow::Envelope;

/// The same deadline, kept by the order's own commands instead of a process
/// manager: scheduled in the transaction that appends `OrderPlaced`,
/// cancelled in the one that appends `OrderPaid`.
pub struct DeadlineInline {
    pub timers: Timers<SqliteStore>,
}

#[async_trait]
impl InlineHandler<Order, SqliteStore> for DeadlineInline {
    fn name(&self) -> &str {
        "payment_deadline"
    }

    async fn handle(
        &self,
        events: &[Envelope<Order>],
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        for event in events {
            let key = deadline_key(&event.aggregate_id);
            match event.payload {
                OrderEvent::OrderPlaced => {
                    let release =
                        Timer::command::<Order>(key, &event.aggregate_id, &OrderCommand::Release)?
                            .after(PAYMENT_WINDOW)
                            .caused_by_envelope(event);
                    self.timers.schedule(tx, release).await?;
                }
                OrderEvent::OrderPaid => {
                    self.timers.cancel(tx, &key).await?;
                }
                OrderEvent::OrderReleased => {}
            }
        }
        Ok(())
    }
}
// ANCHOR_END: inline

/// The inline variant, running, for its test.
pub struct Alone {
    pub orders: Arc<CommandBus<Order, SqliteStore>>,
    pub timers: Timers<SqliteStore>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<Result<(), StoreError>>,
}

pub async fn start_alone(file: &std::path::Path, clock: Clock) -> Result<Alone, StoreError> {
    let store = SqliteStore::open(file).await?;
    let timers = Timers::with_clock(&store, clock).await?;
    // ANCHOR: alone
    let orders = Arc::new(
        CommandBus::<Order, _>::builder(store.clone(), ())
            .inline(DeadlineInline {
                timers: timers.clone(),
            })
            .build(),
    );
    // On every node: the one holding the timers' lease fires them, the
    // others stand by and take over within the lease's time to live.
    let scheduler = timers
        .scheduler()
        .command(orders.clone())
        .node_id("web-1") // random by default
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });
    // ANCHOR_END: alone
    Ok(Alone {
        orders,
        timers,
        shutdown,
        running,
    })
}

impl Alone {
    /// Stops the scheduler.
    pub async fn stop(self) -> Result<(), Box<dyn std::error::Error>> {
        self.shutdown.cancel();
        self.running.await??;
        Ok(())
    }
}
