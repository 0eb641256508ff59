//! Whose fault a failure is ([`ErrorKind`]), and how an event is named in
//! errors ([`EventRef`]).

use std::fmt;

/// Whose fault a failure is, as the backend that raised it classifies it.
/// Long-running loops (projection runners, relays) decide with it whether to
/// retry, wait, or blame the event.
///
/// ```
/// use outflow::error::ErrorKind;
/// assert!(ErrorKind::Transient.is_retryable());
/// assert!(!ErrorKind::Infrastructure.is_events_fault());
/// assert!(ErrorKind::Data.is_events_fault());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Passes by itself: a lost connection, a server restarting, a
    /// serialization failure or deadlock, a busy database file, a pool
    /// exhausted. Retry soon, with backoff.
    Transient,
    /// The environment is wrong and someone must fix it: a missing table or
    /// column, a permission, a syntax error in the handler's SQL, bad
    /// configuration. Never the event's fault: wait with backoff and say so
    /// in status, never park the event for it.
    Infrastructure,
    /// The data is at fault: a payload that does not decode, a constraint the
    /// event's effect violates. Retrying the same event will not help; the
    /// event may be parked.
    Data,
}

impl ErrorKind {
    /// `true` for [`ErrorKind::Transient`].
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }

    /// `true` for [`ErrorKind::Data`]: only then may an event be parked.
    pub fn is_events_fault(self) -> bool {
        self == ErrorKind::Data
    }

    /// A short name (`transient`, `infrastructure`, `data`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Infrastructure => "infrastructure",
            ErrorKind::Data => "data",
        }
    }

    /// The kind [`as_str`](Self::as_str) names, if `name` is one.
    ///
    /// ```
    /// use outflow::ErrorKind;
    /// assert_eq!(ErrorKind::from_name("infrastructure"), Some(ErrorKind::Infrastructure));
    /// assert_eq!(ErrorKind::from_name("nonsense"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        [
            ErrorKind::Transient,
            ErrorKind::Infrastructure,
            ErrorKind::Data,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one stored event in error messages: which aggregate, which sequence,
/// where in the global log, of which type and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// Aggregate type (`Aggregate::TYPE`).
    pub aggregate_type: String,
    /// Aggregate instance id.
    pub aggregate_id: String,
    /// Sequence number within the aggregate's stream (1-based).
    pub sequence: u64,
    /// Global position, when the event was read from the log.
    pub position: Option<u64>,
    /// Event type as stored.
    pub event_type: String,
    /// Event version as stored.
    pub event_version: String,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event `{}` v{} of {} `{}` #{}",
            self.event_type,
            self.event_version,
            self.aggregate_type,
            self.aggregate_id,
            self.sequence
        )?;
        if let Some(position) = self.position {
            write!(f, " at position {position}")?;
        }
        Ok(())
    }
}
