//! Errors of the event store, of command execution and of handlers.
//!
//! Every failure names what went wrong and with which input: the event (type,
//! version, aggregate, sequence, position), the table, the operation. Whether
//! a failure is worth retrying is decided by the backend that raised it
//! ([`ErrorKind`]): the core never looks at a driver's error codes.
//!
//! This folder is the bottom floor of the crate: it names no other module.
//! Each file holds one error type; they are all re-exported here.

mod chain;
mod command;
mod config;
mod handler;
mod kind;
mod store;

pub use chain::{error_chain, BoxError};
pub use command::CommandError;
pub use config::ConfigError;
pub use handler::HandlerError;
pub use kind::{ErrorKind, EventRef};
pub use store::StoreError;
