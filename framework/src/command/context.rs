//! What a command comes with (metadata, correlation and causation) and
//! what it returns (the events written, and where the log has them).

use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::event::{Checkpoint, Envelope, Metadata, RecordedEvent};

/// Who and what a command comes from: metadata, correlation and causation ids.
///
/// Every event the command writes carries the context's metadata, its
/// correlation id, and its causation id. By default both ids are the command's
/// own fresh id; [`caused_by`](Self::caused_by) continues the chain of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandContext {
    /// Id of this command.
    pub command_id: Uuid,
    /// Correlation id for the events written.
    pub correlation_id: Uuid,
    /// Causation id for the events written.
    pub causation_id: Uuid,
    /// Metadata copied onto every event written.
    pub metadata: Metadata,
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandContext {
    /// A context with a fresh command id, used as correlation and causation id.
    pub fn new() -> Self {
        let command_id = Uuid::now_v7();
        CommandContext {
            command_id,
            correlation_id: command_id,
            causation_id: command_id,
            metadata: Metadata::new(),
        }
    }

    /// A context for a command issued in reaction to `event`: same correlation
    /// id, caused by the event.
    pub fn caused_by<B: Aggregate>(event: &Envelope<B>) -> Self {
        CommandContext {
            correlation_id: event.correlation_id.unwrap_or(event.event_id),
            causation_id: event.event_id,
            ..Self::new()
        }
    }

    /// A context for a command issued in reaction to a stored event (a
    /// process manager's, a relay's): same correlation id, caused by the
    /// event, and a command id derived from the event id and `label`, the
    /// same every time the event is handled again — what
    /// [`CommandBus::execute_once`](crate::CommandBus::execute_once) recognizes a repeated command by.
    pub fn reacting_to(event: &RecordedEvent, label: &str) -> Self {
        CommandContext {
            command_id: Uuid::new_v5(&event.event_id, label.as_bytes()),
            correlation_id: event.correlation_id.unwrap_or(event.event_id),
            causation_id: event.event_id,
            metadata: Metadata::new(),
        }
    }

    /// The context of a further command that follows from this one (a
    /// compensation, a second step): same correlation and causation, a
    /// command id derived from this one's and `label`, so it is as
    /// deterministic as this one.
    pub fn follow_up(&self, label: &str) -> Self {
        CommandContext {
            command_id: Uuid::new_v5(&self.command_id, label.as_bytes()),
            ..self.clone()
        }
    }

    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = id;
        self
    }
}

/// What a command wrote.
#[derive(Debug)]
pub struct Committed<A: Aggregate> {
    /// The events written, with their positions (empty if the command emitted none).
    pub events: Vec<Envelope<A>>,
    /// The aggregate's version after the command.
    pub version: u64,
    /// True when [`CommandBus::execute_once`](crate::CommandBus::execute_once) found the command already
    /// written by an earlier run: `events` are that run's, nothing new was
    /// written.
    pub repeated: bool,
}

impl<A: Aggregate> Committed<A> {
    /// Checkpoint of the last event written; a reader that has passed it has
    /// seen all of this command's events. `None` when nothing was written.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.events.last().map(Envelope::checkpoint)
    }
}

pub(super) fn into_envelopes<A: Aggregate>(
    recorded: Vec<RecordedEvent>,
    payloads: Vec<A::Event>,
) -> Vec<Envelope<A>> {
    recorded
        .into_iter()
        .zip(payloads)
        .map(|(event, payload)| event.into_envelope(payload))
        .collect()
}

/// The id of the `index`th event written by a command run with
/// [`CommandBus::execute_once`](crate::CommandBus::execute_once): derived from the command id, so a repeated
/// command is recognized by its events.
pub(super) fn event_id_of(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}
