//! Whether a NATS client error means "the server or cluster did not answer"
//! (try again: it passes) or a refusal someone must look at — read from the
//! client's typed error kinds and JetStream's error codes, the words of a
//! message only for the errors the client gives as text alone.

use async_nats::jetstream::context::{
    CreateKeyValueError, CreateKeyValueErrorKind, CreateStreamError, CreateStreamErrorKind,
    GetStreamError, GetStreamErrorKind, PublishError, PublishErrorKind, RequestError,
    RequestErrorKind,
};
use async_nats::jetstream::kv::{EntryError, EntryErrorKind, UpdateError, UpdateErrorKind};
use async_nats::jetstream::{Error as ApiError, ErrorCode};

/// Whether `error` (or a cause of it) says the server or cluster did not
/// answer or cannot serve right now: a timeout, no responders, a lost
/// connection, no leader or not enough peers.
pub(crate) fn is_unavailable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(unavailable) = typed(error) {
            return unavailable;
        }
        cause = error.source();
    }
    by_words(error)
}

/// The answer of a typed error of the client, if `error` is one.
fn typed(error: &(dyn std::error::Error + 'static)) -> Option<bool> {
    if let Some(error) = error.downcast_ref::<PublishError>() {
        return Some(matches!(
            error.kind(),
            PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::MaxAckPending
        ));
    }
    if let Some(error) = error.downcast_ref::<RequestError>() {
        return Some(matches!(
            error.kind(),
            RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
        ));
    }
    if let Some(error) = error.downcast_ref::<CreateStreamError>() {
        return match error.kind() {
            CreateStreamErrorKind::TimedOut => Some(true),
            // The server runs without JetStream: someone must enable it.
            CreateStreamErrorKind::JetStreamUnavailable => Some(false),
            CreateStreamErrorKind::JetStream(api) => Some(api_unavailable(&api)),
            _ => None,
        };
    }
    if let Some(error) = error.downcast_ref::<GetStreamError>() {
        return match error.kind() {
            GetStreamErrorKind::JetStream(api) => Some(api_unavailable(&api)),
            // A request that failed: its cause says why.
            _ => None,
        };
    }
    if let Some(error) = error.downcast_ref::<CreateKeyValueError>() {
        return match error.kind() {
            CreateKeyValueErrorKind::TimedOut => Some(true),
            _ => None,
        };
    }
    if let Some(error) = error.downcast_ref::<EntryError>() {
        return match error.kind() {
            EntryErrorKind::TimedOut => Some(true),
            _ => None,
        };
    }
    if let Some(error) = error.downcast_ref::<UpdateError>() {
        return match error.kind() {
            UpdateErrorKind::TimedOut => Some(true),
            _ => None,
        };
    }
    if let Some(error) = error.downcast_ref::<ApiError>() {
        return Some(api_unavailable(error));
    }
    if let Some(error) = error.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind as Io;
        let lost = matches!(
            error.kind(),
            Io::TimedOut
                | Io::BrokenPipe
                | Io::ConnectionReset
                | Io::ConnectionRefused
                | Io::ConnectionAborted
                | Io::NotConnected
                | Io::UnexpectedEof
        );
        // Another kind says nothing either way: its words may.
        return lost.then_some(true);
    }
    None
}

/// JetStream's codes for a cluster that cannot serve right now: no quorum,
/// no leader, not enough peers or resources (a server is down or
/// restarting).
fn api_unavailable(error: &ApiError) -> bool {
    matches!(
        error.error_code(),
        ErrorCode::CLUSTER_NOT_AVAILABLE
            | ErrorCode::CLUSTER_NO_PEERS
            | ErrorCode::CLUSTER_INCOMPLETE
            | ErrorCode::CLUSTER_NOT_LEADER
            | ErrorCode::CLUSTER_NOT_ASSIGNED
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::RAFT_GENERAL
    ) || error.code() == 503
}

/// The client reports some failures as text only (a request's "timed out"
/// inside another error's message, a connection's state): read those.
fn by_words(error: &(dyn std::error::Error + 'static)) -> bool {
    let text = crate::error::error_chain(error).to_lowercase();
    [
        "timed out",
        "timeout",
        "no responders",
        "broken pipe",
        "disconnected",
        "connection",
        "no suitable peers",
        "insufficient resources",
        "leader",
        "temporarily unavailable",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_kinds_decide_before_words() {
        let timed_out = RequestError::new(RequestErrorKind::TimedOut);
        assert!(is_unavailable(&timed_out));
        // "invalid subject" alone would not match a word; its kind says no.
        let invalid = RequestError::new(RequestErrorKind::InvalidSubject);
        assert!(!is_unavailable(&invalid));
        let broken = PublishError::new(PublishErrorKind::BrokenPipe);
        assert!(is_unavailable(&broken));
        let wrong = PublishError::new(PublishErrorKind::WrongLastSequence);
        assert!(!is_unavailable(&wrong));
        // A server without JetStream is not "unavailable for now".
        let disabled = CreateStreamError::new(CreateStreamErrorKind::JetStreamUnavailable);
        assert!(!is_unavailable(&disabled));
    }

    #[test]
    fn text_only_errors_are_read_by_their_words() {
        let lost = std::io::Error::other("the connection was lost");
        assert!(is_unavailable(&lost));
        let refused = std::io::Error::other("permission denied");
        assert!(!is_unavailable(&refused));
    }
}
