//! The command bus: load an aggregate, let it handle a command, append what it
//! emitted, and return what was written.
//!
//! Any `cqrs-es` [`Aggregate`](cqrs_es::Aggregate) runs unchanged. Unlike `cqrs-es`'s
//! `PersistedEventStore`, events are applied exactly once: `EventSink::write`
//! applies each event while `handle` runs, so the aggregate after `handle` *is*
//! the new state, and that is what a snapshot stores.

mod builder;
mod bus;
mod cache;
mod context;
mod inline;
mod load;
mod once;
mod report;
#[cfg(test)]
mod tests;

pub use builder::CommandBusBuilder;
pub use bus::CommandBus;
pub use context::{CommandContext, Committed};
pub use inline::InlineHandler;
#[cfg(feature = "admin")]
pub(crate) use report::command_counts;
