//! Upcasters: rewrite stored events of an old shape into the current one
//! while they are read, so old events never need to be migrated in place.
//!
//! Outflow's [`Upcaster`] is fallible: a failure becomes
//! [`StoreError::Upcast`](crate::StoreError::Upcast) naming the event. Existing
//! `cqrs-es` upcasters (for example `SemanticVersionEventUpcaster`) keep
//! working through [`from_cqrs`]; if one panics, the panic is caught and
//! reported as the same typed error.

mod aliases;
mod list;
pub(crate) mod upcaster;

pub use aliases::EventAliases;
pub use list::Upcasters;
pub use upcaster::{from_cqrs, UpcastError, Upcaster};
