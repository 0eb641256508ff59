//! One command id, one outcome: `execute_once` and what it remembers —
//! the events it wrote (their ids derive from the command id) or its
//! refusal.

use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::error::{CommandError, StoreError};
use crate::event::Envelope;
use crate::outcome::{CommandOutcome, Refusal, RefusalRecord};
use crate::port::events::EventStore;

use super::bus::*;
use super::context::*;

impl<A, S> CommandBus<A, S>
where
    A: Aggregate + 'static,
    A::Error: 'static,
    S: EventStore,
{
    /// Runs `command` at most once per command id, and gives every send of
    /// the same id the same outcome: when the command with
    /// `context.command_id` was accepted before, returns the events it
    /// wrote (with [`Committed::repeated`](crate::Committed::repeated) set) without running it again;
    /// when it was refused before, returns the same refusal — even if the
    /// aggregate changed since and would now accept it (like an
    /// idempotency key: the key fixes the response). For commands sent at
    /// least once — by a [process manager](crate::process), a retried
    /// delivery, a client retrying after a timeout — whose id is
    /// deterministic (see [`CommandContext::reacting_to`](crate::CommandContext::reacting_to) and
    /// [`CommandContext::follow_up`](crate::CommandContext::follow_up)).
    ///
    /// The outcome is stored atomically with the decision (see
    /// [`crate::outcome`] for what is kept, where, and for how long): the
    /// events' ids are derived from the command id and a claim of the id
    /// commits with them; a refusal is stored as the domain error's message
    /// (and its JSON with
    /// [`remember_typed_refusals`](crate::CommandBusBuilder::remember_typed_refusals)).
    /// Of concurrent sends, the first outcome stored wins and the others
    /// return it. A remembered refusal comes back as
    /// [`CommandError::Refused`](crate::CommandError::Refused), or as [`CommandError::Rejected`](crate::CommandError::Rejected) on a bus
    /// with typed refusals; [`CommandError::is_refusal`](crate::CommandError::is_refusal) covers both.
    ///
    /// The check reads the outcome by key and then the aggregate's stream,
    /// so its cost grows with the stream's length.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use outflow::{CommandBus, CommandContext, MemoryStore};
    /// # use outflow::doc_fixture::{Counter, CounterCommand};
    /// let bus = CommandBus::<Counter, _>::new(MemoryStore::new(), ());
    /// let context = CommandContext::new();
    /// let first = bus.execute_once("c-1", CounterCommand::Increment { by: 5 }, context.clone()).await?;
    /// let again = bus.execute_once("c-1", CounterCommand::Increment { by: 5 }, context).await?;
    /// assert!(!first.repeated && again.repeated);
    /// assert_eq!(again.events[0].event_id, first.events[0].event_id);
    /// assert_eq!(bus.load("c-1").await?.0.value, 5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute), and [`CommandError::Refused`](crate::CommandError::Refused) for a
    /// remembered refusal. A conflict means another writer changed the
    /// aggregate first and no outcome is stored for this command: retry it
    /// with the same context.
    pub async fn execute_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.instrumented(aggregate_id, command, context, true)
            .await
    }

    /// [`execute_once`](Self::execute_once): the stored outcome and the
    /// stream are searched once the aggregate is loaded (see
    /// `run_command`), and again when its append loses a race (the winner
    /// may have been the same command, or its refusal).
    pub(super) async fn run_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let command_id = context.command_id;
        match self.run_command(aggregate_id, command, context, true).await {
            Err(error) if error.is_conflict() => {
                match self.decided(aggregate_id, command_id).await? {
                    Some(done) => done,
                    None => Err(error),
                }
            }
            result => result,
        }
    }

    /// What was decided for `command_id` on this aggregate, if anything:
    /// the remembered outcome, or events written by it.
    pub(super) async fn decided(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<Result<Committed<A>, CommandError<A::Error>>>, StoreError> {
        if let Some(outcome) = self
            .store
            .command_outcome(A::TYPE, aggregate_id, command_id)
            .await?
        {
            return self.replay(aggregate_id, outcome).await.map(Some);
        }
        Ok(self.written_by(aggregate_id, command_id).await?.map(Ok))
    }

    /// The answer to a command whose outcome was stored before.
    pub(super) async fn replay(
        &self,
        aggregate_id: &str,
        outcome: CommandOutcome,
    ) -> Result<Result<Committed<A>, CommandError<A::Error>>, StoreError> {
        if let Some(refusal) = Refusal::from_outcome(&outcome) {
            return Ok(Err(self.refused(refusal)));
        }
        Ok(Ok(
            match self.written_by(aggregate_id, outcome.command_id).await? {
                Some(done) => done,
                // Accepted without events.
                None => Committed {
                    events: Vec::new(),
                    version: outcome.version,
                    repeated: true,
                },
            },
        ))
    }

    /// A remembered refusal as the caller gets it: the domain error again
    /// when it was stored typed and still decodes.
    pub(super) fn refused(&self, refusal: Refusal) -> CommandError<A::Error> {
        if let (Some(codec), Some(error)) = (&self.typed_refusals, &refusal.error) {
            if let Some(error) = (codec.decode)(error.clone()) {
                return CommandError::Rejected(error);
            }
        }
        CommandError::Refused(refusal)
    }

    /// Stores the outcome of a command run with an id (a refusal, or an
    /// acceptance without events); returns the caller's answer: `mine`
    /// when this outcome was stored, else the one stored first.
    pub(super) async fn remember(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
        mine: Result<Committed<A>, CommandError<A::Error>>,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let refusal = match &mine {
            Err(CommandError::Rejected(error)) => Some(RefusalRecord {
                message: error.to_string(),
                error: self
                    .typed_refusals
                    .as_ref()
                    .and_then(|codec| (codec.encode)(error)),
            }),
            _ => None,
        };
        let outcome = CommandOutcome {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            command_id,
            version,
            recorded_at: chrono::Utc::now(),
            refusal,
        };
        let stored = self.store.record_outcome(outcome.clone()).await?;
        if stored.refusal == outcome.refusal && stored.version == outcome.version {
            return mine;
        }
        self.replay(aggregate_id, stored).await?
    }

    /// The events a command with `command_id` wrote to the aggregate's
    /// stream, if any, and the stream's version.
    pub(super) async fn written_by(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<Committed<A>>, StoreError> {
        const PAGE: usize = 1000;
        let mut after = 0;
        let mut found: Vec<Envelope<A>> = Vec::new();
        loop {
            let page = self
                .store
                .read_stream(A::TYPE, aggregate_id, after, PAGE)
                .await?;
            let full = page.len() == PAGE;
            for event in &page {
                after = event.sequence;
                if event.event_id == event_id_of(command_id, found.len()) {
                    found.push(event.decode_ref::<A>(&self.upcasters)?);
                }
            }
            if !full {
                break;
            }
        }
        Ok((!found.is_empty()).then_some(Committed {
            events: found,
            version: after,
            repeated: true,
        }))
    }
}
