//! Group append: appends that arrive while others are in flight wait
//! together and go as one statement with one commit.
//!
//! A command's append is one statement in its own transaction; what bounds
//! many concurrent commands on a small server is the work per transaction
//! (the commit, its WAL flush and the wake-ups around them), not the rows.
//! So at most [`IN_FLIGHT`] appends run on their own at a time: an append
//! that finds them all busy waits in a queue, and when one finishes, the
//! queue goes as one group — one `INSERT` that checks each stream's
//! expected version on its own, so each request still gets its own typed
//! [`Conflict`](StoreError::Conflict) while the others are written. A
//! single client never waits: with nothing in flight an append runs at
//! once, as before.
//!
//! A group holds at most one request per stream (a second one for the same
//! stream waits for the next group: both could expect the same version), no
//! request for a stream that an append in flight is writing (the two would
//! race for the same sequence, and the group would lose to a unique-key
//! error and fall back to appending one by one), and at most
//! [`GROUP_EVENTS`] events. Events of one group share a transaction
//! id and get positions in the order their requests arrived.

use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::postgres::PgRow;
use sqlx::Row;
use tokio::sync::oneshot;

use super::{pg_error, to_i64, PostgresStore};
use crate::error::{ErrorKind, StoreError};
use crate::event::{AppendRequest, RecordedEvent};

/// Appends that may run on their own at once; more wait and go as a group.
pub(super) const IN_FLIGHT: usize = 2;

/// The most events one group statement writes.
pub(super) const GROUP_EVENTS: usize = 512;

type Reply = oneshot::Sender<Result<Vec<RecordedEvent>, StoreError>>;

struct Waiting {
    request: AppendRequest,
    reply: Reply,
}

/// The appends in flight and those waiting for the next group.
#[derive(Default)]
pub(super) struct Group {
    state: Mutex<GroupState>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Group")
            .field("in_flight", &state.in_flight)
            .field("waiting", &state.waiting.len())
            .finish()
    }
}

/// A stream: aggregate type and id.
type StreamKey = (String, String);

#[derive(Default)]
struct GroupState {
    in_flight: usize,
    waiting: Vec<Waiting>,
    /// The streams that appends in flight write, with how many write each.
    busy: HashMap<StreamKey, usize>,
}

impl GroupState {
    fn take_off(&mut self, streams: &[StreamKey]) {
        for key in streams {
            self.busy
                .insert(key.clone(), self.busy.get(key).copied().unwrap_or(0) + 1);
        }
    }

    fn land(&mut self, streams: &[StreamKey]) {
        for key in streams {
            match self.busy.get_mut(key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.busy.remove(key);
                }
            }
        }
    }
}

fn stream_key(request: &AppendRequest) -> StreamKey {
    (request.aggregate_type.clone(), request.aggregate_id.clone())
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Gives the flight slot back when an append on its own ends, however it
/// ends (also when its caller drops the future): the waiting queue then
/// goes as a group, or the slot is free.
struct Flight {
    store: PostgresStore,
    /// The streams it writes.
    streams: Vec<StreamKey>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        landed(&self.store, &self.streams);
    }
}

/// A flight ended: send the next group with its slot, or free the slot.
fn landed(store: &PostgresStore, streams: &[StreamKey]) {
    let (next, streams) = {
        let mut guard = store.inner.group.lock();
        let state = &mut *guard;
        state.land(streams);
        let next = next_group(&mut state.waiting, &state.busy);
        if next.is_empty() {
            // Nothing waits, or only requests for streams still being
            // written: a flight in progress takes them when it lands.
            state.in_flight = state.in_flight.saturating_sub(1);
            return;
        }
        let streams: Vec<StreamKey> = next.iter().map(|w| stream_key(&w.request)).collect();
        state.take_off(&streams);
        (next, streams)
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime to run it on (a store dropped outside one): fail the
        // waiters rather than leave them hanging.
        for waiting in next {
            let _ = waiting.reply.send(Err(group_failed(
                ErrorKind::Transient,
                "no runtime to append on".to_owned(),
            )));
        }
        let mut state = store.inner.group.lock();
        state.land(&streams);
        state.in_flight = state.in_flight.saturating_sub(1);
        return;
    };
    let store = store.clone();
    runtime.spawn(async move {
        let _flight = Flight {
            store: store.clone(),
            streams,
        };
        store.append_group(next).await;
    });
}

