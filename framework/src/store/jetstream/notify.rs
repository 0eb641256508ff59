//! Waking log readers: at once in this process, and on other nodes by a
//! coalesced signal on the wake subject that announces the appends (see
//! [`announced`](super::announced)).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::state::*;

/// At most one signal to other nodes' readers per this interval.
pub(super) const WAKE_EVERY: Duration = Duration::from_millis(2);

impl JetStreamStore {
    /// Wakes other nodes' log readers: a message without payload on the
    /// wake subject, at most one per [`WAKE_EVERY`]: an append in a window
    /// that already sent one leaves one more for the window's end, so the
    /// last append is always signalled.
    pub(super) fn signal_other_nodes(&self) {
        use std::sync::atomic::Ordering;
        let now = self.inner.started.elapsed().as_micros() as u64;
        let last = self.inner.last_signal.load(Ordering::Acquire);
        let every = WAKE_EVERY.as_micros() as u64;
        if now.saturating_sub(last) >= every
            && self
                .inner
                .last_signal
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.send_signal();
            return;
        }
        if self.inner.signal_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        let wait = Duration::from_micros(every.saturating_sub(now.saturating_sub(last)));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            store.inner.signal_pending.store(false, Ordering::Release);
            let now = store.inner.started.elapsed().as_micros() as u64;
            store.inner.last_signal.store(now, Ordering::Release);
            store.send_signal();
        });
    }

    /// Sends the wake-up signal, carrying the appends made here since the
    /// last one (see [`announced`]).
    pub(super) fn send_signal(&self) {
        let client = self.inner.client.clone();
        let subject = self.wake_subject();
        let payload = bytes::Bytes::from(self.inner.announced.take_unsent());
        // Buffered by the client and flushed with the next write; never
        // waited for by the append.
        tokio::spawn(async move {
            let _ = client.publish(subject, payload).await;
        });
    }

    pub(super) fn wake_subject(&self) -> String {
        format!("{}.wake", self.inner.prefix)
    }

    /// Starts the task that turns other nodes' append signals into wake-ups.
    pub(super) fn listen(&self) {
        if self
            .inner
            .listening
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let client = self.inner.client.clone();
        let subject = self.wake_subject();
        tokio::spawn(async move {
            let Ok(mut subscription) = client.subscribe(subject).await else {
                if let Some(inner) = weak.upgrade() {
                    inner
                        .listening
                        .store(false, std::sync::atomic::Ordering::Release);
                }
                return;
            };
            while let Some(signal) = subscription.next().await {
                match weak.upgrade() {
                    Some(inner) => {
                        inner.announced.received(&signal.payload);
                        inner.wake.wake();
                    }
                    None => return,
                }
            }
        });
    }
}
