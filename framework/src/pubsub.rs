//! Publish/subscribe of committed events, in memory: at most once.
//!
//! [`EventBus`] hands events to subscribers (tokio tasks) after the command
//! that wrote them committed — never from inside an open transaction, so a
//! rolled-back command publishes nothing. It is bounded: a subscriber that
//! falls behind by more than the capacity is told how many events it missed
//! ([`RecvError::Lagged`]) and never slows the command path. Use it for caches,
//! live UIs and notifications that may be lost; anything that must happen
//! belongs in a [projection](crate::projection).
//!
//! Across nodes, [`NodeEvents`] feeds a node's bus from the global log, so
//! events committed on *any* node reach subscribers on every node. Each node
//! follows the log from where it stood when it started, woken by the store's
//! notifications: nothing is sent through `NOTIFY` itself (its 8000-byte limit
//! does not apply), and no `NOTIFY` is ever sent inside a transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::EventLog;
use crate::port::log::LogFilter;
use crate::wake::Recheck;

/// An in-process bus of committed events. Cloning shares the bus.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::pubsub::EventBus;
/// use outflow::{CommandBus, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let events = EventBus::new(1024);
/// let mut subscription = events.subscribe();
/// let bus = CommandBus::<Counter, _>::builder(MemoryStore::new(), ())
///     .publish_to(events.clone())
///     .build();
/// bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
/// let event = subscription.recv().await?;
/// assert_eq!(event.aggregate_id, "c-1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<RecordedEvent>>,
}

/// Why [`Subscription::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The subscriber fell behind; this many events were dropped for it. The
    /// next call returns the oldest event still held.
    #[error("the subscriber lagged and missed {0} events")]
    Lagged(u64),
    /// The bus is gone.
    #[error("the event bus was dropped")]
    Closed,
}

/// A subscriber's end of an [`EventBus`].
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<Arc<RecordedEvent>>,
    filter: LogFilter,
}

impl EventBus {
    /// A bus keeping up to `capacity` events for slow subscribers.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        EventBus { sender }
    }

    /// Subscribes to every event published from now on.
    pub fn subscribe(&self) -> Subscription {
        self.subscribe_filtered(LogFilter::all())
    }

    /// Subscribes to the events matching `filter`.
    pub fn subscribe_filtered(&self, filter: LogFilter) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
            filter,
        }
    }

    /// Publishes committed events. Never blocks: without subscribers the
    /// events are dropped, and slow subscribers lose the oldest.
    pub fn publish(&self, events: impl IntoIterator<Item = RecordedEvent>) {
        for event in events {
            // An error only means nobody is subscribed.
            let _ = self.sender.send(Arc::new(event));
        }
    }

    /// Number of live subscriptions.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl Subscription {
    /// The next event.
    ///
    /// # Errors
    ///
    /// [`RecvError::Lagged`] with the number of events missed;
    /// [`RecvError::Closed`] when the bus is gone.
    pub async fn recv(&mut self) -> Result<Arc<RecordedEvent>, RecvError> {
        loop {
            match self.receiver.recv().await {
                Ok(event) if self.filter.matches(&event) => return Ok(event),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(RecvError::Closed),
            }
        }
    }
}

/// Feeds an [`EventBus`] from the global log, so that subscribers on this
/// node receive events committed on every node (at most once; events
/// committed before it started are not delivered).
///
/// ```no_run
/// # async fn demo(store: outflow::PostgresStore) -> Result<(), outflow::StoreError> {
/// use outflow::pubsub::{EventBus, NodeEvents};
/// let events = EventBus::new(4096);
/// let feed = NodeEvents::start(store, events.clone()).await?;
/// let mut subscription = events.subscribe();
/// // ... subscription.recv().await
/// feed.stop();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NodeEvents {
    stop: CancellationToken,
}

impl NodeEvents {
    /// Starts following the log from its current head.
    ///
    /// # Errors
    ///
    /// [`StoreError`](crate::StoreError) when the head cannot be read.
    pub async fn start<S: EventLog + Clone>(
        store: S,
        bus: EventBus,
    ) -> Result<NodeEvents, crate::error::StoreError> {
        let mut checkpoint: Checkpoint = store.head().await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let mut wakeups = store.wakeups();
        tokio::spawn(async move {
            let filter = LogFilter::all();
            let mut recheck = Recheck::new(Duration::from_millis(1));
            let mut failures = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            loop {
                match store.read_window(checkpoint, &filter, 1000).await {
                    Ok(window) if !window.events.is_empty() => {
                        if let Some(last) = window.events.last() {
                            checkpoint = last.checkpoint();
                        }
                        bus.publish(window.events);
                        recheck.found();
                        failures.reset();
                        continue;
                    }
                    Ok(window) => {
                        if window.held_back {
                            recheck.held_back();
                        } else {
                            recheck.found();
                        }
                        failures.reset();
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::error::error_chain(&error), "node events: reading the log failed");
                        if !failures.wait(&token).await {
                            return;
                        }
                        continue;
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = recheck.idle(&mut wakeups) => {}
                }
            }
        });
        Ok(NodeEvents { stop })
    }

    /// Stops following the log.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for NodeEvents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