/// Takes the next group from the queue: in arrival order, one request per
/// stream, none for a `busy` stream, up to [`GROUP_EVENTS`] events (at least
/// one request unless every waiting one is for a busy stream).
fn next_group(waiting: &mut Vec<Waiting>, busy: &HashMap<StreamKey, usize>) -> Vec<Waiting> {
    let mut group = Vec::new();
    let mut rest = Vec::new();
    let mut events = 0;
    let mut streams = std::collections::HashSet::new();
    for w in waiting.drain(..) {
        let key = (
            w.request.aggregate_type.clone(),
            w.request.aggregate_id.clone(),
        );
        let fits = group.is_empty() || events + w.request.events.len() <= GROUP_EVENTS;
        if fits && !streams.contains(&key) && !busy.contains_key(&key) {
            events += w.request.events.len();
            streams.insert(key);
            group.push(w);
        } else {
            rest.push(w);
        }
    }
    *waiting = rest;
    group
}

/// An error for a group member when the group's statement failed.
fn group_failed(kind: ErrorKind, message: String) -> StoreError {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct GroupFailed(String);
    StoreError::database("appending events (in a group)", kind, GroupFailed(message))
}

impl PostgresStore {
    /// Appends `request` on its own when a flight slot is free, else waits
    /// for the next group.
    pub(super) async fn append_grouped(
        &self,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let queued = {
            let mut state = self.inner.group.lock();
            let key = stream_key(&request);
            // A stream that a flight is writing waits for it, even with a
            // slot free: the two would race for the same sequence.
            if state.in_flight < IN_FLIGHT && !state.busy.contains_key(&key) {
                state.in_flight += 1;
                state.take_off(&[key]);
                Err(request)
            } else {
                let (reply, receiver) = oneshot::channel();
                state.waiting.push(Waiting { request, reply });
                Ok(receiver)
            }
        };
        let receiver = match queued {
            Ok(receiver) => receiver,
            Err(request) => {
                let _flight = Flight {
                    store: self.clone(),
                    streams: vec![stream_key(&request)],
                };
                return self.append_alone(request).await;
            }
        };
        receiver.await.unwrap_or_else(|_| {
            Err(group_failed(
                ErrorKind::Transient,
                "the group append was dropped before it answered".to_owned(),
            ))
        })
    }

    /// One append in its own statement and transaction.
    async fn append_alone(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut connection = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| pg_error("acquiring a connection to append", e))?;
        let written = self.append_on(&mut connection, request).await?;
        if !written.is_empty() {
            self.signal_commit();
        }
        Ok(written)
    }

    /// Runs one group and answers each of its requests.
    async fn append_group(&self, group: Vec<Waiting>) {
        if group.len() == 1 {
            for Waiting { request, reply } in group {
                let _ = reply.send(self.append_alone(request).await);
            }
            return;
        }
        let requests: Vec<&AppendRequest> = group.iter().map(|w| &w.request).collect();
        match self.group_statement(&requests).await {
            Ok(mut written) => {
                let mut any = false;
                let mut refused = Vec::new();
                for (i, Waiting { request, reply }) in group.into_iter().enumerate() {
                    match written.remove(&i) {
                        Some(rows) => {
                            any = true;
                            let _ = reply.send(self.recorded(request, &rows));
                        }
                        None => refused.push((request, reply)),
                    }
                }
                if any {
                    self.signal_commit();
                }
                for (request, reply) in refused {
                    // Refused by its own guard: say why, as alone.
                    let answer = match self.inner.pool.acquire().await {
                        Ok(mut connection) => Err(self.refusal(&mut connection, request).await),
                        Err(e) => Err(pg_error("acquiring a connection after a refused append", e)),
                    };
                    let _ = reply.send(answer);
                }
            }
            Err(GroupError::Rejected) => {
                // Another writer took a version in between (the unique key
                // refused the whole statement, nothing was written): each
                // goes alone and gets its own answer.
                for Waiting { request, reply } in group {
                    let _ = reply.send(self.append_alone(request).await);
                }
            }
            Err(GroupError::Failed(error)) => {
                let kind = error.kind();
                let message = crate::error::error_chain(&error);
                let mut first = Some(error);
                for Waiting { reply, .. } in group {
                    let answer = first
                        .take()
                        .unwrap_or_else(|| group_failed(kind, message.clone()));
                    let _ = reply.send(Err(answer));
                }
            }
        }
    }

    /// The group's one statement: each request's rows, by its index in the
    /// group; a request refused by its guard has none.
    async fn group_statement(
        &self,
        requests: &[&AppendRequest],
    ) -> Result<HashMap<usize, Vec<PgRow>>, GroupError> {
        let mut stream_types = Vec::with_capacity(requests.len());
        let mut stream_ids = Vec::with_capacity(requests.len());
        let mut expected = Vec::with_capacity(requests.len());
        let total: usize = requests.iter().map(|r| r.events.len()).sum();
        let mut stream_of = Vec::with_capacity(total);
        let mut index_in = Vec::with_capacity(total);
        let mut types = Vec::with_capacity(total);
        let mut versions = Vec::with_capacity(total);
        let mut payloads = Vec::with_capacity(total);
        let mut metadata = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        let mut correlations = Vec::with_capacity(total);
        let mut causations = Vec::with_capacity(total);
        for (stream, request) in requests.iter().enumerate() {
            stream_types.push(request.aggregate_type.as_str());
            stream_ids.push(request.aggregate_id.as_str());
            expected.push(to_i64(request.expected_version));
            for (i, event) in request.events.iter().enumerate() {
                stream_of.push(stream as i64 + 1);
                index_in.push(i as i64 + 1);
                types.push(event.event_type.as_str());
                versions.push(event.event_version.as_str());
                payloads.push(event.payload.to_string());
                metadata.push(serde_json::to_string(&event.metadata).map_err(|source| {
                    GroupError::Failed(StoreError::Serialize {
                        what: "event metadata",
                        aggregate_type: request.aggregate_type.clone(),
                        aggregate_id: request.aggregate_id.clone(),
                        source,
                    })
                })?);
                ids.push(event.event_id);
                correlations.push(event.correlation_id);
                causations.push(event.causation_id);
            }
        }
        let rows = sqlx::query(&self.inner.sql.append_group)
            .bind(&stream_types)
            .bind(&stream_ids)
            .bind(&expected)
            .bind(&stream_of)
            .bind(&index_in)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&ids)
            .bind(&correlations)
            .bind(&causations)
            .fetch_all(&self.inner.pool)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(GroupError::Rejected)
            }
            Err(e) => return Err(GroupError::Failed(pg_error("appending events", e))),
        };
        let table = &self.inner.events_table;
        let mut written: HashMap<usize, Vec<PgRow>> = HashMap::new();
        for row in rows {
            let stream: i64 = row
                .try_get("stream")
                .map_err(|e| GroupError::Failed(pg_error("reading appended rows", e)))?;
            let stream = usize::try_from(stream - 1)
                .ok()
                .filter(|&s| s < requests.len())
                .ok_or_else(|| {
                    GroupError::Failed(super::rows::corrupt(
                        table,
                        "a group append returned a foreign stream",
                    ))
                })?;
            written.entry(stream).or_default().push(row);
        }
        Ok(written)
    }
}

