//! The ports: every contract between Outflow's core and a backend, on a floor
//! of their own.
//!
//! A port holds traits and the plain data they exchange, and imports nothing
//! above the core types (events, checkpoints, errors): the backends under
//! `store/` implement these traits, and the features (commands, the runner,
//! views, the outbox, relays) use them without naming a backend. Users reach
//! every item through its public path (`outflow::store`, `outflow::log`,
//! `outflow::outbox`), re-exported from here.

pub mod backend;
pub mod decisions;
pub mod events;
pub mod log;
#[cfg(feature = "nats")]
pub mod messages;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod outbox;
pub mod projections;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod timers;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod views;
