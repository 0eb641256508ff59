//! Server-side cursors a log reader keeps between reads, and what one
//! read found.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::Context;

use crate::event::{Checkpoint, RecordedEvent};

/// How many readers (server-side cursors) a store keeps for reuse.
pub(super) const MAX_IDLE_READERS: usize = 64;

/// A server-side cursor on one partition's stream, kept between reads.
pub(super) struct Reader {
    pub(super) partition: u32,
    pub(super) subject: String,
    pub(super) consumer: PullConsumer,
    /// Decoded events of the last message not yet handed out.
    pub(super) leftover: VecDeque<RecordedEvent>,
    /// The last events the last read went through (see [`tail_of`]): a
    /// reader that handled fewer than it was given reads on from one of them.
    pub(super) recent: Vec<RecordedEvent>,
    /// The last event handed out or skipped.
    pub(super) cursor: Checkpoint,
    /// The stream sequence of the last message the consumer delivered.
    pub(super) delivered: u64,
}

/// What one read of the log found.
pub(super) struct Read {
    pub(super) events: Vec<RecordedEvent>,
    /// The last event seen, wanted or not.
    pub(super) seen: Checkpoint,
    /// Whether the partition was read to its end.
    pub(super) complete: bool,
    /// Whether an announced message did not reach the consumer in time
    /// (the reader should look again soon).
    pub(super) held_back: bool,
}

/// How long a read waits for a message announced as stored that its
/// consumer has not been told about yet.
pub(super) const ANNOUNCED_WAIT: Duration = Duration::from_millis(250);

/// How many of the events a read handed out a reader keeps, so that a
/// reader that handled fewer of them reads on from one (a runner reads one
/// more than its batch) without a new consumer.
pub(super) const RECENT_EVENTS: usize = 8;

/// The last [`RECENT_EVENTS`] events of a read and the skipped events after
/// the first of them, in log order: what a reader can be taken back to. The
/// rest of the read's events are not copied.
pub(super) fn tail_of(events: &[RecordedEvent], skipped: Vec<RecordedEvent>) -> Vec<RecordedEvent> {
    let tail = &events[events.len().saturating_sub(RECENT_EVENTS)..];
    let from = tail.first().map(RecordedEvent::checkpoint);
    let mut recent: Vec<RecordedEvent> = tail.to_vec();
    recent.extend(
        skipped
            .into_iter()
            .filter(|e| from.is_none_or(|from| e.checkpoint() > from)),
    );
    recent.sort_by_key(RecordedEvent::checkpoint);
    recent
}

/// Deletes a reader's server-side cursor in the background (it would
/// expire by itself after a minute).
pub(super) fn drop_reader(js: &Context, reader: Reader) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let js = js.clone();
    tokio::spawn(async move {
        let info = reader.consumer.cached_info();
        let _ = js
            .delete_consumer_from_stream(&info.name, &info.stream_name)
            .await;
    });
}
