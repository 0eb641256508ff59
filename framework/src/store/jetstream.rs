//! An event store on NATS JetStream (feature `nats`): the scale-out backend,
//! for when one database server's write rate or availability is not enough.
//!
//! # How events are stored
//!
//! - **One message per command.** An append's events travel in one message,
//!   so the append is atomic: every event of the command is stored, or none.
//!   Its subject is `<prefix>.<partition>.<aggregate type>.<aggregate id>`,
//!   each name encoded as one subject token ([`stream_token`]: letters,
//!   digits and `-` stay, every other byte becomes `_` and two hex digits), so
//!   two aggregates never share a subject.
//! - **Optimistic concurrency** by `Nats-Expected-Last-Subject-Sequence`: the
//!   append names the stream sequence of the aggregate's last message, and the
//!   stream's leader refuses it when another message for the aggregate came
//!   first; that comes back as the same [`StoreError::Conflict`](crate::StoreError::Conflict) as on the
//!   other backends.
//! - **One message per version.** Each message carries a `Nats-Msg-Id`
//!   naming the aggregate's version slot (a UUID of the aggregate type, id
//!   and the version the append expects). The stream's duplicate check
//!   refuses a second message for a slot while the first is still being
//!   committed, which the expected-sequence check alone does not do on a
//!   cluster (nats-server 2.9 checks it when the leader proposes the
//!   message, so two appends in flight for one version could both commit).
//!   When the stream answers "duplicate", the store reads the stored message:
//!   if it is this append call's own (its first event, and a random number
//!   that each call carries in all its attempts), the append succeeded
//!   earlier and its acknowledgement was lost (a timeout, a dropped
//!   connection, a leader change), so the stored copy's position is
//!   returned and nothing is written twice; otherwise another writer took
//!   the version first, a conflict (also when the same command is sent twice
//!   at once: one writes, and the other's
//!   [`execute_once`](crate::CommandBus::execute_once) finds its events). The
//!   duplicate window is two minutes; later, the expected sequence alone
//!   guards the slot, and no append is in flight that long.
//! - **Positions.** An event's place in the log is its message's stream
//!   sequence (the [`Checkpoint::transaction_id`](crate::Checkpoint::transaction_id): one message is one
//!   "transaction") and its index in the message. The
//!   [`Checkpoint::position`](crate::Checkpoint::position) packs them with the partition:
//!   `sequence << 24 | partition << 16 | index`, so positions are unique
//!   across partitions and increase along each partition's log, and the
//!   events of one append have consecutive positions. The sequence is
//!   assigned by the stream's leader when the message is committed to the
//!   replicated log, in commit order: there are no late commits, so a log
//!   reader can never skip an event that commits after it read past its
//!   position (what PostgreSQL needs transaction ids and a guard for).
//! - **Loads** read only the aggregate's own messages, one subject-filtered
//!   get per message (never a scan of the stream), from after its snapshot.
//!   Gets are answered by any replica; a replica behind what this store last
//!   wrote or read of the aggregate is read past through the stream's
//!   leader, so a node always reads its own writes (a replica behind another
//!   node's write ends in a conflict at the append, as any stale read would).
//!   The store keeps the messages it read or wrote in memory (immutable once
//!   stored; [`cached_events`](JetStreamStoreBuilder::cached_events) bounds
//!   them), so a load asks only for what came after them: one round trip for
//!   an aggregate this node last wrote. **Snapshots** live in a replicated
//!   key-value bucket (`KV_<PREFIX>_snapshots`, newest wins).
//!
//! # Partitions
//!
//! With [`partitions(n)`](JetStreamStoreBuilder::partitions) the store keeps
//! `n` streams (`<PREFIX>_0` …), each with its own leader and log (spread
//! over the cluster's servers by [`build`](JetStreamStoreBuilder::build) and
//! [`spread_leaders`](JetStreamStore::spread_leaders)); an
//! aggregate lives in partition `fnv1a(aggregate id) % n` (the hash
//! [`Partition::contains`](crate::log::Partition::contains) uses). Writes to
//! different partitions do not wait for each other. The log is ordered **per
//! partition**: there is no single total order across partitions. So:
//!
//! - a projection reads one partition per unit: the runner gives every
//!   projection as many partitions as the store has (a projection configured
//!   with another count above 1 is refused at build);
//! - [`ProjectionRunner::wait_for`](crate::runner::ProjectionRunner::wait_for)
//!   waits for the unit of the command's partition (read-your-writes holds
//!   for what the command wrote); the free function
//!   [`wait_for`](crate::runner::wait_for) compares against every unit and is
//!   not for partitioned stores;
//! - reading the log without a partition filter, [`head`](crate::EventLog::head)
//!   and [`committed_head`](crate::EventLog::committed_head) are refused on a
//!   partitioned store with a [`ConfigError`](crate::ConfigError): there is no head of the
//!   whole log ([`head_of`](crate::EventLog::head_of) a partition is);
//! - one partition is one total order, as on the SQL backends.
//!
//! What JetStream cannot do against PostgreSQL: no inline handlers in the
//! append's transaction and no appends inside a transaction that also
//! writes rows ([`AppendInTransaction`](crate::AppendInTransaction) is not
//! implemented); read models, checkpoints, leases and dead letters live in
//! SQL ([`ProjectionRunner::with_log`](crate::runner::ProjectionRunner::with_log)
//! with a [`PostgresStore`](crate::PostgresStore) or
//! [`SqliteStore`](crate::SqliteStore)), where each batch's read-model writes
//! commit with its checkpoint: exactly once across the two systems. A
//! reaction that must happen with the append becomes a projection.
//!
//! # Failures
//!
//! Each request waits a part of the [timeout](JetStreamStoreBuilder::timeout)
//! for an answer (a quarter, between 250 ms and 2 s) and a call tries again
//! until the whole timeout has passed: a leader election (several seconds
//! on nats-server 2.9) leaves requests unanswered, and a call that spans it
//! succeeds once the new leader answers. Past the timeout (no leader: a
//! majority of the stream's servers is down) the call fails with
//! [`StoreError::Unavailable`](crate::StoreError::Unavailable). An append is retried with the same message
//! id, so a retry never writes it twice; an append that failed as
//! `Unavailable` may still have been stored, and
//! [`execute_once`](crate::CommandBus::execute_once) with the same command
//! id finds it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outflow::store::jetstream::JetStreamStore;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let store = JetStreamStore::builder(client)
//!     .prefix("bank")
//!     .partitions(4)
//!     .build()
//!     .await?;
//! assert_eq!(store.partitions(), 4);
//! # Ok(()) }
//! ```

mod announced;
mod append;
mod builder;
mod cache;
mod cluster;
mod codec;
mod errors;
mod load;
mod log;
mod notify;
mod outcomes;
mod readers;
mod state;
#[cfg(test)]
mod tests;

pub use builder::JetStreamStoreBuilder;
pub use cluster::{PartitionInfo, ReplicaInfo};
pub use codec::{stream_token, MAX_EVENTS_PER_APPEND, MAX_PARTITIONS};
pub use state::JetStreamStore;