/// How a group's statement failed.
enum GroupError {
    /// A unique key refused it: nothing was written.
    Rejected,
    /// Anything else (the outcome may be unknown, as for a lost connection).
    Failed(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn waiting(id: &str, events: usize) -> Waiting {
        let (reply, _receiver) = oneshot::channel();
        let event = NewEvent {
            event_id: uuid::Uuid::nil(),
            event_type: "E".to_owned(),
            event_version: "1".to_owned(),
            payload: serde_json::json!({}),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        };
        Waiting {
            request: AppendRequest {
                aggregate_type: "t".to_owned(),
                aggregate_id: id.to_owned(),
                expected_version: 0,
                events: vec![event; events],
            },
            reply,
        }
    }

    fn ids(group: &[Waiting]) -> Vec<&str> {
        group
            .iter()
            .map(|w| w.request.aggregate_id.as_str())
            .collect()
    }

    #[test]
    fn a_group_takes_one_request_per_stream_and_none_for_a_busy_stream() {
        let mut queue = vec![
            waiting("a", 1),
            waiting("b", 1),
            waiting("a", 1),
            waiting("c", 1),
            waiting("d", 1),
        ];
        let busy = HashMap::from([(("t".to_owned(), "c".to_owned()), 1)]);
        let group = next_group(&mut queue, &busy);
        assert_eq!(ids(&group), ["a", "b", "d"]);
        // The second `a` and the busy `c` wait, in arrival order.
        assert_eq!(ids(&queue), ["a", "c"]);
        // With only busy streams waiting, no group.
        let busy = HashMap::from([
            (("t".to_owned(), "a".to_owned()), 1),
            (("t".to_owned(), "c".to_owned()), 2),
        ]);
        assert!(next_group(&mut queue, &busy).is_empty());
        assert_eq!(ids(&queue), ["a", "c"]);
    }

    #[test]
    fn a_group_stops_at_its_event_budget_but_never_goes_empty() {
        let mut queue = vec![waiting("big", GROUP_EVENTS + 10), waiting("small", 1)];
        let group = next_group(&mut queue, &HashMap::new());
        assert_eq!(ids(&group), ["big"]);
        assert_eq!(ids(&queue), ["small"]);
    }

    #[test]
    fn busy_streams_are_counted_per_flight() {
        let mut state = GroupState::default();
        let key = ("t".to_owned(), "a".to_owned());
        state.take_off(std::slice::from_ref(&key));
        state.take_off(std::slice::from_ref(&key));
        state.land(std::slice::from_ref(&key));
        assert!(state.busy.contains_key(&key));
        state.land(std::slice::from_ref(&key));
        assert!(state.busy.is_empty());
    }
}
