//! Remembered outcomes of commands sent with an id: one command id, one
//! outcome, however often the command is sent.
//!
//! [`CommandBus::execute_once`](crate::CommandBus::execute_once) runs a
//! command at most once per (aggregate, command id). What it decided is
//! stored atomically with the decision:
//!
//! - **accepted with events**: the events themselves (their ids are derived
//!   from the command id) and, in the same transaction, a claim row for the
//!   command id;
//! - **accepted without events**: a row saying so, with the stream's version;
//! - **refused**: a row with the refusal — the domain error's message
//!   (`to_string()`), and its JSON form when the bus was built with
//!   [`remember_typed_refusals`](crate::CommandBusBuilder::remember_typed_refusals) —
//!   and the stream version the command was refused at.
//!
//! The first outcome stored for a command id wins: a concurrent send that
//! decided otherwise (it saw a newer state of the aggregate) finds the
//! stored outcome instead of writing its own — its append fails on the
//! claim and is rolled back. A re-send after the aggregate changed
//! therefore returns the same refusal, never a different decision: a
//! process manager replaying a step after a crash cannot act on a world
//! that moved on.
//!
//! Outcomes are kept until [`EventStore::prune_outcomes`](crate::EventStore::prune_outcomes)
//! removes those older than an instant the application chooses (say, a
//! retention of 30 days, from a daily job). After that a re-sent command
//! whose outcome was pruned is a new command: accepted ones are still
//! recognized by their events, refused ones run again.
//!
//! | backend | where outcomes live | atomic with the decision |
//! | --- | --- | --- |
//! | memory | in the store's state | yes |
//! | SQLite, PostgreSQL | `<events>_outcomes`, keyed by aggregate type, id and command id | yes: the claim commits with the events |
//! | JetStream | the store's key-value bucket, `outcome.<type>.<id>.<command id>` | refusals first-writer-wins; an accepted append checks for a refusal just before it publishes |

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// What was decided for one command id on one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The command id ([`CommandContext::command_id`](crate::CommandContext)).
    pub command_id: Uuid,
    /// The stream's version when the command was decided (for an accepted
    /// command with events: the version after them).
    pub version: u64,
    /// When the outcome was stored.
    pub recorded_at: DateTime<Utc>,
    /// `None` when the command was accepted; the refusal otherwise.
    pub refusal: Option<RefusalRecord>,
}

impl CommandOutcome {
    /// The refusal as the SQL backends store it: its message and its JSON
    /// as text (both `None` for an accepted command).
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn refusal_columns(&self) -> (Option<&str>, Option<String>) {
        match &self.refusal {
            Some(refusal) => (
                Some(refusal.message.as_str()),
                refusal.error.as_ref().map(|e| e.to_string()),
            ),
            None => (None, None),
        }
    }

    /// An outcome from the SQL backends' columns; a refusal JSON that does
    /// not parse is an error saying so (the backend reports it as its
    /// table's corruption).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn from_columns(
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
        recorded_at: DateTime<Utc>,
        refusal: Option<String>,
        refusal_json: Option<String>,
    ) -> Result<Self, String> {
        let error = refusal_json
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| format!("the refusal of command {command_id} is not JSON: {e}"))
            })
            .transpose()?;
        Ok(CommandOutcome {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            command_id,
            version,
            recorded_at,
            refusal: refusal.map(|message| RefusalRecord { message, error }),
        })
    }
}

/// The stored form of a refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusalRecord {
    /// The domain error's `to_string()`.
    pub message: String,
    /// The domain error as JSON, when the bus stores typed refusals.
    pub error: Option<serde_json::Value>,
}

/// A refusal remembered from an earlier send of the same command id: what
/// [`CommandError::Refused`](crate::CommandError::Refused) carries.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::{CommandBus, CommandContext, CommandError, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let bus = CommandBus::<Counter, _>::new(MemoryStore::new(), ());
/// let context = CommandContext::new();
/// // Refused: the counter refuses to go below zero.
/// let first = bus.execute_once("c-1", CounterCommand::Decrement { by: 5 }, context.clone()).await;
/// assert!(matches!(first, Err(CommandError::Rejected(_))));
/// bus.execute("c-1", CounterCommand::Increment { by: 10 }).await?;
/// // Sent again after the counter changed: the same refusal, not a new decision.
/// let again = bus.execute_once("c-1", CounterCommand::Decrement { by: 5 }, context).await;
/// let Err(CommandError::Refused(refusal)) = again else { panic!("not remembered") };
/// assert_eq!(refusal.message, first.unwrap_err().to_string());
/// assert_eq!(refusal.version, 0);
/// assert_eq!(bus.load("c-1").await?.0.value, 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The command id.
    pub command_id: Uuid,
    /// The stream version the command was refused at.
    pub version: u64,
    /// When it was refused.
    pub refused_at: DateTime<Utc>,
    /// The domain error's `to_string()` at the time.
    pub message: String,
    /// The domain error as JSON, when the bus stores typed refusals.
    pub error: Option<serde_json::Value>,
}

impl Refusal {
    /// The domain error, decoded from its stored JSON form; `None` when it
    /// was stored as a message only or no longer fits `E`.
    pub fn error<E: DeserializeOwned>(&self) -> Option<E> {
        self.error
            .as_ref()
            .and_then(|value| serde_json::from_value(value.clone()).ok())
    }

    pub(crate) fn from_outcome(outcome: &CommandOutcome) -> Option<Self> {
        outcome.refusal.as_ref().map(|record| Refusal {
            aggregate_type: outcome.aggregate_type.clone(),
            aggregate_id: outcome.aggregate_id.clone(),
            command_id: outcome.command_id,
            version: outcome.version,
            refused_at: outcome.recorded_at,
            message: record.message.clone(),
            error: record.error.clone(),
        })
    }
}
