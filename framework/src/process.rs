//! Process managers: reactions that span several aggregates and several
//! steps (a transfer debits one account, credits another, refunds the first
//! when the credit is refused), kept correct across crashes.
//!
//! A [`ProcessManager`] says which process each event belongs to, folds the
//! event into that process's state, and returns the commands the step
//! issues; [`Process`] runs it as a projection:
//!
//! 1. before a batch's transaction (in the projection's
//!    [`effects`](crate::projection::Projection::effects), no transaction
//!    open), it folds the batch into the stored states and
//!    [dispatches](ProcessManager::dispatch) each command with a
//!    [`CommandContext`] whose command id is derived from the event and the
//!    command's place among the event's commands;
//! 2. then, in the batch's transaction, it folds the batch again and stores
//!    the new states with the projection's checkpoint.
//!
//! A crash anywhere between the two replays the batch, which dispatches the
//! same commands with the same ids: send them with
//! [`CommandBus::execute_once`](crate::CommandBus::execute_once) and each
//! runs once. So the state is stored exactly once per event, each command
//! takes effect once, and a process resumes where it stopped. For this,
//! [`react`](ProcessManager::react) must be deterministic: the same state and
//! event give the same commands, in the same order.
//!
//! A step whose command is refused continues through events too: dispatch
//! records the refusal as an event of the process's own aggregate (with
//! [`CommandContext::follow_up`]), and the manager reacts to that event
//! (compensating, for example). Run a process manager with one partition
//! (the default): a process's events come from several aggregates, which
//! partitions would split between workers. States live in a view table (`view_id`,
//! `version`, `payload`) on [`PostgresStore`](crate::PostgresStore) or
//! [`SqliteStore`](crate::SqliteStore).
//!
//! ```no_run
//! use outflow::prelude::*;
//! use outflow::process::{Process, ProcessManager};
//! use serde::{Deserialize, Serialize};
//! # use outflow::doc_fixture::{Counter, CounterCommand};
//!
//! /// Mirrors every increment of counter `a-…` onto counter `b-…`.
//! struct Mirror<S: EventStore> {
//!     counters: CommandBus<Counter, S>,
//! }
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Mirrored {
//!     increments: u64,
//! }
//!
//! #[async_trait]
//! impl<S: EventStore> ProcessManager for Mirror<S> {
//!     type State = Mirrored;
//!     type Command = (String, i64);
//!
//!     fn name(&self) -> &str {
//!         "mirror"
//!     }
//!
//!     fn process_id(&self, event: &RecordedEvent) -> Option<String> {
//!         event.aggregate_id.strip_prefix("a-").map(str::to_owned)
//!     }
//!
//!     fn react(&self, state: &mut Mirrored, event: &RecordedEvent) -> Result<Vec<(String, i64)>, HandlerError> {
//!         state.increments += 1;
//!         let by = event.payload["Incremented"]["by"].as_i64().unwrap_or(0);
//!         Ok(vec![(format!("b-{}", &event.aggregate_id[2..]), by)])
//!     }
//!
//!     async fn dispatch(&self, (target, by): (String, i64), context: CommandContext) -> Result<(), HandlerError> {
//!         self.counters
//!             .execute_once(&target, CounterCommand::Increment { by }, context)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! // On PostgreSQL or SQLite alike:
//! # async fn run<S>(store: S) -> Result<(), Box<dyn std::error::Error>>
//! # where S: outflow::view::ViewStore + ProjectionStore + EventStore + EventLog + 'static {
//! let counters = CommandBus::<Counter, _>::new(store.clone(), ());
//! let mirror = Process::new(Mirror { counters }, &store, "mirror_processes")?;
//! let runner = ProjectionRunner::builder(store.clone())
//!     .projection(ProjectionOptions::new(mirror))
//!     .build()?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::command::CommandContext;
use crate::error::{ConfigError, StoreError};
use crate::event::RecordedEvent;
use crate::names::Identifier;
use crate::port::events::Transactional;
use crate::port::log::LogFilter;
use crate::projection::{HandlerError, Projection};
use crate::timer::{ApplyTimers, TimerChange, TimerStore, Timers};
use crate::view::ViewStore;

/// A process that reacts to events of several aggregates by issuing
/// commands, with its state kept per process. Run it with [`Process`].
#[async_trait]
pub trait ProcessManager: Send + Sync + 'static {
    /// What the manager remembers of one process.
    type State: Default + Serialize + DeserializeOwned + Send + Sync;
    /// What a step asks [`dispatch`](Self::dispatch) to send.
    type Command: Send + 'static;

    /// The stable name: the projection's name and the checkpoint's key.
    fn name(&self) -> &str;

    /// The events the manager wants (default: all). Applied by the store.
    fn filter(&self) -> LogFilter {
        LogFilter::all()
    }

    /// The process `event` belongs to, or `None` to ignore it.
    fn process_id(&self, event: &RecordedEvent) -> Option<String>;

    /// Folds `event` into its process's `state` and returns the commands
    /// this step issues. Must be deterministic (no clock, no randomness, no
    /// I/O): it runs again when a batch is replayed.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`] (an event that does not decode, say); the
    /// batch is retried and then parked or stopped, as the projection's
    /// policy says.
    fn react(
        &self,
        state: &mut Self::State,
        event: &RecordedEvent,
    ) -> Result<Vec<Self::Command>, HandlerError>;

    /// The timers this step schedules, reschedules or cancels (default:
    /// none), from the process's `state` after [`react`](Self::react)
    /// folded `event` into it. Applied in the batch's transaction, with the
    /// states and the checkpoint, each [caused by](crate::timer::Timer::caused_by)
    /// `event` and carrying the process's name and id as metadata: a timer
    /// exists exactly when the step that scheduled it committed, and a
    /// replayed step (a crash, a rebuild) neither schedules it twice nor
    /// revives it after it fired or was cancelled. Give the process its
    /// timers with [`Process::with_timers`]. Must be deterministic, as
    /// `react`: use [`Timer::after`](crate::timer::Timer::after) (the
    /// database's clock), not the node's clock.
    ///
    /// ```
    /// # use outflow::RecordedEvent;
    /// # use outflow::timer::{Timer, TimerChange};
    /// # use outflow::doc_fixture::{Counter, CounterCommand};
    /// # use std::time::Duration;
    /// # struct State { open: bool }
    /// # fn timers(state: &State, event: &RecordedEvent) -> Result<Vec<TimerChange>, outflow::HandlerError> {
    /// let key = format!("expire/{}", event.aggregate_id);
    /// Ok(vec![if state.open {
    ///     TimerChange::Schedule(
    ///         Timer::command::<Counter>(key, &event.aggregate_id, &CounterCommand::Increment { by: 1 })?
    ///             .after(Duration::from_secs(60)),
    ///     )
    /// } else {
    ///     TimerChange::Cancel(key)
    /// }])
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`], as `react`'s.
    fn timers(
        &self,
        state: &Self::State,
        event: &RecordedEvent,
    ) -> Result<Vec<TimerChange>, HandlerError> {
        let _ = (state, event);
        Ok(Vec::new())
    }

    /// Sends one command, at least once, with no transaction open. The
    /// context carries the command id to send it with (pass it to
    /// [`CommandBus::execute_once`](crate::CommandBus::execute_once)), the
    /// event's correlation id, the event as cause, and the process's name
    /// and id as metadata.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]: the batch is retried from its first event, so
    /// commands already sent are sent again (and recognized).
    async fn dispatch(
        &self,
        command: Self::Command,
        context: CommandContext,
    ) -> Result<(), HandlerError>;
}

/// Runs a [`ProcessManager`] as a projection, its states in a view table;
/// hand it to a [`ProjectionRunner`](crate::runner::ProjectionRunner) with
/// [`ProjectionOptions::new`](crate::projection::ProjectionOptions::new).
pub struct Process<P, S: Transactional> {
    manager: P,
    store: S,
    /// The state table, quoted for SQL.
    table: String,
    /// Where the steps' timers go.
    timers: Option<Arc<dyn ApplyTimers<S::Transaction>>>,
}

impl<P: ProcessManager, S: Transactional> std::fmt::Debug for Process<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.manager.name())
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<P: ProcessManager, S: ViewStore> Process<P, S> {
    /// Runs `manager` with its states in `table` (created when the runner
    /// starts; validated like every table name) of `store`.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad table name.
    pub fn new(manager: P, store: &S, table: &str) -> Result<Self, StoreError> {
        Ok(Process {
            manager,
            store: store.clone(),
            table: Identifier::parse(table, "process table")?.quoted(),
            timers: None,
        })
    }

    /// Gives the process the timers its steps schedule
    /// ([`ProcessManager::timers`]): the same database as the process's
    /// states, so they commit in the batch's transaction.
    pub fn with_timers<T>(mut self, timers: Timers<T>) -> Self
    where
        T: TimerStore,
        Timers<T>: ApplyTimers<S::Transaction>,
    {
        self.timers = Some(Arc::new(timers));
        self
    }

    /// A handle to read the processes' states from anywhere in the
    /// application.
    pub fn states(&self) -> ProcessStates<P::State, S> {
        ProcessStates {
            store: self.store.clone(),
            table: self.table.clone(),
            _state: PhantomData,
        }
    }

    /// The batch's events grouped by process, in log order within each.
    fn by_process<'e>(&self, events: &'e [RecordedEvent]) -> Vec<(String, Vec<&'e RecordedEvent>)> {
        let mut groups: Vec<(String, Vec<&RecordedEvent>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for event in events {
            if let Some(id) = self.manager.process_id(event) {
                let at = *index.entry(id.clone()).or_insert_with(|| {
                    groups.push((id, Vec::new()));
                    groups.len() - 1
                });
                groups[at].1.push(event);
            }
        }
        groups
    }

    fn decode(&self, id: &str, payload: &str) -> Result<P::State, HandlerError> {
        serde_json::from_str(payload).map_err(|e| {
            HandlerError::from(StoreError::Corrupt {
                table: self.table.clone(),
                what: format!("the state of process `{id}` does not deserialize: {e}"),
            })
        })
    }
}

#[async_trait]
impl<P, S> Projection<S> for Process<P, S>
where
    P: ProcessManager,
    S: ViewStore + 'static,
{
    fn name(&self) -> &str {
        self.manager.name()
    }

    fn filter(&self) -> LogFilter {
        self.manager.filter()
    }

    /// Folds the batch into the committed states and dispatches the
    /// commands, before the batch's transaction.
    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        for (id, events) in self.by_process(events) {
            let mut state = match self.store.view_payload(&self.table, &id).await? {
                Some(payload) => {
                    crate::personal::prepare_in_scope([payload.as_str()]).await?;
                    self.decode(&id, &payload)?
                }
                None => P::State::default(),
            };
            for event in events {
                let commands = self.manager.react(&mut state, event)?;
                if commands.is_empty() {
                    continue;
                }
                // The step continues the trace of the event that caused it:
                // the commands it dispatches are children of that trace.
                let step = tracing::info_span!(
                    "outflow.process.step",
                    process = self.manager.name(),
                    process_id = %id,
                    event_id = %event.event_id,
                    commands = commands.len(),
                );
                crate::trace::follow(&step, event);
                async {
                    for (i, command) in commands.into_iter().enumerate() {
                        let context = CommandContext::reacting_to(
                            event,
                            &format!("{}/{id}/{i}", self.manager.name()),
                        )
                        .with_metadata("process", self.manager.name())
                        .with_metadata("process_id", id.clone());
                        self.manager.dispatch(command, context).await?;
                    }
                    Ok::<(), HandlerError>(())
                }
                .instrument(step)
                .await?;
            }
        }
        Ok(())
    }

    /// Folds the batch again and stores the states with the checkpoint.
    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        let groups = self.by_process(events);
        if groups.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = groups.iter().map(|(id, _)| id.clone()).collect();
        let mut stored: HashMap<String, (i64, String)> = S::documents_in(tx, &self.table, &ids)
            .await?
            .into_iter()
            .map(|(id, version, payload)| (id, (version, payload)))
            .collect();
        crate::personal::prepare_in_scope(stored.values().map(|(_, payload)| payload.as_str()))
            .await?;
        let mut documents = Vec::with_capacity(groups.len());
        let mut scheduled = None;
        for (id, events) in groups {
            let (mut version, mut state) = match stored.remove(&id) {
                Some((version, payload)) => (version, self.decode(&id, &payload)?),
                None => (0, P::State::default()),
            };
            for event in events {
                self.manager.react(&mut state, event)?;
                version += 1;
                let changes = self.manager.timers(&state, event)?;
                if changes.is_empty() {
                    continue;
                }
                let Some(timers) = &self.timers else {
                    return Err(HandlerError::from(StoreError::Config(
                        ConfigError::Invalid {
                            setting: "process timers",
                            reason: format!(
                                "process `{}` schedules timers but was given none: \
                             Process::with_timers",
                                self.manager.name()
                            ),
                        },
                    )));
                };
                let metadata = [
                    ("process", self.manager.name()),
                    ("process_id", id.as_str()),
                ];
                timers.apply(tx, changes, event, &metadata).await?;
                scheduled = Some(timers.clone());
            }
            documents.push((id, version, crate::personal::seal_text(&state).await?));
        }
        S::save_documents(tx, &self.table, &documents).await?;
        if let Some(timers) = scheduled {
            // The batch commits right after this: a scheduler in this
            // process then reads the new timers at once rather than at its
            // next poll.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                timers.wake();
            });
        }
        Ok(())
    }

    /// Creates the state table if it does not exist.
    async fn setup(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        S::create_documents(tx, &self.table).await?;
        Ok(())
    }

    /// Empties the state table. A rebuild replays every event and so
    /// dispatches every command again: they are recognized only when sent
    /// with [`execute_once`](crate::CommandBus::execute_once).
    async fn reset(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        S::clear_documents(tx, &self.table).await?;
        Ok(())
    }
}

/// Reads the states of a [`Process`]; made by [`Process::states`].
pub struct ProcessStates<T, S> {
    store: S,
    table: String,
    _state: PhantomData<fn() -> T>,
}

impl<T, S: Clone> Clone for ProcessStates<T, S> {
    fn clone(&self) -> Self {
        ProcessStates {
            store: self.store.clone(),
            table: self.table.clone(),
            _state: PhantomData,
        }
    }
}

impl<T, S> std::fmt::Debug for ProcessStates<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStates")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned, S: ViewStore> ProcessStates<T, S> {
    /// The state of one process as last committed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] when the stored
    /// JSON does not fit the state type.
    pub async fn get(&self, process_id: &str) -> Result<Option<T>, StoreError> {
        let Some(payload) = self.store.view_payload(&self.table, process_id).await? else {
            return Ok(None);
        };
        let ring = self.store.key_ring();
        crate::personal::open_stored(ring.as_ref(), [payload.as_str()], || {
            serde_json::from_str(&payload)
        })
        .await?
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            table: self.table.clone(),
            what: format!("the state of process `{process_id}` does not deserialize: {e}"),
        })
    }
}
