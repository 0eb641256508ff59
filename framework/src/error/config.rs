//! [`ConfigError`]: configuration that is invalid or contradicts what is
//! stored.

use super::handler::HandlerError;

/// Configuration that is invalid or contradicts what is stored: reported at
/// start-up (or by the call that met it), never retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A projection (or relay) is stored with another partition count than
    /// configured; the count cannot be changed in place (run it under a new
    /// name).
    #[error(
        "`{name}` is stored with {stored} partition(s) but configured with {configured}; \
         use a new projection name to change the count"
    )]
    PartitionCount {
        /// The projection or relay.
        name: String,
        /// The counts found in the store.
        stored: String,
        /// The count configured.
        configured: u32,
    },
    /// Two projections (or relays) of one runner have the same name.
    #[error("`{0}` is registered twice")]
    DuplicateName(String),
    /// A name that must not be empty is.
    #[error("{0} has an empty name")]
    EmptyName(&'static str),
    /// No projection of that name belongs to this runner.
    #[error("no projection `{0}` in this runner")]
    UnknownProjection(String),
    /// A setting is out of its range.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A table Outflow needs does not exist (its migrations were not applied).
    #[error("the table `{table}` does not exist: {hint}")]
    MissingTable {
        /// The table.
        table: String,
        /// How to create it.
        hint: &'static str,
    },
    /// Something that may run once per process is running already.
    #[error("`{0}` is running already")]
    AlreadyRunning(String),
    /// A projection's setup hook failed, so it was not started (or not
    /// rebuilt).
    #[error("the setup hook of `{name}` failed: {error}")]
    SetupHook {
        /// The projection.
        name: String,
        /// The hook's error.
        error: HandlerError,
    },
    /// A projection's reset hook failed, so its rebuild was not started.
    #[error("the reset hook of `{name}` failed: {error}")]
    ResetHook {
        /// The projection.
        name: String,
        /// The hook's error.
        error: HandlerError,
    },
}
