//! How each reaction to an event is delivered: the strategies, their
//! guarantees, and why the command path stays synchronous.
//!
//! | strategy | delivery | consistency with the append | for |
//! |---|---|---|---|
//! | [inline handler](crate::command::InlineHandler) | exactly once, all or nothing | same transaction | strong consistency in one database (unique reservations) |
//! | [in-memory pub/sub](crate::pubsub::EventBus) | at most once | after commit | caches, live UIs, notifications that may be lost |
//! | [multi-node pub/sub](crate::pubsub::NodeEvents) | at most once | after commit | keeping nodes' in-memory state in step, websockets |
//! | [projection](crate::projection) | at least once; exactly-once effect for same-database read models | eventual | read models; side effects that must happen (in [`effects`](crate::projection::Projection::effects): at least once, idempotent by event id) |
//! | process manager (`outflow::process`, PostgreSQL or SQLite) | at least once dispatch, each command applied once with [`execute_once`](crate::CommandBus::execute_once) | eventual | steps across aggregates that must all happen or be compensated |
//! | JetStream relay (`outflow::relay`, feature `nats`) | at least once, deduplicated by message id | eventual | other services |
//! | [transactional outbox](crate::outbox) | at least once, in order per key | same transaction as the caller's data | code that is not event-sourced but must publish |
//!
//! # Back pressure
//!
//! A command returns after its events are committed, and only then. Nothing
//! in Outflow queues work between a caller and the database: the time a
//! command takes *is* the load it puts on the system, so callers slow down
//! exactly when the database does. Every queue that does exist is bounded —
//! the in-memory bus drops the oldest events for a slow subscriber and tells
//! it how many, and projections and relays read the log in batches at the pace
//! their handler or broker accepts them, their backlog staying in the log
//! where it costs nothing.
//!
//! Moving work "to the background" does not make a system faster: the work
//! still has to be done, by the same database and the same cores. What it
//! changes is *when* the caller hears about it. An unbounded background queue
//! hides overload until memory runs out or a crash loses the queue; a
//! synchronous path shows overload at once, as latency, where it can be acted
//! on. So Outflow keeps the write path synchronous and short (one statement
//! per append), and lets the work that can lag — read models, relays, side
//! effects — run behind a durable log that remembers where each reader is.
//!
//! Pick the weakest strategy your use case can live with, not the strongest
//! one available: an inline handler makes every command wait for it and fail
//! with it; a projection isolates the command path from its failures and its
//! cost.
