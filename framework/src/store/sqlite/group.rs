//! Group commit: appends that arrive while another is being written wait
//! together and go in one write transaction, with one sync of the WAL.
//!
//! SQLite has one writer, and with `synchronous = FULL` each commit waits
//! for its own sync: concurrent appends would commit one at a time, each
//! paying a sync. So an append that finds the writer busy joins a queue;
//! when the append in flight is done, the queue goes as one transaction
//! (`BEGIN IMMEDIATE`), each request inside a savepoint of its own: its
//! stream's version is checked as before (an earlier request of the same
//! group for the same stream counts), and a request that fails — a
//! conflict, a claimed command id — is rolled back to its savepoint and
//! answered with its own error, while the others are written. One commit
//! then answers them all, with the same durability as an append alone. A
//! single client never waits: with nothing in flight an append runs at
//! once, as one statement.

use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{db, SqliteStore};
use crate::error::{ErrorKind, StoreError};
use crate::event::{AppendRequest, RecordedEvent};

/// The most events one group transaction writes.
const GROUP_EVENTS: usize = 2048;

type Reply = oneshot::Sender<Result<Vec<RecordedEvent>, StoreError>>;

struct Waiting {
    request: AppendRequest,
    claim: Option<Uuid>,
    reply: Reply,
}

/// Whether an append is being written, and those waiting for the next
/// group.
#[derive(Default)]
pub(super) struct Group {
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    busy: bool,
    waiting: Vec<Waiting>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Group")
            .field("busy", &state.busy)
            .field("waiting", &state.waiting.len())
            .finish()
    }
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next group, or `None` (and the writer free) when nobody waits.
    fn next(&self) -> Option<Vec<Waiting>> {
        let mut state = self.lock();
        if state.waiting.is_empty() {
            state.busy = false;
            return None;
        }
        let mut events = 0;
        let mut take = 0;
        for waiting in &state.waiting {
            if take > 0 && events + waiting.request.events.len() > GROUP_EVENTS {
                break;
            }
            events += waiting.request.events.len();
            take += 1;
        }
        Some(state.waiting.drain(..take).collect())
    }
}

/// The append leading the writer: when it ends, however it ends, the
/// groups waiting behind it are written (or the writer freed).
struct Leading<'a>(&'a SqliteStore);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.write_groups();
    }
}

/// The task writing groups: dropped before it is done (its runtime shut
/// down, the group in flight rolled back and its callers told the writer
/// stopped), it hands the writer on as the leader does.
struct Writing<'a> {
    store: &'a SqliteStore,
    done: bool,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.store.write_groups();
        }
    }
}

fn lost() -> StoreError {
    StoreError::database(
        "appending events",
        ErrorKind::Transient,
        "the task writing the append's group stopped before answering",
    )
}

impl SqliteStore {
    /// How many appends wait for the writer to take them as a group now (a
    /// diagnostic: under concurrent commands it rises and falls with each
    /// commit).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # let dir = std::env::temp_dir().join(format!("outflow-doc-w-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// let store = outflow::SqliteStore::open(dir.join("events.db")).await?;
    /// assert_eq!(store.waiting_appends(), 0);
    /// # Ok::<(), outflow::StoreError>(())
    /// # }).unwrap();
    /// ```
    pub fn waiting_appends(&self) -> usize {
        self.inner.group.lock().waiting.len()
    }

    /// Appends `request` (claiming `claim` with it): at once when the
    /// writer is free, else with the next group.
    pub(super) async fn append_grouped(
        &self,
        request: AppendRequest,
        claim: Option<Uuid>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let waiting = {
            let mut state = self.inner.group.lock();
            if state.busy {
                let (reply, answer) = oneshot::channel();
                state.waiting.push(Waiting {
                    request,
                    claim,
                    reply,
                });
                Err(answer)
            } else {
                state.busy = true;
                Ok(request)
            }
        };
        match waiting {
            Err(answer) => answer.await.unwrap_or_else(|_| Err(lost())),
            Ok(request) => {
                // Hands the writer on however this ends: answered, or
                // dropped half-way (a cancelled request, an aborted task).
                let _leading = Leading(self);
                match claim {
                    None => self.append_alone(request).await,
                    Some(command_id) => {
                        crate::port::events::append_claiming(self, request, command_id).await
                    }
                }
            }
        }
    }

