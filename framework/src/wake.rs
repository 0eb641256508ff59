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

impl Default for WakeSignal {
    fn default() -> Self {
        WakeSignal::new()
    }
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

/// Waits for the next look of a tailing reader: a wake-up signal, the poll
/// interval, or — while the last look saw committed events it could not
/// read yet ([`LogWindow::held_back`](crate::log::LogWindow::held_back):
/// behind an open transaction, or not yet handed to the reader by the
/// server) — a re-check soon, since no signal comes when they become
/// readable: `first`, then doubling up to [`MAX_RECHECK`] (or the poll
/// interval when shorter), for as long as they stay held back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recheck {
    first: Duration,
    next: Option<Duration>,
}

/// The longest wait between two re-checks of held-back events: what a
/// reader may lag behind the end of the transaction that held them back.
pub(crate) const MAX_RECHECK: Duration = Duration::from_secs(1);

impl Recheck {
    /// Re-checks starting `first` after a look that saw events held back.
    pub(crate) fn new(first: Duration) -> Self {
        Recheck { first, next: None }
    }

    /// A look found events, or nothing held back: no re-check is due.
    pub(crate) fn found(&mut self) {
        self.next = None;
    }

    /// A look saw committed events held back: look again soon (`first`,
    /// then doubling while they stay held back).
    pub(crate) fn held_back(&mut self) {
        self.next.get_or_insert(self.first);
    }

    /// Waits until it is time to look again. Cancel safe: dropping it
    /// changes nothing.
    pub(crate) async fn idle(&mut self, wakeups: &mut Wakeups) {
        let due = self.next;
        tokio::select! {
            _ = wakeups.wait() => {}
            _ = tokio::time::sleep(due.unwrap_or_default()), if due.is_some() => {
                self.missed(wakeups.poll_interval());
            }
        }
    }

    fn missed(&mut self, limit: Duration) {
        self.next = self
            .next
            .map(|d| (d * 2).min(MAX_RECHECK))
            .filter(|d| *d < limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rechecks_double_up_to_a_second_while_held_back() {
        let mut recheck = Recheck::new(Duration::from_millis(1));
        assert_eq!(recheck.next, None);
        recheck.held_back();
        assert_eq!(recheck.next, Some(Duration::from_millis(1)));
        recheck.missed(Duration::from_secs(60));
        // Still held back: the doubling goes on.
        recheck.held_back();
        assert_eq!(recheck.next, Some(Duration::from_millis(2)));
        for _ in 0..20 {
            recheck.missed(Duration::from_secs(60));
        }
        assert_eq!(recheck.next, Some(MAX_RECHECK));
        recheck.found();
        assert_eq!(recheck.next, None);
        // A poll interval shorter than the step: the poll covers it.
        recheck.held_back();
        for _ in 0..5 {
            recheck.missed(Duration::from_millis(5));
        }
        assert_eq!(recheck.next, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_alone_schedules_no_recheck() {
        let signal = WakeSignal::new();
        let mut wakeups = signal.subscribe(Duration::from_millis(100));
        let mut recheck = Recheck::new(Duration::from_millis(10));
        signal.wake();
        recheck.idle(&mut wakeups).await;
        assert_eq!(recheck.next, None);
        recheck.held_back();
        let started = tokio::time::Instant::now();
        recheck.idle(&mut wakeups).await;
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        assert_eq!(recheck.next, Some(Duration::from_millis(20)));
    }
}
