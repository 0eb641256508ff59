//! A tiny aggregate used by the documentation examples. Not part of the API.
#![allow(missing_docs)]

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    pub value: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CounterCommand {
    Increment {
        by: i64,
    },
    /// Refused when the value would go below zero.
    Decrement {
        by: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Incremented { by: i64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "Incremented".to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct CounterError(pub String);

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CounterCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CounterError> {
        match command {
            CounterCommand::Increment { by } => {
                sink.write(CounterEvent::Incremented { by }, self).await;
                Ok(())
            }
            CounterCommand::Decrement { by } => {
                if self.value < by {
                    return Err(CounterError(format!(
                        "cannot take {by} from {}",
                        self.value
                    )));
                }
                sink.write(CounterEvent::Incremented { by: -by }, self)
                    .await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => self.value += by,
        }
    }
}

/// The counter's events carry the tag `counting` (for the examples of
/// [decisions](crate::decision) and [`tag_events`](crate::CommandBusBuilder::tag_events)).
impl crate::tags::Tagged for CounterEvent {
    fn tags(&self) -> Vec<String> {
        vec!["counting".to_owned()]
    }
}
