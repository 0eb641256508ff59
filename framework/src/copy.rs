//! Copying the log from one backend to another (SQLite to PostgreSQL,
//! PostgreSQL to JetStream, …): every event with its id, type, payload,
//! metadata and correlation, each stream's events at the same sequences,
//! and the events in the source's log order (a target with one log keeps
//! the global order; a partitioned one keeps each stream's).
//!
//! What keeps a copy safe to kill and to run again:
//!
//! - The source is read through [`EventLog::read_log`], which never skips a
//!   transaction that commits late (a copy taken from a live source misses
//!   nothing that commits while it runs).
//! - One source transaction's events for one stream are appended to the
//!   target as one append, at the time the source recorded them, with the source's sequence as the expected
//!   version: the target refuses anything but the next sequence, so no
//!   event is ever written twice or out of its place.
//! - When the target already holds a group (a copy killed after the
//!   target committed but before its checkpoint was kept, or a copy run
//!   again from the start), the target's events at those sequences are read
//!   and compared by event id: the same events are counted as already
//!   copied and skipped; other events are [`CopyError::Diverged`].
//! - [`LogCopy::run`] reports each batch's last source checkpoint (one per
//!   partition of a partitioned source) to the caller, who keeps it (the `outflow copy` tool writes a state file) and
//!   passes it to [`LogCopy::resume_after`] next time.
//! - At the end both logs are counted and summed ([`Tally`]): an
//!   order-independent checksum of every event's id, stream, sequence,
//!   type, version, payload and metadata. A difference is
//!   [`CopyError::Mismatch`].
//!
//! Snapshots are not copied: they are a cache of the events, and aggregates
//! rebuild them on the target.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use outflow::copy::LogCopy;
//! use outflow::{AppendRequest, EventStore, MemoryStore, NewEvent};
//!
//! let from = MemoryStore::new();
//! let opened = NewEvent {
//!     event_id: uuid::Uuid::now_v7(),
//!     event_type: "Opened".into(),
//!     event_version: "1".into(),
//!     payload: serde_json::json!({"Opened": {}}),
//!     metadata: Default::default(),
//!     correlation_id: None,
//!     causation_id: None,
//! };
//! from.append(AppendRequest {
//!     aggregate_type: "account".into(),
//!     aggregate_id: "a-1".into(),
//!     expected_version: 0,
//!     events: vec![opened],
//! })
//! .await?;
//!
//! let to = MemoryStore::new();
//! let report = LogCopy::new(&from, &to).run(|_| {}).await?;
//! assert_eq!(report.copied, 1);
//! assert_eq!(report.source, report.target);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, NewEvent, RecordedEvent};
use chrono::{DateTime, Utc};

pub use crate::port::events::CopyTarget;
use crate::port::log::{EventLog, LogFilter};

/// How many events a copy reads and appends at a time, unless told.
pub const DEFAULT_BATCH: usize = 1_000;

/// What went wrong in a copy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// Reading the source failed.
    #[error("reading the source: {0}")]
    Source(#[source] StoreError),
    /// Writing to or reading the target failed.
    #[error("writing the target: {0}")]
    Target(#[source] StoreError),
    /// The target holds other events where the source's belong: it is not
    /// empty, or another log was copied into it.
    #[error(
        "the target's {aggregate_type} `{aggregate_id}` differs from the source's at sequence \
         {sequence}: {reason}"
    )]
    Diverged {
        /// The stream's aggregate type.
        aggregate_type: String,
        /// The stream's aggregate id.
        aggregate_id: String,
        /// The first sequence that differs.
        sequence: u64,
        /// How it differs.
        reason: String,
    },
    /// The logs' counts or checksums differ after the copy.
    #[error("after the copy the source has {in_source} and the target {in_target}")]
    Mismatch {
        /// The source's count and checksum.
        in_source: Tally,
        /// The target's count and checksum.
        in_target: Tally,
    },
}

/// A log's event count and an order-independent checksum of its events (the
/// wrapping sum of each event's 64-bit FNV-1a hash over its id, stream,
/// sequence, type, version, payload and metadata, keys sorted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many events.
    pub events: u64,
    /// The checksum.
    pub checksum: u64,
}

impl Tally {
    /// Counts one more event.
    pub fn add(&mut self, event: &RecordedEvent) {
        self.events += 1;
        self.checksum = self.checksum.wrapping_add(event_hash(event));
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events (checksum {:016x})",
            self.events, self.checksum
        )
    }
}

