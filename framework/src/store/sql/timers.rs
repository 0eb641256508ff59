//! What the SQL backends' timers share: the columns' encodings.

use std::time::Duration;

use crate::error::StoreError;
use crate::event::Metadata;
use crate::port::timers::{Finish, TimerState};

/// A duration in whole microseconds, saturating.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The state column of timer `key`.
pub(crate) fn timer_state(name: &str, key: &str) -> Result<TimerState, StoreError> {
    TimerState::parse(name).ok_or_else(|| StoreError::Corrupt {
        table: "timers".to_owned(),
        what: format!("timer `{key}` has the unknown state `{name}`"),
    })
}

/// The metadata column of timer `key`.
pub(crate) fn decode_metadata(text: &str, key: &str) -> Result<Metadata, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table: "timers".to_owned(),
        what: format!("the metadata of timer `{key}` is not a JSON object of strings: {e}"),
    })
}

/// The metadata column.
pub(crate) fn encode_metadata(metadata: &Metadata) -> Result<String, StoreError> {
    serde_json::to_string(metadata).map_err(|source| StoreError::Serialize {
        what: "timer metadata",
        aggregate_type: "timers".to_owned(),
        aggregate_id: String::new(),
        source,
    })
}

/// The state and note a finish records.
pub(crate) fn finish_columns(finish: &Finish) -> (TimerState, Option<&str>) {
    match finish {
        Finish::Fired => (TimerState::Fired, None),
        Finish::Refused(reason) => (TimerState::Refused, Some(reason.as_str())),
        Finish::Failed(reason) => (TimerState::Failed, Some(reason.as_str())),
    }
}
