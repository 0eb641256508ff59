//! What the SQL backends' timers share: the columns' encodings.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{Checkpoint, Metadata};
use crate::port::timers::{Finish, TimerCounts, TimerState};

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

/// The place in the log of a timer's latest cause, from its two columns.
pub(crate) fn source_columns(tx: Option<i64>, pos: Option<i64>) -> Option<Checkpoint> {
    match (tx, pos) {
        (Some(tx), Some(pos)) => Some(Checkpoint::new(tx.max(0) as u64, pos.max(0) as u64)),
        _ => None,
    }
}

/// The counts from the counts statement's row: `count` reads one count
/// column; `now` is the clock the statement counted by.
pub(crate) fn counts_from(
    now: DateTime<Utc>,
    next_due: Option<DateTime<Utc>>,
    count: impl Fn(&'static str) -> Result<u64, StoreError>,
) -> Result<TimerCounts, StoreError> {
    Ok(TimerCounts {
        pending: count("pending")?,
        overdue: count("overdue")?,
        late: count("late")?,
        oldest_overdue: next_due
            .filter(|due| *due <= now)
            .and_then(|due| (now - due).to_std().ok()),
        next_due,
        fired: count("fired")?,
        refused: count("refused")?,
        cancelled: count("cancelled")?,
        failed: count("failed")?,
    })
}