/// Where a copy stands, after each batch.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyProgress {
    /// The last source event handled, one per source partition (one for a
    /// log in one total order): resume after them.
    pub checkpoints: Vec<Checkpoint>,
    /// Events appended to the target by this run.
    pub copied: u64,
    /// Events found already in the target (copied before), skipped.
    pub already_there: u64,
    /// Events in the source when the copy started (a live source grows).
    pub total: u64,
    /// Whether the copy has caught up with the source and is following it.
    pub live: bool,
}

/// What a finished copy did and found.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    /// The last source event handled, one per source partition.
    pub checkpoints: Vec<Checkpoint>,
    /// Events appended to the target by this run.
    pub copied: u64,
    /// Events found already in the target, skipped.
    pub already_there: u64,
    /// The whole source log at the end.
    pub source: Tally,
    /// The whole target log at the end.
    pub target: Tally,
}

/// A copy of one log into another: configure, then [`run`](Self::run).
#[derive(Debug)]
pub struct LogCopy<'a, F, T> {
    from: &'a F,
    to: &'a T,
    after: Vec<Checkpoint>,
    batch: usize,
    follow: Option<CancellationToken>,
    verify: bool,
}

impl<'a, F, T> LogCopy<'a, F, T>
where
    F: EventLog,
    T: CopyTarget,
{
    /// A copy of `from`'s whole log into `to`.
    pub fn new(from: &'a F, to: &'a T) -> Self {
        LogCopy {
            from,
            to,
            after: Vec::new(),
            batch: DEFAULT_BATCH,
            follow: None,
            verify: true,
        }
    }

    /// Resumes after the checkpoints a previous run reported
    /// ([`CopyProgress::checkpoints`]): events before them are not read
    /// again. They must be as many as the source has partitions.
    pub fn resume_after(mut self, checkpoints: Vec<Checkpoint>) -> Self {
        self.after = checkpoints;
        self
    }

    /// Events read and appended at a time (at least 1).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Keeps following the source once caught up, until `stop` is cancelled
    /// (a cut-over: stop the writers, let the copy catch up, cancel, switch).
    pub fn follow(mut self, stop: CancellationToken) -> Self {
        self.follow = Some(stop);
        self
    }

    /// Whether to count and sum both logs at the end (on by default).
    pub fn verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Copies, calling `progress` after each batch (keep its checkpoint to
    /// resume), and verifies both logs at the end.
    ///
    /// # Errors
    ///
    /// [`CopyError::Source`], [`CopyError::Target`] (the batch in flight is
    /// not counted: resume from the last progress reported),
    /// [`CopyError::Diverged`], [`CopyError::Mismatch`].
    pub async fn run(
        self,
        mut progress: impl FnMut(&CopyProgress) + Send,
    ) -> Result<CopyReport, CopyError> {
        let parts = self.from.partitions().max(1);
        let filters = partition_filters(parts);
        let mut checkpoints = if self.after.is_empty() {
            vec![Checkpoint::START; filters.len()]
        } else if self.after.len() == filters.len() {
            self.after.clone()
        } else {
            return Err(CopyError::Source(StoreError::Config(
                crate::error::ConfigError::Invalid {
                    setting: "copy checkpoints",
                    reason: format!(
                        "{} checkpoints to resume after, but the source has {} partition(s)",
                        self.after.len(),
                        filters.len()
                    ),
                },
            )));
        };
        let mut total = 0;
        for filter in &filters {
            total += self
                .from
                .count_events(filter, Checkpoint::START, LOG_END, u64::MAX)
                .await
                .map_err(CopyError::Source)?;
        }
        let mut wakeups = self.follow.as_ref().map(|_| self.from.wakeups());
        let mut state = CopyProgress {
            checkpoints: checkpoints.clone(),
            copied: 0,
            already_there: 0,
            total,
            live: false,
        };
        loop {
            // A batch from each partition in turn.
            let mut read_any = false;
            for (part, filter) in filters.iter().enumerate() {
                let events = self
                    .from
                    .read_log(checkpoints[part], filter, self.batch)
                    .await
                    .map_err(CopyError::Source)?;
                let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
                    continue;
                };
                read_any = true;
                let (copied, already_there) = self.copy_batch(&events).await?;
                checkpoints[part] = last;
                state.copied += copied;
                state.already_there += already_there;
                state.checkpoints.clone_from(&checkpoints);
                progress(&state);
            }
            if read_any {
                continue;
            }
            let Some(stop) = &self.follow else { break };
            if !state.live {
                state.live = true;
                progress(&state);
            }
            let woken = async {
                match wakeups.as_mut() {
                    Some(wakeups) => {
                        wakeups.wait().await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = woken => {}
            }
        }
        let (source, target) = if self.verify {
            let source = tally(self.from).await.map_err(CopyError::Source)?;
            let target = tally(self.to).await.map_err(CopyError::Target)?;
            if source != target {
                return Err(CopyError::Mismatch {
                    in_source: source,
                    in_target: target,
                });
            }
            (source, target)
        } else {
            (Tally::default(), Tally::default())
        };
        Ok(CopyReport {
            checkpoints,
            copied: state.copied,
            already_there: state.already_there,
            source,
            target,
        })
    }

    /// Appends one batch's groups: in one go when none is there yet, else
    /// group by group, skipping those the target already holds.
    async fn copy_batch(&self, events: &[RecordedEvent]) -> Result<(u64, u64), CopyError> {
        self.copy_keys(events).await?;
        let groups = groups(events);
        let requests: Vec<(AppendRequest, DateTime<Utc>)> = groups
            .iter()
            .map(|g| (request(g), g[0].recorded_at))
            .collect();
        let count = events.len() as u64;
        if self.to.append_batch(&requests).await.is_ok() {
            return Ok((count, 0));
        }
        // Something is there already (or the target failed): one group at
        // a time, each checked against what the target holds.
        let (mut copied, mut skipped) = (0, 0);
        for (group, request) in groups.iter().zip(&requests) {
            match self.to.append_batch(std::slice::from_ref(request)).await {
                Ok(()) => copied += group.len() as u64,
                Err(StoreError::Conflict { .. }) => {
                    self.check_there(group).await?;
                    skipped += group.len() as u64;
                }
                Err(error) => return Err(CopyError::Target(error)),
            }
        }
        Ok((copied, skipped))
    }

    /// The keys of the personal values in `events`, copied to the target's
    /// key ring before the events (see [`crate::personal`]): a copied log's
    /// personal values open at the target as at the source.
    async fn copy_keys(&self, events: &[RecordedEvent]) -> Result<(), CopyError> {
        let Some(from) = self.from.key_ring() else {
            return Ok(());
        };
        let sealed = events
            .iter()
            .any(|event| crate::personal::holds_sealed(&event.payload));
        if !sealed {
            return Ok(());
        }
        let Some(to) = crate::port::events::EventStore::key_ring(self.to) else {
            return Err(CopyError::Target(StoreError::Unsupported {
                what: "copying personal data",
                reason: "the target keeps no keys: give it a key ring, or its copied personal \
                         values would never open",
            }));
        };
        from.copy_keys(&to, events).await.map_err(|e| match e {
            crate::personal::CopyKeysError::Source(e) => CopyError::Source(e),
            crate::personal::CopyKeysError::Target(e) => CopyError::Target(e),
        })
    }

    /// Succeeds when the target holds exactly `group`'s events at their
    /// sequences.
    async fn check_there(&self, group: &[RecordedEvent]) -> Result<(), CopyError> {
        let first = &group[0];
        let there = self
            .to
            .read_stream(
                &first.aggregate_type,
                &first.aggregate_id,
                first.sequence.saturating_sub(1),
                group.len(),
            )
            .await
            .map_err(CopyError::Target)?;
        let diverged = |sequence: u64, reason: String| CopyError::Diverged {
            aggregate_type: first.aggregate_type.clone(),
            aggregate_id: first.aggregate_id.clone(),
            sequence,
            reason,
        };
        for (i, event) in group.iter().enumerate() {
            match there.get(i) {
                None => {
                    return Err(diverged(
                        event.sequence,
                        "the target has another version of the stream but not this event"
                            .to_owned(),
                    ))
                }
                Some(found) if found.sequence != event.sequence => {
                    return Err(diverged(
                        event.sequence,
                        format!("the target's next event is at sequence {}", found.sequence),
                    ))
                }
                Some(found) if found.event_id != event.event_id => {
                    return Err(diverged(
                        event.sequence,
                        format!(
                            "event {} in the target, {} in the source",
                            found.event_id, event.event_id
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Splits a window into appends: consecutive events of one transaction and
/// one stream, at consecutive sequences.
fn groups(events: &[RecordedEvent]) -> Vec<&[RecordedEvent]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=events.len() {
        let split = i == events.len() || {
            let (a, b) = (&events[i - 1], &events[i]);
            a.transaction_id != b.transaction_id
                || a.aggregate_type != b.aggregate_type
                || a.aggregate_id != b.aggregate_id
                || a.sequence + 1 != b.sequence
        };
        if split {
            groups.push(&events[start..i]);
            start = i;
        }
    }
    groups
}

/// The append that writes `group` at its sequences.
fn request(group: &[RecordedEvent]) -> AppendRequest {
    let first = &group[0];
    AppendRequest {
        aggregate_type: first.aggregate_type.clone(),
        aggregate_id: first.aggregate_id.clone(),
        expected_version: first.sequence.saturating_sub(1),
        events: group
            .iter()
            .map(|event| NewEvent {
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                event_version: event.event_version.clone(),
                payload: event.payload.clone(),
                metadata: event.metadata.clone(),
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
            })
            .collect(),
    }
}

/// After every event: where counting up to the end of a log stops.
const LOG_END: Checkpoint = Checkpoint::new(i64::MAX as u64, i64::MAX as u64);

/// The filters that read a whole log: itself, or each of its partitions.
fn partition_filters(parts: u32) -> Vec<LogFilter> {
    if parts <= 1 {
        vec![LogFilter::all()]
    } else {
        (0..parts)
            .map(|p| LogFilter::all().with_partition(p, parts))
            .collect()
    }
}

/// Counts and sums a whole log (each partition of a partitioned one).
///
/// # Errors
///
/// As [`EventLog::read_log`].
pub async fn tally<L: EventLog + ?Sized>(log: &L) -> Result<Tally, StoreError> {
    let mut tally = Tally::default();
    for filter in partition_filters(log.partitions()) {
        let mut after = Checkpoint::START;
        loop {
            let events = log.read_log(after, &filter, DEFAULT_BATCH).await?;
            let Some(last) = events.last() else {
                break;
            };
            after = last.checkpoint();
            for event in &events {
                tally.add(event);
            }
        }
    }
    Ok(tally)
}

/// 64-bit FNV-1a of what identifies an event and what it says; not of where
/// a backend put it (position, transaction id, time).
fn event_hash(event: &RecordedEvent) -> u64 {
    let mut hash = Fnv::new();
    hash.write(event.event_id.as_bytes());
    hash.field(event.aggregate_type.as_bytes());
    hash.field(event.aggregate_id.as_bytes());
    hash.write(&event.sequence.to_le_bytes());
    hash.field(event.event_type.as_bytes());
    hash.field(event.event_version.as_bytes());
    canonical(&event.payload, &mut hash);
    let metadata: BTreeMap<&String, &String> = event.metadata.iter().collect();
    for (key, value) in metadata {
        hash.field(key.as_bytes());
        hash.field(value.as_bytes());
    }
    for id in [event.correlation_id, event.causation_id] {
        match id {
            Some(id) => hash.write(id.as_bytes()),
            None => hash.write(&[0]),
        }
    }
    hash.0
}

/// Feeds a JSON value with its object keys sorted (backends store objects
/// in different key orders).
fn canonical(value: &serde_json::Value, hash: &mut Fnv) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            hash.write(b"{");
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            for (key, value) in sorted {
                hash.field(key.as_bytes());
                canonical(value, hash);
            }
            hash.write(b"}");
        }
        Value::Array(items) => {
            hash.write(b"[");
            for item in items {
                canonical(item, hash);
            }
            hash.write(b"]");
        }
        other => hash.field(other.to_string().as_bytes()),
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// A field and its end, so `("ab", "c")` and `("a", "bc")` differ.
    fn field(&mut self, bytes: &[u8]) {
        self.write(bytes);
        self.write(&[0xff]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(stream: &str, sequence: u64, transaction_id: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::new_v4(),
            aggregate_type: "account".into(),
            aggregate_id: stream.into(),
            sequence,
            position: sequence,
            transaction_id,
            recorded_at: chrono::Utc::now(),
            event_type: "Deposited".into(),
            event_version: "1".into(),
            payload: json!({"b": 1, "a": [1, {"y": 2, "x": 3}]}),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        }
    }

    #[test]
    fn a_window_splits_by_transaction_stream_and_sequence() {
        let events = vec![
            event("a", 1, 10),
            event("a", 2, 10),
            event("b", 1, 10),
            event("a", 3, 11),
            event("a", 5, 11),
        ];
        let sizes: Vec<usize> = groups(&events).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, vec![2, 1, 1, 1]);
        assert_eq!(request(groups(&events)[0]).expected_version, 0);
        assert_eq!(request(groups(&events)[2]).expected_version, 2);
    }

    #[test]
    fn the_hash_ignores_key_order_and_placement_but_not_content() {
        let a = event("a", 1, 10);
        let mut b = a.clone();
        b.payload = json!({"a": [1, {"x": 3, "y": 2}], "b": 1});
        b.position = 99;
        b.transaction_id = 7;
        assert_eq!(event_hash(&a), event_hash(&b));
        b.payload = json!({"a": [1, {"x": 3, "y": 2}], "b": 2});
        assert_ne!(event_hash(&a), event_hash(&b));
        let mut c = a.clone();
        c.sequence = 2;
        assert_ne!(event_hash(&a), event_hash(&c));
        let mut d = a.clone();
        d.metadata.insert("user".into(), "ann".into());
        assert_ne!(event_hash(&a), event_hash(&d));
    }
}
