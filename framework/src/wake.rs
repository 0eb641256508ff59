//! Wake-ups for tailing readers: a signal that new events (or moved
//! checkpoints) may be readable, with a poll interval as the fallback for
//! signals that are lost or never sent.

use std::time::Duration;

use tokio::sync::watch;

/// Tells a tailing log reader when new events may be readable: at once after
/// an append in this process, within milliseconds after one on another node
/// (PostgreSQL `LISTEN`), and at least every poll interval, because
/// notifications can be lost and writers outside Outflow send none.
#[derive(Debug, Clone)]
pub struct Wakeups {
    changes: watch::Receiver<u64>,
    poll_interval: Duration,
}

/// Why [`Wakeups::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// An append or a notification signalled new events.
    Signalled,
    /// The poll interval passed without a signal.
    Poll,
}

impl Wakeups {
    /// A handle on a signal channel, polling every `poll_interval` at least.
    pub(crate) fn new(changes: watch::Receiver<u64>, poll_interval: Duration) -> Self {
        Wakeups {
            changes,
            poll_interval,
        }
    }

    /// Waits for the next signal or the poll interval, whichever comes first.
    /// Signals that arrived since the last call return at once (none is lost
    /// between two calls).
    pub async fn wait(&mut self) -> Wake {
        tokio::select! {
            changed = self.changes.changed() => match changed {
                Ok(()) => Wake::Signalled,
                Err(_) => {
                    tokio::time::sleep(self.poll_interval).await;
                    Wake::Poll
                }
            },
            _ = tokio::time::sleep(self.poll_interval) => Wake::Poll,
        }
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }
}

/// The sending side of [`Wakeups`], owned by a store.
#[derive(Debug)]
pub(crate) struct WakeSignal {
    sender: watch::Sender<u64>,
}

impl WakeSignal {
    pub(crate) fn new() -> Self {
        WakeSignal {
            sender: watch::Sender::new(0),
        }
    }

    pub(crate) fn wake(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self, poll_interval: Duration) -> Wakeups {
        Wakeups::new(self.sender.subscribe(), poll_interval)
    }
}
