//! The personal data chapter's code: a customer whose name and address are
//! personal, a directory view of them, and forgetting a customer.

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent, EventEnvelope, View};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::view::{ViewProjection, ViewQuery};
use outflow::{CommandBus, SqliteStore, StoreError};
use serde::{Deserialize, Serialize};

// ANCHOR: domain
use outflow::personal::Personal;

/// A customer: the name and the address are personal, the rest is not.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Customer {
    pub registered: bool,
    pub name: Personal<String>,
    pub email: Personal<String>,
    pub orders: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CustomerCommand {
    Register { name: String, email: String },
    PlaceOrder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerEvent {
    Registered {
        name: Personal<String>,
        email: Personal<String>,
    },
    OrderPlaced,
}

impl Aggregate for Customer {
    const TYPE: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = CustomerError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CustomerCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CustomerError> {
        match command {
            CustomerCommand::Register { name, email } => {
                // `Personal::new`: the subject is the stream's, this customer.
                let event = CustomerEvent::Registered {
                    name: Personal::new(name),
                    email: Personal::new(email),
                };
                sink.write(event, self).await;
            }
            CustomerCommand::PlaceOrder => sink.write(CustomerEvent::OrderPlaced, self).await,
        }
        Ok(())
    }

    fn apply(&mut self, event: CustomerEvent) {
        match event {
            CustomerEvent::Registered { name, email } => {
                self.registered = true;
                self.name = name;
                self.email = email;
            }
            CustomerEvent::OrderPlaced => self.orders += 1,
        }
    }
}
// ANCHOR_END: domain

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> String {
        match self {
            CustomerEvent::Registered { .. } => "Registered",
            CustomerEvent::OrderPlaced => "OrderPlaced",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Never refused, in this chapter.
#[derive(Debug, PartialEq)]
pub struct CustomerError;

impl std::fmt::Display for CustomerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for CustomerError {}

// ANCHOR: view
/// A line of the customer directory: personal as in the events, so the
/// view's table holds ciphertext too.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DirectoryLine {
    pub name: Personal<String>,
    pub orders: u32,
}

impl View<Customer> for DirectoryLine {
    fn update(&mut self, event: &EventEnvelope<Customer>) {
        match &event.payload {
            // The value keeps its subject when copied.
            CustomerEvent::Registered { name, .. } => self.name = name.clone(),
            CustomerEvent::OrderPlaced => self.orders += 1,
        }
    }
}
// ANCHOR_END: view

/// The shop: its store, its customers' bus, the directory and its runner.
pub struct Shop {
    pub store: SqliteStore,
    pub customers: CommandBus<Customer, SqliteStore>,
    pub directory: ViewQuery<Customer, DirectoryLine, SqliteStore>,
    pub runner: ProjectionRunner<SqliteStore>,
}

/// Opens the shop on the SQLite file at `path`.
pub async fn open_shop(path: &std::path::Path) -> Result<Shop, StoreError> {
    let store = SqliteStore::open(path).await?;
    let directory = ViewProjection::<Customer, DirectoryLine>::new("directory", "directory")?;
    let query = directory.query(&store);
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(directory))
        .build()?;
    Ok(Shop {
        customers: CommandBus::new(store.clone(), ()),
        store,
        directory: query,
        runner,
    })
}

// ANCHOR: forget
/// Forgets a customer: their key is deleted (the store records a
/// `SubjectForgotten` event), so their name and address read as forgotten
/// in the log, the snapshots, the views and every backup taken from now on.
pub async fn forget_customer(shop: &Shop, customer_id: &str) -> Result<bool, StoreError> {
    shop.store.key_ring().forget(customer_id).await
}
// ANCHOR_END: forget

// ANCHOR: read
/// The customer's name as the application shows it.
pub async fn shown_name(shop: &Shop, customer_id: &str) -> Result<String, StoreError> {
    let (customer, _) = shop.customers.load(customer_id).await?;
    Ok(match customer.name.value() {
        Some(name) => name.clone(),
        None => "(forgotten customer)".to_owned(),
    })
}
// ANCHOR_END: read