    /// Writes the waiting groups one after the other, in a task of their
    /// own (the append that led them has its answer already), until nobody
    /// waits; frees the writer when nobody does.
    fn write_groups(&self) {
        let Some(first) = self.inner.group.next() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left to write them in (it is shutting down): their
            // callers are answered that the writer stopped, and the next
            // append takes the writer.
            drop(first);
            self.inner.group.lock().busy = false;
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            let mut writing = Writing {
                store: &store,
                done: false,
            };
            let mut group = Some(first);
            while let Some(waiting) = group {
                store.write_group(waiting).await;
                group = store.inner.group.next();
            }
            writing.done = true;
        });
    }

    /// One transaction for a group: each request in a savepoint, one
    /// commit, each caller answered.
    async fn write_group(&self, group: Vec<Waiting>) {
        let mut tx = match super::projection_store::begin_immediate(&self.inner.writer).await {
            Ok(tx) => tx,
            Err(e) => {
                let error = db("starting a group of appends")(e);
                for waiting in group {
                    let _ = waiting.reply.send(Err(copy_error(&error)));
                }
                return;
            }
        };
        let mut answers = Vec::with_capacity(group.len());
        for waiting in group {
            let result = self
                .append_in_savepoint(&mut tx, waiting.request, waiting.claim)
                .await;
            answers.push((waiting.reply, result));
        }
        match tx.commit().await {
            Ok(()) => {
                if answers
                    .iter()
                    .any(|(_, r)| r.as_ref().is_ok_and(|w| !w.is_empty()))
                {
                    self.signal_commit();
                }
                for (reply, result) in answers {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                let error = db("committing a group of appends")(e);
                for (reply, result) in answers {
                    // Nothing of the group was written.
                    let _ = reply.send(result.and(Err(copy_error(&error))));
                }
            }
        }
    }

    /// One request of a group, undone when it fails so the others are
    /// written: an append of one statement (at most [`CHUNK`](super::append::CHUNK)
    /// events, no claim) writes all its rows or none, and needs nothing
    /// more; one of several statements, or with a claim after it, runs in
    /// a savepoint.
    async fn append_in_savepoint(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        request: AppendRequest,
        claim: Option<Uuid>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if claim.is_none() && request.events.len() <= super::append::CHUNK {
            return self.append_on(tx, request).await;
        }
        sqlx::query("SAVEPOINT outflow_group")
            .execute(&mut **tx)
            .await
            .map_err(db("appending in a group"))?;
        let (aggregate_type, aggregate_id) =
            (request.aggregate_type.clone(), request.aggregate_id.clone());
        let version = request
            .expected_version
            .saturating_add(request.events.len() as u64);
        let mut result = self.append_on(tx, request).await;
        if let (Ok(written), Some(command_id)) = (&result, claim) {
            if !written.is_empty() {
                if let Err(error) = self
                    .claim_on(tx, &aggregate_type, &aggregate_id, command_id, version)
                    .await
                {
                    result = Err(error);
                }
            }
        }
        if result.is_err() {
            sqlx::query("ROLLBACK TO outflow_group")
                .execute(&mut **tx)
                .await
                .map_err(db("rolling back an append in a group"))?;
        }
        sqlx::query("RELEASE outflow_group")
            .execute(&mut **tx)
            .await
            .map_err(db("appending in a group"))?;
        result
    }
}

/// The same error for every caller of a failed group (a `StoreError` is
/// not `Clone`): its text and its kind.
fn copy_error(error: &StoreError) -> StoreError {
    StoreError::database(
        "writing a group of appends",
        error.kind(),
        crate::error::error_chain(error),
    )
}
