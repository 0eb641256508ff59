//! [`CommandError`]: why a command was not carried out.

use super::handler::HandlerError;
use super::store::StoreError;

/// The error of [`CommandBus::execute`](crate::CommandBus::execute): the
/// aggregate refused the command (now, or when the same command id was sent
/// before), or storing its events failed.
///
/// A refusal displays the domain error's own message, as cqrs-es's
/// `AggregateError::UserError` does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate's `handle` returned an error; nothing was written.
    /// [`execute_once`](crate::CommandBus::execute_once) remembers it, and
    /// a bus with [typed refusals](crate::CommandBusBuilder::remember_typed_refusals)
    /// answers a re-send with the same error decoded.
    #[error(transparent)]
    Rejected(E),
    /// The command id was refused when it was first sent, and
    /// [`execute_once`](crate::CommandBus::execute_once) returns that
    /// refusal again without running the command (see [`crate::outcome`]).
    /// On a bus with typed refusals this comes only for a refusal whose
    /// stored JSON no longer decodes.
    #[error(transparent)]
    Refused(crate::outcome::Refusal),
    /// Loading or appending failed; see [`StoreError::is_conflict`] for
    /// concurrency conflicts.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An inline handler failed; the events and its writes were rolled back.
    #[error("inline handler `{handler}` failed: {error}")]
    Inline {
        /// The handler's name.
        handler: String,
        /// Its error.
        error: HandlerError,
    },
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// `true` when the command lost an optimistic-concurrency race and may be retried.
    pub fn is_conflict(&self) -> bool {
        matches!(self, CommandError::Store(e) if e.is_conflict())
    }

    /// The aggregate's own error, when the command was rejected now (or a
    /// remembered refusal was decoded).
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Refused(_) | CommandError::Store(_) | CommandError::Inline { .. } => None,
        }
    }

    /// `true` when the aggregate refused the command, now or when the same
    /// command id was sent before ([`Rejected`](Self::Rejected) or
    /// [`Refused`](Self::Refused)): a business outcome, not a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CommandError::Rejected(_) | CommandError::Refused(_))
    }

    /// The refusal's message, for [`Rejected`](Self::Rejected) and
    /// [`Refused`](Self::Refused) alike.
    pub fn refusal_message(&self) -> Option<String> {
        match self {
            CommandError::Rejected(e) => Some(e.to_string()),
            CommandError::Refused(refusal) => Some(refusal.message.clone()),
            CommandError::Store(_) | CommandError::Inline { .. } => None,
        }
    }
}
